//! The machine state: named, versioned sections whose content only their owner understands.
//!
//! This crate stores sections and never looks inside them: the vmm crate decides what a vCPU or
//! a device saves, so adding a device never changes the format. Every section and the list
//! itself are CBOR (RFC 8949, through ciborium): a self-describing encoding, so a struct that
//! gained a field (with a serde default) still reads what an older vmm wrote, and fields it does
//! not know are skipped. Each section carries the version of its layout; its owner refuses a
//! version newer than it knows (see `decode_section`).

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::{Error, Result, MAX_STATE_BYTES};

/// One piece of machine state: a vCPU, the VM's interrupt controllers, the device list...
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Section {
    /// Stable name, e.g. `vm`, `vcpu.0`, `devices`.
    pub name: String,
    /// Version of the section's layout, chosen by its owner.
    pub version: u32,
    /// The owner's encoding of the section (CBOR, see `encode_value`).
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
}

/// Every section of a machine's state, in the order they were saved.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineSections {
    pub sections: Vec<Section>,
}

/// Name and version of a section, as listed in the manifest for `vmm inspect`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SectionSummary {
    pub name: String,
    pub version: u32,
    /// Encoded size in bytes.
    pub bytes: u64,
}

/// Encodes a value as CBOR.
pub fn encode_value<T: Serialize>(value: &T) -> Vec<u8> {
    let mut out = Vec::new();
    // Writing to a Vec cannot fail, and our types have no maps with non-string keys.
    ciborium::into_writer(value, &mut out).expect("CBOR encoding into memory");
    out
}

/// Decodes a CBOR value; `what` names it in the error.
pub fn decode_value<T: DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T> {
    ciborium::from_reader(bytes).map_err(|e| Error::CorruptState(format!("{what}: {e}")))
}

impl MachineSections {
    pub fn push<T: Serialize>(&mut self, name: impl Into<String>, version: u32, value: &T) {
        self.sections.push(Section { name: name.into(), version, data: encode_value(value) });
    }

    pub fn encode(&self) -> Vec<u8> {
        encode_value(self)
    }

    pub fn decode(bytes: &[u8]) -> Result<Self> {
        if bytes.len() as u64 > MAX_STATE_BYTES {
            return Err(Error::CorruptState(format!("{} bytes of state is implausible", bytes.len())));
        }
        let sections: Self = decode_value(bytes, "section list")?;
        for (i, s) in sections.sections.iter().enumerate() {
            if sections.sections[..i].iter().any(|o| o.name == s.name) {
                return Err(Error::CorruptState(format!("section '{}' appears twice", s.name)));
            }
        }
        Ok(sections)
    }

    pub fn get(&self, name: &str) -> Result<&Section> {
        self.sections.iter().find(|s| s.name == name).ok_or_else(|| Error::MissingSection(name.to_string()))
    }

    /// Decodes section `name`, refusing a layout version newer than `current`.
    pub fn decode_section<T: DeserializeOwned>(&self, name: &str, current: u32) -> Result<T> {
        let section = self.get(name)?;
        if section.version > current {
            return Err(Error::NewerSection { name: name.to_string(), found: section.version, supported: current });
        }
        decode_value(&section.data, name)
    }

    pub fn summary(&self) -> Vec<SectionSummary> {
        self.sections
            .iter()
            .map(|s| SectionSummary { name: s.name.clone(), version: s.version, bytes: s.data.len() as u64 })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct Old {
        a: u32,
        bytes: Vec<u8>,
    }

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct New {
        a: u32,
        bytes: Vec<u8>,
        #[serde(default)]
        added: Option<u64>,
    }

    #[test]
    fn sections_round_trip_and_tolerate_added_fields() {
        let mut s = MachineSections::default();
        s.push("dev", 1, &Old { a: 7, bytes: vec![1, 2, 3] });
        let back = MachineSections::decode(&s.encode()).unwrap();
        assert_eq!(back, s);
        // A newer reader (a field added) reads the old section...
        let new: New = back.decode_section("dev", 2).unwrap();
        assert_eq!(new, New { a: 7, bytes: vec![1, 2, 3], added: None });
        // ...and an older reader skips the field it does not know.
        let mut s2 = MachineSections::default();
        s2.push("dev", 1, &New { a: 1, bytes: vec![], added: Some(5) });
        let old: Old = MachineSections::decode(&s2.encode()).unwrap().decode_section("dev", 1).unwrap();
        assert_eq!(old.a, 1);
    }

    #[test]
    fn newer_missing_and_duplicate_sections_are_refused() {
        let mut s = MachineSections::default();
        s.push("dev", 3, &1u32);
        assert!(matches!(s.decode_section::<u32>("dev", 2), Err(Error::NewerSection { found: 3, .. })));
        assert!(matches!(s.decode_section::<u32>("cpu", 1), Err(Error::MissingSection(_))));
        s.push("dev", 1, &1u32);
        assert!(matches!(MachineSections::decode(&s.encode()), Err(Error::CorruptState(_))));
    }

    #[test]
    fn garbage_is_an_error_never_a_panic() {
        let mut s = MachineSections::default();
        s.push("vm", 1, &vec![9u8; 300]);
        let good = s.encode();
        for cut in 0..good.len() {
            assert!(MachineSections::decode(&good[..cut]).is_err(), "cut at {cut}");
        }
        // A CBOR header claiming a 2^60-byte string must not allocate it.
        assert!(MachineSections::decode(&[
            0xa1, 0x68, b's', b'e', b'c', b't', b'i', b'o', b'n', b's', 0x9b, 0x10, 0, 0, 0, 0, 0, 0, 0
        ])
        .is_err());
    }
}
