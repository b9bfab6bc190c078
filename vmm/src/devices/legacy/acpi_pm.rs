//! The ACPI hardware-reduced power registers the FADT names: sleep control (S5 = power off),
//! sleep status, and the reset register.

use crate::arch::x86_64::acpi::S5_SLEEP_TYPE;
use crate::arch::x86_64::layout::{ACPI_RESET_PORT, ACPI_RESET_VALUE, ACPI_SLEEP_CONTROL_PORT};
use crate::devices::persist::{DeviceState, Persist};
use crate::devices::BusDevice;
use crate::exit::{ExitReason, ExitSender};

const SLP_EN: u8 = 1 << 5;
const SLEEP_CONTROL: u64 = 0;
const RESET: u64 = (ACPI_RESET_PORT - ACPI_SLEEP_CONTROL_PORT) as u64;

/// Ports [ACPI_SLEEP_CONTROL_PORT, +3): control, status, reset.
pub struct AcpiPmDevice {
    exit: ExitSender,
}

impl AcpiPmDevice {
    pub const PORTS: u64 = 3;

    pub fn new(exit: ExitSender) -> Self {
        Self { exit }
    }
}

impl BusDevice for AcpiPmDevice {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        match offset {
            SLEEP_CONTROL if value & SLP_EN != 0 && (value >> 2) & 7 == S5_SLEEP_TYPE => {
                self.exit.send(ExitReason::PowerOff)
            }
            RESET if value == ACPI_RESET_VALUE => self.exit.send(ExitReason::Reset),
            _ => tracing::debug!("ACPI PM write {value:#x} at offset {offset} ignored"),
        }
    }
}

/// The registers are write-only triggers: nothing to save.
impl Persist for AcpiPmDevice {
    fn save(&self) -> DeviceState {
        DeviceState::empty(1)
    }

    fn restore(&mut self, state: &DeviceState) -> Result<(), String> {
        state.check_empty(1)
    }

    fn describe(&self) -> String {
        "ACPI power registers (S5, reset)".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exit::exit_channel;

    #[test]
    fn s5_powers_off_and_reset_resets() {
        let (tx, rx) = exit_channel();
        let mut pm = AcpiPmDevice::new(tx);
        pm.write(SLEEP_CONTROL, &[(3 << 2) | SLP_EN]); // S3: ignored
        pm.write(SLEEP_CONTROL, &[5 << 2]); // no SLP_EN: ignored
        assert!(rx.try_recv().is_err());
        pm.write(SLEEP_CONTROL, &[(5 << 2) | SLP_EN]);
        assert_eq!(rx.try_recv(), Ok(ExitReason::PowerOff));
        pm.write(RESET, &[ACPI_RESET_VALUE]);
        assert_eq!(rx.try_recv(), Ok(ExitReason::Reset));
    }
}
