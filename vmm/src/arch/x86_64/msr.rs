//! MSRs a vCPU starts with. KVM may refuse some (PVM refuses IA32_ARCH_CAPABILITIES, for one):
//! those are skipped and logged, never fatal.

use kvm_bindings::{kvm_msr_entry, Msrs};
use kvm_ioctls::VcpuFd;

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MISC_ENABLE_FAST_STRING: u64 = 1;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
/// MTRRs enabled, default memory type write-back.
const MTRR_ENABLE_WB: u64 = (1 << 11) | 6;

/// The MSR values of a vCPU at power-on.
pub fn boot_msrs() -> Vec<(u32, u64)> {
    vec![
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WB),
    ]
}

/// Sets `msrs` one by one where the batch fails, so one refused MSR does not lose the rest.
/// Returns the indices KVM refused.
pub fn set_msrs(vcpu: &VcpuFd, msrs: &[(u32, u64)]) -> Result<Vec<u32>, kvm_ioctls::Error> {
    let entries: Vec<kvm_msr_entry> =
        msrs.iter().map(|&(index, data)| kvm_msr_entry { index, data, ..Default::default() }).collect();
    // A list longer than one batch holds (a damaged snapshot) goes one by one.
    if let Ok(batch) = Msrs::from_entries(&entries) {
        if vcpu.set_msrs(&batch)? == entries.len() {
            return Ok(Vec::new());
        }
    }
    let mut refused = Vec::new();
    for entry in &entries {
        let one = Msrs::from_entries(std::slice::from_ref(entry)).expect("one MSR");
        if vcpu.set_msrs(&one)? != 1 {
            tracing::debug!("KVM refused MSR {:#x}; skipped", entry.index);
            refused.push(entry.index);
        }
    }
    Ok(refused)
}
