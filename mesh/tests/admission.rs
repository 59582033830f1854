//! Mesh admission: pre-shared key (pnet over TCP) and peer-id allowlist.

mod common;

use std::time::Duration;

use common::*;
use prfaas_mesh::auction::{AuctionRequest, Call};
use prfaas_mesh::{MeshConfig, MeshEvent};

fn psk_cfg(key: &str) -> MeshConfig {
    let mut c = MeshConfig::local();
    c.psk = Some(key.into());
    // Wrong-key handshakes stall until this timeout; keep the test short.
    c.limits.handshake_timeout = Duration::from_secs(2);
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
    assert_eq!(
        b.handle
            .dial(a.p2p_addr())
            .await
            .expect("same key connects"),
        a.id()
    );

    let wrong = spawn(psk_cfg(&"22".repeat(32))).await;
    let mut no_key = MeshConfig::local();
    no_key.limits.handshake_timeout = Duration::from_secs(2);
    let open = spawn(no_key).await;
    let (r1, r2) = tokio::join!(
        wrong.handle.dial(a.p2p_addr()),
        open.handle.dial(a.p2p_addr())
    );
    assert!(r1.is_err(), "wrong key must not connect");
    assert!(r2.is_err(), "no key must not connect");
    assert!(refused(&mut a).await, "first refusal");
    assert!(refused(&mut a).await, "second refusal");
    assert!(a.handle.stats().refused_connections >= 2);
    // b's connection may be re-established at any instant (table sync, gossip), so poll
    // (bounded) until it is listed; an outsider must never be.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let connected = a.handle.connected_peers().await.expect("peers");
        assert!(
            connected.iter().all(|p| *p == b.id()),
            "only the key holder may be connected, got {connected:?}"
        );
        if connected.contains(&b.id()) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the key holder is not connected"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowlist_refuses_outsiders() {
    let insider = spawn(MeshConfig::local()).await;
    let mut cfg = MeshConfig::local();
    cfg.allowlist = Some(vec![insider.id().to_base58()]);
    let mut guarded = spawn(cfg).await;
    guarded
        .handle
        .set_advert(prefill_body(0, 1.0))
        .await
        .expect("advert");
    insider
        .handle
        .dial(guarded.p2p_addr())
        .await
        .expect("insider connects");

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
    // The insider stays (or, if a connection was replaced, is soon again) connected: bounded poll.
    let t0 = std::time::Instant::now();
    while !guarded
        .handle
        .connected_peers()
        .await
        .expect("peers")
        .contains(&insider.id())
    {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "allowlisted insider not connected"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let connected = guarded.handle.connected_peers().await.expect("peers");
    assert!(!connected.contains(&outsider.id()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exposed_listen_without_psk_or_allowlist_refuses_to_start() {
    let mut c = MeshConfig::local();
    c.listen = vec!["/ip4/0.0.0.0/tcp/0".into()];
    let err = prfaas_mesh::Mesh::spawn(c.clone()).expect_err("open by accident");
    assert!(
        matches!(err, prfaas_mesh::MeshError::Exposed { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("mesh.open = true"), "{err}");
    c.psk = Some("33".repeat(32));
    let (h, _ev) = prfaas_mesh::Mesh::spawn(c).expect("a private mesh may listen anywhere");
    h.shutdown().await;
}
