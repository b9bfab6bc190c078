//! The stock Debian cloud kernel (PVH vmlinux from images/build.sh) on the machine vmm describes.
//!
//! With hardware KVM it boots to the initramfs's ready line. On a PVM host (no VMX/SVM) the kernel
//! runs in KVM's instruction emulator and dies early; there this test checks everything Linux
//! prints about our machine before that (memory map, ACPI tables, CPUs) and that vmm then ends
//! with status 1 and an emulation-failure message.

use std::time::Duration;

use tests::{announce_host, HostKind, TempDir, Vmm};

const VCPUS: &str = "2";
const MEM: &str = "256M";

fn linux_run_args(cmdline: &str, extra: &[&str]) -> Vec<String> {
    tests::linux_run_args(MEM, VCPUS.parse().unwrap(), cmdline, extra)
}

#[test]
fn linux_sees_the_machine_vmm_describes() {
    let dir = TempDir::new("linux");
    let disk = dir.path().join("disk.img");
    std::fs::write(&disk, vec![0u8; 4 << 20]).unwrap();
    let cmdline = "console=ttyS0 earlyprintk=serial reboot=k panic=-1 vmm.run=/usr/bin/vmm-blk-roundtrip";
    let args = linux_run_args(cmdline, &["--disk", disk.to_str().unwrap()]);
    let host = announce_host();
    let mut vmm = Vmm::spawn(&args);

    // Measured here (PVM): the banner at ~1 s, "Allowing 2 CPUs" at ~6 s of wall time, the
    // emulation failure at ~35 s. Generous margins for a loaded CI machine.
    let step = tests::bound(120);
    vmm.wait_for("Linux version", step);
    vmm.wait_for("BIOS-e820: [mem 0x0000000000100000-0x000000000fffffff] usable", step);
    for table in ["ACPI: RSDP", "ACPI: XSDT", "ACPI: FACP", "ACPI: DSDT", "ACPI: APIC"] {
        vmm.wait_for(table, step);
    }
    vmm.wait_for("Using ACPI (MADT) for SMP configuration information", step);
    vmm.wait_for(&format!("Allowing {VCPUS} CPUs"), step);

    if host != HostKind::Pvm {
        let ready = vmm.wait_for("vmm-guest: ready", step);
        assert!(ready.contains(&format!("nproc={VCPUS}")), "{ready}");
        vmm.wait_for("vmm-guest: blk ok", step);
        let (status, _, _) = vmm.wait_exit(step);
        assert_eq!(status.code(), Some(0));
    } else {
        println!("PVM host (no hardware virtualization): reduced Linux test, early boot only");
        let (status, out, stderr) = vmm.wait_exit(Duration::from_secs(300));
        assert_eq!(status.code(), Some(1), "stdout:\n{}\nstderr: {stderr}", out.join("\n"));
        assert!(stderr.contains("emulation failure") && stderr.contains("RIP 0x"), "stderr: {stderr}");
    }
}

/// Pauses the stock kernel while it prints its early boot log, snapshots it, kills it, and resumes
/// it in a new process: the log goes on where it stopped, without a second boot banner.
#[test]
fn linux_resumes_mid_boot() {
    let dir = TempDir::new("linux-snap");
    let sock = dir.path().join("l.sock").display().to_string();
    let cmdline = "console=ttyS0 earlyprintk=serial reboot=k panic=-1";
    let args = linux_run_args(cmdline, &["--name", "linux", "--api-sock", &sock]);
    let step = tests::bound(120);
    let host = announce_host();
    let mut vm = Vmm::spawn(&args);
    vm.wait_for("Linux version", step);
    vm.wait_for("ACPI: RSDP", step);
    let snap = dir.path().join("snap");
    tests::vmm_ok(&["snapshot", "--api-sock", &sock, "--out", snap.to_str().unwrap()]);
    vm.kill();
    let last_before = vm.seen.last().cloned().unwrap_or_default();

    let mut resumed = Vmm::spawn(&["resume", snap.to_str().unwrap(), "--api-sock", &sock]);
    resumed.wait_for(&format!("Allowing {VCPUS} CPUs"), step);
    assert!(
        resumed.lines_with("Linux version").is_empty(),
        "the kernel booted again instead of continuing after: {last_before}\n{}",
        resumed.seen.join("\n")
    );
    if host != HostKind::Pvm {
        resumed.wait_for("vmm-guest: ready", step);
    } else {
        println!("PVM host: resumed Linux checked through its early boot only");
        let (status, _, stderr) = resumed.wait_exit(Duration::from_secs(300));
        assert_eq!(status.code(), Some(1), "stderr: {stderr}");
    }
}
