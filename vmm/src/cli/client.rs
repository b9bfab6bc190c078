//! Client commands: talk to a running VM through its control socket.

use std::path::{Path, PathBuf};

use vmm::api::{self, client, protocol::ErrorKind, protocol::Reply, protocol::Request};

use super::{CmdResult, Failure};
use crate::VmTarget;

fn socket(target: &VmTarget) -> Result<PathBuf, Failure> {
    match (&target.api_sock, &target.name) {
        (Some(p), _) => Ok(p.clone()),
        (None, Some(name)) if api::valid_name(name) => Ok(api::socket_path(name)),
        (None, Some(name)) => Err(Failure::bad_input(format!("invalid VM name '{name}'"))),
        (None, None) => Err(Failure::bad_input("name a VM with --vm or --api-sock")),
    }
}

fn call(target: &VmTarget, request: &Request) -> Result<Reply, Failure> {
    let path = socket(target)?;
    let reply = client::request(&path, request).map_err(|e| match e {
        client::ClientError::NoVm(_) => Failure::bad_input(match &target.name {
            Some(name) => format!("no running VM named '{name}' ({} does not answer)", path.display()),
            None => e.to_string(),
        }),
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
        _ => Failure::runtime(message),
    })
}

/// Waits (a while) for the VM's process to end, so that what it held (disks, its name) is free
/// when the command returns.
fn wait_gone(pid: u32) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while alive(pid) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// Whether process `pid` still runs. A zombie, waiting for its parent to reap it, does not, once
/// all its threads are gone: the thread-group leader turns zombie first, while the others still
/// hold the process's files.
fn alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return false };
    // The state follows the command name, which is in parentheses.
    let state = stat.rfind(')').and_then(|i| stat[i + 1..].split_whitespace().next());
    if !matches!(state, Some("Z" | "X")) {
        return true;
    }
    std::fs::read_dir(format!("/proc/{pid}/task")).map(|d| d.count() > 1).unwrap_or(false)
}

pub fn simple(target: &VmTarget, request: Request) -> CmdResult {
    call(target, &request)?;
    Ok(0)
}

pub fn status(target: &VmTarget) -> CmdResult {
    let reply = call(target, &Request::Status)?;
    let s = reply.status.ok_or_else(|| Failure::runtime("reply has no status"))?;
    println!(
        "{} {} vcpus={} mem={}MiB pid={} console_dropped_bytes={}",
        s.name,
        s.state,
        s.vcpus,
        s.mem_bytes >> 20,
        s.pid,
        s.console_dropped_bytes
    );
    Ok(0)
}

pub fn snapshot(target: &VmTarget, out: &Path, force: bool, stop: bool) -> CmdResult {
    // The VM resolves paths from its own working directory: send an absolute one.
    let out = std::path::absolute(out).map_err(|e| Failure::bad_input(format!("bad --out {}: {e}", out.display())))?;
    let request = Request::Snapshot { out: out.display().to_string(), force, stop };
    let reply = call(target, &request)?;
    if let Some(r) = reply.snapshot {
        println!(
            "snapshot {}: paused {:.1} ms, durable after {:.1} ms, {} bytes on disk ({} MiB memory, {} zero pages)",
            r.path.display(),
            r.pause_ms,
            r.total_ms,
            r.bytes_on_disk,
            r.memory_bytes >> 20,
            r.zero_pages
        );
    }
    Ok(0)
}
