//! Helpers for the integration tests: run the real `vmm` binary on real KVM and read what the
//! guest prints.
//!
//! The binary is the release build in the workspace's target directory (`tests/run.sh` builds it
//! first); `VMM_BIN` overrides it.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_path_buf()
}

/// The `vmm` binary under test.
pub fn vmm_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("VMM_BIN") {
        return PathBuf::from(p);
    }
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| workspace_root().join("target"));
    let bin = target.join("release/vmm");
    assert!(
        bin.is_file(),
        "{} not found: build it first (tests/run.sh does: cargo build --release -p vmm)",
        bin.display()
    );
    bin
}

/// Built guest images (images/build.sh).
pub fn images_dir() -> PathBuf {
    workspace_root().join("images/out")
}

pub fn testguest() -> PathBuf {
    let p = images_dir().join("testguest.elf");
    assert!(p.is_file(), "{} not found: run images/build.sh", p.display());
    p
}

/// Tests that run guests need KVM: fail loudly rather than skip.
pub fn require_kvm() {
    let ok = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok();
    assert!(ok, "this test needs /dev/kvm (read-write): it is missing or not accessible");
}

/// True on hosts with hardware virtualization; false on PVM, where guest kernels run emulated.
pub fn hardware_kvm() -> bool {
    Path::new("/sys/module/kvm_intel").exists() || Path::new("/sys/module/kvm_amd").exists()
}

/// A unique scratch directory, removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("vmm-test-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create temp dir");
        Self(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running `vmm` process whose stdout lines arrive on a channel. Killed when dropped.
pub struct Vmm {
    child: Child,
    lines: Receiver<String>,
    /// Every stdout line seen so far.
    pub seen: Vec<String>,
    stderr: std::thread::JoinHandle<String>,
}

impl Vmm {
    pub fn spawn<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Self {
        let mut child = Command::new(vmm_bin())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn vmm");
        let (tx, lines) = channel();
        let stdout = child.stdout.take().expect("stdout");
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut err_pipe = child.stderr.take().expect("stderr");
        let stderr = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = err_pipe.read_to_string(&mut s);
            s
        });
        Self { child, lines, seen: Vec::new(), stderr }
    }

    /// Boots the test guest with `cmdline` and extra vmm arguments.
    pub fn testguest(cmdline: &str, extra: &[&str]) -> Self {
        require_kvm();
        let kernel = testguest();
        let mut args: Vec<String> = vec!["run".into(), "--kernel".into(), kernel.display().to_string()];
        args.extend(["--cmdline".into(), cmdline.to_string()]);
        args.extend(extra.iter().map(|s| s.to_string()));
        Self::spawn(&args)
    }

    /// Waits for a stdout line containing `needle`; panics with everything seen on timeout, on a
    /// guest failure line, or if vmm ends first.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> String {
        self.wait_for_any(&[needle], timeout)
    }

    pub fn wait_for_any(&mut self, needles: &[&str], timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains("testguest: FAIL") && !needles.iter().any(|n| n.contains("FAIL")) {
                        panic!("guest failure: {line}\n--- output ---\n{}", self.seen.join("\n"));
                    }
                    if needles.iter().any(|n| line.contains(n)) {
                        return line;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    panic!(
                        "timed out after {timeout:?} waiting for {needles:?}\n--- output ---\n{}",
                        self.seen.join("\n")
                    )
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let status = self.child.wait().ok();
                    panic!(
                        "vmm ended ({status:?}) before printing {needles:?}\n--- output ---\n{}",
                        self.seen.join("\n")
                    )
                }
            }
        }
    }

    /// Waits for the process to end; returns its status, all stdout lines and its stderr.
    pub fn wait_exit(mut self, timeout: Duration) -> (ExitStatus, Vec<String>, String) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                while let Ok(line) = self.lines.recv_timeout(Duration::from_millis(200)) {
                    self.seen.push(line);
                }
                let stderr = std::mem::replace(&mut self.stderr, std::thread::spawn(String::new));
                let err = stderr.join().unwrap_or_default();
                return (status, std::mem::take(&mut self.seen), err);
            }
            while let Ok(line) = self.lines.try_recv() {
                self.seen.push(line);
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("vmm did not exit within {timeout:?}\n--- output ---\n{}", self.seen.join("\n"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// CPU time (user + system) the vmm process has used so far, in seconds.
    pub fn cpu_seconds(&self) -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).expect("read /proc/PID/stat");
        // Fields after the command name (which is in parentheses and may contain spaces).
        let rest = &stat[stat.rfind(')').expect("stat format") + 2..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
        // SAFETY: sysconf has no preconditions.
        ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
    }

    /// Lines seen so far that contain `needle`.
    pub fn lines_with(&self, needle: &str) -> Vec<String> {
        self.seen.iter().filter(|l| l.contains(needle)).cloned().collect()
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Vmm {
    /// Asks vmm to end (SIGTERM: it removes its socket), then kills it if it lingers.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(3);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        self.kill();
    }
}

/// Runs a client command (`vmm status|pause|continue|snapshot ...`) to completion.
pub fn vmm_cmd(args: &[&str]) -> (ExitStatus, String, String) {
    let out = Command::new(vmm_bin()).args(args).stdin(Stdio::null()).output().expect("run vmm");
    (out.status, String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Like `vmm_cmd`, and asserts that it succeeded.
pub fn vmm_ok(args: &[&str]) -> String {
    let (status, stdout, stderr) = vmm_cmd(args);
    assert!(status.success(), "vmm {args:?} failed ({status:?}): {stderr}");
    stdout
}

/// Runs vmm to completion with `args` (no guest output expected): status and stderr.
pub fn run_vmm(args: &[&str], timeout: Duration) -> (ExitStatus, String) {
    let (status, _, stderr) = Vmm::spawn(args).wait_exit(timeout);
    (status, stderr)
}

/// Parses `key=value` words of a guest line.
pub fn field(line: &str, key: &str) -> Option<u64> {
    line.split_whitespace().find_map(|w| w.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
}

/// Runs vmm with `args` in a private mount namespace where `setup` (a shell snippet) first
/// changed /dev, e.g. to hide /dev/kvm. Returns the status and stderr.
pub fn in_mount_namespace(setup: &str, args: &str) -> (ExitStatus, String) {
    let script = format!("{setup} && exec {} {args}", vmm_bin().display());
    let out = Command::new("unshare")
        .args(["--mount", "sh", "-c", &script])
        .stdin(Stdio::null())
        .output()
        .expect("unshare (util-linux) runs");
    (out.status, String::from_utf8_lossy(&out.stderr).into_owned())
}
