//! `MeshBridge`: the only actor that talks to the libp2p swarm. It turns `MeshEvent`s into
//! messages for the other actors, routes incoming KV transfers to the requests that await them
//! ([`KvRouter`]), publishes this node's advert when it changes, and mirrors the mesh's view
//! (peers, bandwidth) into the metrics.

use actix::prelude::*;
use prfaas_mesh::advert::message::PrefillPoint;
use prfaas_mesh::{AdvertBody, MeshEvent, Role};
use tokio::sync::mpsc;

use super::core::Core;
use super::kv_router::KvRouter;
use super::kvstore::{AdvertPart, KvStore};
use super::prefill::{BidFor, PrefillWorker, Serve};
use super::scheduler::{consider_role, ThresholdState};
use super::MAILBOX;
use crate::metrics::{KindLabel, PeerLabel};
use prfaas_mesh::auction::DeclineReason;
use prfaas_mesh::CallAnswer;

pub struct MeshBridge {
    core: Core,
    prefill: Addr<PrefillWorker>,
    kv: Addr<KvStore>,
    events: Option<mpsc::Receiver<MeshEvent>>,
    last_advert: Option<AdvertBody>,
    kv_router: KvRouter,
    threshold: ThresholdState,
}

impl std::fmt::Debug for MeshBridge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshBridge").finish_non_exhaustive()
    }
}

impl MeshBridge {
    pub fn new(
        core: Core,
        prefill: Addr<PrefillWorker>,
        kv: Addr<KvStore>,
        events: mpsc::Receiver<MeshEvent>,
    ) -> Self {
        Self {
            prefill,
            kv,
            events: Some(events),
            last_advert: None,
            kv_router: KvRouter::default(),
            threshold: ThresholdState::new(&core),
            core,
        }
    }

    /// Re-publishes the advert if anything in it changed.
    fn refresh_advert(&mut self, ctx: &mut Context<Self>) {
        let core = self.core.clone();
        let kv = self.kv.clone();
        let fut = async move {
            let part = kv.send(AdvertPart).await.ok()?;
            // Not before the engine reported its pool: an advert of 0 free KV blocks would keep
            // every home from calling this node until the next one arrived.
            if !part.ready {
                return None;
            }
            let view = core.compute.view();
            let mut roles = Vec::new();
            let (prefill, decode) = core.advertised_roles();
            if prefill {
                roles.push(Role::Prefill);
            }
            if decode {
                roles.push(Role::Decode);
            }
            Some(AdvertBody {
                region: core.cfg.mesh.region.clone(),
                roles,
                models: vec![core.model_ref.clone()],
                prefill_profile: advertised_profile(&view),
                queue_depth: core.compute.queued_jobs() as u32,
                free_kv_blocks: part.free_blocks,
                price_per_1k_tokens: core.cfg.policy.price_per_1k_tokens,
                prefix_summary: part.summary,
                software_version: concat!("prfaas/", env!("CARGO_PKG_VERSION")).into(),
                api_url: core.api_url.get().cloned(),
                // Tenths of a second: finer would re-publish on every queued token.
                queue_s: Some((core.compute.queue_delay_s() * 10.0).round() / 10.0),
            })
        };
        ctx.spawn(fut.into_actor(self).map(|body, act, _| {
            let Some(mut body) = body else { return };
            // Speed moves a little with every prefill: only a real change is worth gossiping.
            if let Some(last) = &act.last_advert {
                let mut same = body.clone();
                same.prefill_profile = last.prefill_profile.clone();
                // A new length bucket measured, or any speed moved by a fifth: worth gossiping.
                let (a, b) = (&body.prefill_profile, &last.prefill_profile);
                let drift = if a.len() != b.len() {
                    1.0
                } else {
                    a.iter()
                        .zip(b)
                        .map(|(x, y)| (x.tokens_per_sec / y.tokens_per_sec.max(1e-3) - 1.0).abs())
                        .fold(0.0, f32::max)
                };
                if &same == last && drift < 0.2 {
                    return;
                }
                if drift < 0.2 {
                    body.prefill_profile = last.prefill_profile.clone();
                }
            }
            if let Some(p) = body.prefill_profile.first() {
                act.core.advertised_prefill_tps.store(
                    f64::from(p.tokens_per_sec).to_bits(),
                    std::sync::atomic::Ordering::Relaxed,
                );
            }
            act.last_advert = Some(body.clone());
            let mesh = act.core.mesh.clone();
            actix::spawn(async move {
                if let Err(e) = mesh.set_advert(body).await {
                    tracing::debug!(error = %e, "publishing the advert failed");
                }
            });
        }));
    }

    fn refresh_metrics(&mut self, ctx: &mut Context<Self>) {
        let core = self.core.clone();
        // Re-search t from what this node measures and its peers advertise.
        // Convert roles when the mesh's bottleneck says so (opt-in).
        let adaptive = core.cfg.is_home() && core.cfg.policy.adaptive_threshold;
        if adaptive || core.cfg.policy.role_conversion {
            let mesh = core.mesh.clone();
            ctx.spawn(
                async move { mesh.adverts().await.unwrap_or_default() }
                    .into_actor(self)
                    .map(move |adverts, act, ctx| {
                        let core = act.core.clone();
                        if adaptive {
                            act.threshold.refresh(&core, &adverts);
                        }
                        // A drain that ended, or a change that gave up no role: tell the mesh
                        // at once.
                        let began = consider_role(&core, &adverts).is_some();
                        if core.poll_role_drain() || (began && !core.role_state().draining()) {
                            act.refresh_advert(ctx);
                        }
                    }),
            );
        }
        ctx.spawn(
            async move {
                // The mesh's per-peer quota refusals, by reason (it counts them; we expose them).
                for (reason, n) in core.mesh.stats().quota_refusals() {
                    let c = core.metrics.mesh_quota_refusals.get_or_create(&KindLabel {
                        kind: reason.into(),
                    });
                    c.inc_by(n.saturating_sub(c.get()));
                }
                if let Ok(peers) = core.mesh.known_peers().await {
                    core.metrics.mesh_peers.set(peers.len() as i64);
                    for p in peers {
                        if let Some(b) = core.mesh.observed_bandwidth(&p) {
                            core.metrics
                                .peer_bandwidth
                                .get_or_create(&PeerLabel {
                                    peer: p.to_string(),
                                })
                                .set(b.bytes_per_sec);
                        }
                    }
                }
            }
            .into_actor(self),
        );
    }
}

/// The measured prefill profile as advert points (speed at a few lengths; bounded).
fn advertised_profile(view: &super::compute::EngineView) -> Vec<PrefillPoint> {
    let mut pts: Vec<PrefillPoint> = view
        .prefill_profile
        .points()
        .into_iter()
        .map(|(tokens, secs)| PrefillPoint {
            tokens: tokens.round().clamp(1.0, f64::from(u32::MAX)) as u32,
            tokens_per_sec: (tokens / secs) as f32,
        })
        .collect();
    if pts.is_empty() {
        pts.push(PrefillPoint {
            tokens: 1024,
            tokens_per_sec: view.prefill_tokens_per_s() as f32,
        });
    }
    // Longest lengths first: they say the most about big prompts.
    pts.reverse();
    pts.truncate(MAX_ADVERT_PROFILE_POINTS);
    pts.reverse();
    pts
}

/// Most prefill profile points in an advert.
const MAX_ADVERT_PROFILE_POINTS: usize = 8;

impl MeshBridge {
    fn count_awaited(&self) {
        self.core
            .awaited_transfers
            .store(self.kv_router.len(), std::sync::atomic::Ordering::Relaxed);
    }
}

/// The planner is about to award `request_id` to `peer`: route that peer's KV transfer for it
/// to the returned receiver. Dropping the receiver withdraws the wait.
#[derive(Debug, Message)]
#[rtype(result = "tokio::sync::oneshot::Receiver<super::kv_router::KvArrival>")]
pub struct ExpectKv {
    pub peer: prfaas_mesh::PeerId,
    pub request_id: u64,
}

impl Handler<ExpectKv> for MeshBridge {
    type Result = MessageResult<ExpectKv>;

    fn handle(&mut self, msg: ExpectKv, _: &mut Self::Context) -> Self::Result {
        let rx = self.kv_router.expect(msg.peer, msg.request_id);
        self.count_awaited();
        MessageResult(rx)
    }
}

impl Actor for MeshBridge {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(MAILBOX);
        if let Some(rx) = self.events.take() {
            ctx.add_stream(futures::stream::unfold(rx, |mut rx| async move {
                rx.recv().await.map(|ev| (ev, rx))
            }));
        }
        self.refresh_advert(ctx);
        let every = self
            .core
            .cfg
            .mesh
            .advert_interval
            .max(std::time::Duration::from_millis(50));
        ctx.run_interval(every, |act, ctx| {
            act.refresh_advert(ctx);
            act.refresh_metrics(ctx);
        });
    }
}

impl StreamHandler<MeshEvent> for MeshBridge {
    fn handle(&mut self, ev: MeshEvent, _: &mut Self::Context) {
        match ev {
            MeshEvent::AuctionCall { peer, call, token } => {
                if self.prefill.try_send(BidFor { peer, call, token }).is_err() {
                    let mesh = self.core.mesh.clone();
                    actix::spawn(async move {
                        let _ = mesh
                            .answer_call(token, CallAnswer::Decline(DeclineReason::Overloaded))
                            .await;
                    });
                }
            }
            MeshEvent::Awarded { peer, award, slot } => {
                if let Err(e) = self.prefill.try_send(Serve { peer, award, slot }) {
                    tracing::warn!(%peer, error = %e, "cannot serve an award: prefill worker busy");
                }
            }
            MeshEvent::KvIncoming(inc) => {
                let (peer, request) = (inc.peer(), inc.header().request_id);
                if let Err(refused) = self.kv_router.deliver(inc) {
                    tracing::warn!(%peer, request, "refusing a KV transfer nobody waits for");
                    drop(refused);
                }
                self.count_awaited();
            }
            MeshEvent::PeerDisconnected { peer } => {
                // A winner whose connection closed will not stream: its homes stop waiting now
                // (about a second after it died) instead of at their transfer timeout.
                let ended = self.kv_router.peer_lost(&peer);
                if ended > 0 {
                    tracing::warn!(%peer, ended, "winner disconnected before its KV arrived");
                    self.count_awaited();
                }
            }
            MeshEvent::PeerDiscovered { peer } => tracing::info!(%peer, "peer joined the mesh"),
            MeshEvent::PeerExpired { peer } => {
                tracing::info!(%peer, "peer expired");
                // A departed peer's series go with it (the peer table bounds the label set).
                self.core.metrics.peer_bandwidth.remove(&PeerLabel {
                    peer: peer.to_string(),
                });
            }
            MeshEvent::ConnectionRefused { peer, reason } => {
                tracing::warn!(?peer, %reason, "connection refused at admission")
            }
            other => tracing::debug!(event = ?other, "mesh event"),
        }
    }

    fn finished(&mut self, _: &mut Self::Context) {
        tracing::info!("mesh event stream ended");
    }
}
