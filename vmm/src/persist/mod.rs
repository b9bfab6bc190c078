//! Snapshot and restore of a whole machine, as one pipeline that every destination shares:
//! **pause → collect → plan memory → sink**. The guest is paused while the vCPU, VM and device
//! state are read and its memory is copied aside (or, with `stop`, written straight from the
//! paused guest); it runs again while a `Sink` (a snapshot directory, a stream) writes memory.
//! Restore rebuilds a machine from a directory (memory mapped from its page file) or a stream
//! (memory filled from its frames).

mod precopy;
mod restore;
pub mod sink;
mod state;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use snapshot::pages::Run;
use snapshot::{
    DeviceSummary, DiskCopy, DiskDescription, FileIdentity, Manifest, MemoryData, NetDescription, Progress,
    StagedMemory, VsockDescription,
};
use snapshot::{StateDigest, VcpuSummary, VmDescription};

use crate::agent::{self, Agent, AgentError};
use crate::arch::x86_64::cpuid;
use crate::config::VmConfig;
use crate::control::{DiffBase, UnloggedError, VmControl};
use crate::devices::bus::lock;
use crate::devices::virtio::disk_copy::{DiskCopier, CHUNK_BYTES};
use crate::machine::MachineError;
use crate::vstate::dirty::{DirtyPages, PAGE_SIZE};
use crate::vstate::memory;
use crate::vstate::vcpu::ControlError;
use crate::vstate::vm::VmError;

pub use restore::{
    inspect_stream, load_dir, memory_file_changed, restore, watch_memory_load, LaneInput, LoadingMemory, MemoryFile,
    MigrationInput, Restored, ResumeOptions, ResumeSource, Stop,
};
pub use sink::{DirSink, Sink, StreamSink};
pub use state::MachineState;

#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error(transparent)]
    Format(#[from] snapshot::Error),
    #[error("{what}: {err}")]
    StreamIn { what: String, err: snapshot::stream::StreamError },
    #[error("cannot write the snapshot stream to {what}: {err}")]
    StreamOut { what: String, err: String },
    #[error("snapshot state is inconsistent: {0}")]
    Inconsistent(String),
    #[error("cannot pause the guest: {0}")]
    Control(#[from] ControlError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Machine(#[from] MachineError),
    #[error("this host cannot run the snapshot: {0}")]
    HostCpu(String),
    #[error("cannot map snapshot memory: {0}")]
    MapMemory(String),
    #[error(transparent)]
    MemoryLoad(#[from] crate::vstate::load::LoadFailure),
    /// A disk's file could not be used (the message names it and says how).
    #[error("{0}")]
    Disk(String),
    #[error("cannot make the working copy of a snapshot's disk at {0}")]
    WorkingCopy(String),
    #[error("cannot copy disk {path} into the snapshot: {err}")]
    DiskCopy { path: String, err: String },
    #[error("snapshot names its VM '{0}', which is not a valid VM name; give one with --name")]
    BadName(String),
    #[error("disk {path} changed since the snapshot ({why}); resuming would show the guest a disk it does not know (--disk-changed-ok resumes anyway)")]
    DiskChanged { path: String, why: String },
    #[error("snapshot {0} is a difference from a parent snapshot, which this vmm cannot resume yet")]
    HasParent(String),
    /// `vmm resume --net/--disk/--vsock` that do not fit the snapshot.
    #[error("{0}")]
    Override(String),
    #[error("VM '{0}' has no snapshot to take a diff of: take a full snapshot first (or resume it from a snapshot directory)")]
    NoDiffBase(String),
    #[error("the VM's last snapshot {dir} cannot be a diff's parent any more ({why}): take a full snapshot")]
    DiffBaseGone { dir: String, why: String },
    #[error(
        "--parent {given} is not the VM's last snapshot ({base}): a diff holds the pages written since the last one"
    )]
    NotDiffBase { given: String, base: String },
    #[error("{0}")]
    BadRequest(String),
    #[error("cannot quiesce the guest: {0} (the snapshot was not taken)")]
    Quiesce(crate::agent::AgentError),
    /// The resuming side could not take the VM's name or control socket.
    #[error("{message}")]
    Claim { message: String, bad_input: bool },
}

impl From<UnloggedError> for PersistError {
    fn from(e: UnloggedError) -> Self {
        match e {
            UnloggedError::Kvm(e) => e.into(),
            UnloggedError::BaseGone { dir, why } => PersistError::DiffBaseGone { dir, why },
            UnloggedError::Load(e) => e.into(),
        }
    }
}

impl PersistError {
    pub fn stream_out(what: &std::path::Path, err: impl std::fmt::Display) -> Self {
        Self::StreamOut { what: what.display().to_string(), err: err.to_string() }
    }

    /// True when the snapshot (or the user's arguments) is at fault, not the host.
    pub fn is_bad_input(&self) -> bool {
        match self {
            PersistError::Format(e) => {
                !matches!(e, snapshot::Error::Io { .. } | snapshot::Error::Create { .. } | snapshot::Error::Cancelled)
            }
            PersistError::StreamIn { err, .. } => !matches!(err, snapshot::stream::StreamError::Io(_)),
            PersistError::Inconsistent(_)
            | PersistError::BadName(_)
            | PersistError::DiskChanged { .. }
            | PersistError::HasParent(_)
            | PersistError::NoDiffBase(_)
            | PersistError::DiffBaseGone { .. }
            | PersistError::NotDiffBase { .. }
            | PersistError::BadRequest(_)
            | PersistError::Override(_) => true,
            PersistError::Quiesce(_) => false,
            PersistError::MemoryLoad(e) => matches!(e, crate::vstate::load::LoadFailure::Snapshot { .. }),
            PersistError::Machine(e) => e.is_bad_input(),
            PersistError::Claim { bad_input, .. } => *bad_input,
            _ => false,
        }
    }

    pub fn is_cancelled(&self) -> bool {
        matches!(self, PersistError::Format(snapshot::Error::Cancelled))
    }
}

#[derive(Clone, Debug, Default)]
pub struct SnapshotOptions {
    /// Leave the guest paused once the snapshot is complete (the caller then ends the VM), and
    /// write memory straight from the paused guest.
    pub stop: bool,
    pub quiesce: Quiesce,
    /// How long the agent gets to quiesce (default `agent::QUIESCE_TIMEOUT`).
    pub quiesce_timeout: Option<Duration>,
    /// Save only the pages written since the VM's last snapshot, as a diff of it.
    pub diff: bool,
    /// The snapshot the diff is of, as the user named it: it must be the VM's last one.
    pub parent: Option<PathBuf>,
    /// Copy memory while the guest runs (pre-copy rounds), and pause it only for the last pages.
    pub live: bool,
}

/// Whether the guest agent flushes and freezes the guest's file systems for the snapshot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Quiesce {
    /// If the VM has a vsock device: ask its agent; if none answers, or it fails, warn and take
    /// the snapshot unquiesced.
    #[default]
    Auto,
    /// Do not ask.
    Skip,
    /// Ask, and fail the snapshot (the guest running on, thawed) if the agent cannot quiesce.
    Require,
}

/// What a snapshot cost.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SnapshotReport {
    /// Where it went ("-" for a stream to the client's stdout).
    pub path: PathBuf,
    /// The snapshot's id (directories).
    #[serde(default)]
    pub id: Option<String>,
    /// The id of the snapshot this one is a diff of.
    #[serde(default)]
    pub parent: Option<String>,
    /// Time the guest did not run, in ms.
    pub pause_ms: f64,
    /// Time until the snapshot was durable (fsync'd and renamed into place) or the stream
    /// complete and flushed, in ms.
    pub total_ms: f64,
    /// Bytes on disk (holes excluded) or through the stream.
    pub bytes: u64,
    pub memory_bytes: u64,
    pub zero_pages: u64,
    /// Whether the guest agent quiesced the guest for it.
    #[serde(default)]
    pub quiesced: bool,
    /// What went wrong without failing the snapshot (an agent that did not answer, say).
    #[serde(default)]
    pub warnings: Vec<String>,
    /// A live snapshot: its pre-copy rounds after the first, and the bytes copied while the
    /// guest was paused.
    #[serde(default)]
    pub live: Option<LiveReport>,
}

/// How a live snapshot went.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LiveReport {
    pub rounds: u32,
    /// Bytes written while the guest ran.
    pub precopy_bytes: u64,
    /// Bytes copied while it was paused.
    pub paused_bytes: u64,
}

/// A snapshot being taken: what it is doing and how far it got. `status` reads it while the
/// snapshot runs; `cancel` stops it.
#[derive(Debug)]
pub struct Job {
    /// "snapshot" or "migration".
    pub kind: &'static str,
    /// The current phase and when it began.
    phase: Mutex<(&'static str, Option<Instant>)>,
    pub progress: Progress,
}

impl Default for Job {
    fn default() -> Self {
        Self { kind: "snapshot", phase: Mutex::new(("starting", Some(Instant::now()))), progress: Progress::default() }
    }
}

impl Job {
    pub fn migration() -> Self {
        Self { kind: "migration", ..Self::default() }
    }

    pub fn phase(&self) -> &'static str {
        lock(&self.phase).0
    }

    /// Enters `phase`; the time the previous one took goes to the debug log (`VMM_LOG=debug`).
    pub fn set_phase(&self, phase: &'static str) {
        let mut current = lock(&self.phase);
        if let (previous, Some(since)) = *current {
            tracing::debug!("{}: {previous} took {:.1} ms", self.kind, ms(since.elapsed()));
        }
        *current = (phase, Some(Instant::now()));
    }
}

/// Granularity of the record of recently written memory (`MemoryLayout::hot`).
const HOT_CHUNK: u64 = 2 << 20;

/// Nice value of the thread that takes a snapshot, when vmm may raise priorities.
const SNAPSHOT_NICE: i32 = -10;

/// Runs the calling thread (a snapshot job's) ahead of the vCPUs where vmm may (CAP_SYS_NICE,
/// e.g. root): the guest runs on while its memory is written, and on a host with as many busy
/// vCPUs as cores the writer would otherwise get a third of a core, and take twice as long to
/// make the snapshot durable (docs/BENCHMARKS.md). Elsewhere the job runs at the vCPUs' priority.
fn boost_this_thread() {
    let tid = rustix::thread::gettid();
    if let Err(e) = rustix::process::setpriority_process(Some(tid), SNAPSHOT_NICE) {
        tracing::debug!("snapshot thread keeps its priority: {e}");
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// What `vmm run` was given, and the disks copied into the snapshot (`copies`: index and size),
/// in a diff only the chunks written since the parent (`diff_disks`).
fn describe_vm(config: &VmConfig, copies: &[(usize, u64)], diff_disks: Option<&[(usize, Vec<u64>)]>) -> VmDescription {
    VmDescription {
        name: config.name.clone(),
        vcpus: config.vcpus,
        mem_bytes: config.mem_bytes,
        kernel: config.kernel.display().to_string(),
        cmdline: config.cmdline.clone(),
        disks: config
            .disks
            .iter()
            .enumerate()
            .map(|(i, d)| DiskDescription {
                path: d.path.display().to_string(),
                read_only: d.read_only,
                identity: std::fs::metadata(&d.path).ok().map(|m| FileIdentity::of(&m)),
                copy: copies.iter().find(|(index, _)| *index == i).map(|&(_, size)| DiskCopy {
                    file: DiskCopy::file_name(i),
                    size,
                    ranges: diff_disks.map(|disks| {
                        disks
                            .iter()
                            .find(|(index, _)| *index == i)
                            .map_or_else(Vec::new, |(_, c)| DiskCopier::ranges(c, size))
                    }),
                }),
            })
            .collect(),
        nets: config
            .nets
            .iter()
            .map(|n| NetDescription { tap: n.tap.clone(), mac: crate::config::format_mac(&n.mac) })
            .collect(),
        vsock: config.vsock.as_ref().map(|v| VsockDescription { cid: v.cid, uds: v.uds.display().to_string() }),
    }
}

/// The disk copies a snapshot is taking; dropping it ends them (guest writes then go straight to
/// the disks again), on success as on failure.
struct DiskCopies<'a> {
    control: &'a VmControl,
    copies: Vec<(usize, Arc<Mutex<DiskCopier>>)>,
}

impl<'a> DiskCopies<'a> {
    /// Starts a copy of each disk into its file (the VM paused): of the chunks given for it (a
    /// diff, or a file holding the last snapshot's copy), or of all of it.
    fn start(control: &'a VmControl, files: Vec<(usize, std::fs::File, Option<&[u64]>)>) -> Self {
        let mut copies = Vec::new();
        for (index, file, chunks) in files {
            if let Some(entry) = control.devices.disk(index) {
                if let Some(copier) = lock(&entry.device).start_disk_copy(file, chunks) {
                    copies.push((index, copier));
                }
            }
        }
        Self { control, copies }
    }

    /// Copies what the guest has not overwritten yet (it copied the rest itself).
    fn finish(&self, job: &Job) -> Result<u64, PersistError> {
        let mut bytes = 0;
        for (index, copier) in &self.copies {
            let chunks = lock(copier).chunks();
            for chunk in 0..chunks {
                let mut c = lock(copier);
                if let Err(e) = c.copy_chunk(chunk) {
                    c.fail(e);
                }
                let len = CHUNK_BYTES.min(c.size() - chunk * CHUNK_BYTES);
                drop(c);
                job.progress.advance(len)?;
            }
            let c = lock(copier);
            if let Some(e) = c.error() {
                let path = self.control.config.disks[*index].path.display().to_string();
                return Err(PersistError::DiskCopy { path, err: e.to_string() });
            }
            bytes += c.data_bytes;
        }
        Ok(bytes)
    }
}

impl Drop for DiskCopies<'_> {
    fn drop(&mut self) {
        for (index, _) in &self.copies {
            if let Some(entry) = self.control.devices.disk(*index) {
                lock(&entry.device).end_disk_copy();
            }
        }
    }
}

/// The snapshot a diff is to be taken of: the VM's last one, which must still be where it was
/// written, unchanged, and not about to be replaced by the diff itself.
fn diff_parent(control: &VmControl, opts: &SnapshotOptions, dest: Option<&Path>) -> Result<DiffBase, PersistError> {
    let Some(dest) = dest else {
        return Err(PersistError::BadRequest("a diff snapshot is written to a directory, not a stream".into()));
    };
    let base = control.diff_base().ok_or_else(|| PersistError::NoDiffBase(control.config.name.clone()))?;
    if let Some(given) = &opts.parent {
        if given.canonicalize().ok().as_ref() != Some(&base.dir) {
            return Err(PersistError::NotDiffBase {
                given: given.display().to_string(),
                base: base.dir.display().to_string(),
            });
        }
    }
    let gone = |why: String| PersistError::DiffBaseGone { dir: base.dir.display().to_string(), why };
    match snapshot::Snapshot::open(&base.dir) {
        Ok(snap) if snap.id == base.id => {}
        Ok(_) => return Err(gone("another snapshot replaced it".into())),
        Err(e) => return Err(gone(e.to_string())),
    }
    if dest.canonicalize().ok().as_ref() == Some(&base.dir) {
        return Err(PersistError::BadRequest(format!(
            "--out {} is the diff's own parent: write the diff elsewhere",
            dest.display()
        )));
    }
    Ok(base)
}

/// Refuses to replace (`--force`) a snapshot the VM's last one is a diff of: every later layer
/// would lose its parent. Replacing the last one itself is fine: the new snapshot takes its place.
fn check_not_an_ancestor(control: &VmControl, dest: &Path) -> Result<(), PersistError> {
    let (Some(base), Ok(dest)) = (control.diff_base(), dest.canonicalize()) else { return Ok(()) };
    let Ok(chain) = snapshot::Chain::open(&base.dir) else { return Ok(()) };
    let below = &chain.layers[..chain.layers.len() - 1];
    if below.iter().any(|l| l.dir.canonicalize().ok().as_ref() == Some(&dest)) {
        return Err(PersistError::BadRequest(format!(
            "--out {} is a parent of the VM's last snapshot {}: replacing it would break that chain; write elsewhere",
            dest.display(),
            base.dir.display()
        )));
    }
    Ok(())
}

/// The VM's last snapshot directory as a chain, if it is still the one the VM's records of
/// written disk chunks start from (the same id); None otherwise (the VM has none, it moved, it
/// was replaced): a full snapshot then copies its disks whole. Opened just before its copies
/// are cloned (not with `check_not_an_ancestor`'s, before a resumed VM's memory is loaded), so
/// that it cannot have been replaced long since.
fn earlier_snapshot(control: &VmControl) -> Option<snapshot::Chain> {
    let base = control.diff_base()?;
    let chain = snapshot::Chain::open(&base.dir).ok()?;
    (chain.top().id == base.id).then_some(chain)
}

/// Makes `file` (the new snapshot's copy of disk `index`, `size` bytes of holes) the disk as
/// `earlier` holds it, sharing that copy's blocks (a reflink). False where it cannot: the file
/// system has no reflinks, `earlier` holds no copy of this disk or one of another size, or an
/// error reading it (then `file` is emptied again, and the disk is copied whole).
fn clone_earlier_copy(
    earlier: &snapshot::Chain,
    index: usize,
    size: u64,
    file: &std::fs::File,
) -> Result<bool, PersistError> {
    let saved = earlier.top().manifest.vm.disks.get(index).and_then(|d| d.copy.as_ref());
    if saved.is_none_or(|c| c.size != size) {
        return Ok(false);
    }
    let path = Path::new("(new snapshot's copy)");
    match snapshot::chain::clone_disk(&earlier.layers, index, file, path) {
        Ok(cloned) => Ok(cloned),
        Err(e) => {
            tracing::warn!(
                "disk {index}: cannot start from {}'s copy ({e}): copying it whole",
                earlier.top().dir.display()
            );
            file.set_len(0)
                .and_then(|_| file.set_len(size))
                .map_err(|e| PersistError::Disk(format!("cannot empty the snapshot's copy of disk {index}: {e}")))?;
            Ok(false)
        }
    }
}

/// The manifest a live migration starts with: the VM as configured and the memory layout, sent
/// before the guest pauses, so without vCPU summaries or a state digest (the state comes later
/// in the stream, `snapshot::streamed::read_migration`).
/// `copied`: the disks (number, bytes) that travel with it.
pub fn migration_manifest(control: &VmControl, copied: &[(usize, u64)]) -> Manifest {
    Manifest {
        format_version: snapshot::FORMAT_VERSION,
        parent: None,
        parent_dir: None,
        created_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        vmm_version: env!("CARGO_PKG_VERSION").into(),
        vm: describe_vm(&control.config, copied, None),
        host_cpu: cpuid::host_cpu(),
        host_boot: host_boot_id(),
        guest_cpu: Some(control.guest_cpu.clone()),
        vcpus: Vec::new(),
        devices: Vec::new(),
        state: StateDigest::default(),
        memory: memory::layout_of(&control.mem),
    }
}

/// This boot of this host (`/proc/sys/kernel/random/boot_id`), if the kernel says.
pub fn host_boot_id() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok().map(|s| s.trim().to_string())
}

/// The encoded machine state of a paused VM: VM-wide state first (interrupts the PIT delivers
/// meanwhile then show in the LAPICs), then the vCPUs and the devices.
pub fn encode_state(control: &VmControl, paused: &crate::control::PausedVm<'_>) -> Result<Vec<u8>, PersistError> {
    let vm = paused.vm_state()?;
    let vcpus = paused.vcpu_states()?;
    let devices = control.devices.save();
    Ok(MachineState { vm, vcpus, devices }.to_sections().encode())
}

/// A diff layer a snapshot started (`PausedVm::begin_layer`, and the disks' written chunks):
/// unless the snapshot is committed, the pages and chunks it took go back to the VM's records,
/// so the next diff still holds them.
struct Layer<'a> {
    control: &'a VmControl,
    taken: DirtyPages,
    /// Per writable disk: the chunks written since the last snapshot.
    disks: Vec<(usize, Vec<u64>)>,
    committed: bool,
}

impl<'a> Layer<'a> {
    /// Takes the disks' written chunks (the VM paused).
    fn take_disks(control: &'a VmControl) -> Vec<(usize, Vec<u64>)> {
        (0..control.config.disks.len())
            .filter_map(|i| control.devices.disk(i).and_then(|e| lock(&e.device).take_written_chunks()).map(|c| (i, c)))
            .collect()
    }
}

impl Drop for Layer<'_> {
    fn drop(&mut self) {
        if !self.committed {
            self.control.layer_failed(&self.taken);
            for (index, chunks) in &self.disks {
                if let Some(entry) = self.control.devices.disk(*index) {
                    lock(&entry.device).return_written_chunks(chunks);
                }
            }
        }
    }
}

/// Asks the guest agent to quiesce, as `opts` say; returns the connection to thaw it through.
fn quiesce(
    control: &VmControl,
    opts: &SnapshotOptions,
    job: &Job,
    warnings: &mut Vec<String>,
) -> Result<Option<Agent>, PersistError> {
    let Some(vsock) = control.config.vsock.as_ref().filter(|_| opts.quiesce != Quiesce::Skip) else {
        if opts.quiesce == Quiesce::Require {
            return Err(PersistError::Quiesce(AgentError::Absent));
        }
        return Ok(None);
    };
    if control.run_state() != crate::control::RunState::Running {
        // A paused guest cannot answer, and its disks and memory stand still anyway.
        let e = AgentError::Paused;
        if opts.quiesce == Quiesce::Require {
            return Err(PersistError::Quiesce(e));
        }
        warnings.push(format!("{e}: snapshot taken without quiescing the guest"));
        return Ok(None);
    }
    job.set_phase("quiescing");
    let timeout = opts.quiesce_timeout.unwrap_or(agent::QUIESCE_TIMEOUT);
    let started = Instant::now();
    let mut connection = None;
    let result = Agent::connect(&vsock.uds, agent::CONNECT_TIMEOUT).and_then(|mut a| {
        let done = a.quiesce(timeout);
        connection = Some(a);
        done
    });
    match result {
        Ok(what) => {
            tracing::debug!("agent quiesced the guest in {:.1} ms: {what}", ms(started.elapsed()));
            Ok(connection)
        }
        Err(e) => {
            // A quiesce that timed out may still complete: thaw whatever it froze.
            thaw(&mut connection, warnings);
            if opts.quiesce == Quiesce::Require {
                return Err(PersistError::Quiesce(e));
            }
            warnings.push(format!("{e}: snapshot taken without quiescing the guest"));
            Ok(None)
        }
    }
}

/// Thaws the guest through `agent`, if it was quiesced (its agent thaws by itself later if this fails).
fn thaw(agent: &mut Option<Agent>, warnings: &mut Vec<String>) {
    if let Some(mut a) = agent.take() {
        if let Err(e) = a.thaw() {
            warnings.push(format!("{e} (it thaws by itself after its deadline)"));
        }
        *agent = Some(a);
    }
}

/// Guest memory once the guest runs again: copied aside, or already in the sink.
enum Pending {
    Staged(StagedMemory),
    Written,
}

/// Saves the running machine into `sink`. The guest is paused while its state is read and its
/// memory copied aside, then continues (unless `stop`: then it stays paused for the caller to
/// end, and memory is written before it would have continued) while the sink writes memory and
/// commits. On any failure, or when cancelled through `job`, the guest is left as it was before
/// (running, or paused by the user) and the sink is dropped uncommitted.
pub fn snapshot(
    control: &VmControl,
    mut sink: Box<dyn Sink>,
    opts: SnapshotOptions,
    job: &Job,
) -> Result<SnapshotReport, PersistError> {
    let start = Instant::now();
    boost_this_thread();
    let mut warnings = Vec::new();
    let mem_bytes: u64 = control.config.mem_bytes;
    job.progress.set_total(memory::total_bytes(&control.mem));
    let dest = sink.directory().map(Path::to_path_buf);
    if let Some(dest) = &dest {
        check_not_an_ancestor(control, dest)?;
    }
    let parent = if opts.diff { Some(diff_parent(control, &opts, dest.as_deref())?) } else { None };
    // A resumed VM whose memory is still coming in: all of it is needed.
    if !control.memory_loaded() {
        job.set_phase("loading memory");
        control.finish_memory_load(&|| job.progress.is_cancelled())?;
        job.progress.check()?;
    }
    if parent.is_some() {
        job.set_phase("finding the pages written since the resume");
        control.find_unlogged_writes(&|| job.progress.is_cancelled())?;
        job.progress.check()?;
    }
    let mut layer: Option<Layer> = None;
    if dest.is_some() && !opts.stop {
        control.start_tracking()?;
    }
    // A live snapshot copies memory now, while the guest runs; the pause takes what is left.
    let mut live = None;
    let mut live_staging = None;
    if opts.live && !opts.stop {
        live_staging = StagedMemory::with_capacity(precopy::STAGING_BYTES);
        let file = sink
            .live_page_file(&memory::regions(&control.mem))?
            .ok_or_else(|| PersistError::BadRequest("a live snapshot is written to a directory".into()))?;
        job.set_phase("copying memory live");
        let first = control.take_unsaved_pages()?;
        // From here on, what is taken goes back to the record if the snapshot fails.
        let guard = layer.insert(Layer { control, taken: first.clone(), disks: Vec::new(), committed: false });
        live = Some(precopy::run(control, file, &first, parent.is_some(), job, &mut guard.taken)?);
    }
    // Allocating and faulting in the staging buffer is the slow part: do it before pausing. A
    // diff needs room for the pages written so far, and for those written until the pause.
    let staging = if opts.stop {
        None
    } else if live.is_some() {
        live_staging
    } else {
        job.set_phase("preparing");
        let limit = match parent {
            Some(_) => control.unsaved_pages()?.map(|pages| pages * PAGE_SIZE * 5 / 4 + (64 << 20)),
            None => None,
        };
        memory::staging_size(&control.mem, &memory::page_kinds(&control.mem, control.memory_loaded()), limit)
            .and_then(StagedMemory::with_capacity)
    };
    // Files for the copies of the writable disks (a directory sink keeps them), made before the
    // pause: the copies themselves start while paused and are taken while the guest runs on. A
    // full snapshot's file starts as a reflink of the VM's last snapshot's copy where the file
    // system can: only the chunks written since are copied then, as for a diff.
    let earlier = if parent.is_none() && dest.is_some() { earlier_snapshot(control) } else { None };
    let mut disk_files = Vec::new();
    for (index, disk) in control.config.disks.iter().enumerate().filter(|(_, d)| !d.read_only) {
        // The file the device has open: the path may have been renamed or removed since.
        let open = control.devices.disk(index).and_then(|e| lock(&e.device).durable_file());
        let size = match &open {
            Some(d) => d.file.metadata(),
            None => std::fs::metadata(&disk.path),
        }
        .map(|m| m.len() / 512 * 512)
        .map_err(|e| PersistError::Disk(format!("disk {}: {e}", disk.path.display())))?;
        if let Some(file) = sink.disk_copy_file(index, size, &disk.path)? {
            let cloned = match &earlier {
                Some(chain) => clone_earlier_copy(chain, index, size, &file)?,
                None => false,
            };
            disk_files.push((index, file, size, cloned));
        }
    }
    let copied: Vec<(usize, u64)> = disk_files.iter().map(|(i, _, size, _)| (*i, *size)).collect();
    // The progress counts the disks' copies after the memory.
    job.progress.set_total(memory::total_bytes(&control.mem) + copied.iter().map(|(_, size)| size).sum::<u64>());
    job.progress.check()?;
    // Quiesced last, just before the pause: the guest's file systems stay frozen only as long
    // as the pause (and the state save) need.
    let mut agent = quiesce(control, &opts, job, &mut warnings)?;
    if let Err(e) = job.progress.check() {
        thaw(&mut agent, &mut warnings);
        return Err(e.into());
    }
    job.set_phase("pausing");
    let mut paused = match control.pause_for() {
        Ok(paused) => paused,
        Err(e) => {
            thaw(&mut agent, &mut warnings);
            return Err(e.into());
        }
    };
    let paused_at = Instant::now();
    let resume_on_error = opts.stop && paused.was_running();
    let mut final_pages = None;
    let taken = (|| {
        // A snapshot directory starts a layer: the next diff holds what is written from now on.
        let dirty = match dest {
            Some(_) => {
                let (base, taken) = paused.begin_layer()?;
                let disks = Layer::take_disks(control);
                if let Some(pre) = &live {
                    // The pause copies what the rounds left and what was written since.
                    let mut pages = pre.carry.clone();
                    pages.add(&taken);
                    final_pages = Some(pages);
                }
                let layer = match layer.as_mut() {
                    Some(l) => {
                        l.taken.add(&taken);
                        l.disks = disks;
                        l
                    }
                    None => layer.insert(Layer { control, taken, disks, committed: false }),
                };
                if parent.is_some() && base != parent {
                    return Err(PersistError::NoDiffBase(control.config.name.clone()));
                }
                Some(&*layer)
            }
            None => None,
        };
        job.set_phase("saving state");
        // VM-wide state first: interrupts the PIT delivers meanwhile then show in the LAPICs.
        let vm = paused.vm_state()?;
        let vcpus = paused.vcpu_states()?;
        let devices = control.devices.save();
        // The disks as they are now, with no request in flight (the vCPUs are stopped): a diff,
        // and a copy over the last snapshot's, take only the chunks written since.
        let diff_disks = dirty.filter(|_| parent.is_some()).map(|l| l.disks.as_slice());
        let written = |index: usize| {
            dirty.map_or(&[][..], |l| l.disks.iter().find(|(i, _)| *i == index).map_or(&[][..], |(_, c)| c.as_slice()))
        };
        let files = disk_files
            .into_iter()
            .map(|(i, f, _, cloned)| (i, f, (parent.is_some() || cloned).then(|| written(i))))
            .collect();
        let copies = DiskCopies::start(control, files);
        let state = MachineState { vm, vcpus, devices };
        let sections = state.to_sections();
        let state_bytes = sections.encode();
        let manifest = Manifest {
            format_version: snapshot::FORMAT_VERSION,
            parent: parent.as_ref().map(|p| p.id.clone()),
            parent_dir: parent.as_ref().map(|p| p.dir.display().to_string()),
            created_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            vmm_version: env!("CARGO_PKG_VERSION").into(),
            vm: describe_vm(&control.config, &copied, diff_disks),
            host_cpu: cpuid::host_cpu(),
            host_boot: host_boot_id(),
            guest_cpu: None,
            vcpus: state
                .vcpus
                .iter()
                .map(|v| VcpuSummary { index: v.index, mode: format!("{} cpl{}", v.mode(), v.cpl()), rip: v.regs.rip })
                .collect(),
            devices: control
                .devices
                .list
                .iter()
                .map(|e| DeviceSummary {
                    kind: e.kind.into(),
                    detail: format!("{}: {} at {}", e.id, lock(&e.device).describe(), e.resources),
                })
                .collect(),
            state: StateDigest {
                size: state_bytes.len() as u64,
                checksum: snapshot::digest::checksum(&state_bytes),
                sections: sections.summary(),
            },
            memory: snapshot::MemoryLayout {
                // What the guest wrote since its previous snapshot: a resume loads that first.
                hot: dirty.map(|l| l.taken.chunks(HOT_CHUNK)).unwrap_or_default(),
                ..memory::layout_of(&control.mem)
            },
        };
        sink.begin(&manifest, &state_bytes)?;
        let sources = match (&final_pages, &parent, dirty) {
            (Some(pages), _, _) => paused.dirty_memory(pages),
            (None, Some(_), Some(layer)) => paused.dirty_memory(&layer.taken),
            _ => paused.memory(),
        };
        // Copy memory aside at memory speed; write it to the sink while paused only when the
        // copy does not fit, or when the guest is not to run again anyway.
        let staged = staging.and_then(|mut staged| staged.copy(&sources).then_some(staged));
        let pending = match (staged, live.as_mut()) {
            (Some(staged), _) => Pending::Staged(staged),
            (None, Some(pre)) => {
                job.set_phase("writing memory");
                MemoryData::Sources(&sources).visit_runs(|run| match run {
                    Run::Data { guest_addr, bytes } => pre.file.write(guest_addr, bytes),
                    Run::Zero { guest_addr, len } => pre.file.write_zero(guest_addr, len),
                })?;
                Pending::Written
            }
            (None, None) => {
                job.set_phase("writing memory");
                sink.memory(MemoryData::Sources(&sources), &job.progress)?;
                Pending::Written
            }
        };
        Ok::<_, PersistError>((pending, copies))
    })();
    if opts.stop && taken.is_ok() {
        paused.keep_paused();
    }
    let pause = paused.end().saturating_duration_since(paused_at);
    // A guest that runs on is thawed at once; one that stops stays frozen in the snapshot too,
    // and is thawed after its resume (agent::refresh_after_resume).
    if !opts.stop || taken.is_err() {
        thaw(&mut agent, &mut warnings);
    }
    let (pending, copies) = taken?;
    let mut live_report = None;

    let paused_bytes = match &pending {
        Pending::Staged(staged) => staged.bytes(),
        Pending::Written => final_pages.as_ref().map_or(0, |p| p.count() * PAGE_SIZE),
    };
    let result = (|| {
        match (&pending, live.as_mut()) {
            (Pending::Staged(staged), Some(pre)) => {
                job.set_phase("writing memory");
                pre.file.write_staged(staged)?;
            }
            (Pending::Staged(staged), None) => {
                job.set_phase("writing memory");
                sink.memory(MemoryData::Staged(staged), &job.progress)?;
            }
            (Pending::Written, _) => {}
        }
        drop(pending);
        if let Some(pre) = live.take() {
            job.set_phase("checksumming memory");
            let report = LiveReport { rounds: pre.rounds, precopy_bytes: pre.bytes, paused_bytes };
            sink.memory_layout(pre.file.finish(parent.is_some(), &job.progress)?);
            live_report = Some(report);
        }
        if !copies.copies.is_empty() {
            job.set_phase("copying disks");
            let bytes = copies.finish(job)?;
            tracing::debug!("copied {} MiB of disk data", bytes >> 20);
        }
        drop(copies);
        // The disks must hold at least what the guest wrote before the snapshot, durably. Synced
        // outside the devices' locks: the guest goes on using its disks meanwhile.
        job.set_phase("syncing disks");
        for d in control.devices.durable_files() {
            d.file.sync_data().map_err(|e| PersistError::Disk(format!("cannot flush disk {}: {e}", d.path)))?;
        }
        job.progress.check()?;
        job.set_phase("committing");
        let written = sink.commit(&job.progress);
        job.set_phase("done");
        written
    })();
    match result {
        Ok(written) => Ok({
            if let (Some(layer), Some(id), Some(dir)) = (layer.as_mut(), &written.id, &dest) {
                layer.committed = true;
                let dir = dir.canonicalize().unwrap_or_else(|_| dir.clone());
                control.layer_committed(DiffBase { id: id.clone(), dir });
            }
            SnapshotReport {
                path: PathBuf::new(),
                parent: parent.map(|p| p.id),
                id: written.id,
                pause_ms: ms(pause),
                total_ms: ms(start.elapsed()),
                bytes: written.bytes,
                memory_bytes: mem_bytes,
                zero_pages: written.zero_pages,
                quiesced: agent.is_some(),
                warnings,
                live: live_report,
            }
        }),
        Err(e) => {
            if resume_on_error {
                // Never lose the guest because its snapshot failed.
                if let Err(e) = control.resume() {
                    tracing::error!("cannot resume the guest after its snapshot failed: {e}");
                }
                let mut ignored = Vec::new();
                thaw(&mut agent, &mut ignored);
            }
            Err(e)
        }
    }
}
