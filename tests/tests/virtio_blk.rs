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
