//! State every actor of one node shares (immutable facts, counters and small bounded tables).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use prfaas_mesh::policy::{Ledger, LengthHistogram, RoleMode, RoleState};
use prfaas_mesh::{MeshHandle, ModelRef, PeerId};
use serde::Serialize;

use super::compute::ComputeHandle;
use crate::config::NodeConfig;
use crate::engine::loader::TextSide;
use crate::kv::KvLayout;
use crate::metrics::Metrics;
use crate::service::NodeInfo;

/// Recent auctions kept for `/mesh` and the demo.
pub const RECENT_AUCTIONS: usize = 64;

/// One auction as the home saw it.
#[derive(Debug, Clone, Serialize)]
pub struct AuctionRecord {
    pub request_id: u64,
    pub prompt_tokens: usize,
    pub cached_tokens: usize,
    /// Every offer: bidder (peer id or `"local"`), price, delays and the score it got.
    pub bids: Vec<BidRecord>,
    pub declines: usize,
    pub silent: usize,
    /// Winner (`"local"` for the reserve bid) and what it is paid.
    pub winner: Option<String>,
    pub payment: f64,
    /// How the winner was asked to encode the KV (`f16` = as stored, `int8`).
    pub kv_wire: Option<String>,
    /// `awarded`, `no_bids`, `reserve_won`, `award_refused`, `transfer_failed`, `ok`.
    pub outcome: String,
    pub elapsed_ms: f64,
}

/// One offer in an [`AuctionRecord`].
#[derive(Debug, Clone, Serialize)]
pub struct BidRecord {
    pub bidder: String,
    pub price: f64,
    pub queue_delay_ms: u32,
    pub est_prefill_ms: u32,
    pub cached_tokens: u32,
    /// Bandwidth the home used for the score, bytes/s (0 for the reserve).
    pub bandwidth: f64,
    pub score: f64,
}

/// Shared by the actors of one node.
pub struct NodeCore {
    pub cfg: NodeConfig,
    pub info: NodeInfo,
    pub text: TextSide,
    pub model_ref: ModelRef,
    pub layout: KvLayout,
    pub vocab: usize,
    pub max_context: usize,
    pub metrics: Arc<Metrics>,
    pub mesh: MeshHandle,
    pub compute: ComputeHandle,
    pub inflight: Arc<AtomicUsize>,
    next_request: AtomicU64,
    /// Offload threshold t in tokens (re-searched at run time, see `MeshBridge`).
    pub threshold: AtomicUsize,
    /// Whether the last threshold search found the offload path egress-bound (the prefix rule
    /// then counts only this node's own cache).
    pub bandwidth_scarce: AtomicBool,
    /// The threshold search's inputs and result, for `/mesh`.
    pub threshold_status: Mutex<serde_json::Value>,
    /// Uncached prompt lengths homed here (bounded; the threshold search's workload).
    pub homed_lengths: Mutex<LengthHistogram>,
    /// Settled payments per peer: paid as a home, earned as a winner.
    pub ledger: Mutex<Ledger<String>>,
    /// Home side: transfers awaited right now (the bridge's `KvRouter` keeps the count here
    /// for `/mesh`).
    pub awaited_transfers: AtomicUsize,
    /// The prefill speed (tokens/s, f64 bits; 0 before the first advert) this node last
    /// published: bids claim no more than [`MAX_CLAIM_OVER_ADVERT`] times it, so a home that
    /// checks them against its copy of the advert finds them consistent.
    pub advertised_prefill_tps: AtomicU64,
    recent: Mutex<VecDeque<AuctionRecord>>,
    /// The HTTP API's URL as others reach it (set once the API listens; advertised).
    pub api_url: OnceLock<String>,
    /// When the node started (the ledger's and role conversion's clock).
    started: std::time::Instant,
    /// What this node serves and advertises (runtime role conversion, with the drain between
    /// two modes); its clock is seconds since start.
    role: Mutex<RoleState>,
}

impl std::fmt::Debug for NodeCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeCore")
            .field("name", &self.cfg.node.name)
            .field("peer", &self.info.peer_id)
            .finish_non_exhaustive()
    }
}

/// How much faster than its own published speed a bid may claim to prefill (homes refuse claims
/// beyond 4× the advert they hold, `policy::check_bid`; half of that leaves room for an advert
/// still in flight).
pub const MAX_CLAIM_OVER_ADVERT: f64 = 2.0;

/// `rate`, capped at [`MAX_CLAIM_OVER_ADVERT`] × `advertised` once something was advertised.
fn claimable_rate(rate: f64, advertised: f64) -> f64 {
    if advertised > 0.0 {
        rate.min(advertised * MAX_CLAIM_OVER_ADVERT)
    } else {
        rate
    }
}

impl NodeCore {
    /// The prefill rate (tokens/s) a bid may claim: the measured `rate`, but no more than
    /// [`MAX_CLAIM_OVER_ADVERT`] times the speed this node last advertised.
    pub fn claimable_prefill_rate(&self, rate: f64) -> f64 {
        claimable_rate(
            rate,
            f64::from_bits(self.advertised_prefill_tps.load(Ordering::Relaxed)),
        )
    }

    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cfg: NodeConfig,
        info: NodeInfo,
        text: TextSide,
        model_ref: ModelRef,
        layout: KvLayout,
        vocab: usize,
        max_context: usize,
        metrics: Arc<Metrics>,
        mesh: MeshHandle,
        compute: ComputeHandle,
    ) -> Self {
        let threshold = cfg.policy.offload_threshold_tokens;
        metrics.offload_threshold.set(threshold as i64);
        metrics
            .role
            .get_or_create(&crate::metrics::KindLabel {
                kind: "configured".into(),
            })
            .set(1);
        // Request ids start at a random-ish point so a restarted home does not reuse ids a peer
        // may still associate with an old transfer.
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
            & 0x0000_ffff_ffff_0000;
        Self {
            cfg,
            info,
            text,
            model_ref,
            layout,
            vocab,
            max_context,
            metrics,
            mesh,
            compute,
            inflight: Arc::new(AtomicUsize::new(0)),
            next_request: AtomicU64::new(seed.max(1)),
            threshold: AtomicUsize::new(threshold),
            bandwidth_scarce: AtomicBool::new(false),
            threshold_status: Mutex::new(serde_json::Value::Null),
            homed_lengths: Mutex::new(LengthHistogram::default()),
            ledger: Mutex::new(Ledger::default()),
            awaited_transfers: AtomicUsize::new(0),
            advertised_prefill_tps: AtomicU64::new(0),
            recent: Mutex::new(VecDeque::new()),
            api_url: OnceLock::new(),
            started: std::time::Instant::now(),
            role: Mutex::new(RoleState::new(RoleMode::Both, 0.0)),
        }
    }

    /// A fresh request id.
    pub fn next_request_id(&self) -> u64 {
        self.next_request.fetch_add(1, Ordering::Relaxed)
    }

    /// Remembers an auction for `/mesh`.
    pub fn record_auction(&self, rec: AuctionRecord) {
        self.metrics
            .auction_duration
            .observe(rec.elapsed_ms / 1000.0);
        if let Ok(mut r) = self.recent.lock() {
            if r.len() == RECENT_AUCTIONS {
                r.pop_front();
            }
            r.push_back(rec);
        }
    }

    /// Recent auctions, oldest first.
    pub fn recent_auctions(&self) -> Vec<AuctionRecord> {
        self.recent
            .lock()
            .map(|r| r.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// The mode this node serves or is moving to (`Both` = as configured), and since when.
    pub fn role_mode(&self) -> (RoleMode, f64) {
        let r = self.role_state();
        (r.target, r.since_s)
    }

    /// The whole role state: advertised mode, target, drain.
    pub fn role_state(&self) -> RoleState {
        self.role
            .lock()
            .map(|r| *r)
            .unwrap_or(RoleState::new(RoleMode::Both, 0.0))
    }

    /// Starts moving to `mode` (role conversion) at the current uptime: new work of a role
    /// given up stops at once; the advert changes when [`Self::poll_role_drain`] finds the
    /// drain over.
    pub fn set_role_mode(&self, mode: RoleMode) {
        let now = self.uptime_s();
        if let Ok(mut r) = self.role.lock() {
            r.begin(mode, now);
        }
        self.poll_role_drain();
        for (kind, on) in [
            ("configured", mode == RoleMode::Both),
            ("prefill", mode == RoleMode::PrefillOnly),
            ("decode", mode == RoleMode::DecodeOnly),
        ] {
            self.metrics
                .role
                .get_or_create(&crate::metrics::KindLabel { kind: kind.into() })
                .set(i64::from(on));
        }
    }

    /// Ends a role drain once nothing of the role given up is in flight (served prefills, or
    /// homed requests). Returns `true` when the advertised roles changed.
    pub fn poll_role_drain(&self) -> bool {
        let prefills = self.mesh.serve_gate().in_use();
        let homed = self.inflight.load(Ordering::Acquire);
        self.role
            .lock()
            .map(|mut r| r.poll_drain(prefills, homed))
            .unwrap_or(false)
    }

    /// Bids in others' auctions now (configured to, and neither converted nor converting to
    /// decode-only).
    pub fn serves_prefill_now(&self) -> bool {
        self.cfg.serves_prefill() && self.role_state().takes_prefill()
    }

    /// Homes new requests now (configured to, and neither converted nor converting to
    /// prefill-only).
    pub fn homes_now(&self) -> bool {
        self.cfg.is_home() && self.role_state().takes_homing()
    }

    /// Roles the advert states: the configured ones, less what a finished conversion gave up
    /// (a node still draining advertises its old roles).
    pub fn advertised_roles(&self) -> (bool, bool) {
        let r = self.role_state();
        (
            self.cfg.serves_prefill() && r.advertised.prefills(),
            self.cfg.is_home() && r.advertised.homes(),
        )
    }

    /// Seconds since the node started.
    pub fn uptime_s(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// Settles a payment to the winner `peer` (this node was the home).
    pub fn record_paid(&self, peer: &PeerId, amount: f64) {
        let period = self.cfg.policy.spend_period.as_secs_f64();
        let peer = peer.to_string();
        if let Ok(mut l) = self.ledger.lock() {
            l.record_paid(&peer, amount, self.uptime_s(), period);
        }
        if amount.is_finite() && amount >= 0.0 {
            self.metrics
                .settled
                .get_or_create(&crate::metrics::SettledLabels {
                    peer,
                    side: "paid".into(),
                })
                .inc_by(amount);
        }
    }

    /// Settles a payment earned from the home `peer` (this node prefilled for it).
    pub fn record_earned(&self, peer: &PeerId, amount: f64) {
        let peer = peer.to_string();
        if let Ok(mut l) = self.ledger.lock() {
            l.record_earned(&peer, amount);
        }
        if amount.is_finite() && amount >= 0.0 {
            self.metrics
                .settled
                .get_or_create(&crate::metrics::SettledLabels {
                    peer,
                    side: "earned".into(),
                })
                .inc_by(amount);
        }
    }

    /// Observed bandwidth to `peer` in bytes/s, or the configured assumption when unmeasured.
    pub fn bandwidth_to(&self, peer: &PeerId) -> (f64, bool) {
        match self.mesh.observed_bandwidth(peer) {
            Some(b) if b.bytes_per_sec > 0.0 => (b.bytes_per_sec, true),
            _ => (self.cfg.policy.assumed_bandwidth_bytes_per_s, false),
        }
    }
}

/// The node's shared state.
pub type Core = Arc<NodeCore>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bids_claim_at_most_twice_the_advertised_speed() {
        assert_eq!(claimable_rate(500.0, 0.0), 500.0, "nothing advertised yet");
        assert_eq!(claimable_rate(500.0, 100.0), 200.0, "capped");
        assert_eq!(claimable_rate(150.0, 100.0), 150.0, "within reach");
    }
}
