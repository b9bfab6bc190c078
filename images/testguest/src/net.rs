//! A polling virtio-net driver (ring 3, no offloads, no mergeable buffers) and the services the
//! `net` workload runs on it: ARP replies and ICMP echo for its address, a UDP echo on port 7,
//! and on port 9000 a sequenced service that answers each request number exactly once, in order.
//!
//! The sequenced service keeps the last number it answered and how many it answered in guest
//! memory, so a snapshot carries them: a request for the next number is answered (and counted),
//! a repeat of the last one (the client lost the reply) gets the same reply again, anything else
//! is ignored. A client that sees `answered == seq` in every reply knows that nothing was
//! answered twice or skipped, even across a snapshot, a kill and a resume.

use core::sync::atomic::{fence, AtomicU64, Ordering::Relaxed, Ordering::SeqCst};

use crate::virtio::{self, get, put, Error, Mmio, DESC_WRITE, OFF_AVAIL, OFF_DESC, OFF_USED, R_CONFIG, R_QUEUE_NOTIFY};

const DEVICE_NET: u32 = 1;
const F_MAC: u32 = 1 << 5;
const RX: u32 = 0;
const TX: u32 = 1;
const QSIZE: u16 = 16;
/// Each receive buffer takes a whole frame (virtio-net header, 1514-byte frame) without mergeable buffers.
pub const BUF: u64 = 2048;
const HDR: usize = 12;
/// Bytes the driver needs: two queue pages, QSIZE receive buffers and one transmit buffer.
pub const AREA_BYTES: u64 = 2 * 4096 + (QSIZE as u64 + 1) * BUF;

pub const ECHO_PORT: u16 = 7;
pub const SEQ_PORT: u16 = 9000;

/// The sequenced service's state (in guest memory, so in every snapshot).
pub static LAST_SEQ: AtomicU64 = AtomicU64::new(0);
pub static ANSWERED: AtomicU64 = AtomicU64::new(0);

pub struct Net {
    mmio: Mmio,
    rxq: u64,
    tx: virtio::OneShotQueue,
    bufs: u64,
    rx_avail: u16,
    rx_used: u16,
    pub mac: [u8; 6],
    pub ip: [u8; 4],
}

impl Net {
    /// Finds and sets up the first virtio-net, its queues and buffers in the zeroed `area`
    /// (AREA_BYTES, page aligned).
    pub fn init(windows: &[u64], area: u64, ip: [u8; 4]) -> Result<Net, Error> {
        let base = virtio::find_device(windows, DEVICE_NET, Error::NoNetDevice)?;
        let m = Mmio(base);
        let features = virtio::negotiate(&m, F_MAC)?;
        let (rxq, txq, bufs) = (area, area + 4096, area + 8192);
        virtio::setup_queue(&m, RX, QSIZE, rxq)?;
        virtio::setup_queue(&m, TX, QSIZE, txq)?;
        let mut mac = [0u8; 6];
        if features & F_MAC != 0 {
            for (i, b) in mac.iter_mut().enumerate() {
                *b = (m.read(R_CONFIG + (i as u64 & !3)) >> (8 * (i % 4))) as u8;
            }
        } else {
            mac = [0x02, 0, 0, 0, 0, 0x01];
        }
        // Every receive buffer is available from the start.
        for i in 0..QSIZE {
            let d = rxq + OFF_DESC + 16 * i as u64;
            put(d, bufs + i as u64 * BUF);
            put(d + 8, BUF as u32);
            put(d + 12, DESC_WRITE);
            put(d + 14, 0u16);
            put(rxq + OFF_AVAIL + 4 + 2 * i as u64, i);
        }
        fence(SeqCst);
        put(rxq + OFF_AVAIL + 2, QSIZE);
        virtio::driver_ok(&m);
        m.write(R_QUEUE_NOTIFY, RX);
        let tx = virtio::OneShotQueue::new(txq, TX, QSIZE);
        Ok(Net { mmio: m, rxq, tx, bufs, rx_avail: QSIZE, rx_used: 0, mac, ip })
    }

    fn tx_buf(&self) -> u64 {
        self.bufs + QSIZE as u64 * BUF
    }

    /// Handles every frame received so far; returns how many.
    pub fn poll(&mut self) -> u64 {
        let mut n = 0;
        while get::<u16>(self.rxq + OFF_USED + 2) != self.rx_used {
            fence(SeqCst);
            let elem = self.rxq + OFF_USED + 4 + 8 * (self.rx_used % QSIZE) as u64;
            let (id, len) = (get::<u32>(elem), get::<u32>(elem + 4));
            self.rx_used = self.rx_used.wrapping_add(1);
            if id < QSIZE as u32 && (len as u64) <= BUF && len as usize > HDR {
                let addr = self.bufs + id as u64 * BUF + HDR as u64;
                // SAFETY: receive buffer `id`, which the device has handed back and nobody
                // else touches until it is made available again below.
                let frame = unsafe { core::slice::from_raw_parts_mut(addr as *mut u8, len as usize - HDR) };
                self.handle(frame);
            }
            // The buffer goes back to the device.
            put(self.rxq + OFF_AVAIL + 4 + 2 * (self.rx_avail % QSIZE) as u64, (id % QSIZE as u32) as u16);
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

    /// Answers `frame` in place (it becomes the reply) if it is for us.
    fn handle(&mut self, f: &mut [u8]) {
        if f.len() < 14 {
            return;
        }
        let reply_len = match be16(f, 12) {
            0x0806 => self.arp(f),
            0x0800 => self.ipv4(f),
            _ => None,
        };
        if let Some(len) = reply_len {
            let (src, dst) = (6, 0);
            f.copy_within(src..src + 6, dst);
            f[6..12].copy_from_slice(&self.mac);
            self.send(&f[..len]);
        }
    }

    fn arp(&self, f: &mut [u8]) -> Option<usize> {
        // htype 1, ptype IPv4, hlen 6, plen 4, op 1 (request), for our address.
        if f.len() < 42 || be16(f, 14) != 1 || be16(f, 16) != 0x0800 || f[18] != 6 || f[19] != 4 || be16(f, 20) != 1 {
            return None;
        }
        if f[38..42] != self.ip {
            return None;
        }
        let (sha, spa) = (arr6(&f[22..28]), arr4(&f[28..32]));
        f[20..22].copy_from_slice(&2u16.to_be_bytes());
        f[22..28].copy_from_slice(&self.mac);
        f[28..32].copy_from_slice(&self.ip);
        f[32..38].copy_from_slice(&sha);
        f[38..42].copy_from_slice(&spa);
        Some(42)
    }

    fn ipv4(&self, f: &mut [u8]) -> Option<usize> {
        if f.len() < 34 || f[14] >> 4 != 4 {
            return None;
        }
        let ihl = (f[14] & 0xf) as usize * 4;
        let total = be16(f, 16) as usize;
        if ihl < 20 || total < ihl || 14 + total > f.len() || f[30..34] != self.ip {
            return None;
        }
        // Fragments are not ours to answer.
        if be16(f, 20) & 0x3fff != 0 {
            return None;
        }
        let l4 = 14 + ihl;
        let end = 14 + total;
        let answered = match f[23] {
            1 => icmp_echo(&mut f[l4..end]),
            17 => udp(&mut f[l4..end]),
            _ => false,
        };
        if !answered {
            return None;
        }
        // Swapping the addresses leaves the header checksum as it was.
        let (src, dst) = (arr4(&f[26..30]), arr4(&f[30..34]));
        f[26..30].copy_from_slice(&dst);
        f[30..34].copy_from_slice(&src);
        Some(end)
    }

    /// Sends one frame and waits until the device has taken it.
    fn send(&mut self, frame: &[u8]) {
        let buf = self.tx_buf();
        let len = frame.len().min(BUF as usize - HDR);
        for i in 0..HDR {
            put(buf + i as u64, 0u8);
        }
        // SAFETY: the transmit buffer, BUF bytes, used by this driver alone and free (the last
        // send waited for the device to be done with it).
        unsafe { core::ptr::copy_nonoverlapping(frame.as_ptr(), (buf + HDR as u64) as *mut u8, len) };
        self.tx.send(&self.mmio, buf, (HDR + len) as u32);
    }
}

/// Turns an ICMP echo request into its reply.
fn icmp_echo(p: &mut [u8]) -> bool {
    if p.len() < 8 || p[0] != 8 || p[1] != 0 {
        return false;
    }
    p[0] = 0;
    p[2] = 0;
    p[3] = 0;
    let sum = checksum(p);
    p[2..4].copy_from_slice(&sum.to_be_bytes());
    true
}

/// UDP echo (port 7) and the sequenced service (port 9000); the reply goes back to the sender's port.
fn udp(p: &mut [u8]) -> bool {
    if p.len() < 8 || (be16(p, 4) as usize) != p.len() {
        return false;
    }
    let (sport, dport) = (be16(p, 0), be16(p, 2));
    let answer = match dport {
        ECHO_PORT => true,
        SEQ_PORT if p.len() >= 8 + 16 => sequenced(&mut p[8..]),
        _ => false,
    };
    if answer {
        p[0..2].copy_from_slice(&dport.to_be_bytes());
        p[2..4].copy_from_slice(&sport.to_be_bytes());
        // No checksum (allowed for UDP over IPv4): the payload may have changed.
        p[6] = 0;
        p[7] = 0;
    }
    answer
}

/// Request: seq (u64 BE), 8 more bytes. Reply: seq, then how many numbers were answered so far.
fn sequenced(payload: &mut [u8]) -> bool {
    let seq = u64::from_be_bytes(payload[0..8].try_into().unwrap_or([0; 8]));
    let last = LAST_SEQ.load(Relaxed);
    if seq == last.wrapping_add(1) {
        ANSWERED.fetch_add(1, Relaxed);
        LAST_SEQ.store(seq, Relaxed);
    } else if seq != last || seq == 0 {
        return false;
    }
    payload[8..16].copy_from_slice(&ANSWERED.load(Relaxed).to_be_bytes());
    true
}

/// The Internet checksum (RFC 1071) of `data`.
fn checksum(data: &[u8]) -> u16 {
    let mut sum = 0u32;
    for chunk in data.chunks(2) {
        let word = if chunk.len() == 2 { u16::from_be_bytes([chunk[0], chunk[1]]) } else { (chunk[0] as u16) << 8 };
        sum += word as u32;
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn be16(f: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([f[at], f[at + 1]])
}

fn arr4(s: &[u8]) -> [u8; 4] {
    [s[0], s[1], s[2], s[3]]
}

fn arr6(s: &[u8]) -> [u8; 6] {
    [s[0], s[1], s[2], s[3], s[4], s[5]]
}
