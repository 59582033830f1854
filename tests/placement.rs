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

/// A decode home and two prefill peers behind links of `rates` bytes/s. The links are shaped
/// before the home knows its peers: its first probes (which start once it sees them) measure
/// the shaped links, never the raw loopback (a probe that ran before the links were shaped would
/// leave its estimate raw for `stale_after`: the likely cause of one loaded run where the slow
/// peer won). `home_cfg` adjusts the home's config before it starts.
async fn mesh_of_three(
    rates: (f64, f64),
    home_cfg: impl FnOnce(&mut NodeConfig),
) -> (NodeHandle, NodeHandle, NodeHandle) {
    let p1 = start(cfg("p1", &[NodeRole::Prefill], vec![])).await;
    let p2 = start(cfg("p2", &[NodeRole::Prefill], addrs_of(&p1).await)).await;
    let mut boot = addrs_of(&p1).await;
    boot.extend(addrs_of(&p2).await);
    let mut h = cfg("home", &[NodeRole::Decode], boot);
    home_cfg(&mut h);
    let home = start(h).await;
    link(&home, &p1, rates.0);
    link(&home, &p2, rates.1);
    wait_for_prefillers(&home, 2).await;
    wait_for_estimates(&home, &[&p1, &p2]).await;
    (home, p1, p2)
}

#[actix_rt::test]
async fn equal_prices_higher_bandwidth_wins() {
    // p1 sits behind a slow link, p2 behind a fast one; both ask the same price.
    let (home, p1, p2) = mesh_of_three((2.0e6, 200.0e6), |_| {}).await;
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
    // Both links are equally scarce; only p2 holds the prompt's prefix.
    let (home, p1, p2) = mesh_of_three((3.5e6, 3.5e6), |_| {}).await;
    let shared =
        "The shared system prompt that many requests start with, long enough to span blocks. "
            .repeat(3);
    let prefix = home.core.text.codec.encode(&shared, false).unwrap();
    p2.core
        .compute
        .prefill_and_discard(prefix)
        .await
        .expect("prefill ok");
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

/// Home + one prefill peer whose `t` is re-searched from measurements (adaptive threshold),
/// with bandwidth probes frequent enough to follow an emulated rate change.
async fn adaptive_pair() -> (NodeHandle, NodeHandle) {
    let tune = |mut c: NodeConfig| {
        // Measured profiles at two lengths, as in production (not the 100 tok/s seed).
        c.engine.calibration_tokens = 256;
        c.mesh.bandwidth.stale_after = Duration::from_millis(300);
        c.mesh.bandwidth.ewma_alpha = 0.9;
        c
    };
    let p1 = start(tune(cfg("p1", &[NodeRole::Prefill], vec![]))).await;
    let mut h = tune(cfg("home", &[NodeRole::Decode], addrs_of(&p1).await));
    h.policy.adaptive_threshold = true;
    h.policy.offload_threshold_tokens = 1;
    let home = start(h).await;
    wait_for_prefillers(&home, 1).await;
    (home, p1)
}

/// Prompts of varied lengths (byte tokens: 20 to ~330), each starting differently so no prefix
/// cache hit shortens it.
fn varied_prompts(round: usize) -> Vec<String> {
    (0..10)
        .map(|k| format!("{round}/{k}: ") + &"lorem ipsum ".repeat(2 + 3 * k))
        .collect()
}

/// Sends the prompts; returns how many were prefilled remotely.
async fn offloaded(home: &NodeHandle, prompts: &[String]) -> usize {
    let mut n = 0;
    for p in prompts {
        n += usize::from(run_text(home, p, 2).await.is_remote());
    }
    n
}

/// Whether the Prometheus text has a series `name…` with `label` whose line ends with `value`.
fn has_series(text: &str, name: &str, label: &str, value: &str) -> bool {
    text.lines()
        .any(|l| l.starts_with(name) && l.contains(label) && l.ends_with(value))
}

/// Waits (bounded) until `cond` holds on the home.
async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !cond() {
        assert!(
            t0.elapsed() < Duration::from_secs(90),
            "{what}: not after 90 s"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[actix_rt::test]
async fn threshold_and_offload_fraction_follow_the_link() {
    let (home, p1) = adaptive_pair().await;
    let core = home.core.clone();
    let t_now = || core.threshold.load(std::sync::atomic::Ordering::Relaxed);
    // A fast link: the throughput model splits the prompts between the home and its peer.
    link(&home, &p1, 1.0e9);
    wait_for_estimates(&home, &[&p1]).await;
    // Teach the home the lengths it homes, then let it search.
    offloaded(&home, &varied_prompts(0)).await;
    wait_until("first threshold search", || {
        core.metrics.threshold_searches.get() >= 1
    })
    .await;
    let t_fast = t_now();
    let off_fast = offloaded(&home, &varied_prompts(1)).await;
    // The link collapses to 1 MB/s: 4 KiB of KV per token now costs more than prefilling it.
    link(&home, &p1, 1.0e6);
    wait_until("the estimate follows the link", || {
        core.mesh
            .observed_bandwidth(&p1.peer_id())
            .is_some_and(|b| b.bytes_per_sec < 2.0e6)
    })
    .await;
    // t is re-searched with the slow estimate (not just with more prompts on the fast one).
    let searched_slow = || {
        core.threshold_status.lock().unwrap()["inputs"]["searched_bandwidth_bytes_per_s"]
            .as_f64()
            .is_some_and(|b| b < 2.0e6)
    };
    let t0 = Instant::now();
    while !(searched_slow() && t_now() > t_fast) {
        assert!(
            t0.elapsed() < Duration::from_secs(90),
            "t not re-searched for the slow link after 90 s (t_fast {t_fast}): {}",
            core.threshold_status.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let t_slow = t_now();
    let off_slow = offloaded(&home, &varied_prompts(2)).await;
    let status = core.threshold_status.lock().unwrap().clone();
    eprintln!("fast link: t = {t_fast}, offloaded {off_fast}/10; slow link: t = {t_slow}, offloaded {off_slow}/10");
    assert!(
        off_fast > 0 && off_slow < off_fast,
        "offloaded {off_fast}/10 on the fast link (t = {t_fast}), {off_slow}/10 on the slow one (t = {t_slow}); {status}"
    );
    assert_eq!(status["bandwidth_scarce"], true, "{status}");
    // The search's inputs are in /mesh and the metrics.
    let mesh = home.mesh_json().await;
    assert!(
        mesh["threshold"]["threshold_tokens"].as_u64() > Some(t_fast as u64),
        "{mesh}"
    );
    assert!(mesh["threshold"]["inputs"]["kv_bytes_per_token"].as_f64() > Some(0.0));
    let metrics = core.metrics.render();
    assert!(
        has_series(
            &metrics,
            "prfaas_threshold_input{",
            "kind=\"bandwidth_bytes_per_s\"",
            ""
        ),
        "{metrics}"
    );
    for n in [home, p1] {
        n.shutdown().await;
    }
}

#[actix_rt::test]
async fn ledger_settles_payments_and_caps_spend_per_peer() {
    let (home, p1, p2) = mesh_of_three((2.0e6, 200.0e6), |h| {
        // Any payment uses up a peer's allowance for the hour.
        h.policy.spend_cap_per_peer = Some(1e-12);
    })
    .await;
    let prompt = |k: usize| {
        format!("{k}: A long prompt that certainly exceeds the offload threshold of the home. ")
            .repeat(4)
    };
    // The fast peer wins first and is paid …
    let first = run_text(&home, &prompt(1), 2).await;
    assert_eq!(
        winner(&first.route),
        p2.peer_id().to_string(),
        "the fast peer should win the first prompt; p1 {}, p2 {}; the home's auctions: {:?}",
        p1.peer_id(),
        p2.peer_id(),
        home.core.recent_auctions()
    );
    let paid = |n: &NodeHandle, peer: &NodeHandle| {
        n.core
            .ledger
            .lock()
            .unwrap()
            .get(&peer.peer_id().to_string())
            .copied()
            .unwrap_or_default()
    };
    let to_p2 = paid(&home, &p2);
    assert!(to_p2.paid > 0.0 && to_p2.paid_count == 1, "{to_p2:?}");
    // … and the winner books what it earned once it has served the transfer (bounded wait).
    wait_until("p2 books its earnings", || paid(&p2, &home).earned > 0.0).await;
    assert!((paid(&p2, &home).earned - to_p2.paid).abs() < 1e-9);
    // Over its cap, p2 is not called again this period: the slow peer gets the next prompt.
    let second = run_text(&home, &prompt(2), 2).await;
    assert_eq!(
        winner(&second.route),
        p1.peer_id().to_string(),
        "the home's auctions: {:?}",
        home.core.recent_auctions()
    );
    let rec = home.core.recent_auctions().pop().expect("auction recorded");
    assert!(
        rec.bids
            .iter()
            .all(|b| b.bidder != p2.peer_id().to_string()),
        "{rec:?}"
    );
    let mesh = home.mesh_json().await;
    assert_eq!(mesh["ledger"].as_array().map(Vec::len), Some(2), "{mesh}");
    let metrics = home.core.metrics.render();
    assert!(metrics.contains("prfaas_settled_total{"), "{metrics}");
    for n in [home, p1, p2] {
        n.shutdown().await;
    }
}

#[actix_rt::test]
async fn pd_node_gives_up_prefill_when_decode_is_the_bottleneck() {
    use prfaas_mesh::policy::RoleMode;
    use prfaas_mesh::Role;
    let calibrated = |mut c: NodeConfig| {
        c.engine.calibration_tokens = 256;
        c
    };
    let p1 = start(calibrated(cfg("p1", &[NodeRole::Prefill], vec![]))).await;
    let p2 = start(calibrated(cfg(
        "p2",
        &[NodeRole::Prefill],
        addrs_of(&p1).await,
    )))
    .await;
    let mut boot = addrs_of(&p1).await;
    boot.extend(addrs_of(&p2).await);
    let mut h = calibrated(cfg("pd", &[NodeRole::Pd], boot));
    h.policy.role_conversion = true;
    h.policy.role_min_interval = Duration::ZERO;
    // One sequence per decode step: decode is the bottleneck whatever the machine's load does
    // to the measured prefill and step times.
    h.engine.max_batch = 1;
    let pd = start(h).await;
    wait_for_prefillers(&pd, 2).await;
    // Three nodes prefill, one decodes: once the pd node has measured its decode steps and the
    // prompts it homes, the advice is to move prefill capacity to decode.
    for k in 0..10 {
        run_text(
            &pd,
            &format!("{k}: {}", "decode-bound mesh ".repeat(2 + k)),
            4,
        )
        .await;
    }
    let core = pd.core.clone();
    let t0 = Instant::now();
    while core.role_mode().0 != RoleMode::DecodeOnly {
        assert!(
            t0.elapsed() < Duration::from_secs(90),
            "no role conversion after 90 s: {:?}, {}",
            core.role_mode(),
            pd.mesh_json().await["role"]
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(core.metrics.role_changes.get(), 1);
    // The mesh hears of it: p1 sees the pd node's advert without the prefill role.
    let seen_without_prefill = || async {
        p1.core
            .mesh
            .adverts()
            .await
            .unwrap_or_default()
            .iter()
            .any(|a| {
                a.peer == pd.peer_id()
                    && !a.advert.body.roles.contains(&Role::Prefill)
                    && a.advert.body.roles.contains(&Role::Decode)
            })
    };
    let t0 = Instant::now();
    while !seen_without_prefill().await {
        assert!(t0.elapsed() < Duration::from_secs(60), "advert not updated");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    // Still homes and decodes; declines to prefill for others.
    assert!(!run_text(&pd, "still serving after the switch", 2)
        .await
        .tokens
        .is_empty());
    let mesh = pd.mesh_json().await;
    assert_eq!(mesh["role"]["mode"], "decode_only", "{mesh}");
    assert!(has_series(
        &pd.core.metrics.render(),
        "prfaas_role{",
        "kind=\"decode\"",
        " 1"
    ));
    for n in [pd, p1, p2] {
        n.shutdown().await;
    }
}
