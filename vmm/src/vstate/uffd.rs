//! A userfaultfd in missing-page mode (Linux `Documentation/admin-guide/mm/userfaultfd.rst`,
//! `ioctl_userfaultfd(2)`): the first touch of a page never populated in a registered range stops
//! the toucher (a vCPU in KVM, or a VMM thread) until this side puts the page there.
//!
//! Its own few ioctls rather than the `userfaultfd` crate, whose bindings are generated at build
//! time with libclang, which a plain Debian host does not have. The structures come from
//! `linux-raw-sys`.

use std::os::fd::{AsRawFd, OwnedFd};

use linux_raw_sys::general::{
    uffd_msg, uffdio_api, uffdio_copy, uffdio_move, uffdio_range, uffdio_register, uffdio_zeropage,
    UFFDIO_REGISTER_MODE_MISSING, UFFD_API, UFFD_EVENT_PAGEFAULT, UFFD_FEATURE_MOVE,
};
use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref};
use vmm_sys_util::{ioctl_ior_nr, ioctl_iowr_nr};

const UFFDIO: u32 = 0xAA;
ioctl_iowr_nr!(UFFDIO_API, UFFDIO, 0x3F, uffdio_api);
ioctl_iowr_nr!(UFFDIO_REGISTER, UFFDIO, 0x00, uffdio_register);
ioctl_ior_nr!(UFFDIO_UNREGISTER, UFFDIO, 0x01, uffdio_range);
ioctl_ior_nr!(UFFDIO_WAKE, UFFDIO, 0x02, uffdio_range);
ioctl_iowr_nr!(UFFDIO_COPY, UFFDIO, 0x03, uffdio_copy);
ioctl_iowr_nr!(UFFDIO_ZEROPAGE, UFFDIO, 0x04, uffdio_zeropage);
ioctl_iowr_nr!(UFFDIO_MOVE, UFFDIO, 0x05, uffdio_move);

const PAGE: usize = 4096;

pub struct Userfault {
    fd: OwnedFd,
    /// The kernel offers UFFDIO_MOVE (Linux 6.8 and later).
    can_move: bool,
}

fn last_error(what: &str) -> std::io::Error {
    let e = std::io::Error::last_os_error();
    std::io::Error::new(e.kind(), format!("{what}: {e}"))
}

/// Fills `len` bytes of a registered range with `step(done)`, an ioctl from byte `done` on that
/// returns its result and the bytes it filled: a page there already is kept (it is newer) and
/// gone past, and a change of the address space meanwhile (EAGAIN) is tried again.
fn fill(len: usize, what: &str, mut step: impl FnMut(usize) -> (i32, i64)) -> std::io::Result<()> {
    let mut done = 0;
    while done < len {
        let (rc, filled) = step(done);
        if filled > 0 {
            done += filled as usize;
        }
        if rc == 0 {
            continue;
        }
        match std::io::Error::last_os_error().raw_os_error() {
            Some(libc::EEXIST) => done = (done / PAGE + 1) * PAGE,
            Some(libc::EAGAIN) => {}
            _ => return Err(last_error(what)),
        }
    }
    Ok(())
}

impl Userfault {
    /// A non-blocking userfaultfd that also takes faults from kernel mode (KVM's): that needs
    /// CAP_SYS_PTRACE, or `vm.unprivileged_userfaultfd = 1`.
    pub fn new() -> std::io::Result<Self> {
        // UFFDIO_API is answered once per descriptor: a kernel without UFFDIO_MOVE refuses the
        // feature (EINVAL), and a second descriptor goes without it.
        match Self::with_features(UFFD_FEATURE_MOVE) {
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Self::with_features(0),
            other => other,
        }
        .map_err(|e| std::io::Error::new(e.kind(), format!("userfaultfd: {e}")))
    }

    /// A descriptor with `features`; its errors are the kernel's own (`raw_os_error` kept).
    fn with_features(features: u32) -> std::io::Result<Self> {
        use rustix::mm::{userfaultfd, UserfaultfdFlags};
        // SAFETY: the descriptor is owned here and used only through the ioctls below, on
        // ranges of this process's own guest memory.
        let fd = unsafe { userfaultfd(UserfaultfdFlags::CLOEXEC | UserfaultfdFlags::NONBLOCK) }
            .map_err(|e| std::io::Error::from_raw_os_error(e.raw_os_error()))?;
        let mut api = uffdio_api { api: u64::from(UFFD_API), features: u64::from(features), ioctls: 0 };
        // SAFETY: UFFDIO_API reads and writes exactly a uffdio_api, which `api` is.
        if unsafe { ioctl_with_mut_ref(&fd, UFFDIO_API(), &mut api) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self { fd, can_move: features & UFFD_FEATURE_MOVE != 0 })
    }

    /// Whether `move_in` can work here.
    pub fn can_move(&self) -> bool {
        self.can_move
    }

    /// Moves the pages at `[src, src + len)` (this process's private anonymous memory, every page
    /// present) to `dst` (page aligned, registered) and wakes whoever waits on them: no copy, and
    /// a 2 MiB transparent huge page at 2 MiB-aligned `src` and `dst` stays one. As `copy`, a page
    /// at `dst` already is kept (it is newer), and the one for it stays at `src`.
    pub fn move_in(&self, src: usize, dst: usize, len: usize) -> std::io::Result<()> {
        fill(len, "UFFDIO_MOVE", |done| {
            let mut mv = uffdio_move {
                dst: (dst + done) as u64,
                src: (src + done) as u64,
                len: (len - done) as u64,
                mode: 0,
                move_: 0,
            };
            // SAFETY: UFFDIO_MOVE reads and writes exactly a uffdio_move. It takes pages only
            // from `src`, which the caller owns and no longer reads, and puts them only where
            // the registered range has none, atomically.
            let rc = unsafe { ioctl_with_mut_ref(&self.fd, UFFDIO_MOVE(), &mut mv) };
            (rc, mv.move_)
        })
    }

    /// Registers `[start, start + len)` (page aligned, a private anonymous mapping) for
    /// missing-page faults.
    pub fn register(&self, start: usize, len: usize) -> std::io::Result<()> {
        let mut reg = uffdio_register {
            range: uffdio_range { start: start as u64, len: len as u64 },
            mode: u64::from(UFFDIO_REGISTER_MODE_MISSING),
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER reads and writes exactly a uffdio_register; the range is
        // this process's memory, which registration does not change.
        if unsafe { ioctl_with_mut_ref(&self.fd, UFFDIO_REGISTER(), &mut reg) } != 0 {
            return Err(last_error("UFFDIO_REGISTER"));
        }
        Ok(())
    }

    /// Ends the registration: missing pages then fault in as plain anonymous memory (zero), and
    /// whoever waits on one in the range retries.
    pub fn unregister(&self, start: usize, len: usize) -> std::io::Result<()> {
        let range = uffdio_range { start: start as u64, len: len as u64 };
        // SAFETY: UFFDIO_UNREGISTER reads exactly a uffdio_range.
        if unsafe { ioctl_with_ref(&self.fd, UFFDIO_UNREGISTER(), &range) } != 0 {
            return Err(last_error("UFFDIO_UNREGISTER"));
        }
        Ok(())
    }

    /// Wakes whoever waits on a page of `[start, start + len)` (one populated meanwhile).
    pub fn wake(&self, start: usize, len: usize) -> std::io::Result<()> {
        let range = uffdio_range { start: start as u64, len: len as u64 };
        // SAFETY: UFFDIO_WAKE reads exactly a uffdio_range.
        if unsafe { ioctl_with_ref(&self.fd, UFFDIO_WAKE(), &range) } != 0 {
            return Err(last_error("UFFDIO_WAKE"));
        }
        Ok(())
    }

    /// Puts a copy of `src` at `dst` (page aligned, registered), page by page, skipping pages
    /// present already, and wakes whoever waits on them.
    pub fn copy(&self, src: &[u8], dst: usize) -> std::io::Result<()> {
        // SAFETY: the slice is `src.len()` readable bytes.
        unsafe { self.copy_from(src.as_ptr(), src.len(), dst) }
    }

    /// `copy` from `len` bytes at `src`, which only the kernel reads: a file mapping whose file
    /// shrank meanwhile makes this fail (EFAULT), where a read of ours would be a SIGBUS.
    ///
    /// # Safety
    /// `[src, src + len)` must be mapped in this process (its content may be anything).
    pub unsafe fn copy_from(&self, src: *const u8, len: usize, dst: usize) -> std::io::Result<()> {
        fill(len, "UFFDIO_COPY", |done| {
            let mut copy = uffdio_copy {
                dst: (dst + done) as u64,
                src: src as u64 + done as u64,
                len: (len - done) as u64,
                mode: 0,
                copy: 0,
            };
            // SAFETY: UFFDIO_COPY reads and writes exactly a uffdio_copy. It reads `len` bytes
            // at `src`, mapped (the caller's promise), and writes only pages of the registered
            // range that are missing, atomically, so nobody sees a page half written.
            let rc = unsafe { ioctl_with_mut_ref(&self.fd, UFFDIO_COPY(), &mut copy) };
            (rc, copy.copy)
        })
    }

    /// Maps the zero page at the missing pages of `[start, start + len)` and wakes whoever
    /// waits on them; a write later gets a page of its own, as in any anonymous memory.
    pub fn zeropage(&self, start: usize, len: usize) -> std::io::Result<()> {
        fill(len, "UFFDIO_ZEROPAGE", |done| {
            let mut zero = uffdio_zeropage {
                range: uffdio_range { start: (start + done) as u64, len: (len - done) as u64 },
                mode: 0,
                zeropage: 0,
            };
            // SAFETY: UFFDIO_ZEROPAGE reads and writes exactly a uffdio_zeropage, and maps only
            // missing pages of the registered range.
            let rc = unsafe { ioctl_with_mut_ref(&self.fd, UFFDIO_ZEROPAGE(), &mut zero) };
            (rc, zero.zeropage)
        })
    }

    /// The address of the next missing-page fault, if one waits (other events are not asked
    /// for, and are skipped).
    pub fn next_fault(&self) -> std::io::Result<Option<usize>> {
        loop {
            let mut msg = std::mem::MaybeUninit::<uffd_msg>::zeroed();
            let size = std::mem::size_of::<uffd_msg>();
            // SAFETY: reads at most one uffd_msg into `msg`, which has room for exactly one.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), msg.as_mut_ptr().cast(), size) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                return match e.raw_os_error() {
                    Some(libc::EAGAIN) => Ok(None),
                    Some(libc::EINTR) => continue,
                    _ => Err(last_error("reading userfaultfd")),
                };
            }
            if n as usize != size {
                return Err(std::io::Error::other("short read from userfaultfd"));
            }
            // SAFETY: the kernel wrote a whole uffd_msg (checked above); all its bit patterns
            // are valid.
            let msg = unsafe { msg.assume_init() };
            if u32::from(msg.event) == UFFD_EVENT_PAGEFAULT {
                // SAFETY: a page-fault event carries the `pagefault` member of the union.
                let address = unsafe { msg.arg.pagefault.address };
                return Ok(Some(address as usize & !(PAGE - 1)));
            }
        }
    }

    /// Waits up to `timeout_ms` for a fault (or forever with -1).
    pub fn wait(&self, timeout_ms: i32) -> std::io::Result<()> {
        let mut fds = [libc::pollfd { fd: self.fd.as_raw_fd(), events: libc::POLLIN, revents: 0 }];
        // SAFETY: polls one descriptor this object owns; `fds` lives across the call.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), 1, timeout_ms) };
        if rc < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return Err(last_error("poll on userfaultfd"));
        }
        Ok(())
    }
}
