//! The vmm snapshot format: a directory holding a checksummed manifest, the machine state and a
//! raw page file of guest memory. No KVM here: the vmm crate turns machine state into bytes, this
//! crate stores, checks and describes them, so it can be tested and fuzzed on its own.
//!
//! See `docs/snapshot-format.md`.

pub mod digest;
pub mod dir;
pub mod manifest;
pub mod pages;

pub use dir::{Snapshot, SnapshotWriter};
pub use manifest::{CpuIdentity, DeviceSummary, DiskDescription, Manifest, VcpuSummary, VmDescription};
pub use pages::{MemoryLayout, MemorySource, PageKind, RegionLayout, StagedMemory};

/// Format version written by this crate; the only one it reads.
pub const FORMAT_VERSION: u32 = 1;

/// Largest state file a snapshot may have (the state is a few KiB a vCPU): a larger size in a
/// manifest is refused before anything is read.
pub const MAX_STATE_BYTES: u64 = 64 << 20;

/// File names inside a snapshot directory.
pub const MANIFEST_FILE: &str = "manifest";
pub const STATE_FILE: &str = "state.bin";
pub const MEMORY_FILE: &str = "memory.pages";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0} is not a vmm snapshot ({1})")]
    NotASnapshot(String, &'static str),
    #[error("snapshot format version {found} is not supported (this vmm reads version {supported})")]
    UnsupportedVersion { found: u32, supported: u32 },
    #[error("snapshot manifest is corrupt: {0}")]
    CorruptManifest(String),
    #[error("snapshot is truncated: {file} has {actual} bytes, the manifest says {expected}")]
    Truncated { file: &'static str, expected: u64, actual: u64 },
    #[error("snapshot state file is corrupt: checksum mismatch")]
    StateChecksum,
    #[error("snapshot memory is corrupt: checksum mismatch in chunk {chunk} (guest address {guest_addr:#x})")]
    MemoryChecksum { chunk: usize, guest_addr: u64 },
    #[error("{0} already exists (use --force to replace it)")]
    AlreadyExists(String),
    #[error("{0} exists and is not a snapshot; refusing to replace it")]
    RefuseReplace(String),
    #[error("snapshot I/O on {path}: {err}")]
    Io { path: String, err: std::io::Error },
}

pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn io_err(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |err| Error::Io { path: path.display().to_string(), err }
}
