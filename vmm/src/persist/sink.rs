//! Where a snapshot goes. The pipeline hands a sink the manifest (less what only the memory
//! writing tells), the machine state, then guest memory, then asks it to commit; a sink dropped
//! before `commit` leaves nothing behind (a directory sink removes its temporary directory; a
//! stream without its End frame is refused by every reader).

use std::io::Write;
use std::path::{Path, PathBuf};

use snapshot::live::LivePageFile;
use snapshot::pages::Run;
use snapshot::stream::StreamWriter;
use snapshot::{Manifest, MemoryData, MemoryLayout, Progress, SnapshotWriter, StateDigest};

use super::PersistError;

/// What a sink wrote.
pub struct Written {
    /// Bytes on disk (a directory, holes excluded) or through the stream.
    pub bytes: u64,
    /// The snapshot's id (directories only: a stream's manifest is completed by its reader).
    pub id: Option<String>,
    /// Guest pages found to be zero (not written as bytes).
    pub zero_pages: u64,
}

pub trait Sink: Send {
    /// Takes the manifest and the encoded machine state, while the guest is paused.
    fn begin(&mut self, manifest: &Manifest, state: &[u8]) -> Result<(), PersistError>;
    /// Writes guest memory.
    fn memory(&mut self, memory: MemoryData<'_>, progress: &Progress) -> Result<(), PersistError>;
    /// A page file to write in place while the guest runs (a live snapshot), for memory regions
    /// `(guest address, bytes)`, if this sink can have one (directories).
    fn live_page_file(&mut self, _regions: &[(u64, u64)]) -> Result<Option<LivePageFile>, PersistError> {
        Ok(None)
    }
    /// What the live page file ended as, instead of `memory`.
    fn memory_layout(&mut self, _layout: MemoryLayout) {}
    /// The snapshot directory this sink makes, if it makes one (a diff can be taken of it).
    fn directory(&self) -> Option<&Path> {
        None
    }
    /// Makes the snapshot durable (directory) or complete (stream: on a pipe, once its reader has
    /// taken all of it); `progress` tells a cancellation.
    fn commit(self: Box<Self>, progress: &Progress) -> Result<Written, PersistError>;
    /// A file for the copy of disk `index` (`size` bytes, the file `disk`), which the snapshot
    /// fills with the disk as it was at the pause, if this sink keeps disks.
    fn disk_copy_file(
        &mut self,
        _index: usize,
        _size: u64,
        _disk: &Path,
    ) -> Result<Option<std::fs::File>, PersistError> {
        Ok(None)
    }
}

/// A snapshot directory (see `snapshot::dir`).
pub struct DirSink {
    writer: SnapshotWriter,
    manifest: Option<Manifest>,
    state: Option<StateDigest>,
}

impl DirSink {
    pub fn create(dest: &Path, force: bool) -> Result<Self, PersistError> {
        Ok(Self { writer: SnapshotWriter::create(dest, force)?, manifest: None, state: None })
    }
}

impl Sink for DirSink {
    fn begin(&mut self, manifest: &Manifest, state: &[u8]) -> Result<(), PersistError> {
        let mut digest = self.writer.write_state(state)?;
        digest.sections = manifest.state.sections.clone();
        self.state = Some(digest);
        self.manifest = Some(manifest.clone());
        Ok(())
    }

    fn memory(&mut self, memory: MemoryData<'_>, progress: &Progress) -> Result<(), PersistError> {
        let mut layout = self.writer.write_memory(memory, progress)?;
        let manifest = self.manifest.as_mut().expect("begin before memory");
        layout.hot = std::mem::take(&mut manifest.memory.hot);
        manifest.memory = layout;
        Ok(())
    }

    fn directory(&self) -> Option<&Path> {
        Some(self.writer.dest())
    }

    fn live_page_file(&mut self, regions: &[(u64, u64)]) -> Result<Option<LivePageFile>, PersistError> {
        let (file, path) = self.writer.create_memory_file()?;
        Ok(Some(LivePageFile::new(file, &path, regions)?))
    }

    fn memory_layout(&mut self, mut layout: MemoryLayout) {
        let manifest = self.manifest.as_mut().expect("begin before memory");
        layout.hot = std::mem::take(&mut manifest.memory.hot);
        manifest.memory = layout;
    }

    fn disk_copy_file(&mut self, index: usize, size: u64, _disk: &Path) -> Result<Option<std::fs::File>, PersistError> {
        Ok(Some(self.writer.create_disk_copy(&snapshot::DiskCopy::file_name(index), size)?))
    }

    fn commit(self: Box<Self>, _progress: &Progress) -> Result<Written, PersistError> {
        let mut manifest = self.manifest.expect("begin before commit");
        manifest.state = self.state.expect("begin before commit");
        let (bytes, id) = self.writer.commit(&manifest)?;
        Ok(Written { bytes, id: Some(id), zero_pages: manifest.memory.zero_pages() })
    }
}

/// The snapshot stream (see `snapshot::stream`) on a pipe, file or socket.
pub struct StreamSink<W: Write + Send> {
    writer: StreamWriter<std::io::BufWriter<W>>,
    /// Names the output in errors.
    what: PathBuf,
    /// The disks' copies (disk number, file, size): unnamed files beside each disk, filled like
    /// a directory's copies, and sent after the memory (Disk frames).
    disks: Vec<(usize, std::fs::File, u64)>,
}

/// A pipe holds 64 KiB by default: a stream through one then costs a context switch every 64 KiB.
/// Grow it as far as this host lets an unprivileged process (`/proc/sys/fs/pipe-max-size`,
/// 1 MiB by default); anything but a pipe is left alone.
pub fn grow_pipe(fd: &impl std::os::fd::AsFd) {
    let max = std::fs::read_to_string("/proc/sys/fs/pipe-max-size")
        .ok()
        .and_then(|s| s.trim().parse::<usize>().ok())
        .unwrap_or(1 << 20);
    let _ = rustix::pipe::fcntl_setpipe_size(fd, max.min(16 << 20));
}

impl<W: Write + Send + std::os::fd::AsFd> StreamSink<W> {
    pub fn new(out: W, compress: bool, what: &Path) -> Result<Self, PersistError> {
        grow_pipe(&out);
        let buffered = std::io::BufWriter::with_capacity(1 << 20, out);
        let writer = StreamWriter::new(buffered, compress).map_err(|e| PersistError::stream_out(what, e))?;
        Ok(Self { writer, what: what.to_path_buf(), disks: Vec::new() })
    }
}

impl<W: Write + Send + std::os::fd::AsFd> Sink for StreamSink<W> {
    fn begin(&mut self, manifest: &Manifest, state: &[u8]) -> Result<(), PersistError> {
        let what = &self.what;
        self.writer.manifest(&manifest.encode()).map_err(|e| PersistError::stream_out(what, e))?;
        self.writer.state(state).map_err(|e| PersistError::stream_out(what, e))
    }

    fn memory(&mut self, memory: MemoryData<'_>, progress: &Progress) -> Result<(), PersistError> {
        let (writer, what) = (&mut self.writer, &self.what);
        memory.visit_runs(|run| {
            let len = match run {
                Run::Data { guest_addr, bytes } => {
                    // Frames of 1 MiB at most: progress and cancellation are checked between them.
                    for (i, piece) in bytes.chunks(snapshot::stream::MEMORY_FRAME_BYTES).enumerate() {
                        let addr = guest_addr + (i * snapshot::stream::MEMORY_FRAME_BYTES) as u64;
                        writer.memory(addr, piece).map_err(|e| PersistError::stream_out(what, e))?;
                        progress.advance(piece.len() as u64)?;
                    }
                    0
                }
                Run::Zero { guest_addr, len } => {
                    writer.zero(guest_addr, len).map_err(|e| PersistError::stream_out(what, e))?;
                    len
                }
            };
            progress.advance(len)?;
            Ok::<_, PersistError>(())
        })
    }

    fn disk_copy_file(&mut self, index: usize, size: u64, disk: &Path) -> Result<Option<std::fs::File>, PersistError> {
        use rustix::fs::{Mode, OFlags};
        // Beside the disk, on its file system (not in memory, as /tmp may be), unnamed: it goes
        // when the snapshot is done, or when vmm dies.
        let dir = disk.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let io = |e: std::io::Error| {
            PersistError::Disk(format!(
                "cannot make a copy of {} beside it (in {}): {e}",
                disk.display(),
                dir.display()
            ))
        };
        let file =
            match rustix::fs::open(dir, OFlags::TMPFILE | OFlags::RDWR | OFlags::CLOEXEC, Mode::from_raw_mode(0o600)) {
                Ok(fd) => std::fs::File::from(fd),
                // A file system without O_TMPFILE: a named file, unlinked at once.
                Err(_) => {
                    use std::os::unix::fs::OpenOptionsExt;
                    let name = dir.join(format!(".vmm-disk-copy-{}-{index}", std::process::id()));
                    let file = std::fs::OpenOptions::new()
                        .read(true)
                        .write(true)
                        .create_new(true)
                        .mode(0o600)
                        .open(&name)
                        .map_err(io)?;
                    std::fs::remove_file(&name).map_err(io)?;
                    file
                }
            };
        file.set_len(size).map_err(io)?;
        self.disks.push((index, file.try_clone().map_err(io)?, size));
        Ok(Some(file))
    }

    fn commit(mut self: Box<Self>, progress: &Progress) -> Result<Written, PersistError> {
        for (index, file, size) in std::mem::take(&mut self.disks) {
            send_disk(&mut self.writer, index, &file, size).map_err(|e| PersistError::stream_out(&self.what, e))?;
        }
        let (mut out, stats) = self.writer.finish().map_err(|e| PersistError::stream_out(&self.what, e))?;
        out.flush().map_err(|e| PersistError::stream_out(&self.what, e))?;
        wait_until_read(out.get_ref().as_fd(), progress, &self.what)?;
        Ok(Written { bytes: stats.bytes, id: None, zero_pages: stats.zero_bytes / snapshot::pages::PAGE_SIZE })
    }
}

/// On a pipe, the stream's last bytes are only in the pipe when the last write returns: a reader
/// that fails before it takes them (a `vmm resume -` that refuses the VM) would lose the
/// snapshot, and with `--stop` the VM. So a stream on a pipe is complete once its reader has
/// taken every byte, and fails if the reader closes the pipe first. (A reader that takes it all
/// and fails afterwards is beyond what a one-way pipe can tell: `vmm migrate` has the
/// destination acknowledge.)
fn wait_until_read(fd: std::os::fd::BorrowedFd<'_>, progress: &Progress, what: &Path) -> Result<(), PersistError> {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    let is_pipe = rustix::fs::fstat(fd)
        .is_ok_and(|st| rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::Fifo);
    if !is_pipe {
        return Ok(());
    }
    loop {
        let unread = rustix::io::ioctl_fionread(fd).map_err(|e| PersistError::stream_out(what, e))?;
        if unread == 0 {
            return Ok(());
        }
        // No events asked: poll reports only POLLERR, which a pipe's write end gets when its
        // last reader is gone.
        let mut fds = [PollFd::new(&fd, PollFlags::empty())];
        let _ = poll(&mut fds, Some(&Timespec { tv_sec: 0, tv_nsec: 10_000_000 }));
        if fds[0].revents().contains(PollFlags::ERR) {
            return Err(PersistError::stream_out(
                what,
                format!("its reader closed the pipe with the last {unread} bytes of the stream unread"),
            ));
        }
        progress.check()?;
    }
}

/// Sends what `file` (a disk's copy, `size` bytes) holds as Disk frames: its data, not its holes,
/// which the reader's fresh sparse file holds as zeros already. Data and holes lie on file-system
/// blocks, so every piece is whole sectors.
fn send_disk<W: Write>(
    writer: &mut StreamWriter<W>,
    index: usize,
    file: &std::fs::File,
    size: u64,
) -> Result<(), snapshot::stream::StreamError> {
    use snapshot::stream::StreamError;
    let mut failed = None;
    let walked = snapshot::dir::for_each_data_piece(file, size, |offset, piece| {
        writer.disk(index as u32, offset, piece).map_err(|e| {
            failed = Some(e);
            std::io::Error::other("stream write failed")
        })
    });
    match (failed, walked) {
        (Some(e), _) => Err(e),
        (None, Err(e)) => Err(StreamError::Io(e)),
        (None, Ok(())) => Ok(()),
    }
}
