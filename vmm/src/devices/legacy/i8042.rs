//! The i8042 keyboard controller, present for its CPU reset command (Linux `reboot=k`).

use vm_superio::I8042Device;

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
