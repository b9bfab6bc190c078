//! Pre-freeze and post-thaw hooks: every executable file in the hooks directory, run in name
//! order with the argument `freeze` before the file systems are frozen, and in reverse order
//! with `thaw` after they are thawed. This is how applications flush their buffers and drain or
//! close their connections before a snapshot.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The default hooks directory.
pub const DEFAULT_DIR: &str = "/etc/vmm-agent/hooks.d";

/// The hooks in `dir`, in name order (none if it does not exist).
pub fn list(dir: &Path) -> Vec<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut hooks: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
        .collect();
    hooks.sort();
    hooks
}

/// Runs `hook phase`, killed at `deadline`; Err says why it failed.
pub fn run(hook: &Path, phase: &str, deadline: Instant) -> Result<(), String> {
    let mut child = Command::new(hook)
        .arg(phase)
        .stdin(Stdio::null())
        .spawn()
        .map_err(|e| format!("hook {}: {e}", hook.display()))?;
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => return Ok(()),
            Ok(Some(status)) => return Err(format!("hook {} {phase}: {status}", hook.display())),
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("hook {} {phase}: did not finish in time", hook.display()));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => return Err(format!("hook {}: {e}", hook.display())),
        }
    }
}
