//! `vmm-memcheck [MIB_PER_THREAD [THREADS]]`: a userspace workload for the Linux guest tests.
//!
//! Each thread owns MIB_PER_THREAD MiB (default 16) and, pass after pass, checks that every word
//! still holds what the previous pass wrote, then writes the next pass's pattern. THREADS defaults
//! to the number of online CPUs. At most every 250 ms a thread prints
//! `memcheck: thread=T pass=N errors=E mono_ms=M`; a pattern error or a CLOCK_MONOTONIC that goes
//! back prints a line starting `memcheck: FAIL`. The pass counter and the patterns live in guest
//! memory, so a guest resumed from a snapshot visibly continues where it stopped.

use std::io::Write;
use std::time::Duration;

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec to a valid pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

/// The word at `index` after pass `pass` of thread `thread`.
fn pattern(thread: u64, pass: u64, index: u64) -> u64 {
    (thread << 56) ^ pass.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ index.wrapping_mul(0xD6E8_FEB8_6659_FD93)
}

fn say(line: &str) {
    // One write per line, so lines of different threads never interleave.
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(format!("{line}\n").as_bytes());
    let _ = out.flush();
}

fn run(thread: u64, words: usize) {
    let mut mem: Vec<u64> = (0..words as u64).map(|i| pattern(thread, 0, i)).collect();
    let mut last_ns = monotonic_ns();
    let mut last_print = 0u64;
    let mut errors = 0u64;
    for pass in 1u64.. {
        let mut bad = 0u64;
        for (i, word) in mem.iter_mut().enumerate() {
            if *word != pattern(thread, pass - 1, i as u64) {
                bad += 1;
            }
            *word = pattern(thread, pass, i as u64);
        }
        errors += bad;
        if bad != 0 {
            say(&format!("memcheck: FAIL thread={thread} pass={pass} errors={bad} (pattern of pass {})", pass - 1));
        }
        let now = monotonic_ns();
        if now < last_ns {
            say(&format!("memcheck: FAIL thread={thread} pass={pass} clock went back from {last_ns} ns to {now} ns"));
        }
        last_ns = now;
        if now.saturating_sub(last_print) >= 250_000_000 {
            last_print = now;
            say(&format!("memcheck: thread={thread} pass={pass} errors={errors} mono_ms={}", now / 1_000_000));
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let parse = |i: usize, default: u64| -> u64 {
        match args.get(i) {
            None => default,
            Some(a) => a.parse().unwrap_or_else(|_| {
                eprintln!("usage: vmm-memcheck [MIB_PER_THREAD [THREADS]] (bad number {a:?})");
                std::process::exit(2)
            }),
        }
    };
    let online = std::thread::available_parallelism().map_or(1, |n| n.get() as u64);
    let mib = parse(0, 16).max(1);
    let threads = parse(1, online).max(1);
    say(&format!("memcheck: start threads={threads} mib={mib}"));
    let words = (mib as usize) << 17; // 1 MiB = 2^17 words of 8 bytes
    let handles: Vec<_> = (0..threads).map(|t| std::thread::spawn(move || run(t, words))).collect();
    for h in handles {
        let _ = h.join();
    }
    // The threads never end; keep the process alive if they somehow do.
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}
