//! x86_64: guest layout, memory map, kernel loading, ACPI tables, CPUID, MSRs and boot registers.

pub mod acpi;
pub mod boot;
pub mod cpuid;
pub mod layout;
pub mod memory_map;
pub mod msr;
pub mod regs;
