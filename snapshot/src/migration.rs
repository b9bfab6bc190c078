//! The handshake and hand-over messages of a live migration (`docs/migration-protocol.md`).
//! The VM itself travels as a snapshot stream (`stream`, read with `streamed::read_migration`);
//! these few messages go between its frames, mostly from the destination back to the source.
//!
//! Encoding (integers little-endian):
//!
//! ```text
//! message = magic "VMMMIG" (6) | kind u8 | reserved u8 (= 0) | len u32 | payload (len) | checksum u64
//! ```
//!
//! `checksum` is xxh3-64 of everything before it. `len` is at most [`MAX_MESSAGE_PAYLOAD`];
//! only Refuse (a UTF-8 reason) and Hello (version u32 | session u64 | lane u8 | lanes u8) have
//! a payload.

use std::io::{self, Read, Write};

use crate::digest::Hasher;

const MAGIC: [u8; 6] = *b"VMMMIG";
const HEADER_LEN: usize = 12;
/// Largest payload a message carries, in bytes (a reader refuses more before allocating).
pub const MAX_MESSAGE_PAYLOAD: usize = 4096;

const KIND_ACCEPT: u8 = 1;
const KIND_REFUSE: u8 = 2;
const KIND_READY: u8 = 3;
const KIND_COMMIT: u8 = 4;
const KIND_COMMITTED: u8 = 5;
const KIND_COMMIT_PAUSED: u8 = 6;
const KIND_HELLO: u8 = 7;
const HELLO_LEN: usize = 14;

/// The migration protocol a Hello names; the only one spoken.
pub const PROTOCOL_VERSION: u32 = 1;
/// Most connections one migration uses.
pub const MAX_LANES: u8 = 16;

/// One message. In the order a migration uses them: destination → source `Accept` (or
/// `Refuse`) once it checked the manifest; `Ready` (or `Refuse`) once it holds the whole VM and
/// can run it; source → destination `Commit`: the source has stopped the guest for good, run it;
/// destination → source `Committed`: it took over. `CommitPaused` is `Commit` for a guest its
/// user had paused: the destination keeps it paused.
///
/// Before all of them, source → destination, each connection of a migration starts with a
/// `Hello`: the protocol version, the migration's random session number, which of its `lanes`
/// connections this is (lane 0 carries the manifest, the state, the disks and these messages;
/// the others only memory).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    Hello { version: u32, session: u64, lane: u8, lanes: u8 },
    Accept,
    Refuse(String),
    Ready,
    Commit,
    Committed,
    CommitPaused,
}

#[derive(Debug, thiserror::Error)]
pub enum MessageError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("the peer closed the connection")]
    Closed,
    #[error("corrupt migration message: {0}")]
    Corrupt(String),
}

impl Message {
    fn kind(&self) -> u8 {
        match self {
            Message::Accept => KIND_ACCEPT,
            Message::Refuse(_) => KIND_REFUSE,
            Message::Ready => KIND_READY,
            Message::Commit => KIND_COMMIT,
            Message::Committed => KIND_COMMITTED,
            Message::CommitPaused => KIND_COMMIT_PAUSED,
            Message::Hello { .. } => KIND_HELLO,
        }
    }

    /// The message's bytes; a Refuse reason is cut to [`MAX_MESSAGE_PAYLOAD`] bytes at a
    /// character boundary.
    pub fn encode(&self) -> Vec<u8> {
        let hello;
        let payload = match self {
            Message::Refuse(reason) => {
                let mut end = reason.len().min(MAX_MESSAGE_PAYLOAD);
                while !reason.is_char_boundary(end) {
                    end -= 1;
                }
                &reason.as_bytes()[..end]
            }
            Message::Hello { version, session, lane, lanes } => {
                let mut b = [0u8; HELLO_LEN];
                b[..4].copy_from_slice(&version.to_le_bytes());
                b[4..12].copy_from_slice(&session.to_le_bytes());
                b[12] = *lane;
                b[13] = *lanes;
                hello = b;
                &hello[..]
            }
            _ => &[][..],
        };
        let mut out = Vec::with_capacity(HEADER_LEN + payload.len() + 8);
        out.extend_from_slice(&MAGIC);
        out.push(self.kind());
        out.push(0);
        out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        out.extend_from_slice(payload);
        let mut hasher = Hasher::default();
        hasher.update(&out);
        out.extend_from_slice(&hasher.finish().to_le_bytes());
        out
    }

    /// Writes the message and flushes.
    pub fn send(&self, out: &mut impl Write) -> io::Result<()> {
        out.write_all(&self.encode())?;
        out.flush()
    }

    /// Reads one message, checking everything; EOF before its first byte is `Closed`.
    pub fn receive(input: &mut impl Read) -> Result<Message, MessageError> {
        let mut header = [0u8; HEADER_LEN];
        let got = read_full(input, &mut header)?;
        if got == 0 {
            return Err(MessageError::Closed);
        }
        if got < HEADER_LEN {
            return Err(MessageError::Corrupt("cut short".into()));
        }
        if header[..6] != MAGIC {
            return Err(MessageError::Corrupt("bad magic".into()));
        }
        let len = u32::from_le_bytes([header[8], header[9], header[10], header[11]]) as usize;
        if len > MAX_MESSAGE_PAYLOAD {
            return Err(MessageError::Corrupt(format!("a payload of {len} bytes")));
        }
        let mut rest = vec![0u8; len + 8];
        if read_full(input, &mut rest)? < rest.len() {
            return Err(MessageError::Corrupt("cut short".into()));
        }
        let mut hasher = Hasher::default();
        hasher.update(&header);
        hasher.update(&rest[..len]);
        let mut sum = [0u8; 8];
        sum.copy_from_slice(&rest[len..]);
        if u64::from_le_bytes(sum) != hasher.finish() {
            return Err(MessageError::Corrupt("checksum mismatch".into()));
        }
        if header[7] != 0 {
            return Err(MessageError::Corrupt("reserved byte is not 0".into()));
        }
        let empty = |m: Message| if len == 0 { Ok(m) } else { Err(MessageError::Corrupt("unexpected payload".into())) };
        match header[6] {
            KIND_ACCEPT => empty(Message::Accept),
            KIND_READY => empty(Message::Ready),
            KIND_COMMIT => empty(Message::Commit),
            KIND_COMMITTED => empty(Message::Committed),
            KIND_COMMIT_PAUSED => empty(Message::CommitPaused),
            KIND_REFUSE => Ok(Message::Refuse(String::from_utf8_lossy(&rest[..len]).into_owned())),
            KIND_HELLO if len == HELLO_LEN => {
                let b = &rest[..len];
                Ok(Message::Hello {
                    version: u32::from_le_bytes(b[..4].try_into().expect("4 bytes")),
                    session: u64::from_le_bytes(b[4..12].try_into().expect("8 bytes")),
                    lane: b[12],
                    lanes: b[13],
                })
            }
            KIND_HELLO => Err(MessageError::Corrupt(format!("a hello of {len} bytes"))),
            kind => Err(MessageError::Corrupt(format!("unknown kind {kind}"))),
        }
    }
}

/// Reads until `buf` is full or the input ends; returns how much was read.
fn read_full(input: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match input.read(&mut buf[done..]) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn all() -> Vec<Message> {
        vec![
            Message::Accept,
            Message::Refuse("no room".into()),
            Message::Ready,
            Message::Commit,
            Message::Committed,
            Message::CommitPaused,
            Message::Hello { version: PROTOCOL_VERSION, session: 0x0123_4567_89ab_cdef, lane: 3, lanes: 4 },
        ]
    }

    #[test]
    fn every_message_round_trips() {
        for m in all() {
            assert_eq!(Message::receive(&mut &m.encode()[..]).unwrap(), m);
        }
        let long = "é".repeat(3000);
        let Message::Refuse(cut) = Message::receive(&mut &Message::Refuse(long).encode()[..]).unwrap() else {
            panic!("not a refusal")
        };
        assert!(cut.len() <= MAX_MESSAGE_PAYLOAD && !cut.is_empty());
    }

    #[test]
    fn an_empty_input_is_a_closed_peer_and_a_cut_one_is_corrupt() {
        assert!(matches!(Message::receive(&mut &[][..]), Err(MessageError::Closed)));
        let bytes = Message::Ready.encode();
        for cut in 1..bytes.len() {
            assert!(matches!(Message::receive(&mut &bytes[..cut]), Err(MessageError::Corrupt(_))), "cut {cut}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = Message::receive(&mut &bytes[..]);
        }

        #[test]
        fn any_damaged_message_is_refused(which in 0usize..7, at in any::<usize>(), xor in 1u8..=255) {
            let mut bytes = all()[which].encode();
            let at = at % bytes.len();
            bytes[at] ^= xor;
            prop_assert!(Message::receive(&mut &bytes[..]).is_err());
        }
    }
}
