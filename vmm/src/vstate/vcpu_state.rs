//! Everything KVM knows about a vCPU, as plain data: saved from a paused vCPU, restored into a
//! fresh one. The order of both follows what KVM needs (see the comments).

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, Xsave,
};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};

use super::vcpu::VcpuError;

const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
/// KVM_GET_MSRS takes batches; larger lists are split.
const MSR_BATCH: usize = 64;

/// The paravirtual MSRs whose value is a guest physical address (bit 0 the enable bit, but for
/// the wall clock's) of a structure KVM maps, or writes, as soon as the MSR is set
/// (Linux `Documentation/virt/kvm/x86/msr.rst`): kvmclock's, the steal time's, async page
/// faults', PV EOI's.
const PV_GUEST_ADDRESS_MSRS: [(u32, bool); 7] = [
    (0x11, false),        // MSR_KVM_WALL_CLOCK
    (0x12, true),         // MSR_KVM_SYSTEM_TIME
    (0x4b56_4d00, false), // MSR_KVM_WALL_CLOCK_NEW
    (0x4b56_4d01, true),  // MSR_KVM_SYSTEM_TIME_NEW
    (0x4b56_4d02, true),  // MSR_KVM_ASYNC_PF_EN
    (0x4b56_4d03, true),  // MSR_KVM_STEAL_TIME
    (0x4b56_4d04, true),  // MSR_KVM_PV_EOI_EN
];
const XSAVE_LEGACY_BYTES: usize = std::mem::size_of::<kvm_xsave>();
const KVM_VCPUEVENT_VALID_NMI_PENDING: u32 = 1;

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct VcpuState {
    pub index: u8,
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub msrs: Vec<(u32, u64)>,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    /// The XSAVE area as 32-bit words (4 KiB, or KVM_CAP_XSAVE2's size where larger).
    pub xsave: Vec<u32>,
    pub xcrs: kvm_xcrs,
    pub debugregs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub vcpu_events: kvm_vcpu_events,
    pub tsc_khz: Option<u32>,
}

impl VcpuState {
    /// CPU mode from the control registers, for `vmm inspect`.
    pub fn mode(&self) -> &'static str {
        const CR0_PE: u64 = 1;
        const EFER_LMA: u64 = 1 << 10;
        if self.sregs.cr0 & CR0_PE == 0 {
            "real"
        } else if self.sregs.efer & EFER_LMA == 0 {
            "protected"
        } else if self.sregs.cs.l == 1 {
            "long"
        } else {
            "compatibility"
        }
    }

    /// Privilege level the vCPU was running at.
    pub fn cpl(&self) -> u8 {
        self.sregs.cs.dpl
    }
}

/// Reads every MSR in `indices` that KVM will give; unreadable ones are skipped (logged).
fn get_msrs(fd: &VcpuFd, index: u8, indices: &[u32]) -> Result<Vec<(u32, u64)>, VcpuError> {
    let mut out = Vec::with_capacity(indices.len());
    for batch in indices.chunks(MSR_BATCH) {
        let mut rest = batch;
        while !rest.is_empty() {
            let entries: Vec<kvm_msr_entry> =
                rest.iter().map(|&i| kvm_msr_entry { index: i, ..Default::default() }).collect();
            let mut msrs = Msrs::from_entries(&entries).expect("batch within KVM's limit");
            let n = fd.get_msrs(&mut msrs).map_err(VcpuError::on(index, "KVM_GET_MSRS"))?;
            out.extend(msrs.as_slice()[..n].iter().map(|e| (e.index, e.data)));
            if n < rest.len() {
                // KVM stops at the first MSR it cannot read: skip that one and go on.
                tracing::debug!("vCPU {index}: MSR {:#x} not readable; not saved", rest[n]);
                rest = &rest[n + 1..];
            } else {
                rest = &[];
            }
        }
    }
    Ok(out)
}

/// Saves a vCPU's state. The vCPU must be out of KVM_RUN, with pending I/O completed.
pub fn save(fd: &VcpuFd, index: u8, msr_indices: &[u32], xsave_size: usize) -> Result<VcpuState, VcpuError> {
    // mp_state first: reading it makes KVM process pending INIT/SIPI events into the state.
    let mp_state = fd.get_mp_state().map_err(VcpuError::on(index, "KVM_GET_MP_STATE"))?;
    let regs = fd.get_regs().map_err(VcpuError::on(index, "KVM_GET_REGS"))?;
    let sregs = fd.get_sregs().map_err(VcpuError::on(index, "KVM_GET_SREGS"))?;
    let xsave = get_xsave(fd, index, xsave_size)?;
    let xcrs = fd.get_xcrs().map_err(VcpuError::on(index, "KVM_GET_XCRS"))?;
    let debugregs = fd.get_debug_regs().map_err(VcpuError::on(index, "KVM_GET_DEBUGREGS"))?;
    let lapic = fd.get_lapic().map_err(VcpuError::on(index, "KVM_GET_LAPIC"))?;
    let msrs = get_msrs(fd, index, msr_indices)?;
    let vcpu_events = fd.get_vcpu_events().map_err(VcpuError::on(index, "KVM_GET_VCPU_EVENTS"))?;
    let cpuid = fd.get_cpuid2(256).map_err(VcpuError::on(index, "KVM_GET_CPUID2"))?.as_slice().to_vec();
    let tsc_khz = fd.get_tsc_khz().ok();
    Ok(VcpuState { index, cpuid, msrs, mp_state, regs, sregs, xsave, xcrs, debugregs, lapic, vcpu_events, tsc_khz })
}

fn get_xsave(fd: &VcpuFd, index: u8, size: usize) -> Result<Vec<u32>, VcpuError> {
    if size <= XSAVE_LEGACY_BYTES {
        let x = fd.get_xsave().map_err(VcpuError::on(index, "KVM_GET_XSAVE"))?;
        return Ok(x.region.to_vec());
    }
    let fam = (size - XSAVE_LEGACY_BYTES).div_ceil(4);
    let mut x = Xsave::new(fam).expect("xsave size within limits");
    // SAFETY: `x` was allocated with the size KVM_CAP_XSAVE2 reported.
    unsafe { fd.get_xsave2(&mut x) }.map_err(VcpuError::on(index, "KVM_GET_XSAVE2"))?;
    let mut words = x.as_fam_struct_ref().xsave.region.to_vec();
    words.extend_from_slice(x.as_slice());
    Ok(words)
}

/// Restores the XSAVE area into a buffer of this host's size: KVM reads that many bytes.
fn set_xsave(fd: &VcpuFd, index: u8, words: &[u32], host_size: usize) -> Result<(), VcpuError> {
    let host_words = host_size.max(XSAVE_LEGACY_BYTES).div_ceil(4);
    // A larger area from another host is fine if the guest left the extra state unused (zero).
    if words.len() > host_words && words[host_words..].iter().any(|w| *w != 0) {
        return Err(VcpuError { index, call: "KVM_SET_XSAVE", err: kvm_ioctls::Error::new(libc::E2BIG) });
    }
    let words = &words[..words.len().min(host_words)];
    let legacy = XSAVE_LEGACY_BYTES / 4;
    if host_words <= legacy {
        let mut x = kvm_xsave::default();
        x.region[..words.len()].copy_from_slice(words);
        // SAFETY: a full legacy-size xsave struct, the size this host's KVM reads.
        return unsafe { fd.set_xsave(&x) }.map_err(VcpuError::on(index, "KVM_SET_XSAVE"));
    }
    let mut padded = words.to_vec();
    padded.resize(host_words, 0);
    let mut x = Xsave::new(host_words - legacy).expect("xsave size within limits");
    // SAFETY: writing the fixed-size legacy part of the struct just allocated.
    unsafe { x.as_mut_fam_struct().xsave.region.copy_from_slice(&padded[..legacy]) };
    x.as_mut_slice().copy_from_slice(&padded[legacy..]);
    // SAFETY: `x` holds KVM_CAP_XSAVE2's size for this host, all KVM reads.
    unsafe { fd.set_xsave2(&x) }.map_err(VcpuError::on(index, "KVM_SET_XSAVE2"))
}

/// Orders MSRs for restore: the TSC before the TSC deadline (which is relative to it).
fn restore_order(msrs: &[(u32, u64)]) -> Vec<(u32, u64)> {
    let mut v = msrs.to_vec();
    v.sort_by_key(|&(i, _)| match i {
        MSR_IA32_TSC => 0,
        MSR_IA32_TSC_DEADLINE => 2,
        _ => 1,
    });
    v
}

/// Restores a saved vCPU into a freshly created one (not yet run). `xsave_size` is this host's
/// XSAVE area size (see `Vm::xsave_size`).
pub fn restore(fd: &VcpuFd, state: &VcpuState, xsave_size: usize) -> Result<(), VcpuError> {
    let index = state.index;
    let too_big = || VcpuError { index, call: "KVM_SET_CPUID2", err: kvm_ioctls::Error::new(libc::E2BIG) };
    // CPUID first: KVM checks later state (XSAVE features, MSRs) against it.
    let cpuid = CpuId::from_entries(&state.cpuid).map_err(|_| too_big())?;
    fd.set_cpuid2(&cpuid).map_err(VcpuError::on(index, "KVM_SET_CPUID2"))?;
    if let Some(khz) = state.tsc_khz {
        if fd.get_tsc_khz().ok() != Some(khz) {
            if let Err(e) = fd.set_tsc_khz(khz) {
                tracing::warn!("vCPU {index}: cannot set TSC frequency to {khz} kHz: {e}");
            }
        }
    }
    fd.set_mp_state(state.mp_state).map_err(VcpuError::on(index, "KVM_SET_MP_STATE"))?;
    fd.set_regs(&state.regs).map_err(VcpuError::on(index, "KVM_SET_REGS"))?;
    fd.set_sregs(&state.sregs).map_err(VcpuError::on(index, "KVM_SET_SREGS"))?;
    set_xsave(fd, index, &state.xsave, xsave_size)?;
    fd.set_xcrs(&state.xcrs).map_err(VcpuError::on(index, "KVM_SET_XCRS"))?;
    fd.set_debug_regs(&state.debugregs).map_err(VcpuError::on(index, "KVM_SET_DEBUGREGS"))?;
    fd.set_lapic(&state.lapic).map_err(VcpuError::on(index, "KVM_SET_LAPIC"))?;
    // MSRs after the LAPIC: KVM ignores a TSC deadline unless the LAPIC timer is already in
    // TSC-deadline mode, and KVM_SET_LAPIC would clear it. The TSC goes before the deadline.
    let refused = crate::arch::x86_64::msr::set_msrs(fd, &restore_order(&state.msrs))
        .map_err(VcpuError::on(index, "KVM_SET_MSRS"))?;
    for msr in refused {
        tracing::debug!("vCPU {index}: KVM refused saved MSR {msr:#x}");
    }
    // Events last: they refer to the LAPIC. The NMI-pending field is marked valid so a pending
    // NMI is restored whatever the flags of the saved events say.
    let mut events = state.vcpu_events;
    events.flags |= KVM_VCPUEVENT_VALID_NMI_PENDING;
    fd.set_vcpu_events(&events).map_err(VcpuError::on(index, "KVM_SET_VCPU_EVENTS"))?;
    Ok(())
}

/// Guest physical addresses KVM touches while `restore` sets this state: a resume brings the
/// memory there in before the vCPUs are restored, which would otherwise wait for it.
pub fn restore_touches(state: &VcpuState) -> Vec<u64> {
    state
        .msrs
        .iter()
        .filter_map(|&(index, value)| {
            let (_, enable_bit) = PV_GUEST_ADDRESS_MSRS.iter().find(|m| m.0 == index)?;
            let on = if *enable_bit { value & 1 == 1 } else { value != 0 };
            on.then_some(value & !0xfff)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restore_touches_only_enabled_paravirtual_structures() {
        let state = |msrs: Vec<(u32, u64)>| VcpuState { msrs, ..Default::default() };
        let touched = restore_touches(&state(vec![
            (0x4b56_4d01, 0x35_4241),    // kvmclock on
            (0x4b56_4d03, 0x10_0000),    // steal time off
            (0x4b56_4d00, 0x20_1000),    // wall clock (no enable bit)
            (MSR_IA32_TSC, 0x1234_5001), // not an address
        ]));
        assert_eq!(touched, vec![0x35_4000, 0x20_1000]);
    }

    #[test]
    fn tsc_before_deadline() {
        let order = restore_order(&[(MSR_IA32_TSC_DEADLINE, 5), (0x174, 1), (MSR_IA32_TSC, 9)]);
        assert_eq!(order[0].0, MSR_IA32_TSC);
        assert_eq!(order[2].0, MSR_IA32_TSC_DEADLINE);
    }
}
