//! A point-in-time copy of a disk image, taken while the guest goes on writing it: the copy is
//! started while the VM is paused; then a background pass copies every chunk, and a guest write
//! to a chunk not copied yet first copies that chunk's old content (copy-before-write). So the
//! copy holds exactly what the disk held at the pause, whatever the guest writes afterwards, and
//! the pause does not grow with the disk's size. Holes in the image stay holes in the copy.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

/// The copy's granularity: a guest write to an uncopied chunk costs reading and writing this much.
pub const CHUNK_BYTES: u64 = 1 << 20;

pub struct DiskCopier {
    source: Arc<File>,
    dest: File,
    size: u64,
    /// One bit per chunk: copied (or found to be a hole).
    copied: Vec<u64>,
    buf: Vec<u8>,
    /// Copying only some chunks (`only`): `dest` may hold older data there (a diff's file is
    /// empty, a later full snapshot's holds an older copy), so a chunk of zeros is punched.
    selective: bool,
    /// The first error met; the snapshot fails with it (the guest's writes never do).
    error: Option<String>,
    /// Bytes of data written to the copy.
    pub data_bytes: u64,
}

impl DiskCopier {
    /// Starts a copy of `source` (`size` bytes) into `dest`, `size` bytes long: of the chunks set
    /// in the bitmap `only` (`dest` holds holes or an older copy elsewhere), or of every chunk
    /// (`dest` is all holes).
    pub fn new(source: Arc<File>, dest: File, size: u64, only: Option<&[u64]>) -> Self {
        let chunks = size.div_ceil(CHUNK_BYTES);
        let words = chunks.div_ceil(64) as usize;
        // Chunks left out count as copied: nothing is ever done for them.
        let copied = match only {
            Some(only) => (0..words).map(|i| !only.get(i).copied().unwrap_or(0)).collect(),
            None => vec![0; words],
        };
        Self { source, dest, size, copied, buf: Vec::new(), selective: only.is_some(), error: None, data_bytes: 0 }
    }

    /// The byte ranges [start, end) of the chunks set in the bitmap `chunks`, merged, within a
    /// disk of `size` bytes.
    pub fn ranges(chunks: &[u64], size: u64) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for chunk in 0..size.div_ceil(CHUNK_BYTES) {
            if chunks.get((chunk / 64) as usize).is_some_and(|w| w >> (chunk % 64) & 1 == 1) {
                let (start, end) = (chunk * CHUNK_BYTES, ((chunk + 1) * CHUNK_BYTES).min(size));
                match out.last_mut() {
                    Some(last) if last.1 == start => last.1 = end,
                    _ => out.push((start, end)),
                }
            }
        }
        out
    }

    pub fn chunks(&self) -> u64 {
        self.size.div_ceil(CHUNK_BYTES)
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    fn is_copied(&self, chunk: u64) -> bool {
        self.copied[(chunk / 64) as usize] >> (chunk % 64) & 1 == 1
    }

    fn mark(&mut self, chunk: u64) {
        self.copied[(chunk / 64) as usize] |= 1 << (chunk % 64);
    }

    /// Copies chunk `chunk` unless it was already.
    pub fn copy_chunk(&mut self, chunk: u64) -> io::Result<()> {
        if chunk >= self.chunks() || self.is_copied(chunk) {
            return Ok(());
        }
        let start = chunk * CHUNK_BYTES;
        let len = CHUNK_BYTES.min(self.size - start) as usize;
        // A chunk inside a hole of the image: nothing to read.
        let hole = match rustix::fs::seek(&*self.source, rustix::fs::SeekFrom::Data(start)) {
            Ok(data) => data >= start + len as u64,
            Err(rustix::io::Errno::NXIO) => true,
            Err(_) => false,
        };
        let context = |what: &str, e: io::Error| io::Error::new(e.kind(), format!("{what}: {e}"));
        let mut zeros = hole;
        if !hole {
            self.buf.resize(len, 0);
            self.source.read_exact_at(&mut self.buf[..len], start).map_err(|e| context("reading the disk", e))?;
            zeros = self.buf[..len].iter().all(|&b| b == 0);
            if !zeros {
                self.dest
                    .write_all_at(&self.buf[..len], start)
                    .map_err(|e| context("writing the snapshot's copy", e))?;
                self.data_bytes += len as u64;
            }
        }
        if zeros && self.selective {
            let punch = rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE;
            if rustix::fs::fallocate(&self.dest, punch, start, len as u64).is_err() {
                self.buf.clear();
                self.buf.resize(len, 0);
                self.dest
                    .write_all_at(&self.buf[..len], start)
                    .map_err(|e| context("writing the snapshot's copy", e))?;
            }
        }
        self.mark(chunk);
        Ok(())
    }

    /// Called before the guest writes `len` bytes at `offset`: copies the chunks the write
    /// touches first. A failure is kept for the snapshot, and the guest's write goes on.
    pub fn before_write(&mut self, offset: u64, len: u64) {
        if len == 0 || offset >= self.size {
            return;
        }
        let end = offset.saturating_add(len).min(self.size);
        for chunk in offset / CHUNK_BYTES..end.div_ceil(CHUNK_BYTES) {
            if let Err(e) = self.copy_chunk(chunk) {
                self.fail(e);
                return;
            }
        }
    }

    pub fn fail(&mut self, e: io::Error) {
        if self.error.is_none() {
            self.error = Some(e.to_string());
        }
    }

    pub fn error(&self) -> Option<&str> {
        self.error.as_deref()
    }

    /// Makes the copy durable.
    pub fn sync(&self) -> io::Result<()> {
        self.dest.sync_all()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_with(tag: &str, bytes: &[u8], len: u64) -> (tempfile::NamedTempFile, Arc<File>) {
        let f = tempfile::Builder::new().prefix(&format!("vmm-diskcopy-{tag}-")).tempfile().unwrap();
        f.as_file().set_len(len).unwrap();
        f.as_file().write_all_at(bytes, 0).unwrap();
        let file = Arc::new(f.reopen().unwrap());
        (f, file)
    }

    #[test]
    fn the_copy_holds_the_disk_as_it_was_whatever_is_written_after() {
        let size = 3 * CHUNK_BYTES + 4096;
        let (_src, source) = file_with("src", &vec![1u8; 2 * CHUNK_BYTES as usize], size);
        let (_dst, dest) = file_with("dst", &[], size);
        let mut copy = DiskCopier::new(source.clone(), dest.try_clone().unwrap(), size, None);
        // The guest overwrites chunk 1 and the tail before the background pass gets there.
        copy.before_write(CHUNK_BYTES + 10, 100);
        source.write_all_at(&[2u8; 100], CHUNK_BYTES + 10).unwrap();
        copy.before_write(size - 10, 10);
        source.write_all_at(&[3u8; 10], size - 10).unwrap();
        for c in 0..copy.chunks() {
            copy.copy_chunk(c).unwrap();
        }
        // Written after the copy of its chunk: not in the copy.
        copy.before_write(0, 1);
        source.write_all_at(&[4u8; 1], 0).unwrap();
        assert!(copy.error().is_none());
        let mut got = vec![0u8; size as usize];
        dest.read_exact_at(&mut got, 0).unwrap();
        let mut expected = vec![0u8; size as usize];
        expected[..2 * CHUNK_BYTES as usize].fill(1);
        assert!(got == expected, "the copy differs from the disk at the start");
        // Only the data chunks were written: the rest stayed holes.
        assert_eq!(copy.data_bytes, 2 * CHUNK_BYTES);
    }

    #[test]
    fn a_diff_copies_only_the_chunks_asked_for() {
        let size = 4 * CHUNK_BYTES;
        let (_src, source) = file_with("src3", &vec![5u8; size as usize], size);
        let (_dst, dest) = file_with("dst3", &[], size);
        let only = [0b1010u64]; // chunks 1 and 3
        let mut copy = DiskCopier::new(source, dest.try_clone().unwrap(), size, Some(&only));
        copy.before_write(0, 10); // chunk 0 is the parent's: nothing to copy
        for c in 0..copy.chunks() {
            copy.copy_chunk(c).unwrap();
        }
        assert_eq!(copy.data_bytes, 2 * CHUNK_BYTES);
        let mut got = vec![0u8; size as usize];
        dest.read_exact_at(&mut got, 0).unwrap();
        let chunk = |i: u64| &got[(i * CHUNK_BYTES) as usize..((i + 1) * CHUNK_BYTES) as usize];
        assert!(chunk(0).iter().all(|&b| b == 0) && chunk(2).iter().all(|&b| b == 0));
        assert!(chunk(1).iter().all(|&b| b == 5) && chunk(3).iter().all(|&b| b == 5));
        assert_eq!(DiskCopier::ranges(&[0b1110], size - 100), vec![(CHUNK_BYTES, size - 100)]);
        assert_eq!(DiskCopier::ranges(&[0b1001], size), vec![(0, CHUNK_BYTES), (3 * CHUNK_BYTES, size)]);
    }

    /// Over an older copy (a later full snapshot's file starts as its predecessor's), the chunks
    /// copied replace what was there, zeros and holes included; the others keep it.
    #[test]
    fn a_copy_over_an_older_one_replaces_the_chunks_asked_for() {
        let size = 4 * CHUNK_BYTES;
        let (_src, source) = file_with("src4", &vec![5u8; CHUNK_BYTES as usize], size);
        source.write_all_at(&vec![0u8; CHUNK_BYTES as usize], 2 * CHUNK_BYTES).unwrap(); // zeros, not a hole
        let (_dst, dest) = file_with("dst4", &vec![7u8; size as usize], size);
        let only = [0b0111u64]; // chunks 0, 1 (a hole in the disk) and 2
        let mut copy = DiskCopier::new(source, dest.try_clone().unwrap(), size, Some(&only));
        for c in 0..copy.chunks() {
            copy.copy_chunk(c).unwrap();
        }
        let mut got = vec![0u8; size as usize];
        dest.read_exact_at(&mut got, 0).unwrap();
        let chunk = |i: u64| &got[(i * CHUNK_BYTES) as usize..((i + 1) * CHUNK_BYTES) as usize];
        assert!(chunk(0).iter().all(|&b| b == 5), "chunk 0 is not the disk's");
        assert!(chunk(1).iter().all(|&b| b == 0), "chunk 1 kept the older copy's data over the disk's hole");
        assert!(chunk(2).iter().all(|&b| b == 0), "chunk 2 kept the older copy's data over the disk's zeros");
        assert!(chunk(3).iter().all(|&b| b == 7), "chunk 3 was not asked for");
        assert_eq!(copy.data_bytes, CHUNK_BYTES);
    }

    #[test]
    fn writes_outside_the_disk_are_ignored() {
        let (_src, source) = file_with("src2", &[9u8; 10], CHUNK_BYTES);
        let (_dst, dest) = file_with("dst2", &[], CHUNK_BYTES);
        let mut copy = DiskCopier::new(source, (*dest).try_clone().unwrap(), CHUNK_BYTES, None);
        copy.before_write(u64::MAX - 5, 100);
        copy.before_write(CHUNK_BYTES, 1);
        assert!(copy.error().is_none());
        copy.copy_chunk(99).unwrap();
        assert_eq!(copy.data_bytes, 0);
    }
}
