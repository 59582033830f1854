//! Chained block hashes: the keys of the prefix cache.
//!
//! The hash of block `i` covers the hash of block `i − 1` and block `i`'s tokens, so equal hashes
//! mean equal *prefixes*, not merely equal blocks: a block's KV depends on every token before it.
//! Only full blocks are hashed; a trailing partial block is never cached. The same hashes are what
//! adverts summarise (bloom filter) and auctions carry, so their encoding is fixed:
//!
//! ```text
//! hash_i = SHA-256( b"prfaas-kv-block" || parent || u32_le(token) for each token of block i )
//! parent = hash_{i-1}, or 32 zero bytes for block 0
//! ```
//!
//! The block size is implied by the number of tokens hashed, so prefixes cut into different block
//! sizes never collide.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Hash of a token prefix that ends on a block boundary (see the module docs).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct BlockHash(pub [u8; 32]);

impl BlockHash {
    /// The parent of block 0.
    pub const ROOT: BlockHash = BlockHash([0; 32]);

    /// Hash of a block of `tokens` following the prefix whose hash is `parent`.
    pub fn chain(parent: &BlockHash, tokens: &[u32]) -> BlockHash {
        let mut h = Sha256::new();
        h.update(b"prfaas-kv-block");
        h.update(parent.0);
        for t in tokens {
            h.update(t.to_le_bytes());
        }
        BlockHash(h.finalize().into())
    }

    /// The first 8 bytes as a little-endian integer (for bloom filters and logs).
    pub fn short(&self) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.0[..8]);
        u64::from_le_bytes(b)
    }
}

impl std::fmt::Debug for BlockHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BlockHash({:016x})", self.short())
    }
}

/// Chained hashes of the full blocks of `tokens` (`tokens.len() / block_size` of them; none when
/// `block_size` is 0).
pub fn block_hashes(tokens: &[u32], block_size: usize) -> Vec<BlockHash> {
    if block_size == 0 {
        return Vec::new();
    }
    let mut parent = BlockHash::ROOT;
    tokens
        .chunks_exact(block_size)
        .map(|block| {
            parent = BlockHash::chain(&parent, block);
            parent
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(h: &BlockHash) -> String {
        h.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Golden values computed independently (Python `hashlib.sha256` over the documented encoding).
    #[test]
    fn golden_chain() {
        let h = block_hashes(&[1, 2, 3, 4, 5, 6, 7, 8, 9], 4);
        assert_eq!(h.len(), 2, "only full blocks are hashed");
        assert_eq!(
            hex(&h[0]),
            "50511ec8bd6a1abe059b07430d0dafc8a70a91c72b75f6bba0fad44fb958a315"
        );
        assert_eq!(
            hex(&h[1]),
            "5a9f12b453da6e548b13bb24c3c7e5a4e0575ae062d57cfa6e6e64d665dfd96d"
        );
    }

    #[test]
    fn chained_hashes_cover_the_whole_prefix() {
        let a: Vec<u32> = (0..32).collect();
        let ha = block_hashes(&a, 8);
        assert_eq!(ha.len(), 4);

        // A change in block 0 changes every hash, even though blocks 1..3 are identical.
        let mut b = a.clone();
        b[3] = 999;
        let hb = block_hashes(&b, 8);
        for i in 0..4 {
            assert_ne!(ha[i], hb[i], "block {i}");
        }

        // A change in block 2 keeps blocks 0..1 and changes 2..3.
        let mut c = a.clone();
        c[17] = 999;
        let hc = block_hashes(&c, 8);
        assert_eq!(ha[..2], hc[..2]);
        assert_ne!(ha[2], hc[2]);
        assert_ne!(ha[3], hc[3]);

        // A prefix hashes to a prefix of the hashes; the partial tail is ignored.
        assert_eq!(block_hashes(&a[..20], 8), ha[..2]);
        // Different block sizes over the same tokens give different keys.
        assert_ne!(block_hashes(&a, 16)[0], ha[1]);
    }

    #[test]
    fn degenerate_inputs() {
        assert!(block_hashes(&[], 4).is_empty());
        assert!(block_hashes(&[1, 2, 3], 4).is_empty());
        assert!(block_hashes(&[1, 2, 3], 0).is_empty());
    }
}
