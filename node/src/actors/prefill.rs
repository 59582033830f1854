//! `PrefillWorker`: bids in other homes' auctions and serves the awards it wins, streaming the KV
//! of every prefill chunk as soon as the compute thread finishes each of its layers (layer-wise
//! pipelining, DESIGN.md §1 and §4 step 3).

use std::collections::{HashMap, VecDeque};
use std::time::Instant;

use actix::prelude::*;
use prfaas_mesh::auction::{Award, Bid, Call, DeclineReason, ServeSlot};
use prfaas_mesh::kv::{KvHeader, KvTrailer, KvWire};
use prfaas_mesh::policy::{BidderLoad, PricingParams};
use prfaas_mesh::{CallAnswer, CallToken, PeerId};
use tokio::sync::{mpsc, oneshot};

use super::compute::{cached_leading, Job};
use super::core::Core;
use super::decode::{DecodeEngine, RunJob};
use super::MAILBOX;
use crate::kv::wire::wire_label;
use crate::metrics::Metrics;

/// Calls remembered to check awards against (bounded; oldest forgotten first).
const REMEMBERED_CALLS: usize = 1024;
/// How long a bid holds.
const BID_VALID_MS: u32 = 10_000;

#[derive(Debug)]
pub struct PrefillWorker {
    core: Core,
    decode: Addr<DecodeEngine>,
    calls: HashMap<(PeerId, u64), u32>,
    order: VecDeque<(PeerId, u64)>,
    next_bid: u64,
}

impl PrefillWorker {
    pub fn new(core: Core, decode: Addr<DecodeEngine>) -> Self {
        Self {
            core,
            decode,
            calls: HashMap::new(),
            order: VecDeque::new(),
            next_bid: 1,
        }
    }

    fn remember(&mut self, peer: PeerId, request_id: u64, prompt_len: u32) {
        if self.calls.insert((peer, request_id), prompt_len).is_none() {
            self.order.push_back((peer, request_id));
        }
        while self.order.len() > REMEMBERED_CALLS {
            if let Some(k) = self.order.pop_front() {
                self.calls.remove(&k);
            }
        }
    }

    fn answer(&mut self, peer: PeerId, call: &Call) -> CallAnswer {
        let core = self.core.clone();
        let pol = &core.cfg.policy;
        let m = &core.metrics;
        if !core.serves_prefill_now() {
            return decline(m, DeclineReason::NotPrefilling);
        }
        if call.model != core.model_ref {
            return decline(m, DeclineReason::UnknownModel);
        }
        let n = call.prompt_len as usize;
        if n == 0 || n > core.max_context {
            return decline(m, DeclineReason::NotPrefilling);
        }
        // `max_served_prefills` is the gate's maximum (set at start); the mesh checks it again
        // when an award arrives.
        if !core.mesh.serve_gate().has_room()
            || core.compute.queued_jobs() >= core.cfg.engine.queue / 2
        {
            return decline(m, DeclineReason::Overloaded);
        }
        let view = core.compute.view();
        let block = core.layout.block_size;
        let cached = (cached_leading(&view, &call.prefix_block_hashes) * block).min(n - 1);
        let work = (n - cached) as f64;
        // What the home can check: claims stay within reach of the speed we advertised.
        let rate = core.claimable_prefill_rate(view.prefill_tokens_per_s().max(1.0));
        let queue_s = core.compute.queue_delay_s();
        let pricing = PricingParams::new(pol.price_per_1k_tokens, pol.queue_premium_per_s, 0.0)
            .unwrap_or(PricingParams {
                base_per_ktok: 1.0,
                queue_premium_per_s: 0.0,
                utilisation_premium: 0.0,
            });
        let price = pricing.price(
            work,
            BidderLoad {
                queue_delay_s: queue_s,
                utilisation: 0.0,
            },
        );
        let bid_id = self.next_bid;
        self.next_bid += 1;
        self.remember(peer, call.request_id, call.prompt_len);
        Metrics::inc(&m.auctions, "bid");
        CallAnswer::Bid(Bid {
            request_id: call.request_id,
            bid_id,
            price,
            queue_delay_ms: (queue_s * 1e3).min(f64::from(u32::MAX)) as u32,
            est_prefill_ms: (work / rate * 1e3).min(f64::from(u32::MAX)) as u32,
            cached_tokens: cached as u32,
            valid_for_ms: BID_VALID_MS,
        })
    }
}

fn decline(m: &Metrics, reason: DeclineReason) -> CallAnswer {
    Metrics::inc(&m.auctions, "declined");
    CallAnswer::Decline(reason)
}

impl Actor for PrefillWorker {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(MAILBOX);
    }
}

/// An auction call arrived from `peer`.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct BidFor {
    pub peer: PeerId,
    pub call: Call,
    pub token: CallToken,
}

impl Handler<BidFor> for PrefillWorker {
    type Result = ();

    fn handle(&mut self, msg: BidFor, _: &mut Self::Context) {
        let answer = self.answer(msg.peer, &msg.call);
        let mesh = self.core.mesh.clone();
        actix::spawn(async move {
            if let Err(e) = mesh.answer_call(msg.token, answer).await {
                tracing::debug!(error = %e, "answering a call failed");
            }
        });
    }
}

/// We won `award` from `peer`: prefill and stream the KV there.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Serve {
    pub peer: PeerId,
    pub award: Award,
    /// Our place among the awards served at once, held until serving ends.
    pub slot: ServeSlot,
}

impl Handler<Serve> for PrefillWorker {
    type Result = ();

    fn handle(&mut self, Serve { peer, award, slot }: Serve, _: &mut Self::Context) {
        let m = self.core.metrics.clone();
        let Some(prompt_len) = self.calls.remove(&(peer, award.request_id)) else {
            tracing::warn!(%peer, request = award.request_id, "award for a call we do not remember");
            Metrics::inc(&m.auctions, "serve_failed");
            return;
        };
        let tokens = match award.unpack_tokens() {
            Some(t)
                if t.len() == prompt_len as usize
                    && t.iter().all(|&x| (x as usize) < self.core.vocab) =>
            {
                t
            }
            _ => {
                tracing::warn!(%peer, request = award.request_id, "award carries a malformed prompt");
                Metrics::inc(&m.auctions, "serve_failed");
                return;
            }
        };
        Metrics::inc(&m.auctions, "won");
        let core = self.core.clone();
        let decode = self.decode.clone();
        // The winner's span: the home logs the same `mesh_request` in its request span.
        let span = tracing::info_span!(
            "serve_prefill",
            mesh_request = award.request_id,
            home = %peer,
            tokens = prompt_len
        );
        let serving_task = async move {
            let request = award.request_id;
            // The home stops waiting after its transfer timeout; so does the winner (a home that
            // reads too slowly or not at all must not hold the KV queued for it). Dropping
            // `serve` aborts the transfer and stops the prefill if it is still running.
            let limit = core.cfg.policy.transfer_timeout;
            let wire = award.kv_wire;
            let r = tokio::time::timeout(limit, serve(&core, &decode, peer, request, tokens, wire))
                .await
                .unwrap_or_else(|_| Err(format!("transfer not done within {limit:?}")));
            drop(slot);
            match r {
                Ok(()) => {
                    Metrics::inc(&core.metrics.auctions, "served");
                    core.record_earned(&peer, award.price);
                }
                Err(e) => {
                    tracing::warn!(%peer, request, error = %e, "serving a prefill failed");
                    Metrics::inc(&core.metrics.auctions, "serve_failed");
                }
            }
        };
        actix::spawn(tracing::Instrument::instrument(serving_task, span));
    }
}

async fn serve(
    core: &Core,
    decode: &Addr<DecodeEngine>,
    peer: PeerId,
    request_id: u64,
    tokens: Vec<u32>,
    wire: KvWire,
) -> Result<(), String> {
    let t0 = Instant::now();
    let n = tokens.len();
    let layout = &core.layout;
    let (ptx, mut prx) = mpsc::unbounded_channel();
    let (dtx, drx) = oneshot::channel();
    // Start computing first, then open the streams while the first pieces are being made.
    let queued = decode
        .send(RunJob(Job::ServePrefill {
            tokens,
            wire,
            pieces: ptx,
            done: dtx,
        }))
        .await
        .map_err(|e| format!("decode engine: {e}"))?;
    if !queued {
        return Err("compute queue full".into());
    }
    let layers = layout.layers.len();
    let header = KvHeader {
        request_id,
        model: core.model_ref.clone(),
        layers: layers as u32,
        tokens: n as u32,
        dtype: wire_label(layout, wire),
        // A piece is at most a whole layer's transfer.
        max_piece_bytes: (0..layers)
            .map(|l| layout.wire_transfer_layer_bytes(l, n, wire) as u64)
            .max()
            .unwrap_or(0),
        total_bytes: layout.wire_transfer_bytes(n, wire) as u64,
        probe: false,
    };
    // On any error below `prx` is dropped, which makes the compute thread's sink fail and the
    // prefill stop early.
    let mut sender = core
        .mesh
        .open_kv_transfer(peer, header)
        .await
        .map_err(|e| format!("opening the KV stream: {e}"))?;
    while let Some((piece, bytes)) = prx.recv().await {
        let len = bytes.len() as u64;
        sender
            .send_piece(piece, bytes)
            .await
            .map_err(|e| format!("sending a piece of layer {}: {e}", piece.layer))?;
        // Never keep a metric family's guard across an await: it is a read lock on the family,
        // and another task on this thread creating a label (a write lock) would deadlock it.
        Metrics::inc_by(&core.metrics.kv_bytes, "sent", len);
    }
    let served = drx
        .await
        .map_err(|_| "compute thread dropped the prefill".to_string())??;
    let payload = served.logits.iter().flat_map(|x| x.to_le_bytes()).collect();
    let done = sender
        .finish(KvTrailer {
            first_token: None,
            payload,
        })
        .await
        .map_err(|e| format!("finishing the KV stream: {e}"))?;
    tracing::info!(
        %peer,
        request = request_id,
        tokens = n,
        %wire,
        cached = served.cached_tokens,
        prefill_ms = served.elapsed.as_millis() as u64,
        total_ms = t0.elapsed().as_millis() as u64,
        bytes = done.bytes,
        "served a remote prefill"
    );
    Ok(())
}
