//! Advert gossip: convergence at 2, 5 and 20 nodes, expiry of a stopped peer, late joiners.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::*;
use prfaas_mesh::{MeshConfig, MeshEvent};

async fn converges(n: usize, budget: Duration) {
    let nodes = star(n, |_| MeshConfig::local()).await;
    let t0 = Instant::now();
    let (nodes, missing) = converge(nodes, budget).await;
    assert_eq!(
        missing, 0,
        "{n} nodes: {missing} (node, peer) pairs never discovered"
    );
    eprintln!("{n} nodes converged in {:?}", t0.elapsed());
    // The table answers "who can prefill M", most useful (shortest queue) first. A peer is
    // discovered by its first advert, which may predate its `set_advert` (the one saying it
    // prefills): poll (bounded) until the later adverts arrived too.
    let deadline = Instant::now() + budget;
    let cands = loop {
        let cands = nodes[0]
            .handle
            .prefill_candidates(model())
            .await
            .expect("candidates");
        if cands.len() == n - 1 || Instant::now() > deadline {
            break cands;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(cands.len(), n - 1);
    let queues: Vec<u32> = cands.iter().map(|(_, a)| a.body.queue_depth).collect();
    assert!(queues.windows(2).all(|w| w[0] <= w[1]), "{queues:?}");
    for n in &nodes {
        n.handle.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_converge() {
    converges(2, Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_nodes_converge() {
    converges(5, Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_nodes_converge_within_seconds() {
    converges(20, Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopped_peer_is_expired() {
    let nodes = star(3, |_| MeshConfig::local()).await;
    let (mut nodes, missing) = converge(nodes, Duration::from_secs(10)).await;
    assert_eq!(missing, 0);
    let gone = nodes.pop().expect("three nodes");
    let gone_id = gone.id();
    gone.handle.shutdown().await;
    for n in nodes.iter_mut() {
        let expired = wait_for(&mut n.events, Duration::from_secs(10), |ev| match ev {
            MeshEvent::PeerExpired { peer } if peer == gone_id => Some(()),
            _ => None,
        })
        .await;
        assert!(expired.is_some(), "stopped peer not expired");
        let known = n.handle.known_peers().await.expect("known");
        assert!(!known.contains(&gone_id));
        assert_eq!(known.len(), 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_joiner_learns_the_mesh() {
    let nodes = star(4, |_| MeshConfig::local()).await;
    let (mut nodes, missing) = converge(nodes, Duration::from_secs(10)).await;
    assert_eq!(missing, 0);
    // The joiner knows only node 2 (not the original bootstrap node).
    let mut cfg = MeshConfig::local();
    cfg.bootstrap = vec![nodes[2].p2p_addr().to_string()];
    let mut late = spawn(cfg).await;
    late.handle
        .set_advert(prefill_body(9, 9.0))
        .await
        .expect("advert");
    let expected: HashSet<_> = nodes.iter().map(|n| n.id()).collect();
    let missing = discover_all(&mut late.events, &expected, Duration::from_secs(10)).await;
    assert!(missing.is_empty(), "late joiner missed {missing:?}");
    let late_id: HashSet<_> = [late.id()].into();
    for n in nodes.iter_mut() {
        let m = discover_all(&mut n.events, &late_id, Duration::from_secs(10)).await;
        assert!(m.is_empty(), "old node never learned the late joiner");
    }
}
