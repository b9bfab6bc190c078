//! Guest memory: anonymous mappings laid out around the MMIO hole.

use snapshot::PageKind;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::arch::x86_64::memory_map::ram_regions;

#[derive(Debug, thiserror::Error)]
#[error("cannot allocate {size} bytes of guest memory: {reason}")]
pub struct MemoryError {
    pub size: u64,
    pub reason: String,
}

/// Guest memory as the VMM sees it. Every write the VMM itself makes through it (a device's used
/// ring, a disk read, the boot tables) marks its pages in the region's bitmap: KVM's dirty log
/// sees only the vCPUs' writes (see `vstate::dirty`).
pub type GuestMemory = vm_memory::GuestMemoryMmap<AtomicBitmap>;

/// Bytes of guest memory, all regions together.
/// Each region's guest address and size in bytes.
pub fn regions(mem: &GuestMemory) -> Vec<(u64, u64)> {
    mem.iter().map(|r| (r.start_addr().0, r.len())).collect()
}

pub fn total_bytes(mem: &GuestMemory) -> u64 {
    mem.iter().map(|r| r.len()).sum()
}

/// The regions of `mem` as a snapshot lays them out (one after another in its page file), with
/// no content described yet.
pub fn layout_of(mem: &GuestMemory) -> snapshot::MemoryLayout {
    let mut file_offset = 0;
    let regions = mem
        .iter()
        .map(|r| {
            let region = snapshot::RegionLayout { guest_addr: r.start_addr().0, size: r.len(), file_offset };
            file_offset += r.len();
            region
        })
        .collect();
    snapshot::MemoryLayout {
        page_size: snapshot::pages::PAGE_SIZE,
        chunk_size: snapshot::pages::CHUNK_SIZE,
        regions,
        extents: Vec::new(),
        chunk_checksums: Vec::new(),
        hot: Vec::new(),
    }
}

/// Maps `mem_size` bytes of guest RAM. Pages are only backed when touched, with transparent huge
/// pages where the host allows them (as QEMU does): a fault backs 2 MiB instead of 4 KiB, and the
/// guest's TLB misses are cheaper.
pub fn create_guest_memory(mem_size: u64) -> Result<GuestMemory, MemoryError> {
    let ranges: Vec<(GuestAddress, usize)> =
        ram_regions(mem_size).into_iter().map(|(start, size)| (GuestAddress(start), size as usize)).collect();
    let mem = GuestMemory::from_ranges(&ranges).map_err(|e| MemoryError { size: mem_size, reason: e.to_string() })?;
    for region in mem.iter() {
        // SAFETY: the range is the region's own mapping, alive as long as `mem`; the advice
        // changes how the kernel backs it, never its content.
        let advised = unsafe {
            rustix::mm::madvise(region.as_ptr() as *mut _, region.len() as usize, rustix::mm::Advice::LinuxHugepage)
        };
        if let Err(e) = advised {
            tracing::debug!("no huge pages for guest memory: {e}");
        }
    }
    Ok(mem)
}

/// For each region, where each page's content is, when that can be known without touching the
/// page (see `PageKind`): a page mincore(2) does not report resident was never touched, so it is
/// zero (not when the host swaps: a swapped-out page is not resident either). None: unknown,
/// read every page. `loaded`: no load from a snapshot is under way (`vstate::load`); while one
/// is, a page not resident yet may be the snapshot's, and reading it brings it in.
pub fn page_kinds(mem: &GuestMemory, loaded: bool) -> Vec<Option<Vec<PageKind>>> {
    let known = loaded && !host_swaps();
    mem.iter()
        .map(|region| known.then(|| anonymous_page_kinds(region.as_ptr() as usize, region.len() as usize)).flatten())
        .collect()
}

fn anonymous_page_kinds(addr: usize, len: usize) -> Option<Vec<PageKind>> {
    let mut map = vec![0u8; len.div_ceil(PAGE)];
    // SAFETY: [addr, addr + len) is a page-aligned mapping, and `map` has a byte a page. mincore
    // only inspects page tables: it reads no guest memory.
    let rc = unsafe { libc::mincore(addr as *mut libc::c_void, len, map.as_mut_ptr()) };
    (rc == 0).then(|| map.iter().map(|b| if b & 1 != 0 { PageKind::Mapped } else { PageKind::Zero }).collect())
}

pub(crate) const PAGE: usize = 4096;

fn meminfo_kib(field: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn host_swaps() -> bool {
    meminfo_kib("SwapTotal:").is_none_or(|kib| kib > 0)
}

/// Bytes to set aside to copy the guest's non-zero memory (the pages not known to be zero, at
/// most `limit` bytes of them, with room for pages touched meanwhile), or None when that would
/// not fit comfortably in half of what the host has available.
pub fn staging_size(mem: &GuestMemory, kinds: &[Option<Vec<PageKind>>], limit: Option<u64>) -> Option<usize> {
    let bound: u64 = mem
        .iter()
        .zip(kinds)
        .map(|(region, kinds)| match kinds {
            Some(kinds) => {
                kinds.iter().filter(|k| matches!(k, PageKind::Mapped | PageKind::InFile)).count() as u64 * PAGE as u64
            }
            None => region.len(),
        })
        .sum();
    let bound = limit.map_or(bound, |l| bound.min(l));
    let size = bound + bound / 16 + (16 << 20);
    let available = meminfo_kib("MemAvailable:")? * 1024;
    (size <= available / 2).then_some(size as usize)
}
