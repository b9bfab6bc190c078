//! virtio-vsock (virtio 1.2, section 5.10) with its host side on Unix sockets, the model
//! Firecracker uses:
//! - a host process connects to the device's socket `PATH` and writes `CONNECT <port>\n`; once
//!   the guest accepts, it reads `OK <host port>\n` and then talks to the guest's `port`;
//! - a guest connection to host port `P` is a connection to the Unix socket `PATH_P`, which a
//!   host process listens on.
//!
//! Stream sockets only. Flow control is virtio-vsock's credit: the guest never has more than
//! `BUF_ALLOC` bytes in flight per connection towards a host socket that reads slowly, and the
//! device never sends the guest more than the guest's advertised buffer.
//!
//! Connections are not saved in snapshots (their host ends belong to processes of the source
//! host): after a restore, the guest gets `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`, upon which its
//! driver drops them, as after a migration, and new connections work.

mod connection;
pub mod packet;

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use rustix::event::epoll;
use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueT};

use super::{VirtioDevice, VIRTIO_F_VERSION_1};
use crate::devices::persist::DeviceState;
use crate::vstate::memory::GuestMemory;
use connection::{Conn, State};
use packet::*;

pub const VIRTIO_ID_VSOCK: u32 = 19;
const RX_QUEUE: usize = 0;
const TX_QUEUE: usize = 1;
const EVENT_QUEUE: usize = 2;
const QUEUE_SIZE: u16 = 256;
/// Our receive buffer per connection: bytes from the guest not yet taken by the host socket.
pub const BUF_ALLOC: u32 = 256 * 1024;
/// Largest payload of one packet either way.
const MAX_PAYLOAD: usize = 64 * 1024;
/// Host ports vmm gives host-initiated connections start here (below are the ones guests use
/// for their own listening sockets, by convention).
const FIRST_LOCAL_PORT: u32 = 1 << 30;
/// `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`.
const EVENT_TRANSPORT_RESET: u32 = 0;
/// Most connections at once; more are refused (RST, or the Unix connection closed).
const MAX_CONNECTIONS: usize = 1024;
/// Most control packets waiting for the guest.
const MAX_BACKLOG: usize = 4 * MAX_CONNECTIONS;
/// epoll data of the listener; connections use their token.
const LISTENER: u64 = 0;

#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("vsock socket {0} is in use by another VM")]
    InUse(String),
    #[error("cannot listen on vsock socket {path}: {err}")]
    Bind { path: String, err: io::Error },
    #[error("cannot set up vsock: {0}")]
    Epoll(io::Error),
}

/// The device's saved state: its guest CID (connections are not saved).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct VsockState {
    cid: u64,
}

const STATE_VERSION: u32 = 1;

pub struct Vsock {
    cid: u64,
    uds: PathBuf,
    listener: UnixListener,
    /// Every socket of the device (listener, connections), edge-triggered; the input worker
    /// waits on this epoll itself.
    epoll: OwnedFd,
    conns: HashMap<u64, Conn>,
    /// (host port, guest port) -> connection token.
    ports: HashMap<(u32, u32), u64>,
    next_token: u64,
    next_local_port: u32,
    /// Packets without payload waiting for a receive buffer (responses, resets, credit updates).
    backlog: VecDeque<Header>,
    /// A transport reset to send on the event queue (after a restore).
    reset_pending: bool,
    listener_ready: bool,
    queue_sizes: [u16; 3],
    scratch: Vec<u8>,
}

impl Vsock {
    /// Creates the device with guest CID `cid`, listening on `uds` for host connections. A
    /// stale socket file at `uds` (nobody listening) is replaced; a live one is refused.
    pub fn new(cid: u64, uds: &Path) -> Result<Self, VsockError> {
        let shown = uds.display().to_string();
        if std::fs::symlink_metadata(uds).is_ok() {
            if UnixStream::connect(uds).is_ok() {
                return Err(VsockError::InUse(shown));
            }
            let is_socket = std::fs::symlink_metadata(uds).is_ok_and(|m| {
                use std::os::unix::fs::FileTypeExt;
                m.file_type().is_socket()
            });
            if !is_socket {
                let err = io::Error::new(io::ErrorKind::AlreadyExists, "a file that is not a socket is in the way");
                return Err(VsockError::Bind { path: shown, err });
            }
            let _ = std::fs::remove_file(uds);
        }
        let listener = UnixListener::bind(uds).map_err(|err| VsockError::Bind { path: shown.clone(), err })?;
        listener.set_nonblocking(true).map_err(|err| VsockError::Bind { path: shown, err })?;
        let epoll = epoll::create(epoll::CreateFlags::CLOEXEC).map_err(|e| VsockError::Epoll(e.into()))?;
        epoll::add(
            &epoll,
            &listener,
            epoll::EventData::new_u64(LISTENER),
            epoll::EventFlags::IN | epoll::EventFlags::ET,
        )
        .map_err(|e| VsockError::Epoll(e.into()))?;
        Ok(Self {
            cid,
            uds: uds.to_path_buf(),
            listener,
            epoll,
            conns: HashMap::new(),
            ports: HashMap::new(),
            next_token: 1,
            next_local_port: FIRST_LOCAL_PORT,
            backlog: VecDeque::new(),
            reset_pending: false,
            listener_ready: true,
            queue_sizes: [QUEUE_SIZE; 3],
            scratch: vec![0; MAX_PAYLOAD],
        })
    }
}

/// A packet header of connection `conn` to guest `cid`.
fn header(cid: u64, conn: &Conn, op: u16) -> Header {
    Header {
        src_cid: HOST_CID,
        dst_cid: cid,
        src_port: conn.local_port,
        dst_port: conn.peer_port,
        len: 0,
        kind: TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc: BUF_ALLOC,
        fwd_cnt: conn.fwd_cnt,
    }
}

impl Vsock {
    /// A reset for a packet that belongs to no connection.
    fn reset_for(&mut self, pkt: &Header) {
        self.queue_control(Header {
            src_cid: HOST_CID,
            dst_cid: self.cid,
            src_port: pkt.dst_port,
            dst_port: pkt.src_port,
            kind: TYPE_STREAM,
            op: OP_RST,
            ..Default::default()
        });
    }

    /// Queues a packet without payload for the guest. A guest that takes none (no driver) cannot
    /// make the queue grow without bound: past MAX_BACKLOG the oldest are dropped.
    fn queue_control(&mut self, pkt: Header) {
        if self.backlog.len() >= MAX_BACKLOG {
            self.backlog.pop_front();
        }
        self.backlog.push_back(pkt);
    }

    fn add_conn(&mut self, conn: Conn) -> Option<u64> {
        let token = self.next_token;
        self.next_token += 1;
        let flags = epoll::EventFlags::IN | epoll::EventFlags::OUT | epoll::EventFlags::RDHUP | epoll::EventFlags::ET;
        if let Err(e) = epoll::add(&self.epoll, &conn.stream, epoll::EventData::new_u64(token), flags) {
            tracing::warn!("vsock: cannot watch a connection: {e}");
            return None;
        }
        if conn.state != State::AwaitConnect {
            self.ports.insert((conn.local_port, conn.peer_port), token);
        }
        self.conns.insert(token, conn);
        Some(token)
    }

    fn remove_conn(&mut self, token: u64) {
        if let Some(conn) = self.conns.remove(&token) {
            self.ports.remove(&(conn.local_port, conn.peer_port));
        }
    }

    /// A host port no connection uses.
    fn allocate_local_port(&mut self) -> u32 {
        loop {
            let port = self.next_local_port;
            self.next_local_port = self.next_local_port.checked_add(1).unwrap_or(FIRST_LOCAL_PORT);
            if !self.ports.keys().any(|(local, _)| *local == port) {
                return port;
            }
        }
    }

    /// Collects what the host sockets have for us: new connections, readable and writable ones.
    fn poll_backend(&mut self) {
        let mut events: Vec<epoll::Event> = Vec::with_capacity(64);
        loop {
            events.clear();
            let zero = rustix::event::Timespec { tv_sec: 0, tv_nsec: 0 };
            match epoll::wait(&self.epoll, rustix::buffer::spare_capacity(&mut events), Some(&zero)) {
                Ok(0) => break,
                Ok(_) => {}
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => {
                    tracing::warn!("vsock: epoll_wait: {e}");
                    break;
                }
            }
            for event in &events {
                let (data, flags) = (event.data, event.flags);
                if data.u64() == LISTENER {
                    self.listener_ready = true;
                    continue;
                }
                let token = data.u64();
                let Some(conn) = self.conns.get_mut(&token) else { continue };
                let hangup = epoll::EventFlags::RDHUP | epoll::EventFlags::HUP | epoll::EventFlags::ERR;
                if conn.state == State::Connecting && flags.intersects(hangup) {
                    // The host process gave up before the guest answered.
                    self.host_closed(token);
                    continue;
                }
                if flags.intersects(epoll::EventFlags::IN | hangup) {
                    conn.readable = true;
                }
                if flags.contains(epoll::EventFlags::OUT) {
                    if conn.flush_pending().is_err() {
                        self.host_closed(token);
                    } else if conn.state == State::Established && conn.credit_update_due() {
                        conn.last_fwd_cnt_sent = conn.fwd_cnt;
                        let update = header(self.cid, &self.conns[&token], OP_CREDIT_UPDATE);
                        self.queue_control(update);
                    }
                }
            }
        }
        if self.listener_ready {
            self.accept_all();
        }
        let waiting: Vec<u64> =
            self.conns.iter().filter(|(_, c)| c.state == State::AwaitConnect && c.readable).map(|(t, _)| *t).collect();
        for token in waiting {
            self.read_connect_line(token);
        }
    }

    fn accept_all(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if self.conns.len() >= MAX_CONNECTIONS || stream.set_nonblocking(true).is_err() {
                        continue; // dropped: the host process sees the connection closed
                    }
                    self.add_conn(Conn::new(stream, 0, 0, State::AwaitConnect));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.listener_ready = false;
                    return;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::warn!("vsock: accept on {}: {e}", self.uds.display());
                    self.listener_ready = false;
                    return;
                }
            }
        }
    }

    /// Reads `CONNECT <port>\n` from a new host connection and asks the guest.
    fn read_connect_line(&mut self, token: u64) {
        let Some(conn) = self.conns.get_mut(&token) else { return };
        let port = match conn.read_connect_line() {
            Ok(None) => return,
            Ok(Some(port)) => port,
            Err(()) => return self.remove_conn(token),
        };
        let local = self.allocate_local_port();
        let Some(conn) = self.conns.get_mut(&token) else { return };
        conn.local_port = local;
        conn.peer_port = port;
        conn.state = State::Connecting;
        self.ports.insert((local, port), token);
        let conn = &self.conns[&token];
        let request = header(self.cid, conn, OP_REQUEST);
        self.queue_control(request);
    }

    /// The host end of a connection closed (or failed): the guest is told it will get and
    /// take nothing more, and the connection goes once the guest resets it.
    fn host_closed(&mut self, token: u64) {
        let Some(conn) = self.conns.get_mut(&token) else { return };
        if conn.state == State::Established {
            conn.state = State::Closing;
            let mut shutdown = header(self.cid, &self.conns[&token], OP_SHUTDOWN);
            shutdown.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
            self.queue_control(shutdown);
        } else if conn.state != State::Closing {
            let rst = header(self.cid, conn, OP_RST);
            let connecting = conn.state == State::Connecting;
            self.remove_conn(token);
            if connecting {
                self.queue_control(rst);
            }
        }
    }

    /// Handles one packet from the guest.
    fn handle_tx(&mut self, pkt: Header, payload: &[u8]) {
        if pkt.src_cid != self.cid || pkt.dst_cid != HOST_CID {
            return; // not from this guest, or not for the host: dropped
        }
        if pkt.kind != TYPE_STREAM {
            return self.reset_for(&pkt);
        }
        let key = (pkt.dst_port, pkt.src_port);
        let Some(&token) = self.ports.get(&key) else {
            match pkt.op {
                OP_REQUEST => self.guest_connect(&pkt),
                OP_RST => {}
                _ => self.reset_for(&pkt),
            }
            return;
        };
        let conn = self.conns.get_mut(&token).expect("ports and conns agree");
        conn.peer_buf_alloc = pkt.buf_alloc;
        conn.peer_fwd_cnt = pkt.fwd_cnt;
        match pkt.op {
            OP_RESPONSE if conn.state == State::Connecting => {
                conn.state = State::Established;
                let line = format!("OK {}\n", conn.local_port);
                if conn.write_control(line.as_bytes()).is_err() {
                    self.host_closed(token);
                }
            }
            OP_RW if conn.state == State::Established => {
                if payload.len() > BUF_ALLOC as usize - conn.pending_len() {
                    // The guest sent beyond the credit we gave it.
                    let rst = header(self.cid, conn, OP_RST);
                    self.remove_conn(token);
                    self.queue_control(rst);
                    return;
                }
                match conn.queue_to_host(payload) {
                    Ok(()) => {
                        if conn.credit_update_due() {
                            conn.last_fwd_cnt_sent = conn.fwd_cnt;
                            let update = header(self.cid, &self.conns[&token], OP_CREDIT_UPDATE);
                            self.queue_control(update);
                        }
                    }
                    Err(()) => self.host_closed(token),
                }
            }
            OP_RW => {} // data on a connection being closed: dropped
            OP_CREDIT_REQUEST => {
                conn.last_fwd_cnt_sent = conn.fwd_cnt;
                let update = header(self.cid, conn, OP_CREDIT_UPDATE);
                self.queue_control(update);
            }
            OP_CREDIT_UPDATE => {}
            OP_SHUTDOWN => {
                let both = SHUTDOWN_RCV | SHUTDOWN_SEND;
                if pkt.flags & both == both || conn.state == State::Closing {
                    let rst = header(self.cid, conn, OP_RST);
                    self.remove_conn(token);
                    self.queue_control(rst);
                } else if pkt.flags & SHUTDOWN_SEND != 0 {
                    conn.guest_done_sending = true;
                    if conn.flush_pending().is_err() {
                        self.host_closed(token);
                    }
                }
            }
            OP_RST => self.remove_conn(token),
            _ => {
                let rst = header(self.cid, conn, OP_RST);
                self.remove_conn(token);
                self.queue_control(rst);
            }
        }
    }

    /// A guest connects to host port `dst_port`: a connection to the Unix socket `PATH_port`.
    fn guest_connect(&mut self, pkt: &Header) {
        let path = PathBuf::from(format!("{}_{}", self.uds.display(), pkt.dst_port));
        let stream = (self.conns.len() < MAX_CONNECTIONS).then(|| connect_nonblocking(&path).ok()).flatten();
        let Some(stream) = stream else { return self.reset_for(pkt) };
        let mut conn = Conn::new(stream, pkt.dst_port, pkt.src_port, State::Established);
        conn.peer_buf_alloc = pkt.buf_alloc;
        conn.peer_fwd_cnt = pkt.fwd_cnt;
        let response = header(self.cid, &conn, OP_RESPONSE);
        if self.add_conn(conn).is_some() {
            self.queue_control(response);
        } else {
            self.reset_for(pkt);
        }
    }

    /// Takes every packet the guest queued.
    fn transmit(&mut self, queue: &mut Queue, mem: &GuestMemory) -> bool {
        let mut used_any = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            if let Ok(mut reader) = chain.reader(mem) {
                let mut hdr = [0u8; HDR_LEN];
                if reader.read_exact(&mut hdr).is_ok() {
                    let pkt = Header::from_bytes(&hdr);
                    let len = pkt.len as usize;
                    let mut payload = std::mem::take(&mut self.scratch);
                    if len <= MAX_PAYLOAD && reader.read_exact(&mut payload[..len]).is_ok() {
                        self.handle_tx(pkt, &payload[..len]);
                    }
                    self.scratch = payload;
                }
            }
            if let Err(e) = queue.add_used(mem, head, 0) {
                tracing::warn!("virtio-vsock: cannot return transmit buffer {head}: {e}");
                break;
            }
            used_any = true;
        }
        used_any
    }

    /// Sends what waits for the guest: the reset event, control packets, then data from every
    /// connection that has some and credit for it, while receive buffers last.
    fn receive(&mut self, queues: &mut [Queue], mem: &GuestMemory) -> bool {
        let mut used_any = false;
        if self.reset_pending {
            if let Some(events) = queues.get_mut(EVENT_QUEUE).filter(|q| q.ready()) {
                if let Some(chain) = events.pop_descriptor_chain(mem) {
                    let head = chain.head_index();
                    let written = chain
                        .writer(mem)
                        .ok()
                        .and_then(|mut w| w.write_all(&EVENT_TRANSPORT_RESET.to_le_bytes()).ok())
                        .map_or(0, |()| 4);
                    let _ = events.add_used(mem, head, written);
                    self.reset_pending = false;
                    used_any = true;
                }
            }
        }
        let Some(rx) = queues.get_mut(RX_QUEUE).filter(|q| q.ready()) else { return used_any };
        while let Some(pkt) = self.backlog.front().copied() {
            if !write_packet(rx, mem, &pkt, &[]) {
                return used_any;
            }
            self.backlog.pop_front();
            used_any = true;
        }
        let ready: Vec<u64> = self.conns.iter().filter(|(_, c)| c.can_send_to_guest()).map(|(t, _)| *t).collect();
        for token in ready {
            while let Some(conn) = self.conns.get_mut(&token) {
                if !conn.can_send_to_guest() {
                    break;
                }
                let Some(room) = rx_room(rx, mem) else { return used_any };
                let max = (conn.peer_credit() as usize).min(room).min(MAX_PAYLOAD);
                match conn.stream.read(&mut self.scratch[..max]) {
                    Ok(0) => {
                        conn.readable = false;
                        self.host_closed(token);
                        break;
                    }
                    Ok(n) => {
                        conn.rx_cnt = conn.rx_cnt.wrapping_add(n as u32);
                        let mut pkt = header(self.cid, &self.conns[&token], OP_RW);
                        pkt.len = n as u32;
                        write_packet(rx, mem, &pkt, &self.scratch[..n]);
                        used_any = true;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        conn.readable = false;
                        break;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => {
                        conn.readable = false;
                        self.host_closed(token);
                        break;
                    }
                }
            }
        }
        // Packets queued while sending data (a shutdown at end of file).
        while let Some(pkt) = self.backlog.front().copied() {
            if !write_packet(rx, mem, &pkt, &[]) {
                break;
            }
            self.backlog.pop_front();
            used_any = true;
        }
        used_any
    }
}

/// Connects to a host listener without waiting: a listener whose backlog is full refuses at once
/// (EAGAIN) instead of stalling the device's worker, and with it the guest.
fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    use rustix::net::{connect, socket_with, AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
    let fd = socket_with(AddressFamily::UNIX, SocketType::STREAM, SocketFlags::NONBLOCK | SocketFlags::CLOEXEC, None)?;
    connect(&fd, &SocketAddrUnix::new(path)?)?;
    Ok(UnixStream::from(fd))
}

/// The payload room of the next receive buffer, without taking it.
fn rx_room(rx: &mut Queue, mem: &GuestMemory) -> Option<usize> {
    let next = rx.next_avail();
    let chain = rx.pop_descriptor_chain(mem)?;
    let room = chain.writer(mem).map(|w| w.available_bytes()).unwrap_or(0);
    rx.set_next_avail(next);
    Some(room.saturating_sub(HDR_LEN))
}

/// Writes one packet into the next receive buffer; false if there is none. A buffer too small
/// for it (a broken driver) is returned empty and the packet is lost.
fn write_packet(rx: &mut Queue, mem: &GuestMemory, pkt: &Header, payload: &[u8]) -> bool {
    let Some(chain) = rx.pop_descriptor_chain(mem) else { return false };
    let head = chain.head_index();
    let written = chain
        .writer(mem)
        .ok()
        .filter(|w| w.available_bytes() >= HDR_LEN + payload.len())
        .and_then(|mut w| w.write_all(&pkt.to_bytes()).and_then(|()| w.write_all(payload)).ok())
        .map_or(0, |()| (HDR_LEN + payload.len()) as u32);
    if let Err(e) = rx.add_used(mem, head, written) {
        tracing::warn!("virtio-vsock: cannot return receive buffer {head}: {e}");
    }
    true
}

impl Drop for Vsock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.uds);
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_vsock_config { le64 guest_cid; }
        super::read_config_bytes(&self.cid.to_le_bytes(), offset, data);
    }

    fn activate(&mut self, _features: u64) {}

    fn reset(&mut self) {
        self.conns.clear();
        self.ports.clear();
        self.backlog.clear();
        self.reset_pending = false;
    }

    fn describe(&self) -> String {
        format!("virtio-vsock cid={} uds={} ({} connections)", self.cid, self.uds.display(), self.conns.len())
    }

    fn input_fd(&self) -> Option<(BorrowedFd<'_>, usize)> {
        Some((self.epoll.as_fd(), RX_QUEUE))
    }

    fn save_state(&self) -> Option<DeviceState> {
        Some(DeviceState::encode(STATE_VERSION, &VsockState { cid: self.cid }))
    }

    fn restore_state(&mut self, state: Option<&DeviceState>) -> Result<(), String> {
        let _: VsockState = state.ok_or("no virtio-vsock state in the snapshot")?.decode(STATE_VERSION)?;
        // The guest's connections ended with the source; its driver learns it from this event
        // (and reads the CID again, which a resume may have changed).
        self.reset_pending = true;
        Ok(())
    }

    fn process_queue(&mut self, index: usize, queues: &mut [Queue], mem: &GuestMemory) -> bool {
        let mut used = false;
        if index == TX_QUEUE {
            if let Some(tx) = queues.get_mut(TX_QUEUE) {
                used |= self.transmit(tx, mem);
            }
        }
        // Whatever the queue, answers and host data may now go to the guest.
        self.poll_backend();
        used |= self.receive(queues, mem);
        used
    }
}
