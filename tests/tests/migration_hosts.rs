//! Live migration between two "hosts": network namespaces of their own, each with a bridge and
//! the guest's TAP (`tap0` in both), joined by a veth link that carries the migration (TCP,
//! 192.168.77.1 → .2); a client in a third namespace, on a bridge linked to both hosts' bridges,
//! talks to the guest throughout. Only the test's own namespaces are ever addressed.

use std::sync::mpsc::{channel, Sender};
use std::time::{Duration, Instant};

use tests::netns::{self, SeqClient, GUEST_IP};
use tests::{field, vmm_cmd, TempDir, Vmm};

const T: Duration = Duration::from_secs(60);
const LINK: [&str; 2] = ["192.168.77.1", "192.168.77.2"];
const PORT: u16 = 4444;

type Job = Box<dyn FnOnce() + Send>;

/// A thread in a network namespace of its own with a bridge `br0` and a TAP `tap0` on it; it
/// runs the closures it is given there (processes it spawns live there too).
struct Host {
    tid: i32,
    jobs: Sender<Job>,
}

impl Host {
    fn start() -> Self {
        let (jobs, queue) = channel::<Job>();
        let (tid_tx, tid_rx) = channel();
        std::thread::spawn(move || {
            // SAFETY: unshare(2) with CLONE_NEWNET changes only this thread's network namespace.
            let ret = unsafe { libc::unshare(libc::CLONE_NEWNET) };
            assert_eq!(ret, 0, "unshare(CLONE_NEWNET): {}", std::io::Error::last_os_error());
            netns::ip(&["link", "set", "lo", "up"]);
            netns::ip(&["link", "add", "br0", "type", "bridge"]);
            netns::ip(&["link", "set", "br0", "up"]);
            netns::add_tap("tap0");
            // SAFETY: gettid has no preconditions.
            tid_tx.send(unsafe { libc::gettid() }).unwrap();
            for job in queue {
                job();
            }
        });
        Self { tid: tid_rx.recv().unwrap(), jobs }
    }

    /// Runs `f` in this host's namespace and returns what it returns.
    fn run<R: Send + 'static>(&self, f: impl FnOnce() -> R + Send + 'static) -> R {
        let (tx, rx) = channel();
        self.jobs.send(Box::new(move || drop(tx.send(f())))).unwrap();
        rx.recv().expect("the host thread ran the job")
    }
}

/// The calling thread's namespace id, for `ip link ... netns`.
fn my_tid() -> i32 {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::gettid() }
}

/// Links this (client) namespace's `br0` to each host's `br0`, and the two hosts to each other
/// by `mig0` (192.168.77.0/24); `rate`: a tc token-bucket limit on host 0's side of that link.
fn wire(hosts: &[Host; 2], rate: Option<&'static str>) {
    let client = my_tid();
    for (i, host) in hosts.iter().enumerate() {
        let outside = format!("up{i}");
        host.run(move || {
            netns::ip(&[
                "link",
                "add",
                "uplink",
                "type",
                "veth",
                "peer",
                "name",
                &outside,
                "netns",
                &client.to_string(),
            ]);
            netns::ip(&["link", "set", "uplink", "master", "br0"]);
            netns::ip(&["link", "set", "uplink", "up"]);
        });
        netns::ip(&["link", "set", &format!("up{i}"), "master", "br0"]);
        netns::ip(&["link", "set", &format!("up{i}"), "up"]);
    }
    let other = hosts[1].tid;
    hosts[0].run(move || {
        netns::ip(&["link", "add", "mig0", "type", "veth", "peer", "name", "mig0", "netns", &other.to_string()]);
        netns::ip(&["addr", "add", &format!("{}/24", LINK[0]), "dev", "mig0"]);
        netns::ip(&["link", "set", "mig0", "up"]);
        if let Some(rate) = rate {
            let out = std::process::Command::new("tc")
                .args(["qdisc", "add", "dev", "mig0", "root", "tbf", "rate", rate, "burst", "256kb", "latency", "50ms"])
                .output()
                .expect("tc (iproute2) runs");
            assert!(out.status.success(), "tc: {}", String::from_utf8_lossy(&out.stderr));
        }
    });
    hosts[1].run(|| {
        netns::ip(&["addr", "add", &format!("{}/24", LINK[1]), "dev", "mig0"]);
        netns::ip(&["link", "set", "mig0", "up"]);
    });
}

/// `vmm receive` on host `to`'s end of the link, waiting until it listens.
fn receive(host: &Host, to: usize, name: &str, sock: &str) -> Vmm {
    let listen = format!("tcp:{}:{PORT}", LINK[to]);
    let (name, sock) = (name.to_string(), sock.to_string());
    host.run(move || {
        let vm = Vmm::spawn(&["receive", "--listen", &listen, "--insecure", "--name", &name, "--api-sock", &sock]);
        let needle = format!(":{PORT:04X} 00000000:0000 0A");
        let deadline = Instant::now() + T;
        while !std::fs::read_to_string("/proc/thread-self/net/tcp").unwrap_or_default().contains(&needle) {
            assert!(Instant::now() < deadline, "the receiver never listened");
            std::thread::sleep(Duration::from_millis(10));
        }
        vm
    })
}

fn migrate(sock: &str, to: usize, extra: &[&str]) -> String {
    let to = format!("tcp:{}:{PORT}", LINK[to]);
    let mut args = vec!["migrate", "--api-sock", sock, "--to", &to, "--insecure"];
    args.extend_from_slice(extra);
    let (status, out, err) = vmm_cmd(&args);
    assert!(status.success(), "vmm {args:?}: {err}");
    out
}

/// A request stream from the client namespace goes on while the guest moves from one host to
/// the other and back, twice: every request is answered exactly once and in order, and the
/// client's bridge learns, from the guest's announcement, which host it is on.
#[test]
fn a_request_stream_follows_the_guest_between_two_hosts() {
    netns::private_network(&[]);
    let hosts = [Host::start(), Host::start()];
    wire(&hosts, None);
    let dir = TempDir::new("hosts-net");
    let sock = |i: usize| dir.path().join(format!("h{i}.sock")).display().to_string();
    let first = sock(0);
    let (mut vm, ready) = hosts[0].run(move || {
        let mut vm = Vmm::testguest(
            &format!("workload=net net.ip={GUEST_IP}"),
            &["--net", "tap=tap0", "--name", "h0", "--api-sock", &first],
        );
        let ready = vm.wait_for("testguest: net ready", T);
        (vm, ready)
    });
    let mac = ready.split_whitespace().find_map(|w| w.strip_prefix("mac=")).unwrap().to_string();
    let (client, handle) = SeqClient::start();
    client.wait_for(200, T, "before the migrations");
    for hop in 1..=4 {
        let to = hop % 2;
        let dst = receive(&hosts[to], to, &format!("h{hop}"), &sock(hop));
        migrate(&sock(hop - 1), to, &[]);
        let _ = vm.wait_exit(T);
        // Counted from here: the guest answers from the destination only.
        let after = client.answered.load(std::sync::atomic::Ordering::Relaxed);
        client.wait_for(after + 300, T, &format!("after migration {hop}"));
        let deadline = Instant::now() + T;
        while netns::fdb_ports(&mac) != [format!("up{to}")] {
            assert!(
                Instant::now() < deadline,
                "the client's bridge did not follow the guest: {:?}",
                netns::fdb_ports(&mac)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        vm = dst;
    }
    client.finish(handle);
    vm.kill();
}

/// A guest that dirties memory faster than the link between the hosts carries (a tc token
/// bucket at 400 Mbit/s): the migration converges by throttling the guest, and the guest's
/// memory verifies at the destination.
#[test]
fn a_guest_dirtying_faster_than_a_slow_link_converges_by_throttling() {
    netns::private_network(&[]);
    let hosts = [Host::start(), Host::start()];
    wire(&hosts, Some("400mbit"));
    let dir = TempDir::new("hosts-slow");
    let (s0, s1) = (dir.path().join("a.sock").display().to_string(), dir.path().join("b.sock").display().to_string());
    let a = s0.clone();
    let vm = hosts[0].run(move || {
        let mut vm = Vmm::testguest(
            "workload=mem mem.size=16M mem.rate=0 tick.ms=250",
            &["--vcpus", "2", "--mem", "256M", "--name", "slow", "--api-sock", &a],
        );
        vm.wait_for("testguest: tick", T);
        vm
    });
    let mut dst = receive(&hosts[1], 1, "slow-b", &s1);
    let out = migrate(&s0, 1, &[]);
    assert!(out.contains("throttled up to"), "{out}");
    println!("{out}");
    let _ = vm.wait_exit(T);
    let first = dst.wait_for("testguest: tick", T);
    let mut last = first.clone();
    for _ in 0..8 {
        last = dst.wait_for("testguest: tick", T);
    }
    for cpu in ["cpu0", "cpu1"] {
        assert!(field(&last, cpu) > field(&first, cpu), "{cpu} made no progress: {first} -> {last}");
    }
    dst.kill();
}
