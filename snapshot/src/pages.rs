//! The page file: guest memory regions one after another, raw and uncompressed so it can be mapped
//! straight back as guest memory. All-zero pages are holes and take no disk space. Each chunk of
//! the file has a checksum in the manifest, and an extent map says what each range of guest
//! memory is: data in the file, zero, or the parent snapshot's (a hole in this file).

use std::fs::File;
use std::os::unix::fs::FileExt;

use serde::{Deserialize, Serialize};

use crate::digest::Hasher;
use crate::progress::Progress;
use crate::{io_err, Error, Result};

pub const PAGE_SIZE: u64 = 4096;
/// Checksum granularity: small enough to say where damage is, large enough to keep the manifest small.
pub const CHUNK_SIZE: u64 = 1 << 20;

/// One guest memory region and where it lives in the page file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionLayout {
    pub guest_addr: u64,
    pub size: u64,
    pub file_offset: u64,
}

/// What a range of guest memory is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExtentKind {
    /// In the page file, at its region's offset.
    Data,
    /// All zero (a hole in the page file).
    Zero,
    /// Unchanged since the parent snapshot: read it there (a hole in this page file).
    Parent,
}

/// A range of guest memory, in bytes, page aligned, inside one region.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Extent {
    pub guest_addr: u64,
    pub len: u64,
    pub kind: ExtentKind,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryLayout {
    pub page_size: u64,
    pub chunk_size: u64,
    pub regions: Vec<RegionLayout>,
    /// Every byte of every region, in order, as maximal runs of one kind.
    pub extents: Vec<Extent>,
    /// Checksum of each `chunk_size` piece of each region of the page file, region after region
    /// (a region's last chunk may be shorter; holes count as zeros).
    pub chunk_checksums: Vec<u64>,
    /// Guest memory the guest wrote shortly before the snapshot (since the one before), as
    /// `[guest address, bytes]` runs of 2 MiB: what a resume loads first. Empty: not known.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hot: Vec<(u64, u64)>,
}

/// Adds `len` bytes of `kind` at `guest_addr` to `extents`, merging with the last one.
pub fn push_extent(extents: &mut Vec<Extent>, guest_addr: u64, len: u64, kind: ExtentKind) {
    match extents.last_mut() {
        Some(last) if last.kind == kind && last.guest_addr + last.len == guest_addr => last.len += len,
        _ => extents.push(Extent { guest_addr, len, kind }),
    }
}

/// Guest memory to save: a region's guest address and its bytes, as mapped in the VMM.
pub struct MemorySource<'a> {
    pub guest_addr: u64,
    pub bytes: &'a [u8],
    /// Where each page's content is, when the VMM knows (one `PageKind` a page): pages known to
    /// be zero are not read at all, and pages still in a backing file are read from the file
    /// rather than faulted in through the mapping. None: read every page through the mapping.
    pub kinds: Option<Vec<PageKind>>,
    /// The file the region is mapped from (privately) and the offset of its first page.
    pub backing: Option<(&'a File, u64)>,
}

/// Where a page of guest memory is to be found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageKind {
    /// Known to be zero (never touched, or a hole of the backing file never written since).
    Zero,
    /// In the mapping: read it there.
    Mapped,
    /// Not in the mapping yet: its content is the backing file's.
    InFile,
    /// Unchanged since the parent snapshot (a diff): neither read nor written.
    Parent,
}

/// A page as a writer sees it.
enum Page<'a> {
    Zero,
    Parent,
    Data(&'a [u8]),
}

impl MemoryLayout {
    pub fn total_size(&self) -> u64 {
        self.regions.iter().map(|r| r.size).sum()
    }

    pub fn total_pages(&self) -> u64 {
        self.total_size() / self.page_size
    }

    fn pages_of(&self, kind: ExtentKind) -> u64 {
        self.extents.iter().filter(|e| e.kind == kind).map(|e| e.len / self.page_size).sum()
    }

    /// Pages that are zero.
    pub fn zero_pages(&self) -> u64 {
        self.pages_of(ExtentKind::Zero)
    }

    /// Pages whose content is in the page file.
    pub fn data_pages(&self) -> u64 {
        self.pages_of(ExtentKind::Data)
    }

    /// Pages that are the parent snapshot's.
    pub fn parent_pages(&self) -> u64 {
        self.pages_of(ExtentKind::Parent)
    }

    /// Number of checksummed chunks.
    pub fn chunk_count(&self) -> u64 {
        self.regions.iter().map(|r| r.size.div_ceil(self.chunk_size)).sum()
    }

    /// Whether any page of the `len` bytes from `guest_addr` is other than zero, without listing
    /// them (as `kinds_of` does).
    pub fn any_nonzero(&self, guest_addr: u64, len: u64) -> bool {
        let end = guest_addr + len;
        let from = self.extents.partition_point(|e| e.guest_addr + e.len <= guest_addr);
        self.extents[from..].iter().take_while(|e| e.guest_addr < end).any(|e| e.kind != ExtentKind::Zero)
    }

    /// The extent kind of each of `pages` pages from `guest_addr` (the extents tile the regions:
    /// `validate`).
    pub fn kinds_of(&self, guest_addr: u64, pages: u64) -> Vec<ExtentKind> {
        let end = guest_addr + pages * self.page_size;
        let from = self.extents.partition_point(|e| e.guest_addr + e.len <= guest_addr);
        let mut out = Vec::with_capacity(pages as usize);
        for e in self.extents[from..].iter().take_while(|e| e.guest_addr < end) {
            let (start, stop) = (e.guest_addr.max(guest_addr), (e.guest_addr + e.len).min(end));
            out.extend(std::iter::repeat_n(e.kind, ((stop - start) / self.page_size) as usize));
        }
        out
    }

    /// Every chunk as (guest address, file offset, length), in checksum order.
    pub fn chunks(&self) -> impl Iterator<Item = (u64, u64, u64)> + '_ {
        self.regions.iter().flat_map(move |r| {
            (0..r.size.div_ceil(self.chunk_size)).map(move |i| {
                let off = i * self.chunk_size;
                (r.guest_addr + off, r.file_offset + off, self.chunk_size.min(r.size - off))
            })
        })
    }

    /// Checks the layout is self-consistent, so nothing later trusts nonsense.
    pub fn validate(&self) -> std::result::Result<(), String> {
        self.validate_regions()?;
        self.validate_content()
    }

    /// Checks the page and chunk sizes and the regions.
    pub fn validate_regions(&self) -> std::result::Result<(), String> {
        if self.page_size != PAGE_SIZE {
            return Err(format!("page size {} is not {PAGE_SIZE}", self.page_size));
        }
        if self.chunk_size != CHUNK_SIZE {
            return Err(format!("bad chunk size {}", self.chunk_size));
        }
        let mut offset = 0u64;
        let mut last_end = 0u64;
        for r in &self.regions {
            if r.size == 0 || !r.size.is_multiple_of(self.page_size) || !r.guest_addr.is_multiple_of(self.page_size) {
                return Err(format!("region at {:#x} is not page aligned", r.guest_addr));
            }
            if r.file_offset != offset || r.guest_addr < last_end {
                return Err("regions overlap or are out of order".into());
            }
            offset = offset.checked_add(r.size).ok_or("region sizes overflow")?;
            last_end = r.guest_addr.checked_add(r.size).ok_or("region end overflows")?;
        }
        Ok(())
    }

    /// Checks the checksums and extents against the regions.
    fn validate_content(&self) -> std::result::Result<(), String> {
        if self.chunk_checksums.len() as u64 != self.chunk_count() {
            return Err("chunk checksum count does not match memory size".into());
        }
        // The extents tile the regions exactly, in order.
        let mut extents = self.extents.iter().peekable();
        for r in &self.regions {
            let mut at = r.guest_addr;
            let end = r.guest_addr + r.size;
            while at < end {
                let e = extents.next().ok_or_else(|| format!("no extent covers guest address {at:#x}"))?;
                if e.guest_addr != at || e.len == 0 || !e.len.is_multiple_of(self.page_size) {
                    return Err(format!("extent at {:#x} is misplaced or not page aligned", e.guest_addr));
                }
                at = at.checked_add(e.len).filter(|&a| a <= end).ok_or("an extent crosses its region's end")?;
            }
        }
        if extents.next().is_some() {
            return Err("extents past the last region".into());
        }
        Ok(())
    }
}

pub(crate) fn is_zero(page: &[u8]) -> bool {
    // SAFETY: u64 has no invalid bit patterns; align_to only reinterprets the aligned middle.
    let (head, words, tail) = unsafe { page.align_to::<u64>() };
    head.iter().all(|b| *b == 0) && words.iter().all(|w| *w == 0) && tail.iter().all(|b| *b == 0)
}

static ZERO_PAGE: [u8; PAGE_SIZE as usize] = [0; PAGE_SIZE as usize];

/// Where the pages of one region come from when writing the page file.
trait PageSource {
    fn guest_addr(&self) -> u64;
    fn size(&self) -> usize;
    /// Page `p`: its bytes, or whether it is zero or the parent's.
    fn page(&self, p: usize) -> Page<'_>;
    /// The bytes of the non-zero pages [first, end), which are contiguous in the source.
    fn run(&self, first: usize, end: usize) -> &[u8];
}

impl PageSource for MemorySource<'_> {
    fn guest_addr(&self) -> u64 {
        self.guest_addr
    }

    fn size(&self) -> usize {
        self.bytes.len()
    }

    fn page(&self, p: usize) -> Page<'_> {
        match self.kinds.as_ref().and_then(|k| k.get(p)) {
            Some(PageKind::Zero) => return Page::Zero,
            Some(PageKind::Parent) => return Page::Parent,
            _ => {}
        }
        let bytes = &self.bytes[p * PAGE..((p + 1) * PAGE).min(self.bytes.len())];
        if is_zero(bytes) {
            Page::Zero
        } else {
            Page::Data(bytes)
        }
    }

    fn run(&self, first: usize, end: usize) -> &[u8] {
        &self.bytes[first * PAGE..(end * PAGE).min(self.bytes.len())]
    }
}

const PAGE: usize = PAGE_SIZE as usize;
/// Slot of a zero page in a staged region.
const ZERO_SLOT: u32 = u32::MAX;
/// Slot of a page left to the parent snapshot.
const PARENT_SLOT: u32 = u32::MAX - 1;

/// One region's pages that may hold data, copied aside in page order.
struct StagedRegion {
    guest_addr: u64,
    size: usize,
    /// For each page, its slot in the staging buffer, or ZERO_SLOT.
    slots: Vec<u32>,
}

/// Guest memory copied aside while the guest is paused (a memory-speed copy of the non-zero
/// pages), to be written to the page file once the guest runs again.
#[derive(Default)]
pub struct StagedMemory {
    regions: Vec<StagedRegion>,
    data: Vec<u8>,
}

impl StagedMemory {
    /// A staging buffer for `bytes` of pages, allocated and faulted in now, so that the copy
    /// while the guest is paused runs at memory speed.
    /// None if the memory cannot be had.
    pub fn with_capacity(bytes: usize) -> Option<Self> {
        use rustix::mm::{madvise, Advice};
        let mut data: Vec<u8> = Vec::new();
        data.try_reserve_exact(bytes).ok()?;
        let spare = data.spare_capacity_mut();
        let (start, len) = (spare.as_mut_ptr() as usize, spare.len());
        // Huge pages where the buffer allows (its 2 MiB-aligned part): 512 times fewer faults to
        // back it, and fewer TLB misses in the copy.
        const HUGE: usize = 2 << 20;
        let aligned = start.next_multiple_of(HUGE);
        if aligned < start + len {
            let huge_len = (start + len - aligned) / HUGE * HUGE;
            // SAFETY: the range lies inside the Vec's allocation, which we own; the advice only
            // changes how the kernel backs it, not its content.
            let _ = unsafe { madvise(aligned as *mut _, huge_len, Advice::LinuxHugepage) };
        }
        // Back the whole buffer now (Linux 5.14+), rather than fault page by page mid-copy;
        // on older kernels, touch a byte of each page.
        let page_start = start.next_multiple_of(PAGE);
        let page_len = (start + len).saturating_sub(page_start) / PAGE * PAGE;
        // SAFETY: as above; populating faults pages in without changing what they hold.
        if unsafe { madvise(page_start as *mut _, page_len, Advice::LinuxPopulateWrite) }.is_err() {
            for page in data.spare_capacity_mut().chunks_mut(PAGE) {
                page[0].write(0u8);
            }
        }
        Some(Self { regions: Vec::new(), data })
    }

    /// Copies the pages of `sources` that may hold data: pages known to be zero are not read,
    /// pages in the mapping are copied in runs as they are (zero ones are told apart when
    /// written, while the guest runs), pages still in a backing file are read from it (in runs,
    /// without faulting them into the mapping; its holes are left out).
    /// Returns false, having copied an unknown part, if they do not fit (or a backing file cannot
    /// be read): the buffer never grows, so the copy never waits for an allocation.
    pub fn copy(&mut self, sources: &[MemorySource<'_>]) -> bool {
        self.regions.clear();
        self.data.clear();
        for src in sources {
            // Slots count whole pages: regions must be made of them.
            if !src.bytes.len().is_multiple_of(PAGE) {
                return false;
            }
            let pages = src.bytes.len() / PAGE;
            let mut slots = Vec::with_capacity(pages);
            let mut p = 0;
            while p < pages {
                let kind = src.kinds.as_ref().and_then(|k| k.get(p).copied()).unwrap_or(PageKind::Mapped);
                match (kind, src.backing) {
                    (PageKind::InFile, Some((file, offset))) => {
                        let end = (p..pages)
                            .find(|&q| src.kinds.as_ref().and_then(|k| k.get(q)) != Some(&PageKind::InFile))
                            .unwrap_or(pages);
                        if !self.copy_from_file(file, offset + (p * PAGE) as u64, end - p, &mut slots) {
                            return false;
                        }
                        p = end;
                        continue;
                    }
                    // Runs of them at memory speed: most of a diff's pages are its parent's.
                    (PageKind::Zero | PageKind::Parent, _) => {
                        let slot = if kind == PageKind::Zero { ZERO_SLOT } else { PARENT_SLOT };
                        let kinds = src.kinds.as_deref().unwrap_or(&[]);
                        let end = kinds[p..kinds.len().min(pages)]
                            .iter()
                            .position(|&k| k != kind)
                            .map_or(kinds.len().min(pages), |i| p + i);
                        slots.resize(slots.len() + (end - p), slot);
                        p = end;
                        continue;
                    }
                    _ => {
                        // A run of pages in the mapping, copied as they are in one go: which of
                        // them are zero is found when they are written, while the guest runs.
                        let in_mapping = |q: usize| {
                            let kind = src.kinds.as_ref().and_then(|k| k.get(q).copied()).unwrap_or(PageKind::Mapped);
                            kind == PageKind::Mapped || (kind == PageKind::InFile && src.backing.is_none())
                        };
                        let end = (p + 1..pages).find(|&q| !in_mapping(q)).unwrap_or(pages);
                        let bytes = &src.bytes[p * PAGE..end * PAGE];
                        if self.data.capacity() - self.data.len() < bytes.len() {
                            return false;
                        }
                        let first_slot = self.data.len() / PAGE;
                        slots.extend((first_slot..first_slot + (end - p)).map(|slot| slot as u32));
                        self.data.extend_from_slice(bytes);
                        p = end;
                        continue;
                    }
                }
            }
            self.regions.push(StagedRegion { guest_addr: src.guest_addr, size: src.bytes.len(), slots });
        }
        true
    }

    /// Bytes of pages copied.
    pub fn bytes(&self) -> u64 {
        self.data.len() as u64
    }

    /// Reads `count` pages of `file` at `offset` into the buffer, keeping only non-zero ones.
    fn copy_from_file(&mut self, file: &File, offset: u64, count: usize, slots: &mut Vec<u32>) -> bool {
        let start = self.data.len();
        if self.data.capacity() - start < count * PAGE {
            return false;
        }
        self.data.resize(start + count * PAGE, 0);
        if file.read_exact_at(&mut self.data[start..], offset).is_err() {
            return false;
        }
        // Compact: zero pages (holes of the file) take no slot.
        let mut kept = start;
        for i in 0..count {
            let at = start + i * PAGE;
            if is_zero(&self.data[at..at + PAGE]) {
                slots.push(ZERO_SLOT);
            } else {
                self.data.copy_within(at..at + PAGE, kept);
                slots.push((kept / PAGE) as u32);
                kept += PAGE;
            }
        }
        self.data.truncate(kept);
        true
    }
}

/// A staged region with the buffer its pages are in.
struct StagedView<'a> {
    region: &'a StagedRegion,
    data: &'a [u8],
}

impl PageSource for StagedView<'_> {
    fn guest_addr(&self) -> u64 {
        self.region.guest_addr
    }

    fn size(&self) -> usize {
        self.region.size
    }

    fn page(&self, p: usize) -> Page<'_> {
        let slot = match self.region.slots.get(p) {
            None | Some(&ZERO_SLOT) => return Page::Zero,
            Some(&PARENT_SLOT) => return Page::Parent,
            Some(&slot) => slot as usize,
        };
        let bytes = &self.data[slot * PAGE..(slot + 1) * PAGE];
        if is_zero(bytes) {
            Page::Zero
        } else {
            Page::Data(bytes)
        }
    }

    fn run(&self, first: usize, end: usize) -> &[u8] {
        let (a, b) = (self.region.slots[first] as usize, self.region.slots[end - 1] as usize + 1);
        &self.data[a * PAGE..b * PAGE]
    }
}

/// A run of guest memory: bytes to send, or a range known to be zero.
pub enum Run<'a> {
    Data { guest_addr: u64, bytes: &'a [u8] },
    Zero { guest_addr: u64, len: u64 },
}

/// Guest memory to save: read from the paused guest, or copied aside while it was paused.
#[derive(Clone, Copy)]
pub enum MemoryData<'a> {
    Sources(&'a [MemorySource<'a>]),
    Staged(&'a StagedMemory),
}

impl MemoryData<'_> {
    fn with_sources<T>(&self, f: impl FnOnce(&[&dyn PageSource]) -> T) -> T {
        match self {
            MemoryData::Sources(sources) => {
                let sources: Vec<&dyn PageSource> = sources.iter().map(|s| s as &dyn PageSource).collect();
                f(&sources)
            }
            MemoryData::Staged(staged) => {
                let views: Vec<StagedView<'_>> =
                    staged.regions.iter().map(|region| StagedView { region, data: &staged.data }).collect();
                let sources: Vec<&dyn PageSource> = views.iter().map(|v| v as &dyn PageSource).collect();
                f(&sources)
            }
        }
    }

    /// Bytes of guest memory, zero or not.
    pub fn total_size(&self) -> u64 {
        self.with_sources(|sources| sources.iter().map(|s| s.size() as u64).sum())
    }

    /// Calls `f` for every maximal run of non-zero pages and of zero pages, in guest address
    /// order, region by region; stops at the first error. Pages left to a parent are skipped.
    pub fn visit_runs<E>(
        &self,
        mut f: impl FnMut(Run<'_>) -> std::result::Result<(), E>,
    ) -> std::result::Result<(), E> {
        #[derive(PartialEq)]
        enum Kind {
            Zero,
            Parent,
            Data,
        }
        let kind = |page: Page<'_>| match page {
            Page::Zero => Kind::Zero,
            Page::Parent => Kind::Parent,
            Page::Data(_) => Kind::Data,
        };
        self.with_sources(|sources| {
            for &src in sources {
                let pages = src.size().div_ceil(PAGE);
                let mut p = 0;
                while p < pages {
                    let this = kind(src.page(p));
                    let end = (p + 1..pages).find(|&q| kind(src.page(q)) != this).unwrap_or(pages);
                    let guest_addr = src.guest_addr() + (p * PAGE) as u64;
                    match this {
                        Kind::Zero => f(Run::Zero { guest_addr, len: ((end - p) * PAGE) as u64 })?,
                        Kind::Data => f(Run::Data { guest_addr, bytes: src.run(p, end) })?,
                        Kind::Parent => {}
                    }
                    p = end;
                }
            }
            Ok(())
        })
    }

    /// Writes `self` into `file` (regions one after another), leaving zero pages as holes, and
    /// checksums every chunk on the way (from memory: reading the file back before it is flushed
    /// is slow), counting progress a chunk at a time. Memory read from the guest (`Sources`)
    /// must not change meanwhile: the guest stays paused.
    pub fn write_page_file(&self, file: &File, path: &std::path::Path, progress: &Progress) -> Result<MemoryLayout> {
        self.with_sources(|sources| write_regions(file, path, sources, progress))
    }
}

fn write_regions(
    file: &File,
    path: &std::path::Path,
    sources: &[&dyn PageSource],
    progress: &Progress,
) -> Result<MemoryLayout> {
    let total: u64 = sources.iter().map(|s| s.size() as u64).sum();
    file.set_len(total).map_err(io_err(path))?;
    let pages_per_chunk = (CHUNK_SIZE / PAGE_SIZE) as usize;
    let mut regions = Vec::with_capacity(sources.len());
    let mut chunk_checksums = Vec::new();
    let mut extents = Vec::new();
    let mut file_offset = 0u64;
    let mut writeback = Writeback::default();
    for &src in sources {
        // A run of non-zero pages waiting to be written: [first, end) page indices.
        let mut run: Option<(usize, usize)> = None;
        let flush = |run: &mut Option<(usize, usize)>| -> Result<()> {
            if let Some((first, end)) = run.take() {
                file.write_all_at(src.run(first, end), file_offset + (first * PAGE) as u64).map_err(io_err(path))?;
            }
            Ok(())
        };
        let page_count = src.size().div_ceil(PAGE);
        for first in (0..page_count).step_by(pages_per_chunk) {
            let mut hasher = Hasher::default();
            for p in first..(first + pages_per_chunk).min(page_count) {
                let addr = src.guest_addr() + (p * PAGE) as u64;
                match src.page(p) {
                    page @ (Page::Zero | Page::Parent) => {
                        let kind = if matches!(page, Page::Zero) { ExtentKind::Zero } else { ExtentKind::Parent };
                        push_extent(&mut extents, addr, PAGE_SIZE, kind);
                        hasher.update(&ZERO_PAGE[..PAGE.min(src.size() - p * PAGE)]);
                        flush(&mut run)?;
                    }
                    Page::Data(bytes) => {
                        push_extent(&mut extents, addr, PAGE_SIZE, ExtentKind::Data);
                        hasher.update(bytes);
                        run = Some((run.map_or(p, |(start, _)| start), p + 1));
                    }
                }
            }
            chunk_checksums.push(hasher.finish());
            // Written a chunk at a time, so progress says what is in the file.
            flush(&mut run)?;
            let chunk_end = file_offset + ((first + pages_per_chunk).min(page_count) * PAGE) as u64;
            writeback.advance(file, chunk_end);
            progress.advance((src.size() - first * PAGE).min(pages_per_chunk * PAGE) as u64)?;
        }
        regions.push(RegionLayout { guest_addr: src.guest_addr(), size: src.size() as u64, file_offset });
        file_offset += src.size() as u64;
    }
    Ok(MemoryLayout {
        page_size: PAGE_SIZE,
        chunk_size: CHUNK_SIZE,
        regions,
        extents,
        chunk_checksums,
        hot: Vec::new(),
    })
}

/// Starts the disk writing what was written to the page file, every `WRITEBACK_STEP` bytes,
/// without waiting for it: the final fsync then finds most of it done, and the disk works while
/// the rest is copied instead of after.
#[derive(Default)]
struct Writeback {
    started_to: u64,
}

const WRITEBACK_STEP: u64 = 32 << 20;

impl Writeback {
    fn advance(&mut self, file: &File, written_to: u64) {
        if written_to < self.started_to + WRITEBACK_STEP {
            return;
        }
        let (offset, len) = (self.started_to as libc::off64_t, (written_to - self.started_to) as libc::off64_t);
        // SAFETY: sync_file_range only starts writeback of a range of a descriptor we own; it
        // touches no memory of ours. A failure only means the fsync at commit does all the work.
        unsafe {
            libc::sync_file_range(std::os::fd::AsRawFd::as_raw_fd(file), offset, len, libc::SYNC_FILE_RANGE_WRITE)
        };
        self.started_to = written_to;
    }
}

/// Computes the checksum of every chunk of the page file, as `write_page_file` did.
pub fn checksum_pages(file: &File, path: &std::path::Path, layout: &MemoryLayout) -> Result<Vec<u64>> {
    let mut buf = vec![0u8; layout.chunk_size as usize];
    // A chunk that is a hole in the file reads as zeros: its checksum is that of zeros, without
    // reading it (most of a diff's page file, and of a sparse guest's).
    let mut zero_sums: Vec<(u64, u64)> = Vec::new();
    layout
        .chunks()
        .map(|(_, offset, len)| {
            let hole = match rustix::fs::seek(file, rustix::fs::SeekFrom::Data(offset)) {
                Ok(data) => data >= offset + len,
                Err(e) => e == rustix::io::Errno::NXIO,
            };
            if hole {
                if let Some(&(_, sum)) = zero_sums.iter().find(|(l, _)| *l == len) {
                    return Ok(sum);
                }
                let sum = crate::digest::checksum(&vec![0u8; len as usize]);
                zero_sums.push((len, sum));
                return Ok(sum);
            }
            let piece = &mut buf[..len as usize];
            file.read_exact_at(piece, offset).map_err(io_err(path))?;
            Ok(crate::digest::checksum(piece))
        })
        .collect()
}

/// Checks every chunk against the manifest; the error names the first bad chunk.
pub fn verify_pages(file: &File, path: &std::path::Path, layout: &MemoryLayout) -> Result<()> {
    let sums = checksum_pages(file, path, layout)?;
    for (i, ((guest_addr, _, _), (got, want))) in
        layout.chunks().zip(sums.iter().zip(&layout.chunk_checksums)).enumerate()
    {
        if got != want {
            return Err(Error::MemoryChecksum { chunk: i, guest_addr });
        }
    }
    verify_holes(file, path, layout)
}

/// Checks that what the extent map says is not data (zero, or the parent's) reads as zeros in the
/// page file: a data extent relabelled would otherwise resume as the file's bytes.
fn verify_holes(file: &File, path: &std::path::Path, layout: &MemoryLayout) -> Result<()> {
    let mut buf = vec![0u8; CHUNK_SIZE as usize];
    for e in layout.extents.iter().filter(|e| e.kind != ExtentKind::Data) {
        let Some(r) =
            layout.regions.iter().find(|r| e.guest_addr >= r.guest_addr && e.guest_addr < r.guest_addr + r.size)
        else {
            continue; // validate() guarantees one
        };
        let start = r.file_offset + e.guest_addr - r.guest_addr;
        // A hole all along (the usual case) needs no reading.
        match rustix::fs::seek(file, rustix::fs::SeekFrom::Data(start)) {
            Ok(data) if data >= start + e.len => continue,
            Err(e) if e == rustix::io::Errno::NXIO => continue,
            _ => {}
        }
        let mut done = 0;
        while done < e.len {
            let n = (e.len - done).min(CHUNK_SIZE);
            let piece = &mut buf[..n as usize];
            file.read_exact_at(piece, r.file_offset + e.guest_addr - r.guest_addr + done).map_err(io_err(path))?;
            if let Some(at) = piece.chunks(PAGE).position(|p| !is_zero(p)) {
                let guest_addr = e.guest_addr + done + (at * PAGE) as u64;
                return Err(Error::NotZero { guest_addr });
            }
            done += n;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn write_pages(file: &File, path: &std::path::Path, sources: &[MemorySource<'_>]) -> Result<MemoryLayout> {
        MemoryData::Sources(sources).write_page_file(file, path, &Progress::default())
    }

    fn write_staged(file: &File, path: &std::path::Path, staged: &StagedMemory) -> Result<MemoryLayout> {
        MemoryData::Staged(staged).write_page_file(file, path, &Progress::default())
    }

    /// A path in a scratch directory that lives as long as the test process (files are removed
    /// by each test).
    fn temp(name: &str) -> std::path::PathBuf {
        static DIR: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
        DIR.get_or_init(|| tempfile::Builder::new().prefix("snapshot-pages-").tempdir().unwrap()).path().join(name)
    }

    #[test]
    fn zero_pages_are_holes_and_data_round_trips() {
        let path = temp("holes");
        let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
        let mut low = vec![0u8; 4 << 20];
        low[5 * 4096 + 7] = 0xaa;
        low[(4 << 20) - 1] = 0x55;
        let high = vec![0x11u8; 8192];
        let sources = [
            MemorySource { guest_addr: 0, bytes: &low, kinds: None, backing: None },
            MemorySource { guest_addr: 1 << 32, bytes: &high, kinds: None, backing: None },
        ];
        let layout = write_pages(&file, &path, &sources).unwrap();
        layout.validate().unwrap();
        assert_eq!(checksum_pages(&file, &path, &layout).unwrap(), layout.chunk_checksums);
        assert_eq!(layout.zero_pages(), 1024 - 2);
        assert_eq!(layout.regions[1], RegionLayout { guest_addr: 1 << 32, size: 8192, file_offset: 4 << 20 });
        // Only the three non-zero pages take disk space.
        assert!(file.metadata().unwrap().blocks() * 512 <= 4 * 4096, "{} blocks", file.metadata().unwrap().blocks());
        let mut back = vec![0u8; low.len()];
        file.read_exact_at(&mut back, 0).unwrap();
        assert_eq!(back, low);
        verify_pages(&file, &path, &layout).unwrap();

        // A data page the extent map calls zero is caught.
        let mut relabelled = layout.clone();
        relabelled.extents = vec![
            Extent { guest_addr: 0, len: 4 << 20, kind: ExtentKind::Zero },
            relabelled.extents[relabelled.extents.len() - 1],
        ];
        match verify_pages(&file, &path, &relabelled) {
            Err(Error::NotZero { guest_addr: 0x5000 }) => {}
            other => panic!("{other:?}"),
        }

        file.write_all_at(&[1], (2 << 20) + 3).unwrap();
        match verify_pages(&file, &path, &layout) {
            Err(Error::MemoryChecksum { chunk: 2, guest_addr: 0x20_0000 }) => {}
            other => panic!("{other:?}"),
        }
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn pages_still_in_the_backing_file_are_read_from_it() {
        let back_path = temp("backing");
        let backing =
            std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&back_path).unwrap();
        backing.set_len(8 * 4096).unwrap();
        backing.write_all_at(&[0x11; 4096], 4096).unwrap(); // page 1: data; page 2: a hole
        backing.write_all_at(&[0x33; 4096], 3 * 4096).unwrap();
        // What the mapping would show; InFile pages must not be read from it.
        let mut mapping = vec![0xeeu8; 4 * 4096];
        mapping[..4096].fill(0x22);
        let kinds = vec![PageKind::Mapped, PageKind::InFile, PageKind::InFile, PageKind::InFile];
        let src = MemorySource { guest_addr: 0, bytes: &mapping, kinds: Some(kinds), backing: Some((&backing, 0)) };
        let mut staged = StagedMemory::with_capacity(16 * 4096).unwrap();
        assert!(staged.copy(&[src]));
        let out_path = temp("from-backing");
        let out =
            std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&out_path).unwrap();
        let layout = write_staged(&out, &out_path, &staged).unwrap();
        assert_eq!(layout.zero_pages(), 1);
        let mut back = vec![0u8; 4 * 4096];
        out.read_exact_at(&mut back, 0).unwrap();
        assert!(back[..4096].iter().all(|b| *b == 0x22));
        assert!(back[4096..8192].iter().all(|b| *b == 0x11));
        assert!(back[8192..12288].iter().all(|b| *b == 0));
        assert!(back[12288..].iter().all(|b| *b == 0x33));
        verify_pages(&out, &out_path, &layout).unwrap();
        std::fs::remove_file(&back_path).unwrap();
        std::fs::remove_file(&out_path).unwrap();
    }

    #[test]
    fn untouched_pages_are_not_read() {
        let path = temp("resident");
        let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
        let mem = vec![0xeeu8; 4 * 4096];
        // Pages 1 and 3 "never touched": saved as zero whatever the bytes say.
        let kinds = vec![PageKind::Mapped, PageKind::Zero, PageKind::Mapped, PageKind::Zero];
        let src = MemorySource { guest_addr: 0, bytes: &mem, kinds: Some(kinds), backing: None };
        let layout = write_pages(&file, &path, &[src]).unwrap();
        assert_eq!(layout.zero_pages(), 2);
        let mut back = vec![0u8; mem.len()];
        file.read_exact_at(&mut back, 0).unwrap();
        assert!(back[4096..8192].iter().all(|b| *b == 0) && back[..4096].iter().all(|b| *b == 0xee));
        verify_pages(&file, &path, &layout).unwrap();
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn staged_copy_writes_the_same_file() {
        let mut mem = vec![0u8; 3 << 20];
        for (i, b) in mem.iter_mut().enumerate().step_by(4096 * 3) {
            *b = (i / 4096) as u8 | 1;
        }
        let direct_path = temp("direct");
        let staged_path = temp("staged");
        let open = |p: &std::path::Path| {
            std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(p).unwrap()
        };
        let (direct_file, staged_file) = (open(&direct_path), open(&staged_path));
        let src = || [MemorySource { guest_addr: 0x10_0000, bytes: &mem, kinds: None, backing: None }];
        let direct = write_pages(&direct_file, &direct_path, &src()).unwrap();
        let mut small = StagedMemory::with_capacity(64 * 4096).unwrap();
        assert!(!small.copy(&src()), "a copy that does not fit must say so");
        let mut staged = StagedMemory::with_capacity(4 << 20).unwrap();
        assert!(staged.copy(&src()));
        // Every page of the mapping is copied; the zero ones are found when written.
        assert_eq!(staged.data.len(), mem.len());
        mem.iter_mut().for_each(|b| *b = 0xff); // the guest runs on: the copy must not care
        let layout = write_staged(&staged_file, &staged_path, &staged).unwrap();
        assert_eq!(layout, direct);
        assert_eq!(std::fs::read(&direct_path).unwrap(), std::fs::read(&staged_path).unwrap());
        std::fs::remove_file(&direct_path).unwrap();
        std::fs::remove_file(&staged_path).unwrap();
    }

    #[test]
    fn layout_validation() {
        let good = MemoryLayout {
            page_size: PAGE_SIZE,
            chunk_size: CHUNK_SIZE,
            regions: vec![RegionLayout { guest_addr: 0, size: CHUNK_SIZE * 2, file_offset: 0 }],
            extents: vec![Extent { guest_addr: 0, len: CHUNK_SIZE * 2, kind: ExtentKind::Data }],
            chunk_checksums: vec![0, 0],
            hot: Vec::new(),
        };
        good.validate().unwrap();
        let mut bad = good.clone();
        bad.chunk_checksums.pop();
        assert!(bad.validate().is_err());
        let mut bad = good.clone();
        bad.regions[0].file_offset = 4096;
        assert!(bad.validate().is_err());
        let mut bad = good.clone();
        bad.regions[0].size = 100;
        assert!(bad.validate().is_err());
        let mut bad = good.clone();
        bad.extents[0].len -= 4096;
        assert!(bad.validate().is_err(), "a gap at the end");
        bad.extents.push(Extent { guest_addr: CHUNK_SIZE * 2 - 4096, len: 8192, kind: ExtentKind::Zero });
        assert!(bad.validate().is_err(), "past the region");
        let mut bad = good;
        bad.extents[0].guest_addr = 4096;
        assert!(bad.validate().is_err());
    }
}
