//! KVM objects: guest memory and its dirty log, the VM (memory slots, irqchip, PIT) and the vCPUs.

pub mod compare;
pub mod dirty;
pub mod load;
pub mod memory;
pub mod uffd;
pub mod vcpu;
pub mod vcpu_state;
pub mod vm;
