//! The description of a VM as the user gives it, and parsing of its pieces.

use std::path::PathBuf;

/// Smallest guest memory we accept: below this the boot structures and a kernel do not fit.
pub const MIN_MEM_BYTES: u64 = 64 << 20;
/// Largest guest memory we accept (the guest's physical address space, with room to spare).
pub const MAX_MEM_BYTES: u64 = 1 << 40;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskConfig {
    pub path: PathBuf,
    pub read_only: bool,
}

#[derive(Clone, Debug)]
pub struct VmConfig {
    pub name: String,
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub mem_bytes: u64,
    pub vcpus: u8,
    pub disks: Vec<DiskConfig>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("invalid size '{0}': expected a number with an optional K, M or G suffix")]
    BadSize(String),
    #[error("--mem {0} is too small: at least 64 MiB is needed")]
    MemTooSmall(String),
    #[error("--mem {0} is too large: at most 1 TiB")]
    MemTooLarge(String),
    #[error("invalid disk '{0}': expected PATH or PATH,ro")]
    BadDisk(String),
}

/// Parses a memory size: a plain number is MiB; K, M, G (and KiB/MiB/GiB, any case) are powers of 1024.
pub fn parse_size(text: &str) -> Result<u64, ConfigError> {
    let bad = || ConfigError::BadSize(text.to_string());
    let t = text.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, suffix) = t.split_at(digits_end);
    let value: u64 = num.parse().map_err(|_| bad())?;
    let shift = match suffix.to_ascii_lowercase().as_str() {
        "" | "m" | "mb" | "mib" => 20,
        "k" | "kb" | "kib" => 10,
        "g" | "gb" | "gib" => 30,
        _ => return Err(bad()),
    };
    value.checked_mul(1 << shift).ok_or_else(bad)
}

/// Parses and checks the guest memory size.
pub fn parse_mem(text: &str) -> Result<u64, ConfigError> {
    let bytes = parse_size(text)?;
    if bytes < MIN_MEM_BYTES {
        return Err(ConfigError::MemTooSmall(text.to_string()));
    }
    if bytes > MAX_MEM_BYTES {
        return Err(ConfigError::MemTooLarge(text.to_string()));
    }
    // KVM memory slots and our page-granular bookkeeping want whole pages.
    Ok(bytes & !0xfff)
}

/// Parses `PATH` or `PATH,ro`.
pub fn parse_disk(text: &str) -> Result<DiskConfig, ConfigError> {
    let (path, read_only) = match text.rsplit_once(',') {
        Some((path, "ro")) => (path, true),
        Some((path, "rw")) => (path, false),
        Some(_) => return Err(ConfigError::BadDisk(text.to_string())),
        None => (text, false),
    };
    if path.is_empty() {
        return Err(ConfigError::BadDisk(text.to_string()));
    }
    Ok(DiskConfig { path: PathBuf::from(path), read_only })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512"), Ok(512 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("65536k"), Ok(64 << 20));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        for bad in ["", "G", "1T", "-1", "1.5G", "12 M", "99999999999999999999"] {
            assert!(parse_size(bad).is_err(), "{bad} parsed");
        }
    }

    #[test]
    fn mem_bounds() {
        assert_eq!(parse_mem("64M"), Ok(64 << 20));
        assert_eq!(parse_mem("63M"), Err(ConfigError::MemTooSmall("63M".into())));
        assert!(matches!(parse_mem("2048G"), Err(ConfigError::MemTooLarge(_))));
    }

    #[test]
    fn disks() {
        assert_eq!(parse_disk("a.img").unwrap(), DiskConfig { path: "a.img".into(), read_only: false });
        assert_eq!(parse_disk("/x/a,b.img,ro").unwrap(), DiskConfig { path: "/x/a,b.img".into(), read_only: true });
        assert!(parse_disk("a.img,rx").is_err());
        assert!(parse_disk(",ro").is_err());
    }
}
