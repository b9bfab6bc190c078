//! A host TAP device opened for a virtio-net backend: non-blocking, with the 12-byte virtio-net
//! header (`struct virtio_net_hdr_v1`) in front of every frame, so checksum and segmentation
//! offloads pass between the guest and the host kernel untouched (Documentation/networking/tuntap.rst).

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::OpenOptionsExt;

use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref, ioctl_with_val};

/// Bytes of the virtio-net header every frame carries through the TAP (virtio 1.x, section 5.1.6).
pub const VNET_HDR_LEN: usize = 12;

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("TAP device '{0}' does not exist (create it with: ip tuntap add dev {0} mode tap)")]
    Missing(String),
    #[error("'{0}' is not a single-queue TAP device (vmm attaches one queue: create it with: ip tuntap add dev {0} mode tap)")]
    NotTap(String),
    #[error("TAP device '{0}' is in use by another process")]
    InUse(String),
    #[error("TAP name '{0}' is not valid: 1 to 15 bytes, no '/', ':' or whitespace")]
    BadName(String),
    #[error("cannot open /dev/net/tun: {0}")]
    OpenTun(io::Error),
    #[error("cannot attach to TAP device '{name}': {err}")]
    Attach { name: String, err: io::Error },
    #[error("cannot set up TAP device '{name}' ({what}): {err}")]
    Setup { name: String, what: &'static str, err: io::Error },
}

/// An attached TAP queue.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

/// Checks a TAP name as the kernel would take it (IFNAMSIZ, and what `ip` accepts).
pub fn check_name(name: &str) -> Result<(), TapError> {
    let ok = !name.is_empty()
        && name.len() < libc::IFNAMSIZ
        && !name.contains(['/', ':'])
        && !name.chars().any(char::is_whitespace)
        && name != "."
        && name != "..";
    if ok {
        Ok(())
    } else {
        Err(TapError::BadName(name.to_string()))
    }
}

/// Checks that a network device `name` exists in this thread's network namespace (not through
/// /sys, which shows the namespace it was mounted in).
pub fn check_exists(name: &str) -> Result<(), TapError> {
    check_name(name)?;
    let cname = std::ffi::CString::new(name).map_err(|_| TapError::BadName(name.to_string()))?;
    // SAFETY: a NUL-terminated string that lives for the call.
    if unsafe { libc::if_nametoindex(cname.as_ptr()) } == 0 {
        return Err(TapError::Missing(name.to_string()));
    }
    Ok(())
}

impl Tap {
    /// Attaches to the existing TAP device `name`. It is never created here: a TAP that vmm
    /// made on the fly would vanish with the process, and with it the host's configuration of it.
    pub fn open(name: &str) -> Result<Self, TapError> {
        // TUNSETIFF would create a missing device: look it up first.
        check_exists(name)?;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::OpenTun)?;
        // SAFETY: ifreq is plain data; all zeroes is a valid value.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
            *dst = src as libc::c_char;
        }
        ifr.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
        // SAFETY: TUNSETIFF reads and writes one ifreq, which lives for the call.
        let ret = unsafe { ioctl_with_mut_ref(&file, libc::TUNSETIFF as _, &mut ifr) };
        if ret < 0 {
            let err = io::Error::last_os_error();
            return Err(match err.raw_os_error() {
                Some(libc::EBUSY) => TapError::InUse(name.to_string()),
                // The device exists but is no TAP (a TUN, a veth, a bridge, ...).
                Some(libc::EINVAL) => TapError::NotTap(name.to_string()),
                // EPERM: a TAP owned by another user, say.
                _ => TapError::Attach { name: name.to_string(), err },
            });
        }
        let tap = Self { file, name: name.to_string() };
        let hdr_len = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int, which lives for the call.
        if unsafe { ioctl_with_ref(&tap.file, libc::TUNSETVNETHDRSZ as _, &hdr_len) } < 0 {
            return Err(tap.setup_error("TUNSETVNETHDRSZ"));
        }
        tap.set_offload(0)?;
        Ok(tap)
    }

    fn setup_error(&self, what: &'static str) -> TapError {
        TapError::Setup { name: self.name.clone(), what, err: io::Error::last_os_error() }
    }

    /// Tells the host which offloads the guest accepts on received frames (`TUN_F_*`): frames
    /// still needing a checksum, or larger than the MTU, only reach a guest that said it takes them.
    pub fn set_offload(&self, tun_flags: u32) -> Result<(), TapError> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value.
        if unsafe { ioctl_with_val(&self.file, libc::TUNSETOFFLOAD as _, libc::c_ulong::from(tun_flags)) } < 0 {
            return Err(self.setup_error("TUNSETOFFLOAD"));
        }
        Ok(())
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads one frame (with its virtio-net header); `WouldBlock` when none is waiting.
    pub fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        rustix::io::read(&self.file, buf).map_err(io::Error::from)
    }

    /// Writes one frame given in pieces (virtio-net header first).
    pub fn write_frame(&self, parts: &[io::IoSlice<'_>]) -> io::Result<usize> {
        rustix::io::writev(&self.file, parts).map_err(io::Error::from)
    }
}

impl AsFd for Tap {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for good in ["tap0", "vmm-tap.1", "a"] {
            assert!(check_name(good).is_ok(), "{good}");
        }
        for bad in ["", "0123456789abcdef", "a/b", "a:b", "a b", ".", ".."] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_missing_tap_is_named() {
        let err = Tap::open("vmm-no-such0").unwrap_err();
        assert!(matches!(err, TapError::Missing(_)), "{err}");
        assert!(err.to_string().contains("vmm-no-such0"));
    }
}
