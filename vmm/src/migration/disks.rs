//! Disks that travel with a migration (`vmm migrate --copy-disks`): each writable disk is sent
//! whole while the guest runs, then, round after round, the 1 MiB chunks the guest wrote
//! meanwhile (virtio-blk records every write), and at the pause the last ones — as memory is.
//! Chunks taken from a disk's record go back to it if the migration fails, so a later diff
//! snapshot still holds them.

use std::fs::File;
use std::os::unix::fs::FileExt;

use snapshot::stream::StreamWriter;

use crate::control::VmControl;
use crate::devices::bus::lock;
use crate::devices::virtio::disk_copy::{DiskCopier, CHUNK_BYTES};
use crate::persist::PersistError;

/// One writable disk being sent.
struct Disk {
    index: usize,
    /// Opened for reading: the VM's own handle keeps its lock and offsets.
    file: File,
    /// Bytes, a multiple of 512.
    size: u64,
}

/// The writable disks of a VM being migrated, and the chunks taken from their records.
pub struct DiskSender {
    disks: Vec<Disk>,
    /// Per disk (same order): the chunks taken so far, for giving back on failure.
    taken: Vec<Vec<u64>>,
    buf: Vec<u8>,
}

impl DiskSender {
    /// Opens the VM's writable disks (none unless `copy`).
    pub fn open(control: &VmControl, copy: bool) -> Result<Self, PersistError> {
        let mut disks = Vec::new();
        if copy {
            for (index, d) in control.config.disks.iter().enumerate().filter(|(_, d)| !d.read_only) {
                let file =
                    File::open(&d.path).map_err(|e| PersistError::Disk(format!("disk {}: {e}", d.path.display())))?;
                let size =
                    file.metadata().map_err(|e| PersistError::Disk(format!("disk {}: {e}", d.path.display())))?.len()
                        / 512
                        * 512;
                disks.push(Disk { index, file, size });
            }
        }
        let taken = disks.iter().map(|_| Vec::new()).collect();
        Ok(Self { disks, taken, buf: vec![0u8; CHUNK_BYTES as usize] })
    }

    /// Disk number and size of each disk sent (for the manifest).
    pub fn sizes(&self) -> Vec<(usize, u64)> {
        self.disks.iter().map(|d| (d.index, d.size)).collect()
    }

    /// Takes the chunks written since the last take from every disk's record (starting from
    /// here: what is written afterwards is taken next time). Returns them per disk.
    pub fn take_written(&mut self, control: &VmControl) -> Vec<Vec<u64>> {
        let mut out = Vec::new();
        for (disk, taken) in self.disks.iter().zip(&mut self.taken) {
            let chunks = control
                .devices
                .disk(disk.index)
                .and_then(|e| lock(&e.device).take_written_chunks())
                .unwrap_or_default();
            if taken.len() < chunks.len() {
                taken.resize(chunks.len(), 0);
            }
            for (t, c) in taken.iter_mut().zip(&chunks) {
                *t |= c;
            }
            out.push(chunks);
        }
        out
    }

    /// Bytes the chunks of `written` (as `take_written` gives) cover.
    pub fn bytes_of(&self, written: &[Vec<u64>]) -> u64 {
        self.disks
            .iter()
            .zip(written)
            .map(|(d, chunks)| DiskCopier::ranges(chunks, d.size).iter().map(|(a, b)| b - a).sum::<u64>())
            .sum()
    }

    /// Sends every disk whole, skipping chunks of zeros (the destination's file starts empty).
    pub fn send_all<W: std::io::Write>(
        &mut self,
        out: &mut StreamWriter<W>,
        mut sent: impl FnMut(u64) -> Result<(), crate::migration::MigrateError>,
    ) -> Result<(), crate::migration::MigrateError> {
        for i in 0..self.disks.len() {
            let size = self.disks[i].size;
            self.send_range(out, i, 0, size, true, &mut sent)?;
        }
        Ok(())
    }

    /// Sends the chunks of `written` (as `take_written` gives).
    pub fn send_written<W: std::io::Write>(
        &mut self,
        out: &mut StreamWriter<W>,
        written: &[Vec<u64>],
        mut sent: impl FnMut(u64) -> Result<(), crate::migration::MigrateError>,
    ) -> Result<(), crate::migration::MigrateError> {
        for (i, chunks) in written.iter().enumerate() {
            for (start, end) in DiskCopier::ranges(chunks, self.disks[i].size) {
                self.send_range(out, i, start, end, false, &mut sent)?;
            }
        }
        Ok(())
    }

    fn send_range<W: std::io::Write>(
        &mut self,
        out: &mut StreamWriter<W>,
        i: usize,
        start: u64,
        end: u64,
        skip_zero: bool,
        sent: &mut impl FnMut(u64) -> Result<(), crate::migration::MigrateError>,
    ) -> Result<(), crate::migration::MigrateError> {
        let disk = &self.disks[i];
        let mut at = start;
        while at < end {
            let n = (end - at).min(CHUNK_BYTES) as usize;
            let piece = &mut self.buf[..n];
            disk.file
                .read_exact_at(piece, at)
                .map_err(|e| PersistError::Disk(format!("reading disk {} at {at}: {e}", disk.index)))?;
            if !(skip_zero && piece.iter().all(|b| *b == 0)) {
                out.disk(disk.index as u32, at, piece).map_err(|e| crate::migration::MigrateError::Link {
                    during: "sending disks",
                    err: e.to_string(),
                })?;
            }
            sent(n as u64)?;
            at += n as u64;
        }
        Ok(())
    }

    /// Gives every chunk taken back to the disks' records (the migration failed).
    pub fn give_back(&self, control: &VmControl) {
        for (disk, taken) in self.disks.iter().zip(&self.taken) {
            if let Some(entry) = control.devices.disk(disk.index) {
                lock(&entry.device).return_written_chunks(taken);
            }
        }
    }
}
