//! The offload threshold `t`: one function for the node and the simulator.
//!
//! A home keeps a [`ThresholdTracker`]. Every so often it passes what it measures —
//! [`ThresholdInputs`]: its own prefill profile, the prefill profile of the peers it could offload
//! to (from their adverts), its decode profile, its link estimate towards those peers, the split
//! of instances it sees and the lengths of the uncached prompts it homes — and the tracker
//! re-runs the throughput model's grid search for `t` when the trigger says the last search's
//! assumptions no longer hold (egress utilisation or queues surge, the bandwidth moved by more
//! than a factor) or when the caller says the inputs themselves changed (a peer came or went,
//! the length distribution shifted). Between searches `t` stays put, so noise does not move it.

use serde::Serialize;

use super::profile::{DecodeProfile, PrefillProfile};
use super::throughput::{Evaluation, Observation, ReSearchTrigger, Split, ThroughputModel};
use super::workload::LengthDistribution;
use super::PolicyError;

/// Everything the threshold search needs, as the caller measured it.
#[derive(Debug, Clone)]
pub struct ThresholdInputs<'a> {
    /// Profile of the home side's own (local) prefill.
    pub local_prefill: &'a PrefillProfile,
    /// Profile of one remote prefill instance it offloads to.
    pub remote_prefill: &'a PrefillProfile,
    /// Decode profile of the home side.
    pub decode: &'a DecodeProfile,
    /// Output tokens per request.
    pub output_tokens: f64,
    /// Instance split the home sees (remote prefill, local prefill, decode).
    pub split: Split,
    /// Uncached prompt lengths the home homes.
    pub dist: &'a LengthDistribution,
    /// What the home measures now (bandwidth, egress utilisation, queue).
    pub observation: Observation,
}

/// The home's current threshold and why.
#[derive(Debug, Clone, Serialize)]
pub struct ThresholdTracker {
    /// Current `t` in tokens (`f64::INFINITY` = never offload).
    pub threshold: f64,
    /// Bandwidth the last search assumed, bytes/s (0 before the first search).
    pub searched_bandwidth: f64,
    /// Searches run so far.
    pub researches: u64,
    /// The model's figures at the last search.
    pub last: Option<Evaluation>,
    /// Whether the remote path was egress-bound at the last search (the prefix rule's
    /// "bandwidth is scarce").
    pub egress_bound: bool,
    /// Smallest `t` a search may set (a node's configured `offload_threshold_tokens`).
    pub floor: f64,
    /// Largest `t` a search may set (a node's context: `∞` there means "never offload").
    pub cap: f64,
    /// Whether the last observation was a surge (utilisation or queue over its bound).
    pub surging: bool,
    #[serde(skip)]
    trigger: ReSearchTrigger,
}

impl ThresholdTracker {
    /// Starts at `initial` (the configured `t`) with `trigger`.
    pub fn new(initial: f64, trigger: ReSearchTrigger) -> Self {
        Self {
            threshold: initial,
            searched_bandwidth: 0.0,
            researches: 0,
            last: None,
            egress_bound: false,
            floor: 0.0,
            cap: f64::INFINITY,
            surging: false,
            trigger,
        }
    }

    /// Keeps every searched `t` within `[floor, cap]` (`cap` wins where they cross).
    pub fn with_bounds(mut self, floor: f64, cap: f64) -> Self {
        self.floor = floor;
        self.cap = cap;
        self
    }

    /// Re-searches `t` when `inputs_changed`, when the bandwidth moved by the trigger's factor
    /// from the one last searched with, or when a surge *begins* (utilisation or a queue crosses
    /// its bound): a queue that stays long does not call for the same search at every check —
    /// the queue is not a term of the model, so the result would only change with the other
    /// inputs, which have their own triggers. Returns `Ok(true)` when a search ran. An
    /// infeasible search (nothing measured yet, a zero split) keeps the current `t` and reports
    /// why.
    pub fn update(
        &mut self,
        inputs: &ThresholdInputs<'_>,
        inputs_changed: bool,
    ) -> Result<bool, PolicyError> {
        let obs = &inputs.observation;
        let surging = self.trigger.surging(obs);
        let surge_began = surging && !self.surging;
        self.surging = surging;
        if !inputs_changed
            && !surge_began
            && !self.trigger.bandwidth_moved(obs, self.searched_bandwidth)
        {
            return Ok(false);
        }
        let e = search(inputs)?;
        // `max` first: a NaN search result lands on the floor, not on NaN.
        self.threshold = e.threshold.max(self.floor).min(self.cap);
        self.searched_bandwidth = obs.bandwidth_bytes_per_s;
        self.researches += 1;
        self.egress_bound = egress_bound(inputs, &e);
        self.last = Some(e);
        Ok(true)
    }
}

/// The grid search over `t` at the inputs' split (roles move on a longer timescale).
pub fn search(inputs: &ThresholdInputs<'_>) -> Result<Evaluation, PolicyError> {
    let bw = inputs.observation.bandwidth_bytes_per_s;
    if !(bw.is_finite() && bw > 0.0) {
        return Err(PolicyError::Infeasible("no bandwidth estimate"));
    }
    model(inputs).search_threshold(inputs.dist, inputs.split)
}

/// The throughput model the inputs describe.
pub fn model(inputs: &ThresholdInputs<'_>) -> ThroughputModel {
    ThroughputModel {
        remote_prefill: inputs.remote_prefill.clone(),
        local_prefill: inputs.local_prefill.clone(),
        decode: inputs.decode.clone(),
        output_tokens: inputs.output_tokens,
        egress_bytes_per_s: inputs.observation.bandwidth_bytes_per_s,
    }
}

/// True when, at `e`, the remote path's throughput is capped by the link rather than by the
/// remote instances' compute — the paper's "bandwidth is scarce" for the prefix rule.
fn egress_bound(inputs: &ThresholdInputs<'_>, e: &Evaluation) -> bool {
    let l = if e.offload_fraction > 0.0 {
        e.mean_long
    } else {
        // Nothing offloaded: judge at the longest length the home sees.
        inputs.dist.lengths().last().copied().unwrap_or(0.0)
    };
    if l <= 0.0 {
        return false;
    }
    let egress = inputs.observation.bandwidth_bytes_per_s / inputs.remote_prefill.kv_bytes(l);
    let compute = f64::from(inputs.split.prfaas) / inputs.remote_prefill.prefill_time(l);
    egress < compute
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::profile::ProfilePoint;

    fn prof(sec_per_ktok: f64) -> PrefillProfile {
        PrefillProfile::new(vec![
            ProfilePoint {
                tokens: 1000.0,
                prefill_s: 0.05 + sec_per_ktok,
                kv_bytes: 1e8,
            },
            ProfilePoint {
                tokens: 100_000.0,
                prefill_s: 0.05 + 100.0 * sec_per_ktok,
                kv_bytes: 1e9,
            },
        ])
        .unwrap()
    }

    #[test]
    fn threshold_follows_bandwidth_and_stays_put_between_triggers() {
        let local = prof(0.15);
        let remote = prof(0.05);
        let decode = DecodeProfile::new(vec![(1.0, 0.01), (64.0, 0.02)], 40.0).unwrap();
        let dist = LengthDistribution::lognormal_truncated(9.0, 1.0, 128.0, 1e5, 256).unwrap();
        let obs = |bw| Observation {
            egress_utilisation: 0.0,
            queue_delay_s: 0.0,
            bandwidth_bytes_per_s: bw,
        };
        let inputs = |bw| ThresholdInputs {
            local_prefill: &local,
            remote_prefill: &remote,
            decode: &decode,
            output_tokens: 512.0,
            split: Split {
                prfaas: 2,
                prefill: 2,
                decode: 4,
            },
            dist: &dist,
            observation: obs(bw),
        };
        let mut tr = ThresholdTracker::new(256.0, ReSearchTrigger::default());
        assert!(tr.update(&inputs(1e11), false).unwrap());
        let rich = tr.threshold;
        assert!(!tr.egress_bound);
        // 20% less bandwidth is within the trigger's band: no search, t unchanged.
        assert!(!tr.update(&inputs(0.8e11), false).unwrap());
        assert_eq!(tr.threshold, rich);
        // A collapse: t rises and the link is the bound.
        assert!(tr.update(&inputs(2e8), false).unwrap());
        assert!(tr.threshold > rich, "{} vs {rich}", tr.threshold);
        assert!(tr.egress_bound);
        assert_eq!(tr.researches, 2);
        // No estimate: keep t, report why.
        let before = tr.threshold;
        assert!(tr.update(&inputs(0.0), true).is_err());
        assert!(tr.update(&inputs(f64::NAN), true).is_err());
        assert_eq!(tr.threshold, before);

        // A queue surge re-searches once when it begins, not at every check while it lasts,
        // and again when a new surge begins after a calm check.
        let surge = |q: f64| ThresholdInputs {
            observation: Observation {
                queue_delay_s: q,
                ..obs(2e8)
            },
            ..inputs(2e8)
        };
        let n = tr.researches;
        assert!(tr.update(&surge(60.0), false).unwrap());
        assert!(!tr.update(&surge(60.0), false).unwrap());
        assert!(!tr.update(&surge(90.0), false).unwrap());
        assert!(!tr.update(&surge(1.0), false).unwrap());
        assert!(tr.update(&surge(60.0), false).unwrap());
        assert_eq!(tr.researches, n + 2);

        // Bounds: a search never sets t outside [floor, cap].
        let mut low =
            ThresholdTracker::new(256.0, ReSearchTrigger::default()).with_bounds(rich * 2.0, 1e9);
        assert!(low.update(&inputs(1e11), false).unwrap());
        assert_eq!(low.threshold, rich * 2.0);
        let mut high =
            ThresholdTracker::new(256.0, ReSearchTrigger::default()).with_bounds(0.0, rich / 2.0);
        assert!(high.update(&inputs(1e11), false).unwrap());
        assert_eq!(high.threshold, rich / 2.0);
    }
}
