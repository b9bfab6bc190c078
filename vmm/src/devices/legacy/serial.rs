//! COM1: a 16550 UART (vm-superio) whose output goes to the VMM's stdout and whose interrupt is
//! an irqfd.

use std::io::Write;

use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::persist::{DeviceState, Persist};
use crate::devices::BusDevice;

/// Layout version of `SerialSnapshot`.
const STATE_VERSION: u32 = 1;

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
    write_failed: bool,
}

impl<W: Write> SerialPort<W> {
    pub fn new(irq: EventFd, out: W) -> Self {
        Self { uart: Serial::new(EventFdTrigger(irq), out), write_failed: false }
    }

    /// Signals the interrupt again if the UART has one pending (after a restore).
    pub fn replay_interrupt(&self) {
        const IIR_NO_INTERRUPT: u8 = 1;
        if self.uart.state().interrupt_identification & IIR_NO_INTERRUPT == 0 {
            if let Err(e) = self.uart.interrupt_evt().trigger() {
                tracing::warn!("serial: cannot raise interrupt: {e}");
            }
        }
    }

    pub fn snapshot(&self) -> SerialSnapshot {
        SerialSnapshot::from_superio(&self.uart.state())
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
                // Once: a closed stdout would otherwise log every byte the guest prints.
                if !self.write_failed {
                    tracing::warn!("serial output failed (further failures not reported): {e:?}");
                    self.write_failed = true;
                }
            }
            if off == 0 {
                let _ = self.uart.writer_mut().flush();
            }
        }
    }
}

impl Persist for SerialDevice {
    fn save(&self) -> DeviceState {
        DeviceState::encode(STATE_VERSION, &self.snapshot())
    }

    fn restore(&mut self, state: &DeviceState) -> Result<(), String> {
        let saved: SerialSnapshot = state.decode(STATE_VERSION)?;
        let irq = || self.uart.interrupt_evt().0.try_clone().map_err(|e| format!("serial interrupt: {e}"));
        // Checked on a throwaway UART first: the real one takes over the console writer, which
        // must not be lost to a bad state.
        Serial::from_state(&saved.to_superio(), EventFdTrigger(irq()?), NoEvents, std::io::sink())
            .map_err(|e| format!("serial state: {e:?}"))?;
        let placeholder: Box<dyn Write + Send> = Box::new(std::io::sink());
        let (irq, spare) = (irq()?, irq()?);
        let out = std::mem::replace(&mut self.uart, Serial::new(EventFdTrigger(spare), placeholder)).into_writer();
        self.uart = Serial::from_state(&saved.to_superio(), EventFdTrigger(irq), NoEvents, out)
            .map_err(|e| format!("serial state: {e:?}"))?;
        Ok(())
    }

    fn restored(&mut self) {
        SerialPort::replay_interrupt(self);
    }

    fn describe(&self) -> String {
        "16550 UART".into()
    }
}

/// The UART's registers and receive FIFO, as saved in a snapshot.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialSnapshot {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

impl SerialSnapshot {
    fn from_superio(s: &SerialState) -> Self {
        Self {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }

    fn to_superio(&self) -> SerialState {
        SerialState {
            baud_divisor_low: self.baud_divisor_low,
            baud_divisor_high: self.baud_divisor_high,
            interrupt_enable: self.interrupt_enable,
            interrupt_identification: self.interrupt_identification,
            line_control: self.line_control,
            line_status: self.line_status,
            modem_control: self.modem_control,
            modem_status: self.modem_status,
            scratch: self.scratch,
            in_buffer: self.in_buffer.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips() {
        let mut port = SerialPort::new(EventFd::new(0).unwrap(), Vec::new());
        port.write(3, &[0x80]); // DLAB
        port.write(0, &[0x0c]);
        port.write(3, &[0x03]);
        port.write(7, &[0x5a]); // scratch
        assert_eq!(port.enqueue_input(b"hi"), 2);
        let saved = port.snapshot();
        let out: Box<dyn Write + Send> = Box::new(Vec::new());
        let mut restored: SerialDevice = SerialPort::new(EventFd::new(0).unwrap(), out);
        Persist::restore(&mut restored, &DeviceState::encode(STATE_VERSION, &saved)).unwrap();
        assert_eq!(restored.snapshot(), saved);
        assert_eq!(saved.in_buffer, b"hi");
        assert_eq!(saved.scratch, 0x5a);
        // A newer layout is refused, and the port keeps working.
        assert!(Persist::restore(&mut restored, &DeviceState::encode(STATE_VERSION + 1, &saved)).is_err());
        assert_eq!(restored.snapshot(), saved);
    }
}
