//! Boot and per-CPU ring-0 setup.
//!
//! Ring 0 is emulated instruction by instruction on a PVM host, so everything that can be data is
//! data: the page tables (identity map of the low 4 GiB with 2 MiB pages, user-accessible at every
//! level so ring 3 can reach MMIO and all RAM), the GDT with one TSS descriptor per CPU and the IDT
//! are all static. A CPU's ring-0 path is the PVH entry (BSP) or the trampoline (APs), long mode,
//! a few register loads, LAPIC and kvmclock set-up, and `iretq` into ring 3.
//!
//! All ring-0 code is hand-written assembly: no compiler-generated SSE or other instruction the
//! hypervisor's emulator might not know can sneak in.

use core::arch::global_asm;
use core::sync::atomic::{AtomicU32, AtomicU64, AtomicU8};

use crate::{kvmclock, MAX_CPUS};

/// Ring-0 stack per CPU: exception frames and the services' few pushes.
pub const KSTACK_SHIFT: u32 = 12;
/// Ring-3 stack per CPU.
pub const USTACK_SHIFT: u32 = 15;

pub const SEL_CODE32: u32 = 0x08;
pub const SEL_DATA: u32 = 0x10;
pub const SEL_CODE64: u32 = 0x18;
pub const SEL_USER_DATA: u32 = 0x20 | 3;
pub const SEL_USER_CODE: u32 = 0x28 | 3;
pub const SEL_TSS0: u32 = 0x30;

pub const VEC_TIMER: u32 = 0x20;
pub const VEC_SPURIOUS: u32 = 0x2F;
/// IDT entries: the exceptions, the LAPIC timer and the spurious vector.
pub const IDT_ENTRIES: u32 = 0x30;

/// Physical address of `hvm_start_info`, stored by the PVH entry from `ebx`.
pub static START_INFO: AtomicU32 = AtomicU32::new(0);
/// Index of the CPU that is booting next: 0 for the BSP, set by ring 3 before each SIPI.
pub static BOOT_CPU: AtomicU32 = AtomicU32::new(0);
/// Local APIC id of each CPU, read from its own LAPIC (`cpuid` shows the host's values under PVM).
pub static APIC_IDS: [AtomicU32; MAX_CPUS] = [const { AtomicU32::new(0) }; MAX_CPUS];
/// 1 when the LAPIC is in x2APIC mode (IA32_APIC_BASE.EXTD), so ring 0 uses MSRs, not MMIO.
pub static X2APIC: AtomicU8 = AtomicU8::new(0);

#[allow(non_upper_case_globals)]
extern "C" {
    /// The identity map's page-directory-pointer table (one per 1 GiB); ring 3 fills entries 4 and
    /// up for RAM above 4 GiB (see `paging`).
    pub static pdpt: [AtomicU64; 512];
    /// First byte past the kernel image including its .bss (from link.ld).
    static __kernel_end: u8;
}

global_asm!(
    r#"
    // ---- PVH entry note: where a PVH loader enters us, in 32-bit protected mode ----
    .pushsection .note.Xen, "a", @note
    .balign 4
    .long 4, 8, 18                  // namesz, descsz, XEN_ELFNOTE_PHYS32_ENTRY
    .asciz "Xen"
    .balign 4
    .quad pvh_start32               // 8 bytes like Linux's; readers of 4 bytes get the same value
    .popsection

    .pushsection .text.boot, "ax"
    .code32
    .global pvh_start32
pvh_start32:
    // ebx = hvm_start_info; no stack, paging off, flat segments.
    cli
    cld
    movl %ebx, {start_info}
    lgdt gdt_ptr
    ljmp ${code32}, $ap_start32

    // APs arrive here from the trampoline with our GDT loaded and CS = code32.
    .global ap_start32
ap_start32:
    movl ${data}, %eax
    movl %eax, %ds
    movl %eax, %es
    movl %eax, %ss
    movl $pml4, %eax
    movl %eax, %cr3
    movl %cr4, %eax
    orl $0x620, %eax                // PAE | OSFXSR | OSXMMEXCPT (ring 3 may use SSE)
    movl %eax, %cr4
    movl $0xC0000080, %ecx          // EFER.LME
    rdmsr
    orl $0x100, %eax
    wrmsr
    movl %cr0, %eax
    andl $0x9FFFFFF3, %eax          // clear CD, NW, TS, EM
    orl $0x80000023, %eax           // PG | NE | MP | PE
    movl %eax, %cr0
    ljmp ${code64}, $entry64

    .code64
entry64:
    movl ${data}, %eax
    movl %eax, %ds
    movl %eax, %es
    movl %eax, %ss
    xorl %eax, %eax
    movl %eax, %fs
    movl %eax, %gs
    movl {boot_cpu}(%rip), %edi     // edi = this CPU's index for the rest of the path

    // Ring-0 stack; the TSS's RSP0 points at its top so traps from ring 3 land on it.
    leal 1(%rdi), %eax
    shlq ${kshift}, %rax
    leaq kstacks(%rip), %rsp
    addq %rax, %rsp
    movl %edi, %eax
    shll $7, %eax
    leaq tss_array(%rip), %rcx
    movq %rsp, 4(%rcx,%rax)
    movl %edi, %eax
    shll $4, %eax
    addl ${tss0}, %eax
    ltr %ax
    lidt idt_ptr(%rip)

    // LAPIC: x2APIC if the firmware/VMM enabled it, else xAPIC MMIO.
    movl $0x1B, %ecx
    rdmsr
    shrl $10, %eax
    andl $1, %eax
    movb %al, {x2apic}(%rip)
    movl $0xF0, %ecx                // spurious vector register: enable
    movl $(0x100 | {spurious}), %esi
    call apic_write
    movl $0x3E0, %ecx               // timer divide by 1 (KVM's APIC timer counts at 1 GHz)
    movl $0xB, %esi
    call apic_write
    movl $0x320, %ecx               // LVT timer: one-shot, unmasked
    movl ${timer}, %esi
    call apic_write
    movl $0x20, %ecx                // APIC id
    call apic_read
    cmpb $0, {x2apic}(%rip)
    jne 1f
    shrl $24, %eax
1:  leaq {apic_ids}(%rip), %rcx
    movl %eax, (%rcx,%rdi,4)

    // kvmclock: this CPU's 64-byte pvclock slot, enabled (bit 0).
    movl %edi, %eax
    shll $6, %eax
    leaq {pvclock}(%rip), %rcx
    addq %rcx, %rax
    orq $1, %rax
    movq %rax, %rdx
    shrq $32, %rdx
    movl $0x4b564d01, %ecx          // MSR_KVM_SYSTEM_TIME_NEW
    wrmsr

    // BSP: mask both 8259s; a stray PIC vector must never reach us (also after a restore).
    testl %edi, %edi
    jnz 2f
    movb $0xFF, %al
    outb %al, $0x21
    outb %al, $0xA1

    // Enter ring 3 at ring3_entry(cpu) on this CPU's user stack, interrupts off.
2:  leal 1(%rdi), %eax
    shlq ${ushift}, %rax
    leaq ustacks(%rip), %rcx
    addq %rcx, %rax
    subq $8, %rax                   // as if called: rsp + 8 is 16-aligned
    pushq ${user_ss}
    pushq %rax
    pushq $2
    pushq ${user_cs}
    pushq ${entry}
    iretq
    .popsection

    // ---- descriptor tables and page tables: static data, nothing to build at run time ----
    .pushsection .data, "aw"
    .balign 16
    .global gdt
gdt:
    .quad 0
    .quad 0x00CF9A000000FFFF        // 0x08 kernel code, 32-bit
    .quad 0x00CF92000000FFFF        // 0x10 kernel data
    .quad 0x00AF9A000000FFFF        // 0x18 kernel code, 64-bit
    .quad 0x00CFF2000000FFFF        // 0x20 user data
    .quad 0x00AFFA000000FFFF        // 0x28 user code, 64-bit
    .set i, 0                       // 0x30 + 16*i: TSS of CPU i (104 bytes at tss_array + 128*i)
    .rept {max_cpus}
    .word 103
    .word tss_lo + i * 128
    .byte tss_b2
    .byte 0x89
    .byte 0
    .byte tss_b3
    .long 0
    .long 0
    .set i, i + 1
    .endr
    .global gdt_end
gdt_end:
    .balign 8
    .word 0
gdt_ptr:
    .word gdt_end - gdt - 1
    .quad gdt

    .balign 16
idt:
    .set i, 0                       // interrupt gates to the 16-byte stubs in traps.rs
    .rept {idt_entries}
    .word isr_stubs_lo + i * 16
    .word {code64}
    .word 0x8E00
    .word isr_stubs_hi
    .long 0
    .long 0
    .set i, i + 1
    .endr
idt_end:
    .balign 8
    .word 0
idt_ptr:
    .word idt_end - idt - 1
    .quad idt
    .popsection

    .pushsection .data.pagetables, "aw"
    .balign 4096
pml4:
    .quad pdpt + 7
    .fill 511, 8, 0
    .global pdpt
pdpt:                               // P | RW | US at every level
    .quad pd + 0x0007, pd + 0x1007, pd + 0x2007, pd + 0x3007
    .fill 508, 8, 0
pd:
    .set i, 0
    .rept 2048
    .quad (i << 21) + 0x87          // 2 MiB page: P | RW | US | PS
    .set i, i + 1
    .endr
    .popsection

    .pushsection .bss, "aw", @nobits
    .balign 8192
    .global tss_array
tss_array:
    .skip 128 * {max_cpus}
    .balign 4096
    .global kstacks
kstacks:
    .skip {max_cpus} << {kshift}
    .balign 4096
    .global ustacks
ustacks:
    .skip {max_cpus} << {ushift}
    .popsection
    "#,
    start_info = sym START_INFO,
    boot_cpu = sym BOOT_CPU,
    apic_ids = sym APIC_IDS,
    x2apic = sym X2APIC,
    pvclock = sym kvmclock::PVCLOCK,
    entry = sym crate::ring3_entry,
    code32 = const SEL_CODE32,
    data = const SEL_DATA,
    code64 = const SEL_CODE64,
    user_ss = const SEL_USER_DATA,
    user_cs = const SEL_USER_CODE,
    tss0 = const SEL_TSS0,
    spurious = const VEC_SPURIOUS,
    timer = const VEC_TIMER,
    idt_entries = const IDT_ENTRIES,
    max_cpus = const MAX_CPUS,
    kshift = const KSTACK_SHIFT,
    ushift = const USTACK_SHIFT,
    options(att_syntax)
);

/// First byte past the kernel image.
pub fn kernel_end() -> u64 {
    core::ptr::addr_of!(__kernel_end) as u64
}
