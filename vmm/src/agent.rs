//! The host side of the guest agent: vmm talks to the agent in its guest over the VM's own
//! vsock device, as any host process would (connect to its socket, `CONNECT 52`), with the
//! messages of the `agent-protocol` crate.
//!
//! Around a snapshot: Quiesce before the pause, Thaw after it. After every resume: Thaw (the
//! snapshot may hold a guest frozen for it), SetTime (the host's wall clock: the guest's stood
//! still while it was saved) and AddEntropy (fresh host random bytes: two VMs resumed from one
//! snapshot must not share their RNG state).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use agent_protocol::{Frame, Message, AGENT_PORT, MAX_FRAME};

/// How long the agent gets to accept a connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// The default bound of a quiesce (and what the agent is told: it thaws by itself after twice
/// as long, should the host never send Thaw).
pub const QUIESCE_TIMEOUT: Duration = Duration::from_secs(10);
/// Random bytes given to a resumed guest.
const ENTROPY_BYTES: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("no guest agent answered on vsock port {AGENT_PORT}")]
    Absent,
    #[error("the guest is paused: its agent cannot answer")]
    Paused,
    #[error("the guest agent did not answer {what} within {ms} ms")]
    Timeout { what: &'static str, ms: u128 },
    #[error("the guest agent failed to {what}: {message}")]
    Refused { what: &'static str, message: String },
    #[error("guest agent connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("guest agent: {0}")]
    Protocol(agent_protocol::Error),
    #[error("guest agent answered {what} with an unexpected {got}")]
    Unexpected { what: &'static str, got: &'static str },
}

/// A connection to the agent.
pub struct Agent {
    stream: BufReader<UnixStream>,
    next_id: u32,
}

impl Agent {
    /// Connects to the agent through the vsock device listening on `uds`, within `timeout`.
    pub fn connect(uds: &Path, timeout: Duration) -> Result<Self, AgentError> {
        let stream = UnixStream::connect(uds)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        let mut stream = BufReader::new(stream);
        stream.get_mut().write_all(format!("CONNECT {AGENT_PORT}\n").as_bytes())?;
        let mut line = String::new();
        match stream.read_line(&mut line) {
            Ok(_) if line.starts_with("OK ") => Ok(Self { stream, next_id: 1 }),
            Ok(_) => Err(AgentError::Absent),
            Err(e) if is_timeout(&e) => Err(AgentError::Absent),
            Err(e) => Err(e.into()),
        }
    }

    /// Sends `message` and waits for its reply within `timeout`; the reply's text if it is Ok.
    fn request(&mut self, what: &'static str, message: Message<'_>, timeout: Duration) -> Result<String, AgentError> {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        let mut buf = vec![0u8; MAX_FRAME];
        let n = agent_protocol::encode(&Frame { id, message }, &mut buf).map_err(AgentError::Protocol)?;
        let sock = self.stream.get_mut();
        sock.set_read_timeout(Some(timeout))?;
        sock.write_all(&buf[..n])?;
        let started = Instant::now();
        loop {
            let frame = self.read_frame(&mut buf).map_err(|e| match e {
                AgentError::Io(e) if is_timeout(&e) => AgentError::Timeout { what, ms: timeout.as_millis() },
                other => other,
            })?;
            let (reply, _) = agent_protocol::decode(&buf[..frame])
                .map_err(AgentError::Protocol)?
                .ok_or(AgentError::Protocol(agent_protocol::Error::Malformed("incomplete frame")))?;
            if reply.id != id {
                // A late reply to an earlier request that timed out.
                if started.elapsed() > timeout {
                    return Err(AgentError::Timeout { what, ms: timeout.as_millis() });
                }
                continue;
            }
            return match reply.message {
                Message::Ok(text) => Ok(text.to_string()),
                Message::Error(message) => Err(AgentError::Refused { what, message: message.to_string() }),
                other => Err(AgentError::Unexpected { what, got: other.name() }),
            };
        }
    }

    /// Reads one frame into `buf`; returns its length.
    fn read_frame(&mut self, buf: &mut [u8]) -> Result<usize, AgentError> {
        self.stream.read_exact(&mut buf[..agent_protocol::LEN_BYTES])?;
        let total = agent_protocol::frame_len(buf).map_err(AgentError::Protocol)?.expect("length read");
        self.stream.read_exact(&mut buf[agent_protocol::LEN_BYTES..total])?;
        Ok(total)
    }

    pub fn ping(&mut self) -> Result<String, AgentError> {
        self.request("ping", Message::Ping, CONNECT_TIMEOUT)
    }

    /// Asks the guest to flush and freeze its file systems, within `timeout`.
    pub fn quiesce(&mut self, timeout: Duration) -> Result<String, AgentError> {
        let auto_thaw_ms = u32::try_from(timeout.as_millis() * 2).unwrap_or(u32::MAX);
        self.request("quiesce", Message::Quiesce { timeout_ms: auto_thaw_ms }, timeout)
    }

    pub fn thaw(&mut self) -> Result<String, AgentError> {
        self.request("thaw", Message::Thaw, QUIESCE_TIMEOUT)
    }

    /// Sets the guest's wall clock to the host's.
    pub fn set_time(&mut self) -> Result<String, AgentError> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        let message = Message::SetTime { secs: now.as_secs() as i64, nanos: now.subsec_nanos() };
        self.request("set the time", message, CONNECT_TIMEOUT)
    }

    /// Gives the guest fresh random bytes from the host.
    pub fn add_entropy(&mut self) -> Result<String, AgentError> {
        let mut bytes = [0u8; ENTROPY_BYTES];
        getrandom(&mut bytes)?;
        self.request("add entropy", Message::AddEntropy(&bytes), CONNECT_TIMEOUT)
    }
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)
}

fn getrandom(buf: &mut [u8]) -> std::io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        let n = rustix::rand::getrandom(&mut buf[filled..], rustix::rand::GetRandomFlags::empty())?;
        filled += n;
    }
    Ok(())
}

/// After a resume: thaws the guest, sets its clock and feeds its RNG, retrying the connection
/// for up to `within` (the guest first handles the transport reset; a paused VM answers once
/// continued). Runs on its own thread; outcomes are logged.
pub fn refresh_after_resume(uds: std::path::PathBuf, within: Duration) {
    let spawned = std::thread::Builder::new().name("agent-refresh".into()).spawn(move || {
        let deadline = Instant::now() + within;
        let mut agent = loop {
            match Agent::connect(&uds, CONNECT_TIMEOUT) {
                Ok(agent) => break agent,
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!("agent refresh: {e}; retrying");
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => {
                    tracing::info!("after resume: {e}: the guest's clock and RNG were not refreshed");
                    return;
                }
            }
        };
        for (what, result) in
            [("thaw", agent.thaw()), ("set-time", agent.set_time()), ("add-entropy", agent.add_entropy())]
        {
            match result {
                Ok(_) => tracing::debug!("after resume: agent {what} done"),
                Err(e) => tracing::warn!("after resume: {e}"),
            }
        }
    });
    if let Err(e) = spawned {
        tracing::warn!("cannot start the agent refresh thread: {e}");
    }
}
