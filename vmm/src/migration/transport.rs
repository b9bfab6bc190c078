//! The connection a migration travels over: a Unix socket (its permissions guard it), TLS over
//! TCP with both sides authenticated by certificates from one CA, or plain TCP when the user
//! says `--insecure`. Both ends deal with one `Connection`: a byte stream with timeouts.

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection, StreamOwned};

/// Where a migration goes to, or is received on: `tcp:HOST:PORT` or `unix:PATH`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Tcp { host: String, port: u16 },
    Unix(PathBuf),
}

impl FromStr for Endpoint {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("unix: needs a socket path (unix:/run/vmm-in.sock)".into());
            }
            return Ok(Endpoint::Unix(PathBuf::from(path)));
        }
        let Some(addr) = s.strip_prefix("tcp:") else {
            return Err(format!("'{s}' is not tcp:HOST:PORT or unix:PATH"));
        };
        let (host, port) = addr.rsplit_once(':').ok_or_else(|| format!("'{s}' has no port (tcp:HOST:PORT)"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(format!("'{s}' has no host (tcp:HOST:PORT)"));
        }
        let port = port.parse().map_err(|_| format!("'{s}': '{port}' is not a port number"))?;
        Ok(Endpoint::Tcp { host: host.to_string(), port })
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Tcp { host, port } if host.contains(':') => write!(f, "tcp:[{host}]:{port}"),
            Endpoint::Tcp { host, port } => write!(f, "tcp:{host}:{port}"),
            Endpoint::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// The certificate, key and CA of one side (PEM files).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

/// How a TCP connection is protected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Security {
    Tls(TlsFiles),
    /// Plain TCP, asked for with `--insecure`.
    Insecure,
}

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("{0}")]
    Usage(String),
    #[error("cannot read {path}: {why}")]
    TlsFile { path: String, why: String },
    #[error("cannot connect to {endpoint}: {err}")]
    Connect { endpoint: String, err: io::Error },
    #[error("cannot listen on {endpoint}: {err}")]
    Listen { endpoint: String, err: io::Error },
    #[error("TLS handshake with {peer} failed: {why}")]
    Handshake { peer: String, why: String },
    #[error("{0}")]
    Io(#[from] io::Error),
}

impl TransportError {
    /// The user's arguments or files are at fault.
    pub fn is_bad_input(&self) -> bool {
        matches!(self, TransportError::Usage(_) | TransportError::TlsFile { .. })
    }
}

/// An established connection, authenticated when it is TLS.
pub enum Connection {
    Unix(UnixStream),
    Tcp(TcpStream),
    TlsClient(Box<StreamOwned<ClientConnection, TcpStream>>),
    TlsServer(Box<StreamOwned<ServerConnection, TcpStream>>),
}

impl Connection {
    /// Bounds every later read and write (None: wait for ever).
    pub fn set_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        match self {
            Connection::Unix(s) => s.set_read_timeout(timeout).and_then(|()| s.set_write_timeout(timeout)),
            Connection::Tcp(s) => s.set_read_timeout(timeout).and_then(|()| s.set_write_timeout(timeout)),
            Connection::TlsClient(s) => {
                s.sock.set_read_timeout(timeout).and_then(|()| s.sock.set_write_timeout(timeout))
            }
            Connection::TlsServer(s) => {
                s.sock.set_read_timeout(timeout).and_then(|()| s.sock.set_write_timeout(timeout))
            }
        }
    }

    /// Cuts the connection both ways (a peer blocked on it sees the end at once).
    pub fn shutdown(&self) {
        if let Ok(handle) = self.handle() {
            handle.cut();
        }
    }

    /// A handle on the socket for other threads: to cut it (Ctrl-C, a cancel, a failed lane) or
    /// look at its send queue while this connection is being written.
    pub fn handle(&self) -> io::Result<SocketHandle> {
        Ok(match self {
            Connection::Unix(s) => SocketHandle::Unix(s.try_clone()?),
            Connection::Tcp(s) => SocketHandle::Tcp(s.try_clone()?),
            Connection::TlsClient(s) => SocketHandle::Tcp(s.sock.try_clone()?),
            Connection::TlsServer(s) => SocketHandle::Tcp(s.sock.try_clone()?),
        })
    }

    /// Whether the connection is encrypted.
    pub fn is_tls(&self) -> bool {
        matches!(self, Connection::TlsClient(_) | Connection::TlsServer(_))
    }
}

/// Another handle on a connection's socket (`Connection::handle`).
pub enum SocketHandle {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl SocketHandle {
    /// Cuts the connection both ways: whoever is blocked on it sees the end at once.
    pub fn cut(&self) {
        let _ = self.shutdown(std::net::Shutdown::Both);
    }

    /// Ends reading only: a reader blocked on it sees the end, and what this side has to say
    /// (why it gave up) can still be written.
    pub fn cut_reading(&self) {
        let _ = self.shutdown(std::net::Shutdown::Read);
    }

    pub fn try_clone(&self) -> io::Result<SocketHandle> {
        Ok(match self {
            SocketHandle::Unix(s) => SocketHandle::Unix(s.try_clone()?),
            SocketHandle::Tcp(s) => SocketHandle::Tcp(s.try_clone()?),
        })
    }

    fn shutdown(&self, how: std::net::Shutdown) -> io::Result<()> {
        match self {
            SocketHandle::Unix(s) => s.shutdown(how),
            SocketHandle::Tcp(s) => s.shutdown(how),
        }
    }

    /// Bytes written to the socket that the peer has not acknowledged yet (TCP) or not read
    /// yet (Unix), as the kernel counts them (`TIOCOUTQ`); None if it cannot say.
    pub fn unsent_bytes(&self) -> Option<u64> {
        use std::os::fd::AsRawFd;
        let fd = match self {
            SocketHandle::Unix(s) => s.as_raw_fd(),
            SocketHandle::Tcp(s) => s.as_raw_fd(),
        };
        let mut n: libc::c_int = 0;
        // SAFETY: TIOCOUTQ (SIOCOUTQ for sockets) writes one int through the pointer, which is
        // valid for the call; `fd` is this handle's open socket.
        let ret = unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut n) };
        (ret == 0).then(|| n.max(0) as u64)
    }

    /// Bounds the socket's send queue to about `bytes` (`SO_SNDBUF`; the kernel doubles it for
    /// its bookkeeping).
    pub fn limit_send_queue(&self, bytes: u64) -> io::Result<()> {
        let size = usize::try_from(bytes).unwrap_or(usize::MAX);
        match self {
            SocketHandle::Unix(s) => rustix::net::sockopt::set_socket_send_buffer_size(s, size),
            SocketHandle::Tcp(s) => rustix::net::sockopt::set_socket_send_buffer_size(s, size),
        }
        .map_err(io::Error::from)
    }
}

impl Read for Connection {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Connection::Unix(s) => s.read(buf),
            Connection::Tcp(s) => s.read(buf),
            Connection::TlsClient(s) => s.read(buf),
            Connection::TlsServer(s) => s.read(buf),
        }
    }
}

impl Write for Connection {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Connection::Unix(s) => s.write(buf),
            Connection::Tcp(s) => s.write(buf),
            Connection::TlsClient(s) => s.write(buf),
            Connection::TlsServer(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Connection::Unix(s) => s.flush(),
            Connection::Tcp(s) => s.flush(),
            Connection::TlsClient(s) => s.flush(),
            Connection::TlsServer(s) => s.flush(),
        }
    }
}

/// Refuses a combination that would leave a TCP link unprotected by accident.
pub fn check_security(endpoint: &Endpoint, security: Option<&Security>) -> Result<(), TransportError> {
    match (endpoint, security) {
        (Endpoint::Tcp { .. }, None) => Err(TransportError::Usage(
            "a TCP migration needs --tls-cert, --tls-key and --tls-ca (or --insecure for plain TCP)".into(),
        )),
        (Endpoint::Unix(_), Some(_)) => Err(TransportError::Usage(
            "unix: sockets are protected by their permissions: --tls-* and --insecure apply to tcp:".into(),
        )),
        _ => Ok(()),
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn tls_file_error(path: &Path, why: impl std::fmt::Display) -> TransportError {
    TransportError::TlsFile { path: path.display().to_string(), why: why.to_string() }
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TransportError> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| tls_file_error(path, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| tls_file_error(path, e))?;
    if certs.is_empty() {
        return Err(tls_file_error(path, "no PEM certificate in it"));
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TransportError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| tls_file_error(path, e))
}

fn load_roots(path: &Path) -> Result<Arc<RootCertStore>, TransportError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path)? {
        roots.add(cert).map_err(|e| tls_file_error(path, e))?;
    }
    Ok(Arc::new(roots))
}

fn client_config(files: &TlsFiles) -> Result<Arc<ClientConfig>, TransportError> {
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TransportError::Usage(e.to_string()))?
        .with_root_certificates(load_roots(&files.ca)?)
        .with_client_auth_cert(load_certs(&files.cert)?, load_key(&files.key)?)
        .map_err(|e| tls_file_error(&files.key, format!("it does not go with {}: {e}", files.cert.display())))?;
    Ok(Arc::new(config))
}

fn server_config(files: &TlsFiles) -> Result<Arc<ServerConfig>, TransportError> {
    let verifier = WebPkiClientVerifier::builder_with_provider(load_roots(&files.ca)?, provider())
        .build()
        .map_err(|e| tls_file_error(&files.ca, e))?;
    let config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TransportError::Usage(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(load_certs(&files.cert)?, load_key(&files.key)?)
        .map_err(|e| tls_file_error(&files.key, format!("it does not go with {}: {e}", files.cert.display())))?;
    Ok(Arc::new(config))
}

/// Runs a TLS handshake to its end, within the socket's timeouts.
fn handshake<C, S>(conn: &mut rustls::ConnectionCommon<S>, sock: &mut C, peer: &str) -> Result<(), TransportError>
where
    C: Read + Write,
{
    while conn.is_handshaking() {
        if let Err(e) = conn.complete_io(sock) {
            let why = match e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()) {
                Some(tls) => tls.to_string(),
                None if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::TimedOut => {
                    "the peer did not answer in time".into()
                }
                None if e.kind() == io::ErrorKind::UnexpectedEof => "the peer closed the connection".into(),
                None => e.to_string(),
            };
            return Err(TransportError::Handshake { peer: peer.to_string(), why });
        }
    }
    Ok(())
}

/// Connects to `endpoint` (a TLS client when `security` says so), within `timeout` for the
/// connection and the handshake.
pub fn connect(
    endpoint: &Endpoint,
    security: Option<&Security>,
    timeout: Duration,
) -> Result<Connection, TransportError> {
    check_security(endpoint, security)?;
    let failed = |err| TransportError::Connect { endpoint: endpoint.to_string(), err };
    match endpoint {
        Endpoint::Unix(path) => {
            let sock = UnixStream::connect(path).map_err(failed)?;
            sock.set_read_timeout(Some(timeout))?;
            sock.set_write_timeout(Some(timeout))?;
            Ok(Connection::Unix(sock))
        }
        Endpoint::Tcp { host, port } => {
            // Files are read before the network is touched: a bad file is the user's error.
            let tls = match security {
                Some(Security::Tls(files)) => Some(client_config(files)?),
                _ => None,
            };
            let addrs: Vec<_> = (host.as_str(), *port).to_socket_addrs().map_err(failed)?.collect();
            let mut last = io::Error::new(io::ErrorKind::NotFound, "the host name has no address");
            let mut sock = None;
            for addr in addrs {
                match TcpStream::connect_timeout(&addr, timeout) {
                    Ok(s) => {
                        sock = Some(s);
                        break;
                    }
                    Err(e) => last = e,
                }
            }
            let mut sock = sock.ok_or_else(|| failed(last))?;
            sock.set_nodelay(true)?;
            sock.set_read_timeout(Some(timeout))?;
            sock.set_write_timeout(Some(timeout))?;
            let Some(config) = tls else { return Ok(Connection::Tcp(sock)) };
            let name = ServerName::try_from(host.clone())
                .map_err(|e| TransportError::Usage(format!("'{host}' cannot name a TLS server: {e}")))?;
            let mut conn =
                ClientConnection::new(config, name).map_err(|e| TransportError::Usage(format!("TLS setup: {e}")))?;
            handshake(&mut conn, &mut sock, &endpoint.to_string())?;
            Ok(Connection::TlsClient(Box::new(StreamOwned::new(conn, sock))))
        }
    }
}

/// A listening endpoint.
pub struct Listener {
    socket: ListeningSocket,
    tls: Option<Arc<ServerConfig>>,
    endpoint: Endpoint,
}

enum ListeningSocket {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl Listener {
    /// Listens on `endpoint`; a Unix socket path is created (and must not exist).
    pub fn bind(endpoint: &Endpoint, security: Option<&Security>) -> Result<Self, TransportError> {
        check_security(endpoint, security)?;
        let tls = match security {
            Some(Security::Tls(files)) => Some(server_config(files)?),
            _ => None,
        };
        let failed = |err| TransportError::Listen { endpoint: endpoint.to_string(), err };
        let socket = match endpoint {
            Endpoint::Unix(path) => {
                // A socket left by a receiver that was killed answers no one: take its place.
                if std::fs::metadata(path).is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()))
                    && UnixStream::connect(path).is_err_and(|e| e.kind() == io::ErrorKind::ConnectionRefused)
                {
                    let _ = std::fs::remove_file(path);
                }
                ListeningSocket::Unix(UnixListener::bind(path).map_err(failed)?)
            }
            Endpoint::Tcp { host, port } => {
                ListeningSocket::Tcp(TcpListener::bind((host.as_str(), *port)).map_err(failed)?)
            }
        };
        Ok(Self { socket, tls, endpoint: endpoint.clone() })
    }

    /// The TCP port listened on (useful with port 0).
    pub fn local_port(&self) -> Option<u16> {
        match &self.socket {
            ListeningSocket::Tcp(l) => l.local_addr().ok().map(|a| a.port()),
            ListeningSocket::Unix(_) => None,
        }
    }

    /// Waits up to `wait` for the next peer to connect (None: none did). It is not yet
    /// authenticated: [`Pending::establish`] does that, in a thread of its own if the caller
    /// must not wait for a slow or silent peer.
    pub fn accept(&self, wait: Duration) -> Result<Option<Pending>, TransportError> {
        use std::os::fd::AsFd;
        let fd = match &self.socket {
            ListeningSocket::Tcp(l) => l.as_fd(),
            ListeningSocket::Unix(l) => l.as_fd(),
        };
        let mut fds = [rustix::event::PollFd::new(&fd, rustix::event::PollFlags::IN)];
        let timeout =
            rustix::event::Timespec::try_from(wait).unwrap_or(rustix::event::Timespec { tv_sec: i64::MAX, tv_nsec: 0 });
        match rustix::event::poll(&mut fds, Some(&timeout)) {
            Ok(0) => return Ok(None),
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => return Ok(None),
            Err(e) => return Err(io::Error::from(e).into()),
        }
        Ok(Some(match &self.socket {
            ListeningSocket::Unix(l) => {
                let (sock, _) = l.accept()?;
                Pending { socket: PendingSocket::Unix(sock), peer: "a local peer".into(), tls: None }
            }
            ListeningSocket::Tcp(l) => {
                let (sock, addr) = l.accept()?;
                Pending { socket: PendingSocket::Tcp(sock), peer: addr.to_string(), tls: self.tls.clone() }
            }
        }))
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }
}

/// A peer that connected, before the TLS handshake.
pub struct Pending {
    socket: PendingSocket,
    peer: String,
    tls: Option<Arc<ServerConfig>>,
}

enum PendingSocket {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Pending {
    /// Who connected (an address, or "a local peer").
    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// The connection, every read and write bounded by `timeout`; with TLS, once the peer
    /// completed the handshake with a certificate of the CA (within `timeout`).
    pub fn establish(self, timeout: Duration) -> Result<(Connection, String), TransportError> {
        match self.socket {
            PendingSocket::Unix(sock) => {
                sock.set_read_timeout(Some(timeout))?;
                sock.set_write_timeout(Some(timeout))?;
                Ok((Connection::Unix(sock), self.peer))
            }
            PendingSocket::Tcp(mut sock) => {
                sock.set_nodelay(true)?;
                sock.set_read_timeout(Some(timeout))?;
                sock.set_write_timeout(Some(timeout))?;
                let Some(config) = self.tls else { return Ok((Connection::Tcp(sock), self.peer)) };
                let mut conn =
                    ServerConnection::new(config).map_err(|e| TransportError::Usage(format!("TLS setup: {e}")))?;
                handshake(&mut conn, &mut sock, &self.peer)?;
                Ok((Connection::TlsServer(Box::new(StreamOwned::new(conn, sock))), self.peer))
            }
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let (ListeningSocket::Unix(_), Endpoint::Unix(path)) = (&self.socket, &self.endpoint) {
            let _ = std::fs::remove_file(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse_and_print_back() {
        for text in ["tcp:127.0.0.1:4444", "tcp:host.example:1", "tcp:[::1]:80", "unix:/run/x.sock"] {
            assert_eq!(text.parse::<Endpoint>().unwrap().to_string(), text);
        }
        for bad in ["127.0.0.1:4444", "tcp:host", "tcp::80", "tcp:h:99999", "unix:", "udp:h:1"] {
            assert!(bad.parse::<Endpoint>().is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn tcp_without_tls_needs_insecure() {
        let tcp: Endpoint = "tcp:127.0.0.1:1".parse().unwrap();
        let unix: Endpoint = "unix:/x".parse().unwrap();
        assert!(check_security(&tcp, None).is_err());
        assert!(check_security(&tcp, Some(&Security::Insecure)).is_ok());
        assert!(check_security(&unix, None).is_ok());
        assert!(check_security(&unix, Some(&Security::Insecure)).is_err());
    }
}
