//! `vmm run` and `vmm resume`: build a machine, serve its control socket, run it until it ends.

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use vmm::api::{self, server};
use vmm::console::RawTerminal;
use vmm::persist::{self, ResumeOptions};
use vmm::{ExitReason, Machine, VmConfig};

use super::{CmdResult, Failure};
use crate::{ResumeArgs, RunArgs};

/// Default command line for Linux kernels: console on COM1, reboot through the i8042 (which
/// ends vmm), no reboot loop after a panic.
const LINUX_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1";

/// Finds the directory of built guest images: `$VMM_IMAGES`, else `images/out` in the first
/// ancestor of the executable that has one (the workspace, for a binary under target/).
fn images_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("VMM_IMAGES") {
        return Some(PathBuf::from(dir));
    }
    let exe = std::env::current_exe().ok()?;
    exe.ancestors().skip(1).map(|a| a.join("images/out")).find(|p| p.is_dir())
}

/// True when /dev/kvm is KVM without hardware virtualization (PVM).
fn host_is_pvm() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

fn check_name(name: &str) -> Result<(), Failure> {
    if api::valid_name(name) {
        Ok(())
    } else {
        Err(Failure::bad_input(format!(
            "invalid VM name '{name}': use up to 64 letters, digits, '.', '_' or '-', not starting with '.'"
        )))
    }
}

pub fn run(args: RunArgs) -> CmdResult {
    let vcpus = u8::try_from(args.vcpus).map_err(|_| {
        Failure::bad_input(format!("--vcpus {} is more than this host allows (254: xAPIC limit)", args.vcpus))
    })?;
    let (kernel, default_cmdline) = match args.kernel {
        Some(k) => (k, LINUX_CMDLINE),
        None => {
            let dir = images_dir().ok_or_else(|| {
                Failure::bad_input("no --kernel given and no test guest found: run images/build.sh, or set VMM_IMAGES")
            })?;
            (dir.join("testguest.elf"), "")
        }
    };
    let name = args.name.unwrap_or_else(|| format!("vm-{}", std::process::id()));
    check_name(&name)?;
    let config = VmConfig {
        name,
        kernel,
        initrd: args.initrd,
        cmdline: args.cmdline.unwrap_or_else(|| default_cmdline.to_string()),
        mem_bytes: args.mem,
        vcpus,
        disks: args.disks,
    };
    let socket = args.api_sock.unwrap_or_else(|| api::socket_path(&config.name));
    let (listener, guard) = bind(&socket, &config.name)?;
    let machine = Machine::boot(config).map_err(|e| {
        if e.is_bad_input() {
            Failure::bad_input(e.to_string())
        } else {
            Failure::runtime(e.to_string())
        }
    })?;
    if host_is_pvm() {
        eprintln!(
            "vmm: note: this host's KVM is PVM (no hardware virtualization): guest kernel code runs emulated, \
             and unmodified Linux kernels do not get far"
        );
    }
    serve(machine, listener, guard, false, None)
}

pub fn resume(args: ResumeArgs) -> CmdResult {
    if let Some(name) = &args.name {
        check_name(name)?;
    }
    let opts = ResumeOptions { name: args.name.clone(), verify: args.verify };
    // The name (and so the socket) may come from the snapshot: read its manifest first.
    let name = match &args.name {
        Some(n) => n.clone(),
        None => snapshot::Snapshot::open(&args.dir).map_err(|e| Failure::bad_input(e.to_string()))?.manifest.vm.name,
    };
    let socket = args.api_sock.unwrap_or_else(|| api::socket_path(&name));
    let (listener, guard) = bind(&socket, &name)?;
    let machine = persist::restore(&args.dir, &opts).map_err(|e| {
        if e.is_bad_input() {
            Failure::bad_input(e.to_string())
        } else {
            Failure::runtime(e.to_string())
        }
    })?;
    let prefault = args.prefault.then(|| machine.mem.clone());
    serve(machine, listener, guard, args.paused, prefault)
}

/// Claims the VM's name by binding its control socket, before any work; the guard removes the
/// socket on every way out.
fn bind(socket: &Path, name: &str) -> Result<(UnixListener, server::SocketGuard), Failure> {
    let listener = server::bind(socket, name).map_err(|e| match &e {
        server::ServerError::NameInUse(..) => Failure::bad_input(e.to_string()),
        server::ServerError::Socket { err, .. } if err.kind() == std::io::ErrorKind::AlreadyExists => {
            Failure::bad_input(e.to_string())
        }
        _ => Failure::runtime(e.to_string()),
    })?;
    Ok((listener, server::SocketGuard(socket.to_path_buf())))
}

/// Starts the VM and serves it until it ends; with `prefault`, memory from a snapshot is faulted
/// in the background once the vCPUs run.
fn serve(
    machine: Machine,
    listener: UnixListener,
    guard: server::SocketGuard,
    paused: bool,
    prefault: Option<vmm::vstate::memory::GuestMemory>,
) -> CmdResult {
    let running = machine.start(paused).map_err(|e| Failure::runtime(e.to_string()))?;
    if let Some(mem) = prefault {
        vmm::vstate::memory::spawn_prefault(mem).map_err(|e| Failure::runtime(e.to_string()))?;
    }
    // Printed once the vCPU threads run (or wait, paused): benchmarks time resume by this line.
    let state = if paused { "paused" } else { "running" };
    eprintln!("vmm: VM '{}' {state}; control socket {}", running.control.config.name, guard.0.display());
    server::spawn(listener, running.control.clone()).map_err(|e| Failure::runtime(e.to_string()))?;
    vmm::exit::spawn_signal_waiter(running.control.exit_sender()).map_err(|e| Failure::runtime(e.to_string()))?;
    let terminal = RawTerminal::enter();
    let reason = running.wait();
    // The guest's last lines (a panic, a power-off message) reach the terminal before vmm ends.
    running.control.devices.console.flush_for(std::time::Duration::from_secs(2));
    terminal.restore();
    guard.remove();
    match reason {
        ExitReason::Fatal(msg) => Err(Failure::runtime(msg)),
        ExitReason::Signal(sig) => {
            eprintln!("vmm: terminating on signal {sig}");
            Ok(0)
        }
        other => Ok(other.exit_code() as u8),
    }
}
