//! Live migration (`vmm migrate` → `vmm receive`) of the test guest verifying its memory as it
//! runs: back and forth, over TLS with certificates on both sides, and when things go wrong —
//! a cut link, a corrupted frame, a dead or refusing destination, a stopped source, a guest that
//! dirties faster than the link — exactly one side runs the guest afterwards, and it verifies.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tests::{field, vmm_cmd, vmm_ok, TempDir, Vmm};

const T: Duration = Duration::from_secs(60);
const WORKLOAD: &str = "workload=mem mem.size=32M tick.ms=250";

fn sock(dir: &TempDir, name: &str) -> String {
    dir.path().join(format!("{name}.sock")).display().to_string()
}

fn boot(dir: &TempDir, name: &str, cmdline: &str) -> Vmm {
    let s = sock(dir, name);
    let mut vm = Vmm::testguest(cmdline, &["--vcpus", "2", "--mem", "256M", "--name", name, "--api-sock", &s]);
    vm.wait_for("testguest: ready", T);
    vm.wait_for("testguest: tick", T);
    vm
}

/// Per-CPU tick counters of a tick line.
fn counters(line: &str) -> Vec<u64> {
    (0..2).map(|c| field(line, &format!("cpu{c}")).unwrap_or_else(|| panic!("no cpu{c} in {line}"))).collect()
}

/// Every vCPU of the guest makes progress (verified passes over its memory) on `vm`.
fn assert_progress(vm: &mut Vmm, what: &str) {
    let first = vm.wait_for("testguest: tick", T);
    let deadline = Instant::now() + T;
    loop {
        let line = vm.wait_for("testguest: tick", T);
        if counters(&line).iter().zip(counters(&first)).all(|(a, b)| *a > b) {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: no progress from {first} to {line}");
    }
}

fn state_of(sock: &str) -> String {
    let (status, out, err) = vmm_cmd(&["status", "--api-sock", sock]);
    assert!(status.success(), "status of {sock}: {err}");
    out
}

/// `vmm receive` on `listen`, as VM `name` with control socket `sock`.
fn receive(listen: &str, name: &str, sock: &str, extra: &[&str]) -> Vmm {
    let mut args = vec!["receive", "--listen", listen, "--name", name, "--api-sock", sock];
    args.extend_from_slice(extra);
    Vmm::spawn(&args)
}

/// Waits until `path` exists (a receiver's listening socket).
fn wait_path(path: &Path) {
    let deadline = Instant::now() + T;
    while !path.exists() {
        assert!(Instant::now() < deadline, "{} never appeared", path.display());
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits until the VM on `sock` is sending memory (8 MiB or more) to its destination.
fn wait_copying(sock: &str) {
    let deadline = Instant::now() + T;
    loop {
        let out = state_of(sock);
        let copied = out
            .split_whitespace()
            .skip_while(|w| !w.starts_with("migration=copying-memory"))
            .nth(1)
            .and_then(|w| w.split('/').next()?.parse::<u64>().ok());
        if copied.is_some_and(|mib| mib >= 8) {
            return;
        }
        assert!(Instant::now() < deadline, "the migration never got to copying memory: {out}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn migrate(src_sock: &str, to: &str, extra: &[&str]) -> (std::process::ExitStatus, String, String) {
    let mut args = vec!["migrate", "--api-sock", src_sock, "--to", to];
    args.extend_from_slice(extra);
    vmm_cmd(&args)
}

/// The guest moves from one vmm to another and back, ten times, over Unix sockets; it keeps
/// verifying its memory throughout and never reboots; each source ends once it handed over.
#[test]
fn a_vm_migrates_back_and_forth_ten_times_and_keeps_verifying() {
    let dir = TempDir::new("mig-10");
    let mut vm = boot(&dir, "m0", WORKLOAD);
    let mut name = "m0".to_string();
    for i in 1..=10 {
        let next = format!("m{i}");
        let listen = dir.path().join(format!("in{i}.sock"));
        let mut dst = receive(&format!("unix:{}", listen.display()), &next, &sock(&dir, &next), &[]);
        wait_path(&listen);
        let (status, out, err) = migrate(&sock(&dir, &name), &format!("unix:{}", listen.display()), &[]);
        assert!(status.success(), "migration {i} failed: {err}");
        assert!(out.contains("migrated to") && out.contains("downtime"), "{out}");
        let (status, _, stderr) = vm.wait_exit(T);
        assert_eq!(status.code(), Some(0), "the source of migration {i} did not end cleanly: {stderr}");
        assert_progress(&mut dst, &format!("after migration {i}"));
        assert!(dst.lines_with("testguest: ready").is_empty(), "the guest rebooted: {:?}", dst.seen);
        assert!(!listen.exists(), "the receiver left its listening socket");
        vm = dst;
        name = next;
    }
    vm.kill();
}

/// A CA with certificates for both sides (`openssl`, as docs/migration.md shows), valid for
/// 127.0.0.1.
fn make_certs(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let run = |args: &[&str]| {
        let out = Command::new("openssl").args(args).current_dir(dir).output().expect("openssl runs");
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    run(&[&["req", "-x509"][..], &ec, &["-days", "2", "-subj", "/CN=test CA", "-keyout", "ca.key", "-out", "ca.pem"]]
        .concat());
    std::fs::write(dir.join("san.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    for side in ["src", "dst"] {
        let (key, csr, pem) = (format!("{side}.key"), format!("{side}.csr"), format!("{side}.pem"));
        run(&[&["req"][..], &ec, &["-subj", &format!("/CN={side}"), "-keyout", &key, "-out", &csr]].concat());
        run(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "san.ext",
            "-out",
            &pem,
        ]);
    }
}

fn tls_args(dir: &Path, side: &str) -> Vec<String> {
    let p = |f: String| dir.join(f).display().to_string();
    vec![
        "--tls-cert".into(),
        p(format!("{side}.pem")),
        "--tls-key".into(),
        p(format!("{side}.key")),
        "--tls-ca".into(),
        p("ca.pem".into()),
    ]
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Over TCP, both sides prove themselves with a certificate of the CA: a source with another
/// CA's certificate, or none (`--insecure`), is turned away before any VM data moves (and keeps
/// its guest); the receiver waits on for a good one, which migrates.
#[test]
fn tcp_migration_needs_certificates_of_one_ca_on_both_sides() {
    let dir = TempDir::new("mig-tls");
    let (good, evil) = (dir.path().join("good"), dir.path().join("evil"));
    make_certs(&good);
    make_certs(&evil);
    let mut vm = boot(&dir, "t0", WORKLOAD);
    let port = free_port();
    let to = format!("tcp:127.0.0.1:{port}");
    let dst_tls = tls_args(&good, "dst");
    let extra: Vec<&str> = dst_tls.iter().map(String::as_str).collect();
    let mut dst = receive(&format!("tcp:127.0.0.1:{port}"), "t1", &sock(&dir, "t1"), &extra);
    wait_listening(port);

    let refused: [(Vec<String>, &str); 3] = [
        (tls_args(&evil, "src"), "certificate"),
        (
            {
                // The right CA, but a certificate it did not sign.
                let mut a = tls_args(&evil, "src");
                a[5] = good.join("ca.pem").display().to_string();
                a
            },
            "TLS",
        ),
        (vec!["--insecure".into()], "hung up"),
    ];
    for (args, says) in &refused {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (status, _, err) = migrate(&sock(&dir, "t0"), &to, &args);
        assert_eq!(status.code(), Some(1), "{args:?} was not refused: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
        assert!(state_of(&sock(&dir, "t0")).contains("running"));
    }
    assert_progress(&mut vm, "the source after refused peers");
    let (status, _, err) = migrate(&sock(&dir, "t0"), &to, &[]);
    assert_eq!(status.code(), Some(2), "plain TCP without --insecure: {err}");
    assert!(err.contains("--insecure"), "{err}");

    let src_tls = tls_args(&good, "src");
    let args: Vec<&str> = src_tls.iter().map(String::as_str).collect();
    let (status, out, err) = migrate(&sock(&dir, "t0"), &to, &args);
    assert!(status.success(), "{err}");
    assert!(out.contains(", TLS"), "{out}");
    let (status, _, _) = vm.wait_exit(T);
    assert_eq!(status.code(), Some(0));
    assert_progress(&mut dst, "after the TLS migration");
    vmm_ok(&["shutdown", "--api-sock", &sock(&dir, "t1")]);
    let (_, _, stderr) = dst.wait_exit(T);
    assert_eq!(stderr.matches("refused a connection").count(), 3, "{stderr}");
}

/// Waits until something listens on 127.0.0.1:`port` (without connecting: a connection would
/// be a peer to the receiver).
fn wait_listening(port: u16) {
    let needle = format!(":{port:04X} 00000000:0000 0A");
    let deadline = Instant::now() + T;
    while !std::fs::read_to_string("/proc/net/tcp").unwrap_or_default().contains(&needle) {
        assert!(Instant::now() < deadline, "nothing listens on port {port}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// What a relay between the source and the destination does to the migration.
#[derive(Clone, Copy, Debug)]
enum Fault {
    /// Cut both ways once more than this many bytes would go from the source to the destination.
    CutForward(u64),
    /// Flip a byte of the source's stream at this offset.
    Corrupt(u64),
    /// Cut both ways once more than this many bytes would go back from the destination (its
    /// answers are 20 bytes each: Accept, then Ready, then Committed).
    CutBackward(u64),
}

/// Relays one connection from `listen` to `target`, doing `fault` to it.
fn relay(listen: &Path, target: PathBuf, fault: Fault) -> std::thread::JoinHandle<()> {
    relay_many(listen, target, fault, 1, 0)
}

/// Relays `count` connections from `listen` to `target` (a migration's, in the order the source
/// opens them), doing `fault` to connection number `faulty` and nothing to the others.
fn relay_many(
    listen: &Path,
    target: PathBuf,
    fault: Fault,
    count: usize,
    faulty: usize,
) -> std::thread::JoinHandle<()> {
    let listener = UnixListener::bind(listen).unwrap();
    std::thread::spawn(move || {
        let mut relays = Vec::new();
        for i in 0..count {
            let (from_src, _) = listener.accept().unwrap();
            let to_dst = UnixStream::connect(&target).unwrap();
            let fault = if i == faulty { Some(fault) } else { None };
            relays.push(std::thread::spawn(move || relay_one(from_src, to_dst, fault)));
        }
        for r in relays {
            r.join().unwrap();
        }
    })
}

fn relay_one(from_src: UnixStream, to_dst: UnixStream, fault: Option<Fault>) {
    {
        let cut = Arc::new(AtomicBool::new(false));
        let pump = |mut a: UnixStream, mut b: UnixStream, forward: bool, cut: Arc<AtomicBool>| {
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 64 << 10];
                let mut done = 0u64;
                loop {
                    let n = match a.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    if cut.load(Ordering::SeqCst) {
                        break;
                    }
                    let mut n = n;
                    let limit = match (fault, forward) {
                        (Some(Fault::CutForward(at)), true) | (Some(Fault::CutBackward(at)), false) => Some(at),
                        _ => None,
                    };
                    if let Some(at) = limit {
                        if done + n as u64 > at {
                            n = (at - done) as usize;
                            let _ = b.write_all(&buf[..n]);
                            cut.store(true, Ordering::SeqCst);
                            break;
                        }
                    }
                    if let (Some(Fault::Corrupt(at)), true) = (fault, forward) {
                        if (done..done + n as u64).contains(&at) {
                            buf[(at - done) as usize] ^= 0x40;
                        }
                    }
                    if b.write_all(&buf[..n]).is_err() {
                        break;
                    }
                    done += n as u64;
                }
                if cut.load(Ordering::SeqCst) {
                    let _ = a.shutdown(std::net::Shutdown::Both);
                    let _ = b.shutdown(std::net::Shutdown::Both);
                } else {
                    // One direction ended: the other still delivers what is on its way (a
                    // destination's Refuse as it hangs up).
                    let _ = b.shutdown(std::net::Shutdown::Write);
                    let _ = a.shutdown(std::net::Shutdown::Read);
                }
            })
        };
        let f = pump(from_src.try_clone().unwrap(), to_dst.try_clone().unwrap(), true, cut.clone());
        let b = pump(to_dst, from_src, false, cut);
        let _ = f.join();
        let _ = b.join();
    }
}

/// A link cut in the handshake, in the pre-copy or before the destination said it is ready, a
/// corrupted frame, and a destination that refuses the VM (its name is taken) or is killed:
/// each time `vmm migrate` exits 1 with the reason, the destination discards its partial VM
/// (exit 1, its socket and name free), and the guest runs on at the source, verifying. A
/// migration afterwards still works.
#[test]
fn a_failed_migration_leaves_the_guest_running_at_the_source() {
    let dir = TempDir::new("mig-fail");
    let mut vm = boot(&dir, "f0", WORKLOAD);
    let cases = [
        (Fault::CutForward(300), "the handshake"),
        (Fault::CutForward(40 << 20), "first pass"),
        (Fault::Corrupt(20 << 20), "checksum"),
        (Fault::CutBackward(20), "hand-over"),
    ];
    for (i, (fault, says)) in cases.into_iter().enumerate() {
        let listen = dir.path().join(format!("d{i}.sock"));
        let via = dir.path().join(format!("relay{i}.sock"));
        let dst = receive(&format!("unix:{}", listen.display()), "f1", &sock(&dir, "f1"), &["--timeout", "5s"]);
        wait_path(&listen);
        let relay = relay(&via, listen.clone(), fault);
        let (status, _, err) = migrate(&sock(&dir, "f0"), &format!("unix:{}", via.display()), &[]);
        assert_eq!(status.code(), Some(1), "{fault:?}: {err}");
        assert!(err.contains(says), "{fault:?}: {err}");
        let (status, _, derr) = dst.wait_exit(T);
        assert_eq!(status.code(), Some(1), "{fault:?}: the destination: {derr}");
        assert!(derr.contains("migration from"), "{fault:?}: the destination: {derr}");
        assert!(!Path::new(&sock(&dir, "f1")).exists(), "{fault:?}: the destination left its control socket");
        relay.join().unwrap();
        assert!(state_of(&sock(&dir, "f0")).contains("running"), "{fault:?}");
        assert_progress(&mut vm, &format!("the source after {fault:?}"));
    }

    // A destination that cannot take the VM's name refuses it after the manifest.
    let taken = Vmm::testguest("workload=idle", &["--name", "f1", "--api-sock", &sock(&dir, "f1")]);
    let listen = dir.path().join("dn.sock");
    let dst = receive(&format!("unix:{}", listen.display()), "f1", &sock(&dir, "f1"), &[]);
    wait_path(&listen);
    let (status, _, err) = migrate(&sock(&dir, "f0"), &format!("unix:{}", listen.display()), &[]);
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("refused") && err.contains("f1"), "{err}");
    let (status, _, derr) = dst.wait_exit(T);
    assert_eq!(status.code(), Some(2), "{derr}");
    drop(taken);

    // A destination killed while memory is copied (slowly: 32 MB/s).
    let listen = dir.path().join("dk.sock");
    let mut dst = receive(&format!("unix:{}", listen.display()), "f2", &sock(&dir, "f2"), &[]);
    wait_path(&listen);
    let src = sock(&dir, "f0");
    let to = format!("unix:{}", listen.display());
    let migration = std::thread::spawn(move || migrate(&src, &to, &["--bandwidth", "32M"]));
    wait_copying(&sock(&dir, "f0"));
    dst.kill();
    let (status, _, err) = migration.join().unwrap();
    assert_eq!(status.code(), Some(1), "{err}");
    assert_progress(&mut vm, "the source after its destination died");

    let listen = dir.path().join("ok.sock");
    let mut dst = receive(&format!("unix:{}", listen.display()), "f3", &sock(&dir, "f3"), &[]);
    wait_path(&listen);
    let (status, _, err) = migrate(&sock(&dir, "f0"), &format!("unix:{}", listen.display()), &[]);
    assert!(status.success(), "{err}");
    assert_progress(&mut dst, "after the failures");
    let (status, _, _) = vm.wait_exit(T);
    assert_eq!(status.code(), Some(0));
    dst.kill();
}

/// Over several connections (`--connections`), each carrying a share of memory in a stream of its
/// own: a corrupted frame or a cut on one that is not the first fails the migration with the
/// reason, the destination discards, and the guest runs on at the source; then the guest moves
/// over four Unix connections, and back over three TLS ones, compressed, verifying each time. A
/// peer that connects and stays silent, and one that speaks no TLS, hold up nothing.
#[test]
fn a_migration_over_several_connections_moves_the_guest_and_fails_safely() {
    let dir = TempDir::new("mig-conns");
    let mut vm = boot(&dir, "c0", WORKLOAD);
    // Connection 2 of 4 carries every fourth MiB: some 8 MiB of the guest's 32 MiB of data.
    for (i, fault) in [Fault::Corrupt((1 << 20) + 5000), Fault::CutForward(2 << 20)].into_iter().enumerate() {
        let listen = dir.path().join(format!("d{i}.sock"));
        let via = dir.path().join(format!("relay{i}.sock"));
        let dst = receive(&format!("unix:{}", listen.display()), "c9", &sock(&dir, "c9"), &["--timeout", "5s"]);
        wait_path(&listen);
        let relay = relay_many(&via, listen.clone(), fault, 4, 2);
        let to = format!("unix:{}", via.display());
        let (status, _, err) = migrate(&sock(&dir, "c0"), &to, &["--connections", "4"]);
        assert_eq!(status.code(), Some(1), "{fault:?}: {err}");
        assert!(err.contains("connection 2"), "{fault:?}: {err}");
        let (status, _, derr) = dst.wait_exit(T);
        assert_eq!(status.code(), Some(1), "{fault:?}: the destination: {derr}");
        assert!(derr.contains("migration from"), "{fault:?}: the destination: {derr}");
        relay.join().unwrap();
        assert!(state_of(&sock(&dir, "c0")).contains("running"), "{fault:?}");
        assert_progress(&mut vm, &format!("the source after {fault:?}"));
    }

    // Cancelled mid-copy: the destination hears why on the first connection, whatever the
    // others show as the source cuts them.
    let listen = dir.path().join("cancel.sock");
    let dst = receive(&format!("unix:{}", listen.display()), "c9", &sock(&dir, "c9"), &[]);
    wait_path(&listen);
    let (src, to) = (sock(&dir, "c0"), format!("unix:{}", listen.display()));
    let migration = std::thread::spawn(move || migrate(&src, &to, &["--connections", "4", "--bandwidth", "16M"]));
    wait_copying(&sock(&dir, "c0"));
    vmm_ok(&["migrate", "--api-sock", &sock(&dir, "c0"), "--cancel"]);
    let (status, _, err) = migration.join().unwrap();
    assert_ne!(status.code(), Some(0), "{err}");
    let (status, _, derr) = dst.wait_exit(T);
    assert_eq!(status.code(), Some(1), "{derr}");
    assert!(derr.contains("cancelled at the source"), "the destination did not hear why: {derr}");
    assert_progress(&mut vm, "the source after a cancel");

    let listen = dir.path().join("ok.sock");
    let mut dst = receive(&format!("unix:{}", listen.display()), "c1", &sock(&dir, "c1"), &[]);
    wait_path(&listen);
    let (status, out, err) = migrate(&sock(&dir, "c0"), &format!("unix:{}", listen.display()), &["--connections", "4"]);
    assert!(status.success(), "{err}");
    assert!(out.contains("4 connections"), "{out}");
    let (status, _, _) = vm.wait_exit(T);
    assert_eq!(status.code(), Some(0));
    assert_progress(&mut dst, "after four connections");

    let certs = dir.path().join("certs");
    make_certs(&certs);
    let port = free_port();
    let dst_tls = tls_args(&certs, "dst");
    let extra: Vec<&str> = dst_tls.iter().map(String::as_str).collect();
    let mut back = receive(&format!("tcp:127.0.0.1:{port}"), "c2", &sock(&dir, "c2"), &extra);
    wait_listening(port);
    let silent = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut garbage = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    garbage.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    let mut args = tls_args(&certs, "src");
    args.extend(["--connections", "3", "--compress"].map(String::from));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let started = Instant::now();
    let (status, out, err) = migrate(&sock(&dir, "c1"), &format!("tcp:127.0.0.1:{port}"), &args);
    assert!(status.success(), "{err}");
    assert!(out.contains("3 connections") && out.contains(", TLS"), "{out}");
    // The receiver's --timeout is 30 s: the silent peer did not hold it up.
    assert!(started.elapsed() < Duration::from_secs(20), "took {:?}", started.elapsed());
    let (status, _, _) = dst.wait_exit(T);
    assert_eq!(status.code(), Some(0));
    assert_progress(&mut back, "back over three TLS connections");
    vmm_ok(&["shutdown", "--api-sock", &sock(&dir, "c2")]);
    let (_, _, stderr) = back.wait_exit(T);
    assert!(stderr.contains("refused a connection"), "the peer without TLS was not turned away: {stderr}");
    drop(silent);
}

/// The destination checks what the guest needs of the CPU from the manifest, before any memory
/// comes: a guest whose state carries an MSR this host's KVM cannot restore is refused (and the
/// receiver exits 1), as is a peer that speaks another version of the protocol (the receiver
/// waits on for a good one).
#[test]
fn the_destination_refuses_a_guest_its_cpu_cannot_run_before_any_memory() {
    use snapshot::migration::{Message, PROTOCOL_VERSION};
    let dir = TempDir::new("mig-cpu");
    let vm = boot(&dir, "u0", "workload=idle");
    let snap = dir.path().join("snap");
    tests::snapshot(&sock(&dir, "u0"), &snap, &[]);
    let bytes = std::fs::read(snap.join(snapshot::MANIFEST_FILE)).unwrap();
    let mut manifest = snapshot::Manifest::decode(&bytes, "snap").unwrap().manifest;
    manifest.state = snapshot::StateDigest::default();
    manifest.memory.extents.clear();
    manifest.memory.chunk_checksums.clear();
    manifest.guest_cpu = Some(snapshot::GuestCpu { feature_words: vec![0; 5], msrs: vec![0x10, 0xdead_beef] });
    drop(vm);

    let listen = dir.path().join("d.sock");
    let dst = receive(&format!("unix:{}", listen.display()), "u1", &sock(&dir, "u1"), &[]);
    wait_path(&listen);
    // Another protocol version: turned away, the receiver waits on.
    let mut old = UnixStream::connect(&listen).unwrap();
    Message::Hello { version: PROTOCOL_VERSION + 1, session: 1, lane: 0, lanes: 1 }.send(&mut old).unwrap();
    match Message::receive(&mut old) {
        Ok(Message::Refuse(why)) => assert!(why.contains("protocol"), "{why}"),
        other => panic!("another protocol version: {other:?}"),
    }
    let mut conn = UnixStream::connect(&listen).unwrap();
    Message::Hello { version: PROTOCOL_VERSION, session: 2, lane: 0, lanes: 1 }.send(&mut conn).unwrap();
    let mut stream = snapshot::stream::StreamWriter::new(&mut conn, false).unwrap();
    stream.manifest(&manifest.encode()).unwrap();
    stream.flush().unwrap();
    drop(stream);
    match Message::receive(&mut conn) {
        Ok(Message::Refuse(why)) => assert!(why.contains("MSR") && why.contains("0xdeadbeef"), "{why}"),
        other => panic!("a guest needing an unknown MSR: {other:?}"),
    }
    let (status, _, stderr) = dst.wait_exit(T);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("protocol") && stderr.contains("0xdeadbeef"), "{stderr}");
    assert!(!Path::new(&sock(&dir, "u1")).exists(), "the destination left its control socket");
}

/// A VM that checkpoints every 100 ms migrates three times (a checkpoint under way is waited
/// for: the migration is never refused as busy), and each destination goes on checkpointing
/// into its own `--checkpoint-dir`, whose newest checkpoint verifies.
#[test]
fn periodic_checkpoints_go_on_across_migrations() {
    let dir = TempDir::new("mig-ck");
    let ck = |i: usize| {
        let d = dir.path().join(format!("ck{i}"));
        std::fs::create_dir_all(&d).unwrap();
        d.display().to_string()
    };
    let every = ["--checkpoint-every", "100ms"];
    let ck0 = ck(0);
    let mut vm = Vmm::testguest(
        WORKLOAD,
        &[
            "--vcpus",
            "2",
            "--mem",
            "256M",
            "--name",
            "p0",
            "--api-sock",
            &sock(&dir, "p0"),
            "--checkpoint-dir",
            &ck0,
            every[0],
            every[1],
        ],
    );
    vm.wait_for("testguest: tick", T);
    for i in 1..=3 {
        let (from, to) = (format!("p{}", i - 1), format!("p{i}"));
        let listen = dir.path().join(format!("in{i}.sock"));
        let cki = ck(i);
        let mut dst = receive(
            &format!("unix:{}", listen.display()),
            &to,
            &sock(&dir, &to),
            &["--checkpoint-dir", &cki, every[0], every[1]],
        );
        wait_path(&listen);
        let (status, _, err) = migrate(&sock(&dir, &from), &format!("unix:{}", listen.display()), &[]);
        assert!(status.success(), "migration {i}: {err}");
        let _ = vm.wait_exit(T);
        assert_progress(&mut dst, &format!("after migration {i}"));
        let latest = Path::new(&cki).join("latest");
        let deadline = Instant::now() + T;
        while std::fs::read_link(&latest).is_err() {
            assert!(Instant::now() < deadline, "destination {i} never checkpointed");
            std::thread::sleep(Duration::from_millis(20));
        }
        vm = dst;
    }
    vm.kill();
    // Each VM's checkpoints, once it no longer writes them.
    for i in 0..=3 {
        vmm_ok(&["verify", dir.path().join(format!("ck{i}/latest")).to_str().unwrap()]);
    }
}

/// The destination's confirmation that it took over is lost: it runs the guest; the source,
/// which cannot know, keeps it paused (never both running) and says so.
#[test]
fn a_lost_confirmation_leaves_only_the_destination_running() {
    let dir = TempDir::new("mig-lost");
    let mut vm = boot(&dir, "l0", WORKLOAD);
    let listen = dir.path().join("d.sock");
    let via = dir.path().join("relay.sock");
    let mut dst = receive(&format!("unix:{}", listen.display()), "l1", &sock(&dir, "l1"), &[]);
    wait_path(&listen);
    // Accept and Ready pass; Committed does not.
    let relay = relay(&via, listen.clone(), Fault::CutBackward(40));
    let (status, _, err) = migrate(&sock(&dir, "l0"), &format!("unix:{}", via.display()), &[]);
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("did not confirm") && err.contains("stays paused"), "{err}");
    relay.join().unwrap();
    assert_progress(&mut dst, "the destination");
    assert!(state_of(&sock(&dir, "l0")).contains("paused"), "the source runs too");
    // Lines printed before the pause may still be on their way.
    let _ = vm.lines_for(Duration::from_millis(100));
    let lines = vm.lines_for(Duration::from_millis(800));
    assert!(lines.iter().all(|l| !l.contains("tick")), "the source guest made progress: {lines:?}");

    // Migrated on, the paused source stays a paused guest: never a second one running.
    let listen = dir.path().join("again.sock");
    let mut again = receive(&format!("unix:{}", listen.display()), "l2", &sock(&dir, "l2"), &[]);
    wait_path(&listen);
    let (status, _, err) = migrate(&sock(&dir, "l0"), &format!("unix:{}", listen.display()), &[]);
    assert!(status.success(), "{err}");
    let _ = vm.wait_exit(T);
    assert!(state_of(&sock(&dir, "l2")).contains("paused"), "a paused guest arrived running");
    vmm_ok(&["continue", "--api-sock", &sock(&dir, "l2")]);
    assert_progress(&mut again, "the paused guest, continued");
    again.kill();
    dst.kill();
}

/// A source stopped (SIGSTOP) in the middle of the copy: the receiver gives up within its
/// --timeout and lets go of the VM's name; once the source continues, its migration fails and
/// the guest runs on there; the name can receive again.
#[test]
fn a_stopped_source_makes_the_receiver_give_up_in_time() {
    let dir = TempDir::new("mig-stop");
    let mut vm = boot(&dir, "s0", WORKLOAD);
    let listen = dir.path().join("d.sock");
    let dst = receive(&format!("unix:{}", listen.display()), "s1", &sock(&dir, "s1"), &["--timeout", "2s"]);
    wait_path(&listen);
    let src = sock(&dir, "s0");
    let to = format!("unix:{}", listen.display());
    let migration = std::thread::spawn(move || migrate(&src, &to, &["--bandwidth", "32M"]));
    wait_copying(&sock(&dir, "s0"));
    // Both sides answer `status` meanwhile.
    let dst_state = state_of(&sock(&dir, "s1"));
    assert!(dst_state.starts_with("s1 receiving vcpus=2 mem=256MiB"), "{dst_state}");
    let pid = vm.pid() as i32;
    // SAFETY: signalling a child process this test started.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let stopped = Instant::now();
    let (status, _, derr) = dst.wait_exit(T);
    let waited = stopped.elapsed();
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    assert_eq!(status.code(), Some(1), "{derr}");
    assert!(derr.contains("sent nothing for 2s"), "{derr}");
    assert!(waited < Duration::from_secs(10), "the receiver waited {waited:?}");
    let (status, _, err) = migration.join().unwrap();
    assert_eq!(status.code(), Some(1), "{err}");
    assert_progress(&mut vm, "the source after SIGCONT");

    // A receiver told to stop (SIGTERM) while the VM arrives: it discards it and leaves neither
    // its listening socket nor the VM's control socket behind; the source runs on.
    let dst = receive(&format!("unix:{}", listen.display()), "s1", &sock(&dir, "s1"), &[]);
    wait_path(&listen);
    let src = sock(&dir, "s0");
    let to = format!("unix:{}", listen.display());
    let migration = std::thread::spawn(move || migrate(&src, &to, &["--bandwidth", "32M"]));
    wait_copying(&sock(&dir, "s0"));
    // SAFETY: signalling a child process this test started.
    unsafe { libc::kill(dst.pid() as i32, libc::SIGTERM) };
    let (status, _, derr) = dst.wait_exit(T);
    assert_eq!(status.code(), Some(1), "{derr}");
    assert!(derr.contains("interrupted"), "{derr}");
    assert!(!Path::new(&sock(&dir, "s1")).exists(), "the receiver left the VM's control socket");
    assert!(!listen.exists(), "the receiver left its listening socket");
    let (status, _, err) = migration.join().unwrap();
    assert_eq!(status.code(), Some(1), "{err}");
    assert_progress(&mut vm, "the source after its receiver was stopped");

    let mut dst = receive(&format!("unix:{}", listen.display()), "s1", &sock(&dir, "s1"), &[]);
    wait_path(&listen);
    let (status, _, err) = migrate(&sock(&dir, "s0"), &format!("unix:{}", listen.display()), &[]);
    assert!(status.success(), "{err}");
    assert_progress(&mut dst, "after the second migration");
    dst.kill();
    vm.kill();
}

/// A guest dirtying memory as fast as it can, over a link capped at 64 MB/s: the rounds do not
/// converge by themselves, so the guest is throttled until they do; with `--over-budget
/// abandon` and no rounds to spare, the migration is abandoned and the guest runs on.
#[test]
fn a_guest_dirtying_faster_than_the_link_is_throttled_or_the_migration_abandoned() {
    let dir = TempDir::new("mig-dirty");
    let mut vm = boot(&dir, "d0", "workload=mem mem.size=32M mem.rate=0 tick.ms=250");
    let listen = dir.path().join("a.sock");
    let dst = receive(&format!("unix:{}", listen.display()), "d1", &sock(&dir, "d1"), &[]);
    wait_path(&listen);
    let args = ["--bandwidth", "64M", "--max-rounds", "0", "--over-budget", "abandon"];
    let (status, _, err) = migrate(&sock(&dir, "d0"), &format!("unix:{}", listen.display()), &args);
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("abandoned"), "{err}");
    let (status, _, derr) = dst.wait_exit(T);
    assert_eq!(status.code(), Some(1));
    assert!(derr.contains("abandoned"), "the receiver did not learn why: {derr}");
    assert_progress(&mut vm, "the source after an abandoned migration");

    let listen = dir.path().join("b.sock");
    let mut dst = receive(&format!("unix:{}", listen.display()), "d1", &sock(&dir, "d1"), &[]);
    wait_path(&listen);
    let (status, out, err) = migrate(&sock(&dir, "d0"), &format!("unix:{}", listen.display()), &["--bandwidth", "64M"]);
    assert!(status.success(), "{err}");
    assert!(out.contains("throttled up to"), "{out}");
    assert_progress(&mut dst, "after the throttled migration");
    dst.kill();
}

/// Arguments that cannot work get one line and exit 2; a destination nobody listens on, 1.
#[test]
fn bad_migration_arguments_are_refused() {
    let dir = TempDir::new("mig-args");
    let vm = boot(&dir, "b0", "workload=idle");
    let s = sock(&dir, "b0");
    let nowhere = format!("unix:{}", dir.path().join("nobody.sock").display());
    let cases: &[(&[&str], i32, &str)] = &[
        (&["migrate", "--api-sock", &s, "--to", "127.0.0.1:4000"], 2, "tcp:HOST:PORT or unix:PATH"),
        (&["migrate", "--api-sock", &s, "--to", "tcp:127.0.0.1:4000"], 2, "--insecure"),
        (&["migrate", "--api-sock", &s, "--to", &nowhere, "--insecure"], 2, "permissions"),
        (&["migrate", "--api-sock", &s, "--to", "tcp:127.0.0.1:1", "--tls-cert", "/nonexistent"], 2, "tls-key"),
        (
            &[
                "migrate",
                "--api-sock",
                &s,
                "--to",
                "tcp:127.0.0.1:1",
                "--tls-cert",
                "/nonexistent",
                "--tls-key",
                "/x",
                "--tls-ca",
                "/y",
            ],
            2,
            "/nonexistent",
        ),
        (&["migrate", "--api-sock", &s, "--to", &nowhere], 1, "cannot connect"),
        (&["migrate", "--api-sock", &s, "--to", &nowhere, "--max-downtime", "soon"], 2, "max-downtime"),
        (&["migrate", "--api-sock", &s, "--to", &nowhere, "--connections", "0"], 2, "--connections"),
        (&["migrate", "--api-sock", &s, "--to", &nowhere, "--connections", "17"], 2, "--connections"),
        (&["receive", "--listen", "tcp:127.0.0.1:0"], 2, "--insecure"),
        (&["receive", "--listen", "nowhere"], 2, "--listen"),
        (&["receive", "--listen", &nowhere, "--net", "tap=vmmnotap0"], 2, "does not exist"),
        (&["receive", "--listen", &nowhere, "--disk", "/nonexistent/dir/x.img"], 2, "no directory"),
        (
            &["receive", "--listen", &nowhere, "--checkpoint-dir", "/etc/hostname", "--checkpoint-every", "1s"],
            2,
            "not a directory",
        ),
        (&["receive", "--listen", &format!("unix:{s}")], 1, "cannot listen"),
        (&["migrate", "--api-sock", &s, "--cancel"], 2, "no snapshot or migration"),
    ];
    for (args, code, says) in cases {
        let (status, _, err) = vmm_cmd(args);
        assert_eq!(status.code(), Some(*code), "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: not one line: {err}");
    }
    assert!(state_of(&s).contains("running"));
    drop(vm);
}

/// A migration that failed after sending memory took nothing from the record diff snapshots are
/// made of: the next diff is exact.
#[test]
fn a_diff_after_a_failed_migration_is_exact() {
    let dir = TempDir::new("mig-diff");
    let s = sock(&dir, "x0");
    let mut vm = Vmm::testguest(WORKLOAD, &["--vcpus", "2", "--mem", "128M", "--name", "x0", "--api-sock", &s]);
    vm.wait_for("testguest: tick", T);
    let s0 = dir.path().join("s0");
    vmm_ok(&["snapshot", "--api-sock", &s, "--out", s0.to_str().unwrap()]);
    vm.wait_for("testguest: tick", T);
    let listen = dir.path().join("d.sock");
    let via = dir.path().join("relay.sock");
    let dst = receive(&format!("unix:{}", listen.display()), "x1", &sock(&dir, "x1"), &[]);
    wait_path(&listen);
    let relay = relay(&via, listen.clone(), Fault::CutForward(40 << 20));
    let (status, _, err) = migrate(&s, &format!("unix:{}", via.display()), &[]);
    assert_eq!(status.code(), Some(1), "{err}");
    relay.join().unwrap();
    let _ = dst.wait_exit(T);
    vm.wait_for("testguest: tick", T);
    vmm_ok(&["pause", "--api-sock", &s]);
    let d1 = dir.path().join("d1");
    vmm_ok(&["snapshot", "--api-sock", &s, "--out", d1.to_str().unwrap(), "--diff"]);
    let full = dir.path().join("full");
    vmm_ok(&["snapshot", "--api-sock", &s, "--out", full.to_str().unwrap()]);
    vm.kill();
    let merged = dir.path().join("merged");
    vmm_ok(&["merge", d1.to_str().unwrap(), "--out", merged.to_str().unwrap()]);
    let (a, b) =
        (std::fs::read(merged.join("memory.pages")).unwrap(), std::fs::read(full.join("memory.pages")).unwrap());
    assert_eq!(a.len(), b.len());
    assert!(a == b, "the diff after a failed migration misses pages");
}

/// With `--copy-disks`, the guest's disk travels with it while the guest keeps rewriting and
/// verifying it: the destination runs on its own copy (in its state directory, or the `--disk`
/// it was given), which holds the data the guest never touched and stays sparse.
#[test]
fn disks_travel_with_copy_disks_while_the_guest_writes_them() {
    use std::os::unix::fs::{FileExt, MetadataExt};
    const DISK_BYTES: u64 = 64 << 20;
    const PATTERN_AT: u64 = 48 << 20;
    let pattern: Vec<u8> = (0..1u32 << 20).map(|i| (i * 13 % 251) as u8).collect();
    let dir = TempDir::new("mig-disk");
    let disk = dir.path().join("disk.img");
    let f = std::fs::File::create(&disk).unwrap();
    f.set_len(DISK_BYTES).unwrap();
    f.write_all_at(&pattern, PATTERN_AT).unwrap();
    drop(f);
    let check = |path: &Path| {
        let f = std::fs::File::open(path).unwrap();
        assert_eq!(f.metadata().unwrap().len(), DISK_BYTES, "{}", path.display());
        let mut got = vec![0u8; 1 << 20];
        f.read_exact_at(&mut got, PATTERN_AT).unwrap();
        assert!(got == pattern, "{}: the data beyond the guest's writes did not travel", path.display());
        assert!(f.metadata().unwrap().blocks() * 512 < DISK_BYTES / 2, "{} is not sparse", path.display());
    };
    let disk_rounds = |vm: &mut Vmm, what: &str| {
        let first = field(&vm.wait_for("testguest: tick", T), "cpu0").unwrap();
        let mut last = first;
        for _ in 0..3 {
            last = field(&vm.wait_for("testguest: tick", T), "cpu0").unwrap();
        }
        assert!(last > first, "{what}: no disk rounds");
    };
    let s0 = sock(&dir, "k0");
    let mut vm = Vmm::testguest(
        "workload=disk disk.rounds=0 disk.sectors=8192 tick.ms=100",
        &["--mem", "256M", "--disk", disk.to_str().unwrap(), "--name", "k0", "--api-sock", &s0],
    );
    disk_rounds(&mut vm, "before");

    // Shared storage (the default): the destination opens the same file once the source let go.
    let listen = dir.path().join("s.sock");
    let mut shared = receive(&format!("unix:{}", listen.display()), "ks", &sock(&dir, "ks"), &[]);
    wait_path(&listen);
    let (status, out, err) = migrate(&s0, &format!("unix:{}", listen.display()), &[]);
    assert!(status.success(), "{err}");
    assert!(!out.contains("MiB disk"), "{out}");
    let _ = vm.wait_exit(T);
    disk_rounds(&mut shared, "after the shared-storage migration");
    vm = shared;

    // A --copy-disks migration cut while the disk is on its way: the destination removes the
    // file it created for it, and the guest runs on at the source.
    let listen = dir.path().join("f.sock");
    let via = dir.path().join("f-relay.sock");
    let failed = receive(&format!("unix:{}", listen.display()), "kf", &sock(&dir, "kf"), &["--timeout", "5s"]);
    wait_path(&listen);
    let relay = relay(&via, listen.clone(), Fault::CutForward(24 << 20));
    let (status, _, err) = migrate(&sock(&dir, "ks"), &format!("unix:{}", via.display()), &["--copy-disks"]);
    assert_eq!(status.code(), Some(1), "{err}");
    let (status, _, derr) = failed.wait_exit(T);
    assert_eq!(status.code(), Some(1), "{derr}");
    relay.join().unwrap();
    let partial = tests::test_state_dir().join("vmm").join("kf").join("disk0.img");
    assert!(!partial.exists(), "a failed migration left {}", partial.display());
    disk_rounds(&mut vm, "the source after the failed --copy-disks migration");

    // A destination disk another VM of this host (not the source) runs on: refused before the
    // hand-over, never waited for; the guest runs on at the source.
    let other = dir.path().join("other.img");
    std::fs::File::create(&other).unwrap().set_len(DISK_BYTES).unwrap();
    let holder = Vmm::testguest(
        "workload=idle",
        &["--mem", "64M", "--disk", other.to_str().unwrap(), "--name", "kz", "--api-sock", &sock(&dir, "kz")],
    );
    let listen = dir.path().join("z.sock");
    let busy =
        receive(&format!("unix:{}", listen.display()), "kb", &sock(&dir, "kb"), &["--disk", other.to_str().unwrap()]);
    wait_path(&listen);
    let (status, _, err) = migrate(&sock(&dir, "ks"), &format!("unix:{}", listen.display()), &[]);
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("in use"), "{err}");
    let (status, _, derr) = busy.wait_exit(T);
    assert_eq!(status.code(), Some(1), "{derr}");
    disk_rounds(&mut vm, "the source after a destination disk held by another VM");
    drop(holder);

    // To the destination's state directory.
    let listen = dir.path().join("a.sock");
    let mut dst = receive(&format!("unix:{}", listen.display()), "k1", &sock(&dir, "k1"), &[]);
    wait_path(&listen);
    let (status, out, err) = migrate(&sock(&dir, "ks"), &format!("unix:{}", listen.display()), &["--copy-disks"]);
    assert!(status.success(), "{err}");
    assert!(out.contains("MiB disk"), "{out}");
    let _ = vm.wait_exit(T);
    disk_rounds(&mut dst, "after the first migration");
    let copy = tests::test_state_dir().join("vmm").join("k1").join("disk0.img");
    check(&copy);

    // And on to a file of the user's.
    let mine = dir.path().join("mine.img");
    let listen = dir.path().join("b.sock");
    let mut back =
        receive(&format!("unix:{}", listen.display()), "k2", &sock(&dir, "k2"), &["--disk", mine.to_str().unwrap()]);
    wait_path(&listen);
    let (status, _, err) = migrate(&sock(&dir, "k1"), &format!("unix:{}", listen.display()), &["--copy-disks"]);
    assert!(status.success(), "{err}");
    let _ = dst.wait_exit(T);
    disk_rounds(&mut back, "after the second migration");
    check(&mine);
    back.kill();
}
