//! The pre-copy rounds of a live snapshot: guest memory is written into the page file while the
//! guest runs (all of it; for a diff, the pages written since the parent), then the pages
//! dirtied meanwhile, round after round, until what is left is small enough to copy while the
//! guest is paused for a few milliseconds (or the rounds run out: a guest that dirties faster
//! than the disk takes ends with a larger, bounded pause, which the report shows).
//!
//! Chosen over write-protect tracking (userfaultfd, QEMU's background-snapshot: a fault on every
//! first write while the snapshot runs, 6x slower here) and over a copy-on-write fork of the VMM
//! (KVM and device threads do not survive a fork): pre-copy costs the guest nothing but the
//! dirty log, and it is the loop live migration runs too.

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use snapshot::live::LivePageFile;
use snapshot::PageKind;

use super::{Job, PersistError};
use crate::control::VmControl;
use crate::vstate::dirty::{DirtyPages, PAGE_SIZE};
use crate::vstate::memory;

/// Stop the rounds once no more than this is left to copy while paused (at memory speed, well
/// under a millisecond).
pub const FINAL_BYTES: u64 = 2 << 20;
/// At most this many rounds after the first.
pub const MAX_ROUNDS: u32 = 12;
/// The buffer the pause copies the last pages into, allocated before the rounds (allocating it
/// after would give the guest time to dirty more). Pages beyond it are written to the page file
/// while paused: a guest that never lets the rounds converge gets a longer pause, not a wrong
/// snapshot.
pub const STAGING_BYTES: usize = 64 << 20;
/// Read in pieces of this size.
const PIECE: usize = 1 << 20;

/// Where the rounds left the page file.
pub struct Precopy {
    pub file: LivePageFile,
    /// Pages dirtied since the last round wrote: the pause copies them.
    pub carry: DirtyPages,
    pub rounds: u32,
    /// Bytes written while the guest ran.
    pub bytes: u64,
}

/// Runs the rounds. `first`: the pages written since the VM's last snapshot (the first round of
/// a diff writes those; of a full snapshot, all memory). Every page a round takes from the VM's
/// record is added to `taken` at once, for the caller to give back if the snapshot fails.
pub fn run(
    control: &VmControl,
    file: LivePageFile,
    first: &DirtyPages,
    diff: bool,
    job: &Job,
    taken: &mut DirtyPages,
) -> Result<Precopy, PersistError> {
    let mut pre = Precopy { file, carry: DirtyPages::default(), rounds: 0, bytes: 0 };
    if diff {
        write_pages(control, &mut pre, first, job)?;
    } else {
        write_all(control, &mut pre, job)?;
    }
    loop {
        let dirty = control.take_unsaved_pages()?;
        taken.add(&dirty);
        let left = dirty.count() * PAGE_SIZE;
        tracing::debug!("live snapshot: round {} leaves {} KiB dirty", pre.rounds, left >> 10);
        if left <= FINAL_BYTES || pre.rounds >= MAX_ROUNDS {
            pre.carry = dirty;
            return Ok(pre);
        }
        pre.rounds += 1;
        write_pages(control, &mut pre, &dirty, job)?;
    }
}

/// Writes every page that may hold data (pages known never touched are skipped).
fn write_all(control: &VmControl, pre: &mut Precopy, job: &Job) -> Result<(), PersistError> {
    let kinds = memory::page_kinds(&control.mem, control.memory_loaded());
    let mut buf = vec![0u8; PIECE];
    for (region, kinds) in control.mem.iter().zip(kinds) {
        let base = region.start_addr().0;
        let pages = (region.len() / PAGE_SIZE) as usize;
        let mut p = 0;
        while p < pages {
            let n = (PIECE / PAGE_SIZE as usize).min(pages - p);
            let skip = kinds.as_ref().is_some_and(|k| k[p..p + n].iter().all(|k| *k == PageKind::Zero));
            if !skip {
                copy_run(control, pre, base + p as u64 * PAGE_SIZE, &mut buf[..n * PAGE_SIZE as usize])?;
            }
            job.progress.advance(n as u64 * PAGE_SIZE)?;
            p += n;
        }
    }
    Ok(())
}

/// Writes the pages of `dirty`.
fn write_pages(control: &VmControl, pre: &mut Precopy, dirty: &DirtyPages, job: &Job) -> Result<(), PersistError> {
    let mut buf = vec![0u8; PIECE];
    for (addr, len) in dirty.ranges() {
        let mut done = 0;
        while done < len {
            let n = (len - done).min(PIECE as u64) as usize;
            copy_run(control, pre, addr + done, &mut buf[..n])?;
            job.progress.check()?;
            done += n as u64;
        }
    }
    Ok(())
}

/// Reads guest memory at `addr` (the guest may be writing it: such a page is dirty again and
/// written again later) and writes it to the page file.
fn copy_run(control: &VmControl, pre: &mut Precopy, addr: u64, buf: &mut [u8]) -> Result<(), PersistError> {
    control
        .mem
        .read_slice(buf, GuestAddress(addr))
        .map_err(|e| PersistError::Inconsistent(format!("reading guest memory at {addr:#x}: {e}")))?;
    pre.file.write(addr, buf)?;
    pre.bytes += buf.len() as u64;
    Ok(())
}
