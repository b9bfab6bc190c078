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
    for needle in ["format version  1", "vcpu 0", "rip=0x", "zero pages", "bytes on disk", "serial"] {
        assert!(text.contains(needle), "inspect lacks {needle}:\n{text}");
    }
    let json: serde_json::Value = serde_json::from_str(&vmm_ok(&["inspect", s, "--json"])).unwrap();
    assert_eq!(json["manifest"]["format_version"], 1);
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
    std::fs::write(snap.join("manifest"), text.replacen("format=1 ", "format=7 ", 1)).unwrap();
    refused_everywhere(&snap, "format version 7 is not supported");
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
    refused(&["resume", s, "--verify"], "checksum mismatch in chunk 1");
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
