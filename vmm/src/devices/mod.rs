//! Userspace devices: the I/O and MMIO buses, legacy PC devices and virtio.

pub mod bus;
pub mod legacy;
pub mod persist;
pub mod virtio;

pub use bus::{Bus, BusDevice};
