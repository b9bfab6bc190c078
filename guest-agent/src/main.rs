//! `vmm-guest-agent`: the small agent that runs inside a Linux guest.
//!
//! Commands (one-shot, from the command line):
//! - `ping`   prints `pong`;
//! - `freeze` syncs, then freezes (`FIFREEZE`) every writable, freezable filesystem in `/proc/mounts`;
//! - `thaw`   thaws (`FITHAW`) them again;
//! - `serve [DEVICE]` reads one command a line (`ping`, `freeze`, `thaw`, `quit`) from DEVICE (a
//!   virtio-serial port, say; stdin/stdout if absent) and answers each with exactly one line,
//!   `ok ...` or `err ...`, so a host-side channel can drive it.
//!
//! Only `std` and `libc`; it is built as a static binary for the initramfs.

use std::fs::OpenOptions;
use std::io::{self, BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::process::ExitCode;

/// `_IOWR('X', 119, int)` from `<linux/fs.h>`.
const FIFREEZE: u32 = 0xC004_5877;
/// `_IOWR('X', 120, int)` from `<linux/fs.h>`.
const FITHAW: u32 = 0xC004_5878;

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
struct Mount {
    source: String,
    /// The mount point as `/proc/mounts` spells it (octal escapes kept: safe to print on one line).
    target_escaped: String,
    /// The mount point as a real path.
    target: String,
    fstype: String,
    writable: bool,
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
fn candidates() -> io::Result<Vec<Mount>> {
    let text = std::fs::read_to_string("/proc/mounts")?;
    let mut seen = Vec::new();
    let mut out = Vec::new();
    for m in parse_mounts(&text) {
        if !m.writable || PSEUDO_FS.contains(&m.fstype.as_str()) {
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
fn fs_ioctl(target: &str, request: u32) -> io::Result<()> {
    let dir = OpenOptions::new().read(true).custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC).open(target)?;
    // SAFETY: `dir` is an open descriptor for the whole call; FIFREEZE/FITHAW take an int
    // argument that the kernel ignores, and read or write no user memory.
    let rc = unsafe { libc::ioctl(dir.as_raw_fd(), request as _, 0) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn describe(m: &Mount) -> String {
    format!("{} ({} on {})", m.target_escaped, m.fstype, m.source)
}

/// Freezes every candidate, innermost mounts first. On an error, thaws what it froze and fails.
/// Returns one line per filesystem and the list of frozen mount points.
fn freeze() -> Result<(Vec<String>, Vec<String>), String> {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
    let mounts = candidates().map_err(|e| format!("reading /proc/mounts: {e}"))?;
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
fn thaw() -> Result<(Vec<String>, Vec<String>), String> {
    let mounts = candidates().map_err(|e| format!("reading /proc/mounts: {e}"))?;
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

/// Runs one command; returns the single reply line for `serve`.
fn reply(cmd: &str) -> String {
    let summary = |verb: &str, names: Vec<String>| {
        let mut s = format!("ok {verb} {}", names.len());
        for n in names {
            s.push(' ');
            s.push_str(&n);
        }
        s
    };
    match cmd {
        "ping" => "ok pong".to_string(),
        "freeze" => match freeze() {
            Ok((_, names)) => summary("frozen", names),
            Err(e) => format!("err {e}"),
        },
        "thaw" => match thaw() {
            Ok((_, names)) => summary("thawed", names),
            Err(e) => format!("err {e}"),
        },
        other => format!("err unknown command {other:?} (ping, freeze, thaw, quit)"),
    }
}

fn serve(device: Option<&str>) -> io::Result<()> {
    let (input, mut output): (Box<dyn BufRead>, Box<dyn Write>) = match device {
        Some(path) => {
            let port = OpenOptions::new().read(true).write(true).open(path)?;
            let writer = port.try_clone()?;
            (Box::new(BufReader::new(port)), Box::new(writer))
        }
        None => (Box::new(io::stdin().lock()), Box::new(io::stdout())),
    };
    for line in input.lines() {
        let line = line?;
        let cmd = line.trim();
        if cmd.is_empty() {
            continue;
        }
        if cmd == "quit" {
            writeln!(output, "ok bye")?;
            output.flush()?;
            break;
        }
        writeln!(output, "{}", reply(cmd))?;
        output.flush()?;
    }
    Ok(())
}

fn one_shot(result: Result<(Vec<String>, Vec<String>), String>, verb: &str) -> ExitCode {
    match result {
        Ok((report, names)) => {
            for line in report {
                println!("{line}");
            }
            println!("{verb} {} filesystem(s)", names.len());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("vmm-guest-agent: {e}");
            ExitCode::FAILURE
        }
    }
}

const USAGE: &str = "usage: vmm-guest-agent ping | freeze | thaw | serve [DEVICE]";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match args.as_slice() {
        ["ping"] => {
            println!("pong");
            ExitCode::SUCCESS
        }
        ["freeze"] => one_shot(freeze(), "froze"),
        ["thaw"] => one_shot(thaw(), "thawed"),
        ["serve"] | ["serve", _] => match serve(args.get(1).copied()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("vmm-guest-agent: serve: {e}");
                ExitCode::FAILURE
            }
        },
        ["-h" | "--help" | "help"] => {
            println!("{USAGE}");
            ExitCode::SUCCESS
        }
        _ => {
            eprintln!("{USAGE}");
            ExitCode::from(2)
        }
    }
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

    #[test]
    fn ping_reply() {
        assert_eq!(reply("ping"), "ok pong");
        assert!(reply("bogus").starts_with("err "));
    }
}
