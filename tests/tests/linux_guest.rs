//! What only a real Linux guest shows: a userspace process that keeps its memory and its clock
//! across snapshot → kill → resume cycles, an fsync'd ext4 file that is on the disk when a
//! `--stop` snapshot returns, the guest agent freezing a real ext4 (over the console, and over
//! vsock for `vmm snapshot`), and a TCP stream through virtio-net that survives a snapshot, a
//! kill and a resume, and live migrations there and back.
//!
//! These need a guest kernel that runs: hardware KVM, or the nested host (`tests/nested.sh`,
//! which `tests/run.sh` uses on PVM hosts). They are `#[ignore]`d by default so that a plain
//! `cargo test` on a PVM host does not fail; the runners pass `--include-ignored` where they can run.

use std::process::Command;

use tests::{bound, field, linux_run_args, require_hardware_kvm, vmm_ok, TempDir, Vmm};

/// The Linux guest's command line that runs /usr/bin/`program` from the initramfs.
fn running(program: &str) -> String {
    format!("console=ttyS0 reboot=k panic=-1 vmm.run=/usr/bin/{program}")
}

fn sock(dir: &TempDir) -> String {
    dir.path().join("vm.sock").display().to_string()
}

/// A fresh 64 MiB ext4 image (mkfs.ext4 from e2fsprogs).
fn ext4_disk(dir: &TempDir) -> String {
    let disk = dir.path().join("disk.img");
    let out = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "vmmtest", disk.to_str().unwrap(), "64M"])
        .output()
        .expect("mkfs.ext4 (e2fsprogs) runs");
    assert!(out.status.success(), "mkfs.ext4: {}", String::from_utf8_lossy(&out.stderr));
    disk.display().to_string()
}

/// `e2fsck -fn IMAGE`: (exit code, output). 0 means clean, with nothing to replay.
fn fsck_readonly(image: &str) -> (i32, String) {
    let out = Command::new("e2fsck").args(["-fn", image]).output().expect("e2fsck runs");
    (
        out.status.code().unwrap_or(-1),
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
    )
}

/// The md5 of file `path` inside ext4 image `image`, read by debugfs on a copy whose journal was
/// replayed by e2fsck (as a host mounting the disk after a crash would see it).
fn md5_in_image(image: &str, path: &str, dir: &TempDir) -> String {
    let copy = dir.path().join("copy.img");
    std::fs::copy(image, &copy).unwrap();
    let copy = copy.to_str().unwrap();
    let fsck = Command::new("e2fsck").args(["-fy", copy]).output().unwrap();
    assert!(
        matches!(fsck.status.code(), Some(0 | 1)),
        "e2fsck -fy on a copy of the disk: {:?}\n{}",
        fsck.status,
        String::from_utf8_lossy(&fsck.stdout)
    );
    let script = format!("debugfs -R 'cat {path}' {copy} 2>/dev/null | md5sum");
    let out = Command::new("sh").args(["-c", &script]).output().unwrap();
    let sum = String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap_or_default().to_string();
    std::fs::remove_file(copy).unwrap();
    sum
}

/// `memcheck: thread=T pass=N errors=E mono_ms=M` → (T, N, M).
fn memcheck(line: &str) -> Option<(u64, u64, u64)> {
    let rest = &line[line.find("memcheck: thread=")?..];
    Some((field(rest, "thread")?, field(rest, "pass")?, field(rest, "mono_ms")?))
}

/// Waits until every one of `threads` memcheck threads reports a pass above `after[t]`; returns
/// the passes and the clock of those lines, and checks every memcheck line on the way.
fn passes_beyond(vm: &mut Vmm, after: &[u64], min_mono_ms: u64) -> Vec<u64> {
    let mut latest = after.to_vec();
    let mut done = vec![false; after.len()];
    while !done.iter().all(|d| *d) {
        let line = vm.wait_for("memcheck: thread=", bound(120));
        let (t, pass, mono) = memcheck(&line).unwrap_or_else(|| panic!("unparsable: {line}"));
        let t = t as usize;
        assert!(t < after.len(), "unexpected thread: {line}");
        assert!(line.contains("errors=0"), "pattern errors: {line}");
        assert!(
            mono >= min_mono_ms,
            "the guest's monotonic clock went back to {mono} ms (was {min_mono_ms} ms): {line}"
        );
        assert!(pass >= latest[t], "thread {t} pass went back from {}: {line}", latest[t]);
        latest[t] = pass;
        if pass > after[t] {
            done[t] = true;
        }
    }
    latest
}

#[test]
#[ignore = "needs a guest kernel that runs (hardware KVM or tests/nested.sh)"]
fn userspace_memory_and_clock_survive_snapshot_kill_resume_cycles() {
    require_hardware_kvm();
    let dir = TempDir::new("linux-cycles");
    let s = sock(&dir);
    let cmdline = &running("vmm-memcheck");
    let mut vm = Vmm::spawn(&linux_run_args("512M", 2, cmdline, &["--api-sock", &s]));
    let ready = vm.wait_for("vmm-guest: ready", bound(180));
    assert!(ready.contains("nproc=2"), "{ready}");
    vm.wait_for("memcheck: start threads=2", bound(60));
    let mut passes = passes_beyond(&mut vm, &[1, 1], 0);

    for cycle in 1..=3 {
        // What the guest showed before the snapshot request: the resumed guest must go on from there.
        let clock_before = vm.seen.iter().filter_map(|l| memcheck(l)).map(|(_, _, m)| m).max().unwrap();
        let snap = dir.path().join(format!("snap{cycle}"));
        vmm_ok(&["snapshot", "--api-sock", &s, "--out", snap.to_str().unwrap()]);
        vm.kill();

        vm = Vmm::spawn(&["resume", snap.to_str().unwrap(), "--api-sock", &s]);
        passes = passes_beyond(&mut vm, &passes, clock_before);
        for reboot_sign in ["Linux version", "vmm-guest: ready", "memcheck: start"] {
            assert!(
                vm.lines_with(reboot_sign).is_empty(),
                "cycle {cycle}: the guest restarted:\n{}",
                vm.seen.join("\n")
            );
        }
        println!("cycle {cycle}: passes {passes:?}, guest clock from {clock_before} ms on");
        std::fs::remove_dir_all(&snap).unwrap();
    }
}

#[test]
#[ignore = "needs a guest kernel that runs (hardware KVM or tests/nested.sh)"]
fn fsynced_ext4_file_is_on_disk_after_a_stop_snapshot_and_there_after_resume() {
    require_hardware_kvm();
    let dir = TempDir::new("linux-ext4");
    let s = sock(&dir);
    let disk = ext4_disk(&dir);
    let cmdline = &running("vmm-ext4-fsync");
    let mut vm = Vmm::spawn(&linux_run_args("256M", 2, cmdline, &["--api-sock", &s, "--disk", &disk]));
    let written = vm.wait_for("vmm-guest: ext4 written md5=", bound(90));
    let sum = written.rsplit('=').next().unwrap().trim().to_string();

    let snap = dir.path().join("snap");
    vmm_ok(&["snapshot", "--api-sock", &s, "--out", snap.to_str().unwrap(), "--stop"]);
    let (status, _, stderr) = vm.wait_exit(bound(60));
    assert_eq!(status.code(), Some(0), "snapshot --stop: {stderr}");
    // The snapshot returned: what the guest fsync'd is on the host's disk image.
    assert_eq!(md5_in_image(&disk, "/data", &dir), sum, "the fsync'd file is not on the disk after the snapshot");

    let mut vm =
        Vmm::spawn_with_console_input(&["resume", snap.to_str().unwrap(), "--api-sock", &s, "--name", "linux-ext4-r"]);
    vm.send("go\n");
    let read = vm.wait_for("vmm-guest: ext4 read md5=", bound(120));
    assert!(read.ends_with(&sum), "after resume the guest read {read}, wrote {sum}");
    vm.wait_for("vmm-guest: ext4 unmounted", bound(60));
    let (status, _, stderr) = vm.wait_exit(bound(120));
    assert_eq!(status.code(), Some(0), "guest power-off: {stderr}");
    // The resumed guest ran on its working copy of the snapshot's disk.
    let working = tests::test_state_dir().join("vmm/linux-ext4-r/disk0.img");
    let (code, report) = fsck_readonly(working.to_str().unwrap());
    assert_eq!(code, 0, "the disk is not clean after the guest unmounted it:\n{report}");
}

#[test]
#[ignore = "needs a guest kernel that runs (hardware KVM or tests/nested.sh)"]
fn guest_agent_freezes_and_thaws_a_real_ext4() {
    require_hardware_kvm();
    let dir = TempDir::new("linux-agent");
    let disk = ext4_disk(&dir);
    let cmdline = &running("vmm-agent-freeze");
    let mut vm = Vmm::spawn_with_console_input(&linux_run_args("256M", 2, cmdline, &["--disk", &disk]));
    vm.wait_for("vmm-guest: agent serving", bound(90));
    vm.wait_for("vmm-guest: writer 2", bound(60));
    vm.send("ping\n");
    vm.wait_for("ok pong", bound(60));

    vm.send("freeze\n");
    let frozen = vm.wait_for_any(&["ok frozen", "err "], bound(60));
    assert!(frozen.starts_with("ok frozen 1 /mnt"), "freeze: {frozen}");
    // Frozen: the disk image is consistent as it is (journal flushed, nothing to replay) ...
    let copy = dir.path().join("frozen.img");
    std::fs::copy(&disk, &copy).unwrap();
    let (code, report) = fsck_readonly(copy.to_str().unwrap());
    assert_eq!(code, 0, "a frozen ext4 must be clean on the host:\n{report}");
    // ... and the writer is blocked (it writes once a second; one write may have been under way).
    let while_frozen = vm.lines_for(bound(5));
    let writes: Vec<_> = while_frozen.iter().filter(|l| l.contains("vmm-guest: writer")).collect();
    assert!(writes.len() <= 1, "the guest wrote while frozen: {writes:?}");

    vm.send("thaw\n");
    let thawed = vm.wait_for_any(&["ok thawed", "err "], bound(60));
    assert!(thawed.starts_with("ok thawed 1 /mnt"), "thaw: {thawed}");
    vm.wait_for("vmm-guest: writer", bound(60));
    vm.send("quit\n");
    vm.wait_for("ok bye", bound(60));
    vm.wait_for("vmm-guest: ext4 unmounted", bound(60));
    let (status, _, stderr) = vm.wait_exit(bound(120));
    assert_eq!(status.code(), Some(0), "guest power-off: {stderr}");
    let (code, report) = fsck_readonly(&disk);
    assert_eq!(code, 0, "the disk is not clean after the guest unmounted it:\n{report}");
}

/// A TCP echo server on the bridge (10.0.0.1:7000) for `vmm-tcp-stream`: one connection, echoed
/// for ever; returns the count of bytes echoed. Call it from the test's thread: the server then
/// runs in its network namespace.
fn echo_server() -> std::sync::Arc<std::sync::atomic::AtomicU64> {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("10.0.0.1:7000").expect("listen on the bridge");
    let echoed = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counter = echoed.clone();
    std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().expect("the guest connects");
        let mut buf = [0u8; 4096];
        while let Ok(n) = conn.read(&mut buf) {
            if n == 0 || conn.write_all(&buf[..n]).is_err() {
                break;
            }
            counter.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        }
    });
    echoed
}

/// A TCP connection between the guest (virtio-net, Linux's driver) and the host outlives a
/// snapshot, a SIGKILL of the VM and a resume on the same TAP: the guest's stream goes on with no
/// byte lost, repeated or reordered (the guest checks every echo) on the very same connection
/// (the host's server accepts only one).
#[test]
#[ignore = "needs a guest kernel that runs (hardware KVM or tests/nested.sh)"]
fn tcp_stream_survives_snapshot_kill_resume() {
    require_hardware_kvm();
    tests::netns::private_network(&["tap0"]);
    let echoed = echo_server();
    let dir = TempDir::new("linux-tcp");
    let s = sock(&dir);
    let cmdline = &running("vmm-tcp-stream");
    let mut vm = Vmm::spawn(&linux_run_args("256M", 2, cmdline, &["--api-sock", &s, "--net", "tap=tap0"]));
    vm.wait_for("vmm-guest: tcp connected", bound(120));
    let before = field(&vm.wait_for("vmm-guest: tcp n=", bound(120)), "n").unwrap();
    vmm_ok(&["pause", "--api-sock", &s]);
    let snap = dir.path().join("snap");
    vmm_ok(&["snapshot", "--api-sock", &s, "--out", snap.to_str().unwrap()]);
    vm.kill();

    let mut resumed = Vmm::spawn(&["resume", snap.to_str().unwrap(), "--api-sock", &s]);
    let mut after = before;
    for _ in 0..3 {
        let line = resumed.wait_for_any(&["vmm-guest: tcp n=", "vmm-guest: tcp FAIL"], bound(180));
        assert!(!line.contains("FAIL"), "{line}");
        after = field(&line, "n").unwrap();
    }
    assert!(after > before, "the stream did not go on: n={before} -> {after}");
    assert!(resumed.lines_with("tcp connected").is_empty(), "the guest reconnected instead of going on");
    assert!(echoed.load(std::sync::atomic::Ordering::Relaxed) >= after * 8);
    resumed.kill();
}

/// The same TCP stream outlives live migrations: from a vmm on TAP `tap0` to a `vmm receive` on
/// `tap1` of the same bridge (over two connections) and back, the guest running throughout the
/// copy. The stream goes on, on the same connection, with no byte lost, repeated or reordered,
/// and the bridge finds the guest behind its new TAP each time (vmm announces it).
#[test]
#[ignore = "needs a guest kernel that runs (hardware KVM or tests/nested.sh)"]
fn tcp_stream_survives_live_migration_there_and_back() {
    require_hardware_kvm();
    tests::netns::private_network(&["tap0", "tap1"]);
    let echoed = echo_server();
    let dir = TempDir::new("linux-migrate");
    let sock_of = |name: &str| dir.path().join(format!("{name}.sock")).display().to_string();
    let cmdline = &running("vmm-tcp-stream");
    let mut vm = Vmm::spawn(&linux_run_args(
        "256M",
        2,
        cmdline,
        &["--name", "lm0", "--api-sock", &sock_of("lm0"), "--net", "tap=tap0"],
    ));
    vm.wait_for("vmm-guest: tcp connected", bound(120));
    let mut n = field(&vm.wait_for("vmm-guest: tcp n=", bound(120)), "n").unwrap();
    // Under emulation nothing meets a 10 ms budget: the rounds run out and it completes.
    let timeout = format!("{}s", bound(60).as_secs());
    for (i, tap) in [(1, "tap1"), (2, "tap0")] {
        let (from, to) = (format!("lm{}", i - 1), format!("lm{i}"));
        let listen = dir.path().join(format!("in{i}.sock"));
        let listen_at = format!("unix:{}", listen.display());
        let mut dst = Vmm::spawn(&[
            "receive",
            "--listen",
            &listen_at,
            "--name",
            &to,
            "--api-sock",
            &sock_of(&to),
            "--net",
            &format!("tap={tap}"),
            "--timeout",
            &timeout,
        ]);
        let deadline = std::time::Instant::now() + bound(30);
        while !listen.exists() {
            assert!(std::time::Instant::now() < deadline, "the receiver never listened");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        vmm_ok(&[
            "migrate",
            "--api-sock",
            &sock_of(&from),
            "--to",
            &listen_at,
            "--connections",
            "2",
            "--max-rounds",
            "5",
            "--timeout",
            &timeout,
        ]);
        let (status, _, stderr) = vm.wait_exit(bound(60));
        assert_eq!(status.code(), Some(0), "the source after migration {i}: {stderr}");
        let before = n;
        for _ in 0..3 {
            let line = dst.wait_for_any(&["vmm-guest: tcp n=", "vmm-guest: tcp FAIL"], bound(180));
            assert!(!line.contains("FAIL"), "after migration {i}: {line}");
            n = field(&line, "n").unwrap();
        }
        assert!(n > before, "the stream did not go on after migration {i}: n={before} -> {n}");
        assert!(dst.lines_with("tcp connected").is_empty(), "the guest reconnected instead of going on");
        vm = dst;
    }
    assert!(echoed.load(std::sync::atomic::Ordering::Relaxed) >= n * 8);
    vm.kill();
}

/// `vmm snapshot` has the real guest agent (over vsock) freeze the guest's ext4 before the pause
/// and thaw it after; with --require-agent it must succeed. The resumed guest is thawed by vmm.
#[test]
#[ignore = "needs a guest kernel that runs (hardware KVM or tests/nested.sh)"]
fn guest_agent_quiesces_a_real_ext4_over_vsock_for_a_snapshot() {
    require_hardware_kvm();
    let dir = TempDir::new("linux-agent-vsock");
    let s = sock(&dir);
    let disk = ext4_disk(&dir);
    let vsock = format!("cid=3,uds={}", dir.path().join("v.sock").display());
    let cmdline = &running("vmm-agent-vsock");
    let mut vm =
        Vmm::spawn(&linux_run_args("256M", 2, cmdline, &["--api-sock", &s, "--disk", &disk, "--vsock", &vsock]));
    vm.wait_for("vmm-guest-agent: listening", bound(120));
    vm.wait_for("vmm-guest: writer 2", bound(60));
    let snap = dir.path().join("snap");
    let out = vmm_ok(&["snapshot", "--api-sock", &s, "--out", snap.to_str().unwrap(), "--require-agent"]);
    assert!(out.contains("quiesced, paused"), "{out}");
    let froze = vm.wait_for("vmm-guest-agent: froze", bound(60));
    assert!(froze.contains("froze 1 file system(s) /mnt"), "{froze}");
    vm.wait_for("vmm-guest-agent: thawed 1 file system(s)", bound(60));
    // The writer goes on after the thaw.
    let n = vm.lines_with("vmm-guest: writer").len();
    vm.wait_for(&format!("vmm-guest: writer {}", n + 2), bound(60));
    vm.kill();
    // The snapshot's disk copy was taken frozen: clean, nothing to replay.
    let (code, report) = fsck_readonly(snap.join("disk0.img").to_str().unwrap());
    assert_eq!(code, 0, "the snapshot's copy of a quiesced ext4 must be clean:\n{report}");
    // Resumed, the guest is thawed by vmm (the snapshot holds it quiesced) and writes again.
    let mut resumed = Vmm::spawn(&["resume", snap.to_str().unwrap(), "--api-sock", &s]);
    resumed.wait_for("vmm-guest-agent: thawed 1 file system(s)", bound(120));
    resumed.wait_for("vmm-guest: writer", bound(60));
    resumed.kill();
}
