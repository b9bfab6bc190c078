//! The messages between vmm and the agent in a guest (the Linux `vmm-guest-agent`, the test
//! guest's responder), over any byte stream (vsock, a Unix socket in tests).
//!
//! Every message is one frame (docs/agent-protocol.md):
//!
//! ```text
//! u32 LE  body length (8 + payload), at most MAX_BODY
//! u8      protocol version (1)
//! u8      kind
//! u16 LE  reserved, 0
//! u32 LE  id: a reply carries the id of its request
//! ...     payload, by kind
//! ```
//!
//! `no_std` and allocation-free: frames are encoded into and decoded from caller buffers, so the
//! test guest (a bare-metal kernel) speaks it too. Decoding never trusts a length: a frame that
//! claims more than MAX_BODY, or a payload that does not fit its kind, is an error.

#![no_std]

/// The protocol version this crate speaks.
pub const VERSION: u8 = 1;
/// Bytes before the body: its length.
pub const LEN_BYTES: usize = 4;
/// Bytes of the body before the payload.
pub const BODY_HEADER: usize = 8;
/// Largest body accepted (64 KiB: exec output is truncated to fit).
pub const MAX_BODY: usize = 64 * 1024;
/// Largest frame.
pub const MAX_FRAME: usize = LEN_BYTES + MAX_BODY;
/// The vsock port agents listen on.
pub const AGENT_PORT: u32 = 52;
/// Most bytes of one AddEntropy request.
pub const MAX_ENTROPY: usize = 512;

const KIND_PING: u8 = 0x01;
const KIND_QUIESCE: u8 = 0x02;
const KIND_THAW: u8 = 0x03;
const KIND_SET_TIME: u8 = 0x04;
const KIND_ADD_ENTROPY: u8 = 0x05;
const KIND_EXEC: u8 = 0x06;
const KIND_OK: u8 = 0x80;
const KIND_ERROR: u8 = 0x81;
const KIND_EXEC_RESULT: u8 = 0x82;

/// A message; payloads borrow from the buffer it was decoded from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Message<'a> {
    /// Is an agent there? Answered with `Ok(agent name and version)`.
    Ping,
    /// Flush and freeze the guest's file systems (after the pre-freeze hooks). The agent thaws
    /// by itself `timeout_ms` after it replied, if no Thaw came.
    Quiesce { timeout_ms: u32 },
    /// Thaw the file systems, then run the post-thaw hooks.
    Thaw,
    /// Set the guest's wall clock (CLOCK_REALTIME) to `secs`.`nanos` since the Unix epoch.
    SetTime { secs: i64, nanos: u32 },
    /// Mix these random bytes into the guest's entropy pool, credited (at most MAX_ENTROPY).
    AddEntropy(&'a [u8]),
    /// Run `argv` (NUL-terminated strings, concatenated), killed after `timeout_ms`.
    Exec { timeout_ms: u32, argv: &'a [u8] },
    /// Done; a short text says what was done.
    Ok(&'a str),
    /// Not done; why.
    Error(&'a str),
    /// The result of an Exec: exit status (or -signal), its output (possibly truncated).
    ExecResult { status: i32, stdout: &'a [u8], stderr: &'a [u8] },
}

/// A message and its id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frame<'a> {
    pub id: u32,
    pub message: Message<'a>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    /// The peer speaks another protocol version.
    Version(u8),
    /// A kind this version does not know.
    UnknownKind(u8),
    /// A body length over MAX_BODY (or under the body header).
    BadLength(u32),
    /// A payload that does not fit its kind.
    Malformed(&'static str),
    /// The output buffer is too small for the frame.
    NoRoom,
}

impl core::fmt::Display for Error {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Error::Version(v) => write!(f, "agent protocol version {v}, this side speaks {VERSION}"),
            Error::UnknownKind(k) => write!(f, "unknown agent message kind {k:#x}"),
            Error::BadLength(n) => write!(f, "agent frame of {n} bytes (at most {MAX_BODY})"),
            Error::Malformed(what) => write!(f, "malformed agent message: {what}"),
            Error::NoRoom => write!(f, "agent message too large for its buffer"),
        }
    }
}

impl<'a> Message<'a> {
    fn kind(&self) -> u8 {
        match self {
            Message::Ping => KIND_PING,
            Message::Quiesce { .. } => KIND_QUIESCE,
            Message::Thaw => KIND_THAW,
            Message::SetTime { .. } => KIND_SET_TIME,
            Message::AddEntropy(_) => KIND_ADD_ENTROPY,
            Message::Exec { .. } => KIND_EXEC,
            Message::Ok(_) => KIND_OK,
            Message::Error(_) => KIND_ERROR,
            Message::ExecResult { .. } => KIND_EXEC_RESULT,
        }
    }

    /// A short name, for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Message::Ping => "ping",
            Message::Quiesce { .. } => "quiesce",
            Message::Thaw => "thaw",
            Message::SetTime { .. } => "set-time",
            Message::AddEntropy(_) => "add-entropy",
            Message::Exec { .. } => "exec",
            Message::Ok(_) => "ok",
            Message::Error(_) => "error",
            Message::ExecResult { .. } => "exec-result",
        }
    }
}

/// Writes pieces one after another into a buffer.
struct Out<'b> {
    buf: &'b mut [u8],
    at: usize,
}

impl Out<'_> {
    fn put(&mut self, bytes: &[u8]) -> Result<(), Error> {
        let end = self.at.checked_add(bytes.len()).ok_or(Error::NoRoom)?;
        self.buf.get_mut(self.at..end).ok_or(Error::NoRoom)?.copy_from_slice(bytes);
        self.at = end;
        Ok(())
    }
}

/// Encodes `frame` at the start of `out`; returns the frame's length in bytes.
pub fn encode(frame: &Frame<'_>, out: &mut [u8]) -> Result<usize, Error> {
    let mut o = Out { buf: out, at: LEN_BYTES };
    o.put(&[VERSION, frame.message.kind(), 0, 0])?;
    o.put(&frame.id.to_le_bytes())?;
    match frame.message {
        Message::Ping | Message::Thaw => {}
        Message::Quiesce { timeout_ms } => o.put(&timeout_ms.to_le_bytes())?,
        Message::SetTime { secs, nanos } => {
            o.put(&secs.to_le_bytes())?;
            o.put(&nanos.to_le_bytes())?;
        }
        Message::AddEntropy(bytes) => {
            if bytes.len() > MAX_ENTROPY {
                return Err(Error::Malformed("more entropy than MAX_ENTROPY"));
            }
            o.put(bytes)?;
        }
        Message::Exec { timeout_ms, argv } => {
            o.put(&timeout_ms.to_le_bytes())?;
            o.put(argv)?;
        }
        Message::Ok(text) | Message::Error(text) => o.put(text.as_bytes())?,
        Message::ExecResult { status, stdout, stderr } => {
            o.put(&status.to_le_bytes())?;
            o.put(&(stdout.len() as u32).to_le_bytes())?;
            o.put(stdout)?;
            o.put(stderr)?;
        }
    }
    let body = o.at - LEN_BYTES;
    if body > MAX_BODY {
        return Err(Error::NoRoom);
    }
    o.buf[..LEN_BYTES].copy_from_slice(&(body as u32).to_le_bytes());
    Ok(o.at)
}

/// The length of the frame `buf` starts with, once its length field is there (`None` before):
/// callers read that many bytes, then `decode`.
pub fn frame_len(buf: &[u8]) -> Result<Option<usize>, Error> {
    let Some(len) = buf.get(..LEN_BYTES) else { return Ok(None) };
    let body = u32::from_le_bytes([len[0], len[1], len[2], len[3]]);
    if (body as usize) < BODY_HEADER || body as usize > MAX_BODY {
        return Err(Error::BadLength(body));
    }
    Ok(Some(LEN_BYTES + body as usize))
}

/// Decodes the frame at the start of `buf`: `Ok(None)` while it is incomplete, else the frame
/// and its length.
pub fn decode<'a>(buf: &'a [u8]) -> Result<Option<(Frame<'a>, usize)>, Error> {
    let Some(total) = frame_len(buf)? else { return Ok(None) };
    let Some(frame) = buf.get(LEN_BYTES..total) else { return Ok(None) };
    let (version, kind) = (frame[0], frame[1]);
    if version != VERSION {
        return Err(Error::Version(version));
    }
    if frame[2] != 0 || frame[3] != 0 {
        return Err(Error::Malformed("reserved bytes are not zero"));
    }
    let id = u32::from_le_bytes([frame[4], frame[5], frame[6], frame[7]]);
    let p = &frame[BODY_HEADER..];
    let exact = |n: usize, what: &'static str| if p.len() == n { Ok(()) } else { Err(Error::Malformed(what)) };
    let u32_at = |i: usize| u32::from_le_bytes([p[i], p[i + 1], p[i + 2], p[i + 3]]);
    let text = |b: &'a [u8]| core::str::from_utf8(b).map_err(|_| Error::Malformed("text is not UTF-8"));
    let message = match kind {
        KIND_PING => exact(0, "ping carries nothing").map(|()| Message::Ping)?,
        KIND_THAW => exact(0, "thaw carries nothing").map(|()| Message::Thaw)?,
        KIND_QUIESCE => exact(4, "quiesce carries a timeout").map(|()| Message::Quiesce { timeout_ms: u32_at(0) })?,
        KIND_SET_TIME => {
            exact(12, "set-time carries seconds and nanoseconds")?;
            let secs = i64::from_le_bytes([p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7]]);
            let nanos = u32_at(8);
            if nanos >= 1_000_000_000 {
                return Err(Error::Malformed("nanoseconds of a second over 999999999"));
            }
            Message::SetTime { secs, nanos }
        }
        KIND_ADD_ENTROPY => {
            if p.len() > MAX_ENTROPY {
                return Err(Error::Malformed("more entropy than MAX_ENTROPY"));
            }
            Message::AddEntropy(p)
        }
        KIND_EXEC => {
            if p.len() < 5 || p.last() != Some(&0) {
                return Err(Error::Malformed("exec carries a timeout and NUL-terminated arguments"));
            }
            Message::Exec { timeout_ms: u32_at(0), argv: &p[4..] }
        }
        KIND_OK => Message::Ok(text(p)?),
        KIND_ERROR => Message::Error(text(p)?),
        KIND_EXEC_RESULT => {
            if p.len() < 8 {
                return Err(Error::Malformed("exec-result carries a status and an output length"));
            }
            let status = u32_at(0) as i32;
            let out_len = u32_at(4) as usize;
            let rest = &p[8..];
            if out_len > rest.len() {
                return Err(Error::Malformed("exec-result output longer than its frame"));
            }
            Message::ExecResult { status, stdout: &rest[..out_len], stderr: &rest[out_len..] }
        }
        other => return Err(Error::UnknownKind(other)),
    };
    Ok(Some((Frame { id, message }, total)))
}

/// The arguments of an Exec, one by one.
pub fn exec_args(argv: &[u8]) -> impl Iterator<Item = &[u8]> {
    argv.split(|&b| b == 0).take(argv.iter().filter(|&&b| b == 0).count())
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec::Vec;

    use super::*;
    use proptest::prelude::*;

    fn round_trip(message: Message<'_>) {
        let mut buf = [0u8; 1024];
        let frame = Frame { id: 7, message };
        let n = encode(&frame, &mut buf).unwrap();
        assert_eq!(frame_len(&buf[..n]).unwrap(), Some(n));
        let (back, used) = decode(&buf[..n]).unwrap().unwrap();
        assert_eq!((back, used), (frame, n));
        // Every strict prefix is incomplete, never an error or a different frame.
        for cut in 0..n {
            assert_eq!(decode(&buf[..cut]), Ok(None), "cut at {cut}");
        }
    }

    #[test]
    fn every_message_round_trips() {
        for m in [
            Message::Ping,
            Message::Quiesce { timeout_ms: 10_000 },
            Message::Thaw,
            Message::SetTime { secs: 1_780_000_000, nanos: 999_999_999 },
            Message::SetTime { secs: -5, nanos: 0 },
            Message::AddEntropy(&[1, 2, 3]),
            Message::Exec { timeout_ms: 5, argv: b"sh\0-c\0echo hi\0" },
            Message::Ok("frozen 2 file systems"),
            Message::Error("no such file system"),
            Message::ExecResult { status: -9, stdout: b"out", stderr: b"err" },
        ] {
            round_trip(m);
        }
    }

    #[test]
    fn bad_frames_are_refused() {
        let mut buf = [0u8; 64];
        let n = encode(&Frame { id: 1, message: Message::Ping }, &mut buf).unwrap();
        let mut v = buf;
        v[4] = 2;
        assert_eq!(decode(&v[..n]), Err(Error::Version(2)));
        let mut k = buf;
        k[5] = 0x42;
        assert_eq!(decode(&k[..n]), Err(Error::UnknownKind(0x42)));
        let huge = (MAX_BODY as u32 + 1).to_le_bytes();
        assert_eq!(decode(&huge), Err(Error::BadLength(MAX_BODY as u32 + 1)));
        assert_eq!(decode(&[3, 0, 0, 0]), Err(Error::BadLength(3)));
        // A ping with a payload, a set-time with bad nanoseconds, an exec without its NUL.
        let n = encode(&Frame { id: 1, message: Message::Ok("x") }, &mut buf).unwrap();
        buf[5] = KIND_PING;
        assert!(matches!(decode(&buf[..n]), Err(Error::Malformed(_))));
        let n =
            encode(&Frame { id: 1, message: Message::SetTime { secs: 0, nanos: 1_000_000_000 } }, &mut buf).unwrap();
        assert!(matches!(decode(&buf[..n]), Err(Error::Malformed(_))));
        let n = encode(&Frame { id: 1, message: Message::Exec { timeout_ms: 1, argv: b"ls\0" } }, &mut buf).unwrap();
        assert!(matches!(decode(&buf[..n - 1]), Ok(None)));
        assert_eq!(encode(&Frame { id: 1, message: Message::Ok("too long") }, &mut [0u8; 12]), Err(Error::NoRoom));
        assert!(
            encode(&Frame { id: 1, message: Message::AddEntropy(&[0; MAX_ENTROPY + 1]) }, &mut [0u8; 1024]).is_err()
        );
    }

    #[test]
    fn exec_arguments_split() {
        let args: Vec<&[u8]> = exec_args(b"sh\0-c\0echo a b\0").collect();
        assert_eq!(args, [&b"sh"[..], b"-c", b"echo a b"]);
    }

    proptest! {
        /// Arbitrary bytes never panic the decoder, and what decodes re-encodes to the same bytes.
        #[test]
        fn arbitrary_bytes_decode_safely(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            if let Ok(Some((frame, n))) = decode(&bytes) {
                let mut buf = [0u8; 512];
                let m = encode(&frame, &mut buf).unwrap();
                prop_assert_eq!(&buf[..m], &bytes[..n]);
            }
        }
    }
}
