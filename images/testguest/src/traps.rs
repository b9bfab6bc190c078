//! Ring 0 at run time: the interrupt stubs, the service gate and the services.
//!
//! Ring 3 asks for a privileged operation by calling `svc_gate`, whose `ud2` raises #UD; the
//! handler checks that the faulting RIP is the gate (anything else is a real fault), performs the
//! service named in `rax` with arguments in `rdi`, `rsi`, `rdx`, returns its result in `rax` and
//! resumes past the `ud2`. (`syscall`, `int` and IOPL do not work from ring 3 under PVM.) Ring 3
//! treats the gate like a C call, so services may clobber the caller-saved registers.
//!
//! Every other vector prints a FAIL line from ring 0 and halts that CPU.

use core::arch::global_asm;

use crate::boot::{KSTACK_SHIFT, VEC_SPURIOUS, VEC_TIMER, X2APIC};

/// Service numbers (`rax`).
pub const SVC_WRITE: u64 = 0; // rdi = bytes, rsi = length: write to the UART at 0x3F8
pub const SVC_SLEEP: u64 = 1; // rdi = milliseconds: LAPIC one-shot + hlt
pub const SVC_IPI: u64 = 2; // rdi = destination APIC id, rsi = ICR low word
pub const SVC_OUT: u64 = 3; // rdi = port, rsi = value, rdx = width in bytes (1, 2, 4)
pub const SVC_HALT: u64 = 4; // stop this CPU for good
pub const SVC_FLUSH_TLB: u64 = 5; // reload CR3 after ring 3 extended the page tables
pub const SVC_TRIPLE_FAULT: u64 = 6; // load an empty IDT and trap: the VMM sees a triple fault
const NSVC: u64 = 7;

global_asm!(
    r#"
    .pushsection .text, "ax"

    // The service gate, executed in ring 3. The #UD handler resumes at the `ret`.
    .global svc_gate
svc_gate:
    ud2
    ret

    // ---- one 16-byte stub per vector; link.ld splits isr_stubs' address for the IDT ----
    .balign 1024
    .global isr_stubs
isr_stubs:
    .irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31,32,33,34,35,36,37,38,39,40,41,42,43,44,45,46,47
    .if \v == 6
    jmp ud_entry
    .elseif \v == {timer}
    jmp timer_entry
    .elseif \v == {spurious}
    iretq
    .else
    .if (\v != 8) && (\v != 10) && (\v != 11) && (\v != 12) && (\v != 13) && (\v != 14) && (\v != 17) && (\v != 21) && (\v != 29) && (\v != 30)
    pushq $0                        // no error code from the CPU: keep the frame uniform
    .endif
    pushq $\v
    jmp fault_common
    .endif
    .balign 16
    .endr

    // ---- #UD: the service gate, or a real invalid opcode ----
ud_entry:
    cmpq $svc_gate, (%rsp)
    jne 1f
    addq $2, (%rsp)                 // resume after the ud2
    cmpq ${nsvc}, %rax
    jae 2f
    jmp *svc_table(,%rax,8)
1:  pushq $0
    pushq $6
    jmp fault_common
2:  movq $-1, %rax
    iretq

svc_write:
    movq %rsi, %rcx
    movq %rdi, %rsi
    call r0_puts
    xorl %eax, %eax
    iretq

svc_sleep:
    // Sleep in rounds of at most 4 s so that the 1 GHz count fits the 32-bit timer.
1:  testq %rdi, %rdi
    jz 9f
    movq %rdi, %rax
    cmpq $4000, %rax
    jbe 2f
    movl $4000, %eax
2:  subq %rax, %rdi
    imull $1000000, %eax, %esi
    movl $0x380, %ecx               // initial count: arms the one-shot timer
    call apic_write
3:  sti                             // sti's shadow covers hlt: the interrupt cannot slip in between
    hlt
    cli
    movl $0x390, %ecx               // current count is 0 once the timer fired
    call apic_read
    testl %eax, %eax
    jnz 3b
    jmp 1b
9:  xorl %eax, %eax
    iretq

svc_ipi:
    cmpb $0, {x2apic}(%rip)
    jne 1f
    movl $0xFEE00000, %eax
    movl %edi, %edx
    shll $24, %edx
    movl %edx, 0x310(%rax)          // ICR high: destination
    movl %esi, 0x300(%rax)          // ICR low: sends
    xorl %eax, %eax
    iretq
1:  movl $0x830, %ecx               // x2APIC ICR: edx = destination, eax = low word
    movl %esi, %eax
    movl %edi, %edx
    wrmsr
    xorl %eax, %eax
    iretq

svc_out:
    movq %rdx, %rcx
    movl %edi, %edx
    movl %esi, %eax
    cmpl $1, %ecx
    jne 1f
    outb %al, %dx
    jmp 9f
1:  cmpl $2, %ecx
    jne 2f
    outw %ax, %dx
    jmp 9f
2:  outl %eax, %dx
9:  xorl %eax, %eax
    iretq

svc_halt:
    cli
1:  hlt
    jmp 1b

svc_flush_tlb:
    movq %cr3, %rax
    movq %rax, %cr3
    xorl %eax, %eax
    iretq

svc_triple_fault:
    lidt empty_idt_ptr(%rip)
    int3
1:  hlt
    jmp 1b

    // ---- LAPIC timer: acknowledge; the sleeping service checks the count itself ----
timer_entry:
    pushq %rax
    pushq %rcx
    pushq %rdx
    pushq %rsi
    movl $0xB0, %ecx                // EOI
    xorl %esi, %esi
    call apic_write
    popq %rsi
    popq %rdx
    popq %rcx
    popq %rax
    iretq

    // ---- LAPIC register access: ecx = xAPIC register offset ----
    // apic_write: esi = value; clobbers rax, rcx, rdx.
    .global apic_write
apic_write:
    cmpb $0, {x2apic}(%rip)
    jne 1f
    movl $0xFEE00000, %eax
    movl %esi, (%rax,%rcx)
    ret
1:  shrl $4, %ecx
    addl $0x800, %ecx
    movl %esi, %eax
    xorl %edx, %edx
    wrmsr
    ret
    // apic_read: returns eax; clobbers rcx, rdx.
    .global apic_read
apic_read:
    cmpb $0, {x2apic}(%rip)
    jne 1f
    movl $0xFEE00000, %eax
    movl (%rax,%rcx), %eax
    ret
1:  shrl $4, %ecx
    addl $0x800, %ecx
    rdmsr
    ret

    // ---- polled UART output ----
    // r0_putc: al = byte; clobbers rdx.
r0_putc:
    pushq %rax
    movw $0x3FD, %dx
1:  inb %dx, %al                    // wait for the transmit holding register to be empty
    testb $0x20, %al
    jz 1b
    popq %rax
    movw $0x3F8, %dx
    outb %al, %dx
    ret
    // r0_puts: rsi = bytes, rcx = length; clobbers rax, rcx, rdx, rsi.
r0_puts:
    testq %rcx, %rcx
    jz 2f
1:  movb (%rsi), %al
    call r0_putc
    incq %rsi
    decq %rcx
    jnz 1b
2:  ret
    // r0_putz: rsi = NUL-terminated string; clobbers rax, rdx, rsi.
r0_putz:
1:  movb (%rsi), %al
    testb %al, %al
    jz 2f
    call r0_putc
    incq %rsi
    jmp 1b
2:  ret
    // r0_puthex: rbx = value, printed as 0x... without leading zeros; clobbers rax, rcx, rdx.
r0_puthex:
    movb $'0', %al
    call r0_putc
    movb $'x', %al
    call r0_putc
    movl $60, %ecx
1:  testl %ecx, %ecx                // skip leading zero digits, keep the last one
    jz 2f
    movq %rbx, %rax
    shrq %cl, %rax
    andl $15, %eax
    jnz 2f
    subl $4, %ecx
    jmp 1b
2:  movq %rbx, %rax
    shrq %cl, %rax
    andl $15, %eax
    cmpb $10, %al
    jb 3f
    addb $('a' - '0' - 10), %al
3:  addb $'0', %al
    call r0_putc
    subl $4, %ecx
    jns 2b
    ret

    // ---- any other exception: report and stop this CPU ----
    // Stack: vector, error code, rip, cs, rflags, rsp, ss.
fault_common:
    movb $1, {failed}(%rip)         // console::FAILED: the guest must not power off now
    // Take the console lock so the line does not interleave with another CPU's, but only for a
    // while: this CPU may have faulted while holding it. r12b = 1 if we got it.
    xorl %r12d, %r12d
    movl $2000, %ecx
1:  movb $1, %al
    xchgb %al, {lock}(%rip)
    testb %al, %al
    jz 2f
    decl %ecx
    jnz 1b
    jmp 3f
2:  movb $1, %r12b
3:  leaq fault_msg(%rip), %rsi
    call r0_putz
    movq %rsp, %rax                 // CPU index (< 100) from the ring-0 stack this frame is on
    leaq kstacks(%rip), %rbx
    subq %rbx, %rax
    shrq ${kshift}, %rax
    movb $10, %cl                   // in decimal, like the other FAIL lines: ah = ones, al = tens
    divb %cl
    movb %ah, %bl
    testb %al, %al
    jz 1f
    addb $'0', %al
    call r0_putc
1:  movb %bl, %al
    addb $'0', %al
    call r0_putc
    .irp field, 0, 1, 2, 3, 5
    leaq fault_f\field(%rip), %rsi
    call r0_putz
    movq (8 * \field)(%rsp), %rbx
    call r0_puthex
    .endr
    leaq fault_cr2(%rip), %rsi
    call r0_putz
    movq %cr2, %rbx
    call r0_puthex
    movb $'\n', %al
    call r0_putc
    testb %r12b, %r12b
    jz 4f
    movb $0, {lock}(%rip)
4:  cli
1:  hlt
    jmp 1b
    .popsection

    .pushsection .rodata, "a"
    .balign 8
svc_table:
    .quad svc_write, svc_sleep, svc_ipi, svc_out, svc_halt, svc_flush_tlb, svc_triple_fault
    .if (. - svc_table) != 8 * {nsvc}
    .error "svc_table does not match NSVC"
    .endif
empty_idt_ptr: .word 0
    .quad 0
fault_msg: .asciz "testguest: FAIL what=exception cpu="
fault_f0: .asciz " vector="
fault_f1: .asciz " error="
fault_f2: .asciz " rip="
fault_f3: .asciz " cs="
fault_f5: .asciz " rsp="
fault_cr2: .asciz " cr2="
    .popsection
    "#,
    x2apic = sym X2APIC,
    failed = sym crate::console::FAILED,
    lock = sym crate::console::LOCK,
    timer = const VEC_TIMER,
    spurious = const VEC_SPURIOUS,
    nsvc = const NSVC,
    kshift = const KSTACK_SHIFT,
    options(att_syntax)
);
