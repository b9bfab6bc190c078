//! The source side of a live migration: pre-copy over the connection while the guest runs,
//! throttling a guest that dirties memory faster than the link takes it, then a short pause for
//! the last pages and the machine state, and the hand-over. Until the destination confirms it
//! took over, the guest is the source's: any failure before that lets it run on here, with the
//! pages sent given back to the VM's record of unsaved pages (a later diff or migration is
//! complete).

use std::io::BufWriter;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use snapshot::migration::{Message, MessageError, PROTOCOL_VERSION};
use snapshot::stream::{StreamError, StreamWriter};
use snapshot::PageKind;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::disks::DiskSender;
use super::frames::{self, FramesError, PIECE};
use super::lanes::Lanes;
use super::transport::{self, Connection, Endpoint, Security, SocketHandle, TransportError};
use crate::control::VmControl;
use crate::persist::{self, Job, PersistError};
use crate::vstate::dirty::{DirtyPages, PAGE_SIZE};
use crate::vstate::memory;

/// Throttle steps: the share of the time the guest is held paused while pages are sent.
const THROTTLE_FIRST: u32 = 20;
const THROTTLE_STEP: u32 = 20;
const THROTTLE_MAX: u32 = 95;
/// The throttle holds the guest for its share of each this many bytes sent.
const THROTTLE_WINDOW: u64 = 8 << 20;
/// The machine state and the stream's end, in bytes, as the downtime estimate counts them.
const STATE_ESTIMATE: u64 = 256 << 10;
/// The socket's send queue is kept to what a quarter of the downtime budget sends at the measured rate
/// (the pause waits for it), within these bounds.
const MIN_SEND_QUEUE: u64 = 64 << 10;
const MAX_SEND_QUEUE: u64 = 4 << 20;
/// What the downtime costs besides sending: pausing here, building the machine at the
/// destination (measured: 2–3 ms), the hand-over messages.
const FIXED_DOWNTIME: Duration = Duration::from_millis(3);

/// What to do when the rounds run out before the remainder fits the downtime budget.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OverBudget {
    /// Pause anyway and send the rest: a longer downtime, reported.
    #[default]
    Complete,
    /// Give up: the guest runs on here.
    Abandon,
}

#[derive(Clone, Debug)]
pub struct MigrateOptions {
    pub to: Endpoint,
    pub security: Option<Security>,
    /// The pause the guest may see.
    pub max_downtime: Duration,
    /// Bytes a second on the link at most (None: as fast as it goes).
    pub bandwidth: Option<u64>,
    /// Rounds after the first before `over_budget` decides.
    pub max_rounds: u32,
    pub over_budget: OverBudget,
    /// zstd-compress the frames.
    pub compress: bool,
    /// Longest wait for the peer at any step.
    pub timeout: Duration,
    /// Send the writable disks along (else they are shared storage).
    pub copy_disks: bool,
    /// Connections to send over in parallel (1 to `snapshot::migration::MAX_LANES`).
    pub connections: u8,
}

/// How a migration went.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct MigrationReport {
    pub to: String,
    /// From the request to the destination's confirmation, in ms.
    pub total_ms: f64,
    /// From the pause to the destination's confirmation that it took over, in ms: the machine
    /// is built there by then (unless its backends were still the source's, in a migration on
    /// one host: then the destination builds it after this), and its vCPUs start right after.
    pub downtime_ms: f64,
    /// Bytes through the connection (frames as sent, before TLS).
    pub bytes: u64,
    /// Guest memory sent as data, all rounds together.
    pub memory_bytes: u64,
    /// Rounds after the first full pass.
    pub rounds: u32,
    /// Highest share of time the guest was held paused to let the rounds converge, in %.
    pub throttle_percent: u32,
    /// Bytes sent while the guest was paused for good.
    pub paused_bytes: u64,
    /// Disk data sent, all rounds together (`--copy-disks`).
    #[serde(default)]
    pub disk_bytes: u64,
    /// The rounds ran out: the downtime went over its budget.
    pub over_budget: bool,
    pub tls: bool,
    /// Connections used.
    #[serde(default)]
    pub connections: u8,
}

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("the destination refused the VM: {0}")]
    Refused(String),
    #[error("the connection to the destination failed {during}: {err}")]
    Link { during: &'static str, err: String },
    #[error("the guest dirties memory faster than the link takes it: {rounds} rounds left {left_mib} MiB, which would take {estimate_ms} ms (budget {budget_ms} ms); migration abandoned (--over-budget complete goes on)")]
    NoConvergence { rounds: u32, left_mib: u64, estimate_ms: u64, budget_ms: u64 },
    #[error(transparent)]
    Persist(#[from] PersistError),
    #[error("the guest was stopped for the destination, which did not confirm it took over ({0}): the guest stays paused here; check the destination, and `vmm continue` this VM only if it does not run there")]
    Uncertain(String),
}

impl MigrateError {
    pub fn is_bad_input(&self) -> bool {
        match self {
            MigrateError::Transport(e) => e.is_bad_input(),
            MigrateError::Persist(e) => e.is_bad_input(),
            _ => false,
        }
    }

    pub fn is_cancelled(&self) -> bool {
        matches!(self, MigrateError::Persist(e) if e.is_cancelled())
    }
}

/// The stream being sent, with its pacing and counters.
struct Sender<'a> {
    control: &'a VmControl,
    disks: DiskSender,
    disk_bytes: u64,
    writer: StreamWriter<BufWriter<Connection>>,
    /// The other connections' threads (none over one connection).
    lanes: Lanes,
    job: &'a Job,
    bandwidth: Option<u64>,
    started: Instant,
    memory_bytes: u64,
    buf: Vec<u8>,
}

fn link(during: &'static str) -> impl Fn(StreamError) -> MigrateError {
    move |e| MigrateError::Link { during, err: frames::describe(&e) }
}

fn message_error(during: &'static str) -> impl Fn(MessageError) -> MigrateError {
    move |e| MigrateError::Link { during, err: describe(&e) }
}

/// Says what a failed read of the destination's answer means: a socket timeout reads as
/// "resource temporarily unavailable", a TLS alert as a bare alert name.
fn describe(e: &MessageError) -> String {
    match e {
        MessageError::Io(io) if matches!(io.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
            "the destination did not answer in time".into()
        }
        MessageError::Io(io) if io.get_ref().is_some_and(|inner| inner.is::<rustls::Error>()) => {
            format!("the destination ended the TLS session ({io}): does it trust this side's certificate?")
        }
        other => other.to_string(),
    }
}

impl Sender<'_> {
    /// Sends guest memory `[addr, addr + len)` as read now (`zero`: as zeros, unread), each
    /// piece on its connection.
    fn send_range(&mut self, addr: u64, len: u64, zero: bool, during: &'static str) -> Result<(), MigrateError> {
        for (at, n) in frames::split_aligned(&[(addr, len)], PIECE as u64) {
            match self.lanes.lane_of(at) {
                0 if zero => {
                    self.writer.zero(at, n).map_err(link(during))?;
                    self.job.progress.advance(n).map_err(PersistError::from)?;
                }
                0 => {
                    self.memory_bytes +=
                        frames::write_range(&mut self.writer, &self.control.mem, &mut self.buf, at, n as usize)
                            .map_err(|e| match e {
                                FramesError::Memory { .. } => PersistError::Inconsistent(e.to_string()).into(),
                                FramesError::Stream(e) => link(during)(e),
                            })?;
                    self.job.progress.advance(n).map_err(PersistError::from)?;
                }
                lane => self.lanes.send(lane, at, n, zero).map_err(|err| MigrateError::Link { during, err })?,
            }
            self.pace()?;
        }
        Ok(())
    }

    /// Stream bytes written on every connection.
    fn bytes_written(&self) -> u64 {
        self.writer.bytes_written() + self.lanes.bytes()
    }

    /// Writes out what is buffered on every connection.
    fn flush(&mut self, during: &'static str) -> Result<(), MigrateError> {
        self.writer.flush().map_err(link(during))?;
        self.lanes.flush().map_err(|err| MigrateError::Link { during, err })
    }

    /// Holds the sender back to the bandwidth limit (a cancel ends the wait).
    fn pace(&self) -> Result<(), MigrateError> {
        if let Some(limit) = self.bandwidth {
            let due = Duration::from_secs_f64(self.bytes_written() as f64 / limit as f64);
            while let Some(wait) = due.checked_sub(self.started.elapsed()) {
                self.job.progress.check().map_err(PersistError::from)?;
                std::thread::sleep(wait.min(Duration::from_millis(10)));
            }
        }
        Ok(())
    }

    /// Sends every page of `dirty`; with a throttle, the guest is held paused while `throttle`%
    /// of each [`THROTTLE_WINDOW`] bytes go (so it runs, and dirties, only for the rest of the
    /// time, and the link never idles for it).
    fn send_pages(&mut self, dirty: &DirtyPages, throttle: u32) -> Result<(), MigrateError> {
        let pieces = frames::split_aligned(&dirty.ranges(), PIECE as u64);
        let held_bytes = THROTTLE_WINDOW * u64::from(throttle) / 100;
        let mut window = 0u64;
        let mut paused = None;
        for (addr, len) in pieces {
            if window == 0 && held_bytes > 0 {
                paused = Some(self.control.pause_for().map_err(PersistError::from)?);
            }
            self.send_range(addr, len, false, "a pre-copy round")?;
            window += len;
            if paused.is_some() && window >= held_bytes {
                // What the guest must not wait for is on its way before it runs again.
                self.flush("a pre-copy round")?;
                paused = None;
            }
            if window >= THROTTLE_WINDOW {
                window = 0;
            }
        }
        drop(paused);
        Ok(())
    }

    /// Sends the disk chunks of `written`.
    fn send_disks(&mut self, written: &[Vec<u64>]) -> Result<(), MigrateError> {
        let (job, total) = (self.job, &mut self.disk_bytes);
        self.disks.send_written(&mut self.writer, written, |n| {
            *total += n;
            job.progress.advance(n).map_err(|e| PersistError::from(e).into())
        })
    }

    /// The first pass: every page (pages known never touched go as Zero frames at once).
    fn send_all(&mut self) -> Result<(), MigrateError> {
        let kinds = memory::page_kinds(&self.control.mem, self.control.memory_loaded());
        let regions: Vec<(u64, u64)> = self.control.mem.iter().map(|r| (r.start_addr().0, r.len())).collect();
        for ((base, size), kinds) in regions.into_iter().zip(kinds) {
            let pages = size / PAGE_SIZE;
            let step = PIECE as u64 / PAGE_SIZE;
            let mut p = 0;
            while p < pages {
                let n = step.min(pages - p);
                let addr = base + p * PAGE_SIZE;
                let untouched = kinds
                    .as_ref()
                    .is_some_and(|k| k[p as usize..(p + n) as usize].iter().all(|k| *k == PageKind::Zero));
                self.send_range(addr, n * PAGE_SIZE, untouched, "the first pass")?;
                p += n;
            }
        }
        Ok(())
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Migrates the running VM to `opts.to`. On success the guest is paused for good (the
/// destination runs it) and the caller ends this VM; on failure it runs on here as before.
pub fn migrate(
    control: &VmControl,
    opts: &MigrateOptions,
    job: &std::sync::Arc<Job>,
) -> Result<MigrationReport, MigrateError> {
    let started = Instant::now();
    job.set_phase("connecting");
    job.progress.set_total(memory::total_bytes(&control.mem));
    let mut conns = connect_all(opts)?;
    let conn = conns.remove(0);
    let tls = conn.is_tls();
    let lanes = Lanes::start(conns, &control.mem, job, opts.compress).map_err(TransportError::from)?;
    let mut sockets = lanes.sockets();
    sockets.push(conn.handle().map_err(TransportError::from)?);
    // Cancelling the job (Ctrl-C of `vmm migrate`, `vmm migrate --cancel`) cuts the connections,
    // so a sender blocked on a slow link notices at once.
    let _watch = CancelWatch::start(job, sockets);
    // A resumed VM whose memory is still coming in: all of it is needed.
    control.finish_memory_load(&|| job.progress.is_cancelled()).map_err(PersistError::from)?;
    job.progress.check().map_err(PersistError::from)?;
    control.start_tracking().map_err(PersistError::from)?;
    let disks = DiskSender::open(control, opts.copy_disks)?;
    let disk_total: u64 = disks.sizes().iter().map(|(_, size)| size).sum();
    job.progress.set_total(memory::total_bytes(&control.mem) + disk_total);
    let writer =
        StreamWriter::new(BufWriter::with_capacity(1 << 20, conn), opts.compress).map_err(link("the handshake"))?;
    let mut sender = Sender {
        control,
        disks,
        disk_bytes: 0,
        writer,
        lanes,
        job,
        bandwidth: opts.bandwidth,
        started,
        memory_bytes: 0,
        buf: vec![0u8; PIECE],
    };
    let mut taken = DirtyPages::default();
    let result = run(&mut sender, opts, &mut taken);
    match result {
        Ok(mut report) => {
            report.tls = tls;
            report.connections = opts.connections;
            report.total_ms = ms(started.elapsed());
            report.to = opts.to.to_string();
            Ok(report)
        }
        Err(e) => {
            // The guest is ours again: what was sent is unsaved still.
            control.layer_failed(&taken);
            sender.disks.give_back(control);
            // A cancel may have cut the connection: the broken link is its doing, not the reason.
            // The destination hears why if the link still takes it.
            if job.progress.check().is_err() {
                let _ = sender.writer.abandon("the migration was cancelled at the source");
                sender.lanes.cut();
                return Err(PersistError::from(snapshot::Error::Cancelled).into());
            }
            // A destination that refused the stream (a corrupt frame, say) said why before it
            // hung up: that is the reason, not the broken pipe.
            let e = match e {
                MigrateError::Link { .. } => refusal(&mut sender).unwrap_or(e),
                e => e,
            };
            // Says why, if the link still takes it (a stream already ended takes nothing more);
            // the other connections have nothing more to carry.
            let _ = sender.writer.abandon(&e.to_string());
            sender.lanes.cut();
            Err(e)
        }
    }
}

/// Opens the migration's connections, each introduced by its Hello (the first one carries the VM
/// and the hand-over; the others, lanes, memory only).
fn connect_all(opts: &MigrateOptions) -> Result<Vec<Connection>, MigrateError> {
    let lanes = opts.connections.clamp(1, snapshot::migration::MAX_LANES);
    let mut session = [0u8; 8];
    rustix::rand::getrandom(&mut session, rustix::rand::GetRandomFlags::empty())
        .map_err(|e| TransportError::from(std::io::Error::from(e)))?;
    let session = u64::from_le_bytes(session);
    let mut conns = Vec::with_capacity(lanes.into());
    for lane in 0..lanes {
        let mut conn = transport::connect(&opts.to, opts.security.as_ref(), opts.timeout)?;
        let hello = Message::Hello { version: PROTOCOL_VERSION, session, lane, lanes };
        if let Err(e) = hello.send(&mut conn) {
            // Turned away already: its answer says why.
            return Err(match answer(&mut conn) {
                Err(why) => why,
                Ok(_) => MigrateError::Link { during: "the handshake", err: e.to_string() },
            });
        }
        conns.push(conn);
    }
    Ok(conns)
}

/// The destination's answer in the handshake; a refusal, a TLS alert or a hang-up as the error.
fn answer(conn: &mut Connection) -> Result<Message, MigrateError> {
    match Message::receive(conn) {
        Ok(Message::Refuse(why)) => Err(MigrateError::Refused(why)),
        Ok(m) => Ok(m),
        Err(e) => Err(MigrateError::Link {
            during: "the handshake",
            err: match &e {
                MessageError::Closed | MessageError::Corrupt(_) => format!(
                    "{}: the destination hung up (is it a vmm receive, with the same TLS or --insecure setting?)",
                    describe(&e)
                ),
                MessageError::Io(io)
                    if matches!(io.kind(), std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe) =>
                {
                    format!(
                        "{io}: the destination hung up (is it a vmm receive, with the same TLS or --insecure setting?)"
                    )
                }
                _ => describe(&e),
            },
        }),
    }
}

/// The destination's refusal waiting on the connection, if there is one.
fn refusal(sender: &mut Sender<'_>) -> Option<MigrateError> {
    let conn = sender.writer_conn();
    conn.set_timeout(Some(Duration::from_millis(500))).ok()?;
    match Message::receive(conn) {
        Ok(Message::Refuse(why)) => Some(MigrateError::Refused(why)),
        _ => None,
    }
}

/// The migration after the connection is made.
fn run(
    sender: &mut Sender<'_>,
    opts: &MigrateOptions,
    taken: &mut DirtyPages,
) -> Result<MigrationReport, MigrateError> {
    let control = sender.control;
    // Handshake: the manifest says what the VM is; the destination checks it can take it.
    let manifest = persist::migration_manifest(control, &sender.disks.sizes());
    // A destination that turned this side away may have closed already: its answer (a refusal,
    // a TLS alert) says why, not the failed write.
    let wrote = sender.writer.manifest(&manifest.encode()).and_then(|()| sender.writer.flush());
    match (answer(sender.writer_conn())?, wrote) {
        (Message::Accept, Ok(())) => {}
        (Message::Accept, Err(e)) => return Err(link("the handshake")(e)),
        (other, _) => return Err(MigrateError::Link { during: "the handshake", err: format!("unexpected {other:?}") }),
    }

    let mut report = MigrationReport::default();
    let budget = opts.max_downtime;
    sender.job.set_phase("copying memory");
    // Everything written from now on is sent again in a later round.
    let first = control.take_unsaved_pages().map_err(PersistError::from)?;
    taken.add(&first);
    sender.disks.take_written(control);
    let round_start = Instant::now();
    let bytes_before = sender.bytes_written();
    sender.send_all()?;
    let (job, disk_bytes) = (sender.job, &mut sender.disk_bytes);
    sender.disks.send_all(&mut sender.writer, |n| {
        *disk_bytes += n;
        job.progress.advance(n).map_err(|e| PersistError::from(e).into())
    })?;
    let mut rate = rate_of(sender.bytes_written() - bytes_before, round_start.elapsed());
    let mut throttle = 0u32;
    let mut previous_left = u64::MAX;
    sender.job.set_phase("converging");
    loop {
        let dirty = control.take_unsaved_pages().map_err(PersistError::from)?;
        taken.add(&dirty);
        let written = sender.disks.take_written(control);
        let left = dirty.count() * PAGE_SIZE + sender.disks.bytes_of(&written);
        let queued = sender.backlog();
        let estimate =
            Duration::from_secs_f64((left + queued + STATE_ESTIMATE) as f64 / rate.max(1.0)) + FIXED_DOWNTIME;
        tracing::debug!(
            "migration: round {} leaves {} KiB, {:.1} ms at {:.0} MiB/s, throttle {throttle}%",
            report.rounds,
            left >> 10,
            ms(estimate),
            rate / (1 << 20) as f64
        );
        if estimate <= budget {
            // Into the pause with what is left.
            return finish(sender, dirty, written, taken, report, throttle);
        }
        if report.rounds >= opts.max_rounds {
            if opts.over_budget == OverBudget::Abandon {
                let e = MigrateError::NoConvergence {
                    rounds: report.rounds,
                    left_mib: left >> 20,
                    estimate_ms: estimate.as_millis() as u64,
                    budget_ms: budget.as_millis() as u64,
                };
                return Err(e);
            }
            report.over_budget = true;
            return finish(sender, dirty, written, taken, report, throttle);
        }
        // A round that did not halve what is left: the guest dirties more than half as fast as
        // the link sends. Hold it back more.
        if report.rounds >= 1 && left * 2 > previous_left {
            throttle = if throttle == 0 { THROTTLE_FIRST } else { (throttle + THROTTLE_STEP).min(THROTTLE_MAX) };
            report.throttle_percent = report.throttle_percent.max(throttle);
        }
        previous_left = left;
        report.rounds += 1;
        // The progress counts each round's pages on top of the first pass.
        let (_, total) = sender.job.progress.get();
        sender.job.progress.set_total(total + left);
        let round_start = Instant::now();
        let bytes_before = sender.bytes_written();
        sender.send_pages(&dirty, throttle)?;
        sender.send_disks(&written)?;
        let sent = sender.bytes_written() - bytes_before;
        if sent >= 4 << 20 {
            rate = rate_of(sent, round_start.elapsed());
        }
        // A send queue longer than the budget allows would be waited for in the pause.
        let queue = ((rate * budget.as_secs_f64() / 4.0) as u64).clamp(MIN_SEND_QUEUE, MAX_SEND_QUEUE);
        let per_connection = queue / sender.lanes.connections();
        let _ = sender.writer_conn().handle().map(|h| h.limit_send_queue(per_connection));
        sender.lanes.limit_send_queue(per_connection);
    }
}

/// Bytes a second.
fn rate_of(bytes: u64, took: Duration) -> f64 {
    bytes as f64 / took.as_secs_f64().max(1e-6)
}

impl Sender<'_> {
    fn writer_conn(&mut self) -> &mut Connection {
        self.writer.get_mut().get_mut()
    }

    /// Bytes written that are still on this side of the link: in the writer's buffer or queued
    /// in the socket (on a slow link, megabytes). The pause waits for them too.
    fn backlog(&mut self) -> u64 {
        let buffered = self.writer.get_mut().buffer().len() as u64;
        let unsent = self.writer_conn().handle().ok().and_then(|h| h.unsent_bytes()).unwrap_or(0);
        buffered + unsent + self.lanes.backlog()
    }
}

/// The pause: the last pages and the machine state, then the hand-over.
fn finish(
    sender: &mut Sender<'_>,
    mut dirty: DirtyPages,
    mut written: Vec<Vec<u64>>,
    taken: &mut DirtyPages,
    mut report: MigrationReport,
    throttle: u32,
) -> Result<MigrationReport, MigrateError> {
    let control = sender.control;
    report.throttle_percent = report.throttle_percent.max(throttle);
    sender.job.set_phase("stopping");
    let mut paused = control.pause_for().map_err(PersistError::from)?;
    let paused_at = Instant::now();
    // A guest its user paused stays paused at the destination.
    let was_running = paused.was_running();
    // Pages written since the last look, by the vCPUs or by devices while they were quiesced.
    let (_, last) = paused.begin_layer().map_err(PersistError::from)?;
    taken.add(&last);
    dirty.add(&last);
    // No disk request is in flight: virtio-blk runs on the vCPU threads, which are stopped.
    for (all, more) in written.iter_mut().zip(sender.disks.take_written(control)) {
        if all.len() < more.len() {
            all.resize(more.len(), 0);
        }
        for (a, m) in all.iter_mut().zip(more) {
            *a |= m;
        }
    }
    let state = persist::encode_state(control, &paused)?;
    // The destination runs on the same disks: what the guest wrote must be on them.
    for d in control.devices.durable_files() {
        d.file.sync_data().map_err(|e| PersistError::Disk(format!("cannot flush disk {}: {e}", d.path)))?;
    }
    let (_, total) = sender.job.progress.get();
    sender.job.progress.set_total(total + dirty.count() * PAGE_SIZE + sender.disks.bytes_of(&written));
    let before = sender.bytes_written();
    sender.writer.state(&state).map_err(link("the final pass"))?;
    for (addr, len) in dirty.ranges() {
        sender.send_range(addr, len, false, "the final pass")?;
    }
    sender.send_disks(&written)?;
    // End of the streams: the destination checks it holds every page and builds the machine.
    sender.lanes.end().map_err(|err| MigrateError::Link { during: "the final pass", err })?;
    sender.writer.end().map_err(link("the final pass"))?;
    report.paused_bytes = sender.bytes_written() - before;
    report.bytes = sender.bytes_written();
    report.memory_bytes = sender.memory_bytes + sender.lanes.memory_bytes();
    report.disk_bytes = sender.disk_bytes;
    sender.job.set_phase("handing over");
    let conn = sender.writer_conn();
    match Message::receive(conn).map_err(message_error("the hand-over"))? {
        Message::Ready => {}
        Message::Refuse(why) => return Err(MigrateError::Refused(why)),
        other => return Err(MigrateError::Link { during: "the hand-over", err: format!("unexpected {other:?}") }),
    }
    // From here on the guest must not run here again unless the destination surely will not.
    let commit = if was_running { Message::Commit } else { Message::CommitPaused };
    if let Err(e) = commit.send(conn) {
        // Not sent whole: the destination never runs a VM without its Commit.
        return Err(MigrateError::Link { during: "the hand-over", err: e.to_string() });
    }
    paused.keep_paused();
    match Message::receive(conn) {
        Ok(Message::Committed) => {}
        Ok(other) => return Err(MigrateError::Uncertain(format!("it answered {other:?}"))),
        Err(e) => return Err(MigrateError::Uncertain(describe(&e))),
    }
    report.downtime_ms = ms(paused_at.elapsed());
    drop(paused);
    Ok(report)
}

/// How long a cancelled sender gets to stop by itself before its connections are cut.
const CANCEL_GRACE: Duration = Duration::from_millis(500);

/// Cuts the connection when the job is cancelled.
struct CancelWatch {
    done: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl CancelWatch {
    fn start(job: &std::sync::Arc<Job>, sockets: Vec<SocketHandle>) -> Self {
        use std::sync::atomic::{AtomicBool, Ordering};
        let done = std::sync::Arc::new(AtomicBool::new(false));
        let job = job.clone();
        let flag = done.clone();
        let _ = std::thread::Builder::new().name("migrate-cancel".into()).spawn(move || {
            while !flag.load(Ordering::Acquire) {
                if job.progress.check().is_err() {
                    // The sender notices by itself between pieces and tells the destination
                    // why; one blocked on a full socket is cut loose.
                    let grace = Instant::now();
                    while !flag.load(Ordering::Acquire) && grace.elapsed() < CANCEL_GRACE {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    if !flag.load(Ordering::Acquire) {
                        sockets.iter().for_each(SocketHandle::cut);
                    }
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        Self { done }
    }
}

impl Drop for CancelWatch {
    fn drop(&mut self) {
        self.done.store(true, std::sync::atomic::Ordering::Release);
    }
}
