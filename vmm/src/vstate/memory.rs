//! Guest memory: anonymous mappings laid out around the MMIO hole.

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::arch::x86_64::memory_map::ram_regions;

#[derive(Debug, thiserror::Error)]
#[error("cannot allocate {size} bytes of guest memory: {reason}")]
pub struct MemoryError {
    pub size: u64,
    pub reason: String,
}

/// Maps `mem_size` bytes of guest RAM. Pages are only backed when touched.
pub fn create_guest_memory(mem_size: u64) -> Result<GuestMemoryMmap, MemoryError> {
    let ranges: Vec<(GuestAddress, usize)> =
        ram_regions(mem_size).into_iter().map(|(start, size)| (GuestAddress(start), size as usize)).collect();
    GuestMemoryMmap::from_ranges(&ranges).map_err(|e| MemoryError { size: mem_size, reason: e.to_string() })
}

/// For each region, which pages were never touched, when that can be known without reading
/// them: mincore(2) of anonymous memory (one byte a page, bit 0 set if resident). None for memory
/// mapped from a snapshot file (its pages are the file's), and when the host swaps, since a
/// swapped-out page is not resident either.
pub fn residency_maps(mem: &GuestMemoryMmap) -> Vec<Option<Vec<u8>>> {
    let swap = host_swaps();
    mem.iter()
        .map(|region| {
            if swap || region.file_offset().is_some() {
                return None;
            }
            let len = region.len() as usize;
            let mut map = vec![0u8; len.div_ceil(4096)];
            // SAFETY: the region is a page-aligned mapping of `len` bytes, and `map` has a byte
            // a page. mincore only inspects page tables: it reads no guest memory.
            let rc = unsafe { libc::mincore(region.as_ptr() as *mut libc::c_void, len, map.as_mut_ptr()) };
            (rc == 0).then_some(map)
        })
        .collect()
}

fn meminfo_kib(field: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn host_swaps() -> bool {
    meminfo_kib("SwapTotal:").is_none_or(|kib| kib > 0)
}

/// Bytes to set aside to copy the guest's non-zero memory (its resident anonymous pages, all of
/// any other region, with room for pages touched meanwhile), or None when that would not fit
/// comfortably in half of what the host has available.
pub fn staging_size(mem: &GuestMemoryMmap, maps: &[Option<Vec<u8>>]) -> Option<usize> {
    let bound: u64 = mem
        .iter()
        .zip(maps)
        .map(|(region, map)| match map {
            Some(map) => map.iter().filter(|b| *b & 1 != 0).count() as u64 * 4096,
            None => region.len(),
        })
        .sum();
    let size = bound + bound / 16 + (16 << 20);
    let available = meminfo_kib("MemAvailable:")? * 1024;
    (size <= available / 2).then_some(size as usize)
}
