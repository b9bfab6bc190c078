//! The workloads, run by every CPU in ring 3, and the tick lines CPU 0 prints.
//!
//! All state that must survive a snapshot (pass numbers, tick counters, the tick-line schedule)
//! lives in statics, i.e. in guest memory, so a restored guest continues and keeps verifying.

use core::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed, Ordering::SeqCst};

use crate::acpi::Acpi;
use crate::bootinfo::Alloc;
use crate::cmdline::{Config, Workload};
use crate::console::{fail, Line};
use crate::paging::MAP_LIMIT;
use crate::sync::Once;
use crate::virtio::{self, Blk, T_IN, T_OUT};
use crate::{kvmclock, power, smp, sys, MAX_CPUS};
use crate::{net, vsock};

const NS_PER_S: u64 = 1_000_000_000;
const NS_PER_MS: u64 = 1_000_000;

static CONFIG: Once<Config> = Once::new();
static NCPUS: AtomicUsize = AtomicUsize::new(1);
/// Each CPU's memory region (mem workload).
static REGION: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
/// Each CPU's next pass number (mem workload).
static PASS: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
/// Each CPU's tick counter: verified passes (mem) or 100 ms sleeps (idle).
static TICKS: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
/// Guest time of the next tick line, and how many were printed.
static NEXT_LINE_NS: AtomicU64 = AtomicU64::new(0);
static LINES: AtomicU64 = AtomicU64::new(0);

struct DiskSetup {
    windows: [u64; crate::acpi::MAX_VIRTIO],
    nwindows: usize,
    queue_page: u64,
    wbuf: u64,
    rbuf: u64,
}
static DISK: Once<DiskSetup> = Once::new();

struct NetSetup {
    windows: [u64; crate::acpi::MAX_VIRTIO],
    nwindows: usize,
    area: u64,
}
static NET: Once<NetSetup> = Once::new();
static VSOCK: Once<NetSetup> = Once::new();
/// `disk.agent=1`: the agent (CPU 0) asks the disk workload (CPU 1) to hold its writes; the
/// workload parks between two requests, so none is in flight, and says so.
static DISK_HOLD: AtomicBool = AtomicBool::new(false);
static DISK_PARKED: AtomicBool = AtomicBool::new(false);
/// Guest time the hold ends by itself if no thaw came (the protocol's quiesce timeout).
static DISK_HOLD_UNTIL_NS: AtomicU64 = AtomicU64::new(0);
/// Write requests the disk workload completed.
static DISK_WRITES: AtomicU64 = AtomicU64::new(0);
/// The dirty workload's pages: one every `dirty.stride` bytes from here.
static DIRTY_BASE: AtomicU64 = AtomicU64::new(0);

/// Sizes and allocates what the workload needs, before the APs start. Fails clearly if RAM is short.
pub fn prepare(cfg: Config, ncpus: usize, alloc: &mut Alloc, acpi: &Acpi) {
    NCPUS.store(ncpus, Relaxed);
    match cfg.workload {
        Workload::Demo | Workload::Mem => {
            for (cpu, region) in REGION.iter().enumerate().take(ncpus) {
                match alloc.alloc(cfg.mem_size, 2 << 20, MAP_LIMIT) {
                    Some(addr) => region.store(addr, Relaxed),
                    None => {
                        Line::new()
                            .s("FAIL what=mem reason=ram-too-small cpus=")
                            .u(ncpus as u64)
                            .s(" mem.size=")
                            .u(cfg.mem_size)
                            .s(" allocated-cpus=")
                            .u(cpu as u64)
                            .fail();
                    }
                }
            }
        }
        Workload::Disk => {
            if cfg.disk_agent {
                if ncpus < 2 {
                    fail("disk", "reason=disk.agent-needs-2-cpus");
                }
                prepare_vsock(alloc, acpi);
            }
            let bytes = cfg.disk_sectors.saturating_mul(512);
            let (Some(queue_page), Some(wbuf), Some(rbuf)) = (
                alloc.alloc(4096, 4096, MAP_LIMIT),
                alloc.alloc(bytes, 4096, MAP_LIMIT),
                alloc.alloc(bytes, 4096, MAP_LIMIT),
            ) else {
                fail("disk", "reason=ram-too-small-for-buffers");
            };
            // SAFETY: a page just allocated for the queue; the device must see zeroed rings.
            unsafe { core::ptr::write_bytes(queue_page as *mut u8, 0, 4096) };
            DISK.set(DiskSetup { windows: acpi.virtio, nwindows: acpi.nvirtio, queue_page, wbuf, rbuf });
        }
        Workload::Net => {
            let Some(area) = alloc.alloc(net::AREA_BYTES, 4096, MAP_LIMIT) else {
                fail("net", "reason=ram-too-small-for-buffers");
            };
            // SAFETY: just allocated for the driver alone; the device must see zeroed rings.
            unsafe { core::ptr::write_bytes(area as *mut u8, 0, net::AREA_BYTES as usize) };
            NET.set(NetSetup { windows: acpi.virtio, nwindows: acpi.nvirtio, area });
        }
        Workload::Vsock => prepare_vsock(alloc, acpi),
        Workload::Dirty => {
            let span = cfg.dirty_pages.saturating_mul(cfg.dirty_stride).max(cfg.dirty_fill);
            match alloc.alloc(span, 2 << 20, MAP_LIMIT) {
                Some(addr) => DIRTY_BASE.store(addr, Relaxed),
                None => fail("dirty", "reason=ram-too-small"),
            }
        }
        Workload::Idle | Workload::Poweroff | Workload::TripleFault | Workload::AcpiReset | Workload::KeyboardReset => {
        }
    }
    CONFIG.set(cfg);
}

fn prepare_vsock(alloc: &mut Alloc, acpi: &Acpi) {
    let Some(area) = alloc.alloc(vsock::AREA_BYTES, 4096, MAP_LIMIT) else {
        fail("vsock", "reason=ram-too-small-for-buffers");
    };
    // SAFETY: just allocated for the driver alone; the device must see zeroed rings.
    unsafe { core::ptr::write_bytes(area as *mut u8, 0, vsock::AREA_BYTES as usize) };
    VSOCK.set(NetSetup { windows: acpi.virtio, nwindows: acpi.nvirtio, area });
}

/// Whether the agent holds the disk workload's writes (`disk.agent=1`).
pub fn disk_agent() -> bool {
    CONFIG.get().disk_agent
}

/// The agent's quiesce: has the disk workload park between two requests and waits until it
/// did (at most `timeout_ms`). Some(writes completed) once parked; None (and nothing held) if
/// it did not park in time. Without a thaw, the hold ends by itself `timeout_ms` later.
pub fn disk_quiesce(timeout_ms: u64) -> Option<u64> {
    DISK_HOLD_UNTIL_NS.store(u64::MAX, SeqCst);
    DISK_HOLD.store(true, SeqCst);
    let deadline = kvmclock::uptime_ns(0) + timeout_ms * NS_PER_MS;
    while !DISK_PARKED.load(SeqCst) {
        if kvmclock::uptime_ns(0) > deadline {
            DISK_HOLD.store(false, SeqCst);
            return None;
        }
        sys::sleep_ms(1);
    }
    DISK_HOLD_UNTIL_NS.store(kvmclock::uptime_ns(0) + timeout_ms * NS_PER_MS, SeqCst);
    Some(DISK_WRITES.load(SeqCst))
}

/// The agent's thaw: lets the disk workload write again; the writes it completed.
pub fn disk_thaw() -> u64 {
    DISK_HOLD.store(false, SeqCst);
    DISK_WRITES.load(SeqCst)
}

/// Guest time between tick lines.
fn tick_ns() -> u64 {
    CONFIG.get().tick_ms * NS_PER_MS
}

/// Schedules the first tick line one interval from now (called once, when the guest is ready).
pub fn start_ticks() {
    if NEXT_LINE_NS.load(Relaxed) == 0 {
        NEXT_LINE_NS.store(kvmclock::uptime_ns(0) + tick_ns(), Relaxed);
    }
}

/// Runs this CPU's workload forever.
pub fn run(cpu: usize) -> ! {
    let cfg = CONFIG.get();
    let ticking = cpu == 0
        && (matches!(cfg.workload, Workload::Demo | Workload::Mem | Workload::Idle | Workload::Dirty)
            || (cfg.workload == Workload::Disk && cfg.disk_rounds != 1)
            || matches!(cfg.workload, Workload::Net | Workload::Vsock));
    smp::mark_running(cpu);
    match (cfg.workload, cpu) {
        (Workload::Demo | Workload::Mem, _) => mem(cpu, cfg, ticking),
        (Workload::Idle, _) => idle(cpu, ticking),
        (Workload::Disk, 0) if cfg.disk_agent => vsock_service(cfg),
        (Workload::Disk, 1) if cfg.disk_agent => disk(cfg, 1),
        (Workload::Disk, 0) => disk(cfg, 0),
        (Workload::Dirty, 0) => dirty(cfg),
        (Workload::Net, 0) => net_service(cfg),
        (Workload::Vsock, 0) => vsock_service(cfg),
        (Workload::Poweroff, 0) => power::poweroff(),
        (Workload::TripleFault, 0) => sys::triple_fault(),
        (Workload::AcpiReset, 0) => power::reset(power::ResetWay::Acpi),
        (Workload::KeyboardReset, 0) => power::reset(power::ResetWay::Keyboard),
        _ => idle(cpu, false),
    }
}

/// CPU 0: prints a tick line when one is due; powers off after `ticks` lines.
fn tick_check(now: u64) {
    if crate::console::failed() {
        sys::halt(); // another CPU failed: no more lines, no power-off
    }
    let next = NEXT_LINE_NS.load(Relaxed);
    if now < next {
        return;
    }
    // Keep a steady cadence, but after a long gap (a paused or restored guest) start afresh.
    let interval = tick_ns();
    NEXT_LINE_NS.store(if now - next >= interval { now + interval } else { next + interval }, Relaxed);
    let mut line = Line::new();
    line.s("tick t=").u(now / NS_PER_MS);
    for (cpu, ticks) in TICKS.iter().enumerate().take(NCPUS.load(Relaxed)) {
        line.s(" cpu").u(cpu as u64).s("=").u(ticks.load(Relaxed));
    }
    line.print();
    let lines = LINES.fetch_add(1, Relaxed) + 1;
    let limit = CONFIG.get().ticks;
    if limit != 0 && lines >= limit {
        power::poweroff();
    }
}

fn idle(cpu: usize, ticking: bool) -> ! {
    loop {
        sys::sleep_ms(100);
        TICKS[cpu].fetch_add(1, Relaxed);
        if ticking {
            tick_check(kvmclock::uptime_ns(0));
        }
    }
}

/// splitmix64's finaliser: a cheap, well-mixed function of its input.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn pass_seed(cpu: usize, pass: u64) -> u64 {
    mix((cpu as u64) << 48 ^ pass ^ 0x9e37_79b9_7f4a_7c15)
}

/// Paces writing to `rate` MiB/s with the sleep service; sleeps at least 5 ms at a time so that
/// ring 0 is entered rarely.
struct Pacer {
    cpu: usize,
    bytes_per_s: u64,
    epoch_ns: u64,
    bytes: u64,
}

impl Pacer {
    fn wrote(&mut self, n: u64, now: u64, ticking: bool) {
        if self.bytes_per_s == 0 {
            return;
        }
        self.bytes += n;
        let due = self.epoch_ns + (self.bytes as u128 * NS_PER_S as u128 / self.bytes_per_s as u128) as u64;
        if due >= now + 5 * NS_PER_MS {
            let mut ns = due - now;
            if ticking {
                ns = ns.min(NEXT_LINE_NS.load(Relaxed).saturating_sub(now).max(NS_PER_MS));
            }
            sys::sleep_ms(ns / NS_PER_MS);
        } else if now > due + NS_PER_S {
            // Far behind (a paused or restored guest): pace from here rather than catch up.
            self.epoch_ns = kvmclock::uptime_ns(self.cpu);
            self.bytes = 0;
        }
    }
}

fn mem(cpu: usize, cfg: &Config, ticking: bool) -> ! {
    const CHUNK_WORDS: usize = 8192; // 64 KiB between clock checks
    let words = (cfg.mem_size / 8) as usize;
    // SAFETY: REGION[cpu] is RAM allocated for this CPU alone (prepare), mapped, mem_size bytes long.
    let region = unsafe { core::slice::from_raw_parts_mut(REGION[cpu].load(Relaxed) as *mut u64, words) };
    let mut pacer = Pacer { cpu, bytes_per_s: cfg.mem_rate << 20, epoch_ns: kvmclock::uptime_ns(cpu), bytes: 0 };
    loop {
        let pass = PASS[cpu].load(Relaxed);
        let (prev, cur) = (pass_seed(cpu, pass.wrapping_sub(1)), pass_seed(cpu, pass));
        for (c, chunk) in region.chunks_mut(CHUNK_WORDS).enumerate() {
            let first = (c * CHUNK_WORDS) as u64;
            for (j, w) in chunk.iter_mut().enumerate() {
                let i = first + j as u64;
                // The pass before wrote mix(prev ^ i) here: check it, then write this pass's word.
                if pass > 0 && *w != mix(prev ^ i) {
                    Line::new()
                        .s("FAIL what=mem cpu=")
                        .u(cpu as u64)
                        .s(" offset=")
                        .x(i * 8)
                        .s(" expected=")
                        .x(mix(prev ^ i))
                        .s(" got=")
                        .x(*w)
                        .s(" pass=")
                        .u(pass)
                        .fail();
                }
                *w = mix(cur ^ i);
            }
            let now = kvmclock::uptime_ns(cpu);
            pacer.wrote(chunk.len() as u64 * 8, now, ticking);
            if ticking {
                tick_check(kvmclock::uptime_ns(0));
            }
        }
        if pass > 0 {
            TICKS[cpu].fetch_add(1, Relaxed);
        }
        PASS[cpu].store(pass + 1, Relaxed);
    }
}

/// CPU 0: once per tick, writes one word to each of `dirty.pages` pages (one every 64 KiB) and
/// nothing else of its own, so the host can check its dirty log against a known set.
fn dirty(cfg: &Config) -> ! {
    let base = DIRTY_BASE.load(Relaxed);
    // Touched once: pages of data the snapshots hold, which the ticks do not dirty again.
    for word in 0..cfg.dirty_fill / 8 {
        // SAFETY: inside the region allocated for this workload alone (prepare).
        unsafe { core::ptr::write_volatile((base + word * 8) as *mut u64, mix(word) | 1) };
    }
    Line::new().s("dirty pages=").u(cfg.dirty_pages).s(" base=").x(base).s(" stride=").x(cfg.dirty_stride).print();
    let mut round = 0u64;
    loop {
        round += 1;
        for i in 0..cfg.dirty_pages {
            // SAFETY: the page lies in the region allocated for this workload alone (prepare).
            unsafe { core::ptr::write_volatile((base + i * cfg.dirty_stride) as *mut u64, round) };
        }
        TICKS[0].store(round, Relaxed);
        sys::sleep_ms(cfg.tick_ms);
        tick_check(kvmclock::uptime_ns(0));
    }
}

/// CPU 0: the network services (net.rs) on the first virtio-net, forever. Its tick counter is
/// the number of sequenced requests answered. It polls while frames come, and sleeps a
/// millisecond at a time once none came for 20 ms.
fn net_service(cfg: &Config) -> ! {
    let d = NET.get();
    let mut dev = net::Net::init(&d.windows[..d.nwindows], d.area, cfg.net_ip).unwrap_or_else(|e| {
        let mut line = Line::new();
        line.s("FAIL what=net ").s(e.reason());
        if let virtio::Error::Version(v) = e {
            line.u(v as u64);
        }
        line.fail()
    });
    Line::new().s("net ready mac=").hex_bytes(&dev.mac, ":").s(" ip=").ipv4(dev.ip).print();
    let mut last_frame = kvmclock::uptime_ns(0);
    loop {
        let now = kvmclock::uptime_ns(0);
        if dev.poll() > 0 {
            last_frame = now;
            TICKS[0].store(net::ANSWERED.load(Relaxed), Relaxed);
        } else if now.saturating_sub(last_frame) > 20 * NS_PER_MS {
            sys::sleep_ms(1);
        }
        tick_check(now);
    }
}

/// CPU 0: the vsock services (vsock.rs), forever; polls like `net_service`.
fn vsock_service(cfg: &Config) -> ! {
    let d = VSOCK.get();
    let mut dev = vsock::Vsock::init(&d.windows[..d.nwindows], d.area).unwrap_or_else(|e| {
        let mut line = Line::new();
        line.s("FAIL what=vsock ").s(e.reason());
        if let virtio::Error::Version(v) = e {
            line.u(v as u64);
        }
        line.fail()
    });
    Line::new().s("vsock ready cid=").u(dev.cid).print();
    if cfg.vsock_connect != 0 {
        dev.connect(cfg.vsock_connect);
    }
    let mut last_packet = kvmclock::uptime_ns(0);
    loop {
        let now = kvmclock::uptime_ns(0);
        if dev.poll() > 0 {
            last_packet = now;
            TICKS[0].fetch_add(1, Relaxed);
        } else if now.saturating_sub(last_packet) > 20 * NS_PER_MS {
            sys::sleep_ms(1);
        }
        tick_check(now);
    }
}

/// CPU 0 (CPU 1 with `disk.agent=1`): write, read back and verify `disk.sectors` sectors on the
/// first virtio-blk, `disk.rounds` times (each round a tick; 0 = forever), then power off.
fn disk(cfg: &Config, cpu: usize) -> ! {
    let d = DISK.get();
    let base = virtio::find_blk(&d.windows[..d.nwindows]).unwrap_or_else(|e| disk_fail(&e));
    let mut blk = Blk::init(base, d.queue_page).unwrap_or_else(|e| disk_fail(&e));
    if blk.read_only {
        let status = blk.request(T_OUT, 0, d.wbuf, 512).unwrap_or_else(|e| disk_fail(&e));
        Line::new().s("disk read-only write-status=").u(status as u64).print();
        power::poweroff();
    }
    let sectors = cfg.disk_sectors;
    if sectors > blk.capacity {
        Line::new()
            .s("FAIL what=disk reason=disk-too-small capacity=")
            .u(blk.capacity)
            .s(" sectors=")
            .u(sectors)
            .fail();
    }
    let words = (sectors * 64) as usize;
    // SAFETY: wbuf and rbuf are RAM allocated for these buffers alone (prepare), sectors*512 bytes each.
    let (wbuf, rbuf) = unsafe {
        (
            core::slice::from_raw_parts_mut(d.wbuf as *mut u64, words),
            core::slice::from_raw_parts_mut(d.rbuf as *mut u64, words),
        )
    };
    let mut round = 0u64;
    loop {
        disk_round(&mut blk, d, sectors, wbuf, rbuf);
        round += 1;
        TICKS[cpu].store(round, Relaxed);
        if cfg.disk_rounds != 0 && round >= cfg.disk_rounds {
            break;
        }
        if cpu == 0 {
            tick_check(kvmclock::uptime_ns(0));
        }
    }
    let mut line = Line::new();
    line.s("disk ok sectors=").u(sectors);
    if cfg.disk_rounds != 1 {
        line.s(" rounds=").u(round);
    }
    line.print();
    power::poweroff()
}

/// One write / read back / verify round trip over `sectors` sectors.
fn disk_round(blk: &mut Blk, d: &DiskSetup, sectors: u64, wbuf: &mut [u64], rbuf: &mut [u64]) {
    let words = wbuf.len();
    // A salt from the clock, so data left on the image by an earlier run (or round) cannot pass
    // for ours.
    let salt = mix(kvmclock::uptime_ns(0) | 1);
    for (i, w) in wbuf.iter_mut().enumerate() {
        *w = mix(salt ^ i as u64);
    }
    // The read buffer is not cleared first: the salt already makes an earlier round's data fail,
    // and so only the device (the VMM) ever writes its pages, which KVM's dirty log never sees.
    const PER_REQUEST: u64 = 128; // sectors: 64 KiB per request
    for (typ, buf) in [(T_OUT, d.wbuf), (T_IN, d.rbuf)] {
        let mut sector = 0;
        while sector < sectors {
            // Between two requests, none in flight: where a quiesce holds the writes. Not before
            // the round's first write, so that the round always has written something to check.
            if typ == T_IN || sector > 0 {
                hold_point(blk, d, if typ == T_IN { sectors } else { sector }, wbuf);
            }
            let n = PER_REQUEST.min(sectors - sector);
            let status =
                blk.request(typ, sector, buf + sector * 512, (n * 512) as u32).unwrap_or_else(|e| disk_fail(&e));
            if typ == T_OUT && status == 0 {
                DISK_WRITES.fetch_add(1, SeqCst);
            }
            if status != 0 {
                Line::new()
                    .s("FAIL what=disk reason=")
                    .s(if typ == T_OUT { "write" } else { "read" })
                    .s("-status status=")
                    .u(status as u64)
                    .s(" sector=")
                    .u(sector)
                    .fail();
            }
            sector += n;
        }
    }
    if let Some(i) = (0..words).find(|&i| rbuf[i] != wbuf[i]) {
        Line::new()
            .s("FAIL what=disk reason=mismatch offset=")
            .x(i as u64 * 8)
            .s(" expected=")
            .x(wbuf[i])
            .s(" got=")
            .x(rbuf[i])
            .fail();
    }
}

/// Parks while the agent holds the writes (`disk_quiesce`). Once thawed, reads back the
/// `written` sectors of this round and checks them against what was written: a guest resumed
/// from a snapshot taken while it was held finds on its disk every write it made before.
fn hold_point(blk: &mut Blk, d: &DiskSetup, written: u64, wbuf: &[u64]) {
    if !DISK_HOLD.load(SeqCst) {
        return;
    }
    DISK_PARKED.store(true, SeqCst);
    while DISK_HOLD.load(SeqCst) {
        if kvmclock::uptime_ns(1) > DISK_HOLD_UNTIL_NS.load(SeqCst) {
            DISK_HOLD.store(false, SeqCst);
            Line::new().s("disk hold expired: no thaw came").print();
        }
        sys::sleep_ms(1);
    }
    DISK_PARKED.store(false, SeqCst);
    let mut sector = 0;
    while sector < written {
        let n = 128.min(written - sector);
        let status =
            blk.request(T_IN, sector, d.rbuf + sector * 512, (n * 512) as u32).unwrap_or_else(|e| disk_fail(&e));
        if status != 0 {
            Line::new().s("FAIL what=disk reason=read-after-thaw-status status=").u(status as u64).fail();
        }
        sector += n;
    }
    // SAFETY: the read buffer, `written` sectors of it just filled by the device (the round's
    // own reads come after and refill it).
    let got = unsafe { core::slice::from_raw_parts(d.rbuf as *const u64, (written * 64) as usize) };
    if let Some(i) = (0..got.len()).find(|&i| got[i] != wbuf[i]) {
        Line::new().s("FAIL what=disk reason=lost-before-quiesce offset=").x(i as u64 * 8).fail();
    }
    Line::new().s("disk thawed writes=").u(DISK_WRITES.load(SeqCst)).s(" verified-sectors=").u(written).print();
}

fn disk_fail(e: &virtio::Error) -> ! {
    let mut line = Line::new();
    line.s("FAIL what=disk ").s(e.reason());
    if let virtio::Error::Version(v) = e {
        line.u(*v as u64);
    }
    line.fail()
}
