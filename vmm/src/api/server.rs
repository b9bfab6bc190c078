//! The control socket server: a thread per VM accepting one request per connection.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::protocol::{
    CheckpointStatus, DirtyLogOp, DirtyReport, ErrorKind, JobStatus, MemoryStatus, Reply, Request, Status,
};
use crate::control::{DirtyLogError, VmControl};
use crate::exit::ExitReason;
use crate::migration::transport::{self, Endpoint, Security, TlsFiles};
use crate::migration::MigrateOptions;
use crate::persist::{self, DirSink, Sink, SnapshotOptions, StreamSink};

/// Largest request accepted (requests are small JSON objects).
const MAX_REQUEST: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("control socket {1} is in use by a running VM: give VM '{0}' another --name or --api-sock")]
    NameInUse(String, String),
    #[error("cannot create control socket {path}: {err}")]
    Socket { path: String, err: std::io::Error },
}

/// Binds the control socket, replacing one left behind by a vmm that died.
pub fn bind(path: &Path, name: &str) -> Result<UnixListener, ServerError> {
    let sock_err = |err| ServerError::Socket { path: path.display().to_string(), err };
    if let Some(dir) = path.parent() {
        if dir.exists() && !dir.is_dir() {
            let err =
                std::io::Error::new(std::io::ErrorKind::NotADirectory, format!("{} is not a directory", dir.display()));
            return Err(ServerError::Socket { path: path.display().to_string(), err });
        }
        std::fs::create_dir_all(dir).map_err(sock_err)?;
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type()) {
            let err = std::io::Error::new(std::io::ErrorKind::AlreadyExists, "a file that is not a socket is there");
            return Err(ServerError::Socket { path: path.display().to_string(), err });
        }
        match UnixStream::connect(path) {
            Ok(_) => return Err(ServerError::NameInUse(name.to_string(), path.display().to_string())),
            // Nobody listens: a stale socket from a killed vmm.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                std::fs::remove_file(path).map_err(sock_err)?
            }
            Err(err) => return Err(ServerError::Socket { path: path.display().to_string(), err }),
        }
    }
    let listener = UnixListener::bind(path).map_err(sock_err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(sock_err)?;
    Ok(listener)
}

/// Removes the socket file when the VM ends.
pub struct SocketGuard(pub PathBuf);

impl SocketGuard {
    pub fn remove(&self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

impl Drop for SocketGuard {
    fn drop(&mut self) {
        self.remove();
    }
}

/// Serves requests on `listener` for the life of the process, each connection on a thread of
/// its own: a client slow to send its request never holds up another one (a snapshot job, too,
/// runs on its own thread).
pub fn spawn(listener: UnixListener, control: Arc<VmControl>) -> std::io::Result<()> {
    std::thread::Builder::new().name("api".into()).spawn(move || {
        for stream in listener.incoming() {
            match stream {
                Ok(s) => {
                    let control = control.clone();
                    if let Err(e) =
                        std::thread::Builder::new().name("api-conn".into()).spawn(move || serve(s, &control))
                    {
                        tracing::warn!("cannot serve a control connection: {e}");
                    }
                }
                Err(e) => tracing::warn!("control socket accept failed: {e}"),
            }
        }
    })?;
    Ok(())
}

/// Reads one request line, and the file descriptor sent with it, if any.
fn read_request(stream: &UnixStream) -> Result<(Request, Option<File>), String> {
    let mut buf = vec![0u8; MAX_REQUEST];
    let (mut len, mut fd) = (0, None);
    while !buf[..len].contains(&b'\n') {
        if len == buf.len() {
            return Err("request too large".into());
        }
        let (n, file) = stream.recv_with_fd(&mut buf[len..]).map_err(|e| format!("cannot read request: {e}"))?;
        fd = fd.or(file);
        if n == 0 {
            break;
        }
        len += n;
    }
    let text = std::str::from_utf8(&buf[..len]).map_err(|_| "bad request: not UTF-8".to_string())?;
    let request = serde_json::from_str(text.trim()).map_err(|e| format!("bad request: {e}"))?;
    Ok((request, fd))
}

/// Sends a job's reply; a job that ends the VM (a `stop` snapshot, a migration) ends it only
/// now, with the reply sent: ending the VM ends this process.
fn answer(control: &VmControl, stream: &UnixStream, reply: Reply, end: bool) {
    send_reply(stream, reply, end);
    if end {
        control.end(ExitReason::Stopped);
    }
}

fn send_reply(stream: &UnixStream, mut reply: Reply, end: bool) {
    if end {
        reply.ending_pid = Some(std::process::id());
    }
    let mut text = serde_json::to_string(&reply).unwrap_or_else(|_| r#"{"ok":false}"#.into());
    text.push('\n');
    let _ = (&*stream).write_all(text.as_bytes());
    let _ = stream.shutdown(std::net::Shutdown::Both);
}

fn serve(stream: UnixStream, control: &Arc<VmControl>) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let (reply, end) = match read_request(&stream) {
        Ok((Request::Snapshot { out, force, stop, compress, quiesce, quiesce_timeout_ms, diff, parent, live }, fd)) => {
            let opts = SnapshotOptions {
                stop,
                quiesce,
                quiesce_timeout: quiesce_timeout_ms.map(Duration::from_millis),
                diff,
                parent: parent.map(PathBuf::from),
                live,
            };
            match start_snapshot(control, &out, fd, force, compress) {
                Ok(run) => {
                    // The job answers on this connection when it is done.
                    let control = control.clone();
                    let spawned = std::thread::Builder::new()
                        .name("snapshot".into())
                        .spawn(move || finish_snapshot(&control, stream, run, &out, opts));
                    if let Err(e) = spawned {
                        tracing::error!("cannot start the snapshot thread: {e}");
                    }
                    return;
                }
                Err((kind, message)) => (Reply::error(kind, message), false),
            }
        }
        Ok((request @ Request::Migrate { .. }, _)) => match start_migration(control, request) {
            Ok((job, opts)) => {
                let control = control.clone();
                let spawned = std::thread::Builder::new()
                    .name("migrate".into())
                    .spawn(move || finish_migration(&control, stream, &job, &opts));
                if let Err(e) = spawned {
                    tracing::error!("cannot start the migration thread: {e}");
                }
                return;
            }
            Err((kind, message)) => (Reply::error(kind, message), false),
        },
        Ok((request, _)) => handle(request, control),
        Err(e) => (Reply::error(ErrorKind::Input, e), false),
    };
    send_reply(&stream, reply, end);
    // Only now, with the reply sent: ending the VM ends this process.
    if end {
        control.end(ExitReason::Stopped);
    }
}

/// A snapshot ready to run: its job (registered) and its sink.
struct SnapshotRun {
    job: Arc<persist::Job>,
    sink: Box<dyn Sink>,
}

/// Registers the job and opens the sink, or says why not.
fn start_snapshot(
    control: &VmControl,
    out: &str,
    fd: Option<File>,
    force: bool,
    compress: bool,
) -> Result<SnapshotRun, (ErrorKind, String)> {
    if out == "-" && fd.is_none() {
        return Err((ErrorKind::Input, "a snapshot stream needs a file descriptor sent with the request".into()));
    }
    if out != "-" && !Path::new(out).is_absolute() {
        return Err((ErrorKind::Input, format!("snapshot path must be absolute: {out}")));
    }
    if out != "-" && compress {
        return Err((
            ErrorKind::Input,
            "--compress applies to streams (--out -): a snapshot directory stays mappable".into(),
        ));
    }
    // The job is registered before the sink is opened: a second request must not touch the
    // destination.
    let job = control.start_job().map_err(|e| (ErrorKind::Runtime, e.to_string()))?;
    let sink: Result<Box<dyn Sink>, _> = match fd {
        Some(file) if out == "-" => {
            StreamSink::new(file, compress, Path::new("stdout")).map(|s| Box::new(s) as Box<dyn Sink>)
        }
        _ => DirSink::create(Path::new(out), force).map(|s| Box::new(s) as Box<dyn Sink>),
    };
    match sink {
        Ok(sink) => Ok(SnapshotRun { job, sink }),
        Err(e) => {
            control.end_job();
            let kind = if e.is_bad_input() { ErrorKind::Input } else { ErrorKind::Runtime };
            Err((kind, e.to_string()))
        }
    }
}

fn finish_snapshot(control: &VmControl, stream: UnixStream, run: SnapshotRun, out: &str, opts: SnapshotOptions) {
    let stop = opts.stop;
    let result = persist::snapshot(control, run.sink, opts, &run.job);
    control.end_job();
    let (reply, end) = match result {
        Ok(mut report) => {
            report.path = PathBuf::from(out);
            (Reply { snapshot: Some(report), ..Reply::ok() }, stop)
        }
        Err(e) if e.is_cancelled() => {
            (Reply::error(ErrorKind::Cancelled, "snapshot cancelled; the guest runs on".to_string()), false)
        }
        Err(e) => {
            let kind = if e.is_bad_input() { ErrorKind::Input } else { ErrorKind::Runtime };
            (Reply::error(kind, e.to_string()), false)
        }
    };
    answer(control, &stream, reply, end);
}

/// Checks a migration request and registers its job.
fn start_migration(
    control: &VmControl,
    request: Request,
) -> Result<(Arc<persist::Job>, MigrateOptions), (ErrorKind, String)> {
    let Request::Migrate {
        to,
        tls,
        insecure,
        max_downtime_ms,
        bandwidth,
        max_rounds,
        over_budget,
        compress,
        timeout_ms,
        copy_disks,
        connections,
    } = request
    else {
        return Err((ErrorKind::Runtime, "not a migration".into()));
    };
    let input = |m: String| (ErrorKind::Input, m);
    let to: Endpoint = to.parse().map_err(input)?;
    let security = match (tls, insecure) {
        (Some(_), true) => return Err(input("--insecure and --tls-* exclude each other".into())),
        (Some(t), false) => Some(Security::Tls(TlsFiles { cert: t.cert.into(), key: t.key.into(), ca: t.ca.into() })),
        (None, true) => Some(Security::Insecure),
        (None, false) => None,
    };
    transport::check_security(&to, security.as_ref()).map_err(|e| input(e.to_string()))?;
    if timeout_ms == 0 {
        return Err(input("the timeout must be above 0".into()));
    }
    if !(1..=snapshot::migration::MAX_LANES).contains(&connections) {
        return Err(input(format!("--connections must be 1 to {}", snapshot::migration::MAX_LANES)));
    }
    let opts = MigrateOptions {
        to,
        security,
        max_downtime: Duration::from_millis(max_downtime_ms),
        bandwidth,
        max_rounds,
        over_budget,
        compress,
        timeout: Duration::from_millis(timeout_ms),
        copy_disks,
        connections,
    };
    let job = control.start_migration(opts.timeout).map_err(|e| (ErrorKind::Runtime, e.to_string()))?;
    Ok((job, opts))
}

fn finish_migration(control: &VmControl, stream: UnixStream, job: &Arc<persist::Job>, opts: &MigrateOptions) {
    // No control request lasts for ever: but a migration does as long as it takes.
    let _ = stream.set_read_timeout(None);
    let result = crate::migration::migrate(control, opts, job);
    control.end_job();
    let (reply, end) = match result {
        Ok(report) => (Reply { migration: Some(report), ..Reply::ok() }, true),
        Err(e) if e.is_cancelled() => {
            (Reply::error(ErrorKind::Cancelled, "migration cancelled; the guest runs on here".to_string()), false)
        }
        Err(e) => {
            let kind = if e.is_bad_input() { ErrorKind::Input } else { ErrorKind::Runtime };
            (Reply::error(kind, e.to_string()), false)
        }
    };
    answer(control, &stream, reply, end);
}

/// Serves one request; the flag says whether the VM must end once the reply is sent.
fn handle(request: Request, control: &VmControl) -> (Reply, bool) {
    let reply = match request {
        Request::Status => Reply {
            status: Some(Status {
                name: control.config.name.clone(),
                state: control.run_state().as_str().into(),
                vcpus: control.config.vcpus,
                mem_bytes: control.config.mem_bytes,
                pid: std::process::id(),
                console_dropped_bytes: control.devices.console.dropped_bytes(),
                job: control.current_job().map(|job| {
                    let (done_bytes, total_bytes) = job.progress.get();
                    JobStatus { kind: job.kind.into(), phase: job.phase().into(), done_bytes, total_bytes }
                }),
                checkpoints: control.checkpoints.get().map(|h| {
                    let latest = crate::devices::bus::lock(&h.latest).clone();
                    CheckpointStatus {
                        age_ms: latest.as_ref().map(|(_, at)| at.elapsed().as_millis() as u64),
                        latest: latest.map(|(name, _)| name),
                        interval_ms: h.interval_ms.load(std::sync::atomic::Ordering::Relaxed),
                        failing: crate::devices::bus::lock(&h.failing).clone(),
                    }
                }),
                memory: control.memory_load.get().map(|l| {
                    use std::sync::atomic::Ordering::Relaxed;
                    MemoryStatus {
                        snapshot: l.snapshot.display().to_string(),
                        loaded_bytes: l.loaded_bytes.load(Relaxed),
                        total_bytes: l.total_bytes.load(Relaxed),
                        independent: l.is_independent(),
                        lazy: l.lazy.load(Relaxed),
                    }
                }),
            }),
            ..Reply::ok()
        },
        Request::Pause => result(control.pause()),
        Request::Continue => result(control.resume()),
        Request::Shutdown => return (Reply::ok(), true),
        Request::Cancel => match control.current_job() {
            Some(job) => {
                job.progress.cancel();
                Reply::ok()
            }
            None => Reply::error(ErrorKind::Input, "no snapshot or migration is under way"),
        },
        Request::DirtyLog { op } => {
            let done = match op {
                DirtyLogOp::Start => control.start_dirty_log().map(|()| None),
                DirtyLogOp::Stop => control.stop_dirty_log().map(|()| None),
                DirtyLogOp::Fetch => {
                    control.fetch_dirty_log().map(|d| Some(DirtyReport { pages: d.count(), ranges: d.ranges() }))
                }
            };
            match done {
                Ok(dirty) => Reply { dirty, ..Reply::ok() },
                Err(e @ DirtyLogError::NotStarted) => Reply::error(ErrorKind::Input, e.to_string()),
                Err(e) => Reply::error(ErrorKind::Runtime, e.to_string()),
            }
        }
        // Started by `serve`, which never hands them here.
        Request::Snapshot { .. } | Request::Migrate { .. } => {
            Reply::error(ErrorKind::Runtime, "snapshot requests are not served here")
        }
    };
    (reply, false)
}

fn result<E: std::fmt::Display>(r: Result<(), E>) -> Reply {
    match r {
        Ok(()) => Reply::ok(),
        Err(e) => Reply::error(ErrorKind::Runtime, e.to_string()),
    }
}

/// Answers the control socket of a VM still arriving (`vmm receive`): `status` says
/// `receiving`, anything else is refused until the VM runs and `spawn` serves it for real.
pub struct ReceivingResponder {
    stop: Arc<std::sync::atomic::AtomicBool>,
    path: PathBuf,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ReceivingResponder {
    /// Serves `listener` (a clone of the VM's own) at `path` with `status`.
    pub fn start(listener: UnixListener, path: &Path, status: Status) -> std::io::Result<Self> {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new().name("api-receiving".into()).spawn(move || {
            for stream in listener.incoming() {
                if flag.load(std::sync::atomic::Ordering::Acquire) {
                    return;
                }
                let Ok(stream) = stream else { continue };
                let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
                let reply = match read_request(&stream) {
                    Ok((Request::Status, _)) => Reply { status: Some(status.clone()), ..Reply::ok() },
                    Ok(_) => Reply::error(ErrorKind::Runtime, "the VM is still being received: only status is served"),
                    Err(e) => Reply::error(ErrorKind::Input, e),
                };
                send_reply(&stream, reply, false);
            }
        })?;
        Ok(Self { stop, path: path.to_path_buf(), thread: Some(thread) })
    }

    /// Stops answering (the VM's own server takes over the socket).
    pub fn stop(mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
        // Wakes the thread from accept.
        let _ = UnixStream::connect(&self.path);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for ReceivingResponder {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.stop.store(true, std::sync::atomic::Ordering::Release);
            let _ = UnixStream::connect(&self.path);
        }
    }
}
