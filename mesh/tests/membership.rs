//! Membership heals: nodes may start in any order, a restarted peer (same identity, new
//! process) and a healed partition are reconnected within seconds, by redialling with backoff.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use prfaas_mesh::identity::Keypair;
use prfaas_mesh::multiaddr::Protocol;
use prfaas_mesh::{Mesh, MeshConfig, MeshEvent, Multiaddr, PeerId};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// How long a reconnection may take: the redial backoff is capped at 5 s by default; these
/// tests cap it at 1 s, so a few seconds cover a loaded machine.
const HEAL: Duration = Duration::from_secs(10);

fn fast_redial() -> MeshConfig {
    let mut c = MeshConfig::local();
    c.redial.initial = Duration::from_millis(100);
    c.redial.max = Duration::from_secs(1);
    c
}

/// A free loopback TCP port (bound and released; nothing else on this machine picks ports
/// from the ephemeral range by number, so it stays free for the moment the test needs it).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind port 0")
        .port()
}

fn addr_of(port: u16, peer: PeerId) -> Multiaddr {
    format!("/ip4/127.0.0.1/tcp/{port}")
        .parse::<Multiaddr>()
        .expect("addr")
        .with(Protocol::P2p(peer))
}

/// The node with `key`, listening on `port`.
async fn listener(key: &Keypair, port: u16) -> Node {
    let mut c = fast_redial();
    c.keypair = Some(key.clone());
    c.listen = vec![format!("/ip4/127.0.0.1/tcp/{port}")];
    spawn(c).await
}

async fn connected(events: &mut mpsc::Receiver<MeshEvent>, to: PeerId) -> bool {
    wait_for(events, HEAL, |ev| match ev {
        MeshEvent::PeerConnected { peer } if peer == to => Some(()),
        _ => None,
    })
    .await
    .is_some()
}

async fn disconnected(events: &mut mpsc::Receiver<MeshEvent>, from: PeerId) -> bool {
    wait_for(events, HEAL, |ev| match ev {
        MeshEvent::PeerDisconnected { peer } if peer == from => Some(()),
        _ => None,
    })
    .await
    .is_some()
}

/// The report: a decode node started before its bootstrap prefill node dialled once,
/// failed silently and stayed alone. Now it retries until the peer is up, and counts failures.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_may_start_in_any_order_and_a_restarted_peer_is_rejoined() {
    let key = Keypair::generate_ed25519();
    let peer = key.public().to_peer_id();
    let port = free_port();
    let mut c = fast_redial();
    c.bootstrap = vec![addr_of(port, peer).to_string()];
    let mut early = spawn(c).await;
    // Its bootstrap peer is not running: dials fail (and are counted) until it is.
    let t0 = tokio::time::Instant::now();
    while early.handle.stats().dials_failed < 2 {
        assert!(t0.elapsed() < HEAL, "no failed dial counted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let late = listener(&key, port).await;
    assert!(connected(&mut early.events, peer).await, "never joined");

    // The peer restarts: same identity and address, new process.
    late.handle.shutdown().await;
    assert!(disconnected(&mut early.events, peer).await);
    let restarted = listener(&key, port).await;
    assert!(
        connected(&mut early.events, peer).await,
        "restarted peer not rejoined"
    );
    restarted
        .handle
        .set_advert(prefill_body(0, 1.0))
        .await
        .expect("advert");
    let t0 = tokio::time::Instant::now();
    while early
        .handle
        .prefill_candidates(model())
        .await
        .expect("candidates")
        .is_empty()
    {
        assert!(t0.elapsed() < HEAL, "restarted peer's advert never arrived");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    restarted.handle.shutdown().await;
    early.handle.shutdown().await;
}

/// A TCP relay that can cut every connection through it and refuse new ones (a partition),
/// then let them through again (the partition heals).
struct Relay {
    port: u16,
    cut: Arc<AtomicBool>,
    stop: tokio_util::sync::CancellationToken,
}

impl Relay {
    async fn start(to: u16) -> Self {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("relay bind");
        let port = l.local_addr().expect("relay addr").port();
        let cut = Arc::new(AtomicBool::new(false));
        let stop = tokio_util::sync::CancellationToken::new();
        let (c, s) = (cut.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = s.cancelled() => return,
                    a = l.accept() => a,
                };
                let Ok((inbound, _)) = accepted else { continue };
                if c.load(Ordering::Acquire) {
                    continue; // dropped: the dialler sees the connection close
                }
                let (c, s) = (c.clone(), s.clone());
                tokio::spawn(async move {
                    let Ok(outbound) = TcpStream::connect(("127.0.0.1", to)).await else {
                        return;
                    };
                    let (mut a, mut b) = (inbound, outbound);
                    let copy = tokio::io::copy_bidirectional(&mut a, &mut b);
                    let cut_now = async {
                        while !c.load(Ordering::Acquire) {
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                    };
                    tokio::select! {
                        _ = copy => {}
                        _ = cut_now => {}
                        _ = s.cancelled() => {}
                    }
                });
            }
        });
        Self { port, cut, stop }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A partition between a dial-only home and its peer (the relay is the only path) heals: the
/// home redials and the mesh re-forms within seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_reforms_after_a_partition_heals() {
    let mut far = spawn(fast_redial()).await;
    let far_port = far
        .addr
        .iter()
        .find_map(|p| match p {
            Protocol::Tcp(p) => Some(p),
            _ => None,
        })
        .expect("tcp port");
    let relay = Relay::start(far_port).await;
    let mut c = fast_redial();
    c.listen = vec![]; // dial-only: the far side cannot go around the relay
    c.bootstrap = vec![addr_of(relay.port, far.id()).to_string()];
    let (home, mut home_ev) = Mesh::spawn(c).expect("spawn home");
    assert!(connected(&mut home_ev, far.id()).await, "first join");
    let home_id = home.local_peer_id();
    let far_saw = wait_for(&mut far.events, HEAL, |ev| {
        eprintln!("far: {ev:?}");
        matches!(ev, MeshEvent::PeerConnected { peer } if peer == home_id).then_some(())
    })
    .await;
    assert!(far_saw.is_some(), "far side of the first join");

    relay.cut.store(true, Ordering::Release);
    assert!(disconnected(&mut home_ev, far.id()).await, "partition");

    // While cut, redials fail (counted).
    let failed = home.stats().dials_failed;
    let t0 = tokio::time::Instant::now();
    while home.stats().dials_failed <= failed {
        assert!(t0.elapsed() < HEAL, "no redial while partitioned");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    relay.cut.store(false, Ordering::Release);
    let healed = tokio::time::Instant::now();
    assert!(connected(&mut home_ev, far.id()).await, "not re-formed");
    eprintln!(
        "re-formed {:?} after the partition healed",
        healed.elapsed()
    );
    home.shutdown().await;
    far.handle.shutdown().await;
}
