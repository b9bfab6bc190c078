//! Private networks for tests: each test that needs one moves its own thread into a fresh
//! network namespace, where it makes a bridge and TAP devices. Processes the thread spawns (vmm,
//! ping, ip) and sockets it opens live there too, so tests never touch the host's network or
//! each other's, and everything vanishes with the thread and its children.

use std::net::UdpSocket;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The bridge's address; guests take others in 10.0.0.0/24.
pub const HOST_IP: &str = "10.0.0.1";
/// The test guest's address (`net.ip=`), and the port of its sequenced UDP service.
pub const GUEST_IP: &str = "10.0.0.2";
pub const SEQ_PORT: u16 = 9000;

/// Moves the calling thread into a new network namespace with loopback up and a bridge `br0` at
/// 10.0.0.1/24, and creates `taps` there, each a port of the bridge.
pub fn private_network(taps: &[&str]) {
    // SAFETY: unshare(2) with CLONE_NEWNET changes only this thread's network namespace.
    let ret = unsafe { libc::unshare(libc::CLONE_NEWNET) };
    assert_eq!(ret, 0, "unshare(CLONE_NEWNET): {} (network tests need root)", std::io::Error::last_os_error());
    ip(&["link", "set", "lo", "up"]);
    ip(&["link", "add", "br0", "type", "bridge"]);
    ip(&["addr", "add", &format!("{HOST_IP}/24"), "dev", "br0"]);
    ip(&["link", "set", "br0", "up"]);
    for tap in taps {
        add_tap(tap);
    }
}

/// Creates TAP `name` as a port of `br0`, up.
pub fn add_tap(name: &str) {
    ip(&["tuntap", "add", "dev", name, "mode", "tap"]);
    ip(&["link", "set", name, "master", "br0"]);
    ip(&["link", "set", name, "up"]);
}

/// Runs `ip ARGS` in this thread's namespace; panics with its stderr if it fails.
pub fn ip(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().expect("ip (iproute2) runs");
    assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `ping -c COUNT` of `addr`, each reply awaited at most `wait_s` seconds: true if all came back.
pub fn ping(addr: &str, count: u32, wait_s: u32) -> bool {
    Command::new("ping")
        .args(["-n", "-q", "-c", &count.to_string(), "-i", "0.2", "-W", &wait_s.to_string(), addr])
        .output()
        .expect("ping (iputils-ping) runs")
        .status
        .success()
}

/// The bridge ports on which `br0` has learnt `mac` (lower-case `xx:xx:...`).
pub fn fdb_ports(mac: &str) -> Vec<String> {
    let out = Command::new("bridge").args(["fdb", "show", "br", "br0"]).output().expect("bridge (iproute2) runs");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with(mac) && !l.contains("permanent"))
        .filter_map(|l| l.split_whitespace().skip_while(|w| *w != "dev").nth(1).map(str::to_string))
        .collect()
}

/// A UDP socket on the bridge's address, with a 200 ms read timeout.
pub fn udp_socket() -> UdpSocket {
    let s = UdpSocket::bind((HOST_IP, 0)).expect("bind a UDP socket on the bridge");
    s.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    s
}

/// Streams sequenced requests, one at a time, retransmitting until answered; checks that the
/// reply to number N says N numbers were answered, i.e. none twice and none skipped.
pub struct SeqClient {
    /// The last request number answered.
    pub answered: AtomicU64,
    stop: AtomicBool,
    errors: Mutex<Vec<String>>,
}

impl SeqClient {
    pub fn start() -> (Arc<Self>, std::thread::JoinHandle<()>) {
        let client =
            Arc::new(SeqClient { answered: AtomicU64::new(0), stop: AtomicBool::new(false), errors: Mutex::default() });
        let c = client.clone();
        // Spawned from the test's thread, so in its network namespace.
        let handle = std::thread::spawn(move || c.run());
        (client, handle)
    }

    fn run(&self) {
        let sock = udp_socket();
        let mut seq = 1u64;
        let mut buf = [0u8; 64];
        while !self.stop.load(Ordering::Relaxed) {
            let mut req = [0u8; 16];
            req[..8].copy_from_slice(&seq.to_be_bytes());
            if sock.send_to(&req, (GUEST_IP, SEQ_PORT)).is_err() {
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
            let Ok(n) = sock.recv(&mut buf) else { continue };
            if n < 16 {
                self.errors.lock().unwrap().push(format!("short reply of {n} bytes"));
                continue;
            }
            let got = u64::from_be_bytes(buf[..8].try_into().unwrap());
            let answered = u64::from_be_bytes(buf[8..16].try_into().unwrap());
            if got != seq {
                continue; // a late reply to an earlier retransmission
            }
            if answered != seq {
                self.errors.lock().unwrap().push(format!("reply to {seq} says {answered} were answered"));
            }
            self.answered.store(seq, Ordering::Relaxed);
            seq += 1;
        }
    }

    pub fn wait_for(&self, target: u64, timeout: Duration, what: &str) {
        let deadline = Instant::now() + timeout;
        while self.answered.load(Ordering::Relaxed) < target {
            assert!(
                Instant::now() < deadline,
                "{what}: only {} of {target} requests answered within {timeout:?}",
                self.answered.load(Ordering::Relaxed)
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn finish(&self, handle: std::thread::JoinHandle<()>) {
        self.stop.store(true, Ordering::Relaxed);
        handle.join().expect("client thread");
        let errors = self.errors.lock().unwrap();
        assert!(errors.is_empty(), "the sequenced service misbehaved: {errors:?}");
    }
}
