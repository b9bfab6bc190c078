//! Time from kvmclock, read in ring 3.
//!
//! Ring 0 points MSR_KVM_SYSTEM_TIME_NEW at each CPU's slot below at boot; KVM keeps the slot's
//! pvclock record up to date and ring 3 scales `rdtsc` with it (the usual version/seqlock protocol).
//! Guest time is counted from `BOOT_NS`, kept in guest memory, so a restored guest goes on counting.

use core::arch::asm;
use core::cell::UnsafeCell;
use core::ptr::read_volatile;
use core::sync::atomic::{compiler_fence, AtomicU64, Ordering};

use crate::MAX_CPUS;

/// One CPU's pvclock record (32 bytes) in a 64-byte slot: never straddles a page.
#[repr(C, align(64))]
pub struct Slot(UnsafeCell<[u8; 64]>);

// SAFETY: the slot is only written by the hypervisor and only read with volatile loads guarded by
// the version protocol.
unsafe impl Sync for Slot {}

/// kvmclock records, indexed by CPU (ring 0 computes the address of slot i itself).
pub static PVCLOCK: [Slot; MAX_CPUS] = [const { Slot(UnsafeCell::new([0; 64])) }; MAX_CPUS];

/// kvmclock value at the guest's first boot.
static BOOT_NS: AtomicU64 = AtomicU64::new(0);

fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: lfence orders rdtsc after the loads before it; rdtsc only writes edx:eax.
    unsafe { asm!("lfence", "rdtsc", out("eax") lo, out("edx") hi, options(nostack, nomem)) };
    (hi as u64) << 32 | lo as u64
}

/// Raw kvmclock in nanoseconds as seen from `cpu`'s record, or None until KVM filled it in.
fn read(cpu: usize) -> Option<u64> {
    let p = PVCLOCK[cpu].0.get() as *const u8;
    loop {
        // SAFETY: p is the start of a live 64-byte record; all offsets are inside it and aligned.
        let (v1, tsc_ts, sys_time, mul, shift) = unsafe {
            let v1 = read_volatile(p as *const u32);
            compiler_fence(Ordering::SeqCst);
            (
                v1,
                read_volatile(p.add(8) as *const u64),
                read_volatile(p.add(16) as *const u64),
                read_volatile(p.add(24) as *const u32),
                read_volatile(p.add(28) as *const i8),
            )
        };
        let tsc = rdtsc();
        compiler_fence(Ordering::SeqCst);
        // SAFETY: as above.
        let v2 = unsafe { read_volatile(p as *const u32) };
        if v1 == 0 {
            return None;
        }
        if v1 & 1 != 0 || v1 != v2 {
            core::hint::spin_loop();
            continue;
        }
        let mut delta = tsc.wrapping_sub(tsc_ts);
        if shift >= 0 {
            delta <<= shift;
        } else {
            delta >>= -shift;
        }
        return Some(sys_time.wrapping_add(((delta as u128 * mul as u128) >> 32) as u64));
    }
}

/// Waits until this CPU's record is live; on the BSP's first boot also records the boot time.
pub fn init(cpu: usize) -> bool {
    for _ in 0..100_000_000u32 {
        if let Some(now) = read(cpu) {
            if cpu == 0 && BOOT_NS.load(Ordering::Relaxed) == 0 {
                BOOT_NS.store(now.max(1), Ordering::Relaxed);
            }
            return true;
        }
        core::hint::spin_loop();
    }
    false
}

/// Nanoseconds of guest time (since the first boot), read on `cpu`.
pub fn uptime_ns(cpu: usize) -> u64 {
    let now = loop {
        if let Some(t) = read(cpu) {
            break t;
        }
        core::hint::spin_loop();
    };
    now.saturating_sub(BOOT_NS.load(Ordering::Relaxed))
}
