//! The snapshot directory: written atomically (temporary sibling, fsync, rename) and opened with
//! every size and checksum checked before anything is trusted.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::digest::checksum;
use crate::manifest::{FileDigest, Manifest};
use crate::pages::{self, MemoryLayout, MemorySource, StagedMemory};
use crate::{io_err, Error, Result, MANIFEST_FILE, MEMORY_FILE, STATE_FILE};

/// Builds a snapshot in a temporary sibling of its destination; `commit` makes it appear whole.
/// Dropped without commit, it removes what it wrote and leaves the destination untouched.
pub struct SnapshotWriter {
    dest: PathBuf,
    tmp: PathBuf,
    force: bool,
    committed: bool,
}

fn sync_dir(path: &Path) -> Result<()> {
    File::open(path).and_then(|d| d.sync_all()).map_err(io_err(path))
}

/// A directory `--force` may replace (and then delete): an empty one, or one holding only a
/// snapshot's files, whose manifest decodes. Anything else in it might be the user's.
fn looks_like_snapshot(dir: &Path) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else { return false };
    let names: Vec<_> = entries.filter_map(|e| e.ok().map(|e| e.file_name())).collect();
    if names.is_empty() {
        return true;
    }
    names.iter().all(|n| [MANIFEST_FILE, STATE_FILE, MEMORY_FILE].iter().any(|f| n.as_os_str() == *f))
        && std::fs::read(dir.join(MANIFEST_FILE))
            .is_ok_and(|bytes| Manifest::decode(&bytes, &dir.display().to_string()).is_ok())
}

impl SnapshotWriter {
    /// Prepares to write a snapshot to `dest`. An existing `dest` is refused unless `force`, and
    /// even then only if it is a snapshot (or empty).
    pub fn create(dest: &Path, force: bool) -> Result<Self> {
        Self::check_dest(dest, force)?;
        let parent = match dest.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let name = dest.file_name().ok_or_else(|| Error::NotASnapshot(dest.display().to_string(), "no name"))?;
        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        let prefix = format!(".{}.tmp-", name.to_string_lossy());
        remove_abandoned(&parent, &prefix);
        let tmp = parent.join(format!("{prefix}{}-{nanos}", std::process::id()));
        std::fs::create_dir(&tmp).map_err(io_err(&tmp))?;
        Ok(Self { dest: dest.to_path_buf(), tmp, force, committed: false })
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

    fn create_file(&self, name: &str) -> Result<(File, PathBuf)> {
        let path = self.tmp.join(name);
        let file = OpenOptions::new().read(true).write(true).create_new(true).open(&path).map_err(io_err(&path))?;
        Ok((file, path))
    }

    /// Writes the machine state; returns its digest for the manifest.
    pub fn write_state(&self, bytes: &[u8]) -> Result<FileDigest> {
        let (mut file, path) = self.create_file(STATE_FILE)?;
        file.write_all(bytes).map_err(io_err(&path))?;
        Ok(FileDigest { size: bytes.len() as u64, checksum: checksum(bytes) })
    }

    /// Writes guest memory (zero pages become holes) and returns its layout with checksums.
    pub fn write_memory(&self, sources: &[MemorySource<'_>]) -> Result<MemoryLayout> {
        let (file, path) = self.create_file(MEMORY_FILE)?;
        pages::write_pages(&file, &path, sources)
    }

    /// Writes memory copied aside while the guest was paused, like `write_memory`.
    pub fn write_staged_memory(&self, staged: &StagedMemory) -> Result<MemoryLayout> {
        let (file, path) = self.create_file(MEMORY_FILE)?;
        pages::write_staged(&file, &path, staged)
    }

    /// Writes the manifest, makes everything durable and moves the snapshot into place. Until the
    /// final rename (or exchange, with `force`) the destination is untouched. Returns the bytes
    /// the snapshot takes on disk.
    pub fn commit(mut self, manifest: &Manifest) -> Result<u64> {
        let (mut file, path) = self.create_file(MANIFEST_FILE)?;
        file.write_all(&manifest.encode()).map_err(io_err(&path))?;
        for name in [STATE_FILE, MEMORY_FILE, MANIFEST_FILE] {
            let p = self.tmp.join(name);
            File::open(&p).and_then(|f| f.sync_all()).map_err(io_err(&p))?;
        }
        sync_dir(&self.tmp)?;
        let bytes = disk_usage(&self.tmp);
        Self::check_dest(&self.dest, self.force)?;
        if self.dest.exists() {
            exchange(&self.tmp, &self.dest)?;
            // The old snapshot now sits at the temporary name; Drop removes it.
        } else {
            std::fs::rename(&self.tmp, &self.dest).map_err(io_err(&self.dest))?;
            self.committed = true;
        }
        // The snapshot is in place and its files are durable: a failure to sync the parent
        // directory only risks the rename itself, and is no reason to report the snapshot lost.
        let parent = self.dest.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        if let Err(e) = sync_dir(parent) {
            eprintln!("warning: snapshot written, but {e}");
        }
        Ok(bytes)
    }
}

/// Bytes the files of a snapshot directory take on disk (holes excluded).
fn disk_usage(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    [MANIFEST_FILE, STATE_FILE, MEMORY_FILE]
        .iter()
        .filter_map(|f| std::fs::metadata(dir.join(f)).ok())
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

/// Removes temporary snapshot directories (`PREFIX<pid>-<nanos>`) left by writers that died:
/// their process is gone, so nobody will finish them.
fn remove_abandoned(parent: &Path, prefix: &str) {
    let Ok(entries) = std::fs::read_dir(parent) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix(prefix).and_then(|rest| rest.split('-').next()) else { continue };
        let Ok(pid) = pid.parse::<u32>() else { continue };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Atomically swaps two directories (renameat2 RENAME_EXCHANGE).
fn exchange(a: &Path, b: &Path) -> Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let ca =
        std::ffi::CString::new(a.as_os_str().as_bytes()).map_err(|_| Error::RefuseReplace(a.display().to_string()))?;
    let cb =
        std::ffi::CString::new(b.as_os_str().as_bytes()).map_err(|_| Error::RefuseReplace(b.display().to_string()))?;
    // SAFETY: both paths are valid NUL-terminated strings that outlive the call.
    let rc =
        unsafe { libc::renameat2(libc::AT_FDCWD, ca.as_ptr(), libc::AT_FDCWD, cb.as_ptr(), libc::RENAME_EXCHANGE) };
    if rc != 0 {
        return Err(Error::Io { path: b.display().to_string(), err: std::io::Error::last_os_error() });
    }
    Ok(())
}

/// An existing snapshot, its manifest checked.
pub struct Snapshot {
    pub dir: PathBuf,
    pub manifest: Manifest,
}

impl Snapshot {
    /// Opens `dir`: the manifest must decode and check, and the files must have the sizes it says.
    pub fn open(dir: &Path) -> Result<Self> {
        let what = dir.display().to_string();
        if !dir.is_dir() {
            return Err(Error::NotASnapshot(what, "not a directory"));
        }
        let manifest_path = dir.join(MANIFEST_FILE);
        let bytes = std::fs::read(&manifest_path).map_err(|_| Error::NotASnapshot(what.clone(), "no manifest"))?;
        let manifest = Manifest::decode(&bytes, &what)?;
        let snap = Self { dir: dir.to_path_buf(), manifest };
        snap.check_size(STATE_FILE, snap.manifest.state.size)?;
        snap.check_size(MEMORY_FILE, snap.manifest.memory.total_size())?;
        Ok(snap)
    }

    fn check_size(&self, file: &'static str, expected: u64) -> Result<()> {
        let path = self.dir.join(file);
        let actual = std::fs::metadata(&path)
            .map_err(|_| Error::NotASnapshot(self.dir.display().to_string(), "a file is missing"))?
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

    /// Checks everything: manifest (done by `open`), state and memory.
    pub fn verify(&self) -> Result<()> {
        self.read_state()?;
        self.verify_memory()
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

    struct Scratch(PathBuf);
    impl Scratch {
        fn new(tag: &str) -> Self {
            let p = std::env::temp_dir().join(format!("snapshot-dir-{}-{tag}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            Self(p)
        }
    }
    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn write(dest: &Path, force: bool, fill: u8) -> Result<()> {
        let w = SnapshotWriter::create(dest, force)?;
        let mut m = sample();
        m.state = w.write_state(b"machine state")?;
        let mem = vec![fill; 2 << 20];
        m.memory = w.write_memory(&[MemorySource { guest_addr: 0, bytes: &mem, kinds: None, backing: None }])?;
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
        // A writer that died (no such pid), and one that still runs (ours).
        let dead = s.0.join(".snap.tmp-999999999-1");
        let live = s.0.join(format!(".snap.tmp-{}-1", std::process::id()));
        std::fs::create_dir(&dead).unwrap();
        std::fs::create_dir(&live).unwrap();
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
    }
}
