//! `vmm-tcpcheck HOST:PORT`: a TCP stream the Linux guest tests keep open across snapshots. It
//! sends a counter (u64, big-endian) and expects the host to echo it, forever; every 200 round
//! trips it prints `vmm-guest: tcp n=N`. A byte lost, repeated or reordered prints
//! `vmm-guest: tcp FAIL ...` and exits 1: TCP must carry the stream through a snapshot, a kill and
//! a resume with no error.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::ExitCode;

fn main() -> ExitCode {
    let Some(addr) = std::env::args().nth(1) else {
        eprintln!("usage: vmm-tcpcheck HOST:PORT");
        return ExitCode::from(2);
    };
    let mut stream = match TcpStream::connect(&addr) {
        Ok(s) => s,
        Err(e) => {
            println!("vmm-guest: tcp FAIL connect {addr}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let _ = stream.set_nodelay(true);
    println!("vmm-guest: tcp connected to {addr}");
    let mut n: u64 = 0;
    loop {
        n += 1;
        let mut back = [0u8; 8];
        if let Err(e) = stream.write_all(&n.to_be_bytes()).and_then(|()| stream.read_exact(&mut back)) {
            println!("vmm-guest: tcp FAIL at n={n}: {e}");
            return ExitCode::FAILURE;
        }
        let got = u64::from_be_bytes(back);
        if got != n {
            println!("vmm-guest: tcp FAIL at n={n}: echoed {got}");
            return ExitCode::FAILURE;
        }
        if n.is_multiple_of(200) {
            println!("vmm-guest: tcp n={n}");
        }
    }
}
