//! The node behind its HTTP API: the official `openai` Python client, and 32 simultaneous
//! requests across a 3-node mesh with no KV block leaked (checked through `/metrics`).

mod common;

use std::time::Duration;

use common::*;
use prfaas_kernels::BackendKind;
use prfaas_node::api::client::{self, ChatParams};
use prfaas_node::config::NodeRole;
use prfaas_node::engine::chat::ChatMessage;

/// Value of the sample `name{labels} value` whose labels include `label` (e.g. `kind="used"`;
/// empty for any) in a Prometheus text exposition.
fn sample(metrics: &str, name: &str, label: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|l| {
            let (series, _) = l.rsplit_once(' ').unwrap_or((l, ""));
            let (n, labels) = series.split_once('{').unwrap_or((series, ""));
            n == name && labels.contains(label)
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[actix_rt::test]
async fn thirty_two_concurrent_requests_across_three_nodes() {
    let model = "tiny-hybrid";
    let mut pc = node_config("prefill", &[NodeRole::Prefill], model, vec![]);
    // Awards beyond this are refused at award time (and prefilled at home): let the prefill
    // node take most of the ~21 long prompts that arrive at once.
    pc.policy.max_served_prefills = 24;
    let p = start_http(pc).await;
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
    // Why the others stayed local, for the failure message (the planner's reason per request).
    let mut local = std::collections::BTreeMap::<String, usize>::new();
    for (i, r) in results.into_iter().enumerate() {
        let r = r.unwrap_or_else(|e| panic!("request {i}: {e}"));
        assert_eq!(r.text, want_text[i], "request {i}");
        match r.prfaas.map(|e| e.route) {
            Some(prfaas_node::service::PrefillRoute::Remote { .. }) => remote += 1,
            Some(prfaas_node::service::PrefillRoute::Local { reason }) => {
                *local.entry(reason).or_default() += 1
            }
            None => *local.entry("no route reported".into()).or_default() += 1,
        }
    }
    assert!(
        remote >= 10,
        "only {remote} of 32 were offloaded; local reasons: {local:?}"
    );
    // A client has its last byte a moment before the node's compute thread has released the
    // sequence and published its counters: poll (bounded) until every node is back to zero.
    for n in [&a, &b, &p] {
        let t0 = std::time::Instant::now();
        loop {
            let m = client::get_text(&format!("{}/metrics", base(n)))
                .await
                .expect("/metrics");
            let settled = ["used", "leased"].iter().all(|kind| {
                sample(&m, "prfaas_kv_blocks", &format!("kind=\"{kind}\"")) == Some(0.0)
            }) && sample(&m, "prfaas_inflight_requests", "") == Some(0.0);
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
    let test = "official_openai_client_streams_from_a_node";
    let model = if smollm2_available(test) {
        SMOLLM2
    } else {
        "tiny-hybrid"
    };
    let n = start_http(node_config("solo", &[NodeRole::Pd], model, vec![])).await;
    let args = vec![format!("{}/v1", base(&n)), n.core.info.model_id.clone()];
    if let Some(out) = python_openai(test, "openai_stream.py", args).await {
        assert!(!out.trim().is_empty());
    }
    n.shutdown().await;
}

/// Runs `tests/python/SCRIPT ARGS…` with python3; `None` (after saying why) when the `openai`
/// package is missing and `PRFAAS_REQUIRE_OPENAI` is not set.
async fn python_openai(test: &str, script: &str, args: Vec<String>) -> Option<String> {
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
        eprintln!("SKIP {test}: `python3 -c 'import openai'` fails (pip install openai)");
        return None;
    }
    let script = format!("tests/python/{script}");
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("python3")
            .arg(&script)
            .args(&args)
            .output()
    })
    .await
    .expect("join")
    .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "openai client failed:\n{stdout}\n{stderr}"
    );
    Some(stdout)
}

/// Every parameter through the official client on a synthetic model (one token per byte):
/// logprobs, penalties, min_p, logit_bias, seeds, refusals with `param`, context length,
/// `X-Request-Id` (see `tests/python/openai_params.py`).
#[actix_rt::test]
async fn openai_client_parameters() {
    let mut cfg = node_config("solo", &[NodeRole::Pd], "tiny-hybrid", vec![]);
    // A short context keeps the context-length checks cheap.
    cfg.engine.kv_capacity_tokens = 256;
    let n = start_http(cfg).await;
    let args = vec![
        format!("{}/v1", base(&n)),
        n.core.info.model_id.clone(),
        n.core.info.max_context.to_string(),
    ];
    let out = python_openai("openai_client_parameters", "openai_params.py", args).await;
    if let Some(out) = out {
        assert!(out.contains("refused tools"), "{out}");
        assert!(out.trim_end().ends_with("OK"), "{out}");
    }
    n.shutdown().await;
}

/// `/health`, `/tokenize`, `/detokenize` in llama-server's shapes, and a raw completion prompt
/// tokenized as llama-server does: `<|im_start|>` is one special token, not 7 text tokens.
#[actix_rt::test]
async fn tokenizer_endpoints_and_raw_prompt_specials() {
    if !smollm2_available("tokenizer_endpoints_and_raw_prompt_specials") {
        return;
    }
    let mut cfg = node_config("solo", &[NodeRole::Decode], SMOLLM2, vec![]);
    cfg.engine.kv_capacity_tokens = 512;
    let n = start_http(cfg).await;
    let url = base(&n);
    // (status, JSON body) of a POST.
    let post = |path: &str, body: serde_json::Value| {
        let url = format!("{url}{path}");
        async move {
            match client::post_json(&url, &body).await {
                Ok(v) => (200, v),
                Err(client::ClientError::Status {
                    status, message, ..
                }) => (status, serde_json::Value::String(message)),
                Err(e) => panic!("{url}: {e}"),
            }
        }
    };
    let prompt = "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n";
    let (status, parsed) = post("/tokenize", serde_json::json!({"content": prompt})).await;
    assert_eq!(status, 200, "{parsed}");
    let ids: Vec<u64> = parsed["tokens"]
        .as_array()
        .expect("tokens")
        .iter()
        .filter_map(|v| v.as_u64())
        .collect();
    let (_, plain) = post(
        "/tokenize",
        serde_json::json!({"content": prompt, "parse_special": false}),
    )
    .await;
    let plain_len = plain["tokens"].as_array().map_or(0, Vec::len);
    // <|im_start|> is id 1, <|im_end|> id 2 in SmolLM2's vocabulary.
    assert_eq!(ids.iter().filter(|&&t| t == 1).count(), 2, "{parsed}");
    assert_eq!(ids.iter().filter(|&&t| t == 2).count(), 1, "{parsed}");
    assert!(plain_len > ids.len() + 10, "{plain_len} vs {}", ids.len());
    let (_, pieces) = post(
        "/tokenize",
        serde_json::json!({"content": prompt, "with_pieces": true}),
    )
    .await;
    assert_eq!(pieces["tokens"][0]["id"], 1);
    assert_eq!(pieces["tokens"][0]["piece"], "<|im_start|>");
    let (status, text) = post("/detokenize", serde_json::json!({"tokens": ids})).await;
    assert_eq!((status, text["content"].as_str()), (200, Some(prompt)));
    let (status, err) = post("/detokenize", serde_json::json!({"tokens": [1u64 << 31]})).await;
    assert_eq!(status, 400, "{err}");

    // The raw completion prompt is tokenized the same way (its usage says so).
    let (status, done) = post(
        "/v1/completions",
        serde_json::json!({"prompt": prompt, "max_tokens": 1, "temperature": 0}),
    )
    .await;
    assert_eq!(status, 200, "{done}");
    assert_eq!(done["usage"]["prompt_tokens"], ids.len(), "{done}");

    // Ready, with the missing prefill peer called out; 503 once draining.
    let health = client::get_json(&format!("{url}/health"))
        .await
        .expect("/health");
    assert_eq!(health["status"], "ok");
    assert_eq!(health["prefill_peers"], 0);
    assert!(
        health["warnings"][0]
            .as_str()
            .is_some_and(|w| w.contains("prefill")),
        "{health}"
    );
    let _ = n
        .admission
        .send(prfaas_node::actors::admission::StopAdmitting)
        .await;
    match client::get_json(&format!("{url}/health")).await {
        Err(client::ClientError::Status { status, .. }) => assert_eq!(status, 503),
        other => panic!("a draining node is not ready: {other:?}"),
    }
    n.shutdown().await;
}
