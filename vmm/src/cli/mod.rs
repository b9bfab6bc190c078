//! Subcommands of the `vmm` binary.

pub mod client;
pub mod inspect;
pub mod run;

/// Exit status for bad arguments or input files.
pub const EXIT_BAD_INPUT: u8 = 2;
/// Exit status for failures of the host or the VM at run time.
pub const EXIT_RUNTIME: u8 = 1;
/// Exit status of a command interrupted by the user (128 + SIGINT).
pub const EXIT_CANCELLED: u8 = 130;

/// A failed command: its exit status and the one line that says why.
pub struct Failure {
    pub code: u8,
    pub message: String,
}

impl Failure {
    pub fn bad_input(message: impl Into<String>) -> Self {
        Self { code: EXIT_BAD_INPUT, message: message.into() }
    }

    pub fn runtime(message: impl Into<String>) -> Self {
        Self { code: EXIT_RUNTIME, message: message.into() }
    }
}

pub type CmdResult = Result<u8, Failure>;

/// Refuses an output directory whose parent directory does not exist: a bad argument, found
/// before any work rather than when the snapshot or merge comes to create it.
pub fn check_out_parent(out: &std::path::Path) -> Result<(), Failure> {
    match out.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(parent) if !parent.is_dir() => {
            let why = if parent.exists() { "is not a directory" } else { "does not exist" };
            Err(Failure::bad_input(format!("--out {}: {} {why}", out.display(), parent.display())))
        }
        _ => Ok(()),
    }
}
