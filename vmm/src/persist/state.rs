//! The machine state as named, versioned sections: `vm` (interrupt controllers, PIT, clock),
//! `vcpu.N` for each vCPU, `devices` (the device list, each device's own state inside).

use snapshot::MachineSections;

use crate::devices::persist::DeviceRecord;
use crate::vstate::vcpu_state::VcpuState;
use crate::vstate::vm::VmState;

use super::PersistError;

/// Layout versions of the sections this vmm writes (and the newest it reads).
const VM_VERSION: u32 = 1;
const VCPU_VERSION: u32 = 1;
const DEVICES_VERSION: u32 = 1;

/// Everything but memory that makes the machine.
#[derive(Clone, Debug)]
pub struct MachineState {
    pub vm: VmState,
    pub vcpus: Vec<VcpuState>,
    pub devices: Vec<DeviceRecord>,
}

fn vcpu_section(index: usize) -> String {
    format!("vcpu.{index}")
}

impl MachineState {
    pub fn to_sections(&self) -> MachineSections {
        let mut sections = MachineSections::default();
        sections.push("vm", VM_VERSION, &self.vm);
        for (i, vcpu) in self.vcpus.iter().enumerate() {
            sections.push(vcpu_section(i), VCPU_VERSION, vcpu);
        }
        sections.push("devices", DEVICES_VERSION, &self.devices);
        sections
    }

    /// Decodes the sections of a machine with `vcpus` vCPUs.
    pub fn from_sections(sections: &MachineSections, vcpus: usize) -> Result<Self, PersistError> {
        let vm = sections.decode_section("vm", VM_VERSION)?;
        let vcpus = (0..vcpus)
            .map(|i| sections.decode_section::<VcpuState>(&vcpu_section(i), VCPU_VERSION))
            .collect::<Result<Vec<_>, _>>()?;
        if vcpus.iter().enumerate().any(|(i, v)| usize::from(v.index) != i) {
            return Err(PersistError::Inconsistent("vCPU states are out of order".into()));
        }
        let devices = sections.decode_section("devices", DEVICES_VERSION)?;
        Ok(Self { vm, vcpus, devices })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::persist::{DeviceState, Resources};

    #[test]
    fn machine_state_round_trips_through_sections() {
        let vcpu = VcpuState {
            index: 0,
            cpuid: vec![kvm_bindings::kvm_cpuid_entry2 { function: 1, eax: 7, ..Default::default() }],
            msrs: vec![(0x10, 42)],
            mp_state: Default::default(),
            regs: kvm_bindings::kvm_regs { rip: 0x1234, ..Default::default() },
            sregs: Default::default(),
            xsave: vec![5; 1024],
            xcrs: Default::default(),
            debugregs: Default::default(),
            lapic: Default::default(),
            vcpu_events: Default::default(),
            tsc_khz: Some(2_000_000),
        };
        let state = MachineState {
            vm: VmState {
                pic_master: Default::default(),
                pic_slave: Default::default(),
                ioapic: Default::default(),
                pit: Default::default(),
                clock: kvm_bindings::kvm_clock_data { clock: 99, ..Default::default() },
            },
            vcpus: vec![vcpu],
            devices: vec![DeviceRecord {
                id: "serial0".into(),
                kind: "serial".into(),
                resources: Resources { pio: Some((0x3f8, 8)), gsi: Some(4), mmio: None },
                state: DeviceState { version: 1, data: vec![1, 2, 3] },
            }],
        };
        let bytes = state.to_sections().encode();
        let back = MachineState::from_sections(&MachineSections::decode(&bytes).unwrap(), 1).unwrap();
        assert_eq!(back.vcpus[0].regs.rip, 0x1234);
        assert_eq!(back.vcpus[0].xsave, vec![5; 1024]);
        assert_eq!(back.vm.clock.clock, 99);
        assert_eq!(back.devices, state.devices);
        // A missing vCPU, garbage: errors, never a panic or a huge allocation.
        let sections = MachineSections::decode(&bytes).unwrap();
        assert!(MachineState::from_sections(&sections, 2).is_err());
        assert!(MachineSections::decode(&bytes[..bytes.len() / 2]).is_err());
        assert!(MachineSections::decode(&[0xff; 64]).is_err());
    }
}
