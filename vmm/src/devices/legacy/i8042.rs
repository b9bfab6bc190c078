//! The i8042 keyboard controller, present for its CPU reset command (Linux `reboot=k`).

use vm_superio::I8042Device;

use crate::devices::persist::{DeviceState, Persist};
use crate::devices::BusDevice;
use crate::exit::ExitTrigger;

pub struct I8042(pub I8042Device<ExitTrigger>);

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = self.0.read(offset as u8);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(value) = data.first() {
            let _ = self.0.write(offset as u8, *value);
        }
    }
}

/// The controller keeps no state a guest could notice across a snapshot (only its reset line
/// matters), so it saves an empty state: its entry still makes device lists match.
impl Persist for I8042 {
    fn save(&self) -> DeviceState {
        DeviceState::empty(1)
    }

    fn restore(&mut self, state: &DeviceState) -> Result<(), String> {
        state.check_empty(1)
    }

    fn describe(&self) -> String {
        "i8042 (reset line)".into()
    }
}
