//! `vmm inspect` and `vmm verify`: look inside a snapshot and check it, without KVM.

use std::path::Path;

use snapshot::Snapshot;

use super::{CmdResult, Failure};

fn open(dir: &Path) -> Result<Snapshot, Failure> {
    Snapshot::open(dir).map_err(|e| Failure::bad_input(e.to_string()))
}

pub fn inspect(dir: &Path, json: bool) -> CmdResult {
    let snap = open(dir)?;
    let m = &snap.manifest;
    let disk = snap.disk_usage();
    let pages = m.memory.total_pages().max(1);
    let zero_share = m.memory.zero_pages as f64 / pages as f64;
    if json {
        let value = serde_json::json!({
            "path": dir.display().to_string(),
            "manifest": m,
            "bytes_on_disk": disk,
            "zero_page_share": zero_share,
        });
        println!("{}", serde_json::to_string_pretty(&value).map_err(|e| Failure::runtime(e.to_string()))?);
        return Ok(0);
    }
    println!("snapshot        {}", dir.display());
    println!("format version  {}", m.format_version);
    println!("taken by        vmm {} at unix time {}", m.vmm_version, m.created_unix);
    println!("vm              {} ({} vCPUs, {} MiB)", m.vm.name, m.vm.vcpus, m.vm.mem_bytes >> 20);
    println!("kernel          {}", m.vm.kernel);
    println!("cmdline         {}", m.vm.cmdline);
    println!(
        "host cpu        {} family {} model {} stepping {}",
        m.host_cpu.vendor, m.host_cpu.family, m.host_cpu.model, m.host_cpu.stepping
    );
    for v in &m.vcpus {
        println!("vcpu {:<10} {} rip={:#x}", v.index, v.mode, v.rip);
    }
    for d in &m.devices {
        println!("device          {}: {}", d.kind, d.detail);
    }
    println!("memory          {} MiB in {} regions", m.memory.total_size() >> 20, m.memory.regions.len());
    println!("zero pages      {:.1}% ({} of {})", zero_share * 100.0, m.memory.zero_pages, m.memory.total_pages());
    println!("bytes on disk   {disk}");
    Ok(0)
}

pub fn verify(dir: &Path) -> CmdResult {
    let snap = open(dir)?;
    snap.read_state().map_err(|e| Failure::bad_input(e.to_string()))?;
    snap.verify_memory().map_err(|e| Failure::bad_input(e.to_string()))?;
    println!(
        "{}: ok (manifest, state and {} memory chunks verified)",
        dir.display(),
        snap.manifest.memory.chunk_checksums.len()
    );
    Ok(0)
}
