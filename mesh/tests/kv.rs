//! KV streams over real swarms: byte-identical delivery over 1 and 4 streams (TCP and QUIC),
//! every corruption class rejected with its typed error, limits enforced.
//!
//! Default size is 64 MiB so the debug test run stays fast; set `PRFAAS_KV_TEST_MIB=1024` to move
//! the full 1 GiB of the issue (do it with `--release`; `prfaas bench mesh` does it too).

mod common;

use std::time::Duration;

use common::*;
use futures::AsyncWriteExt;
use prfaas_mesh::kv::codec::{write_hello, write_piece};
use prfaas_mesh::kv::{
    FrameHeader, KvError, KvHeader, KvIncoming, KvSink, KvTrailer, PieceId, SinkError, StreamHello,
    KV_PROTOCOL,
};
use prfaas_mesh::{wire, MeshConfig, MeshEvent};

/// Tokens per "layer" in these transfers; every layer travels as two pieces.
const TOKENS: u32 = 16;

/// Deterministic contents, different per layer and token range.
fn piece_bytes(p: PieceId, len: usize) -> Vec<u8> {
    let mut x = 0x9E37_79B9u32 ^ p.layer.wrapping_mul(0x85EB_CA6B) ^ p.start.wrapping_mul(31);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// The two pieces of layer `l`, second half first (the receiver must place them by range).
fn halves(l: u32) -> [PieceId; 2] {
    let h = TOKENS / 2;
    [
        PieceId {
            layer: l,
            start: h,
            end: TOKENS,
        },
        PieceId {
            layer: l,
            start: 0,
            end: h,
        },
    ]
}

/// Checks each piece against the generator as it arrives (no need to keep it in memory), and
/// that no piece comes twice.
struct CheckingSink {
    piece_len: usize,
    seen: std::collections::HashSet<PieceId>,
    bytes: u64,
    trailer: Option<KvTrailer>,
}

impl KvSink for CheckingSink {
    fn write_piece(&mut self, piece: PieceId, bytes: Vec<u8>) -> Result<(), SinkError> {
        if !self.seen.insert(piece) {
            return Err(SinkError(format!("{piece:?} twice")));
        }
        if bytes != piece_bytes(piece, self.piece_len) {
            return Err(SinkError(format!("{piece:?} differs")));
        }
        self.bytes += bytes.len() as u64;
        Ok(())
    }
    fn finish(&mut self, trailer: KvTrailer) -> Result<(), SinkError> {
        self.trailer = Some(trailer);
        Ok(())
    }
}

fn header(layers: u32, piece_len: u64, pieces_per_layer: u64) -> KvHeader {
    KvHeader {
        request_id: 5,
        model: model(),
        layers,
        tokens: TOKENS,
        dtype: "f16".into(),
        max_piece_bytes: piece_len,
        total_bytes: u64::from(layers) * piece_len * pieces_per_layer,
        probe: false,
    }
}

/// These tests exercise the wire, not admission: the receiver takes transfers it was not told to
/// expect (`quotas_*` below test admission with the default).
fn cfg(quic: bool) -> MeshConfig {
    let mut c = MeshConfig::local();
    c.bandwidth.probes = false;
    c.limits.accept_unexpected_kv = true;
    if quic {
        c.quic = true;
        c.listen = vec!["/ip4/127.0.0.1/udp/0/quic-v1".into()];
    }
    c
}

async fn next_incoming(node: &mut Node) -> KvIncoming {
    wait_for(&mut node.events, Duration::from_secs(60), |ev| match ev {
        MeshEvent::KvIncoming(i) => Some(i),
        _ => None,
    })
    .await
    .expect("KvIncoming event")
}

async fn transfer(total_mib: u64, streams: u16, quic: bool) {
    let mut home = spawn(cfg(quic)).await;
    let winner = spawn(cfg(quic)).await;
    winner.handle.dial(home.p2p_addr()).await.expect("dial");
    let piece_len: usize = 2 << 20;
    let layers = (total_mib * (1 << 20) / (2 * piece_len as u64)) as u32;
    let h = header(layers, piece_len as u64, 2);
    let home_id = home.id();
    let send = tokio::spawn(async move {
        let mut s = winner
            .handle
            .open_kv_transfer_with(home_id, h, streams)
            .await
            .expect("open");
        for l in 0..layers {
            for p in halves(l) {
                s.send_piece(p, piece_bytes(p, piece_len))
                    .await
                    .expect("send piece");
            }
        }
        let sent = s
            .finish(KvTrailer {
                first_token: Some(17),
                payload: vec![1, 2, 3],
            })
            .await
            .expect("finish");
        (sent, winner)
    });
    let incoming = next_incoming(&mut home).await;
    assert_eq!(incoming.stream_count(), streams);
    assert_eq!(incoming.header().layers, layers);
    let mut sink = CheckingSink {
        piece_len,
        seen: Default::default(),
        bytes: 0,
        trailer: None,
    };
    let got = incoming.receive(&mut sink).await.expect("receive");
    let (sent, winner) = send.await.expect("join");
    assert_eq!(sink.seen.len(), 2 * layers as usize);
    assert_eq!(got.bytes, total_mib << 20);
    assert_eq!(sent.bytes, total_mib << 20);
    assert_eq!(sink.trailer.as_ref().and_then(|t| t.first_token), Some(17));
    assert_eq!(sink.trailer.map(|t| t.payload), Some(vec![1, 2, 3]));
    assert_eq!(
        sent.busy.as_micros(),
        got.busy.as_micros(),
        "the sender learns the receiver's busy time"
    );
    assert!(got.busy <= got.elapsed);
    eprintln!(
        "{total_mib} MiB over {streams} {} stream(s): {:.1} MiB/s",
        if quic { "QUIC" } else { "TCP" },
        sent.goodput() / (1u64 << 20) as f64
    );
    // Both ends now have a bandwidth estimate for the other.
    assert!(home.handle.observed_bandwidth(&winner.id()).is_some());
    assert!(winner.handle.observed_bandwidth(&home_id).is_some());
}

fn test_mib() -> u64 {
    std::env::var("PRFAAS_KV_TEST_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_one_stream_tcp_byte_identical() {
    transfer(test_mib(), 1, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_four_streams_tcp_byte_identical() {
    transfer(test_mib(), 4, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_four_streams_quic_byte_identical() {
    transfer(test_mib().min(64), 4, true).await;
}

/// What a hand-crafted (malicious or broken) sender puts on a single stream after the hello.
enum Craft {
    Piece { piece: PieceId, bytes: Vec<u8> },
    Raw(FrameHeader, Vec<u8>),
    End(Option<KvTrailer>),
    Close,
}

async fn crafted(h: KvHeader, frames: Vec<Craft>, mut limits: MeshConfig) -> KvError {
    limits.bandwidth.probes = false;
    let mut home = spawn(limits).await;
    let sender = spawn(cfg(false)).await;
    sender.handle.dial(home.p2p_addr()).await.expect("dial");
    let home_id = home.id();
    let mut control = sender.handle.kv_control();
    let writer = tokio::spawn(async move {
        let mut s = control
            .open_stream(home_id, KV_PROTOCOL)
            .await
            .expect("open");
        let hello = StreamHello {
            transfer_id: 1,
            stream_index: 0,
            stream_count: 1,
            header: h,
        };
        write_hello(&mut s, &hello).await.expect("hello");
        for f in frames {
            let r = match f {
                Craft::Piece { piece, bytes } => write_piece(&mut s, piece, &bytes)
                    .await
                    .map_err(|e| e.to_string()),
                Craft::Raw(fh, bytes) => {
                    let r = wire::write_framed(&mut s, &fh, 1 << 20)
                        .await
                        .map_err(|e| e.to_string());
                    if r.is_ok() {
                        s.write_all(&bytes).await.map_err(|e| e.to_string())
                    } else {
                        r
                    }
                }
                Craft::End(t) => {
                    wire::write_framed(&mut s, &FrameHeader::End { trailer: t }, 1 << 20)
                        .await
                        .map_err(|e| e.to_string())
                }
                Craft::Close => s.close().await.map_err(|e| e.to_string()),
            };
            if r.is_err() {
                break; // the receiver may reset the stream once it saw enough
            }
        }
        let _ = s.flush().await;
        // Keep the stream open until the receiver decided, so "truncated" means an explicit close.
        (s, sender)
    });
    let incoming = next_incoming(&mut home).await;
    let mut sink = prfaas_mesh::kv::VecSink::keeping();
    let err = incoming
        .receive(&mut sink)
        .await
        .expect_err("must be rejected");
    drop(writer);
    err
}

fn whole(l: u32) -> PieceId {
    PieceId {
        layer: l,
        start: 0,
        end: TOKENS,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_rejects_each_corruption_class() {
    let good = |l: u32| Craft::Piece {
        piece: whole(l),
        bytes: piece_bytes(whole(l), 1000),
    };
    // Truncated: the stream closes in the middle of piece 1's payload.
    let err = crafted(
        header(2, 1000, 1),
        vec![
            good(0),
            Craft::Raw(
                FrameHeader::Piece {
                    piece: whole(1),
                    byte_len: 1000,
                    checksum: 0,
                },
                vec![0; 10],
            ),
            Craft::Close,
        ],
        cfg(false),
    )
    .await;
    assert!(matches!(err, KvError::Truncated(_)), "truncated: {err}");

    // Truncated: End (with a trailer) before every announced byte arrived.
    let err = crafted(
        header(3, 1000, 1),
        vec![good(0), Craft::End(Some(KvTrailer::default()))],
        cfg(false),
    )
    .await;
    assert!(matches!(err, KvError::Truncated(_)), "early end: {err}");

    // A piece outside the announced layers or tokens.
    for bad in [
        PieceId {
            layer: 2,
            start: 0,
            end: 1,
        },
        PieceId {
            layer: 0,
            start: 4,
            end: TOKENS + 1,
        },
        PieceId {
            layer: 0,
            start: 5,
            end: 5,
        },
    ] {
        let err = crafted(
            header(2, 1000, 1),
            vec![Craft::Piece {
                piece: bad,
                bytes: piece_bytes(bad, 1000),
            }],
            cfg(false),
        )
        .await;
        assert!(matches!(err, KvError::OutOfRange { .. }), "range: {err}");
    }

    // Corrupt payload (checksum of different bytes).
    let bytes = piece_bytes(whole(0), 1000);
    let err = crafted(
        header(1, 1000, 1),
        vec![Craft::Raw(
            FrameHeader::Piece {
                piece: whole(0),
                byte_len: 1000,
                checksum: prfaas_mesh::kv::protocol::checksum(&bytes) ^ 1,
            },
            bytes,
        )],
        cfg(false),
    )
    .await;
    assert!(matches!(err, KvError::Corrupt { .. }), "corrupt: {err}");

    // Oversized: frame above the header's max_piece_bytes.
    let err = crafted(
        header(1, 1000, 1),
        vec![Craft::Piece {
            piece: whole(0),
            bytes: vec![0; 1001],
        }],
        cfg(false),
    )
    .await;
    assert!(
        matches!(err, KvError::Oversized { .. }),
        "oversized frame: {err}"
    );

    // Oversized: more bytes than the announced total (each frame within its own bound).
    let mut h = header(2, 1000, 1);
    h.total_bytes = 1500;
    let err = crafted(h, vec![good(0), good(1)], cfg(false)).await;
    assert!(
        matches!(err, KvError::Oversized { .. }),
        "over total: {err}"
    );

    // Oversized: header announces more than the receiver's configured maximum.
    let mut small = cfg(false);
    small.limits.max_transfer_bytes = 1024;
    let err = crafted(header(2, 1000, 1), vec![good(0), good(1)], small).await;
    assert!(
        matches!(err, KvError::Oversized { .. }),
        "over local max: {err}"
    );

    // Missing trailer on stream 0.
    let err = crafted(
        header(1, 1000, 1),
        vec![good(0), Craft::End(None)],
        cfg(false),
    )
    .await;
    assert!(matches!(err, KvError::Truncated(_)), "no trailer: {err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sender_sees_rejection_by_sink() {
    struct Refusing;
    impl KvSink for Refusing {
        fn write_piece(&mut self, _: PieceId, _: Vec<u8>) -> Result<(), SinkError> {
            Err(SinkError("no free KV blocks".into()))
        }
        fn finish(&mut self, _: KvTrailer) -> Result<(), SinkError> {
            Ok(())
        }
    }
    let mut home = spawn(cfg(false)).await;
    let winner = spawn(cfg(false)).await;
    winner.handle.dial(home.p2p_addr()).await.expect("dial");
    let home_id = home.id();
    let send = tokio::spawn(async move {
        let mut s = winner
            .handle
            .open_kv_transfer_with(home_id, header(2, 1000, 1), 2)
            .await
            .expect("open");
        let mut r = Ok(());
        for l in 0..2 {
            r = s.send_piece(whole(l), piece_bytes(whole(l), 1000)).await;
            if r.is_err() {
                break;
            }
        }
        match r {
            Ok(()) => s.finish(KvTrailer::default()).await.map(|_| ()),
            Err(e) => Err(e),
        }
    });
    let inc = next_incoming(&mut home).await;
    let err = inc.receive(&mut Refusing).await.expect_err("sink refuses");
    assert!(matches!(err, KvError::Sink(_)));
    let sent = send.await.expect("join");
    assert!(sent.is_err(), "sender must not report success");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sender_api_enforces_bounds() {
    let home = spawn(cfg(false)).await;
    let winner = spawn(cfg(false)).await;
    winner.handle.dial(home.p2p_addr()).await.expect("dial");
    let mut s = winner
        .handle
        .open_kv_transfer(home.id(), header(2, 100, 1))
        .await
        .expect("open");
    let outside = PieceId {
        layer: 2,
        start: 0,
        end: 1,
    };
    assert!(matches!(
        s.send_piece(outside, vec![0; 100]).await,
        Err(KvError::Usage(_))
    ));
    assert!(matches!(
        s.send_piece(whole(0), vec![0; 101]).await,
        Err(KvError::Usage(_))
    ));
    s.send_piece(whole(1), vec![0; 100]).await.expect("piece");
    assert!(matches!(
        s.finish(KvTrailer::default()).await,
        Err(KvError::Usage(_))
    ));
}

/// The goodput a transfer reports (and feeds the bandwidth estimator) is the link's rate, even
/// when the producer idles between pieces as a prefill does between chunks: only time during
/// which a piece was arriving counts. The link here is the emulated rate (a token bucket with a
/// 4 ms burst), which also must not let the idle producer bank credit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn goodput_measures_the_link_not_the_producer() {
    let mut home = spawn(cfg(false)).await;
    let winner = spawn(cfg(false)).await;
    winner.handle.dial(home.p2p_addr()).await.expect("dial");
    let rate = 8e6; // bytes/s: 131 ms per piece; the 4 ms burst is 3% of a piece
    winner.handle.set_emulated_bandwidth(home.id(), Some(rate));
    let (layers, piece_len) = (8u32, 1 << 20);
    let home_id = home.id();
    let send = tokio::spawn(async move {
        let mut s = winner
            .handle
            .open_kv_transfer_with(home_id, header(layers, piece_len as u64, 1), 1)
            .await
            .expect("open");
        for l in 0..layers {
            // The "prefill" of the next chunk: the link idles meanwhile.
            tokio::time::sleep(std::time::Duration::from_millis(250)).await;
            s.send_piece(whole(l), piece_bytes(whole(l), piece_len))
                .await
                .expect("send");
        }
        let sent = s.finish(KvTrailer::default()).await.expect("finish");
        (sent, winner)
    });
    let mut sink = CheckingSink {
        piece_len,
        seen: Default::default(),
        bytes: 0,
        trailer: None,
    };
    let got = next_incoming(&mut home)
        .await
        .receive(&mut sink)
        .await
        .expect("receive");
    let (sent, winner) = send.await.expect("join");
    let naive = got.bytes as f64 / got.elapsed.as_secs_f64();
    eprintln!(
        "link {:.2} MB/s: receiver measured {:.2}, sender {:.2}, bytes/elapsed {:.2}",
        rate / 1e6,
        got.goodput() / 1e6,
        sent.goodput() / 1e6,
        naive / 1e6
    );
    for (who, g) in [("receiver", got.goodput()), ("sender", sent.goodput())] {
        assert!(
            (g / rate - 1.0).abs() < 0.10,
            "{who} measured {g:.0} B/s on a {rate:.0} B/s link"
        );
    }
    assert!(naive < 0.5 * rate, "the producer really idled");
    let est = home
        .handle
        .observed_bandwidth(&winner.id())
        .expect("estimate");
    assert!((est.bytes_per_sec / rate - 1.0).abs() < 0.10, "{est:?}");
}

/// Waits (bounded) until `check` holds for the home's counters.
async fn counters_reach(
    node: &Node,
    what: &str,
    check: impl Fn(&prfaas_mesh::MeshStatsSnapshot) -> bool,
) {
    let t0 = std::time::Instant::now();
    while !check(&node.handle.stats()) {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "{what}: counters never got there: {:?}",
            node.handle.stats()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Admission with the default config: a transfer nobody awaits is refused at its hello and
/// counted (`unexpected`); nothing reaches the application. The same transfer is taken once the
/// home expects it from that peer (as it does when it awards).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quotas_refuse_transfers_nobody_awaits() {
    let mut strict = MeshConfig::local();
    strict.bandwidth.probes = false;
    assert!(!strict.limits.accept_unexpected_kv, "the default is strict");
    let mut home = spawn(strict).await;
    let winner = spawn(cfg(false)).await;
    winner.handle.dial(home.p2p_addr()).await.expect("dial");
    let (home_id, winner_id) = (home.id(), winner.id());
    let send = |h: prfaas_mesh::MeshHandle| async move {
        let mut s = h.open_kv_transfer(home_id, header(1, 100, 1)).await?;
        s.send_piece(whole(0), piece_bytes(whole(0), 100)).await?;
        s.finish(KvTrailer::default()).await?;
        Ok::<(), prfaas_mesh::MeshError>(())
    };
    let refused = tokio::time::timeout(Duration::from_secs(30), send(winner.handle.clone()))
        .await
        .expect("the refusal reaches the sender");
    assert!(refused.is_err(), "an unexpected transfer must not succeed");
    counters_reach(&home, "unexpected", |s| s.kv_refused_unexpected == 1).await;

    // Another request id from the same peer is still unexpected.
    let _other = home.handle.expect_kv(winner_id, 6).expect("room");
    let refused = tokio::time::timeout(Duration::from_secs(30), send(winner.handle.clone()))
        .await
        .expect("the refusal reaches the sender");
    assert!(refused.is_err());
    counters_reach(&home, "unexpected", |s| s.kv_refused_unexpected == 2).await;

    let _award = home.handle.expect_kv(winner_id, 5).expect("room");
    let sending = tokio::spawn(send(winner.handle.clone()));
    let incoming = next_incoming(&mut home).await;
    assert_eq!(incoming.peer(), winner_id);
    let mut sink = prfaas_mesh::kv::VecSink::keeping();
    incoming.receive(&mut sink).await.expect("awaited transfer");
    sending.await.expect("join").expect("sent");
    assert_eq!(sink.bytes, 100);
    assert_eq!(home.handle.stats().kv_refused_unexpected, 2);
}

/// Opens `n` KV streams from `flooder` to `home` and writes one byte of a length prefix on
/// each: their hellos never complete, so each holds a hello slot while its reader waits. Streams
/// the home refuses are reset by it, so their writes may fail.
async fn hold_unfinished_hellos(
    flooder: &Node,
    home: prfaas_mesh::PeerId,
    n: usize,
) -> Vec<libp2p::Stream> {
    let mut control = flooder.handle.kv_control();
    let mut held = Vec::with_capacity(n);
    for _ in 0..n {
        let mut s = control.open_stream(home, KV_PROTOCOL).await.expect("open");
        let _ = s.write_all(&[0]).await;
        let _ = s.flush().await;
        held.push(s);
    }
    held
}

/// One peer cannot hold more than its share of hello slots: streams whose hello never completes
/// beyond `max_kv_hellos_per_peer` are refused and counted (`hello_quota`); another peer still
/// gets in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quotas_bound_hellos_per_peer() {
    let mut c = MeshConfig::local();
    c.bandwidth.probes = false;
    c.limits.max_kv_hellos_per_peer = 2;
    c.limits.accept_unexpected_kv = true;
    let mut home = spawn(c).await;
    let flooder = spawn(cfg(false)).await;
    flooder.handle.dial(home.p2p_addr()).await.expect("dial");
    let home_id = home.id();
    let held = hold_unfinished_hellos(&flooder, home_id, 5).await;
    counters_reach(&home, "hello_quota", |s| s.kv_refused_hello_quota == 3).await;

    // An honest peer is not affected by the flooder's share.
    let honest = spawn(cfg(false)).await;
    honest.handle.dial(home.p2p_addr()).await.expect("dial");
    let h = honest.handle.clone();
    let sending = tokio::spawn(async move {
        let mut s = h.open_kv_transfer(home_id, header(1, 100, 1)).await?;
        s.send_piece(whole(0), piece_bytes(whole(0), 100)).await?;
        s.finish(KvTrailer::default()).await?;
        Ok::<(), prfaas_mesh::MeshError>(())
    });
    let incoming = next_incoming(&mut home).await;
    assert_eq!(incoming.peer(), honest.id());
    let mut sink = prfaas_mesh::kv::VecSink::counting();
    incoming.receive(&mut sink).await.expect("honest transfer");
    sending.await.expect("join").expect("sent");
    assert_eq!(home.handle.stats().kv_refused_hello_quota, 3);
    drop(held);
}

/// Peers nobody awaits a transfer from share a bounded pool of hello slots; a flood of them
/// (many identities, each within its own quota) can fill that pool, but a winner the home
/// awaits reads its hellos outside it and still gets its transfer in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn awaited_winner_gets_in_when_strangers_hold_every_shared_hello_slot() {
    let mut c = MeshConfig::local();
    c.bandwidth.probes = false;
    // 4 × max_pending_transfers = 4 shared hello slots.
    c.limits.max_pending_transfers = 1;
    c.limits.max_kv_hellos_per_peer = 8;
    let mut home = spawn(c).await;
    let home_id = home.id();
    let flooder = spawn(cfg(false)).await;
    flooder.handle.dial(home.p2p_addr()).await.expect("dial");
    let held = hold_unfinished_hellos(&flooder, home_id, 6).await;
    // Streams past the four shared slots are refused at once (`hello_quota`); on a slow machine
    // a held hello may also time out first (`refused_kv` without a reason counter). Either way
    // the flooder has spent the pool by then.
    counters_reach(&home, "shared hello slots full", |s| s.refused_kv >= 2).await;

    let winner = spawn(cfg(false)).await;
    winner.handle.dial(home.p2p_addr()).await.expect("dial");
    let _award = home.handle.expect_kv(winner.id(), 5).expect("room");
    let h = winner.handle.clone();
    let sending = tokio::spawn(async move {
        let mut s = h.open_kv_transfer(home_id, header(1, 100, 1)).await?;
        s.send_piece(whole(0), piece_bytes(whole(0), 100)).await?;
        s.finish(KvTrailer::default()).await?;
        Ok::<(), prfaas_mesh::MeshError>(())
    });
    let incoming = next_incoming(&mut home).await;
    assert_eq!(incoming.peer(), winner.id());
    let mut sink = prfaas_mesh::kv::VecSink::counting();
    incoming
        .receive(&mut sink)
        .await
        .expect("the awaited transfer");
    sending.await.expect("join").expect("sent");
    drop(held);
}
