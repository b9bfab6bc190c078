//! Per-vCPU CPUID: KVM's supported set, with each vCPU's APIC id and topology filled in.

use kvm_bindings::{kvm_cpuid_entry2, CpuId};
use snapshot::CpuIdentity;

const LEAF_FEATURES: u32 = 1;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
const LEAF_V2_EXT_TOPOLOGY: u32 = 0x1f;
const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;

/// Adjusts `cpuid` (from `KVM_GET_SUPPORTED_CPUID`) for vCPU `index` of `count`.
pub fn configure_cpuid(cpuid: &mut CpuId, index: u8, count: u8) {
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            LEAF_FEATURES => {
                // EBX[31:24] initial APIC id, EBX[23:16] logical processors per package.
                entry.ebx = (entry.ebx & 0xffff) | (u32::from(index) << 24) | (u32::from(count) << 16);
                entry.ecx |= ECX_HYPERVISOR;
                if count > 1 {
                    entry.edx |= EDX_HTT;
                }
            }
            LEAF_EXT_TOPOLOGY | LEAF_V2_EXT_TOPOLOGY => {
                // EDX: x2APIC id of this logical processor.
                entry.edx = u32::from(index);
            }
            _ => {}
        }
    }
}

/// The host CPU's identity and feature words (CPUID leaves 1 and 7).
pub fn host_cpu() -> CpuIdentity {
    use std::arch::x86_64::{__cpuid, __cpuid_count};
    let (l0, l1, l7) = (__cpuid(0), __cpuid(1), __cpuid_count(7, 0));
    let vendor: Vec<u8> = [l0.ebx, l0.edx, l0.ecx].iter().flat_map(|r| r.to_le_bytes()).collect();
    let base_family = (l1.eax >> 8) & 0xf;
    let family = if base_family == 0xf { base_family + ((l1.eax >> 20) & 0xff) } else { base_family };
    let model = ((l1.eax >> 4) & 0xf) | (((l1.eax >> 16) & 0xf) << 4);
    CpuIdentity {
        vendor: String::from_utf8_lossy(&vendor).into_owned(),
        family,
        model,
        stepping: l1.eax & 0xf,
        feature_words: vec![l1.ecx, l1.edx, l7.ebx, l7.ecx, l7.edx],
    }
}

/// CPUID feature words (leaf 1 ECX/EDX, leaf 7.0 EBX/ECX/EDX) of a CPUID table.
pub fn feature_words(cpuid: &[kvm_cpuid_entry2]) -> [u32; 5] {
    let find = |f: u32| cpuid.iter().find(|e| e.function == f && e.index == 0);
    let (l1, l7) = (find(1), find(7));
    [
        l1.map_or(0, |e| e.ecx),
        l1.map_or(0, |e| e.edx),
        l7.map_or(0, |e| e.ebx),
        l7.map_or(0, |e| e.ecx),
        l7.map_or(0, |e| e.edx),
    ]
}

/// Bits KVM reports that describe per-vCPU or hypervisor-controlled state, not CPU features:
/// leaf 1 ECX hypervisor, OSXSAVE, TSC deadline, x2APIC; EDX HTT.
const NOT_FEATURES: [u32; 5] = [(1 << 31) | (1 << 27) | (1 << 24) | (1 << 21), 1 << 28, 0, 0, 0];

/// The CPU features a saved guest was given that this host can offer neither through KVM
/// (`supported`) nor natively (on PVM hosts the guest sees the host's own CPUID), as
/// "leaf.register=bits" strings; empty if it can run here.
pub fn missing_features(saved: &[kvm_cpuid_entry2], supported: &[kvm_cpuid_entry2]) -> Vec<String> {
    missing_feature_words(&feature_words(saved), supported)
}

/// [`missing_features`] of a guest given by its feature words (`feature_words`).
pub fn missing_feature_words(need: &[u32], supported: &[kvm_cpuid_entry2]) -> Vec<String> {
    let kvm = feature_words(supported);
    let raw = host_cpu().feature_words;
    let need: Vec<u32> = (0..5).map(|w| need.get(w).copied().unwrap_or(0)).collect();
    (0..5)
        .filter_map(|w| {
            let have = kvm[w] | raw.get(w).copied().unwrap_or(0);
            let bits = need[w] & !have & !NOT_FEATURES[w];
            (bits != 0).then(|| format!("{}={bits:#x}", ["1.ecx", "1.edx", "7.ebx", "7.ecx", "7.edx"][w]))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    #[test]
    fn features_the_host_lacks_are_named() {
        let leaf1 = |ecx| kvm_cpuid_entry2 { function: 1, ecx, ..Default::default() };
        // What this very CPU has is never missing.
        let host = host_cpu().feature_words;
        assert!(missing_features(&[leaf1(host[0])], &[]).is_empty());
        // Per-vCPU bits (hypervisor) are not features.
        assert!(missing_features(&[leaf1(1 << 31)], &[]).is_empty());
        // A bit neither KVM nor the CPU has is reported (bit 30 is RDRAND; use an unused bit).
        let unused = !host[0] & !NOT_FEATURES[0] & (1 << 16);
        if unused != 0 {
            assert_eq!(missing_features(&[leaf1(unused)], &[]), vec![format!("1.ecx={unused:#x}")]);
        }
    }

    #[test]
    fn apic_id_in_leaf_1_and_0xb() {
        let entries = [
            kvm_cpuid_entry2 { function: 1, ebx: 0xdead_beef, ..Default::default() },
            kvm_cpuid_entry2 { function: 0xb, index: 0, ..Default::default() },
            kvm_cpuid_entry2 { function: 0xb, index: 1, ..Default::default() },
        ];
        let mut cpuid = CpuId::from_entries(&entries).unwrap();
        configure_cpuid(&mut cpuid, 3, 4);
        let e = cpuid.as_slice();
        assert_eq!(e[0].ebx >> 24, 3);
        assert_eq!((e[0].ebx >> 16) & 0xff, 4);
        assert_eq!(e[0].ebx & 0xffff, 0xbeef);
        assert_ne!(e[0].ecx & ECX_HYPERVISOR, 0);
        assert_eq!((e[1].edx, e[2].edx), (3, 3));
    }
}
