//! A vCPU: its boot configuration and the thread that runs it, dispatching port I/O and MMIO
//! exits to the buses.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;

use kvm_bindings::{kvm_run, CpuId};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use super::vcpu_state::{self, VcpuState};
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

impl VcpuError {
    /// Maps a failed KVM call on vCPU `index` to this error.
    pub fn on(index: u8, call: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
        move |err| VcpuError { index, call, err }
    }
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
        VcpuError::on(self.index, call)
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

    /// Starts the vCPU's thread. It runs the guest until the VM must stop (reported on `exit`) and
    /// answers pause/save/resume requests in between.
    /// With `paused`, the thread waits for a resume before running the guest.
    pub fn start(
        self,
        io_bus: Arc<Bus>,
        mmio_bus: Arc<Bus>,
        exit: ExitSender,
        saver: StateSaver,
        paused: bool,
    ) -> std::io::Result<VcpuHandle> {
        install_kick_handler()?;
        let (req_tx, req_rx) = channel();
        if paused {
            // Request 0; VmControl collects its answer.
            req_tx.send((0, VcpuRequest::Pause)).expect("receiver alive");
        }
        let (resp_tx, resp_rx) = channel();
        let index = self.index;
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || self.run(io_bus, mmio_bus, exit, saver, req_rx, resp_tx))?;
        Ok(VcpuHandle { index, thread, requests: req_tx, responses: resp_rx, next_seq: AtomicU64::new(1) })
    }

    fn run(
        mut self,
        io_bus: Arc<Bus>,
        mmio_bus: Arc<Bus>,
        exit: ExitSender,
        saver: StateSaver,
        requests: Receiver<(u64, VcpuRequest)>,
        responses: Sender<(u64, VcpuResponse)>,
    ) {
        let run_ptr: *mut kvm_run = self.fd.get_kvm_run();
        KICK_TARGET.with(|t| t.set(run_ptr));
        // Declared after `self`, so dropped before it: the kick handler stops using this
        // kvm_run before the vCPU fd (and its mapping) goes away.
        let _kick_target = KickTargetGuard;
        // A request may have come before the kick handler could see this thread's kvm_run.
        if !self.serve_requests(&requests, &responses, &saver, true) {
            return;
        }
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
                Ok(VcpuExit::Shutdown) => Step::Stop(ExitReason::Fatal(self.describe_shutdown())),
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
                // Kicked: KVM finished any pending I/O before returning, so the state is
                // consistent and requests can be served.
                Err(e) if e.errno() == libc::EINTR => {
                    self.fd.set_kvm_immediate_exit(0);
                    if self.serve_requests(&requests, &responses, &saver, false) {
                        Step::Continue
                    } else {
                        return;
                    }
                }
                // An AP still waiting for its SIPI.
                Err(e) if e.errno() == libc::EAGAIN => Step::Continue,
                Err(e) => Step::Stop(ExitReason::Fatal(format!("vCPU {}: KVM_RUN failed: {e}", self.index))),
            };
            if let Step::Stop(reason) = step {
                exit.send(reason);
                return;
            }
        }
    }

    /// Serves queued requests. A pause blocks here until resumed. Returns false when the thread
    /// must end (its handle is gone).
    fn serve_requests(
        &mut self,
        requests: &Receiver<(u64, VcpuRequest)>,
        responses: &Sender<(u64, VcpuResponse)>,
        saver: &StateSaver,
        at_start: bool,
    ) -> bool {
        let mut paused = false;
        loop {
            let (seq, request) = if paused {
                match requests.recv() {
                    Ok(r) => r,
                    Err(_) => return false,
                }
            } else {
                match requests.try_recv() {
                    Ok(r) => r,
                    Err(TryRecvError::Empty) => return true,
                    Err(TryRecvError::Disconnected) => return at_start,
                }
            };
            let response = match request {
                VcpuRequest::Pause => {
                    paused = true;
                    VcpuResponse::Paused
                }
                VcpuRequest::Resume => {
                    paused = false;
                    VcpuResponse::Resumed(std::time::Instant::now())
                }
                VcpuRequest::Save => VcpuResponse::State(Box::new(vcpu_state::save(
                    &self.fd,
                    self.index,
                    &saver.msr_indices,
                    saver.xsave_size,
                ))),
            };
            if responses.send((seq, response)).is_err() {
                return false;
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
    /// KVM on AMD resets the vCPU before reporting a shutdown (the VMCB is undefined after the
    /// SHUTDOWN intercept, arch/x86/kvm/svm/svm.c), so the reset vector is all that is left.
    fn describe_shutdown(&self) -> String {
        let what = self.describe("triple fault (KVM_EXIT_SHUTDOWN)");
        let reset = matches!((self.fd.get_regs(), self.fd.get_sregs()),
            (Ok(r), Ok(s)) if r.rip == 0xfff0 && s.cs.base == 0xffff_0000);
        if reset {
            format!("{what} (the reset vector: KVM resets the vCPU before reporting it on AMD, so where it faulted is lost)")
        } else {
            what
        }
    }

    fn describe(&self, what: &str) -> String {
        match self.fd.get_regs() {
            Ok(regs) => format!("{what} on vCPU {} at RIP {:#x}", self.index, regs.rip),
            Err(_) => format!("{what} on vCPU {}", self.index),
        }
    }
}

/// What a vCPU thread is asked to do while the guest is stopped.
pub enum VcpuRequest {
    Pause,
    Save,
    Resume,
}

pub enum VcpuResponse {
    Paused,
    /// When it left the pause (it goes back into KVM_RUN right after).
    Resumed(std::time::Instant),
    State(Box<Result<VcpuState, VcpuError>>),
}

/// What a vCPU thread needs to save its state.
#[derive(Clone)]
pub struct StateSaver {
    pub msr_indices: Arc<Vec<u32>>,
    pub xsave_size: usize,
}

/// The VMM's handle on a running vCPU thread. Requests carry a sequence number that their answer
/// repeats, so a late answer to a request that timed out is never taken for another's.
pub struct VcpuHandle {
    pub index: u8,
    thread: JoinHandle<()>,
    requests: Sender<(u64, VcpuRequest)>,
    responses: Receiver<(u64, VcpuResponse)>,
    next_seq: AtomicU64,
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("vCPU {0} is not running (its thread ended)")]
    Gone(u8),
    #[error("vCPU {0} did not answer within {1:?}")]
    Timeout(u8, std::time::Duration),
    #[error("vCPU {0} gave an answer to another request")]
    Protocol(u8),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
}

const ANSWER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

impl VcpuHandle {
    /// Queues a request; returns its sequence number.
    fn request(&self, request: VcpuRequest) -> Result<u64, ControlError> {
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        self.requests.send((seq, request)).map_err(|_| ControlError::Gone(self.index))?;
        Ok(seq)
    }

    /// Waits for the answer to request `seq`, dropping answers to earlier ones.
    pub fn answer(&self, seq: u64) -> Result<VcpuResponse, ControlError> {
        let deadline = std::time::Instant::now() + ANSWER_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.responses.recv_timeout(left) {
                Ok((s, response)) if s == seq => return Ok(response),
                Ok(_) => continue,
                Err(RecvTimeoutError::Timeout) => return Err(ControlError::Timeout(self.index, ANSWER_TIMEOUT)),
                Err(RecvTimeoutError::Disconnected) => return Err(ControlError::Gone(self.index)),
            }
        }
    }

    /// Asks the vCPU to pause and kicks it out of KVM_RUN; `answer(seq)` gets its answer.
    pub fn pause(&self) -> Result<u64, ControlError> {
        let seq = self.request(VcpuRequest::Pause)?;
        if self.thread.is_finished() {
            return Err(ControlError::Gone(self.index));
        }
        self.thread.kill(SIGRTMIN() + KICK_SIGNAL_OFFSET).map_err(|_| ControlError::Gone(self.index))?;
        Ok(seq)
    }

    /// Lets a paused vCPU run again (no kick: it is waiting for this) without waiting for the
    /// answer: for undoing a pause that may not have happened yet.
    pub fn release(&self) -> Result<u64, ControlError> {
        self.request(VcpuRequest::Resume)
    }

    /// Waits until the vCPU `release` (which returned `seq`) let go runs again; when it did.
    pub fn resumed(&self, seq: u64) -> Result<std::time::Instant, ControlError> {
        match self.answer(seq)? {
            VcpuResponse::Resumed(at) => Ok(at),
            _ => Err(ControlError::Protocol(self.index)),
        }
    }

    /// Asks a paused vCPU for its state.
    pub fn save(&self) -> Result<VcpuState, ControlError> {
        let seq = self.request(VcpuRequest::Save)?;
        match self.answer(seq)? {
            VcpuResponse::State(state) => Ok((*state)?),
            _ => Err(ControlError::Protocol(self.index)),
        }
    }
}

/// Real-time signal (offset from SIGRTMIN) that kicks a vCPU thread out of KVM_RUN.
const KICK_SIGNAL_OFFSET: i32 = 0;

thread_local! {
    /// This thread's kvm_run, for the kick handler.
    static KICK_TARGET: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Setting immediate_exit (rather than only interrupting) closes the race with a kick that
    // arrives just before KVM_RUN: KVM sees the flag and returns EINTR at once.
    KICK_TARGET.with(|t| {
        let run = t.get();
        if !run.is_null() {
            // SAFETY: the pointer is this thread's own kvm_run mapping, set while its vCPU fd is
            // alive and cleared (by KickTargetGuard) before the fd is dropped. A volatile byte
            // store through a raw pointer is async-signal-safe and creates no reference.
            unsafe { std::ptr::write_volatile(std::ptr::addr_of_mut!((*run).immediate_exit), 1) };
        }
    });
}

/// Clears this thread's kick target when dropped.
struct KickTargetGuard;

impl Drop for KickTargetGuard {
    fn drop(&mut self) {
        KICK_TARGET.with(|t| t.set(std::ptr::null_mut()));
        std::sync::atomic::compiler_fence(std::sync::atomic::Ordering::SeqCst);
    }
}

/// Installs the kick handler once; without it a kick would kill the process.
fn install_kick_handler() -> std::io::Result<()> {
    static RESULT: std::sync::OnceLock<Result<(), i32>> = std::sync::OnceLock::new();
    let result = RESULT
        .get_or_init(|| register_signal_handler(SIGRTMIN() + KICK_SIGNAL_OFFSET, kick_handler).map_err(|e| e.errno()));
    result.map_err(std::io::Error::from_raw_os_error)
}
