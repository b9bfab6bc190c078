//! A page file written in place, page runs at a time, while the guest still runs: the pre-copy
//! rounds of a live snapshot write guest memory, then the pages dirtied meanwhile, again and
//! again, and the last few pages are copied while the guest is paused. A page written twice is
//! simply overwritten; a page that became zero is punched out. `finish` then reads the file back
//! once to build the extent map and the chunk checksums: what the file holds is by then exactly
//! the memory at the pause.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::pages::{
    self, is_zero, push_extent, ExtentKind, MemoryData, MemoryLayout, RegionLayout, Run, StagedMemory, PAGE_SIZE,
};
use crate::progress::Progress;
use crate::{io_err, Result};

const PAGE: usize = PAGE_SIZE as usize;

pub struct LivePageFile {
    file: File,
    path: PathBuf,
    regions: Vec<RegionLayout>,
    /// One flag a page (all regions, in order): written by some round.
    written: Vec<bool>,
}

impl LivePageFile {
    /// A page file of `regions` (guest address and size each), `path` naming it in errors.
    pub fn new(file: File, path: &Path, regions: &[(u64, u64)]) -> Result<Self> {
        let mut offset = 0;
        let regions: Vec<RegionLayout> = regions
            .iter()
            .map(|&(guest_addr, size)| {
                let r = RegionLayout { guest_addr, size, file_offset: offset };
                offset += size;
                r
            })
            .collect();
        file.set_len(offset).map_err(io_err(path))?;
        Ok(Self { file, path: path.to_path_buf(), regions, written: vec![false; (offset / PAGE_SIZE) as usize] })
    }

    /// Offset in the file of guest address `guest_addr`, if guest memory.
    fn offset(&self, guest_addr: u64) -> Option<u64> {
        self.regions
            .iter()
            .find(|r| guest_addr >= r.guest_addr && guest_addr < r.guest_addr + r.size)
            .map(|r| r.file_offset + guest_addr - r.guest_addr)
    }

    /// Writes the page-aligned run `bytes` of guest memory at `guest_addr` (inside one region):
    /// its non-zero pages as data, its zero pages as holes.
    pub fn write(&mut self, guest_addr: u64, bytes: &[u8]) -> Result<()> {
        let Some(start) = self.offset(guest_addr) else { return Ok(()) };
        let pages = bytes.len() / PAGE;
        let mut p = 0;
        while p < pages {
            let zero = is_zero(&bytes[p * PAGE..(p + 1) * PAGE]);
            let end = (p + 1..pages).find(|&q| is_zero(&bytes[q * PAGE..(q + 1) * PAGE]) != zero).unwrap_or(pages);
            let at = start + (p * PAGE) as u64;
            if zero {
                self.zero_at(at, ((end - p) * PAGE) as u64)?;
            } else {
                self.file.write_all_at(&bytes[p * PAGE..end * PAGE], at).map_err(io_err(&self.path))?;
                self.mark(at, ((end - p) * PAGE) as u64);
            }
            p = end;
        }
        Ok(())
    }

    /// Makes `len` bytes of guest memory at `guest_addr` zero.
    pub fn write_zero(&mut self, guest_addr: u64, len: u64) -> Result<()> {
        match self.offset(guest_addr) {
            Some(at) => self.zero_at(at, len),
            None => Ok(()),
        }
    }

    fn zero_at(&mut self, at: u64, len: u64) -> Result<()> {
        let (first, count) = ((at / PAGE_SIZE) as usize, (len / PAGE_SIZE) as usize);
        // Only where something was written before: the rest is a hole already.
        if self.written[first..first + count].contains(&true) {
            rustix::fs::fallocate(
                &self.file,
                rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE,
                at,
                len,
            )
            .map_err(|e| crate::Error::Io { path: self.path.display().to_string(), err: e.into() })?;
        }
        self.mark(at, len);
        Ok(())
    }

    fn mark(&mut self, at: u64, len: u64) {
        let first = (at / PAGE_SIZE) as usize;
        self.written[first..first + (len / PAGE_SIZE) as usize].fill(true);
    }

    /// Writes the pages `staged` holds (copied while the guest was paused); pages it leaves to a
    /// parent are not touched.
    pub fn write_staged(&mut self, staged: &StagedMemory) -> Result<()> {
        MemoryData::Staged(staged).visit_runs(|run| match run {
            Run::Data { guest_addr, bytes } => self.write(guest_addr, bytes),
            Run::Zero { guest_addr, len } => self.write_zero(guest_addr, len),
        })
    }

    /// Reads the file back into its extent map and chunk checksums. Pages no round wrote are
    /// the parent's (`diff`) or zero.
    pub fn finish(self, diff: bool, progress: &Progress) -> Result<MemoryLayout> {
        let mut extents = Vec::new();
        let mut buf = vec![0u8; pages::CHUNK_SIZE as usize];
        let mut chunk_checksums = Vec::new();
        // Most chunks of a large guest are holes: their (full-size) checksum is computed once.
        let zeros = vec![0u8; pages::CHUNK_SIZE as usize];
        let zero_chunk = crate::digest::checksum(&zeros);
        for r in &self.regions {
            let mut done = 0;
            while done < r.size {
                let n = (r.size - done).min(pages::CHUNK_SIZE) as usize;
                let at = r.file_offset + done;
                let piece = &mut buf[..n];
                // A chunk in a hole of the file (most of a large guest's) is zeros: not read.
                let hole = match rustix::fs::seek(&self.file, rustix::fs::SeekFrom::Data(at)) {
                    Ok(data) => data >= at + n as u64,
                    Err(e) => e == rustix::io::Errno::NXIO,
                };
                if hole {
                    let full = n as u64 == pages::CHUNK_SIZE;
                    let sum = if full { zero_chunk } else { crate::digest::checksum(&zeros[..n]) };
                    chunk_checksums.push(sum);
                } else {
                    self.file.read_exact_at(piece, at).map_err(io_err(&self.path))?;
                    chunk_checksums.push(crate::digest::checksum(piece));
                }
                for (i, page) in piece.chunks(PAGE).enumerate() {
                    let index = ((r.file_offset + done) / PAGE_SIZE) as usize + i;
                    // A hole's pages are zero: not scanned.
                    let kind = match (self.written[index], hole || is_zero(page)) {
                        (false, _) if diff => ExtentKind::Parent,
                        (_, true) => ExtentKind::Zero,
                        (_, false) => ExtentKind::Data,
                    };
                    push_extent(&mut extents, r.guest_addr + done + (i * PAGE) as u64, PAGE_SIZE, kind);
                }
                progress.advance(0)?;
                done += n as u64;
            }
        }
        Ok(MemoryLayout {
            page_size: PAGE_SIZE,
            chunk_size: pages::CHUNK_SIZE,
            regions: self.regions,
            extents,
            chunk_checksums,
            hot: Vec::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_written_again_and_zeroed_end_as_the_last_write_says() {
        let dir = tempfile::Builder::new().prefix("snapshot-live-").tempdir().unwrap();
        let path = dir.path().join("pages");
        let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
        let mut live =
            LivePageFile::new(file.try_clone().unwrap(), &path, &[(0, 1 << 20), (1 << 32, 1 << 20)]).unwrap();
        live.write(0, &[7u8; 3 * PAGE]).unwrap();
        live.write(4096, &[9u8; PAGE]).unwrap(); // written again
        live.write(2 * 4096, &[0u8; PAGE]).unwrap(); // became zero: punched
        live.write((1 << 32) + 4096, &[1u8; PAGE]).unwrap();
        let layout = live.finish(false, &Progress::default()).unwrap();
        layout.validate().unwrap();
        assert_eq!(layout.data_pages(), 3);
        let mut page = [0u8; PAGE];
        file.read_exact_at(&mut page, 4096).unwrap();
        assert!(page.iter().all(|&b| b == 9));
        file.read_exact_at(&mut page, 2 * 4096).unwrap();
        assert!(page.iter().all(|&b| b == 0));
        pages::verify_pages(&file, &path, &layout).unwrap();
        // A diff leaves what no round wrote to its parent.
        let path2 = dir.path().join("diff");
        let file2 =
            std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path2).unwrap();
        let mut live = LivePageFile::new(file2, &path2, &[(0, 1 << 20)]).unwrap();
        live.write_zero(4096, 4096).unwrap();
        let layout = live.finish(true, &Progress::default()).unwrap();
        assert_eq!((layout.zero_pages(), layout.parent_pages()), (1, 255));
    }
}
