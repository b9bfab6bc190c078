//! The test guest on vmm: every vCPU comes up and makes progress in ring 3, the memory it sees
//! matches --mem, and power-off ends vmm with status 0.

use std::time::Duration;

use tests::{field, Vmm};

const BOOT: Duration = Duration::from_secs(60);

/// Per-CPU tick counters of a `testguest: tick` line, in CPU order.
fn ticks(line: &str, cpus: u64) -> Vec<u64> {
    (0..cpus).map(|c| field(line, &format!("cpu{c}")).unwrap_or_else(|| panic!("no cpu{c} in {line}"))).collect()
}

fn every_vcpu_makes_progress(vcpus: u64) {
    let mut vmm = Vmm::testguest("workload=mem mem.size=4M ticks=4", &["--vcpus", &vcpus.to_string(), "--mem", "256M"]);
    let ready = vmm.wait_for("testguest: ready", BOOT);
    assert_eq!(field(&ready, "cpus"), Some(vcpus), "{ready}");
    let first = vmm.wait_for("testguest: tick", BOOT);
    let mut last = first.clone();
    for _ in 0..2 {
        last = vmm.wait_for("testguest: tick", BOOT);
    }
    let (a, b) = (ticks(&first, vcpus), ticks(&last, vcpus));
    for cpu in 0..vcpus as usize {
        assert!(b[cpu] > a[cpu], "cpu{cpu} made no progress: {first} -> {last}");
    }
    assert!(field(&last, "t") > field(&first, "t"), "guest time stood still: {first} -> {last}");
    let (status, out, stderr) = vmm.wait_exit(BOOT);
    assert_eq!(status.code(), Some(0), "stderr: {stderr}\n{}", out.join("\n"));
    assert!(out.iter().any(|l| l.contains("testguest: poweroff")), "{}", out.join("\n"));
}

#[test]
fn one_vcpu() {
    every_vcpu_makes_progress(1);
}

#[test]
fn two_vcpus() {
    every_vcpu_makes_progress(2);
}

#[test]
fn four_vcpus() {
    every_vcpu_makes_progress(4);
}

/// RAM in the memory map: everything but the EBDA and the BIOS area (0x9fc00..1 MiB), and for
/// guests above 3 GiB, the MMIO hole [3 GiB, 4 GiB) moved above 4 GiB.
fn expected_ram(mem: u64) -> u64 {
    mem - (0x10_0000 - 0x9_fc00)
}

#[test]
fn memory_matches_mem_option() {
    for (arg, bytes) in [("128M", 128u64 << 20), ("1G", 1 << 30), ("4G", 4 << 30)] {
        let mut vmm = Vmm::testguest("workload=poweroff", &["--mem", arg]);
        let ready = vmm.wait_for("testguest: ready", BOOT);
        assert_eq!(field(&ready, "ram"), Some(expected_ram(bytes)), "--mem {arg}: {ready}");
        let (status, _, stderr) = vmm.wait_exit(BOOT);
        assert_eq!(status.code(), Some(0), "--mem {arg}: {stderr}");
    }
}

#[test]
fn poweroff_exits_zero() {
    let vmm = Vmm::testguest("workload=poweroff", &[]);
    let (status, out, stderr) = vmm.wait_exit(BOOT);
    assert_eq!(status.code(), Some(0), "stderr: {stderr}");
    assert!(out.iter().any(|l| l.contains("testguest: ready")), "{}", out.join("\n"));
}

#[test]
fn default_kernel_is_the_test_guest() {
    // `vmm run` alone finds images/out/testguest.elf beside the workspace.
    tests::require_kvm();
    let vmm = Vmm::spawn(&["run", "--cmdline", "workload=poweroff"]);
    let (status, out, stderr) = vmm.wait_exit(BOOT);
    assert_eq!(status.code(), Some(0), "stderr: {stderr}");
    assert!(out.iter().any(|l| l.contains("testguest: ready cpus=1")), "{}", out.join("\n"));
}

#[test]
fn guest_crash_ends_vmm_with_status_1_and_says_where() {
    let vmm = Vmm::testguest("workload=triplefault", &[]);
    let (status, _, stderr) = vmm.wait_exit(BOOT);
    assert_eq!(status.code(), Some(1), "stderr: {stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    // A triple fault on hardware KVM; PVM's instruction emulator gives up before that.
    assert!(last.contains("triple fault") || last.contains("emulation failure"), "{last}");
    assert!(last.contains("on vCPU 0 at RIP 0x"), "{last}");
}

#[test]
fn guest_reset_ends_vmm_with_status_0() {
    // Through the FADT's reset register, and through the i8042 (as Linux's reboot=k does).
    for workload in ["acpireset", "kbdreset"] {
        let vmm = Vmm::testguest(&format!("workload={workload}"), &[]);
        let (status, out, stderr) = vmm.wait_exit(BOOT);
        assert_eq!(status.code(), Some(0), "{workload}: {stderr}");
        assert!(out.iter().any(|l| l == "testguest: reset"), "{workload}: {}", out.join("\n"));
        assert!(!out.iter().any(|l| l.contains("FAIL")), "{workload}: {}", out.join("\n"));
    }
}
