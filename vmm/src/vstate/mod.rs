//! KVM objects: guest memory, the VM (memory slots, irqchip, PIT) and the vCPUs.

pub mod memory;
pub mod vcpu;
pub mod vcpu_state;
pub mod vm;
