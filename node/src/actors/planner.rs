//! `Planner`: where does a request's prefill run? (DESIGN.md §4 steps 2–5.)
//!
//! `offload iff l > t` on the incremental (uncached) length `l`; an offload runs a second-score
//! auction among peers advertising prefill for the same model hash and KV layout, with this
//! node's own prefill as the reserve bid. The winner streams the KV back layer by layer; when the
//! last layer and the trailer have arrived and checked out, the request joins the decode batch.
//! Any failure (no bids, refused award, winner silent, stream cut, checksum, bad layout) falls
//! back to a local prefill: the client only sees extra latency.

use std::sync::atomic::Ordering;
use std::time::Instant;

use actix::prelude::*;
use prfaas_mesh::auction::{Award, Call};
use prfaas_mesh::kv::receiver::{KvSink as MeshKvSink, SinkError as MeshSinkError};
use prfaas_mesh::kv::{KvIncoming, KvTrailer};
use prfaas_mesh::policy::{self, OffloadRule, Placement, PricingParams, RequestShape};
use prfaas_mesh::PeerId;

use super::compute::{DecodeJob, ImportTicket, Job};
use super::core::{AuctionRecord, BidRecord, Core};
use super::decode::{DecodeEngine, RunJob};
use super::MAILBOX;
use crate::engine::LayerKv;
use crate::kv::prefix::block_hashes;
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
}

impl Planner {
    pub fn new(core: Core, decode: Addr<DecodeEngine>) -> Self {
        Self { core, decode }
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
        actix::spawn(async move { plan(core, decode, job).await });
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

async fn plan(core: Core, decode: Addr<DecodeEngine>, mut job: Box<DecodeJob>) {
    let decision = decide(&core, &job).await;
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

async fn decide(core: &Core, job: &DecodeJob) -> Decision {
    let m = &core.metrics;
    let n = job.tokens.len();
    let block = core.layout.block_size;
    let cached = core.compute.cached_prefix_tokens(&job.tokens, block).min(n);
    let t = core.threshold.load(Ordering::Relaxed);
    let shape = RequestShape {
        total_tokens: n as f64,
        cached_local_tokens: cached as f64,
        cached_remote_tokens: 0.0,
    };
    let rule = OffloadRule {
        threshold_tokens: t as f64,
    };
    if rule.decide(&shape, false) == Placement::Local {
        Metrics::inc(&m.offload_decisions, "short");
        return Decision::Local(format!(
            "short prompt: {} uncached tokens ≤ t = {t}",
            n - cached
        ));
    }
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
    let candidates: Vec<PeerId> = match asked {
        Ok(c) => c.into_iter().map(|(p, _)| p).filter(|p| *p != me).collect(),
        Err(e) => {
            Metrics::inc(&m.offload_decisions, "no_candidates");
            return Decision::Local(format!("mesh unavailable: {e}"));
        }
    };
    if candidates.is_empty() {
        Metrics::inc(&m.offload_decisions, "no_candidates");
        return Decision::Local("no prefill peers for this model".into());
    }
    Metrics::inc(&m.offload_decisions, "offload");
    let started = Instant::now();
    let mut rec = AuctionRecord {
        request_id: job.request_id,
        prompt_tokens: n,
        cached_tokens: cached,
        bids: Vec::new(),
        declines: 0,
        silent: 0,
        winner: None,
        payment: 0.0,
        outcome: String::new(),
        elapsed_ms: 0.0,
    };
    let r = auction(core, job, cached, &candidates, &mut rec).await;
    rec.elapsed_ms = started.elapsed().as_secs_f64() * 1e3;
    let decision = match r {
        Ok(d) => d,
        Err(fallback) => {
            rec.outcome = fallback.kind.into();
            Metrics::inc(&m.auctions, fallback.kind);
            if fallback.counts_as_fallback {
                Metrics::inc(&m.offload_decisions, "fallback");
            }
            Decision::Local(fallback.reason)
        }
    };
    core.record_auction(rec);
    decision
}

/// Why an offload attempt ended in local prefill.
struct Fallback {
    kind: &'static str,
    reason: String,
    /// The auction picked a peer but the offload failed afterwards.
    counts_as_fallback: bool,
}

impl Fallback {
    fn new(kind: &'static str, reason: String) -> Self {
        Self {
            kind,
            reason,
            counts_as_fallback: false,
        }
    }
    fn failed(kind: &'static str, reason: String) -> Self {
        Self {
            kind,
            reason,
            counts_as_fallback: true,
        }
    }
}

async fn auction(
    core: &Core,
    job: &DecodeJob,
    cached: usize,
    candidates: &[PeerId],
    rec: &mut AuctionRecord,
) -> Result<Decision, Fallback> {
    let pol = &core.cfg.policy;
    let n = job.tokens.len();
    let hashes: Vec<u64> = block_hashes(&job.tokens, core.layout.block_size)
        .iter()
        .take(MAX_CALL_HASHES)
        .map(|h| h.short())
        .collect();
    let kv_bytes = core.layout.export_bytes(n) as u64;
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
    let rate = view.prefill_tokens_per_s.max(1.0);
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
        return Err(Fallback::new(
            "no_bids",
            format!(
                "no bids from {} candidates ({} declined, {} silent)",
                candidates.len(),
                round.declines.len(),
                round.silent.len()
            ),
        ));
    }
    let Some(won) = policy::settle(&scored, &params) else {
        return Err(Fallback::new(
            "no_bids",
            "no bid scored under max_score".into(),
        ));
    };
    if won.reserve {
        rec.winner = Some("local".into());
        return Err(Fallback::new(
            "reserve_won",
            format!(
                "reserve bid won the auction (score {:.2} vs best remote {:.2})",
                won.score, won.runner_up_score
            ),
        ));
    }
    let (peer, bid) = round.bids[won.bidder as usize].clone();
    rec.winner = Some(peer.to_string());
    rec.payment = won.payment;
    // Lease room for the KV and register for it before the award: the winner may start
    // streaming at once.
    let ticket = core.compute.begin_import(job.tokens.clone());
    let incoming = core.expect_kv(peer, job.request_id);
    let award = Award {
        request_id: job.request_id,
        bid_id: bid.bid_id,
        price: won.payment.max(bid.price),
        tokens: Award::pack_tokens(&job.tokens),
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
        Ok(false) => {
            core.forget_kv(peer, job.request_id);
            return Err(Fallback::failed(
                "award_refused",
                format!("winner {peer} refused the award"),
            ));
        }
        Err(e) => {
            core.forget_kv(peer, job.request_id);
            return Err(Fallback::failed(
                "award_refused",
                format!("award to {peer} failed: {e}"),
            ));
        }
    }
    let received = receive(core, peer, job, incoming, &ticket).await;
    core.forget_kv(peer, job.request_id);
    match received {
        Ok((logits, bytes)) => {
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
        Err(e) => {
            core.mesh
                .record_transfer(peer, prfaas_mesh::reputation::TransferOutcome::Failed);
            Err(Fallback::failed(
                "transfer_failed",
                format!("offload to {peer} failed ({e}); prefilled locally"),
            ))
        }
    }
}

/// Waits for the winner's transfer and receives it into `ticket`'s leased blocks, checking it
/// fits this model and prompt. Returns the trailer's logits and the bytes received.
async fn receive(
    core: &Core,
    peer: PeerId,
    job: &DecodeJob,
    incoming: tokio::sync::oneshot::Receiver<KvIncoming>,
    ticket: &ImportTicket,
) -> Result<(Vec<f32>, u64), String> {
    let timeout = core.cfg.policy.transfer_timeout;
    let deadline = tokio::time::Instant::now() + timeout;
    let inc = tokio::time::timeout_at(deadline, incoming)
        .await
        .map_err(|_| format!("no KV stream within {timeout:?}"))?
        .map_err(|_| "KV wait cancelled".to_string())?;
    let h = inc.header();
    let n = job.tokens.len();
    if h.model != core.model_ref {
        return Err("KV for another model or layout".into());
    }
    if h.tokens as usize != n
        || h.layers as usize != core.layout.layers.len()
        || h.total_bytes != core.layout.export_bytes(n) as u64
    {
        return Err(format!(
            "KV header does not fit the prompt ({} tokens, {} layers, {} bytes)",
            h.tokens, h.layers, h.total_bytes
        ));
    }
    debug_assert_eq!(inc.peer(), peer);
    if let Some(e) = ticket.failure() {
        // Refuse the stream (dropping it resets it) rather than receive what cannot be kept.
        return Err(e);
    }
    let mut sink = HomeSink::new(core.layout.clone(), n, core.vocab, ticket);
    let got = tokio::time::timeout_at(deadline, inc.receive(&mut sink))
        .await
        .map_err(|_| format!("KV stream not complete within {timeout:?}"))?
        .map_err(|e| e.to_string())?;
    let logits = sink.logits.ok_or("transfer ended without logits")?;
    Ok((logits, got.bytes))
}

/// Home side of a transfer: parses each layer as it arrives (so a bad frame fails the transfer
/// at once) and hands it to the compute thread, which writes it into the leased blocks; keeps
/// the trailer's logits.
struct HomeSink<'a> {
    layout: KvLayout,
    tokens: usize,
    vocab: usize,
    ticket: &'a ImportTicket,
    /// Layers handed over so far.
    layers: usize,
    logits: Option<Vec<f32>>,
}

impl<'a> HomeSink<'a> {
    fn new(layout: KvLayout, tokens: usize, vocab: usize, ticket: &'a ImportTicket) -> Self {
        Self {
            layout,
            tokens,
            vocab,
            ticket,
            layers: 0,
            logits: None,
        }
    }
}

impl MeshKvSink for HomeSink<'_> {
    fn write_layer(&mut self, layer: u32, bytes: Vec<u8>) -> Result<(), MeshSinkError> {
        if layer as usize != self.layers {
            return Err(MeshSinkError(format!(
                "layer {layer} arrived, expected {}",
                self.layers
            )));
        }
        let kv = LayerKv::from_le_bytes(&self.layout, layer as usize, self.tokens, &bytes)
            .map_err(|e| MeshSinkError(e.to_string()))?;
        drop(bytes);
        self.ticket
            .layer(layer as usize, kv)
            .map_err(MeshSinkError)?;
        self.layers += 1;
        Ok(())
    }

    fn finish(&mut self, trailer: KvTrailer) -> Result<(), MeshSinkError> {
        if self.layers != self.layout.layers.len() {
            return Err(MeshSinkError("trailer before the last layer".into()));
        }
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
