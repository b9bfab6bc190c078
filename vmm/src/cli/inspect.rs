//! `vmm inspect`, `vmm verify` and `vmm merge`: look inside a snapshot, check it, flatten a chain
//! of diffs, without KVM. Inspect and verify read a directory, or a snapshot stream on stdin (`-`).

use std::io::IsTerminal;
use std::path::Path;

use snapshot::{Chain, Manifest, Progress, Snapshot};

use super::{CmdResult, Failure};

fn failure(e: vmm::persist::PersistError) -> Failure {
    if e.is_bad_input() {
        Failure::bad_input(e.to_string())
    } else {
        Failure::runtime(e.to_string())
    }
}

/// A snapshot as inspected: its manifest, id and size.
struct Described {
    id: String,
    manifest: Manifest,
    /// Bytes on disk (directory, holes excluded) or in the stream.
    bytes: u64,
    stream: bool,
}

fn read(dir: &Path) -> Result<Described, Failure> {
    if dir.as_os_str() == "-" {
        if std::io::stdin().is_terminal() {
            return Err(Failure::bad_input("'-' reads a snapshot stream from stdin: pipe one in"));
        }
        let s = vmm::persist::inspect_stream(std::io::stdin().lock(), "stdin").map_err(failure)?;
        return Ok(Described { id: s.id, manifest: s.manifest, bytes: s.bytes, stream: true });
    }
    let snap = Snapshot::open(dir).map_err(|e| failure(e.into()))?;
    let bytes = snap.disk_usage();
    Ok(Described { id: snap.id, manifest: snap.manifest, bytes, stream: false })
}

pub fn inspect(dir: &Path, json: bool) -> CmdResult {
    let d = read(dir)?;
    let m = &d.manifest;
    let pages = m.memory.total_pages().max(1);
    let zero_share = m.memory.zero_pages() as f64 / pages as f64;
    if json {
        let value = serde_json::json!({
            "path": dir.display().to_string(),
            "id": d.id,
            "stream": d.stream,
            "manifest": m,
            "bytes": d.bytes,
            "zero_page_share": zero_share,
        });
        println!("{}", serde_json::to_string_pretty(&value).map_err(|e| Failure::runtime(e.to_string()))?);
        return Ok(0);
    }
    let what = if d.stream { "stream" } else { "snapshot" };
    println!("{what:<16}{}", if d.stream { "(stdin)".into() } else { dir.display().to_string() });
    println!("id              {}", d.id);
    println!("format version  {}", m.format_version);
    if let Some(parent) = &m.parent {
        let at = m.parent_dir.as_deref().unwrap_or("(not recorded)");
        println!("parent          {parent} at {at}");
        // The chain down to its full snapshot, if it can be followed from here.
        match Chain::open(dir) {
            Ok(chain) => {
                let layers: Vec<String> = chain.layers.iter().map(|l| l.dir.display().to_string()).collect();
                println!("chain           {} layers: {}", layers.len(), layers.join(" <- "));
            }
            Err(e) => println!("chain           broken: {e}"),
        }
    }
    println!("taken by        vmm {} at {} (unix time {})", m.vmm_version, utc(m.created_unix), m.created_unix);
    println!("vm              {} ({} vCPUs, {} MiB)", m.vm.name, m.vm.vcpus, m.vm.mem_bytes >> 20);
    println!("kernel          {}", m.vm.kernel);
    println!("cmdline         {}", m.vm.cmdline);
    for disk in &m.vm.disks {
        let held = match &disk.copy {
            Some(c) => format!(", copy in the snapshot: {} ({} MiB)", c.file, c.size >> 20),
            None => String::new(),
        };
        println!("disk            {}{}{held}", disk.path, if disk.read_only { " (read-only)" } else { "" });
    }
    for net in &m.vm.nets {
        println!("net             tap={} mac={}", net.tap, net.mac);
    }
    if let Some(v) = &m.vm.vsock {
        println!("vsock           cid={} uds={}", v.cid, v.uds);
    }
    println!(
        "host cpu        {} family {} model {} stepping {}",
        m.host_cpu.vendor, m.host_cpu.family, m.host_cpu.model, m.host_cpu.stepping
    );
    for v in &m.vcpus {
        println!("vcpu {:<10} {} rip={:#x}", v.index, v.mode, v.rip);
    }
    for dev in &m.devices {
        // The detail starts with the device's id and says what it is.
        println!("device          {}", dev.detail);
    }
    for s in &m.state.sections {
        println!("state section   {} v{} ({} bytes)", s.name, s.version, s.bytes);
    }
    println!("memory          {} MiB in {} regions", m.memory.total_size() >> 20, m.memory.regions.len());
    println!("zero pages      {:.1}% ({} of {})", zero_share * 100.0, m.memory.zero_pages(), m.memory.total_pages());
    let where_ = if d.stream { "bytes in stream " } else { "bytes on disk   " };
    println!("{where_}{} ({:.1} MiB)", d.bytes, d.bytes as f64 / (1u64 << 20) as f64);
    Ok(0)
}

/// `YYYY-MM-DD HH:MM:SS UTC` of a Unix time (the proleptic Gregorian calendar, Howard Hinnant's
/// days-to-civil algorithm).
fn utc(unix: u64) -> String {
    let days = (unix / 86400) as i64;
    let secs = unix % 86400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC", secs / 3600, secs / 60 % 60, secs % 60)
}

pub fn verify(dir: &Path) -> CmdResult {
    if dir.as_os_str() == "-" {
        // Reading a stream checks every frame's checksum, the state's and the coverage of memory.
        let d = read(dir)?;
        println!(
            "stream: ok (manifest, state and {} MiB of memory in {} bytes verified)",
            d.manifest.memory.total_size() >> 20,
            d.bytes
        );
        return Ok(0);
    }
    let (chain, _) = vmm::persist::load_dir(dir, false).map_err(failure)?;
    chain.verify().map_err(|e| failure(e.into()))?;
    let chunks: usize = chain.layers.iter().map(|l| l.manifest.memory.chunk_checksums.len()).sum();
    let layers = match chain.layers.len() {
        1 => String::new(),
        n => format!("{n} layers, every link and "),
    };
    println!("{}: ok ({layers}manifest, state and {chunks} memory chunks verified)", dir.display());
    Ok(0)
}

pub fn merge(dirs: &[std::path::PathBuf], out: &Path, force: bool) -> CmdResult {
    super::check_out_parent(out)?;
    let chain = match dirs {
        [one] => Chain::open(one),
        several => Chain::open_layers(several),
    }
    .map_err(|e| failure(e.into()))?;
    let id = snapshot::chain::merge(&chain, out, force, &Progress::default()).map_err(|e| failure(e.into()))?;
    let kind = match &chain.base().manifest.parent {
        Some(parent) => format!("a diff of {parent}"),
        None => "a full snapshot".into(),
    };
    let layers = match chain.layers.len() {
        1 => "1 layer (nothing to merge: a copy)".to_string(),
        n => format!("{n} layers merged"),
    };
    println!("snapshot {} id {id}: {layers}, {kind}", out.display());
    Ok(0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn utc_dates() {
        assert_eq!(super::utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(super::utc(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(super::utc(1_796_042_851), "2026-11-30 12:47:31 UTC");
    }
}
