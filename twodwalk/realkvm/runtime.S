# The guest side of twodwalk.realkvm.runtime (RealRunner). Assembled with GNU as and embedded
# in runtime.py as RUNTIME_CODE (tests/test_realkvm_runner.py checks the bytes):
#     as --64 -o runtime.o runtime.S && objcopy -O binary -j .text runtime.o runtime.bin
# Position independent. The VMM maps all of it on a supervisor page and its first 0x20 bytes
# (the stubs) on a user page; the offsets below are STUBS/HANDLERS/HANDLER_STRIDE and
# SEQUENCE/STEPS in runtime.py.
        .intel_syntax noprefix
        .code64
        .text
        .set DONE_PORT, 0xf0            # OUT here: the access completed (RAX: what a read read)
        .set EXCEPTION_PORT, 0xf1       # OUT here: RAX vector, RBX error code, RDX RIP, RCX CR2
        .set STEP_PORT, 0xf2            # OUT here: a sequence's step completed (RAX: a read's)

# One access each (RDI: the GVA, RSI: the value to write); IOPL=3 lets ring 3 do the OUT.
        .org 0x00
read:   mov rax, [rdi]
        out DONE_PORT, al
        .org 0x08
write:  mov [rdi], rsi
        out DONE_PORT, al
        .org 0x10
fetch:  jmp rdi                         # the caller's int3 there reports as vector 3

# Vector n's handler at 0x20 + 16 * n: a zero error code where the CPU pushes none (SDM Vol. 3A
# table 6-1: 8, 10-14, 17, 21, 29 and 30 push one), then the vector.
        .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
        .org 0x20 + 16 * \n
        .if !(\n == 8 || (\n >= 10 && \n <= 14) || \n == 17 || \n == 21 || \n == 29 || \n == 30)
        push 0
        .endif
        push \n
        jmp common
        .endr

# The frame (SDM Vol. 3A 6.14.1): vector, error code, RIP, CS, RFLAGS, RSP, SS.
common: pop rax
        pop rbx
        pop rdx
        mov rcx, cr2
        out EXCEPTION_PORT, al
                                        # a sequence goes on with its next step

# A sequence of steps in one run, at CPL 0: R12 points at the command list, 24 bytes a step
# (the step's entry point below, its RDI, its RSI); R13 is the stack top and R14 the RFLAGS,
# both taken back after an exception, as its IRETQ would (RFLAGS.AC is found clear there on
# kvm_pvm). The VMM reads the guest's state at each report and re-enters KVM_RUN to go on.
next:   mov rsp, r13
        push r14
        popfq
        mov rbx, [r12]
        mov rdi, [r12 + 8]
        mov rsi, [r12 + 16]
        add r12, 24
        jmp rbx
step_read:
        mov rax, [rdi]
        jmp step_done
step_write:
        mov [rdi], rsi
        jmp step_done
step_cr0:
        mov cr0, rsi                    # CR0.WP on or off (SDM Vol. 3A 2.5)
        jmp step_done
step_cr3:
        mov cr3, rsi                    # flushes the TLB's non-global entries (SDM 4.10.4.1)
        jmp step_done
step_invlpg:
        invlpg [rdi]                    # flushes one page's translations (SDM 4.10.4.1)
step_done:
        out STEP_PORT, al
        jmp next
