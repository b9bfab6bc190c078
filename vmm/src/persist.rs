//! Snapshot and restore of a whole machine: collect the state of every vCPU, the VM and every
//! device plus guest memory, through the `snapshot` crate's format; and rebuild a VM from it.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bincode::Options;
use serde::{Deserialize, Serialize};
use snapshot::{
    CpuIdentity, DeviceSummary, DiskDescription, Manifest, MemorySource, Snapshot, SnapshotWriter, StagedMemory,
    VcpuSummary, VmDescription,
};
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap, MmapRegion,
};

use crate::config::{DiskConfig, VmConfig};
use crate::control::VmControl;
use crate::machine::{self, DevicesState, Machine, MachineError};
use crate::vstate::vcpu::ControlError;
use crate::vstate::vcpu_state::{self, VcpuState};
use crate::vstate::vm::{VmError, VmState};

/// Largest state file we decode (the state is a few KiB per vCPU).
const STATE_LIMIT: u64 = 64 << 20;

/// Everything but memory that makes the machine.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MachineState {
    pub vm: VmState,
    pub vcpus: Vec<VcpuState>,
    pub devices: DevicesState,
}

fn codec() -> impl Options {
    bincode::DefaultOptions::new().with_limit(STATE_LIMIT)
}

#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error(transparent)]
    Format(#[from] snapshot::Error),
    #[error("snapshot state cannot be decoded: {0}")]
    Decode(String),
    #[error("snapshot state is inconsistent: {0}")]
    Inconsistent(String),
    #[error("cannot pause the guest: {0}")]
    Control(#[from] ControlError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Machine(#[from] MachineError),
    #[error("this host cannot run the snapshot: {0}")]
    HostCpu(String),
    #[error("cannot map snapshot memory: {0}")]
    MapMemory(String),
    #[error("cannot flush disk {0}")]
    Disk(String),
}

impl PersistError {
    /// True when the snapshot (or the user's arguments) is at fault, not the host.
    pub fn is_bad_input(&self) -> bool {
        match self {
            PersistError::Format(e) => !matches!(e, snapshot::Error::Io { .. }),
            PersistError::Decode(_) | PersistError::Inconsistent(_) => true,
            PersistError::Machine(e) => e.is_bad_input(),
            _ => false,
        }
    }
}

#[derive(Clone, Copy, Debug, Default)]
pub struct SnapshotOptions {
    /// Replace an existing snapshot at the destination.
    pub force: bool,
    /// Leave the guest paused once the snapshot is safely on disk (the caller then ends the VM).
    pub stop: bool,
}

/// What a snapshot cost.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SnapshotReport {
    pub path: PathBuf,
    /// Time the guest did not run.
    pub pause_ms: f64,
    /// Time until the snapshot was durable (fsync'd and renamed into place).
    pub total_ms: f64,
    pub bytes_on_disk: u64,
    pub memory_bytes: u64,
    pub zero_pages: u64,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Guest memory as byte slices, for the page file.
fn memory_sources(mem: &GuestMemoryMmap) -> Vec<MemorySource<'_>> {
    mem.iter()
        .map(|region| {
            let len = region.len() as usize;
            // SAFETY: the region maps `len` bytes for as long as `mem` lives. The caller holds
            // every vCPU paused, and devices only touch guest memory from vCPU threads, so
            // nothing writes to it while the slice is read.
            let bytes = unsafe { std::slice::from_raw_parts(region.as_ptr() as *const u8, len) };
            // In anonymous memory a page that is not resident was never touched: it is zero, and
            // need not be faulted in to find out. (Not so for memory mapped from a snapshot.)
            let resident = if region.file_offset().is_none() { residency(bytes) } else { None };
            MemorySource { guest_addr: region.start_addr().0, bytes, resident }
        })
        .collect()
}

/// Guest memory taken while paused: copied aside, or already in the page file.
enum SavedMemory {
    Staged(StagedMemory),
    Written(snapshot::MemoryLayout),
}

/// How much to set aside to copy the guest's non-zero memory (its resident anonymous pages, all
/// of a mapped region, with some room for pages touched meanwhile), or None when that would not
/// fit comfortably in half of what the host has available.
fn staging_size(sources: &[MemorySource<'_>]) -> Option<usize> {
    let bound: u64 = sources
        .iter()
        .map(|s| match &s.resident {
            Some(map) => map.iter().filter(|b| *b & 1 != 0).count() as u64 * 4096,
            None => s.bytes.len() as u64,
        })
        .sum();
    let available = std::fs::read_to_string("/proc/meminfo").ok().and_then(|text| {
        let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
        line.split_whitespace().nth(1)?.parse::<u64>().ok().map(|kib| kib * 1024)
    });
    let size = bound + bound / 16 + (16 << 20);
    available.filter(|a| size <= a / 2).map(|_| size as usize)
}

/// mincore(2) of a mapping: one byte a page, bit 0 set if resident.
fn residency(bytes: &[u8]) -> Option<Vec<u8>> {
    let mut vec = vec![0u8; bytes.len().div_ceil(4096)];
    // SAFETY: `bytes` is a page-aligned mapping of its length, and `vec` has a byte per page.
    let rc = unsafe { libc::mincore(bytes.as_ptr() as *mut libc::c_void, bytes.len(), vec.as_mut_ptr()) };
    (rc == 0).then_some(vec)
}

/// The host CPU's identity and feature words (CPUID leaves 1 and 7).
pub fn host_cpu() -> CpuIdentity {
    use std::arch::x86_64::{__cpuid, __cpuid_count};
    let (l0, l1, l7) = (__cpuid(0), __cpuid(1), __cpuid_count(7, 0));
    let vendor: Vec<u8> = [l0.ebx, l0.edx, l0.ecx].iter().flat_map(|r| r.to_le_bytes()).collect();
    let base_family = (l1.eax >> 8) & 0xf;
    let family = if base_family == 0xf { base_family + ((l1.eax >> 20) & 0xff) } else { base_family };
    let model = ((l1.eax >> 4) & 0xf) | (((l1.eax >> 16) & 0xf) << 4);
    CpuIdentity {
        vendor: String::from_utf8_lossy(&vendor).into_owned(),
        family,
        model,
        stepping: l1.eax & 0xf,
        feature_words: vec![l1.ecx, l1.edx, l7.ebx, l7.ecx, l7.edx],
    }
}

fn describe_vm(config: &VmConfig) -> VmDescription {
    VmDescription {
        name: config.name.clone(),
        vcpus: config.vcpus,
        mem_bytes: config.mem_bytes,
        kernel: config.kernel.display().to_string(),
        cmdline: config.cmdline.clone(),
        disks: config
            .disks
            .iter()
            .map(|d| DiskDescription { path: d.path.display().to_string(), read_only: d.read_only })
            .collect(),
    }
}

/// Saves the running machine to `out`. The guest is paused while its state and memory are
/// copied, then continues (unless `stop`, which leaves it paused for the caller to end) while the
/// snapshot is made durable. On any failure the guest keeps running and nothing is left at `out`.
pub fn snapshot(control: &VmControl, out: &Path, opts: SnapshotOptions) -> Result<SnapshotReport, PersistError> {
    let start = Instant::now();
    let writer = SnapshotWriter::create(out, opts.force)?;
    // Prepare the staging buffer before pausing: allocating and faulting it in is the slow part.
    let mut staging = staging_size(&memory_sources(&control.mem)).map(StagedMemory::with_capacity);
    let mut paused = control.pause_for()?;
    let paused_at = Instant::now();
    let vcpus = paused.vcpu_states()?;
    let vm = control.vm_state(&paused)?;
    let devices = control.devices.save();
    let summaries = vcpus
        .iter()
        .map(|v| VcpuSummary { index: v.index, mode: format!("{} cpl{}", v.mode(), v.cpl()), rip: v.regs.rip })
        .collect();
    let state = MachineState { vm, vcpus, devices };
    let bytes = codec().serialize(&state).map_err(|e| PersistError::Decode(e.to_string()))?;
    let state_digest = writer.write_state(&bytes)?;
    // Copy memory aside at memory speed and let the guest run while it goes to disk; write it
    // straight to the file while paused only when the copy would not fit in host memory.
    let sources = memory_sources(&control.mem);
    let saved = match staging.take() {
        Some(mut staged) => {
            staged.copy(&sources);
            SavedMemory::Staged(staged)
        }
        None => SavedMemory::Written(writer.write_memory(&sources)?),
    };
    drop(sources);
    if opts.stop {
        paused.keep_paused();
    }
    drop(paused);
    let pause = paused_at.elapsed();
    let memory = match saved {
        SavedMemory::Staged(staged) => writer.write_staged_memory(&staged)?,
        SavedMemory::Written(layout) => layout,
    };

    let result = (|| {
        // The disks must hold at least what the guest wrote before the snapshot, durably.
        for (t, d) in control.devices.virtio.iter().zip(&control.config.disks) {
            crate::devices::bus::lock(t)
                .sync()
                .map_err(|e| PersistError::Disk(format!("{}: {e}", d.path.display())))?;
        }
        let mut device_summaries = vec![DeviceSummary { kind: "serial".into(), detail: "16550 COM1 at 0x3f8".into() }];
        for (t, d) in control.devices.virtio.iter().zip(&control.config.disks) {
            let detail = format!(
                "{} ({}{})",
                crate::devices::bus::lock(t).describe(),
                d.path.display(),
                if d.read_only { ", ro" } else { "" }
            );
            device_summaries.push(DeviceSummary { kind: "virtio-blk".into(), detail });
        }
        let manifest = Manifest {
            format_version: snapshot::FORMAT_VERSION,
            created_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            vmm_version: env!("CARGO_PKG_VERSION").into(),
            vm: describe_vm(&control.config),
            host_cpu: host_cpu(),
            vcpus: summaries,
            devices: device_summaries,
            state: state_digest,
            memory: memory.clone(),
        };
        writer.commit(&manifest)?;
        Ok::<_, PersistError>(())
    })();
    if let Err(e) = result {
        if opts.stop {
            // Never lose the guest because its snapshot failed.
            control.resume()?;
        }
        return Err(e);
    }
    let snap = Snapshot::open(out)?;
    let report = SnapshotReport {
        path: out.to_path_buf(),
        pause_ms: ms(pause),
        total_ms: ms(start.elapsed()),
        bytes_on_disk: snap.disk_usage(),
        memory_bytes: memory.total_size(),
        zero_pages: memory.zero_pages,
    };
    Ok(report)
}

#[derive(Clone, Debug, Default)]
pub struct ResumeOptions {
    /// Name of the resumed VM (default: the snapshot's).
    pub name: Option<String>,
    /// Check every memory checksum before starting.
    pub verify: bool,
}

/// Opens a snapshot and decodes its machine state, checking everything that can be checked
/// without KVM.
pub fn load(dir: &Path, verify_memory: bool) -> Result<(Snapshot, MachineState), PersistError> {
    let snap = Snapshot::open(dir)?;
    if verify_memory {
        snap.verify_memory()?;
    }
    let bytes = snap.read_state()?;
    let state: MachineState = codec().deserialize(&bytes).map_err(|e| PersistError::Decode(e.to_string()))?;
    let m = &snap.manifest;
    if state.vcpus.len() != usize::from(m.vm.vcpus)
        || state.vcpus.iter().enumerate().any(|(i, v)| usize::from(v.index) != i)
    {
        return Err(PersistError::Inconsistent("vCPU states do not match the manifest".into()));
    }
    if state.devices.virtio.len() != m.vm.disks.len() {
        return Err(PersistError::Inconsistent("device states do not match the manifest".into()));
    }
    let expected = crate::arch::x86_64::memory_map::ram_regions(m.vm.mem_bytes);
    let layout: Vec<(u64, u64)> = m.memory.regions.iter().map(|r| (r.guest_addr, r.size)).collect();
    if layout != expected {
        return Err(PersistError::Inconsistent("memory layout does not match the memory size".into()));
    }
    Ok((snap, state))
}

/// Maps the page file as guest memory, privately: pages load on first touch and guest writes
/// never reach the snapshot.
fn map_memory(snap: &Snapshot) -> Result<GuestMemoryMmap, PersistError> {
    let path = snap.memory_path();
    let mut regions = Vec::new();
    for r in &snap.manifest.memory.regions {
        let file = File::open(&path).map_err(|e| PersistError::MapMemory(format!("{}: {e}", path.display())))?;
        let mapping = MmapRegion::build(
            Some(FileOffset::new(file, r.file_offset)),
            r.size as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_NORESERVE,
        )
        .map_err(|e| PersistError::MapMemory(e.to_string()))?;
        let region = GuestRegionMmap::new(mapping, GuestAddress(r.guest_addr))
            .ok_or_else(|| PersistError::MapMemory(format!("region at {:#x} overflows", r.guest_addr)))?;
        regions.push(region);
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| PersistError::MapMemory(e.to_string()))
}

/// CPUID feature words (leaf 1 ECX/EDX, leaf 7.0 EBX/ECX/EDX) of a CPUID table.
fn feature_words(cpuid: &[kvm_bindings::kvm_cpuid_entry2]) -> [u32; 5] {
    let find = |f: u32| cpuid.iter().find(|e| e.function == f && e.index == 0);
    let (l1, l7) = (find(1), find(7));
    [
        l1.map_or(0, |e| e.ecx),
        l1.map_or(0, |e| e.edx),
        l7.map_or(0, |e| e.ebx),
        l7.map_or(0, |e| e.ecx),
        l7.map_or(0, |e| e.edx),
    ]
}

/// Refuses a snapshot whose guest was given CPU features this host cannot offer: neither KVM
/// supports them nor does the CPU have them (on PVM hosts the guest sees the host's own CPUID).
fn check_host_cpu(vm: &crate::vstate::vm::Vm, saved: &VcpuState) -> Result<(), PersistError> {
    let supported =
        vm.kvm.get_supported_cpuid(256).map_err(|err| VmError::Kvm { call: "KVM_GET_SUPPORTED_CPUID", err })?;
    // Bits KVM reports but that describe per-vCPU or hypervisor-controlled state, not CPU features.
    const IGNORED: [u32; 5] = [(1 << 31) | (1 << 27) | (1 << 24) | (1 << 21), 1 << 9, 0, 0, 0];
    let kvm = feature_words(supported.as_slice());
    let raw = host_cpu().feature_words;
    let have: Vec<u32> = kvm.iter().zip(&raw).map(|(k, r)| k | r).collect();
    let need = feature_words(&saved.cpuid);
    let missing: Vec<String> = (0..5)
        .filter_map(|w| {
            let bits = need[w] & !have[w] & !IGNORED[w];
            (bits != 0).then(|| format!("{}={bits:#x}", ["1.ecx", "1.edx", "7.ebx", "7.ecx", "7.edx"][w]))
        })
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(PersistError::HostCpu(format!("the CPU lacks features the guest uses (CPUID {})", missing.join(", "))))
    }
}

/// Rebuilds the machine of a snapshot, ready to start where it stopped.
pub fn restore(dir: &Path, opts: &ResumeOptions) -> Result<Machine, PersistError> {
    let (snap, state) = load(dir, opts.verify)?;
    let desc = &snap.manifest.vm;
    let config = VmConfig {
        name: opts.name.clone().unwrap_or_else(|| desc.name.clone()),
        kernel: desc.kernel.clone().into(),
        initrd: None,
        cmdline: desc.cmdline.clone(),
        mem_bytes: desc.mem_bytes,
        vcpus: desc.vcpus,
        disks: desc.disks.iter().map(|d| DiskConfig { path: d.path.clone().into(), read_only: d.read_only }).collect(),
    };
    let disks = machine::open_disks(&config)?;
    let vm = machine::create_vm(&config)?;
    check_host_cpu(&vm, &state.vcpus[0])?;
    let mem = map_memory(&snap)?;
    let (machine, _) = Machine::assemble(config, vm, mem, disks, Some(&state.devices))?;
    // VM-wide state first: kvmclock must be set before any vCPU runs.
    machine.vm.restore_state(&state.vm)?;
    for (vcpu, saved) in machine.vcpus.iter().zip(&state.vcpus) {
        vcpu_state::restore(&vcpu.fd, saved).map_err(MachineError::from)?;
    }
    Ok(machine)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::legacy::SerialSnapshot;

    #[test]
    fn machine_state_round_trips_through_the_codec() {
        let vcpu = VcpuState {
            index: 0,
            cpuid: vec![kvm_bindings::kvm_cpuid_entry2 { function: 1, eax: 7, ..Default::default() }],
            msrs: vec![(0x10, 42)],
            mp_state: Default::default(),
            regs: kvm_bindings::kvm_regs { rip: 0x1234, ..Default::default() },
            sregs: Default::default(),
            xsave: vec![5; 1024],
            xcrs: Default::default(),
            debugregs: Default::default(),
            lapic: Default::default(),
            vcpu_events: Default::default(),
            tsc_khz: Some(2_000_000),
        };
        let state = MachineState {
            vm: VmState {
                pic_master: Default::default(),
                pic_slave: Default::default(),
                ioapic: Default::default(),
                pit: Default::default(),
                clock: kvm_bindings::kvm_clock_data { clock: 99, ..Default::default() },
            },
            vcpus: vec![vcpu],
            devices: DevicesState { serial: SerialSnapshot { scratch: 3, ..Default::default() }, virtio: vec![] },
        };
        let bytes = codec().serialize(&state).unwrap();
        let back: MachineState = codec().deserialize(&bytes).unwrap();
        assert_eq!(back.vcpus[0].regs.rip, 0x1234);
        assert_eq!(back.vcpus[0].xsave, vec![5; 1024]);
        assert_eq!(back.vm.clock.clock, 99);
        assert_eq!(back.devices.serial.scratch, 3);
        // Garbage is an error, never a panic or a huge allocation.
        assert!(codec().deserialize::<MachineState>(&bytes[..bytes.len() / 2]).is_err());
        assert!(codec().deserialize::<MachineState>(&[0xff; 64]).is_err());
    }
}
