//! Builds a VM from a `VmConfig` and runs it until it ends.

use std::fs::File;
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};

use crate::vstate::memory::GuestMemory;

use crate::arch::x86_64::acpi::{self, AcpiConfig, MmioDeviceInfo};
use crate::arch::x86_64::boot::{self, BootEntry, BootError};
use crate::arch::x86_64::layout::{
    ACPI_SLEEP_CONTROL_PORT, COM1_IRQ, COM1_PORT, I8042_PORT, IOAPIC_PINS, VIRTIO_IRQ_BASE, VIRTIO_MMIO_SIZE,
    VIRTIO_MMIO_START,
};
use crate::arch::x86_64::{cpuid, regs};
use crate::config::VmConfig;
use crate::console;
use crate::control::{DiffBase, VmControl};
use crate::devices::bus::lock;
use crate::devices::legacy::{AcpiPmDevice, SerialDevice, I8042};
use crate::devices::persist::{DeviceRecord, DurableFile, Persist, Resources};
use crate::devices::virtio::mmio::QUEUE_NOTIFY_OFFSET;
use crate::devices::virtio::net::{Tap, TapError};
use crate::devices::virtio::vsock::VsockError;
use crate::devices::virtio::{block::BlockError, Block, MmioTransport, Net, VirtioDevice, Vsock};
use crate::devices::{bus::OverlapError, Bus};
use crate::exit::{exit_channel, ExitReason, ExitSender, ExitTrigger};
use crate::vstate::memory::{create_guest_memory, MemoryError};
use crate::vstate::vcpu::StateSaver;
use crate::vstate::vcpu::{Vcpu, VcpuError};
use crate::vstate::vm::{Vm, VmError, VmState};

/// The xAPIC MADT entries we write carry 8-bit APIC ids, and 0xff is broadcast.
pub const MAX_VCPUS_XAPIC: usize = 254;
const KVM_MAX_CPUID_ENTRIES: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    #[error("cannot open kernel {path}: {err}")]
    OpenKernel { path: String, err: std::io::Error },
    #[error("cannot open initrd {path}: {err}")]
    OpenInitrd { path: String, err: std::io::Error },
    #[error("kernel {path}: {err}")]
    Kernel { path: String, err: BootError },
    #[error(transparent)]
    Boot(BootError),
    #[error(transparent)]
    Disk(#[from] BlockError),
    #[error(transparent)]
    Tap(#[from] TapError),
    #[error(transparent)]
    Vsock(#[from] VsockError),
    #[error("--vcpus must be at least 1")]
    NoVcpus,
    #[error("--vcpus {requested} is more than this host allows ({max}: {why})")]
    TooManyVcpus { requested: usize, max: usize, why: &'static str },
    #[error("too many devices: the IOAPIC has no free interrupt line for device {0}")]
    TooManyDevices(usize),
    #[error(transparent)]
    Kvm(#[from] VmError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error("cannot write ACPI tables: {0}")]
    Acpi(#[from] acpi::AcpiError),
    #[error("device layout: {0}")]
    Bus(#[from] OverlapError),
    #[error("cannot start threads: {0}")]
    Thread(std::io::Error),
    #[error("cannot restore machine state: {0}")]
    State(String),
    #[error("the snapshot's devices do not match: {0}")]
    DeviceMismatch(String),
}

impl MachineError {
    /// True when the user's input (arguments or files) is at fault, not the host.
    pub fn is_bad_input(&self) -> bool {
        match self {
            MachineError::OpenKernel { .. }
            | MachineError::OpenInitrd { .. }
            | MachineError::Kernel { .. }
            | MachineError::Disk(_)
            | MachineError::Tap(_)
            | MachineError::Vsock(_)
            | MachineError::NoVcpus
            | MachineError::TooManyVcpus { .. }
            | MachineError::TooManyDevices(_)
            | MachineError::State(_)
            | MachineError::DeviceMismatch(_) => true,
            MachineError::Boot(e) => !matches!(e, BootError::GuestMemory(_)),
            _ => false,
        }
    }
}

/// A device of the machine, as snapshots see it.
pub struct DeviceEntry {
    /// Stable id: the same device gets the same id on every boot of the same configuration.
    pub id: String,
    pub kind: &'static str,
    pub resources: Resources,
    pub device: Arc<Mutex<dyn Persist>>,
}

/// The VM's devices and the buses the vCPUs reach them through.
pub struct Devices {
    pub io_bus: Arc<Bus>,
    pub mmio_bus: Arc<Bus>,
    /// COM1, which also takes the host's stdin.
    pub serial: Arc<Mutex<SerialDevice>>,
    /// Every device, in creation order.
    pub list: Vec<DeviceEntry>,
    /// Where the serial port's output goes: a bounded buffer that never blocks a vCPU.
    pub console: console::ConsoleOutput,
}

impl Devices {
    /// Tells every device the whole machine is restored and about to run: each raises again the
    /// interrupt it has pending (edge-triggered lines: one the guest had already seen is a
    /// spurious interrupt, which drivers tolerate), and a network device announces the guest.
    /// Nothing leaves the VMM before this: a restore that fails earlier has no effect outside.
    pub fn restored(&self) {
        for entry in &self.list {
            lock(&entry.device).restored();
        }
    }

    /// Saves every device; the vCPUs (and device workers) must be paused.
    pub fn save(&self) -> Vec<DeviceRecord> {
        self.list
            .iter()
            .map(|e| DeviceRecord {
                id: e.id.clone(),
                kind: e.kind.to_string(),
                resources: e.resources,
                state: lock(&e.device).save(),
            })
            .collect()
    }

    /// Restores saved devices into these freshly built ones, matched by id: the kinds and
    /// resources must agree and every device must have its record, or the error names the first
    /// device that differs.
    pub fn restore(&self, records: &[DeviceRecord]) -> Result<(), MachineError> {
        let mismatch = |m: String| Err(MachineError::DeviceMismatch(m));
        for r in records {
            let Some(e) = self.list.iter().find(|e| e.id == r.id) else {
                return mismatch(format!(
                    "device '{}' ({}) is not one this vmm builds from the snapshot's configuration",
                    r.id, r.kind
                ));
            };
            if e.kind != r.kind {
                return mismatch(format!(
                    "device '{}' is a {} in the snapshot, this vmm builds a {}",
                    r.id, r.kind, e.kind
                ));
            }
            if e.resources != r.resources {
                return mismatch(format!(
                    "device '{}' ({}) was at {} in the snapshot, this vmm puts it at {}",
                    r.id, r.kind, r.resources, e.resources
                ));
            }
        }
        if let Some(e) = self.list.iter().find(|e| !records.iter().any(|r| r.id == e.id)) {
            return mismatch(format!("device '{}' ({}) is missing from the snapshot", e.id, e.kind));
        }
        for r in records {
            let e = self.list.iter().find(|e| e.id == r.id).expect("matched above");
            lock(&e.device)
                .restore(&r.state)
                .map_err(|m| MachineError::DeviceMismatch(format!("device '{}' ({}): {m}", r.id, r.kind)))?;
        }
        Ok(())
    }

    /// Stops the worker threads of every device.
    pub fn pause_workers(&self) {
        for e in &self.list {
            lock(&e.device).pause_workers();
        }
    }

    /// Lets the worker threads of every device run again.
    pub fn resume_workers(&self) {
        for e in &self.list {
            lock(&e.device).resume_workers();
        }
    }

    /// The device of disk `index` (`--disk`, in order).
    pub fn disk(&self, index: usize) -> Option<&DeviceEntry> {
        let id = disk_id(index);
        self.list.iter().find(|e| e.id == id)
    }

    /// The files devices write guest data to (taken under each device's lock, synced outside).
    pub fn durable_files(&self) -> Vec<DurableFile> {
        self.list.iter().filter_map(|e| lock(&e.device).durable_file()).collect()
    }
}

/// The device id of disk `index`.
fn disk_id(index: usize) -> String {
    format!("blk{index}")
}

/// A built VM, ready to start.
pub struct Machine {
    pub config: VmConfig,
    pub vm: Vm,
    pub mem: GuestMemory,
    pub vcpus: Vec<Vcpu>,
    pub devices: Devices,
    exit_tx: ExitSender,
    exit_rx: Receiver<ExitReason>,
}

/// Files the VM needs, opened before touching KVM so that bad input is reported as such.
struct Inputs {
    kernel: File,
    initrd: Option<File>,
}

fn display(p: &std::path::Path) -> String {
    p.display().to_string()
}

fn open_inputs(config: &VmConfig) -> Result<Inputs, MachineError> {
    let mut kernel =
        File::open(&config.kernel).map_err(|err| MachineError::OpenKernel { path: display(&config.kernel), err })?;
    boot::detect_kernel_kind(&mut kernel).map_err(|err| MachineError::Kernel { path: display(&config.kernel), err })?;
    let initrd = match &config.initrd {
        Some(p) => Some(File::open(p).map_err(|err| MachineError::OpenInitrd { path: display(p), err })?),
        None => None,
    };
    Ok(Inputs { kernel, initrd })
}

/// The host side of the VM's virtio devices: disk files, TAPs, the vsock socket.
pub struct Backends {
    pub disks: Vec<Block>,
    pub nets: Vec<Net>,
    pub vsock: Option<Vsock>,
}

impl Backends {
    /// Opens every backend of the configuration (before KVM is touched, so bad input is
    /// reported as such).
    pub fn open(config: &VmConfig) -> Result<Self, MachineError> {
        let opened = Self::open_unless_held(config, |_| false)?;
        Ok(opened.expect("no backend is waited for when none counts as held"))
    }

    /// Opens every backend of the configuration, except that one `held` says is held by a VM
    /// that will let go of it (the source of a migration on this host) does not stop the others
    /// from being checked: None then (whatever was opened is let go again, to be opened once
    /// the holder let go). Any other error is returned.
    pub fn open_unless_held(
        config: &VmConfig,
        held: impl Fn(&MachineError) -> bool,
    ) -> Result<Option<Self>, MachineError> {
        let mut waiting = false;
        let mut check = |e: MachineError| {
            if held(&e) {
                waiting = true;
                Ok(())
            } else {
                Err(e)
            }
        };
        let mut disks = Vec::new();
        for (i, d) in config.disks.iter().enumerate() {
            match Block::open(&d.path, d.read_only, i) {
                Ok(b) => disks.push(b),
                Err(e) => check(e.into())?,
            }
        }
        let mut nets = Vec::new();
        for n in &config.nets {
            match Tap::open(&n.tap) {
                Ok(tap) => nets.push(Net::new(tap, n.mac)),
                Err(e) => check(e.into())?,
            }
        }
        let vsock = match config.vsock.as_ref().map(|v| Vsock::new(v.cid, &v.uds)).transpose() {
            Ok(v) => v,
            Err(e) => {
                check(e.into())?;
                None
            }
        };
        Ok((!waiting).then_some(Self { disks, nets, vsock }))
    }

    /// True for the error of a backend another VM holds (which may let go of it soon).
    pub fn in_use(err: &MachineError) -> bool {
        matches!(
            err,
            MachineError::Disk(BlockError::InUse(_))
                | MachineError::Tap(TapError::InUse(_))
                | MachineError::Vsock(VsockError::InUse(_))
        )
    }
}

/// Creates the KVM VM and checks the vCPU count against what it allows.
pub fn create_vm(config: &VmConfig) -> Result<Vm, MachineError> {
    if config.vcpus == 0 {
        return Err(MachineError::NoVcpus);
    }
    let vm = Vm::new()?;
    let requested = usize::from(config.vcpus);
    if requested > vm.max_vcpus() {
        return Err(MachineError::TooManyVcpus { requested, max: vm.max_vcpus(), why: "KVM_CAP_MAX_VCPUS" });
    }
    if requested > MAX_VCPUS_XAPIC {
        return Err(MachineError::TooManyVcpus { requested, max: MAX_VCPUS_XAPIC, why: "xAPIC limit" });
    }
    Ok(vm)
}

impl Machine {
    /// Builds a VM that boots `config.kernel`.
    pub fn boot(config: VmConfig) -> Result<Self, MachineError> {
        let mut inputs = open_inputs(&config)?;
        let backends = Backends::open(&config)?;
        let vm = create_vm(&config)?;
        let mem = create_guest_memory(config.mem_bytes)?;
        let (machine, virtio_devices) = Self::assemble(config, vm, mem, backends, None)?;
        let config = &machine.config;
        let mem = &machine.mem;

        let kernel = boot::load_kernel(mem, &mut inputs.kernel)
            .map_err(|err| MachineError::Kernel { path: display(&config.kernel), err })?;
        let initrd = match inputs.initrd.as_mut() {
            Some(f) => Some(boot::load_initrd(mem, &kernel, f, config.mem_bytes).map_err(MachineError::Boot)?),
            None => None,
        };
        let rsdp = acpi::write_acpi_tables(mem, &AcpiConfig { num_cpus: config.vcpus, virtio_devices })?;
        let entry: BootEntry = boot::configure_boot(mem, &kernel, &config.cmdline, initrd, rsdp, config.mem_bytes)
            .map_err(MachineError::Boot)?;
        regs::write_boot_tables(mem, &entry).map_err(|e| MachineError::Boot(BootError::GuestMemory(e)))?;

        let supported = machine
            .vm
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|err| VmError::Kvm { call: "KVM_GET_SUPPORTED_CPUID", err })?;
        for vcpu in &machine.vcpus {
            vcpu.configure(&supported, config.vcpus, (vcpu.index == 0).then_some(&entry))?;
        }
        Ok(machine)
    }

    /// Creates the irqchip, devices and vCPUs of a VM around its memory; with `saved_vm`, the
    /// interrupt controllers and PIT come back in their saved state (before any device exists
    /// that could raise an interrupt). Devices are always built fresh, in the same order and at
    /// the same places for the same configuration (so their ids and resources match a snapshot
    /// of it). Returns the virtio devices for the ACPI tables.
    pub fn assemble(
        config: VmConfig,
        vm: Vm,
        mem: GuestMemory,
        backends: Backends,
        saved_vm: Option<&VmState>,
    ) -> Result<(Self, Vec<MmioDeviceInfo>), MachineError> {
        vm.register_memory(&mem)?;
        vm.create_irqchip()?;
        if let Some(vm_state) = saved_vm {
            vm.restore_irqchips(vm_state)?;
        }

        let (exit_tx, exit_rx) = exit_channel();
        let mut io_bus = Bus::default();
        let mut mmio_bus = Bus::default();
        let mut list = Vec::new();

        let console = console::ConsoleOutput::spawn(std::io::stdout(), console::OUTPUT_BUFFER_BYTES)
            .map_err(MachineError::Thread)?;
        let out: Box<dyn std::io::Write + Send> = Box::new(console.clone());
        let serial = Arc::new(Mutex::new(SerialDevice::new(vm.irqfd(COM1_IRQ)?, out)));
        io_bus.insert(serial.clone(), COM1_PORT.into(), 8)?;
        let resources = Resources { pio: Some((COM1_PORT, 8)), gsi: Some(COM1_IRQ), mmio: None };
        list.push(DeviceEntry { id: "serial0".into(), kind: "serial", resources, device: serial.clone() });

        let reset = ExitTrigger { sender: exit_tx.clone(), reason: ExitReason::Reset };
        let i8042 = Arc::new(Mutex::new(I8042(vm_superio::I8042Device::new(reset))));
        io_bus.insert(i8042.clone(), I8042_PORT.into(), 5)?;
        let resources = Resources { pio: Some((I8042_PORT, 5)), ..Default::default() };
        list.push(DeviceEntry { id: "i8042".into(), kind: "i8042", resources, device: i8042 });

        let acpi_pm = Arc::new(Mutex::new(AcpiPmDevice::new(exit_tx.clone())));
        io_bus.insert(acpi_pm.clone(), ACPI_SLEEP_CONTROL_PORT.into(), AcpiPmDevice::PORTS)?;
        let resources =
            Resources { pio: Some((ACPI_SLEEP_CONTROL_PORT, AcpiPmDevice::PORTS as u16)), ..Default::default() };
        list.push(DeviceEntry { id: "acpi-pm".into(), kind: "acpi-pm", resources, device: acpi_pm });

        // virtio-mmio slots in a fixed order (disks, networks, vsock), so the same configuration
        // always puts the same device at the same place.
        let Backends { disks, nets, vsock } = backends;
        let virtio: Vec<(String, &'static str, Box<dyn VirtioDevice>)> = disks
            .into_iter()
            .enumerate()
            .map(|(i, d)| (disk_id(i), "virtio-blk", Box::new(d) as Box<dyn VirtioDevice>))
            .chain(nets.into_iter().enumerate().map(|(i, n)| (format!("net{i}"), "virtio-net", Box::new(n) as _)))
            .chain(vsock.map(|v| ("vsock0".to_string(), "virtio-vsock", Box::new(v) as _)))
            .collect();
        let mut infos = Vec::new();
        for (index, (id, kind, device)) in virtio.into_iter().enumerate() {
            let gsi = VIRTIO_IRQ_BASE + index as u32;
            if gsi >= IOAPIC_PINS {
                return Err(MachineError::TooManyDevices(index));
            }
            let base = VIRTIO_MMIO_START + index as u64 * VIRTIO_MMIO_SIZE;
            let transport = Arc::new(Mutex::new(MmioTransport::new(device, mem.clone(), vm.irqfd(gsi)?)));
            let (has_input, queues) = {
                let t = lock(&transport);
                (t.has_input(), t.queue_count())
            };
            if has_input {
                let notifies = (0..queues)
                    .map(|q| vm.mmio_write_eventfd(base + QUEUE_NOTIFY_OFFSET, q as u32))
                    .collect::<Result<Vec<_>, _>>()?;
                MmioTransport::start_input_worker(&transport, &id, notifies).map_err(MachineError::Thread)?;
            }
            mmio_bus.insert(transport.clone(), base, VIRTIO_MMIO_SIZE)?;
            let resources = Resources { mmio: Some((base, VIRTIO_MMIO_SIZE)), gsi: Some(gsi), pio: None };
            list.push(DeviceEntry { id, kind, resources, device: transport });
            infos.push(MmioDeviceInfo { base, size: VIRTIO_MMIO_SIZE, gsi });
        }

        let vcpus = (0..config.vcpus).map(|i| Vcpu::new(&vm, i)).collect::<Result<Vec<_>, _>>()?;
        let devices = Devices { io_bus: Arc::new(io_bus), mmio_bus: Arc::new(mmio_bus), serial, list, console };
        Ok((Self { config, vm, mem, vcpus, devices, exit_tx, exit_rx }, infos))
    }

    /// Starts every vCPU (paused first, if asked) and the console; `stdin_input`: the host's
    /// stdin is the serial port's input (not when stdin carried a snapshot stream). `diff_base`:
    /// the snapshot the memory equals (a resumed VM), which later diffs are diffs of. It runs
    /// without KVM's dirty log; its first diff finds what it wrote by comparison
    /// (`VmControl::find_unlogged_writes`).
    pub fn start(
        self,
        paused: bool,
        stdin_input: bool,
        diff_base: Option<DiffBase>,
    ) -> Result<RunningVm, MachineError> {
        if paused {
            self.devices.pause_workers();
        }
        let saver = StateSaver { msr_indices: Arc::new(self.vm.saveable_msrs()?), xsave_size: self.vm.xsave_size() };
        // The CPUID every vCPU got (at boot, or from the snapshot), read before any runs.
        let guest_cpuid = match self.vcpus.first() {
            Some(v) => {
                v.fd.get_cpuid2(KVM_MAX_CPUID_ENTRIES)
                    .map_err(|err| VcpuError { index: 0, call: "KVM_GET_CPUID2", err })?
                    .as_slice()
                    .to_vec()
            }
            None => Vec::new(),
        };
        let guest_cpu = snapshot::GuestCpu {
            feature_words: cpuid::feature_words(&guest_cpuid).to_vec(),
            msrs: saver.msr_indices.to_vec(),
        };
        let mut handles = Vec::with_capacity(self.vcpus.len());
        for vcpu in self.vcpus {
            let (io, mmio) = (self.devices.io_bus.clone(), self.devices.mmio_bus.clone());
            let handle =
                vcpu.start(io, mmio, self.exit_tx.clone(), saver.clone(), paused).map_err(MachineError::Thread)?;
            handles.push(handle);
        }
        if stdin_input {
            console::spawn_stdin_reader(self.devices.serial.clone(), self.exit_tx.clone())
                .map_err(MachineError::Thread)?;
        }
        let mut control = VmControl::new(self.config, self.vm, self.mem, self.devices, handles, paused, self.exit_tx);
        control.guest_cpu = guest_cpu;
        if let Some(base) = diff_base {
            control.adopt_diff_base(base);
        }
        Ok(RunningVm { control: Arc::new(control), exit_rx: self.exit_rx })
    }
}

/// A started VM: its control handle, and the wait for its end.
pub struct RunningVm {
    pub control: Arc<VmControl>,
    exit_rx: Receiver<ExitReason>,
}

impl RunningVm {
    /// Waits until the VM ends, for whatever reason.
    pub fn wait(&self) -> ExitReason {
        self.exit_rx.recv().unwrap_or_else(|_| ExitReason::Fatal("every vCPU thread ended".into()))
    }
}
