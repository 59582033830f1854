//! `prfaas bench node`: the serving path end to end, in one process, ratios from one run.
//!
//! 1. **Overlap.** A decode node offloads long prompts to a prefill node over an emulated link.
//!    Layer-wise streaming should make the remote TTFT close to `prefill time + transfer time
//!    of the last layer` (goal ≤ 1.10×), far below `prefill + transfer of the whole KV`.
//! 2. **Mesh vs local.** The same requests at the same concurrency on (a) three nodes that all
//!    prefill locally and (b) one prefill + two decode nodes with offload: throughput and TTFT
//!    P50/P90. All nodes share this machine's cores, so (b) cannot add compute here; the figure
//!    shows the cost or gain of the mesh path itself.

use std::time::{Duration, Instant};

use anyhow::Context;
use prfaas_kernels::BackendKind;
use prfaas_node::actors::{Node, NodeHandle};
use prfaas_node::config::{NodeConfig, NodeRole};
use prfaas_node::engine::loader::DEFAULT_MODEL;
use prfaas_node::engine::SamplingParams;
use prfaas_node::service::{GenerateEvent, GenerateRequest, PrefillRoute, PromptInput};
use serde_json::json;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// GGUF model or `tiny-hybrid` / `tiny-dense`.
    #[arg(long, default_value = DEFAULT_MODEL)]
    pub model: String,
    /// Backend of every node.
    #[arg(long, default_value = "cpu")]
    pub backend: BackendKind,
    /// Emulated link rate between the nodes, Mbit/s.
    #[arg(long, default_value_t = 1000.0)]
    pub link_mbps: f64,
    /// Long-prompt length in tokens (approximate).
    #[arg(long, default_value_t = 512)]
    pub long_tokens: usize,
    /// Overlap repetitions (median reported).
    #[arg(long, default_value_t = 5)]
    pub reps: usize,
    /// Requests in the load comparison.
    #[arg(long, default_value_t = 12)]
    pub requests: usize,
    /// Requests in flight at once in the load comparison.
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
    /// Generated tokens per request.
    #[arg(long, default_value_t = 16)]
    pub max_tokens: usize,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
}

fn cfg(args: &Args, name: &str, roles: &[NodeRole], bootstrap: Vec<String>) -> NodeConfig {
    let mut c = super::local_node_config(name, roles, &args.model, args.backend, bootstrap);
    // Every prompt is new work: no prefix cache, so repeated measurements stay comparable.
    c.engine.prefix_cache = false;
    c.policy.offload_threshold_tokens = 256;
    // The overlap figure needs every long prompt offloaded: a home adapting `t` to what it
    // measures (a slow emulated link) would start keeping them.
    c.policy.adaptive_threshold = false;
    c
}

async fn wait_prefillers(home: &NodeHandle, want: usize) -> anyhow::Result<()> {
    home.wait_for_prefillers(want, Duration::from_secs(30))
        .await
        .map_err(|seen| anyhow::anyhow!("mesh did not converge ({seen}/{want} prefill peers)"))
}

/// A distinct prompt of about `tokens` tokens.
fn prompt(i: usize, tokens: usize) -> String {
    let words = [
        "prefill",
        "decode",
        "mesh",
        "auction",
        "bandwidth",
        "layer",
        "stream",
        "cache",
        "node",
        "token",
        "region",
        "price",
    ];
    let mut s = format!("Document {i}:");
    for k in 0..tokens {
        s.push(' ');
        s.push_str(words[(i * 7 + k * 5 + k / 3) % words.len()]);
    }
    s
}

struct Done {
    ttft: f64,
    route: PrefillRoute,
}

async fn run(node: &NodeHandle, text: String, max_tokens: usize) -> anyhow::Result<Done> {
    let req = GenerateRequest {
        request_id: None,
        prompt: PromptInput::Text(text),
        max_tokens: Some(max_tokens),
        sampling: SamplingParams::greedy(max_tokens),
        stop: vec![],
        stream: true,
    };
    let mut rx = node.submit(req).await?;
    let mut route = None;
    loop {
        match rx.recv().await.context("event stream ended early")? {
            GenerateEvent::Started { route: r, .. } => route = Some(r),
            GenerateEvent::Finished { timings, .. } => {
                return Ok(Done {
                    ttft: timings.ttft_s,
                    route: route.context("no Started event")?,
                })
            }
            GenerateEvent::Failed { message } => anyhow::bail!("request failed: {message}"),
            GenerateEvent::Delta { .. } => {}
        }
    }
}

/// Prefill of `text` on `node` alone (no network): the `T_prefill` of the overlap ratio.
async fn local_prefill_s(node: &NodeHandle, text: &str) -> anyhow::Result<f64> {
    let tokens = node.core.text.codec.encode(text, false)?;
    let served = node
        .core
        .compute
        .prefill_and_discard(tokens)
        .await
        .map_err(|e| anyhow::anyhow!(e))?;
    Ok(served.elapsed.as_secs_f64())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// The `p` quantile (nearest rank) of `v`; NaN when empty.
pub fn percentile(mut v: Vec<f64>, p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    v[((v.len() - 1) as f64 * p).round() as usize]
}

pub fn run_cmd(args: Args) -> anyhow::Result<()> {
    actix_rt::System::new().block_on(bench(args))
}

async fn bench(args: Args) -> anyhow::Result<()> {
    let rate = args.link_mbps * 1e6 / 8.0;
    // ---- 1. overlap -------------------------------------------------------------------
    let mut pcfg = cfg(&args, "prefill", &[NodeRole::Prefill], vec![]);
    pcfg.policy.max_served_prefills = 1;
    let p = Node::start(pcfg, None).await?;
    let mut hcfg = cfg(
        &args,
        "home",
        &[NodeRole::Decode],
        super::mesh_addrs(&p).await,
    );
    hcfg.policy.reserve_price_factor = 1e6;
    let h = Node::start(hcfg, None).await?;
    wait_prefillers(&h, 1).await?;
    h.core.mesh.set_emulated_bandwidth(p.peer_id(), Some(rate));
    p.core.mesh.set_emulated_bandwidth(h.peer_id(), Some(rate));
    let layout = &h.core.layout;
    let mut rows = Vec::new();
    for r in 0..args.reps {
        let text = prompt(1000 + r, args.long_tokens);
        let n = h.core.text.codec.encode(&text, false)?.len();
        let done = run(&h, text, 1).await?;
        let PrefillRoute::Remote {
            transfer_s,
            kv_bytes,
            ..
        } = done.route
        else {
            anyhow::bail!("overlap run {r} was not offloaded: {:?}", done.route);
        };
        let t_prefill = local_prefill_s(&p, &prompt(2000 + r, args.long_tokens)).await?;
        // The last piece: the last layer's rows of the last prefill chunk (at most a chunk).
        let chunk = h.core.cfg.engine.prefill_chunk.max(1);
        let last_rows = n - (n - 1) / chunk * chunk;
        let last = layout.piece_bytes(layout.layers.len() - 1, last_rows) as f64 / rate;
        let whole = kv_bytes as f64 / rate;
        rows.push((done.ttft, t_prefill, last, whole, transfer_s, n, kv_bytes));
        eprintln!(
            "  overlap rep {r}: {n} tokens, TTFT {:.3} s, prefill {:.3} s, last layer {:.4} s, whole KV {:.3} s",
            done.ttft, t_prefill, last, whole
        );
    }
    let ratio = median(rows.iter().map(|x| x.0 / (x.1 + x.2)).collect());
    let ratio_serial = median(rows.iter().map(|x| x.0 / (x.1 + x.3)).collect());
    // No schedule beats both the prefill plus the last layer's transfer and the whole KV's
    // transfer; when the link is slower than the prefill, the second is the bound.
    let ratio_bound = median(rows.iter().map(|x| x.0 / (x.1 + x.2).max(x.3)).collect());
    let (ttft, tpre) = (
        median(rows.iter().map(|x| x.0).collect()),
        median(rows.iter().map(|x| x.1).collect()),
    );
    h.shutdown().await;
    p.shutdown().await;

    // ---- 2. mesh vs all-local ----------------------------------------------------------
    let reqs: Vec<String> = (0..args.requests)
        .map(|i| {
            if i % 2 == 0 {
                prompt(3000 + i, 24)
            } else {
                prompt(3000 + i, args.long_tokens)
            }
        })
        .collect();
    let mut results = Vec::new();
    for mesh in [false, true] {
        let homes: Vec<NodeHandle>;
        let mut others = Vec::new();
        if mesh {
            let p = Node::start(cfg(&args, "prefill", &[NodeRole::Prefill], vec![]), None).await?;
            let boot = super::mesh_addrs(&p).await;
            let mut hs = Vec::new();
            for name in ["decode-a", "decode-b"] {
                hs.push(
                    Node::start(cfg(&args, name, &[NodeRole::Decode], boot.clone()), None).await?,
                );
            }
            for hn in &hs {
                wait_prefillers(hn, 1).await?;
                hn.core.mesh.set_emulated_bandwidth(p.peer_id(), Some(rate));
                p.core.mesh.set_emulated_bandwidth(hn.peer_id(), Some(rate));
            }
            others.push(p);
            homes = hs;
        } else {
            let mut hs = Vec::new();
            for name in ["pd-a", "pd-b", "pd-c"] {
                let mut c = cfg(&args, name, &[NodeRole::Pd], vec![]);
                c.policy.offload_threshold_tokens = usize::MAX;
                hs.push(Node::start(c, None).await?);
            }
            homes = hs;
        }
        let t0 = Instant::now();
        let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(args.concurrency.max(1)));
        let mut tasks = Vec::new();
        for (i, text) in reqs.iter().enumerate() {
            let home = homes[i % homes.len()].clone();
            let sem = sem.clone();
            let text = text.clone();
            let max = args.max_tokens;
            tasks.push(async move {
                let _permit = sem.acquire().await;
                run(&home, text, max).await
            });
        }
        let done = futures::future::join_all(tasks).await;
        let wall = t0.elapsed().as_secs_f64();
        let mut ttfts = Vec::new();
        let mut remote = 0;
        for d in done {
            let d = d?;
            remote += usize::from(matches!(d.route, PrefillRoute::Remote { .. }));
            ttfts.push(d.ttft);
        }
        results.push((
            mesh,
            args.requests as f64 / wall,
            percentile(ttfts.clone(), 0.5),
            percentile(ttfts, 0.9),
            remote,
        ));
        for n in homes.iter().chain(others.iter()) {
            n.shutdown().await;
        }
    }
    let (local, mesh) = (&results[0], &results[1]);
    if args.json {
        println!(
            "{}",
            json!({
                "model": args.model, "link_mbps": args.link_mbps, "long_tokens": args.long_tokens,
                "overlap": {"ttft_s": ttft, "prefill_s": tpre, "ratio_vs_prefill_plus_last_layer": ratio,
                            "ratio_vs_prefill_plus_whole_kv": ratio_serial,
                            "ratio_vs_lower_bound": ratio_bound},
                "load": {"requests": args.requests, "concurrency": args.concurrency,
                         "local": {"req_per_s": local.1, "ttft_p50": local.2, "ttft_p90": local.3},
                         "mesh": {"req_per_s": mesh.1, "ttft_p50": mesh.2, "ttft_p90": mesh.3, "offloaded": mesh.4},
                         "throughput_ratio": mesh.1 / local.1}
            })
        );
    } else {
        println!(
            "bench node · {} · link {} Mbit/s · long prompts ≈{} tokens",
            args.model, args.link_mbps, args.long_tokens
        );
        println!(
            "overlap (median of {}): remote TTFT {ttft:.3} s, prefill {tpre:.3} s",
            args.reps
        );
        println!("  TTFT / (prefill + last-layer transfer) = {ratio:.3}   (goal ≤ 1.10)");
        println!("  TTFT / (prefill + whole-KV transfer)   = {ratio_serial:.3}   (what no pipelining would cost)");
        println!(
            "  TTFT / max(prefill + last layer, whole-KV transfer) = {ratio_bound:.3}   (1.0 = perfect overlap; the whole-KV term rules when the link is slower than prefill)"
        );
        println!(
            "load: {} requests, {} in flight",
            args.requests, args.concurrency
        );
        println!(
            "  3 nodes, all local  : {:.3} req/s, TTFT P50 {:.3} s P90 {:.3} s",
            local.1, local.2, local.3
        );
        println!(
            "  1 prefill + 2 decode: {:.3} req/s, TTFT P50 {:.3} s P90 {:.3} s ({} offloaded)",
            mesh.1, mesh.2, mesh.3, mesh.4
        );
        println!("  mesh / local throughput = {:.3}", mesh.1 / local.1);
    }
    Ok(())
}
