//! The test guest: a PVH kernel whose workloads run in ring 3 (see docs/testguest.md).
//!
//! On a PVM host ring 0 is emulated (~1000x slower) while ring 3 runs natively, so ring 0 (boot.rs,
//! traps.rs: assembly only) does just what needs privilege, and everything else, including ACPI
//! parsing, starting the other CPUs and the virtio driver, is this Rust code in ring 3.

#![no_std]
#![no_main]

mod acpi;
mod boot;
mod bootinfo;
mod cmdline;
mod console;
mod kvmclock;
mod mem;
mod net;
mod paging;
mod phys;
mod power;
mod smp;
mod sync;
mod sys;
mod traps;
mod virtio;
mod vsock;
mod workload;

use core::sync::atomic::Ordering;

use console::{fail, Line};

/// CPUs the guest can run (static per-CPU stacks, TSSes and state).
pub const MAX_CPUS: usize = 64;

/// Where every CPU enters ring 3 (boot.rs's `iretq`), with its index.
extern "C" fn ring3_entry(cpu: u32) -> ! {
    if cpu == 0 {
        bsp_main()
    } else {
        smp::ap_main(cpu as usize)
    }
}

fn bsp_main() -> ! {
    if !kvmclock::init(0) {
        fail("kvmclock", "reason=no-pvclock-update");
    }
    let info = bootinfo::read(boot::START_INFO.load(Ordering::Relaxed)).unwrap_or_else(|r| fail("boot", r));
    let cfg =
        cmdline::parse(info.cmdline).unwrap_or_else(|word| Line::new().s("FAIL what=cmdline word=").bytes(word).fail());
    let acpi = acpi::parse(info.rsdp).unwrap_or_else(|r| fail("acpi", r));
    power::set(acpi.power);

    let bsp = boot::APIC_IDS[0].load(Ordering::Relaxed);
    let apic_ids = &acpi.apic_ids[..acpi.ncpus];
    let ncpus = 1 + apic_ids.iter().filter(|&&id| id != bsp).count();
    if ncpus > MAX_CPUS {
        fail("smp", "reason=too-many-cpus");
    }

    let mut alloc = bootinfo::Alloc::new(info.ram(), boot::kernel_end(), paging::MAP_LIMIT);
    paging::map_high_ram(info.ram(), &mut alloc).unwrap_or_else(|r| fail("paging", r));
    workload::prepare(cfg, ncpus, &mut alloc, &acpi);

    let started = smp::start_aps(apic_ids, info.ram());
    smp::wait_running(started);
    if console::failed() {
        sys::halt(); // a CPU failed on its way up: the guest is not ready
    }
    Line::new().s("ready cpus=").u(started as u64).s(" ram=").u(info.ram_bytes).print();
    workload::start_ticks();
    workload::run(0)
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    let mut line = Line::new();
    line.s("FAIL what=panic");
    if let Some(loc) = info.location() {
        line.s(" at=").s(loc.file()).s(":").u(loc.line() as u64);
    }
    if let Some(msg) = info.message().as_str() {
        line.s(" msg=").s(msg);
    }
    line.fail()
}
