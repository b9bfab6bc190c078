//! The guest's file systems: which to freeze, and FIFREEZE / FITHAW on them.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};

/// `_IOWR('X', 119, int)` from `<linux/fs.h>`.
pub const FIFREEZE: u32 = 0xC004_5877;
/// `_IOWR('X', 120, int)` from `<linux/fs.h>`.
pub const FITHAW: u32 = 0xC004_5878;

/// Filesystem types that are never frozen: kernel pseudo filesystems and memory-backed ones.
const PSEUDO_FS: &[&str] = &[
    "autofs",
    "binfmt_misc",
    "bpf",
    "cgroup",
    "cgroup2",
    "configfs",
    "debugfs",
    "devpts",
    "devtmpfs",
    "efivarfs",
    "fusectl",
    "hugetlbfs",
    "mqueue",
    "nsfs",
    "proc",
    "pstore",
    "ramfs",
    "rootfs",
    "rpc_pipefs",
    "securityfs",
    "selinuxfs",
    "sockfs",
    "sysfs",
    "tmpfs",
    "tracefs",
];

/// One line of `/proc/mounts`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub source: String,
    /// The mount point as `/proc/mounts` spells it (octal escapes kept: safe to print on one line).
    pub target_escaped: String,
    /// The mount point as a real path.
    pub target: String,
    pub fstype: String,
    pub writable: bool,
}

/// Undoes the octal escapes (`\040` for a space, …) the kernel uses in `/proc/mounts`.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() && bytes[i + 1..i + 4].iter().all(|b| (b'0'..=b'7').contains(b)) {
            let v = bytes[i + 1..i + 4].iter().fold(0u32, |acc, b| acc * 8 + u32::from(b - b'0'));
            if let Ok(b) = u8::try_from(v) {
                out.push(b);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse_mounts(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let mut f = line.split_whitespace();
            let source = f.next()?;
            let target = f.next()?;
            let fstype = f.next()?;
            let options = f.next()?;
            Some(Mount {
                source: unescape(source),
                target_escaped: target.to_string(),
                target: unescape(target),
                fstype: fstype.to_string(),
                writable: options.split(',').any(|o| o == "rw"),
            })
        })
        .collect()
}

/// The filesystems to freeze, in mount order, one per superblock (bind mounts share one).
pub fn candidates(only: &[String]) -> io::Result<Vec<Mount>> {
    let text = std::fs::read_to_string("/proc/mounts")?;
    let mut seen = Vec::new();
    let mut out = Vec::new();
    for m in parse_mounts(&text) {
        if !m.writable || PSEUDO_FS.contains(&m.fstype.as_str()) {
            continue;
        }
        if !only.is_empty() && !only.contains(&m.target) {
            continue;
        }
        let Ok(meta) = std::fs::metadata(&m.target) else {
            continue; // hidden by a later mount or gone: nothing we can open
        };
        if seen.contains(&meta.dev()) {
            continue;
        }
        seen.push(meta.dev());
        out.push(m);
    }
    Ok(out)
}

/// Issues `FIFREEZE` or `FITHAW` on the filesystem mounted at `target`.
pub fn fs_ioctl(target: &str, request: u32) -> io::Result<()> {
    let dir = OpenOptions::new().read(true).custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC).open(target)?;
    // SAFETY: `dir` is an open descriptor for the whole call; FIFREEZE/FITHAW take an int
    // argument that the kernel ignores, and read or write no user memory.
    let rc = unsafe { libc::ioctl(dir.as_raw_fd(), request as _, 0) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

pub fn describe(m: &Mount) -> String {
    format!("{} ({} on {})", m.target_escaped, m.fstype, m.source)
}

/// Freezes every candidate, innermost mounts first. On an error, thaws what it froze and fails.
/// Returns one line per filesystem and the list of frozen mount points.
pub fn freeze(only: &[String]) -> Result<(Vec<String>, Vec<String>), String> {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
    let mounts = candidates(only).map_err(|e| format!("reading /proc/mounts: {e}"))?;
    let mut report = Vec::new();
    let mut frozen: Vec<&Mount> = Vec::new();
    for m in mounts.iter().rev() {
        match fs_ioctl(&m.target, FIFREEZE) {
            Ok(()) => {
                report.push(format!("frozen {}", describe(m)));
                frozen.push(m);
            }
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                report.push(format!("skipped {}: freezing not supported", describe(m)));
            }
            Err(e) => {
                let why = if e.raw_os_error() == Some(libc::EBUSY) {
                    format!("freeze {}: already frozen (thaw first)", m.target_escaped)
                } else {
                    format!("freeze {}: {e}", m.target_escaped)
                };
                for f in frozen.iter().rev() {
                    let _ = fs_ioctl(&f.target, FITHAW);
                }
                return Err(why);
            }
        }
    }
    let names = frozen.iter().map(|m| m.target_escaped.clone()).collect();
    Ok((report, names))
}

/// Thaws every frozen candidate, outermost first. Filesystems that are not frozen are skipped.
pub fn thaw(only: &[String]) -> Result<(Vec<String>, Vec<String>), String> {
    let mounts = candidates(only).map_err(|e| format!("reading /proc/mounts: {e}"))?;
    let mut report = Vec::new();
    let mut thawed = Vec::new();
    let mut errors = Vec::new();
    for m in &mounts {
        match fs_ioctl(&m.target, FITHAW) {
            Ok(()) => {
                report.push(format!("thawed {}", describe(m)));
                thawed.push(m.target_escaped.clone());
            }
            // EINVAL: not frozen; EOPNOTSUPP: cannot be frozen at all.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EOPNOTSUPP)) => {}
            Err(e) => errors.push(format!("thaw {}: {e}", m.target_escaped)),
        }
    }
    if errors.is_empty() {
        Ok((report, thawed))
    } else {
        Err(errors.join("; "))
    }
}

/// A file system frozen by the agent, with its mount point held open: thawing it needs nothing
/// from any frozen file system (no path lookup, no atime update).
pub struct Frozen {
    pub name: String,
    dir: File,
}

impl Frozen {
    pub fn thaw(&self) -> io::Result<()> {
        ioctl_fd(&self.dir, FITHAW)
    }
}

fn ioctl_fd(dir: &File, request: u32) -> io::Result<()> {
    // SAFETY: `dir` is an open descriptor for the whole call; FIFREEZE/FITHAW take an int
    // argument that the kernel ignores, and read or write no user memory.
    let rc = unsafe { libc::ioctl(dir.as_raw_fd(), request as _, 0) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Syncs, then freezes every candidate (innermost first), keeping each mount point open. On an
/// error, thaws what it froze and fails.
pub fn freeze_held(only: &[String]) -> Result<Vec<Frozen>, String> {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
    let mounts = candidates(only).map_err(|e| format!("reading /proc/mounts: {e}"))?;
    let mut frozen: Vec<Frozen> = Vec::new();
    for m in mounts.iter().rev() {
        let dir = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
            .open(&m.target)
            .map_err(|e| format!("open {}: {e}", m.target_escaped));
        let result = dir.and_then(|dir| match ioctl_fd(&dir, FIFREEZE) {
            Ok(()) => Ok(Some(Frozen { name: m.target_escaped.clone(), dir })),
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(None),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                Err(format!("freeze {}: already frozen", m.target_escaped))
            }
            Err(e) => Err(format!("freeze {}: {e}", m.target_escaped)),
        });
        match result {
            Ok(Some(f)) => frozen.push(f),
            Ok(None) => {}
            Err(e) => {
                for f in frozen.iter().rev() {
                    let _ = f.thaw();
                }
                return Err(e);
            }
        }
    }
    Ok(frozen)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unescapes_octal() {
        assert_eq!(unescape(r"/mnt/a\040b"), "/mnt/a b");
        assert_eq!(unescape(r"/x\134y"), r"/x\y");
        assert_eq!(unescape(r"/plain"), "/plain");
        assert_eq!(unescape(r"/trail\04"), r"/trail\04");
    }

    #[test]
    fn parses_mounts() {
        let text = "proc /proc proc rw,nosuid 0 0\n\
                    /dev/vda /mnt/my\\040disk ext4 rw,relatime 0 0\n\
                    /dev/vdb /ro ext4 ro,relatime 0 0\n";
        let m = parse_mounts(text);
        assert_eq!(m.len(), 3);
        assert_eq!(m[1].target, "/mnt/my disk");
        assert_eq!(m[1].target_escaped, "/mnt/my\\040disk");
        assert!(m[1].writable);
        assert!(!m[2].writable);
        assert_eq!(m[0].fstype, "proc");
    }

    #[test]
    fn ioctl_numbers_match_linux() {
        // _IOWR(type, nr, size) = (3 << 30) | (size << 16) | (type << 8) | nr
        let iowr = |nr: u32| (3u32 << 30) | (4 << 16) | (u32::from(b'X') << 8) | nr;
        assert_eq!(FIFREEZE, iowr(119));
        assert_eq!(FITHAW, iowr(120));
    }
}
