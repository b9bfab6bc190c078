//! The KVM VM: memory slots, in-kernel irqchip (PIC + IOAPIC + LAPICs), PIT and irqfds.

use super::dirty::{self, DirtyPages, DirtyRegion};
use super::memory::GuestMemory;
use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, Kvm, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

/// KVM needs three pages for the TSS of real-mode emulation somewhere outside RAM.
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot open /dev/kvm: {0}")]
    OpenKvm(kvm_ioctls::Error),
    #[error("/dev/kvm is not a usable KVM device (KVM_GET_API_VERSION gave {0}, 12 expected)")]
    KvmApiVersion(i32),
    #[error("KVM lacks a required capability: {0}")]
    MissingCap(&'static str),
    #[error("KVM call {call} failed: {err}")]
    Kvm { call: &'static str, err: kvm_ioctls::Error },
}

fn kvm_err(call: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |err| VmError::Kvm { call, err }
}

pub struct Vm {
    pub kvm: Kvm,
    pub fd: VmFd,
}

impl Vm {
    pub fn new() -> Result<Self, VmError> {
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        let version = kvm.get_api_version();
        if version != 12 {
            return Err(VmError::KvmApiVersion(version));
        }
        for (cap, name) in [
            (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
            (Cap::Irqfd, "KVM_CAP_IRQFD"),
            (Cap::Pit2, "KVM_CAP_PIT2"),
            (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(VmError::MissingCap(name));
            }
        }
        let fd = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        Ok(Self { kvm, fd })
    }

    /// Largest number of vCPUs KVM allows in one VM.
    pub fn max_vcpus(&self) -> usize {
        self.kvm.get_max_vcpus()
    }

    /// Registers every guest memory region as a KVM memory slot, without dirty log (see
    /// `set_dirty_logging`).
    pub fn register_memory(&self, mem: &GuestMemory) -> Result<(), VmError> {
        self.set_slots(mem, 0)
    }

    /// (Re)registers each region of `mem` as slot i with `flags`; changing only the flags of a
    /// registered slot is how KVM's dirty log is switched on and off at run time.
    fn set_slots(&self, mem: &GuestMemory, flags: u32) -> Result<(), VmError> {
        for (slot, region) in mem.iter().enumerate() {
            let host = region.as_ptr() as u64;
            let region = kvm_userspace_memory_region {
                slot: slot as u32,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host,
                flags,
            };
            // SAFETY: the region's mapping lives as long as `mem`, which the machine keeps for
            // the VM's whole life, and slots do not overlap.
            unsafe { self.fd.set_user_memory_region(region) }.map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
        }
        Ok(())
    }

    /// Starts or stops dirty logging of every memory slot. Starting also forgets the VMM's
    /// earlier writes, so the first fetch holds exactly the pages written since.
    pub fn set_dirty_logging(&self, mem: &GuestMemory, on: bool) -> Result<(), VmError> {
        if on {
            dirty::clear_vmm_writes(mem);
        }
        self.set_slots(mem, if on { KVM_MEM_LOG_DIRTY_PAGES } else { 0 })
    }

    /// The pages written since logging started or since the previous fetch, by the vCPUs (KVM's
    /// log) or by the VMM (its bitmaps), and clears both. Logging must be on.
    pub fn fetch_dirty_pages(&self, mem: &GuestMemory) -> Result<DirtyPages, VmError> {
        // The VMM's bitmaps first: a device write that lands in guest memory after KVM's log was
        // read is then still found at the next fetch.
        let vmm = dirty::take_vmm_writes(mem);
        let mut regions = Vec::new();
        for (slot, ((addr, pages), vmm)) in dirty::region_pages(mem).into_iter().zip(&vmm).enumerate() {
            let size = (pages * dirty::PAGE_SIZE) as usize;
            let kvm = self.fd.get_dirty_log(slot as u32, size).map_err(kvm_err("KVM_GET_DIRTY_LOG"))?;
            regions.push(DirtyRegion::merge(addr, pages, &kvm, vmm));
        }
        Ok(DirtyPages { regions })
    }

    /// Creates the in-kernel PIC, IOAPIC and PIT. Must come before the vCPUs.
    pub fn create_irqchip(&self) -> Result<(), VmError> {
        self.fd.set_tss_address(KVM_TSS_ADDRESS).map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        self.fd.create_irq_chip().map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
        self.fd.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;
        Ok(())
    }

    /// Returns an eventfd that raises `gsi` when written.
    pub fn irqfd(&self, gsi: u32) -> Result<EventFd, VmError> {
        let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| VmError::Kvm {
            call: "eventfd",
            err: kvm_ioctls::Error::new(e.raw_os_error().unwrap_or(0)),
        })?;
        self.fd.register_irqfd(&evt, gsi).map_err(kvm_err("KVM_IRQFD"))?;
        Ok(evt)
    }

    /// An eventfd KVM signals when the guest writes the 32-bit `value` to MMIO address `addr`
    /// (a virtio queue notification), without the vCPU leaving the kernel (KVM_IOEVENTFD).
    pub fn mmio_write_eventfd(&self, addr: u64, value: u32) -> Result<EventFd, VmError> {
        let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| VmError::Kvm {
            call: "eventfd",
            err: kvm_ioctls::Error::new(e.raw_os_error().unwrap_or(0)),
        })?;
        self.fd
            .register_ioevent(&evt, &kvm_ioctls::IoEventAddress::Mmio(addr), value)
            .map_err(kvm_err("KVM_IOEVENTFD"))?;
        Ok(evt)
    }
}

/// The VM-wide KVM state: the in-kernel interrupt controllers, the PIT and kvmclock.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct VmState {
    pub pic_master: kvm_bindings::kvm_irqchip,
    pub pic_slave: kvm_bindings::kvm_irqchip,
    pub ioapic: kvm_bindings::kvm_irqchip,
    pub pit: kvm_bindings::kvm_pit_state2,
    pub clock: kvm_bindings::kvm_clock_data,
}

const IRQCHIP_PIC_MASTER: u32 = 0;
const IRQCHIP_PIC_SLAVE: u32 = 1;
const IRQCHIP_IOAPIC: u32 = 2;

impl Vm {
    fn get_irqchip(&self, chip_id: u32) -> Result<kvm_bindings::kvm_irqchip, VmError> {
        let mut chip = kvm_bindings::kvm_irqchip { chip_id, ..Default::default() };
        self.fd.get_irqchip(&mut chip).map_err(kvm_err("KVM_GET_IRQCHIP"))?;
        Ok(chip)
    }

    /// Saves the VM-wide state; every vCPU must be paused.
    pub fn save_state(&self) -> Result<VmState, VmError> {
        Ok(VmState {
            pic_master: self.get_irqchip(IRQCHIP_PIC_MASTER)?,
            pic_slave: self.get_irqchip(IRQCHIP_PIC_SLAVE)?,
            ioapic: self.get_irqchip(IRQCHIP_IOAPIC)?,
            pit: self.fd.get_pit2().map_err(kvm_err("KVM_GET_PIT2"))?,
            clock: self.fd.get_clock().map_err(kvm_err("KVM_GET_CLOCK"))?,
        })
    }

    /// Restores the interrupt controllers and the PIT into a fresh VM, right after
    /// `create_irqchip` and before devices that may raise interrupts are restored.
    pub fn restore_irqchips(&self, state: &VmState) -> Result<(), VmError> {
        for chip in [&state.pic_master, &state.pic_slave, &state.ioapic] {
            self.fd.set_irqchip(chip).map_err(kvm_err("KVM_SET_IRQCHIP"))?;
        }
        self.fd.set_pit2(&state.pit).map_err(kvm_err("KVM_SET_PIT2"))?;
        Ok(())
    }

    /// Restores kvmclock, before any vCPU runs (so the guest's clock goes on from the saved
    /// value and never goes backwards).
    pub fn restore_clock(&self, state: &VmState) -> Result<(), VmError> {
        // No flags: with KVM_CLOCK_REALTIME KVM would add the wall time elapsed since the save,
        // and the guest's monotonic clock would leap forward by the whole time it was stored.
        // The guest continues from the instant it was saved.
        let clock = kvm_bindings::kvm_clock_data { clock: state.clock.clock, ..Default::default() };
        self.fd.set_clock(&clock).map_err(kvm_err("KVM_SET_CLOCK"))?;
        Ok(())
    }

    /// MSRs KVM says can be saved and restored.
    pub fn saveable_msrs(&self) -> Result<Vec<u32>, VmError> {
        Ok(self.kvm.get_msr_index_list().map_err(kvm_err("KVM_GET_MSR_INDEX_LIST"))?.as_slice().to_vec())
    }

    /// Size of the vCPU XSAVE area (KVM_CAP_XSAVE2, or the legacy 4 KiB).
    pub fn xsave_size(&self) -> usize {
        usize::try_from(self.fd.check_extension_int(Cap::Xsave2)).unwrap_or(0).max(4096)
    }
}
