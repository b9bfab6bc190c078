//! How every device takes part in snapshots: it saves its own state (versioned, in its own
//! encoding), restores it into a freshly built device of the same kind, and pauses any worker
//! thread it owns while the machine is saved.
//!
//! The machine keeps its devices in a list keyed by a stable id (`serial0`, `blk0`, ...), each
//! entry with its kind and the resources it was given (ports, MMIO window, interrupt line). A
//! snapshot stores that list; resume builds the machine's devices from the snapshot's
//! configuration as a boot would, then matches the saved list against them entry by entry.

use std::fs::File;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// A device's saved state: the layout version that wrote it and its CBOR encoding.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceState {
    pub version: u32,
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
}

impl DeviceState {
    /// Encodes `value` as the state of layout `version`.
    pub fn encode<T: Serialize>(version: u32, value: &T) -> Self {
        Self { version, data: snapshot::state::encode_value(value) }
    }

    /// State of a device that has none to save.
    pub fn empty(version: u32) -> Self {
        Self { version, data: Vec::new() }
    }

    /// Checks the state of a device that has none: a known version, and no data.
    pub fn check_empty(&self, current: u32) -> Result<(), String> {
        if self.version > current {
            return Err(format!("state version {} is newer than this vmm reads ({current})", self.version));
        }
        if !self.data.is_empty() {
            return Err(format!("{} bytes of state for a device that has none", self.data.len()));
        }
        Ok(())
    }

    /// Decodes a state written with layout `version` <= `current` (older layouts read through
    /// serde defaults for the fields added since).
    pub fn decode<T: DeserializeOwned>(&self, current: u32) -> Result<T, String> {
        if self.version > current {
            return Err(format!("state version {} is newer than this vmm reads ({current})", self.version));
        }
        snapshot::state::decode_value(&self.data, "device state").map_err(|e| e.to_string())
    }
}

/// What a device was given by the machine: where the guest reaches it and its interrupt line.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    /// Port I/O range: first port, number of ports.
    #[serde(default)]
    pub pio: Option<(u16, u16)>,
    /// MMIO window: guest physical base, length in bytes.
    #[serde(default)]
    pub mmio: Option<(u64, u64)>,
    /// Interrupt line (IOAPIC pin).
    #[serde(default)]
    pub gsi: Option<u32>,
}

impl std::fmt::Display for Resources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts = Vec::new();
        if let Some((port, n)) = self.pio {
            parts.push(format!("ports {port:#x}+{n}"));
        }
        if let Some((base, len)) = self.mmio {
            parts.push(format!("mmio {base:#x}+{len:#x}"));
        }
        if let Some(gsi) = self.gsi {
            parts.push(format!("gsi {gsi}"));
        }
        f.write_str(&parts.join(", "))
    }
}

/// A file a device writes the guest's data to, made durable before a snapshot is reported done.
pub struct DurableFile {
    pub path: String,
    pub file: Arc<File>,
}

/// A device's part in snapshots. Called with the vCPUs paused, so no request is in flight.
pub trait Persist: Send {
    /// Saves the device's state.
    fn save(&self) -> DeviceState;
    /// Restores saved state into this freshly built device.
    fn restore(&mut self, state: &DeviceState) -> Result<(), String>;
    /// Called once the whole machine is restored, just before it runs: raises again an interrupt
    /// the restored state says is pending, and does what a resumed device owes the outside world.
    fn restored(&mut self) {}
    /// Stops the worker threads the device owns (virtio-net and vsock have one),
    /// so that nothing changes guest memory or device state while it is saved.
    fn pause_workers(&mut self) {}
    /// Lets them run again.
    fn resume_workers(&mut self) {}
    /// The host file the device writes guest data to, if any: it is fsync'd after the snapshot's
    /// memory is written, outside the device's lock, so the vCPUs are never held up by the disk.
    fn durable_file(&self) -> Option<DurableFile> {
        None
    }
    /// One line about the device, for `vmm inspect`.
    fn describe(&self) -> String;
    /// Starts a point-in-time copy of the device's disk into `dest`, of the chunks in `only` or
    /// of all (disks only; VM paused; see `VirtioDevice::start_disk_copy`).
    fn start_disk_copy(
        &mut self,
        _dest: File,
        _only: Option<&[u64]>,
    ) -> Option<Arc<std::sync::Mutex<crate::devices::virtio::disk_copy::DiskCopier>>> {
        None
    }
    /// Ends it: guest writes go straight to the disk again.
    fn end_disk_copy(&mut self) {}
    /// The disk chunks written since the last call (see `VirtioDevice::take_written_chunks`).
    fn take_written_chunks(&mut self) -> Option<Vec<u64>> {
        None
    }
    /// Gives back what `take_written_chunks` took, for a snapshot that was not made.
    fn return_written_chunks(&mut self, _chunks: &[u64]) {}
}

/// A device as saved in a snapshot: its id, kind and resources, and its own state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRecord {
    pub id: String,
    pub kind: String,
    pub resources: Resources,
    pub state: DeviceState,
}
