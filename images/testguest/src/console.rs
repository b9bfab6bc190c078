//! Output lines. Each line is built in a buffer and written with one service call under a lock, so
//! lines from different CPUs never interleave. No `core::fmt`: it is big and not needed.

use core::sync::atomic::{AtomicBool, Ordering};

use crate::sync::SpinLock;
use crate::sys;

/// Held while a line is written, by ring 3 and by ring 0's exception report (traps.rs).
pub static LOCK: SpinLock = SpinLock::new();

/// Set by every FAIL line (ring 0's exception report too): from then on the guest makes no more
/// progress and never powers off, so the failure stays visible.
pub static FAILED: AtomicBool = AtomicBool::new(false);

pub fn failed() -> bool {
    FAILED.load(Ordering::Relaxed)
}

const CAP: usize = 2048;

/// A line that starts with `testguest: `.
pub struct Line {
    buf: [u8; CAP],
    len: usize,
}

impl Line {
    pub fn new() -> Self {
        let mut l = Line { buf: [0; CAP], len: 0 };
        l.s("testguest: ");
        l
    }

    /// Appends text (silently truncated at the buffer's end).
    pub fn s(&mut self, text: &str) -> &mut Self {
        self.bytes(text.as_bytes())
    }

    pub fn bytes(&mut self, text: &[u8]) -> &mut Self {
        for &b in text {
            if self.len < CAP - 1 {
                self.buf[self.len] = b;
                self.len += 1;
            }
        }
        self
    }

    /// Appends a number in decimal.
    pub fn u(&mut self, mut v: u64) -> &mut Self {
        let mut digits = [0u8; 20];
        let mut n = 0;
        loop {
            digits[19 - n] = b'0' + (v % 10) as u8;
            n += 1;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.bytes(&digits[20 - n..])
    }

    /// Appends a number as `0x` and hex digits.
    pub fn x(&mut self, v: u64) -> &mut Self {
        self.s("0x");
        let mut shift = 60;
        while shift > 0 && (v >> shift) & 15 == 0 {
            shift -= 4;
        }
        loop {
            let d = ((v >> shift) & 15) as u8;
            self.bytes(&[if d < 10 { b'0' + d } else { b'a' + d - 10 }]);
            if shift == 0 {
                break self;
            }
            shift -= 4;
        }
    }

    /// Appends bytes as two hex digits each, joined by `sep` (a MAC address with ':').
    pub fn hex_bytes(&mut self, v: &[u8], sep: &str) -> &mut Self {
        for (i, &b) in v.iter().enumerate() {
            if i > 0 {
                self.s(sep);
            }
            let digit = |d: u8| if d < 10 { b'0' + d } else { b'a' + d - 10 };
            self.bytes(&[digit(b >> 4), digit(b & 15)]);
        }
        self
    }

    /// Appends an IPv4 address in dotted decimal.
    pub fn ipv4(&mut self, ip: [u8; 4]) -> &mut Self {
        for (i, &b) in ip.iter().enumerate() {
            if i > 0 {
                self.s(".");
            }
            self.u(b as u64);
        }
        self
    }

    /// Writes the line and a newline.
    pub fn print(&mut self) {
        self.buf[self.len] = b'\n';
        LOCK.lock();
        sys::write(&self.buf[..self.len + 1]);
        LOCK.unlock();
    }

    /// Prints the line (a `FAIL ...` line), marks the guest failed and stops this CPU.
    pub fn fail(&mut self) -> ! {
        FAILED.store(true, Ordering::Relaxed);
        self.print();
        sys::halt()
    }
}

/// Prints `testguest: FAIL what=<what> <details>` and stops this CPU.
pub fn fail(what: &str, details: &str) -> ! {
    Line::new().s("FAIL what=").s(what).s(" ").s(details).fail()
}
