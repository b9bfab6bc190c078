//! `vmm-guest-agent`: the agent that runs inside a Linux guest (started by the image's `/init`).
//!
//! It serves vmm's requests (the `agent-protocol` crate) on vsock port 52: quiesce (run the
//! pre-freeze hooks, sync, FIFREEZE every writable file system), thaw (FITHAW, then the hooks
//! again), set-time, add-entropy and exec (service.rs). For tests the same service runs on a
//! Unix socket, restricted to the file systems named with `--only`.
//!
//! usage:
//!   vmm-guest-agent [listen] [--vsock PORT | --unix PATH] [--hooks DIR] [--only MOUNTPOINT]...
//!   vmm-guest-agent ping | freeze | thaw     one-shot, from a shell
//!   vmm-guest-agent serve [DEVICE]           one command a line (ping, freeze, thaw, quit) on
//!                                            DEVICE (a console; stdin/stdout if absent)
//!
//! Only `std`, `libc` and the protocol crate; built as a static binary for the initramfs.

mod fs;
mod hooks;
mod service;

use std::fs::OpenOptions;
use std::io::{self, BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::ExitCode;

/// Runs one command; returns the single reply line for `serve`.
fn reply(cmd: &str) -> String {
    let summary = |verb: &str, names: Vec<String>| {
        let mut s = format!("ok {verb} {}", names.len());
        for n in names {
            s.push(' ');
            s.push_str(&n);
        }
        s
    };
    match cmd {
        "ping" => "ok pong".to_string(),
        "freeze" => match fs::freeze(&[]) {
            Ok((_, names)) => summary("frozen", names),
            Err(e) => format!("err {e}"),
        },
        "thaw" => match fs::thaw(&[]) {
            Ok((_, names)) => summary("thawed", names),
            Err(e) => format!("err {e}"),
        },
        other => format!("err unknown command {other:?} (ping, freeze, thaw, quit)"),
    }
}

fn serve(device: Option<&str>) -> io::Result<()> {
    let (input, mut output): (Box<dyn BufRead>, Box<dyn Write>) = match device {
        Some(path) => {
            let port = OpenOptions::new().read(true).write(true).open(path)?;
            let writer = port.try_clone()?;
            (Box::new(BufReader::new(port)), Box::new(writer))
        }
        None => (Box::new(io::stdin().lock()), Box::new(io::stdout())),
    };
    for line in input.lines() {
        let line = line?;
        let cmd = line.trim();
        if cmd.is_empty() {
            continue;
        }
        if cmd == "quit" {
            writeln!(output, "ok bye")?;
            output.flush()?;
            break;
        }
        writeln!(output, "{}", reply(cmd))?;
        output.flush()?;
    }
    Ok(())
}

fn one_shot(result: Result<(Vec<String>, Vec<String>), String>, verb: &str) -> ExitCode {
    match result {
        Ok((report, names)) => {
            for line in report {
                println!("{line}");
            }
            println!("{verb} {} filesystem(s)", names.len());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("vmm-guest-agent: {e}");
            ExitCode::FAILURE
        }
    }
}

const USAGE: &str =
    "usage: vmm-guest-agent [listen] [--vsock PORT | --unix PATH] [--hooks DIR] [--only MOUNTPOINT]... \
                     | ping | freeze | thaw | serve [DEVICE]";

/// `listen`'s arguments.
fn parse_listen(args: &[&str]) -> Result<service::Config, String> {
    let mut cfg = service::Config::default();
    let mut it = args.iter();
    while let Some(&arg) = it.next() {
        let mut value = || it.next().copied().ok_or_else(|| format!("{arg} needs a value"));
        match arg {
            "--vsock" => {
                let port = value()?;
                cfg.transport =
                    service::Transport::Vsock(port.parse().map_err(|_| format!("bad --vsock port {port:?}"))?);
            }
            "--unix" => cfg.transport = service::Transport::Unix(PathBuf::from(value()?)),
            "--hooks" => cfg.hooks = PathBuf::from(value()?),
            "--only" => cfg.only.push(value()?.to_string()),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(cfg)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match args.as_slice() {
        ["ping"] => {
            println!("pong");
            ExitCode::SUCCESS
        }
        ["freeze"] => one_shot(fs::freeze(&[]), "froze"),
        ["thaw"] => one_shot(fs::thaw(&[]), "thawed"),
        ["serve"] | ["serve", _] => match serve(args.get(1).copied()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("vmm-guest-agent: serve: {e}");
                ExitCode::FAILURE
            }
        },
        ["-h" | "--help" | "help"] => {
            println!("{USAGE}");
            ExitCode::SUCCESS
        }
        rest => {
            let rest = rest.strip_prefix(&["listen"]).unwrap_or(rest);
            match parse_listen(rest) {
                Ok(cfg) => match service::run(cfg) {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => {
                        eprintln!("vmm-guest-agent: {e}");
                        ExitCode::FAILURE
                    }
                },
                Err(e) => {
                    eprintln!("vmm-guest-agent: {e}\n{USAGE}");
                    ExitCode::from(2)
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ping_reply() {
        assert_eq!(reply("ping"), "ok pong");
        assert!(reply("bogus").starts_with("err "));
    }

    #[test]
    fn listen_arguments() {
        let cfg = parse_listen(&["--unix", "/tmp/a.sock", "--only", "/mnt", "--hooks", "/h"]).unwrap();
        assert_eq!(cfg.transport, service::Transport::Unix("/tmp/a.sock".into()));
        assert_eq!(cfg.only, ["/mnt"]);
        assert_eq!(cfg.hooks, PathBuf::from("/h"));
        assert_eq!(parse_listen(&[]).unwrap().transport, service::Transport::Vsock(agent_protocol::AGENT_PORT));
        assert!(parse_listen(&["--vsock", "x"]).is_err());
        assert!(parse_listen(&["--bogus"]).is_err());
        assert!(parse_listen(&["--unix"]).is_err());
    }
}
