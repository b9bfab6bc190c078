//! How a running VM ends, and the channel through which vCPUs and devices say so.

use std::sync::mpsc::{channel, Receiver, Sender};

/// Why the VM stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest powered itself off (ACPI S5).
    PowerOff,
    /// The guest asked for a reset (i8042 or ACPI reset register); we end rather than reboot.
    Reset,
    /// The user quit from the console (Ctrl-A x).
    UserQuit,
    /// A snapshot with --stop completed, or the control socket asked for shutdown.
    Stopped,
    /// vmm was asked to terminate (SIGTERM, SIGINT, SIGHUP).
    Signal(i32),
    /// The VM cannot go on: triple fault, KVM internal error, a failed KVM call.
    Fatal(String),
    /// The snapshot a VM was resumed from proved damaged while its memory came in.
    BadSnapshot(String),
}

impl ExitReason {
    /// Process exit status: 0 for an orderly end, 1 for a failure.
    pub fn exit_code(&self) -> i32 {
        match self {
            ExitReason::Fatal(_) => 1,
            ExitReason::BadSnapshot(_) => 2,
            _ => 0,
        }
    }
}

/// Cloneable handle that vCPU threads and devices use to end the VM.
#[derive(Clone, Debug)]
pub struct ExitSender(Sender<ExitReason>);

impl ExitSender {
    pub fn send(&self, reason: ExitReason) {
        // The receiver lives as long as the machine; if it is gone the process is ending anyway.
        let _ = self.0.send(reason);
    }
}

/// Creates the exit channel: many senders, one waiter (the main thread).
pub fn exit_channel() -> (ExitSender, Receiver<ExitReason>) {
    let (tx, rx) = channel();
    (ExitSender(tx), rx)
}

/// A vm-superio trigger that ends the VM with a fixed reason (used for the i8042 reset).
pub struct ExitTrigger {
    pub sender: ExitSender,
    pub reason: ExitReason,
}

impl vm_superio::Trigger for ExitTrigger {
    type E = std::convert::Infallible;

    fn trigger(&self) -> Result<(), Self::E> {
        self.sender.send(self.reason.clone());
        Ok(())
    }
}

/// Termination signals, handled by ending the VM cleanly (terminal restored, socket removed).
const TERMINATION_SIGNALS: [libc::c_int; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];

fn termination_set() -> libc::sigset_t {
    signal_set(&TERMINATION_SIGNALS)
}

fn signal_set(signals: &[libc::c_int]) -> libc::sigset_t {
    // SAFETY: sigset_t is plain data, initialised by sigemptyset before use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t.
    unsafe { libc::sigemptyset(&mut set) };
    for &sig in signals {
        // SAFETY: `set` is a valid sigset_t and `sig` a valid signal number.
        unsafe { libc::sigaddset(&mut set, sig) };
    }
    set
}

/// Blocks the termination signals in this thread and every thread it starts later, so that only
/// `spawn_signal_waiter` receives them. Call first thing in main.
pub fn block_termination_signals() {
    // SIGUSR1 too: a VM takes a checkpoint on it (`spawn_signal_waiter`); elsewhere it waits, unseen.
    let set = signal_set(&[libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGUSR1]);
    // SAFETY: valid set; the old mask is not needed.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
}

/// Waits for a termination signal (blocked by `block_termination_signals`) and returns it.
pub fn wait_termination_signal() -> Option<libc::c_int> {
    let set = termination_set();
    let mut sig: libc::c_int = 0;
    // SAFETY: valid set and output pointer.
    (unsafe { libc::sigwait(&set, &mut sig) } == 0).then_some(sig)
}

/// Waits for a termination signal and ends the VM with it; on SIGUSR1, asks for a checkpoint
/// through `checkpoint` (a VM without periodic checkpoints says it has none).
pub fn spawn_signal_waiter(exit: ExitSender, checkpoint: Option<std::sync::mpsc::Sender<()>>) -> std::io::Result<()> {
    std::thread::Builder::new().name("signals".into()).spawn(move || {
        let set = signal_set(&[libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGUSR1]);
        loop {
            let mut sig: libc::c_int = 0;
            // SAFETY: valid set and output pointer; the signals are blocked in every thread.
            if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
                return;
            }
            if sig != libc::SIGUSR1 {
                exit.send(ExitReason::Signal(sig));
                return;
            }
            match &checkpoint {
                Some(tx) => {
                    let _ = tx.send(());
                }
                None => eprintln!("vmm: SIGUSR1 takes a checkpoint, and this VM has no --checkpoint-dir"),
            }
        }
    })?;
    Ok(())
}
