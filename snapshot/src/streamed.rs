//! A whole snapshot read from a stream (`stream`): the manifest, the machine state, then guest
//! memory, handed to the caller frame by frame as it arrives, and checked on the way: every
//! frame's checksum, the state's checksum against the manifest, every memory range inside a
//! region, and every page of every region covered once the stream ends. Later frames for the
//! same pages win (pre-copy sends pages again).

use std::io::Read;

use crate::digest::checksum;
use crate::manifest::{Manifest, SnapshotId};
use crate::pages::{push_extent, Extent, ExtentKind, MemoryLayout, RegionLayout, PAGE_SIZE};
use crate::stream::{Frame, StreamError, StreamReader};
use crate::Error;

/// Memory as a stream delivers it.
pub enum MemoryUpdate<'a> {
    /// `bytes` at guest physical `guest_addr`.
    Data { guest_addr: u64, bytes: &'a [u8] },
    /// `len` bytes of zeros at `guest_addr`; `overwrites`: some of these pages came earlier in
    /// the stream with data (so memory the caller filled must be cleared).
    Zero { guest_addr: u64, len: u64, overwrites: bool },
    /// `bytes` at byte `offset` of disk number `disk`, a disk the manifest says travels with the
    /// stream (its `copy`), inside its size (a snapshot's writable disks, a migration that
    /// copies disks).
    Disk { disk: usize, offset: u64, bytes: &'a [u8] },
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

/// Which pages of guest memory a stream (or one lane of a migration) delivered, and how: one
/// byte a page (4 MiB for a 16 GiB guest).
pub struct PageMap {
    regions: Vec<RegionLayout>,
    states: Vec<u8>,
}

impl PageMap {
    /// An empty map of the regions of `layout` (which the manifest's decoder validated: region
    /// after region in the page file, page-aligned).
    pub fn new(layout: &MemoryLayout) -> Result<Self, Error> {
        let total: u64 = layout.regions.iter().map(|r| r.size / PAGE_SIZE).sum();
        let states =
            vec![UNSENT; usize::try_from(total).map_err(|_| Error::CorruptManifest("too much memory".into()))?];
        Ok(Self { regions: layout.regions.clone(), states })
    }

    /// Records `len` bytes of `kind` at `guest_addr`; whether some of those pages had come with
    /// data before. None: the range does not lie inside one region.
    fn record(&mut self, guest_addr: u64, len: u64, kind: u8) -> Option<bool> {
        let r = self.regions.iter().find(|r| guest_addr >= r.guest_addr && guest_addr < r.guest_addr + r.size)?;
        let end = guest_addr.checked_add(len)?;
        if end > r.guest_addr + r.size {
            return None;
        }
        let first = ((r.file_offset + guest_addr - r.guest_addr) / PAGE_SIZE) as usize;
        let range = self.states.get_mut(first..first + (len / PAGE_SIZE) as usize)?;
        let overwrites = range.contains(&DATA);
        range.fill(kind);
        Some(overwrites)
    }

    /// Takes in what another map (another lane of the same migration) delivered: its pages win.
    pub fn merge(&mut self, other: &PageMap) {
        for (mine, theirs) in self.states.iter_mut().zip(&other.states) {
            if *theirs != UNSENT {
                *mine = *theirs;
            }
        }
    }

    /// The extent map of every region; Err: the address of a page never delivered.
    fn extents(&self) -> Result<Vec<Extent>, u64> {
        let mut extents = Vec::new();
        for r in &self.regions {
            let first = (r.file_offset / PAGE_SIZE) as usize;
            let states = self.states.get(first..first + (r.size / PAGE_SIZE) as usize).unwrap_or(&[]);
            for (i, state) in states.iter().enumerate() {
                let addr = r.guest_addr + i as u64 * PAGE_SIZE;
                let kind = match *state {
                    DATA => ExtentKind::Data,
                    ZERO => ExtentKind::Zero,
                    _ => return Err(addr),
                };
                push_extent(&mut extents, addr, PAGE_SIZE, kind);
            }
        }
        Ok(extents)
    }
}

/// Where a stream carries the machine state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum StateOrder {
    /// Right after the manifest, which gives its size and checksum (a snapshot stream).
    First,
    /// Once, anywhere after the manifest, which leaves its digest empty (a migration: memory is
    /// sent while the guest runs, the state once it paused). The frame's checksum covers it.
    Anywhere,
}

/// Reads a whole snapshot stream from `input`; `what` names it in errors. Once the manifest is
/// read, `prepare` makes the target memory goes to (e.g. guest memory of the size it gives);
/// `memory` then receives every memory update, already checked to lie inside guest memory.
pub fn read_snapshot<R: Read, T, E: From<Error>>(
    input: R,
    what: &str,
    prepare: impl FnOnce(&Manifest) -> std::result::Result<T, E>,
    memory: impl FnMut(&mut T, MemoryUpdate<'_>) -> std::result::Result<(), E>,
) -> std::result::Result<(StreamedSnapshot, T), E> {
    read_stream(input, what, StateOrder::First, prepare, memory, |_| Ok(Vec::new()))
}

/// Reads the stream of a live migration: like [`read_snapshot`], except that the manifest comes
/// without a state digest (its `state.size` is 0) and the State frame may come anywhere before
/// End: after the pre-copy rounds' memory, before the memory of the last, paused round. The
/// returned manifest's state digest is that of the state received.
///
/// A migration over several connections sends part of the memory on other lanes, which the
/// caller reads meanwhile (with [`read_lane`], from `prepare` on); once this stream ended,
/// `lanes` waits for them and returns what each delivered, for the check that every page came.
pub fn read_migration<R: Read, T, E: From<Error>>(
    input: R,
    what: &str,
    prepare: impl FnOnce(&Manifest) -> std::result::Result<T, E>,
    memory: impl FnMut(&mut T, MemoryUpdate<'_>) -> std::result::Result<(), E>,
    lanes: impl FnOnce(&mut T) -> std::result::Result<Vec<PageMap>, E>,
) -> std::result::Result<(StreamedSnapshot, T), E> {
    read_stream(input, what, StateOrder::Anywhere, prepare, memory, lanes)
}

/// Reads one lane of a migration (`stream::StreamWriter::lane`): Memory and Zero frames inside
/// the regions of `layout`, then End. `memory` gets each update (a Zero's `overwrites` counts
/// this lane's pages only: the sender keeps each page on one lane).
pub fn read_lane<R: Read, E: From<Error>>(
    input: R,
    what: &str,
    layout: &MemoryLayout,
    mut memory: impl FnMut(MemoryUpdate<'_>) -> std::result::Result<(), E>,
) -> std::result::Result<PageMap, E> {
    let stream_err = |err: StreamError| Error::Stream { what: what.to_string(), err };
    let mut reader = StreamReader::lane(input).map_err(stream_err)?;
    let bad = |reader: &StreamReader<R>, why: String| -> E {
        Error::BadStream { what: what.to_string(), reason: format!("{why} (byte {})", reader.bytes_read()) }.into()
    };
    let mut pages = PageMap::new(layout)?;
    loop {
        let frame = reader.next_frame().map_err(stream_err)?;
        let (guest_addr, len, kind) = match &frame {
            None => break,
            Some(Frame::End { .. }) => continue,
            Some(Frame::Memory { guest_addr, data }) => (*guest_addr, data.len() as u64, DATA),
            Some(Frame::Zero { guest_addr, len }) => (*guest_addr, *len, ZERO),
            Some(_) => return Err(bad(&reader, "a lane carries only memory".into())),
        };
        let overwrites = pages
            .record(guest_addr, len, kind)
            .ok_or_else(|| bad(&reader, format!("memory at {guest_addr:#x}+{len:#x} is outside guest memory")))?;
        match frame {
            Some(Frame::Memory { guest_addr, data }) => memory(MemoryUpdate::Data { guest_addr, bytes: &data })?,
            _ => memory(MemoryUpdate::Zero { guest_addr, len, overwrites })?,
        }
    }
    Ok(pages)
}

fn read_stream<R: Read, T, E: From<Error>>(
    input: R,
    what: &str,
    order: StateOrder,
    prepare: impl FnOnce(&Manifest) -> std::result::Result<T, E>,
    mut memory: impl FnMut(&mut T, MemoryUpdate<'_>) -> std::result::Result<(), E>,
    lanes: impl FnOnce(&mut T) -> std::result::Result<Vec<PageMap>, E>,
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
    if order == StateOrder::Anywhere && (manifest.state.size != 0 || manifest.state.checksum != 0) {
        return Err(bad(&reader, "a migration's manifest cannot know its state yet, but gives a digest".into()));
    }
    let mut pages = PageMap::new(&manifest.memory)?;
    let mut target = prepare(&manifest)?;
    let mut state = None;
    if order == StateOrder::First {
        let bytes = match reader.next_frame().map_err(stream_err)? {
            Some(Frame::State(bytes)) => bytes,
            _ => return Err(bad(&reader, "no machine state after the manifest".into())),
        };
        if bytes.len() as u64 != manifest.state.size || checksum(&bytes) != manifest.state.checksum {
            return Err(bad(&reader, "the machine state does not match the manifest's checksum".into()));
        }
        state = Some(bytes);
    }
    loop {
        let mut frame = reader.next_frame().map_err(stream_err)?;
        let (guest_addr, len, kind) = match &mut frame {
            None => break,
            Some(Frame::Memory { guest_addr, data }) => (*guest_addr, data.len() as u64, DATA),
            Some(Frame::Zero { guest_addr, len }) => (*guest_addr, *len, ZERO),
            Some(Frame::End { .. }) => continue,
            Some(Frame::Disk { disk, offset, data }) => {
                let size = manifest.vm.disks.get(*disk as usize).and_then(|d| d.copy.as_ref()).map(|c| c.size);
                let fits =
                    size.is_some_and(|size| offset.checked_add(data.len() as u64).is_some_and(|end| end <= size));
                if !fits {
                    return Err(bad(
                        &reader,
                        format!("disk data for disk {disk} at {offset} that the manifest does not give room for"),
                    ));
                }
                memory(&mut target, MemoryUpdate::Disk { disk: *disk as usize, offset: *offset, bytes: data })?;
                continue;
            }
            Some(Frame::State(bytes)) if state.is_none() => {
                manifest.state.size = bytes.len() as u64;
                manifest.state.checksum = checksum(bytes);
                state = Some(std::mem::take(bytes));
                continue;
            }
            Some(_) => return Err(bad(&reader, "a second manifest or state".into())),
        };
        let overwrites = pages
            .record(guest_addr, len, kind)
            .ok_or_else(|| bad(&reader, format!("memory at {guest_addr:#x}+{len:#x} is outside guest memory")))?;
        match frame {
            Some(Frame::Memory { guest_addr, data }) => {
                memory(&mut target, MemoryUpdate::Data { guest_addr, bytes: &data })?
            }
            _ => memory(&mut target, MemoryUpdate::Zero { guest_addr, len, overwrites })?,
        }
    }
    for lane in lanes(&mut target)? {
        pages.merge(&lane);
    }
    manifest.memory.extents =
        pages.extents().map_err(|addr| bad(&reader, format!("the stream never sent guest memory at {addr:#x}")))?;
    let state = state.ok_or_else(|| bad(&reader, "the stream ended without the machine state".into()))?;
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

    /// A migration stream: memory sent twice (pre-copy), the state between, then the last pages.
    fn migration_stream(state: Option<&[u8]>, digest: bool) -> Vec<u8> {
        let mut m = sample();
        m.memory.extents.clear();
        m.memory.chunk_checksums.clear();
        m.state = crate::StateDigest::default();
        if digest {
            m.state.size = 1;
        }
        let mut w = StreamWriter::new(Vec::new(), false).unwrap();
        w.manifest(&m.encode()).unwrap();
        w.memory(0, &vec![1u8; 2 << 20]).unwrap();
        w.memory(4096, &vec![2u8; 4096]).unwrap();
        if let Some(state) = state {
            w.state(state).unwrap();
        }
        w.zero(0, 4096).unwrap();
        w.finish().unwrap().0
    }

    fn read_migrating(bytes: &[u8]) -> Result<(StreamedSnapshot, Vec<u8>), Error> {
        read_migration(
            bytes,
            "test",
            |_| Ok::<_, Error>(vec![0u8; 2 << 20]),
            |mem, update| {
                match update {
                    MemoryUpdate::Data { guest_addr, bytes } => {
                        mem[guest_addr as usize..guest_addr as usize + bytes.len()].copy_from_slice(bytes)
                    }
                    MemoryUpdate::Zero { guest_addr, len, .. } => {
                        mem[guest_addr as usize..(guest_addr + len) as usize].fill(0)
                    }
                    MemoryUpdate::Disk { .. } => {}
                }
                Ok(())
            },
            |_| Ok(Vec::new()),
        )
    }

    #[test]
    fn a_migration_stream_takes_its_state_after_memory_and_later_pages_win() {
        let (s, mem) = read_migrating(&migration_stream(Some(b"late state"), false)).unwrap();
        assert_eq!(s.state, b"late state");
        assert_eq!(s.manifest.state.size, 10);
        assert_eq!(s.manifest.state.checksum, checksum(b"late state"));
        assert!(mem[..4096].iter().all(|b| *b == 0));
        assert!(mem[4096..8192].iter().all(|b| *b == 2));
        assert!(mem[8192..].iter().all(|b| *b == 1));
        // A snapshot stream must carry its state first.
        assert!(read(&migration_stream(Some(b"late state"), false)).is_err());
    }

    #[test]
    fn a_migration_over_two_lanes_needs_every_page_from_one_of_them() {
        let mut m = sample();
        m.memory.extents.clear();
        m.memory.chunk_checksums.clear();
        m.state = crate::StateDigest::default();
        let layout = m.memory.clone();
        // The main stream carries the first MiB, the lane the second (or not all of it).
        let mut w = StreamWriter::new(Vec::new(), false).unwrap();
        w.manifest(&m.encode()).unwrap();
        w.memory(0, &vec![1u8; 1 << 20]).unwrap();
        w.state(b"s").unwrap();
        let main = w.finish().unwrap().0;
        let lane_of = |len: u64| {
            let mut w = StreamWriter::lane(Vec::new(), false).unwrap();
            w.memory(1 << 20, &vec![2u8; 4096]).unwrap();
            w.zero((1 << 20) + 4096, len - 4096).unwrap();
            w.finish().unwrap().0
        };
        let run = |lane: Vec<u8>| {
            let mut mem = vec![0u8; 2 << 20];
            let lane_pages = read_lane(&lane[..], "lane 1", &layout, |u| {
                if let MemoryUpdate::Data { guest_addr, bytes } = u {
                    mem[guest_addr as usize..guest_addr as usize + bytes.len()].copy_from_slice(bytes);
                }
                Ok::<_, Error>(())
            });
            let lane_pages = lane_pages?;
            read_migration(&main[..], "test", |_| Ok::<_, Error>(()), |_, _| Ok(()), |_| Ok(vec![lane_pages]))
                .map(|(s, ())| (s, mem))
        };
        let (s, mem) = run(lane_of(1 << 20)).unwrap();
        assert_eq!(s.manifest.memory.data_pages(), 257);
        assert_eq!(mem[1 << 20], 2);
        let err = run(lane_of(1 << 19)).err().unwrap().to_string();
        assert!(err.contains("never sent guest memory at 0x180000"), "{err}");
        // A lane carries memory only, inside guest memory.
        let mut w = StreamWriter::lane(Vec::new(), false).unwrap();
        w.state(b"s").unwrap();
        let err = run(w.finish().unwrap().0).err().unwrap().to_string();
        assert!(err.contains("only memory"), "{err}");
        let mut w = StreamWriter::lane(Vec::new(), false).unwrap();
        w.zero(2 << 20, 4096).unwrap();
        let err = run(w.finish().unwrap().0).err().unwrap().to_string();
        assert!(err.contains("outside guest memory"), "{err}");
    }

    #[test]
    fn a_migration_stream_without_state_or_with_a_digest_is_refused() {
        let err = read_migrating(&migration_stream(None, false)).err().unwrap().to_string();
        assert!(err.contains("without the machine state"), "{err}");
        let err = read_migrating(&migration_stream(Some(b"s"), true)).err().unwrap().to_string();
        assert!(err.contains("gives a digest"), "{err}");
    }

    #[test]
    fn disk_frames_go_to_disks_the_manifest_copies_and_nowhere_else() {
        let mut m = sample();
        m.memory.extents.clear();
        m.memory.chunk_checksums.clear();
        m.state = crate::StateDigest::default();
        m.vm.disks = vec![crate::DiskDescription {
            path: "/d".into(),
            read_only: false,
            identity: None,
            copy: Some(crate::DiskCopy { file: "disk0.img".into(), size: 1 << 20, ranges: None }),
        }];
        let stream = |disk: u32, offset: u64| {
            let mut w = StreamWriter::new(Vec::new(), false).unwrap();
            w.manifest(&m.encode()).unwrap();
            w.zero(0, 2 << 20).unwrap();
            w.disk(disk, offset, &[5u8; 4096]).unwrap();
            w.state(b"s").unwrap();
            w.finish().unwrap().0
        };
        let read_disks = |bytes: &[u8]| {
            read_migration(
                bytes,
                "test",
                |_| Ok::<_, Error>(Vec::new()),
                |got: &mut Vec<(usize, u64, usize)>, update| {
                    if let MemoryUpdate::Disk { disk, offset, bytes } = update {
                        got.push((disk, offset, bytes.len()));
                    }
                    Ok(())
                },
                |_| Ok(Vec::new()),
            )
        };
        let (_, got) = read_disks(&stream(0, (1 << 20) - 4096)).unwrap();
        assert_eq!(got, vec![(0, (1 << 20) - 4096, 4096)]);
        // A snapshot stream (state first) carries its disks after the memory too.
        let mut m = m.clone();
        m.state = crate::StateDigest { size: 1, checksum: crate::digest::checksum(b"s"), ..Default::default() };
        let mut w = StreamWriter::new(Vec::new(), false).unwrap();
        w.manifest(&m.encode()).unwrap();
        w.state(b"s").unwrap();
        w.zero(0, 2 << 20).unwrap();
        w.disk(0, 4096, &[5u8; 8192]).unwrap();
        let bytes = w.finish().unwrap().0;
        let mut got = Vec::new();
        read_snapshot(
            &bytes[..],
            "test",
            |_| Ok::<_, Error>(()),
            |(), update| {
                if let MemoryUpdate::Disk { disk, offset, bytes } = update {
                    got.push((disk, offset, bytes.len()));
                }
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(got, vec![(0, 4096, 8192)]);
        for (disk, offset) in [(0, 1 << 20), (1, 0), (0, (1 << 20) - 512)] {
            let err = read_disks(&stream(disk, offset)).err().unwrap().to_string();
            assert!(err.contains("does not give room"), "{err}");
        }
    }

    #[test]
    fn an_abandoned_stream_says_why() {
        let mut w = StreamWriter::new(Vec::new(), false).unwrap();
        let mut m = sample();
        m.memory.extents.clear();
        m.memory.chunk_checksums.clear();
        m.state = crate::StateDigest::default();
        w.manifest(&m.encode()).unwrap();
        w.memory(0, &[3u8; 4096]).unwrap();
        w.abandon("the guest was cancelled").unwrap();
        let bytes = w.get_mut().clone();
        let err = read_migrating(&bytes).err().unwrap().to_string();
        assert!(err.contains("abandoned") && err.contains("the guest was cancelled"), "{err}");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        /// The migration reader with damaged input: an error, never a panic.
        #[test]
        fn damaged_migration_streams_are_refused(edits in proptest::collection::vec((any::<usize>(), 1u8..=255), 1..4)) {
            let mut bytes = migration_stream(Some(b"state"), false);
            for (at, xor) in edits {
                let at = at % bytes.len();
                bytes[at] ^= xor;
            }
            prop_assert!(read_migrating(&bytes).is_err());
        }


        /// Arbitrary bytes, or a good stream with arbitrary bytes changed: an error, never a panic.
        #[test]
        fn arbitrary_input_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let _ = read(&bytes);
            let _ = read_lane(&bytes[..], "lane", &sample().memory, |_| Ok::<_, Error>(()));
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
