//! Control of a running VM: pause and continue every vCPU, snapshot, shut down. The control
//! socket and the main thread both act through this.

use std::sync::{Mutex, MutexGuard};

use vm_memory::GuestMemoryMmap;

use crate::config::VmConfig;
use crate::devices::bus::lock;
use crate::exit::{ExitReason, ExitSender};
use crate::machine::Devices;
use crate::vstate::vcpu::{ControlError, VcpuHandle, VcpuRequest, VcpuResponse};
use crate::vstate::vcpu_state::VcpuState;
use crate::vstate::vm::{Vm, VmState};

/// Whether the guest runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunState {
    Running,
    Paused,
}

impl RunState {
    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Running => "running",
            RunState::Paused => "paused",
        }
    }
}

struct Inner {
    vcpus: Vec<VcpuHandle>,
    state: RunState,
}

pub struct VmControl {
    pub config: VmConfig,
    pub vm: Vm,
    pub mem: GuestMemoryMmap,
    pub devices: Devices,
    inner: Mutex<Inner>,
    exit: ExitSender,
}

/// A guard holding every vCPU paused; dropping it lets the guest run again if it was running.
pub struct PausedVm<'a> {
    inner: MutexGuard<'a, Inner>,
    was: RunState,
    keep_paused: bool,
}

impl PausedVm<'_> {
    /// Collects every vCPU's state.
    pub fn vcpu_states(&self) -> Result<Vec<VcpuState>, ControlError> {
        self.inner.vcpus.iter().map(|v| v.save()).collect()
    }

    /// Leaves the guest paused when the guard is dropped (the VM is about to end).
    pub fn keep_paused(&mut self) {
        self.keep_paused = true;
    }
}

impl Drop for PausedVm<'_> {
    fn drop(&mut self) {
        if self.was == RunState::Running && !self.keep_paused {
            if let Err(e) = resume_all(&mut self.inner) {
                tracing::error!("cannot resume the guest: {e}");
            }
        }
    }
}

fn pause_all(inner: &mut Inner) -> Result<(), ControlError> {
    if inner.state == RunState::Paused {
        return Ok(());
    }
    for v in &inner.vcpus {
        v.send(VcpuRequest::Pause)?;
    }
    for v in &inner.vcpus {
        match v.receive()? {
            VcpuResponse::Paused => {}
            _ => return Err(ControlError::Gone(v.index)),
        }
    }
    inner.state = RunState::Paused;
    Ok(())
}

fn resume_all(inner: &mut Inner) -> Result<(), ControlError> {
    if inner.state == RunState::Running {
        return Ok(());
    }
    for v in &inner.vcpus {
        v.resume()?;
    }
    inner.state = RunState::Running;
    Ok(())
}

impl VmControl {
    /// `started_paused`: every vCPU thread was started with a pause request queued, whose answer
    /// is collected here.
    pub fn new(
        config: VmConfig,
        vm: Vm,
        mem: GuestMemoryMmap,
        devices: Devices,
        vcpus: Vec<VcpuHandle>,
        started_paused: bool,
        exit: ExitSender,
    ) -> Self {
        let mut state = RunState::Running;
        if started_paused {
            state = RunState::Paused;
            for v in &vcpus {
                if !matches!(v.receive(), Ok(VcpuResponse::Paused)) {
                    tracing::error!("vCPU {} did not start paused", v.index);
                }
            }
        }
        Self { config, vm, mem, devices, inner: Mutex::new(Inner { vcpus, state }), exit }
    }

    pub fn run_state(&self) -> RunState {
        lock(&self.inner).state
    }

    /// Pauses the guest until `resume`.
    pub fn pause(&self) -> Result<(), ControlError> {
        pause_all(&mut lock(&self.inner))
    }

    pub fn resume(&self) -> Result<(), ControlError> {
        resume_all(&mut lock(&self.inner))
    }

    /// Pauses every vCPU (if running) for as long as the returned guard lives.
    pub fn pause_for(&self) -> Result<PausedVm<'_>, ControlError> {
        let mut inner = lock(&self.inner);
        let was = inner.state;
        pause_all(&mut inner)?;
        Ok(PausedVm { inner, was, keep_paused: false })
    }

    /// Saves the VM-wide KVM state; call with the VM paused.
    pub fn vm_state(&self, _paused: &PausedVm<'_>) -> Result<VmState, crate::vstate::vm::VmError> {
        self.vm.save_state()
    }

    /// A handle to end the VM from elsewhere (signals).
    pub fn exit_sender(&self) -> ExitSender {
        self.exit.clone()
    }

    /// Ends the VM with `reason` (the main thread then exits the process).
    pub fn end(&self, reason: ExitReason) {
        self.exit.send(reason);
    }
}
