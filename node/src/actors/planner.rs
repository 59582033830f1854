//! `Planner`: where does a request's prefill run? (DESIGN.md §4 steps 2–5.)
//!
//! `offload iff l > t` on the incremental (uncached) length `l`; an offload runs a second-score
//! auction among peers advertising prefill for the same model hash and KV layout, with this
//! node's own prefill as the reserve bid. The winner streams the KV back piece by piece while it
//! prefills; each piece is written into leased blocks by position as it arrives, and when every
//! piece and the trailer have arrived and checked out, the request joins the decode batch.
//! Any failure (no bids, refused award, winner silent, stream cut, checksum, bad layout) falls
//! back to a local prefill: the client only sees extra latency. Each way an offload can end
//! locally is one [`Fallback`] variant, which names its metric label.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use actix::prelude::*;
use prfaas_mesh::advert::Advert;
use prfaas_mesh::auction::{Award, Call};
use prfaas_mesh::kv::receiver::{KvSink as MeshKvSink, SinkError as MeshSinkError};
use prfaas_mesh::kv::{KvError, KvTrailer, PieceId};
use prfaas_mesh::policy::{
    self, Candidate, LocalReason, PlacementInput, PlacementPlan, PricingParams, RequestShape,
};
use prfaas_mesh::reputation::TransferOutcome;
use prfaas_mesh::PeerId;

use super::bridge::{ExpectKv, MeshBridge};
use super::compute::{DecodeJob, ImportError, ImportTicket, Job};
use super::core::{AuctionRecord, BidRecord, Core};
use super::decode::{DecodeEngine, RunJob};
use super::kv_router::{KvArrival, PeerLost};
use super::MAILBOX;
use crate::engine::{KvPiece, LayerKv};
use crate::kv::prefix::block_hashes;
use crate::kv::wire::{wire_label, KvWire};
use crate::kv::KvLayout;
use crate::metrics::Metrics;
use crate::service::PrefillRoute;

/// Longest wait for the swarm to answer a query.
const MESH_ANSWER: std::time::Duration = std::time::Duration::from_secs(5);

/// Most block hashes sent in a call (64 KiB of hashes ≈ 130K tokens at 16 per block).
const MAX_CALL_HASHES: usize = 8192;

#[derive(Debug)]
pub struct Planner {
    core: Core,
    decode: Addr<DecodeEngine>,
    bridge: Addr<MeshBridge>,
}

impl Planner {
    pub fn new(core: Core, decode: Addr<DecodeEngine>, bridge: Addr<MeshBridge>) -> Self {
        Self {
            core,
            decode,
            bridge,
        }
    }
}

impl Actor for Planner {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(MAILBOX);
    }
}

/// Plan and run one admitted request.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Plan(pub Box<DecodeJob>);

impl Handler<Plan> for Planner {
    type Result = ();

    fn handle(&mut self, Plan(job): Plan, _: &mut Self::Context) {
        let core = self.core.clone();
        let decode = self.decode.clone();
        let bridge = self.bridge.clone();
        actix::spawn(async move { plan(core, decode, bridge, job).await });
    }
}

/// Why the planner chose local prefill, or how an offload went.
enum Decision {
    Local(String),
    Remote {
        peer: PeerId,
        price: f64,
        /// The KV, already written into leased blocks.
        ticket: ImportTicket,
        /// Last-position logits from the trailer.
        logits: Vec<f32>,
        kv_bytes: u64,
        transfer_s: f64,
    },
}

async fn plan(
    core: Core,
    decode: Addr<DecodeEngine>,
    bridge: Addr<MeshBridge>,
    mut job: Box<DecodeJob>,
) {
    let decision = decide(&core, &bridge, &job).await;
    let next = match decision {
        Decision::Local(reason) => {
            tracing::info!(request = job.request_id, tokens = job.tokens.len(), %reason, "prefill locally");
            job.route = PrefillRoute::Local { reason };
            Job::Generate(job)
        }
        Decision::Remote {
            peer,
            price,
            ticket,
            logits,
            kv_bytes,
            transfer_s,
        } => {
            tracing::info!(request = job.request_id, %peer, kv_bytes, transfer_s, "KV received from the auction winner");
            Metrics::inc_by(
                &core.metrics.prefill_tokens,
                "remote",
                job.tokens.len() as u64,
            );
            job.route = PrefillRoute::Remote {
                peer: peer.to_string(),
                price,
                kv_bytes,
                transfer_s,
            };
            Job::FinishImport {
                job,
                ticket,
                logits,
            }
        }
    };
    if decode.send(RunJob(next)).await.is_err() {
        tracing::error!("decode engine actor stopped");
    }
}

async fn decide(core: &Core, bridge: &Addr<MeshBridge>, job: &DecodeJob) -> Decision {
    let m = &core.metrics;
    let n = job.tokens.len();
    let block = core.layout.block_size;
    let cached = core.compute.cached_prefix_tokens(&job.tokens, block).min(n);
    if let Ok(mut h) = core.homed_lengths.lock() {
        h.observe((n - cached) as f64);
    }
    let t = core.threshold.load(Ordering::Relaxed);
    let me = core.mesh.local_peer_id();
    // Every wait on the mesh is bounded: a stalled swarm costs latency, never a stuck request.
    let asked = tokio::time::timeout(
        MESH_ANSWER,
        core.mesh.prefill_candidates(core.model_ref.clone()),
    )
    .await
    .unwrap_or_else(|_| {
        tracing::warn!("mesh did not list candidates in time");
        Err(prfaas_mesh::MeshError::ShutDown)
    });
    let adverts: Vec<(PeerId, Advert)> = match asked {
        Ok(c) => c.into_iter().filter(|(p, _)| *p != me).collect(),
        Err(e) => {
            tracing::debug!(error = %e, "no candidate list");
            Vec::new()
        }
    };
    let hashes: Vec<u64> = block_hashes(&job.tokens, block)
        .iter()
        .take(MAX_CALL_HASHES)
        .map(|h| h.short())
        .collect();
    let now_s = core.uptime_s();
    let cap = core.cfg.policy.spend_cap_per_peer;
    let period = core.cfg.policy.spend_period.as_secs_f64();
    let candidates: Vec<Candidate> = {
        let ledger = core.ledger.lock().ok();
        adverts
            .iter()
            .enumerate()
            .filter(|(_, (p, _))| {
                ledger
                    .as_ref()
                    .is_none_or(|l| l.may_pay(&p.to_string(), cap, now_s, period))
            })
            .map(|(i, (peer, ad))| candidate(core, i as u32, peer, ad, n, &hashes))
            .collect()
    };
    let rate = core.compute.view().prefill_tokens_per_s().max(1.0);
    let placement = policy::plan(&PlacementInput {
        request: RequestShape {
            total_tokens: n as f64,
            cached_local_tokens: cached as f64,
            cached_remote_tokens: 0.0,
        },
        threshold: t as f64,
        local_delay_s: core.compute.queue_delay_s() + (n - cached) as f64 / rate,
        candidates: &candidates,
        top_k: core.cfg.policy.auction_top_k,
        // A node's own queue already prices its reserve bid; short prompts never spill.
        spill_ratio: f64::INFINITY,
        spread: policy::spread_key(&me.to_bytes(), job.request_id),
        keep_ratio: core.cfg.policy.keep_ratio,
    });
    let (mut candidates, reserve_delay_weight): (Vec<PeerId>, f64) = match placement {
        PlacementPlan::Local {
            incremental_tokens,
            reason: LocalReason::Short,
        } => {
            Metrics::inc(&m.offload_decisions, "short");
            return Decision::Local(format!(
                "short prompt: {incremental_tokens} uncached tokens ≤ t = {t}"
            ));
        }
        PlacementPlan::Local { .. } => {
            Metrics::inc(&m.offload_decisions, "no_candidates");
            return Decision::Local(if adverts.is_empty() {
                "no prefill peers for this model".into()
            } else {
                "no prefill peer with room for this prompt (or all over the spend cap)".into()
            });
        }
        PlacementPlan::Auction {
            call,
            reserve_delay_weight,
            ..
        } => (
            call.into_iter()
                .filter_map(|i| adverts.get(i as usize).map(|(p, _)| *p))
                .collect(),
            reserve_delay_weight,
        ),
    };
    Metrics::inc(&m.offload_decisions, "offload");
    let started = Instant::now();
    let mut reauctioned = false;
    loop {
        let mut rec = AuctionRecord {
            request_id: job.request_id,
            prompt_tokens: n,
            cached_tokens: cached,
            bids: Vec::new(),
            declines: 0,
            silent: 0,
            winner: None,
            payment: 0.0,
            kv_wire: None,
            outcome: String::new(),
            elapsed_ms: 0.0,
        };
        let attempt_started = Instant::now();
        let r = auction(
            core,
            bridge,
            job,
            cached,
            &candidates,
            reserve_delay_weight,
            &mut rec,
        )
        .await;
        rec.elapsed_ms = attempt_started.elapsed().as_secs_f64() * 1e3;
        let fallback = match r {
            Ok(d) => {
                core.record_auction(rec);
                return d;
            }
            Err(fallback) => fallback,
        };
        rec.outcome = fallback.label().into();
        Metrics::inc(&m.auctions, fallback.label());
        core.record_auction(rec);
        // After a fast failure of the winner, one more auction among the others, if the time
        // spent so far leaves room for it; else (and after the second try) prefill here.
        let pol = &core.cfg.policy;
        let in_budget = started.elapsed() + pol.auction_deadline < pol.reauction_budget;
        if let (Some(peer), false, true) = (fallback.fast_failure_of(), reauctioned, in_budget) {
            candidates.retain(|p| *p != peer);
            if !candidates.is_empty() {
                reauctioned = true;
                tracing::info!(request = job.request_id, %peer, reason = %fallback, "re-auctioning without the failed winner");
                Metrics::inc(&m.auctions, "reauction");
                continue;
            }
        }
        if fallback.after_award() {
            Metrics::inc(&m.offload_decisions, "fallback");
        }
        return Decision::Local(fallback.to_string());
    }
}

/// A peer as this home sees it before calling it: its advert (profile, queue, free KV, prefix
/// summary) and the home's own link estimate towards it.
fn candidate(
    core: &Core,
    id: u32,
    peer: &PeerId,
    ad: &Advert,
    n: usize,
    hashes: &[u64],
) -> Candidate {
    let block = core.layout.block_size.max(1);
    let cached = (ad.body.prefix_summary.cached_prefix_blocks(hashes) * block).min(n);
    let kv = |l: f64| core.layout.transfer_bytes(l.max(0.0) as usize) as f64;
    let prefill = |l: f64| match advert_profile(ad, kv) {
        Some(p) => p.incremental_prefill_time(n as f64, l),
        None => f64::INFINITY,
    };
    let prefill_s = prefill(cached as f64);
    let (bw, _) = core.bandwidth_to(peer);
    Candidate {
        id,
        queue_delay_s: ad.body.queue_seconds(prefill(0.0)),
        prefill_s,
        cached_tokens: cached as f64,
        has_room: ad.body.free_kv_blocks >= n.div_ceil(block) as u64,
        kv_bytes: kv(n as f64),
        bandwidth_bytes_per_s: bw / core.mesh.reputation_penalty(peer),
    }
}

/// A peer's prefill profile from its advert (speed at a few lengths) and this model's KV size.
pub fn advert_profile(
    ad: &Advert,
    kv_bytes: impl Fn(f64) -> f64,
) -> Option<policy::PrefillProfile> {
    let pts: Vec<(f64, f64)> = ad
        .body
        .prefill_profile
        .iter()
        .filter(|p| p.tokens > 0 && p.tokens_per_sec.is_finite() && p.tokens_per_sec > 0.0)
        .map(|p| {
            (
                f64::from(p.tokens),
                f64::from(p.tokens) / f64::from(p.tokens_per_sec),
            )
        })
        .collect();
    if pts.is_empty() {
        return None;
    }
    policy::points_to_profile(&pts, kv_bytes).ok()
}

/// Why an offload attempt ended in local prefill.
#[derive(Debug, thiserror::Error)]
enum Fallback {
    #[error(
        "no bids from {candidates} candidates ({declines} declined, {silent} silent, {refused} refused)"
    )]
    NoBids {
        candidates: usize,
        declines: usize,
        silent: usize,
        refused: usize,
    },
    #[error("no bid scored under max_score")]
    NoneAffordable,
    #[error("reserve bid won the auction (score {score:.2} vs best remote {runner_up:.2})")]
    ReserveWon { score: f64, runner_up: f64 },
    #[error("winner {peer} refused the award")]
    AwardRefused { peer: PeerId },
    #[error("award to {peer} failed: {reason}")]
    AwardFailed { peer: PeerId, reason: String },
    #[error("offload to {peer} failed ({error}); prefilled locally")]
    Transfer { peer: PeerId, error: TransferError },
}

impl Fallback {
    /// The `outcome` label of auction metrics and records.
    fn label(&self) -> &'static str {
        match self {
            Fallback::NoBids { .. } | Fallback::NoneAffordable => "no_bids",
            Fallback::ReserveWon { .. } => "reserve_won",
            Fallback::AwardRefused { .. } | Fallback::AwardFailed { .. } => "award_refused",
            Fallback::Transfer {
                error: TransferError::Timeout(_) | TransferError::NoStream(_),
                ..
            } => "transfer_timeout",
            Fallback::Transfer { error, .. } if error.winner_lost() => "winner_lost",
            Fallback::Transfer {
                error: TransferError::Late { .. },
                ..
            } => "winner_late",
            Fallback::Transfer {
                error: TransferError::Stalled(_),
                ..
            } => "winner_stalled",
            Fallback::Transfer { .. } => "transfer_failed",
        }
    }

    /// The winner whose failure was quick and says nothing against the other bidders (refused
    /// or failed award, connection lost, stream cut, late): worth one more auction without it.
    fn fast_failure_of(&self) -> Option<PeerId> {
        match self {
            Fallback::AwardRefused { peer } | Fallback::AwardFailed { peer, .. } => Some(*peer),
            Fallback::Transfer { peer, error }
                if error.winner_lost()
                    || matches!(
                        error,
                        TransferError::Late { .. } | TransferError::Stalled(_)
                    ) =>
            {
                Some(*peer)
            }
            _ => None,
        }
    }

    /// The auction picked a peer, but the offload failed afterwards.
    fn after_award(&self) -> bool {
        matches!(
            self,
            Fallback::AwardRefused { .. }
                | Fallback::AwardFailed { .. }
                | Fallback::Transfer { .. }
        )
    }
}

/// Why receiving the winner's KV failed (home side).
#[derive(Debug, thiserror::Error)]
enum TransferError {
    /// The winner never opened its streams.
    #[error("no KV stream within {0:?}")]
    NoStream(Duration),
    /// The streams opened but did not complete in time.
    #[error("KV stream not complete within {0:?}")]
    Timeout(Duration),
    #[error("the KV wait was withdrawn")]
    Withdrawn,
    #[error("KV header does not fit this request: {0}")]
    Header(String),
    /// The stream itself failed (cut, corrupt, oversized, protocol violation).
    #[error(transparent)]
    Stream(#[from] KvError),
    /// The KV arrived but could not be kept (no room, a bad piece, lease expired).
    #[error(transparent)]
    Import(#[from] ImportError),
    #[error("transfer ended without logits")]
    NoLogits,
    /// The winner's connection closed before its streams opened (killed, crashed, cut off).
    #[error(transparent)]
    PeerLost(#[from] PeerLost),
    /// The winner opened no stream within its own claimed queue and prefill time plus the
    /// margin: cut, and recorded as late.
    #[error("no KV stream within the winner's claim of {claimed:?} + {margin:?}")]
    Late { claimed: Duration, margin: Duration },
    /// The streams opened, then no frame came for longer than the winner's whole claimed job
    /// plus the margin and one piece's time on the observed link (stalled, or cut off by a
    /// partition that closes no connection).
    #[error("KV stream stalled: no frame for {0:?}")]
    Stalled(Duration),
}

impl TransferError {
    /// The winner went away: its connection closed, or its streams were cut mid-transfer.
    fn winner_lost(&self) -> bool {
        matches!(
            self,
            TransferError::PeerLost(_)
                | TransferError::Stream(KvError::Truncated(_) | KvError::Io(_))
        )
    }

    /// How this failure counts in the winner's record. KV streams are authenticated and
    /// encrypted end to end, so what arrives malformed, out of range, of the wrong shape or with
    /// non-finite values was sent that way: a lie (two ban the peer), not a failure.
    fn outcome(&self) -> TransferOutcome {
        match self {
            TransferError::Late { .. } => TransferOutcome::Late,
            TransferError::Header(_)
            | TransferError::NoLogits
            | TransferError::Import(ImportError::BadPiece { .. })
            | TransferError::Stream(
                KvError::Corrupt { .. }
                | KvError::Protocol(_)
                | KvError::OutOfRange { .. }
                | KvError::Oversized { .. }
                | KvError::Sink(_),
            ) => TransferOutcome::Lied,
            _ => TransferOutcome::Failed,
        }
    }
}

async fn auction(
    core: &Core,
    bridge: &Addr<MeshBridge>,
    job: &DecodeJob,
    cached: usize,
    candidates: &[PeerId],
    reserve_delay_weight: f64,
    rec: &mut AuctionRecord,
) -> Result<Decision, Fallback> {
    let pol = &core.cfg.policy;
    let n = job.tokens.len();
    let hashes: Vec<u64> = block_hashes(&job.tokens, core.layout.block_size)
        .iter()
        .take(MAX_CALL_HASHES)
        .map(|h| h.short())
        .collect();
    let kv_bytes = core.layout.transfer_bytes(n) as u64;
    let call = Call {
        request_id: job.request_id,
        model: core.model_ref.clone(),
        prompt_len: n as u32,
        cached_prefix_tokens: cached as u32,
        prefix_block_hashes: hashes,
        kv_bytes_estimate: kv_bytes,
        deadline_ms: pol.auction_deadline.as_millis().min(u128::from(u32::MAX)) as u32,
    };
    let round = tokio::time::timeout(
        pol.auction_deadline + MESH_ANSWER,
        core.mesh.call_auction(candidates, call),
    )
    .await
    .unwrap_or_else(|_| {
        tracing::warn!("auction round overran its deadline");
        Default::default()
    });
    rec.declines = round.declines.len();
    rec.silent = round.silent.len();

    // Remote bids, scored with the bandwidth *we* observed to each bidder.
    let mut scored: Vec<(policy::Bid, f64)> = Vec::with_capacity(round.bids.len() + 1);
    for (i, (peer, b)) in round.bids.iter().enumerate() {
        let (bw, _measured) = core.bandwidth_to(peer);
        // A peer whose transfers failed, came late or lied looks slower than it measures.
        let bw = bw / core.mesh.reputation_penalty(peer);
        scored.push((
            policy::Bid {
                bidder: i as u32,
                price: b.price,
                queue_delay_s: f64::from(b.queue_delay_ms) / 1e3,
                prefill_s: f64::from(b.est_prefill_ms) / 1e3,
                kv_bytes: kv_bytes as f64,
                reserve: false,
            },
            bw,
        ));
    }
    // The reserve bid: this node's own prefill, priced by the same rule, times the factor that
    // says what a decode node's compute is worth to its running decodes.
    let view = core.compute.view();
    let rate = view.prefill_tokens_per_s().max(1.0);
    let pricing = PricingParams::new(pol.price_per_1k_tokens, pol.queue_premium_per_s, 0.0)
        .unwrap_or(PricingParams {
            base_per_ktok: 1.0,
            queue_premium_per_s: 0.0,
            utilisation_premium: 0.0,
        });
    let queue_s = core.compute.queue_delay_s();
    let work = (n - cached) as f64;
    let reserve = policy::Bid {
        bidder: u32::MAX,
        price: pricing.price(
            work,
            policy::BidderLoad {
                queue_delay_s: queue_s,
                utilisation: 0.0,
            },
        ) * pol.reserve_price_factor,
        queue_delay_s: queue_s,
        prefill_s: work / rate,
        kv_bytes: 0.0,
        reserve: true,
    };
    scored.push((reserve, 0.0));
    let params = policy::ScoringParams {
        lambda_per_s: pol.lambda_per_s,
        max_score: pol.max_score,
        reserve_delay_weight,
    };
    for (b, bw) in &scored {
        let (bidder, qd, ep, ct) = if b.reserve {
            (
                "local".to_string(),
                b.queue_delay_s,
                b.prefill_s,
                cached as u32,
            )
        } else {
            let (p, bid) = &round.bids[b.bidder as usize];
            (
                p.to_string(),
                f64::from(bid.queue_delay_ms) / 1e3,
                f64::from(bid.est_prefill_ms) / 1e3,
                bid.cached_tokens,
            )
        };
        rec.bids.push(BidRecord {
            bidder,
            price: b.price,
            queue_delay_ms: (qd * 1e3) as u32,
            est_prefill_ms: (ep * 1e3) as u32,
            cached_tokens: ct,
            bandwidth: *bw,
            score: params.score(b, *bw),
        });
    }
    if round.bids.is_empty() {
        return Err(Fallback::NoBids {
            candidates: candidates.len(),
            declines: round.declines.len(),
            silent: round.silent.len(),
            refused: round.refused.len(),
        });
    }
    let Some(won) = policy::settle(&scored, &params) else {
        return Err(Fallback::NoneAffordable);
    };
    if won.reserve {
        rec.winner = Some("local".into());
        return Err(Fallback::ReserveWon {
            score: won.score,
            runner_up: won.runner_up_score,
        });
    }
    let (peer, bid) = round.bids[won.bidder as usize].clone();
    rec.winner = Some(peer.to_string());
    rec.payment = won.payment;
    // Lease room for the KV and register for it before the award: the winner may start
    // streaming at once. The mesh refuses KV from peers nobody expects it from.
    let _expected =
        core.mesh
            .expect_kv(peer, job.request_id)
            .map_err(|e| Fallback::AwardFailed {
                peer,
                reason: format!("cannot await its KV: {e}"),
            })?;
    let ticket = core.compute.begin_import(job.tokens.clone());
    let incoming = bridge
        .send(ExpectKv {
            peer,
            request_id: job.request_id,
        })
        .await
        .map_err(|e| Fallback::AwardFailed {
            peer,
            reason: format!("mesh bridge: {e}"),
        })?;
    // Int8 on the wire only where allowed and where the link, not the prefill, is the bound.
    let (bw, _) = core.bandwidth_to(&peer);
    let wire = policy::choose_kv_wire(
        core.cfg.mesh.kv_wire,
        kv_bytes as f64,
        bw,
        f64::from(bid.est_prefill_ms) / 1e3,
    );
    rec.kv_wire = Some(wire.to_string());
    let award = Award {
        request_id: job.request_id,
        bid_id: bid.bid_id,
        price: won.payment.max(bid.price),
        tokens: Award::pack_tokens(&job.tokens),
        kv_wire: wire,
    };
    let award_sent = Instant::now();
    let awarded = tokio::time::timeout(
        MESH_ANSWER + core.cfg.mesh.limits.auction_timeout,
        core.mesh.award(peer, award),
    )
    .await
    .unwrap_or_else(|_| {
        tracing::warn!(%peer, "award not answered in time");
        Err(prfaas_mesh::MeshError::ShutDown)
    });
    match awarded {
        Ok(true) => Metrics::inc(&core.metrics.auctions, "awarded"),
        Ok(false) => return Err(Fallback::AwardRefused { peer }),
        Err(e) => {
            return Err(Fallback::AwardFailed {
                peer,
                reason: e.to_string(),
            })
        }
    }
    let claimed =
        Duration::from_millis(u64::from(bid.queue_delay_ms) + u64::from(bid.est_prefill_ms));
    match receive(core, job, incoming, &ticket, wire, claimed, bw).await {
        Ok((logits, bytes, wire)) => {
            Metrics::inc(&core.metrics.kv_transfers, wire.as_str());
            core.record_paid(&peer, won.payment.max(bid.price));
            rec.outcome = "ok".into();
            let transfer_s = award_sent.elapsed().as_secs_f64();
            core.metrics
                .kv_bytes
                .get_or_create(&crate::metrics::KindLabel {
                    kind: "received".into(),
                })
                .inc_by(bytes);
            Ok(Decision::Remote {
                peer,
                price: won.payment,
                ticket,
                logits,
                kv_bytes: bytes,
                transfer_s,
            })
        }
        Err(error) => {
            core.mesh.record_transfer(peer, error.outcome());
            Err(Fallback::Transfer { peer, error })
        }
    }
}

/// Waits for the winner's transfer and receives it into `ticket`'s leased blocks, checking it
/// fits this model and prompt. Returns the trailer's logits and the bytes received.
///
/// The first stream must open within the winner's own `claimed` queue and prefill time plus
/// `policy.late_margin` (it streams while it prefills, so an honest winner opens long before
/// that); a winner whose connection closes ends the wait at once. Once open, no gap between
/// frames may exceed [`stall_limit`].
async fn receive(
    core: &Core,
    job: &DecodeJob,
    incoming: tokio::sync::oneshot::Receiver<KvArrival>,
    ticket: &ImportTicket,
    asked: KvWire,
    claimed: Duration,
    bandwidth: f64,
) -> Result<(Vec<f32>, u64, KvWire), TransferError> {
    let timeout = core.cfg.policy.transfer_timeout;
    let margin = core.cfg.policy.late_margin;
    let now = tokio::time::Instant::now();
    let deadline = now + timeout;
    let first_by = now + (claimed + margin).min(timeout);
    let mut inc = match tokio::time::timeout_at(first_by, incoming).await {
        Err(_) if first_by < deadline => return Err(TransferError::Late { claimed, margin }),
        Err(_) => return Err(TransferError::NoStream(timeout)),
        Ok(Err(_)) => return Err(TransferError::Withdrawn),
        Ok(Ok(arrival)) => arrival?,
    };
    let h = inc.header().clone();
    let n = job.tokens.len();
    if h.model != core.model_ref {
        return Err(TransferError::Header(
            "KV for another model or layout".into(),
        ));
    }
    // What we asked for, or the exact encoding from a winner that predates the choice; never a
    // lossy encoding we did not ask for.
    let wire = [asked, KvWire::F16]
        .into_iter()
        .find(|&w| h.dtype == wire_label(&core.layout, w))
        .ok_or_else(|| {
            TransferError::Header(format!("KV encoded as {:?}, asked for {asked}", h.dtype))
        })?;
    if h.tokens as usize != n
        || h.layers as usize != core.layout.layers.len()
        || h.total_bytes != core.layout.wire_transfer_bytes(n, wire) as u64
    {
        return Err(TransferError::Header(format!(
            "{} tokens, {} layers, {} bytes of {wire}",
            h.tokens, h.layers, h.total_bytes
        )));
    }
    if let Some(e) = ticket.failure() {
        // Refuse the stream (dropping it resets it) rather than receive what cannot be kept.
        return Err(TransferError::Import(e));
    }
    inc.limit_idle(stall_limit(claimed, margin, h.max_piece_bytes, bandwidth));
    let stall = inc.idle_timeout();
    let mut sink = HomeSink {
        layout: &core.layout,
        wire,
        vocab: core.vocab,
        ticket,
        logits: None,
    };
    let got = tokio::time::timeout_at(deadline, inc.receive(&mut sink))
        .await
        .map_err(|_| TransferError::Timeout(timeout))?
        .map_err(|e| match e {
            KvError::Timeout(_) if stall < timeout => TransferError::Stalled(stall),
            // The sink refuses when the import failed: say why, not just "sink refused".
            KvError::Sink(_) => match ticket.failure() {
                Some(why) => TransferError::Import(why),
                None => TransferError::Stream(e),
            },
            e => TransferError::Stream(e),
        })?;
    let logits = sink.logits.ok_or(TransferError::NoLogits)?;
    Ok((logits, got.bytes, wire))
}

/// The longest an open transfer may go without a frame: the winner streams each chunk as it
/// is computed, so no honest gap is longer than the whole queue and prefill time it claimed,
/// plus the late margin, plus twice one piece's time on the link as the home observed it.
/// A winner that stalls (or a partition that closes no connection) is cut after this, not
/// after `policy.transfer_timeout`.
fn stall_limit(claimed: Duration, margin: Duration, piece_bytes: u64, bandwidth: f64) -> Duration {
    let piece_s = 2.0 * piece_bytes as f64 / bandwidth.max(1.0);
    claimed
        .saturating_add(margin)
        .saturating_add(Duration::try_from_secs_f64(piece_s).unwrap_or(Duration::MAX))
}

/// Home side of a transfer: parses each piece as it arrives (so a bad frame fails the transfer
/// at once) and hands it to the compute thread, which writes it into the leased blocks by
/// position and checks that pieces neither overlap nor leave gaps; keeps the trailer's logits.
struct HomeSink<'a> {
    layout: &'a KvLayout,
    /// How the pieces are encoded (checked against the header).
    wire: KvWire,
    vocab: usize,
    ticket: &'a ImportTicket,
    logits: Option<Vec<f32>>,
}

impl MeshKvSink for HomeSink<'_> {
    fn write_piece(&mut self, piece: PieceId, bytes: Vec<u8>) -> Result<(), MeshSinkError> {
        let layer = piece.layer as usize;
        let tokens = piece.start as usize..piece.end as usize;
        let kv = LayerKv::from_wire(self.layout, self.wire, layer, tokens.len(), &bytes)
            .map_err(|e| MeshSinkError(e.to_string()))?;
        drop(bytes);
        self.ticket
            .piece(KvPiece { layer, tokens, kv })
            .map_err(|e| MeshSinkError(e.to_string()))
    }

    fn finish(&mut self, trailer: KvTrailer) -> Result<(), MeshSinkError> {
        if trailer.payload.len() != self.vocab * 4 {
            return Err(MeshSinkError(format!(
                "trailer has {} bytes of logits, expected {}",
                trailer.payload.len(),
                self.vocab * 4
            )));
        }
        self.logits = Some(
            trailer
                .payload
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stall_is_bounded_by_the_claim_the_margin_and_two_pieces_on_the_link() {
        let s = Duration::from_secs;
        assert_eq!(stall_limit(s(1), s(3), 1_000_000, 1e6), s(6));
        // An unmeasured or absurd link never overflows; the configured timeout still bounds it.
        assert!(stall_limit(s(1), s(3), u64::MAX, 0.0) >= s(4));
        assert_eq!(stall_limit(Duration::MAX, s(3), 1, 1.0), Duration::MAX);
    }

    #[test]
    fn what_the_winner_sent_is_a_lie_what_the_network_did_is_a_failure() {
        let lies = [
            TransferError::Header("wrong model".into()),
            TransferError::NoLogits,
            TransferError::Import(ImportError::BadPiece {
                layer: 0,
                reason: "non-finite".into(),
            }),
            TransferError::Stream(KvError::Protocol("garbage".into())),
            TransferError::Stream(KvError::Sink("bad piece bytes".into())),
        ];
        for e in lies {
            assert_eq!(e.outcome(), TransferOutcome::Lied, "{e}");
        }
        let failures = [
            TransferError::PeerLost(PeerLost),
            TransferError::Stream(KvError::Truncated("cut".into())),
            TransferError::Timeout(Duration::from_secs(1)),
            TransferError::NoStream(Duration::from_secs(1)),
            TransferError::Import(ImportError::NoRoom("full".into())),
            TransferError::Import(ImportError::LeaseExpired),
        ];
        for e in failures {
            assert_eq!(e.outcome(), TransferOutcome::Failed, "{e}");
        }
        let late = TransferError::Late {
            claimed: Duration::ZERO,
            margin: Duration::from_secs(3),
        };
        assert_eq!(late.outcome(), TransferOutcome::Late);
    }
}
