//! The vmm snapshot format: a directory holding a checksummed manifest, the machine state (named,
//! versioned sections) and a raw page file of guest memory; and the stream that carries the same
//! through a pipe or a socket. No KVM here: the vmm crate turns machine state into sections, this
//! crate stores, checks and describes them, so it can be tested and fuzzed on its own.
//!
//! See `docs/snapshot-format.md`.

pub mod chain;
pub mod digest;
pub mod dir;
pub mod live;
pub mod manifest;
pub mod migration;
pub mod pages;
pub mod progress;
pub mod state;
pub mod stream;
pub mod streamed;

pub use chain::Chain;
pub use dir::{Snapshot, SnapshotWriter};
pub use manifest::{
    CpuIdentity, DecodedManifest, DeviceSummary, DiskCopy, DiskDescription, FileIdentity, GuestCpu, Manifest,
    NetDescription, SnapshotId, StateDigest, VcpuSummary, VmDescription, VsockDescription,
};
pub use pages::{Extent, ExtentKind, MemoryData, MemoryLayout, MemorySource, PageKind, RegionLayout, StagedMemory};
pub use progress::Progress;
pub use state::{MachineSections, Section, SectionSummary};

/// Format version written by this crate; the only one it reads. Version 1 (vmm 0.1 before
/// sections and ids) is refused with a message saying so.
pub const FORMAT_VERSION: u32 = 2;

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
    #[error("{}", version_message(*found, *supported))]
    UnsupportedVersion { found: u32, supported: u32 },
    #[error("snapshot manifest is corrupt: {0}")]
    CorruptManifest(String),
    #[error("snapshot state is corrupt: {0}")]
    CorruptState(String),
    #[error("snapshot state has no section '{0}'")]
    MissingSection(String),
    #[error(
        "snapshot state section '{name}' has version {found}, newer than this vmm reads ({supported}): use a newer vmm"
    )]
    NewerSection { name: String, found: u32, supported: u32 },
    #[error("snapshot file has the wrong size (truncated or changed): {file} has {actual} bytes, the manifest says {expected}")]
    Truncated { file: &'static str, expected: u64, actual: u64 },
    #[error("snapshot state file is corrupt: checksum mismatch")]
    StateChecksum,
    #[error("snapshot memory is corrupt: checksum mismatch in chunk {chunk} (guest address {guest_addr:#x})")]
    MemoryChecksum { chunk: usize, guest_addr: u64 },
    /// A layer of a chain is damaged: which one.
    #[error("layer {dir}: {err}")]
    Layer { dir: String, err: Box<Error> },
    #[error("{what}: {err}")]
    Stream { what: String, err: stream::StreamError },
    #[error("{what}: snapshot stream is inconsistent: {reason}")]
    BadStream { what: String, reason: String },
    #[error("cancelled")]
    Cancelled,
    #[error("snapshot memory is inconsistent: the manifest says guest memory at {guest_addr:#x} holds no data, the page file has some there")]
    NotZero { guest_addr: u64 },
    #[error("{0} already exists (use --force to replace it)")]
    AlreadyExists(String),
    #[error("{0} exists and is not a snapshot; refusing to replace it")]
    RefuseReplace(String),
    #[error("{0} is not a complete snapshot: {1} is missing")]
    MissingFile(String, &'static str),
    #[error("snapshot disk copy {file} is {problem}")]
    BadDiskCopy { file: String, problem: String },
    #[error("snapshot {child} is a diff whose parent {parent} (id {id}) is missing; resume, verify or merge need it where it was, or beside {child}")]
    ParentMissing { child: String, parent: String, id: String },
    #[error("snapshot {child} is a diff of snapshot {expected}, but {parent} is {found} now (replaced since?)")]
    ParentMismatch { child: String, parent: String, expected: String, found: String },
    #[error("{0}")]
    ChainMismatch(String),
    #[error("cannot create snapshot {path}: {err}")]
    Create { path: String, err: std::io::Error },
    #[error("{path}: {err}")]
    Io { path: String, err: std::io::Error },
}

pub type Result<T> = std::result::Result<T, Error>;

fn version_message(found: u32, supported: u32) -> String {
    if found < supported {
        format!(
            "snapshot format version {found} is no longer read (this vmm reads version {supported}): resume it with \
             the vmm that wrote it and take a new snapshot"
        )
    } else {
        format!("snapshot format version {found} is newer than this vmm reads ({supported}): use a newer vmm")
    }
}

pub(crate) fn io_err(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |err| Error::Io { path: path.display().to_string(), err }
}
