//! virtio: the device-side model (`VirtioDevice`), the MMIO transport and the devices.

pub mod block;
pub mod disk_copy;
pub mod input;
pub mod mmio;
pub mod net;
pub mod vsock;

use std::os::fd::BorrowedFd;

use crate::devices::persist::DeviceState;
use crate::vstate::memory::GuestMemory;
use virtio_queue::Queue;

pub use block::Block;
pub use mmio::{MmioTransport, MmioTransportState};
pub use net::Net;
pub use vsock::Vsock;

/// VIRTIO_F_VERSION_1: the modern (virtio 1.x) interface, the only one we offer.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// Writes device configuration bytes `cfg` at `offset` into `data`; bytes past its end read as zero.
pub fn read_config_bytes(cfg: &[u8], offset: u64, data: &mut [u8]) {
    for (i, byte) in data.iter_mut().enumerate() {
        *byte = usize::try_from(offset).ok().and_then(|o| cfg.get(o.checked_add(i)?)).copied().unwrap_or(0);
    }
}

/// Returns several buffers to the used ring and makes them visible to the driver at once (one
/// store of the used index). A frame spread over mergeable receive buffers must appear whole:
/// Linux reads `num_buffers` from the first and drops the frame if the others are not there yet
/// (virtio 1.2, 5.1.6.4.2). Elements are `(head, bytes written)`.
pub fn add_used_together(queue: &mut Queue, mem: &GuestMemory, elements: &[(u16, u32)]) -> Result<(), String> {
    use std::sync::atomic::Ordering;
    use virtio_queue::QueueT;
    use vm_memory::{Bytes, GuestAddress};
    let size = queue.size();
    let start = queue.next_used();
    for (i, &(head, len)) in elements.iter().enumerate() {
        if head >= size {
            return Err(format!("descriptor {head} is outside the queue"));
        }
        let slot = u64::from(start.wrapping_add(i as u16) % size);
        // struct virtq_used_elem { le32 id; le32 len; } after the 4-byte flags and idx.
        let at = queue.used_ring().checked_add(4 + 8 * slot).ok_or("used ring address overflows")?;
        let element = u64::from(head) | u64::from(len) << 32;
        mem.write_obj(element.to_le(), GuestAddress(at)).map_err(|e| e.to_string())?;
    }
    let next = start.wrapping_add(elements.len() as u16);
    let idx = queue.used_ring().checked_add(2).ok_or("used ring address overflows")?;
    mem.store(next.to_le(), GuestAddress(idx), Ordering::Release).map_err(|e| e.to_string())?;
    queue.set_next_used(next);
    Ok(())
}

/// A virtio device behind a transport. The transport owns the queues and the interrupt; the
/// device turns available buffers into used ones.
pub trait VirtioDevice: Send {
    /// The virtio device id (2 = block).
    fn device_type(&self) -> u32;
    /// Largest size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits offered to the driver.
    fn features(&self) -> u64;
    /// Reads device configuration space; out-of-range bytes read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes device configuration space; most devices ignore this.
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// The driver finished setup with `features` acknowledged.
    fn activate(&mut self, features: u64);
    /// The driver reset the device.
    fn reset(&mut self) {}
    /// The host file the guest's writes go to, fsync'd before a snapshot is reported done.
    fn durable_file(&self) -> Option<crate::devices::persist::DurableFile> {
        None
    }
    /// One line about the device and its backend, for `vmm inspect`.
    fn describe(&self) -> String;
    /// A host file whose input the device takes on a queue (a TAP, a socket): an input worker
    /// processes that queue whenever the file is readable, as a guest notification would.
    fn input_fd(&self) -> Option<(BorrowedFd<'_>, usize)> {
        None
    }
    /// The `input_fd` became readable (the input worker's edge-triggered event), or may have
    /// while its events were ignored (the VM paused or being built): input may wait there. A
    /// guest notification alone does not say so.
    fn input_readable(&mut self) {}
    /// Starts a point-in-time copy of the device's disk into `dest` (a disk device; called with
    /// the VM paused): of the chunks in `only` (a bitmap, as `take_written_chunks` gives), or of
    /// the whole disk. Its guest writes then copy old data first (`disk_copy`).
    fn start_disk_copy(
        &mut self,
        _dest: std::fs::File,
        _only: Option<&[u64]>,
    ) -> Option<std::sync::Arc<std::sync::Mutex<disk_copy::DiskCopier>>> {
        None
    }
    /// The 1 MiB chunks of the device's disk (`disk_copy::CHUNK_BYTES`) the guest wrote since the
    /// previous call, as a bitmap (a disk device), and clears them: a diff snapshot copies those.
    fn take_written_chunks(&mut self) -> Option<Vec<u64>> {
        None
    }
    /// Gives back chunks `take_written_chunks` took, for a snapshot that was not made.
    fn return_written_chunks(&mut self, _chunks: &[u64]) {}
    /// Ends the copy (done, failed or cancelled): guest writes go straight to the disk again.
    fn end_disk_copy(&mut self) {}
    /// The device's own state beyond its queues (which are the transport's), if it has any.
    fn save_state(&self) -> Option<DeviceState> {
        None
    }
    /// Restores what `save_state` gave, into this freshly built device.
    fn restore_state(&mut self, state: Option<&DeviceState>) -> Result<(), String> {
        match state {
            None => Ok(()),
            Some(_) => Err("saved device state for a device that keeps none".into()),
        }
    }
    /// Called once the whole machine is restored, before it runs, if the driver had started the
    /// device: a network device announces the guest (nothing may leave earlier, in case the
    /// restore fails).
    fn restored(&mut self) {}
    /// Processes the available buffers of queue `index` (of `queues`, all of the device's, ready
    /// ones: a device may answer on another queue, as vsock answers requests on its receive
    /// queue). Returns true if it used any buffer, so the transport raises an interrupt.
    fn process_queue(&mut self, index: usize, queues: &mut [Queue], mem: &GuestMemory) -> bool;
}
