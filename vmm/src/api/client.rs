//! The client side of the control socket, used by `vmm pause|continue|status|snapshot`.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::RawFd;
use std::os::unix::net::UnixStream;

use std::path::Path;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::protocol::{Reply, Request};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no VM is listening on {0}")]
    NoVm(String),
    #[error("control socket {path}: {err}")]
    Io { path: String, err: std::io::Error },
    #[error("bad reply from the VM: {0}")]
    BadReply(String),
    #[error("the VM on {0} closed the connection without answering")]
    NoReply(String),
}

/// Sends one request and waits for its reply (a snapshot may take a while: no timeout).
pub fn request(socket: &Path, request: &Request) -> Result<Reply, ClientError> {
    request_with_fd(socket, request, None)
}

/// Like `request`, passing the VM a file descriptor with it (SCM_RIGHTS): the snapshot stream of
/// `vmm snapshot --out -` is written by the VM straight into the client's stdout.
pub fn request_with_fd(socket: &Path, request: &Request, fd: Option<RawFd>) -> Result<Reply, ClientError> {
    let path = socket.display().to_string();
    let mut stream = UnixStream::connect(socket).map_err(|_| ClientError::NoVm(path.clone()))?;
    let mut text = serde_json::to_string(request).map_err(|e| ClientError::BadReply(e.to_string()))?;
    text.push('\n');
    match fd {
        Some(fd) => {
            // One message: the descriptor arrives with the first byte of the request.
            let sent = stream.send_with_fd(text.as_bytes(), fd).map_err(|e| ClientError::Io {
                path: path.clone(),
                err: std::io::Error::from_raw_os_error(e.errno()),
            })?;
            stream.write_all(&text.as_bytes()[sent..]).map_err(|err| ClientError::Io { path: path.clone(), err })?;
        }
        None => stream.write_all(text.as_bytes()).map_err(|err| ClientError::Io { path: path.clone(), err })?,
    }
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line).map_err(|err| ClientError::Io { path: path.clone(), err })?;
    if line.is_empty() {
        return Err(ClientError::NoReply(path));
    }
    serde_json::from_str(line.trim()).map_err(|e| ClientError::BadReply(e.to_string()))
}
