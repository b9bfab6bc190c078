//! The snapshot directory: written atomically (temporary sibling, fsync, rename), private to its
//! owner (0700, files 0600, whatever the umask: guest memory is in it), and opened with every size
//! and checksum checked before anything is trusted.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::digest::checksum;
use crate::manifest::{DiskCopy, Manifest, SnapshotId, StateDigest};
use crate::pages::{self, MemoryData, MemoryLayout};
use crate::progress::Progress;
use crate::{io_err, Error, Result, MANIFEST_FILE, MEMORY_FILE, STATE_FILE};

/// Modes of what a snapshot holds: guest memory may hold secrets.
const DIR_MODE: u32 = 0o700;
const FILE_MODE: u32 = 0o600;

/// Builds a snapshot in a temporary sibling of its destination; `commit` makes it appear whole.
/// Dropped without commit, it removes what it wrote and leaves the destination untouched. While
/// it lives it holds an exclusive lock (flock) on the temporary directory: a directory whose lock
/// can be taken was abandoned by a writer that died, and the next writer removes it.
pub struct SnapshotWriter {
    dest: PathBuf,
    tmp: PathBuf,
    force: bool,
    committed: bool,
    /// Disk copies created (`create_disk_copy`), made durable by `commit`.
    disk_copies: Vec<String>,
    _lock: File,
}

fn sync_dir(path: &Path) -> Result<()> {
    File::open(path).and_then(|d| d.sync_all()).map_err(io_err(path))
}

fn parent_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// A directory `--force` may replace (and then delete): an empty one, or one holding only a
/// snapshot's files, whose manifest decodes. Anything else in it might be the user's.
fn looks_like_snapshot(dir: &Path) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else { return false };
    let names: Vec<_> = entries.filter_map(|e| e.ok().map(|e| e.file_name())).collect();
    if names.is_empty() {
        return true;
    }
    names.iter().all(|n| {
        [MANIFEST_FILE, STATE_FILE, MEMORY_FILE].iter().any(|f| n.as_os_str() == *f)
            || n.to_str().is_some_and(DiskCopy::valid_name)
    }) && std::fs::read(dir.join(MANIFEST_FILE))
        .is_ok_and(|bytes| Manifest::decode(&bytes, &dir.display().to_string()).is_ok())
}

impl SnapshotWriter {
    /// Prepares to write a snapshot to `dest`. An existing `dest` is refused unless `force`, and
    /// even then only if it is a snapshot (or empty). Errors name `dest`, never the temporary path.
    pub fn create(dest: &Path, force: bool) -> Result<Self> {
        Self::check_dest(dest, force)?;
        let parent = parent_of(dest);
        let name = dest.file_name().ok_or_else(|| Error::NotASnapshot(dest.display().to_string(), "no name"))?;
        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        let prefix = format!(".{}.tmp-", name.to_string_lossy());
        remove_abandoned(&parent, &prefix);
        let tmp = parent.join(format!("{prefix}{}-{nanos}", std::process::id()));
        let create_err = |err| Error::Create { path: dest.display().to_string(), err };
        std::fs::DirBuilder::new().mode(DIR_MODE).create(&tmp).map_err(create_err)?;
        let lock = (|| {
            // The umask may have taken bits away: the mode is exactly 0700.
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(DIR_MODE))?;
            let lock = File::open(&tmp)?;
            lock.try_lock().map_err(std::io::Error::from)?;
            Ok(lock)
        })();
        let lock = match lock {
            Ok(lock) => lock,
            Err(err) => {
                let _ = std::fs::remove_dir_all(&tmp);
                return Err(create_err(err));
            }
        };
        Ok(Self { dest: dest.to_path_buf(), tmp, force, committed: false, disk_copies: Vec::new(), _lock: lock })
    }

    /// Where the snapshot will be once committed.
    pub fn dest(&self) -> &Path {
        &self.dest
    }

    fn check_dest(dest: &Path, force: bool) -> Result<()> {
        if dest.symlink_metadata().is_ok() {
            if !force {
                return Err(Error::AlreadyExists(dest.display().to_string()));
            }
            if !dest.is_dir() || !looks_like_snapshot(dest) {
                return Err(Error::RefuseReplace(dest.display().to_string()));
            }
        }
        Ok(())
    }

    fn create_file(&self, name: &str) -> Result<File> {
        let path = self.tmp.join(name);
        OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(FILE_MODE)
            .open(&path)
            .and_then(|f| f.set_permissions(std::fs::Permissions::from_mode(FILE_MODE)).map(|()| f))
            .map_err(|err| self.error(name, err))
    }

    /// An I/O error on a file of the snapshot, named by where it will be.
    fn error(&self, name: &str, err: std::io::Error) -> Error {
        Error::Io { path: self.dest.join(name).display().to_string(), err }
    }

    /// Creates the file for a disk's copy (`DiskCopy::file_name`), private like the others, and
    /// `size` bytes long (a hole until written).
    pub fn create_disk_copy(&mut self, name: &str, size: u64) -> Result<File> {
        assert!(DiskCopy::valid_name(name), "disk copy name {name}");
        let file = self.create_file(name)?;
        file.set_len(size).map_err(|e| self.error(name, e))?;
        self.disk_copies.push(name.to_string());
        Ok(file)
    }

    /// Writes the machine state; returns its digest for the manifest (sections not filled in).
    pub fn write_state(&self, bytes: &[u8]) -> Result<StateDigest> {
        let mut file = self.create_file(STATE_FILE)?;
        file.write_all(bytes).map_err(|e| self.error(STATE_FILE, e))?;
        Ok(StateDigest { size: bytes.len() as u64, checksum: checksum(bytes), sections: Vec::new() })
    }

    /// Creates the page file, to be written by the caller; returns it and its final path.
    pub fn create_memory_file(&self) -> Result<(File, PathBuf)> {
        Ok((self.create_file(MEMORY_FILE)?, self.dest.join(MEMORY_FILE)))
    }

    /// Writes guest memory (zero pages become holes) and returns its layout with checksums.
    pub fn write_memory(&self, memory: MemoryData<'_>, progress: &Progress) -> Result<MemoryLayout> {
        let file = self.create_file(MEMORY_FILE)?;
        let path = self.dest.join(MEMORY_FILE);
        memory.write_page_file(&file, &path, progress)
    }

    /// Writes the manifest, makes everything durable and moves the snapshot into place. Until the
    /// final rename (or exchange, with `force`) the destination is untouched. Returns the bytes
    /// the snapshot takes on disk and its id.
    pub fn commit(mut self, manifest: &Manifest) -> Result<(u64, SnapshotId)> {
        let mut file = self.create_file(MANIFEST_FILE)?;
        file.write_all(&manifest.encode()).map_err(|e| self.error(MANIFEST_FILE, e))?;
        let copies = self.disk_copies.clone();
        for name in [STATE_FILE, MEMORY_FILE, MANIFEST_FILE].into_iter().chain(copies.iter().map(String::as_str)) {
            let p = self.tmp.join(name);
            File::open(&p).and_then(|f| f.sync_all()).map_err(|e| self.error(name, e))?;
        }
        File::open(&self.tmp)
            .and_then(|d| d.sync_all())
            .map_err(|err| Error::Io { path: self.dest.display().to_string(), err })?;
        let bytes = disk_usage(&self.tmp);
        Self::check_dest(&self.dest, self.force)?;
        if self.dest.exists() {
            exchange(&self.tmp, &self.dest)?;
            // The old snapshot now sits at the temporary name; Drop removes it. A VM resumed from
            // it keeps its memory file: renaming and unlinking never change a mapped file.
        } else {
            std::fs::rename(&self.tmp, &self.dest).map_err(io_err(&self.dest))?;
            self.committed = true;
        }
        // The snapshot is in place and its files are durable: a failure to sync the parent
        // directory only risks the rename itself, and is no reason to report the snapshot lost.
        if let Err(e) = sync_dir(&parent_of(&self.dest)) {
            eprintln!("warning: snapshot written, but {e}");
        }
        Ok((bytes, manifest.id()))
    }
}

/// Copies the whole of `src` into `dst` (made as long): a reflink (FICLONE) if the file system
/// can, else the data regions only, so holes stay holes.
pub fn copy_sparse(src: &File, dst: &File) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    if rustix::fs::ioctl_ficlone(dst, src).is_ok() {
        return Ok(());
    }
    let len = src.metadata()?.len();
    dst.set_len(len)?;
    for_each_data_piece(src, len, |at, piece| dst.write_all_at(piece, at))
}

/// Calls `f(offset, bytes)` for the data of the first `len` bytes of `src`, in pieces of at most
/// 1 MiB, skipping its holes (SEEK_DATA / SEEK_HOLE).
pub fn for_each_data_piece(
    src: &File,
    len: u64,
    mut f: impl FnMut(u64, &[u8]) -> std::io::Result<()>,
) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0;
    while pos < len {
        let data = match rustix::fs::seek(src, rustix::fs::SeekFrom::Data(pos)) {
            Ok(d) => d,
            Err(rustix::io::Errno::NXIO) => break,
            Err(e) => return Err(e.into()),
        };
        let hole = rustix::fs::seek(src, rustix::fs::SeekFrom::Hole(data)).map_err(std::io::Error::from)?.min(len);
        let mut at = data;
        while at < hole {
            let n = (hole - at).min(buf.len() as u64) as usize;
            src.read_exact_at(&mut buf[..n], at)?;
            f(at, &buf[..n])?;
            at += n as u64;
        }
        pos = hole.max(data);
    }
    Ok(())
}

/// Bytes the files of a snapshot directory take on disk (holes excluded).
fn disk_usage(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .flatten()
        .filter(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            [MANIFEST_FILE, STATE_FILE, MEMORY_FILE].contains(&name.as_ref()) || DiskCopy::valid_name(&name)
        })
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.blocks() * 512)
        .sum()
}

impl Drop for SnapshotWriter {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
    }
}

/// Removes temporary snapshot directories (`PREFIX...`) left by writers that died: a live
/// writer holds its directory's lock, so one whose lock can be taken will never be finished.
fn remove_abandoned(parent: &Path, prefix: &str) {
    let Ok(entries) = std::fs::read_dir(parent) else { return };
    for entry in entries.flatten() {
        if !entry.file_name().to_string_lossy().starts_with(prefix) {
            continue;
        }
        let Ok(dir) = File::open(entry.path()) else { continue };
        if dir.try_lock().is_ok() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Atomically swaps two directories (renameat2 RENAME_EXCHANGE).
fn exchange(a: &Path, b: &Path) -> Result<()> {
    use rustix::fs::{renameat_with, RenameFlags, CWD};
    renameat_with(CWD, a, CWD, b, RenameFlags::EXCHANGE)
        .map_err(|e| Error::Io { path: b.display().to_string(), err: e.into() })
}

/// An existing snapshot, its manifest checked.
pub struct Snapshot {
    pub dir: PathBuf,
    pub id: SnapshotId,
    pub manifest: Manifest,
}

impl Snapshot {
    /// Opens `dir`: the manifest must decode and check, and the files must have the sizes it says.
    /// A file that cannot be read (permissions, I/O) is an I/O error naming it, not "not a
    /// snapshot": only a missing manifest means that.
    pub fn open(dir: &Path) -> Result<Self> {
        // A link (a checkpoint directory's `latest`) is followed once: every file is then read
        // from the one snapshot it named, even if it is switched to another meanwhile.
        let resolved;
        let dir = match std::fs::symlink_metadata(dir) {
            Ok(m) if m.file_type().is_symlink() => {
                resolved = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
                resolved.as_path()
            }
            _ => dir,
        };
        let what = dir.display().to_string();
        match std::fs::metadata(dir) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err(Error::NotASnapshot(what, "not a directory")),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::NotASnapshot(what, "no such directory"))
            }
            Err(err) => return Err(Error::Io { path: what, err }),
        }
        let manifest_path = dir.join(MANIFEST_FILE);
        let bytes = std::fs::read(&manifest_path).map_err(|err| match err.kind() {
            std::io::ErrorKind::NotFound => Error::NotASnapshot(what.clone(), "no manifest"),
            _ => Error::Io { path: manifest_path.display().to_string(), err },
        })?;
        let decoded = Manifest::decode(&bytes, &what)?;
        let snap = Self { dir: dir.to_path_buf(), id: decoded.id, manifest: decoded.manifest };
        snap.check_size(STATE_FILE, snap.manifest.state.size)?;
        snap.check_size(MEMORY_FILE, snap.manifest.memory.total_size())?;
        Ok(snap)
    }

    /// The path of a disk copy, checked: a name of our own (never a path out of the directory)
    /// and the length the manifest says.
    pub fn check_disk_copy(&self, copy: &DiskCopy) -> Result<PathBuf> {
        let bad = |problem: String| Error::BadDiskCopy { file: copy.file.clone(), problem };
        if !DiskCopy::valid_name(&copy.file) {
            return Err(bad("not a name a snapshot's disk copy has".into()));
        }
        if let Some(ranges) = &copy.ranges {
            let mut end = 0;
            for &(s, e) in ranges {
                if s < end || e <= s || e > copy.size {
                    return Err(bad(format!(
                        "said to hold the bytes {s}..{e}, which are out of order or past its end"
                    )));
                }
                end = e;
            }
        }
        let path = self.dir.join(&copy.file);
        match std::fs::metadata(&path) {
            Ok(m) if m.is_file() && m.len() == copy.size => Ok(path),
            Ok(m) => Err(bad(format!("{} bytes, the manifest says {}", m.len(), copy.size))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(bad("missing".into())),
            Err(err) => Err(Error::Io { path: path.display().to_string(), err }),
        }
    }

    fn check_size(&self, file: &'static str, expected: u64) -> Result<()> {
        let path = self.dir.join(file);
        let actual = std::fs::metadata(&path)
            .map_err(|err| match err.kind() {
                std::io::ErrorKind::NotFound => Error::MissingFile(self.dir.display().to_string(), file),
                _ => Error::Io { path: path.display().to_string(), err },
            })?
            .len();
        if actual != expected {
            return Err(Error::Truncated { file, expected, actual });
        }
        Ok(())
    }

    /// Reads the machine state, checking its checksum.
    pub fn read_state(&self) -> Result<Vec<u8>> {
        self.check_size(STATE_FILE, self.manifest.state.size)?;
        let path = self.dir.join(STATE_FILE);
        let bytes = std::fs::read(&path).map_err(io_err(&path))?;
        if bytes.len() as u64 != self.manifest.state.size {
            return Err(Error::Truncated {
                file: STATE_FILE,
                expected: self.manifest.state.size,
                actual: bytes.len() as u64,
            });
        }
        if checksum(&bytes) != self.manifest.state.checksum {
            return Err(Error::StateChecksum);
        }
        Ok(bytes)
    }

    pub fn memory_path(&self) -> PathBuf {
        self.dir.join(MEMORY_FILE)
    }

    /// Checks every memory chunk's checksum.
    pub fn verify_memory(&self) -> Result<()> {
        let path = self.memory_path();
        let file = File::open(&path).map_err(io_err(&path))?;
        pages::verify_pages(&file, &path, &self.manifest.memory)
    }

    /// Checks everything: manifest (done by `open`), state, memory, and that each disk copy is
    /// there with its size (their content has no checksum).
    pub fn verify(&self) -> Result<()> {
        self.read_state()?;
        self.verify_memory()?;
        for copy in self.manifest.vm.disks.iter().filter_map(|d| d.copy.as_ref()) {
            self.check_disk_copy(copy)?;
        }
        Ok(())
    }

    /// Bytes the snapshot takes on disk (holes excluded).
    pub fn disk_usage(&self) -> u64 {
        disk_usage(&self.dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::tests::sample;
    use crate::pages::MemorySource;

    /// A scratch directory, removed when dropped.
    struct Scratch(PathBuf, #[allow(dead_code)] tempfile::TempDir);
    impl Scratch {
        fn new(tag: &str) -> Self {
            let dir = tempfile::Builder::new().prefix(&format!("snapshot-dir-{tag}-")).tempdir().unwrap();
            Self(dir.path().to_path_buf(), dir)
        }
    }

    fn write(dest: &Path, force: bool, fill: u8) -> Result<()> {
        let w = SnapshotWriter::create(dest, force)?;
        let mut m = sample();
        m.state = w.write_state(b"machine state")?;
        let mem = vec![fill; 2 << 20];
        let sources = [MemorySource { guest_addr: 0, bytes: &mem, kinds: None, backing: None }];
        m.memory = w.write_memory(MemoryData::Sources(&sources), &Progress::default())?;
        w.commit(&m).map(|_| ())
    }

    #[test]
    fn write_open_verify() {
        let s = Scratch::new("wov");
        let dest = s.0.join("snap");
        write(&dest, false, 7).unwrap();
        let snap = Snapshot::open(&dest).unwrap();
        snap.verify().unwrap();
        assert_eq!(snap.read_state().unwrap(), b"machine state");
        // No temporary directories left behind.
        assert_eq!(std::fs::read_dir(&s.0).unwrap().count(), 1);
        // Private whatever the umask (the test runs under the default one).
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&dest).unwrap().permissions().mode() & 0o777, 0o700);
        for f in [MANIFEST_FILE, STATE_FILE, MEMORY_FILE] {
            assert_eq!(std::fs::metadata(dest.join(f)).unwrap().permissions().mode() & 0o777, 0o600, "{f}");
        }
    }

    #[test]
    fn existing_destination_needs_force_and_is_replaced_whole() {
        let s = Scratch::new("force");
        let dest = s.0.join("snap");
        write(&dest, false, 1).unwrap();
        assert!(matches!(write(&dest, false, 2), Err(Error::AlreadyExists(_))));
        write(&dest, true, 3).unwrap();
        let snap = Snapshot::open(&dest).unwrap();
        snap.verify().unwrap();
        let mut b = [0u8; 1];
        std::os::unix::fs::FileExt::read_exact_at(&File::open(snap.memory_path()).unwrap(), &mut b, 0).unwrap();
        assert_eq!(b[0], 3);
        assert_eq!(std::fs::read_dir(&s.0).unwrap().count(), 1, "old snapshot left behind");
        // A snapshot directory holding anything else is not replaced either.
        std::fs::write(dest.join("disk.img"), b"user data").unwrap();
        assert!(matches!(write(&dest, true, 5), Err(Error::RefuseReplace(_))));
        assert!(dest.join("disk.img").exists());
        // A directory that is not a snapshot is never replaced.
        let other = s.0.join("home");
        std::fs::create_dir(&other).unwrap();
        std::fs::write(other.join("precious"), b"x").unwrap();
        assert!(matches!(write(&other, true, 4), Err(Error::RefuseReplace(_))));
        assert!(other.join("precious").exists());
    }

    #[test]
    fn leftovers_of_dead_writers_are_removed() {
        let s = Scratch::new("leftovers");
        let dest = s.0.join("snap");
        // A writer that died (nobody holds its lock), and one that still writes (holds it).
        let dead = s.0.join(".snap.tmp-999999999-1");
        let live = s.0.join(format!(".snap.tmp-{}-1", std::process::id()));
        std::fs::create_dir(&dead).unwrap();
        std::fs::create_dir(&live).unwrap();
        let live_lock = File::open(&live).unwrap();
        live_lock.lock().unwrap();
        write(&dest, false, 1).unwrap();
        assert!(!dead.exists());
        assert!(live.exists());
    }

    #[test]
    fn abandoned_writer_leaves_nothing() {
        let s = Scratch::new("abandon");
        let dest = s.0.join("snap");
        {
            let w = SnapshotWriter::create(&dest, false).unwrap();
            w.write_state(b"half").unwrap();
        }
        assert!(!dest.exists());
        assert_eq!(std::fs::read_dir(&s.0).unwrap().count(), 0);
    }

    #[test]
    fn damage_is_detected_and_located() {
        let s = Scratch::new("damage");
        let dest = s.0.join("snap");
        write(&dest, false, 9).unwrap();
        // Truncated memory.
        let mem = dest.join(MEMORY_FILE);
        let f = OpenOptions::new().write(true).open(&mem).unwrap();
        f.set_len(1 << 20).unwrap();
        assert!(matches!(Snapshot::open(&dest), Err(Error::Truncated { file: MEMORY_FILE, .. })));
        f.set_len(2 << 20).unwrap();
        assert!(matches!(Snapshot::open(&dest).unwrap().verify_memory(), Err(Error::MemoryChecksum { chunk: 1, .. })));
        // A flipped bit in the state.
        let state = dest.join(STATE_FILE);
        let mut bytes = std::fs::read(&state).unwrap();
        bytes[3] ^= 0x10;
        std::fs::write(&state, &bytes).unwrap();
        assert!(matches!(Snapshot::open(&dest).unwrap().read_state(), Err(Error::StateChecksum)));
        // Not a snapshot at all.
        assert!(matches!(Snapshot::open(&s.0), Err(Error::NotASnapshot(..))));
        // A missing file is named.
        std::fs::remove_file(&state).unwrap();
        assert!(matches!(Snapshot::open(&dest), Err(Error::MissingFile(_, STATE_FILE))));
    }
}
