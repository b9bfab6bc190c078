//! The command line: whitespace-separated `key=value` words; unknown words are ignored.

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    Demo,
    Mem,
    Idle,
    Disk,
    Poweroff,
    TripleFault,
    AcpiReset,
    KeyboardReset,
    Dirty,
    Net,
    Vsock,
}

#[derive(Clone, Copy)]
pub struct Config {
    pub workload: Workload,
    /// Bytes each CPU fills and verifies.
    pub mem_size: u64,
    /// MiB/s each CPU dirties; 0 = as fast as it can.
    pub mem_rate: u64,
    pub disk_sectors: u64,
    /// Disk round trips to run (0 = forever, with tick lines).
    pub disk_rounds: u64,
    /// The disk workload runs on CPU 1 while CPU 0 runs the vsock services, whose agent holds
    /// the disk's writes between a quiesce and a thaw (needs two CPUs and a vsock device).
    pub disk_agent: bool,
    /// Power off after this many tick lines; 0 = never.
    pub ticks: u64,
    /// Milliseconds of guest time between tick lines.
    pub tick_ms: u64,
    /// Pages the dirty workload writes each tick, one every `dirty_stride` bytes.
    pub dirty_pages: u64,
    pub dirty_stride: u64,
    /// Bytes the dirty workload fills with data once, at start (its pages lie in them).
    pub dirty_fill: u64,
    /// The net workload's IPv4 address.
    pub net_ip: [u8; 4],
    /// The vsock workload connects to this host port at start (0: it does not).
    pub vsock_connect: u32,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            workload: Workload::Demo,
            mem_size: 16 << 20,
            mem_rate: 0,
            disk_sectors: 64,
            disk_rounds: 1,
            disk_agent: false,
            ticks: 0,
            tick_ms: 1000,
            dirty_pages: 16,
            dirty_stride: 64 << 10,
            dirty_fill: 0,
            net_ip: [10, 0, 0, 2],
            vsock_connect: 0,
        }
    }
}

/// Parses the command line; on a bad value returns the offending word.
pub fn parse(line: &[u8]) -> Result<Config, &[u8]> {
    let mut cfg = Config::default();
    for word in line.split(|c| c.is_ascii_whitespace()).filter(|w| !w.is_empty()) {
        let Some(eq) = word.iter().position(|&c| c == b'=') else { continue };
        let (key, value) = (&word[..eq], &word[eq + 1..]);
        let ok = match key {
            b"workload" => {
                cfg.workload = match value {
                    b"demo" => Workload::Demo,
                    b"mem" => Workload::Mem,
                    b"idle" => Workload::Idle,
                    b"disk" => Workload::Disk,
                    b"poweroff" => Workload::Poweroff,
                    b"triplefault" => Workload::TripleFault,
                    b"acpireset" => Workload::AcpiReset,
                    b"kbdreset" => Workload::KeyboardReset,
                    b"dirty" => Workload::Dirty,
                    b"net" => Workload::Net,
                    b"vsock" => Workload::Vsock,
                    _ => return Err(word),
                };
                true
            }
            b"mem.size" => size(value).map(|v| cfg.mem_size = v).is_some() && cfg.mem_size > 0,
            b"mem.rate" => number(value).map(|v| cfg.mem_rate = v).is_some(),
            b"disk.sectors" => number(value).map(|v| cfg.disk_sectors = v).is_some() && cfg.disk_sectors > 0,
            b"disk.rounds" => number(value).map(|v| cfg.disk_rounds = v).is_some(),
            b"disk.agent" => number(value).filter(|&v| v <= 1).map(|v| cfg.disk_agent = v == 1).is_some(),
            b"ticks" => number(value).map(|v| cfg.ticks = v).is_some(),
            b"dirty.pages" => number(value).map(|v| cfg.dirty_pages = v).is_some() && cfg.dirty_pages > 0,
            b"dirty.stride" => {
                size(value).map(|v| cfg.dirty_stride = v).is_some()
                    && cfg.dirty_stride >= 4096
                    && cfg.dirty_stride.is_multiple_of(4096)
            }
            b"dirty.fill" => size(value).map(|v| cfg.dirty_fill = v).is_some(),
            b"vsock.connect" => {
                number(value).and_then(|v| u32::try_from(v).ok()).map(|v| cfg.vsock_connect = v).is_some()
            }
            b"net.ip" => ipv4(value).map(|v| cfg.net_ip = v).is_some(),
            b"tick.ms" => number(value).map(|v| cfg.tick_ms = v).is_some() && cfg.tick_ms > 0,
            _ => true,
        };
        if !ok {
            return Err(word);
        }
    }
    Ok(cfg)
}

fn number(s: &[u8]) -> Option<u64> {
    if s.is_empty() {
        return None;
    }
    s.iter().try_fold(
        0u64,
        |acc, &c| {
            if c.is_ascii_digit() {
                acc.checked_mul(10)?.checked_add((c - b'0') as u64)
            } else {
                None
            }
        },
    )
}

/// A dotted-decimal IPv4 address.
fn ipv4(s: &[u8]) -> Option<[u8; 4]> {
    let mut ip = [0u8; 4];
    let mut parts = s.split(|&c| c == b'.');
    for byte in &mut ip {
        let n = number(parts.next()?)?;
        *byte = u8::try_from(n).ok()?;
    }
    parts.next().is_none().then_some(ip)
}

/// A byte count with an optional K, M or G suffix (powers of 1024).
fn size(s: &[u8]) -> Option<u64> {
    let (digits, shift) = match s.last()?.to_ascii_uppercase() {
        b'K' => (&s[..s.len() - 1], 10),
        b'M' => (&s[..s.len() - 1], 20),
        b'G' => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    let n = number(digits)?;
    if n.leading_zeros() < shift + 1 {
        return None;
    }
    Some(n << shift)
}
