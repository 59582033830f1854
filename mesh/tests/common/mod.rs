//! Helpers shared by the mesh integration tests: nodes on 127.0.0.1 port 0, waits on events
//! with timeouts (never fixed sleeps).
#![allow(dead_code)]

use std::collections::HashSet;
use std::time::Duration;

use prfaas_mesh::advert::{AdvertBody, ModelRef, PrefillPoint, Role};
use prfaas_mesh::{Mesh, MeshConfig, MeshEvent, MeshHandle, Multiaddr, PeerId};
use tokio::sync::mpsc;

pub struct Node {
    pub handle: MeshHandle,
    pub events: mpsc::Receiver<MeshEvent>,
    pub addr: Multiaddr,
}

impl Node {
    pub fn id(&self) -> PeerId {
        self.handle.local_peer_id()
    }

    /// Dialable address including `/p2p/<id>`.
    pub fn p2p_addr(&self) -> Multiaddr {
        self.addr.clone().with(libp2p_p2p(self.id()))
    }
}

fn libp2p_p2p(id: PeerId) -> prfaas_mesh::multiaddr::Protocol<'static> {
    prfaas_mesh::multiaddr::Protocol::P2p(id)
}

pub fn model() -> ModelRef {
    ModelRef {
        model_id: "smollm2-135m".into(),
        weights_hash: [7; 32],
        kv_layout_version: 1,
        kv_layout_hash: [9; 32],
    }
}

pub fn prefill_body(queue_depth: u32, price: f64) -> AdvertBody {
    AdvertBody {
        region: "test".into(),
        roles: vec![Role::Prefill, Role::Decode],
        models: vec![model()],
        prefill_profile: vec![PrefillPoint {
            tokens: 512,
            tokens_per_sec: 250.0,
        }],
        queue_depth,
        free_kv_blocks: 100,
        price_per_1k_tokens: price,
        software_version: "test".into(),
        ..AdvertBody::default()
    }
}

/// Spawns a node listening on 127.0.0.1 port 0 and waits for its address.
pub async fn spawn(cfg: MeshConfig) -> Node {
    let (handle, events) = Mesh::spawn(cfg).expect("spawn mesh");
    let addrs = tokio::time::timeout(Duration::from_secs(10), handle.listen_addrs())
        .await
        .expect("listen timeout")
        .expect("listen addrs");
    let addr = addrs
        .iter()
        .find(|a| a.to_string().contains("127.0.0.1"))
        .cloned()
        .unwrap_or_else(|| addrs[0].clone());
    Node {
        handle,
        events,
        addr,
    }
}

/// Waits (bounded) for the first event matching `pred`, discarding others.
pub async fn wait_for<T>(
    events: &mut mpsc::Receiver<MeshEvent>,
    timeout: Duration,
    mut pred: impl FnMut(MeshEvent) -> Option<T>,
) -> Option<T> {
    tokio::time::timeout(timeout, async {
        while let Some(ev) = events.recv().await {
            if let Some(t) = pred(ev) {
                return Some(t);
            }
        }
        None
    })
    .await
    .ok()
    .flatten()
}

/// Waits until `events` reported `PeerDiscovered` for every peer in `expected`; returns the
/// still-missing peers on timeout (empty = converged).
pub async fn discover_all(
    events: &mut mpsc::Receiver<MeshEvent>,
    expected: &HashSet<PeerId>,
    timeout: Duration,
) -> HashSet<PeerId> {
    let mut missing = expected.clone();
    let _ = tokio::time::timeout(timeout, async {
        while !missing.is_empty() {
            match events.recv().await {
                Some(MeshEvent::PeerDiscovered { peer }) => {
                    missing.remove(&peer);
                }
                Some(_) => {}
                None => return,
            }
        }
    })
    .await;
    missing
}

/// Starts `n` nodes, each bootstrapping to node 0, all advertising prefill.
pub async fn star(n: usize, cfg: impl Fn(usize) -> MeshConfig) -> Vec<Node> {
    let first = spawn(cfg(0)).await;
    let boot = first.p2p_addr().to_string();
    let mut nodes = vec![first];
    for i in 1..n {
        let mut c = cfg(i);
        c.bootstrap = vec![boot.clone()];
        nodes.push(spawn(c).await);
    }
    for (i, node) in nodes.iter().enumerate() {
        node.handle
            .set_advert(prefill_body(i as u32, 1.0 + i as f64))
            .await
            .expect("set advert");
    }
    nodes
}

/// Drives every node's event queue concurrently until each has discovered all others.
/// Returns the nodes back plus how many (node, peer) pairs are still missing.
pub async fn converge(nodes: Vec<Node>, timeout: Duration) -> (Vec<Node>, usize) {
    let ids: HashSet<PeerId> = nodes.iter().map(|n| n.id()).collect();
    let tasks: Vec<_> = nodes
        .into_iter()
        .map(|mut n| {
            let mut expected = ids.clone();
            expected.remove(&n.id());
            tokio::spawn(async move {
                let missing = discover_all(&mut n.events, &expected, timeout).await;
                (n, missing.len())
            })
        })
        .collect();
    let mut out = Vec::new();
    let mut missing = 0;
    for t in tasks {
        let (n, m) = t.await.expect("join");
        missing += m;
        out.push(n);
    }
    (out, missing)
}
