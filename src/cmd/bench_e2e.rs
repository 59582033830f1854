//! `prfaas bench e2e`: real node processes on real shaped links (root).
//!
//! Every node is a `prfaas node` process (this binary) in its own network namespace, pinned to
//! its own core with `taskset`; the namespaces hang off a hub namespace by veth links shaped with
//! `tc tbf` (see [`super::netns`]). The client lives in the hub (one thread of this process moved
//! there with `setns`) and replays a trace through the OpenAI API with streaming, timing every
//! token.
//!
//! 1. **Load.** One trace (log-normal prompt lengths scaled to the model's context, Poisson
//!    arrivals, shared system prompts, prompts cut from real English text) replayed at each
//!    offered load on three deployments of the same two cores: *homogeneous* (both nodes `pd`,
//!    everything local, requests spread over both), *naive* (a `pd` home that offloads every
//!    prompt longer than `--long-tokens` to a `prefill` node: `t` pinned, own bid never wins) and
//!    *auction* (the same two nodes with the default policy). Throughput, TTFT P50/P90, ITL
//!    P50/P99, goodput under an SLO, offload fraction, egress bytes per uplink.
//! 2. **Overlap.** For each prompt length and link rate: TTFT of a remote prefill divided by
//!    `max(prefill + last piece, whole-KV transfer)`, with the prefill measured on the prefill
//!    node itself (the same kind of prompt prefilled locally there) and the link's rate measured
//!    with a raw TCP transfer on the same link in the same run.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use prfaas_kernels::BackendKind;
use prfaas_mesh::policy::MeasuredProfile;
use prfaas_mesh::sim::replay::{
    self, ReplayDeployment, ReplayInput, ReplayPolicy, ReplayRecord, ReplayRequest, RunFigures,
};
use prfaas_node::api::client::{self, ChatParams, ChatResult};
use prfaas_node::config::{NodeConfig, NodeRole};
use prfaas_node::engine::chat::ChatMessage;
use prfaas_node::engine::loader::{load_model, TextCodec, DEFAULT_MODEL};
use prfaas_node::service::PrefillRoute;
use serde::Serialize;
use serde_json::json;

use super::bench_node::percentile;
use super::netns::{ChildGuard, Topology};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// GGUF model or `tiny-hybrid` / `tiny-dense`.
    #[arg(long, default_value = DEFAULT_MODEL)]
    pub model: String,
    /// Backend of every node.
    #[arg(long, default_value = "cpu")]
    pub backend: BackendKind,
    /// Requests in the trace.
    #[arg(long, default_value_t = 16)]
    pub requests: usize,
    /// Offered loads (requests/s) the trace is replayed at, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [0.05, 0.1])]
    pub rates: Vec<f64>,
    /// Generated tokens per request (greedy).
    #[arg(long, default_value_t = 32)]
    pub max_tokens: usize,
    /// Prompt lengths are drawn relative to min(model context, this).
    #[arg(long, default_value_t = 8192)]
    pub context_cap: usize,
    /// Trace seed.
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// Uplink rate of each node namespace, Mbit/s (the home↔prefill link gets this rate) in the
    /// load runs.
    #[arg(long, default_value_t = 100.0)]
    pub link_mbit: f64,
    /// Cores of the home node and of the second node (`taskset -c`).
    #[arg(long, value_delimiter = ',', default_values_t = [0usize, 1])]
    pub cores: Vec<usize>,
    /// Naive deployment: every prompt longer than this goes remote.
    #[arg(long, default_value_t = 256)]
    pub long_tokens: usize,
    /// SLO bound on time to first token, seconds.
    #[arg(long, default_value_t = 10.0)]
    pub slo_ttft_s: f64,
    /// SLO bound on a request's mean inter-token latency, seconds.
    #[arg(long, default_value_t = 0.25)]
    pub slo_itl_s: f64,
    /// Overlap: prompt lengths in tokens (clipped to the context).
    #[arg(long, value_delimiter = ',', default_values_t = [2048usize, 8192])]
    pub overlap_lengths: Vec<usize>,
    /// Overlap: link rates, Mbit/s.
    #[arg(long, value_delimiter = ',', default_values_t = [100.0, 1000.0])]
    pub overlap_mbit: Vec<f64>,
    /// Skip the load runs.
    #[arg(long)]
    pub no_load: bool,
    /// `mesh.kv_wire` of every node: `int8` lets homes ask for int8 KV when the link is the bound.
    #[arg(long, default_value = "f16", value_parser = parse_kv_wire)]
    pub kv_wire: prfaas_mesh::kv::KvWire,
    /// Remote/local pairs per overlap cell; the cell reports the median ratio.
    #[arg(long, default_value_t = 3)]
    pub overlap_reps: usize,
    /// Skip the overlap runs.
    #[arg(long)]
    pub no_overlap: bool,
    /// KV pool of each node, tokens.
    #[arg(long, default_value_t = 24 * 1024)]
    pub kv_tokens: usize,
    /// Every node widens the model's sliding windows to the whole context
    /// (`engine.global_attention`): the same weights with dense KV, to compare with the
    /// model's own hybrid attention on the same link.
    #[arg(long)]
    pub global_attention: bool,
    /// Longest a single load run or overlap request may take, seconds.
    #[arg(long, default_value_t = 1200)]
    pub run_timeout_s: u64,
    /// Where tables, charts and the JSON go (a subfolder per model).
    #[arg(long, default_value = "target/bench-e2e")]
    pub out: PathBuf,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
}

fn parse_kv_wire(s: &str) -> Result<prfaas_mesh::kv::KvWire, String> {
    serde_json::from_value(json!(s)).map_err(|_| format!("`{s}`: expected f16 or int8"))
}

// ---- trace ---------------------------------------------------------------------------------

/// Real English text to cut prompts from: this repository's own documentation.
const CORPUS: &[&str] = &[
    include_str!("../../README.md"),
    include_str!("../../configs/README.md"),
    include_str!("../../BENCHMARKS.md"),
];

/// SplitMix64: a small, seedable generator, enough for a reproducible trace.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in (0, 1].
    fn unit(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64
    }
    fn normal(&mut self) -> f64 {
        (-2.0 * self.unit().ln()).sqrt() * (2.0 * std::f64::consts::PI * self.unit()).cos()
    }
    fn exp(&mut self) -> f64 {
        -self.unit().ln()
    }
}

/// Token ids of the corpus and the text of any window of them (wrapping around).
struct Text {
    codec: TextCodec,
    tokens: Vec<u32>,
}

impl Text {
    fn new(codec: TextCodec) -> anyhow::Result<Self> {
        let mut tokens = Vec::new();
        for doc in CORPUS {
            tokens.extend(codec.encode(doc, false)?);
        }
        // Control tokens (BOS) have no text.
        tokens.retain(|&t| !codec.token_bytes(t).is_empty());
        anyhow::ensure!(tokens.len() > 1000, "corpus too small");
        Ok(Self { codec, tokens })
    }
    /// About `n` tokens of text starting at token `from`.
    fn window(&self, from: usize, n: usize) -> String {
        let mut bytes = Vec::new();
        for k in 0..n {
            bytes.extend(
                self.codec
                    .token_bytes(self.tokens[(from + k) % self.tokens.len()]),
            );
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

/// One request of the trace.
#[derive(Debug, Clone)]
struct TraceRequest {
    /// Arrival at unit offered load (1 request/s); divide by the rate.
    at_unit_s: f64,
    system: Option<usize>,
    user: String,
}

struct Trace {
    systems: Vec<String>,
    requests: Vec<TraceRequest>,
}

fn make_trace(args: &Args, text: &Text, context: usize) -> Trace {
    let cap = context.min(args.context_cap).max(512);
    let mut rng = Rng(args.seed);
    let sys_len = cap / 32;
    let systems: Vec<String> = (0..3)
        .map(|i| text.window(rng.next_u64() as usize % text.tokens.len() + i, sys_len))
        .collect();
    // Log-normal lengths with median cap/12, σ = 1, clipped to [64, cap/2].
    let (mu, sigma) = ((cap as f64 / 12.0).ln(), 1.0);
    let mut at = 0.0;
    let requests = (0..args.requests)
        .map(|_| {
            at += rng.exp();
            let len = ((mu + sigma * rng.normal()).exp() as usize).clamp(64, cap / 2);
            let system = (rng.unit() < 2.0 / 3.0).then(|| rng.next_u64() as usize % 3);
            let user_len = len.saturating_sub(system.map_or(0, |_| sys_len)).max(16);
            TraceRequest {
                at_unit_s: at,
                system,
                user: text.window(rng.next_u64() as usize % text.tokens.len(), user_len),
            }
        })
        .collect();
    Trace { systems, requests }
}

// ---- deployments ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum Deployment {
    Homogeneous,
    Naive,
    Auction,
}

const DEPLOYMENTS: [Deployment; 3] = [
    Deployment::Homogeneous,
    Deployment::Naive,
    Deployment::Auction,
];

/// An offload threshold no prompt reaches (TOML integers are i64, so not `usize::MAX`).
const NEVER_OFFLOAD: usize = 1 << 40;

const API_PORT: u16 = 8080;
const MESH_PORT: u16 = 4100;

/// A node's config on the netns topology (fixed ports: each namespace has its own).
fn node_config(
    args: &Args,
    topo: &Topology,
    i: usize,
    roles: &[NodeRole],
    prefix_cache: bool,
) -> NodeConfig {
    let mut bootstrap = Vec::new();
    if i > 0 {
        bootstrap.push(format!("/ip4/{}/tcp/{MESH_PORT}", topo.addr(0)));
    }
    let mut c = super::local_node_config(
        &format!("node-{i}"),
        roles,
        &args.model,
        args.backend,
        bootstrap,
    );
    c.api.listen = (topo.addr(i), API_PORT).into();
    c.api.max_inflight = 256;
    c.mesh.listen = vec![format!("/ip4/{}/tcp/{MESH_PORT}", topo.addr(i))];
    // Veth addresses in network namespaces this run created: nobody else can reach them.
    c.mesh.open = true;
    c.engine.kv_capacity_tokens = args.kv_tokens;
    c.engine.prefix_cache = prefix_cache;
    c.policy.auction_deadline = Duration::from_secs(1);
    c.policy.transfer_timeout = Duration::from_secs(args.run_timeout_s);
    // The default (30 s) cuts a transfer whose winner is still queued or prefilling a long
    // prompt on one slow core; here only the transfer timeout bounds it.
    c.mesh.limits.kv_idle_timeout = c.policy.transfer_timeout;
    c.mesh.kv_wire = args.kv_wire;
    c.engine.global_attention = args.global_attention;
    c
}

fn deployment_configs(args: &Args, topo: &Topology, d: Deployment) -> Vec<NodeConfig> {
    match d {
        Deployment::Homogeneous => (0..2)
            .map(|i| {
                let mut c = node_config(args, topo, i, &[NodeRole::Pd], true);
                c.policy.offload_threshold_tokens = NEVER_OFFLOAD;
                c.policy.adaptive_threshold = false;
                c
            })
            .collect(),
        Deployment::Naive => {
            let mut home = node_config(args, topo, 0, &[NodeRole::Pd], true);
            home.policy.offload_threshold_tokens = args.long_tokens;
            home.policy.adaptive_threshold = false;
            home.policy.reserve_price_factor = 1e6;
            vec![home, node_config(args, topo, 1, &[NodeRole::Prefill], true)]
        }
        Deployment::Auction => vec![
            node_config(args, topo, 0, &[NodeRole::Pd], true),
            node_config(args, topo, 1, &[NodeRole::Prefill], true),
        ],
    }
}

/// Running node processes of one deployment; stopped on drop.
struct Nodes {
    procs: Vec<ChildGuard>,
    urls: Vec<String>,
}

/// Starts the nodes in order, each once the one before answers `/healthz` (a node dials its
/// bootstrap peer once, at start).
async fn start_nodes(
    args: &Args,
    topo: &Topology,
    configs: &[NodeConfig],
    dir: &Path,
    label: &str,
) -> anyhow::Result<Nodes> {
    let exe = std::env::current_exe().context("locating the prfaas binary")?;
    let mut procs = Vec::new();
    let mut urls = Vec::new();
    for (i, cfg) in configs.iter().enumerate() {
        let path = dir.join(format!("{label}-node{i}.toml"));
        std::fs::write(&path, toml::to_string(cfg).context("node config to TOML")?)
            .with_context(|| format!("writing {}", path.display()))?;
        let log = std::fs::File::create(dir.join(format!("{label}-node{i}.log")))?;
        let core = args.cores.get(i).copied().unwrap_or(i);
        let child = topo
            .command(i, &core.to_string(), &exe)
            .arg("node")
            .arg("--config")
            .arg(&path)
            // One core per node: one compute thread.
            .env("RAYON_NUM_THREADS", "1")
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting a node process")?;
        let mut proc = ChildGuard(child);
        let url = format!("http://{}:{API_PORT}", topo.addr(i));
        let deadline = Instant::now() + Duration::from_secs(180);
        while client::get_json(&format!("{url}/healthz")).await.is_err() {
            if let Some(s) = proc.exited() {
                anyhow::bail!(
                    "node {i} exited ({s}) during start-up; see {}",
                    dir.display()
                );
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "node {i} not healthy after 180 s; see {}",
                dir.display()
            );
            actix_rt::time::sleep(Duration::from_millis(100)).await;
        }
        procs.push(proc);
        urls.push(url);
    }
    Ok(Nodes { procs, urls })
}

/// Polls (bounded) until node 0 sees `prefillers` peers that prefill its model.
async fn wait_ready(nodes: &mut Nodes, prefillers: usize, dir: &Path) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        for (i, p) in nodes.procs.iter_mut().enumerate() {
            if let Some(s) = p.exited() {
                anyhow::bail!("node {i} exited ({s}); see {}", dir.display());
            }
        }
        let seen = match client::get_json(&format!("{}/mesh", nodes.urls[0])).await {
            Ok(v) => v["peers"].as_array().map_or(0, |p| {
                p.iter()
                    .filter(|p| p["prefills_our_model"].as_bool() == Some(true))
                    .count()
            }),
            Err(_) => 0,
        };
        if seen >= prefillers {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "node 0 sees {seen}/{prefillers} prefill peers after 120 s; logs in {}",
            dir.display()
        );
        actix_rt::time::sleep(Duration::from_millis(200)).await;
    }
}

// ---- measurements --------------------------------------------------------------------------

/// One finished (or failed) request.
#[derive(Debug, Clone, Default)]
struct Outcome {
    ok: bool,
    error: Option<String>,
    ttft_s: f64,
    /// Gaps between streamed tokens.
    itl_s: Vec<f64>,
    /// Trace start → last byte.
    done_at_s: f64,
    prompt_tokens: usize,
    /// Prompt tokens the prefix cache served (the home's or the prefill peer's).
    cached_tokens: usize,
    completion_tokens: usize,
    remote: bool,
    /// Why the home prefilled locally (`None` when remote or unknown).
    local_reason: Option<String>,
    kv_bytes: u64,
}

fn outcome(r: Result<ChatResult, client::ClientError>, arrival: f64) -> Outcome {
    match r {
        Err(e) => Outcome {
            error: Some(e.to_string()),
            ..Outcome::default()
        },
        Ok(r) => {
            let times: Vec<f64> = r.token_times.iter().map(Duration::as_secs_f64).collect();
            let (remote, kv_bytes, local_reason) = match r.prfaas.as_ref().map(|p| &p.route) {
                Some(PrefillRoute::Remote { kv_bytes, .. }) => (true, *kv_bytes, None),
                Some(PrefillRoute::Local { reason }) => (false, 0, Some(reason.clone())),
                None => (false, 0, None),
            };
            Outcome {
                ok: true,
                error: None,
                ttft_s: r.ttft.map_or(f64::NAN, |t| t.as_secs_f64()),
                itl_s: times.windows(2).map(|w| w[1] - w[0]).collect(),
                done_at_s: arrival + r.total.as_secs_f64(),
                prompt_tokens: r.usage.map_or(0, |u| u.prompt_tokens),
                cached_tokens: r
                    .usage
                    .and_then(|u| u.prompt_tokens_details)
                    .map_or(0, |d| d.cached_tokens),
                completion_tokens: r.usage.map_or(0, |u| u.completion_tokens),
                remote,
                local_reason,
                kv_bytes,
            }
        }
    }
}

/// The figures of one deployment at one offered load.
#[derive(Debug, Clone, Serialize)]
struct LoadFigures {
    deployment: Deployment,
    offered_req_per_s: f64,
    requests: usize,
    completed: usize,
    failed: usize,
    first_error: Option<String>,
    makespan_s: f64,
    throughput_req_per_s: f64,
    throughput_tokens_per_s: f64,
    ttft_p50_s: f64,
    ttft_p90_s: f64,
    itl_p50_s: f64,
    itl_p99_s: f64,
    goodput_req_per_s: f64,
    slo_attainment: f64,
    offload_fraction: f64,
    /// Why requests stayed local, with counts.
    local_reasons: std::collections::BTreeMap<String, usize>,
    kv_bytes: u64,
    /// Bytes each node sent on its uplink during the run (kernel counters), node 0 first.
    egress_bytes: Vec<u64>,
    prompt_tokens_mean: f64,
    /// The home's link estimate towards the prefill peer at the end of the run (bytes/s; NaN
    /// when it had none).
    home_link_estimate_bytes_per_s: f64,
    /// The same when the run started (its probes' figure).
    home_link_estimate_start_bytes_per_s: f64,
    #[serde(skip)]
    ttfts: Vec<f64>,
    /// Every request's outcome, in trace order.
    #[serde(skip)]
    outcomes: Vec<Outcome>,
    /// What each node measured of itself at the end of the run (`/mesh` `measured`).
    #[serde(skip)]
    measured: Vec<MeasuredProfile>,
    /// The home's last auctions (`/mesh` `recent_auctions`: every bid with the quotes and link
    /// estimate it was scored with), to set beside the simulator's placements.
    auctions: serde_json::Value,
}

fn figures(
    args: &Args,
    d: Deployment,
    rate: f64,
    outs: &[Outcome],
    egress: Vec<u64>,
) -> LoadFigures {
    let ok: Vec<&Outcome> = outs.iter().filter(|o| o.ok).collect();
    let makespan = ok.iter().map(|o| o.done_at_s).fold(0.0, f64::max);
    let ttfts: Vec<f64> = ok.iter().map(|o| o.ttft_s).collect();
    let itls: Vec<f64> = ok.iter().flat_map(|o| o.itl_s.iter().copied()).collect();
    let good = ok
        .iter()
        .filter(|o| {
            let mean_itl = if o.itl_s.is_empty() {
                0.0
            } else {
                o.itl_s.iter().sum::<f64>() / o.itl_s.len() as f64
            };
            o.ttft_s <= args.slo_ttft_s && mean_itl <= args.slo_itl_s
        })
        .count();
    let per_s = |n: f64| if makespan > 0.0 { n / makespan } else { 0.0 };
    LoadFigures {
        deployment: d,
        offered_req_per_s: rate,
        requests: outs.len(),
        completed: ok.len(),
        failed: outs.len() - ok.len(),
        first_error: outs.iter().find_map(|o| o.error.clone()),
        makespan_s: makespan,
        throughput_req_per_s: per_s(ok.len() as f64),
        throughput_tokens_per_s: per_s(ok.iter().map(|o| o.completion_tokens as f64).sum()),
        ttft_p50_s: percentile(ttfts.clone(), 0.5),
        ttft_p90_s: percentile(ttfts.clone(), 0.9),
        itl_p50_s: percentile(itls.clone(), 0.5),
        itl_p99_s: percentile(itls, 0.99),
        goodput_req_per_s: per_s(good as f64),
        slo_attainment: good as f64 / outs.len().max(1) as f64,
        offload_fraction: ok.iter().filter(|o| o.remote).count() as f64 / ok.len().max(1) as f64,
        local_reasons: ok.iter().filter_map(|o| o.local_reason.clone()).fold(
            Default::default(),
            |mut m, r| {
                *m.entry(r).or_insert(0) += 1;
                m
            },
        ),
        kv_bytes: ok.iter().map(|o| o.kv_bytes).sum(),
        egress_bytes: egress,
        prompt_tokens_mean: ok.iter().map(|o| o.prompt_tokens as f64).sum::<f64>()
            / ok.len().max(1) as f64,
        home_link_estimate_bytes_per_s: f64::NAN,
        home_link_estimate_start_bytes_per_s: f64::NAN,
        ttfts,
        outcomes: outs.to_vec(),
        measured: Vec::new(),
        auctions: serde_json::Value::Null,
    }
}

fn egress(topo: &Topology) -> anyhow::Result<Vec<u64>> {
    (0..topo.node_count())
        .map(|i| topo.egress_bytes(i).map_err(Into::into))
        .collect()
}

async fn replay(
    args: &Args,
    trace: &Trace,
    rate: f64,
    urls: &[String],
) -> anyhow::Result<Vec<Outcome>> {
    let params = ChatParams {
        timeout: Duration::from_secs(args.run_timeout_s),
        // Prompt and cached token counts, for the simulator's replay of the run.
        include_usage: true,
        ..ChatParams::greedy(args.max_tokens)
    };
    let t0 = Instant::now();
    let calls = trace.requests.iter().enumerate().map(|(k, r)| {
        let url = &urls[k % urls.len()];
        let params = &params;
        let arrival = r.at_unit_s / rate;
        let mut messages = Vec::new();
        if let Some(s) = r.system {
            messages.push(ChatMessage::new("system", trace.systems[s].clone()));
        }
        messages.push(ChatMessage::new("user", r.user.clone()));
        async move {
            // Open loop: each request leaves at its arrival time, whatever the others do.
            actix_rt::time::sleep_until((t0 + Duration::from_secs_f64(arrival)).into()).await;
            outcome(client::chat(url, &messages, params, true).await, arrival)
        }
    });
    let all = futures::future::join_all(calls);
    let limit = Duration::from_secs(args.run_timeout_s)
        + Duration::from_secs_f64(trace.requests.last().map_or(0.0, |r| r.at_unit_s / rate));
    actix_rt::time::timeout(limit, all)
        .await
        .map_err(|_| anyhow::anyhow!("load run did not finish within {limit:?}"))
}

async fn load_run(
    args: &Args,
    topo: &Topology,
    trace: &Trace,
    d: Deployment,
    rate: f64,
    dir: &Path,
) -> anyhow::Result<LoadFigures> {
    let label = format!("{d:?}-{rate}").to_lowercase();
    let configs = deployment_configs(args, topo, d);
    let mut nodes = start_nodes(args, topo, &configs, dir, &label).await?;
    let prefillers = usize::from(d != Deployment::Homogeneous);
    wait_ready(&mut nodes, prefillers, dir).await?;
    let homes = if d == Deployment::Homogeneous {
        nodes.urls.clone()
    } else {
        nodes.urls[..1].to_vec()
    };
    let start_estimate = home_link_estimate(&homes[0]).await;
    let before = egress(topo)?;
    let outs = replay(args, trace, rate, &homes).await?;
    let after = egress(topo)?;
    let (measured, link_estimate, auctions) = measured_state(&nodes).await?;
    drop(nodes);
    let sent = after
        .iter()
        .zip(&before)
        .map(|(a, b)| a.saturating_sub(*b))
        .collect();
    let mut f = figures(args, d, rate, &outs, sent);
    f.measured = measured;
    f.home_link_estimate_bytes_per_s = link_estimate;
    // What the home believed of the link before any transfer: its first auction's figure (the
    // probes may not have reported yet when the run started), else the reading at the start.
    f.home_link_estimate_start_bytes_per_s =
        first_auction_bandwidth(&auctions).unwrap_or(start_estimate);
    f.auctions = auctions;
    eprintln!(
        "  {label}: {}/{} ok, {:.3} req/s, TTFT P50 {:.2} s, offload {:.2}",
        f.completed, f.requests, f.throughput_req_per_s, f.ttft_p50_s, f.offload_fraction
    );
    Ok(f)
}

/// What every node measured of itself (`/mesh` `measured`, node order), the home's link
/// estimate towards the peer that prefills its model (NaN without one) and its recent auctions.
async fn measured_state(
    nodes: &Nodes,
) -> anyhow::Result<(Vec<MeasuredProfile>, f64, serde_json::Value)> {
    let mut measured = Vec::with_capacity(nodes.urls.len());
    let mut estimate = f64::NAN;
    let mut auctions = serde_json::Value::Null;
    for (i, url) in nodes.urls.iter().enumerate() {
        let v = client::get_json(&format!("{url}/mesh"))
            .await
            .with_context(|| format!("reading node {i}'s /mesh"))?;
        measured.push(
            serde_json::from_value(v["measured"].clone())
                .with_context(|| format!("node {i}'s /mesh has no measured profile"))?,
        );
        if i == 0 {
            auctions = v["recent_auctions"].clone();
            estimate = link_estimate(&v);
        }
    }
    Ok((measured, estimate, auctions))
}

/// One overlap cell (link rate × prompt length): `reps` remote/local pairs, medians.
#[derive(Debug, Clone, Serialize)]
struct Overlap {
    link_mbit: f64,
    /// Raw TCP goodput on the same link, same run, Mbit/s.
    measured_mbit: f64,
    /// The home node's own estimate of the link to the winner after this rate's transfers
    /// (`/mesh` `bandwidth_bytes_per_s`, the EWMA of its goodput samples), Mbit/s.
    node_estimate_mbit: f64,
    prompt_tokens: usize,
    reps: usize,
    /// Medians over the reps.
    ttft_s: f64,
    /// Award to the whole KV received, as the home timed it (`ttft_s` minus this is the
    /// auction, the home's checks of the KV and its first decode step).
    transfer_s: f64,
    prefill_s: f64,
    kv_bytes: u64,
    whole_kv_s: f64,
    last_piece_s: f64,
    /// Median of the per-pair TTFT / max(prefill + last piece, whole-KV transfer); goal ≤ 1.10.
    ratio: f64,
    /// Every pair's ratio, in run order.
    ratios: Vec<f64>,
}

fn median(v: &[f64]) -> f64 {
    let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

/// A node's estimate of its link to the peer that prefills its model, from its `/mesh`
/// (bytes/s; NaN without one).
fn link_estimate(mesh: &serde_json::Value) -> f64 {
    mesh["peers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["prefills_our_model"].as_bool() == Some(true))
        .filter_map(|p| p["bandwidth_bytes_per_s"].as_f64())
        .find(|b| *b > 0.0)
        .unwrap_or(f64::NAN)
}

/// The home's (node 0's) estimate of its link to its one prefill peer, bytes/s.
async fn home_link_estimate(url: &str) -> f64 {
    match client::get_json(&format!("{url}/mesh")).await {
        Ok(v) => link_estimate(&v),
        Err(_) => f64::NAN,
    }
}

/// Goodput of a raw TCP transfer from node 1 to node 0 (the KV direction), Mbit/s.
fn raw_tcp_mbit(topo: &Topology, mbit: f64, dir: &Path) -> anyhow::Result<f64> {
    let exe = std::env::current_exe()?;
    let addr_file = dir.join("tcp-addr");
    let _ = std::fs::remove_file(&addr_file);
    let mut server = ChildGuard(
        topo.command(0, "0", &exe)
            .args(["bench", "mesh", "--tcp-serve"])
            .arg(format!("{}:0", topo.addr(0)))
            .arg("--addr-file")
            .arg(&addr_file)
            .stdout(std::process::Stdio::null())
            .spawn()?,
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let addr = loop {
        if let Ok(a) = std::fs::read_to_string(&addr_file) {
            if !a.trim().is_empty() {
                break a.trim().to_owned();
            }
        }
        anyhow::ensure!(server.exited().is_none(), "raw TCP receiver exited");
        anyhow::ensure!(Instant::now() < deadline, "raw TCP receiver did not start");
        std::thread::sleep(Duration::from_millis(50));
    };
    // About three seconds of the link.
    let mib = ((mbit * 3.0 / 8.0) as u64).clamp(4, 512);
    let out = topo
        .command(1, "1", &exe)
        .args(["bench", "mesh", "--tcp-send", &addr, "--kv-mib"])
        .arg(mib.to_string())
        .arg("--rate-mbit")
        .arg(mbit.to_string())
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "raw TCP sender failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let _ = server.0.wait();
    let _ = std::fs::remove_file(&addr_file);
    v["goodput_mbit"]
        .as_f64()
        .context("raw TCP sender printed no goodput_mbit")
}

async fn overlap_runs(
    args: &Args,
    topo: &Topology,
    text: &Text,
    layers: usize,
    context: usize,
    dir: &Path,
) -> anyhow::Result<Vec<Overlap>> {
    // Home: offloads everything longer than 64 tokens; its own bid never wins. Node 1: a `pd`
    // node that serves the home's prefills and, on its own API, local prefills of the same
    // length (the prefill time of the ratio), all on its own core. No prefix cache: every
    // prompt is new work.
    let mut home = node_config(args, topo, 0, &[NodeRole::Pd], false);
    home.policy.offload_threshold_tokens = 64;
    home.policy.adaptive_threshold = false;
    home.policy.reserve_price_factor = 1e6;
    let mut server = node_config(args, topo, 1, &[NodeRole::Pd], false);
    server.policy.offload_threshold_tokens = NEVER_OFFLOAD;
    server.policy.adaptive_threshold = false;
    let chunk = server.engine.prefill_chunk;
    let mut nodes = start_nodes(args, topo, &[home, server], dir, "overlap").await?;
    wait_ready(&mut nodes, 1, dir).await?;
    let params = |n| ChatParams {
        timeout: Duration::from_secs(args.run_timeout_s),
        include_usage: true,
        ..ChatParams::greedy(n)
    };
    let mut rows = Vec::new();
    for (r, &mbit) in args.overlap_mbit.iter().enumerate() {
        for i in 0..topo.node_count() {
            topo.set_rate(i, mbit)?;
        }
        let measured = raw_tcp_mbit(topo, mbit, dir)?;
        let first_row = rows.len();
        for (l, &len) in args.overlap_lengths.iter().enumerate() {
            // Room for the generated tokens and for re-tokenization drift of the cut text.
            let n = len.min(context.saturating_sub(64));
            let (mut ttfts, mut prefills, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
            let mut transfers = Vec::new();
            let (mut kv_bytes, mut prompt_tokens) = (0, n);
            let (mut whole, mut last) = (f64::NAN, f64::NAN);
            for rep in 0..args.overlap_reps.max(1) {
                // Every prompt is new text: nothing is cached anywhere.
                let offset = 7919 * (1 + r * 64 + l * 16 + rep * 2);
                let remote =
                    client::complete(&nodes.urls[0], &text.window(offset, n), &params(2), true)
                        .await?;
                let local = client::complete(
                    &nodes.urls[1],
                    &text.window(offset + 3331, n),
                    &params(1),
                    true,
                )
                .await?;
                let Some(PrefillRoute::Remote {
                    kv_bytes: kb,
                    transfer_s,
                    ..
                }) = remote.prfaas.as_ref().map(|p| p.route.clone())
                else {
                    anyhow::bail!(
                        "overlap request ({n} tokens, {mbit} Mbit/s) was not offloaded: {:?}",
                        remote.prfaas.map(|p| p.route)
                    );
                };
                kv_bytes = kb;
                prompt_tokens = remote.usage.map_or(n, |u| u.prompt_tokens);
                // Both as the nodes time them (admission → first token), so the prompt's upload
                // and a first token that is an incomplete UTF-8 character count the same on both
                // sides.
                let ttft = remote
                    .prfaas
                    .as_ref()
                    .map_or(f64::NAN, |p| p.timings.ttft_s);
                let prefill = local.prfaas.as_ref().map_or(f64::NAN, |p| p.timings.ttft_s);
                let rate = measured * 1e6 / 8.0;
                whole = kv_bytes as f64 / rate;
                // The last piece: one layer's KV of the last prefill chunk.
                let last_tokens = chunk.min(prompt_tokens).max(1);
                last = kv_bytes as f64 / layers.max(1) as f64 * last_tokens as f64
                    / prompt_tokens.max(1) as f64
                    / rate;
                let ratio = ttft / (prefill + last).max(whole);
                eprintln!(
                    "  overlap {mbit} Mbit/s (raw TCP {measured:.1}), {prompt_tokens} tokens, rep {}: TTFT {ttft:.2} s (KV in at {transfer_s:.2} s), prefill {prefill:.2} s, whole KV {whole:.2} s → {ratio:.3}",
                    rep + 1
                );
                ttfts.push(ttft);
                transfers.push(transfer_s);
                prefills.push(prefill);
                ratios.push(ratio);
            }
            rows.push(Overlap {
                link_mbit: mbit,
                measured_mbit: measured,
                node_estimate_mbit: f64::NAN,
                prompt_tokens,
                reps: ratios.len(),
                ttft_s: median(&ttfts),
                transfer_s: median(&transfers),
                prefill_s: median(&prefills),
                kv_bytes,
                whole_kv_s: whole,
                last_piece_s: last,
                ratio: median(&ratios),
                ratios,
            });
        }
        // What the node believes the link is, after this rate's transfers and probes.
        let estimate = home_link_estimate(&nodes.urls[0]).await * 8.0 / 1e6;
        eprintln!(
            "  node 0's estimate of the {mbit} Mbit/s link: {estimate:.1} Mbit/s (raw TCP {measured:.1})"
        );
        for row in &mut rows[first_row..] {
            row.node_estimate_mbit = estimate;
        }
    }
    Ok(rows)
}

// ---- simulator vs reality ----

/// Prefix tokens per prefix group as the caches held them: the most any request of the group was
/// served from a cache, over every run. Groups `0..systems` are the shared system prompts; group
/// `systems` is the requests without one, which still share the chat template's own head
/// (SmolLM2's template adds a default system prompt: one 16-token block that each such request
/// after the first found cached). Leaving that group out made a replay send a 262-token prompt
/// remote that its home had kept (246 uncached tokens ≤ t = 256).
fn prefix_groups(
    systems: usize,
    seen: impl IntoIterator<Item = (Option<usize>, usize)>,
) -> Vec<usize> {
    let mut tokens = vec![0usize; systems + 1];
    for (system, cached) in seen {
        let g = system.unwrap_or(systems);
        tokens[g] = tokens[g].max(cached);
    }
    tokens
}

/// The link estimate a home scored its first recorded auction's remote bids with (bytes/s),
/// when the record holds the run's first auction (fewer than the node keeps).
fn first_auction_bandwidth(auctions: &serde_json::Value) -> Option<f64> {
    let all = auctions.as_array()?;
    if all.len() >= prfaas_node::actors::core::RECENT_AUCTIONS {
        return None;
    }
    all.iter()
        .flat_map(|a| a["bids"].as_array().into_iter().flatten())
        .filter(|b| b["bidder"].as_str() != Some("local"))
        .filter_map(|b| b["bandwidth"].as_f64())
        .find(|b| *b > 0.0)
}

/// Relative score gap under which an auction counts as a near tie.
const NEAR_TIE: f64 = 0.02;

/// Of the home's recorded auctions with at least two bids, how many its best two bids'
/// scores separated by less than `gap` (relative), and how many there were.
fn near_ties(auctions: &serde_json::Value, gap: f64) -> (usize, usize) {
    let mut ties = 0;
    let mut n = 0;
    for a in auctions.as_array().into_iter().flatten() {
        let mut scores: Vec<f64> = a["bids"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|b| b["score"].as_f64())
            .filter(|s| s.is_finite())
            .collect();
        if scores.len() < 2 {
            continue;
        }
        scores.sort_by(f64::total_cmp);
        n += 1;
        if scores[1] - scores[0] < gap * scores[0].abs().max(1e-12) {
            ties += 1;
        }
    }
    (ties, n)
}

/// What the simulator needs to replay each load run: the trace as the homes counted it, the
/// profiles every node measured of itself, the link and the home's policy.
fn replay_records(
    args: &Args,
    topo: &Topology,
    trace: &Trace,
    load: &[LoadFigures],
    layers: usize,
) -> Vec<ReplayRecord> {
    let template_head = trace.systems.len();
    let prefix_tokens = prefix_groups(
        template_head,
        load.iter().flat_map(|f| {
            f.outcomes
                .iter()
                .zip(&trace.requests)
                .map(|(o, r)| (r.system, o.cached_tokens))
        }),
    );
    load.iter()
        .map(|f| {
            let requests = trace
                .requests
                .iter()
                .zip(&f.outcomes)
                .map(|(r, o)| ReplayRequest {
                    arrival_s: r.at_unit_s / f.offered_req_per_s,
                    prompt_tokens: o.prompt_tokens as f64,
                    prefix: Some(r.system.unwrap_or(template_head))
                        .filter(|&g| prefix_tokens[g] > 0)
                        .map(|g| (g as u32, prefix_tokens[g] as f64)),
                })
                .collect();
            let home = &deployment_configs(args, topo, f.deployment)[0];
            let p = &home.policy;
            let link = if f.home_link_estimate_bytes_per_s > 0.0 {
                f.home_link_estimate_bytes_per_s
            } else {
                args.link_mbit * 1e6 / 8.0
            };
            ReplayRecord {
                input: ReplayInput {
                    deployment: match f.deployment {
                        Deployment::Homogeneous => ReplayDeployment::Homogeneous,
                        Deployment::Naive => ReplayDeployment::Naive,
                        Deployment::Auction => ReplayDeployment::Auction,
                    },
                    requests,
                    output_tokens: args.max_tokens as u32,
                    nodes: f.measured.clone(),
                    link_bytes_per_s: link,
                    link_estimate_start_bytes_per_s: Some(f.home_link_estimate_start_bytes_per_s)
                        .filter(|b| *b > 0.0),
                    latency_s: 0.0,
                    kv_layers: layers as u32,
                    prefix_cache_groups: prefix_tokens.len(),
                    policy: ReplayPolicy {
                        threshold_tokens: p.offload_threshold_tokens as f64,
                        adaptive_threshold: p.adaptive_threshold,
                        price_per_1k_tokens: p.price_per_1k_tokens,
                        queue_premium_per_s: p.queue_premium_per_s,
                        reserve_price_factor: p.reserve_price_factor,
                        lambda_per_s: p.lambda_per_s,
                        top_k: p.auction_top_k,
                    },
                },
                measured: RunFigures {
                    throughput_req_per_s: f.throughput_req_per_s,
                    ttft_p50_s: f.ttft_p50_s,
                    ttft_p90_s: f.ttft_p90_s,
                    offload_fraction: f.offload_fraction,
                    ttft_by_request: f
                        .outcomes
                        .iter()
                        .map(|o| if o.ok { o.ttft_s } else { f64::NAN })
                        .collect(),
                    remote_by_request: f.outcomes.iter().map(|o| o.remote).collect(),
                },
            }
        })
        .collect()
}

// ---- report --------------------------------------------------------------------------------

fn table(args: &Args, load: &[LoadFigures], overlap: &[Overlap]) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "bench e2e · {}{} · 2 node processes, one core each (cores {:?}), uplinks {} Mbit/s (tbf) · SLO: TTFT ≤ {} s and mean ITL ≤ {} s",
        args.model,
        if args.global_attention { " (every window widened: global attention, dense KV)" } else { "" },
        args.cores, args.link_mbit, args.slo_ttft_s, args.slo_itl_s
    );
    if !load.is_empty() {
        let _ = writeln!(
            s,
            "{:<12} {:>7} {:>6} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>7} {:>12} {:>12}",
            "deployment",
            "offered",
            "ok",
            "req/s",
            "tok/s",
            "TTFT50",
            "TTFT90",
            "ITL50",
            "ITL99",
            "goodput",
            "offload",
            "egress n0 MB",
            "egress n1 MB"
        );
        for f in load {
            let _ = writeln!(
                s,
                "{:<12} {:>7.3} {:>3}/{:<2} {:>8.3} {:>8.2} {:>8.2} {:>8.2} {:>8.3} {:>8.3} {:>8.3} {:>7.2} {:>12.2} {:>12.2}",
                format!("{:?}", f.deployment).to_lowercase(),
                f.offered_req_per_s,
                f.completed,
                f.requests,
                f.throughput_req_per_s,
                f.throughput_tokens_per_s,
                f.ttft_p50_s,
                f.ttft_p90_s,
                f.itl_p50_s,
                f.itl_p99_s,
                f.goodput_req_per_s,
                f.offload_fraction,
                f.egress_bytes.first().copied().unwrap_or(0) as f64 / 1e6,
                f.egress_bytes.get(1).copied().unwrap_or(0) as f64 / 1e6,
            );
            if f.deployment != Deployment::Homogeneous && !f.local_reasons.is_empty() {
                let _ = writeln!(s, "{:>12} kept local: {:?}", "", f.local_reasons);
            }
        }
    }
    if !overlap.is_empty() {
        let _ = writeln!(
            s,
            "overlap: TTFT / max(prefill + last piece, whole-KV transfer), median of the reps  (goal ≤ 1.10); node est = the home's own link estimate"
        );
        let _ = writeln!(
            s,
            "{:>6} {:>9} {:>9} {:>7} {:>8} {:>8} {:>9} {:>10} {:>9} {:>9} {:>7}  each rep",
            "Mbit/s",
            "raw TCP",
            "node est",
            "tokens",
            "TTFT s",
            "KV in s",
            "prefill",
            "KV MB",
            "whole s",
            "last s",
            "ratio",
        );
        for o in overlap {
            let _ = writeln!(
                s,
                "{:>6} {:>9.1} {:>9.1} {:>7} {:>8.2} {:>8.2} {:>9.2} {:>10.1} {:>9.2} {:>9.3} {:>7.3}  {:.3?}",
                o.link_mbit,
                o.measured_mbit,
                o.node_estimate_mbit,
                o.prompt_tokens,
                o.ttft_s,
                o.transfer_s,
                o.prefill_s,
                o.kv_bytes as f64 / 1e6,
                o.whole_kv_s,
                o.last_piece_s,
                o.ratio,
                o.ratios
            );
        }
    }
    s
}

fn write_charts(dir: &Path, load: &[LoadFigures]) -> anyhow::Result<()> {
    use prfaas_mesh::sim::report::{cdf_svg, lines_svg};
    let Some(top) = load
        .iter()
        .map(|f| f.offered_req_per_s)
        .max_by(f64::total_cmp)
    else {
        return Ok(());
    };
    let cdf: Vec<(String, Vec<f64>)> = load
        .iter()
        .filter(|f| f.offered_req_per_s == top)
        .map(|f| {
            (
                format!("{:?}", f.deployment).to_lowercase(),
                f.ttfts.clone(),
            )
        })
        .collect();
    std::fs::write(
        dir.join("ttft_cdf.svg"),
        cdf_svg(
            &format!("TTFT CDF per deployment at {top} req/s offered"),
            "TTFT (s)",
            &cdf,
        ),
    )?;
    let lines: Vec<(String, Vec<(f64, f64)>)> = DEPLOYMENTS
        .iter()
        .map(|d| {
            (
                format!("{d:?}").to_lowercase(),
                load.iter()
                    .filter(|f| f.deployment == *d)
                    .map(|f| (f.offered_req_per_s, f.throughput_req_per_s))
                    .collect(),
            )
        })
        .collect();
    std::fs::write(
        dir.join("throughput_vs_load.svg"),
        lines_svg(
            "Throughput vs offered load",
            "offered load (requests/s)",
            "completed requests/s",
            &lines,
        ),
    )?;
    Ok(())
}

// ---- entry ---------------------------------------------------------------------------------

pub fn run(args: Args) -> anyhow::Result<()> {
    if let Some(why) = super::netns::unavailable() {
        anyhow::bail!("bench e2e runs node processes in network namespaces: {why}");
    }
    anyhow::ensure!(!args.rates.is_empty(), "--rates needs at least one value");
    anyhow::ensure!(
        args.rates.iter().all(|r| *r > 0.0 && r.is_finite()),
        "--rates must be positive"
    );
    anyhow::ensure!(args.requests > 0, "--requests must be positive");
    let bundle = load_model(&args.model)?;
    let context = bundle.config.max_context;
    let layers = bundle.config.n_layers();
    let text = Text::new(bundle.text.codec.clone())?;
    drop(bundle);
    let mut slug: String = Path::new(&args.model)
        .file_stem()
        .map_or("model".into(), |s| s.to_string_lossy().into_owned());
    if args.global_attention {
        slug.push_str("-global");
    }
    let dir = args.out.join(slug);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let topo = Topology::create("bench", &[args.link_mbit, args.link_mbit])?;
    let trace = make_trace(&args, &text, context);

    // The client and the orchestration run on a thread that lives in the hub namespace; the
    // topology stays owned here, so it is removed however that thread ends.
    let (load, overlap) = std::thread::scope(|s| {
        s.spawn(|| -> anyhow::Result<_> {
            topo.enter_hub()?;
            actix_rt::System::new().block_on(async {
                let mut load = Vec::new();
                if !args.no_load {
                    for &rate in &args.rates {
                        for d in DEPLOYMENTS {
                            load.push(load_run(&args, &topo, &trace, d, rate, &dir).await?);
                        }
                    }
                }
                let mut overlap = Vec::new();
                if !args.no_overlap {
                    overlap = overlap_runs(&args, &topo, &text, layers, context, &dir).await?;
                }
                anyhow::Ok((load, overlap))
            })
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the bench thread panicked"))?
    })?;
    // The simulator over the same trace with what the nodes measured, run by run.
    let records = replay_records(&args, &topo, &trace, &load, layers);
    drop(topo);
    let mut sim_vs_real = Vec::with_capacity(records.len());
    for (f, rec) in load.iter().zip(&records) {
        let label = format!("{:?}-{}", f.deployment, f.offered_req_per_s).to_lowercase();
        let path = dir.join(format!("replay-{label}.json"));
        std::fs::write(&path, serde_json::to_string_pretty(rec)?)
            .with_context(|| format!("writing {}", path.display()))?;
        sim_vs_real
            .push(replay::compare(rec).with_context(|| format!("simulating the {label} run"))?);
    }

    let mut tab = table(&args, &load, &overlap);
    if !sim_vs_real.is_empty() {
        tab.push_str(&replay::comparison_table(&sim_vs_real));
        for f in load.iter().filter(|f| f.auctions.is_array()) {
            let (ties, n) = near_ties(&f.auctions, NEAR_TIE);
            if n > 0 {
                tab.push_str(&format!(
                    "  {:<10} auctions decided by under {:.0}% of the score: {ties} of {n} \
                     (a placement there turns on details no model keeps)\n",
                    format!("{:?}", f.deployment).to_lowercase(),
                    NEAR_TIE * 100.0
                ));
            }
        }
    }
    let report = json!({
        "model": args.model,
        "global_attention": args.global_attention,
        "backend": args.backend.to_string(),
        "machine": {
            "cores": std::thread::available_parallelism().map_or(0, |n| n.get()),
            "node_cores": args.cores,
        },
        "unix_time": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        "link_mbit": args.link_mbit,
        "requests": args.requests,
        "max_tokens": args.max_tokens,
        "slo": {"ttft_s": args.slo_ttft_s, "mean_itl_s": args.slo_itl_s},
        "load": load,
        "overlap": overlap,
        "overlap_goal": 1.10,
        "sim_vs_real": sim_vs_real,
        "sim_vs_real_goal": 0.15,
    });
    std::fs::write(
        dir.join("report.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    std::fs::write(dir.join("table.txt"), &tab)?;
    write_charts(&dir, &load)?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{tab}");
        println!("(tables, charts and JSON in {})", dir.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{first_auction_bandwidth, near_ties, prefix_groups};

    #[test]
    fn the_first_remote_bid_gives_the_link_belief_before_any_transfer() {
        let a = serde_json::json!([
            {"bids": [{"bidder": "local", "bandwidth": 0.0}]},
            {"bids": [{"bidder": "local", "bandwidth": 0.0}, {"bidder": "12D3", "bandwidth": 11.4e6}]},
            {"bids": [{"bidder": "12D3", "bandwidth": 12.0e6}]},
        ]);
        assert_eq!(first_auction_bandwidth(&a), Some(11.4e6));
        let full = serde_json::Value::Array(vec![
            a[2].clone();
            prfaas_node::actors::core::RECENT_AUCTIONS
        ]);
        assert_eq!(
            first_auction_bandwidth(&full),
            None,
            "the first may be gone"
        );
        assert_eq!(first_auction_bandwidth(&serde_json::Value::Null), None);
    }

    #[test]
    fn near_ties_count_auctions_whose_best_two_scores_are_close() {
        let a = serde_json::json!([
            {"bids": [{"score": 8.475}, {"score": 8.472}]},
            {"bids": [{"score": 3.144}, {"score": 7.97}]},
            {"bids": [{"score": 1.0}]},
            {"bids": []},
        ]);
        assert_eq!(near_ties(&a, 0.02), (1, 2));
        assert_eq!(near_ties(&serde_json::Value::Null, 0.02), (0, 0));
    }

    #[test]
    fn requests_without_a_system_prompt_form_the_template_group() {
        // Two system prompts; the requests without one found 16 tokens cached (after the
        // first, which found none).
        let seen = [
            (Some(0), 140),
            (None, 0),
            (Some(0), 144),
            (None, 16),
            (Some(1), 0),
            (None, 16),
        ];
        assert_eq!(prefix_groups(2, seen), vec![144, 0, 16]);
    }
}
