//! Helpers shared by the multi-node integration tests: node configs on loopback (port 0), waiting
//! for the mesh with bounded polls, running requests and collecting their events.

#![allow(dead_code)]

use std::time::Duration;

use prfaas_kernels::BackendKind;
use prfaas_mesh::MeshConfig;
use prfaas_node::actors::{Node, NodeHandle};
use prfaas_node::config::{NodeConfig, NodeRole};
use prfaas_node::engine::loader::{load_model, make_backend};
use prfaas_node::engine::{Engine, EngineConfig, FinishReason, Model, SamplingParams};
use prfaas_node::service::{GenerateEvent, GenerateRequest, PrefillRoute, PromptInput, Usage};

/// Where `scripts/fetch-model` puts the default model.
pub const SMOLLM2: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";

/// Whether the default model is present; when it is not, says so loudly (and fails under
/// `PRFAAS_REQUIRE_MODEL=1`, as CI sets).
pub fn smollm2_available(test: &str) -> bool {
    if std::path::Path::new(SMOLLM2).exists() {
        return true;
    }
    if std::env::var("PRFAAS_REQUIRE_MODEL").as_deref() == Ok("1") {
        panic!("{test}: {SMOLLM2} missing and PRFAAS_REQUIRE_MODEL=1 (run scripts/fetch-model)");
    }
    eprintln!("SKIP {test}: {SMOLLM2} missing (run scripts/fetch-model)");
    false
}

/// Where `scripts/fetch-model gemma3-270m` puts Gemma 3 270M (a real hybrid model: 5 sliding-window
/// layers to 1 global).
pub const GEMMA3: &str = "models/gemma-3-270m-q4_k_m.gguf";

/// Whether Gemma 3 270M is present; when it is not, says so loudly (and fails under
/// `PRFAAS_REQUIRE_GEMMA=1`). It is not in CI's default fetch (253 MB).
pub fn gemma3_available(test: &str) -> bool {
    if std::path::Path::new(GEMMA3).exists() {
        return true;
    }
    if std::env::var("PRFAAS_REQUIRE_GEMMA").as_deref() == Ok("1") {
        panic!("{test}: {GEMMA3} missing and PRFAAS_REQUIRE_GEMMA=1 (run scripts/fetch-model gemma3-270m)");
    }
    eprintln!("SKIP {test}: {GEMMA3} missing (run scripts/fetch-model gemma3-270m)");
    false
}

/// A node config for tests: loopback mesh with fast timers, no HTTP unless asked.
pub fn node_config(
    name: &str,
    roles: &[NodeRole],
    model: &str,
    bootstrap: Vec<String>,
) -> NodeConfig {
    let mut c = NodeConfig::default();
    c.node.name = name.into();
    c.node.roles = roles.to_vec();
    c.node.model = model.into();
    c.node.backend = BackendKind::Cpu;
    c.node.shutdown_grace = Duration::from_secs(5);
    c.api.listen = "127.0.0.1:0".parse().expect("static address");
    c.api.workers = 1;
    c.engine.kv_capacity_tokens = 16 * 1024;
    c.engine.max_batch = 16;
    c.engine.calibration_tokens = 16;
    c.policy.offload_threshold_tokens = 48;
    // Which prompts go remote must not depend on how fast this (loaded) machine prefills.
    c.policy.adaptive_threshold = false;
    // These tests are about what happens once a prompt is offloaded, not about auction
    // economics (tests/placement.rs): a home's own prefill never outbids a peer here, whatever
    // the noisy speed estimates of a loaded machine say.
    c.policy.reserve_price_factor = 1e6;
    // Debug builds on a loaded 2-core machine: generous deadlines, still bounded.
    c.policy.auction_deadline = Duration::from_millis(2000);
    c.policy.transfer_timeout = Duration::from_secs(60);
    c.mesh = MeshConfig::local();
    c.mesh.bootstrap = bootstrap;
    c
}

/// Logs to the test's output when `RUST_LOG` is set.
pub fn init_logs() {
    if std::env::var("RUST_LOG").is_ok() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
}

/// Starts a node (no HTTP API).
pub async fn start(cfg: NodeConfig) -> NodeHandle {
    init_logs();
    Node::start(cfg, None).await.expect("node starts")
}

/// Starts a node with its HTTP API (port 0).
pub async fn start_http(cfg: NodeConfig) -> NodeHandle {
    init_logs();
    Node::start(cfg, Some(prfaas_node::actors::node::http_api))
        .await
        .expect("node starts")
}

/// The base URL of a node's HTTP API.
pub fn base(n: &NodeHandle) -> String {
    format!("http://{}", n.api_addr.expect("API started"))
}

/// A prefill node and a decode home bootstrapped from it, both with HTTP APIs, once the home
/// sees the prefill node's advert.
pub async fn prefill_and_home(model: &str) -> (NodeHandle, NodeHandle) {
    let p = start_http(node_config("prefill", &[NodeRole::Prefill], model, vec![])).await;
    let boot = addrs_of(&p).await;
    let home = start_http(node_config("home", &[NodeRole::Decode], model, boot)).await;
    wait_for_prefillers(&home, 1).await;
    (p, home)
}

/// Mesh bootstrap addresses of `n` as strings.
pub async fn addrs_of(n: &NodeHandle) -> Vec<String> {
    n.mesh_addrs()
        .await
        .iter()
        .map(ToString::to_string)
        .collect()
}

/// Waits (bounded) until `home` sees `want` prefill candidates for its model.
pub async fn wait_for_prefillers(home: &NodeHandle, want: usize) {
    if let Err(seen) = home
        .wait_for_prefillers(want, Duration::from_secs(30))
        .await
    {
        panic!("home saw {seen}/{want} prefill peers after 30 s");
    }
}

/// What one request produced.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub route: PrefillRoute,
    pub tokens: Vec<u32>,
    pub text: String,
    pub finish: FinishReason,
    pub usage: Usage,
}

impl Outcome {
    pub fn is_remote(&self) -> bool {
        matches!(self.route, PrefillRoute::Remote { .. })
    }
}

/// Submits a greedy text-completion request and collects its events (bounded in time).
pub async fn run_text(node: &NodeHandle, prompt: &str, max_tokens: usize) -> Outcome {
    let req = GenerateRequest {
        request_id: None,
        prompt: PromptInput::Text(prompt.into()),
        max_tokens: Some(max_tokens),
        sampling: SamplingParams::greedy(max_tokens),
        stop: vec![],
        stream: true,
    };
    let rx = node.submit(req).await.expect("request admitted");
    collect(rx).await
}

/// Drains a request's event channel.
pub async fn collect(mut rx: tokio::sync::mpsc::Receiver<GenerateEvent>) -> Outcome {
    let mut route = None;
    let mut tokens = Vec::new();
    let mut text = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
    loop {
        let ev = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .expect("request finishes within 300 s")
            .expect("event stream ends with Finished or Failed");
        match ev {
            GenerateEvent::Started { route: r, .. } => route = Some(r),
            GenerateEvent::Delta { text: t, token, .. } => {
                text.push_str(&t);
                tokens.extend(token);
            }
            GenerateEvent::Finished { finish, usage, .. } => {
                return Outcome {
                    route: route.expect("Started before Finished"),
                    tokens,
                    text,
                    finish,
                    usage,
                }
            }
            GenerateEvent::Failed { message } => panic!("request failed: {message}"),
        }
    }
}

/// A plain local engine: the reference every mesh path must reproduce.
pub struct Reference {
    engine: Engine,
    text: prfaas_node::engine::loader::TextSide,
}

impl Reference {
    pub fn new(model: &str, backend: BackendKind) -> Self {
        let b = load_model(model).expect("model loads");
        let backend = make_backend(backend).expect("backend");
        let m = Model::new(b.config.clone(), &b.weights, backend).expect("model");
        let engine = Engine::new(m, EngineConfig::with_capacity(8192)).expect("engine");
        Self {
            engine,
            text: b.text,
        }
    }

    /// Greedy tokens for `prompt` (tokenized as a raw completion prompt is), without the stop
    /// token.
    pub fn greedy(&mut self, prompt: &str, max_tokens: usize) -> Vec<u32> {
        let tokens = self.text.codec.encode(prompt, true).expect("encode");
        let params = SamplingParams {
            stop_tokens: self.text.stop_tokens.clone(),
            ..SamplingParams::greedy(max_tokens)
        };
        let g = self
            .engine
            .generate(&tokens, &params, &mut |_| {})
            .expect("generate");
        let stops = &self.text.stop_tokens;
        g.tokens
            .into_iter()
            .filter(|t| !stops.contains(t))
            .collect()
    }
}
