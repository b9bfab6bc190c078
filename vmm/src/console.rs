//! The guest console on the VMM's terminal: raw mode while the VM runs, stdin into COM1, and the
//! QEMU-style escape `Ctrl-A x` to quit.

use std::io::Read;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::devices::bus::lock;
use crate::devices::legacy::SerialDevice;
use crate::exit::{ExitReason, ExitSender};

const CTRL_A: u8 = 0x01;

/// Puts stdin's terminal in raw mode and restores it when dropped or on `restore`.
pub struct RawTerminal {
    saved: Option<libc::termios>,
}

impl RawTerminal {
    /// Raw mode if stdin is a terminal; a no-op otherwise (CI, pipes).
    pub fn enter() -> Self {
        // SAFETY: isatty only inspects the descriptor.
        if unsafe { libc::isatty(libc::STDIN_FILENO) } != 1 {
            return Self { saved: None };
        }
        // SAFETY: termios is plain data; tcgetattr fills it for a valid descriptor.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: valid descriptor and pointer to a live termios.
        if unsafe { libc::tcgetattr(libc::STDIN_FILENO, &mut saved) } != 0 {
            return Self { saved: None };
        }
        let mut raw = saved;
        // SAFETY: cfmakeraw only edits the struct it is given.
        unsafe { libc::cfmakeraw(&mut raw) };
        // Keep output post-processing so the host terminal still turns \n into \r\n.
        raw.c_oflag = saved.c_oflag;
        // SAFETY: valid descriptor and pointer to a live termios.
        unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &raw) };
        Self { saved: Some(saved) }
    }

    pub fn restore(&self) {
        if let Some(saved) = &self.saved {
            // SAFETY: valid descriptor and pointer to the termios saved at entry.
            unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, saved) };
        }
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        self.restore();
    }
}

/// Input bytes after the escape handling: what goes to the guest, and whether to quit.
#[derive(Default)]
pub struct EscapeFilter {
    after_ctrl_a: bool,
}

impl EscapeFilter {
    /// Returns the bytes for the guest, and true if the user asked to quit.
    pub fn feed(&mut self, input: &[u8]) -> (Vec<u8>, bool) {
        let mut out = Vec::with_capacity(input.len());
        for &b in input {
            if self.after_ctrl_a {
                self.after_ctrl_a = false;
                match b {
                    b'x' | b'X' => return (out, true),
                    CTRL_A => out.push(CTRL_A),
                    other => out.extend([CTRL_A, other]),
                }
            } else if b == CTRL_A {
                self.after_ctrl_a = true;
            } else {
                out.push(b);
            }
        }
        (out, false)
    }
}

/// Copies stdin into the serial port until end of input (which is not a quit: CI has no stdin).
pub fn spawn_stdin_reader(serial: Arc<Mutex<SerialDevice>>, exit: ExitSender) -> std::io::Result<()> {
    std::thread::Builder::new().name("stdin".into()).spawn(move || {
        let mut filter = EscapeFilter::default();
        let mut stdin = std::io::stdin().lock();
        let mut buf = [0u8; 64];
        loop {
            let n = match stdin.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let (bytes, quit) = filter.feed(&buf[..n]);
            let mut rest = &bytes[..];
            while !rest.is_empty() {
                let taken = lock(&serial).enqueue_input(rest);
                rest = &rest[taken..];
                if taken == 0 {
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
            if quit {
                exit.send(ExitReason::UserQuit);
                return;
            }
        }
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ctrl_a_x_quits_and_ctrl_a_twice_sends_one() {
        let mut f = EscapeFilter::default();
        assert_eq!(f.feed(b"ab"), (b"ab".to_vec(), false));
        assert_eq!(f.feed(&[CTRL_A, CTRL_A, b'c']), (vec![CTRL_A, b'c'], false));
        assert_eq!(f.feed(&[b'q', CTRL_A]), (vec![b'q'], false));
        assert_eq!(f.feed(b"x"), (vec![], true));
        let mut f = EscapeFilter::default();
        assert_eq!(f.feed(&[CTRL_A, b'z']), (vec![CTRL_A, b'z'], false));
    }
}
