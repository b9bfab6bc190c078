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
use crate::arch::x86_64::regs;
use crate::config::VmConfig;
use crate::console;
use crate::control::VmControl;
use crate::devices::bus::lock;
use crate::devices::legacy::SerialSnapshot;
use crate::devices::legacy::{AcpiPmDevice, SerialDevice, I8042};
use crate::devices::virtio::MmioTransportState;
use crate::devices::virtio::{block::BlockError, Block, MmioTransport, VirtioDevice};
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
}

impl MachineError {
    /// True when the user's input (arguments or files) is at fault, not the host.
    pub fn is_bad_input(&self) -> bool {
        match self {
            MachineError::OpenKernel { .. }
            | MachineError::OpenInitrd { .. }
            | MachineError::Kernel { .. }
            | MachineError::Disk(_)
            | MachineError::NoVcpus
            | MachineError::TooManyVcpus { .. }
            | MachineError::TooManyDevices(_)
            | MachineError::State(_) => true,
            MachineError::Boot(e) => !matches!(e, BootError::GuestMemory(_)),
            _ => false,
        }
    }
}

/// The VM's devices and the buses the vCPUs reach them through.
pub struct Devices {
    pub io_bus: Arc<Bus>,
    pub mmio_bus: Arc<Bus>,
    pub serial: Arc<Mutex<SerialDevice>>,
    pub virtio: Vec<Arc<Mutex<MmioTransport>>>,
    /// Where the serial port's output goes: a bounded buffer that never blocks a vCPU.
    pub console: console::ConsoleOutput,
}

/// Saved state of every device that has any.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct DevicesState {
    pub serial: SerialSnapshot,
    pub virtio: Vec<MmioTransportState>,
}

impl Devices {
    /// Raises again every interrupt a restored device has pending (edge-triggered lines: one the
    /// guest had already seen is a spurious interrupt, which drivers tolerate).
    pub fn replay_interrupts(&self) {
        lock(&self.serial).replay_interrupt();
        for t in &self.virtio {
            lock(t).replay_interrupt();
        }
    }

    /// Saves every device; the vCPUs must be paused so that no request is in flight.
    pub fn save(&self) -> DevicesState {
        DevicesState { serial: lock(&self.serial).save(), virtio: self.virtio.iter().map(|t| lock(t).save()).collect() }
    }
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

/// Opens every disk of the configuration.
pub fn open_disks(config: &VmConfig) -> Result<Vec<Block>, MachineError> {
    let disks = config.disks.iter().enumerate().map(|(i, d)| Block::open(&d.path, d.read_only, i));
    Ok(disks.collect::<Result<Vec<_>, _>>()?)
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
        let disks = open_disks(&config)?;
        let vm = create_vm(&config)?;
        let mem = create_guest_memory(config.mem_bytes)?;
        let (machine, virtio_devices) = Self::assemble(config, vm, mem, disks, None)?;
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

    /// Creates the irqchip, devices and vCPUs of a VM around its memory. With `saved`, devices
    /// come back in their saved state. Returns the virtio devices for the ACPI tables.
    pub fn assemble(
        config: VmConfig,
        vm: Vm,
        mem: GuestMemory,
        disks: Vec<Block>,
        saved: Option<(&VmState, &DevicesState)>,
    ) -> Result<(Self, Vec<MmioDeviceInfo>), MachineError> {
        vm.register_memory(&mem)?;
        vm.create_irqchip()?;
        if let Some((vm_state, _)) = saved {
            vm.restore_irqchips(vm_state)?;
        }
        let saved = saved.map(|(_, devices)| devices);

        let (exit_tx, exit_rx) = exit_channel();
        let mut io_bus = Bus::default();
        let mut mmio_bus = Bus::default();

        let serial_irq = vm.irqfd(COM1_IRQ)?;
        let console = console::ConsoleOutput::spawn(std::io::stdout(), console::OUTPUT_BUFFER_BYTES)
            .map_err(MachineError::Thread)?;
        let out: Box<dyn std::io::Write + Send> = Box::new(console.clone());
        let serial = match saved {
            Some(s) => SerialDevice::restore(&s.serial, serial_irq, out).map_err(MachineError::State)?,
            None => SerialDevice::new(serial_irq, out),
        };
        let serial = Arc::new(Mutex::new(serial));
        io_bus.insert(serial.clone(), COM1_PORT.into(), 8)?;
        let reset = ExitTrigger { sender: exit_tx.clone(), reason: ExitReason::Reset };
        io_bus.insert(Arc::new(Mutex::new(I8042(vm_superio::I8042Device::new(reset)))), I8042_PORT.into(), 5)?;
        io_bus.insert(
            Arc::new(Mutex::new(AcpiPmDevice::new(exit_tx.clone()))),
            ACPI_SLEEP_CONTROL_PORT.into(),
            AcpiPmDevice::PORTS,
        )?;

        if let Some(s) = saved {
            if s.virtio.len() != disks.len() {
                return Err(MachineError::State(format!(
                    "snapshot has {} virtio devices, the configuration {}",
                    s.virtio.len(),
                    disks.len()
                )));
            }
        }
        let mut virtio = Vec::new();
        let mut infos = Vec::new();
        for (index, disk) in disks.into_iter().enumerate() {
            let gsi = VIRTIO_IRQ_BASE + index as u32;
            if gsi >= IOAPIC_PINS {
                return Err(MachineError::TooManyDevices(index));
            }
            let base = VIRTIO_MMIO_START + index as u64 * VIRTIO_MMIO_SIZE;
            let irq = vm.irqfd(gsi)?;
            let device: Box<dyn VirtioDevice> = Box::new(disk);
            let transport = match saved {
                Some(s) => {
                    MmioTransport::restore(device, mem.clone(), irq, &s.virtio[index]).map_err(MachineError::State)?
                }
                None => MmioTransport::new(device, mem.clone(), irq),
            };
            let transport = Arc::new(Mutex::new(transport));
            mmio_bus.insert(transport.clone(), base, VIRTIO_MMIO_SIZE)?;
            virtio.push(transport);
            infos.push(MmioDeviceInfo { base, size: VIRTIO_MMIO_SIZE, gsi });
        }

        let vcpus = (0..config.vcpus).map(|i| Vcpu::new(&vm, i)).collect::<Result<Vec<_>, _>>()?;
        let devices = Devices { io_bus: Arc::new(io_bus), mmio_bus: Arc::new(mmio_bus), serial, virtio, console };
        Ok((Self { config, vm, mem, vcpus, devices, exit_tx, exit_rx }, infos))
    }

    /// Starts every vCPU (paused first, if asked) and the console.
    pub fn start(self, paused: bool) -> Result<RunningVm, MachineError> {
        let saver = StateSaver { msr_indices: Arc::new(self.vm.saveable_msrs()?), xsave_size: self.vm.xsave_size() };
        let mut handles = Vec::with_capacity(self.vcpus.len());
        for vcpu in self.vcpus {
            let (io, mmio) = (self.devices.io_bus.clone(), self.devices.mmio_bus.clone());
            let handle =
                vcpu.start(io, mmio, self.exit_tx.clone(), saver.clone(), paused).map_err(MachineError::Thread)?;
            handles.push(handle);
        }
        console::spawn_stdin_reader(self.devices.serial.clone(), self.exit_tx.clone()).map_err(MachineError::Thread)?;
        let control = VmControl::new(self.config, self.vm, self.mem, self.devices, handles, paused, self.exit_tx);
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
