//! The pages of guest memory that differ from a snapshot: how a resumed VM's writes made before
//! KVM's dirty log started are found. A resumed VM runs without the log, because the log
//! write-protects every page, so each first write after the resume would fault once more and the
//! guest would need twice as long to be at full speed (`docs/BENCHMARKS.md`); its first diff
//! then compares memory with the snapshot it was resumed from, once.

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::dirty::{DirtyPages, DirtyRegion, PAGE_SIZE};
use super::memory::{page_kinds, GuestMemory};
use snapshot::{Chain, PageKind};

#[derive(Debug, thiserror::Error)]
pub enum CompareError {
    #[error(transparent)]
    Snapshot(#[from] snapshot::Error),
    #[error("cannot read guest memory at {addr:#x}: {reason}")]
    Memory { addr: u64, reason: String },
}

/// Pages compared per read of the snapshot.
const BATCH_PAGES: usize = 256;

/// The pages whose content in `mem` differs from the newest layer of `chain`, which must
/// describe this memory's layout. Pages never touched (`page_kinds`; known only once `loaded`)
/// are zero in both and are not read. Run with the guest running only once the dirty log is
/// on: a page written during the comparison may be missed here, but not by the log.
/// `give_up` is asked between batches: None once it says so.
pub fn pages_differing(
    mem: &GuestMemory,
    loaded: bool,
    chain: &Chain,
    give_up: &dyn Fn() -> bool,
) -> Result<Option<DirtyPages>, CompareError> {
    let reader = chain.reader()?;
    let kinds = page_kinds(mem, loaded);
    let mut buf = vec![0u8; BATCH_PAGES * PAGE_SIZE as usize];
    let mut out = DirtyPages::default();
    for (region, kinds) in mem.iter().zip(&kinds) {
        let pages = region.len() / PAGE_SIZE;
        let mut bitmap = vec![0u64; pages.div_ceil(64) as usize];
        let mut first = 0u64;
        while first < pages {
            if give_up() {
                return Ok(None);
            }
            let n = (pages - first).min(BATCH_PAGES as u64) as usize;
            let may_differ = |p: usize| kinds.as_ref().is_none_or(|k| k[first as usize + p] == PageKind::Mapped);
            if (0..n).any(may_differ) {
                let snap = &mut buf[..n * PAGE_SIZE as usize];
                reader.read(region.start_addr().0 + first * PAGE_SIZE, snap)?;
                for p in (0..n).filter(|&p| may_differ(p)) {
                    let addr = region.start_addr().0 + (first + p as u64) * PAGE_SIZE;
                    // The guest may write the page meanwhile: the copy is then torn, but such a
                    // page is in the dirty log anyway (see the function doc).
                    let mut page = [0u8; PAGE_SIZE as usize];
                    mem.read_slice(&mut page, GuestAddress(addr))
                        .map_err(|e| CompareError::Memory { addr, reason: e.to_string() })?;
                    if page[..] != snap[p * PAGE_SIZE as usize..(p + 1) * PAGE_SIZE as usize] {
                        let i = first + p as u64;
                        bitmap[(i / 64) as usize] |= 1 << (i % 64);
                    }
                }
            }
            first += n as u64;
        }
        out.regions.push(DirtyRegion { guest_addr: region.start_addr().0, pages, bitmap });
    }
    Ok(Some(out))
}
