//! Damaged or foreign snapshots: every case is one clear line, exit status 2, and no VM started.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use tests::{vmm_cmd, vmm_ok, TempDir, Vmm};

const T: Duration = Duration::from_secs(60);

/// One good snapshot of a running test guest, shared by the cases (each damages a copy).
fn good_snapshot() -> &'static Path {
    static SNAP: OnceLock<(TempDir, PathBuf)> = OnceLock::new();
    let (_, path) = SNAP.get_or_init(|| {
        let dir = TempDir::new("bad-snap-src");
        let sock = dir.path().join("s.sock").display().to_string();
        let mut vm = Vmm::testguest("workload=mem mem.size=4M", &["--mem", "128M", "--api-sock", &sock]);
        vm.wait_for("testguest: tick", T);
        let snap = dir.path().join("snap");
        vmm_ok(&["snapshot", "--api-sock", &sock, "--out", snap.to_str().unwrap(), "--stop"]);
        vm.wait_exit(T);
        (dir, snap)
    });
    path
}

fn copy_of_good(dir: &TempDir) -> PathBuf {
    let copy = dir.path().join("snap");
    std::fs::create_dir(&copy).unwrap();
    for entry in std::fs::read_dir(good_snapshot()).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), copy.join(entry.file_name())).unwrap();
    }
    copy
}

fn flip_bit(file: &Path, offset: usize) {
    let mut bytes = std::fs::read(file).unwrap();
    let at = offset.min(bytes.len() - 1);
    bytes[at] ^= 0x04;
    std::fs::write(file, bytes).unwrap();
}

/// `args` must fail with exit status 2, one line mentioning `expect`, and no guest output.
fn refused(args: &[&str], expect: &str) {
    let (status, stdout, stderr) = vmm_cmd(args);
    assert_eq!(status.code(), Some(2), "{args:?}: {status:?} {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.is_empty()).collect();
    assert_eq!(lines.len(), 1, "{args:?}: {stderr}");
    assert!(lines[0].contains(expect), "{args:?}: '{}' lacks '{expect}'", lines[0]);
    assert!(!stdout.contains("testguest:"), "a VM ran: {stdout}");
}

/// `vmm resume --verify` of damaged memory: the VM starts (its memory is checked as it comes
/// in; the restore itself may touch the damaged chunk first), and ends with exit status 2 and
/// one line mentioning `expect` before the guest used the damaged chunk (no guest output: the
/// damage is in its code or page tables).
fn stopped_by_verify(snap: &str, expect: &str) {
    let args = ["resume", snap, "--verify"];
    let (status, stdout, stderr) = vmm_cmd(&args);
    assert_eq!(status.code(), Some(2), "{args:?}: {status:?} {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.is_empty()).collect();
    let (last, before) = lines.split_last().expect("an error line");
    assert!(before.iter().all(|l| l.contains("running")) && before.len() <= 1, "{args:?}: {stderr}");
    assert!(last.contains(expect), "{args:?}: '{last}' lacks '{expect}'");
    assert!(last.contains("stopped before it used that memory"), "{last}");
    assert!(!stdout.contains("testguest:"), "the guest ran: {stdout}");
}

fn refused_everywhere(snap: &Path, expect: &str) {
    let s = snap.to_str().unwrap();
    refused(&["resume", s, "--name", "never-runs"], expect);
    refused(&["verify", s], expect);
    refused(&["inspect", s], expect);
}

#[test]
fn good_snapshot_verifies_and_inspects() {
    let s = good_snapshot().to_str().unwrap();
    assert!(vmm_ok(&["verify", s]).contains("ok"));
    let text = vmm_ok(&["inspect", s]);
    for needle in [
        "format version  2",
        "id ",
        "vcpu 0",
        "rip=0x",
        "zero pages",
        "bytes on disk",
        "serial0",
        "state section   vcpu.0 v1",
    ] {
        assert!(text.contains(needle), "inspect lacks {needle}:\n{text}");
    }
    let json: serde_json::Value = serde_json::from_str(&vmm_ok(&["inspect", s, "--json"])).unwrap();
    assert_eq!(json["manifest"]["format_version"], 2);
    assert_eq!(json["id"].as_str().unwrap().len(), 32);
    assert!(json["zero_page_share"].as_f64().unwrap() > 0.5);
}

#[test]
fn truncated_memory() {
    let dir = TempDir::new("trunc");
    let snap = copy_of_good(&dir);
    let f = std::fs::OpenOptions::new().write(true).open(snap.join("memory.pages")).unwrap();
    f.set_len(f.metadata().unwrap().len() / 2).unwrap();
    refused_everywhere(&snap, "truncated");
}

#[test]
fn truncated_state() {
    let dir = TempDir::new("trunc-state");
    let snap = copy_of_good(&dir);
    let f = std::fs::OpenOptions::new().write(true).open(snap.join("state.bin")).unwrap();
    f.set_len(100).unwrap();
    refused_everywhere(&snap, "truncated");
}

#[test]
fn flipped_bit_in_manifest() {
    for offset in [10, 40, 200, 2000] {
        let dir = TempDir::new("flip-manifest");
        let snap = copy_of_good(&dir);
        flip_bit(&snap.join("manifest"), offset);
        refused_everywhere(&snap, "snapshot");
    }
}

#[test]
fn flipped_bit_in_state() {
    for offset in [0, 1000, 5000] {
        let dir = TempDir::new("flip-state");
        let snap = copy_of_good(&dir);
        flip_bit(&snap.join("state.bin"), offset);
        let s = snap.to_str().unwrap();
        refused(&["resume", s], "state file is corrupt");
        refused(&["verify", s], "state file is corrupt");
    }
}

#[test]
fn wrong_format_version() {
    let dir = TempDir::new("version");
    let snap = copy_of_good(&dir);
    let text = std::fs::read_to_string(snap.join("manifest")).unwrap();
    std::fs::write(snap.join("manifest"), text.replacen("format=2 ", "format=7 ", 1)).unwrap();
    refused_everywhere(&snap, "format version 7 is newer than this vmm reads (2): use a newer vmm");
}

/// A snapshot written by vmm 0.1 (format 1, kept as a fixture): refused with a message saying so.
#[test]
fn format_1_snapshot_is_refused_clearly() {
    let dir = TempDir::new("v1");
    let fixture = tests::workspace_root().join("tests/fixtures/v1-snapshot.tar.gz");
    let status = std::process::Command::new("tar")
        .args(["-xzf", fixture.to_str().unwrap(), "-C", dir.path().to_str().unwrap()])
        .status()
        .expect("tar runs");
    assert!(status.success());
    let snap = dir.path().join("snap");
    assert!(std::fs::read_to_string(snap.join("manifest")).unwrap().starts_with("VMM-SNAPSHOT format=1 "));
    refused_everywhere(&snap, "snapshot format version 1 is no longer read (this vmm reads version 2)");
}

/// A manifest rewritten (with a valid id) to describe another machine than its state.
fn rewrite_manifest(snap: &Path, edit: impl FnOnce(&mut snapshot::Manifest)) {
    let path = snap.join("manifest");
    let mut m = snapshot::Manifest::decode(&std::fs::read(&path).unwrap(), "test").unwrap().manifest;
    edit(&mut m);
    std::fs::write(&path, m.encode()).unwrap();
}

/// A snapshot (`--stop`) of an idle guest with a 1 MiB disk in `dir` (read-only: then the snapshot
/// refers to it rather than holding a copy): (snapshot, disk).
fn stopped_snapshot_with_disk(dir: &TempDir, read_only: bool) -> (PathBuf, PathBuf) {
    let disk = dir.path().join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let sock = dir.path().join("s.sock").display().to_string();
    let arg = format!("{}{}", disk.display(), if read_only { ",ro" } else { "" });
    let mut vm = Vmm::testguest("workload=idle", &["--mem", "128M", "--api-sock", &sock, "--disk", &arg]);
    vm.wait_for("testguest: ready", T);
    let snap = dir.path().join("snap");
    vmm_ok(&["snapshot", "--api-sock", &sock, "--out", snap.to_str().unwrap(), "--stop"]);
    vm.wait_exit(T);
    (snap, disk)
}

#[test]
fn device_list_that_does_not_match_is_refused() {
    let dir = TempDir::new("devices");
    // The snapshot's state has a disk; its configuration, once rewritten, has none.
    let (snap, _) = stopped_snapshot_with_disk(&dir, false);
    let text = vmm_ok(&["inspect", snap.to_str().unwrap()]);
    assert!(text.contains("blk0: virtio-blk"), "{text}");
    rewrite_manifest(&snap, |m| m.vm.disks.clear());
    refused(
        &["resume", snap.to_str().unwrap(), "--name", "never-runs"],
        "device 'blk0' (virtio-blk) is not one this vmm builds",
    );
}

#[test]
fn a_disk_changed_since_the_snapshot_is_refused() {
    let dir = TempDir::new("diskchanged");
    // A disk the snapshot only refers to (read-only disks are not copied into snapshots).
    let (snap, disk) = stopped_snapshot_with_disk(&dir, true);
    let s = snap.to_str().unwrap();
    // Someone writes the disk meanwhile.
    std::os::unix::fs::FileExt::write_all_at(&std::fs::OpenOptions::new().write(true).open(&disk).unwrap(), b"x", 512)
        .unwrap();
    let when = std::time::SystemTime::now() + Duration::from_secs(5);
    std::fs::File::options().write(true).open(&disk).unwrap().set_modified(when).unwrap();
    refused(&["resume", s, "--name", "never-runs"], &format!("disk {} changed since the snapshot", disk.display()));
    let rsock = dir.path().join("r.sock").display().to_string();
    let mut resumed = Vmm::spawn(&["resume", s, "--name", "anyway", "--api-sock", &rsock, "--disk-changed-ok"]);
    tests::wait_for_vm(&rsock, T);
    let out = tests::vmm_ok(&["status", "--api-sock", &rsock]);
    assert!(out.contains("running"), "{out}");
    resumed.kill();
}

#[test]
fn unreadable_parts_are_io_errors_naming_the_file() {
    let dir = TempDir::new("io");
    let snap = copy_of_good(&dir);
    // A manifest that cannot be read (here: a directory) is not "not a snapshot".
    std::fs::remove_file(snap.join("manifest")).unwrap();
    std::fs::create_dir(snap.join("manifest")).unwrap();
    for verb in ["verify", "inspect", "resume"] {
        let (status, _, stderr) = vmm_cmd(&[verb, snap.to_str().unwrap()]);
        assert_eq!(status.code(), Some(1), "{verb}: {stderr}");
        assert!(stderr.contains(&format!("{}/manifest: Is a directory", snap.display())), "{verb}: {stderr}");
    }
    // A missing state file is named.
    let dir2 = TempDir::new("io2");
    let snap2 = copy_of_good(&dir2);
    std::fs::remove_file(snap2.join("state.bin")).unwrap();
    refused_everywhere(&snap2, "state.bin is missing");
}

#[test]
fn memory_damage_found_by_verify_and_resume_verify() {
    let dir = TempDir::new("mem");
    let snap = copy_of_good(&dir);
    // Somewhere in the first MiB the guest wrote (its kernel image lives there).
    let pages = snap.join("memory.pages");
    let f = std::fs::OpenOptions::new().read(true).write(true).open(&pages).unwrap();
    let mut byte = [0u8; 1];
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut byte, 0x10_0000 + 64).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[byte[0] ^ 1], 0x10_0000 + 64).unwrap();
    let s = snap.to_str().unwrap();
    refused(&["verify", s], "checksum mismatch in chunk 1 (guest address 0x100000)");
    stopped_by_verify(s, "checksum mismatch in chunk 1");
}

#[test]
fn not_a_snapshot() {
    let dir = TempDir::new("notsnap");
    let s = dir.path().to_str().unwrap();
    refused(&["resume", s], "is not a vmm snapshot");
    refused(&["verify", s], "is not a vmm snapshot");
    refused(&["resume", "/nonexistent/snap"], "is not a vmm snapshot");
    let file = dir.path().join("file");
    std::fs::write(&file, b"hello").unwrap();
    refused(&["inspect", file.to_str().unwrap()], "is not a vmm snapshot");
}

#[test]
fn no_kvm_to_resume_on_is_a_runtime_error() {
    let args = format!("resume {} --name nokvm", good_snapshot().display());
    let (status, stderr) = tests::in_mount_namespace("mount -t tmpfs tmpfs /dev", &args);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("cannot open /dev/kvm"), "{stderr}");
}

#[test]
fn data_the_extent_map_calls_zero_is_caught_by_verify() {
    let dir = TempDir::new("relabel");
    let snap = copy_of_good(&dir);
    rewrite_manifest(&snap, |m| {
        for e in m.memory.extents.iter_mut() {
            e.kind = snapshot::ExtentKind::Zero;
        }
    });
    let s = snap.to_str().unwrap();
    refused(&["verify", s], "the manifest says guest memory at 0x");
    // Memory the map calls zero fails its chunk's checksum when the guest first touches it.
    stopped_by_verify(s, "checksum mismatch in chunk");
}
