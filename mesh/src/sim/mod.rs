//! Discrete-event simulator of the PrfaaS case study and of this project's decentralized mesh.
//!
//! [`run`] evaluates the throughput model (grid search of `t` and the P:D split) for each policy,
//! then simulates all four policies over the *same* generated requests (common random numbers), so
//! differences come from the policies, not from sampling. Everything is deterministic for a seed.

pub mod engine;
pub mod replay;
pub mod report;
pub mod scenario;

use serde::Serialize;

pub use engine::{AuctionLog, PolicyKind, Request, RunMetrics};
pub use scenario::{Scenario, ScenarioError};

use crate::policy::{Evaluation, LengthDistribution, SearchMode, ThroughputModel};

/// Everything one `prfaas simulate` run produces.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Scenario name.
    pub scenario: String,
    /// Requests simulated per policy.
    pub requests: usize,
    /// Seed.
    pub seed: u64,
    /// Mean prompt length of the workload distribution.
    pub mean_prompt_tokens: f64,
    /// Model optimum per policy (the auction shares PrfaaS-PD's hardware and split).
    pub model: Vec<(PolicyKind, Evaluation)>,
    /// Simulated metrics per policy at the scenario's arrival rate.
    pub sim: Vec<RunMetrics>,
    /// Simulated sustained throughput per policy under overload, if configured.
    pub capacity: Vec<RunMetrics>,
    /// `Λ` and its terms vs `t` at PrfaaS-PD's split (for the chart).
    pub lambda_vs_t: Vec<Evaluation>,
    /// Wall-clock seconds the simulation took (all policies).
    pub wall_s: f64,
}

/// Knobs the CLI may override.
#[derive(Debug, Clone, Copy, Default)]
pub struct Overrides {
    /// Replace `workload.requests`.
    pub requests: Option<usize>,
    /// Replace `workload.seed`.
    pub seed: Option<u64>,
}

/// The throughput model of a scenario at nominal bandwidth.
pub fn model_of(s: &Scenario) -> Result<ThroughputModel, ScenarioError> {
    Ok(ThroughputModel {
        remote_prefill: s.hardware.remote_profile()?,
        local_prefill: s.hardware.local_profile()?,
        decode: s.hardware.decode_profile()?,
        output_tokens: f64::from(s.workload.output_tokens),
        egress_bytes_per_s: s.link.bandwidth_gbps * 1e9 / 8.0,
    })
}

/// Model optimum for each policy.
pub fn optimise(
    s: &Scenario,
    model: &ThroughputModel,
    dist: &LengthDistribution,
) -> Result<Vec<(PolicyKind, Evaluation)>, ScenarioError> {
    let h = &s.hardware;
    let homo = model.search(dist, 0, h.homogeneous_instances, SearchMode::Homogeneous)?;
    let naive = model.search(
        dist,
        h.prfaas_instances,
        h.pd_instances,
        SearchMode::NaiveAllRemote,
    )?;
    let prfaas = model.search(dist, h.prfaas_instances, h.pd_instances, SearchMode::Prfaas)?;
    Ok(vec![
        (PolicyKind::PrfaasRouter, prfaas),
        (PolicyKind::Homogeneous, homo),
        (PolicyKind::NaiveHeterogeneous, naive),
        (PolicyKind::Auction, prfaas),
    ])
}

/// Simulate every policy once over `requests`.
pub fn simulate_all(
    s: &Scenario,
    model: &ThroughputModel,
    dist: &LengthDistribution,
    plan: &[(PolicyKind, Evaluation)],
    requests: &[Request],
) -> Vec<RunMetrics> {
    plan.iter()
        .map(|&(kind, e)| {
            let setup = engine::RunSetup {
                scenario: s,
                requests,
                dist,
                model,
                split: e.split,
                threshold: e.threshold,
                misreport: None,
                record_auctions: 0,
                local_by_instance: &[],
            };
            engine::run_policy(&setup, kind).0
        })
        .collect()
}

/// Run a scenario end to end.
pub fn run(s: &Scenario, o: Overrides) -> Result<Report, ScenarioError> {
    let started = std::time::Instant::now();
    let mut s = s.clone();
    if let Some(n) = o.requests {
        s.workload.requests = n;
    }
    if let Some(seed) = o.seed {
        s.workload.seed = seed;
    }
    s.validate()?;
    let dist = s.workload.lengths.distribution()?;
    let model = model_of(&s)?;
    let plan = optimise(&s, &model, &dist)?;
    let requests = engine::generate(
        &s,
        &dist,
        &s.workload.arrival,
        s.workload.requests,
        s.workload.seed,
    );
    let sim = simulate_all(&s, &model, &dist, &plan, &requests);
    let capacity = match s.capacity {
        Some(c) => {
            let arrival = scenario::Arrival::Poisson {
                rate_per_s: c.rate_per_s,
            };
            let reqs = engine::generate(
                &s,
                &dist,
                &arrival,
                c.requests,
                s.workload.seed.wrapping_add(1),
            );
            simulate_all(&s, &model, &dist, &plan, &reqs)
        }
        None => Vec::new(),
    };
    let split = plan[0].1.split;
    let lambda_vs_t = (0..=120)
        .map(|i| {
            let t = s.workload.lengths.min
                * (s.workload.lengths.max / s.workload.lengths.min).powf(f64::from(i) / 120.0);
            model.evaluate(&dist, split, t)
        })
        .collect();
    Ok(Report {
        scenario: s.name.clone(),
        requests: s.workload.requests,
        seed: s.workload.seed,
        mean_prompt_tokens: dist.mean(),
        model: plan,
        sim,
        capacity,
        lambda_vs_t,
        wall_s: started.elapsed().as_secs_f64(),
    })
}
