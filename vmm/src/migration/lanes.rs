//! The extra connections of a migration over several (`--connections N`). Connection 0 carries
//! the VM's stream and the hand-over; each other one (a *lane*) carries, in a stream of its own
//! written by a thread of its own, the memory of every Nth [`PIECE`] of guest physical memory.
//! A page thus always travels on the same connection, so a later copy of it can never overtake
//! an earlier one; the lanes read, check and compress in parallel.

use std::io::BufWriter;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use snapshot::stream::StreamWriter;

use super::frames::{self, PIECE};
use super::transport::{Connection, SocketHandle};
use crate::persist::Job;
use crate::vstate::memory::GuestMemory;

/// Pieces queued for a lane's thread beyond the one it is sending.
const QUEUE: usize = 2;

enum Command {
    /// Send guest memory `[addr, addr + len)` as it is when read.
    Send { addr: u64, len: u64 },
    /// Send `len` bytes of zeros at `addr` (pages known never written).
    Zero { addr: u64, len: u64 },
    /// Answer once everything before is written to the socket.
    Flush(SyncSender<()>),
    /// End the lane's stream.
    End,
}

/// What the sender sees of a lane while its thread writes.
#[derive(Default)]
struct Counters {
    /// Stream bytes written to the connection.
    bytes: AtomicU64,
    /// Guest memory sent as data.
    memory_bytes: AtomicU64,
    /// Bytes handed to the thread and not yet written.
    queued: AtomicU64,
    /// Why the lane failed, once it did.
    failed: Mutex<Option<String>>,
}

struct Lane {
    commands: Option<SyncSender<Command>>,
    thread: Option<JoinHandle<()>>,
    socket: SocketHandle,
    counters: Arc<Counters>,
}

/// The lanes of a migration (none over one connection).
#[derive(Default)]
pub struct Lanes {
    lanes: Vec<Lane>,
}

impl Lanes {
    /// Starts a thread for each connection (lanes 1, 2, … in order); memory is read from `mem`,
    /// and sending it advances `job`'s progress.
    pub fn start(conns: Vec<Connection>, mem: &GuestMemory, job: &Arc<Job>, compress: bool) -> std::io::Result<Self> {
        let mut lanes = Vec::with_capacity(conns.len());
        for (i, conn) in conns.into_iter().enumerate() {
            let socket = conn.handle()?;
            let counters = Arc::new(Counters::default());
            let (tx, rx) = sync_channel(QUEUE);
            let writer = StreamWriter::lane(BufWriter::with_capacity(PIECE + (64 << 10), conn), compress)
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            let (mem, job, c) = (mem.clone(), job.clone(), counters.clone());
            let thread = std::thread::Builder::new()
                .name(format!("migrate-lane{}", i + 1))
                .spawn(move || run(writer, rx, &mem, &job, &c))?;
            lanes.push(Lane { commands: Some(tx), thread: Some(thread), socket, counters });
        }
        Ok(Self { lanes })
    }

    /// Connections in all, the first one's included.
    pub fn connections(&self) -> u64 {
        self.lanes.len() as u64 + 1
    }

    /// The lane (1…) that carries the piece at `addr`; 0: the first connection itself.
    pub fn lane_of(&self, addr: u64) -> usize {
        ((addr / PIECE as u64) % self.connections()) as usize
    }

    /// Sends guest memory `[addr, addr + len)` (inside one piece) on lane `lane` (≥ 1); `zero`:
    /// as zeros without reading it.
    pub fn send(&self, lane: usize, addr: u64, len: u64, zero: bool) -> Result<(), String> {
        let l = &self.lanes[lane - 1];
        l.counters.queued.fetch_add(len, Ordering::Relaxed);
        let command = if zero { Command::Zero { addr, len } } else { Command::Send { addr, len } };
        let sent = l.commands.as_ref().is_some_and(|c| c.send(command).is_ok());
        if sent {
            Ok(())
        } else {
            Err(l.failure(lane))
        }
    }

    /// Waits until every lane wrote all it was given to its socket.
    pub fn flush(&self) -> Result<(), String> {
        let mut waits = Vec::with_capacity(self.lanes.len());
        for (i, l) in self.lanes.iter().enumerate() {
            let (tx, rx) = sync_channel(1);
            if l.commands.as_ref().is_none_or(|c| c.send(Command::Flush(tx)).is_err()) {
                return Err(l.failure(i + 1));
            }
            waits.push(rx);
        }
        for (i, rx) in waits.into_iter().enumerate() {
            if rx.recv().is_err() {
                return Err(self.lanes[i].failure(i + 1));
            }
        }
        Ok(())
    }

    /// Ends every lane's stream and waits for the threads; stream bytes they wrote in all.
    pub fn end(&mut self) -> Result<(), String> {
        for l in &self.lanes {
            if let Some(c) = &l.commands {
                let _ = c.send(Command::End);
            }
        }
        for (i, l) in self.lanes.iter_mut().enumerate() {
            l.commands = None;
            if let Some(t) = l.thread.take() {
                let _ = t.join();
            }
            if let Some(why) = l.counters.failed.lock().unwrap_or_else(|e| e.into_inner()).clone() {
                return Err(format!("connection {}: {why}", i + 1));
            }
        }
        Ok(())
    }

    /// Stream bytes written on the lanes.
    pub fn bytes(&self) -> u64 {
        self.lanes.iter().map(|l| l.counters.bytes.load(Ordering::Relaxed)).sum()
    }

    /// Guest memory the lanes sent as data.
    pub fn memory_bytes(&self) -> u64 {
        self.lanes.iter().map(|l| l.counters.memory_bytes.load(Ordering::Relaxed)).sum()
    }

    /// Bytes given to the lanes that are still on this side of the link: queued for their
    /// threads or in their sockets.
    pub fn backlog(&self) -> u64 {
        self.lanes
            .iter()
            .map(|l| l.counters.queued.load(Ordering::Relaxed) + l.socket.unsent_bytes().unwrap_or(0))
            .sum()
    }

    /// Bounds each lane's socket send queue.
    pub fn limit_send_queue(&self, bytes: u64) {
        for l in &self.lanes {
            let _ = l.socket.limit_send_queue(bytes);
        }
    }

    /// Cuts every lane (a failed migration): their threads end at once.
    pub fn cut(&self) {
        for l in &self.lanes {
            l.socket.cut();
        }
    }

    /// Handles that cut the lanes from another thread (a cancel).
    pub fn sockets(&self) -> Vec<SocketHandle> {
        self.lanes.iter().filter_map(|l| l.socket.try_clone().ok()).collect()
    }
}

impl Lane {
    fn failure(&self, lane: usize) -> String {
        let why = self.counters.failed.lock().unwrap_or_else(|e| e.into_inner()).clone();
        format!("connection {lane}: {}", why.unwrap_or_else(|| "its thread ended".into()))
    }
}

impl Drop for Lanes {
    fn drop(&mut self) {
        for l in &mut self.lanes {
            l.commands = None;
            if let Some(t) = l.thread.take() {
                let _ = t.join();
            }
        }
    }
}

/// A lane's thread: writes what it is given until told to end, or until the connection fails
/// (then it says why and stops taking commands).
fn run(
    mut writer: StreamWriter<BufWriter<Connection>>,
    commands: Receiver<Command>,
    mem: &GuestMemory,
    job: &Job,
    counters: &Counters,
) {
    let mut buf = vec![0u8; PIECE];
    let fail = |why: String| *counters.failed.lock().unwrap_or_else(|e| e.into_inner()) = Some(why);
    while let Ok(command) = commands.recv() {
        let done = match command {
            Command::Send { addr, len } => frames::write_range(&mut writer, mem, &mut buf, addr, len as usize)
                .map_err(|e| match e {
                    frames::FramesError::Stream(e) => frames::describe(&e),
                    e => e.to_string(),
                })
                .map(|data| {
                    counters.memory_bytes.fetch_add(data, Ordering::Relaxed);
                    len
                }),
            Command::Zero { addr, len } => writer.zero(addr, len).map(|()| len).map_err(|e| frames::describe(&e)),
            Command::Flush(answer) => {
                let _ = answer.send(());
                continue;
            }
            Command::End => {
                if let Err(e) = writer.end() {
                    fail(frames::describe(&e));
                }
                counters.bytes.store(writer.bytes_written(), Ordering::Relaxed);
                return;
            }
        };
        let done = done.and_then(|len| writer.flush().map(|()| len).map_err(|e| frames::describe(&e)));
        counters.bytes.store(writer.bytes_written(), Ordering::Relaxed);
        match done {
            Ok(len) => {
                counters.queued.fetch_sub(len, Ordering::Relaxed);
                // A cancel shows in the progress; the sender notices it itself.
                let _ = job.progress.advance(len);
            }
            Err(why) => {
                fail(why);
                return;
            }
        }
    }
}
