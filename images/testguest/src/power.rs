//! Power-off, as the FADT says: the hardware-reduced sleep control register (SLP_TYP 5 | SLP_EN),
//! else PM1a_CNT with `_S5`'s SLP_TYP, else the reset register, else the i8042 reset line. Each
//! way gets a moment to work before the next is tried.

use core::ptr::write_volatile;

use crate::console::Line;
use crate::sync::Once;
use crate::sys;

/// A Generic Address Structure, reduced to what a write needs.
#[derive(Clone, Copy)]
pub struct Gas {
    pub space: u8,
    /// Access width in bytes.
    pub width: u8,
    pub addr: u64,
}

impl Gas {
    pub const MEMORY: u8 = 0;
    pub const IO: u8 = 1;

    /// Parses 12 bytes of a GAS; None if the register is absent or in an unsupported space.
    pub fn parse(b: &[u8]) -> Option<Gas> {
        let addr = u64::from_le_bytes(b.get(4..12)?.try_into().ok()?);
        let space = b[0];
        if addr == 0 || (space != Self::MEMORY && space != Self::IO) {
            return None;
        }
        // Access size (1..4 = byte..qword) wins; else the register's bit width; else a byte.
        let width = match (b[3], b[1]) {
            (1, _) => 1,
            (2, _) => 2,
            (3, _) | (4, _) => 4,
            (0, 16) => 2,
            (0, 32) | (0, 64) => 4,
            _ => 1,
        };
        Some(Gas { space, width, addr })
    }

    fn write(&self, value: u32) {
        if self.space == Self::IO {
            sys::out(self.addr as u16, value, self.width);
            return;
        }
        // SAFETY: a register the FADT names, in the identity-mapped low 4 GiB (MMIO from ring 3
        // exits to the VMM like any MMIO). Writing it is how ACPI asks for the state change.
        unsafe {
            match self.width {
                1 => write_volatile(self.addr as *mut u8, value as u8),
                2 => write_volatile(self.addr as *mut u16, value as u16),
                _ => write_volatile(self.addr as *mut u32, value),
            }
        }
    }
}

#[derive(Clone, Copy, Default)]
pub struct PowerInfo {
    pub sleep_ctl: Option<Gas>,
    pub pm1a_cnt: Option<Gas>,
    pub slp_typ: u8,
    pub reset: Option<(Gas, u8)>,
}

static INFO: Once<PowerInfo> = Once::new();

pub fn set(info: PowerInfo) {
    INFO.set(info);
}

/// Prints `testguest: poweroff` and asks the VMM to end the VM.
pub fn poweroff() -> ! {
    if crate::console::failed() {
        sys::halt(); // keep a failed guest around so the failure is seen
    }
    Line::new().s("poweroff").print();
    let p = *INFO.get();
    if let Some(sleep_ctl) = p.sleep_ctl {
        sleep_ctl.write((5 << 2) | (1 << 5));
        sys::sleep_ms(200);
    }
    if let Some(pm1a) = p.pm1a_cnt {
        pm1a.write(((p.slp_typ as u32 & 7) << 10) | (1 << 13));
        sys::sleep_ms(200);
    }
    if let Some((reg, value)) = p.reset {
        reg.write(value as u32);
        sys::sleep_ms(200);
    }
    sys::out(0x64, 0xFE, 1);
    sys::sleep_ms(200);
    Line::new().s("FAIL what=poweroff reason=still-running").fail()
}

/// How `reset` asks for a reset.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum ResetWay {
    /// The FADT's reset register.
    Acpi,
    /// The i8042's CPU reset command (0xFE to port 0x64).
    Keyboard,
}

/// Prints `testguest: reset` and asks the VMM for a reset the way given.
pub fn reset(way: ResetWay) -> ! {
    Line::new().s("reset").print();
    match (way, INFO.get().reset) {
        (ResetWay::Acpi, Some((reg, value))) => reg.write(value as u32),
        (ResetWay::Acpi, None) => Line::new().s("FAIL what=reset reason=no-fadt-reset-register").fail(),
        (ResetWay::Keyboard, _) => sys::out(0x64, 0xFE, 1),
    }
    sys::sleep_ms(200);
    Line::new().s("FAIL what=reset reason=still-running").fail()
}
