//! The destination's side of the connections: waiting for the connections of one migration.
//! Each peer is authenticated (TLS) and says its Hello on a thread of its own, so a peer that
//! connects and stays silent holds up no one.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use snapshot::migration::{Message, MAX_LANES, PROTOCOL_VERSION};

use super::transport::{Connection, Listener, Pending, TransportError};

/// Peers being authenticated at once at most; more are turned away.
const MAX_GREETING: usize = 64;
/// How long one look at the listener waits before the arrivals are looked at.
const POLL: Duration = Duration::from_millis(50);
/// The same while peers are being greeted.
const GREETING_POLL: Duration = Duration::from_millis(1);

/// The connections of one incoming migration.
pub struct Incoming {
    /// Connection 0: the VM's stream and the hand-over.
    pub main: Connection,
    /// The other connections, in order: memory only.
    pub lanes: Vec<Connection>,
    /// Who sent it.
    pub peer: String,
}

struct Greeted {
    conn: Connection,
    peer: String,
    session: u64,
    lane: u8,
    lanes: u8,
}

/// The connections of one migration as they come.
struct Session {
    conns: Vec<Option<(Connection, String)>>,
    since: Instant,
}

/// Waits for the connections of one migration on `listener`. A peer that fails the TLS handshake,
/// says no valid Hello within `timeout`, or belongs to no migration that can still complete is
/// turned away, reported through `refused`, and the wait goes on; once one connection of a
/// migration came, its others must come within `timeout`.
pub fn accept_migration(
    listener: &Listener,
    timeout: Duration,
    refused: impl Fn(&str),
) -> Result<Incoming, TransportError> {
    let (tx, rx) = mpsc::channel::<Result<Greeted, String>>();
    let greeting = Arc::new(AtomicUsize::new(0));
    let mut sessions: HashMap<u64, Session> = HashMap::new();
    loop {
        // While peers are being greeted, their results are looked at often: a migration must
        // not wait a whole poll for its hello to be taken in. (Read before the results are: a
        // greeting counted as done has sent its result.)
        let wait = if greeting.load(Ordering::Acquire) > 0 { GREETING_POLL } else { POLL };
        while let Ok(arrived) = rx.try_recv() {
            let g = match arrived {
                Ok(g) => g,
                Err(why) => {
                    refused(&why);
                    continue;
                }
            };
            let session = sessions
                .entry(g.session)
                .or_insert_with(|| Session { conns: (0..g.lanes).map(|_| None).collect(), since: Instant::now() });
            let slot = (session.conns.len() == g.lanes as usize)
                .then(|| session.conns.get_mut(g.lane as usize))
                .flatten()
                .filter(|slot| slot.is_none());
            let Some(slot) = slot else {
                refused(&format!("refused a connection from {}: not a connection its migration expects", g.peer));
                continue;
            };
            *slot = Some((g.conn, g.peer));
            if session.conns.iter().all(Option::is_some) {
                let session = sessions.remove(&g.session).expect("just found");
                let mut conns = session.conns.into_iter().flatten();
                let (main, peer) = conns.next().expect("one connection at least");
                return Ok(Incoming { main, lanes: conns.map(|(c, _)| c).collect(), peer });
            }
        }
        sessions.retain(|_, s| {
            let waiting = s.since.elapsed() < timeout;
            if !waiting {
                let came = s.conns.iter().filter(|c| c.is_some()).count();
                refused(&format!("gave up on a migration: {came} of its {} connections came", s.conns.len()));
            }
            waiting
        });
        let Some(pending) = listener.accept(wait)? else { continue };
        if greeting.load(Ordering::Acquire) >= MAX_GREETING {
            refused(&format!("refused a connection from {}: too many peers connecting at once", pending.peer()));
            continue;
        }
        greeting.fetch_add(1, Ordering::AcqRel);
        let (tx, greeting) = (tx.clone(), greeting.clone());
        let spawned = std::thread::Builder::new().name("migrate-greet".into()).spawn(move || {
            let _ = tx.send(greet(pending, timeout));
            greeting.fetch_sub(1, Ordering::AcqRel);
        });
        if let Err(e) = spawned {
            return Err(TransportError::Io(e));
        }
    }
}

/// Authenticates a peer and reads its Hello.
fn greet(pending: Pending, timeout: Duration) -> Result<Greeted, String> {
    let (mut conn, peer) = pending.establish(timeout).map_err(|e| format!("refused a connection: {e}"))?;
    let refuse = |conn: &mut Connection, why: String| {
        let _ = Message::Refuse(why.clone()).send(conn);
        format!("refused a connection from {peer}: {why}")
    };
    match Message::receive(&mut conn) {
        Ok(Message::Hello { version, .. }) if version != PROTOCOL_VERSION => {
            Err(refuse(&mut conn, format!("it speaks migration protocol {version}, this vmm {PROTOCOL_VERSION}")))
        }
        Ok(Message::Hello { lanes, lane, .. }) if lanes == 0 || lanes > MAX_LANES || lane >= lanes => {
            Err(refuse(&mut conn, format!("connection {lane} of {lanes}: 1 to {MAX_LANES} connections")))
        }
        Ok(Message::Hello { session, lane, lanes, .. }) => Ok(Greeted { conn, peer, session, lane, lanes }),
        Ok(other) => Err(refuse(&mut conn, format!("it began with {other:?}, not a migration's hello"))),
        Err(snapshot::migration::MessageError::Io(e))
            if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) =>
        {
            Err(format!(
                "refused a connection from {peer}: it said nothing for {}",
                humantime::format_duration(timeout)
            ))
        }
        Err(e) => Err(format!("refused a connection from {peer}: not a migration ({e})")),
    }
}
