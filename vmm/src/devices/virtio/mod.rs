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
    /// Starts a point-in-time copy of the device's disk into `dest` (a disk device; called with
    /// the VM paused). Its guest writes then copy old data first (`disk_copy`).
    fn start_disk_copy(
        &mut self,
        _dest: std::fs::File,
    ) -> Option<std::sync::Arc<std::sync::Mutex<disk_copy::DiskCopier>>> {
        None
    }
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
    /// Processes the available buffers of queue `index` (of `queues`, all of the device's, ready
    /// ones: a device may answer on another queue, as vsock answers requests on its receive
    /// queue). Returns true if it used any buffer, so the transport raises an interrupt.
    fn process_queue(&mut self, index: usize, queues: &mut [Queue], mem: &GuestMemory) -> bool;
}
