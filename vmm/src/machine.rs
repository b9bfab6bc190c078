//! Builds a VM from a `VmConfig` and runs it until it ends.

use std::fs::File;
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};

use vm_memory::GuestMemoryMmap;

use crate::arch::x86_64::acpi::{self, AcpiConfig, MmioDeviceInfo};
use crate::arch::x86_64::boot::{self, BootEntry, BootError};
use crate::arch::x86_64::layout::{
    ACPI_SLEEP_CONTROL_PORT, COM1_IRQ, COM1_PORT, I8042_PORT, IOAPIC_PINS, VIRTIO_IRQ_BASE, VIRTIO_MMIO_SIZE,
    VIRTIO_MMIO_START,
};
use crate::arch::x86_64::regs;
use crate::config::VmConfig;
use crate::console;
use crate::devices::legacy::{AcpiPmDevice, SerialDevice, I8042};
use crate::devices::virtio::{block::BlockError, Block, MmioTransport, VirtioDevice};
use crate::devices::{bus::OverlapError, Bus};
use crate::exit::{exit_channel, ExitReason, ExitSender, ExitTrigger};
use crate::vstate::memory::{create_guest_memory, MemoryError};
use crate::vstate::vcpu::{Vcpu, VcpuError};
use crate::vstate::vm::{Vm, VmError};

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
    #[error("cannot set up devices: {0}")]
    Device(std::io::Error),
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
            | MachineError::TooManyDevices(_) => true,
            MachineError::Boot(e) => !matches!(e, BootError::GuestMemory(_)),
            _ => false,
        }
    }
}

/// A built VM, ready to run.
pub struct Machine {
    pub config: VmConfig,
    pub vm: Vm,
    pub mem: GuestMemoryMmap,
    vcpus: Vec<Vcpu>,
    io_bus: Arc<Bus>,
    mmio_bus: Arc<Bus>,
    serial: Arc<Mutex<SerialDevice>>,
    exit_tx: ExitSender,
    exit_rx: Receiver<ExitReason>,
}

/// Files the VM needs, opened before touching KVM so that bad input is reported as such.
struct Inputs {
    kernel: File,
    initrd: Option<File>,
    disks: Vec<Block>,
}

fn open_inputs(config: &VmConfig) -> Result<Inputs, MachineError> {
    let display = |p: &std::path::Path| p.display().to_string();
    let mut kernel =
        File::open(&config.kernel).map_err(|err| MachineError::OpenKernel { path: display(&config.kernel), err })?;
    boot::detect_kernel_kind(&mut kernel).map_err(|err| MachineError::Kernel { path: display(&config.kernel), err })?;
    let initrd = match &config.initrd {
        Some(p) => Some(File::open(p).map_err(|err| MachineError::OpenInitrd { path: display(p), err })?),
        None => None,
    };
    let disks = config
        .disks
        .iter()
        .enumerate()
        .map(|(i, d)| Block::open(&d.path, d.read_only, i))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Inputs { kernel, initrd, disks })
}

impl Machine {
    pub fn build(config: VmConfig) -> Result<Self, MachineError> {
        if config.vcpus == 0 {
            return Err(MachineError::NoVcpus);
        }
        let mut inputs = open_inputs(&config)?;
        let vm = Vm::new()?;
        let requested = usize::from(config.vcpus);
        if requested > vm.max_vcpus() {
            return Err(MachineError::TooManyVcpus { requested, max: vm.max_vcpus(), why: "KVM_CAP_MAX_VCPUS" });
        }
        if requested > MAX_VCPUS_XAPIC {
            return Err(MachineError::TooManyVcpus { requested, max: MAX_VCPUS_XAPIC, why: "xAPIC limit" });
        }

        let mem = create_guest_memory(config.mem_bytes)?;
        vm.register_memory(&mem)?;
        vm.create_irqchip()?;

        let (exit_tx, exit_rx) = exit_channel();
        let mut io_bus = Bus::default();
        let mut mmio_bus = Bus::default();

        let serial_irq = vm.irqfd(COM1_IRQ)?;
        let serial = Arc::new(Mutex::new(SerialDevice::new(serial_irq, Box::new(std::io::stdout()))));
        io_bus.insert(serial.clone(), COM1_PORT.into(), 8)?;
        let reset = ExitTrigger { sender: exit_tx.clone(), reason: ExitReason::Reset };
        io_bus.insert(Arc::new(Mutex::new(I8042(vm_superio::I8042Device::new(reset)))), I8042_PORT.into(), 5)?;
        io_bus.insert(
            Arc::new(Mutex::new(AcpiPmDevice::new(exit_tx.clone()))),
            ACPI_SLEEP_CONTROL_PORT.into(),
            AcpiPmDevice::PORTS,
        )?;

        let mut virtio_devices = Vec::new();
        for (i, disk) in inputs.disks.drain(..).enumerate() {
            let info = Self::add_virtio(&vm, &mem, &mut mmio_bus, i, Box::new(disk))?;
            virtio_devices.push(info);
        }

        let kernel_path = config.kernel.display().to_string();
        let kernel = boot::load_kernel(&mem, &mut inputs.kernel)
            .map_err(|err| MachineError::Kernel { path: kernel_path, err })?;
        let initrd = match inputs.initrd.as_mut() {
            Some(f) => Some(boot::load_initrd(&mem, &kernel, f, config.mem_bytes).map_err(MachineError::Boot)?),
            None => None,
        };
        let rsdp = acpi::write_acpi_tables(&mem, &AcpiConfig { num_cpus: config.vcpus, virtio_devices })?;
        let entry: BootEntry = boot::configure_boot(&mem, &kernel, &config.cmdline, initrd, rsdp, config.mem_bytes)
            .map_err(MachineError::Boot)?;
        regs::write_boot_tables(&mem, &entry).map_err(|e| MachineError::Boot(BootError::GuestMemory(e)))?;

        let supported = vm
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|err| VmError::Kvm { call: "KVM_GET_SUPPORTED_CPUID", err })?;
        let mut vcpus = Vec::with_capacity(requested);
        for index in 0..config.vcpus {
            let vcpu = Vcpu::new(&vm, index)?;
            vcpu.configure(&supported, config.vcpus, (index == 0).then_some(&entry))?;
            vcpus.push(vcpu);
        }

        Ok(Self {
            config,
            vm,
            mem,
            vcpus,
            io_bus: Arc::new(io_bus),
            mmio_bus: Arc::new(mmio_bus),
            serial,
            exit_tx,
            exit_rx,
        })
    }

    fn add_virtio(
        vm: &Vm,
        mem: &GuestMemoryMmap,
        mmio_bus: &mut Bus,
        index: usize,
        device: Box<dyn VirtioDevice>,
    ) -> Result<MmioDeviceInfo, MachineError> {
        let gsi = VIRTIO_IRQ_BASE + index as u32;
        if gsi >= IOAPIC_PINS {
            return Err(MachineError::TooManyDevices(index));
        }
        let base = VIRTIO_MMIO_START + index as u64 * VIRTIO_MMIO_SIZE;
        let irq = vm.irqfd(gsi)?;
        let transport = MmioTransport::new(device, mem.clone(), irq);
        mmio_bus.insert(Arc::new(Mutex::new(transport)), base, VIRTIO_MMIO_SIZE)?;
        Ok(MmioDeviceInfo { base, size: VIRTIO_MMIO_SIZE, gsi })
    }

    /// Starts every vCPU and the console, and waits until the VM ends.
    pub fn run(self) -> ExitReason {
        console::spawn_stdin_reader(self.serial.clone(), self.exit_tx.clone());
        for vcpu in self.vcpus {
            let (io, mmio, exit) = (self.io_bus.clone(), self.mmio_bus.clone(), self.exit_tx.clone());
            let name = format!("vcpu{}", vcpu.index);
            if let Err(e) = std::thread::Builder::new().name(name).spawn(move || vcpu.run(io, mmio, exit)) {
                return ExitReason::Fatal(format!("cannot start vCPU thread: {e}"));
            }
        }
        self.exit_rx.recv().unwrap_or_else(|_| ExitReason::Fatal("every vCPU thread ended".into()))
    }
}
