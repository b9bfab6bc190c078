//! The guest's physical memory map: which ranges are RAM, and the e820/PVH view of it.

use super::layout::{ACPI_END, ACPI_START, EBDA_START, FOUR_GIB, MMIO_HOLE_START};

/// Kind of a memory-map entry, with the e820 type numbers (also used by PVH).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RangeKind {
    Ram = 1,
    Reserved = 2,
}

/// One entry of the memory map given to the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapEntry {
    pub start: u64,
    pub size: u64,
    pub kind: RangeKind,
}

/// The RAM regions backing `mem_size` bytes of guest memory: up to the MMIO hole, and the rest
/// above 4 GiB.
pub fn ram_regions(mem_size: u64) -> Vec<(u64, u64)> {
    if mem_size <= MMIO_HOLE_START {
        vec![(0, mem_size)]
    } else {
        vec![(0, MMIO_HOLE_START), (FOUR_GIB, mem_size - MMIO_HOLE_START)]
    }
}

/// The memory map the guest sees (e820 for bzImage, the PVH memmap for ELF kernels): the RAM
/// regions minus the EBDA and the BIOS area holding the ACPI tables, which are reserved.
pub fn guest_memory_map(mem_size: u64) -> Vec<MapEntry> {
    let mut map = vec![
        MapEntry { start: 0, size: EBDA_START, kind: RangeKind::Ram },
        MapEntry { start: EBDA_START, size: 0xa_0000 - EBDA_START, kind: RangeKind::Reserved },
        MapEntry { start: ACPI_START, size: ACPI_END - ACPI_START, kind: RangeKind::Reserved },
    ];
    for (start, size) in ram_regions(mem_size) {
        let end = start + size;
        let start = start.max(ACPI_END);
        if end > start {
            map.push(MapEntry { start, size: end - start, kind: RangeKind::Ram });
        }
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ram_total(map: &[MapEntry]) -> u64 {
        map.iter().filter(|e| e.kind == RangeKind::Ram).map(|e| e.size).sum()
    }

    #[test]
    fn small_guest_is_one_region() {
        assert_eq!(ram_regions(512 << 20), vec![(0, 512 << 20)]);
        let map = guest_memory_map(512 << 20);
        assert_eq!(map.last().unwrap().start + map.last().unwrap().size, 512 << 20);
        // Only the EBDA and the BIOS area are taken away from RAM.
        assert_eq!(ram_total(&map), (512 << 20) - (0xa_0000 - EBDA_START) - (ACPI_END - 0xa_0000));
    }

    #[test]
    fn large_guest_skips_the_mmio_hole() {
        let mem = 6u64 << 30;
        assert_eq!(ram_regions(mem), vec![(0, MMIO_HOLE_START), (FOUR_GIB, mem - MMIO_HOLE_START)]);
        let map = guest_memory_map(mem);
        for e in &map {
            let end = e.start + e.size;
            assert!(end <= MMIO_HOLE_START || e.start >= FOUR_GIB, "{e:?} overlaps the hole");
        }
        let top = map.last().unwrap();
        assert_eq!(top.start + top.size, FOUR_GIB + mem - MMIO_HOLE_START);
    }

    #[test]
    fn entries_are_sorted_and_disjoint() {
        for mem in [64u64 << 20, 3 << 30, 5 << 30] {
            let map = guest_memory_map(mem);
            for w in map.windows(2) {
                assert!(w[0].start + w[0].size <= w[1].start, "{:?} then {:?}", w[0], w[1]);
            }
        }
    }
}
