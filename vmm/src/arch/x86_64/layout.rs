//! Guest-physical address layout of an x86_64 vmm guest.
//!
//! Low memory holds the boot structures; RAM is split around a 1 GiB hole below 4 GiB
//! that holds every MMIO device (virtio-mmio windows, IOAPIC, local APICs).

/// Start of the extended BIOS data area: RAM below it is usable.
pub const EBDA_START: u64 = 0x9_fc00;
/// GDT used for the 64-bit Linux boot.
pub const BOOT_GDT_START: u64 = 0x500;
/// IDT used for the 64-bit Linux boot (empty).
pub const BOOT_IDT_START: u64 = 0x520;
/// PVH `hvm_start_info`.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH memory map, right after the start info.
pub const PVH_MEMMAP_START: u64 = 0x6040;
/// Linux `boot_params` ("zero page").
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack of the 64-bit Linux boot.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity page tables for the 64-bit Linux boot: PML4, PDPT, PD.
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x2_0000;
pub const CMDLINE_MAX_SIZE: usize = 4096;
/// ACPI tables live in the legacy BIOS area, where guests also scan for the RSDP.
pub const ACPI_START: u64 = 0xe_0000;
pub const ACPI_END: u64 = 0x10_0000;
/// Kernels are loaded from here up.
pub const HIMEM_START: u64 = 0x10_0000;

/// The 32-bit MMIO hole: [MMIO_HOLE_START, 4 GiB) is never RAM.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
pub const FOUR_GIB: u64 = 0x1_0000_0000;
/// virtio-mmio device windows, one page each.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
pub const LAPIC_ADDR: u64 = 0xfee0_0000;

/// I/O ports of the platform devices.
pub const COM1_PORT: u16 = 0x3f8;
pub const COM1_IRQ: u32 = 4;
pub const I8042_PORT: u16 = 0x60;
/// ACPI hardware-reduced sleep control and status registers (one byte each).
pub const ACPI_SLEEP_CONTROL_PORT: u16 = 0x3c0;
pub const ACPI_SLEEP_STATUS_PORT: u16 = 0x3c1;
/// ACPI reset register (FADT RESET_REG) and the value that resets.
pub const ACPI_RESET_PORT: u16 = 0x3c2;
pub const ACPI_RESET_VALUE: u8 = 0x1;

/// First GSI handed to virtio devices (IRQs 0-4 are legacy: PIT, keyboard, cascade, COM2, COM1).
pub const VIRTIO_IRQ_BASE: u32 = 5;
/// The IOAPIC has 24 pins.
pub const IOAPIC_PINS: u32 = 24;
