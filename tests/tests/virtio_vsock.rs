//! virtio-vsock with its host side on Unix sockets, against the test guest's vsock services: an
//! echo on port 1234, the agent protocol on port 52, and its own connection to a host port.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::Duration;

use agent_protocol::{Frame, Message};
use tests::{vmm_cmd, vmm_ok, TempDir, Vmm};

const T: Duration = Duration::from_secs(60);
const ECHO_PORT: u32 = 1234;

fn boot(dir: &TempDir, name: &str, cmdline: &str) -> (Vmm, String, String) {
    let sock = dir.path().join(format!("{name}.sock")).display().to_string();
    let uds = dir.path().join(format!("{name}.vsock")).display().to_string();
    let vsock = format!("cid=3,uds={uds}");
    let mut vm = Vmm::testguest(cmdline, &["--vsock", &vsock, "--name", name, "--api-sock", &sock]);
    vm.wait_for("testguest: vsock ready cid=3", T);
    (vm, sock, uds)
}

/// Connects to guest port `port` through the device's socket; returns the stream and the host
/// port vmm gave it.
fn connect(uds: &str, port: u32) -> (BufReader<UnixStream>, u32) {
    let stream = UnixStream::connect(uds).expect("connect to the vsock socket");
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut reader = BufReader::new(stream);
    reader.get_mut().write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
    let mut line = String::new();
    reader.read_line(&mut line).expect("an answer to CONNECT");
    let host_port = line.strip_prefix("OK ").and_then(|p| p.trim().parse().ok());
    (reader, host_port.unwrap_or_else(|| panic!("expected 'OK <port>', got {line:?}")))
}

fn echo_round_trip(conn: &mut BufReader<UnixStream>, data: &[u8]) {
    conn.get_mut().write_all(data).unwrap();
    let mut back = vec![0u8; data.len()];
    conn.read_exact(&mut back).expect("the echo");
    assert!(back == data, "echo of {} bytes differs", data.len());
}

/// One agent-protocol request and its reply.
fn agent_request(conn: &mut BufReader<UnixStream>, id: u32, message: Message<'_>) -> Vec<u8> {
    let mut buf = vec![0u8; agent_protocol::MAX_FRAME];
    let n = agent_protocol::encode(&Frame { id, message }, &mut buf).unwrap();
    conn.get_mut().write_all(&buf[..n]).unwrap();
    let mut len = [0u8; 4];
    conn.read_exact(&mut len).expect("an agent reply");
    let total = agent_protocol::frame_len(&len).unwrap().unwrap();
    let mut frame = len.to_vec();
    frame.resize(total, 0);
    conn.read_exact(&mut frame[4..]).unwrap();
    frame
}

#[test]
fn host_connections_reach_the_guest_echo_and_agent() {
    let dir = TempDir::new("vsock-echo");
    let (mut vm, _sock, uds) = boot(&dir, "vsock-echo", "workload=vsock");
    let (mut a, port_a) = connect(&uds, ECHO_PORT);
    let (mut b, port_b) = connect(&uds, ECHO_PORT);
    assert_ne!(port_a, port_b, "each connection gets its own host port");
    echo_round_trip(&mut a, b"hello\n");
    echo_round_trip(&mut b, b"other connection\n");
    // More than the guest's 64 KiB buffer: the device must wait for the guest's credit.
    let big: Vec<u8> = (0..300_000u32).map(|i| (i * 31 % 251) as u8).collect();
    echo_round_trip(&mut a, &big);

    let (mut agent, _) = connect(&uds, agent_protocol::AGENT_PORT);
    let reply = agent_request(&mut agent, 41, Message::Ping);
    let (frame, _) = agent_protocol::decode(&reply).unwrap().unwrap();
    assert_eq!(frame, Frame { id: 41, message: Message::Ok("testguest agent") });

    // A port nobody listens on: the connection is refused (closed without OK).
    let mut refused = UnixStream::connect(&uds).unwrap();
    refused.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    refused.write_all(b"CONNECT 4444\n").unwrap();
    let mut rest = String::new();
    let _ = refused.read_to_string(&mut rest);
    assert!(!rest.starts_with("OK"), "a connection to a closed port was accepted: {rest:?}");
    // Garbage instead of CONNECT is dropped too, and the device goes on.
    let mut junk = UnixStream::connect(&uds).unwrap();
    junk.write_all(&[0xffu8; 100]).unwrap();
    echo_round_trip(&mut b, b"still there\n");
    vm.kill();
}

#[test]
fn guest_connects_to_a_host_socket() {
    let dir = TempDir::new("vsock-out");
    let uds = dir.path().join("vsock-out.vsock");
    let listener = UnixListener::bind(format!("{}_5555", uds.display())).unwrap();
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        while s.read(&mut byte).unwrap() == 1 && byte[0] != b'\n' {
            line.push(byte[0]);
        }
        s.write_all(b"echo: ").unwrap();
        s.write_all(&line).unwrap();
        s.write_all(b"\n").unwrap();
        line
    });
    let sock = dir.path().join("vm.sock").display().to_string();
    let vsock = format!("cid=3,uds={}", uds.display());
    let mut vm = Vmm::testguest("workload=vsock vsock.connect=5555", &["--vsock", &vsock, "--api-sock", &sock]);
    let line = vm.wait_for("testguest: vsock connect-back ok", T);
    assert!(line.ends_with("reply=echo: hello from the test guest"), "{line}");
    assert_eq!(server.join().unwrap(), b"hello from the test guest");
    vm.kill();
}

/// Connections do not survive a snapshot (their host ends belonged to the source): the resumed
/// guest is told with a transport reset, the old host connection ends, and new ones work.
#[test]
fn connections_are_reset_across_resume() {
    let dir = TempDir::new("vsock-resume");
    let (vm, sock, uds) = boot(&dir, "vsock-a", "workload=vsock");
    let (mut old, _) = connect(&uds, ECHO_PORT);
    echo_round_trip(&mut old, b"before\n");
    let snap = dir.path().join("snap");
    vmm_ok(&["snapshot", "--api-sock", &sock, "--out", snap.to_str().unwrap(), "--stop"]);
    let _ = vm.wait_exit(T);
    let mut rest = Vec::new();
    match old.read_to_end(&mut rest) {
        Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
            panic!("the old connection did not end with its VM")
        }
        _ => {}
    }

    let sock_b = dir.path().join("b.sock").display().to_string();
    let mut resumed = Vmm::spawn(&["resume", snap.to_str().unwrap(), "--name", "vsock-b", "--api-sock", &sock_b]);
    resumed.wait_for("testguest: vsock transport-reset cid=3", T);
    assert!(Path::new(&uds).exists(), "the resumed VM listens on the snapshot's socket again");
    let (mut new, _) = connect(&uds, ECHO_PORT);
    echo_round_trip(&mut new, b"after\n");
    resumed.kill();
}

#[test]
fn bad_vsock_arguments_are_refused() {
    tests::require_kvm();
    let dir = TempDir::new("vsock-bad");
    let kernel = tests::testguest().display().to_string();
    let uds = dir.path().join("v.sock").display().to_string();
    for (arg, expect) in [
        ("cid=2,uds=/tmp/x.sock".to_string(), "invalid vsock"),
        ("cid=3".to_string(), "invalid vsock"),
        (format!("cid=3,uds={}/missing-dir/v.sock", dir.path().display()), "cannot listen on vsock socket"),
    ] {
        let (status, _, stderr) = vmm_cmd(&["run", "--kernel", &kernel, "--vsock", &arg]);
        assert_eq!(status.code(), Some(2), "--vsock {arg}: {stderr}");
        assert!(stderr.contains(expect) && stderr.trim_end().lines().count() == 1, "--vsock {arg}: {stderr}");
    }
    // The vsock socket cannot be the control socket.
    let same = dir.path().join("same.sock").display().to_string();
    let arg = format!("cid=3,uds={same}");
    let (status, _, stderr) = vmm_cmd(&["run", "--kernel", &kernel, "--vsock", &arg, "--api-sock", &same]);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("is the VM's control socket"), "{stderr}");
    let (mut vm, _sock, uds_held) = boot(&dir, "vsock-holder", "workload=vsock");
    let arg = format!("cid=4,uds={uds_held}");
    let (status, _, stderr) = vmm_cmd(&["run", "--kernel", &kernel, "--vsock", &arg]);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("in use"), "{stderr}");
    vm.kill();
    // A stale socket file (its VM killed) does not stand in the way; a VM that ends removes it.
    let (again, sock, uds_again) = boot(&dir, "vsock-holder", "workload=vsock");
    vmm_ok(&["shutdown", "--api-sock", &sock]);
    let _ = again.wait_exit(T);
    assert!(!Path::new(&uds_again).exists(), "the vsock socket outlived its VM");
    // --vsock on resume replaces a vsock device; it cannot add one.
    let sock = dir.path().join("plain.sock").display().to_string();
    let mut plain = Vmm::testguest("workload=idle", &["--api-sock", &sock]);
    plain.wait_for("testguest: ready", T);
    let snap = dir.path().join("plain-snap");
    vmm_ok(&["snapshot", "--api-sock", &sock, "--out", snap.to_str().unwrap(), "--stop"]);
    let _ = plain.wait_exit(T);
    let arg = format!("cid=3,uds={uds}");
    let (status, _, stderr) = vmm_cmd(&["resume", snap.to_str().unwrap(), "--vsock", &arg]);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("has no vsock device"), "{stderr}");
}

/// `vmm snapshot` has the agent quiesce the guest before the pause and thaw it after: the
/// snapshot holds a guest that was quiesced and not yet thawed, so its resume is thawed (and
/// gets the host's clock and fresh entropy) by the resuming vmm.
#[test]
fn snapshots_are_quiesced_by_the_agent_and_resumes_refreshed() {
    let dir = TempDir::new("vsock-agent");
    let (mut vm, sock, _uds) = boot(&dir, "agent-a", "workload=vsock");
    let snap = dir.path().join("snap");
    let out = vmm_ok(&["snapshot", "--api-sock", &sock, "--out", snap.to_str().unwrap()]);
    assert!(out.contains("quiesced, paused"), "{out}");
    vm.wait_for("testguest: agent quiesce n=1 timeout_ms=20000", T);
    vm.wait_for("testguest: agent thaw n=1", T);
    let out =
        vmm_ok(&["snapshot", "--api-sock", &sock, "--out", dir.path().join("s2").to_str().unwrap(), "--no-quiesce"]);
    assert!(!out.contains("quiesced"), "{out}");
    vm.kill();
    assert!(vm.lines_with("agent quiesce n=2").is_empty(), "--no-quiesce still quiesced");

    // Two resumes of one snapshot, each on its own vsock socket.
    let mut hashes = Vec::new();
    for name in ["agent-b", "agent-c"] {
        let sock = dir.path().join(format!("{name}.sock")).display().to_string();
        let vsock = format!("cid=3,uds={}", dir.path().join(format!("{name}.vsock")).display());
        let mut resumed =
            Vmm::spawn(&["resume", snap.to_str().unwrap(), "--vsock", &vsock, "--name", name, "--api-sock", &sock]);
        // The snapshot was taken between quiesce and thaw: this thaw is the resumed guest's first.
        resumed.wait_for("testguest: agent thaw n=1", T);
        let time = resumed.wait_for("testguest: agent set-time", T);
        let secs = tests::field(&time, "secs").expect("secs=");
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
        assert!(secs.abs_diff(now) <= 5, "guest clock set to {secs}, host says {now}");
        let entropy = resumed.wait_for("testguest: agent add-entropy bytes=64", T);
        hashes.push(entropy.split_whitespace().last().unwrap().to_string());
        resumed.kill();
    }
    assert_ne!(hashes[0], hashes[1], "two resumes of one snapshot got the same entropy");
}

/// A guest writing its disk is quiesced for real: the agent answers only once the disk workload
/// is parked between two requests (none in flight), nothing is written until the thaw, and a
/// resume of the snapshot finds on its disk every write made before the quiesce (the guest
/// reads them back after its thaw).
#[test]
fn a_quiesce_holds_the_guests_disk_writes_until_the_thaw() {
    let dir = TempDir::new("vsock-disk-agent");
    let disk = dir.path().join("disk.img");
    std::fs::File::create(&disk).unwrap().set_len(4 << 20).unwrap();
    let sock = dir.path().join("a.sock").display().to_string();
    let vsock = format!("cid=3,uds={}", dir.path().join("a.vsock").display());
    let cmdline = "workload=disk disk.agent=1 disk.rounds=0 disk.sectors=4096 tick.ms=50";
    let disk_arg = disk.display().to_string();
    let mut vm = Vmm::testguest(
        cmdline,
        &["--vcpus", "2", "--disk", &disk_arg, "--vsock", &vsock, "--name", "disk-agent", "--api-sock", &sock],
    );
    // A few rounds (each writes, reads back and checks 2 MiB) before the snapshot.
    loop {
        let tick = vm.wait_for("testguest: tick", T);
        if tests::field(&tick, "cpu1").unwrap_or(0) >= 3 {
            break;
        }
    }
    let snap = dir.path().join("snap");
    let out = vmm_ok(&["snapshot", "--api-sock", &sock, "--out", snap.to_str().unwrap()]);
    assert!(out.contains("quiesced"), "{out}");
    let quiesced = vm.wait_for("testguest: agent quiesce n=1", T);
    assert!(quiesced.contains("disk=held"), "{quiesced}");
    let thawed = vm.wait_for("testguest: agent thaw n=1", T);
    // Not one write between the quiesce's answer and the thaw.
    assert_eq!(tests::field(&quiesced, "writes"), tests::field(&thawed, "writes"), "{quiesced} / {thawed}");
    let resumed_writing = vm.wait_for("testguest: disk thawed", T);
    assert!(tests::field(&resumed_writing, "verified-sectors").unwrap_or(0) > 0, "{resumed_writing}");
    let rounds = tests::field(&vm.wait_for("testguest: tick", T), "cpu1").unwrap();
    loop {
        if tests::field(&vm.wait_for("testguest: tick", T), "cpu1").unwrap() > rounds {
            break;
        }
    }
    vm.kill();

    // The snapshot holds the guest parked (quiesced, not yet thawed): the resuming vmm thaws it,
    // and the guest finds its writes on the snapshot's copy of the disk.
    let vsock = format!("cid=3,uds={}", dir.path().join("b.vsock").display());
    let sock = dir.path().join("b.sock").display().to_string();
    let mut resumed = Vmm::spawn(&[
        "resume",
        snap.to_str().unwrap(),
        "--vsock",
        &vsock,
        "--name",
        "disk-agent-b",
        "--api-sock",
        &sock,
    ]);
    resumed.wait_for("testguest: agent thaw n=1", T);
    let checked = resumed.wait_for("testguest: disk thawed", T);
    assert!(tests::field(&checked, "verified-sectors").unwrap_or(0) > 0, "{checked}");
    let first = tests::field(&resumed.wait_for("testguest: tick", T), "cpu1").unwrap();
    loop {
        if tests::field(&resumed.wait_for("testguest: tick", T), "cpu1").unwrap() > first {
            break;
        }
    }
    assert!(resumed.lines_with("FAIL").is_empty(), "{:?}", resumed.seen);
    resumed.kill();
}

/// A VM whose agent does not answer (this guest runs no vsock driver) is snapshotted anyway,
/// with a warning; with --require-agent the snapshot fails and the guest runs on.
#[test]
fn an_absent_agent_warns_or_fails_as_asked() {
    let dir = TempDir::new("vsock-noagent");
    let sock = dir.path().join("vm.sock").display().to_string();
    let vsock = format!("cid=3,uds={}", dir.path().join("v.sock").display());
    let mut vm = Vmm::testguest("workload=idle", &["--vsock", &vsock, "--api-sock", &sock]);
    vm.wait_for("testguest: ready", T);
    let snap = dir.path().join("snap");
    let (status, out, err) = vmm_cmd(&["snapshot", "--api-sock", &sock, "--out", snap.to_str().unwrap()]);
    assert!(status.success(), "{err}");
    assert!(err.contains("warning: no guest agent answered") && !out.contains("quiesced"), "{out} {err}");
    let snap2 = dir.path().join("snap2");
    let (status, _, err) =
        vmm_cmd(&["snapshot", "--api-sock", &sock, "--out", snap2.to_str().unwrap(), "--require-agent"]);
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("cannot quiesce the guest") && err.trim_end().lines().count() == 1, "{err}");
    assert!(!snap2.exists(), "a failed snapshot left {}", snap2.display());
    let status = vmm_ok(&["status", "--api-sock", &sock]);
    assert!(status.contains("running"), "{status}");
    // A paused guest is not asked (it cannot answer): a warning at once, or a refusal.
    vmm_ok(&["pause", "--api-sock", &sock]);
    let snap3 = dir.path().join("snap3");
    let started = std::time::Instant::now();
    let (status, _, err) = vmm_cmd(&["snapshot", "--api-sock", &sock, "--out", snap3.to_str().unwrap()]);
    assert!(status.success() && err.contains("the guest is paused"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(2), "a paused guest's agent was waited for");
    let (status, _, err) =
        vmm_cmd(&["snapshot", "--api-sock", &sock, "--out", snap2.to_str().unwrap(), "--require-agent"]);
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("the guest is paused"), "{err}");
    vm.kill();
}

/// A host listener that does not accept (its backlog full) refuses the guest's connection at
/// once: the device never waits for it, so the VM's other connections go on.
#[test]
fn a_host_listener_with_a_full_backlog_does_not_stall_the_device() {
    use std::os::fd::{FromRawFd, OwnedFd};
    let dir = TempDir::new("vsock-backlog");
    let uds = dir.path().join("bl.vsock");
    let path = std::ffi::CString::new(format!("{}_5555", uds.display())).unwrap();
    // SAFETY: plain socket calls on a descriptor this test owns; the address lives for the calls.
    let listener = unsafe {
        let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
        assert!(fd >= 0);
        let mut addr: libc::sockaddr_un = std::mem::zeroed();
        addr.sun_family = libc::AF_UNIX as u16;
        for (d, s) in addr.sun_path.iter_mut().zip(path.as_bytes()) {
            *d = *s as libc::c_char;
        }
        let len = std::mem::size_of::<libc::sockaddr_un>() as u32;
        assert_eq!(libc::bind(fd, std::ptr::addr_of!(addr).cast(), len), 0);
        assert_eq!(libc::listen(fd, 0), 0);
        OwnedFd::from_raw_fd(fd)
    };
    // Fill the backlog: connections until one would have to wait.
    let target = std::path::PathBuf::from(path.to_str().unwrap());
    let mut pending = Vec::new();
    loop {
        let s = socket2_nonblocking_connect(&target);
        match s {
            Some(s) => pending.push(s),
            None => break,
        }
        assert!(pending.len() < 64, "the backlog never filled");
    }
    let sock = dir.path().join("vm.sock").display().to_string();
    let vsock = format!("cid=3,uds={}", uds.display());
    let mut vm = Vmm::testguest("workload=vsock vsock.connect=5555", &["--vsock", &vsock, "--api-sock", &sock]);
    vm.wait_for("testguest: vsock ready", T);
    std::thread::sleep(Duration::from_millis(500));
    let (mut conn, _) = connect(uds.to_str().unwrap(), ECHO_PORT);
    echo_round_trip(&mut conn, b"the device is not stuck\n");
    assert!(vm.lines_with("connect-back ok").is_empty());
    vm.kill();
    drop((listener, pending));
}

/// A non-blocking connection to a Unix socket: None when the listener's backlog is full.
fn socket2_nonblocking_connect(path: &Path) -> Option<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    let cpath = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: plain socket calls on a descriptor this function owns; the address lives for them.
    unsafe {
        let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_NONBLOCK, 0);
        assert!(fd >= 0);
        let owned = std::os::fd::OwnedFd::from_raw_fd(fd);
        let mut addr: libc::sockaddr_un = std::mem::zeroed();
        addr.sun_family = libc::AF_UNIX as u16;
        for (d, s) in addr.sun_path.iter_mut().zip(cpath.as_bytes()) {
            *d = *s as libc::c_char;
        }
        let len = std::mem::size_of::<libc::sockaddr_un>() as u32;
        (libc::connect(fd, std::ptr::addr_of!(addr).cast(), len) == 0).then_some(owned)
    }
}
