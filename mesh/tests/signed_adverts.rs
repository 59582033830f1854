//! `/prfaas/advert/2` authenticity and `/prfaas/table/1` sync, against real nodes: a rogue
//! gossipsub peer (plain libp2p, unsigned gossip like the mesh) publishes forged, altered and
//! replayed adverts, which the node must reject and count; a late joiner learns the mesh from a
//! table sync before any advert refresh could have taught it.
//!
//! Honest reordering (an advert a few ms older than the one held, arriving over another path)
//! is ignored without being counted, so an honest mesh shows no refusals.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::*;
use futures::StreamExt;
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::{gossipsub, identity::Keypair, noise, tcp, yamux, Multiaddr, Swarm};
use prfaas_mesh::advert::codec::{self, SignedAdvert};
use prfaas_mesh::advert::sync::{TableCodec, TableEntry, TableResponse, TABLE_PROTOCOL};
use prfaas_mesh::advert::{Advert, ADVERT_TOPIC};
use prfaas_mesh::{wire, MeshConfig, MeshEvent};

fn advert(key: &Keypair, seq: u64, queue_depth: u32) -> Advert {
    Advert {
        node_id: key.public().to_peer_id().to_base58(),
        seq,
        listen_addrs: vec![],
        body: prefill_body(queue_depth, 1.0),
        observed_bandwidth: vec![],
    }
}

fn signed(key: &Keypair, seq: u64, queue_depth: u32) -> Vec<u8> {
    codec::sign(&advert(key, seq, queue_depth), key, 64 * 1024).expect("sign")
}

/// (sequence, queue depth) of the advert `node` holds for `key`'s peer, if any.
async fn held(node: &Node, key: &Keypair) -> Option<(u64, u32)> {
    let cands = node
        .handle
        .prefill_candidates(model())
        .await
        .expect("cands");
    cands
        .iter()
        .find(|(p, _)| *p == key.public().to_peer_id())
        .map(|(_, a)| (a.seq, a.body.queue_depth))
}

/// A bare gossipsub swarm configured like the mesh's advert topic (anonymous messages, content
/// ids), so what it publishes reaches the node's advert validation unchanged.
fn rogue() -> Swarm<gossipsub::Behaviour> {
    bare_swarm(|| {
        let cfg = gossipsub::ConfigBuilder::default()
            .validation_mode(gossipsub::ValidationMode::Anonymous)
            .message_id_fn(|m| {
                use std::hash::{DefaultHasher, Hash, Hasher};
                let mut h = DefaultHasher::new();
                m.data.hash(&mut h);
                gossipsub::MessageId::from(h.finish().to_be_bytes().to_vec())
            })
            .build()
            .expect("gossip config");
        let mut g = gossipsub::Behaviour::new(gossipsub::MessageAuthenticity::Anonymous, cfg)
            .expect("gossipsub");
        g.subscribe(&gossipsub::IdentTopic::new(ADVERT_TOPIC))
            .expect("subscribe");
        g
    })
}

/// A plain libp2p swarm over TCP + noise + yamux (what the mesh speaks) running `behaviour`.
fn bare_swarm<B: libp2p::swarm::NetworkBehaviour>(behaviour: impl FnOnce() -> B) -> Swarm<B> {
    libp2p::SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )
        .expect("tcp")
        .with_behaviour(|_| behaviour())
        .expect("behaviour")
        .build()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_altered_and_replayed_adverts_are_rejected_and_counted() {
    let mut node = spawn(MeshConfig::local()).await;
    let mut rogue = rogue();
    rogue.dial(node.p2p_addr()).expect("dial");
    let topic = gossipsub::IdentTopic::new(ADVERT_TOPIC);
    // Bounded wait for the node's subscription to reach the rogue.
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let libp2p::swarm::SwarmEvent::Behaviour(gossipsub::Event::Subscribed {
                peer_id,
                ..
            }) = rogue.select_next_some().await
            {
                if peer_id == node.id() {
                    break;
                }
            }
        }
    })
    .await
    .expect("node subscribed");

    // Sequence numbers are wall-clock ms: 60 s apart is a replay, not in-flight reordering.
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64;
    let (s5, s4) = (now_ms, now_ms - 60_000);
    let victim = Keypair::generate_ed25519();
    let mallory = Keypair::generate_ed25519();
    let honest_5 = signed(&victim, s5, 7);
    let env: SignedAdvert = wire::decode(&honest_5, 64 * 1024).expect("envelope");
    // Altered: the victim's signature over a different body (queue depth 0).
    let altered = wire::encode(
        &SignedAdvert {
            advert: wire::encode(&advert(&victim, s5 + 1, 0), 64 * 1024).expect("enc"),
            ..env.clone()
        },
        64 * 1024,
    )
    .expect("enc");
    // Wrong signer: Mallory signs an advert naming the victim.
    let wrong_signer = codec::sign(&advert(&victim, s5 + 2, 0), &mallory, 64 * 1024).expect("sign");
    // Replay: an older advert the victim really signed (a minute older).
    let replayed_4 = signed(&victim, s4, 0);
    // Reordering in flight (1 ms older than the one held): ignored, neither stored nor counted.
    let reordered = signed(&victim, s5 - 1, 0);
    // Same sequence number, different (validly signed) content: equivocation counts as replay.
    let conflicting_5 = signed(&victim, s5, 1);
    // Sent last: once the node discovers this peer, everything before it was processed (one
    // connection, one swarm task, in order).
    let marker = Keypair::generate_ed25519();
    let marker_ad = signed(&marker, now_ms, 0);

    let msgs = [
        honest_5,
        altered,
        wrong_signer,
        replayed_4,
        reordered,
        conflicting_5,
        marker_ad,
    ];
    for m in msgs {
        rogue
            .behaviour_mut()
            .publish(topic.clone(), m)
            .expect("publish");
    }
    let marker_id = marker.public().to_peer_id();
    let found = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            tokio::select! {
                _ = rogue.select_next_some() => {}
                ev = node.events.recv() => match ev {
                    Some(MeshEvent::PeerDiscovered { peer }) if peer == marker_id => break true,
                    Some(_) => {}
                    None => break false,
                },
            }
        }
    })
    .await;
    assert_eq!(found, Ok(true), "marker advert never accepted");
    let s = node.handle.stats();
    assert_eq!(s.adverts_forged, 2, "{s:?}");
    assert_eq!(s.adverts_replayed, 2, "{s:?}");
    assert_eq!(s.refused_adverts, 4, "{s:?}");
    assert_eq!(s.adverts_accepted, 2, "{s:?}");
    assert_eq!(
        s.adverts_stale, 1,
        "the replay is older than the expiry: {s:?}"
    );
    // The table holds the honest advert (seq 5, queue 7), untouched by the forgeries.
    assert_eq!(held(&node, &victim).await, Some((s5, 7)));
    node.handle.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_joiner_learns_the_table_through_sync() {
    // Old nodes refresh their adverts only every 10 s (expiry / 3): the joiner must learn them
    // from the table its bootstrap peer serves, not from gossip. It never advertises itself, so
    // nobody re-publishes for it either.
    let old_cfg = || {
        let mut c = MeshConfig::local();
        c.advert_expiry = Duration::from_secs(30);
        c
    };
    let nodes = star(4, |_| old_cfg()).await;
    let (nodes, missing) = converge(nodes, Duration::from_secs(10)).await;
    assert_eq!(missing, 0);
    let mut cfg = MeshConfig::local();
    cfg.bootstrap = vec![nodes[2].p2p_addr().to_string()];
    let mut late = spawn(cfg).await;
    let expected: HashSet<_> = nodes.iter().map(|n| n.id()).collect();
    let missing = discover_all(&mut late.events, &expected, Duration::from_secs(5)).await;
    assert!(missing.is_empty(), "late joiner missed {missing:?}");
    let s = late.handle.stats();
    assert!(
        s.adverts_from_sync >= 4,
        "expected all 4 adverts through sync: {s:?}"
    );
    assert_eq!(s.refused_adverts, 0, "{s:?}");
    // What it learned is usable: all four are prefill candidates.
    let cands = late
        .handle
        .prefill_candidates(model())
        .await
        .expect("cands");
    assert_eq!(cands.len(), 4);
    late.handle.shutdown().await;
    for n in &nodes {
        n.handle.shutdown().await;
    }
}

/// A peer speaking only `/prfaas/table/1` (the test answers its requests).
fn rogue_table_server() -> Swarm<request_response::Behaviour<TableCodec>> {
    bare_swarm(|| {
        request_response::Behaviour::with_codec(
            TableCodec::new(1024, 1 << 20),
            [(TABLE_PROTOCOL, ProtocolSupport::Full)],
            request_response::Config::default(),
        )
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_table_sync_entries_are_rejected_and_counted() {
    let mut node = spawn(MeshConfig::local()).await;
    let mut rogue = rogue_table_server();
    rogue
        .listen_on("/ip4/127.0.0.1/tcp/0".parse().expect("addr"))
        .expect("listen");
    let addr: Multiaddr = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let libp2p::swarm::SwarmEvent::NewListenAddr { address, .. } =
                rogue.select_next_some().await
            {
                break address;
            }
        }
    })
    .await
    .expect("rogue listens");
    let addr = addr.with(libp2p::multiaddr::Protocol::P2p(*rogue.local_peer_id()));

    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64;
    let victim = Keypair::generate_ed25519();
    let mallory = Keypair::generate_ed25519();
    let honest = signed(&victim, now_ms, 7);
    let env: SignedAdvert = wire::decode(&honest, 64 * 1024).expect("envelope");
    // The victim's signature over another body, and Mallory's signature over the victim's name.
    let altered = wire::encode(
        &SignedAdvert {
            advert: wire::encode(&advert(&victim, now_ms + 1, 0), 64 * 1024).expect("enc"),
            ..env
        },
        64 * 1024,
    )
    .expect("enc");
    let wrong_signer =
        codec::sign(&advert(&victim, now_ms + 2, 0), &mallory, 64 * 1024).expect("sign");
    let marker = Keypair::generate_ed25519();
    let entries: Vec<TableEntry> = [
        honest,
        altered,
        wrong_signer,
        b"not an advert".to_vec(),
        signed(&marker, now_ms, 0),
    ]
    .into_iter()
    .map(|signed| TableEntry { age_ms: 0, signed })
    .collect();

    let dial = node.handle.dial(addr);
    let serve = async {
        loop {
            if let libp2p::swarm::SwarmEvent::Behaviour(request_response::Event::Message {
                message: request_response::Message::Request { channel, .. },
                ..
            }) = rogue.select_next_some().await
            {
                let entries = entries.clone();
                let _ = rogue
                    .behaviour_mut()
                    .send_response(channel, TableResponse { entries });
            }
        }
    };
    let marker_id = marker.public().to_peer_id();
    let found = tokio::time::timeout(Duration::from_secs(10), async {
        let mut serve = std::pin::pin!(serve);
        let mut dial = std::pin::pin!(dial);
        let mut dialled = false;
        loop {
            tokio::select! {
                _ = &mut serve => {}
                r = &mut dial, if !dialled => {
                    r.expect("node dials the rogue");
                    dialled = true;
                }
                ev = node.events.recv() => match ev {
                    Some(MeshEvent::PeerDiscovered { peer }) if peer == marker_id => break true,
                    Some(_) => {}
                    None => break false,
                },
            }
        }
    })
    .await;
    assert_eq!(
        found,
        Ok(true),
        "the valid synced advert was never accepted"
    );
    let s = node.handle.stats();
    assert!(s.adverts_forged >= 2, "altered + wrong signer: {s:?}");
    assert!(s.refused_adverts >= 3, "two forgeries and garbage: {s:?}");
    assert!(
        s.adverts_from_sync >= 2,
        "victim + marker through sync: {s:?}"
    );
    // The table holds the victim's real advert (queue depth 7), untouched by the forgeries.
    assert_eq!(held(&node, &victim).await, Some((now_ms, 7)));
    node.handle.shutdown().await;
}
