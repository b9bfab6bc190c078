//! Dirty page tracking: which guest pages were written since the last fetch.
//!
//! Two writers, two records, fetched and cleared together:
//! - the vCPUs: KVM's dirty log, per memory slot, on while `KVM_MEM_LOG_DIRTY_PAGES` is set on
//!   the slot (`KVM_SET_USER_MEMORY_REGION`); `KVM_GET_DIRTY_LOG` returns the slot's bitmap and
//!   clears it (Linux `Documentation/virt/kvm/api.rst`, 4.8 and 4.35);
//! - the VMM itself (used rings, disk reads, boot tables): the `AtomicBitmap` that every region
//!   of `GuestMemory` keeps, set by vm-memory on each write made through it. KVM never sees those.
//!
//! Logging is off by default and costs nothing then: KVM keeps no log, and the VMM's bitmap is
//! one atomic OR per page a device writes.

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MmapRegion};

use super::memory::GuestMemory;

/// Guest page size the logs count in, in bytes.
pub const PAGE_SIZE: u64 = 4096;

/// The pages of one memory region written since the previous fetch: bit i of `bitmap` (in
/// 64-bit words, least significant bit first) is the page at `guest_addr + i * PAGE_SIZE`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirtyRegion {
    pub guest_addr: u64,
    /// Pages in the region.
    pub pages: u64,
    pub bitmap: Vec<u64>,
}

/// The guest pages written since the previous fetch, region by region.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DirtyPages {
    pub regions: Vec<DirtyRegion>,
}

impl DirtyRegion {
    /// ORs together the bitmaps of the two writers; bits past the region's end are dropped.
    pub fn merge(guest_addr: u64, pages: u64, kvm: &[u64], vmm: &[u64]) -> Self {
        let words = pages.div_ceil(64) as usize;
        let mut bitmap: Vec<u64> =
            (0..words).map(|i| kvm.get(i).copied().unwrap_or(0) | vmm.get(i).copied().unwrap_or(0)).collect();
        if !pages.is_multiple_of(64) {
            if let Some(last) = bitmap.last_mut() {
                *last &= (1u64 << (pages % 64)) - 1;
            }
        }
        Self { guest_addr, pages, bitmap }
    }

    pub fn is_dirty(&self, page: u64) -> bool {
        page < self.pages && self.bitmap[(page / 64) as usize] & (1 << (page % 64)) != 0
    }
}

impl DirtyPages {
    /// Adds the pages of `other` (of the same memory) to these.
    pub fn add(&mut self, other: &DirtyPages) {
        if self.regions.is_empty() {
            self.regions = other.regions.clone();
            return;
        }
        for (mine, theirs) in self.regions.iter_mut().zip(&other.regions) {
            debug_assert_eq!((mine.guest_addr, mine.pages), (theirs.guest_addr, theirs.pages));
            for (a, b) in mine.bitmap.iter_mut().zip(&theirs.bitmap) {
                *a |= *b;
            }
        }
    }

    /// Number of dirty pages.
    pub fn count(&self) -> u64 {
        self.regions.iter().flat_map(|r| &r.bitmap).map(|w| u64::from(w.count_ones())).sum()
    }

    /// Whether the page holding guest physical address `gpa` is dirty.
    pub fn contains(&self, gpa: u64) -> bool {
        self.regions.iter().any(|r| {
            gpa >= r.guest_addr
                && gpa < r.guest_addr + r.pages * PAGE_SIZE
                && r.is_dirty((gpa - r.guest_addr) / PAGE_SIZE)
        })
    }

    /// The `chunk`-byte pieces of guest memory (aligned within each region) holding a dirty page,
    /// as maximal runs: (guest physical address, length in bytes).
    pub fn chunks(&self, chunk: u64) -> Vec<(u64, u64)> {
        let per = (chunk / PAGE_SIZE).max(1);
        let mut out: Vec<(u64, u64)> = Vec::new();
        for r in &self.regions {
            for c in 0..r.pages.div_ceil(per) {
                if (c * per..((c + 1) * per).min(r.pages)).any(|p| r.is_dirty(p)) {
                    let (addr, len) = (r.guest_addr + c * chunk, chunk.min((r.pages - c * per) * PAGE_SIZE));
                    match out.last_mut() {
                        Some(last) if last.0 + last.1 == addr => last.1 += len,
                        _ => out.push((addr, len)),
                    }
                }
            }
        }
        out
    }

    /// The dirty pages as maximal runs: (guest physical address, length in bytes).
    pub fn ranges(&self) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        for r in &self.regions {
            let mut run: Option<(u64, u64)> = None;
            for page in 0..r.pages {
                match (r.is_dirty(page), run.as_mut()) {
                    (true, Some((_, len))) => *len += PAGE_SIZE,
                    (true, None) => run = Some((r.guest_addr + page * PAGE_SIZE, PAGE_SIZE)),
                    (false, Some(_)) => out.extend(run.take()),
                    (false, None) => {}
                }
            }
            out.extend(run);
        }
        out
    }
}

/// Clears the VMM's own write bitmaps (when logging starts: only later writes count).
pub fn clear_vmm_writes(mem: &GuestMemory) {
    for region in mem.iter() {
        MmapRegion::bitmap(region).reset();
    }
}

/// Takes the VMM's own write bitmap of each region, clearing it word by word atomically, so a
/// write that races with the fetch is in this fetch or the next, never lost.
pub fn take_vmm_writes(mem: &GuestMemory) -> Vec<Vec<u64>> {
    mem.iter().map(|region| MmapRegion::bitmap(region).get_and_reset()).collect()
}

/// Pages per region of `mem`, in the order of its KVM memory slots.
pub fn region_pages(mem: &GuestMemory) -> Vec<(u64, u64)> {
    mem.iter().map(|r| (r.start_addr().0, r.len().div_ceil(PAGE_SIZE))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn merge_ors_both_writers_and_ignores_bits_past_the_end() {
        let r = DirtyRegion::merge(0x10_0000, 70, &[0b1010, 0xffff_ffff], &[0b0101, 0, 7]);
        assert_eq!(r.bitmap, vec![0b1111, 0x3f]);
        let d = DirtyPages { regions: vec![r] };
        assert_eq!(d.count(), 10);
        assert!(d.contains(0x10_0000 + 3 * PAGE_SIZE + 5));
        assert!(!d.contains(0x10_0000 + 4 * PAGE_SIZE));
        assert!(!d.contains(0));
        assert_eq!(d.ranges(), vec![(0x10_0000, 4 * PAGE_SIZE), (0x10_0000 + 64 * PAGE_SIZE, 6 * PAGE_SIZE)]);
    }

    #[test]
    fn vmm_writes_through_guest_memory_are_recorded_and_taken_once() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20), (GuestAddress(1 << 30), 1 << 20)]).unwrap();
        clear_vmm_writes(&mem);
        mem.write_obj(0xabcd_u64, GuestAddress(5 * PAGE_SIZE + 8)).unwrap();
        // A write across a page boundary marks both pages.
        mem.write_slice(&[1u8; 16], GuestAddress((1 << 30) + 2 * PAGE_SIZE - 8)).unwrap();
        let taken = take_vmm_writes(&mem);
        let pages = region_pages(&mem);
        let dirty = DirtyPages {
            regions: pages.iter().zip(&taken).map(|(&(a, n), vmm)| DirtyRegion::merge(a, n, &[], vmm)).collect(),
        };
        assert_eq!(dirty.ranges(), vec![(5 * PAGE_SIZE, PAGE_SIZE), ((1 << 30) + PAGE_SIZE, 2 * PAGE_SIZE)]);
        assert_eq!(take_vmm_writes(&mem).iter().flatten().map(|w| w.count_ones()).sum::<u32>(), 0);
    }
}
