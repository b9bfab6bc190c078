//! Control of a running VM: pause and continue every vCPU, snapshot, shut down. The control
//! socket and the main thread both act through this.

use crate::vstate::memory::GuestMemory;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use snapshot::{MemorySource, PageKind};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::config::VmConfig;
use crate::devices::bus::lock;
use crate::exit::{ExitReason, ExitSender};
use crate::machine::Devices;
use crate::persist::Job;
use crate::vstate::dirty::DirtyPages;
use crate::vstate::load::{LoadFailure, MemoryLoad};
use crate::vstate::vcpu::{ControlError, VcpuHandle, VcpuResponse};
use crate::vstate::vcpu_state::VcpuState;
use crate::vstate::vm::{Vm, VmError, VmState};

/// Whether the guest runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunState {
    Running,
    Paused,
}

impl RunState {
    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Running => "running",
            RunState::Paused => "paused",
        }
    }
}

/// The snapshot directory the VM's memory was last saved to or resumed from: a diff snapshot
/// holds the pages written since.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiffBase {
    pub id: String,
    /// Absolute.
    pub dir: PathBuf,
}

/// Pages written since a snapshot, for the next diff.
#[derive(Debug, Default)]
struct Tracking {
    /// None until the first snapshot that started the tracking is durable.
    base: Option<DiffBase>,
    since: DirtyPages,
    /// KVM's dirty log records into `since`.
    logging: bool,
    /// `since` lacks what was written before the log started: a VM resumed from `base` runs
    /// without the log until it needs it (see `vstate::compare`), and its first diff compares
    /// memory with `base` to find those pages (`find_unlogged_writes`).
    unlogged: bool,
}

struct Inner {
    vcpus: Vec<VcpuHandle>,
    state: RunState,
    /// The control socket's dirty log (`dirty-log start`): pages written since its last fetch.
    api_log: Option<DirtyPages>,
    /// Pages written since the VM's last snapshot (or its resume).
    tracking: Option<Tracking>,
}

impl Inner {
    /// KVM's dirty log is on for every memory slot.
    fn logging(&self) -> bool {
        self.api_log.is_some() || self.tracking.as_ref().is_some_and(|t| t.logging)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UnloggedError {
    #[error(transparent)]
    Kvm(#[from] VmError),
    #[error("the VM's last snapshot {dir} cannot be a diff's parent any more ({why}): take a full snapshot")]
    BaseGone { dir: String, why: String },
    #[error(transparent)]
    Load(#[from] LoadFailure),
}

#[derive(Debug, thiserror::Error)]
pub enum DirtyLogError {
    #[error("dirty logging is not started")]
    NotStarted,
    #[error(transparent)]
    Kvm(#[from] VmError),
}

pub struct VmControl {
    pub config: VmConfig,
    /// What the guest needs of the CPU (its CPUID features, the MSRs its state carries).
    pub guest_cpu: snapshot::GuestCpu,
    pub vm: Vm,
    pub mem: GuestMemory,
    pub devices: Devices,
    inner: Mutex<Inner>,
    exit: ExitSender,
    /// The snapshot being taken, if any: one at a time.
    job: Mutex<Option<Arc<Job>>>,
    /// `inner.state == Paused`, readable without the lock a snapshot holds while it writes from
    /// the paused guest: `status` and `cancel` must answer meanwhile.
    paused: AtomicBool,
    /// A VM resumed from a snapshot directory: how far its memory is from being its own.
    pub memory_load: std::sync::OnceLock<Arc<MemoryLoad>>,
    /// A VM with periodic checkpoints: how they go.
    pub checkpoints: std::sync::OnceLock<crate::checkpoint::CheckpointHealth>,
}

#[derive(Debug, thiserror::Error)]
#[error("busy: a {0} of this VM is under way")]
pub struct Busy(&'static str);

/// A guard holding every vCPU paused; dropping it lets the guest run again if it was running.
/// What can only be read from a paused machine is read through it.
pub struct PausedVm<'a> {
    control: &'a VmControl,
    inner: MutexGuard<'a, Inner>,
    was: RunState,
    keep_paused: bool,
    /// `end` let the guest go already.
    released: bool,
}

impl PausedVm<'_> {
    /// Collects every vCPU's state.
    pub fn vcpu_states(&self) -> Result<Vec<VcpuState>, ControlError> {
        self.inner.vcpus.iter().map(|v| v.save()).collect()
    }

    /// Saves the VM-wide KVM state.
    pub fn vm_state(&self) -> Result<VmState, crate::vstate::vm::VmError> {
        self.control.vm.save_state()
    }

    /// Guest memory as byte slices, valid while the machine stays paused, with where each page
    /// is (see `vstate::memory::page_kinds`).
    pub fn memory(&self) -> Vec<MemorySource<'_>> {
        let kinds = crate::vstate::memory::page_kinds(&self.control.mem, self.control.memory_loaded());
        self.memory_with(|i| kinds[i].clone())
    }

    /// The regions of guest memory, with `kinds(region index)` as their page kinds.
    fn memory_with(&self, kinds: impl Fn(usize) -> Option<Vec<PageKind>>) -> Vec<MemorySource<'_>> {
        self.control
            .mem
            .iter()
            .enumerate()
            .map(|(i, region)| {
                let kinds = kinds(i);
                let len = region.len() as usize;
                // SAFETY: the region maps `len` bytes for as long as `mem` lives, which outlives
                // this guard. While the guard lives every vCPU is out of KVM_RUN, and the devices
                // that write guest memory (virtio) run only on vCPU threads, so nothing writes
                // to the memory while the slices, tied to the guard's lifetime, exist.
                let bytes = unsafe { std::slice::from_raw_parts(region.as_ptr() as *const u8, len) };
                MemorySource { guest_addr: region.start_addr().0, bytes, kinds, backing: None }
            })
            .collect()
    }

    /// Guest memory as `memory` gives it, but only the pages of `dirty`: every other page is
    /// left to the parent snapshot. Built from the bitmap alone, in time that grows with the
    /// guest's memory only at memset speed (the pause of a live snapshot or a diff waits on it).
    pub fn dirty_memory(&self, dirty: &crate::vstate::dirty::DirtyPages) -> Vec<MemorySource<'_>> {
        let mut sources = self.memory_with(|_| None);
        for src in &mut sources {
            let pages = src.bytes.len().div_ceil(crate::vstate::dirty::PAGE_SIZE as usize);
            let mut kinds = vec![PageKind::Parent; pages];
            if let Some(region) = dirty.regions.iter().find(|r| r.guest_addr == src.guest_addr) {
                for (w, &word) in region.bitmap.iter().enumerate() {
                    let mut bits = word;
                    while bits != 0 {
                        let page = w * 64 + bits.trailing_zeros() as usize;
                        if let Some(kind) = kinds.get_mut(page) {
                            *kind = PageKind::Mapped;
                        }
                        bits &= bits - 1;
                    }
                }
            }
            src.kinds = Some(kinds);
        }
        sources
    }

    /// Starts a new diff layer: returns the snapshot the VM's memory was last saved to (if any)
    /// and the pages written since, and from now on records pages written since this pause.
    /// The caller then reports `layer_committed` or gives the pages back (`layer_failed`).
    pub fn begin_layer(&mut self) -> Result<(Option<DiffBase>, DirtyPages), VmError> {
        let control = self.control;
        if control.ensure_tracking(&mut self.inner)? {
            return Ok((None, DirtyPages::default()));
        }
        control.collect_dirty(&mut self.inner)?;
        let tracking = self.inner.tracking.as_mut().expect("tracking");
        Ok((tracking.base.clone(), std::mem::take(&mut tracking.since)))
    }

    /// Whether the guest ran before this pause.
    pub fn was_running(&self) -> bool {
        self.was == RunState::Running
    }

    /// Leaves the guest paused when the guard is dropped (the VM is about to end).
    pub fn keep_paused(&mut self) {
        self.keep_paused = true;
    }
}

impl PausedVm<'_> {
    /// Lets the guest run again (unless it is to stay paused) and returns when it did: when its
    /// last vCPU left the pause.
    pub fn end(mut self) -> std::time::Instant {
        self.let_go().unwrap_or_else(std::time::Instant::now)
    }

    fn let_go(&mut self) -> Option<std::time::Instant> {
        if self.was != RunState::Running || self.keep_paused || self.released {
            return None;
        }
        self.released = true;
        self.control.devices.resume_workers();
        let resumed = resume_all(&mut self.inner);
        self.control.publish(&self.inner);
        resumed.map_err(|e| tracing::error!("cannot resume the guest: {e}")).ok()
    }
}

impl Drop for PausedVm<'_> {
    fn drop(&mut self) {
        self.let_go();
    }
}

/// Pauses every vCPU, or none: if one fails to pause, those that did are let go again.
fn pause_all(inner: &mut Inner) -> Result<(), ControlError> {
    if inner.state == RunState::Paused {
        return Ok(());
    }
    let mut asked = Vec::with_capacity(inner.vcpus.len());
    let mut result = Ok(());
    for v in &inner.vcpus {
        match v.pause() {
            Ok(seq) => asked.push((v, seq)),
            Err(e) => {
                result = Err(e);
                break;
            }
        }
    }
    for (v, seq) in &asked {
        match v.answer(*seq) {
            Ok(VcpuResponse::Paused) => {}
            Ok(_) => result = result.and(Err(ControlError::Protocol(v.index))),
            Err(e) => result = result.and(Err(e)),
        }
    }
    if result.is_err() {
        // Undo: every vCPU asked to pause is released, whether it paused already or will when it
        // gets to the request (requests are served in order).
        for (v, _) in asked {
            if let Err(e) = v.release() {
                tracing::error!("vCPU {}: cannot release after a failed pause: {e}", v.index);
            }
        }
        return result;
    }
    inner.state = RunState::Paused;
    Ok(())
}

/// Lets every vCPU run; one that cannot be resumed does not keep the others paused.
/// Lets every vCPU run again; returns when the last one did (its thread says when: the caller
/// may be scheduled again only later, on a host whose cores the guest now keeps busy).
fn resume_all(inner: &mut Inner) -> Result<std::time::Instant, ControlError> {
    if inner.state == RunState::Running {
        return Ok(std::time::Instant::now());
    }
    // Every vCPU is let go before any answer is awaited: they run again together, and the pause
    // ends after the slowest one's wake-up rather than after all of them in turn.
    let released: Vec<_> = inner.vcpus.iter().map(|v| (v, v.release())).collect();
    let mut result = Ok(None);
    for (v, seq) in released {
        match seq.and_then(|seq| v.resumed(seq)) {
            Ok(at) => result = result.map(|last: Option<std::time::Instant>| Some(last.map_or(at, |l| l.max(at)))),
            Err(e) => result = Err(e),
        }
    }
    inner.state = RunState::Running;
    result.map(|last| last.unwrap_or_else(std::time::Instant::now))
}

impl VmControl {
    /// `started_paused`: every vCPU thread was started with a pause request queued, whose answer
    /// is collected here.
    pub fn new(
        config: VmConfig,
        vm: Vm,
        mem: GuestMemory,
        devices: Devices,
        vcpus: Vec<VcpuHandle>,
        started_paused: bool,
        exit: ExitSender,
    ) -> Self {
        let mut state = RunState::Running;
        if started_paused {
            state = RunState::Paused;
            for v in &vcpus {
                if !matches!(v.answer(0), Ok(VcpuResponse::Paused)) {
                    tracing::error!("vCPU {} did not start paused", v.index);
                }
            }
        }
        let paused = AtomicBool::new(state == RunState::Paused);
        let inner = Mutex::new(Inner { vcpus, state, api_log: None, tracking: None });
        Self {
            config,
            guest_cpu: snapshot::GuestCpu::default(),
            vm,
            mem,
            devices,
            inner,
            exit,
            job: Mutex::new(None),
            paused,
            memory_load: std::sync::OnceLock::new(),
            checkpoints: std::sync::OnceLock::new(),
        }
    }

    /// Whether the guest runs; never waits (a snapshot may hold the vCPUs paused for long).
    pub fn run_state(&self) -> RunState {
        if self.paused.load(Ordering::Acquire) {
            RunState::Paused
        } else {
            RunState::Running
        }
    }

    fn publish(&self, inner: &Inner) {
        self.paused.store(inner.state == RunState::Paused, Ordering::Release);
    }

    /// Pauses the guest (its vCPUs, then the devices' worker threads) until `resume`.
    pub fn pause(&self) -> Result<(), ControlError> {
        let mut inner = lock(&self.inner);
        if inner.state == RunState::Running {
            pause_all(&mut inner)?;
            self.devices.pause_workers();
            self.publish(&inner);
        }
        Ok(())
    }

    pub fn resume(&self) -> Result<(), ControlError> {
        let mut inner = lock(&self.inner);
        if inner.state == RunState::Paused {
            self.devices.resume_workers();
        }
        let result = resume_all(&mut inner);
        self.publish(&inner);
        result.map(|_| ())
    }

    /// Pauses every vCPU and device worker (if running) for as long as the returned guard lives.
    pub fn pause_for(&self) -> Result<PausedVm<'_>, ControlError> {
        let mut inner = lock(&self.inner);
        let was = inner.state;
        if was == RunState::Running {
            pause_all(&mut inner)?;
            self.devices.pause_workers();
            self.publish(&inner);
        }
        Ok(PausedVm { control: self, inner, was, keep_paused: false, released: false })
    }

    /// Registers a new snapshot job, or fails if one runs.
    pub fn start_job(&self) -> Result<Arc<Job>, Busy> {
        self.start(Job::default())
    }

    /// Registers a migration, or fails if a migration runs. A snapshot under way (a periodic
    /// checkpoint, say) is waited for, up to `wait`.
    pub fn start_migration(&self, wait: std::time::Duration) -> Result<Arc<Job>, Busy> {
        let since = std::time::Instant::now();
        loop {
            match self.start(Job::migration()) {
                Err(Busy(kind)) if kind != "migration" && since.elapsed() < wait => {
                    std::thread::sleep(std::time::Duration::from_millis(10))
                }
                other => return other,
            }
        }
    }

    fn start(&self, new: Job) -> Result<Arc<Job>, Busy> {
        let mut job = lock(&self.job);
        if let Some(running) = job.as_ref() {
            return Err(Busy(running.kind));
        }
        let new = Arc::new(new);
        *job = Some(new.clone());
        Ok(new)
    }

    /// The snapshot job running, if any.
    pub fn current_job(&self) -> Option<Arc<Job>> {
        lock(&self.job).clone()
    }

    /// Forgets the finished job.
    pub fn end_job(&self) {
        *lock(&self.job) = None;
    }

    /// Reads KVM's log and the VMM's own writes (clearing both) into every record kept.
    fn collect_dirty(&self, inner: &mut Inner) -> Result<(), VmError> {
        if !inner.logging() {
            return Ok(());
        }
        let dirty = self.vm.fetch_dirty_pages(&self.mem)?;
        if let Some(log) = inner.api_log.as_mut() {
            log.add(&dirty);
        }
        if let Some(tracking) = inner.tracking.as_mut() {
            tracking.since.add(&dirty);
        }
        Ok(())
    }

    /// Starts keeping the record of written pages diffs are made from, if it is not kept yet:
    /// switching KVM's dirty log on takes milliseconds, better spent before a snapshot's pause
    /// than in it. What is written until the pause is the snapshot's anyway.
    pub fn start_tracking(&self) -> Result<(), VmError> {
        self.ensure_tracking(&mut lock(&self.inner)).map(|_| ())
    }

    /// Starts the record if none is kept, and KVM's log for it; true if the record starts now
    /// (it holds nothing yet).
    fn ensure_tracking(&self, inner: &mut Inner) -> Result<bool, VmError> {
        if inner.tracking.as_ref().is_some_and(|t| t.logging) {
            return Ok(false);
        }
        if !inner.logging() {
            self.vm.set_dirty_logging(&self.mem, true)?;
        }
        let tracking = inner.tracking.get_or_insert_with(Tracking::default);
        let new = !tracking.unlogged;
        tracking.logging = true;
        Ok(new)
    }

    /// Completes the record of a VM resumed without KVM's dirty log: starts the log, then adds
    /// the pages that differ from the snapshot it was resumed from (read once, while the guest
    /// runs). A no-op when the record is complete. Needed before a diff.
    pub fn find_unlogged_writes(&self, give_up: &dyn Fn() -> bool) -> Result<(), UnloggedError> {
        let base = {
            let mut inner = lock(&self.inner);
            self.ensure_tracking(&mut inner)?;
            match inner.tracking.as_ref() {
                Some(Tracking { unlogged: true, base: Some(base), .. }) => base.clone(),
                _ => return Ok(()),
            }
        };
        self.finish_memory_load(give_up)?;
        if give_up() {
            return Ok(());
        }
        let gone = |why: String| UnloggedError::BaseGone { dir: base.dir.display().to_string(), why };
        let chain = snapshot::Chain::open(&base.dir).map_err(|e| gone(e.to_string()))?;
        if chain.top().id != base.id {
            return Err(gone("another snapshot replaced it".into()));
        }
        let start = std::time::Instant::now();
        let Some(written) = crate::vstate::compare::pages_differing(&self.mem, self.memory_loaded(), &chain, give_up)
            .map_err(|e| gone(e.to_string()))?
        else {
            return Ok(());
        };
        tracing::info!(
            "{} pages differ from {} ({} ms to compare)",
            written.count(),
            base.dir.display(),
            start.elapsed().as_millis()
        );
        let mut inner = lock(&self.inner);
        if let Some(tracking) = inner.tracking.as_mut().filter(|t| t.unlogged && t.base.as_ref() == Some(&base)) {
            tracking.since.add(&written);
            tracking.unlogged = false;
        }
        Ok(())
    }

    /// Takes the pages written since the VM's last snapshot, or since the previous take, from the
    /// VM's record (starting the record if none is kept: nothing then). The caller gives them
    /// back (`layer_failed`) unless the snapshot it takes them for is committed.
    pub fn take_unsaved_pages(&self) -> Result<DirtyPages, VmError> {
        self.start_tracking()?;
        let mut inner = lock(&self.inner);
        self.collect_dirty(&mut inner)?;
        Ok(std::mem::take(&mut inner.tracking.as_mut().expect("tracking").since))
    }

    /// Pages written since the VM's last snapshot, as far as recorded (None: no record kept).
    pub fn unsaved_pages(&self) -> Result<Option<u64>, VmError> {
        let mut inner = lock(&self.inner);
        self.collect_dirty(&mut inner)?;
        Ok(inner.tracking.as_ref().map(|t| t.since.count()))
    }

    /// Later diffs are diffs of `base`, which the memory equaled when the vCPUs started. KVM's
    /// dirty log is off; the first diff finds what was written by comparison
    /// (`find_unlogged_writes`).
    pub(crate) fn adopt_diff_base(&self, base: DiffBase) {
        lock(&self.inner).tracking =
            Some(Tracking { base: Some(base), since: DirtyPages::default(), logging: false, unlogged: true });
    }

    /// The snapshot a diff taken now would be a diff of.
    pub fn diff_base(&self) -> Option<DiffBase> {
        lock(&self.inner).tracking.as_ref().and_then(|t| t.base.clone())
    }

    /// The layer `begin_layer` started is durable at `base`: later diffs are diffs of it. The
    /// log was on from that pause (`begin_layer`), so the record is complete.
    pub fn layer_committed(&self, base: DiffBase) {
        if let Some(tracking) = lock(&self.inner).tracking.as_mut() {
            tracking.base = Some(base);
            tracking.unlogged = false;
        }
    }

    /// Makes `new` the snapshot later diffs are diffs of, in place of `old`, which holds the
    /// same machine (a merge of the chain `old` tops): what was written since goes on being
    /// recorded unchanged. False, and nothing changes, when the VM's base is not `old` any more.
    pub fn replace_diff_base(&self, old: &DiffBase, new: DiffBase) -> bool {
        let mut inner = lock(&self.inner);
        match inner.tracking.as_mut() {
            Some(tracking) if tracking.base.as_ref() == Some(old) => {
                tracking.base = Some(new);
                true
            }
            _ => false,
        }
    }

    /// The layer `begin_layer` started was not made: the pages it took are still unsaved.
    pub fn layer_failed(&self, taken: &DirtyPages) {
        if let Some(tracking) = lock(&self.inner).tracking.as_mut() {
            tracking.since.add(taken);
        }
    }

    /// Starts recording the pages the guest and the VMM write (see `vstate::dirty`); a no-op
    /// when already started.
    pub fn start_dirty_log(&self) -> Result<(), DirtyLogError> {
        let mut inner = lock(&self.inner);
        if inner.api_log.is_none() {
            if !inner.logging() {
                self.vm.set_dirty_logging(&self.mem, true)?;
            } else {
                // Only what is written from now on is the API's.
                self.collect_dirty(&mut inner)?;
            }
            inner.api_log = Some(DirtyPages::default());
        }
        Ok(())
    }

    /// The pages written since the log started or was last fetched; clears it.
    pub fn fetch_dirty_log(&self) -> Result<DirtyPages, DirtyLogError> {
        let mut inner = lock(&self.inner);
        if inner.api_log.is_none() {
            return Err(DirtyLogError::NotStarted);
        }
        self.collect_dirty(&mut inner)?;
        Ok(std::mem::take(inner.api_log.as_mut().expect("started")))
    }

    /// Stops recording; a no-op when not started. The record kept for diff snapshots goes on.
    pub fn stop_dirty_log(&self) -> Result<(), DirtyLogError> {
        let mut inner = lock(&self.inner);
        if inner.api_log.is_some() {
            self.collect_dirty(&mut inner)?;
            inner.api_log = None;
            if !inner.logging() {
                self.vm.set_dirty_logging(&self.mem, false)?;
            }
        }
        Ok(())
    }

    /// Whether no load of memory from a snapshot is under way (`vstate::load`): every page of
    /// guest memory is the VM's own.
    pub fn memory_loaded(&self) -> bool {
        self.memory_load.get().is_none_or(|l| l.is_independent())
    }

    /// Brings in every page of a resumed VM's memory still in its snapshot, and waits for it:
    /// what reads all of guest memory does it first, while the guest runs.
    pub fn finish_memory_load(&self, give_up: &dyn Fn() -> bool) -> Result<(), LoadFailure> {
        match self.memory_load.get() {
            Some(load) => load.finish(give_up),
            None => Ok(()),
        }
    }

    /// A handle to end the VM from elsewhere (signals).
    pub fn exit_sender(&self) -> ExitSender {
        self.exit.clone()
    }

    /// Ends the VM with `reason` (the main thread then exits the process).
    pub fn end(&self, reason: ExitReason) {
        self.exit.send(reason);
    }
}
