//! virtio-net on a host TAP, with the test guest's network services (ARP, ICMP echo, UDP echo,
//! and a sequenced UDP service that answers each request number exactly once), in a private
//! network namespace per test: a bridge at 10.0.0.1 and TAP ports.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tests::netns::{self, udp_socket, SeqClient, GUEST_IP};
use tests::{bound, vmm_cmd, vmm_ok, TempDir, Vmm};

const T: Duration = Duration::from_secs(60);
const ECHO_PORT: u16 = 7;

fn boot(dir: &TempDir, name: &str, tap: &str) -> (Vmm, String, String) {
    boot_with(dir, name, tap, &[])
}

fn boot_with(dir: &TempDir, name: &str, tap: &str, extra: &[&str]) -> (Vmm, String, String) {
    let sock = dir.path().join(format!("{name}.sock")).display().to_string();
    let net = format!("tap={tap}");
    let cmdline = format!("workload=net net.ip={GUEST_IP}");
    let mut args = vec!["--net", &net, "--name", name, "--api-sock", &sock];
    args.extend_from_slice(extra);
    let mut vm = Vmm::testguest(&cmdline, &args);
    let ready = vm.wait_for("testguest: net ready", T);
    let mac =
        ready.split_whitespace().find_map(|w| w.strip_prefix("mac=")).expect("mac= in the ready line").to_string();
    (vm, sock, mac)
}

#[test]
fn guest_answers_arp_ping_and_udp() {
    netns::private_network(&["tap0"]);
    let dir = TempDir::new("net-basic");
    let (mut vm, _sock, mac) = boot(&dir, "net-basic", "tap0");
    assert!(netns::ping(GUEST_IP, 3, 5), "no ping replies from the guest\n{}", vm.seen.join("\n"));
    // The guest answered ARP for its address (ping needed it), from the MAC it reported.
    let neigh = netns::ip(&["neigh", "show", GUEST_IP]);
    assert!(neigh.contains(&mac), "ARP entry for the guest: {neigh:?}, expected {mac}");

    let sock = udp_socket();
    for size in [1usize, 100, 1400, 1472] {
        let payload: Vec<u8> = (0..size).map(|i| (i * 7 + size) as u8).collect();
        let mut buf = vec![0u8; 2048];
        let mut echoed = None;
        for _ in 0..10 {
            sock.send_to(&payload, (GUEST_IP, ECHO_PORT)).unwrap();
            if let Ok(n) = sock.recv(&mut buf) {
                echoed = Some(buf[..n].to_vec());
                break;
            }
        }
        assert_eq!(echoed.as_deref(), Some(&payload[..]), "UDP echo of {size} bytes");
    }
    let (client, handle) = SeqClient::start();
    client.wait_for(500, T, "sequenced service");
    client.finish(handle);
    vm.kill();
}

/// The guest is paused, snapshotted and killed in the middle of a request stream, then resumed
/// on the same TAP: every request number is answered exactly once and in order across it, and
/// the guest answers ARP and ping again at once.
#[test]
fn udp_stream_survives_snapshot_kill_resume() {
    netns::private_network(&["tap0"]);
    let dir = TempDir::new("net-resume");
    let (mut vm, sock, _mac) = boot(&dir, "net-a", "tap0");
    let (client, handle) = SeqClient::start();
    client.wait_for(300, T, "before the snapshot");
    vmm_ok(&["pause", "--api-sock", &sock]);
    let snap = dir.path().join("snap");
    vmm_ok(&["snapshot", "--api-sock", &sock, "--out", snap.to_str().unwrap()]);
    let at_snapshot = client.answered.load(Ordering::Relaxed);
    vm.kill();
    // Requests sent meanwhile are lost with the killed VM's TAP queue; the client retransmits.
    std::thread::sleep(Duration::from_millis(300));

    let sock_b = dir.path().join("net-b.sock").display().to_string();
    let mut resumed = Vmm::spawn(&["resume", snap.to_str().unwrap(), "--name", "net-b", "--api-sock", &sock_b]);
    client.wait_for(at_snapshot + 300, T, "after the resume");
    client.finish(handle);
    netns::ip(&["neigh", "flush", "dev", "br0"]);
    assert!(netns::ping(GUEST_IP, 2, 5), "no ping replies after the resume\n{}", resumed.seen.join("\n"));
    let status = vmm_ok(&["status", "--api-sock", &sock_b]);
    assert!(status.contains("running"), "{status}");
    resumed.kill();
}

/// Resumed on another port of the bridge, the guest is announced: the bridge learns its new
/// port before the guest sent anything of its own, and traffic reaches it there. A resume that
/// would give the guest another MAC (its driver read the MAC at boot) is refused first, and
/// announces nothing.
#[test]
fn resume_on_another_tap_is_announced() {
    netns::private_network(&["tap0", "tap1"]);
    let dir = TempDir::new("net-move");
    let (vm, sock, mac) = boot(&dir, "net-move-a", "tap0");
    assert!(netns::ping(GUEST_IP, 1, 5), "no ping replies from the guest");
    assert_eq!(netns::fdb_ports(&mac), ["tap0"], "the bridge learnt the guest on tap0");
    let snap = dir.path().join("snap");
    vmm_ok(&["snapshot", "--api-sock", &sock, "--out", snap.to_str().unwrap(), "--stop"]);
    let _ = vm.wait_exit(T);

    let (status, _, err) =
        vmm_cmd(&["resume", snap.to_str().unwrap(), "--net", "tap=tap1,mac=02:00:00:00:00:77", "--name", "net-move-x"]);
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(err.contains("keeps its MAC") && err.lines().count() == 1, "{err}");
    assert_eq!(netns::fdb_ports(&mac), ["tap0"], "a refused resume announced the guest");

    let sock_b = dir.path().join("net-move-b.sock").display().to_string();
    let mut resumed = Vmm::spawn(&[
        "resume",
        snap.to_str().unwrap(),
        "--net",
        "tap=tap1",
        "--name",
        "net-move-b",
        "--api-sock",
        &sock_b,
    ]);
    let deadline = Instant::now() + bound(5);
    while netns::fdb_ports(&mac) != ["tap1"] {
        assert!(Instant::now() < deadline, "the bridge did not learn the guest on tap1: {:?}", netns::fdb_ports(&mac));
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(netns::ping(GUEST_IP, 2, 5), "no ping replies on tap1\n{}", resumed.seen.join("\n"));
    let inspect = vmm_ok(&["inspect", snap.to_str().unwrap()]);
    assert!(inspect.contains("virtio-net tap=tap0") && inspect.contains(&mac), "{inspect}");
    resumed.kill();
}

/// A request stream runs while the guest migrates live from one port of the bridge to another
/// and back (`vmm migrate` to a `vmm receive --net tap=...`): every request is answered exactly
/// once and in order throughout, and the bridge learns the guest's new port from its
/// announcement each time.
#[test]
fn udp_stream_survives_live_migration_to_another_tap_and_back() {
    netns::private_network(&["tap0", "tap1"]);
    let dir = TempDir::new("net-migrate");
    // A disk too, on shared storage: on this one host, each destination waits for its source
    // to let go of it (and of the TAP, on the way back).
    let disk = dir.path().join("disk.img");
    std::fs::File::create(&disk).unwrap().set_len(1 << 20).unwrap();
    let (vm, sock, mac) = boot_with(&dir, "net-mig-0", "tap0", &["--disk", disk.to_str().unwrap()]);
    let (client, handle) = SeqClient::start();
    client.wait_for(200, T, "before the migration");
    let mut source = (vm, sock);
    // A TAP another process holds (not the source), while the disk is the source's: the
    // destination refuses the VM before the hand-over (it waits only for what the source
    // holds), and the guest answers on from the source.
    netns::add_tap("tap2");
    let held = hold_tap("tap2");
    let listen = dir.path().join("busy.sock");
    let listen_arg = format!("unix:{}", listen.display());
    let busy_sock = dir.path().join("busy-vm.sock").display().to_string();
    let busy = Vmm::spawn(&["receive", "--listen", &listen_arg, "--net", "tap=tap2", "--api-sock", &busy_sock]);
    let deadline = Instant::now() + T;
    while !listen.exists() {
        assert!(Instant::now() < deadline, "the receiver never listened");
        std::thread::sleep(Duration::from_millis(10));
    }
    let (status, _, err) = vmm_cmd(&["migrate", "--api-sock", &source.1, "--to", &listen_arg]);
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("in use"), "{err}");
    let (status, _, derr) = busy.wait_exit(T);
    assert_eq!(status.code(), Some(1), "{derr}");
    let after = client.answered.load(Ordering::Relaxed);
    client.wait_for(after + 100, T, "from the source after a refused migration");
    drop(held);
    for (i, tap) in ["tap1", "tap0"].into_iter().enumerate() {
        let name = format!("net-mig-{}", i + 1);
        let dst_sock = dir.path().join(format!("{name}.sock")).display().to_string();
        let listen = dir.path().join(format!("in{i}.sock"));
        let net = format!("tap={tap}");
        let listen_arg = format!("unix:{}", listen.display());
        let dst =
            Vmm::spawn(&["receive", "--listen", &listen_arg, "--net", &net, "--name", &name, "--api-sock", &dst_sock]);
        let deadline = Instant::now() + T;
        while !listen.exists() {
            assert!(Instant::now() < deadline, "the receiver never listened");
            std::thread::sleep(Duration::from_millis(10));
        }
        vmm_ok(&["migrate", "--api-sock", &source.1, "--to", &listen_arg]);
        let _ = source.0.wait_exit(T);
        // Counted from here: the guest answers from the destination only.
        let after = client.answered.load(Ordering::Relaxed);
        client.wait_for(after + 300, T, &format!("after the migration to {tap}"));
        let deadline = Instant::now() + T;
        while netns::fdb_ports(&mac) != [tap] {
            assert!(
                Instant::now() < deadline,
                "the bridge did not learn the guest on {tap}: {:?}",
                netns::fdb_ports(&mac)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        source = (dst, dst_sock);
    }
    client.finish(handle);
    source.0.kill();
}

/// Attaches this process to TAP `name` (TUNSETIFF), as another VM would: held until dropped.
fn hold_tap(name: &str) -> std::fs::File {
    use std::os::fd::AsRawFd;
    let tun = std::fs::OpenOptions::new().read(true).write(true).open("/dev/net/tun").unwrap();
    // SAFETY: ifreq is plain data; all zeroes is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    ifr.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes one ifreq, which lives for the call; `tun` is open.
    let ret = unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF as _, &mut ifr) };
    assert_eq!(ret, 0, "TUNSETIFF {name}: {}", std::io::Error::last_os_error());
    tun
}

fn refused(args: &[&str], expect: &str) {
    let (status, _, stderr) = vmm_cmd(args);
    assert_eq!(status.code(), Some(2), "vmm {args:?}: {stderr}");
    assert!(stderr.contains(expect), "vmm {args:?}: expected '{expect}' in: {stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line, not: {stderr}");
}

#[test]
fn bad_network_arguments_are_refused() {
    tests::require_kvm();
    netns::private_network(&["tap0"]);
    let dir = TempDir::new("net-bad");
    let kernel = tests::testguest().display().to_string();
    let run = |net: &str| vec!["run".to_string(), "--kernel".into(), kernel.clone(), "--net".into(), net.to_string()];
    let check = |net: &str, expect: &str| {
        let args = run(net);
        refused(&args.iter().map(String::as_str).collect::<Vec<_>>(), expect);
    };
    check("tap=vmm-missing0", "does not exist");
    check("tap=br0", "not a single-queue TAP");
    check("tap0", "expected tap=NAME");
    check("tap=tap0,mac=01:00:00:00:00:01", "invalid MAC");
    check("tap=tap0,mac=02:00:00:00:00", "invalid MAC");
    check("tap=tap0,speed=10", "expected tap=NAME");
    check("tap=this-name-is-too-long", "not valid");
    let mut twice = run("tap=tap0");
    twice.extend(["--net".into(), "tap=tap0,mac=02:00:00:00:00:07".into()]);
    refused(&twice.iter().map(String::as_str).collect::<Vec<_>>(), "given twice");
    // vmm receive knows it before any VM comes.
    let listen = format!("unix:{}", dir.path().join("in.sock").display());
    refused(&["receive", "--listen", &listen, "--net", "tap=tap0", "--net", "tap=tap0"], "given twice");
    // A TAP another VM holds.
    let (mut vm, _sock, _mac) = boot(&dir, "net-holder", "tap0");
    check("tap=tap0", "in use");
    vm.kill();
}
