//! ACPI tables: RSDP, XSDT, FADT (hardware-reduced), MADT and a DSDT naming every device.
//!
//! Linux's cloud kernel has neither MP tables nor virtio-mmio command-line devices, so ACPI is
//! the only way it learns about CPUs and devices.

use acpi_tables::{
    aml,
    fadt::{FADTBuilder, Flags},
    gas::{AccessSize, AddressSpace, GAS},
    madt::{EnabledStatus, IoApic, ProcessorLocalApic},
    rsdp::Rsdp,
    sdt::Sdt,
    xsdt::XSDT,
    Aml,
};
use vm_memory::{Bytes, GuestAddress, GuestMemory};

use super::layout::{
    ACPI_END, ACPI_RESET_PORT, ACPI_RESET_VALUE, ACPI_SLEEP_CONTROL_PORT, ACPI_SLEEP_STATUS_PORT, ACPI_START, COM1_IRQ,
    COM1_PORT, IOAPIC_ADDR, LAPIC_ADDR,
};

const OEM_ID: [u8; 6] = *b"VMMVMM";
const OEM_TABLE_ID: [u8; 8] = *b"VMMTABLE";
const OEM_REVISION: u32 = 1;

/// The sleep type the guest writes to the sleep control register to power off (`_S5`).
pub const S5_SLEEP_TYPE: u8 = 5;

/// IAPC_BOOT_ARCH: no VGA, no CMOS RTC.
const IAPC_BOOT_ARCH_NO_VGA: u16 = 1 << 2;
const IAPC_BOOT_ARCH_NO_CMOS_RTC: u16 = 1 << 5;
/// MADT flag: the machine also has dual 8259 PICs (which the guest must mask).
const MADT_PCAT_COMPAT: u32 = 1;

/// A virtio-mmio device as the DSDT describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioDeviceInfo {
    pub base: u64,
    pub size: u64,
    pub gsi: u32,
}

/// What the tables describe.
#[derive(Clone, Debug)]
pub struct AcpiConfig {
    pub num_cpus: u8,
    pub virtio_devices: Vec<MmioDeviceInfo>,
}

#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error("ACPI tables do not fit in the BIOS area ({0} bytes)")]
    TooLarge(u64),
    #[error("cannot write ACPI tables to guest memory: {0}")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
}

fn to_bytes(table: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    table.to_aml_bytes(&mut bytes);
    bytes
}

/// Builds the DSDT: COM1, every virtio-mmio device and the `_S5` sleep state.
pub fn dsdt(cfg: &AcpiConfig) -> Vec<u8> {
    // Each device is serialized in one statement: the AML builders borrow temporaries.
    let mut body = to_bytes(&aml::Device::new(
        "_SB_.COM1".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501")),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![
                    &aml::IO::new(COM1_PORT, COM1_PORT, 1, 8),
                    &aml::Interrupt::new(true, true, false, false, COM1_IRQ),
                ]),
            ),
        ],
    ));

    for (i, dev) in cfg.virtio_devices.iter().enumerate() {
        body.extend(to_bytes(&aml::Device::new(
            format!("_SB_.V{i:03X}").as_str().into(),
            vec![
                &aml::Name::new("_HID".into(), &"LNRO0005"),
                &aml::Name::new("_UID".into(), &(i as u32)),
                &aml::Name::new("_CCA".into(), &aml::ONE),
                &aml::Name::new(
                    "_CRS".into(),
                    &aml::ResourceTemplate::new(vec![
                        &aml::Memory32Fixed::new(true, dev.base as u32, dev.size as u32),
                        &aml::Interrupt::new(true, true, false, false, dev.gsi),
                    ]),
                ),
            ],
        )));
    }

    let s5 =
        aml::Name::new("_S5_".into(), &aml::Package::new(vec![&S5_SLEEP_TYPE, &S5_SLEEP_TYPE, &aml::ZERO, &aml::ZERO]));
    body.extend(to_bytes(&s5));

    let mut table = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    table.append_slice(&body);
    table.as_slice().to_vec()
}

/// Builds the FADT: hardware-reduced, power-off through the sleep control register, reset
/// through the reset register.
pub fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let io_byte = |port: u16| GAS::new(AddressSpace::SystemIo, 8, 0, AccessSize::ByteAccess, port.into());
    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup);
    fadt.iapc_boot_arch = (IAPC_BOOT_ARCH_NO_VGA | IAPC_BOOT_ARCH_NO_CMOS_RTC).into();
    fadt.reset_reg = io_byte(ACPI_RESET_PORT);
    fadt.reset_value = ACPI_RESET_VALUE;
    fadt.sleep_control_reg = io_byte(ACPI_SLEEP_CONTROL_PORT);
    fadt.sleep_status_reg = io_byte(ACPI_SLEEP_STATUS_PORT);
    fadt.hypervisor_vendor_identity = u64::from_le_bytes(*b"VMMVMMVM").into();
    to_bytes(&fadt.finalize())
}

/// Builds the MADT: one local APIC per vCPU (APIC id = vCPU index) and the IOAPIC.
pub fn madt(num_cpus: u8) -> Vec<u8> {
    let mut table = Sdt::new(*b"APIC", 44, 5, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    table.write_u32(36, LAPIC_ADDR as u32);
    table.write_u32(40, MADT_PCAT_COMPAT);
    for cpu in 0..num_cpus {
        table.append_slice(&to_bytes(&ProcessorLocalApic::new(cpu, cpu, EnabledStatus::Enabled)));
    }
    table.append_slice(&to_bytes(&IoApic::new(0, IOAPIC_ADDR as u32, 0)));
    table.as_slice().to_vec()
}

/// Writes every table to guest memory in the BIOS area and returns the RSDP's address.
pub fn write_acpi_tables<M: GuestMemory>(mem: &M, cfg: &AcpiConfig) -> Result<GuestAddress, AcpiError> {
    let rsdp_addr = ACPI_START;
    let mut next = align8(rsdp_addr + Rsdp::len() as u64);
    let mut place = |bytes: &[u8]| -> Result<u64, AcpiError> {
        let addr = next;
        let end = addr + bytes.len() as u64;
        if end > ACPI_END {
            return Err(AcpiError::TooLarge(end - ACPI_START));
        }
        mem.write_slice(bytes, GuestAddress(addr))?;
        next = align8(end);
        Ok(addr)
    };

    let dsdt_addr = place(&dsdt(cfg))?;
    let fadt_addr = place(&fadt(dsdt_addr))?;
    let madt_addr = place(&madt(cfg.num_cpus))?;
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let xsdt_addr = place(&to_bytes(&xsdt))?;
    mem.write_slice(&to_bytes(&Rsdp::new(OEM_ID, xsdt_addr)), GuestAddress(rsdp_addr))?;
    Ok(GuestAddress(rsdp_addr))
}

fn align8(addr: u64) -> u64 {
    (addr + 7) & !7
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::memory::GuestMemory;

    fn checksum_ok(table: &[u8]) -> bool {
        table.iter().fold(0u8, |a, b| a.wrapping_add(*b)) == 0
    }

    fn config(cpus: u8, devices: usize) -> AcpiConfig {
        AcpiConfig {
            num_cpus: cpus,
            virtio_devices: (0..devices)
                .map(|i| MmioDeviceInfo { base: 0xd000_0000 + i as u64 * 0x1000, size: 0x1000, gsi: 5 + i as u32 })
                .collect(),
        }
    }

    #[test]
    fn tables_checksum_and_declare_their_length() {
        for table in [dsdt(&config(2, 3)), fadt(0x1234), madt(4)] {
            assert!(checksum_ok(&table), "bad checksum in {:?}", &table[..4]);
            let len = u32::from_le_bytes(table[4..8].try_into().unwrap()) as usize;
            assert_eq!(len, table.len());
        }
    }

    #[test]
    fn madt_has_one_local_apic_per_cpu() {
        let table = madt(4);
        let mut apics = 0;
        let mut off = 44;
        while off < table.len() {
            if table[off] == 0 {
                assert_eq!(table[off + 3], apics, "APIC id follows the vCPU index");
                apics += 1;
            }
            off += table[off + 1] as usize;
        }
        assert_eq!(apics, 4);
    }

    #[test]
    fn rsdp_points_to_tables_in_guest_memory() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        let rsdp = write_acpi_tables(&mem, &config(1, 1)).unwrap();
        let mut sig = [0u8; 8];
        mem.read_slice(&mut sig, rsdp).unwrap();
        assert_eq!(&sig, b"RSD PTR ");
        let xsdt_addr: u64 = mem.read_obj(GuestAddress(rsdp.0 + 24)).unwrap();
        let mut xsdt_sig = [0u8; 4];
        mem.read_slice(&mut xsdt_sig, GuestAddress(xsdt_addr)).unwrap();
        assert_eq!(&xsdt_sig, b"XSDT");
    }

    #[test]
    fn dsdt_names_each_virtio_device() {
        let table = dsdt(&config(1, 3));
        let hits = table.windows(8).filter(|w| w == b"LNRO0005").count();
        assert_eq!(hits, 3);
    }
}
