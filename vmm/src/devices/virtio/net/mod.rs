//! virtio-net on a host TAP device (virtio 1.x, section 5.1): one receive and one transmit queue.
//!
//! Both queues are processed on the device's input worker: whenever the TAP has frames, and
//! whenever the guest notifies a queue (KVM signals an eventfd on the notify write, so the vCPU
//! goes on without waiting for its transmit). Pausing the worker first completes what the guest
//! queued, so every frame it sent has left for the TAP by the time the state is saved. A frame
//! read with no buffer to take it waits in the device (and in its saved state). Frames arriving
//! while the VM is paused wait in the TAP's own queue.

pub mod tap;

use std::io::{IoSlice, Read, Write};
use std::os::fd::{AsFd, BorrowedFd};

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_net as bits;
use virtio_queue::{Queue, QueueT};

use super::{VirtioDevice, VIRTIO_F_VERSION_1};
use crate::devices::persist::DeviceState;
use crate::vstate::memory::GuestMemory;
pub use tap::{Tap, TapError, VNET_HDR_LEN};

type Writer<'a> = virtio_queue::Writer<'a, vm_memory::bitmap::BS<'a, vm_memory::bitmap::AtomicBitmap>>;

pub const VIRTIO_ID_NET: u32 = 1;
const RX_QUEUE: usize = 0;
const TX_QUEUE: usize = 1;
const QUEUE_SIZE: u16 = 256;
/// Largest frame a TAP gives or takes: a 64 KiB segmentation-offload frame, its Ethernet header
/// and the virtio-net header.
const MAX_FRAME: usize = 65536 + 14 + VNET_HDR_LEN;
/// Offset of `num_buffers` in `struct virtio_net_hdr_v1`.
const NUM_BUFFERS_OFFSET: usize = 10;
/// Most receive buffers one frame may take with mergeable buffers (each at least a page, per
/// the Linux driver; a hostile guest offering tiny ones gets its frame dropped instead).
const MAX_RX_CHAINS: usize = 64;

const fn feature(bit: u32) -> u64 {
    1 << bit
}

/// What we offer: checksum and segmentation offloads both ways (the TAP's vnet header carries
/// them), mergeable receive buffers, the MAC and the link status.
const OFFERED: u64 = VIRTIO_F_VERSION_1
    | feature(bits::VIRTIO_NET_F_MAC)
    | feature(bits::VIRTIO_NET_F_STATUS)
    | feature(bits::VIRTIO_NET_F_MRG_RXBUF)
    | feature(bits::VIRTIO_NET_F_CSUM)
    | feature(bits::VIRTIO_NET_F_HOST_TSO4)
    | feature(bits::VIRTIO_NET_F_HOST_TSO6)
    | feature(bits::VIRTIO_NET_F_HOST_ECN)
    | feature(bits::VIRTIO_NET_F_GUEST_CSUM)
    | feature(bits::VIRTIO_NET_F_GUEST_TSO4)
    | feature(bits::VIRTIO_NET_F_GUEST_TSO6)
    | feature(bits::VIRTIO_NET_F_GUEST_ECN);

/// Frame and byte counts, kept in the device's saved state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetCounters {
    pub rx_frames: u64,
    pub rx_bytes: u64,
    /// Frames read from the TAP that no guest buffer could take whole (a hostile or broken driver).
    pub rx_dropped: u64,
    pub tx_frames: u64,
    pub tx_bytes: u64,
    /// Frames the guest sent that the TAP refused (link down, EIO, ...) or that were malformed.
    pub tx_dropped: u64,
}

/// The device's own state; the queues are the transport's.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct NetState {
    mac: [u8; 6],
    /// A frame read from the TAP that is waiting for receive buffers (with its virtio-net header).
    #[serde(with = "serde_bytes")]
    pending_rx: Vec<u8>,
    counters: NetCounters,
}

const STATE_VERSION: u32 = 1;

pub struct Net {
    tap: Tap,
    mac: [u8; 6],
    acked_features: u64,
    queue_sizes: [u16; 2],
    /// Scratch frame buffer; `rx_len` bytes of it are a frame waiting for guest buffers.
    rx_frame: Vec<u8>,
    rx_len: usize,
    /// The TAP may hold frames: it became readable, and was not read empty since. A refill of
    /// the receive queue reads it only then.
    tap_readable: bool,
    tx_frame: Vec<u8>,
    counters: NetCounters,
    /// A TAP error is logged once, not once per frame.
    warned: bool,
}

/// Why a received frame was not delivered.
enum Delivery {
    Delivered,
    NoBuffers,
    Dropped,
}

impl Net {
    pub fn new(tap: Tap, mac: [u8; 6]) -> Self {
        Self {
            tap,
            mac,
            acked_features: 0,
            queue_sizes: [QUEUE_SIZE; 2],
            rx_frame: vec![0; MAX_FRAME],
            rx_len: 0,
            tap_readable: true,
            tx_frame: vec![0; MAX_FRAME],
            counters: NetCounters::default(),
            warned: false,
        }
    }

    pub fn counters(&self) -> NetCounters {
        self.counters
    }

    fn acked(&self, bit: u32) -> bool {
        self.acked_features & feature(bit) != 0
    }

    /// TUN_F_* for what the guest accepts on received frames.
    fn tun_offloads(&self) -> u32 {
        let mut flags = 0;
        if self.acked(bits::VIRTIO_NET_F_GUEST_CSUM) {
            flags |= libc::TUN_F_CSUM;
            if self.acked(bits::VIRTIO_NET_F_GUEST_TSO4) {
                flags |= libc::TUN_F_TSO4;
            }
            if self.acked(bits::VIRTIO_NET_F_GUEST_TSO6) {
                flags |= libc::TUN_F_TSO6;
            }
            if self.acked(bits::VIRTIO_NET_F_GUEST_ECN) {
                flags |= libc::TUN_F_TSO_ECN;
            }
        }
        flags
    }

    fn warn_once(&mut self, what: &str, err: &std::io::Error) {
        if !self.warned {
            self.warned = true;
            tracing::warn!("virtio-net {}: {what}: {err} (further errors counted, not logged)", self.tap.name());
        }
    }

    /// Sends a RARP announcing the guest's MAC, as QEMU does after a migration, so switches and
    /// bridges learn at once where the guest now is.
    fn announce(&mut self) {
        let mut frame = [0u8; VNET_HDR_LEN + 60];
        let eth = &mut frame[VNET_HDR_LEN..];
        eth[0..6].fill(0xff);
        eth[6..12].copy_from_slice(&self.mac);
        eth[12..14].copy_from_slice(&0x8035u16.to_be_bytes()); // ETH_P_RARP
        eth[14..16].copy_from_slice(&1u16.to_be_bytes()); // Ethernet
        eth[16..18].copy_from_slice(&0x0800u16.to_be_bytes()); // IPv4
        eth[18] = 6;
        eth[19] = 4;
        eth[20..22].copy_from_slice(&3u16.to_be_bytes()); // reverse request
        eth[22..28].copy_from_slice(&self.mac);
        eth[32..38].copy_from_slice(&self.mac);
        if let Err(e) = self.tap.write_frame(&[IoSlice::new(&frame)]) {
            self.warn_once("cannot send the announcement", &e);
        }
    }

    /// Moves frames from the TAP into the receive queue until either runs dry.
    fn receive(&mut self, queue: &mut Queue, mem: &GuestMemory) -> bool {
        let mut used_any = false;
        loop {
            if self.rx_len == 0 {
                if !self.tap_readable {
                    break;
                }
                match self.tap.read_frame(&mut self.rx_frame) {
                    Ok(n) if n > VNET_HDR_LEN => self.rx_len = n,
                    Ok(_) => continue,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        self.tap_readable = false;
                        break;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        self.warn_once("cannot read from the TAP", &e);
                        break;
                    }
                }
            }
            match self.deliver(queue, mem) {
                Delivery::Delivered => {
                    used_any = true;
                    self.counters.rx_frames += 1;
                    self.counters.rx_bytes += (self.rx_len - VNET_HDR_LEN) as u64;
                }
                Delivery::Dropped => {
                    used_any = true;
                    self.counters.rx_dropped += 1;
                }
                Delivery::NoBuffers => break,
            }
            self.rx_len = 0;
        }
        used_any
    }

    /// Writes the waiting frame into as many receive chains as it takes (one without mergeable
    /// buffers), or none if the queue has too few.
    fn deliver(&mut self, queue: &mut Queue, mem: &GuestMemory) -> Delivery {
        let mergeable = self.acked(bits::VIRTIO_NET_F_MRG_RXBUF);
        let len = self.rx_len;
        let limit = if mergeable { MAX_RX_CHAINS } else { 1 };
        let first_avail = queue.next_avail();
        let mut chains: Vec<(u16, Writer<'_>)> = Vec::new();
        let mut room = 0usize;
        while room < len {
            // Buffers too few or too small to take the frame whole, or not writable at all:
            // the frame is dropped and the buffers go back empty.
            let unusable = if chains.len() == limit {
                Some(None)
            } else {
                let Some(chain) = queue.pop_descriptor_chain(mem) else {
                    // Put back what was taken; the frame waits for more buffers.
                    queue.set_next_avail(first_avail);
                    return Delivery::NoBuffers;
                };
                let head = chain.head_index();
                match chain.writer(mem).ok().filter(|w| w.available_bytes() > 0) {
                    Some(w) => {
                        room += w.available_bytes();
                        chains.push((head, w));
                        None
                    }
                    None => Some(Some(head)),
                }
            };
            if let Some(extra) = unusable {
                let empty: Vec<(u16, u32)> = chains.iter().map(|(h, _)| (*h, 0)).chain(extra.map(|h| (h, 0))).collect();
                if let Err(e) = super::add_used_together(queue, mem, &empty) {
                    tracing::warn!("virtio-net: cannot return receive buffers: {e}");
                }
                return Delivery::Dropped;
            }
        }
        let count = chains.len() as u16;
        self.rx_frame[NUM_BUFFERS_OFFSET..NUM_BUFFERS_OFFSET + 2].copy_from_slice(&count.to_le_bytes());
        let mut offset = 0;
        let mut used = [(0u16, 0u32); MAX_RX_CHAINS];
        for (slot, (head, mut writer)) in used.iter_mut().zip(chains) {
            let n = writer.available_bytes().min(len - offset);
            let written = writer.write_all(&self.rx_frame[offset..offset + n]).map(|_| n).unwrap_or(0);
            offset += n;
            *slot = (head, written as u32);
        }
        if let Err(e) = super::add_used_together(queue, mem, &used[..count as usize]) {
            tracing::warn!("virtio-net: cannot return receive buffers: {e}");
        }
        Delivery::Delivered
    }

    /// Sends every frame the guest queued. Each buffer goes back to the guest as soon as its
    /// frame is copied out, before the TAP write: a driver that waits for its buffer (the test
    /// guest does) then prepares its next frame while this thread writes, and its notification
    /// is there when the write is done instead of waking this thread from a sleep.
    fn transmit(&mut self, queue: &mut Queue, mem: &GuestMemory) -> bool {
        let mut used_any = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let copied = chain.reader(mem).ok().and_then(|mut reader| {
                let len = reader.available_bytes();
                if !(VNET_HDR_LEN..=MAX_FRAME).contains(&len) {
                    return None;
                }
                reader.read_exact(&mut self.tx_frame[..len]).ok()?;
                Some(len)
            });
            let returned = queue.add_used(mem, head, 0);
            match copied.map(|len| (len, self.tap.write_frame(&[IoSlice::new(&self.tx_frame[..len])]))) {
                Some((len, Ok(_))) => {
                    self.counters.tx_frames += 1;
                    self.counters.tx_bytes += (len - VNET_HDR_LEN) as u64;
                }
                Some((_, Err(e))) => {
                    self.counters.tx_dropped += 1;
                    self.warn_once("cannot write to the TAP", &e);
                }
                None => self.counters.tx_dropped += 1,
            }
            if let Err(e) = returned {
                tracing::warn!("virtio-net: cannot return transmit buffer {head}: {e}");
                break;
            }
            used_any = true;
        }
        used_any
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        OFFERED
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_net_config { u8 mac[6]; le16 status; ... }
        let mut cfg = [0u8; 8];
        cfg[..6].copy_from_slice(&self.mac);
        cfg[6..8].copy_from_slice(&(bits::VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        super::read_config_bytes(&cfg, offset, data);
    }

    fn activate(&mut self, features: u64) {
        self.acked_features = features;
        if let Err(e) = self.tap.set_offload(self.tun_offloads()) {
            tracing::warn!("virtio-net: {e}");
        }
    }

    fn reset(&mut self) {
        self.acked_features = 0;
        self.rx_len = 0;
        self.tap_readable = true;
        if let Err(e) = self.tap.set_offload(0) {
            tracing::warn!("virtio-net: {e}");
        }
    }

    fn describe(&self) -> String {
        let m = self.mac;
        let c = self.counters;
        format!(
            "virtio-net tap={} mac={:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x} (rx {} frames, {} dropped; tx {} frames, {} dropped)",
            self.tap.name(),
            m[0],
            m[1],
            m[2],
            m[3],
            m[4],
            m[5],
            c.rx_frames,
            c.rx_dropped,
            c.tx_frames,
            c.tx_dropped
        )
    }

    fn input_fd(&self) -> Option<(BorrowedFd<'_>, usize)> {
        Some((self.tap.as_fd(), RX_QUEUE))
    }

    fn input_readable(&mut self) {
        self.tap_readable = true;
    }

    fn save_state(&self) -> Option<DeviceState> {
        let state =
            NetState { mac: self.mac, pending_rx: self.rx_frame[..self.rx_len].to_vec(), counters: self.counters };
        Some(DeviceState::encode(STATE_VERSION, &state))
    }

    fn restore_state(&mut self, state: Option<&DeviceState>) -> Result<(), String> {
        let state: NetState = state.ok_or("no virtio-net state in the snapshot")?.decode(STATE_VERSION)?;
        if state.mac != self.mac {
            return Err("the snapshot's MAC address differs from the configuration's".into());
        }
        if state.pending_rx.len() > MAX_FRAME
            || (!state.pending_rx.is_empty() && state.pending_rx.len() <= VNET_HDR_LEN)
        {
            return Err(format!("a waiting frame of {} bytes", state.pending_rx.len()));
        }
        self.rx_frame[..state.pending_rx.len()].copy_from_slice(&state.pending_rx);
        self.rx_len = state.pending_rx.len();
        self.counters = state.counters;
        Ok(())
    }

    fn restored(&mut self) {
        self.announce();
    }

    fn process_queue(&mut self, index: usize, queues: &mut [Queue], mem: &GuestMemory) -> bool {
        let Some(queue) = queues.get_mut(index) else { return false };
        match index {
            RX_QUEUE => self.receive(queue, mem),
            TX_QUEUE => self.transmit(queue, mem),
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    //! virtio-net driven through its MMIO transport as a guest driver would, on a real TAP in a
    //! private network namespace (root), with frames injected through a packet socket on the
    //! TAP: what a hostile or broken driver does breaks its own frames, never the VMM.

    use std::process::Command;

    use vm_memory::{Bytes, GuestAddress};
    use vmm_sys_util::eventfd::EventFd;

    use super::*;
    use crate::devices::virtio::mmio::{
        MmioTransport, STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FEATURES_OK,
    };
    use crate::devices::BusDevice;

    const RXQ: u64 = 0x10000;
    const TXQ: u64 = 0x20000;
    const BUFS: u64 = 0x40000;
    const QSIZE: u16 = 16;
    const F_WRITE: u16 = 2;
    const F_NEXT: u16 = 1;

    /// A TAP named `name` in a fresh network namespace of this thread, up, with a large MTU,
    /// without IPv6 (whose router and multicast chatter would reach the device too) and without
    /// a queueing discipline.
    fn private_tap(name: &str) {
        // SAFETY: unshare(2) with CLONE_NEWNET changes only this thread's network namespace.
        assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0, "unshare: {}", std::io::Error::last_os_error());
        let ip = |args: &[&str]| assert!(Command::new("ip").args(args).status().unwrap().success(), "ip {args:?}");
        ip(&["tuntap", "add", "dev", name, "mode", "tap"]);
        // /proc/sys/net shows the namespace of the thread that opens it.
        std::fs::write(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"), "1").unwrap();
        ip(&["link", "set", name, "mtu", "9000"]);
        ip(&["link", "set", name, "up"]);
        // No queueing discipline: a frame sent on the TAP is in its queue when send returns.
        let tc = Command::new("tc").args(["qdisc", "replace", "dev", name, "root", "noqueue"]).status().unwrap();
        assert!(tc.success(), "tc qdisc replace dev {name} root noqueue");
    }

    /// Sends `frame` into the TAP as the host's network would (it reaches the device's reader).
    fn inject(name: &str, frame: &[u8]) {
        // SAFETY: socket(2) with constant arguments.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
        assert!(fd >= 0);
        let cname = std::ffi::CString::new(name).unwrap();
        // SAFETY: sockaddr_ll is plain data; the name is NUL-terminated and lives for the call.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        // SAFETY: as above.
        addr.sll_ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) } as i32;
        addr.sll_halen = 6;
        // SAFETY: sendto(2) reads `frame` and `addr`, which live for the call; fd is ours.
        let sent = unsafe {
            let n = libc::sendto(
                fd,
                frame.as_ptr().cast(),
                frame.len(),
                0,
                std::ptr::addr_of!(addr).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            );
            libc::close(fd);
            n
        };
        assert_eq!(sent, frame.len() as isize, "inject: {}", std::io::Error::last_os_error());
    }

    fn frame(len: usize, fill: u8) -> Vec<u8> {
        let mut f = vec![fill; len];
        f[0..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x42]);
        f[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x43]);
        f[12..14].copy_from_slice(&0x88b5u16.to_be_bytes()); // local experimental ethertype
        f
    }

    /// Opens `name`, waiting while it is still attached to a file just closed: a child another
    /// test thread is spawning holds a copy of every descriptor until its exec, so the TAP of a
    /// dropped device may stay busy for a moment.
    fn open_tap(name: &str) -> Tap {
        for _ in 0..200 {
            match Tap::open(name) {
                Err(TapError::InUse(_)) => std::thread::sleep(std::time::Duration::from_millis(10)),
                other => return other.unwrap(),
            }
        }
        panic!("{name} stayed in use for 2 s");
    }

    struct Driver {
        dev: MmioTransport,
        mem: GuestMemory,
        rx_avail: u16,
        tx_avail: u16,
    }

    impl Driver {
        fn new(tap: &str, features: u64) -> Self {
            let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
            let net = Net::new(open_tap(tap), [0x02, 0, 0, 0, 0, 0x42]);
            let mut dev = MmioTransport::new(Box::new(net), mem.clone(), EventFd::new(libc::EFD_NONBLOCK).unwrap());
            let w = |dev: &mut MmioTransport, off: u64, v: u32| dev.write(off, &v.to_le_bytes());
            w(&mut dev, 0x70, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
            for (sel, value) in [(0, features as u32), (1, (features >> 32) as u32)] {
                w(&mut dev, 0x24, sel);
                w(&mut dev, 0x20, value);
            }
            w(&mut dev, 0x70, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
            for (q, base) in [(0u32, RXQ), (1, TXQ)] {
                w(&mut dev, 0x30, q);
                w(&mut dev, 0x38, QSIZE.into());
                for (off, addr) in [(0x80, base), (0x90, base + 0x1000), (0xa0, base + 0x2000)] {
                    w(&mut dev, off, addr as u32);
                    w(&mut dev, off + 4, 0);
                }
                w(&mut dev, 0x44, 1);
            }
            w(&mut dev, 0x70, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
            Self { dev, mem, rx_avail: 0, tx_avail: 0 }
        }

        fn desc(&self, queue: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
            let d = queue + 16 * u64::from(i);
            self.mem.write_obj(addr, GuestAddress(d)).unwrap();
            self.mem.write_obj(len, GuestAddress(d + 8)).unwrap();
            self.mem.write_obj(flags, GuestAddress(d + 12)).unwrap();
            self.mem.write_obj(next, GuestAddress(d + 14)).unwrap();
        }

        /// Makes receive buffer chain `head` available and notifies the receive queue.
        fn give_rx(&mut self, head: u16) {
            let slot = u64::from(self.rx_avail % QSIZE);
            self.mem.write_obj(head, GuestAddress(RXQ + 0x1000 + 4 + 2 * slot)).unwrap();
            self.rx_avail = self.rx_avail.wrapping_add(1);
            self.mem.write_obj(self.rx_avail, GuestAddress(RXQ + 0x1000 + 2)).unwrap();
            self.dev.write(0x50, &0u32.to_le_bytes());
        }

        fn send_tx(&mut self, head: u16) {
            let slot = u64::from(self.tx_avail % QSIZE);
            self.mem.write_obj(head, GuestAddress(TXQ + 0x1000 + 4 + 2 * slot)).unwrap();
            self.tx_avail = self.tx_avail.wrapping_add(1);
            self.mem.write_obj(self.tx_avail, GuestAddress(TXQ + 0x1000 + 2)).unwrap();
            self.dev.write(0x50, &1u32.to_le_bytes());
        }

        /// The used entries of the receive queue so far: (head, length).
        fn rx_used(&self) -> Vec<(u32, u32)> {
            let idx: u16 = self.mem.read_obj(GuestAddress(RXQ + 0x2000 + 2)).unwrap();
            (0..idx)
                .map(|i| {
                    let e = RXQ + 0x2000 + 4 + 8 * u64::from(i % QSIZE);
                    (self.mem.read_obj(GuestAddress(e)).unwrap(), self.mem.read_obj(GuestAddress(e + 4)).unwrap())
                })
                .collect()
        }

        fn tx_used(&self) -> u16 {
            self.mem.read_obj(GuestAddress(TXQ + 0x2000 + 2)).unwrap()
        }

        /// Sends `frame` into the TAP and notifies the receive queue until the device has taken
        /// it (delivered, dropped, or waiting for buffers). Right after the device attaches, the
        /// kernel drops frames until its link watch has activated the TAP's queue.
        fn receive_frame(&mut self, tap: &str, frame: &[u8]) {
            let before = (self.counters(), self.rx_used().len());
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            loop {
                inject(tap, frame);
                // As the input worker does when the TAP becomes readable.
                self.dev.process_input(RX_QUEUE, true);
                let pending = !self.state().pending_rx.is_empty();
                if pending || (self.counters(), self.rx_used().len()) != before {
                    return;
                }
                assert!(std::time::Instant::now() < deadline, "the device never got the frame");
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }

        fn state(&self) -> NetState {
            self.dev.snapshot().device_state.unwrap().decode(STATE_VERSION).unwrap()
        }

        fn counters(&self) -> NetCounters {
            self.state().counters
        }
    }

    #[test]
    fn a_frame_spans_mergeable_buffers_and_waits_for_them() {
        private_tap("vmmut0");
        let mrg = VIRTIO_F_VERSION_1 | feature(bits::VIRTIO_NET_F_MRG_RXBUF);
        let mut d = Driver::new("vmmut0", mrg);
        let sent = frame(3000, 0xab);
        // No buffers yet: the frame waits in the device.
        d.receive_frame("vmmut0", &sent);
        assert!(d.rx_used().is_empty());
        assert_eq!(d.state().pending_rx.len(), VNET_HDR_LEN + 3000);
        // Two 2 KiB buffers take the 12-byte header and 3000 bytes; the first says so.
        d.desc(RXQ, 0, BUFS, 2048, F_WRITE, 0);
        d.desc(RXQ, 1, BUFS + 0x1000, 2048, F_WRITE, 0);
        d.give_rx(0);
        assert!(d.rx_used().is_empty(), "delivered a frame into too few buffers");
        d.give_rx(1);
        assert_eq!(d.rx_used(), [(0, 2048), (1, (VNET_HDR_LEN + 3000 - 2048) as u32)]);
        let num_buffers: u16 = d.mem.read_obj(GuestAddress(BUFS + NUM_BUFFERS_OFFSET as u64)).unwrap();
        assert_eq!(num_buffers, 2);
        let mut got = vec![0u8; 3000];
        d.mem.read_slice(&mut got[..2048 - VNET_HDR_LEN], GuestAddress(BUFS + VNET_HDR_LEN as u64)).unwrap();
        d.mem.read_slice(&mut got[2048 - VNET_HDR_LEN..], GuestAddress(BUFS + 0x1000)).unwrap();
        assert_eq!(got, sent);
        assert_eq!(d.counters().rx_frames, 1);
    }

    #[test]
    fn hostile_receive_buffers_drop_the_frame_only() {
        private_tap("vmmut1");
        let mut d = Driver::new("vmmut1", VIRTIO_F_VERSION_1);
        // Without mergeable buffers a frame must fit one chain: a 100-byte buffer cannot take 1000.
        d.desc(RXQ, 0, BUFS, 100, F_WRITE, 0);
        d.give_rx(0);
        d.receive_frame("vmmut1", &frame(1000, 1));
        assert_eq!(d.rx_used(), [(0, 0)]);
        // A device-readable (not writable) buffer, and one outside guest memory.
        d.desc(RXQ, 1, BUFS, 2048, 0, 0);
        d.give_rx(1);
        d.receive_frame("vmmut1", &frame(100, 2));
        d.desc(RXQ, 2, 0xffff_0000_0000, 2048, F_WRITE, 0);
        d.give_rx(2);
        d.receive_frame("vmmut1", &frame(100, 3));
        assert_eq!(d.counters().rx_dropped, 3);
        // A proper buffer still gets the next frame.
        d.desc(RXQ, 3, BUFS, 2048, F_WRITE, 0);
        d.give_rx(3);
        d.receive_frame("vmmut1", &frame(60, 4));
        assert_eq!(d.rx_used().last(), Some(&(3, (VNET_HDR_LEN + 60) as u32)));
    }

    #[test]
    fn bad_transmits_and_a_down_link_are_counted() {
        private_tap("vmmut2");
        let mut d = Driver::new("vmmut2", VIRTIO_F_VERSION_1);
        // Shorter than the virtio-net header; a loop; outside memory.
        d.desc(TXQ, 0, BUFS, 4, 0, 0);
        d.send_tx(0);
        d.desc(TXQ, 1, BUFS, 64, F_NEXT, 1);
        d.send_tx(1);
        d.desc(TXQ, 2, 0xffff_0000_0000, 64, 0, 0);
        d.send_tx(2);
        // The loop is cut at the queue size (virtio-queue's bound): its 16 descriptors go as one
        // frame, the guest's own garbage.
        assert_eq!(d.tx_used(), 3);
        let c = d.counters();
        assert_eq!((c.tx_frames, c.tx_dropped), (1, 2));
        // A good frame leaves; with the link down the TAP refuses it: dropped and counted.
        d.mem.write_slice(&[0u8; VNET_HDR_LEN], GuestAddress(BUFS)).unwrap();
        d.mem.write_slice(&frame(60, 5), GuestAddress(BUFS + VNET_HDR_LEN as u64)).unwrap();
        d.desc(TXQ, 3, BUFS, (VNET_HDR_LEN + 60) as u32, 0, 0);
        d.send_tx(3);
        assert_eq!(d.counters().tx_frames, 2);
        assert!(Command::new("ip").args(["link", "set", "vmmut2", "down"]).status().unwrap().success());
        d.send_tx(3);
        assert_eq!(d.tx_used(), 5);
        let c = d.counters();
        assert_eq!((c.tx_frames, c.tx_dropped), (2, 3));
    }

    #[test]
    fn a_waiting_frame_survives_save_and_restore() {
        private_tap("vmmut3");
        let mut d = Driver::new("vmmut3", VIRTIO_F_VERSION_1);
        d.receive_frame("vmmut3", &frame(200, 7)); // no buffer: it waits in the device
        let saved = d.dev.snapshot();
        assert_eq!(saved.device_state.as_ref().map(|s| s.version), Some(STATE_VERSION));
        drop(d);
        let mut e = Driver::new("vmmut3", VIRTIO_F_VERSION_1);
        e.dev.restore_state(&saved).unwrap();
        e.desc(RXQ, 0, BUFS, 2048, F_WRITE, 0);
        e.give_rx(0);
        assert_eq!(e.rx_used(), [(0, (VNET_HDR_LEN + 200) as u32)]);
        let mut got = vec![0u8; 200];
        e.mem.read_slice(&mut got, GuestAddress(BUFS + VNET_HDR_LEN as u64)).unwrap();
        assert_eq!(got, frame(200, 7));
    }

    /// The checksum offload the guest accepted is set on the TAP again when a restored device
    /// is activated: TCP the host sends then reaches the guest with its checksum left to do
    /// (`VIRTIO_NET_HDR_F_NEEDS_CSUM`), as it did before the snapshot.
    #[test]
    fn offloads_are_set_on_the_tap_again_after_a_restore() {
        private_tap("vmmut4");
        let ip = |args: &[&str]| assert!(Command::new("ip").args(args).status().unwrap().success(), "ip {args:?}");
        ip(&["addr", "add", "10.9.0.1/24", "dev", "vmmut4"]);
        ip(&["neigh", "add", "10.9.0.2", "lladdr", "02:00:00:00:00:42", "dev", "vmmut4"]);
        let csum = VIRTIO_F_VERSION_1 | feature(bits::VIRTIO_NET_F_GUEST_CSUM);
        // A TCP SYN from the host's stack (never answered) into one receive buffer: its
        // virtio-net header's flags.
        let syn_flags = |d: &mut Driver| {
            let used_before = d.rx_used().len();
            d.desc(RXQ, 0, BUFS, 2048, F_WRITE, 0);
            d.give_rx(0);
            // Until the kernel's link watch has activated the freshly attached TAP, it drops
            // what it sends: try again until a frame comes.
            for _ in 0..50 {
                if d.rx_used().len() > used_before {
                    break;
                }
                let _ = std::net::TcpStream::connect_timeout(
                    &"10.9.0.2:9".parse().unwrap(),
                    std::time::Duration::from_millis(100),
                );
                d.dev.process_input(RX_QUEUE, true);
            }
            assert_eq!(d.rx_used().len(), used_before + 1, "no frame reached the device");
            d.mem.read_obj::<u8>(GuestAddress(BUFS)).unwrap()
        };
        let mut d = Driver::new("vmmut4", csum);
        assert_eq!(syn_flags(&mut d) & bits::VIRTIO_NET_HDR_F_NEEDS_CSUM as u8, 1);
        let saved = d.dev.snapshot();
        drop(d);
        // A device built fresh (no offload on the TAP) and restored.
        let mut e = Driver::new("vmmut4", VIRTIO_F_VERSION_1);
        assert_eq!(syn_flags(&mut e) & bits::VIRTIO_NET_HDR_F_NEEDS_CSUM as u8, 0);
        drop(e);
        let mut f = Driver::new("vmmut4", VIRTIO_F_VERSION_1);
        f.dev.write(0x70, &0u32.to_le_bytes()); // reset: the TAP has no offload now
        f.dev.restore_state(&saved).unwrap();
        // The restored queues go on where `d`'s were (one buffer made available and used); this
        // test's guest memory is fresh, so show the used entry the device thinks it wrote.
        f.rx_avail = 1;
        f.mem.write_obj(1u16, GuestAddress(RXQ + 0x2000 + 2)).unwrap();
        assert_eq!(syn_flags(&mut f) & bits::VIRTIO_NET_HDR_F_NEEDS_CSUM as u8, 1);
    }
}
