//! Rebuilding a machine from a snapshot: a directory (guest memory mapped privately from its page
//! file, so pages load on first touch) or a stream (guest memory filled as frames arrive).

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use snapshot::streamed::{self, MemoryUpdate, PageMap, StreamedSnapshot};
use snapshot::{Chain, FileIdentity, MachineSections, Manifest};
use vm_memory::{Bytes, GuestAddress};

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use super::{MachineState, PersistError};
use crate::arch::x86_64::cpuid;
use crate::config::{DiskConfig, NetArg, NetConfig, VmConfig, VsockConfig};
use crate::control::DiffBase;
use crate::devices::bus::lock;
use crate::devices::virtio::block::BlockError;
use crate::machine::{self, Backends, Machine, MachineError};
use crate::vstate::load::{self, LoadFailure, MemoryLoad};
use crate::vstate::memory::{self, GuestMemory};
use crate::vstate::vcpu_state::{self, VcpuState};
use crate::vstate::vm::VmError;

/// How a stream is named in errors.
const STREAM: &str = "the snapshot stream";
const MIGRATION: &str = "the migration stream";

/// How long a resume from a stream waits for its disks and TAPs to be let go by the VM it came from.
const BACKEND_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Where a snapshot is read from.
pub enum ResumeSource {
    Dir(PathBuf),
    /// A snapshot stream (`vmm snapshot --out -`), e.g. stdin.
    Stream(Box<dyn Read + Send>),
    /// The connections of a live migration: the machine state comes after the pre-copy memory.
    Migration(MigrationInput),
}

/// Something that cuts a connection from another thread.
pub type Stop = Box<dyn Fn() + Send + Sync>;
/// One lane of a migration: its stream, and what cuts it.
pub type LaneInput = (Box<dyn Read + Send>, Stop);

/// A live migration as the restore reads it.
pub struct MigrationInput {
    /// The VM's stream (`snapshot::streamed::read_migration`).
    pub stream: Box<dyn Read + Send>,
    /// Ends reading `stream` (a lane failed: the rest is of no use), leaving it writable.
    pub stop_stream: Stop,
    /// The other connections' lanes (`snapshot::streamed::read_lane`), read in parallel, each
    /// with what cuts it (the VM's stream failed).
    pub lanes: Vec<LaneInput>,
}

#[derive(Clone, Debug, Default)]
pub struct ResumeOptions {
    /// Name of the resumed VM (default: the snapshot's).
    pub name: Option<String>,
    /// Check each chunk of memory against its checksum before the guest sees it (directories; a
    /// stream is always checked).
    pub verify: bool,
    /// Bring memory in from a directory only as the guest touches it (no background load).
    pub lazy: bool,
    /// Resume even if a disk changed since the snapshot.
    pub disk_changed_ok: bool,
    /// TAP devices for the snapshot's network interfaces, in order, instead of their own (a MAC
    /// given here replaces the snapshot's; `mac: None` keeps it).
    pub nets: Vec<NetArg>,
    /// The vsock device's CID and socket instead of the snapshot's.
    pub vsock: Option<VsockConfig>,
    /// Disk files to run on instead of the snapshot's (in order; no working copy is made).
    pub disks: Vec<DiskConfig>,
}

/// A machine rebuilt from a snapshot, ready to start.
pub struct Restored {
    pub machine: Machine,
    /// The snapshot directory the guest's memory now equals: a diff taken later is of it.
    pub diff_base: Option<DiffBase>,
    /// Memory still coming in from a snapshot directory (`vstate::load`).
    pub memory: Option<LoadingMemory>,
}

/// A resumed VM's memory load, and the page files it reads, which must not change meanwhile:
/// vmm holds a shared lock on each, and watches them.
pub struct LoadingMemory {
    pub load: Arc<MemoryLoad>,
    pub files: Vec<MemoryFile>,
    /// Why the memory was read whole before the VM could run (no userfaultfd), if it was.
    pub read_whole: Option<std::io::Error>,
}

/// A page file of a resumed VM.
pub struct MemoryFile {
    pub path: PathBuf,
    pub identity: FileIdentity,
    /// Holds the shared lock for the VM's life.
    pub lock: File,
}

/// The manifest's memory regions must be those this vmm lays out for its memory size.
fn check_layout(manifest: &Manifest) -> Result<(), PersistError> {
    let expected = crate::arch::x86_64::memory_map::ram_regions(manifest.vm.mem_bytes);
    let layout: Vec<(u64, u64)> = manifest.memory.regions.iter().map(|r| (r.guest_addr, r.size)).collect();
    if layout != expected {
        return Err(PersistError::Inconsistent("memory layout does not match the memory size".into()));
    }
    Ok(())
}

/// Checks what can be checked of a snapshot's state against its manifest, without KVM.
fn decode_state(manifest: &Manifest, bytes: &[u8]) -> Result<MachineState, PersistError> {
    let sections = MachineSections::decode(bytes)?;
    let state = MachineState::from_sections(&sections, usize::from(manifest.vm.vcpus))?;
    check_layout(manifest)?;
    Ok(state)
}

/// Opens a snapshot directory, and its parents if it is a diff, and decodes its machine state.
/// `verify_memory`: check every layer's memory checksums too.
pub fn load_dir(dir: &Path, verify_memory: bool) -> Result<(Chain, MachineState), PersistError> {
    let chain = Chain::open(dir)?;
    let top = chain.top();
    let bytes = top.read_state()?;
    let state = decode_state(&top.manifest, &bytes)?;
    if verify_memory {
        for layer in &chain.layers {
            layer.verify_memory()?;
        }
    }
    Ok((chain, state))
}

/// Reads and checks a whole snapshot stream, dropping its memory (`vmm inspect -`, `verify -`).
pub fn inspect_stream(input: impl Read, what: &str) -> Result<StreamedSnapshot, PersistError> {
    let (streamed, ()) = streamed::read_snapshot(input, what, |_| Ok::<_, PersistError>(()), |_, _| Ok(()))?;
    decode_state(&streamed.manifest, &streamed.state)?;
    Ok(streamed)
}

/// Locks every layer's page file shared for as long as the VM loads memory from it: any number
/// of VMs may load from one snapshot; a vmm that would write the file in place takes the lock
/// exclusively, and so waits for them.
fn lock_memory_files(chain: &Chain) -> Result<Vec<MemoryFile>, PersistError> {
    chain
        .layers
        .iter()
        .map(|layer| {
            let path = layer.memory_path();
            let path = path.canonicalize().unwrap_or(path);
            let map_err = |e: std::io::Error| PersistError::MapMemory(format!("{}: {e}", path.display()));
            let lock = File::open(&path).map_err(map_err)?;
            lock.try_lock_shared().map_err(|e| map_err(e.into()))?;
            let identity = FileIdentity::of(&lock.metadata().map_err(map_err)?);
            Ok(MemoryFile { path, identity, lock })
        })
        .collect()
}

/// Writes a memory update into guest memory.
fn apply(mem: &GuestMemory, update: MemoryUpdate<'_>, what: &str) -> Result<(), snapshot::Error> {
    let write = |bytes: &[u8], addr: u64| {
        mem.write_slice(bytes, GuestAddress(addr))
            .map_err(|e| snapshot::Error::BadStream { what: what.into(), reason: e.to_string() })
    };
    match update {
        MemoryUpdate::Data { guest_addr, bytes } => write(bytes, guest_addr)?,
        MemoryUpdate::Zero { guest_addr, len, overwrites: true } => {
            let zeros = vec![0u8; 1 << 20];
            for off in (0..len).step_by(zeros.len()) {
                write(&zeros[..(len - off).min(zeros.len() as u64) as usize], guest_addr + off)?;
            }
        }
        // Fresh memory is zero already, and stays unbacked.
        MemoryUpdate::Zero { .. } => {}
        MemoryUpdate::Disk { .. } => {
            return Err(snapshot::Error::BadStream { what: what.into(), reason: "disk data out of place".into() })
        }
    }
    Ok(())
}

/// The threads reading a migration's lanes into guest memory.
struct LaneReaders {
    threads: Vec<std::thread::JoinHandle<Option<PageMap>>>,
    /// The first lane's failure, while the VM's stream had not failed itself.
    failure: Arc<Mutex<Option<PersistError>>>,
    stream_failed: Arc<AtomicBool>,
    stops: Vec<Stop>,
}

impl LaneReaders {
    /// Starts reading every lane into `mem`; a lane that fails stops the VM's stream.
    fn start(
        lanes: Vec<LaneInput>,
        stop_stream: Stop,
        mem: &GuestMemory,
        layout: &snapshot::MemoryLayout,
    ) -> Result<Self, PersistError> {
        let failure = Arc::new(Mutex::new(None));
        let stream_failed = Arc::new(AtomicBool::new(false));
        let stop_stream = Arc::new(stop_stream);
        let mut readers = Self { threads: Vec::new(), failure, stream_failed, stops: Vec::new() };
        for (i, (input, stop)) in lanes.into_iter().enumerate() {
            let what = format!("migration connection {}", i + 1);
            let (mem, layout) = (mem.clone(), layout.clone());
            let (failure, stream_failed, stop_stream) =
                (readers.failure.clone(), readers.stream_failed.clone(), stop_stream.clone());
            let thread = std::thread::Builder::new()
                .name(format!("receive-lane{}", i + 1))
                .spawn(move || match streamed::read_lane(input, &what, &layout, |u| apply(&mem, u, &what)) {
                    Ok(pages) => Some(pages),
                    Err(e) => {
                        // A lane cut short: its source went away or gave up, which the VM's
                        // stream says itself (with the reason, if it gave one). Bad data on it
                        // dooms the migration at once.
                        let cut = matches!(
                            &e,
                            snapshot::Error::Stream { err, .. }
                                if err.is_truncated() || matches!(err, snapshot::stream::StreamError::Io(_))
                        );
                        if !stream_failed.load(Ordering::Acquire) {
                            failure.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(e.into());
                            if !cut {
                                stop_stream();
                            }
                        }
                        None
                    }
                })
                .map_err(|e| PersistError::Inconsistent(format!("cannot start a thread: {e}")))?;
            readers.threads.push(thread);
            readers.stops.push(stop);
        }
        Ok(readers)
    }

    /// Waits for every lane to end; what each delivered.
    fn join(&mut self) -> Result<Vec<PageMap>, PersistError> {
        let mut maps = Vec::new();
        for (i, t) in self.threads.drain(..).enumerate() {
            match t.join() {
                Ok(Some(pages)) => maps.push(pages),
                _ => {
                    let failure = self.failure.lock().unwrap_or_else(|e| e.into_inner()).take();
                    return Err(failure.unwrap_or_else(|| {
                        PersistError::Inconsistent(format!("migration connection {} failed", i + 1))
                    }));
                }
            }
        }
        Ok(maps)
    }

    /// The VM's stream failed with `e`: the lanes are cut, and the reason is a lane's failure
    /// if one stopped the stream (unless the source said why it gave up).
    fn stream_failed(&self, e: PersistError) -> PersistError {
        self.stream_failed.store(true, Ordering::Release);
        for stop in &self.stops {
            stop();
        }
        let abandoned = matches!(
            &e,
            PersistError::Format(snapshot::Error::Stream { err: snapshot::stream::StreamError::Abandoned { .. }, .. })
        );
        match self.failure.lock().unwrap_or_else(|e| e.into_inner()).take() {
            Some(lane) if !abandoned => lane,
            _ => e,
        }
    }
}

/// Reads a snapshot stream into fresh guest memory of the size its manifest gives (with a
/// migration's lanes, those too).
/// `before_memory` runs once the manifest is read and checked, before anything else is: what can
/// refuse the VM here must do so then, while its source (with `--stop`) can still keep it. It
/// also gives the files the disks that travel with a migration go to (by disk number).
fn read_stream<T>(
    input: impl Read,
    migration: Option<(Vec<LaneInput>, Stop)>,
    before_memory: impl FnOnce(&Manifest) -> Result<(T, Vec<Option<File>>), PersistError>,
) -> Result<(StreamedSnapshot, GuestMemory, T), PersistError> {
    let what = if migration.is_some() { "the migration stream" } else { "stdin" };
    let is_migration = migration.is_some();
    let readers: std::cell::RefCell<Option<LaneReaders>> = std::cell::RefCell::new(None);
    let prepare = |m: &Manifest| -> Result<(GuestMemory, T, Vec<Option<File>>), PersistError> {
        check_layout(m)?;
        let (claimed, disks) = before_memory(m)?;
        let mem = memory::create_guest_memory(m.vm.mem_bytes).map_err(MachineError::from)?;
        if let Some((lanes, stop_stream)) = migration {
            *readers.borrow_mut() = Some(LaneReaders::start(lanes, stop_stream, &mem, &m.memory)?);
        }
        Ok((mem, claimed, disks))
    };
    let fill = |(mem, _, disks): &mut (GuestMemory, T, Vec<Option<File>>), update: MemoryUpdate<'_>| {
        match update {
            MemoryUpdate::Disk { disk, offset, bytes } => {
                use std::os::unix::fs::FileExt;
                let file = disks.get(disk).and_then(Option::as_ref).ok_or_else(|| {
                    PersistError::Inconsistent(format!("disk data for disk {disk}, which is not copied here"))
                })?;
                file.write_all_at(bytes, offset)
                    .map_err(|e| PersistError::Disk(format!("writing disk {disk}: {e}")))?;
            }
            update => apply(mem, update, what)?,
        }
        Ok(())
    };
    let join = |_: &mut (GuestMemory, T, Vec<Option<File>>)| match readers.borrow_mut().as_mut() {
        Some(r) => r.join(),
        None => Ok(Vec::new()),
    };
    let read = if is_migration {
        streamed::read_migration(input, what, prepare, fill, join)
    } else {
        streamed::read_snapshot(input, what, prepare, fill)
    };
    let (streamed, (mem, claimed, disks)) = match read {
        Ok(r) => r,
        Err(e) => {
            return Err(match readers.borrow().as_ref() {
                Some(r) => r.stream_failed(e),
                None => e,
            })
        }
    };
    // The disks as they arrived are durable before the destination says it is ready.
    for (i, file) in disks.iter().enumerate() {
        if let Some(f) = file {
            f.sync_all().map_err(|e| PersistError::Disk(format!("syncing disk {i}: {e}")))?;
        }
    }
    Ok((streamed, mem, claimed))
}

/// Files a restore created, removed unless it succeeds.
#[derive(Default)]
struct Created(Vec<PathBuf>);

impl Created {
    fn keep(mut self) {
        self.0.clear();
    }
}

impl Drop for Created {
    /// Newest first: the files, then the directory made for them (if it is empty by then).
    fn drop(&mut self) {
        for path in self.0.iter().rev() {
            if path.is_dir() {
                let _ = std::fs::remove_dir(path);
            } else {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

/// The files a migration's copied disks are written to (those the manifest says travel with
/// it): the `--disk` the user gave for it, or a fresh file in the VM's state directory,
/// created at the disk's size (and noted in `created`). One another VM runs on is refused.
fn create_copied_disks(
    manifest: &Manifest,
    config: &VmConfig,
    created: &mut Created,
) -> Result<Vec<Option<File>>, PersistError> {
    let mut files = Vec::new();
    for (d, target) in manifest.vm.disks.iter().zip(&config.disks) {
        let Some(copy) = &d.copy else {
            files.push(None);
            continue;
        };
        let path = &target.path;
        let io = |what: &str, e: std::io::Error| PersistError::Disk(format!("disk {}: {what}: {e}", path.display()));
        if let Some(dir) = path.parent() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| io("cannot create its directory", e))?;
        }
        use std::os::unix::fs::OpenOptionsExt;
        let existed = path.exists();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
            .map_err(|e| io("cannot open it", e))?;
        if !existed {
            created.0.push(path.clone());
        }
        if let Err(std::fs::TryLockError::WouldBlock) = file.try_lock() {
            return Err(PersistError::Machine(MachineError::Disk(BlockError::InUse(path.display().to_string()))));
        }
        // The lock goes with this handle once the stream is read; the VM's own takes its place.
        let _ = file.unlock();
        file.set_len(0).and_then(|()| file.set_len(copy.size)).map_err(|e| io("cannot size it", e))?;
        files.push(Some(file));
    }
    Ok(files)
}

/// The refusal of a guest given CPU features this host cannot offer (`missing`, as
/// `cpuid::missing_features` names them), if any.
fn lacking_features(missing: Vec<String>) -> Result<(), PersistError> {
    if missing.is_empty() {
        Ok(())
    } else {
        Err(PersistError::HostCpu(format!("the CPU lacks features the guest uses (CPUID {})", missing.join(", "))))
    }
}

/// Refuses a snapshot whose guest was given CPU features this host cannot offer.
fn check_host_cpu(vm: &crate::vstate::vm::Vm, saved: &VcpuState) -> Result<(), PersistError> {
    let supported =
        vm.kvm.get_supported_cpuid(256).map_err(|err| VmError::Kvm { call: "KVM_GET_SUPPORTED_CPUID", err })?;
    lacking_features(cpuid::missing_features(&saved.cpuid, supported.as_slice()))
}

/// Refuses disks that changed since the snapshot (unless told otherwise): those the snapshot
/// holds no copy of and the user did not replace.
fn check_disks(manifest: &Manifest, opts: &ResumeOptions) -> Result<(), PersistError> {
    if opts.disk_changed_ok {
        return Ok(());
    }
    for (i, d) in manifest.vm.disks.iter().enumerate() {
        if d.copy.is_some() || opts.disks.get(i).is_some() {
            continue;
        }
        let Some(saved) = d.identity else { continue };
        // A missing disk is reported when it is opened.
        let Ok(meta) = std::fs::metadata(&d.path) else { continue };
        if let Some(why) = saved.changes(&FileIdentity::of(&meta)) {
            return Err(PersistError::DiskChanged { path: d.path.clone(), why });
        }
    }
    Ok(())
}

/// The VM configuration a snapshot was taken with (under the name asked for).
fn config_of(manifest: &Manifest, opts: &ResumeOptions) -> Result<VmConfig, PersistError> {
    let desc = &manifest.vm;
    if opts.name.is_none() && !crate::api::valid_name(&desc.name) {
        return Err(PersistError::BadName(desc.name.clone()));
    }
    Ok(VmConfig {
        name: opts.name.clone().unwrap_or_else(|| desc.name.clone()),
        kernel: desc.kernel.clone().into(),
        initrd: None,
        cmdline: desc.cmdline.clone(),
        mem_bytes: desc.mem_bytes,
        vcpus: desc.vcpus,
        disks: disks_of(manifest, opts)?,
        nets: nets_of(manifest, opts)?,
        vsock: match (&opts.vsock, &desc.vsock) {
            (Some(_), None) => {
                return Err(PersistError::Override(
                    "the snapshot's VM has no vsock device: --vsock can only replace one".into(),
                ))
            }
            (Some(v), _) => Some(v.clone()),
            (None, Some(v)) => Some(VsockConfig { cid: v.cid, uds: v.uds.clone().into() }),
            (None, None) => None,
        },
    })
}

/// The disks the resumed VM runs on: those the user gave (`--disk`, in order), else the working
/// copies of the snapshot's own copies (made by `make_working_copies`), else the disks the
/// snapshot refers to.
fn disks_of(manifest: &Manifest, opts: &ResumeOptions) -> Result<Vec<DiskConfig>, PersistError> {
    let saved = &manifest.vm.disks;
    if opts.disks.len() > saved.len() {
        return Err(PersistError::Override(format!(
            "the snapshot has {} disk(s), --disk gave {}: give at most one --disk per disk, in order",
            saved.len(),
            opts.disks.len()
        )));
    }
    for (i, (given, d)) in opts.disks.iter().zip(saved).enumerate() {
        if given.read_only && !d.read_only {
            return Err(PersistError::Override(format!(
                "--disk {},ro: the guest's disk {i} is writable, and it would see its writes fail; give it writable",
                given.path.display()
            )));
        }
        let expected = d.copy.as_ref().map(|c| c.size).or(d.identity.map(|id| id.size));
        // A missing file is reported when it is opened.
        let Ok(meta) = std::fs::metadata(&given.path) else { continue };
        if !meta.is_file() {
            return Err(PersistError::Override(format!("--disk {} is not a regular file", given.path.display())));
        }
        if let Some(expected) = expected.filter(|&e| e / 512 != meta.len() / 512) {
            return Err(PersistError::Override(format!(
                "--disk {} is {} bytes, the snapshot's disk {i} was {expected}: the guest would see another disk",
                given.path.display(),
                meta.len()
            )));
        }
    }
    let name = opts.name.clone().unwrap_or_else(|| manifest.vm.name.clone());
    Ok(saved
        .iter()
        .enumerate()
        .map(|(i, d)| match (opts.disks.get(i), &d.copy) {
            (Some(given), _) => given.clone(),
            (None, Some(copy)) => {
                DiskConfig { path: crate::api::state_dir(&name).join(&copy.file), read_only: d.read_only }
            }
            (None, None) => DiskConfig { path: d.path.clone().into(), read_only: d.read_only },
        })
        .collect())
}

/// Refuses a `--disk` that is one of the chain's own disk copies: the guest would change the
/// snapshot in place (and every later snapshot that starts from that copy).
fn check_not_a_copy(chain: &Chain, opts: &ResumeOptions) -> Result<(), PersistError> {
    use std::os::unix::fs::MetadataExt;
    for given in &opts.disks {
        let Ok(meta) = std::fs::metadata(&given.path) else { continue };
        for layer in &chain.layers {
            for copy in layer.manifest.vm.disks.iter().filter_map(|d| d.copy.as_ref()) {
                let path = layer.dir.join(&copy.file);
                if std::fs::metadata(&path).is_ok_and(|m| m.dev() == meta.dev() && m.ino() == meta.ino()) {
                    return Err(PersistError::Override(format!(
                        "--disk {} is the snapshot's own copy {}: the guest would change the snapshot; give a copy of it",
                        given.path.display(),
                        path.display()
                    )));
                }
            }
        }
    }
    Ok(())
}

/// Makes each working copy of the snapshot's disk copies the resumed VM runs on, fresh: the
/// newest whole copy in the chain (a reflink where the file system can, else a sparse copy) with
/// the ranges of every later diff over it. One another VM still runs on is refused (its lock
/// is held).
/// What it creates is noted in `created`, so that a resume that fails takes it away again.
fn make_working_copies(
    chain: &Chain,
    config: &VmConfig,
    opts: &ResumeOptions,
    created: &mut Created,
) -> Result<(), PersistError> {
    for (i, d) in chain.top().manifest.vm.disks.iter().enumerate() {
        let (Some(_), None) = (&d.copy, opts.disks.get(i)) else { continue };
        let target = &config.disks[i].path;
        let io =
            |what: &str, e: std::io::Error| PersistError::WorkingCopy(format!("{}: {what}: {e}", target.display()));
        if let Some(dir) = target.parent().filter(|d| !d.exists()) {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| io("cannot create its directory", e))?;
            created.0.push(dir.to_path_buf());
        }
        if let Ok(existing) = File::open(target) {
            if let Err(std::fs::TryLockError::WouldBlock) = existing.try_lock() {
                return Err(PersistError::Machine(MachineError::Disk(BlockError::InUse(target.display().to_string()))));
            }
        }
        let tmp = target.with_extension("img.partial");
        let _ = std::fs::remove_file(&tmp);
        let built = (|| {
            use std::os::unix::fs::OpenOptionsExt;
            let dst = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(|e| io("creating it", e))?;
            snapshot::chain::build_disk(&chain.layers, i, &dst, &tmp)?;
            dst.sync_all().map_err(|e| io("syncing it", e))
        })();
        if let Err(e) = built {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        std::fs::rename(&tmp, target).map_err(|e| io("renaming it into place", e))?;
        created.0.push(target.clone());
    }
    Ok(())
}

/// The snapshot's network interfaces, on the TAPs the user gave instead, if any.
fn nets_of(manifest: &Manifest, opts: &ResumeOptions) -> Result<Vec<NetConfig>, PersistError> {
    let saved = &manifest.vm.nets;
    if !opts.nets.is_empty() && opts.nets.len() != saved.len() {
        return Err(PersistError::Override(format!(
            "the snapshot has {} network interface(s), --net gave {}: give one --net per interface, in order",
            saved.len(),
            opts.nets.len()
        )));
    }
    let mut nets = Vec::with_capacity(saved.len());
    for (i, n) in saved.iter().enumerate() {
        let mac = crate::config::parse_mac(&n.mac)
            .map_err(|_| PersistError::Inconsistent(format!("network interface {i} has MAC '{}'", n.mac)))?;
        let net = match opts.nets.get(i) {
            // The guest's driver read its MAC when it started: the device must keep it.
            Some(arg) if arg.mac.is_some_and(|m| m != mac) => {
                return Err(PersistError::Override(format!(
                    "--net {}: the guest's interface {i} has MAC {}; a resumed guest keeps its MAC, leave mac= out",
                    arg.tap, n.mac
                )))
            }
            Some(arg) => NetConfig { tap: arg.tap.clone(), mac },
            None => NetConfig { tap: n.tap.clone(), mac },
        };
        nets.push(net);
    }
    crate::config::check_nets(&nets).map_err(|e| PersistError::Override(e.to_string()))?;
    Ok(nets)
}

/// What can be checked of a snapshot before its memory is read; `claim` then takes the VM's name
/// (given the VM's configuration)
/// (e.g. binds its control socket), so that a VM that cannot be resumed here is refused before
/// a stream's source is gone. Returns the resumed VM's configuration and the claim.
fn admit<T>(
    manifest: &Manifest,
    what: &str,
    opts: &ResumeOptions,
    claim: impl FnOnce(&VmConfig) -> Result<T, PersistError>,
) -> Result<(VmConfig, T), PersistError> {
    // A diff's parents are found beside it on disk; a stream has nowhere to look.
    if manifest.parent.is_some() && (what == STREAM || what == MIGRATION) {
        return Err(PersistError::HasParent(what.to_string()));
    }
    if manifest.vm.vcpus == 0 {
        return Err(PersistError::Inconsistent("the manifest gives the VM no vCPU".into()));
    }
    check_disks(manifest, opts)?;
    let config = config_of(manifest, opts)?;
    let claimed = claim(&config)?;
    Ok((config, claimed))
}

/// Rebuilds the machine of a snapshot, ready to start where it stopped. `claim` is called with
/// the VM's configuration (its name first of all) as soon as it is known and the snapshot passed the checks that need no KVM:
/// before a stream's memory is read, before a directory's memory is mapped. `handover` is
/// called once everything that can refuse the VM was checked (its CPU features, its backends
/// unless another VM of this host still holds them), before the machine is built: a migration
/// asks its source there to stop for good. `took_over` is called once the machine is built (or,
/// when backends are still held by the source, before waiting for them).
pub fn restore<T>(
    source: ResumeSource,
    opts: &ResumeOptions,
    claim: impl FnOnce(&VmConfig) -> Result<T, PersistError>,
    handover: impl FnOnce() -> Result<(), PersistError>,
    took_over: impl FnOnce(),
) -> Result<(Restored, T), PersistError> {
    // A stream's or migration's source on this host, and what it ran on.
    let mut source_here = None;
    // Disk files (and their directory) a failed resume or migration created go with it.
    let mut created = Created::default();
    let (state, mem, memory, diff_base, (config, claimed)) = match source {
        ResumeSource::Dir(dir) => {
            let (chain, state) = load_dir(&dir, false)?;
            check_not_a_copy(&chain, opts)?;
            let top = chain.top();
            let admitted = admit(&top.manifest, &dir.display().to_string(), opts, claim)?;
            make_working_copies(&chain, &admitted.0, opts, &mut created)?;
            let files = lock_memory_files(&chain)?;
            let base = DiffBase { id: top.id.clone(), dir: dir.canonicalize().unwrap_or(dir) };
            let urgent = state.vcpus.iter().flat_map(crate::vstate::vcpu_state::restore_touches).collect();
            let load = Arc::new(MemoryLoad::new(base.dir.clone(), opts.lazy, top.manifest.memory.hot.clone(), urgent));
            let mem = memory::create_guest_memory(top.manifest.vm.mem_bytes).map_err(MachineError::from)?;
            let read_whole = load::start(&mem, chain, opts.verify, load.clone())?;
            (state, mem, Some(LoadingMemory { load, files, read_whole }), Some(base), admitted)
        }
        ResumeSource::Stream(mut input) => {
            // The disks the stream carries go to fresh files (the working copies' places).
            let (streamed, mem, admitted) = read_stream(&mut input, None, |m| {
                let admitted = admit(m, STREAM, opts, claim)?;
                let disks = create_copied_disks(m, &admitted.0, &mut created)?;
                Ok((admitted, disks))
            })?;
            let state = decode_state(&streamed.manifest, &streamed.state)?;
            source_here = on_this_host(&streamed.manifest);
            (state, mem, None, None, admitted)
        }
        ResumeSource::Migration(input) => {
            let lanes = Some((input.lanes, input.stop_stream));
            let (streamed, mem, admitted) = read_stream(input.stream, lanes, |m| {
                check_vendor(m)?;
                check_guest_cpu(m)?;
                let admitted = admit(m, MIGRATION, opts, claim)?;
                let disks = create_copied_disks(m, &admitted.0, &mut created)?;
                Ok((admitted, disks))
            })?;
            let state = decode_state(&streamed.manifest, &streamed.state)?;
            source_here = on_this_host(&streamed.manifest);
            (state, mem, None, None, admitted)
        }
    };
    let t = std::time::Instant::now();
    let vm = machine::create_vm(&config)?;
    check_host_cpu(&vm, &state.vcpus[0])?;
    tracing::debug!("restore: VM created in {:?}", t.elapsed());
    // Backends the source of a stream or of a migration on this host holds (it lets go of them
    // once it stopped) are waited for after the hand-over; ones any other VM holds refuse the
    // VM now, while its source can keep it.
    let backends = match &source_here {
        Some(vm) => Backends::open_unless_held(&config, |e| held_by(vm, e))?,
        None => Some(Backends::open(&config)?),
    };
    tracing::debug!("restore: backends opened at {:?}", t.elapsed());
    handover()?;
    tracing::debug!("restore: handed over at {:?}", t.elapsed());
    // With every backend open, the machine is built before the source hears it was taken over
    // (its downtime then counts the whole of it); a source that still holds some must first hear
    // it, to end and let go of them.
    let mut took_over = Some(took_over);
    let mut waited = std::time::Duration::ZERO;
    let backends = match backends {
        Some(b) => b,
        None => loop {
            if let Some(tell) = took_over.take() {
                tell();
            }
            match Backends::open(&config) {
                Err(e) if Backends::in_use(&e) && waited < BACKEND_WAIT => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                    waited += std::time::Duration::from_millis(20);
                }
                other => break other?,
            }
        },
    };
    // The interrupt controllers and PIT come back before the devices, which may raise interrupts.
    let (machine, _) = Machine::assemble(config, vm, mem, backends, Some(&state.vm))?;
    machine.devices.restore(&state.devices)?;
    if diff_base.is_some() {
        // A disk run on a file of the user's (`--disk`) is not the snapshot's copy: the next
        // snapshot, diff or full, takes all of it.
        for index in 0..opts.disks.len() {
            if let Some(entry) = machine.devices.disk(index) {
                let mut device = lock(&entry.device);
                if let Some(chunks) = device.take_written_chunks() {
                    device.return_written_chunks(&vec![u64::MAX; chunks.len()]);
                }
            }
        }
    }
    // kvmclock before any vCPU runs, so the guest's clock goes on from the saved instant.
    machine.vm.restore_clock(&state.vm)?;
    let xsave_size = machine.vm.xsave_size();
    for (vcpu, saved) in machine.vcpus.iter().zip(&state.vcpus) {
        vcpu_state::restore(&vcpu.fd, saved, xsave_size).map_err(MachineError::from)?;
    }
    // Only now, with the LAPICs restored (KVM_SET_LAPIC replaces their pending interrupts), can
    // the devices raise the interrupts they had pending.
    machine.devices.restored();
    tracing::debug!("restore: machine restored at {:?}", t.elapsed());
    if let Some(tell) = took_over.take() {
        tell();
    }
    created.keep();
    Ok((Restored { machine, diff_base, memory }, claimed))
}

/// What the source of a stream or migration ran on, if it runs on this host (this boot of it).
fn on_this_host(manifest: &Manifest) -> Option<snapshot::VmDescription> {
    let here = super::host_boot_id()?;
    (manifest.host_boot.as_deref() == Some(here.as_str())).then(|| manifest.vm.clone())
}

/// Whether `err` says a backend is in use that the VM described by `vm` runs on itself (the same
/// TAP name, disk file or vsock socket).
fn held_by(vm: &snapshot::VmDescription, err: &MachineError) -> bool {
    let same_file = |a: &str, b: &str| {
        a == b || matches!((Path::new(a).canonicalize(), Path::new(b).canonicalize()), (Ok(x), Ok(y)) if x == y)
    };
    match err {
        MachineError::Tap(crate::devices::virtio::net::TapError::InUse(name)) => vm.nets.iter().any(|n| &n.tap == name),
        MachineError::Disk(BlockError::InUse(path)) => vm.disks.iter().any(|d| same_file(&d.path, path)),
        MachineError::Vsock(crate::devices::virtio::vsock::VsockError::InUse(uds)) => {
            vm.vsock.as_ref().is_some_and(|v| same_file(&v.uds, uds))
        }
        _ => false,
    }
}

/// A guest cannot move to a CPU of another vendor (its CPUID, MSRs and microcode-visible
/// behaviour differ): refused from the manifest, before any memory is sent.
fn check_vendor(manifest: &Manifest) -> Result<(), PersistError> {
    let here = cpuid::host_cpu();
    if manifest.host_cpu.vendor != here.vendor {
        return Err(PersistError::HostCpu(format!(
            "the guest runs on a {} CPU, this host's is {}",
            manifest.host_cpu.vendor, here.vendor
        )));
    }
    Ok(())
}

/// A migrating guest's CPU features must be offered here, and every MSR its state carries must
/// be one this host's KVM restores: refused from the manifest, before any memory is sent.
fn check_guest_cpu(manifest: &Manifest) -> Result<(), PersistError> {
    let Some(guest) = &manifest.guest_cpu else {
        return Err(PersistError::Inconsistent("the manifest does not say what the guest needs of the CPU".into()));
    };
    let kvm = kvm_ioctls::Kvm::new().map_err(|err| VmError::Kvm { call: "open /dev/kvm", err })?;
    let supported = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(|err| VmError::Kvm { call: "KVM_GET_SUPPORTED_CPUID", err })?;
    let saveable = kvm.get_msr_index_list().map_err(|err| VmError::Kvm { call: "KVM_GET_MSR_INDEX_LIST", err })?;
    unsupported_cpu(guest, supported.as_slice(), saveable.as_slice())
}

fn unsupported_cpu(
    guest: &snapshot::GuestCpu,
    supported: &[kvm_bindings::kvm_cpuid_entry2],
    saveable: &[u32],
) -> Result<(), PersistError> {
    lacking_features(cpuid::missing_feature_words(&guest.feature_words, supported))?;
    let msrs: Vec<String> =
        guest.msrs.iter().filter(|m| !saveable.contains(m)).map(|m| format!("{m:#x}")).take(8).collect();
    if !msrs.is_empty() {
        return Err(PersistError::HostCpu(format!(
            "KVM here cannot restore MSRs the guest's state carries ({})",
            msrs.join(", ")
        )));
    }
    Ok(())
}

/// What changed in a resumed VM's page file since it was opened, as the VM's cause of death.
pub fn memory_file_changed(path: &Path, identity: &FileIdentity) -> Option<String> {
    let mut now = match std::fs::metadata(path) {
        Ok(meta) => FileIdentity::of(&meta),
        // Removed or renamed: the open file keeps its content, nothing changed for the guest.
        Err(_) => return None,
    };
    // Another file at the path (a newer snapshot moved there) is not a change of ours.
    if (now.dev, now.ino) != (identity.dev, identity.ino) {
        return None;
    }
    // Not the ctime: a chmod changes it too, and is no reason to stop a guest (a write that sets
    // the mtime back goes unseen here; resume refuses such a disk, though).
    now.ctime_ns = identity.ctime_ns;
    let snapshot = path.parent().unwrap_or(path).display();
    identity.changes(&now).map(|why| format!("memory file of snapshot {snapshot} changed while in use ({why})"))
}

/// Watches a resumed VM's memory load and ends the VM, naming the cause, as soon as it failed
/// (a chunk failing its checksum, a read error) or a page file it reads is changed in place
/// (truncated, overwritten): the guest would otherwise wait for that memory forever, or read
/// garbage. Once the VM's memory is its own, it lets go of the files' locks and stops watching.
pub fn watch_memory_load(memory: LoadingMemory, exit: crate::exit::ExitSender) -> std::io::Result<()> {
    let LoadingMemory { load, files, .. } = memory;
    std::thread::Builder::new().name("memory-file".into()).spawn(move || loop {
        std::thread::sleep(std::time::Duration::from_millis(50));
        if load.is_independent() {
            // Closing the files releases their locks: the snapshot may change or go.
            drop(files);
            return;
        }
        match load.failure() {
            Some(f @ LoadFailure::Snapshot { .. }) => {
                return exit.send(crate::exit::ExitReason::BadSnapshot(f.to_string()))
            }
            Some(f) => return exit.send(crate::exit::ExitReason::Fatal(f.to_string())),
            None => {}
        }
        if let Some(why) = files.iter().find_map(|f| memory_file_changed(&f.path, &f.identity)) {
            exit.send(crate::exit::ExitReason::Fatal(why));
            return;
        }
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_guest_needing_an_msr_kvm_cannot_restore_is_refused() {
        let words = cpuid::host_cpu().feature_words;
        let guest = snapshot::GuestCpu { feature_words: words.clone(), msrs: vec![0x10, 0x174] };
        assert!(unsupported_cpu(&guest, &[], &[0x10, 0x174, 0x175]).is_ok());
        let err = unsupported_cpu(&guest, &[], &[0x10]).unwrap_err().to_string();
        assert!(err.contains("0x174"), "{err}");
        // A feature neither KVM nor the CPU offers (an unused bit of leaf 7 EDX).
        let mut more = words;
        more[4] |= 1 << 1;
        if cpuid::host_cpu().feature_words[4] & (1 << 1) == 0 {
            let guest = snapshot::GuestCpu { feature_words: more, msrs: vec![] };
            let err = unsupported_cpu(&guest, &[], &[]).unwrap_err().to_string();
            assert!(err.contains("7.edx=0x2"), "{err}");
        }
    }
}
