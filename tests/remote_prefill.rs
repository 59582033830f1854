//! The remote-prefill invariant end to end: a prompt prefilled by a peer (KV streamed back over
//! libp2p, layer by layer) decodes to exactly the tokens of a local run (DESIGN.md §5).

mod common;

use common::*;
use prfaas_node::config::NodeRole;

/// Prompts of mixed lengths: short ones stay local (≤ t = 48 tokens), long ones are offloaded.
fn prompts() -> Vec<String> {
    let base = [
        "The quick brown fox jumps over the lazy dog. ",
        "Prefill as a service ships long prompts to compute-dense clusters. ",
        "A mesh of peers gossips adverts and runs small auctions. ",
        "Hybrid attention shrinks the KV cache by an order of magnitude. ",
    ];
    (0..20)
        .map(|i| {
            if i % 4 == 0 {
                return format!("Short {i}: the lazy dog?");
            }
            let reps = 1 + i % 7;
            let mut s = format!("Request {i}: ");
            for r in 0..reps {
                s.push_str(base[(i + r) % base.len()]);
            }
            s
        })
        .collect()
}

#[actix_rt::test]
async fn tiny_hybrid_remote_prefill_matches_local() {
    let model = "tiny-hybrid";
    let prefill = start(node_config("prefill", &[NodeRole::Prefill], model, vec![])).await;
    let home = start(node_config(
        "home",
        &[NodeRole::Decode],
        model,
        addrs_of(&prefill).await,
    ))
    .await;
    wait_for_prefillers(&home, 1).await;
    let max_tokens = 24;
    let (mut remote, mut local) = (0, 0);
    for p in prompts() {
        let want = reference(model, &p, max_tokens);
        let got = run_text(&home, &p, max_tokens).await;
        let n = home.core.text.codec.encode(&p, false).unwrap().len();
        if n > 48 {
            assert!(
                got.is_remote(),
                "{n}-token prompt not offloaded: {:?}",
                got.route
            );
            remote += 1;
        } else {
            assert!(!got.is_remote(), "{n}-token prompt offloaded");
            local += 1;
        }
        assert_eq!(got.tokens, want, "prompt {p:?} via {:?}", got.route);
    }
    assert!(remote >= 10 && local >= 3, "remote {remote}, local {local}");
    home.shutdown().await;
    prefill.shutdown().await;
}
