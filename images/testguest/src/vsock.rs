//! A polling virtio-vsock driver (ring 3) and what the `vsock` workload serves on it: an echo
//! on port 1234, the agent protocol on port 52 (agent-protocol crate), and optionally one
//! connection of its own to a host port (`vsock.connect=PORT`) that sends a line and expects it
//! echoed. A transport reset (after a resume) drops every connection and is reported.

use core::sync::atomic::{fence, AtomicU64, Ordering::Relaxed, Ordering::SeqCst};

use agent_protocol::{self as proto, Frame, Message};

use crate::console::Line;
use crate::virtio::{self, get, put, Error, Mmio, DESC_WRITE, OFF_AVAIL, OFF_DESC, OFF_USED, R_CONFIG, R_QUEUE_NOTIFY};

const DEVICE_VSOCK: u32 = 19;
const RX: u32 = 0;
const TX: u32 = 1;
const EVENT: u32 = 2;
const QSIZE: u16 = 16;
const BUF: u64 = 4096;
const HDR: usize = 44;
const EVENT_BUF: u64 = 64;
/// Bytes the driver needs: three queue pages, QSIZE receive buffers, a transmit buffer.
pub const AREA_BYTES: u64 = 3 * 4096 + (QSIZE as u64 + 1) * BUF;

pub const ECHO_PORT: u32 = 1234;
/// The guest port of the connection to the host (`vsock.connect`).
const CONNECT_FROM: u32 = 5000;
const HOST_CID: u64 = 2;
const BUF_ALLOC: u32 = 64 * 1024;
const MAX_CONNS: usize = 4;
/// Room for one request of the largest kind (AddEntropy: 16 + 512 bytes).
const AGENT_BUF: usize = 600;

const OP_REQUEST: u16 = 1;
const OP_RESPONSE: u16 = 2;
const OP_RST: u16 = 3;
const OP_SHUTDOWN: u16 = 4;
const OP_RW: u16 = 5;
const OP_CREDIT_UPDATE: u16 = 6;
const OP_CREDIT_REQUEST: u16 = 7;

/// What the agent responder was told (in guest memory, so in snapshots).
pub static QUIESCES: AtomicU64 = AtomicU64::new(0);
pub static THAWS: AtomicU64 = AtomicU64::new(0);

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Echo,
    Agent,
    ConnectBack,
}

#[derive(Clone, Copy)]
struct Conn {
    kind: Kind,
    /// Our port and the host's.
    local: u32,
    peer: u32,
    established: bool,
    /// Bytes we consumed (we consume at once).
    fwd_cnt: u32,
    agent_len: usize,
    agent_buf: [u8; AGENT_BUF],
}

#[derive(Clone, Copy, Default)]
struct Hdr {
    src_cid: u64,
    dst_cid: u64,
    src_port: u32,
    dst_port: u32,
    len: u32,
    op: u16,
    flags: u32,
    fwd_cnt: u32,
}

pub struct Vsock {
    mmio: Mmio,
    rxq: u64,
    tx: virtio::OneShotQueue,
    evq: u64,
    bufs: u64,
    rx_avail: u16,
    rx_used: u16,
    ev_avail: u16,
    ev_used: u16,
    pub cid: u64,
    conns: [Option<Conn>; MAX_CONNS],
}

fn post(queue: u64, slot: u16, id: u16) {
    put(queue + OFF_AVAIL + 4 + 2 * (slot % QSIZE) as u64, id);
}

impl Vsock {
    pub fn init(windows: &[u64], area: u64) -> Result<Vsock, Error> {
        let base = virtio::find_device(windows, DEVICE_VSOCK, Error::NoVsockDevice)?;
        let m = Mmio(base);
        virtio::negotiate(&m, 0)?;
        let (rxq, txq, evq, bufs) = (area, area + 4096, area + 8192, area + 3 * 4096);
        virtio::setup_queue(&m, RX, QSIZE, rxq)?;
        virtio::setup_queue(&m, TX, QSIZE, txq)?;
        virtio::setup_queue(&m, EVENT, QSIZE, evq)?;
        for i in 0..QSIZE {
            let d = rxq + OFF_DESC + 16 * i as u64;
            put(d, bufs + i as u64 * BUF);
            put(d + 8, BUF as u32);
            put(d + 12, DESC_WRITE);
            post(rxq, i, i);
            // Event buffers live in the event queue's page, after its rings.
            let e = evq + OFF_DESC + 16 * i as u64;
            put(e, evq + 0x400 + i as u64 * EVENT_BUF);
            put(e + 8, EVENT_BUF as u32);
            put(e + 12, DESC_WRITE);
            post(evq, i, i);
        }
        fence(SeqCst);
        put(rxq + OFF_AVAIL + 2, QSIZE);
        put(evq + OFF_AVAIL + 2, QSIZE);
        virtio::driver_ok(&m);
        m.write(R_QUEUE_NOTIFY, RX);
        m.write(R_QUEUE_NOTIFY, EVENT);
        let cid = m.read(R_CONFIG) as u64 | (m.read(R_CONFIG + 4) as u64) << 32;
        Ok(Vsock {
            mmio: m,
            rxq,
            tx: virtio::OneShotQueue::new(txq, TX, QSIZE),
            evq,
            bufs,
            rx_avail: QSIZE,
            rx_used: 0,
            ev_avail: QSIZE,
            ev_used: 0,
            cid,
            conns: [None; MAX_CONNS],
        })
    }

    /// Opens a connection to host port `port` (its echo is checked when it comes).
    pub fn connect(&mut self, port: u32) {
        if let Some(slot) = self.conns.iter_mut().find(|c| c.is_none()) {
            *slot = Some(Conn::new(Kind::ConnectBack, CONNECT_FROM, port, false));
            self.send(OP_REQUEST, CONNECT_FROM, port, 0, 0, &[]);
        }
    }

    /// Handles every event and packet received so far; returns how many.
    pub fn poll(&mut self) -> u64 {
        let mut n = 0;
        while get::<u16>(self.evq + OFF_USED + 2) != self.ev_used {
            fence(SeqCst);
            let elem = self.evq + OFF_USED + 4 + 8 * (self.ev_used % QSIZE) as u64;
            let id = get::<u32>(elem) as u16 % QSIZE;
            self.ev_used = self.ev_used.wrapping_add(1);
            let event: u32 = get(self.evq + 0x400 + id as u64 * EVENT_BUF);
            if event == 0 {
                self.conns = [None; MAX_CONNS];
                self.cid = self.mmio.read(R_CONFIG) as u64 | (self.mmio.read(R_CONFIG + 4) as u64) << 32;
                Line::new().s("vsock transport-reset cid=").u(self.cid).print();
            }
            post(self.evq, self.ev_avail, id);
            self.ev_avail = self.ev_avail.wrapping_add(1);
            fence(SeqCst);
            put(self.evq + OFF_AVAIL + 2, self.ev_avail);
            self.mmio.write(R_QUEUE_NOTIFY, EVENT);
            n += 1;
        }
        while get::<u16>(self.rxq + OFF_USED + 2) != self.rx_used {
            fence(SeqCst);
            let elem = self.rxq + OFF_USED + 4 + 8 * (self.rx_used % QSIZE) as u64;
            let (id, len) = (get::<u32>(elem) as u16 % QSIZE, get::<u32>(elem + 4) as usize);
            self.rx_used = self.rx_used.wrapping_add(1);
            let addr = self.bufs + id as u64 * BUF;
            if len >= HDR && len as u64 <= BUF {
                let hdr = read_hdr(addr);
                let payload_len = (hdr.len as usize).min(len - HDR);
                // SAFETY: receive buffer `id`, handed back by the device and untouched by anyone
                // else until it is made available again below.
                let payload = unsafe { core::slice::from_raw_parts((addr + HDR as u64) as *const u8, payload_len) };
                self.handle(&hdr, payload);
            }
            post(self.rxq, self.rx_avail, id);
            self.rx_avail = self.rx_avail.wrapping_add(1);
            fence(SeqCst);
            put(self.rxq + OFF_AVAIL + 2, self.rx_avail);
            n += 1;
        }
        if n > 0 {
            fence(SeqCst);
            self.mmio.write(R_QUEUE_NOTIFY, RX);
        }
        n
    }

    fn find(&self, local: u32, peer: u32) -> Option<usize> {
        self.conns.iter().position(|c| c.as_ref().is_some_and(|c| c.local == local && c.peer == peer))
    }

    fn handle(&mut self, h: &Hdr, payload: &[u8]) {
        if h.dst_cid != self.cid || h.src_cid != HOST_CID {
            return;
        }
        let Some(i) = self.find(h.dst_port, h.src_port) else {
            if h.op == OP_REQUEST {
                let kind = match h.dst_port {
                    ECHO_PORT => Some(Kind::Echo),
                    proto::AGENT_PORT => Some(Kind::Agent),
                    _ => None,
                };
                let slot = self.conns.iter().position(|c| c.is_none());
                if let (Some(kind), Some(slot)) = (kind, slot) {
                    self.conns[slot] = Some(Conn::new(kind, h.dst_port, h.src_port, true));
                    self.send(OP_RESPONSE, h.dst_port, h.src_port, 0, 0, &[]);
                    return;
                }
            }
            if h.op != OP_RST {
                self.send(OP_RST, h.dst_port, h.src_port, 0, 0, &[]);
            }
            return;
        };
        let (local, peer) = (h.dst_port, h.src_port);
        match h.op {
            OP_RESPONSE => {
                if let Some(c) = self.conns[i].as_mut() {
                    c.established = true;
                }
                self.send(OP_RW, local, peer, 0, 0, b"hello from the test guest\n");
            }
            OP_RW => {
                let fwd = {
                    let c = self.conns[i].as_mut().expect("found");
                    c.fwd_cnt = c.fwd_cnt.wrapping_add(payload.len() as u32);
                    c.fwd_cnt
                };
                match self.conns[i].map(|c| c.kind) {
                    Some(Kind::Echo) => self.send(OP_RW, local, peer, 0, fwd, payload),
                    Some(Kind::Agent) => self.agent_input(i, payload),
                    Some(Kind::ConnectBack) => {
                        Line::new().s("vsock connect-back ok reply=").bytes(trim(payload)).print();
                        self.send(OP_SHUTDOWN, local, peer, 3, fwd, &[]);
                    }
                    None => {}
                }
            }
            OP_SHUTDOWN => {
                self.conns[i] = None;
                self.send(OP_RST, local, peer, 0, 0, &[]);
            }
            OP_RST => self.conns[i] = None,
            OP_CREDIT_REQUEST => {
                let fwd = self.conns[i].map_or(0, |c| c.fwd_cnt);
                self.send(OP_CREDIT_UPDATE, local, peer, 0, fwd, &[]);
            }
            _ => {}
        }
    }

    /// Gathers agent-protocol frames and answers each.
    fn agent_input(&mut self, i: usize, data: &[u8]) {
        let Some(mut c) = self.conns[i] else { return };
        let room = AGENT_BUF - c.agent_len;
        if data.len() > room {
            // More than any request we take: the connection is dropped.
            self.conns[i] = None;
            self.send(OP_RST, c.local, c.peer, 0, 0, &[]);
            return;
        }
        c.agent_buf[c.agent_len..c.agent_len + data.len()].copy_from_slice(data);
        c.agent_len += data.len();
        loop {
            let mut reply = [0u8; 256];
            let (used, reply_len) = match proto::decode(&c.agent_buf[..c.agent_len]) {
                Ok(None) => break,
                Ok(Some((frame, used))) => (used, answer(&frame, &mut reply)),
                Err(_) => {
                    self.conns[i] = None;
                    self.send(OP_RST, c.local, c.peer, 0, 0, &[]);
                    return;
                }
            };
            c.agent_buf.copy_within(used..c.agent_len, 0);
            c.agent_len -= used;
            self.send(OP_RW, c.local, c.peer, 0, c.fwd_cnt, &reply[..reply_len]);
        }
        self.conns[i] = Some(c);
    }

    /// Sends one packet and waits until the device has taken it.
    fn send(&mut self, op: u16, local: u32, peer: u32, flags: u32, fwd_cnt: u32, payload: &[u8]) {
        let buf = self.bufs + QSIZE as u64 * BUF;
        let len = payload.len().min(BUF as usize - HDR);
        let h = Hdr {
            src_cid: self.cid,
            dst_cid: HOST_CID,
            src_port: local,
            dst_port: peer,
            len: len as u32,
            op,
            flags,
            fwd_cnt,
        };
        write_hdr(buf, &h);
        // SAFETY: the transmit buffer, BUF bytes, used by this driver alone and free (the last
        // send waited for the device to be done with it).
        unsafe { core::ptr::copy_nonoverlapping(payload.as_ptr(), (buf + HDR as u64) as *mut u8, len) };
        self.tx.send(&self.mmio, buf, (HDR + len) as u32);
    }
}

impl Conn {
    fn new(kind: Kind, local: u32, peer: u32, established: bool) -> Self {
        Conn { kind, local, peer, established, fwd_cnt: 0, agent_len: 0, agent_buf: [0; AGENT_BUF] }
    }
}

/// The test guest's agent: it does nothing to file systems (it has none), but records and
/// reports every request on its console, so tests see what vmm asked and when.
fn answer(frame: &Frame<'_>, out: &mut [u8]) -> usize {
    let reply = match frame.message {
        Message::Ping => Message::Ok("testguest agent"),
        Message::Quiesce { timeout_ms } => {
            let n = QUIESCES.fetch_add(1, Relaxed) + 1;
            let mut line = Line::new();
            line.s("agent quiesce n=").u(n).s(" timeout_ms=").u(timeout_ms as u64);
            // With a disk workload, quiesced means its writes are done and held.
            let held = if crate::workload::disk_agent() {
                let held = crate::workload::disk_quiesce(timeout_ms as u64);
                match held {
                    Some(writes) => line.s(" disk=held writes=").u(writes),
                    None => line.s(" disk=busy"),
                };
                held.is_some()
            } else {
                true
            };
            line.print();
            if held {
                Message::Ok("quiesced")
            } else {
                Message::Error("the disk workload did not stop writing in time")
            }
        }
        Message::Thaw => {
            let n = THAWS.fetch_add(1, Relaxed) + 1;
            let mut line = Line::new();
            line.s("agent thaw n=").u(n);
            if crate::workload::disk_agent() {
                line.s(" writes=").u(crate::workload::disk_thaw());
            }
            line.print();
            Message::Ok("thawed")
        }
        Message::SetTime { secs, nanos } => {
            Line::new().s("agent set-time secs=").u(secs as u64).s(" nanos=").u(nanos as u64).print();
            Message::Ok("time set")
        }
        Message::AddEntropy(bytes) => {
            let hash =
                bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
            Line::new().s("agent add-entropy bytes=").u(bytes.len() as u64).s(" hash=").x(hash).print();
            Message::Ok("entropy added")
        }
        Message::Exec { .. } => Message::Error("the test guest runs no commands"),
        _ => Message::Error("not a request"),
    };
    proto::encode(&Frame { id: frame.id, message: reply }, out).unwrap_or(0)
}

fn trim(b: &[u8]) -> &[u8] {
    let end = b.iter().rposition(|&c| c != b'\n' && c != b'\r').map_or(0, |i| i + 1);
    &b[..end]
}

fn read_hdr(a: u64) -> Hdr {
    Hdr {
        src_cid: get(a),
        dst_cid: get(a + 8),
        src_port: get(a + 16),
        dst_port: get(a + 20),
        len: get(a + 24),
        op: get(a + 30),
        flags: get(a + 32),
        fwd_cnt: get(a + 40),
    }
}

fn write_hdr(a: u64, h: &Hdr) {
    put(a, h.src_cid);
    put(a + 8, h.dst_cid);
    put(a + 16, h.src_port);
    put(a + 20, h.dst_port);
    put(a + 24, h.len);
    put(a + 28, 1u16); // VIRTIO_VSOCK_TYPE_STREAM
    put(a + 30, h.op);
    put(a + 32, h.flags);
    put(a + 36, BUF_ALLOC);
    put(a + 40, h.fwd_cnt);
}
