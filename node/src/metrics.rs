//! Prometheus metrics of one node (`/metrics`), built on `prometheus-client`.
//!
//! Actors update the families directly; the API renders the registry. Label values are small,
//! fixed vocabularies (plus peer ids for per-peer bandwidth, bounded by the peer table).

use std::sync::atomic::AtomicU64;
use std::sync::Mutex;

use prometheus_client::encoding::{text::encode, EncodeLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// `route`: where the prompt was prefilled (`local`, `remote`); `outcome`: `ok`, `error`,
/// `rejected` (429/400), `cancelled` (client went away).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub route: String,
    pub outcome: String,
}

/// A single `kind` label (decision, outcome, direction, state …).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: String,
}

/// Per-peer label.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabel {
    pub peer: String,
}

/// Every metric a node exports.
pub struct Metrics {
    registry: Mutex<Registry>,
    /// Finished requests by route and outcome.
    pub requests: Family<RequestLabels, Counter>,
    /// Requests admitted and not yet finished.
    pub inflight: Gauge,
    /// Time to first token, seconds.
    pub ttft: Histogram,
    /// Per-request decode rate (tokens/s after the first token).
    pub decode_rate: Histogram,
    /// Prompt tokens prefilled here (`kind` = `local`, `served` for peers) or by peers (`remote`).
    pub prefill_tokens: Family<KindLabel, Counter>,
    /// Generated tokens.
    pub generated_tokens: Counter,
    /// Planner decisions: `short` (≤ t), `offload`, `no_candidates`, `no_bids`, `reserve_won`,
    /// `fallback` (offload failed, prefilled locally).
    pub offload_decisions: Family<KindLabel, Counter>,
    /// Auction outcomes seen by this node: as home (`awarded`, `no_bids`, `award_refused`,
    /// `transfer_failed`) and as bidder (`bid`, `declined`, `won`, `served`, `serve_failed`).
    pub auctions: Family<KindLabel, Counter>,
    /// KV bytes streamed (`kind` = `sent` / `received`).
    pub kv_bytes: Family<KindLabel, Counter>,
    /// Observed KV goodput to each peer, bytes/s (the mesh's EWMA).
    pub peer_bandwidth: Family<PeerLabel, Gauge<f64, AtomicU64>>,
    /// KV blocks (`kind` = `used`, `leased`, `free`, `cached`).
    pub kv_blocks: Family<KindLabel, Gauge>,
    /// Current offload threshold t, tokens.
    pub offload_threshold: Gauge,
    /// Peers in the mesh's peer table.
    pub mesh_peers: Gauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every family under the `prfaas_` prefix.
    pub fn new() -> Self {
        let mut r = Registry::with_prefix("prfaas");
        let m = Self {
            registry: Mutex::new(Registry::default()),
            requests: Family::default(),
            inflight: Gauge::default(),
            ttft: Histogram::new(exponential_buckets(0.005, 2.0, 14)),
            decode_rate: Histogram::new(exponential_buckets(1.0, 2.0, 12)),
            prefill_tokens: Family::default(),
            generated_tokens: Counter::default(),
            offload_decisions: Family::default(),
            auctions: Family::default(),
            kv_bytes: Family::default(),
            peer_bandwidth: Family::default(),
            kv_blocks: Family::default(),
            offload_threshold: Gauge::default(),
            mesh_peers: Gauge::default(),
        };
        r.register("requests", "Finished requests", m.requests.clone());
        r.register(
            "inflight_requests",
            "Requests in flight",
            m.inflight.clone(),
        );
        r.register("ttft_seconds", "Time to first token", m.ttft.clone());
        r.register(
            "decode_tokens_per_second",
            "Per-request decode rate after the first token",
            m.decode_rate.clone(),
        );
        r.register(
            "prefill_tokens",
            "Prompt tokens prefilled, by where",
            m.prefill_tokens.clone(),
        );
        r.register(
            "generated_tokens",
            "Generated tokens",
            m.generated_tokens.clone(),
        );
        r.register(
            "offload_decisions",
            "Planner decisions",
            m.offload_decisions.clone(),
        );
        r.register("auctions", "Auction outcomes", m.auctions.clone());
        r.register("kv_bytes", "KV bytes streamed", m.kv_bytes.clone());
        r.register(
            "peer_bandwidth_bytes_per_second",
            "Observed KV goodput per peer (EWMA)",
            m.peer_bandwidth.clone(),
        );
        r.register("kv_blocks", "KV cache blocks by state", m.kv_blocks.clone());
        r.register(
            "offload_threshold_tokens",
            "Current offload threshold t",
            m.offload_threshold.clone(),
        );
        r.register(
            "mesh_peers",
            "Peers in the peer table",
            m.mesh_peers.clone(),
        );
        *m.registry.lock().expect("fresh mutex") = r;
        m
    }

    /// Counter shorthand: `inc(&m.auctions, "won")`.
    pub fn inc(family: &Family<KindLabel, Counter>, kind: &str) {
        family.get_or_create(&KindLabel { kind: kind.into() }).inc();
    }

    /// Counter shorthand adding `n`.
    pub fn inc_by(family: &Family<KindLabel, Counter>, kind: &str, n: u64) {
        family
            .get_or_create(&KindLabel { kind: kind.into() })
            .inc_by(n);
    }

    /// Renders the OpenMetrics text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Ok(r) = self.registry.lock() {
            // Writing into a String cannot fail.
            let _ = encode(&mut out, &r);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_registered_families() {
        let m = Metrics::new();
        Metrics::inc(&m.auctions, "won");
        m.requests
            .get_or_create(&RequestLabels {
                route: "remote".into(),
                outcome: "ok".into(),
            })
            .inc();
        m.ttft.observe(0.25);
        let text = m.render();
        assert!(
            text.contains("prfaas_auctions_total{kind=\"won\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("prfaas_requests_total{route=\"remote\",outcome=\"ok\"} 1"),
            "{text}"
        );
        assert!(text.contains("prfaas_ttft_seconds_count 1"), "{text}");
    }
}
