//! The guest console on the VMM's terminal: raw mode while the VM runs, stdin into COM1, and the
//! QEMU-style escape `Ctrl-A x` to quit.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::devices::bus::lock;
use crate::devices::legacy::SerialDevice;
use crate::exit::{ExitReason, ExitSender};

const CTRL_A: u8 = 0x01;

/// Puts stdin's terminal in raw mode and restores it when dropped or on `restore`.
pub struct RawTerminal {
    raw: bool,
}

impl RawTerminal {
    /// Raw mode (no line editing, echo or signal keys: Ctrl-C goes to the guest) if stdin is a
    /// terminal; a no-op otherwise (CI, pipes). Output processing is kept, so the host terminal
    /// still turns \n into \r\n.
    pub fn enter() -> Self {
        use std::io::IsTerminal;
        use vmm_sys_util::terminal::Terminal;
        let raw = std::io::stdin().is_terminal() && StdinFd.set_raw_mode().is_ok();
        Self { raw }
    }

    pub fn restore(&self) {
        use vmm_sys_util::terminal::Terminal;
        if self.raw {
            let _ = StdinFd.set_canon_mode();
        }
    }
}

/// Standard input by its descriptor: the console's reader thread holds `std::io::stdin()`'s
/// lock for as long as it runs, so the terminal's mode is set through the descriptor itself.
struct StdinFd;

// SAFETY: descriptor 0 stays open for the life of the process.
unsafe impl vmm_sys_util::terminal::Terminal for StdinFd {
    fn tty_fd(&self) -> std::os::fd::RawFd {
        libc::STDIN_FILENO
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

/// Bytes of guest console output held for a slow reader before new ones are dropped.
pub const OUTPUT_BUFFER_BYTES: usize = 1 << 20;

/// The guest's console output on its way to stdout: a bounded buffer that a console thread
/// drains. A vCPU writing to the UART never waits on the host's terminal or pipe: when nobody
/// reads and the buffer is full, bytes are dropped and counted (`ConsoleOutput::dropped_bytes`).
#[derive(Clone)]
pub struct ConsoleOutput {
    shared: Arc<OutputShared>,
}

struct OutputShared {
    buffer: Mutex<VecDeque<u8>>,
    /// Signalled when bytes arrive (for the drainer) and when the buffer empties (for `flush`).
    changed: Condvar,
    /// True while the drainer holds bytes it took out of the buffer but has not written yet.
    writing: Mutex<bool>,
    capacity: usize,
    dropped: AtomicU64,
}

impl ConsoleOutput {
    /// Starts the thread that copies the buffer into `sink` (stdout, normally).
    pub fn spawn(sink: impl Write + Send + 'static, capacity: usize) -> std::io::Result<Self> {
        let shared = Arc::new(OutputShared {
            buffer: Mutex::new(VecDeque::new()),
            changed: Condvar::new(),
            writing: Mutex::new(false),
            capacity,
            dropped: AtomicU64::new(0),
        });
        let drain = shared.clone();
        std::thread::Builder::new().name("console-out".into()).spawn(move || drain.run(sink))?;
        Ok(Self { shared })
    }

    /// Bytes the guest wrote that nobody read in time, since the VM started.
    pub fn dropped_bytes(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    /// Waits up to `timeout` for the buffered output to reach the sink (at the VM's end, so its
    /// last lines are not lost). Returns false if it did not.
    pub fn flush_for(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut buffer = lock_unpoisoned(&self.shared.buffer);
        loop {
            if buffer.is_empty() && !*lock_unpoisoned(&self.shared.writing) {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            // Short waits: the drainer signals an empty buffer before its write completes.
            let wait = left.min(Duration::from_millis(10));
            buffer =
                self.shared.changed.wait_timeout(buffer, wait).map(|(b, _)| b).unwrap_or_else(|e| e.into_inner().0);
        }
    }
}

fn lock_unpoisoned<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl OutputShared {
    fn run(&self, mut sink: impl Write) {
        let mut failed = false;
        let mut chunk = Vec::new();
        loop {
            {
                let mut buffer = lock_unpoisoned(&self.buffer);
                while buffer.is_empty() {
                    buffer = self.changed.wait(buffer).unwrap_or_else(|e| e.into_inner());
                }
                chunk.clear();
                chunk.extend(buffer.drain(..));
                *lock_unpoisoned(&self.writing) = true;
                self.changed.notify_all();
            }
            if !failed {
                if let Err(e) = sink.write_all(&chunk).and_then(|()| sink.flush()) {
                    // Once: a closed stdout would otherwise be reported for every line.
                    tracing::warn!("console output failed (further output is dropped): {e}");
                    failed = true;
                }
            }
            if failed {
                self.dropped.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            }
            *lock_unpoisoned(&self.writing) = false;
            self.changed.notify_all();
        }
    }
}

impl Write for ConsoleOutput {
    /// Never blocks on the reader and never fails: what does not fit is dropped and counted.
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let mut buffer = lock_unpoisoned(&self.shared.buffer);
        let was_empty = buffer.is_empty();
        let room = self.shared.capacity.saturating_sub(buffer.len()).min(data.len());
        buffer.extend(&data[..room]);
        if room < data.len() {
            self.shared.dropped.fetch_add((data.len() - room) as u64, Ordering::Relaxed);
        }
        // The drainer only sleeps on an empty buffer: wake it on that transition alone, not for
        // every byte a vCPU writes to the UART (each wake is a futex call).
        if was_empty && room > 0 {
            self.shared.changed.notify_all();
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
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

    /// A sink that blocks until released, as a pipe nobody reads.
    struct Blocked(Arc<(Mutex<bool>, Condvar)>, Arc<Mutex<Vec<u8>>>);

    impl Write for Blocked {
        fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
            let (open, cv) = &*self.0;
            let mut g = open.lock().unwrap();
            while !*g {
                g = cv.wait(g).unwrap();
            }
            self.1.lock().unwrap().extend_from_slice(data);
            Ok(data.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stalled_reader_never_blocks_the_writer_and_drops_are_counted() {
        let gate = Arc::new((Mutex::new(false), Condvar::new()));
        let got = Arc::new(Mutex::new(Vec::new()));
        let mut out = ConsoleOutput::spawn(Blocked(gate.clone(), got.clone()), 16).unwrap();
        let start = Instant::now();
        for _ in 0..1000 {
            assert_eq!(out.write(b"0123456789").unwrap(), 10);
        }
        assert!(start.elapsed() < Duration::from_secs(1), "writes waited on the reader");
        // At most the buffer plus one chunk in the drainer's hands got through.
        assert!(out.dropped_bytes() >= 10_000 - 32, "dropped {}", out.dropped_bytes());
        assert!(!out.flush_for(Duration::from_millis(50)));
        *gate.0.lock().unwrap() = true;
        gate.1.notify_all();
        assert!(out.flush_for(Duration::from_secs(5)));
        assert_eq!(got.lock().unwrap().len() as u64 + out.dropped_bytes(), 10_000);
    }

    #[test]
    fn output_arrives_in_order() {
        let gate = Arc::new((Mutex::new(true), Condvar::new()));
        let got = Arc::new(Mutex::new(Vec::new()));
        let mut out = ConsoleOutput::spawn(Blocked(gate, got.clone()), OUTPUT_BUFFER_BYTES).unwrap();
        for i in 0..1000u32 {
            out.write_all(format!("{i}\n").as_bytes()).unwrap();
        }
        assert!(out.flush_for(Duration::from_secs(5)));
        let text = String::from_utf8(got.lock().unwrap().clone()).unwrap();
        assert_eq!(text.lines().count(), 1000);
        assert_eq!(text.lines().last(), Some("999"));
        assert_eq!(out.dropped_bytes(), 0);
    }

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
