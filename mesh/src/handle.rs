//! The cloneable handle the rest of the program uses to talk to the swarm task.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use futures::stream::{FuturesUnordered, StreamExt};
use libp2p::{Multiaddr, PeerId};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::advert::{Advert, AdvertBody, ModelRef};
use crate::auction::{AuctionRequest, AuctionResponse, Award, Bid, Call, DeclineReason};
use crate::bandwidth::BandwidthEstimate;
use crate::event::CallToken;
use crate::kv::sender::KvOpener;
use crate::kv::{KvHeader, KvSender};
use crate::stats::{MeshStats, MeshStatsSnapshot};
use crate::MeshError;

/// Commands from handles to the swarm task.
#[derive(Debug)]
pub(crate) enum Command {
    Dial(Multiaddr, oneshot::Sender<Result<PeerId, MeshError>>),
    SetAdvert(Box<AdvertBody>),
    Candidates(ModelRef, oneshot::Sender<Vec<(PeerId, Advert)>>),
    KnownPeers(oneshot::Sender<Vec<PeerId>>),
    Adverts(oneshot::Sender<Vec<KnownAdvert>>),
    ConnectedPeers(oneshot::Sender<Vec<PeerId>>),
    ListenAddrs(oneshot::Sender<Vec<Multiaddr>>),
    Request(
        PeerId,
        AuctionRequest,
        oneshot::Sender<Result<AuctionResponse, MeshError>>,
    ),
    AnswerCall(CallToken, CallAnswer),
}

/// The application's answer to an inbound call.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum CallAnswer {
    /// Offer this bid (the mesh records it so a later award can be checked).
    Bid(Bid),
    /// Decline.
    Decline(DeclineReason),
}

/// Result of one auction round (call → bids until the deadline or all answered).
#[derive(Debug, Clone, Default)]
pub struct AuctionRound {
    /// Bids received before the deadline.
    pub bids: Vec<(PeerId, Bid)>,
    /// Explicit declines.
    pub declines: Vec<(PeerId, DeclineReason)>,
    /// Candidates that did not answer in time or failed.
    pub silent: Vec<PeerId>,
    /// Bids refused by [`crate::policy::check_bid`] (bad price, claims that contradict the
    /// bidder's advert); they are not in `bids`.
    pub refused: Vec<(PeerId, crate::policy::BidFault)>,
}

/// A peer table entry as [`MeshHandle::adverts`] reports it.
#[derive(Debug, Clone)]
pub struct KnownAdvert {
    /// The advertising peer.
    pub peer: PeerId,
    /// Its latest verified advert.
    pub advert: Advert,
    /// How long ago that advert arrived.
    pub age: Duration,
}

/// State shared by every clone of a handle (no message passing through it: it holds settings and
/// the KV stream control, which libp2p-stream designed to be used outside the swarm task).
pub(crate) struct Shared {
    pub local_peer_id: PeerId,
    pub commands: mpsc::Sender<Command>,
    pub cancel: CancellationToken,
    pub task: tokio::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// KV stream control, bandwidth estimator, emulated rates (shared with the swarm task's
    /// probes) and transfer ids.
    pub kv: KvOpener,
    pub stats: Arc<MeshStats>,
    pub added_latency: RwLock<HashMap<PeerId, Duration>>,
    pub streams_per_transfer: u16,
    pub max_streams: u16,
    pub serve_gate: crate::auction::ServeGate,
    pub reputation: Arc<Mutex<crate::reputation::Reputation>>,
    pub nat: crate::nat::SharedNat,
    pub expected: crate::kv::quota::ExpectedTransfers,
}

/// Cloneable handle to a running mesh node.
#[derive(Clone)]
pub struct MeshHandle {
    pub(crate) shared: Arc<Shared>,
}

impl std::fmt::Debug for MeshHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshHandle")
            .field("peer", &self.shared.local_peer_id)
            .finish()
    }
}

impl MeshHandle {
    /// This node's peer id.
    pub fn local_peer_id(&self) -> PeerId {
        self.shared.local_peer_id
    }

    /// Records how a transfer from auction winner `peer` went (the home reports it); repeated
    /// lies ban the peer for `reputation.ban_for`: it is left out of every auction meanwhile.
    pub fn record_transfer(&self, peer: PeerId, outcome: crate::reputation::TransferOutcome) {
        let Ok(mut r) = self.shared.reputation.lock() else {
            return;
        };
        if r.record(peer, outcome, Instant::now()) {
            tracing::warn!(%peer, "peer banned after repeated failed KV verifications");
            self.shared
                .stats
                .peers_banned
                .fetch_add(1, Ordering::Relaxed);
        }
    }

    /// NAT traversal counters and AutoNAT's verdict (for `/mesh`).
    pub fn nat(&self) -> crate::nat::NatSnapshot {
        crate::nat::read(&self.shared.nat, |n| n.snapshot())
    }

    /// Whether we reach `peer` directly or only through a relay (`None`: not connected).
    pub fn link(&self, peer: &PeerId) -> Option<crate::nat::Link> {
        crate::nat::read(&self.shared.nat, |n| n.link(peer))
    }

    /// Per-peer transfer records (for `/mesh`).
    pub fn reputation(&self) -> Vec<(PeerId, crate::reputation::PeerRecord)> {
        self.shared
            .reputation
            .lock()
            .map(|r| r.records(Instant::now()))
            .unwrap_or_default()
    }

    /// Score factor (≥ 1) for bids of `peer` from its transfer record.
    pub fn reputation_penalty(&self, peer: &PeerId) -> f64 {
        self.shared
            .reputation
            .lock()
            .map(|r| r.penalty(peer))
            .unwrap_or(1.0)
    }

    /// Expects the KV transfer for `request_id` from `peer` (an award to it) until the returned
    /// value is dropped: the node accepts a transfer only from a peer it expects one from, so
    /// strangers cannot hold its transfer slots. `Overloaded` when too many are registered.
    pub fn expect_kv(
        &self,
        peer: PeerId,
        request_id: u64,
    ) -> Result<crate::kv::quota::KvExpectation, MeshError> {
        self.shared.expected.expect(peer, request_id)
    }

    /// How many won awards this node serves at once; set its maximum, check it when bidding.
    /// The mesh checks it again when an award arrives and hands the place to the application
    /// with [`crate::MeshEvent::Awarded`].
    pub fn serve_gate(&self) -> &crate::auction::ServeGate {
        &self.shared.serve_gate
    }

    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, MeshError> {
        let (tx, rx) = oneshot::channel();
        self.shared
            .commands
            .send(make(tx))
            .await
            .map_err(|_| MeshError::ShutDown)?;
        rx.await.map_err(|_| MeshError::ShutDown)
    }

    /// Dials `addr` and waits until the connection is established (or fails).
    pub async fn dial(&self, addr: Multiaddr) -> Result<PeerId, MeshError> {
        self.ask(|tx| Command::Dial(addr, tx)).await?
    }

    /// Replaces what we advertise and publishes it right away.
    pub async fn set_advert(&self, body: AdvertBody) -> Result<(), MeshError> {
        self.shared
            .commands
            .send(Command::SetAdvert(Box::new(body)))
            .await
            .map_err(|_| MeshError::ShutDown)
    }

    /// Peers whose adverts say they can prefill `model`, most useful first.
    pub async fn prefill_candidates(
        &self,
        model: ModelRef,
    ) -> Result<Vec<(PeerId, Advert)>, MeshError> {
        self.ask(|tx| Command::Candidates(model, tx)).await
    }

    /// Peers currently in the peer table.
    pub async fn known_peers(&self) -> Result<Vec<PeerId>, MeshError> {
        self.ask(Command::KnownPeers).await
    }

    /// Every peer table entry (latest advert and its age), for operators' views.
    pub async fn adverts(&self) -> Result<Vec<KnownAdvert>, MeshError> {
        self.ask(Command::Adverts).await
    }

    /// Peers with an open connection.
    pub async fn connected_peers(&self) -> Result<Vec<PeerId>, MeshError> {
        self.ask(Command::ConnectedPeers).await
    }

    /// Addresses we listen on; waits for the first one if none is bound yet.
    pub async fn listen_addrs(&self) -> Result<Vec<Multiaddr>, MeshError> {
        self.ask(Command::ListenAddrs).await
    }

    /// Sends one auction request and waits for the answer (honouring emulated latency both ways).
    pub async fn request(
        &self,
        peer: PeerId,
        req: AuctionRequest,
    ) -> Result<AuctionResponse, MeshError> {
        let delay = self.added_latency(&peer);
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let r = self.ask(|tx| Command::Request(peer, req, tx)).await?;
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        r
    }

    /// Sends `call` to every candidate and collects answers until all answered or `call.deadline_ms`
    /// elapsed. Scoring and choosing the winner is the caller's (policy's) job.
    pub async fn call_auction(&self, candidates: &[PeerId], call: Call) -> AuctionRound {
        let deadline =
            tokio::time::Instant::now() + Duration::from_millis(u64::from(call.deadline_ms));
        // The bidders' adverts, to check their claims against (a bidder unknown to the table
        // cannot be checked and is refused).
        let adverts: HashMap<PeerId, Advert> =
            tokio::time::timeout_at(deadline, self.prefill_candidates(call.model.clone()))
                .await
                .ok()
                .and_then(Result::ok)
                .unwrap_or_default()
                .into_iter()
                .collect();
        let mut pending: FuturesUnordered<_> = candidates
            .iter()
            .map(|&p| {
                let req = AuctionRequest::Call(call.clone());
                async move { (p, self.request(p, req).await) }
            })
            .collect();
        let mut round = AuctionRound::default();
        let mut answered = Vec::with_capacity(candidates.len());
        while let Ok(Some((p, r))) = tokio::time::timeout_at(deadline, pending.next()).await {
            answered.push(p);
            match r {
                Ok(AuctionResponse::Bid(b)) if b.request_id == call.request_id => {
                    match crate::policy::check_bid(&call, &b, adverts.get(&p)) {
                        Ok(()) => round.bids.push((p, b)),
                        Err(fault) => {
                            tracing::info!(peer = %p, %fault, "bid refused");
                            self.shared
                                .stats
                                .bids_refused
                                .fetch_add(1, Ordering::Relaxed);
                            round.refused.push((p, fault));
                        }
                    }
                }
                Ok(AuctionResponse::Decline { reason, .. }) => round.declines.push((p, reason)),
                _ => round.silent.push(p),
            }
        }
        round
            .silent
            .extend(candidates.iter().filter(|p| !answered.contains(p)).copied());
        round
    }

    /// Awards `award` to `peer`; `Ok(true)` if the bidder accepted, `Ok(false)` if it refused
    /// (e.g. the bid expired).
    pub async fn award(&self, peer: PeerId, award: Award) -> Result<bool, MeshError> {
        match self.request(peer, AuctionRequest::Award(award)).await? {
            AuctionResponse::AwardAccepted { .. } => Ok(true),
            _ => Ok(false),
        }
    }

    /// Answers an inbound call (see `MeshEvent::AuctionCall`).
    pub async fn answer_call(&self, token: CallToken, answer: CallAnswer) -> Result<(), MeshError> {
        self.shared
            .commands
            .send(Command::AnswerCall(token, answer))
            .await
            .map_err(|_| MeshError::ShutDown)
    }

    /// Opens a KV transfer to `peer` over the configured number of parallel streams.
    pub async fn open_kv_transfer(
        &self,
        peer: PeerId,
        header: KvHeader,
    ) -> Result<KvSender, MeshError> {
        self.open_kv_transfer_with(peer, header, self.shared.streams_per_transfer)
            .await
    }

    /// Opens a KV transfer over `streams` parallel streams (clamped to the configured maximum).
    pub async fn open_kv_transfer_with(
        &self,
        peer: PeerId,
        header: KvHeader,
        streams: u16,
    ) -> Result<KvSender, MeshError> {
        let delay = self.added_latency(&peer);
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let streams = streams.clamp(1, self.shared.max_streams.max(1));
        Ok(self.shared.kv.open(peer, header, streams).await?)
    }

    /// Raw access to the libp2p-stream control (tools and tests that need to speak the KV wire
    /// format directly, e.g. to check that malformed transfers are rejected).
    pub fn kv_control(&self) -> libp2p_stream::Control {
        self.shared.kv.control.clone()
    }

    /// Current goodput estimate towards `peer`.
    pub fn observed_bandwidth(&self, peer: &PeerId) -> Option<BandwidthEstimate> {
        self.shared.kv.estimator.lock().ok()?.get(peer)
    }

    /// Records an externally measured transfer (e.g. the node measured a transfer end to end).
    pub fn record_bandwidth(&self, peer: PeerId, bytes: u64, elapsed: Duration) {
        if let Ok(mut e) = self.shared.kv.estimator.lock() {
            e.record(peer, bytes, elapsed, Instant::now());
        }
    }

    /// Emulated one-way latency added to everything sent to `peer` (tests; netem is unavailable).
    pub fn set_added_latency(&self, peer: PeerId, delay: Duration) {
        if let Ok(mut m) = self.shared.added_latency.write() {
            if delay.is_zero() {
                m.remove(&peer);
            } else {
                m.insert(peer, delay);
            }
        }
    }

    /// Emulated link rate for KV transfers (and bandwidth probes) sent to `peer`, in bytes per
    /// second: the sender paces itself so a transfer takes at least `bytes / rate`. `None` removes
    /// it. For tests and benchmarks on one machine (kernel shaping needs root and namespaces).
    pub fn set_emulated_bandwidth(&self, peer: PeerId, bytes_per_sec: Option<f64>) {
        if let Ok(mut m) = self.shared.kv.emulated_rate.write() {
            match bytes_per_sec.filter(|r| r.is_finite() && *r > 0.0) {
                Some(r) => {
                    m.insert(peer, r);
                }
                None => {
                    m.remove(&peer);
                }
            }
        }
    }

    fn added_latency(&self, peer: &PeerId) -> Duration {
        self.shared
            .added_latency
            .read()
            .ok()
            .and_then(|m| m.get(peer).copied())
            .unwrap_or_default()
    }

    /// Refusal and drop counters.
    pub fn stats(&self) -> MeshStatsSnapshot {
        self.shared.stats.snapshot()
    }

    /// Stops the swarm task and waits for it to end. Other handles then get `ShutDown`.
    pub async fn shutdown(&self) {
        self.shared.cancel.cancel();
        let task = self.shared.task.lock().await.take();
        if let Some(t) = task {
            let _ = t.await;
        }
    }
}
