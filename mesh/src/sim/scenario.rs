//! Scenario files (`configs/sim-*.toml`): workload, hardware, link, policies' parameters.

use serde::{Deserialize, Serialize};

use crate::policy::{DecodeProfile, LengthDistribution, PolicyError, PrefillProfile, ProfilePoint};

/// Why a scenario could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    /// The file could not be read.
    #[error("reading scenario {path}: {source}")]
    Io {
        /// Path given.
        path: String,
        /// Underlying error.
        source: std::io::Error,
    },
    /// The TOML did not match the schema.
    #[error("parsing scenario: {0}")]
    Parse(#[from] toml::de::Error),
    /// A value was out of range.
    #[error("invalid scenario: {0}")]
    Policy(#[from] PolicyError),
    /// A structural problem (e.g. zero instances).
    #[error("invalid scenario: {0}")]
    Invalid(String),
}

/// The whole scenario.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Free text shown in the report.
    #[serde(default)]
    pub name: String,
    /// Requests and arrivals.
    pub workload: Workload,
    /// Instances and their profiles.
    pub hardware: Hardware,
    /// The link between the PrfaaS cluster and the PD cluster.
    pub link: Link,
    /// Central router (paper's PrfaaS) parameters.
    #[serde(default)]
    pub router: Router,
    /// Decentralized auction parameters.
    #[serde(default)]
    pub auction: Auction,
    /// Periods when the remote prefill site is gone (leave at `from_s`, rejoin at `to_s`).
    #[serde(default)]
    pub outage: Vec<Outage>,
    /// Optional overload run measuring the sustained throughput of each policy.
    #[serde(default)]
    pub capacity: Option<Capacity>,
}

/// Workload description.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Workload {
    /// Number of requests.
    pub requests: usize,
    /// Seed of the deterministic RNG.
    #[serde(default = "one")]
    pub seed: u64,
    /// Output tokens per request (`L_out`).
    pub output_tokens: u32,
    /// Prompt lengths.
    pub lengths: Lengths,
    /// Arrival process.
    pub arrival: Arrival,
    /// Shared prefixes.
    #[serde(default)]
    pub prefixes: Prefixes,
}

fn one() -> u64 {
    1
}

/// Log-normal prompt lengths truncated to `[min, max]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Lengths {
    /// μ of `ln L`.
    pub mu: f64,
    /// σ of `ln L`.
    pub sigma: f64,
    /// Smallest length.
    pub min: f64,
    /// Largest length.
    pub max: f64,
    /// Discretisation bins in `ln L` (also the threshold grid).
    #[serde(default = "default_bins")]
    pub bins: usize,
}

fn default_bins() -> usize {
    4096
}

impl Lengths {
    /// The discretised distribution the model and the sampler share.
    pub fn distribution(&self) -> Result<LengthDistribution, PolicyError> {
        LengthDistribution::lognormal_truncated(self.mu, self.sigma, self.min, self.max, self.bins)
    }
}

/// Arrival process.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Arrival {
    /// Poisson arrivals.
    Poisson {
        /// Mean rate.
        rate_per_s: f64,
    },
    /// Two-state Markov-modulated Poisson: exponential sojourns in a high and a low state.
    Bursty {
        /// Rate in bursts.
        high_rate_per_s: f64,
        /// Rate between bursts.
        low_rate_per_s: f64,
        /// Mean burst length.
        mean_high_s: f64,
        /// Mean gap length.
        mean_low_s: f64,
    },
}

/// Shared-prefix model: a fraction of requests starts with one of `groups` prefixes.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Prefixes {
    /// Fraction of requests with a shared prefix (0..1).
    pub share: f64,
    /// Number of distinct prefixes (popularity uniform).
    pub groups: u32,
    /// Prefix length in tokens (capped at 90% of the prompt).
    pub tokens: f64,
    /// Prefixes one prefill instance keeps cached (LRU).
    pub cache_capacity: usize,
}

/// One prefill profile point as written in the file (sizes in MiB for readability).
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PointMib {
    /// Prompt tokens.
    pub tokens: f64,
    /// Seconds.
    pub prefill_s: f64,
    /// KV size in MiB.
    pub kv_mib: f64,
}

/// Hardware.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hardware {
    /// Remote (PrfaaS) prefill instances.
    pub prfaas_instances: u32,
    /// Instances of the heterogeneous PD cluster (split by search).
    pub pd_instances: u32,
    /// Instances of the homogeneous baseline (split by search).
    pub homogeneous_instances: u32,
    /// Remote instance profile.
    pub remote_prefill: Vec<PointMib>,
    /// PD-cluster instance profile.
    pub local_prefill: Vec<PointMib>,
    /// Decode step time `(batch, seconds)` points.
    pub decode_steps: Vec<(f64, f64)>,
    /// Decode SLO.
    pub slo_tokens_per_s: f64,
    /// `false` (a PD cluster, the paper's setting): a home's prompts may prefill on any of its
    /// cluster's prefill instances. `true` (a mesh of `pd` nodes): each home is a node with its
    /// own prefill instance (home `h` owns the cluster's instance `h mod P`); its local prompts
    /// prefill there, its reserve bid is that instance's, and the KV it imports from a remote
    /// prefill joins that instance's prefix cache.
    #[serde(default)]
    pub colocated: bool,
    /// Bids (and a home's estimate of its own prefill) quote `uncached tokens / rate` rather
    /// than the exact profile time, the rate starting here and moving with each prefill the
    /// instance serves ([`crate::policy::QuoteRate`], what a node does). `None`: bidders know
    /// their prefill time exactly.
    #[serde(default)]
    pub remote_quote_tokens_per_s: Option<f64>,
    /// The same for the home cluster's instances (the reserve bids).
    #[serde(default)]
    pub local_quote_tokens_per_s: Option<f64>,
    /// `(prompt tokens, seconds)`: what a `pd` home's own compute spends verifying the KV it
    /// imported before decoding it (`hardware.colocated` only; a node's `/mesh` `measured.import`).
    /// It queues behind the home's own prefills as a node's `FinishImport` job does. Empty: free.
    #[serde(default)]
    pub import_verify: Vec<(f64, f64)>,
    /// The first token is sampled from the prefill's last logits, so TTFT ends when the decode
    /// side admits the request (what a prfaas node does: its stream starts with that token);
    /// otherwise TTFT also counts one decode step at the SLO batch (the paper's accounting).
    #[serde(default)]
    pub first_token_at_prefill: bool,
}

fn profile(points: &[PointMib]) -> Result<PrefillProfile, PolicyError> {
    PrefillProfile::new(
        points
            .iter()
            .map(|p| ProfilePoint {
                tokens: p.tokens,
                prefill_s: p.prefill_s,
                kv_bytes: p.kv_mib * 1024.0 * 1024.0,
            })
            .collect(),
    )
}

impl Hardware {
    /// Validated remote profile.
    pub fn remote_profile(&self) -> Result<PrefillProfile, PolicyError> {
        profile(&self.remote_prefill)
    }
    /// Validated local profile.
    pub fn local_profile(&self) -> Result<PrefillProfile, PolicyError> {
        profile(&self.local_prefill)
    }
    /// Validated decode profile.
    pub fn decode_profile(&self) -> Result<DecodeProfile, PolicyError> {
        DecodeProfile::new(self.decode_steps.clone(), self.slo_tokens_per_s)
    }
}

/// The inter-cluster link.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Link {
    /// Nominal bandwidth.
    pub bandwidth_gbps: f64,
    /// One-way latency.
    pub latency_ms: f64,
    /// Layers the KV is pipelined in (send layer i while computing i+1).
    pub kv_layers: u32,
    /// Bandwidth changes: from `at_s` on the link runs at `gbps`.
    #[serde(default)]
    pub schedule: Vec<BandwidthStep>,
    /// What homes believe of the link before their first transfer (a node's probe figure),
    /// Gbit/s; each transfer then moves the belief towards its goodput. Absent: the link's
    /// nominal bandwidth.
    #[serde(default)]
    pub estimate_start_gbps: Option<f64>,
}

/// A bandwidth change.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BandwidthStep {
    /// Virtual time.
    pub at_s: f64,
    /// New bandwidth.
    pub gbps: f64,
}

/// Central-router parameters.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Router {
    /// How often the router checks the re-search trigger.
    pub check_interval_s: f64,
    /// Egress utilisation that triggers a re-search.
    pub egress_utilisation_high: f64,
    /// Queue delay that triggers a re-search.
    pub queue_delay_high_s: f64,
    /// Bandwidth change factor that triggers a re-search.
    pub bandwidth_change_factor: f64,
    /// Link backlog above which bandwidth counts as scarce for the prefix rule.
    pub scarce_link_backlog_s: f64,
}

impl Default for Router {
    fn default() -> Self {
        Self {
            check_interval_s: 5.0,
            egress_utilisation_high: 0.8,
            queue_delay_high_s: 10.0,
            bandwidth_change_factor: 1.5,
            scarce_link_backlog_s: 1.0,
        }
    }
}

/// Auction parameters (see [`crate::policy::auction`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Auction {
    /// Advert period; a home's view of every peer is this stale at worst.
    pub gossip_interval_s: f64,
    /// Price per 1K uncached tokens on an idle node.
    pub base_per_ktok: f64,
    /// Price premium per queued second.
    pub queue_premium_per_s: f64,
    /// Price premium at full utilisation.
    pub utilisation_premium: f64,
    /// Price units per second of delay.
    pub lambda_per_s: f64,
    /// EWMA weight of a new bandwidth sample.
    pub bandwidth_ewma_alpha: f64,
    /// Time a home waits on a vanished winner before re-auctioning.
    pub failure_timeout_s: f64,
    /// Candidates a home calls per auction, best first by their adverts (`policy.auction_top_k`
    /// of a node).
    pub top_k: usize,
    /// A prompt under the threshold is auctioned to the whole mesh anyway when the home cluster
    /// would take more than this many times as long as the best remote offer.
    pub spill_ratio: f64,
    /// A prompt above the threshold stays in the home cluster only when that is this many times
    /// faster than the best remote bid (`policy.keep_ratio` of a node; 1 = plain reserve bid).
    pub keep_ratio: f64,
    /// `false` (default): bids carry the bidder's live queue (the Call/Bid exchange of DESIGN.md
    /// §3, one round trip). `true`: homes decide from gossip adverts alone, as stale as
    /// `gossip_interval_s`.
    pub bids_from_gossip: bool,
    /// A home's own prefill (the reserve bid) is priced at this multiple of the pricing rule
    /// (`policy.reserve_price_factor` of a node: what its compute is worth to its decodes).
    pub reserve_price_factor: f64,
    /// `false` pins every home's `t` at its start value (`policy.adaptive_threshold` of a node).
    pub adaptive_threshold: bool,
    /// No search sets a home's `t` below this (`policy.offload_threshold_tokens` of a node).
    pub threshold_floor_tokens: f64,
}

impl Default for Auction {
    fn default() -> Self {
        Self {
            gossip_interval_s: 1.0,
            base_per_ktok: 0.001,
            queue_premium_per_s: 0.1,
            utilisation_premium: 0.5,
            lambda_per_s: 1.0,
            bandwidth_ewma_alpha: 0.3,
            failure_timeout_s: 2.0,
            top_k: 4,
            spill_ratio: 4.0,
            keep_ratio: 1.0,
            bids_from_gossip: false,
            reserve_price_factor: 1.0,
            adaptive_threshold: true,
            threshold_floor_tokens: 0.0,
        }
    }
}

/// A remote-site outage.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Outage {
    /// Leave time.
    pub from_s: f64,
    /// Rejoin time.
    pub to_s: f64,
}

/// Overload run.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Capacity {
    /// Offered rate, above every policy's `Λ`.
    pub rate_per_s: f64,
    /// Requests in the overload run.
    pub requests: usize,
}

impl Scenario {
    /// Read and validate a scenario file.
    pub fn load(path: &std::path::Path) -> Result<Self, ScenarioError> {
        let text = std::fs::read_to_string(path).map_err(|source| ScenarioError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text)
    }

    /// Parse and validate scenario text.
    pub fn parse(text: &str) -> Result<Self, ScenarioError> {
        let s: Scenario = toml::from_str(text)?;
        s.validate()?;
        Ok(s)
    }

    /// Structural checks beyond what serde enforces.
    pub fn validate(&self) -> Result<(), ScenarioError> {
        let bad = |m: &str| Err(ScenarioError::Invalid(m.to_owned()));
        let k = self.auction.keep_ratio;
        if !(k.is_finite() && k >= 1.0) {
            return bad("auction.keep_ratio must be finite and ≥ 1");
        }
        let h = &self.hardware;
        if h.pd_instances < 1 || h.homogeneous_instances < 2 {
            return bad("need at least 1 PD instance and 2 homogeneous instances");
        }
        if h.prfaas_instances > 10_000
            || h.pd_instances > 10_000
            || h.homogeneous_instances > 10_000
        {
            return bad("at most 10000 instances per pool");
        }
        if self.workload.requests == 0 || self.workload.requests > 10_000_000 {
            return bad("requests must be in 1..=10^7");
        }
        if self.workload.output_tokens == 0 {
            return bad("output_tokens must be > 0");
        }
        let pos = |x: f64| x.is_finite() && x > 0.0;
        let nonneg = |x: f64| x.is_finite() && x >= 0.0;
        if h.import_verify.iter().any(|&(t, s)| !pos(t) || !nonneg(s))
            || h.import_verify.windows(2).any(|w| w[1].0 <= w[0].0)
        {
            return bad(
                "hardware.import_verify: (tokens > 0, seconds ≥ 0) points, tokens ascending",
            );
        }
        match self.workload.arrival {
            Arrival::Poisson { rate_per_s } if !pos(rate_per_s) => {
                return bad("rate_per_s must be > 0")
            }
            Arrival::Bursty {
                high_rate_per_s,
                low_rate_per_s,
                mean_high_s,
                mean_low_s,
            } if !(pos(high_rate_per_s)
                && nonneg(low_rate_per_s)
                && pos(mean_high_s)
                && pos(mean_low_s)) =>
            {
                return bad("bursty rates/durations must be positive")
            }
            _ => {}
        }
        let p = &self.workload.prefixes;
        if !(0.0..=1.0).contains(&p.share) || (p.share > 0.0 && (p.groups == 0 || !pos(p.tokens))) {
            return bad("prefixes: share in 0..1 and groups/tokens > 0 when used");
        }
        if !pos(self.link.bandwidth_gbps)
            || !nonneg(self.link.latency_ms)
            || self.link.kv_layers == 0
            || self.link.estimate_start_gbps.is_some_and(|g| !pos(g))
        {
            return bad("link: bandwidth > 0, latency ≥ 0, kv_layers ≥ 1, estimate_start_gbps > 0");
        }
        if self
            .link
            .schedule
            .iter()
            .any(|s| !pos(s.gbps) || !nonneg(s.at_s))
        {
            return bad("link schedule: gbps > 0 and at_s ≥ 0");
        }
        let a = &self.auction;
        if !pos(a.gossip_interval_s)
            || !pos(a.lambda_per_s)
            || !(0.0..=1.0).contains(&a.bandwidth_ewma_alpha)
            || !pos(a.reserve_price_factor)
            || !nonneg(a.threshold_floor_tokens)
        {
            return bad(
                "auction: gossip_interval_s, lambda_per_s, reserve_price_factor > 0, alpha in 0..1, threshold_floor_tokens ≥ 0",
            );
        }
        if !pos(self.router.check_interval_s) {
            return bad("router.check_interval_s must be > 0");
        }
        if self
            .outage
            .iter()
            .any(|o| !nonneg(o.from_s) || !o.to_s.is_finite() || o.to_s <= o.from_s)
        {
            return bad("outage: 0 ≤ from_s < to_s");
        }
        if let Some(c) = self.capacity {
            if !pos(c.rate_per_s) || c.requests == 0 || c.requests > 10_000_000 {
                return bad("capacity: rate > 0, 1..=10^7 requests");
            }
        }
        self.workload.lengths.distribution()?;
        h.remote_profile()?;
        h.local_profile()?;
        h.decode_profile()?;
        crate::policy::PricingParams::new(
            a.base_per_ktok,
            a.queue_premium_per_s,
            a.utilisation_premium,
        )?;
        Ok(())
    }
}
