//! Mesh admission: pre-shared key (pnet over TCP) and peer-id allowlist.

mod common;

use std::time::Duration;

use common::*;
use prfaas_mesh::auction::{AuctionRequest, Call};
use prfaas_mesh::{MeshConfig, MeshEvent};

fn psk_cfg(key: &str) -> MeshConfig {
    let mut c = MeshConfig::local();
    c.psk = Some(key.into());
    c
}

async fn refused(node: &mut Node) -> bool {
    wait_for(&mut node.events, Duration::from_secs(10), |ev| match ev {
        MeshEvent::ConnectionRefused { .. } => Some(()),
        _ => None,
    })
    .await
    .is_some()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psk_mesh_admits_only_key_holders() {
    let key = "11".repeat(32);
    let mut a = spawn(psk_cfg(&key)).await;
    let b = spawn(psk_cfg(&key)).await;
    assert_eq!(b.handle.dial(a.p2p_addr()).await.expect("same key connects"), a.id());

    let wrong = spawn(psk_cfg(&"22".repeat(32))).await;
    assert!(wrong.handle.dial(a.p2p_addr()).await.is_err(), "wrong key must not connect");
    assert!(refused(&mut a).await);

    let open = spawn(MeshConfig::local()).await;
    assert!(open.handle.dial(a.p2p_addr()).await.is_err(), "no key must not connect");
    assert!(a.handle.stats().refused_connections >= 2);
    let connected = a.handle.connected_peers().await.expect("peers");
    assert_eq!(connected, vec![b.id()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowlist_refuses_outsiders() {
    let insider = spawn(MeshConfig::local()).await;
    let mut cfg = MeshConfig::local();
    cfg.allowlist = Some(vec![insider.id().to_base58()]);
    let mut guarded = spawn(cfg).await;
    guarded.handle.set_advert(prefill_body(0, 1.0)).await.expect("advert");
    insider.handle.dial(guarded.p2p_addr()).await.expect("insider connects");

    let outsider = spawn(MeshConfig::local()).await;
    // The transport handshake may complete, but the guarded node denies the connection.
    let _ = outsider.handle.dial(guarded.p2p_addr()).await;
    assert!(refused(&mut guarded).await, "outsider not refused");
    let call = Call {
        request_id: 1,
        model: model(),
        prompt_len: 10,
        cached_prefix_tokens: 0,
        prefix_block_hashes: vec![],
        kv_bytes_estimate: 0,
        deadline_ms: 500,
    };
    let r = outsider
        .handle
        .request(guarded.id(), AuctionRequest::Call(call))
        .await;
    assert!(r.is_err(), "outsider's call must fail: {r:?}");
    assert!(guarded.handle.stats().refused_connections >= 1);
    let connected = guarded.handle.connected_peers().await.expect("peers");
    assert!(!connected.contains(&outsider.id()));
    assert!(connected.contains(&insider.id()));
}
