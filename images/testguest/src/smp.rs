//! Starting the other CPUs. Ring 3 copies the real-mode trampoline below 1 MiB, names the CPU that
//! boots next in `BOOT_CPU`, and asks ring 0 to send INIT and STARTUP IPIs. The AP goes 16 → 32 → 64
//! bit through the same code as the BSP, gets its own stacks and TSS, and enters ring 3 in
//! `ap_main`.

use core::arch::global_asm;
use core::sync::atomic::{AtomicBool, Ordering};

use crate::boot::{APIC_IDS, BOOT_CPU, SEL_CODE32};
use crate::bootinfo::Range;
use crate::{console, kvmclock, sys, workload, MAX_CPUS};

/// Where the trampoline runs: the STARTUP vector 0x08 starts an AP at 0x0800:0000.
const TRAMPOLINE: u64 = 0x8000;
const ICR_INIT: u32 = 0x4500;
const ICR_STARTUP: u32 = 0x4600 | (TRAMPOLINE >> 12) as u32;

global_asm!(
    r#"
    .pushsection .text, "ax"
    .code16
    .global tramp_start
tramp_start:
    cli
    xorw %ax, %ax
    movw %ax, %ds
    lgdtl {base} + (tramp_gdtr - tramp_start)
    movl %cr0, %eax
    orl $1, %eax
    movl %eax, %cr0
    ljmpl ${code32}, $ap_start32
    .balign 4
tramp_gdtr:
    .word gdt_end - gdt - 1
    .long gdt
    .global tramp_end
tramp_end:
    .code64
    .popsection
    "#,
    base = const TRAMPOLINE,
    code32 = const SEL_CODE32,
    options(att_syntax)
);

extern "C" {
    static tramp_start: u8;
    static tramp_end: u8;
}

/// Set by each AP once it runs in ring 3.
static ALIVE: [AtomicBool; MAX_CPUS] = [const { AtomicBool::new(false) }; MAX_CPUS];
/// Set by each CPU just before it starts its workload.
static RUNNING: [AtomicBool; MAX_CPUS] = [const { AtomicBool::new(false) }; MAX_CPUS];

/// Starts every enabled CPU of the MADT other than the BSP, one at a time; returns the CPU count.
pub fn start_aps(apic_ids: &[u32], ram: &[Range]) -> usize {
    if apic_ids.len() <= 1 {
        return 1;
    }
    if !ram.iter().any(|r| r.start <= TRAMPOLINE && r.end >= TRAMPOLINE + 4096) {
        console::fail("smp", "reason=no-ram-for-trampoline-at-0x8000");
    }
    // SAFETY: both symbols delimit the trampoline's bytes in the kernel image; the destination page
    // is RAM (checked above) that nothing else uses once boot information has been read.
    unsafe {
        let start = core::ptr::addr_of!(tramp_start);
        let len = core::ptr::addr_of!(tramp_end) as usize - start as usize;
        core::ptr::copy_nonoverlapping(start, TRAMPOLINE as *mut u8, len);
    }
    let bsp = APIC_IDS[0].load(Ordering::Relaxed);
    let mut cpu = 1;
    for &id in apic_ids.iter().filter(|&&id| id != bsp) {
        BOOT_CPU.store(cpu as u32, Ordering::SeqCst);
        sys::send_ipi(id, ICR_INIT);
        sys::send_ipi(id, ICR_STARTUP);
        // A second STARTUP is ignored by a CPU that already runs; send one if the first got lost.
        if !wait(&ALIVE[cpu], 200_000_000) {
            sys::send_ipi(id, ICR_STARTUP);
            if !wait(&ALIVE[cpu], 2_000_000_000) {
                console::Line::new()
                    .s("FAIL what=smp reason=cpu-did-not-start cpu=")
                    .u(cpu as u64)
                    .s(" apic=")
                    .u(id as u64)
                    .fail();
            }
        }
        cpu += 1;
    }
    cpu
}

fn wait(flag: &AtomicBool, ns: u64) -> bool {
    let deadline = kvmclock::uptime_ns(0) + ns;
    while !flag.load(Ordering::Acquire) {
        if kvmclock::uptime_ns(0) > deadline {
            return false;
        }
        core::hint::spin_loop();
    }
    true
}

/// An AP's life in ring 3.
pub fn ap_main(cpu: usize) -> ! {
    if !kvmclock::init(cpu) {
        console::fail("kvmclock", "reason=no-pvclock-update");
    }
    ALIVE[cpu].store(true, Ordering::Release);
    workload::run(cpu)
}

/// Called by each CPU right before its workload loop.
pub fn mark_running(cpu: usize) {
    RUNNING[cpu].store(true, Ordering::Release);
}

/// Waits until CPUs 1..n run their workloads.
pub fn wait_running(n: usize) {
    for flag in &RUNNING[1..n] {
        while !flag.load(Ordering::Acquire) {
            core::hint::spin_loop();
        }
    }
}
