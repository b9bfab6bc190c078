//! Snapshot and restore of a whole machine: collect the state of every vCPU, the VM and every
//! device plus guest memory, through the `snapshot` crate's format; and rebuild a VM from it.

use crate::vstate::memory::GuestMemory;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bincode::Options;
use serde::{Deserialize, Serialize};
use snapshot::{
    DeviceSummary, DiskDescription, Manifest, Snapshot, SnapshotWriter, StagedMemory, VcpuSummary, VmDescription,
};
use vm_memory::{FileOffset, GuestAddress};

use crate::arch::x86_64::cpuid;
use crate::arch::x86_64::layout::COM1_PORT;
use crate::config::{DiskConfig, VmConfig};
use crate::control::VmControl;
use crate::devices::bus::lock;
use crate::machine::{self, DevicesState, Machine, MachineError};
use crate::vstate::memory;
use crate::vstate::vcpu::ControlError;
use crate::vstate::vcpu_state::{self, VcpuState};
use crate::vstate::vm::{VmError, VmState};

/// Everything but memory that makes the machine.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MachineState {
    pub vm: VmState,
    pub vcpus: Vec<VcpuState>,
    pub devices: DevicesState,
}

fn codec() -> impl Options {
    bincode::DefaultOptions::new().with_limit(snapshot::MAX_STATE_BYTES)
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
    #[error("snapshot names its VM '{0}', which is not a valid VM name; give one with --name")]
    BadName(String),
}

impl PersistError {
    /// True when the snapshot (or the user's arguments) is at fault, not the host.
    pub fn is_bad_input(&self) -> bool {
        match self {
            PersistError::Format(e) => !matches!(e, snapshot::Error::Io { .. }),
            PersistError::Decode(_) | PersistError::Inconsistent(_) | PersistError::BadName(_) => true,
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

/// Guest memory taken while paused: copied aside, or already in the page file.
enum SavedMemory {
    Staged(StagedMemory),
    Written(snapshot::MemoryLayout),
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

/// Saves the running machine to `out`. The guest is paused while its state is read and its
/// memory copied aside, then continues (unless `stop`: then it stays paused for the caller to
/// end) while the snapshot is written and made durable. On any failure the guest is left as it
/// was before (running, or paused by the user) and nothing is left at `out`.
pub fn snapshot(control: &VmControl, out: &Path, opts: SnapshotOptions) -> Result<SnapshotReport, PersistError> {
    let start = Instant::now();
    let writer = SnapshotWriter::create(out, opts.force)?;
    // Allocating and faulting in the staging buffer is the slow part: do it before pausing.
    let staging =
        memory::staging_size(&control.mem, &memory::page_kinds(&control.mem)).and_then(StagedMemory::with_capacity);
    let mut paused = control.pause_for()?;
    let paused_at = Instant::now();
    let resume_on_error = opts.stop && paused.was_running();
    let taken = (|| {
        // VM-wide state first: interrupts the PIT delivers meanwhile then show in the LAPICs.
        let vm = paused.vm_state()?;
        let vcpus = paused.vcpu_states()?;
        let devices = paused.devices_state();
        let state = MachineState { vm, vcpus, devices };
        let bytes = codec().serialize(&state).map_err(|e| PersistError::Decode(e.to_string()))?;
        let digest = writer.write_state(&bytes)?;
        let sources = paused.memory();
        // Copy memory aside at memory speed; write it straight to the file while paused only
        // when the copy does not fit.
        let staged = staging.and_then(|mut staged| staged.copy(&sources).then_some(staged));
        let saved = match staged {
            Some(staged) => SavedMemory::Staged(staged),
            None => SavedMemory::Written(writer.write_memory(&sources)?),
        };
        Ok::<_, PersistError>((state, digest, saved))
    })();
    if opts.stop && taken.is_ok() {
        paused.keep_paused();
    }
    drop(paused);
    let pause = paused_at.elapsed();
    let (state, state_digest, saved) = taken?;

    let result = (|| {
        let memory = match saved {
            SavedMemory::Staged(staged) => writer.write_staged_memory(&staged)?,
            SavedMemory::Written(layout) => layout,
        };
        // The disks must hold at least what the guest wrote before the snapshot, durably.
        for (t, d) in control.devices.virtio.iter().zip(&control.config.disks) {
            lock(t).sync().map_err(|e| PersistError::Disk(format!("{}: {e}", d.path.display())))?;
        }
        let manifest = Manifest {
            format_version: snapshot::FORMAT_VERSION,
            created_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            vmm_version: env!("CARGO_PKG_VERSION").into(),
            vm: describe_vm(&control.config),
            host_cpu: cpuid::host_cpu(),
            vcpus: state
                .vcpus
                .iter()
                .map(|v| VcpuSummary { index: v.index, mode: format!("{} cpl{}", v.mode(), v.cpl()), rip: v.regs.rip })
                .collect(),
            devices: describe_devices(control),
            state: state_digest,
            memory,
        };
        let bytes_on_disk = writer.commit(&manifest)?;
        Ok::<_, PersistError>(SnapshotReport {
            path: out.to_path_buf(),
            pause_ms: ms(pause),
            total_ms: ms(start.elapsed()),
            bytes_on_disk,
            memory_bytes: manifest.memory.total_size(),
            zero_pages: manifest.memory.zero_pages,
        })
    })();
    if result.is_err() && resume_on_error {
        // Never lose the guest because its snapshot failed.
        if let Err(e) = control.resume() {
            tracing::error!("cannot resume the guest after its snapshot failed: {e}");
        }
    }
    result
}

/// What `vmm inspect` shows of each device.
fn describe_devices(control: &VmControl) -> Vec<DeviceSummary> {
    let serial = DeviceSummary { kind: "serial".into(), detail: format!("16550 COM1 at {COM1_PORT:#x}") };
    let disks = control.devices.virtio.iter().zip(&control.config.disks).map(|(t, d)| DeviceSummary {
        kind: "virtio-blk".into(),
        detail: format!("{} ({}{})", lock(t).describe(), d.path.display(), if d.read_only { ", ro" } else { "" }),
    });
    std::iter::once(serial).chain(disks).collect()
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
    if verify_memory {
        snap.verify_memory()?;
    }
    Ok((snap, state))
}

/// Maps the page file as guest memory, privately: pages load on first touch and guest writes
/// never reach the snapshot.
fn map_memory(snap: &Snapshot) -> Result<GuestMemory, PersistError> {
    let path = snap.memory_path();
    let mut regions = Vec::new();
    for r in &snap.manifest.memory.regions {
        let file = File::open(&path).map_err(|e| PersistError::MapMemory(format!("{}: {e}", path.display())))?;
        let mapping = memory::GuestMapping::build(
            Some(FileOffset::new(file, r.file_offset)),
            r.size as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_NORESERVE,
        )
        .map_err(|e| PersistError::MapMemory(e.to_string()))?;
        let region = memory::GuestRegion::new(mapping, GuestAddress(r.guest_addr))
            .ok_or_else(|| PersistError::MapMemory(format!("region at {:#x} overflows", r.guest_addr)))?;
        regions.push(region);
    }
    GuestMemory::from_regions(regions).map_err(|e| PersistError::MapMemory(e.to_string()))
}

/// Refuses a snapshot whose guest was given CPU features this host cannot offer.
fn check_host_cpu(vm: &crate::vstate::vm::Vm, saved: &VcpuState) -> Result<(), PersistError> {
    let supported =
        vm.kvm.get_supported_cpuid(256).map_err(|err| VmError::Kvm { call: "KVM_GET_SUPPORTED_CPUID", err })?;
    let missing = cpuid::missing_features(&saved.cpuid, supported.as_slice());
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
    if opts.name.is_none() && !crate::api::valid_name(&desc.name) {
        return Err(PersistError::BadName(desc.name.clone()));
    }
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
    // The interrupt controllers and PIT come back before the devices, which may raise interrupts.
    let (machine, _) = Machine::assemble(config, vm, mem, disks, Some((&state.vm, &state.devices)))?;
    // kvmclock before any vCPU runs, so the guest's clock goes on from the saved instant.
    machine.vm.restore_clock(&state.vm)?;
    let xsave_size = machine.vm.xsave_size();
    for (vcpu, saved) in machine.vcpus.iter().zip(&state.vcpus) {
        vcpu_state::restore(&vcpu.fd, saved, xsave_size).map_err(MachineError::from)?;
    }
    // Only now, with the LAPICs restored (KVM_SET_LAPIC replaces their pending interrupts), can
    // the devices raise the interrupts they had pending.
    machine.devices.replay_interrupts();
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
