"""The VM exits shadow paging takes, as each vendor numbers and names them.

With EPT or NPT off, KVM intercepts the guest's page faults, CR3 loads and INVLPGs. The three
events are the same on both vendors; their exit codes, names and the information the CPU
saves are not:

- Intel VMX (SDM Vol 3C appendix C and 28.2.1): exit reason 0 EXCEPTION_NMI for an
  intercepted #PF (the exit qualification holds the linear address), 28 CR_ACCESS for MOV to
  CR3 (qualification 3: CR3, MOV to CR, from RAX), 14 INVLPG (qualification: the address);
- AMD SVM (APM Vol 2 15.12 and appendix C): exit code 0x4E VMEXIT_EXCP14 (EXITINFO1 the #PF
  error code, EXITINFO2 the faulting address), 0x13 VMEXIT_CR3_WRITE (with decode assists,
  EXITINFO1 bit 63 says MOV CRx and bits 3:0 name the register), 0x79 VMEXIT_INVLPG (with
  decode assists, EXITINFO1 the address); and 0x400 VMEXIT_NPF for nested paging.
"""

from __future__ import annotations

from dataclasses import dataclass

from twodwalk.engine.trace import VmExit

SVM_EXIT_NPF = 0x400  # arch/x86/include/uapi/asm/svm.h
SVM_EXIT_EXCP_PF = 0x40 + 14  # SVM_EXIT_EXCP_BASE + PF_VECTOR
SVM_EXIT_WRITE_CR3 = 0x13
SVM_EXIT_INVLPG = 0x79
SVM_CR_MOV = 1 << 63  # EXITINFO1 of a CR access with decode assists: a MOV (SVM_EXITINFO_REG_MASK)
SVM_EXIT_CODES = frozenset({SVM_EXIT_NPF, SVM_EXIT_EXCP_PF, SVM_EXIT_WRITE_CR3, SVM_EXIT_INVLPG})

VMX_EXIT_REASON_EXCEPTION_NMI = 0
VMX_EXIT_REASON_INVLPG = 14
VMX_EXIT_REASON_CR_ACCESS = 28
VMX_CR_ACCESS_MOV_TO_CR3 = 3  # bits 3:0 the CR number, 5:4 access 0 (MOV to CR), 11:8 RAX


@dataclass(frozen=True)
class ShadowExits:
    """How one vendor reports the three events shadow paging intercepts."""

    vendor: str

    @property
    def svm(self) -> bool:
        return self.vendor == "amd"

    def page_fault(self, gva: int | None, error_code: int) -> VmExit:
        """An intercepted #PF: VMX gives the linear address, SVM the error code (EXITINFO1)
        and the address (EXITINFO2). `gva` None: a store the model's guest kernel makes by
        GPA, through a mapping the model does not keep."""
        if self.svm:
            return VmExit(SVM_EXIT_EXCP_PF, "EXCP14", error_code, None, gva)
        return VmExit(VMX_EXIT_REASON_EXCEPTION_NMI, "EXCEPTION_NMI (#PF)", gva, None, gva)

    def cr3_load(self) -> VmExit:
        """MOV to CR3 from RAX."""
        if self.svm:
            return VmExit(SVM_EXIT_WRITE_CR3, "CR3_WRITE", SVM_CR_MOV)
        return VmExit(VMX_EXIT_REASON_CR_ACCESS, "CR_ACCESS (MOV to CR3)", VMX_CR_ACCESS_MOV_TO_CR3)

    def invlpg(self, gva: int) -> VmExit:
        """INVLPG of `gva`."""
        reason = SVM_EXIT_INVLPG if self.svm else VMX_EXIT_REASON_INVLPG
        return VmExit(reason, "INVLPG", gva, None, gva)


def exit_label(exit_: VmExit) -> str:
    """An exit as its vendor's manual writes it: "48 EPT_VIOLATION", "#VMEXIT(NPF)"."""
    if exit_.reason in SVM_EXIT_CODES:
        return f"#VMEXIT({exit_.name})"
    return f"{exit_.reason} {exit_.name}"
