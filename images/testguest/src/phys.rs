//! Access to guest-physical memory, which ring 3 sees identity-mapped (low 4 GiB at boot, RAM above
//! 4 GiB once `paging` mapped it).

/// Highest address mapped before `paging::map_high_ram` runs.
pub const LOW_MAP_END: u64 = 1 << 32;

/// Borrows `len` bytes of guest-physical memory at `addr` for reading.
///
/// # Safety
/// The range must be mapped (below `LOW_MAP_END`, or RAM mapped by `paging`) and nothing may write
/// it while the slice is used, except a device or the hypervisor writing data we only inspect.
pub unsafe fn bytes(addr: u64, len: usize) -> &'static [u8] {
    // SAFETY: the caller guarantees the range is mapped and not written while borrowed.
    unsafe { core::slice::from_raw_parts(addr as *const u8, len) }
}

/// Little-endian fields of a byte slice; None when out of bounds.
pub fn u8_at(b: &[u8], off: usize) -> Option<u8> {
    b.get(off).copied()
}

pub fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
}

pub fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(off..off + 8)?.try_into().ok()?))
}
