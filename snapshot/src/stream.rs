//! The snapshot stream: a snapshot as one sequence of bytes, for a pipe (`vmm snapshot --out - |
//! vmm resume -`) and, later, for live migration. Every frame is checksummed on its own and may be
//! zstd-compressed on its own, so a reader needs no seeking and at most one frame in memory.
//!
//! Format (sizes in bytes, integers little-endian):
//!
//! ```text
//! stream  = magic "VMMSTRM\0" (8) | version u32 (= 1) | frame* (the last one is End)
//! frame   = kind u8 | flags u8 | reserved u16 (= 0) | seq u32 | stored_len u32 | raw_len u32
//!           | payload (stored_len) | checksum u64
//! ```
//!
//! - `seq` is 0 for the first frame and grows by 1 with each frame.
//! - `flags` bit 0: the payload is zstd-compressed (one or more zstd frames) and decompresses to
//!   exactly `raw_len` bytes; without it `raw_len == stored_len`. Other bits are 0. A writer
//!   compresses a payload only when that makes it smaller.
//! - `stored_len` and `raw_len` are at most [`MAX_FRAME_PAYLOAD`].
//! - `checksum` is xxh3-64 of the 16-byte frame header followed by the stored payload.
//! - Payloads (raw, i.e. after decompression), by kind:
//!   - 1 Manifest: opaque bytes. Always the first frame, and the only Manifest.
//!   - 2 State: opaque bytes (the machine state). At most one.
//!   - 3 Memory: guest_addr u64 | data. `guest_addr` and `data.len()` are multiples of 4096,
//!     `data` is not empty. The same pages may come again (pre-copy): the later frame wins.
//!   - 4 Zero: guest_addr u64 | len u64. `len` bytes of zeros, same rules as Memory.
//!   - 5 End: frames u64 | memory_bytes u64 | zero_bytes u64: the number of frames before End and
//!     the sums of Memory data lengths and of Zero lengths, which the reader checks.
//!   - 6 Abandon: a UTF-8 reason (at most [`MAX_ABANDON_REASON`] bytes): the writer gave up (a
//!     cancelled snapshot, a failed migration); the reader reports it and reads nothing more.
//!   - 7 Disk: disk u32 | reserved u32 (= 0) | offset u64 | data: `data` at byte `offset` of the
//!     VM's disk number `disk` (a snapshot's writable disks, after its memory; a migration that
//!     copies disks). `offset` and `data.len()` are
//!     multiples of 512, `data` is not empty; later frames for the same bytes win.
//!
//! A State frame may also come after memory frames (a migration sends memory while the guest
//! runs, and its state only once it paused); which order a reader accepts is its caller's choice.
//! A migration over several connections sends, on each but the first, a *lane*: a stream of
//! Memory and Zero frames only, with no manifest ([`StreamWriter::lane`]).
//!
//! Nothing after End is read. The manifest and the state are opaque here: the caller checks that
//! what it needs (a State frame, memory matching the manifest) arrived.

use std::io::{self, Read, Write};

use zstd::bulk::{Compressor, Decompressor};

use crate::digest::Hasher;

/// First 8 bytes of every stream.
pub const STREAM_MAGIC: [u8; 8] = *b"VMMSTRM\0";
/// Stream version written; the only one read. (u32 LE right after the magic.)
pub const STREAM_VERSION: u32 = 1;
/// Largest payload a frame may carry, stored or raw (a reader refuses larger before allocating).
pub const MAX_FRAME_PAYLOAD: usize = 4 << 20;
/// Guest memory data per Memory frame the writer produces at most (a multiple of 4096).
pub const MEMORY_FRAME_BYTES: usize = 1 << 20;
/// Longest reason an Abandon frame carries, in bytes.
pub const MAX_ABANDON_REASON: usize = 1024;

/// Alignment and granularity of guest addresses and lengths in the stream.
const PAGE: u64 = 4096;
const STREAM_HEADER_LEN: usize = 12;
const FRAME_HEADER_LEN: usize = 16;
const CHECKSUM_LEN: usize = 8;
/// Frame overhead on the wire: header and checksum.
const FRAME_OVERHEAD: u64 = (FRAME_HEADER_LEN + CHECKSUM_LEN) as u64;
const FLAG_ZSTD: u8 = 1;

const KIND_MANIFEST: u8 = 1;
const KIND_STATE: u8 = 2;
const KIND_MEMORY: u8 = 3;
const KIND_ZERO: u8 = 4;
const KIND_END: u8 = 5;
const KIND_ABANDON: u8 = 6;
const KIND_DISK: u8 = 7;
/// Disk data is addressed in sectors of this many bytes.
pub const DISK_SECTOR: u64 = 512;

/// The fixed fields that start a raw payload: a Memory frame's address, Zero's and End's fields.
const MEMORY_FIXED: usize = 8;
const ZERO_FIXED: usize = 16;
const END_FIXED: usize = 24;
const DISK_FIXED: usize = 16;

/// zstd level 1: the fastest regular level (several hundred MB/s a core). A stream is written
/// while the guest is paused, or, in pre-copy, while it keeps dirtying pages: compression must not
/// become the bottleneck of a pipe or a network link. Higher levels gain little on guest memory
/// (zero pages already travel as Zero frames) and cost several times the CPU.
const ZSTD_LEVEL: i32 = 1;

const _: () = assert!((MEMORY_FRAME_BYTES as u64).is_multiple_of(PAGE) && MEMORY_FRAME_BYTES > 0);
const _: () = assert!(MEMORY_FIXED + MEMORY_FRAME_BYTES <= MAX_FRAME_PAYLOAD);
const _: () = assert!(MAX_FRAME_PAYLOAD <= u32::MAX as usize);

/// One frame of a stream, as the reader returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// The encoded manifest (opaque bytes to this module). Must be the first frame.
    Manifest(Vec<u8>),
    /// The machine state (opaque bytes).
    State(Vec<u8>),
    /// Guest memory: `data.len()` bytes (a non-zero multiple of 4096) at guest physical `guest_addr` (4096-aligned).
    Memory { guest_addr: u64, data: Vec<u8> },
    /// `len` bytes of zeros (non-zero multiple of 4096) at `guest_addr` (4096-aligned): never sent as bytes.
    Zero { guest_addr: u64, len: u64 },
    /// Last frame: totals the reader checks against what it received.
    End { frames: u64, memory_bytes: u64, zero_bytes: u64 },
    /// `data` at byte `offset` of disk number `disk` (both multiples of 512, `data` not empty).
    Disk { disk: u32, offset: u64, data: Vec<u8> },
}

/// What a writer produced.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StreamStats {
    /// Frames written, End included.
    pub frames: u64,
    /// Bytes on the wire: stream header and frames as stored (compressed or not).
    pub bytes: u64,
    /// Guest memory sent as data (Memory frames, before compression).
    pub memory_bytes: u64,
    /// Guest memory sent as Zero frames.
    pub zero_bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("snapshot stream i/o error: {0}")]
    Io(std::io::Error),
    #[error("snapshot stream ends early at byte {offset}")]
    Truncated { offset: u64 },
    #[error("not a vmm snapshot stream (bad magic at byte 0)")]
    NotAStream,
    #[error("snapshot stream version {found} is not supported (this vmm reads version {supported})")]
    UnsupportedVersion { found: u32, supported: u32 },
    #[error("snapshot stream is corrupt: checksum mismatch in frame {frame} (byte {offset})")]
    Checksum { frame: u32, offset: u64 },
    #[error("snapshot stream is corrupt: frame {frame} (byte {offset}): {reason}")]
    BadFrame { frame: u32, offset: u64, reason: String },
    #[error("snapshot stream frame {frame} (byte {offset}): {what} of {len} bytes is over the {max}-byte limit")]
    TooLarge { frame: u32, offset: u64, what: &'static str, len: u64, max: u64 },
    #[error("snapshot stream compression error: {0}")]
    Compression(String),
    /// A writer was asked for something the format cannot carry (misaligned memory, frames out of
    /// order...). Nothing was written for that call.
    #[error("cannot write snapshot stream: {0}")]
    Invalid(String),
    /// The writer abandoned the stream (an Abandon frame), saying why.
    #[error("the sender abandoned the snapshot stream: {reason}")]
    Abandoned { reason: String },
    /// An earlier error left the stream at an unknown point: nothing more can be read or written.
    #[error("snapshot stream is unusable after an earlier error (at byte {offset})")]
    Broken { offset: u64 },
}

impl StreamError {
    /// The stream ended before its End frame (a cut pipe, a partial file).
    pub fn is_truncated(&self) -> bool {
        matches!(self, StreamError::Truncated { .. })
    }
}

fn kind_name(kind: u8) -> &'static str {
    match kind {
        KIND_MANIFEST => "manifest",
        KIND_STATE => "state",
        KIND_MEMORY => "memory",
        KIND_ZERO => "zero",
        KIND_END => "end",
        KIND_ABANDON => "abandon",
        KIND_DISK => "disk",
        _ => "unknown",
    }
}

/// Length of the fixed fields at the start of a raw payload of this kind.
fn fixed_len(kind: u8) -> usize {
    match kind {
        KIND_MEMORY => MEMORY_FIXED,
        KIND_ZERO => ZERO_FIXED,
        KIND_END => END_FIXED,
        KIND_DISK => DISK_FIXED,
        _ => 0,
    }
}

fn frame_header(kind: u8, flags: u8, seq: u32, stored_len: u32, raw_len: u32) -> [u8; FRAME_HEADER_LEN] {
    let mut h = [0u8; FRAME_HEADER_LEN];
    h[0] = kind;
    h[1] = flags;
    // h[2..4]: reserved, 0.
    h[4..8].copy_from_slice(&seq.to_le_bytes());
    h[8..12].copy_from_slice(&stored_len.to_le_bytes());
    h[12..16].copy_from_slice(&raw_len.to_le_bytes());
    h
}

fn le_u64(bytes: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(b)
}

fn le_u32(bytes: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(b)
}

/// Checks a run of guest memory; the error says what is wrong with it.
fn check_range(guest_addr: u64, len: u64) -> Result<(), String> {
    if !guest_addr.is_multiple_of(PAGE) {
        return Err(format!("guest address {guest_addr:#x} is not {PAGE}-aligned"));
    }
    if len == 0 || !len.is_multiple_of(PAGE) {
        return Err(format!("length {len} at guest address {guest_addr:#x} is not a non-zero multiple of {PAGE}"));
    }
    if guest_addr.checked_add(len).is_none() {
        return Err(format!("{len} bytes at guest address {guest_addr:#x} run past the end of the address space"));
    }
    Ok(())
}

/// Checks a run of disk bytes; the error says what is wrong with it.
fn check_disk_range(offset: u64, len: u64) -> Result<(), String> {
    if !offset.is_multiple_of(DISK_SECTOR) || len == 0 || !len.is_multiple_of(DISK_SECTOR) {
        return Err(format!("disk data of {len} bytes at offset {offset} is not in whole {DISK_SECTOR}-byte sectors"));
    }
    if offset.checked_add(len).is_none() {
        return Err(format!("{len} bytes at disk offset {offset} run past 2^64"));
    }
    Ok(())
}

/// Writes a stream. Each call writes whole frames straight to `out` in a few `write_all` calls (the
/// frame header, the payload slices, the checksum), so give it a `BufWriter` (or anything
/// buffering) unless `out` is already buffered: small frames would otherwise cost a system call
/// each. Memory is not copied unless it is compressed; the compression buffers are kept and reused.
///
/// A failed write leaves the stream cut short: every later call returns [`StreamError::Broken`].
pub struct StreamWriter<W: Write> {
    out: W,
    compressor: Option<Compressor<'static>>,
    /// Raw payload gathered in one piece for the compressor (fixed fields + data).
    staged: Vec<u8>,
    /// Compressed payload.
    packed: Vec<u8>,
    frames: u64,
    bytes: u64,
    memory_bytes: u64,
    zero_bytes: u64,
    state_written: bool,
    /// A lane: memory comes without a manifest.
    lane: bool,
    broken: bool,
}

impl<W: Write> StreamWriter<W> {
    /// A lane of a migration over several connections: memory (and End) with no manifest before
    /// it; which pages it carries is the sender's and the reader's agreement.
    pub fn lane(out: W, compress: bool) -> Result<Self, StreamError> {
        let mut writer = Self::new(out, compress)?;
        writer.lane = true;
        Ok(writer)
    }

    /// Writes the stream header. `compress`: zstd (level 1 — fast, see `ZSTD_LEVEL`) each frame's
    /// payload, keeping the raw payload when compression does not make it smaller.
    pub fn new(mut out: W, compress: bool) -> Result<Self, StreamError> {
        let compressor = if compress {
            Some(
                Compressor::new(ZSTD_LEVEL)
                    .map_err(|e| StreamError::Compression(format!("cannot set up zstd: {e}")))?,
            )
        } else {
            None
        };
        let mut header = [0u8; STREAM_HEADER_LEN];
        header[..8].copy_from_slice(&STREAM_MAGIC);
        header[8..].copy_from_slice(&STREAM_VERSION.to_le_bytes());
        out.write_all(&header).map_err(StreamError::Io)?;
        Ok(StreamWriter {
            out,
            compressor,
            staged: Vec::new(),
            packed: Vec::new(),
            frames: 0,
            bytes: STREAM_HEADER_LEN as u64,
            memory_bytes: 0,
            zero_bytes: 0,
            state_written: false,
            lane: false,
            broken: false,
        })
    }

    /// The manifest: the first frame, written once.
    pub fn manifest(&mut self, bytes: &[u8]) -> Result<(), StreamError> {
        self.check_usable()?;
        if self.frames != 0 {
            return Err(StreamError::Invalid("the manifest must be the first frame, and only one".into()));
        }
        self.check_payload_len("manifest", bytes.len())?;
        self.write_frame(KIND_MANIFEST, &[], bytes)
    }

    /// The machine state, once, after the manifest. Larger than [`MAX_FRAME_PAYLOAD`] is
    /// [`StreamError::TooLarge`].
    pub fn state(&mut self, bytes: &[u8]) -> Result<(), StreamError> {
        self.check_usable()?;
        self.check_started("the machine state")?;
        if self.state_written {
            return Err(StreamError::Invalid("the machine state was already written".into()));
        }
        self.check_payload_len("machine state", bytes.len())?;
        self.write_frame(KIND_STATE, &[], bytes)?;
        self.state_written = true;
        Ok(())
    }

    /// Guest memory at `guest_addr`, both it and `data.len()` multiples of 4096 (`data` not
    /// empty). Splits `data` into frames of at most [`MEMORY_FRAME_BYTES`]; checks alignment (typed
    /// error, nothing written).
    pub fn memory(&mut self, guest_addr: u64, data: &[u8]) -> Result<(), StreamError> {
        self.check_usable()?;
        self.check_started("guest memory")?;
        check_range(guest_addr, data.len() as u64).map_err(StreamError::Invalid)?;
        let mut addr = guest_addr;
        for chunk in data.chunks(MEMORY_FRAME_BYTES) {
            self.write_frame(KIND_MEMORY, &addr.to_le_bytes(), chunk)?;
            self.memory_bytes += chunk.len() as u64;
            addr += chunk.len() as u64;
        }
        Ok(())
    }

    /// `data` at byte `offset` of disk number `disk` (`offset` and `data.len()` multiples of
    /// 512, `data` not empty), in frames of at most [`MEMORY_FRAME_BYTES`].
    pub fn disk(&mut self, disk: u32, offset: u64, data: &[u8]) -> Result<(), StreamError> {
        self.check_usable()?;
        self.check_started("disk data")?;
        check_disk_range(offset, data.len() as u64).map_err(StreamError::Invalid)?;
        let mut at = offset;
        for chunk in data.chunks(MEMORY_FRAME_BYTES) {
            let mut fixed = [0u8; DISK_FIXED];
            fixed[..4].copy_from_slice(&disk.to_le_bytes());
            fixed[8..].copy_from_slice(&at.to_le_bytes());
            self.write_frame(KIND_DISK, &fixed, chunk)?;
            at += chunk.len() as u64;
        }
        Ok(())
    }

    /// `len` bytes of zeros at `guest_addr` (both multiples of 4096, `len` not 0), in one frame.
    pub fn zero(&mut self, guest_addr: u64, len: u64) -> Result<(), StreamError> {
        self.check_usable()?;
        self.check_started("zero pages")?;
        check_range(guest_addr, len).map_err(StreamError::Invalid)?;
        let total = self
            .zero_bytes
            .checked_add(len)
            .ok_or_else(|| StreamError::Invalid("the zero bytes of the stream add up to more than 2^64".into()))?;
        let mut fixed = [0u8; ZERO_FIXED];
        fixed[..8].copy_from_slice(&guest_addr.to_le_bytes());
        fixed[8..].copy_from_slice(&len.to_le_bytes());
        self.write_frame(KIND_ZERO, &fixed, &[])?;
        self.zero_bytes = total;
        Ok(())
    }

    /// Writes End, flushes, returns the inner writer and stats.
    pub fn finish(mut self) -> Result<(W, StreamStats), StreamError> {
        let stats = self.end()?;
        Ok((self.out, stats))
    }

    /// Writes End and flushes, keeping the writer (its inner writer stays reachable through
    /// [`get_mut`](Self::get_mut), e.g. to read the peer's answer on a socket); nothing more can
    /// be written.
    pub fn end(&mut self) -> Result<StreamStats, StreamError> {
        self.check_usable()?;
        self.check_started("the end of the stream")?;
        let mut fixed = [0u8; END_FIXED];
        fixed[..8].copy_from_slice(&self.frames.to_le_bytes());
        fixed[8..16].copy_from_slice(&self.memory_bytes.to_le_bytes());
        fixed[16..].copy_from_slice(&self.zero_bytes.to_le_bytes());
        self.write_frame(KIND_END, &fixed, &[])?;
        self.flush()?;
        // Anything written after End would never be read.
        self.broken = true;
        Ok(StreamStats {
            frames: self.frames,
            bytes: self.bytes,
            memory_bytes: self.memory_bytes,
            zero_bytes: self.zero_bytes,
        })
    }

    /// Ends the stream with an Abandon frame saying why (cut to [`MAX_ABANDON_REASON`] bytes at a
    /// character boundary) and flushes: the reader learns the stream was given up on purpose
    /// rather than cut. Nothing more can be written.
    pub fn abandon(&mut self, reason: &str) -> Result<(), StreamError> {
        self.check_usable()?;
        let mut end = reason.len().min(MAX_ABANDON_REASON);
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        self.write_frame(KIND_ABANDON, &[], &reason.as_bytes()[..end])?;
        self.flush()?;
        self.broken = true;
        Ok(())
    }

    /// Flushes what was written so far (a migration waits for its peer's answer between frames).
    pub fn flush(&mut self) -> Result<(), StreamError> {
        self.check_usable()?;
        if let Err(e) = self.out.flush() {
            self.broken = true;
            return Err(StreamError::Io(e));
        }
        Ok(())
    }

    /// The inner writer, e.g. to read a socket's answer after a flush; writing to it directly
    /// breaks the stream.
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.out
    }

    /// Bytes written so far (stream header + frames, as stored), for progress reports.
    pub fn bytes_written(&self) -> u64 {
        self.bytes
    }

    fn check_usable(&self) -> Result<(), StreamError> {
        if self.broken {
            return Err(StreamError::Broken { offset: self.bytes });
        }
        Ok(())
    }

    fn check_started(&self, what: &str) -> Result<(), StreamError> {
        if self.frames == 0 && !self.lane {
            return Err(StreamError::Invalid(format!("{what} cannot come before the manifest")));
        }
        Ok(())
    }

    fn check_payload_len(&self, what: &'static str, len: usize) -> Result<(), StreamError> {
        if len > MAX_FRAME_PAYLOAD {
            return Err(StreamError::TooLarge {
                frame: u32::try_from(self.frames).unwrap_or(u32::MAX),
                offset: self.bytes,
                what,
                len: len as u64,
                max: MAX_FRAME_PAYLOAD as u64,
            });
        }
        Ok(())
    }

    /// One frame whose raw payload is `fixed` followed by `body` (at most MAX_FRAME_PAYLOAD bytes
    /// together, which the callers ensure).
    fn write_frame(&mut self, kind: u8, fixed: &[u8], body: &[u8]) -> Result<(), StreamError> {
        let raw_len = fixed.len() + body.len();
        debug_assert!(raw_len <= MAX_FRAME_PAYLOAD);
        let seq = u32::try_from(self.frames)
            .map_err(|_| StreamError::Invalid(format!("a stream carries at most {} frames", u32::MAX)))?;

        let mut compressed = false;
        if let Some(compressor) = self.compressor.as_mut() {
            let input: &[u8] = if fixed.is_empty() {
                body
            } else {
                self.staged.clear();
                self.staged.extend_from_slice(fixed);
                self.staged.extend_from_slice(body);
                &self.staged
            };
            // Room for the worst case, so zstd never fails for lack of it; kept between frames.
            self.packed.clear();
            self.packed.reserve(zstd::compress_bound(input.len()));
            let n = compressor
                .compress_to_buffer(input, &mut self.packed)
                .map_err(|e| StreamError::Compression(format!("frame {seq} (byte {}): {e}", self.bytes)))?;
            compressed = n < raw_len;
        }

        let (flags, stored_len) = if compressed { (FLAG_ZSTD, self.packed.len()) } else { (0, raw_len) };
        // Both lengths are at most MAX_FRAME_PAYLOAD, which fits a u32 (asserted above).
        let header = frame_header(kind, flags, seq, stored_len as u32, raw_len as u32);
        let empty: &[u8] = &[];
        let pieces: [&[u8]; 2] = if compressed { [&self.packed, empty] } else { [fixed, body] };
        let mut hasher = Hasher::default();
        hasher.update(&header);
        for piece in pieces {
            hasher.update(piece);
        }
        let checksum = hasher.finish().to_le_bytes();

        let out = &mut self.out;
        let written = out
            .write_all(&header)
            .and_then(|()| pieces.iter().try_for_each(|piece| out.write_all(piece)))
            .and_then(|()| out.write_all(&checksum));
        if let Err(e) = written {
            self.broken = true;
            return Err(StreamError::Io(e));
        }
        self.frames += 1;
        self.bytes += FRAME_OVERHEAD + stored_len as u64;
        Ok(())
    }
}

/// Reads a stream, checking everything: the header, each frame's checksum, sequence number, kind,
/// flags, lengths, alignment and place in the stream, and the totals of End. A frame is only
/// returned once it is checked whole. Memory is read straight into the `Vec` returned (compressed
/// payloads go through one reused buffer), so wrapping `input` in a `BufReader` only pays for
/// small frames.
///
/// After an error every later call returns [`StreamError::Broken`]: the position in the stream is
/// unknown.
pub struct StreamReader<R: Read> {
    input: R,
    offset: u64,
    /// Frames accepted so far, which is the sequence number of the next one.
    frames: u64,
    memory_bytes: u64,
    zero_bytes: u64,
    state_seen: bool,
    /// A lane (`StreamWriter::lane`): memory without a manifest, and nothing else.
    lane: bool,
    ended: bool,
    broken: bool,
    /// Compressed payloads; grows to the largest seen (at most MAX_FRAME_PAYLOAD) and is reused.
    stored: Vec<u8>,
    decompressor: Option<Decompressor<'static>>,
}

impl<R: Read> StreamReader<R> {
    /// Reads a lane of a migration (`StreamWriter::lane`): Memory, Zero and End frames only.
    pub fn lane(input: R) -> Result<Self, StreamError> {
        let mut reader = Self::new(input)?;
        reader.lane = true;
        Ok(reader)
    }

    /// Reads and checks the stream header.
    pub fn new(input: R) -> Result<Self, StreamError> {
        let mut reader = StreamReader {
            input,
            offset: 0,
            frames: 0,
            memory_bytes: 0,
            zero_bytes: 0,
            state_seen: false,
            lane: false,
            ended: false,
            broken: false,
            stored: Vec::new(),
            decompressor: None,
        };
        let mut header = [0u8; STREAM_HEADER_LEN];
        let got = reader.read_some(&mut header)?;
        // A short input that does not even start like a stream is not a stream, rather than a
        // truncated one.
        let magic_part = got.min(STREAM_MAGIC.len());
        if header[..magic_part] != STREAM_MAGIC[..magic_part] {
            return Err(StreamError::NotAStream);
        }
        if got < STREAM_HEADER_LEN {
            return Err(StreamError::Truncated { offset: reader.offset });
        }
        let found = le_u32(&header, 8);
        if found != STREAM_VERSION {
            return Err(StreamError::UnsupportedVersion { found, supported: STREAM_VERSION });
        }
        Ok(reader)
    }

    /// The next frame, checked (checksum, seq, kind, flags, lengths, alignment, first frame is
    /// Manifest, at most one Manifest and one State, nothing after End: `next_frame()` after End
    /// returns Ok(None)); decompressed. Ok(None) only after End was read. EOF before End
    /// (anywhere, including mid-frame) is [`StreamError::Truncated`].
    pub fn next_frame(&mut self) -> Result<Option<Frame>, StreamError> {
        if self.ended {
            return Ok(None);
        }
        if self.broken {
            return Err(StreamError::Broken { offset: self.offset });
        }
        match self.read_frame() {
            Ok(frame) => Ok(Some(frame)),
            Err(e) => {
                self.broken = true;
                Err(e)
            }
        }
    }

    /// Bytes consumed so far.
    pub fn bytes_read(&self) -> u64 {
        self.offset
    }

    /// The input, positioned after the last byte consumed (after End once it was read).
    pub fn into_inner(self) -> R {
        self.input
    }

    fn read_frame(&mut self) -> Result<Frame, StreamError> {
        let start = self.offset;
        let index = u32::try_from(self.frames).unwrap_or(u32::MAX);
        let bad = |reason: String| StreamError::BadFrame { frame: index, offset: start, reason };
        let too_large = |what: &'static str, len: u32| StreamError::TooLarge {
            frame: index,
            offset: start,
            what,
            len: len.into(),
            max: MAX_FRAME_PAYLOAD as u64,
        };

        let mut header = [0u8; FRAME_HEADER_LEN];
        self.read_exact(&mut header)?;
        let kind = header[0];
        let flags = header[1];
        let reserved = u16::from_le_bytes([header[2], header[3]]);
        let seq = le_u32(&header, 4);
        let stored_len = le_u32(&header, 8);
        let raw_len = le_u32(&header, 12);
        // The one field trusted before the checksum: it says how much to read, so it is bounded
        // before anything is allocated.
        if stored_len as usize > MAX_FRAME_PAYLOAD {
            return Err(too_large("stored payload", stored_len));
        }
        let stored_len = stored_len as usize;
        let compressed = flags & FLAG_ZSTD != 0;

        // The payload: compressed, into the reused buffer; raw, its fixed fields onto the stack and
        // the rest straight into the Vec that will be returned.
        let mut hasher = Hasher::default();
        hasher.update(&header);
        let mut fixed = [0u8; END_FIXED];
        let mut body = Vec::new();
        if compressed {
            if self.stored.len() < stored_len {
                self.stored.resize(stored_len, 0);
            }
            let mut stored = std::mem::take(&mut self.stored);
            let read = self.read_exact(&mut stored[..stored_len]);
            self.stored = stored;
            read?;
            hasher.update(&self.stored[..stored_len]);
        } else {
            let n = fixed_len(kind).min(stored_len);
            self.read_exact(&mut fixed[..n])?;
            hasher.update(&fixed[..n]);
            body = vec![0u8; stored_len - n];
            self.read_exact(&mut body)?;
            hasher.update(&body);
        }
        let mut checksum = [0u8; CHECKSUM_LEN];
        self.read_exact(&mut checksum)?;
        if u64::from_le_bytes(checksum) != hasher.finish() {
            return Err(StreamError::Checksum { frame: index, offset: start });
        }

        // The header, now that it is known to be what the writer wrote.
        if reserved != 0 {
            return Err(bad(format!("reserved field is {reserved:#x}, not 0")));
        }
        if flags & !FLAG_ZSTD != 0 {
            return Err(bad(format!("unknown flags {flags:#04x}")));
        }
        if u64::from(seq) != self.frames {
            return Err(bad(format!("sequence number {seq}, expected {}", self.frames)));
        }
        if raw_len as usize > MAX_FRAME_PAYLOAD {
            return Err(too_large("raw payload", raw_len));
        }
        let raw_len = raw_len as usize;
        if !compressed && raw_len != stored_len {
            return Err(bad(format!("uncompressed payload of {stored_len} bytes claims {raw_len}")));
        }
        let name = kind_name(kind);
        let len_ok = match kind {
            KIND_MANIFEST | KIND_STATE => true,
            KIND_MEMORY => raw_len > MEMORY_FIXED && ((raw_len - MEMORY_FIXED) as u64).is_multiple_of(PAGE),
            KIND_ZERO | KIND_END => raw_len == fixed_len(kind),
            KIND_ABANDON => raw_len <= MAX_ABANDON_REASON,
            KIND_DISK => raw_len > DISK_FIXED,
            _ => return Err(bad(format!("unknown frame kind {kind}"))),
        };
        if !len_ok {
            return Err(bad(format!("{name} frame with a payload of {raw_len} bytes")));
        }
        if self.lane && !matches!(kind, KIND_MEMORY | KIND_ZERO | KIND_END | KIND_ABANDON) {
            return Err(bad(format!("a {name} frame in a lane, which carries only memory")));
        }
        if self.frames == 0 && kind != KIND_MANIFEST && kind != KIND_ABANDON && !self.lane {
            return Err(bad(format!("the first frame is {name}, not the manifest")));
        }
        if self.frames != 0 && kind == KIND_MANIFEST {
            return Err(bad("a second manifest".into()));
        }
        if kind == KIND_STATE && self.state_seen {
            return Err(bad("a second machine state".into()));
        }

        if compressed {
            // Into a buffer of exactly raw_len bytes: zstd cannot produce more whatever the input.
            let mut raw = vec![0u8; raw_len];
            let decompressor = match &mut self.decompressor {
                Some(d) => d,
                none => none.insert(Decompressor::new().map_err(|e| {
                    StreamError::Compression(format!("cannot set up zstd for frame {index} (byte {start}): {e}"))
                })?),
            };
            let n = decompressor.decompress_to_buffer(&self.stored[..stored_len], raw.as_mut_slice()).map_err(|e| {
                StreamError::Compression(format!("frame {index} (byte {start}) does not decompress: {e}"))
            })?;
            if n != raw_len {
                return Err(StreamError::Compression(format!(
                    "frame {index} (byte {start}) decompresses to {n} bytes, its header says {raw_len}"
                )));
            }
            let n = fixed_len(kind);
            fixed[..n].copy_from_slice(&raw[..n]);
            if n > 0 {
                raw.copy_within(n.., 0);
                raw.truncate(raw_len - n);
            }
            body = raw;
        }

        let frame = match kind {
            KIND_DISK => {
                let disk = le_u32(&fixed, 0);
                let reserved = le_u32(&fixed, 4);
                let offset = le_u64(&fixed, 8);
                if reserved != 0 {
                    return Err(bad(format!("disk frame's reserved field is {reserved:#x}, not 0")));
                }
                check_disk_range(offset, body.len() as u64).map_err(bad)?;
                Frame::Disk { disk, offset, data: body }
            }
            KIND_ABANDON => {
                let reason = String::from_utf8_lossy(&body).into_owned();
                return Err(StreamError::Abandoned { reason });
            }
            KIND_MANIFEST => Frame::Manifest(body),
            KIND_STATE => {
                self.state_seen = true;
                Frame::State(body)
            }
            KIND_MEMORY => {
                let guest_addr = le_u64(&fixed, 0);
                let len = body.len() as u64;
                check_range(guest_addr, len).map_err(bad)?;
                // Cannot overflow: each frame's data was read into memory.
                self.memory_bytes += len;
                Frame::Memory { guest_addr, data: body }
            }
            KIND_ZERO => {
                let guest_addr = le_u64(&fixed, 0);
                let len = le_u64(&fixed, 8);
                check_range(guest_addr, len).map_err(bad)?;
                self.zero_bytes = self
                    .zero_bytes
                    .checked_add(len)
                    .ok_or_else(|| bad("zero frames add up to more than 2^64 bytes".into()))?;
                Frame::Zero { guest_addr, len }
            }
            _ => {
                let frames = le_u64(&fixed, 0);
                let memory_bytes = le_u64(&fixed, 8);
                let zero_bytes = le_u64(&fixed, 16);
                let totals = [
                    ("frames", frames, self.frames),
                    ("memory bytes", memory_bytes, self.memory_bytes),
                    ("zero bytes", zero_bytes, self.zero_bytes),
                ];
                for (what, claimed, counted) in totals {
                    if claimed != counted {
                        return Err(bad(format!("end frame counts {claimed} {what}, the stream carried {counted}")));
                    }
                }
                self.ended = true;
                Frame::End { frames, memory_bytes, zero_bytes }
            }
        };
        self.frames += 1;
        Ok(frame)
    }

    /// Fills `buf`; EOF first is Truncated at the byte where the input ended.
    fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), StreamError> {
        if self.read_some(buf)? < buf.len() {
            return Err(StreamError::Truncated { offset: self.offset });
        }
        Ok(())
    }

    /// Reads until `buf` is full or the input ends; returns how much was read.
    fn read_some(&mut self, buf: &mut [u8]) -> Result<usize, StreamError> {
        let mut done = 0;
        while done < buf.len() {
            match self.input.read(&mut buf[done..]) {
                Ok(0) => break,
                Ok(n) if n <= buf.len() - done => {
                    done += n;
                    self.offset += n as u64;
                }
                Ok(_) => return Err(StreamError::Io(io::Error::other("the input claims more bytes than asked for"))),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(StreamError::Io(e)),
            }
        }
        Ok(done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::time::Instant;

    /// Deterministic incompressible bytes.
    fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        let mut out = Vec::with_capacity(len + 8);
        while out.len() < len {
            // splitmix64
            x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            out.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
        }
        out.truncate(len);
        out
    }

    /// Compressible bytes: a short pattern repeated.
    fn pattern_bytes(seed: u64, len: usize) -> Vec<u8> {
        (0..len).map(|i| (i as u64 % 61).wrapping_add(seed) as u8).collect()
    }

    fn read_all(bytes: &[u8]) -> Result<Vec<Frame>, StreamError> {
        let mut reader = StreamReader::new(bytes)?;
        let mut frames = Vec::new();
        while let Some(frame) = reader.next_frame()? {
            frames.push(frame);
        }
        assert_eq!(reader.bytes_read(), bytes.len() as u64);
        Ok(frames)
    }

    /// Reads until an error or the end; what a corrupted input must end with is an error.
    fn read_until_error(bytes: &[u8]) -> Result<(), StreamError> {
        let mut reader = StreamReader::new(bytes)?;
        // Each frame consumes at least 24 bytes, so this ends.
        while reader.next_frame()?.is_some() {}
        Ok(())
    }

    /// A small stream of every kind of frame.
    fn small_stream(compress: bool, memory: &[u8]) -> Vec<u8> {
        let mut w = StreamWriter::new(Vec::new(), compress).unwrap();
        w.manifest(&pattern_bytes(1, 40)).unwrap();
        w.memory(0x10_0000, memory).unwrap();
        w.zero(0x20_0000, 3 * 4096).unwrap();
        w.state(&pattern_bytes(2, 100)).unwrap();
        w.finish().unwrap().0
    }

    /// A frame with any header fields, and a correct checksum.
    fn craft_frame(kind: u8, flags: u8, seq: u32, payload: &[u8], raw_len: u32) -> Vec<u8> {
        let mut frame = frame_header(kind, flags, seq, payload.len() as u32, raw_len).to_vec();
        frame.extend_from_slice(payload);
        let sum = crate::digest::checksum(&frame);
        frame.extend_from_slice(&sum.to_le_bytes());
        frame
    }

    fn stream_header() -> Vec<u8> {
        let mut v = STREAM_MAGIC.to_vec();
        v.extend_from_slice(&STREAM_VERSION.to_le_bytes());
        v
    }

    fn manifest_frame() -> Vec<u8> {
        craft_frame(KIND_MANIFEST, 0, 0, b"m", 1)
    }

    fn end_payload(frames: u64, memory: u64, zero: u64) -> Vec<u8> {
        [frames, memory, zero].iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    #[test]
    fn stream_round_trip_all_kinds() {
        for compress in [false, true] {
            let manifest = pattern_bytes(3, 1000);
            let state = random_bytes(4, 5000);
            let compressible = pattern_bytes(5, 3 * MEMORY_FRAME_BYTES + 2 * 4096);
            let random = random_bytes(6, 5 * 4096);

            let mut w = StreamWriter::new(Vec::new(), compress).unwrap();
            w.manifest(&manifest).unwrap();
            w.memory(0, &compressible).unwrap();
            w.zero(1 << 32, 1 << 30).unwrap();
            w.memory(0x4000_0000, &random).unwrap();
            // Pre-copy: the same pages again, later frame wins (for the caller).
            w.memory(0, &random[..4096]).unwrap();
            w.state(&state).unwrap();
            w.zero(0x8000, 4096).unwrap();
            let before_end = w.bytes_written();
            let (out, stats) = w.finish().unwrap();

            assert_eq!(stats.bytes, out.len() as u64);
            assert_eq!(stats.bytes, before_end + 24 + 24);
            // manifest, 4 memory (split), zero, 1 memory, 1 memory, state, zero, end
            assert_eq!(stats.frames, 11);
            assert_eq!(stats.memory_bytes, (compressible.len() + random.len() + 4096) as u64);
            assert_eq!(stats.zero_bytes, (1 << 30) + 4096);

            let frames = read_all(&out).unwrap();
            let mut expected = vec![Frame::Manifest(manifest.clone())];
            for (i, chunk) in compressible.chunks(MEMORY_FRAME_BYTES).enumerate() {
                expected.push(Frame::Memory { guest_addr: (i * MEMORY_FRAME_BYTES) as u64, data: chunk.to_vec() });
            }
            expected.push(Frame::Zero { guest_addr: 1 << 32, len: 1 << 30 });
            expected.push(Frame::Memory { guest_addr: 0x4000_0000, data: random.clone() });
            expected.push(Frame::Memory { guest_addr: 0, data: random[..4096].to_vec() });
            expected.push(Frame::State(state.clone()));
            expected.push(Frame::Zero { guest_addr: 0x8000, len: 4096 });
            expected.push(Frame::End { frames: 10, memory_bytes: stats.memory_bytes, zero_bytes: stats.zero_bytes });
            assert_eq!(frames.len(), expected.len());
            for (got, want) in frames.iter().zip(&expected) {
                assert!(got == want, "compress={compress}: frame differs");
            }
            // Frames split at exactly MEMORY_FRAME_BYTES: the last piece is 2 pages.
            assert!(matches!(&frames[4], Frame::Memory { data, .. } if data.len() == 2 * 4096));
        }
    }

    #[test]
    fn stream_compression_shrinks_compressible_and_keeps_random_raw() {
        let compressible = pattern_bytes(7, 2 * MEMORY_FRAME_BYTES);
        let random = random_bytes(8, MEMORY_FRAME_BYTES);
        let write = |compress: bool, data: &[u8]| {
            let mut w = StreamWriter::new(Vec::new(), compress).unwrap();
            w.manifest(b"manifest").unwrap();
            w.memory(0, data).unwrap();
            w.finish().unwrap()
        };
        let (plain, plain_stats) = write(false, &compressible);
        let (packed, packed_stats) = write(true, &compressible);
        assert!(packed.len() * 20 < plain.len(), "{} vs {}", packed.len(), plain.len());
        assert_eq!(plain_stats.memory_bytes, packed_stats.memory_bytes);
        assert_eq!(plain_stats.frames, packed_stats.frames);
        assert_eq!(read_all(&plain).unwrap(), read_all(&packed).unwrap());

        // Random data does not shrink: stored raw, so the stream is the same size as without (but
        // for the small frames, End's zeros may shrink a little).
        let (plain, _) = write(false, &random);
        let (packed, _) = write(true, &random);
        assert!(packed.len() <= plain.len() && packed.len() + 32 > plain.len(), "{} vs {}", packed.len(), plain.len());
        assert_eq!(read_all(&plain).unwrap(), read_all(&packed).unwrap());
    }

    #[test]
    fn stream_cut_at_every_offset_is_truncated() {
        for compress in [false, true] {
            let stream = small_stream(compress, &random_bytes(9, 4096));
            assert!(read_all(&stream).is_ok());
            for cut in 0..stream.len() {
                match read_until_error(&stream[..cut]) {
                    Err(StreamError::Truncated { offset }) => assert_eq!(offset, cut as u64),
                    other => panic!("compress={compress} cut at {cut}: {other:?}"),
                }
            }
        }
    }

    #[test]
    fn stream_every_flipped_bit_is_an_error() {
        // Compressible memory so the compressed stream does compress its frames.
        for (compress, memory) in [(false, random_bytes(10, 4096)), (true, pattern_bytes(11, 2 * 4096))] {
            let stream = small_stream(compress, &memory);
            let mut copy = stream.clone();
            for bit in 0..stream.len() * 8 {
                copy[bit / 8] ^= 1 << (bit % 8);
                let result = read_until_error(&copy);
                assert!(result.is_err(), "compress={compress} bit {bit} flipped was not noticed");
                copy[bit / 8] ^= 1 << (bit % 8);
            }
            if compress {
                assert!(stream.len() < 4096, "the test stream should be compressed");
            }
        }
    }

    #[test]
    fn stream_error_messages_name_the_place() {
        let mut stream = small_stream(false, &random_bytes(12, 4096));
        // The byte right after the manifest frame's header: in its payload.
        stream[12 + 16] ^= 1;
        let err = read_until_error(&stream).unwrap_err();
        assert!(matches!(err, StreamError::Checksum { frame: 0, offset: 12 }), "{err:?}");
        assert_eq!(err.to_string(), "snapshot stream is corrupt: checksum mismatch in frame 0 (byte 12)");

        let stream = small_stream(false, &random_bytes(12, 4096));
        let err = read_until_error(&stream[..100]).unwrap_err();
        assert!(err.is_truncated());
        assert_eq!(err.to_string(), "snapshot stream ends early at byte 100");

        assert!(matches!(read_until_error(b"VMMSTRX\0\x01\0\0\0"), Err(StreamError::NotAStream)));
        assert!(matches!(read_until_error(b"hello"), Err(StreamError::NotAStream)));
        assert!(matches!(read_until_error(b""), Err(StreamError::Truncated { offset: 0 })));
        let mut v2 = stream_header();
        v2[8] = 2;
        let err = read_until_error(&v2).unwrap_err();
        assert!(matches!(err, StreamError::UnsupportedVersion { found: 2, supported: 1 }));
        for e in [err, StreamError::Truncated { offset: 3 }, StreamError::NotAStream] {
            let text = e.to_string();
            assert!(!text.contains('\n') && text.starts_with(|c: char| c.is_lowercase()), "{text}");
        }
    }

    #[test]
    fn stream_reader_refuses_huge_stored_len_before_reading() {
        /// Endless zeros: reading a 4 GiB payload from it would take long and allocate 4 GiB.
        struct Zeros;
        impl Read for Zeros {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                buf.fill(0);
                Ok(buf.len())
            }
        }
        let mut head = stream_header();
        head.extend_from_slice(&frame_header(KIND_MANIFEST, 0, 0, u32::MAX, u32::MAX));
        let mut reader = StreamReader::new(head.as_slice().chain(Zeros)).unwrap();
        let err = reader.next_frame().unwrap_err();
        assert!(matches!(err, StreamError::TooLarge { frame: 0, offset: 12, len: 0xffff_ffff, .. }), "{err:?}");
        assert_eq!(reader.bytes_read(), 12 + 16);
        assert!(matches!(reader.next_frame(), Err(StreamError::Broken { offset: 28 })));

        // Just over the limit is refused too, and a raw_len over it with a small payload.
        let mut stream = stream_header();
        stream.extend_from_slice(&frame_header(KIND_MANIFEST, 0, 0, MAX_FRAME_PAYLOAD as u32 + 1, 0));
        assert!(matches!(read_until_error(&stream), Err(StreamError::TooLarge { what: "stored payload", .. })));
        let mut stream = stream_header();
        stream.extend(craft_frame(KIND_MANIFEST, FLAG_ZSTD, 0, b"xx", u32::MAX));
        assert!(matches!(read_until_error(&stream), Err(StreamError::TooLarge { what: "raw payload", .. })));
    }

    #[test]
    fn stream_zstd_bomb_is_refused() {
        let mut stream = stream_header();
        let bomb = zstd::bulk::compress(&vec![0u8; 1 << 20], 1).unwrap();
        assert!(bomb.len() < 4096);
        stream.extend(craft_frame(KIND_MANIFEST, FLAG_ZSTD, 0, &bomb, 4096));
        let err = read_until_error(&stream).unwrap_err();
        assert!(matches!(err, StreamError::Compression(_)), "{err:?}");

        // The same with a zstd frame that does not record its size (streaming compressor).
        let mut enc = zstd::stream::Encoder::new(Vec::new(), 1).unwrap();
        enc.write_all(&vec![7u8; 1 << 20]).unwrap();
        let bomb = enc.finish().unwrap();
        let mut stream = stream_header();
        stream.extend(craft_frame(KIND_MANIFEST, FLAG_ZSTD, 0, &bomb, 4096));
        assert!(matches!(read_until_error(&stream), Err(StreamError::Compression(_))));

        // Fewer bytes than raw_len claims is refused as well, and garbage.
        let short = zstd::bulk::compress(&[1u8; 100], 1).unwrap();
        let mut stream = stream_header();
        stream.extend(craft_frame(KIND_MANIFEST, FLAG_ZSTD, 0, &short, 101));
        assert!(matches!(read_until_error(&stream), Err(StreamError::Compression(_))));
        let mut stream = stream_header();
        stream.extend(craft_frame(KIND_MANIFEST, FLAG_ZSTD, 0, b"not zstd at all", 4096));
        assert!(matches!(read_until_error(&stream), Err(StreamError::Compression(_))));
    }

    #[test]
    fn stream_crafted_bad_frames_are_refused() {
        let page_payload = |addr: u64, pages: usize| {
            let mut p = addr.to_le_bytes().to_vec();
            p.resize(8 + pages * 4096, 0xab);
            p
        };
        let zero_payload = |addr: u64, len: u64| [addr.to_le_bytes(), len.to_le_bytes()].concat();
        let frame = |kind: u8, seq: u32, payload: &[u8]| craft_frame(kind, 0, seq, payload, payload.len() as u32);
        let m = page_payload(0, 1);
        let cases: Vec<(&str, Vec<Vec<u8>>)> = vec![
            ("unknown kind", vec![manifest_frame(), frame(9, 1, b"x")]),
            ("kind 0", vec![manifest_frame(), frame(0, 1, b"")]),
            ("bad flags", vec![manifest_frame(), craft_frame(KIND_STATE, 2, 1, b"x", 1)]),
            (
                "reserved",
                vec![{
                    let mut f = frame_header(KIND_MANIFEST, 0, 0, 1, 1).to_vec();
                    f[2] = 1;
                    f.push(b'm');
                    let sum = crate::digest::checksum(&f);
                    f.extend(sum.to_le_bytes());
                    f
                }],
            ),
            ("raw_len != stored_len", vec![craft_frame(KIND_MANIFEST, 0, 0, b"m", 2)]),
            ("seq gap", vec![manifest_frame(), frame(KIND_STATE, 2, b"s")]),
            ("seq repeat", vec![manifest_frame(), frame(KIND_STATE, 0, b"s")]),
            ("first not manifest", vec![frame(KIND_STATE, 0, b"s")]),
            ("first is end", vec![frame(KIND_END, 0, &end_payload(0, 0, 0))]),
            ("two manifests", vec![manifest_frame(), frame(KIND_MANIFEST, 1, b"m")]),
            ("two states", vec![manifest_frame(), frame(KIND_STATE, 1, b"s"), frame(KIND_STATE, 2, b"s")]),
            ("memory misaligned", vec![manifest_frame(), frame(KIND_MEMORY, 1, &page_payload(0x800, 1))]),
            ("memory partial page", vec![manifest_frame(), frame(KIND_MEMORY, 1, &m[..4000])]),
            ("memory no data", vec![manifest_frame(), frame(KIND_MEMORY, 1, &m[..8])]),
            ("memory no address", vec![manifest_frame(), frame(KIND_MEMORY, 1, &m[..4])]),
            ("memory wraps", vec![manifest_frame(), frame(KIND_MEMORY, 1, &page_payload(u64::MAX - 4095, 1))]),
            ("zero misaligned", vec![manifest_frame(), frame(KIND_ZERO, 1, &zero_payload(0x10, 4096))]),
            ("zero empty", vec![manifest_frame(), frame(KIND_ZERO, 1, &zero_payload(0, 0))]),
            ("zero partial", vec![manifest_frame(), frame(KIND_ZERO, 1, &zero_payload(0, 100))]),
            ("zero wraps", vec![manifest_frame(), frame(KIND_ZERO, 1, &zero_payload(1 << 63, 1 << 63))]),
            ("zero short", vec![manifest_frame(), frame(KIND_ZERO, 1, &zero_payload(0, 4096)[..12])]),
            (
                "zero total overflows",
                vec![
                    manifest_frame(),
                    frame(KIND_ZERO, 1, &zero_payload(0, 1 << 63)),
                    frame(KIND_ZERO, 2, &zero_payload(0, 1 << 63)),
                ],
            ),
            ("end frames", vec![manifest_frame(), frame(KIND_END, 1, &end_payload(2, 0, 0))]),
            (
                "end memory",
                vec![manifest_frame(), frame(KIND_MEMORY, 1, &m), frame(KIND_END, 2, &end_payload(2, 0, 0))],
            ),
            ("end zero", vec![manifest_frame(), frame(KIND_END, 1, &end_payload(1, 0, 4096))]),
            ("end long", vec![manifest_frame(), frame(KIND_END, 1, &[end_payload(1, 0, 0), vec![0]].concat())]),
        ];
        for (name, frames) in cases {
            let mut stream = stream_header();
            for f in frames {
                stream.extend(f);
            }
            match read_until_error(&stream) {
                Err(StreamError::BadFrame { reason, .. }) => assert!(!reason.is_empty()),
                other => panic!("{name}: {other:?}"),
            }
        }

        // And the good variants of the same are accepted; nothing after End is read.
        let mut stream = stream_header();
        for f in [
            manifest_frame(),
            frame(KIND_MEMORY, 1, &m),
            frame(KIND_ZERO, 2, &zero_payload(1 << 63, (1 << 63) - 4096)),
            frame(KIND_END, 3, &end_payload(3, 4096, (1 << 63) - 4096)),
        ] {
            stream.extend(f);
        }
        let end = stream.len();
        stream.extend_from_slice(b"trailing bytes are not read");
        let mut reader = StreamReader::new(stream.as_slice()).unwrap();
        while reader.next_frame().unwrap().is_some() {}
        assert!(reader.next_frame().unwrap().is_none());
        assert_eq!(reader.bytes_read(), end as u64);
    }

    #[test]
    fn stream_writer_refuses_what_it_cannot_carry() {
        let invalid = |r: Result<(), StreamError>| matches!(r, Err(StreamError::Invalid(_)));
        let mut w = StreamWriter::new(Vec::new(), false).unwrap();
        assert!(invalid(w.memory(0, &[0; 4096])));
        assert!(invalid(w.state(b"s")));
        assert!(invalid(w.zero(0, 4096)));
        w.manifest(b"m").unwrap();
        assert!(invalid(w.manifest(b"m")));
        assert!(invalid(w.memory(0x800, &[0; 4096])));
        assert!(invalid(w.memory(0, &[0; 4000])));
        assert!(invalid(w.memory(0, &[])));
        assert!(invalid(w.memory(u64::MAX - 4095, &[0; 8192])));
        assert!(invalid(w.zero(0, 0)));
        assert!(invalid(w.zero(0, 100)));
        assert!(invalid(w.zero(4096, u64::MAX - 4095)));
        w.zero(0, 1 << 63).unwrap();
        assert!(invalid(w.zero(0, 1 << 63)));
        let big = vec![0u8; MAX_FRAME_PAYLOAD + 1];
        let err = w.state(&big).unwrap_err();
        assert!(matches!(err, StreamError::TooLarge { frame: 2, what: "machine state", .. }), "{err:?}");
        assert!(err.to_string().contains("4194305"), "{err}");
        // The largest state fits.
        w.state(&big[..MAX_FRAME_PAYLOAD]).unwrap();
        assert!(invalid(w.state(b"s")));
        let (out, stats) = w.finish().unwrap();
        assert_eq!(stats.frames, 4);
        assert_eq!(read_all(&out).unwrap().len(), 4);

        let w = StreamWriter::new(Vec::new(), true).unwrap();
        assert!(matches!(w.finish(), Err(StreamError::Invalid(_))));
    }

    #[test]
    fn stream_writer_is_broken_after_a_write_error() {
        /// Accepts `room` bytes, then fails.
        struct Short {
            room: usize,
        }
        impl Write for Short {
            fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
                if self.room == 0 {
                    return Err(io::Error::other("disk full"));
                }
                let n = buf.len().min(self.room);
                self.room -= n;
                Ok(n)
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        assert!(matches!(StreamWriter::new(Short { room: 5 }, false), Err(StreamError::Io(_))));
        let mut w = StreamWriter::new(Short { room: 100 }, false).unwrap();
        w.manifest(b"m").unwrap();
        assert!(matches!(w.memory(0, &[1; 4096]), Err(StreamError::Io(_))));
        assert!(matches!(w.zero(0, 4096), Err(StreamError::Broken { .. })));
        assert!(matches!(w.finish(), Err(StreamError::Broken { offset: 37 })));
    }

    #[test]
    fn stream_reader_reports_io_errors() {
        struct Failing;
        impl Read for Failing {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                Err(io::Error::other("connection reset"))
            }
        }
        let stream = small_stream(false, &[0u8; 4096]);
        // The manifest frame is 76 bytes with the stream header; the input fails 14 bytes later.
        let mut reader = StreamReader::new((&stream[..90]).chain(Failing)).unwrap();
        assert!(matches!(reader.next_frame(), Ok(Some(Frame::Manifest(_)))));
        assert_eq!(reader.bytes_read(), 76);
        assert!(matches!(reader.next_frame(), Err(StreamError::Io(_))));
        assert!(matches!(reader.next_frame(), Err(StreamError::Broken { offset: 90 })));
    }

    /// Not a benchmark, a sanity check that a large stream goes at memory-ish speed; prints MB/s.
    #[test]
    fn stream_throughput_64mib() {
        let data = pattern_bytes(13, 64 << 20);
        for compress in [false, true] {
            let t = Instant::now();
            let mut w = StreamWriter::new(Vec::with_capacity(70 << 20), compress).unwrap();
            w.manifest(b"m").unwrap();
            w.memory(0, &data).unwrap();
            let (out, stats) = w.finish().unwrap();
            let written = t.elapsed();
            let t = Instant::now();
            let mut reader = StreamReader::new(out.as_slice()).unwrap();
            let mut n = 0;
            while let Some(frame) = reader.next_frame().unwrap() {
                if let Frame::Memory { guest_addr, data: d } = frame {
                    assert_eq!(&data[guest_addr as usize..][..d.len()], d.as_slice());
                    n += d.len();
                }
            }
            let read = t.elapsed();
            assert_eq!(n, data.len());
            let mbs = |d: std::time::Duration| (data.len() as f64 / 1e6) / d.as_secs_f64().max(1e-9);
            eprintln!(
                "compress={compress}: {} bytes on the wire, write {:.0} MB/s, read {:.0} MB/s",
                stats.bytes,
                mbs(written),
                mbs(read)
            );
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Memory { page: u32, pages: usize, seed: u64, random: bool },
        Zero { page: u64, pages: u64 },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u32..1 << 20, 1usize..6, any::<u64>(), any::<bool>())
                .prop_map(|(page, pages, seed, random)| Op::Memory { page, pages, seed, random }),
            (0u64..1 << 40, 1u64..1 << 20).prop_map(|(page, pages)| Op::Zero { page, pages }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

        #[test]
        fn stream_prop_memory_and_zero_frames_round_trip(
            ops in proptest::collection::vec(op(), 0..12),
            compress in any::<bool>(),
        ) {
            let mut w = StreamWriter::new(Vec::new(), compress).unwrap();
            w.manifest(b"manifest").unwrap();
            let mut expected = vec![Frame::Manifest(b"manifest".to_vec())];
            for op in &ops {
                match *op {
                    Op::Memory { page, pages, seed, random } => {
                        let len = pages * 4096;
                        let data = if random { random_bytes(seed, len) } else { pattern_bytes(seed, len) };
                        let guest_addr = u64::from(page) * 4096;
                        w.memory(guest_addr, &data).unwrap();
                        expected.push(Frame::Memory { guest_addr, data });
                    }
                    Op::Zero { page, pages } => {
                        w.zero(page * 4096, pages * 4096).unwrap();
                        expected.push(Frame::Zero { guest_addr: page * 4096, len: pages * 4096 });
                    }
                }
            }
            let (out, stats) = w.finish().unwrap();
            let frames = read_all(&out).unwrap();
            prop_assert_eq!(frames.len(), expected.len() + 1);
            prop_assert_eq!(&frames[..expected.len()], expected.as_slice());
            let end = Frame::End { frames: expected.len() as u64, memory_bytes: stats.memory_bytes, zero_bytes: stats.zero_bytes };
            prop_assert_eq!(&frames[expected.len()], &end);
        }

        #[test]
        fn stream_prop_arbitrary_bytes_after_header_never_panic(tail in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let mut stream = stream_header();
            stream.extend_from_slice(&tail);
            prop_assert!(read_until_error(&stream).is_err());
        }

        #[test]
        fn stream_prop_arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            prop_assert!(read_until_error(&bytes).is_err());
        }

        /// Valid frames followed by garbage: the reader goes through the frames, then fails cleanly.
        #[test]
        fn stream_prop_valid_prefix_then_garbage_never_panics(
            cut in 0usize..400,
            garbage in proptest::collection::vec(any::<u8>(), 0..512),
            compress in any::<bool>(),
        ) {
            let stream = small_stream(compress, &pattern_bytes(14, 4096));
            let cut = cut.min(stream.len() - 1);
            let mut bytes = stream[..cut].to_vec();
            bytes.extend_from_slice(&garbage);
            // The garbage may by chance rebuild the cut bytes: only an error or the exact stream.
            if let Ok(()) = read_until_error(&bytes) {
                prop_assert!(bytes.starts_with(&stream));
            }
        }
    }
}
