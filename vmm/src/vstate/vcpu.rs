//! A vCPU: its boot configuration and the thread that runs it, dispatching port I/O and MMIO
//! exits to the buses.

use std::sync::Arc;

use kvm_bindings::CpuId;
use kvm_ioctls::{VcpuExit, VcpuFd};

use super::vm::Vm;
use crate::arch::x86_64::boot::BootEntry;
use crate::arch::x86_64::{cpuid, msr, regs};
use crate::devices::Bus;
use crate::exit::{ExitReason, ExitSender};

const KVM_SYSTEM_EVENT_SHUTDOWN: u32 = 1;
const KVM_SYSTEM_EVENT_RESET: u32 = 2;
const KVM_INTERNAL_ERROR_EMULATION: u32 = 1;

#[derive(Debug, thiserror::Error)]
#[error("vCPU {index}: {call} failed: {err}")]
pub struct VcpuError {
    pub index: u8,
    pub call: &'static str,
    pub err: kvm_ioctls::Error,
}

pub struct Vcpu {
    pub index: u8,
    pub fd: VcpuFd,
}

/// What a vCPU exit asks of the run loop.
enum Step {
    Continue,
    Stop(ExitReason),
}

impl Vcpu {
    pub fn new(vm: &Vm, index: u8) -> Result<Self, VcpuError> {
        let fd = vm.fd.create_vcpu(index.into()).map_err(|err| VcpuError { index, call: "KVM_CREATE_VCPU", err })?;
        Ok(Self { index, fd })
    }

    fn err(&self, call: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
        let index = self.index;
        move |err| VcpuError { index, call, err }
    }

    /// Sets CPUID, MSRs and local APIC wiring; the boot vCPU also gets the kernel's entry state.
    /// The others wait for INIT/SIPI from the guest.
    pub fn configure(&self, supported_cpuid: &CpuId, count: u8, boot: Option<&BootEntry>) -> Result<(), VcpuError> {
        let mut cpuid = supported_cpuid.clone();
        cpuid::configure_cpuid(&mut cpuid, self.index, count);
        self.fd.set_cpuid2(&cpuid).map_err(self.err("KVM_SET_CPUID2"))?;

        msr::set_msrs(&self.fd, &msr::boot_msrs()).map_err(self.err("KVM_SET_MSRS"))?;

        let mut lapic = self.fd.get_lapic().map_err(self.err("KVM_GET_LAPIC"))?;
        regs::set_lint(&mut lapic);
        self.fd.set_lapic(&lapic).map_err(self.err("KVM_SET_LAPIC"))?;

        if let Some(entry) = boot {
            let mut sregs = self.fd.get_sregs().map_err(self.err("KVM_GET_SREGS"))?;
            regs::boot_sregs(&mut sregs, entry);
            self.fd.set_sregs(&sregs).map_err(self.err("KVM_SET_SREGS"))?;
            self.fd.set_regs(&regs::boot_regs(entry)).map_err(self.err("KVM_SET_REGS"))?;
            self.fd.set_fpu(&regs::boot_fpu()).map_err(self.err("KVM_SET_FPU"))?;
        }
        Ok(())
    }

    /// Runs the vCPU until the VM must stop; reports why on `exit`.
    pub fn run(mut self, io_bus: Arc<Bus>, mmio_bus: Arc<Bus>, exit: ExitSender) {
        loop {
            let step = match self.fd.run() {
                Ok(VcpuExit::IoIn(port, data)) => {
                    if !io_bus.read(port.into(), data) {
                        data.fill(0xff);
                    }
                    Step::Continue
                }
                Ok(VcpuExit::IoOut(port, data)) => {
                    io_bus.write(port.into(), data);
                    Step::Continue
                }
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    if !mmio_bus.read(addr, data) {
                        data.fill(0xff);
                    }
                    Step::Continue
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    mmio_bus.write(addr, data);
                    Step::Continue
                }
                Ok(VcpuExit::Hlt) => Step::Continue,
                Ok(VcpuExit::Shutdown) => {
                    Step::Stop(ExitReason::Fatal(self.describe("triple fault (KVM_EXIT_SHUTDOWN)")))
                }
                Ok(VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_SHUTDOWN, _)) => Step::Stop(ExitReason::PowerOff),
                Ok(VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_RESET, _)) => Step::Stop(ExitReason::Reset),
                Ok(VcpuExit::InternalError) => {
                    let what = match self.internal_suberror() {
                        KVM_INTERNAL_ERROR_EMULATION => "KVM internal error: emulation failure".to_string(),
                        n => format!("KVM internal error (suberror {n})"),
                    };
                    Step::Stop(ExitReason::Fatal(self.describe(&what)))
                }
                Ok(VcpuExit::FailEntry(reason, _)) => {
                    Step::Stop(ExitReason::Fatal(self.describe(&format!("KVM entry failure (reason {reason:#x})"))))
                }
                Ok(other) => {
                    let what = format!("unexpected KVM exit {other:?}");
                    Step::Stop(ExitReason::Fatal(self.describe(&what)))
                }
                Err(e) if e.errno() == libc::EAGAIN || e.errno() == libc::EINTR => Step::Continue,
                Err(e) => Step::Stop(ExitReason::Fatal(format!("vCPU {}: KVM_RUN failed: {e}", self.index))),
            };
            if let Step::Stop(reason) = step {
                exit.send(reason);
                return;
            }
        }
    }

    fn internal_suberror(&mut self) -> u32 {
        let run = self.fd.get_kvm_run();
        // SAFETY: after KVM_EXIT_INTERNAL_ERROR the `internal` member of the exit union is the
        // one KVM filled in.
        unsafe { run.__bindgen_anon_1.internal.suberror }
    }

    /// Names the vCPU and its instruction pointer in a fatal-exit message.
    fn describe(&self, what: &str) -> String {
        match self.fd.get_regs() {
            Ok(regs) => format!("{what} on vCPU {} at RIP {:#x}", self.index, regs.rip),
            Err(_) => format!("{what} on vCPU {}", self.index),
        }
    }
}
