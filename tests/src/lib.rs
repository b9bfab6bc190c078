//! Helpers for the integration tests: run the real `vmm` binary on real KVM and read what the
//! guest prints.
//!
//! The binary is the release build in the workspace's target directory (`tests/run.sh` builds it
//! first); `VMM_BIN` overrides it.

pub mod netns;

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

/// Arguments of `vmm run` booting the stock Debian kernel (PVH vmlinux) with the initramfs from
/// images/build.sh, followed by `extra`; checks KVM and the images first.
pub fn linux_run_args(mem: &str, vcpus: u32, cmdline: &str, extra: &[&str]) -> Vec<String> {
    require_kvm();
    let linux = images_dir().join("linux");
    let vmlinux = linux.join("vmlinux");
    assert!(vmlinux.is_file(), "{} not found: run images/build.sh", vmlinux.display());
    let initrd = linux.join("initramfs.cpio.gz");
    let mut args: Vec<String> = vec!["run".into(), "--kernel".into(), vmlinux.display().to_string()];
    args.extend(["--initrd".into(), initrd.display().to_string(), "--mem".into(), mem.into()]);
    args.extend(["--vcpus".into(), vcpus.to_string(), "--cmdline".into(), cmdline.into()]);
    args.extend(extra.iter().map(|s| s.to_string()));
    args
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

/// True on hosts with hardware virtualization (or the nested host's SVM); false on PVM, where
/// guest kernels run emulated.
pub fn hardware_kvm() -> bool {
    Path::new("/sys/module/kvm_intel").exists() || Path::new("/sys/module/kvm_amd").exists()
}

/// The three kinds of host the tests meet (docs/testing.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostKind {
    /// KVM without hardware virtualization: guest ring 0 is emulated, Linux dies early.
    Pvm,
    /// The nested test host of tests/nested.sh: kvm_amd under QEMU's TCG. Full, but slow.
    Nested,
    /// kvm_intel or kvm_amd on real hardware.
    Hardware,
}

impl HostKind {
    pub fn describe(self) -> &'static str {
        match self {
            HostKind::Pvm => "PVM host (no hardware virtualization: guest kernels run emulated)",
            HostKind::Nested => "nested KVM host (kvm_amd under QEMU TCG; functional only, timings mean nothing)",
            HostKind::Hardware => "hardware KVM host",
        }
    }
}

/// Which host this is: the nested host's /init sets VMM_TEST_HOST=nested.
pub fn host_kind() -> HostKind {
    if !hardware_kvm() {
        HostKind::Pvm
    } else if std::env::var("VMM_TEST_HOST").as_deref() == Ok("nested") {
        HostKind::Nested
    } else {
        HostKind::Hardware
    }
}

/// Says which host a test runs on (shown with the test's output) and returns it.
pub fn announce_host() -> HostKind {
    let kind = host_kind();
    println!("host: {}", kind.describe());
    kind
}

/// For tests that need a guest kernel to run for real: fails clearly on PVM.
pub fn require_hardware_kvm() -> HostKind {
    require_kvm();
    let kind = announce_host();
    assert!(
        kind != HostKind::Pvm,
        "this test needs hardware virtualization (SVM/VMX); on a PVM host run it in the nested host: tests/nested.sh"
    );
    kind
}

/// A wait of `secs` seconds on this host: 4x longer in the nested host, where TCG runs everything
/// (guest and VMM) 10-50x slower than native.
pub fn bound(secs: u64) -> Duration {
    let scale = if host_kind() == HostKind::Nested { 4 } else { 1 };
    Duration::from_secs(secs * scale)
}

/// A unique scratch directory (`tempfile`), removed when dropped. Its name carries `tag`, so a
/// test's leftovers can be told apart. Control sockets go in it too: tests never share one.
pub struct TempDir(tempfile::TempDir);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        Self(tempfile::Builder::new().prefix(&format!("vmm-test-{tag}-")).tempdir().expect("create temp dir"))
    }

    pub fn path(&self) -> &Path {
        self.0.path()
    }
}

/// A running `vmm` process whose stdout lines arrive on a channel. Killed when dropped.
pub struct Vmm {
    child: Child,
    lines: Receiver<String>,
    /// Every stdout line seen so far.
    pub seen: Vec<String>,
    stderr: std::thread::JoinHandle<String>,
    stdin: Option<std::process::ChildStdin>,
    /// Holds the control socket of a VM started without `--api-sock`: tests never share one.
    _socket_dir: Option<TempDir>,
}

impl Vmm {
    pub fn spawn<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Self {
        Self::spawn_with_stdin(args, Stdio::null())
    }

    /// Like `spawn`, with a pipe to the guest console's input (see `send`).
    pub fn spawn_with_console_input<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Self {
        Self::spawn_with_stdin(args, Stdio::piped())
    }

    /// Like `spawn`, with stdin from `stdin` (a file, a pipe from another process).
    pub fn spawn_with_stdin<S: AsRef<std::ffi::OsStr>>(args: &[S], stdin: Stdio) -> Self {
        settle_after_last_vm();
        let mut args: Vec<std::ffi::OsString> = args.iter().map(|a| a.as_ref().to_owned()).collect();
        let starts_vm = args.first().is_some_and(|a| a == "run" || a == "resume");
        let socket_dir = (starts_vm && !args.iter().any(|a| a == "--api-sock")).then(|| TempDir::new("sock"));
        if let Some(dir) = &socket_dir {
            args.extend(["--api-sock".into(), dir.path().join("vm.sock").into_os_string()]);
        }
        let mut child = vmm_command()
            .args(&args)
            .stdin(stdin)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn vmm");
        let stdin = child.stdin.take();
        let (tx, lines) = channel();
        let stdout = child.stdout.take().expect("stdout");
        std::thread::spawn(move || {
            // Guest output need not be UTF-8: a bad byte must not end the reader.
            let mut reader = BufReader::new(stdout);
            let mut raw = Vec::new();
            loop {
                raw.clear();
                match reader.read_until(b'\n', &mut raw) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                let line = String::from_utf8_lossy(&raw).trim_end_matches(['\n', '\r']).to_string();
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
        Self { child, lines, seen: Vec::new(), stderr, stdin, _socket_dir: socket_dir }
    }

    /// Types `text` on the guest console (needs `spawn_with_console_input`).
    pub fn send(&mut self, text: &str) {
        use std::io::Write;
        let stdin = self.stdin.as_mut().expect("vmm spawned without console input");
        stdin.write_all(text.as_bytes()).and_then(|()| stdin.flush()).expect("write to vmm's stdin");
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything known about an unexpected end or a stuck wait: stdout so far, vmm's stderr
    /// (once it has exited) or, while it still runs, where each of its threads stands.
    fn diagnosis(&mut self) -> String {
        let mut out = format!("--- output ---\n{}", self.seen.join("\n"));
        match self.child.try_wait() {
            Ok(Some(status)) => {
                let stderr = std::mem::replace(&mut self.stderr, std::thread::spawn(String::new));
                out.push_str(&format!("\n--- vmm ended: {status} ---\n--- stderr ---\n{}", join_bounded(stderr)));
            }
            _ => {
                out.push_str(&format!("\n--- vmm still running ---\n{}", process_stacks(self.child.id())));
                out.push_str(&kvm_trace_of(self.child.id()));
            }
        }
        out
    }

    /// Boots the test guest with `cmdline` and extra vmm arguments.
    pub fn testguest(cmdline: &str, extra: &[&str]) -> Self {
        require_kvm();
        announce_host();
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
                    if is_guest_failure(&line) && !needles.iter().any(|n| n.contains("FAIL")) {
                        panic!("guest failure: {line}\n--- output ---\n{}", self.seen.join("\n"));
                    }
                    if needles.iter().any(|n| line.contains(n)) {
                        return line;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    panic!("timed out after {timeout:?} waiting for {needles:?}\n{}", self.diagnosis())
                }
                Err(RecvTimeoutError::Disconnected) => {
                    // stdout closed: vmm is ending; give it a bounded moment so its status is known.
                    let _ = self.wait_status(Duration::from_secs(10));
                    panic!("vmm ended before printing {needles:?}\n{}", self.diagnosis())
                }
            }
        }
    }

    /// Every stdout line that arrives within `period` (no panic when none does).
    pub fn lines_for(&mut self, period: Duration) -> Vec<String> {
        let deadline = Instant::now() + period;
        let mut got = Vec::new();
        while let Ok(line) = self.lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            self.seen.push(line.clone());
            got.push(line);
        }
        got
    }

    /// Waits for the process to end; returns its status, all stdout lines and its stderr.
    pub fn wait_exit(mut self, timeout: Duration) -> (ExitStatus, Vec<String>, String) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                note_vm_end();
                // Every line up to the end of stdout (bounded: a grandchild could hold the pipe).
                let drain_until = Instant::now() + Duration::from_secs(5);
                while let Ok(line) = self.lines.recv_timeout(drain_until.saturating_duration_since(Instant::now())) {
                    self.seen.push(line);
                }
                let stderr = std::mem::replace(&mut self.stderr, std::thread::spawn(String::new));
                let err = join_bounded(stderr);
                return (status, std::mem::take(&mut self.seen), err);
            }
            while let Ok(line) = self.lines.try_recv() {
                self.seen.push(line);
            }
            if Instant::now() > deadline {
                let diagnosis = self.diagnosis();
                self.kill();
                panic!("vmm did not exit within {timeout:?}\n{diagnosis}");
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

    /// SIGKILL, then reaps it, within a bound: a vmm that cannot die is a finding, not a hang.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        if self.wait_status(Duration::from_secs(30)).is_none() {
            panic!("vmm (pid {}) not reaped 30 s after SIGKILL\n{}", self.child.id(), process_stacks(self.child.id()));
        }
    }

    /// The exit status if the process ends within `timeout`.
    fn wait_status(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                note_vm_end();
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
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
                    note_vm_end();
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        // Never panic here: a panic while a failed test unwinds would abort the whole binary.
        let _ = self.child.kill();
        if self.wait_status(Duration::from_secs(30)).is_none() {
            eprintln!(
                "vmm (pid {}) not reaped 30 s after SIGKILL\n{}",
                self.child.id(),
                process_stacks(self.child.id())
            );
        }
    }
}

static LAST_VM_END: std::sync::Mutex<Option<Instant>> = std::sync::Mutex::new(None);

/// In the nested host, a VM starts at least 3 s after the previous one ended: guests started right
/// after another ended fail far more often under TCG's SVM (docs/testing.md). Elsewhere a no-op.
fn settle_after_last_vm() {
    if host_kind() != HostKind::Nested {
        return;
    }
    let last = *LAST_VM_END.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(end) = last {
        let wait = Duration::from_secs(3).saturating_sub(end.elapsed());
        std::thread::sleep(wait);
    }
}

fn note_vm_end() {
    *LAST_VM_END.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
}

/// A line in which one of our guests reports a failed check.
pub fn is_guest_failure(line: &str) -> bool {
    line.contains("testguest: FAIL")
        || line.contains("memcheck: FAIL")
        || (line.contains("vmm-guest:") && line.contains(" FAIL"))
}

/// Joins the stderr reader unless it is still blocked (a grandchild holding the pipe).
fn join_bounded(reader: std::thread::JoinHandle<String>) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !reader.is_finished() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    if reader.is_finished() {
        reader.join().unwrap_or_default()
    } else {
        "(stderr still open 5 s after vmm ended)".into()
    }
}

/// The last KVM events of process `pid`'s vCPU threads, when KVM tracing is on (the nested host
/// turns on `kvm_exit` and `kvm_inj_exception` in tracefs): what a stuck guest keeps doing.
pub fn kvm_trace_of(pid: u32) -> String {
    let Ok(trace) = std::fs::read_to_string("/sys/kernel/tracing/trace") else { return String::new() };
    let tids: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| d.flatten().map(|t| format!("-{}", t.file_name().to_string_lossy())).collect())
        .unwrap_or_default();
    let ours: Vec<&str> = trace
        .lines()
        .filter(|l| l.split_whitespace().next().is_some_and(|task| tids.iter().any(|t| task.ends_with(t.as_str()))))
        .collect();
    let tail = &ours[ours.len().saturating_sub(40)..];
    format!("--- last KVM events of its vCPUs (tracefs) ---\n{}\n", tail.join("\n"))
}

/// Where each thread of process `pid` stands: name, state, kernel wait channel and stack.
pub fn process_stacks(pid: u32) -> String {
    let mut out = String::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return format!("(process {pid} is gone)");
    };
    for task in tasks.flatten() {
        let dir = task.path();
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap_or_default();
        let state = read("status").lines().find(|l| l.starts_with("State:")).unwrap_or_default().to_string();
        out.push_str(&format!(
            "thread {} ({}) {state} wchan={}\n{}",
            task.file_name().to_string_lossy(),
            read("comm").trim(),
            read("wchan"),
            read("stack")
        ));
    }
    out
}

/// How long a client command (`vmm status|pause|snapshot ...`) may take before the test fails.
pub fn client_bound() -> Duration {
    bound(120)
}

/// Runs a client command (`vmm status|pause|continue|snapshot ...`) to completion, within
/// `client_bound()`: a command that hangs fails the test with where it and every vmm this test
/// started stood, instead of stalling the suite.
pub fn vmm_cmd(args: &[&str]) -> (ExitStatus, String, String) {
    // A VM this starts gets a control socket of its own: tests never share one.
    let socket_dir = (matches!(args.first(), Some(&"run" | &"resume")) && !args.contains(&"--api-sock"))
        .then(|| TempDir::new("sock"));
    let socket = socket_dir.as_ref().map(|d| d.path().join("vm.sock").display().to_string());
    let mut child = vmm_command()
        .args(args)
        .args(socket.iter().flat_map(|s| ["--api-sock", s.as_str()]))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run vmm");
    let read_all = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut s = Vec::new();
            let _ = pipe.read_to_end(&mut s);
            String::from_utf8_lossy(&s).into_owned()
        })
    };
    let out = read_all(Box::new(child.stdout.take().expect("stdout")));
    let err = read_all(Box::new(child.stderr.take().expect("stderr")));
    let deadline = Instant::now() + client_bound();
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() > deadline {
            let mut report = format!("--- client (pid {}) ---\n{}", child.id(), process_stacks(child.id()));
            for pid in children_of(std::process::id()) {
                if pid != child.id() {
                    report.push_str(&format!("--- vmm (pid {pid}) ---\n{}", process_stacks(pid)));
                }
            }
            let _ = child.kill();
            panic!("vmm {args:?} did not finish within {:?}\n{report}", client_bound());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (status, join_bounded(out), join_bounded(err))
}

/// A `vmm` command whose VMs keep their files (working copies of snapshot disks) in the tests'
/// own state directory, not in the host's `/var/lib/vmm`.
pub fn vmm_command() -> Command {
    let mut cmd = Command::new(vmm_bin());
    cmd.env("XDG_STATE_HOME", test_state_dir());
    cmd
}

/// `$XDG_STATE_HOME` of the VMs the tests run: under the temporary directory (the workspace
/// may be read-only, as in the nested host). VM names are fixed per test, so it stays small.
pub fn test_state_dir() -> PathBuf {
    std::env::temp_dir().join("vmm-test-state")
}

/// Processes whose parent is `pid`.
fn children_of(pid: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| {
            let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
            let rest = stat.rfind(')').map(|i| &stat[i + 2..]).unwrap_or("");
            rest.split_whitespace().nth(1).and_then(|pp| pp.parse::<u32>().ok()) == Some(pid)
        })
        .collect()
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

/// Waits until a VM answers on control socket `sock` (one just spawned binds it soon), within
/// `timeout`.
pub fn wait_for_vm(sock: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        if vmm_cmd(&["status", "--api-sock", sock]).0.success() {
            return;
        }
        assert!(Instant::now() < deadline, "no VM answered on {sock} within {timeout:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A `key=0x...` word of a guest line, as a number.
pub fn hex_field(line: &str, key: &str) -> u64 {
    let word = line.split_whitespace().find_map(|w| w.strip_prefix(key)?.strip_prefix('=')).unwrap();
    u64::from_str_radix(word.trim_start_matches("0x"), 16).unwrap_or_else(|_| panic!("{key} in {line}"))
}

/// `vmm snapshot --api-sock SOCK --out OUT EXTRA...`, which must succeed; its stdout.
pub fn snapshot(sock: &str, out: &Path, extra: &[&str]) -> String {
    let mut args = vec!["snapshot", "--api-sock", sock, "--out", out.to_str().unwrap()];
    args.extend_from_slice(extra);
    vmm_ok(&args)
}

/// A tmpfs of `size` mounted at `at` (an empty directory) until dropped: a small file system to
/// fill up.
pub struct Tmpfs(PathBuf);

impl Tmpfs {
    pub fn mount(at: &Path, size: &str) -> Self {
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs", at.to_str().unwrap()])
            .status()
            .expect("mount runs")
            .success();
        assert!(ok, "mount a tmpfs at {}", at.display());
        Self(at.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}
