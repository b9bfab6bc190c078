//! Checksums: xxh3, fast enough to run over all of guest memory (not a cryptographic hash: it
//! catches damage, not forgery).

use xxhash_rust::xxh3::{xxh3_128, xxh3_64, Xxh3};

pub fn checksum(bytes: &[u8]) -> u64 {
    xxh3_64(bytes)
}

/// 128 bits, for ids: two different manifests never share one in practice.
pub fn checksum128(bytes: &[u8]) -> u128 {
    xxh3_128(bytes)
}

/// Streaming checksum, for data read in pieces.
#[derive(Default)]
pub struct Hasher(Xxh3);

impl Hasher {
    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    pub fn finish(&self) -> u64 {
        self.0.digest()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streaming_equals_one_shot() {
        let data: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        let mut h = Hasher::default();
        for piece in data.chunks(333) {
            h.update(piece);
        }
        assert_eq!(h.finish(), checksum(&data));
        assert_ne!(checksum(&data[1..]), checksum(&data));
    }
}
