//! A whole snapshot read from a stream (`stream`): the manifest, the machine state, then guest
//! memory, handed to the caller frame by frame as it arrives, and checked on the way: every
//! frame's checksum, the state's checksum against the manifest, every memory range inside a
//! region, and every page of every region covered once the stream ends. Later frames for the
//! same pages win (pre-copy sends pages again).

use std::io::Read;

use crate::digest::checksum;
use crate::manifest::{Manifest, SnapshotId};
use crate::pages::{push_extent, ExtentKind, PAGE_SIZE};
use crate::stream::{Frame, StreamError, StreamReader};
use crate::Error;

/// Memory as a stream delivers it.
pub enum MemoryUpdate<'a> {
    /// `bytes` at guest physical `guest_addr`.
    Data { guest_addr: u64, bytes: &'a [u8] },
    /// `len` bytes of zeros at `guest_addr`; `overwrites`: some of these pages came earlier in
    /// the stream with data (so memory the caller filled must be cleared).
    Zero { guest_addr: u64, len: u64, overwrites: bool },
}

/// What a stream held besides memory.
pub struct StreamedSnapshot {
    /// Id of the manifest as sent (its memory not yet described).
    pub id: SnapshotId,
    /// The manifest, its extent map built from the frames (no chunk checksums: every frame had
    /// its own).
    pub manifest: Manifest,
    /// The encoded machine state, its checksum checked.
    pub state: Vec<u8>,
    /// Bytes read from the stream.
    pub bytes: u64,
}

/// Page states while reading.
const UNSENT: u8 = 0;
const DATA: u8 = 1;
const ZERO: u8 = 2;

/// Reads a whole snapshot stream from `input`; `what` names it in errors. Once the manifest is
/// read, `prepare` makes the target memory goes to (e.g. guest memory of the size it gives);
/// `memory` then receives every memory update, already checked to lie inside guest memory.
pub fn read_snapshot<R: Read, T, E: From<Error>>(
    input: R,
    what: &str,
    prepare: impl FnOnce(&Manifest) -> std::result::Result<T, E>,
    mut memory: impl FnMut(&mut T, MemoryUpdate<'_>) -> std::result::Result<(), E>,
) -> std::result::Result<(StreamedSnapshot, T), E> {
    let stream_err = |err: StreamError| Error::Stream { what: what.to_string(), err };
    let mut reader = StreamReader::new(input).map_err(stream_err)?;
    let bad = |reader: &StreamReader<R>, why: String| -> E {
        Error::BadStream { what: what.to_string(), reason: format!("{why} (byte {})", reader.bytes_read()) }.into()
    };
    let decoded = match reader.next_frame().map_err(stream_err)? {
        Some(Frame::Manifest(bytes)) => Manifest::decode_streamed(&bytes, what)?,
        _ => return Err(bad(&reader, "the stream does not start with a manifest".into())),
    };
    let mut manifest = decoded.manifest;
    let mut target = prepare(&manifest)?;
    let state = match reader.next_frame().map_err(stream_err)? {
        Some(Frame::State(bytes)) => bytes,
        _ => return Err(bad(&reader, "no machine state after the manifest".into())),
    };
    if state.len() as u64 != manifest.state.size || checksum(&state) != manifest.state.checksum {
        return Err(bad(&reader, "the machine state does not match the manifest's checksum".into()));
    }
    let regions = manifest.memory.regions.clone();
    let total_pages: u64 = regions.iter().map(|r| r.size / PAGE_SIZE).sum();
    // One byte a page: 4 MiB for a 16 GiB guest.
    let mut pages = vec![UNSENT; usize::try_from(total_pages).map_err(|_| bad(&reader, "too much memory".into()))?];
    // Index of the first page of the range, if it lies inside one region.
    let locate = |guest_addr: u64, len: u64| -> Option<usize> {
        let r = regions.iter().find(|r| guest_addr >= r.guest_addr && guest_addr < r.guest_addr + r.size)?;
        let end = guest_addr.checked_add(len)?;
        (end <= r.guest_addr + r.size).then(|| ((r.file_offset + guest_addr - r.guest_addr) / PAGE_SIZE) as usize)
    };
    loop {
        let frame = reader.next_frame().map_err(stream_err)?;
        let (guest_addr, len, kind) = match &frame {
            None => break,
            Some(Frame::Memory { guest_addr, data }) => (*guest_addr, data.len() as u64, DATA),
            Some(Frame::Zero { guest_addr, len }) => (*guest_addr, *len, ZERO),
            Some(Frame::End { .. }) => continue,
            Some(_) => return Err(bad(&reader, "a second manifest or state".into())),
        };
        let first = locate(guest_addr, len)
            .ok_or_else(|| bad(&reader, format!("memory at {guest_addr:#x}+{len:#x} is outside guest memory")))?;
        let range = &mut pages[first..first + (len / PAGE_SIZE) as usize];
        let overwrites = range.contains(&DATA);
        range.fill(kind);
        match frame {
            Some(Frame::Memory { guest_addr, data }) => {
                memory(&mut target, MemoryUpdate::Data { guest_addr, bytes: &data })?
            }
            _ => memory(&mut target, MemoryUpdate::Zero { guest_addr, len, overwrites })?,
        }
    }
    // The extent map, from the page states.
    let mut extents = Vec::new();
    for r in &regions {
        let first = (r.file_offset / PAGE_SIZE) as usize;
        for (i, state) in pages[first..first + (r.size / PAGE_SIZE) as usize].iter().enumerate() {
            let addr = r.guest_addr + i as u64 * PAGE_SIZE;
            let kind = match *state {
                DATA => ExtentKind::Data,
                ZERO => ExtentKind::Zero,
                _ => return Err(bad(&reader, format!("the stream never sent guest memory at {addr:#x}"))),
            };
            push_extent(&mut extents, addr, PAGE_SIZE, kind);
        }
    }
    manifest.memory.extents = extents;
    Ok((StreamedSnapshot { id: decoded.id, manifest, state, bytes: reader.bytes_read() }, target))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::tests::sample;
    use crate::stream::StreamWriter;
    use proptest::prelude::*;

    /// A whole stream of `sample()`'s machine: 2 MiB of memory, the first MiB data, the second zero.
    fn good_stream(compress: bool) -> Vec<u8> {
        let state = b"machine state".to_vec();
        let mut m = sample();
        m.memory.extents.clear();
        m.memory.chunk_checksums.clear();
        m.state = crate::StateDigest { size: state.len() as u64, checksum: checksum(&state), sections: vec![] };
        let mut w = StreamWriter::new(Vec::new(), compress).unwrap();
        w.manifest(&m.encode()).unwrap();
        w.state(&state).unwrap();
        w.memory(0, &vec![7u8; 1 << 20]).unwrap();
        w.zero(1 << 20, 1 << 20).unwrap();
        w.finish().unwrap().0
    }

    fn read(bytes: &[u8]) -> Result<(StreamedSnapshot, u64), Error> {
        read_snapshot(
            bytes,
            "test",
            |_| Ok::<_, Error>(0u64),
            |n, update| {
                if let MemoryUpdate::Data { bytes, .. } = update {
                    *n += bytes.len() as u64;
                }
                Ok(())
            },
        )
    }

    #[test]
    fn a_whole_stream_reads_back_with_its_extent_map() {
        for compress in [false, true] {
            let (s, data) = read(&good_stream(compress)).unwrap();
            assert_eq!(data, 1 << 20);
            assert_eq!(s.state, b"machine state");
            assert_eq!(s.manifest.memory.data_pages(), 256);
            assert_eq!(s.manifest.memory.zero_pages(), 256);
            s.manifest.memory.validate_regions().unwrap();
        }
    }

    #[test]
    fn every_cut_is_an_error() {
        let good = good_stream(false);
        // Every cut of the head; then every 997th byte through the memory.
        for cut in (0..200).chain((200..good.len()).step_by(997)) {
            assert!(read(&good[..cut]).is_err(), "cut at {cut} accepted");
        }
    }

    #[test]
    fn memory_outside_guest_memory_or_missing_is_refused() {
        let m = {
            let mut m = sample();
            m.memory.extents.clear();
            m.memory.chunk_checksums.clear();
            m.state = crate::StateDigest { size: 1, checksum: checksum(b"s"), sections: vec![] };
            m
        };
        let stream = |pages: &[(u64, u64)]| {
            let mut w = StreamWriter::new(Vec::new(), false).unwrap();
            w.manifest(&m.encode()).unwrap();
            w.state(b"s").unwrap();
            for &(addr, len) in pages {
                w.zero(addr, len).unwrap();
            }
            w.finish().unwrap().0
        };
        assert!(read(&stream(&[(0, 2 << 20)])).is_ok());
        let err = read(&stream(&[(0, 1 << 20)])).err().unwrap().to_string();
        assert!(err.contains("never sent guest memory at 0x100000"), "{err}");
        let err = read(&stream(&[(0, 2 << 20), (2 << 20, 4096)])).err().unwrap().to_string();
        assert!(err.contains("outside guest memory"), "{err}");
        let err = read(&stream(&[(0, 3 << 20)])).err().unwrap().to_string();
        assert!(err.contains("outside guest memory"), "{err}");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        /// Arbitrary bytes, or a good stream with arbitrary bytes changed: an error, never a panic.
        #[test]
        fn arbitrary_input_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let _ = read(&bytes);
        }

        #[test]
        fn damaged_streams_are_refused(edits in proptest::collection::vec((any::<usize>(), 1u8..=255), 1..4),
                                       compress in any::<bool>()) {
            let mut bytes = good_stream(compress);
            for (at, xor) in edits {
                let at = at % bytes.len();
                bytes[at] ^= xor;
            }
            prop_assert!(read(&bytes).is_err());
        }

        /// The state decoder with arbitrary input: an error, never a panic.
        #[test]
        fn arbitrary_state_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = crate::MachineSections::decode(&bytes);
        }
    }
}
