//! Hashing for folds that hold many rows in memory: [`KeyHashState`], a keyed hasher far cheaper
//! than SipHash on UUIDs, and [`KeyFilter`], a Bloom filter of keys a bulk fold has stored.

/// Keys that may be present, with false positives but never a false negative (a blocked Bloom
/// filter): what a [`BulkFold`](crate::engine::BulkFold) consults to skip loading rows that
/// cannot be stored yet. Its size is fixed when created, so memory stays bounded however long
/// the log; past its capacity it merely answers "maybe" more often.
pub struct KeyFilter {
    words: Vec<u64>,
    blocks: u64,
}

/// Words per block: one cache line, so a lookup touches one line.
const BLOCK_WORDS: usize = 8;

impl KeyFilter {
    /// A filter for about `keys` keys at ~1 % false positives (12 bits a key), between 64 KiB
    /// and 64 MiB.
    pub fn with_capacity(keys: u64) -> Self {
        let bits = keys
            .saturating_mul(12)
            .clamp(1 << 19, 1 << 29)
            .next_power_of_two();
        let words = usize::try_from(bits / 64).unwrap_or(1 << 23);
        Self {
            words: vec![0; words],
            blocks: (words / BLOCK_WORDS) as u64,
        }
    }

    pub fn insert(&mut self, key: &[u8]) {
        self.insert_hash(key_hash(key));
    }

    /// False only if `key` was never inserted.
    pub fn may_contain(&self, key: &[u8]) -> bool {
        self.may_contain_hash(key_hash(key))
    }

    /// Inserts a key by its [`key_hash`].
    pub fn insert_hash(&mut self, hash: u64) {
        let (block, bits) = self.probe(hash);
        for (word, bit) in self.words[block..block + BLOCK_WORDS].iter_mut().zip(bits) {
            *word |= bit;
        }
    }

    /// [`KeyFilter::may_contain`] by the key's [`key_hash`].
    pub fn may_contain_hash(&self, hash: u64) -> bool {
        let (block, bits) = self.probe(hash);
        self.words[block..block + BLOCK_WORDS]
            .iter()
            .zip(bits)
            .all(|(word, bit)| word & bit != 0)
    }

    /// The first word of the key's block, and one bit per word of the block.
    fn probe(&self, hash: u64) -> (usize, [u64; BLOCK_WORDS]) {
        let b = mix(hash);
        let block = usize::try_from(hash % self.blocks).unwrap_or(0) * BLOCK_WORDS;
        let mut bits = [0u64; BLOCK_WORDS];
        for (i, bit) in bits.iter_mut().enumerate() {
            *bit = 1 << ((b >> (6 * i)) & 63);
        }
        (block, bits)
    }
}

/// A 64-bit hash of a key, the same in every run. Keys are mostly UUIDs: a multiply-rotate over
/// 8-byte words and a strong finaliser mix them well enough, at a fraction of SipHash's cost.
/// Distinct keys collide about once in 2⁶⁴.
pub fn key_hash(key: &[u8]) -> u64 {
    let mut h: u64 = 0x243f_6a88_85a3_08d3 ^ key.len() as u64;
    for word in key.chunks(8) {
        let mut w = [0u8; 8];
        w[..word.len()].copy_from_slice(word);
        h = (h ^ u64::from_le_bytes(w))
            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
            .rotate_left(29);
    }
    mix(h)
}

/// A `BuildHasher` for maps of rows held in memory by a fold: the word mixing of [`key_hash`],
/// seeded at random like std's SipHash (keys can be chosen from outside: UUIDs derived from
/// platform ids), at a fraction of SipHash's cost on the several UUIDs hashed per event.
#[derive(Clone, Debug)]
pub struct KeyHashState {
    seed: u64,
}

impl Default for KeyHashState {
    fn default() -> Self {
        use std::hash::BuildHasher as _;
        Self {
            seed: std::collections::hash_map::RandomState::new().hash_one(0x5eed_u64),
        }
    }
}

impl std::hash::BuildHasher for KeyHashState {
    type Hasher = KeyHasher;

    fn build_hasher(&self) -> KeyHasher {
        KeyHasher { h: self.seed }
    }
}

/// See [`KeyHashState`].
#[derive(Clone, Debug)]
pub struct KeyHasher {
    h: u64,
}

impl KeyHasher {
    fn word(&mut self, w: u64) {
        self.h = (self.h ^ w)
            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
            .rotate_left(29);
    }
}

impl std::hash::Hasher for KeyHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut w = [0u8; 8];
            w[..chunk.len()].copy_from_slice(chunk);
            self.word(u64::from_le_bytes(w));
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.word(n);
    }

    fn write_usize(&mut self, n: usize) {
        self.word(n as u64);
    }

    fn finish(&self) -> u64 {
        mix(self.h)
    }
}

/// splitmix64's finaliser.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}
