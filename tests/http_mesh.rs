//! The node behind its HTTP API: the official `openai` Python client, and 32 simultaneous
//! requests across a 3-node mesh with no KV block leaked (checked through `/metrics`).

mod common;

use std::time::Duration;

use common::*;
use prfaas_kernels::BackendKind;
use prfaas_node::actors::{Node, NodeHandle};
use prfaas_node::api::client::{self, ChatParams};
use prfaas_node::config::{NodeConfig, NodeRole};
use prfaas_node::engine::chat::ChatMessage;

async fn start_http(cfg: NodeConfig) -> NodeHandle {
    init_logs();
    Node::start(cfg, Some(prfaas_node::actors::node::http_api))
        .await
        .expect("node starts")
}

fn base(n: &NodeHandle) -> String {
    format!("http://{}", n.api_addr.expect("API started"))
}

/// Value of one sample line (`name{labels} value`) in a Prometheus text exposition.
fn sample(metrics: &str, line_start: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[actix_rt::test]
async fn thirty_two_concurrent_requests_across_three_nodes() {
    let model = "tiny-hybrid";
    let p = start_http(node_config("prefill", &[NodeRole::Prefill], model, vec![])).await;
    let boot = addrs_of(&p).await;
    let a = start_http(node_config("a", &[NodeRole::Pd], model, boot.clone())).await;
    let b = start_http(node_config("b", &[NodeRole::Decode], model, boot)).await;
    wait_for_prefillers(&a, 1).await;
    wait_for_prefillers(&b, 1).await;

    let prompts: Vec<String> = (0..32)
        .map(|i| {
            if i % 3 == 0 {
                format!("Short {i}?")
            } else {
                format!(
                    "Request {i}: {}",
                    "a long prompt for the mesh. ".repeat(2 + i % 5)
                )
            }
        })
        .collect();
    let mut reference = Reference::new(model, BackendKind::Cpu);
    let want: Vec<Vec<u32>> = prompts.iter().map(|p| reference.greedy(p, 16)).collect();
    let want_text: Vec<String> = want
        .iter()
        .map(|t| {
            // What the node streams: each token's bytes through the same UTF-8 assembler.
            let mut s = prfaas_node::engine::loader::Utf8Stream::default();
            let mut out: String = t
                .iter()
                .map(|&x| s.push(&u8::try_from(x).map(|b| vec![b]).unwrap_or_default()))
                .collect();
            out.push_str(&s.finish());
            out
        })
        .collect();

    let params = ChatParams::greedy(16);
    let futs = prompts.iter().enumerate().map(|(i, p)| {
        let url = if i % 2 == 0 { base(&a) } else { base(&b) };
        let params = params.clone();
        let msgs = vec![ChatMessage::new("user", p.clone())];
        async move { client::chat(&url, &msgs, &params, i % 4 != 3).await }
    });
    let results = tokio::time::timeout(Duration::from_secs(600), futures::future::join_all(futs))
        .await
        .expect("all 32 finish within 10 minutes");
    let mut remote = 0;
    for (i, r) in results.into_iter().enumerate() {
        let r = r.unwrap_or_else(|e| panic!("request {i}: {e}"));
        assert_eq!(r.text, want_text[i], "request {i}");
        remote += usize::from(matches!(
            r.prfaas.map(|e| e.route),
            Some(prfaas_node::service::PrefillRoute::Remote { .. })
        ));
    }
    assert!(remote >= 10, "only {remote} of 32 were offloaded");
    // A client has its last byte a moment before the node's compute thread has released the
    // sequence and published its counters: poll (bounded) until every node is back to zero.
    for n in [&a, &b, &p] {
        let t0 = std::time::Instant::now();
        loop {
            let m = client::get_text(&format!("{}/metrics", base(n)))
                .await
                .expect("/metrics");
            let settled = ["used", "leased"].iter().all(|kind| {
                sample(&m, &format!("prfaas_kv_blocks{{kind=\"{kind}\"}}")) == Some(0.0)
            }) && sample(&m, "prfaas_inflight_requests") == Some(0.0);
            if settled {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "{}: KV blocks or requests still held 10 s after the burst:\n{m}",
                n.core.cfg.node.name
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    for n in [a, b, p] {
        n.shutdown().await;
    }
}

/// The official `openai` Python package streams a chat completion from a real node.
#[actix_rt::test]
async fn official_openai_client_streams_from_a_node() {
    let has_openai = std::process::Command::new("python3")
        .args(["-c", "import openai"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !has_openai {
        assert!(
            std::env::var("PRFAAS_REQUIRE_OPENAI").as_deref() != Ok("1"),
            "python3 with the openai package is required (PRFAAS_REQUIRE_OPENAI=1)"
        );
        eprintln!("SKIP official_openai_client_streams_from_a_node: `python3 -c 'import openai'` fails (pip install openai)");
        return;
    }
    let model = if smollm2_available("official_openai_client_streams_from_a_node") {
        SMOLLM2
    } else {
        "tiny-hybrid"
    };
    let n = start_http(node_config("solo", &[NodeRole::Pd], model, vec![])).await;
    let url = format!("{}/v1", base(&n));
    let model_id = n.core.info.model_id.clone();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("python3")
            .args(["tests/python/openai_stream.py", &url, &model_id])
            .output()
    })
    .await
    .expect("join")
    .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "openai client failed:\n{stdout}\n{stderr}"
    );
    assert!(!stdout.trim().is_empty());
    n.shutdown().await;
}
