//! A three-node mesh embedded as a library: one prefill node, two decode nodes, one request.
//!
//! ```sh
//! cargo run --release --example local_mesh
//! ```
//!
//! Every node is an actix actor system with its own engine, libp2p swarm (loopback, port 0) and
//! OpenAI-compatible HTTP API. The example waits until the decode node sees the prefill node's
//! advert, sends one long chat request over HTTP (long enough to be offloaded), prints where it
//! was prefilled and the answer, then stops the nodes gracefully.
//!
//! It uses the default model (`models/SmolLM2-135M-Instruct.Q4_1.gguf`, fetched by
//! `scripts/fetch-model`) when present, else the built-in synthetic `tiny-hybrid` model (and says
//! so): the mesh, the auction and the KV transfer are the same, only the answer is gibberish.

use std::time::Duration;

use prfaas_kernels::BackendKind;
use prfaas_mesh::MeshConfig;
use prfaas_node::actors::{node::http_api, Node, NodeHandle};
use prfaas_node::api::client::{self, ChatParams};
use prfaas_node::config::{NodeConfig, NodeRole};
use prfaas_node::engine::chat::ChatMessage;
use prfaas_node::engine::loader::DEFAULT_MODEL;
use prfaas_node::service::PrefillRoute;

/// One node on loopback with port 0 everywhere.
fn config(name: &str, role: NodeRole, model: &str, bootstrap: Vec<String>) -> NodeConfig {
    let mut c = NodeConfig::default();
    c.node.name = name.into();
    c.node.roles = vec![role];
    c.node.model = model.into();
    c.node.backend = BackendKind::Cpu;
    c.api.listen = "127.0.0.1:0".parse().expect("a literal address");
    c.engine.kv_capacity_tokens = 4096;
    // Offload every prompt longer than 64 tokens, whatever this machine's speed.
    c.policy.offload_threshold_tokens = 64;
    c.policy.adaptive_threshold = false;
    c.policy.reserve_price_factor = 1e6;
    c.policy.auction_deadline = Duration::from_secs(2);
    c.mesh = MeshConfig::local();
    c.mesh.bootstrap = bootstrap;
    c
}

async fn bootstrap_addrs(n: &NodeHandle) -> Vec<String> {
    n.mesh_addrs()
        .await
        .iter()
        .map(ToString::to_string)
        .collect()
}

async fn run() -> anyhow::Result<()> {
    let model = if std::path::Path::new(DEFAULT_MODEL).exists() {
        DEFAULT_MODEL
    } else {
        eprintln!(
            "{DEFAULT_MODEL} is missing (scripts/fetch-model fetches it): using the synthetic \
             `tiny-hybrid` model, whose answers are not text"
        );
        "tiny-hybrid"
    };
    let prefill = Node::start(
        config("prefill", NodeRole::Prefill, model, vec![]),
        Some(http_api),
    )
    .await?;
    let boot = bootstrap_addrs(&prefill).await;
    let decode_a = Node::start(
        config("decode-a", NodeRole::Decode, model, boot.clone()),
        Some(http_api),
    )
    .await?;
    let decode_b = Node::start(
        config("decode-b", NodeRole::Decode, model, boot),
        Some(http_api),
    )
    .await?;
    for home in [&decode_a, &decode_b] {
        home.wait_for_prefillers(1, Duration::from_secs(30))
            .await
            .map_err(|seen| anyhow::anyhow!("the decode node saw {seen} prefill peers in 30 s"))?;
    }

    let api = decode_a
        .api_addr
        .ok_or_else(|| anyhow::anyhow!("no HTTP API"))?;
    let question = format!(
        "{} Summarise the text above in one sentence.",
        "A mesh of nodes shares the work of serving a language model. ".repeat(8)
    );
    let answer = client::chat(
        &format!("http://{api}"),
        &[ChatMessage::new("user", question)],
        &ChatParams::greedy(32),
        true,
    )
    .await?;
    match answer.prfaas.map(|p| p.route) {
        Some(PrefillRoute::Remote {
            peer,
            kv_bytes,
            transfer_s,
            ..
        }) => println!(
            "prefilled remotely by {peer}: {kv_bytes} KV bytes in {:.1} ms",
            transfer_s * 1e3
        ),
        Some(PrefillRoute::Local { reason }) => println!("prefilled locally: {reason}"),
        None => println!("the response carried no route"),
    }
    println!("answer: {}", answer.text);
    for n in [decode_a, decode_b, prefill] {
        n.shutdown().await;
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    actix_rt::System::new().block_on(run())
}
