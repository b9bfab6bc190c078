//! The control socket: one Unix socket per VM, JSON requests and replies (docs/api.md).

pub mod client;
pub mod protocol;
pub mod server;

use std::path::PathBuf;

/// Directory of control sockets: `$XDG_RUNTIME_DIR/vmm`, else `/run/vmm`.
pub fn socket_dir() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d).join("vmm"),
        _ => PathBuf::from("/run/vmm"),
    }
}

/// Where the VM called `name` keeps its files (the working copies of a resumed snapshot's
/// disks): `$XDG_STATE_HOME/vmm/NAME` when that is set, else `/var/lib/vmm/NAME` for root and
/// `~/.local/state/vmm/NAME` for others.
pub fn state_dir(name: &str) -> PathBuf {
    let base = match (std::env::var_os("XDG_STATE_HOME"), std::env::var_os("HOME")) {
        (Some(d), _) if !d.is_empty() => PathBuf::from(d).join("vmm"),
        _ if rustix::process::geteuid().is_root() => PathBuf::from("/var/lib/vmm"),
        (_, Some(home)) if !home.is_empty() => PathBuf::from(home).join(".local/state/vmm"),
        _ => std::env::temp_dir().join("vmm-state"),
    };
    base.join(name)
}

/// The control socket of the VM called `name`.
pub fn socket_path(name: &str) -> PathBuf {
    socket_dir().join(format!("{name}.sock"))
}

/// VM names become file names: letters, digits, '.', '_' and '-', not starting with '.'.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(valid_name("web-1.prod_a"));
        for bad in ["", ".hidden", "a/b", "a b", "ü", &"x".repeat(65)] {
            assert!(!valid_name(bad), "{bad}");
        }
    }
}
