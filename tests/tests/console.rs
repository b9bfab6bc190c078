//! The guest console never makes a vCPU wait on the host: with vmm's stdout a pipe nobody reads
//! and the guest printing as fast as it can, the VM still pauses, snapshots and shuts down, and
//! `status` counts the bytes it had to drop.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tests::{field, require_kvm, testguest, vmm_bin, vmm_cmd, vmm_ok, TempDir};

/// Kills the vmm if the test fails before it ends.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_console_nobody_reads_blocks_nothing() {
    require_kvm();
    tests::announce_host();
    let dir = TempDir::new("console");
    let sock = dir.path().join("c.sock").display().to_string();
    // A tick line every millisecond on each of 2 vCPUs' behalf: far more than a stalled pipe holds.
    let mut child = KillOnDrop(
        Command::new(vmm_bin())
            .args(["run", "--kernel", testguest().to_str().unwrap(), "--cmdline", "workload=demo tick.ms=1"])
            .args(["--vcpus", "2", "--mem", "128M", "--api-sock", &sock])
            .stdin(Stdio::null())
            .stdout(Stdio::piped()) // never read
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn vmm"),
    );

    let deadline = Instant::now() + tests::bound(120);
    let dropped = loop {
        assert!(Instant::now() < deadline, "the guest never filled the console buffer");
        let (status, out, _) = vmm_cmd(&["status", "--api-sock", &sock]);
        if status.success() {
            let n = field(&out, "console_dropped_bytes").expect("status shows console_dropped_bytes");
            if n > 0 {
                break n;
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    println!("console bytes dropped so far: {dropped}");

    // Everything that needs every vCPU to stop still works, and promptly.
    let t = Instant::now();
    vmm_ok(&["pause", "--api-sock", &sock]);
    let snap = dir.path().join("snap");
    vmm_ok(&["snapshot", "--api-sock", &sock, "--out", snap.to_str().unwrap()]);
    vmm_ok(&["continue", "--api-sock", &sock]);
    vmm_ok(&["verify", snap.to_str().unwrap()]);
    vmm_ok(&["shutdown", "--api-sock", &sock]);
    assert!(t.elapsed() < tests::bound(30), "control took {:?} with a stalled console", t.elapsed());

    let deadline = Instant::now() + tests::bound(30);
    let status = loop {
        if let Some(s) = child.0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "vmm did not end after shutdown with a stalled console");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
}
