//! Diff snapshots on real KVM: a diff holds the pages written since the VM's last snapshot (the
//! guest's and the VMM's own), a chain of diffs resumes to exactly its newest layer, `merge`
//! gives the same machine, and a diff that fails (a full file system) gives its pages back.
//!
//! Exactness is checked byte for byte: a diff and a full snapshot taken of one paused guest must
//! hold the same memory once the diff's chain is merged.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use tests::{field, hex_field, snapshot, vmm_cmd, vmm_ok, TempDir, Tmpfs, Vmm};

const T: Duration = Duration::from_secs(60);

fn sock(dir: &TempDir, name: &str) -> String {
    dir.path().join(format!("{name}.sock")).display().to_string()
}

fn inspect(dir: &Path) -> Value {
    serde_json::from_str(&vmm_ok(&["inspect", "--json", dir.to_str().unwrap()])).unwrap()
}

/// Pages of each kind ("data", "zero", "parent") in a snapshot's extent map.
fn pages(manifest: &Value, kind: &str) -> u64 {
    let extents = manifest["memory"]["extents"].as_array().unwrap();
    extents.iter().filter(|e| e["kind"] == kind).map(|e| e["len"].as_u64().unwrap() / 4096).sum()
}

/// Whether guest address `gpa` lies in a data extent.
fn holds(manifest: &Value, gpa: u64) -> bool {
    manifest["memory"]["extents"].as_array().unwrap().iter().any(|e| {
        let (a, len) = (e["guest_addr"].as_u64().unwrap(), e["len"].as_u64().unwrap());
        e["kind"] == "data" && gpa >= a && gpa < a + len
    })
}

/// Merges the chain ending at `top` into a full snapshot at `out`, and checks its memory is the
/// same, byte for byte, as that of `full` (a full snapshot of the same paused guest).
fn assert_same_memory(top: &Path, full: &Path, out: &Path) {
    vmm_ok(&["merge", top.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    vmm_ok(&["verify", out.to_str().unwrap()]);
    let (a, b) = (std::fs::read(out.join("memory.pages")).unwrap(), std::fs::read(full.join("memory.pages")).unwrap());
    assert_eq!(a.len(), b.len());
    if let Some(at) = a.iter().zip(&b).position(|(x, y)| x != y) {
        panic!(
            "the chain of {} and the full snapshot {} differ at page file offset {at:#x}",
            top.display(),
            full.display()
        );
    }
}

/// Waits for `n` more tick lines.
fn ticks(vm: &mut Vmm, n: usize) -> String {
    (0..n).map(|_| vm.wait_for("testguest: tick", T)).last().unwrap()
}

#[test]
fn a_diff_holds_the_pages_written_since_the_last_snapshot_and_no_more() {
    let dir = TempDir::new("diff-pages");
    let s = sock(&dir, "d");
    let mut vm = Vmm::testguest(
        "workload=dirty dirty.pages=32 tick.ms=50",
        &["--mem", "128M", "--api-sock", &s, "--name", "diffp"],
    );
    let setup = vm.wait_for("testguest: dirty pages=", T);
    let (base, stride) = (hex_field(&setup, "base"), hex_field(&setup, "stride"));
    ticks(&mut vm, 2);
    let s0 = dir.path().join("s0");
    let s1 = dir.path().join("s1");
    // No snapshot yet: nothing to take a diff of.
    let (status, _, stderr) = vmm_cmd(&["snapshot", "--api-sock", &s, "--out", s1.to_str().unwrap(), "--diff"]);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("no snapshot to take a diff of"), "{stderr}");
    snapshot(&s, &s0, &[]);
    ticks(&mut vm, 3);
    let out = snapshot(&s, &s1, &["--diff"]);
    let m0 = inspect(&s0);
    let m1 = inspect(&s1);
    assert!(out.contains(&format!("a diff of {}", m0["id"].as_str().unwrap())), "{out}");
    assert_eq!(m1["manifest"]["parent"], m0["id"]);
    for i in 0..32 {
        assert!(
            holds(&m1["manifest"], base + i * stride),
            "page {:#x} the guest wrote is not in the diff",
            base + i * stride
        );
    }
    // The diff records where the guest wrote (2 MiB pieces): a resume loads that first.
    let hot = m1["manifest"]["memory"]["hot"].as_array().unwrap_or_else(|| panic!("no hot memory: {m1}")).clone();
    for i in 0..32 {
        let gpa = base + i * stride;
        let covered = hot.iter().any(|r| {
            let (a, len) = (r[0].as_u64().unwrap(), r[1].as_u64().unwrap());
            gpa >= a && gpa < a + len
        });
        assert!(covered, "page {gpa:#x} is not in the hot memory {hot:?}");
    }
    // The guest wrote its 32 pages, its stack and counters: nothing like the whole memory.
    let data = pages(&m1["manifest"], "data") + pages(&m1["manifest"], "zero");
    assert!((32..128).contains(&data), "{data} pages in the diff");
    assert_eq!(data + pages(&m1["manifest"], "parent"), (128 << 20) / 4096);
    // --parent must name the VM's last snapshot.
    let s2 = dir.path().join("s2");
    let (status, _, stderr) = vmm_cmd(&[
        "snapshot",
        "--api-sock",
        &s,
        "--out",
        s2.to_str().unwrap(),
        "--diff",
        "--parent",
        s0.to_str().unwrap(),
    ]);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("is not the VM's last snapshot"), "{stderr}");
    assert!(!s2.exists());
    snapshot(&s, &s2, &["--diff", "--parent", s1.to_str().unwrap()]);
    // Replacing a parent of the VM's chain would break it: refused.
    let (status, _, stderr) = vmm_cmd(&["snapshot", "--api-sock", &s, "--out", s0.to_str().unwrap(), "--force"]);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("is a parent of the VM's last snapshot"), "{stderr}");
    vmm_ok(&["verify", s2.to_str().unwrap()]);
    // A chain whose middle layer is gone is refused, naming it.
    std::fs::rename(&s1, dir.path().join("moved")).unwrap();
    for cmd in ["verify", "resume"] {
        let (status, _, stderr) = vmm_cmd(&[cmd, s2.to_str().unwrap()]);
        assert_eq!(status.code(), Some(2), "{cmd}: {stderr}");
        assert!(stderr.contains("is missing") && stderr.contains("/s1"), "{cmd}: {stderr}");
    }
    // A parent replaced by another snapshot is refused too, naming both.
    std::fs::rename(dir.path().join("moved"), dir.path().join("s1-real")).unwrap();
    let other = dir.path().join("s1");
    snapshot(&s, &other, &[]);
    let (status, _, stderr) = vmm_cmd(&["verify", s2.to_str().unwrap()]);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("replaced since"), "{stderr}");
    std::fs::remove_dir_all(&other).unwrap();
    std::fs::rename(dir.path().join("s1-real"), dir.path().join("moved")).unwrap();
    // The VM's last snapshot moved away: a diff of it is refused (a full snapshot is fine).
    std::fs::rename(dir.path().join("moved"), &s1).unwrap();
    std::fs::rename(&s2, dir.path().join("s2-moved")).unwrap();
    let (status, _, stderr) =
        vmm_cmd(&["snapshot", "--api-sock", &s, "--out", dir.path().join("s3").to_str().unwrap(), "--diff"]);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("cannot be a diff's parent"), "{stderr}");
    vm.kill();
}

/// Devices write guest memory too (here: every disk read lands in the guest's buffer), and KVM's
/// dirty log never sees it: a diff must hold those pages as well. Checked byte for byte.
#[test]
fn a_chain_of_diffs_is_the_machine_byte_for_byte_and_resumes() {
    let dir = TempDir::new("diff-chain");
    let disk = dir.path().join("disk.img");
    std::fs::File::create(&disk).unwrap().set_len(4 << 20).unwrap();
    let s = sock(&dir, "c");
    let mut vm = Vmm::testguest(
        "workload=disk disk.rounds=0 disk.sectors=64 tick.ms=100",
        &["--mem", "64M", "--api-sock", &s, "--name", "diffc", "--disk", disk.to_str().unwrap()],
    );
    ticks(&mut vm, 2);
    let layer = |i: usize| dir.path().join(format!("layer{i}"));
    snapshot(&s, &layer(0), &[]);
    for i in 1..=5 {
        ticks(&mut vm, 2);
        snapshot(&s, &layer(i), &["--diff"]);
    }
    // The last diff and a full snapshot of one paused guest.
    // The last line before the pause: the snapshot holds at least that many rounds.
    let before = ticks(&mut vm, 2);
    vmm_ok(&["pause", "--api-sock", &s]);
    snapshot(&s, &layer(6), &["--diff"]);
    let full = dir.path().join("full");
    snapshot(&s, &full, &[]);
    vmm_ok(&["continue", "--api-sock", &s]);
    ticks(&mut vm, 1);
    vm.kill();
    assert_same_memory(&layer(6), &full, &dir.path().join("merged"));
    let out = vmm_ok(&["verify", layer(6).to_str().unwrap()]);
    assert!(out.contains("7 layers"), "{out}");
    let shown = vmm_ok(&["inspect", layer(6).to_str().unwrap()]);
    assert!(shown.contains("chain           7 layers"), "{shown}");
    // Consecutive middle layers merge into one diff of the first one's parent.
    let middle: Vec<PathBuf> = (2..=4).map(layer).collect();
    let mut args = vec!["merge".to_string()];
    args.extend(middle.iter().map(|p| p.display().to_string()));
    args.extend(["--out".into(), dir.path().join("m24").display().to_string()]);
    let out = vmm_ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(out.contains("3 layers merged, a diff of"), "{out}");
    // Diffs copy only the disk chunks written since their parent (the guest writes its first
    // 32 KiB, in the first 1 MiB chunk), and the chain's disk is the full snapshot's.
    let m3 = inspect(&layer(3));
    let copy = &m3["manifest"]["vm"]["disks"][0]["copy"];
    assert_eq!(copy["ranges"], serde_json::json!([[0, 1 << 20]]), "{copy}");
    assert!(inspect(&layer(0))["manifest"]["vm"]["disks"][0]["copy"].get("ranges").is_none());
    let full_disk = std::fs::read(full.join("disk0.img")).unwrap();
    assert!(std::fs::read(dir.path().join("merged").join("disk0.img")).unwrap() == full_disk, "merged disk differs");
    // The chain resumes where the guest was, on a working copy equal to the full snapshot's
    // disk; its disk round trips go on, verified.
    let rounds = field(&before, "cpu0").unwrap();
    let rsock = sock(&dir, "r");
    let mut resumed =
        Vmm::spawn(&["resume", layer(6).to_str().unwrap(), "--name", "diffc2", "--paused", "--api-sock", &rsock]);
    tests::wait_for_vm(&rsock, T);
    let working = tests::test_state_dir().join("vmm").join("diffc2").join("disk0.img");
    assert!(
        std::fs::read(&working).unwrap() == full_disk,
        "the chain's working copy differs from the full snapshot's disk"
    );
    vmm_ok(&["continue", "--api-sock", &rsock]);
    let first = resumed.wait_for("testguest: tick", T);
    assert!(field(&first, "cpu0").unwrap() >= rounds, "{first} after {before}");
    ticks(&mut resumed, 3);
    assert!(resumed.lines_with("testguest: ready").is_empty(), "rebooted: {:?}", resumed.seen);
    resumed.kill();
}

/// A diff that fails half-way (its file system full) must not consume the pages it took: the next
/// diff still holds every page written since the last good snapshot. And a diff after a resume is
/// a diff of the snapshot resumed from.
#[test]
fn a_failed_diff_gives_its_pages_back_and_a_resumed_vm_diffs_against_its_snapshot() {
    let dir = TempDir::new("diff-fail");
    let s = sock(&dir, "f");
    let mut vm = Vmm::testguest(
        "workload=mem mem.size=4M tick.ms=100",
        &["--vcpus", "2", "--mem", "128M", "--api-sock", &s, "--name", "difff"],
    );
    ticks(&mut vm, 2);
    let s0 = dir.path().join("s0");
    snapshot(&s, &s0, &[]);
    ticks(&mut vm, 2);
    vmm_ok(&["pause", "--api-sock", &s]);
    // A file system too small for the diff.
    let small = dir.path().join("small");
    std::fs::create_dir(&small).unwrap();
    let mount = Tmpfs::mount(&small, "256k");
    let (status, _, stderr) =
        vmm_cmd(&["snapshot", "--api-sock", &s, "--out", small.join("d").to_str().unwrap(), "--diff"]);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("No space left"), "{stderr}");
    assert_eq!(std::fs::read_dir(&small).unwrap().count(), 0, "a failed diff left files behind");
    drop(mount);
    let s1 = dir.path().join("s1");
    snapshot(&s, &s1, &["--diff"]);
    let full = dir.path().join("full");
    snapshot(&s, &full, &[]);
    vmm_ok(&["continue", "--api-sock", &s]);
    assert_same_memory(&s1, &full, &dir.path().join("m1"));
    vm.kill();

    // Resumed from the full snapshot: a diff is of it, and exact.
    let s2 = sock(&dir, "r");
    let mut resumed = Vmm::spawn(&["resume", full.to_str().unwrap(), "--name", "difffr", "--api-sock", &s2]);
    ticks(&mut resumed, 3);
    vmm_ok(&["pause", "--api-sock", &s2]);
    let d = dir.path().join("after-resume");
    let out = snapshot(&s2, &d, &["--diff"]);
    assert!(out.contains(&format!("a diff of {}", inspect(&full)["id"].as_str().unwrap())), "{out}");
    let full2 = dir.path().join("full2");
    snapshot(&s2, &full2, &[]);
    resumed.kill();
    assert_same_memory(&d, &full2, &dir.path().join("m2"));
}

/// A resumed VM runs without KVM's dirty log; its first diff finds what it wrote by comparing
/// memory with the snapshot it came from, while the guest runs on and writes. Each vCPU rewrites
/// its 16 MiB at 8 MiB/s, so the pages it wrote before the diff started are not written again
/// before the chain resumes: one missing from the diff would hold an older pass's words, which
/// the guest's own check of the pass before finds. With the memory loaded in the background and
/// with `--lazy` (pages still in the snapshot's file are not compared).
#[test]
fn a_resumed_vm_diffs_exactly_while_it_runs() {
    let dir = TempDir::new("diff-running");
    let s = sock(&dir, "a");
    let cmdline = "workload=mem mem.size=16M mem.rate=8 tick.ms=50";
    let mut vm = Vmm::testguest(cmdline, &["--vcpus", "2", "--mem", "256M", "--api-sock", &s, "--name", "diffrun"]);
    ticks(&mut vm, 2);
    let s0 = dir.path().join("s0");
    snapshot(&s, &s0, &["--stop"]);
    vm.wait_exit(T);
    for (n, lazy) in [(1, false), (2, true)] {
        let sr = sock(&dir, &format!("r{n}"));
        let mut args = vec!["resume", s0.to_str().unwrap(), "--name", "diffrun", "--api-sock", &sr];
        if lazy {
            args.push("--lazy");
        }
        let mut resumed = Vmm::spawn(&args);
        // Half a second: 4 MiB of each region rewritten.
        ticks(&mut resumed, 10);
        let d1 = dir.path().join(format!("d1-{n}"));
        let out = snapshot(&sr, &d1, &["--diff"]);
        assert!(out.contains(&format!("a diff of {}", inspect(&s0)["id"].as_str().unwrap())), "{out}");
        ticks(&mut resumed, 2);
        let d2 = dir.path().join(format!("d2-{n}"));
        snapshot(&sr, &d2, &["--diff", "--stop"]);
        resumed.wait_exit(T);
        let sc = sock(&dir, &format!("c{n}"));
        let mut chain = Vmm::spawn(&["resume", d2.to_str().unwrap(), "--name", "diffrun", "--api-sock", &sc]);
        // Past the end of the pass and back over what was rewritten before the first diff.
        ticks(&mut chain, 60);
        chain.kill();
    }
}
