//! Legacy PC devices: the COM1 UART, the i8042 (for its reset line) and the ACPI power registers.

pub mod acpi_pm;
pub mod i8042;
pub mod serial;

pub use acpi_pm::AcpiPmDevice;
pub use i8042::I8042;
pub use serial::{EventFdTrigger, SerialDevice, SerialSnapshot};
