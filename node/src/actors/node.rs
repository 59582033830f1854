//! `Node`: the supervisor. [`Node::start`] loads the model, starts the compute thread, the mesh
//! (on its own arbiter), every actor and the HTTP API, and returns a [`NodeHandle`].

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use prfaas_mesh::{Mesh, MeshConfig, Multiaddr, PeerId, Role};
use serde_json::json;
use tokio::sync::{mpsc, oneshot};

use super::admission::{Admission, StopAdmitting};
use super::bridge::MeshBridge;
use super::compute::{self, ComputeConfig};
use super::core::{Core, NodeCore};
use super::decode::DecodeEngine;
use super::kvstore::KvStore;
use super::planner::Planner;
use super::prefill::PrefillWorker;
use super::MAILBOX;
use crate::config::{is_http_url, ConfigError, NodeConfig, NodeRole};
use crate::engine::loader::{load_model, make_backend, LoadError};
use crate::engine::{Engine, EngineConfig, EngineError, Model, ModelError, NullSink};
use crate::kv::layout::KV_LAYOUT_VERSION;
use crate::metrics::Metrics;
use crate::service::{GenerateEvent, GenerateRequest, MeshView, NodeInfo, Submit, SubmitError};

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("identity file {path}: {why}")]
    Identity { path: String, why: String },
    #[error("mesh: {0}")]
    Mesh(String),
    #[error("HTTP API on {addr}: {source}")]
    Api {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Other(String),
}

/// The supervisor actor.
#[derive(Debug)]
pub struct Node {
    core: Core,
    admission: Addr<Admission>,
}

impl Actor for Node {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(MAILBOX);
    }
}

impl Handler<MeshView> for Node {
    type Result = ResponseFuture<serde_json::Value>;

    fn handle(&mut self, _: MeshView, _: &mut Self::Context) -> Self::Result {
        let core = self.core.clone();
        Box::pin(async move { mesh_view(&core).await })
    }
}

/// Builds the `/mesh` JSON: this node's facts, every node of the mesh it knows (from their
/// signed adverts), the bandwidth it measured and the bandwidth the others report, recent
/// auctions and recent requests (what the dashboard at `/` draws).
async fn mesh_view(core: &Core) -> serde_json::Value {
    let me = core.mesh.local_peer_id();
    let adverts = core.mesh.adverts().await.unwrap_or_default();
    let connected = core.mesh.connected_peers().await.unwrap_or_default();
    let prefillers: Vec<PeerId> = core
        .mesh
        .prefill_candidates(core.model_ref.clone())
        .await
        .map(|v| v.into_iter().map(|(p, _)| p).collect())
        .unwrap_or_default();
    let peers: Vec<serde_json::Value> = adverts
        .iter()
        .filter(|a| a.peer != me)
        .map(|a| {
            let bw = core.mesh.observed_bandwidth(&a.peer);
            json!({
                "peer": a.peer.to_string(),
                "connected": connected.contains(&a.peer),
                // `direct`, `relayed` (through a relay: NAT), or null when not connected.
                "link": core.mesh.link(&a.peer),
                "prefills_our_model": prefillers.contains(&a.peer),
                "bandwidth_bytes_per_s": bw.map(|b| b.bytes_per_sec),
                "bandwidth_samples": bw.map(|b| b.samples),
            })
        })
        .collect();
    let view = core.compute.view();
    let listen: Vec<String> = core
        .mesh
        .listen_addrs()
        .await
        .unwrap_or_default()
        .iter()
        .map(ToString::to_string)
        .collect();
    let region = if core.cfg.mesh.region.is_empty() {
        "local"
    } else {
        core.cfg.mesh.region.as_str()
    };
    let mut nodes = vec![json!({
        "peer": me.to_string(),
        "self": true,
        "connected": true,
        "name": core.cfg.node.name,
        "region": region,
        "roles": core.info.roles,
        "model": core.info.model_id,
        "same_model": true,
        "queue_depth": core.compute.queued_jobs(),
        "free_kv_blocks": view.kv.free,
        "price_per_1k_tokens": core.cfg.policy.price_per_1k_tokens,
        "prefill_tokens_per_s": view.prefill_tokens_per_s(),
        "api_url": core.api_url.get(),
        "advert_age_s": 0.0,
        "version": env!("CARGO_PKG_VERSION"),
    })];
    let mut bandwidth = Vec::new();
    for a in adverts.iter().filter(|a| a.peer != me) {
        let b = &a.advert.body;
        let roles: Vec<&str> = b
            .roles
            .iter()
            .map(|r| match r {
                Role::Prefill => "prefill",
                Role::Decode => "decode",
                _ => "other",
            })
            .collect();
        let model = b.models.first();
        // A peer's advert is signed by it but says what it likes: link only what looks like
        // an http(s) URL, and show everything else as text.
        let api_url = b.api_url.as_deref().filter(|u| is_http_url(u));
        nodes.push(json!({
            "peer": a.peer.to_string(),
            "self": false,
            "connected": connected.contains(&a.peer),
            "link": core.mesh.link(&a.peer),
            "region": b.region,
            "roles": roles,
            "model": model.map(|m| m.model_id.as_str()),
            "same_model": model == Some(&core.model_ref),
            "queue_depth": b.queue_depth,
            "free_kv_blocks": b.free_kv_blocks,
            "price_per_1k_tokens": b.price_per_1k_tokens,
            "prefill_tokens_per_s": a.advert.peak_prefill_speed(),
            "api_url": api_url,
            "advert_age_s": a.age.as_secs_f64(),
            "version": b.software_version,
        }));
        // What this peer reports about its own links (signed, not verified by us).
        for r in &a.advert.observed_bandwidth {
            bandwidth.push(json!({
                "from": a.peer.to_string(),
                "to": r.peer,
                "bytes_per_s": r.bytes_per_sec,
                "measured_here": false,
            }));
        }
        if let Some(bw) = core.mesh.observed_bandwidth(&a.peer) {
            bandwidth.push(json!({
                "from": me.to_string(),
                "to": a.peer.to_string(),
                "bytes_per_s": bw.bytes_per_sec,
                "samples": bw.samples,
                "measured_here": true,
            }));
        }
    }
    let role = {
        let r = core.role_state();
        json!({
            "mode": r.target,
            "since_s": r.since_s,
            // A conversion that gives up a role finishes its work in flight first and keeps
            // advertising the old roles until then.
            "advertised": r.advertised,
            "draining": r.draining(),
            "conversion": core.cfg.policy.role_conversion,
            "changes": core.metrics.role_changes.get(),
        })
    };
    json!({
        "node": core.cfg.node.name,
        "peer_id": me.to_string(),
        "listen": listen,
        "api_url": core.api_url.get(),
        "roles": core.info.roles,
        "model": core.info.model_id,
        "backend": core.info.backend,
        "offload_threshold_tokens": core.threshold.load(Ordering::Relaxed),
        // Runtime role conversion: what this node serves now, since when (s after start).
        "role": role,
        // How t was found: the search's measured inputs and result.
        "threshold": core
            .threshold_status
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default(),
        // Settled auction payments per peer: paid as a home, earned as a winner.
        "ledger": core
            .ledger
            .lock()
            .map(|l| {
                l.accounts()
                    .map(|(p, a)| json!({ "peer": p, "account": a }))
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default(),
        "inflight": core.inflight.load(Ordering::Relaxed),
        "pending_transfers": core.awaited_transfers.load(Ordering::Relaxed),
        "prefill_tokens_per_s": view.prefill_tokens_per_s(),
        // What this node measured of itself (what its adverts and searches use), in the form
        // the simulator replays (`prfaas bench e2e` exports it).
        "measured": prfaas_mesh::policy::MeasuredProfile::new(
            &view.prefill_profile,
            view.prefill_quote,
            &view.import_profile,
            &view.decode_profile,
            core.cfg.engine.max_batch,
            |t| core.layout.transfer_bytes(t.max(0.0) as usize) as f64,
        ),
        "decoding": view.live,
        "queued_jobs": core.compute.queued_jobs(),
        "kv": view.kv,
        "nodes": nodes,
        "bandwidth": bandwidth,
        "peers": peers,
        "mesh_stats": core.mesh.stats(),
        // Relay reservations, hole punches, AutoNAT's verdict.
        "nat": core.mesh.nat(),
        // Transfer records of auction winners (failed, late, lying; ban time left).
        "reputation": core
            .mesh
            .reputation()
            .into_iter()
            .map(|(p, r)| json!({ "peer": p.to_string(), "record": r }))
            .collect::<Vec<_>>(),
        "recent_auctions": core.recent_auctions(),
        // First-token times and routes of recent requests homed here (oldest first).
        "recent_requests": core.metrics.history.samples(),
    })
}

/// Stop gracefully: refuse new requests, let in-flight ones finish (up to the grace period),
/// then stop the mesh. Resolves when done.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Shutdown;

impl Handler<Shutdown> for Node {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, _: Shutdown, _: &mut Self::Context) -> Self::Result {
        let core = self.core.clone();
        let admission = self.admission.clone();
        Box::pin(async move {
            let _ = admission.send(StopAdmitting).await;
            let grace = core.cfg.node.shutdown_grace;
            let t0 = Instant::now();
            while core.inflight.load(Ordering::Acquire) > 0 && t0.elapsed() < grace {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let left = core.inflight.load(Ordering::Acquire);
            if left > 0 {
                tracing::warn!(left, "shutdown grace elapsed with requests in flight");
            }
            core.mesh.shutdown().await;
        })
    }
}

/// How long [`NodeHandle::shutdown`] waits for the compute thread's job in progress.
const COMPUTE_STOP_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// A running node.
#[derive(Debug, Clone)]
pub struct NodeHandle {
    pub core: Core,
    pub node: Addr<Node>,
    pub admission: Addr<Admission>,
    /// Where the HTTP API listens, if it was started.
    pub api_addr: Option<SocketAddr>,
    api_server: Option<actix_web::dev::ServerHandle>,
}

impl NodeHandle {
    /// This node's peer id.
    pub fn peer_id(&self) -> PeerId {
        self.core.mesh.local_peer_id()
    }

    /// The `/mesh` JSON of this node.
    pub async fn mesh_json(&self) -> serde_json::Value {
        mesh_view(&self.core).await
    }

    /// Mesh listen addresses with `/p2p/<id>` appended (what others bootstrap from).
    pub async fn mesh_addrs(&self) -> Vec<Multiaddr> {
        let id = self.peer_id();
        self.core
            .mesh
            .listen_addrs()
            .await
            .unwrap_or_default()
            .into_iter()
            .map(|a| a.with(prfaas_mesh::multiaddr::Protocol::P2p(id)))
            .collect()
    }

    /// Waits until this node's peer table lists at least `want` other peers that can prefill
    /// its model, polling the mesh every 25 ms for at most `limit`. `Err` carries how many it saw.
    pub async fn wait_for_prefillers(&self, want: usize, limit: Duration) -> Result<(), usize> {
        let t0 = Instant::now();
        loop {
            let c = self
                .core
                .mesh
                .prefill_candidates(self.core.model_ref.clone())
                .await
                .unwrap_or_default();
            let others = c.iter().filter(|(p, _)| *p != self.peer_id()).count();
            if others >= want {
                return Ok(());
            }
            if t0.elapsed() >= limit {
                return Err(others);
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Submits a request directly (what the HTTP API does).
    pub async fn submit(
        &self,
        req: GenerateRequest,
    ) -> Result<mpsc::Receiver<GenerateEvent>, SubmitError> {
        self.admission
            .send(Submit(req))
            .await
            .map_err(|e| SubmitError::Unavailable(format!("admission: {e}")))?
    }

    /// Graceful stop (see [`Shutdown`]), then the HTTP server.
    pub async fn shutdown(&self) {
        let _ = self.node.send(Shutdown).await;
        if let Some(s) = &self.api_server {
            s.stop(true).await;
        }
        // The engine, and any GPU device with it, is released before this returns: a process
        // that exits right after must not tear the driver down under a live device (seen as a
        // SIGSEGV at exit on lavapipe). A job in progress finishes first, so the wait is bounded.
        if let Some(thread) = self.core.compute.stop() {
            let join = actix_rt::task::spawn_blocking(move || thread.join());
            if actix_rt::time::timeout(COMPUTE_STOP_WAIT, join)
                .await
                .is_err()
            {
                tracing::warn!(
                    wait = ?COMPUTE_STOP_WAIT,
                    "compute thread still busy after shutdown; not waiting for it"
                );
            }
        }
    }
}

fn load_identity(cfg: &mut NodeConfig) -> Result<(), StartError> {
    let Some(path) = cfg.node.identity.clone() else {
        return Ok(());
    };
    let err = |why: String| StartError::Identity {
        path: path.display().to_string(),
        why,
    };
    let text = std::fs::read_to_string(&path).map_err(|e| err(e.to_string()))?;
    let bytes = hex_decode(text.trim()).ok_or_else(|| err("not hex".into()))?;
    let key = prfaas_mesh::identity::Keypair::from_protobuf_encoding(&bytes)
        .map_err(|e| err(e.to_string()))?;
    cfg.mesh.keypair = Some(key);
    Ok(())
}

/// Writes a fresh ed25519 identity to `path` (hex of the libp2p protobuf encoding, mode 0600
/// on Unix) and returns its peer id. Refuses to overwrite an existing file.
pub fn keygen(path: &Path) -> Result<PeerId, StartError> {
    let err = |why: String| StartError::Identity {
        path: path.display().to_string(),
        why,
    };
    let key = prfaas_mesh::identity::Keypair::generate_ed25519();
    let bytes = key.to_protobuf_encoding().map_err(|e| err(e.to_string()))?;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    use std::io::Write;
    let mut f = opts.open(path).map_err(|e| err(e.to_string()))?;
    f.write_all(format!("{hex}\n").as_bytes())
        .map_err(|e| err(e.to_string()))?;
    Ok(key.public().to_peer_id())
}

fn hex_decode(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// What the blocking start-up produced.
struct Loaded {
    engine: Engine,
    text: crate::engine::loader::TextSide,
    /// The model's own name (GGUF `general.name`): part of the mesh's model identity.
    model_id: String,
    /// What the API calls the model (`/v1/models`, the `model` field, the dashboard).
    api_model: String,
    vocab: usize,
    max_context: usize,
    backend: String,
    prefill_rate: f64,
    calibration: Vec<(f64, f64)>,
}

/// A name people recognise: a model file's name without its extension and quantization tag
/// (`SmolLM2-135M-Instruct.Q4_1.gguf` → `SmolLM2-135M-Instruct`), else the model's own name
/// (synthetic models). GGUF `general.name` is often a run label ("Smollm2 135M 8k Lc100K Mix1
/// Ep2"), which is why it is not used for files.
pub fn readable_model_name(spec: &str, own_name: &str) -> String {
    let path = Path::new(spec);
    let Some(stem) = path
        .is_file()
        .then(|| path.file_stem().and_then(|s| s.to_str()))
        .flatten()
    else {
        return own_name.to_owned();
    };
    let is_quant = |tag: &str| {
        let t = tag.to_ascii_uppercase();
        ["Q", "IQ", "F16", "F32", "BF16"].iter().any(|p| {
            t.starts_with(p)
                && t[p.len()..]
                    .chars()
                    .next()
                    .is_none_or(|c| c.is_ascii_digit() || c == '_')
        })
    };
    match stem.rsplit_once(['.', '-']) {
        Some((name, tag)) if !name.is_empty() && is_quant(tag) => name.to_owned(),
        _ => stem.to_owned(),
    }
}

fn load(cfg: &NodeConfig) -> Result<Loaded, StartError> {
    let t0 = Instant::now();
    let mut bundle = load_model(&cfg.node.model)?;
    if cfg.engine.global_attention {
        bundle.config = bundle.config.with_global_attention();
    }
    let backend = make_backend(cfg.node.backend)?;
    let backend_name = backend.info().kind.to_string();
    let e = &cfg.engine;
    let max_context = bundle.config.max_context.min(e.kv_capacity_tokens);
    let model = Model::new(bundle.config.clone(), &bundle.weights, backend)?;
    let mut engine = Engine::new(
        model,
        EngineConfig {
            block_size: e.block_size,
            n_blocks: e.kv_capacity_tokens.div_ceil(e.block_size),
            n_state_slots: e.state_slots,
            prefill_chunk: e.prefill_chunk,
            prefix_cache: e.prefix_cache,
            // KV leased for an incoming transfer is freed when no layer arrives for this long
            // (the planner gives up on the transfer at the same time).
            lease_ttl: cfg.policy.transfer_timeout,
            kv_dtype: e.kv_dtype,
            window_ring: true,
            ring_blocks: e.window_ring_tokens.map(|t| t.div_ceil(e.block_size)),
        },
    )?;
    // Seed the prefill profile with measured prefills at a few lengths (bids, adverts and the
    // threshold search need numbers before the first real request; real prefills refine them).
    let n = e
        .calibration_tokens
        .min(max_context.saturating_sub(1))
        .min(e.kv_capacity_tokens / 2);
    let mut calibration = Vec::new();
    for len in [n / 4, n] {
        if len < 4 || calibration.iter().any(|&(l, _)| l == len as f64) {
            continue;
        }
        let probe: Vec<u32> = (0..len as u32)
            .map(|i| (i * 7 + 11) % bundle.config.vocab_size as u32)
            .collect();
        let t = Instant::now();
        let out = engine.prefill(&probe, &mut NullSink)?;
        calibration.push((len as f64, t.elapsed().as_secs_f64().max(1e-6)));
        engine.release(out.seq)?;
    }
    let prefill_rate = calibration.last().map_or(100.0, |&(l, s)| l / s);
    tracing::info!(
        node = %cfg.node.name,
        model = %bundle.config.name,
        backend = %backend_name,
        load_ms = t0.elapsed().as_millis() as u64,
        prefill_tok_s = prefill_rate as u64,
        "model loaded"
    );
    Ok(Loaded {
        vocab: bundle.config.vocab_size,
        model_id: bundle.config.name.clone(),
        api_model: readable_model_name(&cfg.node.model, &bundle.config.name),
        max_context,
        backend: backend_name,
        text: bundle.text,
        engine,
        prefill_rate,
        calibration,
    })
}

/// Starts the mesh on its own arbiter (its own thread), so the swarm never waits for actors.
async fn start_mesh(
    cfg: MeshConfig,
) -> Result<
    (
        prfaas_mesh::MeshHandle,
        mpsc::Receiver<prfaas_mesh::MeshEvent>,
    ),
    StartError,
> {
    let arbiter = Arbiter::new();
    let (tx, rx) = oneshot::channel();
    let spawned = arbiter.spawn(async move {
        let _ = tx.send(Mesh::spawn(cfg).map_err(|e| e.to_string()));
    });
    if !spawned {
        return Err(StartError::Mesh("mesh arbiter did not start".into()));
    }
    rx.await
        .map_err(|_| StartError::Mesh("mesh arbiter stopped".into()))?
        .map_err(StartError::Mesh)
}

/// The API URL a node advertises: `public_url` when configured, else `http://<bound>` when the
/// API is bound to a specific address (loopback included: meshes on one machine), else none.
pub fn advertised_api_url(public_url: Option<&str>, bound: SocketAddr) -> Option<String> {
    match public_url {
        Some(u) => Some(u.trim_end_matches('/').to_owned()),
        None if bound.ip().is_unspecified() => None,
        None => Some(format!("http://{bound}")),
    }
}

/// How the node serves HTTP: the API module plugs in here.
pub type ApiStarter =
    fn(SocketAddr, &NodeHandle) -> std::io::Result<(actix_web::dev::Server, SocketAddr)>;

/// The OpenAI-compatible HTTP API of `node` on `listen` (an [`ApiStarter`]).
pub fn http_api(
    listen: SocketAddr,
    node: &NodeHandle,
) -> std::io::Result<(actix_web::dev::Server, SocketAddr)> {
    let state = crate::api::ApiState::new(
        node.admission.clone(),
        node.node.clone().recipient(),
        node.core.info.clone(),
        node.core.metrics.clone(),
    );
    crate::api::start(listen, state, node.core.cfg.api.workers)
}

impl Node {
    /// Starts a node inside the current actix `System`. Loading the model runs on a blocking
    /// thread; the HTTP API starts when `api` is given (tests may drive [`NodeHandle::submit`]).
    pub async fn start(
        mut cfg: NodeConfig,
        api: Option<ApiStarter>,
    ) -> Result<NodeHandle, StartError> {
        cfg.validate()?;
        load_identity(&mut cfg)?;
        let cfg_load = cfg.clone();
        let loaded = tokio::task::spawn_blocking(move || load(&cfg_load))
            .await
            .map_err(|e| StartError::Other(format!("model loading thread: {e}")))??;
        let metrics = Arc::new(Metrics::with_model(&loaded.api_model));
        let layout = loaded.engine.layout().clone();
        let model_ref = prfaas_mesh::ModelRef {
            model_id: loaded.model_id.clone(),
            weights_hash: loaded.engine.model().model_hash(),
            kv_layout_version: KV_LAYOUT_VERSION,
            kv_layout_hash: loaded.engine.layout_hash(),
        };
        let compute = compute::spawn(
            loaded.engine,
            loaded.text.codec.clone(),
            metrics.clone(),
            ComputeConfig {
                max_batch: cfg.engine.max_batch,
                queue: cfg.engine.queue,
                prefill_tokens_per_s: loaded.prefill_rate,
                calibration: loaded.calibration.clone(),
            },
        )
        .map_err(|e| StartError::Other(format!("compute thread: {e}")))?;
        let mut mesh_cfg = cfg.mesh.clone();
        if mesh_cfg.region.is_empty() {
            mesh_cfg.region = "local".into();
        }
        // A winner may hold an awarded prefill in its queue before the first piece leaves; the
        // home bounds the whole transfer by `policy.transfer_timeout`, so a shorter KV idle limit
        // would only cut transfers whose winner is still queued.
        let idle = &mut mesh_cfg.limits.kv_idle_timeout;
        if *idle < cfg.policy.transfer_timeout {
            tracing::debug!(from = ?*idle, to = ?cfg.policy.transfer_timeout, "KV idle timeout raised to the transfer timeout");
            *idle = cfg.policy.transfer_timeout;
        }
        let (mesh, events) = start_mesh(mesh_cfg).await?;
        mesh.serve_gate().set_max(cfg.policy.max_served_prefills);
        let rep = mesh.clone();
        compute.on_import_verdict(Box::new(move |peer, passed| {
            use prfaas_mesh::reputation::TransferOutcome;
            if let Ok(p) = peer.parse() {
                let o = if passed {
                    TransferOutcome::Ok
                } else {
                    TransferOutcome::Lied
                };
                rep.record_transfer(p, o);
            }
        }));
        let info = NodeInfo {
            model_id: loaded.api_model.clone(),
            peer_id: mesh.local_peer_id().to_string(),
            roles: cfg
                .node
                .roles
                .iter()
                .map(|r| match r {
                    NodeRole::Prefill => "prefill",
                    NodeRole::Decode => "decode",
                    NodeRole::Pd => "pd",
                })
                .map(String::from)
                .collect(),
            backend: loaded.backend.clone(),
            max_context: loaded.max_context,
            vocab_size: loaded.vocab,
        };
        let core: Core = Arc::new(NodeCore::new(
            cfg.clone(),
            info,
            loaded.text,
            model_ref,
            layout,
            loaded.vocab,
            loaded.max_context,
            metrics,
            mesh,
            compute,
        ));
        let decode = DecodeEngine::new(core.clone()).start();
        let kv = KvStore::new(core.clone()).start();
        let prefill = PrefillWorker::new(core.clone(), decode.clone()).start();
        let bridge = MeshBridge::new(core.clone(), prefill, kv, events).start();
        let planner = Planner::new(core.clone(), decode, bridge).start();
        let admission = Admission::new(core.clone(), planner).start();
        let node = Node {
            core: core.clone(),
            admission: admission.clone(),
        }
        .start();
        let mut handle = NodeHandle {
            core,
            node,
            admission,
            api_addr: None,
            api_server: None,
        };
        if let Some(start_api) = api {
            let listen = cfg.api.listen;
            let (server, addr) = start_api(listen, &handle).map_err(|source| StartError::Api {
                addr: listen,
                source,
            })?;
            handle.api_server = Some(server.handle());
            handle.api_addr = Some(addr);
            match advertised_api_url(cfg.api.public_url.as_deref(), addr) {
                Some(url) => {
                    let _ = handle.core.api_url.set(url);
                }
                None => tracing::info!(
                    %addr,
                    "the API listens on an unspecified address: set api.public_url to show it in other nodes' dashboards"
                ),
            }
            actix::spawn(async move {
                if let Err(e) = server.await {
                    tracing::error!(error = %e, "HTTP server stopped");
                }
            });
        }
        tracing::info!(
            node = %cfg.node.name,
            peer = %handle.peer_id(),
            api = ?handle.api_addr,
            roles = ?cfg.node.roles,
            "node started"
        );
        Ok(handle)
    }
}

#[cfg(test)]
mod tests {
    use super::{advertised_api_url, readable_model_name};

    #[test]
    fn advertised_api_url_prefers_the_configured_one() {
        let bound = "127.0.0.1:8081".parse().expect("static");
        let any = "0.0.0.0:8081".parse().expect("static");
        assert_eq!(
            advertised_api_url(Some("https://n1.example/"), any).as_deref(),
            Some("https://n1.example")
        );
        assert_eq!(
            advertised_api_url(None, bound).as_deref(),
            Some("http://127.0.0.1:8081")
        );
        assert_eq!(advertised_api_url(None, any), None);
        let v6 = "[::1]:80".parse().expect("static");
        assert_eq!(
            advertised_api_url(None, v6).as_deref(),
            Some("http://[::1]:80")
        );
    }

    #[test]
    fn model_names_people_recognise() {
        let dir = std::env::temp_dir().join(format!("prfaas-names-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let named = |file: &str| {
            let p = dir.join(file);
            std::fs::write(&p, b"").expect("write");
            readable_model_name(&p.display().to_string(), "run label")
        };
        assert_eq!(
            named("SmolLM2-135M-Instruct.Q4_1.gguf"),
            "SmolLM2-135M-Instruct"
        );
        assert_eq!(named("gemma-3-270m-q4_k_m.gguf"), "gemma-3-270m");
        assert_eq!(named("model-f16.gguf"), "model");
        assert_eq!(named("Qwen3-0.6B.gguf"), "Qwen3-0.6B");
        assert_eq!(named("plain.gguf"), "plain");
        let _ = std::fs::remove_dir_all(&dir);
        // Not a file (a synthetic model): its own name.
        assert_eq!(
            readable_model_name("tiny-hybrid", "tiny-hybrid"),
            "tiny-hybrid"
        );
    }
}
