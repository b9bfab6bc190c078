//! Disks in snapshots: a snapshot directory holds each writable disk as it was at the pause,
//! copied while the guest goes on writing it (copy-before-write), and `vmm resume` runs on a
//! fresh working copy of it, so one snapshot resumes any number of times.

use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tests::{field, vmm_ok, TempDir, Vmm};

const T: Duration = Duration::from_secs(60);
const DISK_BYTES: u64 = 64 << 20;
/// The disk workload rewrites (and reads back and verifies) this many sectors, 4 MiB, each round.
const WORKLOAD_SECTORS: u64 = 8192;
/// A pattern beyond what the guest writes, which every copy must keep.
const PATTERN_AT: u64 = 48 << 20;

fn pattern() -> Vec<u8> {
    (0..1u32 << 20).map(|i| (i * 13 % 251) as u8).collect()
}

/// A sparse 64 MiB disk with a 1 MiB pattern at 48 MiB.
fn disk(dir: &TempDir) -> PathBuf {
    let path = dir.path().join("disk.img");
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(DISK_BYTES).unwrap();
    f.write_all_at(&pattern(), PATTERN_AT).unwrap();
    path
}

fn working_copy(name: &str) -> PathBuf {
    tests::test_state_dir().join("vmm").join(name).join("disk0.img")
}

fn assert_pattern_kept(path: &Path) {
    let f = std::fs::File::open(path).unwrap();
    assert_eq!(f.metadata().unwrap().len(), DISK_BYTES, "{}", path.display());
    let mut got = vec![0u8; 1 << 20];
    f.read_exact_at(&mut got, PATTERN_AT).unwrap();
    assert!(got == pattern(), "{}: the data beyond the guest's writes changed", path.display());
    // Holes stay holes: far less than the whole disk is allocated.
    assert!(f.metadata().unwrap().blocks() * 512 < DISK_BYTES / 2, "{} is not sparse", path.display());
}

/// Boots the test guest rewriting and verifying `disk` without pause, with a control socket in
/// `dir` and `extra` arguments, and waits for its first tick; returns it and its socket.
fn disk_vm(dir: &TempDir, disk: &Path, extra: &[&str]) -> (Vmm, String) {
    let sock = dir.path().join("src.sock").display().to_string();
    let cmdline = format!("workload=disk disk.rounds=0 disk.sectors={WORKLOAD_SECTORS} tick.ms=100");
    let mut args = vec!["--disk", disk.to_str().unwrap(), "--api-sock", &sock];
    args.extend_from_slice(extra);
    let mut vm = Vmm::testguest(&cmdline, &args);
    vm.wait_for("testguest: tick", T);
    (vm, sock)
}

/// Resumes `snap` as `name` and checks the disk workload goes on verifying its rounds.
fn resume_and_check(dir: &TempDir, snap: &Path, name: &str) -> Vmm {
    let sock = dir.path().join(format!("{name}.sock")).display().to_string();
    let mut vm = Vmm::spawn(&["resume", snap.to_str().unwrap(), "--name", name, "--api-sock", &sock]);
    let first = field(&vm.wait_for("testguest: tick", T), "cpu0").unwrap();
    let mut last = first;
    for _ in 0..3 {
        last = field(&vm.wait_for("testguest: tick", T), "cpu0").unwrap();
    }
    assert!(last > first, "{name}: no disk rounds after the resume");
    assert_pattern_kept(&working_copy(name));
    vm
}

/// A guest rewriting and verifying its disk without pause is snapshotted several times while it
/// runs. Each snapshot must hold the disk exactly as at its pause, consistent with the guest's
/// memory: a resumed guest that was between writing a round and reading it back then reads back
/// what it wrote, from the copy, even though the original VM overwrote the disk with later
/// rounds while the copy was being taken.
#[test]
fn snapshots_hold_the_disk_as_at_the_pause() {
    let dir = TempDir::new("snapdisk");
    let disk = disk(&dir);
    let (mut vm, sock) = disk_vm(&dir, &disk, &["--name", "snapdisk-src"]);

    // Paused: the copy equals the disk file as it is.
    vmm_ok(&["pause", "--api-sock", &sock]);
    let at_pause = std::fs::read(&disk).unwrap();
    let paused_snap = dir.path().join("paused");
    let out = vmm_ok(&["snapshot", "--api-sock", &sock, "--out", paused_snap.to_str().unwrap()]);
    assert!(std::fs::read(paused_snap.join("disk0.img")).unwrap() == at_pause, "copy != disk at the pause\n{out}");
    vmm_ok(&["continue", "--api-sock", &sock]);

    let mut snaps = Vec::new();
    for i in 0..3 {
        vm.wait_for("testguest: tick", T);
        let snap = dir.path().join(format!("running-{i}"));
        vmm_ok(&["snapshot", "--api-sock", &sock, "--out", snap.to_str().unwrap()]);
        snaps.push(snap);
    }
    let inspect = vmm_ok(&["inspect", snaps[0].to_str().unwrap()]);
    assert!(inspect.contains("disk0.img"), "{inspect}");
    vmm_ok(&["verify", snaps[0].to_str().unwrap()]);
    // The original VM is still running on its disk: the resumes run on their own copies.
    for (i, snap) in snaps.iter().chain([&paused_snap]).enumerate() {
        let mut resumed = resume_and_check(&dir, snap, &format!("snapdisk-{i}"));
        resumed.kill();
    }
    vm.kill();
    assert!(vm.lines_with("FAIL").is_empty());
}

/// A snapshot stream carries the disks too: taken to a file while the guest rewrites its disk,
/// it holds the disk as at the pause; the original disk is then overwritten, and a resume from
/// the stream runs on a working copy made from the stream alone, where the guest goes on
/// verifying what it wrote before the pause.
#[test]
fn a_snapshot_stream_carries_the_disks() {
    let dir = TempDir::new("snapdisk-stream");
    let disk = disk(&dir);
    let (mut vm, sock) = disk_vm(&dir, &disk, &[]);
    // The disk's file is renamed under the running VM: the snapshot uses the file it has open.
    let moved = dir.path().join("moved.img");
    std::fs::rename(&disk, &moved).unwrap();
    let stream = dir.path().join("vm.stream");
    let out = std::fs::File::create(&stream).unwrap();
    let status = std::process::Command::new(tests::vmm_bin())
        .args(["snapshot", "--api-sock", &sock, "--out", "-"])
        .stdout(out)
        .status()
        .unwrap();
    assert!(status.success());
    vm.wait_for("testguest: tick", T);
    vm.kill();
    assert!(vm.lines_with("FAIL").is_empty());
    // The stream checks out, disk frames included, and says it carries the disk.
    let verified = std::process::Command::new(tests::vmm_bin())
        .args(["verify", "-"])
        .stdin(std::fs::File::open(&stream).unwrap())
        .output()
        .unwrap();
    assert!(verified.status.success(), "{}", String::from_utf8_lossy(&verified.stderr));
    let shown = std::process::Command::new(tests::vmm_bin())
        .args(["inspect", "-"])
        .stdin(std::fs::File::open(&stream).unwrap())
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&shown.stdout);
    assert!(shown.contains("disk0.img"), "{shown}");
    // Nothing of the original disk is needed any more.
    std::fs::write(&moved, vec![0xeeu8; DISK_BYTES as usize]).unwrap();

    let name = "snapdisk-stream-b";
    let sock_b = dir.path().join("b.sock").display().to_string();
    let input = std::fs::File::open(&stream).unwrap();
    let mut resumed = Vmm::spawn_with_stdin(
        &["resume", "-", "--name", name, "--api-sock", &sock_b],
        std::process::Stdio::from(input),
    );
    let first = field(&resumed.wait_for("testguest: tick", T), "cpu0").unwrap();
    let mut last = first;
    for _ in 0..3 {
        last = field(&resumed.wait_for("testguest: tick", T), "cpu0").unwrap();
    }
    assert!(last > first, "no disk rounds after the resume");
    assert!(resumed.lines_with("FAIL").is_empty(), "{:?}", resumed.seen);
    assert_pattern_kept(&working_copy(name));
    resumed.kill();
}

/// One snapshot resumed twice: each resume gets a fresh working copy of the snapshot's disk;
/// `--disk` runs one on a file of the user's instead, as it is.
#[test]
fn each_resume_gets_its_own_working_copy_and_disk_overrides_win() {
    let dir = TempDir::new("snapdisk2");
    let disk = disk(&dir);
    let (vm, sock) = disk_vm(&dir, &disk, &[]);
    let snap = dir.path().join("snap");
    vmm_ok(&["snapshot", "--api-sock", &sock, "--out", snap.to_str().unwrap(), "--stop"]);
    let _ = vm.wait_exit(T);
    let source_after = std::fs::read(&disk).unwrap();

    let mut a = resume_and_check(&dir, &snap, "snapdisk-a");
    let mut b = resume_and_check(&dir, &snap, "snapdisk-b");
    a.kill();
    b.kill();
    assert!(std::fs::read(&disk).unwrap() == source_after, "resuming wrote the original disk");
    // The snapshot's copy is untouched by the resumed guests' writes.
    vmm_ok(&["verify", snap.to_str().unwrap()]);

    // The user's file differs from the snapshot's copy beyond what the guest writes.
    let mine = dir.path().join("mine.img");
    std::fs::copy(snap.join("disk0.img"), &mine).unwrap();
    let theirs: Vec<u8> = pattern().iter().map(|b| b ^ 0x5a).collect();
    std::fs::OpenOptions::new().write(true).open(&mine).unwrap().write_all_at(&theirs, 32 << 20).unwrap();
    let sock_c = dir.path().join("c.sock").display().to_string();
    let mut c = Vmm::spawn(&[
        "resume",
        snap.to_str().unwrap(),
        "--name",
        "snapdisk-c",
        "--disk",
        mine.to_str().unwrap(),
        "--api-sock",
        &sock_c,
    ]);
    let first = field(&c.wait_for("testguest: tick", T), "cpu0").unwrap();
    let later = field(&c.wait_for("testguest: tick", T), "cpu0").unwrap();
    assert!(later > first);
    assert!(!working_copy("snapdisk-c").exists(), "--disk still made a working copy");
    // A diff of a VM running on --disk holds all of that disk: its chain is the user's file as
    // at the pause, not the snapshot's copy with the guest's writes over it.
    vmm_ok(&["pause", "--api-sock", &sock_c]);
    let at_pause = std::fs::read(&mine).unwrap();
    let diff = dir.path().join("diff-of-c");
    vmm_ok(&["snapshot", "--api-sock", &sock_c, "--out", diff.to_str().unwrap(), "--diff"]);
    vmm_ok(&["continue", "--api-sock", &sock_c]);
    let merged = dir.path().join("merged-c");
    vmm_ok(&["merge", diff.to_str().unwrap(), "--out", merged.to_str().unwrap()]);
    assert!(std::fs::read(merged.join("disk0.img")).unwrap() == at_pause, "the diff's chain is not --disk's file");
    // Nor its own copy (the guest would change the snapshot), nor something that is no file.
    let own = snap.join("disk0.img");
    let (status, _, stderr) = tests::vmm_cmd(&["resume", snap.to_str().unwrap(), "--disk", own.to_str().unwrap()]);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("the snapshot's own copy"), "{stderr}");
    let (status, _, stderr) = tests::vmm_cmd(&["resume", snap.to_str().unwrap(), "--disk", "/tmp"]);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("not a regular file"), "{stderr}");
    // --disk replaces the copy: the snapshot need not have it; a disk of another size is refused.
    let moved = dir.path().join("moved-disk0.img");
    std::fs::rename(snap.join("disk0.img"), &moved).unwrap();
    let small = dir.path().join("small.img");
    std::fs::File::create(&small).unwrap().set_len(1 << 20).unwrap();
    let (status, _, stderr) = tests::vmm_cmd(&["resume", snap.to_str().unwrap(), "--disk", small.to_str().unwrap()]);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("the guest would see another disk"), "{stderr}");
    let (status, _, stderr) = tests::vmm_cmd(&["resume", snap.to_str().unwrap(), "--name", "snapdisk-d"]);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("disk0.img is missing"), "{stderr}");
    std::fs::rename(&moved, snap.join("disk0.img")).unwrap();
    assert!(
        std::fs::read(&mine).unwrap() != std::fs::read(snap.join("disk0.img")).unwrap(),
        "the guest did not write --disk's file"
    );
    c.kill();
}

/// An XFS file system (reflinks on) in a loop-mounted image file, unmounted when dropped.
struct XfsMount {
    path: PathBuf,
}

impl XfsMount {
    fn new(dir: &TempDir) -> Self {
        let image = dir.path().join("xfs.img");
        std::fs::File::create(&image).unwrap().set_len(1 << 30).unwrap();
        let path = dir.path().join("xfs");
        std::fs::create_dir(&path).unwrap();
        let run = |cmd: &mut std::process::Command| {
            let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e} (xfsprogs: images/host-packages.txt)"));
            assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
        };
        run(std::process::Command::new("mkfs.xfs").args(["-q", "-m", "reflink=1"]).arg(&image));
        run(std::process::Command::new("mount").args(["-o", "loop"]).arg(&image).arg(&path));
        Self { path }
    }
}

impl Drop for XfsMount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

/// Whether FIEMAP (`filefrag -v`) shows blocks of `path` shared with another file.
fn shares_blocks(path: &Path) -> bool {
    let out = std::process::Command::new("filefrag").arg("-v").arg(path).output().unwrap();
    assert!(out.status.success(), "filefrag {}: {}", path.display(), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).contains("shared")
}

/// On a file system with reflinks (XFS here), a full snapshot after another starts its disk
/// copy as a reflink of the earlier one's (through a diff in between) and copies only the chunks
/// written since: the copy shares the earlier copy's blocks, and still holds exactly the disk
/// as at its pause, for a resumed guest to go on verifying.
#[test]
fn a_later_full_snapshot_on_a_reflink_file_system_copies_only_what_was_written_since() {
    let dir = TempDir::new("snapdisk-xfs");
    let xfs = XfsMount::new(&dir);
    let disk = xfs.path.join("disk.img");
    let f = std::fs::File::create(&disk).unwrap();
    f.set_len(DISK_BYTES).unwrap();
    for mib in 8..24 {
        f.write_all_at(&pattern(), mib << 20).unwrap();
    }
    f.write_all_at(&pattern(), PATTERN_AT).unwrap();
    drop(f);
    let (mut vm, sock) = disk_vm(&dir, &disk, &["--name", "snapdisk-xfs"]);
    let (first, diff, later) = (xfs.path.join("first"), xfs.path.join("diff"), xfs.path.join("later"));
    vmm_ok(&["snapshot", "--api-sock", &sock, "--out", first.to_str().unwrap()]);
    // The first copy is the disk's data copied: nothing to share yet.
    assert!(!shares_blocks(&first.join("disk0.img")), "the first copy shares blocks");
    vm.wait_for("testguest: tick", T);
    vmm_ok(&["snapshot", "--api-sock", &sock, "--out", diff.to_str().unwrap(), "--diff"]);
    vm.wait_for("testguest: tick", T);
    vmm_ok(&["pause", "--api-sock", &sock]);
    let at_pause = std::fs::read(&disk).unwrap();
    vmm_ok(&["snapshot", "--api-sock", &sock, "--out", later.to_str().unwrap()]);
    vmm_ok(&["continue", "--api-sock", &sock]);
    let copy = later.join("disk0.img");
    assert!(std::fs::read(&copy).unwrap() == at_pause, "the later copy is not the disk as at its pause");
    assert!(shares_blocks(&copy), "the later copy shares no block with the first");
    vmm_ok(&["verify", later.to_str().unwrap()]);
    vm.wait_for("testguest: tick", T);
    vm.kill();
    // A full snapshot stands alone: the earlier ones may go.
    std::fs::remove_dir_all(&first).unwrap();
    std::fs::remove_dir_all(&diff).unwrap();
    let mut resumed = resume_and_check(&dir, &later, "snapdisk-xfs-r");
    resumed.kill();
    assert!(vm.lines_with("FAIL").is_empty());
    assert!(resumed.lines_with("FAIL").is_empty());
}

/// A resume that fails once its working copies are made (here: its vsock socket cannot be
/// bound) takes them, and the state directory made for them, away again.
#[test]
fn a_resume_that_fails_leaves_no_working_copy_behind() {
    let dir = TempDir::new("snapdisk-fail");
    let disk = disk(&dir);
    let vsock = format!("cid=3,uds={}", dir.path().join("v.sock").display());
    let (vm, sock) = disk_vm(&dir, &disk, &["--vsock", &vsock]);
    let snap = dir.path().join("snap");
    vmm_ok(&["snapshot", "--api-sock", &sock, "--out", snap.to_str().unwrap(), "--stop", "--no-quiesce"]);
    let _ = vm.wait_exit(T);
    let name = "snapdisk-fail-r";
    // Left by an earlier run of this test, say.
    let _ = std::fs::remove_dir_all(working_copy(name).parent().unwrap());
    let bad_uds = format!("cid=3,uds={}", dir.path().join("no-such-dir/v.sock").display());
    let (status, _, stderr) = tests::vmm_cmd(&["resume", snap.to_str().unwrap(), "--name", name, "--vsock", &bad_uds]);
    assert_eq!(status.code(), Some(2), "{stderr}");
    let copy = working_copy(name);
    assert!(!copy.exists(), "{} left behind", copy.display());
    assert!(!copy.parent().unwrap().exists(), "{} left behind", copy.parent().unwrap().display());
}
