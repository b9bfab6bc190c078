//! Live migration (`docs/migration-protocol.md`): the source sends its running VM as a
//! migration stream over a connection (`transport`), pre-copying memory while the guest runs
//! (`sender`); the destination (`vmm receive`) reads it into a new machine through the restore
//! path, and the two hand the guest over so that exactly one of them runs it.

mod disks;
mod frames;
mod lanes;
pub mod receiver;
pub mod sender;
pub mod transport;

pub use sender::{migrate, MigrateError, MigrateOptions, MigrationReport, OverBudget};
