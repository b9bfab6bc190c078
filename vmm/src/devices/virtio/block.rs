//! virtio-blk on a host file. Requests are served synchronously when the guest notifies the queue.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;

use virtio_queue::{Queue, QueueT, Reader, Writer};
use vm_memory::GuestMemoryMmap;

use super::{VirtioDevice, VIRTIO_F_VERSION_1};

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
}

pub struct Block {
    file: File,
    read_only: bool,
    capacity_sectors: u64,
    id: [u8; ID_BYTES],
    queue_sizes: [u16; 1],
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
        let len = file.metadata().map_err(|err| BlockError::Open { path: path.display().to_string(), err })?.len();
        let mut id = [0u8; ID_BYTES];
        let text = format!("vmm-disk-{index}");
        id[..text.len()].copy_from_slice(text.as_bytes());
        Ok(Self { file, read_only, capacity_sectors: len / SECTOR_SIZE, id, queue_sizes: [QUEUE_SIZE] })
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
        let cfg = self.config_bytes();
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = usize::try_from(offset).ok().and_then(|o| cfg.get(o + i)).copied().unwrap_or(0);
        }
    }

    fn activate(&mut self, _features: u64) {}

    fn sync(&self) -> std::io::Result<()> {
        if self.read_only {
            Ok(())
        } else {
            self.file.sync_data()
        }
    }

    fn process_queue(&mut self, _index: usize, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
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
