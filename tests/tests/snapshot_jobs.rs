//! Snapshots run as jobs: `status` answers during one and shows its progress, a second request
//! is refused as busy, Ctrl-C on `vmm snapshot` cancels it (the guest runs on, the previous
//! snapshot at that path is intact). And a VM resumed from a snapshot whose memory file is then
//! changed stops with that cause named.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tests::{field, vmm_bin, vmm_cmd, vmm_ok, TempDir, Vmm};

const T: Duration = Duration::from_secs(120);

fn status_line(sock: &str) -> String {
    vmm_ok(&["status", "--api-sock", sock])
}

/// `snapshot=PHASE DONE/TOTALMiB` of a status line.
fn job_of(status: &str) -> Option<(String, u64, u64)> {
    let word = status.split_whitespace().find_map(|w| w.strip_prefix("snapshot="))?;
    let sizes = status.split_whitespace().skip_while(|w| !w.starts_with("snapshot=")).nth(1)?;
    let (done, total) = sizes.strip_suffix("MiB")?.split_once('/')?;
    Some((word.to_string(), done.parse().ok()?, total.parse().ok()?))
}

#[test]
fn status_during_a_snapshot_busy_and_cancel() {
    let dir = TempDir::new("jobs");
    let sock = dir.path().join("s.sock").display().to_string();
    // A 2 GiB guest with 1 GiB touched: writing it takes seconds.
    let mut vm = Vmm::testguest(
        "workload=mem mem.size=512M",
        &["--vcpus", "2", "--mem", "2G", "--name", "big", "--api-sock", &sock],
    );
    vm.wait_for("testguest: ready", T);
    // Every vCPU verified a pass: all of its memory is written.
    loop {
        let line = vm.wait_for("testguest: tick", T);
        if field(&line, "cpu0") >= Some(1) && field(&line, "cpu1") >= Some(1) {
            break;
        }
    }
    let snap = dir.path().join("snap");
    let snap_s = snap.to_str().unwrap();
    vmm_ok(&["snapshot", "--api-sock", &sock, "--out", snap_s]);
    let first_manifest = std::fs::read(snap.join("manifest")).unwrap();

    let mut client = Command::new(vmm_bin())
        .args(["snapshot", "--api-sock", &sock, "--out", snap_s, "--force"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Status answers while the snapshot runs, and shows it writing memory.
    let deadline = Instant::now() + T;
    let (phase, done, total) = loop {
        if let Some((phase, done, total)) = job_of(&status_line(&sock)) {
            if phase == "writing-memory" && done > 0 {
                break (phase, done, total);
            }
        }
        assert!(Instant::now() < deadline, "never saw the snapshot writing memory");
        assert!(client.try_wait().unwrap().is_none(), "the snapshot ended before it could be watched");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(total, 2048, "{phase} {done}/{total}");
    assert!(done < total, "{phase} {done}/{total}");
    // One snapshot at a time.
    let other = dir.path().join("other");
    let (status, _, stderr) = vmm_cmd(&["snapshot", "--api-sock", &sock, "--out", other.to_str().unwrap()]);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("busy"), "{stderr}");
    assert!(!other.exists());
    // Ctrl-C cancels it.
    // SAFETY: signalling a child process we started and have not reaped.
    unsafe { libc::kill(client.id() as libc::pid_t, libc::SIGINT) };
    let out = client.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("snapshot cancelled; the guest runs on"), "{stderr}");
    // The previous snapshot is intact, nothing else is left, and the guest runs on.
    assert_eq!(std::fs::read(snap.join("manifest")).unwrap(), first_manifest);
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(".snap.tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temporary directories left: {leftovers:?}");
    vmm_ok(&["verify", snap_s]);
    let status = status_line(&sock);
    assert!(status.contains("running") && job_of(&status).is_none(), "{status}");
    // It goes on (a pass over its 512 MiB may take a few seconds while the host catches up:
    // the first write to each page after a snapshot is a fault, for the next diff's record).
    let l1 = vm.wait_for("testguest: tick", T);
    let mut l2 = vm.wait_for("testguest: tick", T);
    for _ in 0..10 {
        if field(&l2, "cpu0") > field(&l1, "cpu0") {
            break;
        }
        l2 = vm.wait_for("testguest: tick", T);
    }
    assert!(field(&l2, "cpu0") > field(&l1, "cpu0"), "{l1} -> {l2}");
    vm.kill();
}

#[test]
fn a_memory_file_changed_under_a_resumed_vm_stops_it_with_that_cause() {
    let dir = TempDir::new("memfile");
    let sock = dir.path().join("s.sock").display().to_string();
    // 32 MiB written once, then only 16 pages over and over: after a lazy resume most of the
    // snapshot's data is never touched, so the VM keeps depending on its file.
    let workload = "workload=dirty dirty.fill=32M dirty.pages=16 tick.ms=20";
    let mut vm = Vmm::testguest(workload, &["--mem", "128M", "--api-sock", &sock]);
    vm.wait_for("testguest: tick", T);
    vm.wait_for("testguest: tick", T);
    let snap = dir.path().join("snap");
    vmm_ok(&["snapshot", "--api-sock", &sock, "--out", snap.to_str().unwrap(), "--stop"]);
    vm.wait_exit(T);
    let rsock = dir.path().join("r.sock").display().to_string();
    // --lazy: the VM goes on reading untouched pages from the file.
    let mut resumed = Vmm::spawn(&["resume", snap.to_str().unwrap(), "--lazy", "--name", "r", "--api-sock", &rsock]);
    resumed.wait_for("testguest: tick", T);
    let status = vmm_ok(&["status", "--api-sock", &rsock]);
    assert!(status.contains("memory=lazy-from:"), "{status}");
    let pages = std::fs::OpenOptions::new().write(true).open(snap.join("memory.pages")).unwrap();
    pages.set_len(0).unwrap();
    let (status, _, stderr) = resumed.wait_exit(Duration::from_secs(30));
    assert_eq!(status.code(), Some(1), "{stderr}");
    let expected = format!("memory file of snapshot {} changed while in use", snap.display());
    assert!(stderr.contains(&expected), "{stderr}");
}
