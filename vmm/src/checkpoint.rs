//! Periodic checkpoints: the VM saves itself into a directory of its own at an interval (fixed,
//! or chosen from the measured cost of a checkpoint and the host's mean time between failures),
//! and on `SIGUSR1`. Checkpoints are a chain: a full snapshot, then diffs of it (`--diff`), so
//! each costs what changed since the previous one. `DIR/latest` is a symbolic link to the newest
//! complete checkpoint, replaced atomically only once the new one is durable: whenever the vmm
//! process dies (`kill -9`, a host crash), `vmm resume DIR/latest` continues from it.
//!
//! At most `keep` layers stay, a full snapshot always at the base: once the chain is that long,
//! its layers are merged (`snapshot::chain::merge`) into one full snapshot of the newest layer's
//! machine, which becomes the base of the next diffs; `latest` then points at it and the old
//! layers go. The merge reads the layers' files, not the VM: the guest is neither paused nor
//! slowed by it. Merging the whole chain at once costs one full write every `keep` checkpoints;
//! merging the oldest layers at every checkpoint would rewrite nearly as much each time, and
//! change the ids every later diff names its parent by. Should a merge fail (a full disk), the
//! next checkpoint is a full snapshot of the VM instead.

use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::control::{DiffBase, VmControl};
use crate::persist::{self, DirSink, SnapshotOptions};

/// Link to the newest complete checkpoint.
pub const LATEST: &str = "latest";
const PREFIX: &str = "ckpt-";

/// How often to checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Interval {
    Every(Duration),
    /// Young/Daly: √(2 · C · MTBF), C the measured cost (time to durable) of the last checkpoint.
    Auto {
        mtbf: Duration,
    },
}

#[derive(Debug)]
pub struct CheckpointConfig {
    pub dir: PathBuf,
    pub interval: Interval,
    /// Layers a chain may have, the full snapshot at its base included (≥ 1).
    pub keep: usize,
    /// The directory's exclusive lock (`lock_dir`), held as long as the VM checkpoints into it.
    pub lock: std::fs::File,
}

/// Creates `dir` (private: checkpoints hold guest memory) if needed and takes its exclusive lock:
/// one VM's checkpoints per directory, or each would remove the other's.
pub fn lock_dir(dir: &Path) -> Result<std::fs::File, String> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| format!("cannot create --checkpoint-dir {}: {e}", dir.display()))?;
    let lock = std::fs::File::open(dir).map_err(|e| format!("cannot open --checkpoint-dir {}: {e}", dir.display()))?;
    match lock.try_lock() {
        Ok(()) => Ok(lock),
        Err(std::fs::TryLockError::WouldBlock) => {
            Err(format!("--checkpoint-dir {} is in use by another VM's checkpoints", dir.display()))
        }
        Err(std::fs::TryLockError::Error(e)) => Err(format!("cannot lock --checkpoint-dir {}: {e}", dir.display())),
    }
}

/// The interval Young's and Daly's first-order rule gives for a checkpoint costing `cost` on a
/// host whose mean time between failures is `mtbf`, between 1 s and `mtbf`.
pub fn young_daly(cost: Duration, mtbf: Duration) -> Duration {
    let secs = (2.0 * cost.as_secs_f64() * mtbf.as_secs_f64()).sqrt();
    Duration::from_secs_f64(secs.clamp(1.0, mtbf.as_secs_f64().max(1.0)))
}

/// How a VM's checkpoints go, for `vmm status`.
#[derive(Debug, Default)]
pub struct CheckpointHealth {
    /// The newest complete checkpoint (its directory name) and when it was taken.
    pub latest: std::sync::Mutex<Option<(String, Instant)>>,
    /// Why the checkpoints since the last good one failed (None: the last one succeeded).
    pub failing: std::sync::Mutex<Option<String>>,
    /// The interval now, in ms.
    pub interval_ms: std::sync::atomic::AtomicU64,
}

/// Starts the checkpointer; a message on the returned sender takes a checkpoint now.
pub fn spawn(control: Arc<VmControl>, config: CheckpointConfig) -> std::io::Result<Sender<()>> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new().name("checkpoint".into()).spawn(move || Checkpointer::new(control, config).run(rx))?;
    Ok(tx)
}

struct Checkpointer {
    control: Arc<VmControl>,
    config: CheckpointConfig,
    /// The current chain's layers in the directory, oldest first.
    chain: Vec<PathBuf>,
    /// What the newest layer is, as the VM knows it (a diff is only taken of that).
    last: Option<DiffBase>,
    next_seq: u64,
    interval: Duration,
}

impl Checkpointer {
    fn new(control: Arc<VmControl>, config: CheckpointConfig) -> Self {
        // Numbering goes on after what the directory holds (a VM resumed from it, say).
        let next_seq = std::fs::read_dir(&config.dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.strip_prefix(PREFIX)?.parse::<u64>().ok())
            .max()
            .map_or(1, |n| n + 1);
        let interval = match config.interval {
            Interval::Every(d) => d,
            // A first checkpoint soon, to measure what one costs.
            Interval::Auto { .. } => Duration::from_secs(1),
        };
        let health = control.checkpoints.get_or_init(Default::default);
        health.interval_ms.store(interval.as_millis() as u64, std::sync::atomic::Ordering::Relaxed);
        Self { control, config, chain: Vec::new(), last: None, next_seq, interval }
    }

    fn health(&self) -> &CheckpointHealth {
        self.control.checkpoints.get_or_init(Default::default)
    }

    fn run(mut self, wake: Receiver<()>) {
        let mut due = Instant::now() + self.interval;
        loop {
            match wake.recv_timeout(due.saturating_duration_since(Instant::now())) {
                Ok(()) | Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
            // Signals that came meanwhile are this checkpoint's.
            while wake.try_recv().is_ok() {}
            self.checkpoint();
            due = Instant::now() + self.interval;
        }
    }

    fn checkpoint(&mut self) {
        let job = loop {
            match self.control.start_job() {
                Ok(job) => break job,
                // A snapshot the user asked for runs: wait for it.
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        };
        // A diff only of our own newest layer: the VM's last snapshot may be one the user took
        // elsewhere, which a chain here must not depend on.
        let diff = !self.chain.is_empty()
            && self.chain.len() < self.config.keep
            && self.chain.iter().all(|layer| layer.is_dir())
            && self.last.is_some()
            && self.control.diff_base() == self.last;
        let name = format!("{PREFIX}{:06}", self.next_seq);
        let dest = self.config.dir.join(&name);
        let result = DirSink::create(&dest, false).and_then(|sink| {
            let opts = SnapshotOptions { diff, ..SnapshotOptions::default() };
            persist::snapshot(&self.control, Box::new(sink), opts, &job)
        });
        self.control.end_job();
        let report = match result {
            Ok(report) => report,
            Err(e) => {
                // Nothing was consumed: the next checkpoint holds what this one would have. It
                // is a full one: whatever broke this diff's chain does not break it.
                eprintln!("vmm: checkpoint {name} failed: {e}");
                *crate::devices::bus::lock(&self.health().failing) = Some(e.to_string());
                self.next_seq += 1;
                self.chain.clear();
                return;
            }
        };
        self.next_seq += 1;
        if let Err(e) = point_latest(&self.config.dir, &name) {
            eprintln!("vmm: checkpoint {name} written, but {LATEST} not updated: {e}");
            *crate::devices::bus::lock(&self.health().failing) = Some(format!("{LATEST} not updated: {e}"));
            return;
        }
        *crate::devices::bus::lock(&self.health().latest) = Some((name.clone(), Instant::now()));
        *crate::devices::bus::lock(&self.health().failing) = None;
        if !diff {
            remove_other_checkpoints(&self.config.dir, &name);
            self.chain.clear();
        }
        self.chain.push(dest);
        self.last = self.control.diff_base();
        for w in &report.warnings {
            eprintln!("vmm: checkpoint {name}: warning: {w}");
        }
        eprintln!(
            "vmm: checkpoint {name} ({}, {} layer{}): paused {:.1} ms, durable after {:.1} ms, {} MiB",
            if diff { "diff" } else { "full" },
            self.chain.len(),
            if self.chain.len() == 1 { "" } else { "s" },
            report.pause_ms,
            report.total_ms,
            report.bytes >> 20
        );
        if let Interval::Auto { mtbf } = self.config.interval {
            let cost = Duration::from_secs_f64(report.total_ms / 1000.0);
            let interval = young_daly(cost, mtbf);
            // Said when it moves by more than a tenth.
            if interval.abs_diff(self.interval) * 10 > self.interval {
                eprintln!(
                    "vmm: checkpoint interval {:.1} s (Young/Daly: cost {:.0} ms, MTBF {} s)",
                    interval.as_secs_f64(),
                    report.total_ms,
                    mtbf.as_secs()
                );
            }
            self.interval = interval;
            self.health().interval_ms.store(interval.as_millis() as u64, std::sync::atomic::Ordering::Relaxed);
        }
        if self.chain.len() >= self.config.keep && self.config.keep > 1 {
            self.merge_chain();
        }
    }
}

impl Checkpointer {
    /// Merges the chain into one full snapshot of its newest layer's machine, which replaces
    /// the chain: as the VM's diff base, as `latest`, and on disk.
    fn merge_chain(&mut self) {
        let (Some(top), Some(last)) = (self.chain.last(), self.last.clone()) else { return };
        let name = format!("{PREFIX}{:06}", self.next_seq);
        self.next_seq += 1;
        let dest = self.config.dir.join(&name);
        let start = Instant::now();
        let merged = snapshot::Chain::open(top)
            .and_then(|chain| snapshot::chain::merge(&chain, &dest, false, &snapshot::progress::Progress::default()));
        let id = match merged {
            Ok(id) => id,
            Err(e) => {
                eprintln!("vmm: merging the checkpoints into {name} failed: {e}; the next checkpoint is a full one");
                return;
            }
        };
        let base = DiffBase { id, dir: dest.canonicalize().unwrap_or_else(|_| dest.clone()) };
        // A snapshot the user took meanwhile made itself the VM's base: the next checkpoint is
        // a full one (`checkpoint`), and the merge still stands for the newest checkpoint.
        let rebased = self.control.replace_diff_base(&last, base.clone());
        if let Err(e) = point_latest(&self.config.dir, &name) {
            eprintln!("vmm: checkpoints merged into {name}, but {LATEST} not updated: {e}");
            if rebased {
                self.control.replace_diff_base(&base, last);
            }
            return;
        }
        remove_other_checkpoints(&self.config.dir, &name);
        *crate::devices::bus::lock(&self.health().latest) = Some((name.clone(), Instant::now()));
        eprintln!(
            "vmm: checkpoints merged into {name}, a full snapshot, in {:.1} ms",
            start.elapsed().as_secs_f64() * 1000.0
        );
        self.chain = vec![dest];
        self.last = Some(base);
    }
}

/// Points `dir/latest` at `name`, atomically (a new link renamed over the old one).
fn point_latest(dir: &Path, name: &str) -> std::io::Result<()> {
    let tmp = dir.join(format!(".{LATEST}.tmp"));
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(name, &tmp)?;
    std::fs::rename(&tmp, dir.join(LATEST))?;
    std::fs::File::open(dir)?.sync_all()
}

/// Removes every checkpoint of `dir` but `keep` (the new chain's full snapshot, which `latest`
/// points at by now), and what writers of checkpoints killed midway left (`.ckpt-…tmp-…`; only
/// this process writes here, and not now).
fn remove_other_checkpoints(dir: &Path, keep: &str) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        let abandoned = name.starts_with(&format!(".{PREFIX}")) && name.contains(".tmp");
        if (name.starts_with(PREFIX) && name != keep || abandoned) && e.path().is_dir() {
            if let Err(err) = std::fs::remove_dir_all(e.path()) {
                eprintln!("vmm: cannot remove old checkpoint {}: {err}", e.path().display());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn young_daly_rule() {
        // √(2 · 0.5 s · 3600 s) = 60 s.
        assert_eq!(young_daly(Duration::from_millis(500), Duration::from_secs(3600)).as_secs(), 60);
        assert_eq!(young_daly(Duration::ZERO, Duration::from_secs(3600)), Duration::from_secs(1));
        assert_eq!(young_daly(Duration::from_secs(100), Duration::from_secs(10)), Duration::from_secs(10));
    }
}
