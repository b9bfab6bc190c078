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
