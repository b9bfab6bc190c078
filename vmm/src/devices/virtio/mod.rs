//! virtio: the device-side model (`VirtioDevice`), the MMIO transport and the devices.

pub mod block;
pub mod mmio;

use crate::vstate::memory::GuestMemory;
use virtio_queue::Queue;

pub use block::Block;
pub use mmio::{MmioTransport, MmioTransportState};

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
    /// Processes the available buffers of queue `index`. Returns true if it used any, so the
    /// transport raises an interrupt.
    fn process_queue(&mut self, index: usize, queue: &mut Queue, mem: &GuestMemory) -> bool;
}
