//! The PVH `hvm_start_info`: command line, memory map, RSDP address. Also the boot-time allocator
//! that hands out RAM above the kernel image.

use crate::phys::{self, u32_at, u64_at, LOW_MAP_END};

const MAGIC: u32 = 0x336e_c578;
const E820_RAM: u32 = 1;
pub const MAX_RANGES: usize = 32;

#[derive(Clone, Copy, Default)]
pub struct Range {
    pub start: u64,
    pub end: u64,
}

pub struct BootInfo {
    pub cmdline: &'static [u8],
    pub rsdp: u64,
    /// RAM entries of the memory map, sorted by address.
    pub ram: [Range; MAX_RANGES],
    pub nram: usize,
    /// Sum of the RAM entries.
    pub ram_bytes: u64,
}

impl BootInfo {
    pub fn ram(&self) -> &[Range] {
        &self.ram[..self.nram]
    }
}

/// Reads `hvm_start_info` at `paddr` (from `ebx` at entry).
pub fn read(paddr: u32) -> Result<BootInfo, &'static str> {
    // SAFETY: the loader put the structure (56 bytes) at paddr, in low memory, and nothing writes it.
    let si = unsafe { phys::bytes(paddr as u64, 56) };
    if paddr == 0 || u32_at(si, 0) != Some(MAGIC) {
        return Err("reason=bad-start-info-magic");
    }
    let version = u32_at(si, 4).unwrap_or(0);
    let cmdline_paddr = u64_at(si, 24).unwrap_or(0);
    let rsdp = u64_at(si, 32).unwrap_or(0);
    let (memmap, entries) =
        if version >= 1 { (u64_at(si, 40).unwrap_or(0), u32_at(si, 48).unwrap_or(0) as usize) } else { (0, 0) };
    if memmap == 0 || entries == 0 {
        return Err("reason=no-memory-map");
    }
    if memmap + entries as u64 * 24 > LOW_MAP_END || cmdline_paddr >= LOW_MAP_END {
        return Err("reason=start-info-above-4g");
    }

    let cmdline = if cmdline_paddr == 0 {
        &[][..]
    } else {
        // SAFETY: the command line is a NUL-terminated string in low memory; read at most 4 KiB
        // (it cannot reach the end of the low map: the loader put it in RAM below 4 GiB).
        let raw = unsafe { phys::bytes(cmdline_paddr, 4096.min((LOW_MAP_END - cmdline_paddr) as usize)) };
        &raw[..raw.iter().position(|&c| c == 0).unwrap_or(raw.len())]
    };

    let mut info = BootInfo { cmdline, rsdp, ram: [Range::default(); MAX_RANGES], nram: 0, ram_bytes: 0 };
    // SAFETY: entries * 24 bytes at memmap are the loader's memory map, checked to be below 4 GiB.
    let map = unsafe { phys::bytes(memmap, entries * 24) };
    for e in map.chunks_exact(24) {
        let (addr, size, typ) = (u64_at(e, 0).unwrap_or(0), u64_at(e, 8).unwrap_or(0), u32_at(e, 16).unwrap_or(0));
        if typ != E820_RAM || size == 0 {
            continue;
        }
        info.ram_bytes += size;
        if info.nram == MAX_RANGES {
            return Err("reason=too-many-ram-ranges");
        }
        // Keep the list sorted (insertion sort; a handful of entries).
        let mut i = info.nram;
        while i > 0 && info.ram[i - 1].start > addr {
            info.ram[i] = info.ram[i - 1];
            i -= 1;
        }
        info.ram[i] = Range { start: addr, end: addr.saturating_add(size) };
        info.nram += 1;
    }
    Ok(info)
}

/// First-fit allocator over the RAM ranges above the kernel image. Allocations are never freed.
pub struct Alloc {
    free: [Range; MAX_RANGES],
    n: usize,
}

impl Alloc {
    /// Free RAM: the RAM ranges, minus everything below `floor` (the kernel's end) and above `top`.
    pub fn new(ram: &[Range], floor: u64, top: u64) -> Self {
        let mut a = Alloc { free: [Range::default(); MAX_RANGES], n: 0 };
        for r in ram {
            let (start, end) = (r.start.max(floor), r.end.min(top));
            if start < end {
                a.free[a.n] = Range { start, end };
                a.n += 1;
            }
        }
        a
    }

    /// `size` bytes aligned to `align` (a power of two) that end at or below `limit`.
    pub fn alloc(&mut self, size: u64, align: u64, limit: u64) -> Option<u64> {
        for r in &mut self.free[..self.n] {
            let start = (r.start + align - 1) & !(align - 1);
            let end = start.checked_add(size)?;
            if end <= r.end && end <= limit {
                r.start = end;
                return Some(start);
            }
        }
        None
    }
}
