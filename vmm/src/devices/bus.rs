//! Address-range dispatch of port I/O and MMIO exits to devices.

use std::sync::{Arc, Mutex};

/// A device reachable on a bus. `offset` is relative to the start of the device's range.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

struct Range {
    base: u64,
    len: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

/// Non-overlapping ranges, sorted by base.
#[derive(Default)]
pub struct Bus {
    ranges: Vec<Range>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("bus range {base:#x}+{len:#x} overlaps another device")]
pub struct OverlapError {
    pub base: u64,
    pub len: u64,
}

impl Bus {
    pub fn insert(&mut self, device: Arc<Mutex<dyn BusDevice>>, base: u64, len: u64) -> Result<(), OverlapError> {
        let end = base.checked_add(len).ok_or(OverlapError { base, len })?;
        if len == 0 || self.ranges.iter().any(|r| base < r.base + r.len && r.base < end) {
            return Err(OverlapError { base, len });
        }
        let at = self.ranges.partition_point(|r| r.base < base);
        self.ranges.insert(at, Range { base, len, device });
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(&Range, u64)> {
        let idx = self.ranges.partition_point(|r| r.base <= addr).checked_sub(1)?;
        let range = &self.ranges[idx];
        (addr - range.base < range.len).then(|| (range, addr - range.base))
    }

    /// Reads from the device at `addr`; returns false (and leaves `data` alone) if there is none.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((range, offset)) => {
                lock(&range.device).read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Writes to the device at `addr`; returns false if there is none.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((range, offset)) => {
                lock(&range.device).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// Locks a device; a device whose lock was poisoned by a panic keeps working with its state as is.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(u64);
    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data[0] = (self.0 + offset) as u8;
        }
        fn write(&mut self, offset: u64, _data: &[u8]) {
            self.0 = offset;
        }
    }

    #[test]
    fn dispatch_and_overlap() {
        let mut bus = Bus::default();
        bus.insert(Arc::new(Mutex::new(Echo(0x10))), 0x100, 0x10).unwrap();
        bus.insert(Arc::new(Mutex::new(Echo(0x20))), 0x200, 0x10).unwrap();
        assert!(bus.insert(Arc::new(Mutex::new(Echo(0))), 0x10f, 2).is_err());
        assert!(bus.insert(Arc::new(Mutex::new(Echo(0))), 0x1ff, 1).is_ok());
        let mut b = [0u8];
        assert!(bus.read(0x105, &mut b));
        assert_eq!(b[0], 0x15);
        assert!(bus.read(0x200, &mut b));
        assert_eq!(b[0], 0x20);
        assert!(!bus.read(0x110, &mut b));
        assert!(!bus.read(0x50, &mut b));
    }
}
