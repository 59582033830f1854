//! `prfaas bench mesh`: KV goodput as a ratio to raw TCP (same bytes, same run), auction
//! call → award latency and advert convergence for large in-process meshes, and goodput through a
//! `tc tbf`-shaped veth pair (the CLI runs that part via `scripts/netns-*` when root).
//!
//! Lives in the mesh crate so the CLI stays a thin wrapper and needs no async runtime of its own.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::advert::{AdvertBody, ModelRef, PrefillPoint, Role};
use crate::auction::{Award, Bid, Call};
use crate::kv::{KvHeader, KvTrailer, VecSink};
use crate::{CallAnswer, Mesh, MeshConfig, MeshError, MeshEvent, MeshHandle, Multiaddr, PeerId};

/// Bench errors.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BenchError {
    /// Mesh failure.
    #[error(transparent)]
    Mesh(#[from] MeshError),
    /// Raw TCP or runtime I/O failure.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// Something that should have happened did not within its time bound.
    #[error("timed out: {0}")]
    Timeout(String),
}

/// One KV goodput measurement.
#[derive(Debug, Clone, Serialize)]
pub struct KvGoodput {
    /// `tcp` or `quic`.
    pub transport: String,
    /// Parallel streams.
    pub streams: u16,
    /// Bytes moved.
    pub bytes: u64,
    /// Mesh KV goodput, MiB/s (end to end, until the receiver's ack).
    pub mesh_mib_s: f64,
    /// Raw TCP goodput for the same bytes measured right before, MiB/s.
    pub raw_tcp_mib_s: f64,
    /// mesh / raw TCP.
    pub ratio: f64,
    /// Process CPU seconds (user + system, both ends) per GiB moved by the mesh; `NaN` where
    /// `/proc/self/stat` is unavailable. Unlike goodput this hardly depends on machine load.
    pub mesh_cpu_s_per_gib: f64,
    /// The same for raw TCP.
    pub raw_tcp_cpu_s_per_gib: f64,
}

/// CPU seconds (user + system) this process has used so far, from `/proc/self/stat`; `None`
/// where that file does not exist or does not parse.
fn process_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.get(stat.rfind(')')? + 1..)?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    // Linux reports in USER_HZ, which is 100 on every mainstream configuration.
    Some(ticks / 100.0)
}

/// Runs `f`, returning its value and the process CPU seconds it used per GiB of `bytes`.
async fn with_cpu<T, F: std::future::Future<Output = Result<T, BenchError>>>(
    bytes: u64,
    f: F,
) -> Result<(T, f64), BenchError> {
    let c0 = process_cpu_seconds();
    let v = f.await?;
    let per_gib = match (c0, process_cpu_seconds()) {
        (Some(a), Some(b)) => (b - a) / (bytes as f64 / (1u64 << 30) as f64),
        _ => f64::NAN,
    };
    Ok((v, per_gib))
}

/// Auction latency and convergence for one mesh size.
#[derive(Debug, Clone, Serialize)]
pub struct MeshScale {
    /// Nodes in the process.
    pub nodes: usize,
    /// From the first node's start until every node's peer table held every other node, ms;
    /// `NaN` if that did not happen within the bound (see `converged`).
    pub convergence_ms: f64,
    /// The same, counted from the last node's start (how long the complete mesh took to settle;
    /// `convergence_ms` also contains the time spent starting the nodes one after another).
    pub convergence_after_last_start_ms: f64,
    /// Nodes whose table held every other node within the bound.
    pub converged: usize,
    /// Auction rounds measured.
    pub rounds: usize,
    /// Candidates called per round.
    pub candidates: usize,
    /// Rounds attempted.
    pub rounds_tried: usize,
    /// Rounds in which no candidate bid before the deadline.
    pub rounds_without_bids: usize,
    /// Awards the winner refused (e.g. its bid had expired).
    pub awards_refused: usize,
    /// Bids received over all rounds.
    pub bids: usize,
    /// Candidates that stayed silent (no answer before the deadline, or a failed request).
    pub silent: usize,
    /// Call → award accepted, median, ms.
    pub p50_ms: f64,
    /// Call → award accepted, 99th percentile, ms.
    pub p99_ms: f64,
    /// Process CPU (cores, both user and system) while the auction rounds ran: what the whole
    /// in-process mesh costs, which on a loaded 2-core machine bounds every latency above.
    pub cpu_cores_during_rounds: f64,
    /// Process CPU (cores) from the first node's start until convergence (or its bound): what
    /// joining and advert gossip cost.
    pub cpu_cores_converging: f64,
    /// Adverts accepted, summed over nodes (gossip and table sync).
    pub adverts_accepted: u64,
    /// Of those, learned through table sync.
    pub adverts_from_sync: u64,
    /// Adverts refused, summed over nodes (an honest mesh should show 0).
    pub adverts_refused: u64,
    /// Adverts published, summed over nodes.
    pub adverts_published: u64,
}

/// Everything `prfaas bench mesh` reports.
#[derive(Debug, Clone, Serialize, Default)]
pub struct MeshBenchReport {
    /// KV goodput ratios.
    pub kv: Vec<KvGoodput>,
    /// Auction / convergence per mesh size.
    pub scale: Vec<MeshScale>,
}

/// Bench options.
#[derive(Debug, Clone)]
pub struct MeshBenchOptions {
    /// Bytes per KV measurement (MiB).
    pub kv_mib: u64,
    /// Layer size (MiB).
    pub layer_mib: u64,
    /// Mesh sizes for the auction/convergence part.
    pub scales: Vec<usize>,
    /// Auction rounds per size.
    pub rounds: usize,
    /// Run the KV goodput part (TCP and QUIC, 1 and 4 streams).
    pub kv: bool,
}

impl Default for MeshBenchOptions {
    fn default() -> Self {
        Self {
            kv_mib: 1024,
            layer_mib: 4,
            scales: vec![50, 100],
            rounds: 200,
            kv: true,
        }
    }
}

/// Runs the in-process parts of the bench on a fresh multi-threaded runtime.
pub fn run(opts: &MeshBenchOptions) -> Result<MeshBenchReport, BenchError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut report = MeshBenchReport::default();
        let cases: &[(bool, u16)] = if opts.kv {
            &[(false, 1), (false, 4), (true, 1), (true, 4)]
        } else {
            &[]
        };
        for &(quic, streams) in cases {
            let m = kv_goodput(opts, quic, streams).await?;
            tracing::info!(?m, "kv goodput");
            report.kv.push(m);
        }
        for &n in &opts.scales {
            let s = scale(n, opts.rounds).await?;
            tracing::info!(?s, "mesh scale");
            report.scale.push(s);
        }
        Ok(report)
    })
}

fn bench_model() -> ModelRef {
    ModelRef {
        model_id: "bench".into(),
        weights_hash: [1; 32],
        kv_layout_version: 1,
        kv_layout_hash: [2; 32],
    }
}

fn layer_template(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i.wrapping_mul(31) >> 3) as u8).collect()
}

/// Raw TCP on loopback: same layer-sized writes, receiver acks the last byte.
async fn raw_tcp(total: u64, layer: usize) -> Result<f64, BenchError> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await?;
        s.set_nodelay(true)?;
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0u64;
        while got < total {
            let n = s.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            got += n as u64;
        }
        s.write_all(&[1]).await?;
        Ok::<u64, std::io::Error>(got)
    });
    let template = layer_template(layer);
    let t0 = Instant::now();
    let mut c = tokio::net::TcpStream::connect(addr).await?;
    c.set_nodelay(true)?;
    let mut sent = 0u64;
    while sent < total {
        let n = (total - sent).min(layer as u64) as usize;
        let chunk = template[..n].to_vec(); // same copy the mesh sender pays
        c.write_all(&chunk).await?;
        sent += n as u64;
    }
    let mut ack = [0u8; 1];
    c.read_exact(&mut ack).await?;
    let elapsed = t0.elapsed();
    let got = server
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))??;
    if got != total {
        return Err(BenchError::Timeout(format!(
            "raw tcp moved {got} of {total} bytes"
        )));
    }
    Ok(total as f64 / elapsed.as_secs_f64() / (1u64 << 20) as f64)
}

/// Bench receivers take any transfer: there is no auction whose award would announce it.
fn kv_config(quic: bool) -> MeshConfig {
    let mut c = MeshConfig::local();
    c.bandwidth.probes = false;
    c.limits.accept_unexpected_kv = true;
    if quic {
        c.quic = true;
        c.listen = vec!["/ip4/127.0.0.1/udp/0/quic-v1".into()];
    }
    c
}

async fn first_addr(h: &MeshHandle) -> Result<Multiaddr, BenchError> {
    let addrs = tokio::time::timeout(Duration::from_secs(10), h.listen_addrs())
        .await
        .map_err(|_| BenchError::Timeout("listen address".into()))??;
    addrs
        .into_iter()
        .next()
        .ok_or_else(|| BenchError::Timeout("no listen address".into()))
}

/// Moves `kv_mib` MiB over the mesh between two in-process nodes and returns the goodput.
pub async fn mesh_kv_once(
    sender: &MeshHandle,
    receiver_id: PeerId,
    receiver_events: &mut mpsc::Receiver<MeshEvent>,
    total: u64,
    layer: usize,
    streams: u16,
) -> Result<f64, BenchError> {
    let header = KvHeader::opaque(1, bench_model(), total, layer as u64, false);
    let sender = sender.clone();
    let send = tokio::spawn(async move {
        let template = layer_template(layer);
        let mut s = sender
            .open_kv_transfer_with(receiver_id, header, streams)
            .await?;
        s.send_opaque(&template).await?;
        Ok::<_, MeshError>(s.finish(KvTrailer::default()).await?)
    });
    let incoming = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(ev) = receiver_events.recv().await {
            if let MeshEvent::KvIncoming(i) = ev {
                return Some(i);
            }
        }
        None
    })
    .await
    .ok()
    .flatten()
    .ok_or_else(|| BenchError::Timeout("KV transfer never arrived".into()))?;
    let mut sink = VecSink::counting();
    incoming.receive(&mut sink).await.map_err(MeshError::from)?;
    let sent = send
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))??;
    Ok(sent.goodput() / (1u64 << 20) as f64)
}

/// One KV goodput case: `kv_mib` MiB between two fresh in-process nodes, compared with raw TCP
/// moving the same bytes right before.
pub async fn kv_goodput(
    opts: &MeshBenchOptions,
    quic: bool,
    streams: u16,
) -> Result<KvGoodput, BenchError> {
    let total = opts.kv_mib << 20;
    let layer = (opts.layer_mib << 20) as usize;
    let (rx_handle, mut rx_events) = Mesh::spawn(kv_config(quic))?;
    let (tx_handle, _tx_events) = Mesh::spawn(kv_config(quic))?;
    let addr = first_addr(&rx_handle).await?;
    tx_handle.dial(addr).await?;
    // Warm-up (connection windows, allocator) so neither side pays it in the measurement.
    mesh_kv_once(
        &tx_handle,
        rx_handle.local_peer_id(),
        &mut rx_events,
        16 << 20,
        layer,
        streams,
    )
    .await?;
    raw_tcp(16 << 20, layer).await?;
    let (raw, raw_cpu) = with_cpu(total, raw_tcp(total, layer)).await?;
    let (mesh, mesh_cpu) = with_cpu(
        total,
        mesh_kv_once(
            &tx_handle,
            rx_handle.local_peer_id(),
            &mut rx_events,
            total,
            layer,
            streams,
        ),
    )
    .await?;
    tx_handle.shutdown().await;
    rx_handle.shutdown().await;
    Ok(KvGoodput {
        transport: if quic { "quic" } else { "tcp" }.into(),
        streams,
        bytes: total,
        mesh_mib_s: mesh,
        raw_tcp_mib_s: raw,
        ratio: mesh / raw,
        mesh_cpu_s_per_gib: mesh_cpu,
        raw_tcp_cpu_s_per_gib: raw_cpu,
    })
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

/// How long [`scale`] waits for every node to know every other.
const CONVERGENCE_BOUND: Duration = Duration::from_secs(30);

/// Bootstrap peers per joining node in [`scale`]: a random graph of degree ≥ 3 is connected with
/// high probability and has a small diameter, unlike a star whose hub must relay every advert.
const BOOTSTRAP_PEERS: usize = 3;

/// Spawns `n` nodes, each bootstrapping to [`BOOTSTRAP_PEERS`] random earlier nodes (peers then
/// find more through adverts' listen addresses), measures convergence, then call → award rounds
/// from node 0.
pub async fn scale(n: usize, rounds: usize) -> Result<MeshScale, BenchError> {
    use rand_core::{Rng, SeedableRng};
    let mk = || {
        let mut c = MeshConfig::local();
        c.bandwidth.probes = false;
        // The DESIGN's advert period. Every advert costs each node ~mesh_n receptions and one
        // signature check, so N nodes in one process pay N² of them per period: faster periods
        // only measure the CPU.
        c.advert_interval = Duration::from_secs(1);
        c.advert_expiry = Duration::from_secs(10);
        // The default heartbeat (local() uses 100 ms for fast tests): N nodes in one process run
        // N heartbeats per period, each gossiping IHAVE lists to `gossip_lazy` peers.
        c.gossip_heartbeat = MeshConfig::default().gossip_heartbeat;
        c
    };
    let mut rng = rand_pcg::Pcg64Mcg::seed_from_u64(0x5EED_u64 ^ n as u64);
    // Convergence is timed from the first node's start: nodes already connect and publish while
    // later ones are spawned, so a later start would hide part of the work.
    let (t0, cpu0) = (Instant::now(), process_cpu_seconds());
    let mut addrs: Vec<Multiaddr> = Vec::with_capacity(n);
    let mut nodes = Vec::with_capacity(n);
    for i in 0..n {
        let mut c = mk();
        let mut picks: Vec<usize> = Vec::new();
        while picks.len() < BOOTSTRAP_PEERS.min(i) {
            let j = (rng.next_u64() % i as u64) as usize;
            if !picks.contains(&j) {
                picks.push(j);
            }
        }
        c.bootstrap = picks.iter().map(|&j| addrs[j].to_string()).collect();
        let (h, ev) = Mesh::spawn(c)?;
        // Set before the node has any peer, so its first advert already says what it serves.
        h.set_advert(AdvertBody {
            roles: vec![Role::Prefill, Role::Decode],
            models: vec![bench_model()],
            prefill_profile: vec![PrefillPoint {
                tokens: 512,
                tokens_per_sec: 250.0,
            }],
            price_per_1k_tokens: 1.0 + (i % 7) as f64,
            ..AdvertBody::default()
        })
        .await?;
        addrs.push(
            first_addr(&h)
                .await?
                .with(libp2p::multiaddr::Protocol::P2p(h.local_peer_id())),
        );
        nodes.push((h, ev));
    }
    let last_start = t0.elapsed();
    let ids: HashSet<PeerId> = nodes.iter().map(|(h, _)| h.local_peer_id()).collect();
    // Each node: count discoveries, then serve calls by bidding at once (until shut down).
    let (done_tx, mut done_rx) = mpsc::channel::<Duration>(n);
    let mut handles = Vec::new();
    let mut home_events = None;
    for (i, (h, mut ev)) in nodes.into_iter().enumerate() {
        let mut missing = ids.clone();
        missing.remove(&h.local_peer_id());
        let done = done_tx.clone();
        handles.push(h.clone());
        if i == 0 {
            // Home node: only needs convergence; its events are read here.
            home_events = Some(tokio::spawn(async move {
                while !missing.is_empty() {
                    match ev.recv().await {
                        Some(MeshEvent::PeerDiscovered { peer }) => {
                            missing.remove(&peer);
                        }
                        Some(_) => {}
                        None => return ev,
                    }
                }
                let _ = done.send(t0.elapsed()).await;
                // Keep draining so the queue never fills during the auction rounds.
                while ev.recv().await.is_some() {}
                ev
            }));
            continue;
        }
        tokio::spawn(async move {
            let mut reported = false;
            let mut bid_id = 0u64;
            while let Some(e) = ev.recv().await {
                match e {
                    MeshEvent::PeerDiscovered { peer } => {
                        missing.remove(&peer);
                        if missing.is_empty() && !reported {
                            reported = true;
                            let _ = done.send(t0.elapsed()).await;
                        }
                    }
                    MeshEvent::AuctionCall { token, .. } => {
                        bid_id += 1;
                        let bid = Bid {
                            request_id: 0,
                            bid_id,
                            price: 1.0 + (i % 7) as f64,
                            queue_delay_ms: 0,
                            // 2048 tokens at the advertised 250 tokens/s: homes check it.
                            est_prefill_ms: 8_200,
                            cached_tokens: 0,
                            valid_for_ms: 2_000,
                        };
                        let _ = h.answer_call(token, CallAnswer::Bid(bid)).await;
                    }
                    _ => {}
                }
            }
        });
    }
    drop(done_tx);
    let mut converged = 0;
    let mut last = Duration::ZERO;
    let deadline = tokio::time::Instant::now() + CONVERGENCE_BOUND;
    while converged < n {
        match tokio::time::timeout_at(deadline, done_rx.recv()).await {
            Ok(Some(t)) => {
                converged += 1;
                last = last.max(t);
            }
            _ => break,
        }
    }
    // Not converging is a result, not an error: report how many nodes did and still measure
    // the auction among the candidates the home knows.
    if converged < n {
        tracing::warn!(n, converged, "mesh did not converge within its bound");
    }
    let cpu_cores_converging = match (cpu0, process_cpu_seconds()) {
        (Some(a), Some(b)) => (b - a) / t0.elapsed().as_secs_f64().max(1e-9),
        _ => f64::NAN,
    };

    let home = handles[0].clone();
    let candidates: Vec<PeerId> = home
        .prefill_candidates(bench_model())
        .await?
        .into_iter()
        .map(|(p, _)| p)
        .take(8)
        .collect();
    let mut lat = Vec::with_capacity(rounds);
    let (mut no_bids, mut refused, mut bids, mut silent) = (0, 0, 0, 0);
    let (rounds_t0, rounds_cpu0) = (Instant::now(), process_cpu_seconds());
    for r in 0..rounds {
        let t = Instant::now();
        let call = Call {
            request_id: r as u64 + 1,
            model: bench_model(),
            prompt_len: 2048,
            cached_prefix_tokens: 0,
            prefix_block_hashes: vec![],
            kv_bytes_estimate: 48 << 20,
            deadline_ms: 1_000,
        };
        let round = home.call_auction(&candidates, call).await;
        // Which rounds miss the P99 goal, and when (RUST_LOG=prfaas_mesh=debug).
        if t.elapsed() > Duration::from_millis(50) {
            tracing::debug!(
                round = r,
                ms = t.elapsed().as_millis() as u64,
                since_start_ms = t0.elapsed().as_millis() as u64,
                silent = round.silent.len(),
                "slow auction round"
            );
        }
        bids += round.bids.len();
        silent += round.silent.len();
        let Some((winner, bid)) = round
            .bids
            .iter()
            .min_by(|a, b| a.1.price.total_cmp(&b.1.price))
            .cloned()
        else {
            no_bids += 1;
            continue;
        };
        let accepted = home
            .award(
                winner,
                Award {
                    request_id: r as u64 + 1,
                    bid_id: bid.bid_id,
                    price: bid.price,
                    tokens: Vec::new(),
                    kv_wire: Default::default(),
                },
            )
            .await?;
        if accepted {
            lat.push(t.elapsed().as_secs_f64() * 1e3);
        } else {
            refused += 1;
        }
    }
    let cpu_cores_during_rounds = match (rounds_cpu0, process_cpu_seconds()) {
        (Some(a), Some(b)) => (b - a) / rounds_t0.elapsed().as_secs_f64().max(1e-9),
        _ => f64::NAN,
    };
    let (mut adverts_accepted, mut adverts_from_sync, mut adverts_refused) = (0, 0, 0);
    let mut adverts_published = 0;
    for h in &handles {
        let st = h.stats();
        adverts_accepted += st.adverts_accepted;
        adverts_from_sync += st.adverts_from_sync;
        adverts_refused += st.refused_adverts;
        adverts_published += st.adverts_published;
    }
    for h in &handles {
        h.shutdown().await;
    }
    if let Some(t) = home_events {
        t.abort();
    }
    lat.sort_by(f64::total_cmp);
    Ok(MeshScale {
        nodes: n,
        convergence_ms: if converged == n {
            last.as_secs_f64() * 1e3
        } else {
            f64::NAN
        },
        convergence_after_last_start_ms: if converged == n {
            last.saturating_sub(last_start).as_secs_f64() * 1e3
        } else {
            f64::NAN
        },
        converged,
        rounds: lat.len(),
        rounds_tried: rounds,
        rounds_without_bids: no_bids,
        awards_refused: refused,
        bids,
        silent,
        candidates: candidates.len(),
        p50_ms: percentile(&lat, 0.5),
        p99_ms: percentile(&lat, 0.99),
        cpu_cores_during_rounds,
        cpu_cores_converging,
        adverts_accepted,
        adverts_from_sync,
        adverts_refused,
        adverts_published,
    })
}

/// Result of one shaped-link transfer (`prfaas bench mesh --kv-send`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ShapedGoodput {
    /// Configured `tbf` rate, Mbit/s.
    pub rate_mbit: f64,
    /// Bytes moved.
    pub bytes: u64,
    /// Achieved KV goodput, Mbit/s (payload only, end to end until the ack).
    pub goodput_mbit: f64,
    /// goodput / rate.
    pub ratio: f64,
}

/// Receiver half of the shaped bench: listens on `listen`, writes its full `/p2p` address to
/// `addr_file` (atomically, via rename), receives one transfer, then waits for the sender to hang up.
pub fn serve_kv(listen: &str, addr_file: &std::path::Path) -> Result<u64, BenchError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut cfg = kv_config(false);
        cfg.listen = vec![listen.to_string()];
        // A veth address inside the bench's own network namespace: nobody else can reach it.
        cfg.open = true;
        let (h, mut ev) = Mesh::spawn(cfg)?;
        let addr = first_addr(&h)
            .await?
            .with(libp2p::multiaddr::Protocol::P2p(h.local_peer_id()));
        let tmp = addr_file.with_extension("tmp");
        std::fs::write(&tmp, addr.to_string())?;
        std::fs::rename(&tmp, addr_file)?;
        let incoming = tokio::time::timeout(Duration::from_secs(60), async {
            while let Some(e) = ev.recv().await {
                if let MeshEvent::KvIncoming(i) = e {
                    return Some(i);
                }
            }
            None
        })
        .await
        .ok()
        .flatten()
        .ok_or_else(|| BenchError::Timeout("no transfer arrived".into()))?;
        let peer = incoming.peer();
        let mut sink = VecSink::counting();
        incoming.receive(&mut sink).await.map_err(MeshError::from)?;
        // Let the ack reach the sender before exiting: wait until it disconnects (bounded).
        let _ = tokio::time::timeout(Duration::from_secs(10), async {
            while let Some(e) = ev.recv().await {
                if matches!(e, MeshEvent::PeerDisconnected { peer: p } if p == peer) {
                    return;
                }
            }
        })
        .await;
        h.shutdown().await;
        Ok(sink.bytes)
    })
}

/// Sender half of the shaped bench: dials `addr`, moves `mib` MiB in 4 MiB layers over one stream.
pub fn send_kv(addr: &str, mib: u64, rate_mbit: f64) -> Result<ShapedGoodput, BenchError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let addr: Multiaddr = addr
            .parse()
            .map_err(|e| MeshError::Config(format!("address {addr}: {e}")))?;
        let mut cfg = kv_config(false);
        cfg.listen = vec![];
        cfg.limits.kv_idle_timeout = Duration::from_secs(120);
        let (h, _ev) = Mesh::spawn(cfg)?;
        let peer = h.dial(addr).await?;
        let total = mib << 20;
        let layer = 4usize << 20;
        let header = KvHeader::opaque(1, bench_model(), total, layer as u64, false);
        let template = layer_template(layer);
        let mut s = h.open_kv_transfer_with(peer, header, 1).await?;
        s.send_opaque(&template).await.map_err(MeshError::from)?;
        let sent = s
            .finish(KvTrailer::default())
            .await
            .map_err(MeshError::from)?;
        h.shutdown().await;
        let goodput_mbit = sent.goodput() * 8.0 / 1e6;
        Ok(ShapedGoodput {
            rate_mbit,
            bytes: sent.bytes,
            goodput_mbit,
            ratio: goodput_mbit / rate_mbit,
        })
    })
}

/// Raw TCP receiver for the shaped bench's baseline: listens on `listen` (`IP:PORT`, port 0 for
/// any), writes the bound `IP:PORT` to `addr_file` (atomically), reads one connection to its end
/// and answers one byte so the sender's clock covers delivery. Returns the bytes received.
pub fn serve_tcp(listen: &str, addr_file: &std::path::Path) -> Result<u64, BenchError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(listen).await?;
        let tmp = addr_file.with_extension("tmp");
        std::fs::write(&tmp, listener.local_addr()?.to_string())?;
        std::fs::rename(&tmp, addr_file)?;
        let (mut s, _) = tokio::time::timeout(Duration::from_secs(60), listener.accept())
            .await
            .map_err(|_| BenchError::Timeout("no raw TCP connection".into()))??;
        let mut len = [0u8; 8];
        s.read_exact(&mut len).await?;
        let total = u64::from_le_bytes(len);
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0u64;
        while got < total {
            let n = s.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            got += n as u64;
        }
        s.write_all(&[1]).await?;
        s.shutdown().await?;
        Ok(got)
    })
}

/// Raw TCP sender for the shaped bench's baseline: the same bytes as the mesh transfer, in
/// 4 MiB writes, timed until the receiver's one-byte answer.
pub fn send_tcp(addr: &str, mib: u64, rate_mbit: f64) -> Result<ShapedGoodput, BenchError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let total = mib << 20;
        let template = layer_template(4 << 20);
        let t0 = Instant::now();
        let mut c = tokio::net::TcpStream::connect(addr).await?;
        c.set_nodelay(true)?;
        c.write_all(&total.to_le_bytes()).await?;
        let mut sent = 0u64;
        while sent < total {
            let n = (total - sent).min(template.len() as u64) as usize;
            c.write_all(&template[..n]).await?;
            sent += n as u64;
        }
        let mut ack = [0u8; 1];
        c.read_exact(&mut ack).await?;
        let goodput_mbit = total as f64 * 8.0 / t0.elapsed().as_secs_f64() / 1e6;
        Ok(ShapedGoodput {
            rate_mbit,
            bytes: total,
            goodput_mbit,
            ratio: goodput_mbit / rate_mbit,
        })
    })
}
