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

/// A network interface: a host TAP device and the guest's MAC address on it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    pub tap: String,
    pub mac: [u8; 6],
}

/// A virtio-vsock device: the guest's context id, and the Unix socket of its host side.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VsockConfig {
    pub cid: u64,
    pub uds: PathBuf,
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
    pub nets: Vec<NetConfig>,
    pub vsock: Option<VsockConfig>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("invalid size '{0}': expected a number with an optional K, M or G suffix")]
    BadSize(String),
    #[error("size '{0}' is too large")]
    SizeTooLarge(String),
    #[error("--mem {0} is too small: at least 64 MiB is needed")]
    MemTooSmall(String),
    #[error("--mem {0} is too large: at most 1 TiB")]
    MemTooLarge(String),
    #[error("invalid disk '{0}': expected PATH or PATH,ro")]
    BadDisk(String),
    #[error("invalid network '{0}': expected tap=NAME[,mac=MAC]")]
    BadNet(String),
    #[error("invalid MAC address '{0}': expected six hex bytes like 02:00:00:00:00:01, not multicast, not all zero")]
    BadMac(String),
    #[error("TAP device '{0}' is given twice")]
    SameTap(String),
    #[error("invalid vsock '{0}': expected cid=N,uds=PATH with N from 3 to 4294967294")]
    BadVsock(String),
    #[error("invalid duration '{0}': expected a positive number with a unit, like 500ms, 30s, 5m or 6h")]
    BadDuration(String),
}

/// Parses a duration with its unit (`500ms`, `30s`, `5m`, `6h`, `1h 30m`); zero is refused.
pub fn parse_duration(text: &str) -> Result<std::time::Duration, ConfigError> {
    humantime::parse_duration(text.trim())
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| ConfigError::BadDuration(text.to_string()))
}

/// Parses a memory size: a plain number is MiB; K, M, G (and KiB/MiB/GiB, any case) are powers of 1024.
pub fn parse_size(text: &str) -> Result<u64, ConfigError> {
    let bad = || ConfigError::BadSize(text.to_string());
    let t = text.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, suffix) = t.split_at(digits_end);
    let value: u64 = match num.parse() {
        Ok(v) => v,
        Err(e) if *e.kind() == std::num::IntErrorKind::PosOverflow => {
            return Err(ConfigError::SizeTooLarge(text.to_string()))
        }
        Err(_) => return Err(bad()),
    };
    let shift = match suffix.to_ascii_lowercase().as_str() {
        "" | "m" | "mb" | "mib" => 20,
        "k" | "kb" | "kib" => 10,
        "g" | "gb" | "gib" => 30,
        _ => return Err(bad()),
    };
    value.checked_mul(1 << shift).ok_or_else(|| ConfigError::SizeTooLarge(text.to_string()))
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
    // Absolute, as snapshots record it: a read-only disk is found by this path when a snapshot
    // of the VM is resumed, from whatever directory.
    let path = std::path::absolute(path).map_err(|_| ConfigError::BadDisk(text.to_string()))?;
    Ok(DiskConfig { path, read_only })
}

/// `--net` as the user gave it: a TAP, and maybe a MAC.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetArg {
    pub tap: String,
    pub mac: Option<[u8; 6]>,
}

impl NetArg {
    /// Without a MAC, one is derived from the TAP name: locally administered, and the same on
    /// every run, so a guest's address does not change between boots.
    pub fn into_config(self) -> NetConfig {
        let mac = self.mac.unwrap_or_else(|| default_mac(&self.tap));
        NetConfig { tap: self.tap, mac }
    }
}

/// Parses `tap=NAME[,mac=MAC]`.
pub fn parse_net(text: &str) -> Result<NetArg, ConfigError> {
    let bad = || ConfigError::BadNet(text.to_string());
    let (mut tap, mut mac) = (None, None);
    for part in text.split(',') {
        match part.split_once('=') {
            Some(("tap", name)) if tap.is_none() && !name.is_empty() => tap = Some(name.to_string()),
            Some(("mac", m)) if mac.is_none() => mac = Some(parse_mac(m)?),
            _ => return Err(bad()),
        }
    }
    let tap = tap.ok_or_else(bad)?;
    Ok(NetArg { tap, mac })
}

/// Parses `cid=N,uds=PATH` (CIDs 0-2 are the hypervisor's, the local and the host's; -1 is
/// VMADDR_CID_ANY).
pub fn parse_vsock(text: &str) -> Result<VsockConfig, ConfigError> {
    let bad = || ConfigError::BadVsock(text.to_string());
    let (mut cid, mut uds) = (None, None);
    // The path comes last and may hold commas.
    let (head, path) = text.split_once(",uds=").map_or((text, None), |(h, p)| (h, Some(p)));
    for part in head.split(',') {
        match part.split_once('=') {
            Some(("cid", n)) if cid.is_none() => cid = Some(n.parse::<u64>().map_err(|_| bad())?),
            Some(("uds", p)) if uds.is_none() && path.is_none() => uds = Some(p.to_string()),
            _ => return Err(bad()),
        }
    }
    let uds = path.map(str::to_string).or(uds).filter(|p| !p.is_empty()).ok_or_else(bad)?;
    let cid = cid.filter(|c| (3..=0xffff_fffe).contains(c)).ok_or_else(bad)?;
    Ok(VsockConfig { cid, uds: PathBuf::from(uds) })
}

/// Checks a list of networks: one TAP per interface.
pub fn check_nets(nets: &[NetConfig]) -> Result<(), ConfigError> {
    check_distinct_taps(nets.iter().map(|n| n.tap.as_str()))
}

/// Checks that no TAP is named twice.
pub fn check_distinct_taps<'a>(taps: impl Iterator<Item = &'a str>) -> Result<(), ConfigError> {
    let mut seen = std::collections::HashSet::new();
    for tap in taps {
        if !seen.insert(tap) {
            return Err(ConfigError::SameTap(tap.to_string()));
        }
    }
    Ok(())
}

/// Parses a unicast MAC address `xx:xx:xx:xx:xx:xx`.
pub fn parse_mac(text: &str) -> Result<[u8; 6], ConfigError> {
    let bad = || ConfigError::BadMac(text.to_string());
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        let part = parts.next().ok_or_else(bad)?;
        if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad());
        }
        *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
    }
    if parts.next().is_some() || mac[0] & 1 != 0 || mac == [0; 6] {
        return Err(bad());
    }
    Ok(mac)
}

/// A locally administered unicast MAC from a hash (FNV-1a) of the TAP name.
fn default_mac(tap: &str) -> [u8; 6] {
    let hash = tap.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
    let b = hash.to_le_bytes();
    [0x02, b[0], b[1], b[2], b[3], b[4]]
}

/// A MAC address as text.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
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
        let here = std::env::current_dir().unwrap();
        assert_eq!(parse_disk("a.img").unwrap(), DiskConfig { path: here.join("a.img"), read_only: false });
        assert_eq!(parse_disk("/x/a,b.img,ro").unwrap(), DiskConfig { path: "/x/a,b.img".into(), read_only: true });
        assert!(parse_disk("a.img,rx").is_err());
        assert!(parse_disk(",ro").is_err());
    }

    #[test]
    fn nets() {
        let net = |t| parse_net(t).unwrap().into_config();
        assert_eq!(net("tap=tap0,mac=02:00:00:00:00:01"), NetConfig { tap: "tap0".into(), mac: [2, 0, 0, 0, 0, 1] });
        assert_eq!(parse_net("tap=tap0").unwrap().mac, None);
        let d = net("tap=tap0");
        assert_eq!(d.mac, net("tap=tap0").mac);
        assert_ne!(d.mac, net("tap=tap1").mac);
        assert_eq!(d.mac[0], 2);
        for bad in ["", "tap0", "tap=", "tap=a,tap=b", "tap=a,x=1", "mac=02:00:00:00:00:01"] {
            assert!(matches!(parse_net(bad), Err(ConfigError::BadNet(_))), "{bad}");
        }
        for bad in [
            "01:00:00:00:00:01",
            "00:00:00:00:00:00",
            "02:00:00:00:00",
            "02:00:00:00:00:01:02",
            "2:0:0:0:0:1",
            "zz:00:00:00:00:01",
            "+2:00:00:00:00:01",
            "02:+0:00:00:00:01",
        ] {
            assert!(matches!(parse_mac(bad), Err(ConfigError::BadMac(_))), "{bad}");
        }
        assert_eq!(format_mac(&[2, 0xab, 0, 0, 0, 1]), "02:ab:00:00:00:01");
        let twice = [net("tap=a"), net("tap=a,mac=02:00:00:00:00:09")];
        assert_eq!(parse_vsock("cid=3,uds=/tmp/v.sock").unwrap(), VsockConfig { cid: 3, uds: "/tmp/v.sock".into() });
        assert_eq!(parse_vsock("cid=7,uds=/a,b").unwrap().uds, PathBuf::from("/a,b"));
        for bad in [
            "",
            "cid=3",
            "uds=/x",
            "cid=2,uds=/x",
            "cid=4294967295,uds=/x",
            "cid=x,uds=/x",
            "cid=3,uds=",
            "cid=3,cid=4,uds=/x",
        ] {
            assert!(parse_vsock(bad).is_err(), "{bad}");
        }
        assert_eq!(check_nets(&twice), Err(ConfigError::SameTap("a".into())));
    }
}
