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
    /// The VM cannot go on: triple fault, KVM internal error, a failed KVM call.
    Fatal(String),
}

impl ExitReason {
    /// Process exit status: 0 for an orderly end, 1 for a failure.
    pub fn exit_code(&self) -> i32 {
        match self {
            ExitReason::Fatal(_) => 1,
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
