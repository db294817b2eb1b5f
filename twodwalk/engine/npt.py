"""AMD nested paging (NPT) around the walk: nCR3, the rules of a nested access, and what a
nested page fault reports.

With nested paging on (AMD64 APM Vol 2, 15.25 "Nested Paging"), the processor translates
every guest-physical address through a second set of page tables rooted at the VMCB's nCR3.
Those tables are in the ordinary long-mode format, the format of the host's own page tables
(APM Vol 2 5.3), walked by the same generic walker as every other tree here, but they are a
different tree: KVM builds them (arch/x86/kvm/mmu/tdp_mmu.c) from memslots and the VMM's
host page tables, exactly as it builds EPT on Intel.

What differs from EPT, as the APM and KVM model it:

- every nested access is a user access, so a nested entry must have U/S=1 at every level
  (x86.c `translate_nested_gpa`: "NPT walks are always user-walks");
- the processor's accesses to guest page tables are writes for the nested walk (so that it
  may set the guest's A/D bits): KVM's software walker asks the nested dimension for
  PFERR_WRITE_MASK | PFERR_USER_MASK on each guest table (paging_tmpl.h
  `walk_addr_generic`, `nested_access`), and mmu.c `is_write_to_guest_page_table` expects
  such a fault to report W;
- A and D sit where they always do (bits 5 and 6), and a read-only guest page is not
  execute-only: there is no separate execute right, only NX (bit 63, with the host's
  EFER.NX);
- a failed nested walk is `#VMEXIT(NPF)`, exit code 0x400, with a #PF-style error code in
  EXITINFO1, bit 32 set for a fault on the final guest-physical address and bit 33 for a
  fault on a guest page-table access (KVM's PFERR_GUEST_FINAL_MASK and PFERR_GUEST_PAGE_MASK),
  and the faulting guest-physical address in EXITINFO2 (APM Vol 2 15.25.6). KVM passes both
  straight on (svm.c `npf_interception` -> `kvm_mmu_page_fault`).
"""

from __future__ import annotations

from twodwalk.engine.exits import SVM_EXIT_NPF as SVM_EXIT_NPF  # re-exported: NPT's exit
from twodwalk.engine.formats import Ia32eFormat
from twodwalk.engine.paging import (
    PFERR_FETCH,
    PFERR_PRESENT,
    PFERR_RSVD,
    PFERR_USER,
    PFERR_WRITE,
    PagingControls,
    X86AccessRules,
    bit_names,
)
from twodwalk.engine.walker import Access, AccessKind, FaultKind, WalkRecord

PFERR_GUEST_FINAL = 1 << 32  # EXITINFO1 bit 32: the fault was on the final GPA
PFERR_GUEST_PAGE = 1 << 33  # EXITINFO1 bit 33: the fault was on a guest page-table access

# The nested walk's access rules: the host's long-mode rules for a user access. The host runs
# with EFER.NX=1 and CR0.WP=1; SMEP, SMAP and protection keys concern supervisor accesses or
# PKRU and do not apply to a walk made of user accesses.
NPT_RULES: X86AccessRules = PagingControls(cr0_wp=True, efer_nxe=True).rules

# Each bit of EXITINFO1 for #NPF: (mask, name, what a set bit says); APM Vol 2 15.25.6.
NPF_EXITINFO1_BITS: tuple[tuple[int, str, str], ...] = (
    (PFERR_PRESENT, "P", "the nested entry was present: a protection or reserved-bit fault"),
    (PFERR_WRITE, "W", "the access was a write (every guest page-table access is one)"),
    (PFERR_USER, "U", "a user access (every nested access is one)"),
    (PFERR_RSVD, "RSVD", "a reserved bit was set in a nested entry"),
    (PFERR_FETCH, "I/D", "the access was an instruction fetch"),
    (PFERR_GUEST_FINAL, "final GPA", "the fault was on the final guest-physical address"),
    (PFERR_GUEST_PAGE, "guest table", "the fault was on an access to a guest page table"),
)


def nested_access(kind: AccessKind | str) -> Access:
    """The access the nested walk checks: the same kind, always as a user access."""
    return Access.of(kind, cpl=3)


GUEST_TABLE_ACCESS = nested_access(AccessKind.WRITE)  # a guest table read or A/D update


def npf_exit_info1(record: WalkRecord, final: bool) -> int:
    """EXITINFO1 of the #NPF a failed nested walk causes: the #PF-style error code of the
    nested walk (P: the entry that stopped it was present; W, U, I/D of the access; RSVD),
    with bit 32 for the final GPA or bit 33 for a guest page-table access."""
    assert isinstance(record.format, Ia32eFormat) and record.fault is not None
    access = record.access
    code = PFERR_USER
    if record.fault.kind is not FaultKind.NOT_PRESENT:
        code |= PFERR_PRESENT
    if record.fault.kind is FaultKind.RESERVED:
        code |= PFERR_RSVD
    if access.is_write:
        code |= PFERR_WRITE
    if access.is_fetch:
        code |= PFERR_FETCH
    return code | (PFERR_GUEST_FINAL if final else PFERR_GUEST_PAGE)


def exit_info1_names(exit_info1: int) -> list[str]:
    """The set bits of an #NPF's EXITINFO1 by name."""
    return bit_names(exit_info1, NPF_EXITINFO1_BITS)
