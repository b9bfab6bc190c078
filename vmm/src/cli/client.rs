//! Client commands: talk to a running VM through its control socket.

use std::io::IsTerminal;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

use vmm::api::{self, client, protocol::ErrorKind, protocol::Reply, protocol::Request};
use vmm::persist::Quiesce;

use super::{CmdResult, Failure};
use crate::{MigrateArgs, SnapshotArgs, TlsArgs, VmTarget};

fn socket(target: &VmTarget) -> Result<PathBuf, Failure> {
    match (&target.api_sock, &target.name) {
        (Some(p), _) => Ok(p.clone()),
        (None, Some(name)) if api::valid_name(name) => Ok(api::socket_path(name)),
        (None, Some(name)) => Err(Failure::bad_input(format!("invalid VM name '{name}'"))),
        (None, None) => Err(Failure::bad_input("name a VM with --vm or --api-sock")),
    }
}

fn call(target: &VmTarget, request: &Request) -> Result<Reply, Failure> {
    call_with_fd(target, request, None)
}

fn call_with_fd(target: &VmTarget, request: &Request, fd: Option<std::os::fd::RawFd>) -> Result<Reply, Failure> {
    let path = socket(target)?;
    let reply = client::request_with_fd(&path, request, fd).map_err(|e| match e {
        client::ClientError::NoVm(_) => Failure::bad_input(match &target.name {
            Some(name) => format!("no running VM named '{name}' ({} does not answer)", path.display()),
            None => e.to_string(),
        }),
        client::ClientError::NoReply(_) => {
            Failure::runtime(format!("the VM ended before it answered (killed, or it crashed): {}", path.display()))
        }
        other => Failure::runtime(other.to_string()),
    })?;
    if reply.ok {
        if let Some(pid) = reply.ending_pid {
            wait_gone(pid);
        }
        return Ok(reply);
    }
    let message = reply.error.unwrap_or_else(|| "request failed".into());
    Err(match reply.error_kind {
        Some(ErrorKind::Input) => Failure::bad_input(message),
        Some(ErrorKind::Cancelled) => Failure { code: super::EXIT_CANCELLED, message },
        _ => Failure::runtime(message),
    })
}

/// Waits (a while) for the VM's process to end, so that what it held (disks, its name) is free
/// when the command returns: through a pidfd, which becomes readable once every thread of the
/// process has exited.
fn wait_gone(pid: u32) {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    let Some(pid) = rustix::process::Pid::from_raw(pid as i32) else { return };
    let Ok(fd) = rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()) else { return };
    let mut fds = [PollFd::new(&fd, PollFlags::IN)];
    let _ = poll(&mut fds, Some(&Timespec { tv_sec: 30, tv_nsec: 0 }));
}

pub fn simple(target: &VmTarget, request: Request) -> CmdResult {
    call(target, &request)?;
    Ok(0)
}

pub fn status(target: &VmTarget) -> CmdResult {
    let reply = call(target, &Request::Status)?;
    let s = reply.status.ok_or_else(|| Failure::runtime("reply has no status"))?;
    let job = match &s.job {
        Some(j) => {
            format!(" {}={} {}/{}MiB", j.kind, j.phase.replace(' ', "-"), j.done_bytes >> 20, j.total_bytes >> 20)
        }
        None => String::new(),
    };
    let memory = match &s.memory {
        None => String::new(),
        Some(m) if m.independent => " memory=own".into(),
        Some(m) if m.lazy => format!(" memory=lazy-from:{}", m.snapshot),
        Some(m) => format!(" memory=loading:{}/{}MiB-from:{}", m.loaded_bytes >> 20, m.total_bytes >> 20, m.snapshot),
    };
    let checkpoints = match &s.checkpoints {
        None => String::new(),
        Some(c) => {
            let latest = match (&c.latest, c.age_ms) {
                (Some(name), Some(age)) => format!("{name},age={:.1}s", age as f64 / 1000.0),
                _ => "none-yet".into(),
            };
            let failing = c.failing.as_ref().map(|e| format!(",failing:{}", e.replace(' ', "-"))).unwrap_or_default();
            format!(" checkpoint={latest},every={:.1}s{failing}", c.interval_ms as f64 / 1000.0)
        }
    };
    println!(
        "{} {} vcpus={} mem={}MiB pid={} console_dropped_bytes={}{job}{memory}{checkpoints}",
        s.name,
        s.state,
        s.vcpus,
        s.mem_bytes >> 20,
        s.pid,
        s.console_dropped_bytes
    );
    Ok(0)
}

/// Shows the job's progress on stderr while `done` is not set (a terminal only).
fn show_progress(target: &VmTarget, done: &AtomicBool) {
    let bar = indicatif::ProgressBar::new(0).with_style(
        indicatif::ProgressStyle::with_template("{msg:>16} [{bar:30}] {bytes}/{total_bytes} ({bytes_per_sec})")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    while !done.load(Ordering::Relaxed) {
        if let Ok(Some(job)) = call(target, &Request::Status).map(|r| r.status.and_then(|s| s.job)) {
            if job.total_bytes == 0 {
                continue;
            }
            bar.set_length(job.total_bytes);
            bar.set_position(job.done_bytes);
            bar.set_message(job.phase);
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    bar.finish_and_clear();
}

/// On SIGINT (or SIGTERM, SIGHUP), asks the VM to cancel the snapshot.
fn cancel_on_signal(target: &VmTarget, what: &'static str) -> std::io::Result<()> {
    let target = VmTarget { name: target.name.clone(), api_sock: target.api_sock.clone() };
    std::thread::Builder::new().name("signals".into()).spawn(move || {
        if vmm::exit::wait_termination_signal().is_some() {
            eprintln!("vmm: cancelling the {what}");
            let _ = call(&target, &Request::Cancel);
        }
    })?;
    Ok(())
}

/// The TLS files as absolute paths (the VM resolves paths from its own working directory).
pub fn tls_paths(tls: &TlsArgs) -> Result<Option<vmm::api::protocol::TlsPaths>, Failure> {
    let (Some(cert), Some(key), Some(ca)) = (&tls.tls_cert, &tls.tls_key, &tls.tls_ca) else { return Ok(None) };
    let absolute = |p: &PathBuf| -> Result<String, Failure> {
        if !p.is_file() {
            return Err(Failure::bad_input(format!("{} is not a readable file", p.display())));
        }
        std::path::absolute(p)
            .map(|p| p.display().to_string())
            .map_err(|e| Failure::bad_input(format!("bad path {}: {e}", p.display())))
    };
    Ok(Some(vmm::api::protocol::TlsPaths { cert: absolute(cert)?, key: absolute(key)?, ca: absolute(ca)? }))
}

pub fn migrate(args: &MigrateArgs) -> CmdResult {
    if args.cancel {
        return simple(&args.target, Request::Cancel);
    }
    let to = args.to.clone().unwrap_or_default();
    let endpoint: vmm::migration::transport::Endpoint = to.parse().map_err(|e: String| Failure::bad_input(e))?;
    let tls = tls_paths(&args.tls)?;
    // The VM checks the rest (TLS or --insecure for tcp:, nothing for unix:).
    drop(endpoint);
    let request = Request::Migrate {
        to,
        tls,
        insecure: args.tls.insecure,
        max_downtime_ms: args.max_downtime.as_millis() as u64,
        bandwidth: args.bandwidth,
        max_rounds: args.max_rounds,
        over_budget: if args.over_budget == "abandon" {
            vmm::migration::OverBudget::Abandon
        } else {
            vmm::migration::OverBudget::Complete
        },
        compress: args.compress,
        timeout_ms: (args.timeout.as_millis() as u64).max(1),
        copy_disks: args.copy_disks,
        connections: args.connections,
    };
    cancel_on_signal(&args.target, "migration").map_err(|e| Failure::runtime(format!("cannot start threads: {e}")))?;
    let done = AtomicBool::new(false);
    let reply = std::thread::scope(|scope| {
        if !args.quiet && std::io::stderr().is_terminal() {
            scope.spawn(|| show_progress(&args.target, &done));
        }
        let reply = call(&args.target, &request);
        done.store(true, Ordering::Relaxed);
        reply
    })?;
    if let Some(r) = reply.migration {
        let throttle =
            if r.throttle_percent > 0 { format!(", throttled up to {}%", r.throttle_percent) } else { String::new() };
        let budget_ms = args.max_downtime.as_secs_f64() * 1000.0;
        let over = match (r.downtime_ms > budget_ms, r.over_budget) {
            (true, true) => format!(" (over the {budget_ms:.0} ms budget: the rounds ran out first)"),
            (true, false) => format!(" (over the {budget_ms:.0} ms budget)"),
            (false, true) => " (the rounds ran out first)".to_string(),
            (false, false) => String::new(),
        };
        println!(
            "migrated to {} in {:.1} ms: downtime {:.1} ms{over}, {} bytes sent ({} MiB memory, {}{} KiB while paused), {} round{} after the first pass{throttle}{}{}",
            r.to,
            r.total_ms,
            r.downtime_ms,
            r.bytes,
            r.memory_bytes >> 20,
            if r.disk_bytes > 0 { format!("{} MiB disk, ", r.disk_bytes >> 20) } else { String::new() },
            r.paused_bytes >> 10,
            r.rounds,
            if r.rounds == 1 { "" } else { "s" },
            if r.tls { ", TLS" } else { "" },
            if r.connections > 1 { format!(", {} connections", r.connections) } else { String::new() }
        );
    }
    Ok(0)
}

/// Whether stdout is /dev/null (Rust's runtime also opens it there when the shell closed it).
fn stdout_is_null() -> bool {
    use std::os::unix::fs::MetadataExt;
    let (Ok(out), Ok(null)) = (rustix::fs::fstat(std::io::stdout()), std::fs::metadata("/dev/null")) else {
        return false;
    };
    rustix::fs::FileType::from_raw_mode(out.st_mode) == rustix::fs::FileType::CharacterDevice
        && out.st_rdev == null.rdev()
}

pub fn snapshot(args: &SnapshotArgs) -> CmdResult {
    let stream = args.out.as_os_str() == "-";
    if stream && std::io::stdout().is_terminal() {
        return Err(Failure::bad_input("--out - writes a binary snapshot stream: send stdout to a file or a pipe"));
    }
    if stream && stdout_is_null() {
        return Err(Failure::bad_input(
            "--out - would write the snapshot stream to /dev/null (or a closed stdout): it would be lost",
        ));
    }
    if stream && args.force {
        return Err(Failure::bad_input("--force replaces a snapshot directory; it means nothing with --out -"));
    }
    if args.diff && stream {
        return Err(Failure::bad_input("--diff writes a snapshot directory, not a stream: give --out DIR"));
    }
    if args.live && stream {
        return Err(Failure::bad_input("--live writes a snapshot directory, not a stream: give --out DIR"));
    }
    if args.live && args.stop {
        return Err(Failure::bad_input(
            "--live keeps the guest running while memory is copied; --stop ends it: use one",
        ));
    }
    if args.compress && !stream {
        return Err(Failure::bad_input("--compress applies to snapshot streams (--out -)"));
    }
    let out = if stream {
        "-".to_string()
    } else {
        // The VM resolves paths from its own working directory: send an absolute one.
        let out = std::path::absolute(&args.out)
            .map_err(|e| Failure::bad_input(format!("bad --out {}: {e}", args.out.display())))?;
        super::check_out_parent(&out)?;
        out.display().to_string()
    };
    let quiesce = match (args.no_quiesce, args.require_agent) {
        (true, _) => Quiesce::Skip,
        (false, true) => Quiesce::Require,
        (false, false) => Quiesce::Auto,
    };
    let request = Request::Snapshot {
        out,
        force: args.force,
        stop: args.stop,
        compress: args.compress,
        quiesce,
        quiesce_timeout_ms: Some(args.quiesce_timeout * 1000),
        diff: args.diff,
        live: args.live,
        parent: match &args.parent {
            Some(p) => Some(
                std::path::absolute(p)
                    .map_err(|e| Failure::bad_input(format!("bad --parent {}: {e}", p.display())))?
                    .display()
                    .to_string(),
            ),
            None => None,
        },
    };
    cancel_on_signal(&args.target, "snapshot").map_err(|e| Failure::runtime(format!("cannot start threads: {e}")))?;
    let done = AtomicBool::new(false);
    let reply = std::thread::scope(|scope| {
        if !args.quiet && std::io::stderr().is_terminal() {
            scope.spawn(|| show_progress(&args.target, &done));
        }
        let fd = stream.then(|| std::io::stdout().as_raw_fd());
        let reply = call_with_fd(&args.target, &request, fd);
        done.store(true, Ordering::Relaxed);
        reply
    })?;
    if let Some(r) = reply.snapshot {
        for w in &r.warnings {
            eprintln!("vmm: warning: {w}");
        }
        let what = if stream { "stream".to_string() } else { format!("snapshot {}", args.out.display()) };
        let id = r.id.map(|id| format!(" id {id}")).unwrap_or_default();
        let id = match &r.parent {
            Some(parent) => format!("{id} (a diff of {parent})"),
            None => id,
        };
        let size = if stream { "bytes through the stream" } else { "bytes on disk" };
        // stdout is the stream itself with --out -: the report goes to stderr then.
        let live = match &r.live {
            Some(l) => format!(
                "live ({} MiB copied running, {} round{} more, {} KiB while paused), ",
                l.precopy_bytes >> 20,
                l.rounds,
                if l.rounds == 1 { "" } else { "s" },
                l.paused_bytes >> 10
            ),
            None => String::new(),
        };
        let line = format!(
            "{what}{id}: {live}{}paused {:.1} ms, {} after {:.1} ms, {} {size} ({} MiB memory, {} zero pages)",
            if r.quiesced { "quiesced, " } else { "" },
            r.pause_ms,
            if stream { "complete" } else { "durable" },
            r.total_ms,
            r.bytes,
            r.memory_bytes >> 20,
            r.zero_pages
        );
        if stream {
            eprintln!("{line}");
        } else {
            println!("{line}");
        }
    }
    Ok(0)
}
