//! Bandwidth estimator fed by probe transfers, and the estimate reaching adverts.

mod common;

use std::time::{Duration, Instant};

use common::*;
use prfaas_mesh::MeshConfig;

fn probing() -> MeshConfig {
    let mut c = MeshConfig::local();
    c.bandwidth.probes = true;
    c.bandwidth.probe_bytes = 512 * 1024;
    c.bandwidth.min_sample_bytes = 256 * 1024;
    c.bandwidth.stale_after = Duration::from_secs(60);
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_seed_the_estimate_and_adverts_carry_it() {
    let nodes = star(2, |_| probing()).await;
    let (nodes, missing) = converge(nodes, Duration::from_secs(10)).await;
    assert_eq!(missing, 0);
    let (a, b) = (&nodes[0], &nodes[1]);
    // Probes start on the maintenance tick once the peer is known; poll the handle (bounded).
    let t0 = Instant::now();
    let mut est = None;
    while t0.elapsed() < Duration::from_secs(10) {
        est = a.handle.observed_bandwidth(&b.id());
        if est.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let est = est.expect("a probe measured the link within 10 s");
    assert!(
        est.bytes_per_sec > 1e6,
        "loopback goodput implausibly low: {est:?}"
    );
    // The next adverts of both nodes report the link.
    let t0 = Instant::now();
    let mut reported = false;
    while t0.elapsed() < Duration::from_secs(10) && !reported {
        let cands = b
            .handle
            .prefill_candidates(model())
            .await
            .expect("candidates");
        reported = cands.iter().any(|(_, adv)| {
            adv.observed_bandwidth
                .iter()
                .any(|r| r.peer == b.id().to_base58())
        });
        if !reported {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    assert!(reported, "advert does not carry the observed bandwidth");
}
