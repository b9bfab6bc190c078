//! Chains of snapshots: a full snapshot at the base, then diffs, each holding only the pages
//! written since its parent and naming that parent by id (`Manifest::parent`). A chain is opened
//! from its newest layer; every link is checked (the parent found has the id its child names, and
//! describes the same machine), so a moved, replaced or damaged parent is named, never mixed in.
//! `merge` flattens consecutive layers into one.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::dir::{Snapshot, SnapshotWriter};
use crate::manifest::{Manifest, SnapshotId};
use crate::pages::{self, push_extent, ExtentKind, MemoryLayout};
use crate::progress::Progress;
use crate::{io_err, Error, Result};

/// Longest chain opened: far more layers than anyone keeps, and a bound on a loop of links.
pub const MAX_DEPTH: usize = 1024;

/// The layers of a chain, oldest (the full snapshot, or the first layer asked for) first.
pub struct Chain {
    pub layers: Vec<Snapshot>,
}

/// Where a diff's parent is: the directory its manifest records, else the directory of that name
/// beside the child (a tree of snapshots moved or copied as a whole).
fn parent_candidates(child: &Snapshot) -> Vec<PathBuf> {
    let Some(recorded) = child.manifest.parent_dir.as_deref().map(PathBuf::from) else { return Vec::new() };
    let mut out = vec![recorded.clone()];
    if let (Some(name), Some(beside)) = (recorded.file_name(), child.dir.parent()) {
        let sibling = beside.join(name);
        if sibling != recorded {
            out.push(sibling);
        }
    }
    out
}

/// Opens the parent of `child` (which has one), checked against the id the child names.
pub fn open_parent(child: &Snapshot) -> Result<Snapshot> {
    let id = child.manifest.parent.clone().expect("a diff");
    let candidates = parent_candidates(child);
    let missing = || Error::ParentMissing {
        child: child.dir.display().to_string(),
        parent: candidates.first().map_or_else(|| "(not recorded)".into(), |p| p.display().to_string()),
        id: id.clone(),
    };
    let mut mismatch = None;
    for dir in &candidates {
        match Snapshot::open(dir) {
            Ok(parent) if parent.id == id => {
                check_link(&parent, child)?;
                return Ok(parent);
            }
            Ok(parent) => {
                mismatch.get_or_insert(Error::ParentMismatch {
                    child: child.dir.display().to_string(),
                    parent: dir.display().to_string(),
                    expected: id.clone(),
                    found: parent.id,
                });
            }
            Err(Error::NotASnapshot(..)) => {}
            Err(e) => return Err(e),
        }
    }
    Err(mismatch.unwrap_or_else(missing))
}

/// A parent and its child must describe one machine: same memory layout, same vCPUs.
fn check_link(parent: &Snapshot, child: &Snapshot) -> Result<()> {
    let (p, c) = (&parent.manifest, &child.manifest);
    if p.memory.regions != c.memory.regions || p.vm.vcpus != c.vm.vcpus || p.vm.mem_bytes != c.vm.mem_bytes {
        return Err(Error::ChainMismatch(format!(
            "{} and its parent {} describe different machines",
            child.dir.display(),
            parent.dir.display()
        )));
    }
    Ok(())
}

impl Chain {
    /// Opens `dir` and every parent down to a full snapshot.
    pub fn open(dir: &Path) -> Result<Self> {
        let mut layers = vec![Snapshot::open(dir)?];
        while layers.last().expect("one").manifest.parent.is_some() {
            if layers.len() >= MAX_DEPTH {
                return Err(Error::ChainMismatch(format!("{} has more than {MAX_DEPTH} layers", dir.display())));
            }
            let parent = open_parent(layers.last().expect("one"))?;
            layers.push(parent);
        }
        layers.reverse();
        Ok(Self { layers })
    }

    /// Opens `dirs`, given oldest first, which must be consecutive layers of one chain (each the
    /// parent of the next). The first may itself have a parent: it is not opened.
    pub fn open_layers(dirs: &[PathBuf]) -> Result<Self> {
        let mut layers: Vec<Snapshot> = Vec::with_capacity(dirs.len());
        for dir in dirs {
            let snap = Snapshot::open(dir)?;
            if let Some(prev) = layers.last() {
                if snap.manifest.parent.as_ref() != Some(&prev.id) {
                    return Err(Error::ChainMismatch(format!(
                        "{} is not a diff of {} (give the layers oldest first)",
                        snap.dir.display(),
                        prev.dir.display()
                    )));
                }
                check_link(prev, &snap)?;
            }
            layers.push(snap);
        }
        Ok(Self { layers })
    }

    /// The newest layer: the machine the chain resumes to.
    pub fn top(&self) -> &Snapshot {
        self.layers.last().expect("a chain has a layer")
    }

    /// The oldest layer.
    pub fn base(&self) -> &Snapshot {
        &self.layers[0]
    }

    /// Checks every layer (state, memory checksums, disk copies); links were checked on opening.
    pub fn verify(&self) -> Result<()> {
        self.layers.iter().try_for_each(|l| l.verify().map_err(|e| in_layer(self, l, e)))
    }

    /// Checks every layer's memory against its checksums (`Snapshot::verify_memory`).
    pub fn verify_memory(&self) -> Result<()> {
        self.layers.iter().try_for_each(|l| l.verify_memory().map_err(|e| in_layer(self, l, e)))
    }

    /// For every page of guest memory, the index of the newest layer that holds it (data or
    /// zero), or None where every layer leaves it to a parent outside the chain.
    fn owners(&self) -> Vec<Option<(u16, ExtentKind)>> {
        let layout = &self.top().manifest.memory;
        let mut owners = vec![None; layout.total_pages() as usize];
        for (index, layer) in self.layers.iter().enumerate() {
            for e in layer.manifest.memory.extents.iter().filter(|e| e.kind != ExtentKind::Parent) {
                let first = page_index(layout, e.guest_addr);
                owners[first..first + (e.len / layout.page_size) as usize].fill(Some((index as u16, e.kind)));
            }
        }
        owners
    }

    /// The guest memory of every layer above the oldest, oldest first, as (guest address, layer,
    /// kind) runs of data or zero pages: what must be laid over the oldest layer's memory to get
    /// the newest one's. Pages a later layer overwrites are left out.
    pub fn overlays(&self) -> Vec<Overlay> {
        if self.layers.len() == 1 {
            return Vec::new();
        }
        let layout = &self.top().manifest.memory;
        let mut out: Vec<Overlay> = Vec::new();
        let owners = self.owners();
        for r in &layout.regions {
            let first = page_index(layout, r.guest_addr);
            let pages = &owners[first..first + (r.size / layout.page_size) as usize];
            for (p, owner) in pages.iter().enumerate() {
                let Some((layer, kind)) = owner.filter(|(layer, _)| *layer > 0) else { continue };
                let guest_addr = r.guest_addr + p as u64 * layout.page_size;
                match out.last_mut() {
                    Some(o) if o.layer == layer as usize && o.kind == kind && o.guest_addr + o.len == guest_addr => {
                        o.len += layout.page_size
                    }
                    _ => out.push(Overlay { guest_addr, len: layout.page_size, layer: layer as usize, kind }),
                }
            }
        }
        out
    }
}

/// Guest memory as a chain's newest layer holds it, read from the layers' page files
/// (`Chain::reader`), by guest address or by checksum chunk.
pub struct ChainReader<'a> {
    chain: &'a Chain,
    files: Vec<File>,
    /// Per page (see `Chain::owners`): the newest layer that holds it, if any. Not built for a
    /// chain of one layer (a full snapshot: every page is its own, per its extents), where it
    /// would cost milliseconds before the first read.
    owners: Option<Vec<Option<(u16, ExtentKind)>>>,
    /// The layout's chunks (`MemoryLayout::chunks`).
    chunks: Vec<(u64, u64, u64)>,
}

impl Chain {
    /// Opens every layer's page file for reading guest memory as the newest layer holds it.
    pub fn reader(&self) -> Result<ChainReader<'_>> {
        let files = self
            .layers
            .iter()
            .map(|l| File::open(l.memory_path()).map_err(io_err(&l.memory_path())))
            .collect::<Result<_>>()?;
        let chunks = self.top().manifest.memory.chunks().collect();
        let owners = (self.layers.len() > 1).then(|| self.owners());
        Ok(ChainReader { chain: self, files, owners, chunks })
    }
}

impl ChainReader<'_> {
    /// The owners (see `owners`) of `pages` pages from `guest_addr`.
    fn owners_of(&self, guest_addr: u64, pages: usize) -> std::borrow::Cow<'_, [Option<(u16, ExtentKind)>]> {
        let layout = &self.chain.top().manifest.memory;
        match &self.owners {
            Some(owners) => {
                let first = page_index(layout, guest_addr);
                std::borrow::Cow::Borrowed(&owners[first..first + pages])
            }
            None => std::borrow::Cow::Owned(
                layout.kinds_of(guest_addr, pages as u64).into_iter().map(|k| Some((0, k))).collect(),
            ),
        }
    }

    /// Reads the guest memory at `guest_addr` into `buf`; both page aligned, and the range
    /// inside one region of the layout. Each run of pages one layer gives is one read.
    pub fn read(&self, guest_addr: u64, buf: &mut [u8]) -> Result<()> {
        let layout = &self.chain.top().manifest.memory;
        let page = layout.page_size as usize;
        let pages = buf.len() / page;
        let owners = self.owners_of(guest_addr, pages);
        // Where page i comes from: a layer's file (the oldest's when no layer says), or zeros.
        let source = |i: usize| match owners[i] {
            Some((_, ExtentKind::Zero)) => None,
            Some((layer, _)) => Some(layer as usize),
            None => Some(0),
        };
        let mut i = 0;
        while i < pages {
            let from = source(i);
            let end = (i + 1..pages).find(|&j| source(j) != from).unwrap_or(pages);
            let piece = &mut buf[i * page..end * page];
            match from {
                Some(layer) => {
                    read_memory(&self.chain.layers[layer], &self.files[layer], guest_addr + (i * page) as u64, piece)?
                }
                None => piece.fill(0),
            }
            i = end;
        }
        Ok(())
    }

    /// The chunks guest memory is read in: (guest address, page file offset, bytes), in the
    /// order of every layer's `chunk_checksums`.
    pub fn chunks(&self) -> &[(u64, u64, u64)] {
        &self.chunks
    }

    /// Whether any page of chunk `chunk` holds data (else it is all zero).
    pub fn chunk_has_data(&self, chunk: usize) -> bool {
        let layout = &self.chain.top().manifest.memory;
        let (guest_addr, _, len) = self.chunks[chunk];
        if self.owners.is_none() {
            return layout.any_nonzero(guest_addr, len);
        }
        self.owners_of(guest_addr, (len / layout.page_size) as usize)
            .iter()
            .any(|o| !matches!(o, Some((_, ExtentKind::Zero))))
    }

    /// The one layer whose page file holds chunk `chunk` exactly as the chain gives it, and its
    /// file: every page of the chunk is that layer's data, or (the oldest layer's) zero, which
    /// its file holds as a hole. None when the chunk takes pages from several layers.
    pub fn chunk_source(&self, chunk: usize) -> Option<(usize, &File)> {
        let layout = &self.chain.top().manifest.memory;
        let (guest_addr, _, len) = self.chunks[chunk];
        if self.owners.is_none() {
            return Some((0, &self.files[0]));
        }
        let owners = self.owners_of(guest_addr, (len / layout.page_size) as usize);
        let layer = owners.first()?.map_or(0, |(l, _)| l as usize);
        owners
            .iter()
            .all(|o| match o {
                Some((l, kind)) => *l as usize == layer && (layer == 0 || *kind == ExtentKind::Data),
                None => layer == 0,
            })
            .then(|| (layer, &self.files[layer]))
    }

    /// Reads chunk `chunk` of guest memory into `buf` (at least the chunk's length). With
    /// `verify`, every layer it takes pages from is checked first against its checksum of the
    /// chunk, computed over what that layer gives (its data pages; zeros elsewhere): nothing
    /// unchecked is returned.
    pub fn read_chunk(&self, chunk: usize, buf: &mut [u8], verify: bool) -> Result<()> {
        let layout = &self.chain.top().manifest.memory;
        let (guest_addr, offset, len) = self.chunks[chunk];
        let buf = &mut buf[..len as usize];
        if !verify {
            return self.read(guest_addr, buf);
        }
        let page = layout.page_size as usize;
        let owners = self.owners_of(guest_addr, len as usize / page);
        let mut layers: Vec<usize> = owners
            .iter()
            .map(|o| match o {
                Some((l, _)) => *l as usize,
                None => 0,
            })
            .collect();
        layers.sort_unstable();
        layers.dedup();
        let mut layer_buf = vec![0u8; len as usize];
        for l in layers {
            let snap = &self.chain.layers[l];
            // What the layer gives: its data pages; zeros where its map says zero or parent.
            let kinds = snap.manifest.memory.kinds_of(guest_addr, len / layout.page_size);
            if kinds.contains(&ExtentKind::Data) {
                self.files[l].read_exact_at(&mut layer_buf, offset).map_err(io_err(&snap.memory_path()))?;
                for (p, kind) in kinds.iter().enumerate() {
                    if *kind != ExtentKind::Data {
                        layer_buf[p * page..(p + 1) * page].fill(0);
                    }
                }
            } else {
                layer_buf.fill(0);
            }
            let want = snap.manifest.memory.chunk_checksums.get(chunk).copied();
            if want != Some(crate::digest::checksum(&layer_buf)) {
                return Err(in_layer(self.chain, snap, Error::MemoryChecksum { chunk, guest_addr }));
            }
            for (p, owner) in owners.iter().enumerate() {
                if owner.map_or(0, |(o, _)| o as usize) == l {
                    let bytes = &mut buf[p * page..(p + 1) * page];
                    match owner {
                        Some((_, ExtentKind::Zero)) => bytes.fill(0),
                        _ => bytes.copy_from_slice(&layer_buf[p * page..(p + 1) * page]),
                    }
                }
            }
        }
        Ok(())
    }
}

/// `err`, found in `layer`, naming the layer when the chain has several (a host's I/O error
/// names its file already).
fn in_layer(chain: &Chain, layer: &Snapshot, err: Error) -> Error {
    match err {
        Error::Io { .. } => err,
        err if chain.layers.len() > 1 => Error::Layer { dir: layer.dir.display().to_string(), err: Box::new(err) },
        err => err,
    }
}

/// A run of pages one layer of a chain gives: data (read it from that layer's page file) or zeros.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Overlay {
    pub guest_addr: u64,
    /// Bytes.
    pub len: u64,
    pub layer: usize,
    pub kind: ExtentKind,
}

/// Index of the page at `guest_addr` counting every region's pages in order.
fn page_index(layout: &MemoryLayout, guest_addr: u64) -> usize {
    let r = layout
        .regions
        .iter()
        .find(|r| guest_addr >= r.guest_addr && guest_addr < r.guest_addr + r.size)
        .expect("validated extents lie in regions");
    ((r.file_offset + guest_addr - r.guest_addr) / layout.page_size) as usize
}

/// Offset in the page file of guest memory at `guest_addr`.
pub fn file_offset(layout: &MemoryLayout, guest_addr: u64) -> u64 {
    page_index(layout, guest_addr) as u64 * layout.page_size + guest_addr % layout.page_size
}

/// Reads `buf.len()` bytes of a snapshot's page file holding guest memory at `guest_addr`.
pub fn read_memory(snap: &Snapshot, file: &File, guest_addr: u64, buf: &mut [u8]) -> Result<()> {
    let path = snap.memory_path();
    file.read_exact_at(buf, file_offset(&snap.manifest.memory, guest_addr)).map_err(io_err(&path))
}

/// Writes disk `index` as the newest of `layers` holds it into `dst`, an empty file: the newest
/// whole copy, then the ranges each later layer holds over it. Returns the ranges written when
/// no layer holds a whole copy (the result is itself a diff's), None otherwise.
pub fn build_disk(layers: &[Snapshot], index: usize, dst: &File, dst_path: &Path) -> Result<Option<Vec<(u64, u64)>>> {
    let top = layers.last().expect("a layer");
    let size = disk_copy_of(top, index).map(|c| c.size).unwrap_or(0);
    let whole = newest_whole_copy(layers, index);
    let first = match whole {
        Some(i) => {
            let src = open_disk_copy(&layers[i], index)?;
            crate::dir::copy_sparse(&src, dst).map_err(io_err(dst_path))?;
            i + 1
        }
        None => {
            dst.set_len(size).map_err(io_err(dst_path))?;
            0
        }
    };
    let written = apply_disk_ranges(&layers[first..], index, size, dst, dst_path)?;
    Ok(whole.is_none().then_some(written))
}

/// Like `build_disk`, but only where the newest whole copy can be shared rather than copied (a
/// reflink, `FICLONE`: XFS, btrfs): then `dst` (of the disk's size) gets it, and the ranges of the
/// later layers over it, and the result is true. False, with `dst` untouched, where the file
/// system cannot share it or no layer holds a whole copy: making `dst` would then cost a copy of
/// all the disk's data. A snapshot that copies only the chunks written since `layers` uses this.
pub fn clone_disk(layers: &[Snapshot], index: usize, dst: &File, dst_path: &Path) -> Result<bool> {
    let Some(whole) = newest_whole_copy(layers, index) else { return Ok(false) };
    let size = disk_copy_of(&layers[whole], index).expect("a whole copy").size;
    let src = open_disk_copy(&layers[whole], index)?;
    if rustix::fs::ioctl_ficlone(dst, &src).is_err() {
        return Ok(false);
    }
    apply_disk_ranges(&layers[whole + 1..], index, size, dst, dst_path)?;
    Ok(true)
}

fn disk_copy_of(layer: &Snapshot, index: usize) -> Option<crate::manifest::DiskCopy> {
    layer.manifest.vm.disks.get(index).and_then(|d| d.copy.clone())
}

/// The newest layer holding a whole copy of disk `index` (a full snapshot's, not a diff's ranges).
fn newest_whole_copy(layers: &[Snapshot], index: usize) -> Option<usize> {
    layers.iter().rposition(|l| disk_copy_of(l, index).is_some_and(|c| c.ranges.is_none()))
}

fn open_disk_copy(layer: &Snapshot, index: usize) -> Result<File> {
    let copy = disk_copy_of(layer, index).expect("a copy");
    let path = layer.check_disk_copy(&copy)?;
    File::open(&path).map_err(io_err(&path))
}

/// Writes the ranges of disk `index` each of `layers` holds (all diffs of it, `size` bytes) over
/// `dst`, oldest first; zeros are punched, not written. Returns the ranges written, merged.
fn apply_disk_ranges(
    layers: &[Snapshot],
    index: usize,
    size: u64,
    dst: &File,
    dst_path: &Path,
) -> Result<Vec<(u64, u64)>> {
    let mut written: Vec<(u64, u64)> = Vec::new();
    let mut buf = vec![0u8; 1 << 20];
    for layer in layers {
        let copy = disk_copy_of(layer, index).ok_or_else(|| {
            Error::ChainMismatch(format!("{} holds no copy of disk {index}, its parent does", layer.dir.display()))
        })?;
        if copy.size != size {
            return Err(Error::ChainMismatch(format!("disk {index} changed size in {}", layer.dir.display())));
        }
        let path = layer.check_disk_copy(&copy)?;
        let src = File::open(&path).map_err(io_err(&path))?;
        for &(start, end) in copy.ranges.as_deref().unwrap_or_default() {
            let mut at = start;
            while at < end {
                let n = (end - at).min(buf.len() as u64) as usize;
                src.read_exact_at(&mut buf[..n], at).map_err(io_err(&path))?;
                let punched = buf[..n].iter().all(|&b| b == 0)
                    && rustix::fs::fallocate(
                        dst,
                        rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE,
                        at,
                        n as u64,
                    )
                    .is_ok();
                if !punched {
                    dst.write_all_at(&buf[..n], at).map_err(io_err(dst_path))?;
                }
                at += n as u64;
            }
            written.push((start, end));
        }
    }
    written.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for r in written {
        match merged.last_mut() {
            Some(last) if r.0 <= last.1 => last.1 = last.1.max(r.1),
            _ => merged.push(r),
        }
    }
    Ok(merged)
}

/// Writes the layers of `chain` as one snapshot at `dest`: the newest layer's machine, with every
/// page the newest layer holding it gives. If the oldest layer is a diff, so is the result, of
/// the same parent; otherwise it is a full snapshot. Disk copies are merged the same way.
/// Returns the new snapshot's id.
pub fn merge(chain: &Chain, dest: &Path, force: bool, progress: &Progress) -> Result<SnapshotId> {
    if chain.layers.iter().any(|l| same_dir(&l.dir, dest)) {
        return Err(Error::ChainMismatch(format!(
            "{} is a layer being merged: write the result elsewhere",
            dest.display()
        )));
    }
    // Nor one the layers depend on.
    if chain.base().manifest.parent.is_some() {
        if let Ok(below) = Chain::open(&chain.base().dir) {
            if below.layers.iter().any(|l| same_dir(&l.dir, dest)) {
                return Err(Error::ChainMismatch(format!(
                    "{} is a parent of the layers being merged: replacing it would break them; write the result elsewhere",
                    dest.display()
                )));
            }
        }
    }
    // What is merged gets fresh checksums: damage in a layer must be found now, or never.
    chain.verify_memory()?;
    let top = chain.top();
    let layout = &top.manifest.memory;
    let mut writer = SnapshotWriter::create(dest, force)?;
    let mut disks = top.manifest.vm.disks.clone();
    for (index, disk) in disks.iter_mut().enumerate() {
        let Some(copy) = disk.copy.as_mut() else { continue };
        // Checked before it names a file of the new snapshot.
        top.check_disk_copy(copy)?;
        let file = writer.create_disk_copy(&copy.file, 0)?;
        copy.ranges = build_disk(&chain.layers, index, &file, &dest.join(&copy.file))?;
    }
    let state = top.read_state()?;
    let mut digest = writer.write_state(&state)?;
    digest.sections = top.manifest.state.sections.clone();
    let (out, out_path) = writer.create_memory_file()?;
    out.set_len(layout.total_size()).map_err(io_err(&out_path))?;
    progress.set_total(layout.total_size());
    let files: Vec<File> = chain
        .layers
        .iter()
        .map(|l| File::open(l.memory_path()).map_err(io_err(&l.memory_path())))
        .collect::<Result<_>>()?;
    let owners = chain.owners();
    let mut extents = Vec::new();
    let mut buf = vec![0u8; pages::CHUNK_SIZE as usize];
    let page = layout.page_size;
    for r in &layout.regions {
        let first = page_index(layout, r.guest_addr);
        let pages_in = (r.size / page) as usize;
        let mut p = 0;
        while p < pages_in {
            let owner = owners[first + p];
            // A run of pages with one owner, at most a chunk.
            let end = (p + 1..pages_in.min(p + buf.len() / page as usize))
                .find(|&q| owners[first + q] != owner)
                .unwrap_or(pages_in.min(p + buf.len() / page as usize));
            let guest_addr = r.guest_addr + p as u64 * page;
            let len = (end - p) as u64 * page;
            match owner {
                Some((layer, ExtentKind::Data)) => {
                    let piece = &mut buf[..len as usize];
                    read_memory(&chain.layers[layer as usize], &files[layer as usize], guest_addr, piece)?;
                    out.write_all_at(piece, r.file_offset + guest_addr - r.guest_addr).map_err(io_err(&out_path))?;
                    push_extent(&mut extents, guest_addr, len, ExtentKind::Data);
                }
                Some(_) => push_extent(&mut extents, guest_addr, len, ExtentKind::Zero),
                None => push_extent(&mut extents, guest_addr, len, ExtentKind::Parent),
            }
            progress.advance(len)?;
            p = end;
        }
    }
    let mut memory = MemoryLayout { extents, chunk_checksums: Vec::new(), ..layout.clone() };
    memory.chunk_checksums = pages::checksum_pages(&out, &out_path, &memory)?;
    let base = chain.base();
    let manifest = Manifest {
        parent: base.manifest.parent.clone(),
        parent_dir: base.manifest.parent_dir.clone(),
        state: digest,
        memory,
        vm: crate::manifest::VmDescription { disks, ..top.manifest.vm.clone() },
        ..top.manifest.clone()
    };
    writer.commit(&manifest).map(|(_, id)| id)
}

fn same_dir(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::tests::sample;
    use crate::pages::{MemoryData, MemorySource, PageKind};

    const MEM: usize = 2 << 20;

    /// Writes a snapshot of `mem` at `dest`: a diff of `parent` (pages outside `dirty`, page
    /// indices, left to it) or a full one.
    fn write(dest: &Path, mem: &[u8], parent: Option<&Snapshot>, dirty: &[usize]) -> Snapshot {
        let w = SnapshotWriter::create(dest, false).unwrap();
        let mut m = sample();
        m.state = w.write_state(b"state").unwrap();
        let kinds = parent.map(|_| {
            (0..MEM / 4096).map(|p| if dirty.contains(&p) { PageKind::Mapped } else { PageKind::Parent }).collect()
        });
        let sources = [MemorySource { guest_addr: 0, bytes: mem, kinds, backing: None }];
        m.memory = w.write_memory(MemoryData::Sources(&sources), &Progress::default()).unwrap();
        if let Some(p) = parent {
            m.parent = Some(p.id.clone());
            m.parent_dir = Some(p.dir.display().to_string());
        }
        w.commit(&m).unwrap();
        Snapshot::open(dest).unwrap()
    }

    fn memory_of(snap: &Snapshot) -> Vec<u8> {
        std::fs::read(snap.memory_path()).unwrap()
    }

    #[test]
    fn a_chain_merges_to_its_newest_memory_and_finds_moved_parents() {
        let dir = tempfile::Builder::new().prefix("snapshot-chain-").tempdir().unwrap();
        let mut mem = vec![0u8; MEM];
        mem[..4096 * 3].fill(1);
        let base = write(&dir.path().join("base"), &mem, None, &[]);
        // A chain of one layer reads the same, whole, by chunk, checked or not.
        let alone = Chain::open(&base.dir).unwrap();
        let reader = alone.reader().unwrap();
        for verify in [false, true] {
            let mut read = vec![0xaau8; MEM];
            for (i, &(addr, _, len)) in reader.chunks().iter().enumerate() {
                reader.read_chunk(i, &mut read[addr as usize..(addr + len) as usize], verify).unwrap();
                assert_eq!(reader.chunk_source(i).map(|(l, _)| l), Some(0));
            }
            assert!(read == mem);
        }
        assert!(reader.chunk_has_data(0) && !reader.chunk_has_data(1));
        // Layer 1 rewrites page 1 and zeroes page 2; layer 2 rewrites page 1 again and page 5.
        mem[4096..8192].fill(2);
        mem[8192..12288].fill(0);
        let d1 = write(&dir.path().join("d1"), &mem, Some(&base), &[1, 2]);
        mem[4096..8192].fill(3);
        mem[5 * 4096..6 * 4096].fill(5);
        let d2 = write(&dir.path().join("d2"), &mem, Some(&d1), &[1, 5]);
        assert_eq!(d2.manifest.memory.parent_pages(), (MEM / 4096 - 2) as u64);

        let chain = Chain::open(&d2.dir).unwrap();
        assert_eq!(chain.layers.len(), 3);
        let overlays = chain.overlays();
        let page = |addr: u64, layer: usize, kind| Overlay { guest_addr: addr, len: 4096, layer, kind };
        assert_eq!(
            overlays,
            vec![page(4096, 2, ExtentKind::Data), page(8192, 1, ExtentKind::Zero), page(5 * 4096, 2, ExtentKind::Data)]
        );
        // Read through the chain, whole or in runs that cross layers: the newest memory.
        let reader = chain.reader().unwrap();
        let mut read = vec![0xaau8; MEM];
        reader.read(0, &mut read).unwrap();
        assert!(read == mem, "the chain reads other than its newest layer's memory");
        let mut piece = vec![0xaau8; 3 * 4096];
        reader.read(4096, &mut piece).unwrap();
        assert!(piece == mem[4096..4 * 4096]);
        // By chunk, checked against each layer's checksums or not: the same.
        for verify in [false, true] {
            let mut by_chunk = vec![0xaau8; MEM];
            for (i, &(addr, _, len)) in reader.chunks().iter().enumerate() {
                reader.read_chunk(i, &mut by_chunk[addr as usize..(addr + len) as usize], verify).unwrap();
            }
            assert!(by_chunk == mem, "chunks read (verify: {verify}) are not the newest memory");
        }
        assert!(reader.chunk_has_data(0) && !reader.chunk_has_data(1));
        // Chunk 0 takes pages from all three layers; chunk 1 only from the base (zeros).
        assert!(reader.chunk_source(0).is_none());
        assert_eq!(reader.chunk_source(1).map(|(l, _)| l), Some(0));
        // A byte of a layer's data changed: its chunk fails its check, and only with verify.
        let f = std::fs::OpenOptions::new().write(true).open(d2.memory_path()).unwrap();
        f.write_all_at(&[9], 5 * 4096 + 7).unwrap();
        let mut chunk = vec![0u8; 1 << 20];
        let damaged = |r: Result<()>| match r {
            Err(Error::Layer { dir, err }) => {
                dir == d2.dir.display().to_string() && matches!(*err, Error::MemoryChecksum { chunk: 0, .. })
            }
            _ => false,
        };
        assert!(damaged(reader.read_chunk(0, &mut chunk, true)));
        // Nor does a merge carry the damage into a snapshot with fresh checksums.
        assert!(damaged(merge(&chain, &dir.path().join("bad"), false, &Progress::default()).map(|_| ())));
        assert!(!dir.path().join("bad").exists());
        reader.read_chunk(0, &mut chunk, false).unwrap();
        assert_eq!(chunk[5 * 4096 + 7], 9);
        f.write_all_at(&[5], 5 * 4096 + 7).unwrap();
        let full = dir.path().join("full");
        merge(&chain, &full, false, &Progress::default()).unwrap();
        let merged = Snapshot::open(&full).unwrap();
        merged.verify().unwrap();
        assert!(merged.manifest.parent.is_none());
        assert!(memory_of(&merged) == mem, "the merge is not the newest layer's memory");
        // Two layers merged into one diff of the base.
        let one = dir.path().join("one");
        merge(&Chain::open_layers(&[d1.dir.clone(), d2.dir.clone()]).unwrap(), &one, false, &Progress::default())
            .unwrap();
        let one = Chain::open(&one).unwrap();
        assert_eq!(one.layers.len(), 2);
        assert_eq!(one.top().manifest.parent.as_ref(), Some(&base.id));
        // Layers out of order are refused; so is writing over a layer.
        assert!(matches!(Chain::open_layers(&[d2.dir.clone(), d1.dir.clone()]), Err(Error::ChainMismatch(_))));
        assert!(matches!(merge(&chain, &d1.dir, true, &Progress::default()), Err(Error::ChainMismatch(_))));
        // Nor over a parent the layers merged depend on.
        let upper = Chain::open_layers(std::slice::from_ref(&d2.dir)).unwrap();
        assert!(matches!(merge(&upper, &base.dir, true, &Progress::default()), Err(Error::ChainMismatch(_))));
        Snapshot::open(&base.dir).unwrap().verify().unwrap();

        // The whole tree moved: parents are found beside their children.
        let moved = dir.path().join("moved");
        std::fs::create_dir(&moved).unwrap();
        for name in ["base", "d1", "d2"] {
            std::fs::rename(dir.path().join(name), moved.join(name)).unwrap();
        }
        assert_eq!(Chain::open(&moved.join("d2")).unwrap().layers.len(), 3);
        // A missing parent is named; a replaced one too.
        std::fs::rename(moved.join("d1"), moved.join("gone")).unwrap();
        assert!(matches!(Chain::open(&moved.join("d2")), Err(Error::ParentMissing { .. })));
        write(&moved.join("d1"), &mem, None, &[]);
        assert!(matches!(Chain::open(&moved.join("d2")), Err(Error::ParentMismatch { .. })));
    }
}
