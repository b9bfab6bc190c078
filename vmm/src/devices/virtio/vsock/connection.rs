//! One vsock stream connection between a guest port and a host Unix socket, with its credit
//! accounting (virtio 1.2, section 5.10.6.3).

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;

use super::BUF_ALLOC;

/// The longest `CONNECT <port>\n` line a host process may send.
const MAX_CONNECT_LINE: usize = 32;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// A host process connected; its `CONNECT <port>` line is awaited.
    AwaitConnect,
    /// The guest was asked (REQUEST) and has not answered.
    Connecting,
    Established,
    /// The host end closed; the guest was told (SHUTDOWN) and its reset is awaited.
    Closing,
}

pub struct Conn {
    pub stream: UnixStream,
    /// The host side's vsock port, and the guest's.
    pub local_port: u32,
    pub peer_port: u32,
    pub state: State,
    /// The host socket may have data (edge-triggered: cleared only on WouldBlock).
    pub readable: bool,
    line: Vec<u8>,
    /// Guest data the host socket has not taken yet (at most BUF_ALLOC bytes: the credit).
    pending: VecDeque<u8>,
    /// Guest bytes written to the host socket, and the count last told to the guest.
    pub fwd_cnt: u32,
    pub last_fwd_cnt_sent: u32,
    /// Bytes sent to the guest; the guest's buffer size and how much of it it has consumed.
    pub rx_cnt: u32,
    pub peer_buf_alloc: u32,
    pub peer_fwd_cnt: u32,
    /// The guest will send nothing more: once `pending` is written, the host socket's write
    /// side is shut down.
    pub guest_done_sending: bool,
}

impl Conn {
    pub fn new(stream: UnixStream, local_port: u32, peer_port: u32, state: State) -> Self {
        Self {
            stream,
            local_port,
            peer_port,
            state,
            readable: true,
            line: Vec::new(),
            pending: VecDeque::new(),
            fwd_cnt: 0,
            last_fwd_cnt_sent: 0,
            rx_cnt: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            guest_done_sending: false,
        }
    }

    /// Reads the `CONNECT <port>\n` line byte by byte (what follows it is the connection's
    /// data). `Ok(None)`: not complete yet; `Err`: malformed, too long, or the host closed.
    pub fn read_connect_line(&mut self) -> Result<Option<u32>, ()> {
        let mut byte = [0u8; 1];
        loop {
            match self.stream.read(&mut byte) {
                Ok(0) => return Err(()),
                Ok(_) if byte[0] == b'\n' => break,
                Ok(_) if self.line.len() < MAX_CONNECT_LINE => self.line.push(byte[0]),
                Ok(_) => return Err(()),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.readable = false;
                    return Ok(None);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Err(()),
            }
        }
        let line = std::str::from_utf8(&self.line).map_err(|_| ())?;
        let port = line.trim_end_matches('\r').strip_prefix("CONNECT ").and_then(|p| p.trim().parse().ok());
        port.map(Some).ok_or(())
    }

    /// Writes a line of the host protocol (`OK <port>\n`) to the fresh host socket.
    pub fn write_control(&mut self, line: &[u8]) -> Result<(), ()> {
        match self.stream.write(line) {
            Ok(n) if n == line.len() => Ok(()),
            _ => Err(()),
        }
    }

    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    /// Forwards guest data to the host socket; what it does not take now waits in `pending`.
    pub fn queue_to_host(&mut self, data: &[u8]) -> Result<(), ()> {
        let mut rest = data;
        if self.pending.is_empty() {
            let n = write_some(&mut self.stream, rest)?;
            self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
            rest = &rest[n..];
        }
        self.pending.extend(rest);
        Ok(())
    }

    /// Writes what waits in `pending`, as far as the host socket takes it.
    pub fn flush_pending(&mut self) -> Result<(), ()> {
        while !self.pending.is_empty() {
            let (front, _) = self.pending.as_slices();
            let n = write_some(&mut self.stream, front)?;
            if n == 0 {
                return Ok(());
            }
            self.pending.drain(..n);
            self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
        }
        if self.guest_done_sending {
            let _ = self.stream.shutdown(std::net::Shutdown::Write);
        }
        Ok(())
    }

    /// Whether the guest should be told how much we forwarded: a quarter of our buffer since
    /// the last time, so a guest waiting for credit never waits long.
    pub fn credit_update_due(&self) -> bool {
        self.fwd_cnt.wrapping_sub(self.last_fwd_cnt_sent) >= BUF_ALLOC / 4
    }

    /// Bytes the guest has room for.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = self.rx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    pub fn can_send_to_guest(&self) -> bool {
        self.state == State::Established && self.readable && self.peer_credit() > 0
    }
}

/// Writes what the socket takes now: 0 when it is full, `Err` when it is broken.
fn write_some(stream: &mut UnixStream, data: &[u8]) -> Result<usize, ()> {
    loop {
        match stream.write(data) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(0),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return Err(()),
        }
    }
}
