//! The manifest: what the snapshot is (format version, VM description, memory layout, host CPU)
//! and the checksums of everything else. Stored as one header line carrying the format version
//! and a checksum of the JSON body that follows, so a flipped bit anywhere is caught before the
//! body is trusted.

use serde::{Deserialize, Serialize};

use crate::digest::checksum;
use crate::pages::MemoryLayout;
use crate::{Error, Result, FORMAT_VERSION};

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
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskDescription {
    pub path: String,
    pub read_only: bool,
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

/// Size and checksum of a file of the snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileDigest {
    pub size: u64,
    pub checksum: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    /// Seconds since the Unix epoch when the snapshot was taken.
    pub created_unix: u64,
    pub vmm_version: String,
    pub vm: VmDescription,
    pub host_cpu: CpuIdentity,
    pub vcpus: Vec<VcpuSummary>,
    pub devices: Vec<DeviceSummary>,
    pub state: FileDigest,
    pub memory: MemoryLayout,
}

impl Manifest {
    /// Encodes the manifest: `VMM-SNAPSHOT format=1 checksum=HEX\n` then the JSON body.
    pub fn encode(&self) -> Vec<u8> {
        let body = serde_json::to_vec_pretty(self).expect("manifest serializes");
        let mut out =
            format!("{MAGIC} format={} checksum={:016x}\n", self.format_version, checksum(&body)).into_bytes();
        out.extend_from_slice(&body);
        out
    }

    /// Decodes and checks a manifest. `what` names the snapshot in errors.
    pub fn decode(bytes: &[u8], what: &str) -> Result<Self> {
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
        // Exactly 16 lowercase hex digits, so no other spelling of the same value passes.
        let hex = field(words.next(), "checksum=")?;
        let canonical = hex.len() == 16 && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        let expected = u64::from_str_radix(&hex, 16)
            .ok()
            .filter(|_| canonical)
            .ok_or_else(|| Error::CorruptManifest("bad checksum field".into()))?;
        if words.next().is_some() {
            return Err(Error::CorruptManifest("trailing header fields".into()));
        }
        let body = &bytes[newline + 1..];
        if checksum(body) != expected {
            return Err(Error::CorruptManifest("checksum mismatch".into()));
        }
        let manifest: Manifest = serde_json::from_slice(body).map_err(|e| Error::CorruptManifest(e.to_string()))?;
        if manifest.format_version != version {
            return Err(Error::CorruptManifest("header and body disagree on the format version".into()));
        }
        manifest.memory.validate().map_err(Error::CorruptManifest)?;
        if manifest.state.size > crate::MAX_STATE_BYTES {
            return Err(Error::CorruptManifest(format!("state size {} is implausible", manifest.state.size)));
        }
        Ok(manifest)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::pages::{MemoryLayout, RegionLayout};

    pub fn sample() -> Manifest {
        Manifest {
            format_version: FORMAT_VERSION,
            created_unix: 1,
            vmm_version: "0.1.0".into(),
            vm: VmDescription {
                name: "vm".into(),
                vcpus: 2,
                mem_bytes: 1 << 21,
                kernel: "/k".into(),
                cmdline: "".into(),
                disks: vec![],
            },
            host_cpu: CpuIdentity::default(),
            vcpus: vec![],
            devices: vec![],
            state: FileDigest { size: 3, checksum: 7 },
            memory: MemoryLayout {
                page_size: 4096,
                chunk_size: 1 << 20,
                regions: vec![RegionLayout { guest_addr: 0, size: 1 << 21, file_offset: 0 }],
                chunk_checksums: vec![1, 2],
                zero_pages: 0,
            },
        }
    }

    #[test]
    fn round_trip() {
        let m = sample();
        assert_eq!(Manifest::decode(&m.encode(), "x").unwrap(), m);
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
            let mut bytes = format!("VMM-SNAPSHOT format=1 checksum={:016x}\n", checksum(&body)).into_bytes();
            bytes.extend_from_slice(&body);
            let _ = Manifest::decode(&bytes, "fuzz");
        }
    }

    #[test]
    fn wrong_version_and_garbage() {
        let text = String::from_utf8(sample().encode()).unwrap().replacen("format=1", "format=9", 1);
        assert!(matches!(Manifest::decode(text.as_bytes(), "x"), Err(Error::UnsupportedVersion { found: 9, .. })));
        assert!(matches!(Manifest::decode(b"hello\nworld", "x"), Err(Error::NotASnapshot(..))));
        assert!(matches!(Manifest::decode(b"", "x"), Err(Error::NotASnapshot(..))));
        let encoded = sample().encode();
        for cut in [1, 20, encoded.len() / 2, encoded.len() - 1] {
            assert!(Manifest::decode(&encoded[..cut], "x").is_err(), "truncated at {cut}");
        }
    }
}
