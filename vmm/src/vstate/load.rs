//! Bringing a resumed VM's memory in from its snapshot ahead of the guest. A VM resumed from a
//! directory maps the snapshot's page file privately, so the guest runs at once and each page
//! loads on its first touch; but each first touch is a fault, and a guest that goes back to work
//! on all its memory runs slowly for seconds. The loader copies the file's data into the VM from
//! a background thread, 2 MiB at a time (`MADV_POPULATE_WRITE`: a private copy of each page, as a
//! guest write would make), while the guest runs. Then, with the guest paused for a moment, what
//! is still the file's (its holes, never touched) is replaced by anonymous zero memory: from
//! then on the VM no longer depends on the snapshot's files.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::memory::{data_pages, file_page_kinds, GuestMemory, PAGE};
use snapshot::PageKind;

/// Granularity: small enough to interleave with the guest's own faults.
const CHUNK: usize = 2 << 20;

/// How far a resumed VM's memory is from being its own.
#[derive(Debug)]
pub struct MemoryLoad {
    /// The snapshot directory the memory is mapped from.
    pub snapshot: PathBuf,
    /// Bytes of file data to bring in, and brought in so far.
    pub total_bytes: AtomicU64,
    pub loaded_bytes: AtomicU64,
    /// Every page is the VM's own now: the snapshot's files may change or go.
    pub independent: AtomicBool,
    /// No loader runs (`vmm resume --lazy`, or it stopped on an error): pages load on first touch.
    pub lazy: AtomicBool,
    /// Guest memory to load first, `(guest address, bytes)` runs (`MemoryLayout::hot`).
    pub hot: Vec<(u64, u64)>,
}

impl MemoryLoad {
    pub fn new(snapshot: PathBuf, lazy: bool, hot: Vec<(u64, u64)>) -> Self {
        Self {
            snapshot,
            hot,
            total_bytes: AtomicU64::new(0),
            loaded_bytes: AtomicU64::new(0),
            independent: AtomicBool::new(false),
            lazy: AtomicBool::new(lazy),
        }
    }

    pub fn is_independent(&self) -> bool {
        self.independent.load(Ordering::Acquire)
    }
}

/// Copies the data of every region mapped from a file into the VM (see the module doc), the
/// guest's recently written memory (`load.hot`) first, counting progress in `load`. Returns the
/// bytes brought in, or the first error (the rest then loads on first touch).
pub fn populate(mem: &GuestMemory, load: &MemoryLoad) -> std::io::Result<u64> {
    let mut plan = Vec::new();
    for region in mem.iter() {
        let Some(fo) = region.file_offset() else { continue };
        let (addr, len) = (region.as_ptr() as usize, region.len() as usize);
        let guest = region.start_addr().0;
        let data = data_pages(fo.file(), fo.start(), len / PAGE).ok_or_else(std::io::Error::last_os_error)?;
        for (i, chunk) in data.chunks(CHUNK / PAGE).enumerate() {
            if chunk.contains(&true) {
                let off = i * CHUNK;
                let n = CHUNK.min(len - off);
                let at = guest + off as u64;
                let hot = load.hot.iter().any(|&(a, l)| a < at + n as u64 && at < a + l);
                plan.push((!hot, addr + off, n));
            }
        }
    }
    // Hot chunks first, each group in address order (a stable sort on the flag alone).
    plan.sort_by_key(|&(cold, _, _)| cold);
    let plan: Vec<(usize, usize)> = plan.into_iter().map(|(_, start, n)| (start, n)).collect();
    load.total_bytes.store(plan.iter().map(|(_, n)| *n as u64).sum(), Ordering::Relaxed);
    let mut bytes = 0;
    for (start, n) in plan {
        // SAFETY: [start, start + n) lies inside a region's mapping, which `mem` keeps alive.
        // Populating (Linux 5.14+) faults pages in writable, as a write would (a private copy of
        // the file's page), with the content they already have (the file's, or the guest's own if
        // it wrote them first): guest-visible memory does not change.
        unsafe { rustix::mm::madvise(start as *mut libc::c_void, n, rustix::mm::Advice::LinuxPopulateWrite) }?;
        bytes += n as u64;
        load.loaded_bytes.fetch_add(n as u64, Ordering::Relaxed);
    }
    Ok(bytes)
}

/// Replaces what is still the file's in every file-backed region by anonymous memory: the
/// untouched holes (zero) become anonymous zero pages, never allocated. Returns false, changing
/// nothing more, if a page still holds file data not brought in (the loader did not finish).
/// The guest must be paused: a page it wrote between the check and the remap would be lost.
pub fn detach_from_file(mem: &GuestMemory) -> std::io::Result<bool> {
    for region in mem.iter() {
        let Some(fo) = region.file_offset() else { continue };
        let (addr, len) = (region.as_ptr() as usize, region.len() as usize);
        let kinds = file_page_kinds(addr, len, fo.file(), fo.start()).ok_or_else(std::io::Error::last_os_error)?;
        if kinds.contains(&PageKind::InFile) {
            return Ok(false);
        }
        let mut p = 0;
        while p < kinds.len() {
            if kinds[p] != PageKind::Zero {
                p += 1;
                continue;
            }
            let end = (p..kinds.len()).find(|&q| kinds[q] != PageKind::Zero).unwrap_or(kinds.len());
            // SAFETY: the range lies inside the region's mapping (which `mem` keeps alive) and
            // holds only pages the process never mapped (not present, a hole of the file: zero),
            // so replacing it by fresh anonymous memory, also zero, changes nothing the guest can
            // see; the vCPUs are paused, so none is written meanwhile. KVM drops its own view of
            // the range through its MMU notifier and faults the new pages in on the next access.
            unsafe {
                rustix::mm::mmap_anonymous(
                    (addr + p * PAGE) as *mut libc::c_void,
                    (end - p) * PAGE,
                    rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
                    rustix::mm::MapFlags::PRIVATE | rustix::mm::MapFlags::FIXED | rustix::mm::MapFlags::NORESERVE,
                )
            }?;
            p = end;
        }
    }
    Ok(true)
}
