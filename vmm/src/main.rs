//! The `vmm` command line. Each subcommand lives in `cli/`; this file parses arguments and turns
//! failures into one line on stderr and an exit status (2: bad arguments or files, 1: runtime).

mod cli;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use cli::Failure;
use vmm::config::{parse_disk, parse_mem, parse_net, parse_vsock, DiskConfig, NetArg, VsockConfig};

#[derive(Parser)]
#[command(name = "vmm", version, about = "A small KVM virtual machine monitor built for checkpoint/restart")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Which running VM a client command talks to.
#[derive(clap::Args)]
pub struct VmTarget {
    /// Name of the VM (as given to, or printed by, `vmm run`).
    #[arg(long = "vm", required_unless_present = "api_sock", conflicts_with = "api_sock")]
    pub name: Option<String>,
    /// Control socket path (instead of --vm).
    #[arg(long)]
    pub api_sock: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a guest; with no --kernel, boots the project's test guest.
    Run(RunArgs),
    /// Save a running VM to a snapshot directory, or as a stream to stdout (--out -).
    Snapshot(SnapshotArgs),
    /// Continue a saved VM where it stopped.
    Resume(ResumeArgs),
    /// Move a running VM live to a `vmm receive` on this or another host.
    Migrate(MigrateArgs),
    /// Wait for one VM migrated here (`vmm migrate`), then run it.
    Receive(ReceiveArgs),
    /// Pause a running VM.
    Pause(VmTarget),
    /// Continue a paused VM.
    Continue(VmTarget),
    /// Show a VM's state.
    Status(VmTarget),
    /// End a running VM.
    Shutdown(VmTarget),
    /// Describe a snapshot (a directory, or a stream on stdin: -).
    Inspect {
        /// Snapshot directory, or - to read a snapshot stream from stdin.
        dir: PathBuf,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Check every checksum of a snapshot (a directory, or a stream on stdin: -).
    Verify {
        /// Snapshot directory, or - to read a snapshot stream from stdin.
        dir: PathBuf,
    },
    /// Flatten a chain of diff snapshots into one snapshot.
    Merge {
        /// One diff snapshot: its whole chain becomes a full snapshot. Or several consecutive
        /// layers of a chain, oldest first: they become one layer (a diff of the first one's
        /// parent, if it has one).
        #[arg(required = true)]
        dirs: Vec<PathBuf>,
        /// Snapshot directory to create.
        #[arg(long)]
        out: PathBuf,
        /// Replace an existing snapshot at --out (only once the new one is complete).
        #[arg(long)]
        force: bool,
    },
}

#[derive(clap::Args)]
pub struct SnapshotArgs {
    #[command(flatten)]
    pub target: VmTarget,
    /// Snapshot directory to create, or - to write a snapshot stream to stdout (e.g. into
    /// `vmm resume -` through a pipe).
    #[arg(long)]
    pub out: PathBuf,
    /// Replace an existing snapshot at --out (only once the new one is complete).
    #[arg(long)]
    pub force: bool,
    /// End the VM once the snapshot is safely on disk (or the stream wholly written); if it
    /// cannot be, the VM keeps running.
    #[arg(long)]
    pub stop: bool,
    /// zstd-compress the stream (--out - only).
    #[arg(long)]
    pub compress: bool,
    /// No progress bar, even on a terminal.
    #[arg(long)]
    pub quiet: bool,
    /// Do not ask the guest agent to flush and freeze the guest's file systems first.
    #[arg(long, conflicts_with = "require_agent")]
    pub no_quiesce: bool,
    /// Fail (the guest running on) unless the guest agent quiesces the guest first; by default
    /// a VM with a vsock device whose agent does not answer is snapshotted unquiesced, with a
    /// warning.
    #[arg(long)]
    pub require_agent: bool,
    /// How long the agent gets to quiesce, in seconds.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub quiesce_timeout: u64,
    /// Save only the memory pages written since the VM's last snapshot (or its resume from one):
    /// a diff of that snapshot, which resume, verify and merge find through it.
    #[arg(long)]
    pub diff: bool,
    /// The snapshot the diff is of (checked: it must be the VM's last one, which is the default).
    #[arg(long, requires = "diff")]
    pub parent: Option<PathBuf>,
    /// Copy memory while the guest runs, in rounds over what it dirties meanwhile, and pause it
    /// only for the last few pages (a directory; full or --diff).
    #[arg(long)]
    pub live: bool,
}

/// TLS files of one side of a migration (PEM); or plain TCP.
#[derive(clap::Args)]
pub struct TlsArgs {
    /// This side's certificate (PEM), signed by the CA --tls-ca names.
    #[arg(long, requires_all = ["tls_key", "tls_ca"], conflicts_with = "insecure")]
    pub tls_cert: Option<PathBuf>,
    /// This side's private key (PEM).
    #[arg(long, requires_all = ["tls_cert", "tls_ca"])]
    pub tls_key: Option<PathBuf>,
    /// The CA (PEM) the peer's certificate must be signed by.
    #[arg(long, requires_all = ["tls_cert", "tls_key"])]
    pub tls_ca: Option<PathBuf>,
    /// Plain TCP: no encryption, no authentication (a trusted, private link only).
    #[arg(long)]
    pub insecure: bool,
}

#[derive(clap::Args)]
pub struct MigrateArgs {
    #[command(flatten)]
    pub target: VmTarget,
    /// Where the VM goes: tcp:HOST:PORT (TLS unless --insecure) or unix:PATH.
    #[arg(long, required_unless_present = "cancel")]
    pub to: Option<String>,
    /// Abandon the migration under way (the guest runs on here).
    #[arg(long, conflicts_with = "to")]
    pub cancel: bool,
    /// The pause the guest may see (e.g. 10ms): pre-copy rounds go on until what is left can
    /// be sent within it.
    #[arg(long, default_value = "10ms", value_parser = parse_duration_arg)]
    pub max_downtime: std::time::Duration,
    /// Most bytes a second on the link: 100M, 1G (K, M, G suffixes; a bare number is MiB);
    /// default: as fast as it goes.
    #[arg(long, value_parser = parse_rate_arg)]
    pub bandwidth: Option<u64>,
    /// Pre-copy rounds after the first full pass before --over-budget decides.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u32).range(0..=1000))]
    pub max_rounds: u32,
    /// When the rounds run out: complete (pause longer than --max-downtime) or abandon (the
    /// guest runs on here).
    #[arg(long, default_value = "complete", value_parser = ["complete", "abandon"])]
    pub over_budget: String,
    /// zstd-compress the stream.
    #[arg(long)]
    pub compress: bool,
    /// Send the VM's writable disks along (copied while the guest runs, then the blocks it
    /// writes meanwhile); the destination writes them to its --disk files, or to fresh files in
    /// its state directory. Without it, disks are shared storage: the same paths there.
    #[arg(long)]
    pub copy_disks: bool,
    /// TCP (or Unix) connections to send over in parallel, 1 to 16: memory is spread over them
    /// (each reads, compresses and encrypts on a thread of its own).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=16))]
    pub connections: u8,
    /// Longest wait for the destination at any step.
    #[arg(long, default_value = "30s", value_parser = parse_duration_arg)]
    pub timeout: std::time::Duration,
    #[command(flatten)]
    pub tls: TlsArgs,
    /// No progress bar, even on a terminal.
    #[arg(long)]
    pub quiet: bool,
}

#[derive(clap::Args)]
pub struct ReceiveArgs {
    /// Where to wait: tcp:ADDR:PORT (TLS unless --insecure) or unix:PATH (created).
    #[arg(long)]
    pub listen: String,
    /// Name of the VM here (default: its name on the source).
    #[arg(long)]
    pub name: Option<String>,
    /// Control socket path.
    #[arg(long)]
    pub api_sock: Option<PathBuf>,
    /// Longest silence from the source once it connected; then the partial VM is discarded.
    #[arg(long, default_value = "30s", value_parser = parse_duration_arg)]
    pub timeout: std::time::Duration,
    /// Stay paused once received, until `vmm continue`.
    #[arg(long)]
    pub paused: bool,
    /// Attach the VM's network interfaces, in order, to these TAP devices of this host instead
    /// of the names they had: tap=NAME (each keeps its MAC; a mac= must be that MAC).
    #[arg(long = "net", value_parser = parse_net_arg)]
    pub nets: Vec<NetArg>,
    /// The vsock device's cid=N,uds=PATH here instead of the source's.
    #[arg(long, value_parser = parse_vsock_arg)]
    pub vsock: Option<VsockConfig>,
    /// Run the VM's disks, in order, on these files (PATH or PATH,ro) instead of the source's
    /// paths (by default the same paths: shared storage).
    #[arg(long = "disk", value_parser = parse_disk_arg)]
    pub disks: Vec<DiskConfig>,
    #[command(flatten)]
    pub tls: TlsArgs,
    #[command(flatten)]
    pub checkpoint: CheckpointArgs,
}

#[derive(clap::Args)]
pub struct RunArgs {
    /// Kernel to boot: a bzImage or an ELF with a PVH entry note.
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk.
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// Kernel command line (replaces the default).
    #[arg(long)]
    pub cmdline: Option<String>,
    /// Guest memory: a number of MiB, or with a K, M or G suffix.
    #[arg(long, default_value = "512M", value_parser = parse_mem_arg)]
    pub mem: u64,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    pub vcpus: u32,
    /// Name of the VM (default: vm-PID).
    #[arg(long)]
    pub name: Option<String>,
    /// Control socket path (default: $XDG_RUNTIME_DIR/vmm/NAME.sock or /run/vmm/NAME.sock).
    #[arg(long)]
    pub api_sock: Option<PathBuf>,
    /// A virtio-blk disk backed by a host file: PATH or PATH,ro. Repeat for more disks.
    #[arg(long = "disk", value_parser = parse_disk_arg)]
    pub disks: Vec<DiskConfig>,
    /// A virtio-net interface on an existing host TAP device: tap=NAME[,mac=MAC] (default MAC:
    /// derived from NAME). Repeat for more interfaces.
    #[arg(long = "net", value_parser = parse_net_arg)]
    pub nets: Vec<NetArg>,
    /// A virtio-vsock device: cid=N,uds=PATH. Host processes reach guest port P by connecting
    /// to PATH and sending "CONNECT P\n"; the guest reaches host port P at the socket PATH_P.
    #[arg(long, value_parser = parse_vsock_arg)]
    pub vsock: Option<VsockConfig>,
    #[command(flatten)]
    pub checkpoint: CheckpointArgs,
}

/// Periodic checkpoints (`vmm run` and `vmm resume`).
#[derive(clap::Args)]
pub struct CheckpointArgs {
    /// Save the VM into this directory periodically (and on SIGUSR1): a chain of diff
    /// snapshots; DIR/latest always points at the newest complete one (`vmm resume DIR/latest`).
    #[arg(long, requires = "checkpoint_every")]
    pub checkpoint_dir: Option<PathBuf>,
    /// Interval between checkpoints (30s, 5m, ...), or `auto`: from the measured cost of a
    /// checkpoint and --mtbf, by the Young/Daly rule √(2·cost·MTBF).
    #[arg(long, requires = "checkpoint_dir")]
    pub checkpoint_every: Option<String>,
    /// Mean time between failures of the host, for --checkpoint-every auto (6h, 2d, ...).
    #[arg(long, value_parser = parse_duration_arg)]
    pub mtbf: Option<std::time::Duration>,
    /// Most layers a chain of checkpoints keeps (a full snapshot and diffs of it); when reached,
    /// the layers are merged into one full snapshot (the guest is not paused for it), which the
    /// next diffs build on. 1: every checkpoint is a full snapshot.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=1000), requires = "checkpoint_dir")]
    pub keep: u64,
}

#[derive(clap::Args)]
pub struct ResumeArgs {
    /// Snapshot directory, or - to read a snapshot stream from stdin.
    pub dir: PathBuf,
    /// Name of the resumed VM (default: the snapshot's).
    #[arg(long)]
    pub name: Option<String>,
    /// Control socket path.
    #[arg(long)]
    pub api_sock: Option<PathBuf>,
    /// Stay paused until `vmm continue`.
    #[arg(long)]
    pub paused: bool,
    /// Check each chunk of memory against its checksum as it is brought in, before the guest
    /// sees it; a damaged one ends the VM (exit status 2). A stream is always checked.
    #[arg(long)]
    pub verify: bool,
    /// Resume even if a disk changed since the snapshot was taken (the guest then sees a disk
    /// that does not match what it remembers of it).
    #[arg(long)]
    pub disk_changed_ok: bool,
    /// Bring memory in only as the guest touches it, a 2 MiB block (or 1 MiB chunk) at a time. By
    /// default vmm also brings it in from a background thread once the VM is built, also while it
    /// stays `--paused` (the guest is at full
    /// speed sooner), after which the VM no longer depends on the snapshot's files (`vmm status`
    /// says so).
    #[arg(long)]
    pub lazy: bool,
    /// Attach the snapshot's network interfaces, in order, to these TAP devices instead of the
    /// ones they had: tap=NAME, one per interface (each keeps its MAC; a mac= must be that MAC).
    #[arg(long = "net", value_parser = parse_net_arg)]
    pub nets: Vec<NetArg>,
    /// The vsock device's cid=N,uds=PATH instead of the snapshot's.
    #[arg(long, value_parser = parse_vsock_arg)]
    pub vsock: Option<VsockConfig>,
    /// Run the snapshot's disks, in order, on these files (PATH or PATH,ro) as they are, instead
    /// of fresh working copies of the disks the snapshot holds (or the disks it refers to).
    #[arg(long = "disk", value_parser = parse_disk_arg)]
    pub disks: Vec<DiskConfig>,
    #[command(flatten)]
    pub checkpoint: CheckpointArgs,
}

fn parse_duration_arg(s: &str) -> Result<std::time::Duration, String> {
    vmm::config::parse_duration(s).map_err(|e| e.to_string())
}

fn parse_mem_arg(s: &str) -> Result<u64, String> {
    parse_mem(s).map_err(|e| e.to_string())
}

fn parse_rate_arg(s: &str) -> Result<u64, String> {
    match vmm::config::parse_size(s) {
        Ok(0) => Err("a bandwidth of 0 would never finish".into()),
        Ok(bytes) => Ok(bytes),
        Err(e) => Err(e.to_string()),
    }
}

fn parse_disk_arg(s: &str) -> Result<DiskConfig, String> {
    parse_disk(s).map_err(|e| e.to_string())
}

fn parse_net_arg(s: &str) -> Result<NetArg, String> {
    parse_net(s).map_err(|e| e.to_string())
}

fn parse_vsock_arg(s: &str) -> Result<VsockConfig, String> {
    parse_vsock(s).map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    vmm::exit::block_termination_signals();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("VMM_LOG"))
        .with_writer(std::io::stderr)
        .without_time()
        .init();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            // One line: clap's message up to its usage block, lines joined ("the following
            // required arguments were not provided: --vm <NAME>").
            let text = e.render().to_string();
            let message: Vec<&str> = text
                .lines()
                .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect();
            let line = message.join(" ");
            eprintln!("vmm: {}", line.trim_start_matches("error: "));
            return ExitCode::from(cli::EXIT_BAD_INPUT);
        }
    };
    if !matches!(cli.command, Command::Run(_) | Command::Resume(_) | Command::Receive(_)) {
        // Commands that print end quietly when their reader goes away (`vmm inspect s | head`),
        // as shell tools do. A VM's process keeps ignoring SIGPIPE: it may write a snapshot
        // stream into a pipe whose reader dies, and must survive that.
        // SAFETY: restoring the default disposition of a signal; no handler is involved.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    let result = match cli.command {
        Command::Run(args) => cli::run::run(args),
        Command::Resume(args) => cli::run::resume(args),
        Command::Snapshot(args) => cli::client::snapshot(&args),
        Command::Migrate(args) => cli::client::migrate(&args),
        Command::Receive(args) => cli::run::receive(args),
        Command::Pause(target) => cli::client::simple(&target, vmm::api::protocol::Request::Pause),
        Command::Continue(target) => cli::client::simple(&target, vmm::api::protocol::Request::Continue),
        Command::Shutdown(target) => cli::client::simple(&target, vmm::api::protocol::Request::Shutdown),
        Command::Status(target) => cli::client::status(&target),
        Command::Inspect { dir, json } => cli::inspect::inspect(&dir, json),
        Command::Verify { dir } => cli::inspect::verify(&dir),
        Command::Merge { dirs, out, force } => cli::inspect::merge(&dirs, &out, force),
    };
    // vCPU threads may still be inside KVM_RUN: exit without waiting for them.
    match result {
        Ok(code) => std::process::exit(code.into()),
        Err(Failure { code, message }) => {
            eprintln!("vmm: {message}");
            std::process::exit(code.into());
        }
    }
}
