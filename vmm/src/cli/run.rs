//! `vmm run` and `vmm resume`: build a machine, serve its control socket, run it until it ends.

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use std::io::IsTerminal;
use vmm::api::{self, server};
use vmm::config::NetArg;
use vmm::console::RawTerminal;

use std::sync::Arc;
use vmm::persist::{self, ResumeOptions, ResumeSource};
use vmm::{ExitReason, Machine, VmConfig};

use super::{CmdResult, Failure};
use crate::{CheckpointArgs, ReceiveArgs, ResumeArgs, RunArgs};
use snapshot::migration::Message;
use vmm::checkpoint::{self, CheckpointConfig, Interval};
use vmm::migration::receiver;
use vmm::migration::transport::{Connection, Endpoint, Listener, Security, TlsFiles, TransportError};

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
    let checkpoint = checkpoint_config(&args.checkpoint, None)?;
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
        nets: args.nets.into_iter().map(NetArg::into_config).collect(),
        vsock: args.vsock,
    };
    vmm::config::check_nets(&config.nets).map_err(|e| Failure::bad_input(e.to_string()))?;
    let socket = args.api_sock.unwrap_or_else(|| api::socket_path(&config.name));
    check_vsock_path(config.vsock.as_ref(), &socket)?;
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
    let launch =
        Launch { paused: false, checkpoint, memory: None, stdin_input: true, refresh_agent: None, diff_base: None };
    serve(machine, listener, guard, launch)
}

fn persist_failure(e: persist::PersistError) -> Failure {
    if e.is_bad_input() {
        Failure::bad_input(e.to_string())
    } else {
        Failure::runtime(e.to_string())
    }
}

pub fn resume(args: ResumeArgs) -> CmdResult {
    let checkpoint = checkpoint_config(&args.checkpoint, Some(&args.dir))?;
    if let Some(name) = &args.name {
        check_name(name)?;
    }
    let opts = ResumeOptions {
        name: args.name.clone(),
        verify: args.verify,
        lazy: args.lazy,
        disk_changed_ok: args.disk_changed_ok,
        nets: args.nets.clone(),
        vsock: args.vsock.clone(),
        disks: args.disks.clone(),
    };
    let from_stream = args.dir.as_os_str() == "-";
    if from_stream && args.lazy {
        return Err(Failure::bad_input(
            "--lazy is for a snapshot directory: a stream's memory is read whole before the VM runs",
        ));
    }
    let source = if from_stream {
        if std::io::stdin().is_terminal() {
            return Err(Failure::bad_input("vmm resume - reads a snapshot stream from stdin: pipe one in"));
        }
        persist::sink::grow_pipe(&std::io::stdin());
        ResumeSource::Stream(Box::new(std::io::stdin()))
    } else {
        if args.dir.is_file() {
            return Err(Failure::bad_input(format!(
                "{} is a file, not a snapshot directory (a snapshot stream is resumed with `vmm resume - < FILE`)",
                args.dir.display()
            )));
        }
        if !args.dir.join("manifest").exists() && args.dir.join(checkpoint::LATEST).exists() {
            return Err(Failure::bad_input(format!(
                "{} is a checkpoint directory: resume its newest checkpoint, {}",
                args.dir.display(),
                args.dir.join(checkpoint::LATEST).display()
            )));
        }
        ResumeSource::Dir(args.dir.clone())
    };
    // The VM's name (and so its socket) may come from the snapshot: it is claimed as soon as the
    // snapshot says it, before memory is read.
    let claim = |config: &VmConfig| {
        let name = config.name.as_str();
        let socket = args.api_sock.clone().unwrap_or_else(|| api::socket_path(name));
        check_vsock_path(args.vsock.as_ref(), &socket)
            .map_err(|f| persist::PersistError::Claim { message: f.message, bad_input: true })?;
        bind(&socket, name).map_err(|f| persist::PersistError::Claim {
            message: f.message,
            bad_input: f.code == super::EXIT_BAD_INPUT,
        })
    };
    let (restored, (listener, guard)) =
        persist::restore(source, &opts, claim, || Ok(()), || {}).map_err(persist_failure)?;
    if let Some(why) = restored.memory.as_ref().and_then(|m| m.read_whole.as_ref()) {
        eprintln!("vmm: memory was read whole before the VM ran: no userfaultfd ({why})");
    }

    let refresh_agent = restored.machine.config.vsock.as_ref().map(|v| v.uds.clone());
    let launch = Launch {
        paused: args.paused,
        checkpoint,
        memory: restored.memory,
        stdin_input: !from_stream,
        refresh_agent,
        diff_base: restored.diff_base,
    };
    serve(restored.machine, listener, guard, launch)
}

/// A migration connection shared by the restore path, which reads the stream from it, and the
/// hand-over, which answers the source on it between reads.
#[derive(Clone)]
struct SharedConnection(Arc<std::sync::Mutex<Connection>>, std::time::Duration);

impl SharedConnection {
    fn send(&self, message: &Message) -> std::io::Result<()> {
        message.send(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn receive(&self) -> Result<Message, snapshot::migration::MessageError> {
        Message::receive(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl std::io::Read for SharedConnection {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self.0.lock().unwrap_or_else(|e| e.into_inner()).read(buf) {
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("the source sent nothing for {}", humantime::format_duration(self.1)),
                ))
            }
            other => other,
        }
    }
}

/// The security of a listening or connecting side, from its arguments.
fn security_of(tls: &crate::TlsArgs) -> Option<Security> {
    match (&tls.tls_cert, &tls.tls_key, &tls.tls_ca) {
        (Some(cert), Some(key), Some(ca)) => {
            Some(Security::Tls(TlsFiles { cert: cert.clone(), key: key.clone(), ca: ca.clone() }))
        }
        _ if tls.insecure => Some(Security::Insecure),
        _ => None,
    }
}

/// `vmm receive`: waits for one migrated VM, takes it over from its source, and runs it.
pub fn receive(args: ReceiveArgs) -> CmdResult {
    // Checkpoints go on at the destination: their directory is checked and locked before
    // anything is received.
    let checkpoint = checkpoint_config(&args.checkpoint, None)?;
    if let Some(name) = &args.name {
        check_name(name)?;
    }
    let endpoint: Endpoint = args.listen.parse().map_err(|e: String| Failure::bad_input(format!("--listen: {e}")))?;
    // A TAP that is not there is the user's to fix now, not after the whole VM came (whether it
    // is free is known only then: on one host, the source holds it until the hand-over).
    for net in &args.nets {
        vmm::devices::virtio::net::tap::check_exists(&net.tap)
            .map_err(|e| Failure::bad_input(format!("--net: {e}")))?;
    }
    vmm::config::check_distinct_taps(args.nets.iter().map(|n| n.tap.as_str()))
        .map_err(|e| Failure::bad_input(e.to_string()))?;
    // A disk file may be created (with --copy-disks at the source), never its directory.
    for disk in &args.disks {
        let parent = disk.path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        if !disk.path.exists() && !parent.is_dir() {
            return Err(Failure::bad_input(format!(
                "--disk {}: there is no directory {}",
                disk.path.display(),
                parent.display()
            )));
        }
    }
    let security = security_of(&args.tls);
    let transport_failure = |e: TransportError| {
        if e.is_bad_input() {
            Failure::bad_input(e.to_string())
        } else {
            Failure::runtime(e.to_string())
        }
    };
    let listener = Listener::bind(&endpoint, security.as_ref()).map_err(transport_failure)?;
    let shown = match listener.local_port() {
        Some(port) if matches!(endpoint, Endpoint::Tcp { port: 0, .. }) => format!("{endpoint} (port {port})"),
        _ => endpoint.to_string(),
    };
    eprintln!("vmm: waiting for a VM on {shown}");
    let receiving = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let claimed_socket = Arc::new(std::sync::Mutex::new(None));
    stop_receiving_on_signal(receiving.clone(), &endpoint, claimed_socket.clone())
        .map_err(|e| Failure::runtime(format!("cannot start threads: {e}")))?;
    // A peer that fails the TLS handshake (no certificate of the CA) or is no migration is turned
    // away and the next one awaited: it never got to send anything.
    let incoming = receiver::accept_migration(&listener, args.timeout, |why| eprintln!("vmm: {why}"))
        .map_err(transport_failure)?;
    drop(listener);
    let peer = incoming.peer;
    let setup = |e: std::io::Error| Failure::runtime(format!("connection from {peer}: {e}"));
    incoming.main.set_timeout(Some(args.timeout)).map_err(setup)?;
    let main_socket = incoming.main.handle().map_err(setup)?;
    let mut lanes: Vec<persist::LaneInput> = Vec::new();
    for lane in incoming.lanes {
        // A lane may idle while the VM's stream carries disks: the VM's stream's timeout
        // notices a source that went away, and then cuts the lanes.
        lane.set_timeout(None).map_err(setup)?;
        let socket = lane.handle().map_err(setup)?;
        lanes.push((Box::new(lane), Box::new(move || socket.cut())));
    }
    let conn = SharedConnection(Arc::new(std::sync::Mutex::new(incoming.main)), args.timeout);
    let opts = ResumeOptions {
        name: args.name.clone(),
        verify: false,
        lazy: false,
        disk_changed_ok: true,
        nets: args.nets.clone(),
        vsock: args.vsock.clone(),
        disks: args.disks.clone(),
    };
    let claim = |config: &VmConfig| {
        let name = config.name.as_str();
        let socket = args.api_sock.clone().unwrap_or_else(|| api::socket_path(name));
        check_vsock_path(args.vsock.as_ref(), &socket)
            .map_err(|f| persist::PersistError::Claim { message: f.message, bad_input: true })?;
        let claimed = bind(&socket, name).map_err(|f| persist::PersistError::Claim {
            message: f.message,
            bad_input: f.code == super::EXIT_BAD_INPUT,
        })?;
        *claimed_socket.lock().unwrap_or_else(|e| e.into_inner()) = Some(socket.clone());
        // `status` answers while the VM arrives.
        let status = vmm::api::protocol::Status {
            name: name.to_string(),
            state: "receiving".into(),
            vcpus: config.vcpus,
            mem_bytes: config.mem_bytes,
            pid: std::process::id(),
            console_dropped_bytes: 0,
            job: None,
            memory: None,
            checkpoints: None,
        };
        let responder =
            claimed.0.try_clone().and_then(|l| server::ReceivingResponder::start(l, &socket, status)).map_err(|e| {
                persist::PersistError::Claim {
                    message: format!("cannot serve {}: {e}", socket.display()),
                    bad_input: false,
                }
            })?;
        let claimed = (claimed.0, claimed.1, responder);
        conn.send(&Message::Accept).map_err(|e| persist::PersistError::Claim {
            message: format!("the source went away during the handshake: {e}"),
            bad_input: false,
        })?;
        Ok(claimed)
    };
    let committed = std::cell::Cell::new(false);
    let keep_paused = std::cell::Cell::new(false);
    let handover = || {
        let lost =
            |e: String| persist::PersistError::Claim { message: format!("hand-over failed: {e}"), bad_input: false };
        conn.send(&Message::Ready).map_err(|e| lost(e.to_string()))?;
        match conn.receive() {
            Ok(Message::Commit) => {}
            Ok(Message::CommitPaused) => keep_paused.set(true),
            Ok(other) => return Err(lost(format!("the source answered {other:?}"))),
            Err(e) => return Err(lost(format!("no commit from the source ({e}): it keeps the guest"))),
        }
        // The guest is ours from here: the source stopped it for good.
        committed.set(true);
        Ok(())
    };
    let took_over = || {
        let _ = conn.send(&Message::Committed);
    };
    let source = ResumeSource::Migration(persist::MigrationInput {
        stream: Box::new(conn.clone()),
        stop_stream: Box::new(move || main_socket.cut_reading()),
        lanes,
    });
    let restored = persist::restore(source, &opts, claim, handover, took_over);
    let (restored, (listener, guard, responder)) = match restored {
        Ok(r) => r,
        Err(e) if committed.get() => {
            return Err(Failure::runtime(format!(
                "the VM from {peer} was handed over but cannot run here: {e}; the source stopped it"
            )))
        }
        Err(e) => {
            // Tell the source why (it keeps the guest); it may have gone already.
            let _ = conn.send(&Message::Refuse(e.to_string()));
            // The VM's name taken here is the user's to fix; anything else is a failed migration.
            return Err(match e {
                persist::PersistError::Claim { bad_input: true, .. } => Failure::bad_input(e.to_string()),
                e => Failure::runtime(format!("migration from {peer} failed: {e}")),
            });
        }
    };
    drop(conn);
    responder.stop();
    receiving.store(false, std::sync::atomic::Ordering::SeqCst);
    let refresh_agent = restored.machine.config.vsock.as_ref().map(|v| v.uds.clone());
    let launch = Launch {
        paused: args.paused || keep_paused.get(),
        checkpoint,
        memory: None,
        stdin_input: true,
        refresh_agent,
        diff_base: None,
    };
    serve(restored.machine, listener, guard, launch)
}

/// Ends a `vmm receive` on SIGINT, SIGTERM or SIGHUP while no VM runs yet (a partial one is
/// discarded: its source keeps the guest); once the VM runs, the signal is the VM's to handle.
fn stop_receiving_on_signal(
    receiving: Arc<std::sync::atomic::AtomicBool>,
    endpoint: &Endpoint,
    claimed_socket: Arc<std::sync::Mutex<Option<PathBuf>>>,
) -> std::io::Result<()> {
    let listen = match endpoint {
        Endpoint::Unix(path) => Some(path.clone()),
        Endpoint::Tcp { .. } => None,
    };
    std::thread::Builder::new().name("receive-signals".into()).spawn(move || {
        let Some(signal) = vmm::exit::wait_termination_signal() else { return };
        if receiving.load(std::sync::atomic::Ordering::SeqCst) {
            if let Some(path) = listen {
                let _ = std::fs::remove_file(path);
            }
            // The control socket of a VM that was arriving goes with it.
            if let Some(path) = claimed_socket.lock().unwrap_or_else(|e| e.into_inner()).take() {
                let _ = std::fs::remove_file(path);
            }
            eprintln!("vmm: interrupted (signal {signal}); no VM was received");
            std::process::exit(1);
        }
        // SAFETY: raising a signal at this process again, for the VM's own waiter.
        unsafe { libc::kill(libc::getpid(), signal) };
    })?;
    Ok(())
}

/// The periodic checkpoints the arguments ask for.
/// `resumed_from`: the snapshot a `vmm resume` continues from, which may be one of the
/// checkpoint directory's own.
fn checkpoint_config(args: &CheckpointArgs, resumed_from: Option<&Path>) -> Result<Option<CheckpointConfig>, Failure> {
    let (Some(dir), Some(every)) = (&args.checkpoint_dir, &args.checkpoint_every) else {
        if args.mtbf.is_some() {
            return Err(Failure::bad_input("--mtbf goes with --checkpoint-every auto"));
        }
        return Ok(None);
    };
    let interval = match (every.as_str(), args.mtbf) {
        ("auto", Some(mtbf)) => Interval::Auto { mtbf },
        ("auto", None) => {
            return Err(Failure::bad_input("--checkpoint-every auto needs the host's --mtbf (6h, 2d, ...)"))
        }
        (_, Some(_)) => return Err(Failure::bad_input("--mtbf goes with --checkpoint-every auto")),
        (text, None) => Interval::Every(
            vmm::config::parse_duration(text)
                .map_err(|e| Failure::bad_input(format!("--checkpoint-every: {e}, or auto")))?,
        ),
    };
    if dir.exists() && !dir.is_dir() {
        return Err(Failure::bad_input(format!("--checkpoint-dir {} is not a directory", dir.display())));
    }
    let dir = std::path::absolute(dir).map_err(|e| Failure::bad_input(format!("--checkpoint-dir: {e}")))?;
    // Before anything runs: a VM that cannot checkpoint there is refused, not started.
    let lock = checkpoint::lock_dir(&dir).map_err(Failure::bad_input)?;
    // Checkpoints of a VM that is gone (killed, its host crashed) are what brings it back: only
    // the VM resumed from them may go on in their directory, whose older chains it removes.
    if let Ok(latest) = std::fs::read_link(dir.join(checkpoint::LATEST)) {
        let canonical_dir = dir.canonicalize().unwrap_or_else(|_| dir.clone());
        let continues =
            resumed_from.and_then(|from| from.canonicalize().ok()).is_some_and(|from| from.starts_with(&canonical_dir));
        if !continues {
            return Err(Failure::bad_input(format!(
                "--checkpoint-dir {} holds another VM's checkpoints (latest: {}): resume that VM with `vmm resume {} --checkpoint-dir {} ...`, or give another directory",
                dir.display(),
                latest.display(),
                dir.join(checkpoint::LATEST).display(),
                dir.display()
            )));
        }
    }
    Ok(Some(CheckpointConfig { dir, interval, keep: args.keep as usize, lock }))
}

/// The vsock socket must not be the control socket.
fn check_vsock_path(vsock: Option<&vmm::config::VsockConfig>, control: &Path) -> Result<(), Failure> {
    match vsock {
        Some(v) if v.uds == control => Err(Failure::bad_input(format!(
            "--vsock uds={} is the VM's control socket: give the vsock device a path of its own",
            v.uds.display()
        ))),
        _ => Ok(()),
    }
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

/// How long a resumed VM's agent gets to answer (a VM resumed paused may be continued later).
const AGENT_REFRESH_WITHIN: std::time::Duration = std::time::Duration::from_secs(60);

/// How to start a built machine.
struct Launch {
    /// Stay paused until `vmm continue`.
    paused: bool,
    /// Periodic checkpoints.
    checkpoint: Option<CheckpointConfig>,
    /// A resumed VM's memory coming in from its snapshot, watched while it does.
    memory: Option<persist::LoadingMemory>,
    /// stdin is the serial console's input.
    stdin_input: bool,
    /// A resumed VM's vsock socket: its agent thaws the guest and refreshes its clock and RNG.
    refresh_agent: Option<PathBuf>,
    /// The snapshot directory a resumed VM's memory equals.
    diff_base: Option<vmm::control::DiffBase>,
}

/// Starts the VM and serves it until it ends.
fn serve(machine: Machine, listener: UnixListener, guard: server::SocketGuard, launch: Launch) -> CmdResult {
    let running = machine
        .start(launch.paused, launch.stdin_input, launch.diff_base)
        .map_err(|e| Failure::runtime(e.to_string()))?;
    let threads = |e: std::io::Error| Failure::runtime(format!("cannot start threads: {e}"));
    // What the page files were, to name their change as a dead VM's cause.
    let mut memory_files = Vec::new();
    let mut load = None;
    if let Some(memory) = launch.memory {
        let _ = running.control.memory_load.set(memory.load.clone());
        load = Some(memory.load.clone());
        memory_files = memory.files.iter().map(|f| (f.path.clone(), f.identity)).collect();
        persist::watch_memory_load(memory, running.control.exit_sender()).map_err(threads)?;
    }
    // Printed once the vCPU threads run (or wait, paused): benchmarks time resume by this line.
    let state = if launch.paused { "paused" } else { "running" };
    eprintln!("vmm: VM '{}' {state}; control socket {}", running.control.config.name, guard.0.display());
    if let Some(load) = load {
        load.begin();
    }
    server::spawn(listener, running.control.clone()).map_err(|e| Failure::runtime(e.to_string()))?;
    if let Some(uds) = launch.refresh_agent {
        vmm::agent::refresh_after_resume(uds, AGENT_REFRESH_WITHIN);
    }
    let checkpoint = match launch.checkpoint {
        Some(config) => Some(
            checkpoint::spawn(running.control.clone(), config)
                .map_err(|e| Failure::runtime(format!("cannot start checkpoints: {e}")))?,
        ),
        None => None,
    };
    vmm::exit::spawn_signal_waiter(running.control.exit_sender(), checkpoint)
        .map_err(|e| Failure::runtime(e.to_string()))?;
    let terminal = RawTerminal::enter();
    let mut reason = running.wait();
    // A guest whose memory file was overwritten dies of it: name that cause, not the crash.
    let loaded = running.control.memory_loaded();
    if let (ExitReason::Fatal(_), false) = (&reason, loaded) {
        if let Some(changed) = memory_files.iter().find_map(|(path, id)| persist::memory_file_changed(path, id)) {
            reason = ExitReason::Fatal(changed);
        }
    }
    // The guest's last lines (a panic, a power-off message) reach the terminal before vmm ends.
    running.control.devices.console.flush_for(std::time::Duration::from_secs(2));
    terminal.restore();
    guard.remove();
    // The vsock device's socket is ours too (the guest's host-side sockets PATH_PORT are not).
    if let Some(v) = &running.control.config.vsock {
        let _ = std::fs::remove_file(&v.uds);
    }
    match reason {
        ExitReason::Fatal(msg) => Err(Failure::runtime(msg)),
        ExitReason::BadSnapshot(msg) => Err(Failure::bad_input(msg)),
        ExitReason::Signal(sig) => {
            eprintln!("vmm: terminating on signal {sig}");
            Ok(0)
        }
        other => Ok(other.exit_code() as u8),
    }
}
