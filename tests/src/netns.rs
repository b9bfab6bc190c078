//! Private networks for tests: each test that needs one moves its own thread into a fresh
//! network namespace, where it makes a bridge and TAP devices. Processes the thread spawns (vmm,
//! ping, ip) and sockets it opens live there too, so tests never touch the host's network or
//! each other's, and everything vanishes with the thread and its children.

use std::process::Command;

/// The bridge's address; guests take others in 10.0.0.0/24.
pub const HOST_IP: &str = "10.0.0.1";

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
