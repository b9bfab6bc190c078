//! Live snapshots on real KVM: memory is copied while the guest runs, in rounds over what it
//! dirties meanwhile, and the guest is paused only for the last pages. A guest that dirties its
//! memory as fast as it can still gets a bounded number of rounds, and resumes from the snapshot
//! with its memory pattern intact (the workload verifies every word it wrote); the page file of
//! a live snapshot is byte for byte that of a stop-and-copy one of the same paused guest; a live
//! diff that fails gives its pages back.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tests::{field, snapshot, vmm_cmd, vmm_ok, TempDir, Tmpfs, Vmm};

const T: Duration = Duration::from_secs(60);

fn same_file(a: &Path, b: &Path) {
    let (x, y) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
    assert_eq!(x.len(), y.len(), "{} and {}", a.display(), b.display());
    if let Some(at) = x.iter().zip(&y).position(|(p, q)| p != q) {
        panic!("{} and {} differ at offset {at:#x}", a.display(), b.display());
    }
}

/// Rounds after the first, from a report line.
fn rounds(report: &str) -> u32 {
    let after = report.split("copied running, ").nth(1).unwrap_or_else(|| panic!("not live: {report}"));
    after.split(' ').next().unwrap().parse().unwrap()
}

#[test]
fn a_live_snapshot_of_a_guest_dirtying_fast_resumes_with_its_memory_intact() {
    let dir = TempDir::new("live");
    let s = dir.path().join("l.sock").display().to_string();
    // Both vCPUs rewrite and verify 32 MiB each, as fast as they can.
    let mut vm = Vmm::testguest(
        "workload=mem mem.size=32M tick.ms=100",
        &["--vcpus", "2", "--mem", "256M", "--api-sock", &s, "--name", "live"],
    );
    let mut before = vm.wait_for("testguest: tick", T);
    while field(&before, "cpu0") < Some(1) || field(&before, "cpu1") < Some(1) {
        before = vm.wait_for("testguest: tick", T);
    }
    let snap = dir.path().join("snap");
    let out = snapshot(&s, &snap, &["--live"]);
    assert!(rounds(&out) <= 8, "{out}");
    vm.wait_for("testguest: tick", T);
    vm.kill();
    vmm_ok(&["verify", snap.to_str().unwrap()]);
    let mut resumed = Vmm::spawn(&["resume", snap.to_str().unwrap(), "--name", "live2"]);
    let first = resumed.wait_for("testguest: tick", T);
    let mut last = first.clone();
    // Two whole passes of both vCPUs over their memory, every word verified.
    while field(&last, "cpu0") < field(&first, "cpu0").map(|c| c + 2)
        || field(&last, "cpu1") < field(&first, "cpu1").map(|c| c + 2)
    {
        last = resumed.wait_for("testguest: tick", T);
    }
    assert!(field(&first, "t") >= field(&before, "t"), "{before} -> {first}");
    assert!(resumed.lines_with("testguest: ready").is_empty(), "rebooted: {:?}", resumed.seen);
    resumed.kill();
}

#[test]
fn a_live_snapshot_is_the_stop_and_copy_one_and_a_failed_live_diff_gives_its_pages_back() {
    let dir = TempDir::new("live-exact");
    let s = dir.path().join("e.sock").display().to_string();
    let mut vm = Vmm::testguest(
        "workload=mem mem.size=4M tick.ms=100",
        &["--vcpus", "2", "--mem", "128M", "--api-sock", &s, "--name", "livex"],
    );
    vm.wait_for("testguest: tick", T);
    let p = |name: &str| -> PathBuf { dir.path().join(name) };
    snapshot(&s, &p("s0"), &[]);
    vm.wait_for("testguest: tick", T);
    vm.wait_for("testguest: tick", T);
    vmm_ok(&["pause", "--api-sock", &s]);
    // A live diff onto a file system too small for it fails, and takes nothing away.
    let small = p("small");
    std::fs::create_dir(&small).unwrap();
    let mount = Tmpfs::mount(&small, "128k");
    let (status, _, stderr) =
        vmm_cmd(&["snapshot", "--api-sock", &s, "--out", small.join("d").to_str().unwrap(), "--diff", "--live"]);
    drop(mount);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("No space left"), "{stderr}");
    // Of one paused guest: a live diff, a live full snapshot and a stop-and-copy one.
    let out = snapshot(&s, &p("d1"), &["--diff", "--live"]);
    assert!(out.contains("live ("), "{out}");
    snapshot(&s, &p("live"), &["--live"]);
    snapshot(&s, &p("full"), &[]);
    vmm_ok(&["continue", "--api-sock", &s]);
    vm.kill();
    same_file(&p("live").join("memory.pages"), &p("full").join("memory.pages"));
    vmm_ok(&["merge", p("d1").to_str().unwrap(), "--out", p("merged").to_str().unwrap()]);
    same_file(&p("merged").join("memory.pages"), &p("full").join("memory.pages"));
    let (live, full) = (
        vmm_ok(&["inspect", "--json", p("live").to_str().unwrap()]),
        vmm_ok(&["inspect", "--json", p("full").to_str().unwrap()]),
    );
    let extents = |text: &str| {
        let v: serde_json::Value = serde_json::from_str(text).unwrap();
        v["manifest"]["memory"]["extents"].clone()
    };
    assert_eq!(extents(&live), extents(&full));
}
