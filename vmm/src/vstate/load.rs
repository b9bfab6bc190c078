//! Bringing a resumed VM's memory in from its snapshot while the guest runs.
//!
//! The VM runs at once on anonymous memory registered with a userfaultfd (`uffd`): the first
//! touch of a page not brought in yet (by a vCPU, or by the VMM) waits in the kernel while the
//! loader thread brings in the whole chunk that holds it (1 MiB, the unit of the snapshot's
//! checksums: one fault for 256 pages, where a page-by-page load took a fault each). Meanwhile,
//! unless the load is lazy, the loader brings in every other chunk with data, those the guest
//! wrote last before the snapshot first, so the guest rarely waits at all. Where the kernel
//! offers UFFDIO_MOVE, a 2 MiB block is read into a buffer that is a transparent huge page and
//! moved in whole (`HugeStage`): the guest gets huge pages, as after a boot, which KVM maps in one
//! fault each, and its first pass over memory after the resume takes about a third less time
//! than on 4 KiB pages (measured, `docs/BENCHMARKS.md`). With `verify`, each
//! chunk is checked against the snapshot's checksums before the guest sees any of it. Once every
//! chunk with data is in, the memory is unregistered: plain anonymous memory, which no longer
//! depends on the snapshot's files (`MemoryLoad::independent`).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::memory::GuestMemory;
use super::uffd::Userfault;
use snapshot::Chain;

/// How often a loader with no fault to serve looks again whether it may load ahead: while the
/// machine is being built (`MemoryLoad::begin` comes within milliseconds), and when lazy
/// (`MemoryLoad::finish` may come at any time).
const BUILDING_POLL_MS: i32 = 2;
const LAZY_POLL_MS: i32 = 50;
/// How often `MemoryLoad::finish` asks whether its caller gives up waiting.
const GIVE_UP_POLL: std::time::Duration = std::time::Duration::from_millis(50);

/// How far a resumed VM's memory is from being its own.
#[derive(Debug)]
pub struct MemoryLoad {
    /// The snapshot directory the memory comes from.
    pub snapshot: PathBuf,
    /// Bytes of data to bring in, and brought in so far.
    pub total_bytes: AtomicU64,
    pub loaded_bytes: AtomicU64,
    /// Every page is the VM's own now: the snapshot's files may change or go.
    pub independent: AtomicBool,
    /// Chunks come in only as they are touched (`vmm resume --lazy`), until `finish`.
    pub lazy: AtomicBool,
    /// The background load may begin (`begin`): not while the machine is being built, whose
    /// KVM calls would wait for the loader's hold on the address space.
    begun: AtomicBool,
    /// Guest memory to load first, `(guest address, bytes)` runs (`MemoryLayout::hot`).
    pub hot: Vec<(u64, u64)>,
    /// Guest addresses whose chunks come in at once, while the machine is being built: what KVM
    /// touches as the vCPUs are restored (`vcpu_state::restore_touches`), which would wait.
    pub urgent: Vec<u64>,
    /// Why the loader stopped (a read error, a chunk failing its checksum): the guest cannot
    /// go on, and the VM ends with this.
    failure: Mutex<Option<LoadFailure>>,
    done: Condvar,
}

#[derive(Clone, Debug, thiserror::Error)]
pub enum LoadFailure {
    /// The snapshot's memory is damaged (a checksum) or unreadable as a snapshot's.
    #[error("memory of snapshot {dir}: {reason}; the VM was stopped before it used that memory")]
    Snapshot { dir: String, reason: String },
    /// The host failed (a read error, an ioctl).
    #[error("cannot load the memory of snapshot {dir}: {reason}")]
    Host { dir: String, reason: String },
}

impl MemoryLoad {
    pub fn new(snapshot: PathBuf, lazy: bool, hot: Vec<(u64, u64)>, urgent: Vec<u64>) -> Self {
        Self {
            snapshot,
            hot,
            urgent,
            total_bytes: AtomicU64::new(0),
            loaded_bytes: AtomicU64::new(0),
            independent: AtomicBool::new(false),
            lazy: AtomicBool::new(lazy),
            begun: AtomicBool::new(false),
            failure: Mutex::new(None),
            done: Condvar::new(),
        }
    }

    /// Lets the background load begin (once the VM runs).
    pub fn begin(&self) {
        self.begun.store(true, Ordering::Release);
    }

    /// The snapshot directory, for messages.
    fn dir(&self) -> String {
        self.snapshot.display().to_string()
    }

    pub fn is_independent(&self) -> bool {
        self.independent.load(Ordering::Acquire)
    }

    pub fn failure(&self) -> Option<LoadFailure> {
        self.failure.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Has every chunk brought in now (a lazy load too), and waits until it is: what reads all
    /// of guest memory (a snapshot, a migration) needs it. The wait also ends, early, once
    /// `give_up` says so (a cancelled job; asked every `GIVE_UP_POLL`); the load goes on.
    pub fn finish(&self, give_up: &dyn Fn() -> bool) -> Result<(), LoadFailure> {
        self.lazy.store(false, Ordering::Release);
        self.begin();
        let mut failure = self.failure.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(f) = failure.as_ref() {
                return Err(f.clone());
            }
            if self.is_independent() || give_up() {
                return Ok(());
            }
            failure = self.done.wait_timeout(failure, GIVE_UP_POLL).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    fn ended(&self, failure: Option<LoadFailure>) {
        let mut slot = self.failure.lock().unwrap_or_else(|e| e.into_inner());
        match failure {
            Some(f) => *slot = Some(f),
            None => self.independent.store(true, Ordering::Release),
        }
        self.done.notify_all();
    }
}

/// One chunk of guest memory: where it is mapped, and whether the snapshot has data in it.
struct Chunk {
    host: usize,
    len: usize,
    guest: u64,
    file_offset: u64,
    data: bool,
}

/// A 2 MiB-aligned buffer, in memory that may be a transparent huge page, that the loader fills
/// from a page file and then moves whole into guest memory (`Userfault::move_in`). The guest then
/// has a huge page there, as after a boot, which KVM maps whole: its first pass over memory after
/// a resume faults once per 2 MiB in KVM instead of once per 4 KiB.
struct HugeStage {
    addr: usize,
}

impl HugeStage {
    const SIZE: usize = 2 << 20;

    fn new() -> std::io::Result<Self> {
        use rustix::mm::{madvise, mmap_anonymous, munmap, Advice, MapFlags, ProtFlags};
        let flags = MapFlags::PRIVATE | MapFlags::NORESERVE;
        // SAFETY: a new private anonymous mapping placed by the kernel, twice the size so that an
        // aligned half can be kept; only this object uses it.
        let base =
            unsafe { mmap_anonymous(std::ptr::null_mut(), 2 * Self::SIZE, ProtFlags::READ | ProtFlags::WRITE, flags) }?
                as usize;
        let addr = base.next_multiple_of(Self::SIZE);
        // SAFETY: unmapping the parts of the mapping just made that lie outside the aligned half.
        unsafe {
            if addr > base {
                munmap(base as *mut _, addr - base)?;
            }
            if base + Self::SIZE > addr {
                munmap((addr + Self::SIZE) as *mut _, base + Self::SIZE - addr)?;
            }
        }
        let stage = Self { addr };
        // SAFETY: advice on the mapping this object owns.
        unsafe { madvise(addr as *mut _, Self::SIZE, Advice::LinuxHugepage) }?;
        Ok(stage)
    }

    /// Reads `SIZE` bytes of `file` from `offset` into the buffer and moves them to `dst`.
    fn load(&self, file: &std::fs::File, offset: u64, uffd: &Userfault, dst: usize) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        // SAFETY: the buffer is this object's mapping, `SIZE` bytes, which nothing else reads or
        // writes; pages moved out of it before come back as fresh zero pages on this write.
        let buf = unsafe { std::slice::from_raw_parts_mut(self.addr as *mut u8, Self::SIZE) };
        file.read_exact_at(buf, offset)?;
        uffd.move_in(self.addr, dst, Self::SIZE)
    }
}

impl Drop for HugeStage {
    fn drop(&mut self) {
        // SAFETY: the mapping this object made and alone uses.
        let _ = unsafe { rustix::mm::munmap(self.addr as *mut _, Self::SIZE) };
    }
}

/// The layers' page files, each mapped read-only when first needed, at the length their
/// manifest gives (every layer's page file holds the whole layout): a file truncated since it was
/// opened then fails the copy (EFAULT past its end) instead of the copy reading past a shorter
/// mapping into whatever memory follows it.
struct FileMaps {
    /// Bytes of each page file, as the manifest gives them.
    len: usize,
    maps: Vec<Option<(usize, usize)>>,
}

impl FileMaps {
    fn new(len: u64) -> Self {
        Self { len: len as usize, maps: Vec::new() }
    }

    /// The address `file` (layer `layer`'s page file) is mapped at.
    fn get(&mut self, layer: usize, file: &std::fs::File) -> std::io::Result<usize> {
        if self.maps.len() <= layer {
            self.maps.resize(layer + 1, None);
        }
        if let Some((addr, _)) = self.maps[layer] {
            return Ok(addr);
        }
        let len = self.len;
        // SAFETY: a new read-only shared mapping of the file, placed by the kernel; only the
        // kernel reads it (`Userfault::copy_from`, which fails past the file's end), and it is
        // unmapped on drop.
        let addr = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                len.max(1),
                rustix::mm::ProtFlags::READ,
                rustix::mm::MapFlags::SHARED,
                file,
                0,
            )
        }?;
        self.maps[layer] = Some((addr as usize, len.max(1)));
        Ok(addr as usize)
    }
}

impl Drop for FileMaps {
    fn drop(&mut self) {
        for &(addr, len) in self.maps.iter().flatten() {
            // SAFETY: a mapping made by `get`, used by nothing after this.
            let _ = unsafe { rustix::mm::munmap(addr as *mut libc::c_void, len) };
        }
    }
}

/// Registers every region of `mem` (fresh anonymous memory, untouched) with a userfaultfd and
/// starts the loader thread, which from now on serves every first touch. Where no userfaultfd
/// can be had (an unprivileged user, see `Userfault::new`), reads all of it now instead, and
/// returns why.
pub fn start(
    mem: &GuestMemory,
    chain: Chain,
    verify: bool,
    load: Arc<MemoryLoad>,
) -> Result<Option<std::io::Error>, LoadFailure> {
    let registered = Userfault::new().and_then(|uffd| {
        for region in mem.iter() {
            uffd.register(region.as_ptr() as usize, region.len() as usize)?;
        }
        Ok(uffd)
    });
    let uffd = match registered {
        Ok(uffd) => uffd,
        Err(e) => {
            // Closing the userfaultfd (dropped with the error) ends any registration.
            let result = load_now(mem, &chain, verify, &load);
            load.ended(result.clone().err());
            return result.map(|()| Some(e));
        }
    };
    let regions: Vec<(usize, usize)> = mem.iter().map(|r| (r.as_ptr() as usize, r.len() as usize)).collect();
    let mem = mem.clone();
    let dir = load.dir();
    let thread_dir = dir.clone();
    std::thread::Builder::new()
        .name("memory-load".into())
        .spawn(move || {
            let dir = thread_dir;
            let start = std::time::Instant::now();
            let result = run(&mem, &chain, &uffd, verify, &load).and_then(|()| {
                for &(start, len) in &regions {
                    uffd.unregister(start, len).map_err(|e| host(&dir, e))?;
                }
                Ok(())
            });
            match result {
                Ok(()) => {
                    tracing::debug!(
                        "memory loaded ({} MiB) in {} ms: the VM no longer depends on {dir}",
                        load.loaded_bytes.load(Ordering::Relaxed) >> 20,
                        start.elapsed().as_millis()
                    );
                    load.ended(None);
                }
                Err(f) => {
                    load.ended(Some(f.clone()));
                    // Whoever waits for a page goes on waiting (closing the userfaultfd would let it
                    // run on zeros) until the VM ends of this failure (`persist::watch_memory_load`).
                    // If the process is still there, its main thread waits for that memory itself
                    // (while the machine is being restored): end it from here.
                    std::thread::sleep(std::time::Duration::from_secs(2));
                    eprintln!("vmm: {f}");
                    std::process::exit(if matches!(f, LoadFailure::Snapshot { .. }) { 2 } else { 1 });
                }
            }
        })
        .map_err(|e| host(&dir, e))?;
    Ok(None)
}

/// A buffer for the largest chunk `reader` reads.
fn chunk_buffer(reader: &snapshot::chain::ChainReader<'_>) -> Vec<u8> {
    vec![0u8; reader.chunks().iter().map(|c| c.2 as usize).max().unwrap_or(0)]
}

/// Reads every chunk with data into `mem` at once.
fn load_now(mem: &GuestMemory, chain: &Chain, verify: bool, load: &MemoryLoad) -> Result<(), LoadFailure> {
    use vm_memory::Bytes;
    let dir = load.dir();
    let reader = chain.reader().map_err(|e| host(&dir, e))?;
    let mut buf = chunk_buffer(&reader);
    for (i, &(guest, _, len)) in reader.chunks().iter().enumerate() {
        if reader.chunk_has_data(i) {
            reader.read_chunk(i, &mut buf, verify).map_err(|e| read_failure(&dir, e))?;
            mem.write_slice(&buf[..len as usize], GuestAddress(guest)).map_err(|e| host(&dir, e))?;
            load.loaded_bytes.fetch_add(len, Ordering::Relaxed);
        } else if verify {
            reader.read_chunk(i, &mut buf, true).map_err(|e| read_failure(&dir, e))?;
        }
    }
    Ok(())
}

fn read_failure(dir: &str, e: snapshot::Error) -> LoadFailure {
    match e {
        snapshot::Error::Io { .. } => host(dir, e),
        e => LoadFailure::Snapshot { dir: dir.into(), reason: e.to_string() },
    }
}

fn host(dir: &str, e: impl std::fmt::Display) -> LoadFailure {
    LoadFailure::Host { dir: dir.into(), reason: e.to_string() }
}

/// Serves faults and loads chunks until every chunk with data is in.
fn run(mem: &GuestMemory, chain: &Chain, uffd: &Userfault, verify: bool, load: &MemoryLoad) -> Result<(), LoadFailure> {
    let dir = load.dir();
    let reader = chain.reader().map_err(|e| host(&dir, e))?;
    let mut chunks = Vec::new();
    for (i, &(guest, file_offset, len)) in reader.chunks().iter().enumerate() {
        let host_addr = mem
            .get_host_address(GuestAddress(guest))
            .map_err(|e| LoadFailure::Snapshot { dir: dir.clone(), reason: format!("chunk {i}: {e}") })?;
        chunks.push(Chunk {
            host: host_addr as usize,
            len: len as usize,
            guest,
            file_offset,
            data: reader.chunk_has_data(i),
        });
    }
    // What must come in before the memory is the VM's own: every chunk with data, and with
    // `verify` every other chunk too (checked to be zero, then left to fault in as zero).
    let needed = |c: &Chunk| c.data || verify;
    // The guest's recently written chunks first, then the others, each group in address order.
    let hot = |c: &Chunk| load.hot.iter().any(|&(a, l)| a < c.guest + c.len as u64 && c.guest < a + l);
    let mut plan: Vec<usize> = (0..chunks.len()).filter(|&i| needed(&chunks[i])).collect();
    plan.sort_by_key(|&i| !hot(&chunks[i]));
    let data_bytes = chunks.iter().filter(|c| c.data).map(|c| c.len as u64).sum();
    load.total_bytes.store(data_bytes, Ordering::Relaxed);
    let mut left = plan.len();
    let mut loaded = vec![false; chunks.len()];
    // Chunks moved in whole with their block (`HugeStage`), zero ones too: every page is there.
    let mut moved = vec![false; chunks.len()];
    let mut buf = chunk_buffer(&reader);
    let mut next = 0;
    let mut maps = FileMaps::new(chain.top().manifest.memory.total_size());
    // Whole 2 MiB blocks go in as huge pages where they can (`HugeStage`): both chunks not in
    // yet, one with data, read from one page file; and not when checking each chunk first.
    let mut stage = if uffd.can_move() && !verify { HugeStage::new().ok() } else { None };
    let huge_block = |i: usize, loaded: &[bool]| -> Option<(usize, &std::fs::File)> {
        let start = chunks[i].host & !(HugeStage::SIZE - 1);
        let first = if chunks[i].host == start { i } else { i.checked_sub(1)? };
        let (a, b) = (chunks.get(first)?, chunks.get(first + 1)?);
        let whole = a.host == start
            && b.host == a.host + a.len
            && b.guest == a.guest + a.len as u64
            && a.len + b.len == HugeStage::SIZE;
        if !whole || loaded[first] || loaded[first + 1] || !(a.data || b.data) {
            return None;
        }
        let (layer, file) = reader.chunk_source(first)?;
        let (next_layer, _) = reader.chunk_source(first + 1)?;
        (next_layer == layer && b.file_offset == a.file_offset + a.len as u64).then_some((first, file))
    };
    // Brings chunk `i`'s data in (or checks a zero chunk): the guest's pages of it are then
    // there, except a zero chunk's, which a fault maps as zero (`zeropage`), unless it came with
    // its block (`moved`).
    let mut bring = |i: usize, loaded: &mut Vec<bool>, moved: &mut Vec<bool>, left: &mut usize| {
        let block = stage.as_ref().and_then(|s| Some((s, huge_block(i, loaded)?)));
        if let Some((s, (first, file))) = block {
            match s.load(file, chunks[first].file_offset, uffd, chunks[first].host) {
                Ok(()) => {
                    for k in [first, first + 1] {
                        loaded[k] = true;
                        moved[k] = true;
                        if chunks[k].data {
                            load.loaded_bytes.fetch_add(chunks[k].len as u64, Ordering::Relaxed);
                        }
                        if needed(&chunks[k]) {
                            *left -= 1;
                        }
                    }
                    return Ok(());
                }
                // Chunk by chunk from now on; what did move is there, and is kept.
                Err(e) => {
                    tracing::debug!("loading in huge pages stopped: {e}");
                    stage = None;
                }
            }
        }
        let c = &chunks[i];
        if c.data {
            match reader.chunk_source(i).filter(|_| !verify) {
                // One copy, from the page cache straight into the guest's page.
                Some((layer, file)) => {
                    let src = maps.get(layer, file).map_err(|e| host(&dir, e))? + c.file_offset as usize;
                    // SAFETY: the chunk lies inside the file (the layout was validated against the
                    // page file's size when the snapshot was opened), which is mapped whole.
                    unsafe { uffd.copy_from(src as *const u8, c.len, c.host) }.map_err(|e| host(&dir, e))?;
                }
                None => {
                    reader.read_chunk(i, &mut buf, verify).map_err(|e| read_failure(&dir, e))?;
                    uffd.copy(&buf[..c.len], c.host).map_err(|e| host(&dir, e))?;
                }
            }
            load.loaded_bytes.fetch_add(c.len as u64, Ordering::Relaxed);
        } else if verify {
            reader.read_chunk(i, &mut buf, true).map_err(|e| read_failure(&dir, e))?;
        }
        loaded[i] = true;
        if needed(c) {
            *left -= 1;
        }
        Ok(())
    };
    let chunk_of = |addr: usize| {
        let i = chunks.partition_point(|c| c.host + c.len <= addr);
        (i < chunks.len() && chunks[i].host <= addr).then_some(i)
    };
    for &guest in &load.urgent {
        let i = chunks.partition_point(|c| c.guest + c.len as u64 <= guest);
        if i < chunks.len() && chunks[i].guest <= guest && chunks[i].data && !loaded[i] {
            bring(i, &mut loaded, &mut moved, &mut left)?;
        }
    }
    while left > 0 {
        while let Some(addr) = uffd.next_fault().map_err(|e| host(&dir, e))? {
            let Some(i) = chunk_of(addr) else {
                uffd.wake(addr, 4096).map_err(|e| host(&dir, e))?;
                continue;
            };
            let was = loaded[i];
            if !was {
                bring(i, &mut loaded, &mut moved, &mut left)?;
            }
            if !chunks[i].data && !moved[i] {
                uffd.zeropage(chunks[i].host, chunks[i].len).map_err(|e| host(&dir, e))?;
            } else if was {
                // Brought in since the fault was raised: the toucher only needs waking.
                uffd.wake(addr, 4096).map_err(|e| host(&dir, e))?;
            }
        }
        if left == 0 {
            break;
        }
        if !load.begun.load(Ordering::Acquire) {
            uffd.wait(BUILDING_POLL_MS).map_err(|e| host(&dir, e))?;
            continue;
        }
        if load.lazy.load(Ordering::Acquire) {
            uffd.wait(LAZY_POLL_MS).map_err(|e| host(&dir, e))?;
            continue;
        }
        while next < plan.len() && loaded[plan[next]] {
            next += 1;
        }
        if let Some(&i) = plan.get(next) {
            bring(i, &mut loaded, &mut moved, &mut left)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn waiting_for_a_load_ends_when_the_waiter_gives_up() {
        // No loader runs: without giving up, `finish` would wait for ever.
        let load = Arc::new(MemoryLoad::new(PathBuf::from("/nowhere"), true, Vec::new(), Vec::new()));
        let give_up = Arc::new(AtomicBool::new(false));
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let (waiting_load, waiting_flag) = (load.clone(), give_up.clone());
        std::thread::spawn(move || {
            let result = waiting_load.finish(&|| waiting_flag.load(Ordering::Relaxed));
            done_tx.send(result.is_ok()).unwrap();
        });
        assert!(done_rx.recv_timeout(Duration::from_millis(300)).is_err(), "finish returned with nothing loaded");
        give_up.store(true, Ordering::Relaxed);
        assert_eq!(done_rx.recv_timeout(Duration::from_secs(5)), Ok(true));
        assert!(!load.is_independent());
        // Finishing also ended the lazy mode: the loader, had there been one, would load on.
        assert!(!load.lazy.load(Ordering::Relaxed));
    }

    #[test]
    fn a_failed_load_fails_its_waiters() {
        let load = MemoryLoad::new(PathBuf::from("/nowhere"), false, Vec::new(), Vec::new());
        load.ended(Some(LoadFailure::Host { dir: "/nowhere".into(), reason: "test".into() }));
        assert!(matches!(load.finish(&|| false), Err(LoadFailure::Host { .. })));
    }
}
