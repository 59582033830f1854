//! The paper's throughput model (DESIGN.md §1) and the grid search over the offload threshold `t`
//! and the P:D split:
//!
//! * `Θ_prfaas = min(N_prfaas / T_prefill(l_long), B_out / S_kv(l_long))`
//! * `Θ_pd-p = N_p / T_prefill(l_short)`, `Θ_pd-d = N_d · BS_max / (T_decode · L_out)`
//! * `Λ = min(Θ_prfaas / p, Θ_pd-p / (1 − p), Θ_pd-d)` with `p = P(L > t)`.
//!
//! `l_long`/`l_short` are the conditional mean lengths above/below `t`, exactly as the formulas
//! are written (not `E[T(L)]`; the two differ by ~2% on the paper's workload because `T` is
//! slightly convex).

use serde::Serialize;

use super::profile::{DecodeProfile, PrefillProfile};
use super::workload::LengthDistribution;
use super::{check_range, PolicyError};

/// Instance counts of one configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Split {
    /// Remote prefill (PrfaaS) instances.
    pub prfaas: u32,
    /// Local prefill instances of the PD cluster.
    pub prefill: u32,
    /// Decode instances of the PD cluster.
    pub decode: u32,
}

/// Which configurations a search may consider.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SearchMode {
    /// No remote prefill: `t = ∞`, search the P:D split only.
    Homogeneous,
    /// Every request prefilled remotely (`t = 0`), all PD instances decode.
    NaiveAllRemote,
    /// The paper's PrfaaS-PD: search `t` and the P:D split.
    Prfaas,
}

/// The term of `Λ` that binds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Bottleneck {
    /// `Θ_prfaas / p` (compute or egress of the remote prefill cluster).
    RemotePrefill,
    /// `Θ_pd-p / (1 − p)`.
    LocalPrefill,
    /// `Θ_pd-d`.
    Decode,
}

/// Every figure of one (split, t) point.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Evaluation {
    /// Offload threshold in tokens (`f64::INFINITY` = never offload).
    pub threshold: f64,
    /// Instance split.
    pub split: Split,
    /// `p = P(L > t)`.
    pub offload_fraction: f64,
    /// `E[L | L > t]`.
    pub mean_long: f64,
    /// `E[L | L ≤ t]`.
    pub mean_short: f64,
    /// `Θ_prfaas` in requests/s (of long requests).
    pub theta_prfaas: f64,
    /// `Θ_pd-p` in requests/s (of short requests).
    pub theta_pd_p: f64,
    /// `Θ_pd-d` in requests/s.
    pub theta_pd_d: f64,
    /// `Λ` in requests/s.
    pub lambda: f64,
    /// Egress at throughput `Λ`: `Λ · p · S_kv(l_long)` in bytes/s.
    pub egress_bytes_per_s: f64,
    /// Binding term.
    pub bottleneck: Bottleneck,
}

/// Hardware and link description the model evaluates.
#[derive(Debug, Clone)]
pub struct ThroughputModel {
    /// Profile of a remote (PrfaaS) prefill instance.
    pub remote_prefill: PrefillProfile,
    /// Profile of a local prefill instance of the PD cluster.
    pub local_prefill: PrefillProfile,
    /// Decode instance profile (with its SLO).
    pub decode: DecodeProfile,
    /// Output tokens per request, `L_out`.
    pub output_tokens: f64,
    /// Egress bandwidth `B_out` from the PrfaaS cluster to the PD cluster, bytes/s.
    pub egress_bytes_per_s: f64,
}

fn safe_div(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        f64::INFINITY
    }
}

impl ThroughputModel {
    /// Evaluate `Λ` and its terms at `split` and threshold `t`.
    pub fn evaluate(&self, dist: &LengthDistribution, split: Split, t: f64) -> Evaluation {
        let tail = dist.tail(t);
        let p = tail.p;
        let theta_prfaas = if p > 0.0 {
            let compute =
                f64::from(split.prfaas) / self.remote_prefill.prefill_time(tail.mean_long);
            let egress = self.egress_bytes_per_s / self.remote_prefill.kv_bytes(tail.mean_long);
            compute.min(egress)
        } else {
            0.0
        };
        let theta_pd_p = if p < 1.0 {
            f64::from(split.prefill) / self.local_prefill.prefill_time(tail.mean_short)
        } else {
            0.0
        };
        let theta_pd_d = self.decode.throughput(split.decode, self.output_tokens);
        let remote = if p > 0.0 {
            theta_prfaas / p
        } else {
            f64::INFINITY
        };
        let local = if p < 1.0 {
            safe_div(theta_pd_p, 1.0 - p)
        } else {
            f64::INFINITY
        };
        let (lambda, bottleneck) = [
            (remote, Bottleneck::RemotePrefill),
            (local, Bottleneck::LocalPrefill),
            (theta_pd_d, Bottleneck::Decode),
        ]
        .into_iter()
        .fold((f64::INFINITY, Bottleneck::Decode), |acc, x| {
            if x.0 < acc.0 {
                x
            } else {
                acc
            }
        });
        let lambda = if lambda.is_finite() { lambda } else { 0.0 };
        let egress = if p > 0.0 {
            lambda * p * self.remote_prefill.kv_bytes(tail.mean_long)
        } else {
            0.0
        };
        Evaluation {
            threshold: t,
            split,
            offload_fraction: p,
            mean_long: tail.mean_long,
            mean_short: tail.mean_short,
            theta_prfaas,
            theta_pd_p,
            theta_pd_d,
            lambda,
            egress_bytes_per_s: egress,
            bottleneck,
        }
    }

    /// Grid search: every P:D split of `pd_instances` (at least one decode instance) and, in
    /// [`SearchMode::Prfaas`], every threshold between two support points of `dist`. Maximises
    /// `Λ`; among equal `Λ` (decode-bound plateaus) it keeps the point with the most prefill
    /// headroom, `min(Θ_prfaas/p, Θ_pd-p/(1−p))`, which is what lowers TTFT.
    pub fn search(
        &self,
        dist: &LengthDistribution,
        prfaas_instances: u32,
        pd_instances: u32,
        mode: SearchMode,
    ) -> Result<Evaluation, PolicyError> {
        check_range("pd_instances", f64::from(pd_instances), 1.0, 1e6)?;
        let thresholds = match mode {
            SearchMode::Homogeneous => vec![f64::INFINITY],
            SearchMode::NaiveAllRemote => vec![0.0],
            SearchMode::Prfaas => Self::threshold_grid(dist),
        };
        let prfaas = if mode == SearchMode::Homogeneous {
            0
        } else {
            prfaas_instances
        };
        let mut best: Option<(f64, f64, Evaluation)> = None;
        for n_p in 0..pd_instances {
            if mode == SearchMode::NaiveAllRemote && n_p > 0 {
                break;
            }
            let split = Split {
                prfaas,
                prefill: n_p,
                decode: pd_instances - n_p,
            };
            if let Some(cand) = self.best_threshold(dist, split, &thresholds) {
                let better = match &best {
                    None => true,
                    Some((l, h, _)) => {
                        cand.0 > *l * (1.0 + 1e-12) || (cand.0 >= *l * (1.0 - 1e-12) && cand.1 > *h)
                    }
                };
                if better {
                    best = Some(cand);
                }
            }
        }
        match best {
            Some((l, _, e)) if l > 0.0 => Ok(e),
            _ => Err(PolicyError::Infeasible(
                "every configuration has zero throughput",
            )),
        }
    }
}

impl ThroughputModel {
    /// Every distinct threshold for `dist`: 0 (offload all), each support point, ∞ (offload none).
    pub fn threshold_grid(dist: &LengthDistribution) -> Vec<f64> {
        let mut v = Vec::with_capacity(dist.lengths().len() + 2);
        v.push(0.0);
        v.extend_from_slice(dist.lengths());
        v.push(f64::INFINITY);
        v
    }

    /// Re-search `t` only, for a fixed split (what a running system does when bandwidth or
    /// queues change: roles move on a longer timescale).
    pub fn search_threshold(
        &self,
        dist: &LengthDistribution,
        split: Split,
    ) -> Result<Evaluation, PolicyError> {
        match self.best_threshold(dist, split, &Self::threshold_grid(dist)) {
            Some((l, _, e)) if l > 0.0 => Ok(e),
            _ => Err(PolicyError::Infeasible(
                "every threshold has zero throughput",
            )),
        }
    }

    /// `(Λ, prefill headroom, evaluation)` of the best threshold in `thresholds`.
    fn best_threshold(
        &self,
        dist: &LengthDistribution,
        split: Split,
        thresholds: &[f64],
    ) -> Option<(f64, f64, Evaluation)> {
        let mut best: Option<(f64, f64, Evaluation)> = None;
        for &t in thresholds {
            let e = self.evaluate(dist, split, t);
            let r = if e.offload_fraction > 0.0 {
                e.theta_prfaas / e.offload_fraction
            } else {
                f64::INFINITY
            };
            let l = if e.offload_fraction < 1.0 {
                safe_div(e.theta_pd_p, 1.0 - e.offload_fraction)
            } else {
                f64::INFINITY
            };
            let headroom = r.min(l);
            let better = match &best {
                None => true,
                Some((bl, bh, _)) => {
                    e.lambda > *bl * (1.0 + 1e-12)
                        || (e.lambda >= *bl * (1.0 - 1e-12) && headroom > *bh)
                }
            };
            if better {
                best = Some((e.lambda, headroom, e));
            }
        }
        best
    }
}

/// What a running system measures, compared against the assumptions of the last search.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Observation {
    /// Egress bytes/s currently used divided by the link's bandwidth.
    pub egress_utilisation: f64,
    /// Worst prefill queue delay (seconds) at either cluster.
    pub queue_delay_s: f64,
    /// Measured bandwidth of the link now, bytes/s.
    pub bandwidth_bytes_per_s: f64,
}

/// When to re-run the grid search for `t` (the paper's "re-search when egress utilisation or
/// queues surge"). Roles (the P:D split) are not changed by this trigger; see [`super::role`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReSearchTrigger {
    /// Re-search when egress utilisation exceeds this (0..1).
    pub egress_utilisation_high: f64,
    /// Re-search when a prefill queue is longer than this many seconds.
    pub queue_delay_high_s: f64,
    /// Re-search when the measured bandwidth differs from the one searched with by more than this
    /// factor (e.g. 1.5 ⇒ below 2/3 or above 1.5×).
    pub bandwidth_change_factor: f64,
}

impl Default for ReSearchTrigger {
    fn default() -> Self {
        Self {
            egress_utilisation_high: 0.8,
            queue_delay_high_s: 10.0,
            bandwidth_change_factor: 1.5,
        }
    }
}

impl ReSearchTrigger {
    /// True when the last search's assumptions no longer hold.
    pub fn should_research(&self, obs: &Observation, searched_bandwidth_bytes_per_s: f64) -> bool {
        self.surging(obs) || self.bandwidth_moved(obs, searched_bandwidth_bytes_per_s)
    }

    /// Egress utilisation or a queue above its bound.
    pub fn surging(&self, obs: &Observation) -> bool {
        obs.egress_utilisation > self.egress_utilisation_high
            || obs.queue_delay_s > self.queue_delay_high_s
    }

    /// The measured bandwidth moved by more than the factor from the one searched with (or
    /// nothing was searched yet).
    pub fn bandwidth_moved(&self, obs: &Observation, searched_bandwidth_bytes_per_s: f64) -> bool {
        let ratio = if searched_bandwidth_bytes_per_s > 0.0 && obs.bandwidth_bytes_per_s > 0.0 {
            let r = obs.bandwidth_bytes_per_s / searched_bandwidth_bytes_per_s;
            r.max(1.0 / r)
        } else {
            f64::INFINITY
        };
        ratio > self.bandwidth_change_factor
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::profile::ProfilePoint;

    pub(crate) fn linear_profile(sec_per_ktok: f64, overhead: f64) -> PrefillProfile {
        PrefillProfile::new(vec![
            ProfilePoint {
                tokens: 1000.0,
                prefill_s: overhead + sec_per_ktok,
                kv_bytes: 1e8,
            },
            ProfilePoint {
                tokens: 100_000.0,
                prefill_s: overhead + 100.0 * sec_per_ktok,
                kv_bytes: 1e9,
            },
        ])
        .unwrap()
    }

    fn model(egress: f64) -> ThroughputModel {
        ThroughputModel {
            remote_prefill: linear_profile(0.05, 0.1),
            local_prefill: linear_profile(0.15, 0.1),
            decode: DecodeProfile::new(vec![(1.0, 0.01), (64.0, 0.01 + 63.0 * 0.0005)], 40.0)
                .unwrap(),
            output_tokens: 512.0,
            egress_bytes_per_s: egress,
        }
    }

    fn dist() -> LengthDistribution {
        LengthDistribution::lognormal_truncated(9.0, 1.0, 128.0, 100_000.0, 512).unwrap()
    }

    #[test]
    fn lambda_is_min_of_terms() {
        let m = model(1e10);
        let d = dist();
        let s = Split {
            prfaas: 2,
            prefill: 2,
            decode: 4,
        };
        let e = m.evaluate(&d, s, 10_000.0);
        let p = e.offload_fraction;
        let want = (e.theta_prfaas / p)
            .min(e.theta_pd_p / (1.0 - p))
            .min(e.theta_pd_d);
        assert!((e.lambda - want).abs() < 1e-12);
        let remote_only = m.evaluate(&d, s, 0.0);
        assert_eq!(remote_only.offload_fraction, 1.0);
        assert_eq!(remote_only.theta_pd_p, 0.0);
        assert!(remote_only.lambda > 0.0);
    }

    #[test]
    fn grid_search_beats_every_grid_point() {
        let m = model(1e10);
        let d = dist();
        let best = m.search(&d, 2, 8, SearchMode::Prfaas).unwrap();
        for n_p in 0..8 {
            for t in [0.0, 1000.0, 5000.0, 20_000.0, 60_000.0, f64::INFINITY] {
                let e = m.evaluate(
                    &d,
                    Split {
                        prfaas: 2,
                        prefill: n_p,
                        decode: 8 - n_p,
                    },
                    t,
                );
                assert!(
                    e.lambda <= best.lambda * (1.0 + 1e-9),
                    "{e:?} beats {best:?}"
                );
            }
        }
        let homo = m.search(&d, 2, 8, SearchMode::Homogeneous).unwrap();
        assert_eq!(homo.split.prfaas, 0);
        assert_eq!(homo.offload_fraction, 0.0);
        assert!(best.lambda >= homo.lambda);
        let naive = m.search(&d, 2, 8, SearchMode::NaiveAllRemote).unwrap();
        assert_eq!(naive.split.prefill, 0);
        assert_eq!(naive.offload_fraction, 1.0);
    }

    #[test]
    fn scarce_egress_raises_threshold() {
        let d = dist();
        let rich = model(1e11).search(&d, 4, 8, SearchMode::Prfaas).unwrap();
        let poor = model(2e8).search(&d, 4, 8, SearchMode::Prfaas).unwrap();
        assert!(
            poor.threshold > rich.threshold,
            "{} vs {}",
            poor.threshold,
            rich.threshold
        );
        assert!(poor.egress_bytes_per_s <= 2e8 * (1.0 + 1e-9));
    }

    #[test]
    fn research_trigger_bounds() {
        let trig = ReSearchTrigger::default();
        let calm = Observation {
            egress_utilisation: 0.2,
            queue_delay_s: 1.0,
            bandwidth_bytes_per_s: 1e10,
        };
        assert!(!trig.should_research(&calm, 1e10));
        assert!(trig.should_research(
            &Observation {
                egress_utilisation: 0.9,
                ..calm
            },
            1e10
        ));
        assert!(trig.should_research(
            &Observation {
                queue_delay_s: 11.0,
                ..calm
            },
            1e10
        ));
        assert!(trig.should_research(
            &Observation {
                bandwidth_bytes_per_s: 1e9,
                ..calm
            },
            1e10
        ));
        assert!(trig.should_research(
            &Observation {
                bandwidth_bytes_per_s: 2e10,
                ..calm
            },
            1e10
        ));
        assert!(trig.should_research(&calm, 0.0));
    }
}
