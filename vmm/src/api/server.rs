//! The control socket server: a thread per VM accepting one request per connection.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::protocol::{DirtyLogOp, DirtyReport, ErrorKind, Reply, Request, Status};
use crate::control::{DirtyLogError, VmControl};
use crate::exit::ExitReason;
use crate::persist::{self, SnapshotOptions};

/// Largest request accepted (requests are small JSON objects).
const MAX_REQUEST: u64 = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("a VM named '{0}' is already running (control socket {1})")]
    NameInUse(String, String),
    #[error("cannot create control socket {path}: {err}")]
    Socket { path: String, err: std::io::Error },
}

/// Binds the control socket, replacing one left behind by a vmm that died.
pub fn bind(path: &Path, name: &str) -> Result<UnixListener, ServerError> {
    let sock_err = |err| ServerError::Socket { path: path.display().to_string(), err };
    if let Some(dir) = path.parent() {
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

/// Serves requests on `listener` for the life of the process.
pub fn spawn(listener: UnixListener, control: Arc<VmControl>) -> std::io::Result<()> {
    std::thread::Builder::new().name("api".into()).spawn(move || {
        for stream in listener.incoming() {
            match stream {
                Ok(s) => serve(s, &control),
                Err(e) => tracing::warn!("control socket accept failed: {e}"),
            }
        }
    })?;
    Ok(())
}

fn serve(stream: UnixStream, control: &VmControl) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let mut line = String::new();
    let mut reader = BufReader::new(std::io::Read::take(&stream, MAX_REQUEST));
    let (mut reply, end) = match reader.read_line(&mut line) {
        Ok(_) => match serde_json::from_str::<Request>(line.trim()) {
            Ok(request) => handle(request, control),
            Err(e) => (Reply::error(ErrorKind::Input, format!("bad request: {e}")), false),
        },
        Err(e) => (Reply::error(ErrorKind::Input, format!("cannot read request: {e}")), false),
    };
    if end {
        reply.ending_pid = Some(std::process::id());
    }
    let mut text = serde_json::to_string(&reply).unwrap_or_else(|_| r#"{"ok":false}"#.into());
    text.push('\n');
    let _ = (&stream).write_all(text.as_bytes());
    let _ = stream.shutdown(std::net::Shutdown::Both);
    // Only now, with the reply sent: ending the VM ends this process.
    if end {
        control.end(ExitReason::Stopped);
    }
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
            }),
            ..Reply::ok()
        },
        Request::Pause => result(control.pause()),
        Request::Continue => result(control.resume()),
        Request::Shutdown => return (Reply::ok(), true),
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
        Request::Snapshot { out, force, stop } => {
            let path = Path::new(&out);
            if !path.is_absolute() {
                return (Reply::error(ErrorKind::Input, format!("snapshot path must be absolute: {out}")), false);
            }
            return match persist::snapshot(control, path, SnapshotOptions { force, stop }) {
                Ok(report) => (Reply { snapshot: Some(report), ..Reply::ok() }, stop),
                Err(e) => {
                    let kind = if e.is_bad_input() { ErrorKind::Input } else { ErrorKind::Runtime };
                    (Reply::error(kind, e.to_string()), false)
                }
            };
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
