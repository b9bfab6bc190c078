//! The manifest: what the snapshot is (format version, VM description, memory layout, host CPU)
//! and the checksums of everything else. Stored as one header line carrying the format version
//! and the snapshot's id, a 128-bit hash of the JSON body that follows: a flipped bit anywhere is
//! caught before the body is trusted, and a child snapshot names its parent by that id.

use serde::{Deserialize, Serialize};

use crate::digest::checksum128;
use crate::pages::MemoryLayout;
use crate::state::SectionSummary;
use crate::{Error, Result, FORMAT_VERSION};

/// A snapshot's id: 32 lowercase hex digits, the xxh3-128 hash of its manifest's body.
pub type SnapshotId = String;

const MAGIC: &str = "VMM-SNAPSHOT";

/// How to recreate the VM (what `vmm run` was given).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmDescription {
    pub name: String,
    pub vcpus: u8,
    pub mem_bytes: u64,
    pub kernel: String,
    pub cmdline: String,
    pub disks: Vec<DiskDescription>,
    /// Network interfaces, in device order.
    #[serde(default)]
    pub nets: Vec<NetDescription>,
    #[serde(default)]
    pub vsock: Option<VsockDescription>,
}

/// A virtio-vsock device: the guest's context id and the host side's Unix socket.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockDescription {
    pub cid: u64,
    pub uds: String,
}

/// A network interface: the host TAP device it was attached to, and the guest's MAC address.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetDescription {
    pub tap: String,
    /// `xx:xx:xx:xx:xx:xx`.
    pub mac: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskDescription {
    pub path: String,
    pub read_only: bool,
    /// The disk file as it was when the snapshot was taken: resume refuses one that changed
    /// (disks without a copy in the snapshot).
    #[serde(default)]
    pub identity: Option<FileIdentity>,
    /// The disk's content at the pause instant, as a file of the snapshot directory.
    #[serde(default)]
    pub copy: Option<DiskCopy>,
}

/// A disk copied into a snapshot directory (sparse: holes stay holes).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskCopy {
    /// File name in the snapshot directory (`disk0.img`, ...).
    pub file: String,
    /// Its length in bytes.
    pub size: u64,
    /// In a diff: the byte ranges [start, end) of the disk this copy holds (written since the
    /// parent; a hole in them is zeros), sorted; the rest is the parent's copy. None: the whole disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ranges: Option<Vec<(u64, u64)>>,
}

impl DiskCopy {
    /// The name of disk `index`'s copy.
    pub fn file_name(index: usize) -> String {
        format!("disk{index}.img")
    }

    /// Whether `name` is one a snapshot's disk copy may have (a plain file name, nothing else).
    pub fn valid_name(name: &str) -> bool {
        name.strip_prefix("disk")
            .and_then(|n| n.strip_suffix(".img"))
            .is_some_and(|n| !n.is_empty() && n.len() <= 4 && n.bytes().all(|b| b.is_ascii_digit()))
    }
}

/// What identifies a file's content without reading it (stat(2) fields).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileIdentity {
    pub dev: u64,
    pub ino: u64,
    /// Size in bytes.
    pub size: u64,
    /// Last modification, in nanoseconds since the Unix epoch.
    pub mtime_ns: i128,
    /// Last status change (ctime), in nanoseconds since the Unix epoch: unlike the mtime, no one
    /// can set it back, so a write that restores the mtime (`rsync --inplace -t`) still shows.
    #[serde(default)]
    pub ctime_ns: i128,
}

impl FileIdentity {
    pub fn of(meta: &std::fs::Metadata) -> Self {
        use std::os::unix::fs::MetadataExt;
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
            ctime_ns: i128::from(meta.ctime()) * 1_000_000_000 + i128::from(meta.ctime_nsec()),
        }
    }

    /// What differs from `now`, in words, or None if nothing does.
    pub fn changes(&self, now: &FileIdentity) -> Option<String> {
        if (self.dev, self.ino) != (now.dev, now.ino) {
            Some("it is another file now".into())
        } else if self.size != now.size {
            Some(format!("its size changed from {} to {} bytes", self.size, now.size))
        } else if self.mtime_ns != now.mtime_ns {
            Some("it was modified".into())
        } else if self.ctime_ns != 0 && self.ctime_ns != now.ctime_ns {
            Some("it was modified, or its attributes were".into())
        } else {
            None
        }
    }
}

/// The host CPU the snapshot was taken on; resume checks the features the guest may use.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuIdentity {
    pub vendor: String,
    pub family: u32,
    pub model: u32,
    pub stepping: u32,
    /// CPUID leaf 1 ECX/EDX and leaf 7.0 EBX/ECX/EDX feature words.
    pub feature_words: Vec<u32>,
}

/// What a guest needs of the CPU it runs on: what a destination checks before it accepts a
/// migration.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestCpu {
    /// The guest's CPUID leaf 1 ECX/EDX and leaf 7.0 EBX/ECX/EDX feature words (as
    /// [`CpuIdentity::feature_words`]).
    pub feature_words: Vec<u32>,
    /// Indices of the MSRs its vCPU state carries (KVM_GET_MSR_INDEX_LIST of its host).
    pub msrs: Vec<u32>,
}

/// A vCPU at a glance, for `vmm inspect`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuSummary {
    pub index: u8,
    pub mode: String,
    pub rip: u64,
}

/// A device at a glance, for `vmm inspect`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceSummary {
    pub kind: String,
    pub detail: String,
}

/// Size and checksum of the state file, and what it holds.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateDigest {
    /// Bytes.
    pub size: u64,
    /// xxh3-64.
    pub checksum: u64,
    #[serde(default)]
    pub sections: Vec<SectionSummary>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    /// The snapshot this one is a difference from: its memory extents of kind `parent` are that
    /// snapshot's (which may itself have a parent).
    #[serde(default)]
    pub parent: Option<SnapshotId>,
    /// Where the parent was (its absolute path) when this diff was taken. A chain whose layers
    /// moved together is still found: a directory of that name beside this one is tried next.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_dir: Option<String>,
    /// Seconds since the Unix epoch when the snapshot was taken.
    pub created_unix: u64,
    pub vmm_version: String,
    pub vm: VmDescription,
    pub host_cpu: CpuIdentity,
    /// The boot id of the host the snapshot was taken on (`/proc/sys/kernel/random/boot_id`): a
    /// stream or migration resumed on that very host may wait for its source to let go of the
    /// TAPs and disks they share.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_boot: Option<String>,
    /// What the guest needs of the CPU (a migration's manifest).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_cpu: Option<GuestCpu>,
    pub vcpus: Vec<VcpuSummary>,
    pub devices: Vec<DeviceSummary>,
    pub state: StateDigest,
    pub memory: MemoryLayout,
}

/// A manifest as read: its content and its id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecodedManifest {
    pub id: SnapshotId,
    pub manifest: Manifest,
}

fn hex128(v: u128) -> String {
    format!("{v:032x}")
}

impl Manifest {
    /// Encodes the manifest: `VMM-SNAPSHOT format=2 id=HEX32\n` then the JSON body.
    pub fn encode(&self) -> Vec<u8> {
        let body = serde_json::to_vec_pretty(self).expect("manifest serializes");
        let mut out =
            format!("{MAGIC} format={} id={}\n", self.format_version, hex128(checksum128(&body))).into_bytes();
        out.extend_from_slice(&body);
        out
    }

    /// The id `encode` gives this manifest.
    pub fn id(&self) -> SnapshotId {
        let body = serde_json::to_vec_pretty(self).expect("manifest serializes");
        hex128(checksum128(&body))
    }

    /// Decodes and checks a manifest. `what` names the snapshot in errors.
    pub fn decode(bytes: &[u8], what: &str) -> Result<DecodedManifest> {
        Self::decode_as(bytes, what, false)
    }

    /// Decodes and checks the manifest at the head of a stream, whose memory is described by the
    /// frames that follow: its layout has regions, but no extents or checksums.
    pub fn decode_streamed(bytes: &[u8], what: &str) -> Result<DecodedManifest> {
        Self::decode_as(bytes, what, true)
    }

    fn decode_as(bytes: &[u8], what: &str, streamed: bool) -> Result<DecodedManifest> {
        let not_snapshot = |why| Error::NotASnapshot(what.to_string(), why);
        let newline = bytes.iter().position(|b| *b == b'\n').ok_or_else(|| not_snapshot("no manifest header"))?;
        let header = std::str::from_utf8(&bytes[..newline]).map_err(|_| not_snapshot("no manifest header"))?;
        let mut words = header.split(' ');
        if words.next() != Some(MAGIC) {
            return Err(not_snapshot("bad magic"));
        }
        let field = |w: Option<&str>, key: &str| -> Result<String> {
            w.and_then(|w| w.strip_prefix(key))
                .map(str::to_string)
                .ok_or_else(|| Error::CorruptManifest(format!("bad header field, expected {key}...")))
        };
        let version_text = field(words.next(), "format=")?;
        let version: u32 = version_text
            .parse()
            .ok()
            .filter(|v: &u32| v.to_string() == version_text)
            .ok_or_else(|| Error::CorruptManifest("bad format version".into()))?;
        if version != FORMAT_VERSION {
            return Err(Error::UnsupportedVersion { found: version, supported: FORMAT_VERSION });
        }
        // Exactly 32 lowercase hex digits, so no other spelling of the same value passes.
        let id = field(words.next(), "id=")?;
        let canonical = id.len() == 32 && id.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !canonical {
            return Err(Error::CorruptManifest("bad id field".into()));
        }
        if words.next().is_some() {
            return Err(Error::CorruptManifest("trailing header fields".into()));
        }
        let body = &bytes[newline + 1..];
        if hex128(checksum128(body)) != id {
            return Err(Error::CorruptManifest("checksum mismatch".into()));
        }
        let manifest: Manifest = serde_json::from_slice(body).map_err(|e| Error::CorruptManifest(e.to_string()))?;
        if manifest.format_version != version {
            return Err(Error::CorruptManifest("header and body disagree on the format version".into()));
        }
        if streamed {
            manifest.memory.validate_regions().map_err(Error::CorruptManifest)?;
            if !manifest.memory.extents.is_empty() || !manifest.memory.chunk_checksums.is_empty() {
                return Err(Error::CorruptManifest("a streamed manifest describes memory pages".into()));
            }
        } else {
            manifest.memory.validate().map_err(Error::CorruptManifest)?;
        }
        if manifest.state.size > crate::MAX_STATE_BYTES {
            return Err(Error::CorruptManifest(format!("state size {} is implausible", manifest.state.size)));
        }
        if manifest.parent.is_none() && manifest.memory.parent_pages() > 0 {
            return Err(Error::CorruptManifest("memory refers to a parent snapshot, but none is named".into()));
        }
        Ok(DecodedManifest { id, manifest })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::digest::checksum;
    use crate::pages::{Extent, ExtentKind, MemoryLayout, RegionLayout};

    pub fn sample() -> Manifest {
        Manifest {
            format_version: FORMAT_VERSION,
            parent: None,
            parent_dir: None,
            created_unix: 1,
            vmm_version: "0.1.0".into(),
            vm: VmDescription {
                name: "vm".into(),
                vcpus: 2,
                mem_bytes: 1 << 21,
                kernel: "/k".into(),
                cmdline: "".into(),
                disks: vec![],
                nets: vec![],
                vsock: None,
            },
            host_cpu: CpuIdentity::default(),
            host_boot: None,
            guest_cpu: None,
            vcpus: vec![],
            devices: vec![],
            state: StateDigest { size: 3, checksum: 7, sections: vec![] },
            memory: MemoryLayout {
                page_size: 4096,
                chunk_size: 1 << 20,
                regions: vec![RegionLayout { guest_addr: 0, size: 1 << 21, file_offset: 0 }],
                extents: vec![
                    Extent { guest_addr: 0, len: 1 << 20, kind: ExtentKind::Data },
                    Extent { guest_addr: 1 << 20, len: 1 << 20, kind: ExtentKind::Zero },
                ],
                chunk_checksums: vec![1, 2],
                hot: Vec::new(),
            },
        }
    }

    #[test]
    fn round_trip() {
        let m = sample();
        let decoded = Manifest::decode(&m.encode(), "x").unwrap();
        assert_eq!(decoded.manifest, m);
        assert_eq!(decoded.id, m.id());
        assert_eq!(decoded.id.len(), 32);
        let mut child = m.clone();
        child.parent = Some(decoded.id.clone());
        child.memory.extents[1].kind = ExtentKind::Parent;
        assert_ne!(child.id(), decoded.id);
        assert_eq!(Manifest::decode(&child.encode(), "x").unwrap().manifest, child);
        // Parent pages without a parent are refused.
        child.parent = None;
        assert!(matches!(Manifest::decode(&child.encode(), "x"), Err(Error::CorruptManifest(_))));
    }

    #[test]
    fn unknown_fields_are_ignored_so_older_readers_read_newer_manifests() {
        let m = sample();
        let text = String::from_utf8(m.encode()).unwrap();
        let body = text.split_once('\n').unwrap().1.replacen('{', "{\n  \"added_later\": [1, 2],", 1);
        let bytes = format!("VMM-SNAPSHOT format=2 id={:032x}\n{body}", checksum128(body.as_bytes()));
        assert_eq!(Manifest::decode(bytes.as_bytes(), "x").unwrap().manifest, m);
    }

    #[test]
    fn every_flipped_bit_is_caught() {
        let bytes = sample().encode();
        for i in 0..bytes.len() {
            for bit in 0..8 {
                let mut b = bytes.clone();
                b[i] ^= 1 << bit;
                assert!(Manifest::decode(&b, "x").is_err(), "flip of bit {bit} in byte {i} went unnoticed");
            }
        }
    }

    /// A small deterministic fuzzer: random edits of a valid manifest (with the checksum fixed up,
    /// so the JSON parser and the layout checks see them) never panic.
    #[test]
    fn random_edits_never_panic() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut rand = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let good = sample().encode();
        let newline = good.iter().position(|b| *b == b'\n').unwrap();
        for _ in 0..20_000 {
            let mut body = good[newline + 1..].to_vec();
            for _ in 0..1 + rand() % 4 {
                let at = (rand() as usize) % body.len();
                match rand() % 3 {
                    0 => body[at] = b"0123456789{}[]\",:-e.\" xa"[(rand() % 22) as usize],
                    1 => {
                        body.remove(at);
                    }
                    _ => body.insert(at, b"9-0\"e"[(rand() % 5) as usize]),
                }
            }
            let mut bytes = format!("VMM-SNAPSHOT format=2 id={:032x}\n", checksum128(&body)).into_bytes();
            bytes.extend_from_slice(&body);
            let _ = Manifest::decode(&bytes, "fuzz");
        }
    }

    #[test]
    fn wrong_version_and_garbage() {
        let text = String::from_utf8(sample().encode()).unwrap().replacen("format=2", "format=9", 1);
        assert!(matches!(Manifest::decode(text.as_bytes(), "x"), Err(Error::UnsupportedVersion { found: 9, .. })));
        let v1 = format!("VMM-SNAPSHOT format=1 checksum={:016x}\n{{}}", checksum(b"{}"));
        let err = Manifest::decode(v1.as_bytes(), "x").unwrap_err();
        assert!(matches!(err, Error::UnsupportedVersion { found: 1, .. }));
        assert!(err.to_string().contains("version 1"), "{err}");
        assert!(matches!(Manifest::decode(b"hello\nworld", "x"), Err(Error::NotASnapshot(..))));
        assert!(matches!(Manifest::decode(b"", "x"), Err(Error::NotASnapshot(..))));
        let encoded = sample().encode();
        for cut in [1, 20, encoded.len() / 2, encoded.len() - 1] {
            assert!(Manifest::decode(&encoded[..cut], "x").is_err(), "truncated at {cut}");
        }
    }
}
