//! Ring 3's side of the service gate (see `traps`): thin wrappers, one per service.

use core::arch::asm;

use crate::traps::{SVC_FLUSH_TLB, SVC_HALT, SVC_IPI, SVC_OUT, SVC_SLEEP, SVC_TRIPLE_FAULT, SVC_WRITE};

#[inline(always)]
fn svc(n: u64, a: u64, b: u64, c: u64) -> u64 {
    let ret;
    // SAFETY: svc_gate is `ud2; ret`. Ring 0 performs service n, which reads at most the buffer it
    // is given and writes no memory of ours, and returns past the ud2 with the result in rax. It may
    // clobber what a C call may, which clobber_abi declares. The `call` writes below rsp, which is
    // why the crate is built without a red zone.
    unsafe {
        asm!("call svc_gate", inlateout("rax") n => ret, in("rdi") a, in("rsi") b, in("rdx") c,
             clobber_abi("C"));
    }
    ret
}

/// Writes bytes to the serial console (ring 0 does the port I/O).
pub fn write(bytes: &[u8]) {
    svc(SVC_WRITE, bytes.as_ptr() as u64, bytes.len() as u64, 0);
}

/// Halts this CPU for `ms` milliseconds on its LAPIC timer.
pub fn sleep_ms(ms: u64) {
    svc(SVC_SLEEP, ms, 0, 0);
}

/// Sends an IPI: `icr_low` holds the vector and delivery mode (INIT, STARTUP).
pub fn send_ipi(apic_id: u32, icr_low: u32) {
    svc(SVC_IPI, apic_id as u64, icr_low as u64, 0);
}

/// Writes `value` to I/O port `port` with an access of `width` bytes (1, 2 or 4).
pub fn out(port: u16, value: u32, width: u8) {
    svc(SVC_OUT, port as u64, value as u64, width as u64);
}

/// Makes this CPU see page-table changes made by ring 3.
pub fn flush_tlb() {
    svc(SVC_FLUSH_TLB, 0, 0, 0);
}

/// Stops this CPU for good (interrupts off, hlt).
pub fn halt() -> ! {
    svc(SVC_HALT, 0, 0, 0);
    // The service never returns; this only satisfies the type.
    loop {
        core::hint::spin_loop();
    }
}

/// Makes this CPU triple-fault (for testing how the VMM reports it).
pub fn triple_fault() -> ! {
    svc(SVC_TRIPLE_FAULT, 0, 0, 0);
    loop {
        core::hint::spin_loop();
    }
}
