# The guest side of twodwalk.realkvm.runtime (RealRunner). Assembled with GNU as and embedded
# in runtime.py as RUNTIME_CODE (tests/test_realkvm_runner.py checks the bytes):
#     as --64 -o runtime.o runtime.S && objcopy -O binary -j .text runtime.o runtime.bin
# Position independent. The VMM maps all of it on a supervisor page and its first 0x20 bytes
# (the stubs) on a user page; the offsets below are STUBS/HANDLERS/HANDLER_STRIDE in runtime.py.
        .intel_syntax noprefix
        .code64
        .text
        .set DONE_PORT, 0xf0            # OUT here: the access completed (RAX: what a read read)
        .set EXCEPTION_PORT, 0xf1       # OUT here: RAX vector, RBX error code, RDX RIP, RCX CR2

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
