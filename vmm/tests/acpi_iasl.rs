//! The ACPI tables vmm writes disassemble cleanly with ACPICA's `iasl` and checksum to zero.

use std::process::Command;

use vmm::arch::x86_64::acpi::{dsdt, fadt, madt, AcpiConfig, MmioDeviceInfo};

fn iasl_disassembles(name: &str, table: &[u8]) -> String {
    let dir = std::env::temp_dir().join(format!("vmm-iasl-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bin = dir.join(format!("{name}.dat"));
    std::fs::write(&bin, table).unwrap();
    let out = Command::new("iasl")
        .arg("-d")
        .arg(&bin)
        .current_dir(&dir)
        .output()
        .expect("iasl not found: install Debian's acpica-tools (tests/run.sh does)");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "iasl failed on {name}:\n{text}");
    let dsl = std::fs::read_to_string(dir.join(format!("{name}.dsl"))).expect("iasl wrote no .dsl");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!text.contains("Error") && !text.to_lowercase().contains("invalid"), "{name}:\n{text}");
    dsl
}

fn checksum(table: &[u8]) -> u8 {
    table.iter().fold(0u8, |a, b| a.wrapping_add(*b))
}

#[test]
fn tables_disassemble_and_checksum() {
    let cfg = AcpiConfig {
        num_cpus: 4,
        virtio_devices: (0..2)
            .map(|i| MmioDeviceInfo { base: 0xd000_0000 + i * 0x1000, size: 0x1000, gsi: 5 + i as u32 })
            .collect(),
    };
    let dsdt = dsdt(&cfg);
    let fadt = fadt(0xe0000);
    let madt = madt(4);
    for (name, table) in [("dsdt", &dsdt), ("facp", &fadt), ("apic", &madt)] {
        assert_eq!(checksum(table), 0, "{name} checksum");
    }

    let dsl = iasl_disassembles("dsdt", &dsdt);
    assert_eq!(dsl.matches("\"LNRO0005\"").count(), 2, "{dsl}");
    assert!(dsl.contains("PNP0501") && dsl.contains("_S5_"), "{dsl}");

    let dsl = iasl_disassembles("facp", &fadt);
    assert!(dsl.contains("Hardware Reduced (V5) : 1"), "{dsl}");

    let dsl = iasl_disassembles("apic", &madt);
    assert_eq!(dsl.matches("Processor Local APIC").count(), 4, "{dsl}");
    assert!(dsl.contains("I/O APIC"), "{dsl}");
}
