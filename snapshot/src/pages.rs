//! The page file: guest memory regions one after another, raw and uncompressed so it can be mapped
//! straight back as guest memory. All-zero pages are holes and take no disk space. Each chunk of
//! the file has a checksum in the manifest.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;

use serde::{Deserialize, Serialize};

use crate::digest::Hasher;
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

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryLayout {
    pub page_size: u64,
    pub chunk_size: u64,
    pub regions: Vec<RegionLayout>,
    /// Checksum of each `chunk_size` piece of the page file (the last may be shorter).
    pub chunk_checksums: Vec<u64>,
    /// Pages that were all zero (holes in the page file).
    pub zero_pages: u64,
}

/// Guest memory to save: a region's guest address and its bytes, as mapped in the VMM.
pub struct MemorySource<'a> {
    pub guest_addr: u64,
    pub bytes: &'a [u8],
}

impl MemoryLayout {
    pub fn total_size(&self) -> u64 {
        self.regions.iter().map(|r| r.size).sum()
    }

    pub fn total_pages(&self) -> u64 {
        self.total_size() / self.page_size
    }

    /// Guest address of a byte of the page file.
    pub fn guest_addr_of(&self, file_offset: u64) -> Option<u64> {
        self.regions
            .iter()
            .find(|r| file_offset >= r.file_offset && file_offset < r.file_offset + r.size)
            .map(|r| r.guest_addr + (file_offset - r.file_offset))
    }

    /// Checks the layout is self-consistent, so nothing later trusts nonsense.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.page_size != PAGE_SIZE {
            return Err(format!("page size {} is not {PAGE_SIZE}", self.page_size));
        }
        if self.chunk_size == 0 || !self.chunk_size.is_multiple_of(self.page_size) {
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
        if self.chunk_checksums.len() as u64 != offset.div_ceil(self.chunk_size) {
            return Err("chunk checksum count does not match memory size".into());
        }
        if self.zero_pages > offset / self.page_size {
            return Err("more zero pages than pages".into());
        }
        Ok(())
    }
}

fn is_zero(page: &[u8]) -> bool {
    // SAFETY: u64 has no invalid bit patterns; align_to only reinterprets the aligned middle.
    let (head, words, tail) = unsafe { page.align_to::<u64>() };
    head.iter().all(|b| *b == 0) && words.iter().all(|w| *w == 0) && tail.iter().all(|b| *b == 0)
}

/// Writes `sources` into `file` (regions one after another), leaving zero pages as holes.
/// Returns the layout without checksums (see `checksum_pages`), so the caller can let the guest
/// run again before the slower checksumming.
pub fn write_pages(file: &File, path: &std::path::Path, sources: &[MemorySource<'_>]) -> Result<MemoryLayout> {
    let total: u64 = sources.iter().map(|s| s.bytes.len() as u64).sum();
    file.set_len(total).map_err(io_err(path))?;
    let mut regions = Vec::with_capacity(sources.len());
    let mut zero_pages = 0;
    let mut file_offset = 0u64;
    for src in sources {
        let mut run_start: Option<usize> = None;
        let page = PAGE_SIZE as usize;
        for (i, chunk) in src.bytes.chunks(page).enumerate() {
            let zero = is_zero(chunk);
            zero_pages += u64::from(zero);
            match (zero, run_start) {
                (false, None) => run_start = Some(i * page),
                (true, Some(start)) => {
                    file.write_all_at(&src.bytes[start..i * page], file_offset + start as u64).map_err(io_err(path))?;
                    run_start = None;
                }
                _ => {}
            }
        }
        if let Some(start) = run_start {
            file.write_all_at(&src.bytes[start..], file_offset + start as u64).map_err(io_err(path))?;
        }
        regions.push(RegionLayout { guest_addr: src.guest_addr, size: src.bytes.len() as u64, file_offset });
        file_offset += src.bytes.len() as u64;
    }
    Ok(MemoryLayout { page_size: PAGE_SIZE, chunk_size: CHUNK_SIZE, regions, chunk_checksums: Vec::new(), zero_pages })
}

/// Computes the checksum of every chunk of the page file.
pub fn checksum_pages(file: &File, path: &std::path::Path, total_size: u64, chunk_size: u64) -> Result<Vec<u64>> {
    let mut reader = std::io::BufReader::with_capacity(chunk_size as usize, file.try_clone().map_err(io_err(path))?);
    let mut sums = Vec::with_capacity(total_size.div_ceil(chunk_size) as usize);
    let mut buf = vec![0u8; chunk_size as usize];
    let mut left = total_size;
    std::io::Seek::seek(&mut reader, std::io::SeekFrom::Start(0)).map_err(io_err(path))?;
    while left > 0 {
        let n = chunk_size.min(left) as usize;
        reader.read_exact(&mut buf[..n]).map_err(io_err(path))?;
        let mut h = Hasher::default();
        h.update(&buf[..n]);
        sums.push(h.finish());
        left -= n as u64;
    }
    Ok(sums)
}

/// Checks every chunk against the manifest; the error names the first bad chunk.
pub fn verify_pages(file: &File, path: &std::path::Path, layout: &MemoryLayout) -> Result<()> {
    let sums = checksum_pages(file, path, layout.total_size(), layout.chunk_size)?;
    for (i, (got, want)) in sums.iter().zip(&layout.chunk_checksums).enumerate() {
        if got != want {
            let guest_addr = layout.guest_addr_of(i as u64 * layout.chunk_size).unwrap_or(0);
            return Err(Error::MemoryChecksum { chunk: i, guest_addr });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn temp(name: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("snapshot-pages-{}-{name}", std::process::id()))
    }

    #[test]
    fn zero_pages_are_holes_and_data_round_trips() {
        let path = temp("holes");
        let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
        let mut low = vec![0u8; 4 << 20];
        low[5 * 4096 + 7] = 0xaa;
        low[(4 << 20) - 1] = 0x55;
        let high = vec![0x11u8; 8192];
        let sources = [MemorySource { guest_addr: 0, bytes: &low }, MemorySource { guest_addr: 1 << 32, bytes: &high }];
        let mut layout = write_pages(&file, &path, &sources).unwrap();
        layout.chunk_checksums = checksum_pages(&file, &path, layout.total_size(), layout.chunk_size).unwrap();
        layout.validate().unwrap();
        assert_eq!(layout.zero_pages, 1024 - 2);
        assert_eq!(layout.regions[1], RegionLayout { guest_addr: 1 << 32, size: 8192, file_offset: 4 << 20 });
        // Only the three non-zero pages take disk space.
        assert!(file.metadata().unwrap().blocks() * 512 <= 4 * 4096, "{} blocks", file.metadata().unwrap().blocks());
        let mut back = vec![0u8; low.len()];
        file.read_exact_at(&mut back, 0).unwrap();
        assert_eq!(back, low);
        verify_pages(&file, &path, &layout).unwrap();

        file.write_all_at(&[1], (2 << 20) + 3).unwrap();
        match verify_pages(&file, &path, &layout) {
            Err(Error::MemoryChecksum { chunk: 2, guest_addr: 0x20_0000 }) => {}
            other => panic!("{other:?}"),
        }
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn layout_validation() {
        let good = MemoryLayout {
            page_size: PAGE_SIZE,
            chunk_size: CHUNK_SIZE,
            regions: vec![RegionLayout { guest_addr: 0, size: CHUNK_SIZE * 2, file_offset: 0 }],
            chunk_checksums: vec![0, 0],
            zero_pages: 0,
        };
        good.validate().unwrap();
        let mut bad = good.clone();
        bad.chunk_checksums.pop();
        assert!(bad.validate().is_err());
        let mut bad = good.clone();
        bad.regions[0].file_offset = 4096;
        assert!(bad.validate().is_err());
        let mut bad = good;
        bad.regions[0].size = 100;
        assert!(bad.validate().is_err());
    }
}
