//! Advert wire types (CBOR via ciborium). DESIGN.md §3 lists every field.

use serde::{Deserialize, Serialize};

/// What a node offers to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Role {
    /// Runs prefill for others (bids in auctions, streams KV out).
    Prefill,
    /// Accepts client requests and decodes (runs auctions, receives KV).
    Decode,
}

/// Identifies a model and KV layout without the mesh knowing anything about models: all opaque.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ModelRef {
    /// Human-readable model id (e.g. the GGUF file stem).
    pub model_id: String,
    /// Hash of the weights; two nodes share KV only if this matches.
    pub weights_hash: [u8; 32],
    /// Version of the KV cache layout (block size, dtype, head order…).
    pub kv_layout_version: u32,
    /// Hash of the full KV layout description, for mismatches the version does not catch.
    pub kv_layout_hash: [u8; 32],
}

/// One point of a node's measured prefill speed curve.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PrefillPoint {
    /// Prompt length in tokens.
    pub tokens: u32,
    /// Measured prefill throughput at that length.
    pub tokens_per_sec: f32,
}

/// Compact summary of cached prefix blocks: a Bloom filter over 64-bit block hashes, so a home
/// node can guess which peer already holds (part of) a prompt without listing every block.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct PrefixSummary {
    /// Filter bits, little-endian bit order within each byte. Empty means "nothing cached".
    #[serde(with = "crate::wire::cbor_bytes")]
    pub bits: Vec<u8>,
    /// Number of hash probes per key (0 with an empty filter).
    pub probes: u8,
}

impl PrefixSummary {
    /// An empty filter of `bytes` bytes using `probes` probes per key.
    pub fn with_size(bytes: usize, probes: u8) -> Self {
        Self {
            bits: vec![0; bytes],
            probes,
        }
    }

    /// Bit positions for `key` by double hashing; the block hash is already uniform, so splitting
    /// it (plus one multiplicative remix) is enough.
    fn positions(&self, key: u64) -> impl Iterator<Item = usize> + '_ {
        let nbits = (self.bits.len() * 8) as u64;
        let h1 = key;
        let h2 = key.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(31) | 1;
        (0..u64::from(self.probes))
            .map(move |i| (h1.wrapping_add(i.wrapping_mul(h2)) % nbits) as usize)
    }

    /// Records one block hash.
    pub fn insert(&mut self, key: u64) {
        if self.bits.is_empty() {
            return;
        }
        let pos: Vec<usize> = self.positions(key).collect();
        for p in pos {
            self.bits[p / 8] |= 1 << (p % 8);
        }
    }

    /// `false` means certainly not cached; `true` means probably cached.
    pub fn may_contain(&self, key: u64) -> bool {
        if self.bits.is_empty() || self.probes == 0 {
            return false;
        }
        self.positions(key)
            .all(|p| self.bits[p / 8] & (1 << (p % 8)) != 0)
    }

    /// How many leading blocks of `prefix_block_hashes` are probably cached.
    pub fn cached_prefix_blocks(&self, prefix_block_hashes: &[u64]) -> usize {
        prefix_block_hashes
            .iter()
            .take_while(|h| self.may_contain(**h))
            .count()
    }
}

/// What the application says about itself; the mesh adds identity, sequence and network facts.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct AdvertBody {
    /// Operator-chosen region label (e.g. `eu-west`).
    pub region: String,
    /// Roles this node currently plays.
    pub roles: Vec<Role>,
    /// Models (and KV layouts) this node can serve.
    pub models: Vec<ModelRef>,
    /// Prefill speed at a few prompt lengths.
    pub prefill_profile: Vec<PrefillPoint>,
    /// Requests waiting for prefill right now.
    pub queue_depth: u32,
    /// Free KV cache blocks.
    pub free_kv_blocks: u64,
    /// Asking price per 1,000 prefill tokens (arbitrary mesh currency units).
    pub price_per_1k_tokens: f64,
    /// Which prefix blocks are cached here.
    pub prefix_summary: PrefixSummary,
    /// Software version string, for operators and compatibility checks.
    pub software_version: String,
    /// Where the node's HTTP API (OpenAI endpoints, `/mesh`, dashboard) can be reached, e.g.
    /// `http://10.0.0.5:8080`; `None` when it serves none or cannot tell (an unspecified listen
    /// address without `api.public_url`). Added without a new topic version: it is omitted when
    /// `None`, so such adverts encode exactly as before, and older nodes skip the unknown key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_url: Option<String>,
    /// Seconds of prefill work queued here when the advert was made (the queue a bid would
    /// quote), so that homes rank candidates by waiting time rather than by job count. Added like
    /// `api_url`: omitted when `None`, so older adverts encode as before and older nodes skip it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_s: Option<f64>,
}

/// Goodput this node has observed towards one peer (so others can reason about the mesh's links).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BandwidthReport {
    /// Peer id (base58).
    pub peer: String,
    /// EWMA of achieved KV goodput, bytes per second.
    pub bytes_per_sec: f64,
}

/// The full advert as gossiped.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Advert {
    /// Sender's peer id (base58); must equal the gossip message's signed source.
    pub node_id: String,
    /// Monotonic per-sender sequence number; older adverts never replace newer ones.
    pub seq: u64,
    /// Addresses the sender listens on, so a node that learns of it through gossip can dial it.
    pub listen_addrs: Vec<String>,
    /// The application part.
    pub body: AdvertBody,
    /// Observed bandwidth to the sender's best-known peers (bounded list).
    pub observed_bandwidth: Vec<BandwidthReport>,
}

impl AdvertBody {
    /// The advertised queue in seconds. An advert without it (from an older node) counts jobs
    /// only: each is taken as `per_job_s` (the caller's own prompt at the advertised speed).
    pub fn queue_seconds(&self, per_job_s: f64) -> f64 {
        match self.queue_s {
            Some(q) if q.is_finite() && q >= 0.0 => q,
            _ => f64::from(self.queue_depth) * per_job_s,
        }
    }
}

impl Advert {
    /// The advertised listen addresses that parse, at most 8: where to dial the sender.
    pub(crate) fn dial_addrs(&self) -> Vec<libp2p::Multiaddr> {
        self.listen_addrs
            .iter()
            .filter_map(|a| a.parse().ok())
            .take(8)
            .collect()
    }

    /// Whether this node offers prefill for exactly this model and KV layout.
    pub fn can_prefill(&self, model: &ModelRef) -> bool {
        self.body.roles.contains(&Role::Prefill) && self.body.models.iter().any(|m| m == model)
    }

    /// Best advertised prefill speed (tokens/s), 0 if no profile.
    pub fn peak_prefill_speed(&self) -> f32 {
        self.body
            .prefill_profile
            .iter()
            .map(|p| p.tokens_per_sec)
            .fold(0.0, f32::max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_seconds_prefer_the_advertised_wait_over_the_job_count() {
        // Three short jobs queued (0.3 s) rank ahead of one long job (20 s); by count alone the
        // one-job queue would look three times shorter.
        let short = AdvertBody {
            queue_depth: 3,
            queue_s: Some(0.3),
            ..AdvertBody::default()
        };
        let long = AdvertBody {
            queue_depth: 1,
            queue_s: Some(20.0),
            ..AdvertBody::default()
        };
        assert!(short.queue_seconds(5.0) < long.queue_seconds(5.0));
        // An older node's advert (no seconds) or nonsense falls back to jobs × the per-job time.
        let old = AdvertBody {
            queue_depth: 3,
            ..AdvertBody::default()
        };
        assert_eq!(old.queue_seconds(5.0), 15.0);
        for bad in [f64::NAN, -1.0, f64::INFINITY] {
            let b = AdvertBody {
                queue_s: Some(bad),
                ..old.clone()
            };
            assert_eq!(b.queue_seconds(5.0), 15.0);
        }
        // Encoded without the field when absent, so old adverts encode exactly as before.
        let mut bytes = Vec::new();
        ciborium::into_writer(&old, &mut bytes).unwrap();
        let mut with = Vec::new();
        ciborium::into_writer(&short, &mut with).unwrap();
        let key = b"queue_s";
        assert!(!bytes.windows(key.len()).any(|w| w == key));
        assert!(with.windows(key.len()).any(|w| w == key));
    }

    #[test]
    fn bloom_has_no_false_negatives_and_few_false_positives() {
        let mut f = PrefixSummary::with_size(1024, 4);
        for k in 0..500u64 {
            f.insert(k.wrapping_mul(0x1234_5678_9abc_def1));
        }
        for k in 0..500u64 {
            assert!(f.may_contain(k.wrapping_mul(0x1234_5678_9abc_def1)));
        }
        let fp = (1000..11_000u64)
            .filter(|k| f.may_contain(k.wrapping_mul(0x1234_5678_9abc_def1)))
            .count();
        // 8192 bits, 500 keys, 4 probes: theoretical FP rate ~0.2%.
        assert!(fp < 200, "false positives {fp}/10000");
        assert!(!PrefixSummary::default().may_contain(1));
    }

    #[test]
    fn cached_prefix_counts_leading_hits_only() {
        let mut f = PrefixSummary::with_size(256, 3);
        f.insert(11);
        f.insert(22);
        assert_eq!(
            f.cached_prefix_blocks(&[11, 22, 0xdead_beef_dead_beef, 11]),
            2
        );
    }
}
