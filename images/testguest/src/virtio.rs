//! virtio-mmio version 2 from ring 3 (registers are MMIO: a ring-3 access exits to the VMM like
//! any MMIO; split virtqueues and buffers live in identity-mapped RAM; completion is seen by
//! polling the used ring, so no interrupt is needed), and a polling virtio-blk driver on it.

use core::ptr::{read_volatile, write_volatile};
use core::sync::atomic::{fence, Ordering};

use crate::kvmclock;

const MAGIC: u32 = 0x7472_6976; // "virt"
const DEVICE_BLK: u32 = 2;

// Register offsets (virtio-mmio v2).
const R_MAGIC: u64 = 0x000;
const R_VERSION: u64 = 0x004;
const R_DEVICE_ID: u64 = 0x008;
const R_DEVICE_FEATURES: u64 = 0x010;
const R_DEVICE_FEATURES_SEL: u64 = 0x014;
const R_DRIVER_FEATURES: u64 = 0x020;
const R_DRIVER_FEATURES_SEL: u64 = 0x024;
const R_QUEUE_SEL: u64 = 0x030;
const R_QUEUE_NUM_MAX: u64 = 0x034;
const R_QUEUE_NUM: u64 = 0x038;
const R_QUEUE_READY: u64 = 0x044;
pub const R_QUEUE_NOTIFY: u64 = 0x050;
const R_STATUS: u64 = 0x070;
const R_QUEUE_DESC: u64 = 0x080;
const R_QUEUE_DRIVER: u64 = 0x090;
const R_QUEUE_DEVICE: u64 = 0x0A0;
pub const R_CONFIG: u64 = 0x100;

const S_ACKNOWLEDGE: u32 = 1;
const S_DRIVER: u32 = 2;
const S_DRIVER_OK: u32 = 4;
const S_FEATURES_OK: u32 = 8;

const F_BLK_RO: u32 = 1 << 5;
const F_VERSION_1_HI: u32 = 1 << 0; // feature bit 32

const DESC_NEXT: u16 = 1;
pub const DESC_WRITE: u16 = 2;

// Layout of a queue in its page.
pub const OFF_DESC: u64 = 0;
pub const OFF_AVAIL: u64 = 0x100;
pub const OFF_USED: u64 = 0x200;

pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;

const QSIZE: u16 = 4;
// The request header and status byte share the queue's page.
const OFF_HEADER: u64 = 0x400;
const OFF_STATUS: u64 = 0x410;

pub struct Mmio(pub u64);

impl Mmio {
    pub fn read(&self, reg: u64) -> u32 {
        // SAFETY: a register of a virtio-mmio window the DSDT described, identity-mapped below 4 GiB.
        unsafe { read_volatile((self.0 + reg) as *const u32) }
    }

    pub fn write(&self, reg: u64, value: u32) {
        // SAFETY: as in `read`.
        unsafe { write_volatile((self.0 + reg) as *mut u32, value) }
    }
}

/// Writes `value` at guest-physical `addr` in a queue page or buffer of a driver.
pub fn put<T>(addr: u64, value: T) {
    // SAFETY: addr is inside a page a driver was handed for its queues or buffers, which only it
    // (and the device) touches; the offsets used are aligned for T.
    unsafe { write_volatile(addr as *mut T, value) }
}

pub fn get<T: Copy>(addr: u64) -> T {
    // SAFETY: as in `put`.
    unsafe { read_volatile(addr as *const T) }
}

pub enum Error {
    NoDevice,
    NoNetDevice,
    NoVsockDevice,
    Version(u32),
    NoVersion1,
    FeaturesRejected,
    NoQueue,
    Timeout,
}

impl Error {
    pub fn reason(&self) -> &'static str {
        match self {
            Error::NoDevice => "reason=no-virtio-blk-device",
            Error::NoNetDevice => "reason=no-virtio-net-device",
            Error::NoVsockDevice => "reason=no-virtio-vsock-device",
            Error::Version(_) => "reason=virtio-mmio-version-not-2 version=",
            Error::NoVersion1 => "reason=no-VIRTIO_F_VERSION_1",
            Error::FeaturesRejected => "reason=features-not-accepted",
            Error::NoQueue => "reason=queue-0-unavailable",
            Error::Timeout => "reason=request-timeout",
        }
    }
}

pub struct Blk {
    mmio: Mmio,
    page: u64,
    avail_idx: u16,
    used_idx: u16,
    pub read_only: bool,
    pub capacity: u64,
}

/// First virtio-blk among the virtio-mmio windows (slots with device id 0 are empty and skipped).
pub fn find_blk(windows: &[u64]) -> Result<u64, Error> {
    find_device(windows, DEVICE_BLK, Error::NoDevice)
}

/// First device of type `id` among the virtio-mmio windows.
pub fn find_device(windows: &[u64], id: u32, none: Error) -> Result<u64, Error> {
    for &base in windows {
        let m = Mmio(base);
        if m.read(R_MAGIC) != MAGIC || m.read(R_DEVICE_ID) != id {
            continue;
        }
        let version = m.read(R_VERSION);
        if version != 2 {
            return Err(Error::Version(version));
        }
        return Ok(base);
    }
    Err(none)
}

/// Resets the device at `m` and negotiates `VIRTIO_F_VERSION_1` plus those of `wanted` (feature
/// bits 0-31) it offers; returns them.
pub fn negotiate(m: &Mmio, wanted: u32) -> Result<u32, Error> {
    m.write(R_STATUS, 0);
    m.write(R_STATUS, S_ACKNOWLEDGE);
    m.write(R_STATUS, S_ACKNOWLEDGE | S_DRIVER);
    m.write(R_DEVICE_FEATURES_SEL, 0);
    let lo = m.read(R_DEVICE_FEATURES);
    m.write(R_DEVICE_FEATURES_SEL, 1);
    if m.read(R_DEVICE_FEATURES) & F_VERSION_1_HI == 0 {
        return Err(Error::NoVersion1);
    }
    m.write(R_DRIVER_FEATURES_SEL, 0);
    m.write(R_DRIVER_FEATURES, lo & wanted);
    m.write(R_DRIVER_FEATURES_SEL, 1);
    m.write(R_DRIVER_FEATURES, F_VERSION_1_HI);
    m.write(R_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
    if m.read(R_STATUS) & S_FEATURES_OK == 0 {
        return Err(Error::FeaturesRejected);
    }
    Ok(lo & wanted)
}

/// Sets up queue `index` with `size` entries in the zeroed page `page` (descriptors, available
/// and used rings at OFF_DESC, OFF_AVAIL, OFF_USED).
pub fn setup_queue(m: &Mmio, index: u32, size: u16, page: u64) -> Result<(), Error> {
    m.write(R_QUEUE_SEL, index);
    let max = m.read(R_QUEUE_NUM_MAX);
    if max < size as u32 || m.read(R_QUEUE_READY) != 0 {
        return Err(Error::NoQueue);
    }
    m.write(R_QUEUE_NUM, size as u32);
    for (reg, addr) in
        [(R_QUEUE_DESC, page + OFF_DESC), (R_QUEUE_DRIVER, page + OFF_AVAIL), (R_QUEUE_DEVICE, page + OFF_USED)]
    {
        m.write(reg, addr as u32);
        m.write(reg + 4, (addr >> 32) as u32);
    }
    m.write(R_QUEUE_READY, 1);
    Ok(())
}

/// A queue the driver puts one buffer at a time on, waiting (bounded: 2 s) until the device
/// has used it: the transmit queues of the net and vsock drivers.
pub struct OneShotQueue {
    pub page: u64,
    pub index: u32,
    pub size: u16,
    avail: u16,
    used: u16,
}

impl OneShotQueue {
    pub fn new(page: u64, index: u32, size: u16) -> Self {
        OneShotQueue { page, index, size, avail: 0, used: 0 }
    }

    /// Hands the device `len` bytes at `buf` (descriptor 0) and waits until it is done with them.
    pub fn send(&mut self, m: &Mmio, buf: u64, len: u32) {
        let d = self.page + OFF_DESC;
        put(d, buf);
        put(d + 8, len);
        put(d + 12, 0u16);
        put(d + 14, 0u16);
        put(self.page + OFF_AVAIL + 4 + 2 * (self.avail % self.size) as u64, 0u16);
        self.avail = self.avail.wrapping_add(1);
        fence(Ordering::SeqCst);
        put(self.page + OFF_AVAIL + 2, self.avail);
        fence(Ordering::SeqCst);
        m.write(R_QUEUE_NOTIFY, self.index);
        // The device may take it on a thread of its own: wait, bounded, for the buffer to be back.
        let deadline = kvmclock::uptime_ns(0) + 2_000_000_000;
        while get::<u16>(self.page + OFF_USED + 2) == self.used && kvmclock::uptime_ns(0) < deadline {
            core::hint::spin_loop();
        }
        self.used = get::<u16>(self.page + OFF_USED + 2);
    }
}

/// Tells the device the driver is ready.
pub fn driver_ok(m: &Mmio) {
    m.write(R_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
}

impl Blk {
    /// Negotiates the device at `base`, with queue 0 in the zeroed 4 KiB page at `page`.
    pub fn init(base: u64, page: u64) -> Result<Blk, Error> {
        let m = Mmio(base);
        let features = negotiate(&m, F_BLK_RO)?;
        setup_queue(&m, 0, QSIZE, page)?;
        driver_ok(&m);
        let capacity = m.read(R_CONFIG) as u64 | (m.read(R_CONFIG + 4) as u64) << 32;
        Ok(Blk { mmio: m, page, avail_idx: 0, used_idx: 0, read_only: features & F_BLK_RO != 0, capacity })
    }

    /// One request (`T_IN` reads into `buf`, `T_OUT` writes from it) of `len` bytes at `sector`;
    /// returns the status byte the device wrote (0 = OK).
    pub fn request(&mut self, typ: u32, sector: u64, buf: u64, len: u32) -> Result<u8, Error> {
        let p = self.page;
        put(p + OFF_HEADER, typ);
        put(p + OFF_HEADER + 4, 0u32);
        put(p + OFF_HEADER + 8, sector);
        put(p + OFF_STATUS, 0xFFu8);
        let data_flags = if typ == T_IN { DESC_WRITE } else { 0 };
        let descs =
            [(p + OFF_HEADER, 16, DESC_NEXT), (buf, len, DESC_NEXT | data_flags), (p + OFF_STATUS, 1, DESC_WRITE)];
        for (i, (addr, len, flags)) in descs.into_iter().enumerate() {
            let d = p + OFF_DESC + 16 * i as u64;
            put(d, addr);
            put(d + 8, len);
            put(d + 12, flags);
            put(d + 14, (i + 1) as u16);
        }
        // avail: flags, idx, ring[]
        put(p + OFF_AVAIL + 4 + 2 * (self.avail_idx % QSIZE) as u64, 0u16);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        fence(Ordering::SeqCst);
        put(p + OFF_AVAIL + 2, self.avail_idx);
        fence(Ordering::SeqCst);
        self.mmio.write(R_QUEUE_NOTIFY, 0);

        let deadline = kvmclock::uptime_ns(0) + 10_000_000_000;
        while get::<u16>(p + OFF_USED + 2) == self.used_idx {
            if kvmclock::uptime_ns(0) > deadline {
                return Err(Error::Timeout);
            }
            core::hint::spin_loop();
        }
        fence(Ordering::SeqCst);
        self.used_idx = self.used_idx.wrapping_add(1);
        Ok(get::<u8>(p + OFF_STATUS))
    }
}
