//! virtio-net on a host TAP device (virtio 1.x, section 5.1): one receive and one transmit queue.
//!
//! Transmit runs on the vCPU that notifies the queue, so every frame the guest queued has left
//! for the TAP by the time the vCPUs are paused. Receive runs on the device's input worker,
//! whenever the TAP has frames, and on the vCPU when the guest adds buffers; a frame read with no
//! buffer to take it waits in the device (and in its saved state). Frames arriving while the VM
//! is paused wait in the TAP's own queue.

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
    pub fn announce(&mut self) {
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
                match self.tap.read_frame(&mut self.rx_frame) {
                    Ok(n) if n > VNET_HDR_LEN => self.rx_len = n,
                    Ok(_) => continue,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
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
            let drop = |queue: &mut Queue, heads: &[u16]| {
                for &h in heads {
                    if queue.add_used(mem, h, 0).is_err() {
                        break;
                    }
                }
                Delivery::Dropped
            };
            let mut heads: Vec<u16> = chains.iter().map(|(h, _)| *h).collect();
            if chains.len() == limit {
                return drop(queue, &heads);
            }
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
                }
                None => {
                    heads.push(head);
                    return drop(queue, &heads);
                }
            }
        }
        let count = chains.len() as u16;
        self.rx_frame[NUM_BUFFERS_OFFSET..NUM_BUFFERS_OFFSET + 2].copy_from_slice(&count.to_le_bytes());
        let mut offset = 0;
        let mut used = Vec::with_capacity(chains.len());
        for (head, mut writer) in chains {
            let n = writer.available_bytes().min(len - offset);
            let written = writer.write_all(&self.rx_frame[offset..offset + n]).map(|_| n).unwrap_or(0);
            offset += n;
            used.push((head, written as u32));
        }
        for (head, n) in used {
            if let Err(e) = queue.add_used(mem, head, n) {
                tracing::warn!("virtio-net: cannot return receive buffer {head}: {e}");
                break;
            }
        }
        Delivery::Delivered
    }

    /// Sends every frame the guest queued.
    fn transmit(&mut self, queue: &mut Queue, mem: &GuestMemory) -> bool {
        let mut used_any = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let sent = chain.reader(mem).ok().and_then(|mut reader| {
                let len = reader.available_bytes();
                if !(VNET_HDR_LEN..=MAX_FRAME).contains(&len) {
                    return None;
                }
                reader.read_exact(&mut self.tx_frame[..len]).ok()?;
                Some(len)
            });
            match sent.map(|len| (len, self.tap.write_frame(&[IoSlice::new(&self.tx_frame[..len])]))) {
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
            if let Err(e) = queue.add_used(mem, head, 0) {
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
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = usize::try_from(offset).ok().and_then(|o| cfg.get(o + i)).copied().unwrap_or(0);
        }
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
        self.announce();
        Ok(())
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
