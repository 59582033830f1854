//! Node configuration (TOML, human durations). Every field is documented in `configs/README.md`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use prfaas_kernels::BackendKind;
use prfaas_mesh::MeshConfig;
use serde::{Deserialize, Serialize};

use crate::kv::KvDType;

/// What a node does in the mesh.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeRole {
    /// Prefills for others: bids in auctions and streams KV to the winner's home.
    Prefill,
    /// Homes requests (HTTP API) and decodes them; long prompts go to auction.
    Decode,
    /// Both: homes requests, prefills short ones itself and bids for others' long ones.
    Pd,
}

/// A whole node: `[node]`, `[api]`, `[engine]`, `[policy]` and `[mesh]` tables.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeConfig {
    pub node: NodeSection,
    pub api: ApiSection,
    pub engine: EngineSection,
    pub policy: PolicySection,
    pub mesh: MeshConfig,
}

/// `[node]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeSection {
    /// Human-readable name used in logs and the demo's output.
    pub name: String,
    /// Roles: `prefill`, `decode`, `pd`.
    pub roles: Vec<NodeRole>,
    /// GGUF path or a synthetic model (`tiny-hybrid`, `tiny-dense`).
    pub model: String,
    /// Compute backend: `auto`, `cpu`, `wgpu`.
    pub backend: BackendKind,
    /// Identity file written by `prfaas keygen` (hex of the libp2p key). Without it (and without
    /// `mesh.keypair`) the node gets a fresh identity on every start.
    pub identity: Option<PathBuf>,
    /// How long shutdown waits for in-flight requests before cancelling them.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
}

/// `[api]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiSection {
    /// HTTP listen address (port 0 picks a free port). Prefill-only nodes may serve it too
    /// (health, metrics, mesh view).
    pub listen: SocketAddr,
    /// Requests admitted at once; more get HTTP 429.
    pub max_inflight: usize,
    /// HTTP worker threads.
    pub workers: usize,
    /// The API's address as other nodes and operators reach it (`http://203.0.113.7:8080`),
    /// gossiped in adverts so any node's dashboard can link to it. Without it the node
    /// advertises `http://<listen>` when `listen` names a specific address, and nothing when it
    /// is unspecified (`0.0.0.0`, `[::]`).
    pub public_url: Option<String>,
}

/// Longest API URL a node advertises or shows (adverts are bounded as a whole too).
pub const MAX_API_URL: usize = 256;

/// Whether `url` is a plausible `http(s)://` URL: what a node advertises and what a dashboard
/// turns into a link (anything else from a peer's advert is shown as text, never linked).
pub fn is_http_url(url: &str) -> bool {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"));
    url.len() <= MAX_API_URL
        && rest.is_some_and(|r| !r.is_empty() && !r.starts_with('/'))
        && url.chars().all(|c| c.is_ascii_graphic())
}

/// `[engine]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EngineSection {
    /// KV cache capacity in tokens over all sequences (prefix cache included).
    pub kv_capacity_tokens: usize,
    /// Tokens per KV block.
    pub block_size: usize,
    /// Prompt tokens per forward call during prefill.
    pub prefill_chunk: usize,
    /// Most sequences decoded together.
    pub max_batch: usize,
    /// Keep and reuse prompt prefixes.
    pub prefix_cache: bool,
    /// Linear-attention state slots (hybrid models).
    pub state_slots: usize,
    /// Jobs waiting for the compute thread; more are refused.
    pub queue: usize,
    /// Prompt length of the prefill measured at start-up to seed the speed estimate that bids
    /// and adverts use (0 skips it and assumes 100 tokens/s until real prefills are measured).
    pub calibration_tokens: usize,
    /// Element type of the KV cache, in memory and on the wire: `f16` (default) or `f32`.
    /// Nodes exchange KV only when they agree on it (it is part of the layout hash).
    pub kv_dtype: KvDType,
    /// KV capacity in tokens of the sliding-window ring, over all sequences, for models whose
    /// sliding-window layers keep only their windows (Gemma 3; see the engine docs). A sequence
    /// holds at most about `window + prefill_chunk` tokens there, so `max_batch` times that is
    /// plenty. Unset: `kv_capacity_tokens` (the ring is never the tighter limit).
    pub window_ring_tokens: Option<usize>,
    /// Widen every sliding window to the whole context: the same weights with dense KV, to
    /// measure what the model's hybrid attention saves (BENCHMARKS.md). Changes the model's
    /// outputs beyond its window and its KV layout (such nodes exchange KV only among
    /// themselves). Off by default.
    pub global_attention: bool,
}

/// `[policy]`: offload rule, pricing and auction scoring (see `prfaas_mesh::policy`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PolicySection {
    /// Offload iff the uncached prompt length exceeds this many tokens.
    pub offload_threshold_tokens: usize,
    /// Raise `t` at run time to the break-even length at the best observed bandwidth, local
    /// prefill speed and queue (never below `offload_threshold_tokens`). `false` pins `t`.
    pub adaptive_threshold: bool,
    /// How long the home waits for bids.
    #[serde(with = "humantime_serde")]
    pub auction_deadline: Duration,
    /// How long the home waits for the winner's KV to arrive completely.
    #[serde(with = "humantime_serde")]
    pub transfer_timeout: Duration,
    /// A winner that has opened no KV stream within its own claimed queue delay plus prefill
    /// time plus this margin is cut and recorded as late (a killed winner is noticed from its
    /// connection, sooner).
    #[serde(with = "humantime_serde")]
    pub late_margin: Duration,
    /// After a fast failure of the winner (refused award, connection lost, stream cut, late),
    /// the home re-auctions once without it when the time since the first call plus another
    /// auction deadline stays within this budget; otherwise it prefills locally at once.
    #[serde(with = "humantime_serde")]
    pub reauction_budget: Duration,
    /// Asking price per 1K uncached prompt tokens on an idle node (mesh currency).
    pub price_per_1k_tokens: f64,
    /// Relative price premium per second of queued prefill work.
    pub queue_premium_per_s: f64,
    /// Multiplies this node's own (reserve) prefill price: what prefilling here costs the
    /// decodes it stalls. `1` = local compute is worth what peers ask; higher favours offload.
    pub reserve_price_factor: f64,
    /// λ: price units per second of time to first token when scoring bids.
    pub lambda_per_s: f64,
    /// Highest acceptable bid score (also the posted reserve for the second-score rule).
    pub max_score: f64,
    /// Bandwidth assumed towards a bidder the node has never measured, bytes/s.
    pub assumed_bandwidth_bytes_per_s: f64,
    /// Prefills this node queues for others at most; more calls are declined as overloaded.
    pub max_served_prefills: usize,
    /// Candidates called per auction: the best by their adverts (model, free KV, queue, link,
    /// cached prefix); the others are not called.
    pub auction_top_k: usize,
    /// A prompt longer than `t` is prefilled here rather than by the best bidder only when that
    /// is this many times faster (`1` = the plain reserve bid): a long prompt kept here also
    /// delays every short prompt this node homes. Same rule as the simulator's
    /// `auction.keep_ratio` (`policy::PlacementInput::keep_ratio`).
    pub keep_ratio: f64,
    /// A `pd` node may switch itself to prefill-only or decode-only when the role advice over the
    /// nodes it sees says that side is the bottleneck (drains, then re-advertises).
    pub role_conversion: bool,
    /// Least time between two role changes of this node (and before the first one).
    #[serde(with = "humantime_serde")]
    pub role_min_interval: Duration,
    /// Most this node pays any one peer per `spend_period` as a home (mesh currency); a peer
    /// over it is not called until the period ends. `None`: no cap.
    pub spend_cap_per_peer: Option<f64>,
    /// The period of `spend_cap_per_peer`.
    #[serde(with = "humantime_serde")]
    pub spend_period: Duration,
}

impl Default for NodeSection {
    fn default() -> Self {
        Self {
            name: "node".into(),
            roles: vec![NodeRole::Pd],
            model: crate::engine::loader::DEFAULT_MODEL.into(),
            backend: BackendKind::Auto,
            identity: None,
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

impl Default for ApiSection {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            max_inflight: 64,
            workers: 2,
            public_url: None,
        }
    }
}

impl Default for EngineSection {
    fn default() -> Self {
        Self {
            kv_capacity_tokens: 32 * 1024,
            block_size: 16,
            prefill_chunk: 512,
            max_batch: 32,
            prefix_cache: true,
            state_slots: 64,
            queue: 256,
            calibration_tokens: 128,
            kv_dtype: KvDType::default(),
            window_ring_tokens: None,
            global_attention: false,
        }
    }
}

impl Default for PolicySection {
    fn default() -> Self {
        Self {
            offload_threshold_tokens: 256,
            adaptive_threshold: true,
            auction_deadline: Duration::from_millis(200),
            transfer_timeout: Duration::from_secs(60),
            late_margin: Duration::from_secs(3),
            reauction_budget: Duration::from_secs(2),
            price_per_1k_tokens: 1.0,
            queue_premium_per_s: 0.5,
            reserve_price_factor: 3.0,
            lambda_per_s: 1.0,
            max_score: 1.0e6,
            assumed_bandwidth_bytes_per_s: 100.0e6,
            max_served_prefills: 8,
            auction_top_k: 4,
            keep_ratio: 1.0,
            role_conversion: false,
            role_min_interval: Duration::from_secs(300),
            spend_cap_per_peer: None,
            spend_period: Duration::from_secs(3600),
        }
    }
}

/// Why a config could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("parsing {path}: {source}")]
    Toml {
        path: String,
        #[source]
        source: toml::de::Error,
    },
    #[error("invalid config: {0}")]
    Invalid(String),
}

impl NodeConfig {
    /// Reads and validates a TOML file.
    pub fn from_file(path: &std::path::Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.display().to_string(),
            source,
        })?;
        let cfg: Self = toml::from_str(&text).map_err(|source| ConfigError::Toml {
            path: path.display().to_string(),
            source,
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks values a node cannot run with.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: &str| Err(ConfigError::Invalid(m.into()));
        if self.node.roles.is_empty() {
            return bad("node.roles is empty (use prefill, decode or pd)");
        }
        if self.engine.block_size == 0 || self.engine.kv_capacity_tokens < self.engine.block_size {
            return bad("engine.block_size must be > 0 and ≤ engine.kv_capacity_tokens");
        }
        if self
            .engine
            .window_ring_tokens
            .is_some_and(|t| t < self.engine.block_size)
        {
            return bad("engine.window_ring_tokens must be ≥ engine.block_size");
        }
        if self.engine.max_batch == 0 || self.engine.prefill_chunk == 0 || self.engine.queue == 0 {
            return bad("engine.max_batch, engine.prefill_chunk and engine.queue must be > 0");
        }
        if self.api.max_inflight == 0 || self.api.workers == 0 {
            return bad("api.max_inflight and api.workers must be > 0");
        }
        self.mesh
            .nat
            .relay_listen_addrs()
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        if let Some(url) = &self.api.public_url {
            if !is_http_url(url) {
                return Err(ConfigError::Invalid(format!(
                    "api.public_url {url:?} must be an http:// or https:// URL of at most {MAX_API_URL} characters, without spaces"
                )));
            }
        }
        let p = &self.policy;
        for (name, v) in [
            ("policy.price_per_1k_tokens", p.price_per_1k_tokens),
            ("policy.queue_premium_per_s", p.queue_premium_per_s),
            ("policy.lambda_per_s", p.lambda_per_s),
            ("policy.reserve_price_factor", p.reserve_price_factor),
            ("policy.max_score", p.max_score),
            (
                "policy.assumed_bandwidth_bytes_per_s",
                p.assumed_bandwidth_bytes_per_s,
            ),
        ] {
            if !v.is_finite() || v < 0.0 {
                return Err(ConfigError::Invalid(format!(
                    "{name} must be finite and ≥ 0"
                )));
            }
        }
        if p.auction_top_k == 0 {
            return bad("policy.auction_top_k must be ≥ 1");
        }
        if !(p.keep_ratio.is_finite() && p.keep_ratio >= 1.0) {
            return bad("policy.keep_ratio must be finite and ≥ 1");
        }
        if p.spend_cap_per_peer
            .is_some_and(|c| !c.is_finite() || c < 0.0)
        {
            return bad("policy.spend_cap_per_peer must be finite and ≥ 0");
        }
        if p.spend_period.is_zero() {
            return bad("policy.spend_period must be > 0");
        }
        Ok(())
    }

    /// Homes client requests (has the decode role).
    pub fn is_home(&self) -> bool {
        self.node
            .roles
            .iter()
            .any(|r| matches!(r, NodeRole::Decode | NodeRole::Pd))
    }

    /// Prefills for others (bids in auctions).
    pub fn serves_prefill(&self) -> bool {
        self.node
            .roles
            .iter()
            .any(|r| matches!(r, NodeRole::Prefill | NodeRole::Pd))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_api_url_must_be_http() {
        let mut cfg = NodeConfig::default();
        for good in ["http://10.0.0.5:8080", "https://node.example/prfaas"] {
            cfg.api.public_url = Some(good.into());
            assert!(cfg.validate().is_ok(), "{good}");
        }
        for bad in [
            "javascript:alert(1)",
            "http://",
            "http:///x",
            "ftp://host",
            "http://a b",
            &format!("http://{}", "a".repeat(MAX_API_URL)),
        ] {
            cfg.api.public_url = Some(bad.into());
            let err = cfg.validate().expect_err(bad).to_string();
            assert!(err.contains("api.public_url"), "{bad}: {err}");
        }
    }

    #[test]
    fn parses_a_full_config_and_rejects_unknown_fields() {
        let cfg: NodeConfig = toml::from_str(
            r#"
            [node]
            name = "p1"
            roles = ["prefill"]
            model = "tiny-hybrid"
            backend = "cpu"
            [api]
            listen = "127.0.0.1:0"
            [policy]
            offload_threshold_tokens = 64
            auction_deadline = "150ms"
            [mesh]
            listen = ["/ip4/127.0.0.1/tcp/0"]
            "#,
        )
        .unwrap();
        cfg.validate().unwrap();
        assert!(cfg.serves_prefill() && !cfg.is_home());
        assert_eq!(cfg.policy.auction_deadline, Duration::from_millis(150));
        assert!(toml::from_str::<NodeConfig>("[node]\nbogus = 1\n").is_err());
        let mut bad = cfg.clone();
        bad.node.roles.clear();
        assert!(bad.validate().is_err());
    }

    #[test]
    fn shipped_example_configs_parse() {
        for f in ["node-prefill.toml", "node-decode.toml"] {
            let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../configs")
                .join(f);
            let cfg = NodeConfig::from_file(&path).unwrap_or_else(|e| panic!("{f}: {e}"));
            assert!(!cfg.mesh.listen.is_empty(), "{f}");
        }
    }
}
