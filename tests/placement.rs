//! Where prefill runs: bandwidth-aware and cache-aware auctions between real nodes on loopback,
//! with link rates emulated in the mesh (kernel shaping needs root and namespaces).

mod common;

use std::time::{Duration, Instant};

use common::*;
use prfaas_node::actors::NodeHandle;
use prfaas_node::config::{NodeConfig, NodeRole};
use prfaas_node::service::PrefillRoute;

const MODEL: &str = "tiny-dense";

fn cfg(name: &str, roles: &[NodeRole], bootstrap: Vec<String>) -> NodeConfig {
    let mut c = node_config(name, roles, MODEL, bootstrap);
    // Offload everything longer than 32 tokens; the home's own compute is expensive (it is a
    // decode node), so the choice is between the two bidders.
    c.policy.offload_threshold_tokens = 32;
    c.policy.reserve_price_factor = 1e6;
    c.policy.lambda_per_s = 10.0;
    // Same seeded speed estimate on every node (no noisy start-up calibration on a busy machine).
    c.engine.calibration_tokens = 0;
    c
}

/// Emulates a symmetric link of `rate` bytes/s between `a` and `b`.
fn link(a: &NodeHandle, b: &NodeHandle, rate: f64) {
    a.core.mesh.set_emulated_bandwidth(b.peer_id(), Some(rate));
    b.core.mesh.set_emulated_bandwidth(a.peer_id(), Some(rate));
}

/// Waits (bounded) until `home` has measured bandwidth towards every peer in `peers`.
async fn wait_for_estimates(home: &NodeHandle, peers: &[&NodeHandle]) {
    let t0 = Instant::now();
    while !peers
        .iter()
        .all(|p| home.core.mesh.observed_bandwidth(&p.peer_id()).is_some())
    {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "no bandwidth estimates after 60 s"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn winner(route: &PrefillRoute) -> String {
    match route {
        PrefillRoute::Remote { peer, .. } => peer.clone(),
        other => panic!("not offloaded: {other:?}"),
    }
}

async fn mesh_of_three() -> (NodeHandle, NodeHandle, NodeHandle) {
    let p1 = start(cfg("p1", &[NodeRole::Prefill], vec![])).await;
    let p2 = start(cfg("p2", &[NodeRole::Prefill], addrs_of(&p1).await)).await;
    let mut boot = addrs_of(&p1).await;
    boot.extend(addrs_of(&p2).await);
    let home = start(cfg("home", &[NodeRole::Decode], boot)).await;
    wait_for_prefillers(&home, 2).await;
    (home, p1, p2)
}

#[actix_rt::test]
async fn equal_prices_higher_bandwidth_wins() {
    let (home, p1, p2) = mesh_of_three().await;
    // p1 sits behind a slow link, p2 behind a fast one; both ask the same price.
    link(&home, &p1, 2.0e6);
    link(&home, &p2, 200.0e6);
    wait_for_estimates(&home, &[&p1, &p2]).await;
    let prompt =
        "A long prompt that certainly exceeds the offload threshold of the home. ".repeat(4);
    let out = run_text(&home, &prompt, 4).await;
    assert_eq!(winner(&out.route), p2.peer_id().to_string());
    let rec = home.core.recent_auctions().pop().expect("auction recorded");
    let price = |peer: &NodeHandle| {
        rec.bids
            .iter()
            .find(|b| b.bidder == peer.peer_id().to_string())
            .map(|b| b.price)
            .expect("both bid")
    };
    assert!((price(&p1) - price(&p2)).abs() < 1e-9, "{rec:?}");
    for n in [home, p1, p2] {
        n.shutdown().await;
    }
}

#[actix_rt::test]
async fn cached_prefix_wins_when_bandwidth_is_scarce() {
    let (home, p1, p2) = mesh_of_three().await;
    // Both links are equally scarce; only p2 holds the prompt's prefix.
    link(&home, &p1, 3.5e6);
    link(&home, &p2, 3.5e6);
    let shared =
        "The shared system prompt that many requests start with, long enough to span blocks. "
            .repeat(3);
    let prefix = home.core.text.codec.encode(&shared, false).unwrap();
    p2.core
        .compute
        .prefill_and_discard(prefix)
        .await
        .expect("prefill ok");
    wait_for_estimates(&home, &[&p1, &p2]).await;
    // Let p2's advert and view catch up with its cache (bounded).
    let t0 = Instant::now();
    while p2.core.compute.view().cached_blocks.is_empty() {
        assert!(t0.elapsed() < Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let prompt = format!("{shared}And now the user's own question?");
    let out = run_text(&home, &prompt, 4).await;
    assert_eq!(winner(&out.route), p2.peer_id().to_string());
    let rec = home.core.recent_auctions().pop().expect("auction recorded");
    let cached = |peer: &NodeHandle| {
        rec.bids
            .iter()
            .find(|b| b.bidder == peer.peer_id().to_string())
            .map(|b| b.cached_tokens)
            .expect("both bid")
    };
    assert!(cached(&p2) > 0 && cached(&p1) == 0, "{rec:?}");
    for n in [home, p1, p2] {
        n.shutdown().await;
    }
}

#[actix_rt::test]
async fn threshold_follows_observed_bandwidth() {
    let home = start(cfg("home", &[NodeRole::Decode], vec![])).await;
    let configured = home.core.cfg.policy.offload_threshold_tokens;
    // A link where shipping a token's KV takes longer than computing it: never offload.
    assert_eq!(home.core.adapt_threshold(1.0e3), home.core.max_context);
    let long = "A long prompt that certainly exceeds the offload threshold of the home. ".repeat(4);
    let out = run_text(&home, &long, 2).await;
    assert!(!out.is_remote());
    // A fast link: t is the configured one or the break-even length of the auction's fixed
    // cost at the measured local speed, whichever is larger.
    let rate = home.core.compute.view().prefill_tokens_per_s;
    let break_even = (prfaas_node::actors::core::AUCTION_COST_S * rate).ceil() as usize;
    assert_eq!(
        home.core.adapt_threshold(1.0e12),
        configured.max(break_even)
    );
    home.shutdown().await;
}
