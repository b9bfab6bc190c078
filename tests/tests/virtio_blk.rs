//! virtio-blk on a host file: the test guest writes, reads back and verifies sectors through
//! vmm's device, and a read-only disk refuses writes.

use std::time::Duration;

use tests::{field, TempDir, Vmm};

const T: Duration = Duration::from_secs(60);
const SECTORS: u64 = 64;

fn zero_disk(dir: &TempDir) -> std::path::PathBuf {
    let disk = dir.path().join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    disk
}

#[test]
fn write_read_verify() {
    let dir = TempDir::new("blk");
    let disk = zero_disk(&dir);
    let mut vmm = Vmm::testguest(&format!("workload=disk disk.sectors={SECTORS}"), &["--disk", disk.to_str().unwrap()]);
    let line = vmm.wait_for_any(&["testguest: disk ok", "testguest: disk read-only"], T);
    assert_eq!(field(&line, "sectors"), Some(SECTORS), "{line}");
    let (status, _, stderr) = vmm.wait_exit(T);
    assert_eq!(status.code(), Some(0), "{stderr}");
    // The guest's writes reached the host file, and only the sectors it was asked to write.
    let bytes = std::fs::read(&disk).unwrap();
    let written = (SECTORS * 512) as usize;
    assert!(bytes[..written].iter().any(|b| *b != 0), "nothing written to the host file");
    assert!(bytes[written..].iter().all(|b| *b == 0), "writes past the requested sectors");
}

#[test]
fn read_only_disk_refuses_writes() {
    let dir = TempDir::new("blk-ro");
    let disk = zero_disk(&dir);
    let ro = format!("{},ro", disk.display());
    let mut vmm = Vmm::testguest("workload=disk", &["--disk", &ro]);
    let line = vmm.wait_for_any(&["testguest: disk read-only", "testguest: disk ok"], T);
    assert!(line.contains("read-only"), "guest did not see the disk as read-only: {line}");
    assert_eq!(field(&line, "write-status"), Some(1), "write was not refused with IOERR: {line}");
    let (status, _, stderr) = vmm.wait_exit(T);
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert!(std::fs::read(&disk).unwrap().iter().all(|b| *b == 0), "read-only disk was modified");
}

/// Disk requests keep flowing while the machine is snapshotted, stopped and resumed in a new
/// process: the queue state and the device come back, and every round still verifies.
#[test]
fn disk_io_across_snapshot_and_resume() {
    let dir = TempDir::new("blk-snap");
    let disk = zero_disk(&dir);
    let sock = dir.path().join("d.sock").display().to_string();
    let mut vm = Vmm::testguest(
        "workload=disk disk.rounds=0 disk.sectors=256 tick.ms=100",
        &["--vcpus", "2", "--disk", disk.to_str().unwrap(), "--api-sock", &sock],
    );
    vm.wait_for("testguest: tick", T);
    let before = vm.wait_for("testguest: tick", T);
    let snap = dir.path().join("snap");
    tests::vmm_ok(&["snapshot", "--api-sock", &sock, "--out", snap.to_str().unwrap(), "--stop"]);
    // `snapshot --stop` returns once the VM is gone: its disk and socket are free at once.
    let text = tests::vmm_ok(&["inspect", snap.to_str().unwrap()]);
    assert!(text.contains("virtio-blk"), "{text}");
    let mut resumed = Vmm::spawn(&["resume", snap.to_str().unwrap(), "--api-sock", &sock]);
    let (status, _, stderr) = vm.wait_exit(T);
    assert_eq!(status.code(), Some(0), "{stderr}");

    let rounds_before = field(&before, "cpu0").unwrap();
    let mut last = 0;
    for _ in 0..5 {
        last = field(&resumed.wait_for("testguest: tick", T), "cpu0").unwrap();
    }
    assert!(last > rounds_before, "no disk rounds after resume: {rounds_before} -> {last}");
    tests::vmm_ok(&["shutdown", "--api-sock", &sock]);
    let (status, _, stderr) = resumed.wait_exit(T);
    assert_eq!(status.code(), Some(0), "{stderr}");
}

/// Two VMs writing one disk image would corrupt it: the second is refused.
#[test]
fn a_disk_in_use_is_refused() {
    let dir = TempDir::new("blk-lock");
    let disk = zero_disk(&dir);
    let mut first = Vmm::testguest("workload=idle", &["--disk", disk.to_str().unwrap()]);
    first.wait_for("testguest: ready", T);
    let kernel = tests::testguest();
    let (status, stderr) =
        tests::run_vmm(&["run", "--kernel", kernel.to_str().unwrap(), "--disk", disk.to_str().unwrap()], T);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("in use by another VM"), "{stderr}");
    first.kill();
}
