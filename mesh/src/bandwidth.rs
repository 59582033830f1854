//! Per-peer bandwidth estimator: EWMA of achieved KV goodput. Sans-IO (the caller passes `now`);
//! the mesh feeds it from every completed transfer in either direction and from probes.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use libp2p::PeerId;

/// Current estimate towards one peer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BandwidthEstimate {
    /// Smoothed goodput, bytes per second.
    pub bytes_per_sec: f64,
    /// When the last sample arrived.
    pub updated_at: Instant,
    /// Number of samples folded in.
    pub samples: u32,
}

/// EWMA goodput per peer.
#[derive(Debug, Clone)]
pub struct BandwidthEstimator {
    alpha: f64,
    min_sample_bytes: u64,
    max_peers: usize,
    peers: HashMap<PeerId, BandwidthEstimate>,
}

impl BandwidthEstimator {
    /// `alpha` is the weight of a new sample (0 < alpha ≤ 1). Samples smaller than
    /// `min_sample_bytes` are ignored: they measure latency, not bandwidth.
    pub fn new(alpha: f64, min_sample_bytes: u64, max_peers: usize) -> Self {
        Self {
            alpha: alpha.clamp(0.01, 1.0),
            min_sample_bytes,
            max_peers,
            peers: HashMap::new(),
        }
    }

    /// Folds in one transfer of `bytes` that took `elapsed`. Returns the new estimate, or `None`
    /// if the sample was too small to count (or the table is full of other peers).
    pub fn record(
        &mut self,
        peer: PeerId,
        bytes: u64,
        elapsed: Duration,
        now: Instant,
    ) -> Option<f64> {
        if bytes < self.min_sample_bytes || elapsed.is_zero() {
            return None;
        }
        let sample = bytes as f64 / elapsed.as_secs_f64();
        if !self.peers.contains_key(&peer) && self.peers.len() >= self.max_peers {
            // Evict the stalest peer rather than refusing a fresh measurement.
            let stalest = self
                .peers
                .iter()
                .min_by_key(|(_, e)| e.updated_at)
                .map(|(p, _)| *p)?;
            self.peers.remove(&stalest);
        }
        let e = self.peers.entry(peer).or_insert(BandwidthEstimate {
            bytes_per_sec: sample,
            updated_at: now,
            samples: 0,
        });
        if e.samples > 0 {
            e.bytes_per_sec = self.alpha * sample + (1.0 - self.alpha) * e.bytes_per_sec;
        }
        e.samples = e.samples.saturating_add(1);
        e.updated_at = now;
        Some(e.bytes_per_sec)
    }

    /// Current estimate for `peer`.
    pub fn get(&self, peer: &PeerId) -> Option<BandwidthEstimate> {
        self.peers.get(peer).copied()
    }

    /// Whether `peer` needs a probe: never measured, or last sample older than `max_age`.
    pub fn is_stale(&self, peer: &PeerId, now: Instant, max_age: Duration) -> bool {
        self.peers
            .get(peer)
            .is_none_or(|e| now.saturating_duration_since(e.updated_at) > max_age)
    }

    /// Forgets a peer (it left the mesh).
    pub fn forget(&mut self, peer: &PeerId) {
        self.peers.remove(peer);
    }

    /// The `n` best-measured peers, fastest first (for adverts).
    pub fn top(&self, n: usize) -> Vec<(PeerId, f64)> {
        let mut v: Vec<(PeerId, f64)> = self
            .peers
            .iter()
            .map(|(p, e)| (*p, e.bytes_per_sec))
            .collect();
        v.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        v.truncate(n);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ewma_moves_towards_new_samples() {
        let t0 = Instant::now();
        let p = PeerId::random();
        let mut e = BandwidthEstimator::new(0.5, 1000, 4);
        assert_eq!(
            e.record(p, 100, Duration::from_secs(1), t0),
            None,
            "too small to count"
        );
        assert_eq!(
            e.record(p, 1_000_000, Duration::from_secs(1), t0),
            Some(1_000_000.0)
        );
        assert_eq!(
            e.record(p, 3_000_000, Duration::from_secs(1), t0),
            Some(2_000_000.0)
        );
        assert!(!e.is_stale(&p, t0 + Duration::from_secs(1), Duration::from_secs(2)));
        assert!(e.is_stale(&p, t0 + Duration::from_secs(3), Duration::from_secs(2)));
        assert!(e.is_stale(&PeerId::random(), t0, Duration::from_secs(2)));
    }

    #[test]
    fn bounded_table_evicts_stalest_and_top_orders_by_speed() {
        let t0 = Instant::now();
        let mut e = BandwidthEstimator::new(1.0, 1, 2);
        let (a, b, c) = (PeerId::random(), PeerId::random(), PeerId::random());
        e.record(a, 10, Duration::from_secs(1), t0);
        e.record(b, 30, Duration::from_secs(1), t0 + Duration::from_secs(1));
        e.record(c, 20, Duration::from_secs(1), t0 + Duration::from_secs(2));
        assert!(e.get(&a).is_none());
        assert_eq!(
            e.top(5).into_iter().map(|x| x.0).collect::<Vec<_>>(),
            vec![b, c]
        );
    }
}
