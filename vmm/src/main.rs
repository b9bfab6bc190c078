//! The `vmm` command line.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use vmm::config::{parse_disk, parse_mem, DiskConfig};
use vmm::console::RawTerminal;
use vmm::{Machine, VmConfig};

/// Exit status for bad arguments or input files.
const EXIT_BAD_INPUT: u8 = 2;
/// Exit status for failures of the host or the VM at run time.
const EXIT_RUNTIME: u8 = 1;

#[derive(Parser)]
#[command(name = "vmm", version, about = "A small KVM virtual machine monitor built for checkpoint/restart")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a guest; with no --kernel, boots the project's test guest.
    Run(RunArgs),
}

#[derive(clap::Args)]
struct RunArgs {
    /// Kernel to boot: a bzImage or an ELF with a PVH entry note.
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Initial ramdisk.
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Kernel command line (replaces the default).
    #[arg(long)]
    cmdline: Option<String>,
    /// Guest memory: a number of MiB, or with a K, M or G suffix.
    #[arg(long, default_value = "512M", value_parser = parse_mem_arg)]
    mem: u64,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// Name of the VM.
    #[arg(long)]
    name: Option<String>,
    /// A virtio-blk disk backed by a host file: PATH or PATH,ro. Repeat for more disks.
    #[arg(long = "disk", value_parser = parse_disk_arg)]
    disks: Vec<DiskConfig>,
}

fn parse_mem_arg(s: &str) -> Result<u64, String> {
    parse_mem(s).map_err(|e| e.to_string())
}

fn parse_disk_arg(s: &str) -> Result<DiskConfig, String> {
    parse_disk(s).map_err(|e| e.to_string())
}

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

fn run(args: RunArgs) -> Result<u8, (u8, String)> {
    let bad = |msg: String| (EXIT_BAD_INPUT, msg);
    let vcpus = u8::try_from(args.vcpus)
        .map_err(|_| bad(format!("--vcpus {} is more than this host allows (254: xAPIC limit)", args.vcpus)))?;
    let (kernel, default_cmdline) = match args.kernel {
        Some(k) => (k, LINUX_CMDLINE),
        None => {
            let dir = images_dir().ok_or_else(|| {
                bad("no --kernel given and no test guest found: run images/build.sh, or set VMM_IMAGES".into())
            })?;
            (dir.join("testguest.elf"), "")
        }
    };
    let config = VmConfig {
        name: args.name.unwrap_or_else(|| format!("vm-{}", std::process::id())),
        kernel,
        initrd: args.initrd,
        cmdline: args.cmdline.unwrap_or_else(|| default_cmdline.to_string()),
        mem_bytes: args.mem,
        vcpus,
        disks: args.disks,
    };
    let machine = Machine::build(config).map_err(|e| {
        let code = if e.is_bad_input() { EXIT_BAD_INPUT } else { EXIT_RUNTIME };
        (code, e.to_string())
    })?;
    if host_is_pvm() {
        eprintln!(
            "vmm: note: this host's KVM is PVM (no hardware virtualization): guest kernel code runs emulated, \
             and unmodified Linux kernels do not get far"
        );
    }
    let terminal = RawTerminal::enter();
    let reason = machine.run();
    terminal.restore();
    match reason {
        vmm::ExitReason::Fatal(msg) => Err((EXIT_RUNTIME, msg)),
        other => Ok(other.exit_code() as u8),
    }
}

fn main() -> ExitCode {
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
            // One line: clap's first line ("error: ..."), without the usage block.
            let text = e.render().to_string();
            let first = text.lines().next().unwrap_or("error: bad arguments");
            eprintln!("vmm: {}", first.trim_start_matches("error: "));
            return ExitCode::from(EXIT_BAD_INPUT);
        }
    };
    let result = match cli.command {
        Command::Run(args) => run(args),
    };
    match result {
        Ok(code) => {
            // vCPU threads may still be inside KVM_RUN; end the process without waiting for them.
            std::process::exit(code.into());
        }
        Err((code, msg)) => {
            eprintln!("vmm: {msg}");
            std::process::exit(code.into());
        }
    }
}
