//! Requests and replies of the control socket, one JSON object per line.

use serde::{Deserialize, Serialize};

use crate::migration::{MigrationReport, OverBudget};
use crate::persist::{Quiesce, SnapshotReport};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "verb", rename_all = "lowercase")]
pub enum Request {
    Status,
    Pause,
    Continue,
    Snapshot {
        /// Absolute path of the snapshot directory to write, or "-": a snapshot stream to the
        /// file descriptor sent with the request (SCM_RIGHTS), e.g. the client's stdout.
        out: String,
        #[serde(default)]
        force: bool,
        #[serde(default)]
        stop: bool,
        /// zstd-compress the stream's frames.
        #[serde(default)]
        compress: bool,
        /// Whether the guest agent quiesces the guest first.
        #[serde(default)]
        quiesce: Quiesce,
        /// Bound of the quiesce, in ms.
        #[serde(default)]
        quiesce_timeout_ms: Option<u64>,
        /// Only the pages written since the VM's last snapshot, as a diff of it.
        #[serde(default)]
        diff: bool,
        /// Absolute path of the snapshot the diff is of (checked to be the VM's last one).
        #[serde(default)]
        parent: Option<String>,
        /// Copy memory while the guest runs; pause it only for the last pages.
        #[serde(default)]
        live: bool,
    },
    /// Migrates the VM live to a `vmm receive` (`docs/migration-protocol.md`); the reply comes
    /// once the destination took over (this VM then ends) or the migration failed (the guest
    /// runs on here).
    Migrate {
        /// `tcp:HOST:PORT` or `unix:PATH`.
        to: String,
        /// Absolute paths of this side's certificate, key and CA (PEM), for tcp:.
        #[serde(default)]
        tls: Option<TlsPaths>,
        /// Plain TCP.
        #[serde(default)]
        insecure: bool,
        /// The pause the guest may see, in ms.
        max_downtime_ms: u64,
        /// Bytes a second at most on the link.
        #[serde(default)]
        bandwidth: Option<u64>,
        /// Pre-copy rounds after the first pass before `over_budget` decides.
        max_rounds: u32,
        #[serde(default)]
        over_budget: OverBudget,
        #[serde(default)]
        compress: bool,
        /// Longest wait for the destination at any step, in ms.
        timeout_ms: u64,
        /// Send the writable disks along (else the destination opens the same paths).
        #[serde(default)]
        copy_disks: bool,
        /// Connections to send over in parallel (1 to 16).
        #[serde(default = "one")]
        connections: u8,
    },
    /// Cancels the snapshot or migration under way: the guest runs on, nothing is left at its
    /// destination.
    Cancel,
    Shutdown,
    /// Dirty page tracking (`vstate::dirty`): start, fetch-and-clear, stop.
    #[serde(rename = "dirty-log")]
    DirtyLog {
        op: DirtyLogOp,
    },
}

/// A side's TLS files (PEM), absolute paths.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TlsPaths {
    pub cert: String,
    pub key: String,
    pub ca: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DirtyLogOp {
    Start,
    Fetch,
    Stop,
}

/// The pages written since the log started or was last fetched.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirtyReport {
    /// Number of dirty 4 KiB pages.
    pub pages: u64,
    /// Maximal runs of dirty pages: [guest physical address, length in bytes].
    pub ranges: Vec<(u64, u64)>,
}

/// Who is at fault when a request fails: the caller (exit status 2) or the VM/host (1); or the
/// request was cancelled (130, as for an interrupted command).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ErrorKind {
    Input,
    Runtime,
    Cancelled,
}

/// A snapshot being taken, or a migration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobStatus {
    /// "snapshot" or "migration".
    #[serde(default = "snapshot_kind")]
    pub kind: String,
    /// preparing, pausing, saving state, writing memory, syncing disks, committing.
    pub phase: String,
    /// Guest memory bytes written (or found zero) so far.
    pub done_bytes: u64,
    /// Guest memory bytes in all.
    pub total_bytes: u64,
}

fn snapshot_kind() -> String {
    "snapshot".into()
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub name: String,
    pub state: String,
    pub vcpus: u8,
    pub mem_bytes: u64,
    pub pid: u32,
    /// Guest console bytes dropped because nobody read vmm's stdout in time.
    #[serde(default)]
    pub console_dropped_bytes: u64,
    /// The snapshot being taken, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<JobStatus>,
    /// A VM resumed from a snapshot directory: where its memory is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<MemoryStatus>,
    /// A VM with periodic checkpoints: how they go.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoints: Option<CheckpointStatus>,
}

/// Periodic checkpoints of a VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointStatus {
    /// The newest complete checkpoint (a directory name in the checkpoint directory), if any.
    pub latest: Option<String>,
    /// Its age, in ms.
    pub age_ms: Option<u64>,
    /// The interval, in ms.
    pub interval_ms: u64,
    /// Why the checkpoints since the newest good one failed; None when the last one succeeded.
    pub failing: Option<String>,
}

/// The memory of a VM resumed from a snapshot directory.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryStatus {
    /// The snapshot directory it was mapped from.
    pub snapshot: String,
    /// Bytes of the snapshot's data brought in by the background loader, of `total_bytes`.
    pub loaded_bytes: u64,
    pub total_bytes: u64,
    /// Every page is the VM's own: the snapshot may be changed or deleted.
    pub independent: bool,
    /// Pages load only on first touch (`resume --lazy`, or the loader stopped).
    pub lazy: bool,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub error_kind: Option<ErrorKind>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub status: Option<Status>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub snapshot: Option<SnapshotReport>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub dirty: Option<DirtyReport>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub migration: Option<MigrationReport>,
    /// The VM's process, when the request ends the VM: the client can wait for it to be gone
    /// (and its disks and name free again).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub ending_pid: Option<u32>,
}

impl Reply {
    pub fn ok() -> Self {
        Self { ok: true, ..Default::default() }
    }

    pub fn error(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self { ok: false, error: Some(message.into()), error_kind: Some(kind), ..Default::default() }
    }
}

fn one() -> u8 {
    1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_format() {
        let r: Request = serde_json::from_str(r#"{"verb":"snapshot","out":"/tmp/s"}"#).unwrap();
        assert_eq!(
            r,
            Request::Snapshot {
                out: "/tmp/s".into(),
                force: false,
                stop: false,
                compress: false,
                quiesce: Quiesce::Auto,
                quiesce_timeout_ms: None,
                diff: false,
                parent: None,
                live: false
            }
        );
        assert_eq!(serde_json::to_string(&Request::Continue).unwrap(), r#"{"verb":"continue"}"#);
        assert!(serde_json::from_str::<Request>(r#"{"verb":"reboot"}"#).is_err());
        let r: Request = serde_json::from_str(r#"{"verb":"dirty-log","op":"fetch"}"#).unwrap();
        assert_eq!(r, Request::DirtyLog { op: DirtyLogOp::Fetch });
        let e = serde_json::to_string(&Reply::error(ErrorKind::Input, "no")).unwrap();
        assert_eq!(e, r#"{"ok":false,"error":"no","error_kind":"input"}"#);
    }
}
