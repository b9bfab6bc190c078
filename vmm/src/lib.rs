//! vmm: a small virtual machine monitor on Linux KVM, built around checkpoint/restart.
//!
//! The library builds and runs a VM (`machine`), from KVM objects (`vstate`), x86_64 boot
//! code (`arch`) and userspace devices (`devices`). The binary in `main.rs` is a thin CLI.

pub mod agent;
pub mod api;
pub mod arch;
pub mod checkpoint;
pub mod config;
pub mod console;
pub mod control;
pub mod devices;
pub mod exit;
pub mod machine;
pub mod migration;
pub mod persist;
pub mod vstate;

pub use config::{DiskConfig, VmConfig};
pub use exit::ExitReason;
pub use machine::{Machine, MachineError};
