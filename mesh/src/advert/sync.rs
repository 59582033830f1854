//! `/prfaas/table/1`: a node that has just dialled a peer asks it for its whole peer table, so a
//! late joiner knows the mesh at once instead of after everyone's next advert refresh.
//!
//! The answer is a list of the serving peer's **signed** advert envelopes
//! ([`super::codec::SignedAdvert`]), each with its age; the asker verifies every entry exactly
//! as if it had arrived by gossip, so a lying peer can withhold entries but not forge or alter
//! them. Everything is bounded: the response size (`max_bytes`, checked before allocating), the
//! number of entries used, one request per new outbound connection and a token bucket on the
//! asker, and at most one answer per peer per interval on the server.

use libp2p::StreamProtocol;
use serde::{Deserialize, Serialize};

/// Protocol name of table sync.
pub const TABLE_PROTOCOL: StreamProtocol = StreamProtocol::new("/prfaas/table/1");

/// "Send me your table."
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableRequest {
    /// Most entries the asker will look at; the server sends no more.
    pub max_entries: u32,
}

/// One entry of a served table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableEntry {
    /// How long ago the server received this advert, ms (so the entry expires on the asker
    /// when it would have on the server, and syncing cannot keep a dead node alive).
    pub age_ms: u64,
    /// The signed advert envelope, exactly as gossiped.
    #[serde(with = "crate::wire::cbor_bytes")]
    pub signed: Vec<u8>,
}

/// The served table.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct TableResponse {
    /// Entries (the server's own advert first when it has one). Empty when the server declines
    /// (rate limit) or knows nobody.
    pub entries: Vec<TableEntry>,
}

/// CBOR bytes a [`TableEntry`] costs beyond its envelope (map keys, lengths, a u64).
pub const ENTRY_OVERHEAD: usize = 32;

/// Ciborium codec for table sync (`u32 length || CBOR`): `TableCodec::new(MAX_REQUEST_BYTES,
/// max_response_bytes)`.
pub type TableCodec = crate::wire::CborCodec<TableRequest, TableResponse>;

/// Requests are a single small integer.
pub const MAX_REQUEST_BYTES: usize = 1024;

/// A token bucket: `burst` requests at once, then one per `period`. Sans-IO (caller passes now).
#[derive(Debug, Clone)]
pub struct TokenBucket {
    tokens: f64,
    burst: f64,
    period: std::time::Duration,
    last: std::time::Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(burst: u32, period: std::time::Duration, now: std::time::Instant) -> Self {
        Self {
            tokens: f64::from(burst),
            burst: f64::from(burst),
            period,
            last: now,
        }
    }

    /// Takes one token if there is one.
    pub fn try_take(&mut self, now: std::time::Instant) -> bool {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = self.last.max(now);
        if self.period.is_zero() {
            self.tokens = self.burst;
        } else {
            self.tokens = (self.tokens + dt / self.period.as_secs_f64()).min(self.burst);
        }
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn bucket_allows_a_burst_then_one_per_period() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(2, Duration::from_secs(10), t0);
        assert!(b.try_take(t0));
        assert!(b.try_take(t0));
        assert!(!b.try_take(t0 + Duration::from_secs(5)));
        assert!(b.try_take(t0 + Duration::from_secs(11)));
        assert!(!b.try_take(t0 + Duration::from_secs(12)));
    }

    #[test]
    fn codec_roundtrip_and_bound() {
        use libp2p::request_response::Codec;
        let mut c = TableCodec::new(MAX_REQUEST_BYTES, 256);
        let res = TableResponse {
            entries: vec![TableEntry {
                age_ms: 3,
                signed: vec![1, 2, 3],
            }],
        };
        let mut buf = Vec::new();
        futures::executor::block_on(c.write_response(&TABLE_PROTOCOL, &mut buf, res.clone()))
            .expect("write");
        let back = futures::executor::block_on(
            c.read_response(&TABLE_PROTOCOL, &mut futures::io::Cursor::new(buf)),
        )
        .expect("read");
        assert_eq!(back, res);
        let big = TableResponse {
            entries: vec![TableEntry {
                age_ms: 0,
                signed: vec![0; 1000],
            }],
        };
        let mut buf = Vec::new();
        assert!(
            futures::executor::block_on(c.write_response(&TABLE_PROTOCOL, &mut buf, big)).is_err()
        );
    }
}
