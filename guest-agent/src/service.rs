//! The agent's service: requests in, replies out, over vsock (or a Unix socket in tests).
//!
//! A quiesce that the host never follows with a thaw ends by itself: the agent thaws at the
//! deadline the request gave, so a guest is never left frozen by a host that gave up. Thawing
//! uses the mount points held open since the freeze, so it needs nothing from any frozen file
//! system.

use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use agent_protocol::{Frame, Message, AGENT_PORT, MAX_FRAME};

use crate::{fs, hooks};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transport {
    Vsock(u32),
    Unix(PathBuf),
}

#[derive(Clone, Debug)]
pub struct Config {
    pub transport: Transport,
    pub hooks: PathBuf,
    /// Freeze only these mount points (all writable ones when empty).
    pub only: Vec<String>,
}

impl Default for Config {
    fn default() -> Self {
        Self { transport: Transport::Vsock(AGENT_PORT), hooks: PathBuf::from(hooks::DEFAULT_DIR), only: Vec::new() }
    }
}

/// What is frozen, and until when.
#[derive(Default)]
struct Frozen {
    filesystems: Vec<fs::Frozen>,
    /// Hooks told `freeze`, to be told `thaw`.
    hooks: Vec<PathBuf>,
    /// Thawed by the watchdog at this instant, if still frozen.
    deadline: Option<Instant>,
    /// Bumped by every quiesce, so a watchdog knows whether its freeze is still the current one.
    generation: u64,
}

struct Agent {
    config: Config,
    frozen: Mutex<Frozen>,
    changed: Condvar,
}

/// Serves until the listener fails.
pub fn run(config: Config) -> Result<(), String> {
    let listener = listen(&config.transport)?;
    let agent = Arc::new(Agent { config, frozen: Mutex::default(), changed: Condvar::new() });
    let watchdog = agent.clone();
    std::thread::spawn(move || watchdog.watch());
    eprintln!("vmm-guest-agent: listening on {:?}", agent.config.transport);
    loop {
        // SAFETY: accept(2) on our listening socket; a new descriptor is ours alone.
        let fd = unsafe {
            libc::accept4(listener_fd(&listener), std::ptr::null_mut(), std::ptr::null_mut(), libc::SOCK_CLOEXEC)
        };
        if fd < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(format!("accept: {e}"));
        }
        // SAFETY: `fd` was just returned by accept4 and is owned by nothing else.
        let conn = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        let agent = agent.clone();
        std::thread::spawn(move || agent.serve(conn));
    }
}

fn listener_fd(l: &OwnedFd) -> i32 {
    use std::os::fd::AsRawFd;
    l.as_raw_fd()
}

fn listen(transport: &Transport) -> Result<OwnedFd, String> {
    match transport {
        Transport::Unix(path) => {
            let _ = std::fs::remove_file(path);
            let l = std::os::unix::net::UnixListener::bind(path)
                .map_err(|e| format!("listen on {}: {e}", path.display()))?;
            Ok(OwnedFd::from(l))
        }
        Transport::Vsock(port) => {
            // SAFETY: socket(2) with constant arguments.
            let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
            if fd < 0 {
                return Err(format!(
                    "vsock socket: {} (is vmw_vsock_virtio_transport loaded?)",
                    std::io::Error::last_os_error()
                ));
            }
            // SAFETY: `fd` was just created and is owned by nothing else.
            let owned = unsafe { OwnedFd::from_raw_fd(fd) };
            // SAFETY: sockaddr_vm is plain data; all zeroes is a valid value.
            let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
            addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
            addr.svm_port = *port;
            addr.svm_cid = libc::VMADDR_CID_ANY;
            let len = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
            // SAFETY: bind(2) and listen(2) on our socket with an address that lives for the call.
            let ok = unsafe { libc::bind(fd, std::ptr::addr_of!(addr).cast(), len) == 0 && libc::listen(fd, 16) == 0 };
            if !ok {
                return Err(format!("vsock port {port}: {}", std::io::Error::last_os_error()));
            }
            Ok(owned)
        }
    }
}

impl Agent {
    /// Answers one connection's requests until it closes.
    fn serve(&self, mut conn: std::fs::File) {
        let mut buf = vec![0u8; MAX_FRAME];
        let mut out = vec![0u8; MAX_FRAME];
        loop {
            if conn.read_exact(&mut buf[..agent_protocol::LEN_BYTES]).is_err() {
                return;
            }
            let total = match agent_protocol::frame_len(&buf) {
                Ok(Some(n)) => n,
                _ => return,
            };
            if conn.read_exact(&mut buf[agent_protocol::LEN_BYTES..total]).is_err() {
                return;
            }
            let reply_len = match agent_protocol::decode(&buf[..total]) {
                Ok(Some((frame, _))) => self.answer(&frame, &mut out),
                // A peer that speaks another version or garbage: tell it once, then hang up.
                Ok(None) | Err(_) => {
                    let n = encode(0, Message::Error("malformed request"), &mut out);
                    let _ = conn.write_all(&out[..n]);
                    return;
                }
            };
            if conn.write_all(&out[..reply_len]).is_err() {
                return;
            }
        }
    }

    fn answer(&self, frame: &Frame<'_>, out: &mut [u8]) -> usize {
        let id = frame.id;
        let text = |r: Result<String, String>| match r {
            Ok(t) => (Some(t), None),
            Err(e) => (None, Some(e)),
        };
        let (ok, err) = match frame.message {
            Message::Ping => text(Ok(format!("vmm-guest-agent {}", env!("CARGO_PKG_VERSION")))),
            Message::Quiesce { timeout_ms } => text(log(self.quiesce(Duration::from_millis(timeout_ms.into())))),
            Message::Thaw => text(log(self.thaw())),
            Message::SetTime { secs, nanos } => text(set_time(secs, nanos)),
            Message::AddEntropy(bytes) => text(add_entropy(bytes)),
            Message::Exec { timeout_ms, argv } => {
                return exec(id, argv, Duration::from_millis(timeout_ms.into()), out);
            }
            _ => text(Err("not a request".to_string())),
        };
        match (ok, err) {
            (Some(t), _) => encode(id, Message::Ok(&t), out),
            (_, Some(e)) => encode(id, Message::Error(&e), out),
            _ => unreachable!(),
        }
    }

    /// Hooks `freeze`, sync, FIFREEZE; thawed by the watchdog after `auto_thaw` unless thawed before.
    fn quiesce(&self, auto_thaw: Duration) -> Result<String, String> {
        let mut frozen = self.frozen.lock().unwrap_or_else(|e| e.into_inner());
        if !frozen.filesystems.is_empty() || !frozen.hooks.is_empty() {
            return Err("already quiesced (thaw first)".into());
        }
        let deadline = Instant::now() + auto_thaw;
        let mut told: Vec<PathBuf> = Vec::new();
        for hook in hooks::list(&self.config.hooks) {
            if let Err(e) = hooks::run(&hook, "freeze", deadline) {
                for h in told.iter().rev() {
                    let _ = hooks::run(h, "thaw", Instant::now() + Duration::from_secs(10));
                }
                return Err(e);
            }
            told.push(hook);
        }
        let filesystems = match fs::freeze_held(&self.config.only) {
            Ok(f) => f,
            Err(e) => {
                for h in told.iter().rev() {
                    let _ = hooks::run(h, "thaw", Instant::now() + Duration::from_secs(10));
                }
                return Err(e);
            }
        };
        let names: Vec<&str> = filesystems.iter().map(|f| f.name.as_str()).collect();
        let report = format!("froze {} file system(s) {}; {} hook(s) told", names.len(), names.join(" "), told.len());
        frozen.filesystems = filesystems;
        frozen.hooks = told;
        frozen.deadline = Some(deadline);
        frozen.generation += 1;
        self.changed.notify_all();
        Ok(report)
    }

    fn thaw(&self) -> Result<String, String> {
        let mut frozen = self.frozen.lock().unwrap_or_else(|e| e.into_inner());
        thaw_locked(&mut frozen)
    }

    /// Thaws a quiesce whose deadline passed.
    fn watch(&self) {
        let mut frozen = self.frozen.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            match frozen.deadline {
                None => frozen = self.changed.wait(frozen).unwrap_or_else(|e| e.into_inner()),
                Some(deadline) => {
                    let now = Instant::now();
                    if now >= deadline {
                        match thaw_locked(&mut frozen) {
                            Ok(what) => eprintln!("vmm-guest-agent: no thaw came in time: {what}"),
                            Err(e) => eprintln!("vmm-guest-agent: no thaw came in time, and thawing failed: {e}"),
                        }
                        continue;
                    }
                    frozen = self.changed.wait_timeout(frozen, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
                }
            }
        }
    }
}

/// FITHAW everything frozen (outermost first), then the hooks `thaw` in reverse order.
fn thaw_locked(frozen: &mut Frozen) -> Result<String, String> {
    let mut errors = Vec::new();
    let count = frozen.filesystems.len();
    for f in frozen.filesystems.drain(..).rev() {
        if let Err(e) = f.thaw() {
            errors.push(format!("thaw {}: {e}", f.name));
        }
    }
    let hooks: Vec<PathBuf> = frozen.hooks.drain(..).collect();
    for h in hooks.iter().rev() {
        if let Err(e) = hooks::run(h, "thaw", Instant::now() + Duration::from_secs(10)) {
            errors.push(e);
        }
    }
    frozen.deadline = None;
    if errors.is_empty() {
        Ok(format!("thawed {count} file system(s); {} hook(s) told", hooks.len()))
    } else {
        Err(errors.join("; "))
    }
}

/// Says on the console what a quiesce or thaw did (the console is no file system, so this never
/// blocks on a frozen one).
fn log(result: Result<String, String>) -> Result<String, String> {
    match &result {
        Ok(what) => eprintln!("vmm-guest-agent: {what}"),
        Err(e) => eprintln!("vmm-guest-agent: error: {e}"),
    }
    result
}

fn encode(id: u32, message: Message<'_>, out: &mut [u8]) -> usize {
    agent_protocol::encode(&Frame { id, message }, out)
        .or_else(|_| agent_protocol::encode(&Frame { id, message: Message::Error("reply too large") }, out))
        .unwrap_or(0)
}

fn set_time(secs: i64, nanos: u32) -> Result<String, String> {
    let ts = libc::timespec { tv_sec: secs as libc::time_t, tv_nsec: nanos as libc::c_long };
    // SAFETY: clock_settime(2) reads one timespec that lives for the call.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } != 0 {
        return Err(format!("clock_settime: {}", std::io::Error::last_os_error()));
    }
    Ok(format!("clock set to {secs}.{nanos:09}"))
}

/// `RNDADDENTROPY`: `_IOW('R', 0x03, int[2])` from `<linux/random.h>`.
const RNDADDENTROPY: u32 = 0x4008_5203;

/// Mixes `bytes` into the kernel's entropy pool, credited in full.
fn add_entropy(bytes: &[u8]) -> Result<String, String> {
    use std::os::fd::AsRawFd;
    let random =
        std::fs::OpenOptions::new().write(true).open("/dev/random").map_err(|e| format!("/dev/random: {e}"))?;
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let mut info = Vec::with_capacity(8 + bytes.len());
    info.extend_from_slice(&((bytes.len() * 8) as i32).to_ne_bytes());
    info.extend_from_slice(&(bytes.len() as i32).to_ne_bytes());
    info.extend_from_slice(bytes);
    info.resize(8 + bytes.len().div_ceil(4) * 4, 0);
    // SAFETY: RNDADDENTROPY reads a rand_pool_info whose buf_size bytes follow it, all in `info`,
    // which lives for the call.
    if unsafe { libc::ioctl(random.as_raw_fd(), RNDADDENTROPY as _, info.as_ptr()) } != 0 {
        return Err(format!("RNDADDENTROPY: {}", std::io::Error::last_os_error()));
    }
    Ok(format!("added {} bytes of entropy", bytes.len()))
}

/// Runs a command, killed after `timeout`; its output is truncated to fit one frame.
fn exec(id: u32, argv: &[u8], timeout: Duration, out: &mut [u8]) -> usize {
    use std::os::unix::ffi::OsStrExt;
    let args: Vec<&std::ffi::OsStr> = agent_protocol::exec_args(argv).map(std::ffi::OsStr::from_bytes).collect();
    let Some((program, rest)) = args.split_first() else {
        return encode(id, Message::Error("exec: no command"), out);
    };
    let child =
        Command::new(program).args(rest).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => return encode(id, Message::Error(&format!("exec {}: {e}", program.to_string_lossy())), out),
    };
    let read_all = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = pipe.read_to_end(&mut v);
            v
        })
    };
    let stdout = read_all(Box::new(child.stdout.take().expect("piped")));
    let stderr = read_all(Box::new(child.stderr.take().expect("piped")));
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                break child.wait().unwrap_or_default();
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => return encode(id, Message::Error(&format!("exec: {e}")), out),
        }
    };
    use std::os::unix::process::ExitStatusExt;
    let code = status.code().unwrap_or_else(|| -status.signal().unwrap_or(0));
    let (mut o, mut e) = (stdout.join().unwrap_or_default(), stderr.join().unwrap_or_default());
    let room = agent_protocol::MAX_BODY - agent_protocol::BODY_HEADER - 8;
    o.truncate(room / 2);
    e.truncate(room - o.len());
    encode(id, Message::ExecResult { status: code, stdout: &o, stderr: &e }, out)
}
