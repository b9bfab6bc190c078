//! Guest memory as stream frames: data as Memory frames, pages of zeros as Zero frames (never
//! sent as bytes).

use std::io::Write;

use snapshot::stream::{StreamError, StreamWriter};
use vm_memory::{Bytes, GuestAddress};

use crate::vstate::dirty::PAGE_SIZE;
use crate::vstate::memory::GuestMemory;

/// Guest memory is read and sent in pieces of this size; with several connections, each piece
/// of guest physical memory aligned to it always goes on the same one.
pub const PIECE: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum FramesError {
    #[error("reading guest memory at {addr:#x}: {err}")]
    Memory { addr: u64, err: String },
    #[error(transparent)]
    Stream(#[from] StreamError),
}

/// Writes guest memory `[addr, addr + len)` (at most [`PIECE`] bytes) as read now into `writer`,
/// through `buf` (at least `len` bytes). Returns the bytes sent as data.
pub fn write_range<W: Write>(
    writer: &mut StreamWriter<W>,
    mem: &GuestMemory,
    buf: &mut [u8],
    addr: u64,
    len: usize,
) -> Result<u64, FramesError> {
    mem.read_slice(&mut buf[..len], GuestAddress(addr))
        .map_err(|e| FramesError::Memory { addr, err: e.to_string() })?;
    let page = PAGE_SIZE as usize;
    let mut data = 0;
    let mut p = 0;
    while p < len {
        let zero = is_zero(&buf[p..p + page]);
        let mut q = p + page;
        while q < len && is_zero(&buf[q..q + page]) == zero {
            q += page;
        }
        let run_addr = addr + p as u64;
        if zero {
            writer.zero(run_addr, (q - p) as u64)?;
        } else {
            writer.memory(run_addr, &buf[p..q])?;
            data += (q - p) as u64;
        }
        p = q;
    }
    Ok(data)
}

/// Says why sending failed: a write the socket timeout ended means the destination stopped
/// reading (the bare error would be "resource temporarily unavailable").
pub fn describe(e: &StreamError) -> String {
    match e {
        StreamError::Io(io) if matches!(io.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
            "the destination took nothing for --timeout".into()
        }
        _ => e.to_string(),
    }
}

/// Splits ranges into pieces that do not cross a multiple of `piece` bytes.
pub fn split_aligned(ranges: &[(u64, u64)], piece: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for &(addr, len) in ranges {
        let mut at = addr;
        let end = addr + len;
        while at < end {
            let next = ((at / piece) + 1) * piece;
            let n = next.min(end) - at;
            out.push((at, n));
            at += n;
        }
    }
    out
}

fn is_zero(page: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: any 8 bytes are a valid u64; align_to only picks the aligned middle part.
        unsafe { page.align_to::<u64>() }
    };
    head.iter().all(|b| *b == 0) && words.iter().all(|w| *w == 0) && tail.iter().all(|b| *b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_split_at_piece_boundaries() {
        assert_eq!(
            split_aligned(&[(0, 3 << 20), (8 << 20, 4096)], 1 << 20),
            vec![(0, 1 << 20), (1 << 20, 1 << 20), (2 << 20, 1 << 20), (8 << 20, 4096)]
        );
        assert_eq!(
            split_aligned(&[((1 << 20) - 4096, 8192)], 1 << 20),
            vec![((1 << 20) - 4096, 4096), (1 << 20, 4096)]
        );
    }

    #[test]
    fn zero_pages_are_found() {
        let mut page = vec![0u8; 4096];
        assert!(is_zero(&page));
        page[4095] = 1;
        assert!(!is_zero(&page));
    }
}
