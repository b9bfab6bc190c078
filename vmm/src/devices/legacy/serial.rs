//! COM1: a 16550 UART (vm-superio) whose output goes to the VMM's stdout and whose interrupt is
//! an irqfd.

use std::io::Write;

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::BusDevice;

/// Raises a guest interrupt by signalling an irqfd.
pub struct EventFdTrigger(pub EventFd);

impl Trigger for EventFdTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

pub type SerialDevice = SerialPort<Box<dyn Write + Send>>;

pub struct SerialPort<W: Write> {
    pub uart: Serial<EventFdTrigger, NoEvents, W>,
}

impl<W: Write> SerialPort<W> {
    pub fn new(irq: EventFd, out: W) -> Self {
        Self { uart: Serial::new(EventFdTrigger(irq), out) }
    }

    /// Queues input bytes for the guest; returns how many fit in the receive FIFO.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        let room = self.uart.fifo_capacity().min(bytes.len());
        if room == 0 {
            return 0;
        }
        self.uart.enqueue_raw_bytes(&bytes[..room]).unwrap_or(0)
    }
}

impl<W: Write + Send> BusDevice for SerialPort<W> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let (Ok(off), [first, rest @ ..]) = (u8::try_from(offset), data) {
            *first = self.uart.read(off);
            rest.fill(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(off), [value, ..]) = (u8::try_from(offset), data) {
            if let Err(e) = self.uart.write(off, *value) {
                tracing::warn!("serial write failed: {e:?}");
            }
            if off == 0 {
                let _ = self.uart.writer_mut().flush();
            }
        }
    }
}
