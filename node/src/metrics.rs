//! Prometheus metrics of one node (`/metrics`), built on `prometheus-client`.
//!
//! Actors update the families directly; the API renders the registry. Label values are small,
//! fixed vocabularies (plus peer ids for per-peer bandwidth, bounded by the peer table: a peer's
//! series is removed when it leaves the table). Every series carries a `model_name` label.
//!
//! Latency histograms use the names and units of vLLM's (`time_to_first_token_seconds`,
//! `inter_token_latency_seconds`, `e2e_request_latency_seconds`, `request_queue_time_seconds`,
//! `request_prefill_time_seconds`, `prefix_cache_queries` / `prefix_cache_hits`) under the
//! `prfaas_` prefix, so dashboards built for vLLM need only the prefix changed.

use std::collections::VecDeque;
use std::sync::atomic::AtomicU64;
use std::sync::Mutex;

use prometheus_client::encoding::{text::encode, EncodeLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

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

/// Per-peer settlement label: `side` = `paid` (we were the home) or `earned` (we prefilled).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SettledLabels {
    pub peer: String,
    pub side: String,
}

/// Requests remembered by [`RequestHistory`] (a few minutes of a busy node's traffic).
pub const REQUEST_HISTORY: usize = 512;

/// One started request, as the dashboard charts it.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct RequestSample {
    /// When its first token was generated, Unix milliseconds.
    pub at_ms: u64,
    /// Time to first token, seconds.
    pub ttft_s: f64,
    /// Prefilled by a peer (offloaded) rather than here.
    pub remote: bool,
}

/// The last [`REQUEST_HISTORY`] requests' first-token times and routes, oldest first: what the
/// dashboard draws TTFT and the offload rate over time from (histograms have no time axis).
#[derive(Debug, Default)]
pub struct RequestHistory(Mutex<VecDeque<RequestSample>>);

impl RequestHistory {
    /// Remembers one request, forgetting the oldest beyond [`REQUEST_HISTORY`].
    pub fn record(&self, ttft_s: f64, remote: bool) {
        let at_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or_default();
        if let Ok(mut h) = self.0.lock() {
            if h.len() == REQUEST_HISTORY {
                h.pop_front();
            }
            h.push_back(RequestSample {
                at_ms,
                ttft_s,
                remote,
            });
        }
    }

    /// Every remembered request, oldest first.
    pub fn samples(&self) -> Vec<RequestSample> {
        self.0
            .lock()
            .map(|h| h.iter().copied().collect())
            .unwrap_or_default()
    }
}

/// Every metric a node exports.
pub struct Metrics {
    registry: Mutex<Registry>,
    /// Recent requests for the dashboard's charts (not exported to Prometheus).
    pub history: RequestHistory,
    /// Finished requests by route and outcome.
    pub requests: Family<RequestLabels, Counter>,
    /// Requests admitted and not yet finished.
    pub inflight: Gauge,
    /// Time to first token, seconds (admission to the first generated token).
    pub ttft: Histogram,
    /// Time between two consecutive generated tokens of a request, seconds.
    pub inter_token_latency: Histogram,
    /// Admission to the last token, seconds.
    pub e2e_latency: Histogram,
    /// Admission to the start of a local prefill (waiting behind other work), seconds.
    pub queue_time: Histogram,
    /// Prefill time, seconds: a local prefill's compute, or for a remote one the whole way from
    /// admission to the imported KV (auction, remote prefill, transfer).
    pub prefill_time: Histogram,
    /// Award to the last KV byte of a transfer received by this home, seconds.
    pub kv_transfer_time: Histogram,
    /// KV bytes of one transfer received by this home.
    pub kv_transfer_size: Histogram,
    /// Auction duration as the home saw it (calls out to a winner or a fallback), seconds.
    pub auction_duration: Histogram,
    /// Prompt tokens looked up in the prefix cache.
    pub prefix_cache_queries: Counter,
    /// Prompt tokens found in the prefix cache.
    pub prefix_cache_hits: Counter,
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
    /// `transfer_failed`, `transfer_timeout`, `winner_lost`, `winner_late`, `winner_stalled`, `reauction`) and as bidder (`bid`, `declined`, `won`, `served`, `serve_failed`).
    pub auctions: Family<KindLabel, Counter>,
    /// KV bytes streamed (`kind` = `sent` / `received`).
    pub kv_bytes: Family<KindLabel, Counter>,
    /// KV transfers received, by wire encoding (`kind` = `f16` / `int8`).
    pub kv_transfers: Family<KindLabel, Counter>,
    /// Observed KV goodput to each peer, bytes/s (the mesh's EWMA).
    pub peer_bandwidth: Family<PeerLabel, Gauge<f64, AtomicU64>>,
    /// KV blocks (`kind` = `used`, `leased`, `free`, `cached`).
    pub kv_blocks: Family<KindLabel, Gauge>,
    /// Current offload threshold t, tokens.
    pub offload_threshold: Gauge,
    /// Peers in the mesh's peer table.
    pub mesh_peers: Gauge,
    /// What one peer tried to make this node hold beyond its quota, refused, by `kind` =
    /// reason: `unexpected` (KV nobody awaits), `hello_quota`, `probe_quota`, `table_quota`.
    pub mesh_quota_refusals: Family<KindLabel, Counter>,
    /// The threshold search's measured inputs (`kind` = `bandwidth_bytes_per_s`,
    /// `egress_utilisation`, `queue_delay_s`, `local_prefill_tokens_per_s`,
    /// `remote_prefill_tokens_per_s`, `decode_step_s`, `kv_bytes_per_token`, `prefill_peers`,
    /// `homes`, `homed_prompts`, `model_offload_fraction`).
    pub threshold_inputs: Family<KindLabel, Gauge<f64, AtomicU64>>,
    /// Threshold searches run.
    pub threshold_searches: Counter,
    /// Settled auction payments per peer (mesh currency; `side` = `paid` / `earned`).
    pub settled: Family<SettledLabels, Counter<f64, AtomicU64>>,
    /// What this node serves now (`kind` = `configured`, `prefill` (prefill-only), `decode`
    /// (decode-only); 1 for the current one).
    pub role: Family<KindLabel, Gauge>,
    /// Role changes made by runtime role conversion.
    pub role_changes: Counter,
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

/// Latency buckets, seconds: 1 ms to ~65 s.
fn seconds() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

impl Metrics {
    /// Creates and registers every family under the `prfaas_` prefix, without a model label.
    pub fn new() -> Self {
        Self::with_model("")
    }

    /// Every series labelled `model_name` = `model` (none when it is empty).
    pub fn with_model(model: &str) -> Self {
        let labels = (!model.is_empty())
            .then(|| ("model_name".into(), model.to_owned().into()))
            .into_iter();
        let mut r = Registry::with_prefix_and_labels("prfaas", labels);
        let m = Self {
            registry: Mutex::new(Registry::default()),
            history: RequestHistory::default(),
            requests: Family::default(),
            inflight: Gauge::default(),
            ttft: seconds(),
            inter_token_latency: seconds(),
            e2e_latency: seconds(),
            queue_time: seconds(),
            prefill_time: seconds(),
            kv_transfer_time: seconds(),
            // 64 KiB to 64 GiB.
            kv_transfer_size: Histogram::new(exponential_buckets(65536.0, 4.0, 11)),
            auction_duration: seconds(),
            prefix_cache_queries: Counter::default(),
            prefix_cache_hits: Counter::default(),
            decode_rate: Histogram::new(exponential_buckets(1.0, 2.0, 12)),
            prefill_tokens: Family::default(),
            generated_tokens: Counter::default(),
            offload_decisions: Family::default(),
            auctions: Family::default(),
            kv_bytes: Family::default(),
            kv_transfers: Family::default(),
            peer_bandwidth: Family::default(),
            kv_blocks: Family::default(),
            offload_threshold: Gauge::default(),
            mesh_peers: Gauge::default(),
            mesh_quota_refusals: Family::default(),
            threshold_inputs: Family::default(),
            threshold_searches: Counter::default(),
            settled: Family::default(),
            role: Family::default(),
            role_changes: Counter::default(),
        };
        r.register("requests", "Finished requests", m.requests.clone());
        r.register(
            "inflight_requests",
            "Requests in flight",
            m.inflight.clone(),
        );
        for (name, help, h) in [
            (
                "time_to_first_token_seconds",
                "Time to first token (admission to the first generated token)",
                &m.ttft,
            ),
            (
                "inter_token_latency_seconds",
                "Time between consecutive generated tokens",
                &m.inter_token_latency,
            ),
            (
                "e2e_request_latency_seconds",
                "Admission to the last token",
                &m.e2e_latency,
            ),
            (
                "request_queue_time_seconds",
                "Admission to the start of a local prefill",
                &m.queue_time,
            ),
            (
                "request_prefill_time_seconds",
                "Prefill time (remote: admission to imported KV)",
                &m.prefill_time,
            ),
            (
                "kv_transfer_seconds",
                "Award to the last KV byte of a received transfer",
                &m.kv_transfer_time,
            ),
            (
                "auction_duration_seconds",
                "Auction duration as the home saw it",
                &m.auction_duration,
            ),
        ] {
            r.register_with_unit(
                name.trim_end_matches("_seconds"),
                help,
                Unit::Seconds,
                h.clone(),
            );
        }
        r.register_with_unit(
            "kv_transfer",
            "KV bytes of one received transfer",
            Unit::Bytes,
            m.kv_transfer_size.clone(),
        );
        r.register(
            "prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache",
            m.prefix_cache_queries.clone(),
        );
        r.register(
            "prefix_cache_hits",
            "Prompt tokens found in the prefix cache",
            m.prefix_cache_hits.clone(),
        );
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
            "kv_transfers",
            "KV transfers received, by wire encoding",
            m.kv_transfers.clone(),
        );
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
        r.register(
            "mesh_quota_refusals",
            "Per-peer quota refusals by reason",
            m.mesh_quota_refusals.clone(),
        );
        r.register(
            "threshold_input",
            "Measured inputs of the last offload-threshold search",
            m.threshold_inputs.clone(),
        );
        r.register(
            "threshold_searches",
            "Offload-threshold searches run",
            m.threshold_searches.clone(),
        );
        r.register(
            "settled",
            "Settled auction payments per peer (paid as home, earned as winner)",
            m.settled.clone(),
        );
        r.register("role", "Role this node plays now", m.role.clone());
        r.register(
            "role_changes",
            "Role changes by runtime role conversion",
            m.role_changes.clone(),
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
        m.kv_transfer_size.observe(1e6);
        let text = m.render();
        assert!(
            text.contains("prfaas_auctions_total{kind=\"won\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("prfaas_requests_total{route=\"remote\",outcome=\"ok\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("prfaas_time_to_first_token_seconds_count 1"),
            "{text}"
        );
        assert!(
            text.contains("# UNIT prfaas_kv_transfer_bytes bytes"),
            "{text}"
        );
        assert!(text.contains("prfaas_kv_transfer_bytes_count 1"), "{text}");
        for name in [
            "inter_token_latency_seconds",
            "e2e_request_latency_seconds",
            "request_queue_time_seconds",
            "request_prefill_time_seconds",
            "kv_transfer_seconds",
            "auction_duration_seconds",
        ] {
            assert!(
                text.contains(&format!("# TYPE prfaas_{name} histogram")),
                "{name}: {text}"
            );
        }
        assert!(!text.contains("model_name"), "no label without a model");
    }

    #[test]
    fn request_history_is_bounded_and_ordered() {
        let h = RequestHistory::default();
        for i in 0..REQUEST_HISTORY + 10 {
            h.record(i as f64, i % 2 == 0);
        }
        let s = h.samples();
        assert_eq!(s.len(), REQUEST_HISTORY);
        assert_eq!(s[0].ttft_s, 10.0, "the oldest ten were forgotten");
        assert!(s.windows(2).all(|w| w[0].at_ms <= w[1].at_ms));
        assert_eq!(
            s.last().map(|x| x.remote),
            Some((REQUEST_HISTORY + 9).is_multiple_of(2))
        );
    }

    #[test]
    fn model_name_labels_every_series() {
        let m = Metrics::with_model("SmolLM2 135M");
        m.prefix_cache_hits.inc_by(3);
        m.e2e_latency.observe(1.5);
        let text = m.render();
        assert!(
            text.contains("prfaas_prefix_cache_hits_total{model_name=\"SmolLM2 135M\"} 3"),
            "{text}"
        );
        assert!(
            text.contains(
                "prfaas_e2e_request_latency_seconds_count{model_name=\"SmolLM2 135M\"} 1"
            ),
            "{text}"
        );
    }
}
