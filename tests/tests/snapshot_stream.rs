//! A VM moved through a pipe (`vmm snapshot --out - --stop | vmm resume -`), and snapshot streams
//! cut or damaged: the reading side refuses them with one line and exit 2, and nothing is left
//! running; a source whose reader dies keeps running.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use tests::{field, vmm_bin, vmm_cmd, TempDir, Vmm};

const T: Duration = Duration::from_secs(60);
const WORKLOAD: &str = "workload=mem mem.size=32M";

fn sock(dir: &TempDir, name: &str) -> String {
    dir.path().join(format!("{name}.sock")).display().to_string()
}

fn boot(dir: &TempDir, name: &str) -> (Vmm, String) {
    let s = sock(dir, name);
    let mut vm = Vmm::testguest(WORKLOAD, &["--vcpus", "2", "--mem", "256M", "--name", name, "--api-sock", &s]);
    vm.wait_for("testguest: ready", T);
    vm.wait_for("testguest: tick", T);
    let last = vm.wait_for("testguest: tick", T);
    (vm, last)
}

/// Per-CPU tick counters of a tick line.
fn counters(line: &str) -> Vec<u64> {
    (0..2).map(|c| field(line, &format!("cpu{c}")).unwrap_or_else(|| panic!("no cpu{c} in {line}"))).collect()
}

/// The VM on `sock` says it runs, and every vCPU's counter goes on.
fn assert_runs_on(vm: &mut Vmm, sock: &str) {
    let (status, out, _) = vmm_cmd(&["status", "--api-sock", sock]);
    assert!(status.success() && out.contains("running"), "{out}");
    let l1 = vm.wait_for("testguest: tick", T);
    let l2 = vm.wait_for("testguest: tick", T);
    assert!(counters(&l2).iter().zip(counters(&l1)).all(|(a, b)| *a > b), "{l1} -> {l2}");
}

/// `vmm snapshot --out - ARGS` of VM `name`, its stdout a pipe returned to the caller.
fn snapshot_to_pipe(dir: &TempDir, name: &str, extra: &[&str]) -> std::process::Child {
    Command::new(vmm_bin())
        .args(["snapshot", "--api-sock", &sock(dir, name), "--out", "-"])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run vmm snapshot")
}

fn move_through_pipe(compress: bool) {
    let dir = TempDir::new(if compress { "pipe-z" } else { "pipe" });
    let (src, before) = boot(&dir, "a");
    let extra: &[&str] = if compress { &["--stop", "--compress"] } else { &["--stop"] };
    let mut snap = snapshot_to_pipe(&dir, "a", extra);
    let pipe = Stdio::from(snap.stdout.take().unwrap());
    let mut dst = Vmm::spawn_with_stdin(&["resume", "-", "--name", "b", "--api-sock", &sock(&dir, "b")], pipe);
    let status = snap.wait().unwrap();
    let mut err = String::new();
    snap.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert!(status.success(), "snapshot --out - failed: {err}");
    assert!(err.contains("bytes through the stream"), "{err}");
    // The source ended once its stream was written; the other side goes on verifying.
    let (status, _, stderr) = src.wait_exit(T);
    assert_eq!(status.code(), Some(0), "{stderr}");
    let first = dst.wait_for("testguest: tick", T);
    let (c0, c1) = (counters(&before), counters(&first));
    assert!(c1.iter().zip(&c0).all(|(a, b)| a >= b), "counters went back: {before} -> {first}");
    let mut last = first.clone();
    for _ in 0..10 {
        last = dst.wait_for("testguest: tick", T);
        if counters(&last).iter().zip(&c1).all(|(a, b)| a > b) {
            break;
        }
    }
    assert!(counters(&last).iter().zip(&c1).all(|(a, b)| a > b), "no progress after the move: {first} -> {last}");
    assert!(dst.lines_with("testguest: ready").is_empty(), "guest rebooted: {:?}", dst.seen);
    dst.kill();
}

#[test]
fn vm_moves_through_a_pipe_and_keeps_verifying() {
    move_through_pipe(false);
}

#[test]
fn vm_moves_through_a_compressed_pipe() {
    move_through_pipe(true);
}

/// Runs `vmm ARGS` with stdin from `input`: (exit code, stderr).
fn with_input(args: &[&str], input: &Path) -> (Option<i32>, String) {
    let out = Command::new(vmm_bin())
        .args(args)
        .stdin(std::fs::File::open(input).unwrap())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn cut_or_damaged_streams_are_refused_and_nothing_runs() {
    let dir = TempDir::new("cut");
    let (mut vm, _) = boot(&dir, "a");
    let stream = dir.path().join("stream");
    let out = std::fs::File::create(&stream).unwrap();
    let status = Command::new(vmm_bin())
        .args(["snapshot", "--api-sock", &sock(&dir, "a"), "--out", "-"])
        .stdout(out)
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    vm.kill();
    let good = std::fs::read(&stream).unwrap();
    let (code, err) = with_input(&["verify", "-"], &stream);
    assert_eq!(code, Some(0), "{err}");
    let bad = dir.path().join("bad");
    let b_sock = sock(&dir, "b");
    let mut cases: Vec<(String, Vec<u8>)> = Vec::new();
    for cut in [0, 5, 12, 40, 4096, good.len() / 3, good.len() / 2, good.len() - 9, good.len() - 1] {
        cases.push((format!("cut at {cut}"), good[..cut].to_vec()));
    }
    for at in [20, 2000, good.len() / 4, good.len() / 2 + 7, good.len() - 30] {
        let mut damaged = good.clone();
        damaged[at] ^= 0x40;
        cases.push((format!("byte {at} flipped"), damaged));
    }
    for (what, bytes) in cases {
        std::fs::write(&bad, &bytes).unwrap();
        for args in [&["resume", "-", "--name", "b", "--api-sock", &b_sock][..], &["verify", "-"], &["inspect", "-"]] {
            let (code, err) = with_input(args, &bad);
            assert_eq!(code, Some(2), "{what}: vmm {args:?} must refuse the stream with exit 2: {err}");
            assert_eq!(err.trim().lines().count(), 1, "{what}: one line expected: {err}");
        }
        // Nothing was left running: no VM answers on the socket.
        assert!(!Path::new(&b_sock).exists(), "{what}: a control socket was left behind");
    }
}

#[test]
fn stop_with_a_reader_that_dies_keeps_the_source_running() {
    let dir = TempDir::new("deadreader");
    let (mut vm, _) = boot(&dir, "a");
    let mut snap = snapshot_to_pipe(&dir, "a", &["--stop"]);
    // The reader takes a few bytes and goes away.
    let mut head = [0u8; 64];
    snap.stdout.as_mut().unwrap().read_exact(&mut head).unwrap();
    drop(snap.stdout.take());
    let status = snap.wait().unwrap();
    let mut err = String::new();
    snap.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert_eq!(status.code(), Some(1), "a failed --stop snapshot is a runtime error: {err}");
    assert!(err.contains("Broken pipe"), "{err}");
    // The source runs on.
    assert_runs_on(&mut vm, &sock(&dir, "a"));
    vm.kill();
}

#[test]
fn resume_refuses_a_taken_name_before_the_source_is_gone() {
    let dir = TempDir::new("taken");
    let (mut src, _) = boot(&dir, "a");
    let (mut other, _) = boot(&dir, "taken");
    let mut snap = snapshot_to_pipe(&dir, "a", &["--stop"]);
    let pipe = Stdio::from(snap.stdout.take().unwrap());
    let dst = Vmm::spawn_with_stdin(&["resume", "-", "--name", "taken", "--api-sock", &sock(&dir, "taken")], pipe);
    let (status, _, stderr) = dst.wait_exit(T);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("is in use by a running VM"), "{stderr}");
    // The snapshot could not be delivered: its command fails and the source runs on.
    let status = snap.wait().unwrap();
    assert_eq!(status.code(), Some(1));
    let (status, out, _) = vmm_cmd(&["status", "--api-sock", &sock(&dir, "a")]);
    assert!(status.success() && out.contains("running"), "{out}");
    src.wait_for("testguest: tick", T);
    src.kill();
    other.kill();
}

/// An idle guest's stream (about 125 KiB) fits in the pipe whole: its writer is done before the
/// reader has looked at it. A `--stop` snapshot is still not done until the reader took it, so
/// a resume that refuses the VM without reading leaves the source running.
#[test]
fn a_stop_stream_that_fits_in_the_pipe_waits_for_its_reader() {
    let dir = TempDir::new("smallpipe");
    let mut src = Vmm::testguest("workload=idle", &["--name", "small", "--api-sock", &sock(&dir, "small")]);
    src.wait_for("testguest: ready", T);
    let mut snap = snapshot_to_pipe(&dir, "small", &["--stop"]);
    let pipe = Stdio::from(snap.stdout.take().unwrap());
    // The source's own name: refused before anything is read.
    let dst = Vmm::spawn_with_stdin(&["resume", "-", "--api-sock", &sock(&dir, "small")], pipe);
    let (status, _, stderr) = dst.wait_exit(T);
    assert_eq!(status.code(), Some(2), "{stderr}");
    let status = snap.wait().unwrap();
    let mut err = String::new();
    snap.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("unread"), "{err}");
    let (status, out, _) = vmm_cmd(&["status", "--api-sock", &sock(&dir, "small")]);
    assert!(status.success() && out.contains("running"), "{out}");
    src.kill();
}

#[test]
fn status_and_cancel_answer_while_a_stop_snapshot_holds_the_guest_paused() {
    let dir = TempDir::new("stopcancel");
    let (mut vm, _) = boot(&dir, "a");
    // Nobody reads the stream yet: the job waits on the pipe with the guest paused.
    let mut snap = snapshot_to_pipe(&dir, "a", &["--stop"]);
    let s = sock(&dir, "a");
    let deadline = std::time::Instant::now() + T;
    loop {
        let (status, out, err) = vmm_cmd(&["status", "--api-sock", &s]);
        assert!(status.success(), "status must answer during the snapshot: {err}");
        if out.contains("paused") && out.contains("snapshot=writing-memory") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "never saw the paused guest being written: {out}");
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: signalling a child process we started and have not reaped.
    unsafe { libc::kill(snap.id() as libc::pid_t, libc::SIGINT) };
    // Once the cancel got there, let the job see it: read (and drop) what it writes.
    std::thread::sleep(Duration::from_millis(500));
    let mut out = snap.stdout.take().unwrap();
    std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
    let status = snap.wait().unwrap();
    let mut err = String::new();
    snap.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert_eq!(status.code(), Some(130), "{err}");
    // The guest runs on.
    assert_runs_on(&mut vm, &s);
    vm.kill();
}

#[test]
fn a_stream_to_dev_null_is_refused() {
    let out = Command::new(vmm_bin())
        .args(["snapshot", "--vm", "nosuch", "--out", "-"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("/dev/null"), "{err}");
}
