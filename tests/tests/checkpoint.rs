//! Periodic checkpoints on real KVM: a VM that saves itself at an interval keeps a bounded chain
//! with a full snapshot at its base (merging its layers), `DIR/latest` always names a complete checkpoint, and after
//! `kill -9` of the vmm process the guest comes back from it; SIGUSR1 takes one at once; the
//! automatic interval follows the Young/Daly rule and is logged; bad arguments are refused.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tests::{field, vmm_cmd, vmm_ok, TempDir, Vmm};

const T: Duration = Duration::from_secs(60);

/// The checkpoint `dir/latest` points at, if any.
fn latest(dir: &Path) -> Option<PathBuf> {
    std::fs::read_link(dir.join("latest")).ok().map(|l| dir.join(l))
}

/// Waits until `dir/latest` has pointed at `n` different checkpoints.
fn wait_checkpoints(dir: &Path, n: usize, vm: &mut Vmm) -> PathBuf {
    let deadline = Instant::now() + T;
    let mut seen: Vec<PathBuf> = Vec::new();
    loop {
        if let Some(l) = latest(dir) {
            if seen.last() != Some(&l) {
                seen.push(l.clone());
                if seen.len() >= n {
                    return l;
                }
            }
        }
        assert!(Instant::now() < deadline, "only {} checkpoints in {T:?}: {seen:?}\n{:?}", seen.len(), vm.seen);
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn signal(vm: &Vmm, sig: libc::c_int) {
    // SAFETY: kill(2) of our own child process; no memory is involved.
    assert_eq!(unsafe { libc::kill(vm.pid() as i32, sig) }, 0);
}

fn checkpoints_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str().filter(|n| n.starts_with("ckpt-")).map(String::from))
        .collect();
    names.sort();
    names
}

#[test]
fn a_vm_killed_at_any_moment_comes_back_from_its_latest_checkpoint() {
    let dir = TempDir::new("ckpt");
    let ck = dir.path().join("ck");
    let sock = dir.path().join("c.sock").display().to_string();
    let mut vm = Vmm::testguest(
        "workload=mem mem.size=8M tick.ms=100",
        &[
            "--vcpus",
            "2",
            "--mem",
            "128M",
            "--api-sock",
            &sock,
            "--checkpoint-dir",
            ck.to_str().unwrap(),
            "--checkpoint-every",
            "100ms",
            "--keep",
            "3",
        ],
    );
    vm.wait_for("testguest: tick", T);
    wait_checkpoints(&ck, 7, &mut vm);
    // `vmm status` says how the checkpoints go.
    let status = vmm_ok(&["status", "--api-sock", &sock]);
    assert!(status.contains(" checkpoint=ckpt-") && status.contains(",every=0.1s"), "{status}");
    assert!(!status.contains("failing"), "{status}");
    // At most three layers at any time, a full snapshot at the base of the newest chain.
    assert!(checkpoints_in(&ck).len() <= 3 + 1, "{:?}", checkpoints_in(&ck));
    let before = vm.wait_for("testguest: tick", T);
    // Killed while it checkpoints every 100 ms: often mid-write.
    signal(&vm, libc::SIGKILL);
    let (_, _, err) = vm.wait_exit(T);
    // Once three layers are there, they are merged into a full snapshot that the next diffs
    // build on: the VM itself is saved whole only once.
    assert!(err.contains("checkpoints merged into ckpt-"), "{err}");
    assert_eq!(err.matches("(full, 1 layer)").count(), 1, "{err}");
    assert!(err.contains("(diff, 3 layers)"), "{err}");
    assert!(err.contains("(diff, 2 layers)") && !err.contains("(diff, 4 layers)"), "{err}");
    let l = latest(&ck).expect("a latest checkpoint");
    let out = vmm_ok(&["verify", ck.join("latest").to_str().unwrap()]);
    // "DIR: ok (N layers, ..." for a chain, "DIR: ok (manifest, ..." for a full snapshot.
    let layers: u32 = out.split('(').nth(1).and_then(|s| s.split(' ').next()?.parse().ok()).unwrap_or(1);
    assert!((1..=3).contains(&layers), "{out}");
    let shown = vmm_ok(&["inspect", "--json", l.to_str().unwrap()]);
    assert!(shown.contains("\"memory\""), "{shown}");
    // A new VM may not take over the directory, whose older chains it would remove: the dead
    // VM's checkpoints are what brings it back.
    let (status, _, stderr) = tests::vmm_cmd(&[
        "run",
        "--mem",
        "64M",
        "--checkpoint-dir",
        ck.to_str().unwrap(),
        "--checkpoint-every",
        "1s",
        "--name",
        "ckpt-usurper",
    ]);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("holds another VM's checkpoints"), "{stderr}");
    // The guest comes back from it, where it was then (not rebooted), and goes on verifying its
    // memory pattern, and checkpointing into the same directory.
    let mut resumed = Vmm::spawn(&[
        "resume",
        ck.join("latest").to_str().unwrap(),
        "--name",
        "ckpt-back",
        "--checkpoint-dir",
        ck.to_str().unwrap(),
        "--checkpoint-every",
        "1h",
    ]);
    let first = resumed.wait_for("testguest: tick", T);
    let last = (0..3).map(|_| resumed.wait_for("testguest: tick", T)).last().unwrap();
    assert!(
        field(&last, "cpu0") > field(&first, "cpu0") && field(&last, "cpu1") > field(&first, "cpu1"),
        "{first} -> {last}"
    );
    // Checkpoints come every 100 ms: the latest is from just before the kill.
    assert!(field(&first, "t").unwrap() + 2000 >= field(&before, "t").unwrap(), "{before} -> {first}");
    assert!(resumed.lines_with("testguest: ready").is_empty(), "the guest rebooted: {:?}", resumed.seen);
    resumed.kill();
}

/// One VM's checkpoints per directory: a second is refused before it starts. And a chain
/// broken under the checkpointer (its newest layer deleted) is replaced by a full checkpoint.
#[test]
fn a_checkpoint_directory_has_one_vm_and_survives_a_deleted_layer() {
    let dir = TempDir::new("ckpt-lock");
    let ck = dir.path().join("ck");
    let ck_s = ck.to_str().unwrap();
    let mut vm = Vmm::testguest(
        "workload=idle",
        &["--mem", "64M", "--checkpoint-dir", ck_s, "--checkpoint-every", "200ms", "--keep", "100"],
    );
    let first = wait_checkpoints(&ck, 2, &mut vm);
    let (status, _, stderr) = vmm_cmd(&[
        "run",
        "--mem",
        "64M",
        "--checkpoint-dir",
        ck_s,
        "--checkpoint-every",
        "1s",
        "--name",
        "ckpt-second",
    ]);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("in use by another VM's checkpoints"), "{stderr}");
    let (status, _, stderr) = vmm_cmd(&["resume", ck_s]);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("is a checkpoint directory"), "{stderr}");
    // The newest layer goes: the next checkpoints start a new, whole chain.
    std::fs::remove_dir_all(&first).unwrap();
    let deadline = Instant::now() + T;
    loop {
        if let Some(l) = latest(&ck) {
            if l != first && vmm_cmd(&["verify", ck.join("latest").to_str().unwrap()]).0.success() {
                break;
            }
        }
        assert!(Instant::now() < deadline, "no complete checkpoint after a layer was deleted");
        std::thread::sleep(Duration::from_millis(50));
    }
    vm.kill();
}

#[test]
fn sigusr1_takes_a_checkpoint_now_and_auto_says_its_interval() {
    let dir = TempDir::new("ckpt-usr1");
    let ck = dir.path().join("ck");
    let mut vm = Vmm::testguest(
        "workload=idle",
        &["--mem", "64M", "--checkpoint-dir", ck.to_str().unwrap(), "--checkpoint-every", "1h"],
    );
    vm.wait_for("testguest: ready", T);
    std::thread::sleep(Duration::from_millis(300));
    assert!(latest(&ck).is_none(), "a checkpoint before its time");
    signal(&vm, libc::SIGUSR1);
    let first = wait_checkpoints(&ck, 1, &mut vm);
    signal(&vm, libc::SIGUSR1);
    let second = wait_checkpoints(&ck, 1, &mut vm);
    let deadline = Instant::now() + T;
    let mut second = second;
    while second == first {
        assert!(Instant::now() < deadline, "SIGUSR1 took no second checkpoint");
        std::thread::sleep(Duration::from_millis(20));
        second = latest(&ck).unwrap();
    }
    let out = vmm_ok(&["verify", second.to_str().unwrap()]);
    assert!(out.contains("2 layers"), "the second checkpoint is a diff of the first: {out}");
    vm.kill();

    let ck2 = dir.path().join("auto");
    let vm = Vmm::testguest(
        "workload=idle",
        &["--mem", "64M", "--checkpoint-dir", ck2.to_str().unwrap(), "--checkpoint-every", "auto", "--mtbf", "10m"],
    );
    let mut vm = vm;
    wait_checkpoints(&ck2, 1, &mut vm);
    signal(&vm, libc::SIGTERM);
    let (_, _, stderr) = vm.wait_exit(T);
    let line = stderr.lines().find(|l| l.contains("checkpoint interval")).unwrap_or_else(|| panic!("{stderr}"));
    assert!(line.contains("Young/Daly") && line.contains("MTBF 600 s"), "{line}");
    // √(2 · cost · 600 s) for a cost between 1 ms and 1 s: between 1 s and 35 s.
    let secs: f64 = line.split("interval ").nth(1).unwrap().split(' ').next().unwrap().parse().unwrap();
    assert!((1.0..=35.0).contains(&secs), "{line}");
}

#[test]
fn bad_checkpoint_arguments_are_refused() {
    let dir = TempDir::new("ckpt-bad");
    let file = dir.path().join("file");
    std::fs::write(&file, b"x").unwrap();
    let d = dir.path().join("d");
    let d = d.to_str().unwrap();
    for (args, expected) in [
        (vec!["--checkpoint-dir", d, "--checkpoint-every", "0s"], "invalid duration"),
        (vec!["--checkpoint-dir", d, "--checkpoint-every", "soon"], "invalid duration"),
        (vec!["--checkpoint-dir", d, "--checkpoint-every", "auto"], "needs the host's --mtbf"),
        (vec!["--checkpoint-dir", d, "--checkpoint-every", "30s", "--mtbf", "1h"], "--mtbf goes with"),
        (vec!["--checkpoint-dir", d, "--checkpoint-every", "30s", "--keep", "0"], "--keep"),
        (vec!["--checkpoint-dir", d], "--checkpoint-every"),
        (vec!["--checkpoint-every", "30s"], "--checkpoint-dir"),
        (vec!["--checkpoint-dir", file.to_str().unwrap(), "--checkpoint-every", "30s"], "is not a directory"),
    ] {
        let mut all = vec!["run", "--mem", "64M"];
        all.extend(&args);
        let (status, _, stderr) = vmm_cmd(&all);
        assert_eq!(status.code(), Some(2), "{args:?}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
}
