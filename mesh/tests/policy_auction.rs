//! Auction properties required by issue 6: (a) equal price → higher bandwidth wins, (b) equal
//! bandwidth → lower price wins, (c) a cached prefix wins when bandwidth is scarce, (d)
//! misreporting one's price never helps a bidder (single auctions and auctions recorded from the
//! simulator).

use prfaas_mesh::policy::{
    settle, Bid, OffloadRule, Placement, PrefillProfile, ProfilePoint, RequestShape, ScoringParams,
};
use prfaas_mesh::sim::{self, engine, PolicyKind, Scenario};
use proptest::prelude::*;

const SP: ScoringParams = ScoringParams {
    lambda_per_s: 1.0,
    max_score: 1e6,
    reserve_delay_weight: 1.0,
};
const GBPS: f64 = 1e9 / 8.0;

fn remote(bidder: u32, price: f64, prefill_s: f64, kv_bytes: f64) -> Bid {
    Bid {
        bidder,
        price,
        queue_delay_s: 0.0,
        prefill_s,
        kv_bytes,
        reserve: false,
    }
}

#[test]
fn a_equal_price_higher_bandwidth_wins() {
    for (slow, fast) in [(1.0, 10.0), (10.0, 100.0), (0.5, 0.6)] {
        let bids = [
            (remote(1, 0.5, 1.0, 700e6), slow * GBPS),
            (remote(2, 0.5, 1.0, 700e6), fast * GBPS),
        ];
        assert_eq!(
            settle(&bids, &SP).unwrap().bidder,
            2,
            "{slow} vs {fast} Gbps"
        );
        let swapped = [bids[1], bids[0]];
        assert_eq!(settle(&swapped, &SP).unwrap().bidder, 2);
    }
}

#[test]
fn b_equal_bandwidth_lower_price_wins() {
    for (cheap, dear) in [(0.1, 0.2), (1.0, 1.0001), (0.0, 5.0)] {
        let bids = [
            (remote(1, dear, 1.0, 700e6), 10.0 * GBPS),
            (remote(2, cheap, 1.0, 700e6), 10.0 * GBPS),
        ];
        let a = settle(&bids, &SP).unwrap();
        assert_eq!(a.bidder, 2, "{cheap} vs {dear}");
        // Second score: paid exactly the price at which it would tie the runner-up.
        assert!((a.payment - dear).abs() < 1e-9);
    }
}

fn profile(scale: f64) -> PrefillProfile {
    let mib = 1024.0 * 1024.0;
    PrefillProfile::new(
        [
            (1024.0, 0.44, 190.8),
            (8192.0, 0.72, 308.9),
            (32768.0, 1.84, 701.3),
            (131072.0, 7.40, 2316.3),
        ]
        .into_iter()
        .map(|(t, s, m)| ProfilePoint {
            tokens: t,
            prefill_s: s * scale,
            kv_bytes: m * mib,
        })
        .collect(),
    )
    .unwrap()
}

/// The home's own (slower, H20-like) prefill holds 24K of a 32K prompt; a remote H200-like node
/// holds nothing. With plenty of bandwidth the remote's speed wins; when bandwidth is scarce the
/// cached prefix wins, both in the auction and in the router's prefix rule.
#[test]
fn c_cached_prefix_wins_when_bandwidth_is_scarce() {
    let (h20, h200) = (profile(2.6657), profile(1.0));
    let (total, cached) = (32768.0, 24576.0);
    let reserve = Bid {
        bidder: 0,
        price: 0.001 * (total - cached) / 1000.0,
        queue_delay_s: 0.0,
        prefill_s: h20.incremental_prefill_time(total, cached),
        kv_bytes: 0.0,
        reserve: true,
    };
    let far = remote(
        1,
        0.001 * total / 1000.0,
        h200.prefill_time(total),
        h200.kv_bytes(total),
    );
    let rich = settle(&[(reserve, f64::INFINITY), (far, 100.0 * GBPS)], &SP).unwrap();
    assert_eq!(
        rich.bidder, 1,
        "abundant bandwidth: the faster remote should win"
    );
    let poor = settle(&[(reserve, f64::INFINITY), (far, 5.0 * GBPS)], &SP).unwrap();
    assert_eq!(
        poor.bidder, 0,
        "scarce bandwidth: the cached prefix should win"
    );
    assert!(poor.reserve && poor.payment == 0.0);

    // Same with two remote bidders on the same scarce link: the one holding the prefix asks less
    // and finishes sooner.
    let holder = remote(
        2,
        0.001 * (total - cached) / 1000.0,
        h200.incremental_prefill_time(total, cached),
        h200.kv_bytes(total),
    );
    let a = settle(&[(far, 5.0 * GBPS), (holder, 5.0 * GBPS)], &SP).unwrap();
    assert_eq!(a.bidder, 2);

    // The router's prefix rule: under scarce bandwidth only the local cache counts.
    let rule = OffloadRule {
        threshold_tokens: 19_400.0,
    };
    let shape = RequestShape {
        total_tokens: total,
        cached_local_tokens: cached,
        cached_remote_tokens: 0.0,
    };
    assert_eq!(rule.decide(&shape, true), Placement::Local);
}

/// Utility of bidder `who` in one auction when it reports `factor ×` its true price.
fn utility(bids: &[(Bid, f64, f64)], who: u32, factor: f64) -> f64 {
    let reported: Vec<(Bid, f64)> = bids
        .iter()
        .map(|&(b, bw, truth)| {
            let price = if b.bidder == who {
                truth * factor
            } else {
                b.price
            };
            (Bid { price, ..b }, bw)
        })
        .collect();
    match settle(&reported, &SP) {
        Some(a) if a.bidder == who && !a.reserve => {
            let truth = bids.iter().find(|b| b.0.bidder == who).map_or(0.0, |b| b.2);
            a.payment - truth
        }
        _ => 0.0,
    }
}

const FACTORS: [f64; 8] = [0.0, 0.5, 0.8, 0.95, 1.05, 1.25, 2.0, 10.0];

proptest! {
    #[test]
    fn d_truthful_is_dominant_in_any_single_auction(
        raw in prop::collection::vec((0.0f64..2.0, 0.0f64..5.0, 0.1f64..10.0, 1e8f64..3e9, 0.5f64..200.0), 1..7),
        who_pick in 0usize..7,
    ) {
        let bids: Vec<(Bid, f64, f64)> = raw
            .iter()
            .enumerate()
            .map(|(i, &(p, q, s, kv, g))| (Bid { bidder: i as u32, price: p, queue_delay_s: q, prefill_s: s, kv_bytes: kv, reserve: false }, g * GBPS, p))
            .collect();
        let who = (who_pick % bids.len()) as u32;
        let honest = utility(&bids, who, 1.0);
        prop_assert!(honest >= -1e-9, "truthful utility is never negative: {honest}");
        for f in FACTORS {
            prop_assert!(utility(&bids, who, f) <= honest + 1e-9, "factor {f} helped");
        }
    }
}

fn small_paper_case() -> Scenario {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../configs/sim-paper-case.toml"
    ))
    .unwrap();
    let mut s = Scenario::parse(&text).unwrap();
    // Load high enough that remote bidders compete and win often.
    s.workload.arrival = sim::scenario::Arrival::Poisson { rate_per_s: 2.5 };
    s.workload.requests = 1500;
    s.workload.lengths.bins = 512;
    s.capacity = None;
    s
}

/// (d) in the simulator: every auction of a simulated run is replayed with each remote bidder
/// shading or inflating its price; no deviation earns more than bidding the truth.
#[test]
fn d_misreporting_never_helps_in_simulated_auctions() {
    let s = small_paper_case();
    let dist = s.workload.lengths.distribution().unwrap();
    let model = sim::model_of(&s).unwrap();
    let plan = sim::optimise(&s, &model, &dist).unwrap();
    let (_, e) = plan
        .iter()
        .find(|(k, _)| *k == PolicyKind::Auction)
        .copied()
        .unwrap();
    let reqs = engine::generate(&s, &dist, &s.workload.arrival, s.workload.requests, 7);
    let setup = engine::RunSetup {
        scenario: &s,
        requests: &reqs,
        dist: &dist,
        model: &model,
        split: e.split,
        threshold: e.threshold,
        misreport: None,
        record_auctions: usize::MAX,
        local_by_instance: &[],
    };
    let (metrics, log) = engine::run_policy(&setup, PolicyKind::Auction);
    assert_eq!(metrics.completed, reqs.len());
    assert_eq!(log.auctions.len(), reqs.len());
    let remote_wins = log.utility.iter().filter(|u| **u > 0.0).count();
    assert!(
        remote_wins > 0,
        "no remote bidder ever earned anything: test would be vacuous"
    );
    for who in 0..e.split.prfaas {
        let honest: f64 = log.auctions.iter().map(|a| utility(a, who, 1.0)).sum();
        for f in FACTORS {
            let lied: f64 = log.auctions.iter().map(|a| utility(a, who, f)).sum();
            assert!(
                lied <= honest + 1e-6,
                "bidder {who} gains by factor {f}: {lied} > {honest}"
            );
        }
    }
}
