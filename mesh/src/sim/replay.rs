//! Replaying a measured run: the simulator over one recorded trace with the profiles and the
//! link that real nodes measured (`prfaas bench e2e` exports them), so that its prediction can be
//! set beside what the nodes did.
//!
//! A deployment of real nodes maps onto the simulator's policies as follows; the placement and
//! threshold code is the node's own in every case ([`super::engine`]), and homes are `pd` nodes
//! (`hardware.colocated`: each prefills its own prompts and caches the KV it imports):
//! * **homogeneous**: two `pd` nodes that never offload, requests alternating between them as
//!   the bench sends them → [`PolicyKind::Homogeneous`] over two homes, each with its own prefill
//!   instance at its own node's measured profile.
//! * **auction**: a `pd` home and a `prefill` peer → [`PolicyKind::Auction`] with one home, one
//!   local prefill instance (the home's profile), one remote (the peer's), the home's `t`
//!   starting at its configured value and never searched below it, the node's pricing, scoring
//!   and reserve factor.
//! * **naive**: the same nodes with `t` pinned and a reserve bid that never wins.

use serde::{Deserialize, Serialize};

use super::engine::{self, PolicyKind, Request, RunMetrics, RunSetup};
use super::scenario::{
    Arrival, Auction, Hardware, Lengths, Link, PointMib, Prefixes, Router, Scenario, ScenarioError,
    Workload,
};
use crate::policy::{
    DecodeProfile, LengthDistribution, MeasuredProfile, PolicyError, PrefillProfile, Split,
    ThroughputModel,
};

/// How the real nodes of a run were deployed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReplayDeployment {
    /// Two `pd` nodes, nothing offloaded.
    Homogeneous,
    /// A `pd` home offloading every prompt over its pinned `t` to a `prefill` peer.
    Naive,
    /// A `pd` home and a `prefill` peer under the default (adaptive) policy.
    Auction,
}

/// One request of the recorded trace.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ReplayRequest {
    /// Arrival after the trace's start (s).
    pub arrival_s: f64,
    /// Prompt tokens as the home counted them.
    pub prompt_tokens: f64,
    /// Shared prefix `(group, tokens)` a prefix cache can hold, if any.
    pub prefix: Option<(u32, f64)>,
}

/// The home's policy settings (a node's `policy.*` and engine limits).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ReplayPolicy {
    /// `policy.offload_threshold_tokens`: the start value and floor of `t`.
    pub threshold_tokens: f64,
    /// `policy.adaptive_threshold`.
    pub adaptive_threshold: bool,
    /// `policy.price_per_1k_tokens`.
    pub price_per_1k_tokens: f64,
    /// `policy.queue_premium_per_s`.
    pub queue_premium_per_s: f64,
    /// `policy.reserve_price_factor`.
    pub reserve_price_factor: f64,
    /// `policy.lambda_per_s`.
    pub lambda_per_s: f64,
    /// `policy.auction_top_k`.
    pub top_k: usize,
}

/// Everything a replay needs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReplayInput {
    /// Which deployment ran.
    pub deployment: ReplayDeployment,
    /// The trace, in arrival order.
    pub requests: Vec<ReplayRequest>,
    /// Generated tokens per request.
    pub output_tokens: u32,
    /// What each node measured of itself at the end of the run, node 0 (the home) first.
    pub nodes: Vec<MeasuredProfile>,
    /// The home → prefill peer link, bytes/s (the home's own estimate where it has one).
    pub link_bytes_per_s: f64,
    /// The home's estimate of that link when the run started (its probes' figure), bytes/s;
    /// absent: `link_bytes_per_s`.
    #[serde(default)]
    pub link_estimate_start_bytes_per_s: Option<f64>,
    /// One-way latency of that link (s).
    pub latency_s: f64,
    /// Pieces a KV transfer is pipelined in (the model's layers).
    pub kv_layers: u32,
    /// Prefix groups one node's cache holds.
    pub prefix_cache_groups: usize,
    /// The home's policy.
    pub policy: ReplayPolicy,
}

/// Why a replay could not run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReplayError {
    /// A profile or the scenario built from the input was invalid.
    #[error(transparent)]
    Scenario(#[from] ScenarioError),
    /// A measured profile was unusable.
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// Something the deployment needs is missing.
    #[error("replay input: {0}")]
    Missing(&'static str),
}

/// The simulator's prediction of one run.
#[derive(Debug, Clone, Serialize)]
pub struct Prediction {
    /// The figures a run is compared by.
    pub figures: RunFigures,
    /// The simulator's full metrics.
    pub metrics: RunMetrics,
}

/// Nearest-rank percentile over finite values (the bench's definition).
pub fn percentile(values: &[f64], q: f64) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * q).round() as usize]
}

fn points_mib(p: &PrefillProfile) -> Vec<PointMib> {
    p.points()
        .iter()
        .map(|q| PointMib {
            tokens: q.tokens,
            prefill_s: q.prefill_s,
            kv_mib: q.kv_bytes / (1024.0 * 1024.0),
        })
        .collect()
}

fn decode_steps(d: &DecodeProfile) -> Vec<(f64, f64)> {
    let bs = d.max_batch();
    let mut pts = vec![(1.0, d.step_time(1))];
    for b in [bs, bs + 1] {
        if f64::from(b) > pts[pts.len() - 1].0 {
            pts.push((f64::from(b), d.step_time(b)));
        }
    }
    pts
}

/// Simulates the recorded run and returns the prediction.
pub fn predict(input: &ReplayInput) -> Result<Prediction, ReplayError> {
    let home = input
        .nodes
        .first()
        .ok_or(ReplayError::Missing("no nodes"))?;
    let local = home.prefill_profile()?;
    let decode = home
        .decode_profile()
        .ok_or(ReplayError::Missing("the home decoded nothing"))?;
    let remote_rate = match input.deployment {
        ReplayDeployment::Homogeneous => home.quote_start_tokens_per_s(),
        _ => input
            .nodes
            .get(1)
            .map_or(0.0, MeasuredProfile::quote_start_tokens_per_s),
    };
    let (remote, split, kind) = match input.deployment {
        ReplayDeployment::Homogeneous => (
            local.clone(),
            Split {
                prfaas: 0,
                prefill: 2,
                decode: 2,
            },
            PolicyKind::Homogeneous,
        ),
        ReplayDeployment::Naive | ReplayDeployment::Auction => (
            input
                .nodes
                .get(1)
                .ok_or(ReplayError::Missing("no prefill peer"))?
                .prefill_profile()?,
            Split {
                prfaas: 1,
                prefill: 1,
                decode: 1,
            },
            PolicyKind::Auction,
        ),
    };
    if input.requests.is_empty() {
        return Err(ReplayError::Missing("no requests"));
    }
    let lengths: Vec<f64> = input.requests.iter().map(|r| r.prompt_tokens).collect();
    let dist = LengthDistribution::from_weighted(lengths.iter().map(|&l| (l, 1.0)).collect())?;
    let ln: Vec<f64> = lengths.iter().map(|l| l.max(1.0).ln()).collect();
    let mu = ln.iter().sum::<f64>() / ln.len() as f64;
    let sigma = (ln.iter().map(|x| (x - mu).powi(2)).sum::<f64>() / ln.len() as f64).sqrt();
    let (min, max) = lengths
        .iter()
        .fold((f64::INFINITY, 0.0_f64), |(a, b), &l| (a.min(l), b.max(l)));
    let span = input.requests.last().map_or(1.0, |r| r.arrival_s).max(1e-9);
    let p = &input.policy;
    let scenario = Scenario {
        name: format!("replay of a measured {:?} run", input.deployment).to_lowercase(),
        workload: Workload {
            requests: input.requests.len(),
            seed: 1,
            output_tokens: input.output_tokens.max(1),
            lengths: Lengths {
                mu,
                sigma: sigma.max(1e-3),
                min: min.max(1.0),
                max: max.max(min + 1.0),
                bins: 64,
            },
            arrival: Arrival::Poisson {
                rate_per_s: input.requests.len() as f64 / span,
            },
            prefixes: Prefixes {
                share: 0.0,
                groups: 0,
                tokens: 0.0,
                cache_capacity: input.prefix_cache_groups,
            },
        },
        hardware: Hardware {
            prfaas_instances: split.prfaas,
            pd_instances: split.prefill + split.decode,
            homogeneous_instances: 2,
            remote_prefill: points_mib(&remote),
            local_prefill: points_mib(&local),
            decode_steps: decode_steps(&decode),
            slo_tokens_per_s: decode.slo_tokens_per_s(),
            // Real nodes: each home prefills on its own core, and bids quote the moving average
            // of their measured speed, from the rate each node started with.
            colocated: true,
            // A node streams the token its prefill sampled before any decode step.
            first_token_at_prefill: true,
            // The home verifies each import on its own compute thread before decoding it.
            import_verify: home.import.clone(),
            remote_quote_tokens_per_s: Some(remote_rate),
            local_quote_tokens_per_s: Some(home.quote_start_tokens_per_s()),
        },
        link: Link {
            bandwidth_gbps: input.link_bytes_per_s * 8.0 / 1e9,
            latency_ms: input.latency_s * 1e3,
            kv_layers: input.kv_layers.max(1),
            schedule: Vec::new(),
            estimate_start_gbps: input
                .link_estimate_start_bytes_per_s
                .filter(|b| *b > 0.0)
                .map(|b| b * 8.0 / 1e9),
        },
        router: Router::default(),
        auction: Auction {
            base_per_ktok: p.price_per_1k_tokens,
            queue_premium_per_s: p.queue_premium_per_s,
            utilisation_premium: 0.0,
            lambda_per_s: p.lambda_per_s,
            top_k: p.top_k,
            // A node's own queue prices its reserve bid; short prompts never spill.
            spill_ratio: f64::INFINITY,
            reserve_price_factor: p.reserve_price_factor,
            adaptive_threshold: p.adaptive_threshold
                && input.deployment == ReplayDeployment::Auction,
            threshold_floor_tokens: p.threshold_tokens,
            ..Auction::default()
        },
        outage: Vec::new(),
        capacity: None,
    };
    let model = ThroughputModel {
        remote_prefill: remote,
        local_prefill: local,
        decode,
        output_tokens: f64::from(input.output_tokens.max(1)),
        egress_bytes_per_s: input.link_bytes_per_s,
    };
    // Two `pd` homes each prefill on their own node, at the speed that node measured.
    let own_profiles = match input.deployment {
        ReplayDeployment::Homogeneous if input.nodes.len() > 1 => input
            .nodes
            .iter()
            .map(MeasuredProfile::prefill_profile)
            .collect::<Result<Vec<_>, _>>()?,
        _ => Vec::new(),
    };
    let requests: Vec<Request> = input
        .requests
        .iter()
        .map(|r| Request {
            arrival: r.arrival_s,
            tokens: r.prompt_tokens.max(1.0),
            prefix: r.prefix,
        })
        .collect();
    let setup = RunSetup {
        scenario: &scenario,
        requests: &requests,
        dist: &dist,
        model: &model,
        split,
        threshold: p.threshold_tokens,
        misreport: None,
        record_auctions: 0,
        local_by_instance: &own_profiles,
    };
    let (metrics, _) = engine::run_policy(&setup, kind);
    let done = metrics
        .ttft_by_request
        .iter()
        .filter(|t| t.is_finite())
        .count();
    Ok(Prediction {
        figures: RunFigures {
            throughput_req_per_s: if metrics.last_completion_s > 0.0 {
                done as f64 / metrics.last_completion_s
            } else {
                0.0
            },
            ttft_p50_s: percentile(&metrics.ttft_by_request, 0.5),
            ttft_p90_s: percentile(&metrics.ttft_by_request, 0.9),
            offload_fraction: metrics.offload_fraction,
            ttft_by_request: metrics.ttft_by_request.clone(),
            remote_by_request: metrics.remote_by_request.clone(),
        },
        metrics,
    })
}

/// The figures a run is compared by, whether the real nodes' or the simulator's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunFigures {
    /// Completed requests per second, trace start to the last completion.
    pub throughput_req_per_s: f64,
    /// TTFT median (s).
    pub ttft_p50_s: f64,
    /// TTFT 90th percentile (s).
    pub ttft_p90_s: f64,
    /// Fraction prefilled remotely.
    pub offload_fraction: f64,
    /// Each request's TTFT in trace order (NaN where it failed or did not finish).
    pub ttft_by_request: Vec<f64>,
    /// Whether each request was prefilled remotely, in trace order.
    pub remote_by_request: Vec<bool>,
}

/// A recorded run: the replay's input and what the nodes measured. `prfaas bench e2e` writes
/// one per load run; `prfaas simulate --replay FILE` predicts it again (after a change to the
/// model, without re-running the nodes).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReplayRecord {
    /// The simulator's input.
    pub input: ReplayInput,
    /// The real run's figures.
    pub measured: RunFigures,
}

/// Predicted beside measured, and their ratios (predicted / measured).
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    /// Deployment of the run.
    pub deployment: ReplayDeployment,
    /// Offered load of the trace (requests / arrival span).
    pub offered_req_per_s: f64,
    /// What the simulator predicted.
    pub predicted: RunFigures,
    /// What the nodes did.
    pub measured: RunFigures,
    /// predicted / measured throughput.
    pub throughput_ratio: f64,
    /// predicted / measured TTFT P50.
    pub ttft_p50_ratio: f64,
    /// predicted / measured TTFT P90.
    pub ttft_p90_ratio: f64,
    /// Requests the simulator placed where the home did not (remote vs local).
    pub placements_differing: usize,
}

/// Predicts a recorded run and sets the prediction beside what was measured.
pub fn compare(record: &ReplayRecord) -> Result<Comparison, ReplayError> {
    let p = predict(&record.input)?.figures;
    let m = &record.measured;
    let span = record
        .input
        .requests
        .last()
        .map_or(0.0, |r| r.arrival_s)
        .max(1e-9);
    let placements_differing = p
        .remote_by_request
        .iter()
        .zip(&m.remote_by_request)
        .filter(|(a, b)| a != b)
        .count();
    Ok(Comparison {
        deployment: record.input.deployment,
        offered_req_per_s: record.input.requests.len() as f64 / span,
        throughput_ratio: p.throughput_req_per_s / m.throughput_req_per_s,
        ttft_p50_ratio: p.ttft_p50_s / m.ttft_p50_s,
        ttft_p90_ratio: p.ttft_p90_s / m.ttft_p90_s,
        placements_differing,
        predicted: p,
        measured: m.clone(),
    })
}

/// The human table of comparisons: one row per run, then each request's TTFT both ways.
pub fn comparison_table(rows: &[Comparison]) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "simulator vs reality (same trace, the nodes' measured profiles and link): predicted / measured"
    );
    let _ = writeln!(
        s,
        "{:<12} {:>7} {:>19} {:>19} {:>19} {:>11} {:>9}",
        "deployment", "offered", "req/s", "TTFT P50 s", "TTFT P90 s", "offload", "placed ≠"
    );
    for c in rows {
        let (p, m) = (&c.predicted, &c.measured);
        let _ = writeln!(
            s,
            "{:<12} {:>7.3} {:>6.3}/{:<6.3}{:>5.2}× {:>6.2}/{:<6.2}{:>5.2}× {:>6.2}/{:<6.2}{:>5.2}× {:>5.2}/{:<5.2} {:>9}",
            format!("{:?}", c.deployment).to_lowercase(),
            c.offered_req_per_s,
            p.throughput_req_per_s,
            m.throughput_req_per_s,
            c.throughput_ratio,
            p.ttft_p50_s,
            m.ttft_p50_s,
            c.ttft_p50_ratio,
            p.ttft_p90_s,
            m.ttft_p90_s,
            c.ttft_p90_ratio,
            p.offload_fraction,
            m.offload_fraction,
            c.placements_differing,
        );
    }
    for c in rows {
        let per: Vec<String> = c
            .predicted
            .ttft_by_request
            .iter()
            .zip(&c.measured.ttft_by_request)
            .zip(
                c.predicted
                    .remote_by_request
                    .iter()
                    .zip(&c.measured.remote_by_request),
            )
            .map(|((p, m), (pr, mr))| {
                let r = |remote: &bool| if *remote { "R" } else { "L" };
                format!("{p:.2}{}/{m:.2}{}", r(pr), r(mr))
            })
            .collect();
        let _ = writeln!(
            s,
            "  {:<10} TTFT per request, predicted/measured (R remote, L local): {}",
            format!("{:?}", c.deployment).to_lowercase(),
            per.join(" ")
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A node that prefills 1,000 tokens/s (0.1 s of overhead per prompt), steps its decode
    /// in 10 ms, and ships 1 KB of KV per token.
    fn node(tokens_per_s: f64) -> MeasuredProfile {
        MeasuredProfile {
            prefill: vec![
                (100.0, 0.1 + 100.0 / tokens_per_s),
                (1000.0, 0.1 + 1000.0 / tokens_per_s),
            ],
            prefill_tokens_per_s: tokens_per_s,
            prefill_start_tokens_per_s: tokens_per_s,
            import: Vec::new(),
            decode: vec![(1.0, 0.01)],
            max_batch: 8,
            kv_bytes: vec![(1.0, 1e3), (1000.0, 1e6)],
        }
    }

    fn input(deployment: ReplayDeployment, nodes: Vec<MeasuredProfile>) -> ReplayInput {
        ReplayInput {
            deployment,
            // Far apart: nothing queues.
            requests: [100.0, 2000.0, 400.0]
                .iter()
                .enumerate()
                .map(|(i, &t)| ReplayRequest {
                    arrival_s: 100.0 * (i + 1) as f64,
                    prompt_tokens: t,
                    prefix: None,
                })
                .collect(),
            output_tokens: 4,
            nodes,
            link_bytes_per_s: 1e9,
            link_estimate_start_bytes_per_s: None,
            latency_s: 0.0,
            kv_layers: 10,
            prefix_cache_groups: 1,
            policy: ReplayPolicy {
                threshold_tokens: 256.0,
                adaptive_threshold: false,
                // Price matters little next to delay (λ = 1/s), as in a node's defaults for
                // prompts of seconds.
                price_per_1k_tokens: 0.01,
                queue_premium_per_s: 0.5,
                reserve_price_factor: 3.0,
                lambda_per_s: 1.0,
                top_k: 4,
            },
        }
    }

    #[test]
    fn an_idle_home_predicts_its_own_prefill() {
        let p = predict(&input(ReplayDeployment::Homogeneous, vec![node(1000.0)]))
            .unwrap()
            .figures;
        // 2,000 tokens: 0.1 + 2.0 s. The first token is the prefill's own (no decode step: a
        // node streams it as soon as the prefill ends).
        let want = [0.2, 2.1, 0.5];
        for (got, want) in p.ttft_by_request.iter().zip(want) {
            assert!((got - want).abs() < 1e-6, "{got} vs {want}");
        }
        assert_eq!(p.offload_fraction, 0.0);
        // Three completions, the last 4 steps after the last first token.
        let last = 300.0 + 0.5 + 4.0 * 0.01;
        assert!((p.throughput_req_per_s - 3.0 / last).abs() < 1e-9);
    }

    #[test]
    fn each_pd_home_prefills_its_own_requests() {
        // Requests alternate between two homes as the bench sends them: the third (home 0)
        // waits behind the first's 2.1 s prefill although home 1 is idle by then.
        let mut i = input(ReplayDeployment::Homogeneous, vec![node(1000.0)]);
        i.requests = [(100.0, 2000.0), (100.5, 100.0), (101.0, 100.0)]
            .iter()
            .map(|&(arrival_s, prompt_tokens)| ReplayRequest {
                arrival_s,
                prompt_tokens,
                prefix: None,
            })
            .collect();
        let t = predict(&i).unwrap().figures.ttft_by_request;
        let want = [2.1, 0.2, (102.1 - 101.0) + 0.2];
        for (got, want) in t.iter().zip(want) {
            assert!((got - want).abs() < 1e-6, "{t:?}");
        }
    }

    #[test]
    fn each_pd_home_prefills_at_its_own_nodes_speed() {
        // Node 1 measured half node 0's speed: its requests (odd ones) take twice as long.
        let i = input(
            ReplayDeployment::Homogeneous,
            vec![node(1000.0), node(500.0)],
        );
        let t = predict(&i).unwrap().figures.ttft_by_request;
        let want = [0.1 + 0.1, 0.1 + 2000.0 / 500.0, 0.1 + 0.4];
        for (got, want) in t.iter().zip(want) {
            assert!((got - want).abs() < 1e-6, "{t:?}");
        }
    }

    #[test]
    fn the_home_offloads_what_its_policy_offloads() {
        // A peer ten times faster over a fast link: the auction sends it the two prompts over
        // `t`; naive does the same whatever the speeds (its reserve never wins).
        let fast = input(
            ReplayDeployment::Auction,
            vec![node(1000.0), node(10_000.0)],
        );
        let p = predict(&fast).unwrap().figures;
        assert_eq!(p.remote_by_request, vec![false, true, true]);
        assert!(p.ttft_by_request[1] < 1.0, "{:?}", p.ttft_by_request);
        let mut slow = input(ReplayDeployment::Naive, vec![node(10_000.0), node(1000.0)]);
        slow.policy.reserve_price_factor = 1e6;
        assert_eq!(
            predict(&slow).unwrap().figures.remote_by_request,
            vec![false, true, true]
        );
        // The same slow peer loses the auction to the home's own (reserve) bid.
        let mut auction = ReplayInput {
            deployment: ReplayDeployment::Auction,
            ..slow
        };
        auction.policy.reserve_price_factor = 3.0;
        assert_eq!(
            predict(&auction).unwrap().figures.remote_by_request,
            vec![false, false, false]
        );
    }

    #[test]
    fn quotes_and_link_belief_start_where_the_nodes_started() {
        // Two equal nodes over a fast link: the peer's cheaper bid wins the long prompts.
        let equal = input(ReplayDeployment::Auction, vec![node(1000.0), node(1000.0)]);
        assert_eq!(
            predict(&equal).unwrap().figures.remote_by_request,
            vec![false, true, true]
        );
        // A peer whose calibration said 100 tokens/s quotes 10× slower until it has served
        // prompts (it never gets one), although it exports the same final speed.
        let mut slow_quote = equal.clone();
        slow_quote.nodes[1].prefill_start_tokens_per_s = 100.0;
        assert_eq!(
            predict(&slow_quote).unwrap().figures.remote_by_request,
            vec![false, false, false]
        );
        // A home that believed a slow link before any transfer keeps everything too.
        let mut slow_link = equal;
        slow_link.link_estimate_start_bytes_per_s = Some(1e3);
        assert_eq!(
            predict(&slow_link).unwrap().figures.remote_by_request,
            vec![false, false, false]
        );
    }

    #[test]
    fn a_pd_home_verifies_imports_on_its_own_compute() {
        let mut naive = input(ReplayDeployment::Naive, vec![node(1000.0), node(10_000.0)]);
        naive.policy.reserve_price_factor = 1e6;
        let free = predict(&naive).unwrap().figures;
        assert_eq!(free.remote_by_request, vec![false, true, true]);
        naive.nodes[0].import = vec![(100.0, 0.5), (4000.0, 0.5)];
        let paid = predict(&naive).unwrap().figures;
        for (r, (a, b)) in free
            .ttft_by_request
            .iter()
            .zip(&paid.ttft_by_request)
            .enumerate()
        {
            let extra = if r == 0 { 0.0 } else { 0.5 };
            assert!((b - a - extra).abs() < 1e-9, "request {r}: {a} → {b}");
        }
        // A local prompt that arrives while the home verifies waits for it.
        naive.requests[2].prompt_tokens = 100.0;
        naive.requests[2].arrival_s = naive.requests[1].arrival_s + paid.ttft_by_request[1] - 0.25;
        let t = predict(&naive).unwrap().figures.ttft_by_request;
        assert!((t[2] - (0.25 + 0.2)).abs() < 1e-9, "{t:?}");
    }

    #[test]
    fn compare_sets_prediction_beside_measurement() {
        let input = input(ReplayDeployment::Homogeneous, vec![node(1000.0)]);
        let predicted = predict(&input).unwrap().figures;
        let measured = RunFigures {
            throughput_req_per_s: predicted.throughput_req_per_s * 2.0,
            ttft_p50_s: predicted.ttft_p50_s / 2.0,
            ttft_p90_s: predicted.ttft_p90_s,
            offload_fraction: 0.0,
            ttft_by_request: predicted.ttft_by_request.clone(),
            remote_by_request: vec![false, true, false],
        };
        let c = compare(&ReplayRecord { input, measured }).unwrap();
        assert!((c.throughput_ratio - 0.5).abs() < 1e-12);
        assert!((c.ttft_p50_ratio - 2.0).abs() < 1e-12);
        assert!((c.ttft_p90_ratio - 1.0).abs() < 1e-12);
        assert_eq!(c.placements_differing, 1);
        assert!(comparison_table(&[c]).contains("homogeneous"));
    }
}
