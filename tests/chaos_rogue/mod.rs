//! A rogue peer for the chaos suite: an in-process mesh node (its own swarm, run on its own tokio
//! runtime inside the caller's network namespace) that claims to prefill the home's model at
//! price 0 with an absurd advertised speed, wins auctions, and then lies — it stalls, sends
//! garbage KV or NaN KV, in turn — while it floods the home with KV hellos that never send,
//! bandwidth probes, advert updates and fresh identities.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prfaas_mesh::advert::{AdvertBody, ModelRef, PrefillPoint, PrefixSummary, Role};
use prfaas_mesh::auction::Bid;
use prfaas_mesh::kv::{KvHeader, KvTrailer, PieceId};
use prfaas_mesh::{CallAnswer, MeshConfig, MeshEvent, MeshHandle, Multiaddr};
use prfaas_node::kv::wire::KvWire;
use prfaas_node::kv::KvLayout;

/// What the rogue did, for the report.
#[derive(Debug, Default)]
pub struct RogueStats {
    pub bids: AtomicU64,
    pub awards: AtomicU64,
    pub stalls: AtomicU64,
    pub garbage: AtomicU64,
    pub nan: AtomicU64,
    pub hellos: AtomicU64,
    pub probes: AtomicU64,
    pub adverts: AtomicU64,
    pub identities: AtomicU64,
}

impl RogueStats {
    pub fn summary(&self) -> String {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        format!(
            "{} bids, {} awards won (stalled {}, garbage KV {}, NaN KV {}), {} hellos held open, {} probes, {} advert updates, {} extra identities",
            g(&self.bids),
            g(&self.awards),
            g(&self.stalls),
            g(&self.garbage),
            g(&self.nan),
            g(&self.hellos),
            g(&self.probes),
            g(&self.adverts),
            g(&self.identities)
        )
    }
}

fn mesh_config(bootstrap: &Multiaddr) -> MeshConfig {
    let mut c = MeshConfig::local();
    c.listen = vec!["/ip4/0.0.0.0/tcp/0".into()];
    // Addresses of namespaces this test made: nobody else can reach them.
    c.open = true;
    c.bootstrap = vec![bootstrap.to_string()];
    c
}

fn prefill_body(model: &ModelRef, seq: u32) -> AdvertBody {
    AdvertBody {
        region: "local".into(),
        roles: vec![Role::Prefill, Role::Decode],
        models: vec![model.clone()],
        prefill_profile: vec![PrefillPoint {
            tokens: 1024,
            tokens_per_sec: 1e7,
        }],
        queue_depth: seq % 3,
        free_kv_blocks: 1 << 30,
        price_per_1k_tokens: 0.0,
        prefix_summary: PrefixSummary::with_size(64, 3),
        software_version: format!("rogue-{seq}"),
        api_url: None,
        queue_s: None,
    }
}

/// Runs the rogue until `stop`; call from a thread already in the right network namespace.
pub fn run(
    home: Multiaddr,
    home_peer: prfaas_mesh::PeerId,
    model: ModelRef,
    layout: KvLayout,
    vocab: usize,
    stop: Arc<AtomicBool>,
    stats: Arc<RogueStats>,
) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("rogue runtime");
    rt.block_on(async move {
        let (mesh, mut events) = prfaas_mesh::Mesh::spawn(mesh_config(&home)).expect("rogue mesh");
        let _ = mesh.dial(home.clone()).await;
        let _ = mesh.set_advert(prefill_body(&model, 0)).await;
        let mut floods = Vec::new();
        // Advert flood: a changed advert every 10 ms.
        {
            let (mesh, model, stop, stats) =
                (mesh.clone(), model.clone(), stop.clone(), stats.clone());
            floods.push(tokio::spawn(async move {
                let mut i = 1;
                while !stop.load(Ordering::Relaxed) {
                    let _ = mesh.set_advert(prefill_body(&model, i)).await;
                    stats.adverts.fetch_add(1, Ordering::Relaxed);
                    i += 1;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }));
        }
        // Hello flood: transfers for requests the home never awarded, held open without data.
        {
            let (mesh, model, stop, stats) =
                (mesh.clone(), model.clone(), stop.clone(), stats.clone());
            floods.push(tokio::spawn(async move {
                let mut held = Vec::new();
                let mut id = 1u64 << 40;
                while !stop.load(Ordering::Relaxed) {
                    let h = KvHeader::opaque(id, model.clone(), 1 << 20, 1 << 16, false);
                    id += 1;
                    if let Ok(Ok(s)) = tokio::time::timeout(
                        Duration::from_secs(1),
                        mesh.open_kv_transfer_with(home_peer, h, 1),
                    )
                    .await
                    {
                        stats.hellos.fetch_add(1, Ordering::Relaxed);
                        held.push(s);
                        if held.len() > 512 {
                            held.remove(0);
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }));
        }
        // Probe flood: bandwidth probes of 64 KiB, back to back.
        {
            let (mesh, model, stop, stats) =
                (mesh.clone(), model.clone(), stop.clone(), stats.clone());
            floods.push(tokio::spawn(async move {
                let mut id = 1u64 << 50;
                while !stop.load(Ordering::Relaxed) {
                    let h = KvHeader::opaque(id, model.clone(), 64 << 10, 16 << 10, true);
                    id += 1;
                    let sent = tokio::time::timeout(Duration::from_secs(2), async {
                        let mut s = mesh.open_kv_transfer_with(home_peer, h, 1).await.ok()?;
                        s.send_opaque(&[0x5a; 4096]).await.ok()?;
                        s.finish(KvTrailer::default()).await.ok()
                    })
                    .await;
                    if matches!(sent, Ok(Some(_))) {
                        stats.probes.fetch_add(1, Ordering::Relaxed);
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }));
        }
        // Identity flood: fresh peer ids joining and advertising (decode only, so they are table
        // entries, not auction candidates).
        let mut sybils: Vec<MeshHandle> = Vec::new();
        for i in 0..16u32 {
            if let Ok((m, mut ev)) = prfaas_mesh::Mesh::spawn(mesh_config(&home)) {
                let _ = m.dial(home.clone()).await;
                let mut body = prefill_body(&model, i);
                body.roles = vec![Role::Decode];
                let _ = m.set_advert(body).await;
                // Drain its events so it never blocks.
                tokio::spawn(async move { while ev.recv().await.is_some() {} });
                stats.identities.fetch_add(1, Ordering::Relaxed);
                sybils.push(m);
            }
        }

        // The lying prefiller.
        let mut round = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let ev = match tokio::time::timeout(Duration::from_millis(100), events.recv()).await {
                Ok(Some(ev)) => ev,
                Ok(None) => break,
                Err(_) => continue,
            };
            match ev {
                MeshEvent::AuctionCall { call, token, .. } => {
                    let bid = Bid {
                        request_id: call.request_id,
                        bid_id: call.request_id ^ 0xbad,
                        price: 0.0,
                        queue_delay_ms: 0,
                        est_prefill_ms: 1,
                        cached_tokens: 0,
                        valid_for_ms: 10_000,
                    };
                    let _ = mesh.answer_call(token, CallAnswer::Bid(bid)).await;
                    stats.bids.fetch_add(1, Ordering::Relaxed);
                }
                MeshEvent::Awarded {
                    peer, award, slot, ..
                } => {
                    stats.awards.fetch_add(1, Ordering::Relaxed);
                    let n = award.tokens.len() / 4;
                    let lie = round % 3;
                    round += 1;
                    let (mesh, model, layout, stats) =
                        (mesh.clone(), model.clone(), layout.clone(), stats.clone());
                    tokio::spawn(async move {
                        let _slot = slot;
                        match lie {
                            0 => {
                                stats.stalls.fetch_add(1, Ordering::Relaxed);
                                tokio::time::sleep(Duration::from_secs(120)).await;
                            }
                            _ => {
                                let nan = lie == 2;
                                if nan {
                                    stats.nan.fetch_add(1, Ordering::Relaxed);
                                } else {
                                    stats.garbage.fetch_add(1, Ordering::Relaxed);
                                }
                                let _ = send_lies(
                                    &mesh,
                                    peer,
                                    award.request_id,
                                    model,
                                    &layout,
                                    n,
                                    vocab,
                                    nan,
                                )
                                .await;
                            }
                        }
                    });
                }
                _ => {}
            }
        }
        for f in floods {
            f.abort();
        }
        for s in sybils {
            s.shutdown().await;
        }
        mesh.shutdown().await;
    });
}

/// KV of the right shape for `n` tokens whose values are garbage (random f16 bits) or NaN.
#[allow(clippy::too_many_arguments)]
async fn send_lies(
    mesh: &MeshHandle,
    home: prfaas_mesh::PeerId,
    request_id: u64,
    model: ModelRef,
    layout: &KvLayout,
    n: usize,
    vocab: usize,
    nan: bool,
) -> Option<()> {
    let total = layout.transfer_bytes(n) as u64;
    let max_piece = (0..layout.layers.len())
        .map(|l| layout.wire_transfer_layer_bytes(l, n, KvWire::F16))
        .max()
        .unwrap_or(0) as u64;
    let header = KvHeader {
        request_id,
        model,
        layers: layout.layers.len() as u32,
        tokens: n as u32,
        dtype: "f16".into(),
        max_piece_bytes: max_piece,
        total_bytes: total,
        probe: false,
    };
    let mut s = mesh.open_kv_transfer(home, header).await.ok()?;
    let mut x = 0x2545_F491_4F6C_DD1Du64 ^ request_id;
    // Every piece a transfer carries: the paged spans, each state and its checkpoints.
    let pieces = (0..layout.layers.len()).flat_map(|layer| {
        let rows: Vec<std::ops::Range<usize>> = if layout.layers[layer].is_paged() {
            layout.transfer_spans(layer, n)
        } else {
            let ends = layout.checkpoints(n).into_iter().chain([n]);
            ends.map(|c| 0..c).collect()
        };
        rows.into_iter().map(move |r| (layer, r))
    });
    for (layer, rows) in pieces {
        let len = layout.piece_bytes(layer, rows.len());
        let bytes: Vec<u8> = if nan {
            // f16 and f32 NaN patterns alike: 0x7e00 / 0x7fc0_0000 little-endian halves.
            (0..len)
                .map(|i| if i % 2 == 0 { 0x00 } else { 0x7e })
                .collect()
        } else {
            (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect()
        };
        let piece = PieceId {
            layer: layer as u32,
            start: rows.start as u32,
            end: rows.end as u32,
        };
        s.send_piece(piece, bytes).await.ok()?;
    }
    let trailer = KvTrailer {
        first_token: Some(0),
        payload: vec![0; vocab * 4],
    };
    s.finish(trailer).await.ok()?;
    Some(())
}
