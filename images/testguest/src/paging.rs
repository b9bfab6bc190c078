//! RAM above 4 GiB. The static identity map covers the low 4 GiB; the VMM puts RAM above 4 GiB when
//! the guest has more than about 3 GiB. Ring 3 maps it (2 MiB pages; 1 GiB pages triple-fault under
//! PVM) by filling fresh page directories and the PDPT, which like all low memory is reachable from
//! ring 3; ring 0 only reloads CR3. One PDPT covers 512 GiB, which bounds the usable RAM.

use core::ptr::write_volatile;
use core::sync::atomic::Ordering;

use crate::boot::pdpt;
use crate::bootinfo::{Alloc, Range};
use crate::phys::LOW_MAP_END;
use crate::sys;

/// End of what the page tables can map.
pub const MAP_LIMIT: u64 = 512 << 30;

const GIB: u64 = 1 << 30;
const PRESENT_RW_USER: u64 = 0x7;
const HUGE: u64 = 0x80;

pub fn map_high_ram(ram: &[Range], alloc: &mut Alloc) -> Result<(), &'static str> {
    let top = ram.iter().map(|r| r.end).max().unwrap_or(0).min(MAP_LIMIT);
    if top <= LOW_MAP_END {
        return Ok(());
    }
    for gib in (LOW_MAP_END / GIB)..top.div_ceil(GIB) {
        let pd = alloc.alloc(4096, 4096, LOW_MAP_END).ok_or("reason=no-memory-for-page-tables")?;
        for i in 0..512u64 {
            // SAFETY: pd is a page of RAM just allocated for this purpose, in the low map.
            unsafe {
                write_volatile((pd as *mut u64).add(i as usize), (gib * GIB + (i << 21)) | HUGE | PRESENT_RW_USER)
            };
        }
        // SAFETY: pdpt is the live PDPT from boot.rs; entries 4..512 are unused until set here.
        unsafe { pdpt[gib as usize].store(pd | PRESENT_RW_USER, Ordering::SeqCst) };
    }
    sys::flush_tlb();
    Ok(())
}
