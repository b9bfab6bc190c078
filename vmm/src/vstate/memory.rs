//! Guest memory: anonymous mappings laid out around the MMIO hole.

use vm_memory::{GuestAddress, GuestMemoryMmap};

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
