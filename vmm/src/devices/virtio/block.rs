//! virtio-blk on a host file. Requests are served synchronously when the guest notifies the queue.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;

use virtio_queue::{Queue, QueueT};

use crate::vstate::memory::GuestMemory;

use super::disk_copy::{DiskCopier, CHUNK_BYTES};
use super::{VirtioDevice, VIRTIO_F_VERSION_1};

/// Descriptor-chain reader and writer over guest memory (writes mark the dirty bitmap).
type Reader<'a> = virtio_queue::Reader<'a, vm_memory::bitmap::BS<'a, vm_memory::bitmap::AtomicBitmap>>;
type Writer<'a> = virtio_queue::Writer<'a, vm_memory::bitmap::BS<'a, vm_memory::bitmap::AtomicBitmap>>;

pub const VIRTIO_ID_BLOCK: u32 = 2;
const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
const VIRTIO_BLK_F_RO: u64 = 1 << 5;
const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;

const VIRTIO_BLK_T_IN: u32 = 0;
const VIRTIO_BLK_T_OUT: u32 = 1;
const VIRTIO_BLK_T_FLUSH: u32 = 4;
const VIRTIO_BLK_T_GET_ID: u32 = 8;

pub const VIRTIO_BLK_S_OK: u8 = 0;
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

pub const SECTOR_SIZE: u64 = 512;
const QUEUE_SIZE: u16 = 256;
/// Data segments per request we tell the driver it may use (queue size minus header and status).
const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Requests are copied through a bounded buffer, whatever lengths the guest claims.
const CHUNK: usize = 64 * 1024;
const ID_BYTES: usize = 20;

#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("cannot open disk {path}: {err}")]
    Open { path: String, err: std::io::Error },
    #[error("disk {0} is in use by another VM")]
    InUse(String),
}

pub struct Block {
    file: std::sync::Arc<File>,
    path: std::path::PathBuf,
    read_only: bool,
    capacity_sectors: u64,
    id: [u8; ID_BYTES],
    queue_sizes: [u16; 1],
    /// A snapshot's copy of this disk, being taken: writes copy old data first.
    copy: Option<std::sync::Arc<std::sync::Mutex<DiskCopier>>>,
    /// The chunks (`CHUNK_BYTES`) written since the last snapshot's pause, one bit each.
    written: Vec<u64>,
}

/// Why a request failed, as the status byte tells the driver.
enum RequestError {
    Io,
    Unsupported,
}

impl Block {
    pub fn open(path: &std::path::Path, read_only: bool, index: usize) -> Result<Self, BlockError> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|err| BlockError::Open { path: path.display().to_string(), err })?;
        // One writer per disk image: two VMs (say, a VM and a copy resumed from its snapshot)
        // writing one file would corrupt it. The lock (flock) lives as long as the open file.
        let locked = if read_only { file.try_lock_shared() } else { file.try_lock() };
        match locked {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => return Err(BlockError::InUse(path.display().to_string())),
            // A file system without locks: go on, unprotected.
            Err(std::fs::TryLockError::Error(err)) => tracing::warn!("cannot lock disk {}: {err}", path.display()),
        }
        let len = file.metadata().map_err(|err| BlockError::Open { path: path.display().to_string(), err })?.len();
        let mut id = [0u8; ID_BYTES];
        let text = format!("vmm-disk-{index}");
        id[..text.len()].copy_from_slice(text.as_bytes());
        Ok(Self {
            file: std::sync::Arc::new(file),
            path: path.to_path_buf(),
            read_only,
            capacity_sectors: len / SECTOR_SIZE,
            id,
            queue_sizes: [QUEUE_SIZE],
            copy: None,
            written: vec![0; (len / SECTOR_SIZE * SECTOR_SIZE).div_ceil(CHUNK_BYTES).div_ceil(64) as usize],
        })
    }

    fn config_bytes(&self) -> [u8; 16] {
        let mut cfg = [0u8; 16];
        cfg[..8].copy_from_slice(&self.capacity_sectors.to_le_bytes());
        cfg[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        cfg
    }

    /// Serves one request; returns the number of bytes written to the driver's buffers.
    fn handle(&mut self, mut reader: Reader<'_>, mut writer: Writer<'_>) -> u32 {
        // struct virtio_blk_outhdr { le32 type; le32 reserved; le64 sector; }
        let (Ok(kind_and_reserved), Ok(sector)) = (reader.read_obj::<u64>(), reader.read_obj::<u64>()) else {
            return 0;
        };
        let kind = kind_and_reserved as u32;
        // The last writable byte is the status; everything writable before it is data.
        let Some(data_len) = writer.available_bytes().checked_sub(1) else { return 0 };
        let Ok(mut status_writer) = writer.split_at(data_len) else { return 0 };
        let result = match kind {
            VIRTIO_BLK_T_IN => self.read_to_guest(sector, data_len, &mut writer),
            VIRTIO_BLK_T_OUT => self.write_from_guest(sector, &mut reader),
            VIRTIO_BLK_T_FLUSH => self.file.sync_data().map_err(|_| RequestError::Io),
            VIRTIO_BLK_T_GET_ID => {
                let n = ID_BYTES.min(data_len);
                writer.write_all(&self.id[..n]).map_err(|_| RequestError::Io)
            }
            _ => Err(RequestError::Unsupported),
        };
        let status = match result {
            Ok(()) => VIRTIO_BLK_S_OK,
            Err(RequestError::Io) => VIRTIO_BLK_S_IOERR,
            Err(RequestError::Unsupported) => VIRTIO_BLK_S_UNSUPP,
        };
        if status_writer.write_all(&[status]).is_err() {
            return 0;
        }
        (writer.bytes_written() + 1) as u32
    }

    /// Checks that `len` bytes at `sector` lie within the disk.
    fn check_range(&self, sector: u64, len: usize) -> Result<u64, RequestError> {
        let end = sector
            .checked_mul(SECTOR_SIZE)
            .and_then(|start| start.checked_add(len as u64).map(|end| (start, end)))
            .ok_or(RequestError::Io)?;
        if end.1 > self.capacity_sectors * SECTOR_SIZE {
            return Err(RequestError::Io);
        }
        Ok(end.0)
    }

    fn read_to_guest(&mut self, sector: u64, len: usize, writer: &mut Writer<'_>) -> Result<(), RequestError> {
        let mut offset = self.check_range(sector, len)?;
        let mut buf = vec![0u8; CHUNK.min(len)];
        let mut left = len;
        while left > 0 {
            let n = CHUNK.min(left);
            self.file.read_exact_at(&mut buf[..n], offset).map_err(|_| RequestError::Io)?;
            writer.write_all(&buf[..n]).map_err(|_| RequestError::Io)?;
            offset += n as u64;
            left -= n;
        }
        Ok(())
    }

    fn write_from_guest(&mut self, sector: u64, reader: &mut Reader<'_>) -> Result<(), RequestError> {
        if self.read_only {
            return Err(RequestError::Io);
        }
        let len = reader.available_bytes();
        let mut offset = self.check_range(sector, len)?;
        if let Some(copy) = &self.copy {
            crate::devices::bus::lock(copy).before_write(offset, len as u64);
        }
        if len > 0 {
            for chunk in offset / CHUNK_BYTES..=(offset + len as u64 - 1) / CHUNK_BYTES {
                self.written[(chunk / 64) as usize] |= 1 << (chunk % 64);
            }
        }
        let mut buf = vec![0u8; CHUNK.min(len)];
        let mut left = len;
        while left > 0 {
            let n = CHUNK.min(left);
            reader.read_exact(&mut buf[..n]).map_err(|_| RequestError::Io)?;
            self.file.write_all_at(&buf[..n], offset).map_err(|_| RequestError::Io)?;
            offset += n as u64;
            left -= n;
        }
        Ok(())
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        let ro = if self.read_only { VIRTIO_BLK_F_RO } else { 0 };
        VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_SEG_MAX | VIRTIO_BLK_F_FLUSH | ro
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.config_bytes(), offset, data);
    }

    fn activate(&mut self, _features: u64) {}

    fn durable_file(&self) -> Option<crate::devices::persist::DurableFile> {
        (!self.read_only).then(|| crate::devices::persist::DurableFile {
            path: self.path.display().to_string(),
            file: self.file.clone(),
        })
    }

    fn start_disk_copy(
        &mut self,
        dest: File,
        only: Option<&[u64]>,
    ) -> Option<std::sync::Arc<std::sync::Mutex<DiskCopier>>> {
        if self.read_only {
            return None;
        }
        let size = self.capacity_sectors * SECTOR_SIZE;
        let copier = DiskCopier::new(self.file.clone(), dest, size, only);
        let copy = std::sync::Arc::new(std::sync::Mutex::new(copier));
        self.copy = Some(copy.clone());
        Some(copy)
    }

    fn end_disk_copy(&mut self) {
        self.copy = None;
    }

    fn take_written_chunks(&mut self) -> Option<Vec<u64>> {
        let words = self.written.len();
        (!self.read_only).then(|| std::mem::replace(&mut self.written, vec![0; words]))
    }

    fn return_written_chunks(&mut self, chunks: &[u64]) {
        for (mine, given) in self.written.iter_mut().zip(chunks) {
            *mine |= given;
        }
    }

    fn describe(&self) -> String {
        let ro = if self.read_only { ", read-only" } else { "" };
        format!("virtio-blk {} ({} sectors{ro})", self.path.display(), self.capacity_sectors)
    }

    fn process_queue(&mut self, _index: usize, queues: &mut [Queue], mem: &GuestMemory) -> bool {
        let Some(queue) = queues.first_mut() else { return false };
        let mut used_any = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let len = match (chain.clone().reader(mem), chain.writer(mem)) {
                (Ok(reader), Ok(writer)) => self.handle(reader, writer),
                _ => 0,
            };
            if let Err(e) = queue.add_used(mem, head, len) {
                tracing::warn!("virtio-blk: cannot return descriptor {head}: {e}");
                break;
            }
            used_any = true;
        }
        used_any
    }
}

#[cfg(test)]
mod tests {
    //! virtio-blk driven through its MMIO transport, as a guest driver would, including hostile
    //! descriptors: the device may refuse them, the VMM must never panic.

    use std::io::Read;

    use vm_memory::{Bytes, GuestAddress};
    use vmm_sys_util::eventfd::EventFd;

    use super::*;
    use crate::devices::virtio::mmio::{
        MmioTransport, STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FEATURES_OK, STATUS_NEEDS_RESET,
    };
    use crate::devices::BusDevice;

    const DESC: u64 = 0x1000;
    const AVAIL: u64 = 0x2000;
    const USED: u64 = 0x3000;
    const HEADER: u64 = 0x4000;
    const DATA: u64 = 0x5000;
    const STATUS: u64 = 0x6000;
    const F_NEXT: u16 = 1;
    const F_WRITE: u16 = 2;
    const DISK_SECTORS: u64 = 128;

    struct Driver {
        dev: MmioTransport,
        mem: GuestMemory,
        next_avail: u16,
        disk: std::path::PathBuf,
        /// The transport's interrupt eventfd (KVM's irqfd in a VM).
        irq: EventFd,
        _scratch: tempfile::TempDir,
    }

    impl Driver {
        fn new(tag: &str, read_only: bool, used_ring: u64) -> Self {
            let scratch = tempfile::Builder::new().prefix(&format!("vmm-blk-unit-{tag}-")).tempdir().unwrap();
            let disk = scratch.path().join("disk.img");
            std::fs::write(&disk, vec![0u8; (DISK_SECTORS * SECTOR_SIZE) as usize]).unwrap();
            let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
            let block = Block::open(&disk, read_only, 0).unwrap();
            let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
            let mut dev = MmioTransport::new(Box::new(block), mem.clone(), irq.try_clone().unwrap());
            let w = |dev: &mut MmioTransport, off: u64, v: u32| dev.write(off, &v.to_le_bytes());
            w(&mut dev, 0x70, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
            w(&mut dev, 0x24, 1);
            w(&mut dev, 0x20, 1); // VIRTIO_F_VERSION_1
            w(&mut dev, 0x70, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
            w(&mut dev, 0x30, 0);
            w(&mut dev, 0x38, 16);
            for (off, addr) in [(0x80, DESC), (0x90, AVAIL), (0xa0, used_ring)] {
                w(&mut dev, off, addr as u32);
                w(&mut dev, off + 4, 0);
            }
            w(&mut dev, 0x44, 1);
            w(&mut dev, 0x70, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
            Self { dev, mem, next_avail: 0, disk, irq, _scratch: scratch }
        }

        fn status(&mut self) -> u32 {
            let mut b = [0u8; 4];
            self.dev.read(0x70, &mut b);
            u32::from_le_bytes(b)
        }

        fn desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
            let d = DESC + 16 * u64::from(i);
            self.mem.write_obj(addr, GuestAddress(d)).unwrap();
            self.mem.write_obj(len, GuestAddress(d + 8)).unwrap();
            self.mem.write_obj(flags, GuestAddress(d + 12)).unwrap();
            self.mem.write_obj(next, GuestAddress(d + 14)).unwrap();
        }

        /// Makes chain `head` available and notifies; returns (used length, status byte).
        fn submit(&mut self, head: u16) -> (u32, u8) {
            self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
            let slot = u64::from(self.next_avail % 16);
            self.mem.write_obj(head, GuestAddress(AVAIL + 4 + 2 * slot)).unwrap();
            self.next_avail = self.next_avail.wrapping_add(1);
            self.mem.write_obj(self.next_avail, GuestAddress(AVAIL + 2)).unwrap();
            self.dev.write(0x50, &0u32.to_le_bytes());
            let used_idx: u16 = self.mem.read_obj(GuestAddress(USED + 2)).unwrap();
            assert_eq!(used_idx, self.next_avail, "request not returned");
            let elem = USED + 4 + 8 * u64::from(used_idx.wrapping_sub(1) % 16);
            let len: u32 = self.mem.read_obj(GuestAddress(elem + 4)).unwrap();
            (len, self.mem.read_obj(GuestAddress(STATUS)).unwrap())
        }

        /// A three-descriptor request: header, data, status.
        fn request(&mut self, kind: u32, sector: u64, data_len: u32) -> (u32, u8) {
            self.mem.write_obj(u64::from(kind), GuestAddress(HEADER)).unwrap();
            self.mem.write_obj(sector, GuestAddress(HEADER + 8)).unwrap();
            let device_writes = matches!(kind, VIRTIO_BLK_T_IN | VIRTIO_BLK_T_GET_ID);
            let data_flags = if device_writes { F_NEXT | F_WRITE } else { F_NEXT };
            self.desc(0, HEADER, 16, F_NEXT, 1);
            self.desc(1, DATA, data_len, data_flags, 2);
            self.desc(2, STATUS, 1, F_WRITE, 0);
            self.submit(0)
        }

        fn disk_bytes(&self) -> Vec<u8> {
            let mut v = Vec::new();
            std::fs::File::open(&self.disk).unwrap().read_to_end(&mut v).unwrap();
            v
        }
    }

    #[test]
    fn write_then_read_back() {
        let mut d = Driver::new("rw", false, USED);
        assert_eq!(d.status() & STATUS_NEEDS_RESET, 0);
        let pattern: Vec<u8> = (0..1024u32).map(|i| (i * 7) as u8).collect();
        d.mem.write_slice(&pattern, GuestAddress(DATA)).unwrap();
        assert_eq!(d.request(VIRTIO_BLK_T_OUT, 3, 1024), (1, VIRTIO_BLK_S_OK));
        assert_eq!(&d.disk_bytes()[3 * 512..5 * 512], &pattern[..]);
        d.mem.write_slice(&[0u8; 1024], GuestAddress(DATA)).unwrap();
        assert_eq!(d.request(VIRTIO_BLK_T_IN, 3, 1024), (1025, VIRTIO_BLK_S_OK));
        let mut back = vec![0u8; 1024];
        d.mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
        assert_eq!(back, pattern);
        assert_eq!(d.request(VIRTIO_BLK_T_FLUSH, 0, 0).1, VIRTIO_BLK_S_OK);
        assert_eq!(d.request(VIRTIO_BLK_T_GET_ID, 0, 20), (21, VIRTIO_BLK_S_OK));
    }

    /// The interrupt is signalled when a status bit becomes set, not again while the driver has
    /// not acknowledged it (a Linux handler acknowledges, then reads every used ring; a polling
    /// driver never acknowledges, and costs no signals).
    #[test]
    fn interrupt_is_signalled_once_until_acknowledged() {
        let mut d = Driver::new("irq", false, USED);
        let signals = |d: &mut Driver| d.irq.read().unwrap_or(0);
        d.request(VIRTIO_BLK_T_IN, 0, 512);
        assert_eq!(signals(&mut d), 1);
        d.request(VIRTIO_BLK_T_IN, 0, 512);
        assert_eq!(signals(&mut d), 0, "signalled again before the acknowledgement");
        let mut status = [0u8; 4];
        d.dev.read(0x60, &mut status);
        assert_eq!(u32::from_le_bytes(status), 1, "used-ring interrupt status");
        d.dev.write(0x64, &status);
        d.dev.read(0x60, &mut status);
        assert_eq!(u32::from_le_bytes(status), 0);
        d.request(VIRTIO_BLK_T_IN, 0, 512);
        assert_eq!(signals(&mut d), 1, "not signalled after the acknowledgement");
    }

    /// KVM's dirty log never sees what the device writes into guest memory: the region bitmap
    /// must (the data of a disk read, the status byte, the used ring), and nothing else.
    #[test]
    fn device_writes_to_guest_memory_are_in_the_dirty_bitmap() {
        use crate::vstate::dirty;
        let mut d = Driver::new("dirty", false, USED);
        d.mem.write_obj(u64::from(VIRTIO_BLK_T_IN), GuestAddress(HEADER)).unwrap();
        d.mem.write_obj(0u64, GuestAddress(HEADER + 8)).unwrap();
        d.desc(0, HEADER, 16, F_NEXT, 1);
        d.desc(1, DATA, 4096, F_NEXT | F_WRITE, 2);
        d.desc(2, STATUS, 1, F_WRITE, 0);
        d.mem.write_obj(0u16, GuestAddress(AVAIL + 4)).unwrap();
        d.mem.write_obj(1u16, GuestAddress(AVAIL + 2)).unwrap();
        dirty::clear_vmm_writes(&d.mem);
        d.dev.write(0x50, &0u32.to_le_bytes());
        let taken = dirty::take_vmm_writes(&d.mem);
        let pages: Vec<u64> = (0..256u64).filter(|p| taken[0][(p / 64) as usize] >> (p % 64) & 1 == 1).collect();
        assert_eq!(pages, vec![USED / 4096, DATA / 4096, STATUS / 4096]);
    }

    #[test]
    fn out_of_range_and_unknown_requests_fail_cleanly() {
        let mut d = Driver::new("range", false, USED);
        assert_eq!(d.request(VIRTIO_BLK_T_OUT, DISK_SECTORS, 512).1, VIRTIO_BLK_S_IOERR);
        assert_eq!(d.request(VIRTIO_BLK_T_IN, DISK_SECTORS - 1, 1024).1, VIRTIO_BLK_S_IOERR);
        assert_eq!(d.request(VIRTIO_BLK_T_IN, u64::MAX, 512).1, VIRTIO_BLK_S_IOERR);
        assert_eq!(d.request(VIRTIO_BLK_T_IN, u64::MAX / 512 + 1, 512).1, VIRTIO_BLK_S_IOERR);
        assert_eq!(d.request(77, 0, 512).1, VIRTIO_BLK_S_UNSUPP);
        assert!(d.disk_bytes().iter().all(|b| *b == 0));
    }

    #[test]
    fn read_only_disk_refuses_writes() {
        let mut d = Driver::new("ro", true, USED);
        d.mem.write_slice(&[0xaau8; 512], GuestAddress(DATA)).unwrap();
        assert_eq!(d.request(VIRTIO_BLK_T_OUT, 0, 512).1, VIRTIO_BLK_S_IOERR);
        assert!(d.disk_bytes().iter().all(|b| *b == 0));
        assert_eq!(d.request(VIRTIO_BLK_T_IN, 0, 512).1, VIRTIO_BLK_S_OK);
    }

    #[test]
    fn hostile_descriptors_break_only_the_request() {
        let mut d = Driver::new("hostile", false, USED);
        // Data outside guest memory.
        d.mem.write_obj(u64::from(VIRTIO_BLK_T_IN), GuestAddress(HEADER)).unwrap();
        d.desc(0, HEADER, 16, F_NEXT, 1);
        d.desc(1, 0xffff_ffff_0000, 4096, F_NEXT | F_WRITE, 2);
        d.desc(2, STATUS, 1, F_WRITE, 0);
        assert_eq!(d.submit(0).0, 0);
        // A length reaching far past the end of memory.
        d.desc(1, DATA, u32::MAX, F_NEXT | F_WRITE, 2);
        assert_eq!(d.submit(0).0, 0);
        // A chain that loops on itself.
        d.desc(0, HEADER, 16, F_NEXT, 0);
        assert_eq!(d.submit(0).0, 0);
        // No status byte at all (header only).
        d.desc(0, HEADER, 16, 0, 0);
        assert_eq!(d.submit(0).0, 0);
        // A short header.
        d.desc(0, HEADER, 4, F_NEXT, 2);
        assert_eq!(d.submit(0).0, 0);
        // The device still works for well-formed requests.
        assert_eq!(d.request(VIRTIO_BLK_T_IN, 0, 512), (513, VIRTIO_BLK_S_OK));
    }

    #[test]
    fn invalid_queue_setup_needs_reset_and_is_ignored() {
        // A used ring outside guest memory: the queue is invalid, and DRIVER_OK is answered with
        // NEEDS_RESET.
        let mut d = Driver::new("badq", false, 0xf000_0000);
        assert_ne!(d.status() & STATUS_NEEDS_RESET, 0);
        d.mem.write_obj(0u16, GuestAddress(AVAIL + 4)).unwrap();
        d.mem.write_obj(1u16, GuestAddress(AVAIL + 2)).unwrap();
        d.dev.write(0x50, &0u32.to_le_bytes());
        assert_eq!(d.mem.read_obj::<u16>(GuestAddress(USED + 2)).unwrap(), 0);
        // A reset and a proper setup bring it back.
        d.dev.write(0x70, &0u32.to_le_bytes());
        assert_eq!(d.status(), 0);
    }

    #[test]
    fn avail_index_far_ahead_is_not_trusted() {
        let mut d = Driver::new("avail", false, USED);
        d.mem.write_obj(0xfff0u16, GuestAddress(AVAIL + 2)).unwrap();
        d.dev.write(0x50, &0u32.to_le_bytes());
        assert_eq!(d.mem.read_obj::<u16>(GuestAddress(USED + 2)).unwrap(), 0);
    }
}
