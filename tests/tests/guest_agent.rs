//! The Linux guest agent (`vmm-guest-agent`, the static binary of the Linux image), run as a host
//! process over a Unix socket against a loop-mounted ext4 image in a private mount namespace:
//! the only file system it may freeze. A writer in that namespace rewrites a file on it all the
//! time and logs each write outside it, so the tests see when writes are blocked.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use agent_protocol::{Frame, Message};
use tests::TempDir;

fn agent_bin() -> PathBuf {
    let bin = tests::images_dir().join("vmm-guest-agent");
    assert!(bin.exists(), "{} is missing: run images/build.sh", bin.display());
    bin
}

struct Guest {
    dir: TempDir,
    agent: Child,
    sock: PathBuf,
    progress: PathBuf,
    hooks_log: PathBuf,
}

impl Guest {
    /// Starts the agent with an ext4 image mounted at DIR/mnt and the writer, and `hooks`
    /// (name, shell body) in its hooks directory.
    fn start(tag: &str, hooks: &[(&str, &str)]) -> Self {
        let dir = TempDir::new(tag);
        let p = |name: &str| dir.path().join(name);
        let img = p("disk.img");
        std::fs::File::create(&img).unwrap().set_len(32 << 20).unwrap();
        let mkfs = Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&img).status().expect("mkfs.ext4 runs");
        assert!(mkfs.success(), "mkfs.ext4 failed");
        std::fs::create_dir(p("mnt")).unwrap();
        std::fs::create_dir(p("hooks")).unwrap();
        let hooks_log = p("hooks.log");
        for (name, body) in hooks {
            let path = p("hooks").join(name);
            let body = body.replace("LOG", &hooks_log.display().to_string());
            std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let sock = p("agent.sock");
        let progress = p("progress");
        let script = format!(
            "set -e; mount -t ext4 -o loop {img} {mnt}; \
             ( i=0; while kill -0 $$ 2>/dev/null; do i=$((i+1)); echo $i > {mnt}/counter; echo $i >> {progress}; sleep 0.02; done ) & \
             exec {agent} listen --unix {sock} --only {mnt} --hooks {hooks}",
            img = img.display(),
            mnt = p("mnt").display(),
            progress = progress.display(),
            agent = agent_bin().display(),
            sock = sock.display(),
            hooks = p("hooks").display(),
        );
        let agent = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c", &script])
            .stdin(Stdio::null())
            .spawn()
            .expect("unshare runs");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !(sock.exists() && progress.exists()) {
            assert!(Instant::now() < deadline, "the agent did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
        Guest { dir, agent, sock, progress, hooks_log }
    }

    fn writes(&self) -> usize {
        std::fs::read_to_string(&self.progress).unwrap_or_default().lines().count()
    }

    /// True if the writer makes progress within `within`.
    fn writer_moves(&self, within: Duration) -> bool {
        let before = self.writes();
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if self.writes() > before + 1 {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    fn request(&self, message: Message<'_>) -> Result<String, String> {
        let mut conn = UnixStream::connect(&self.sock).expect("connect to the agent");
        conn.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut buf = vec![0u8; agent_protocol::MAX_FRAME];
        let n = agent_protocol::encode(&Frame { id: 5, message }, &mut buf).unwrap();
        conn.write_all(&buf[..n]).unwrap();
        conn.read_exact(&mut buf[..4]).expect("a reply");
        let total = agent_protocol::frame_len(&buf).unwrap().unwrap();
        conn.read_exact(&mut buf[4..total]).unwrap();
        let (frame, _) = agent_protocol::decode(&buf[..total]).unwrap().unwrap();
        assert_eq!(frame.id, 5);
        match frame.message {
            Message::Ok(t) => Ok(t.to_string()),
            Message::Error(e) => Err(e.to_string()),
            Message::ExecResult { status, stdout, stderr } => Ok(format!(
                "status={status} stdout={} stderr={}",
                String::from_utf8_lossy(stdout),
                String::from_utf8_lossy(stderr)
            )),
            other => panic!("unexpected reply {other:?}"),
        }
    }

    fn hooks_log(&self) -> String {
        std::fs::read_to_string(&self.hooks_log).unwrap_or_default()
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        // Never leave the writer blocked on a frozen file system.
        let _ = self.request_quiet(Message::Thaw);
        let _ = self.agent.kill();
        let _ = self.agent.wait();
        let _ = &self.dir;
    }
}

impl Guest {
    fn request_quiet(&self, message: Message<'_>) -> Option<()> {
        let mut conn = UnixStream::connect(&self.sock).ok()?;
        conn.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        let mut buf = vec![0u8; 64];
        let n = agent_protocol::encode(&Frame { id: 1, message }, &mut buf).ok()?;
        conn.write_all(&buf[..n]).ok()?;
        conn.read(&mut buf).ok().map(|_| ())
    }
}

/// A hook body that logs its name and phase (outside the frozen file system).
const LOG_HOOK: &str = "echo \"$(basename $0) $1\" >> LOG";

#[test]
fn quiesce_blocks_writers_until_thaw_and_runs_hooks_in_order() {
    let g = Guest::start("agent-freeze", &[("10-db", LOG_HOOK), ("20-web", LOG_HOOK)]);
    assert!(g.writer_moves(Duration::from_secs(5)), "the writer does not run");
    let reply = g.request(Message::Quiesce { timeout_ms: 60_000 }).expect("quiesce");
    assert!(reply.contains("froze 1 file system") && reply.contains("2 hook(s)"), "{reply}");
    assert!(!g.writer_moves(Duration::from_secs(1)), "a writer went on while the file system was frozen");
    assert_eq!(g.request(Message::Quiesce { timeout_ms: 1000 }).unwrap_err(), "already quiesced (thaw first)");
    let reply = g.request(Message::Thaw).expect("thaw");
    assert!(reply.contains("thawed 1 file system"), "{reply}");
    assert!(g.writer_moves(Duration::from_secs(5)), "the writer stayed blocked after thaw");
    assert_eq!(g.hooks_log(), "10-db freeze\n20-web freeze\n20-web thaw\n10-db thaw\n");
    assert_eq!(g.request(Message::Thaw).unwrap(), "thawed 0 file system(s); 0 hook(s) told");
}

/// A host that never sends Thaw (it died, or gave up) does not leave the guest frozen.
#[test]
fn a_quiesce_without_thaw_ends_by_itself() {
    let g = Guest::start("agent-autothaw", &[]);
    g.request(Message::Quiesce { timeout_ms: 500 }).expect("quiesce");
    assert!(!g.writer_moves(Duration::from_millis(300)), "not frozen");
    assert!(g.writer_moves(Duration::from_secs(5)), "still frozen after the quiesce's deadline");
    // And a new quiesce is possible.
    g.request(Message::Quiesce { timeout_ms: 60_000 }).expect("second quiesce");
    g.request(Message::Thaw).expect("thaw");
}

/// A hook that fails aborts the quiesce: the hooks already told `freeze` are told `thaw`, and
/// nothing stays frozen.
#[test]
fn a_failing_hook_aborts_the_quiesce() {
    let bad = format!("{LOG_HOOK}; exit 3");
    let g = Guest::start("agent-hookfail", &[("10-ok", LOG_HOOK), ("20-bad", &bad)]);
    let err = g.request(Message::Quiesce { timeout_ms: 60_000 }).unwrap_err();
    assert!(err.contains("20-bad freeze") && err.contains("exit status: 3"), "{err}");
    assert!(g.writer_moves(Duration::from_secs(5)), "frozen after a failed quiesce");
    assert_eq!(g.hooks_log(), "10-ok freeze\n20-bad freeze\n10-ok thaw\n");
}

#[test]
fn exec_ping_and_bad_requests() {
    let g = Guest::start("agent-exec", &[]);
    assert!(g.request(Message::Ping).unwrap().starts_with("vmm-guest-agent "));
    let out = g.request(Message::Exec { timeout_ms: 5000, argv: b"sh\0-c\0echo out; echo err >&2; exit 4\0" }).unwrap();
    assert_eq!(out, "status=4 stdout=out\n stderr=err\n");
    let out = g.request(Message::Exec { timeout_ms: 200, argv: b"sleep\x005\0" }).unwrap();
    assert_eq!(out, "status=-9 stdout= stderr=");
    assert!(g.request(Message::Exec { timeout_ms: 200, argv: b"/no/such/program\0" }).unwrap_err().contains("exec"));
    // Garbage gets one error reply and the connection closed; the agent goes on.
    let mut conn = UnixStream::connect(&g.sock).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    conn.write_all(&[12, 0, 0, 0, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9]).unwrap();
    let mut reply = Vec::new();
    let _ = conn.read_to_end(&mut reply);
    let (frame, _) = agent_protocol::decode(&reply).unwrap().unwrap();
    assert_eq!(frame.message, Message::Error("malformed request"));
    assert!(g.request(Message::Ping).is_ok());
}
