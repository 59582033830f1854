//! Role advice: the paper's long-timescale rebalancing of the P:D split. A `pd` node that can run
//! either role is advised to switch when moving one instance across would raise `Λ` by more than
//! a hysteresis margin (so two nodes do not flip back and forth on noise).

use serde::Serialize;

use super::throughput::{Bottleneck, Split, ThroughputModel};
use super::workload::LengthDistribution;

/// Advice for a node that can serve either role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum RoleAdvice {
    /// Keep the current split.
    Keep,
    /// Decode is the bottleneck: one prefill instance should become a decode instance.
    PrefillToDecode,
    /// Local prefill is the bottleneck: one decode instance should become a prefill instance.
    DecodeToPrefill,
}

/// Compare `Λ` at `split` with one instance moved either way, at threshold `t`.
pub fn advise_role(
    model: &ThroughputModel,
    dist: &LengthDistribution,
    split: Split,
    t: f64,
    hysteresis: f64,
) -> RoleAdvice {
    let now = model.evaluate(dist, split, t);
    let margin = now.lambda * (1.0 + hysteresis.max(0.0));
    if now.bottleneck == Bottleneck::Decode && split.prefill > 0 {
        let moved = Split {
            prefill: split.prefill - 1,
            decode: split.decode + 1,
            ..split
        };
        if model.evaluate(dist, moved, t).lambda > margin {
            return RoleAdvice::PrefillToDecode;
        }
    }
    if now.bottleneck == Bottleneck::LocalPrefill && split.decode > 1 {
        let moved = Split {
            prefill: split.prefill + 1,
            decode: split.decode - 1,
            ..split
        };
        if model.evaluate(dist, moved, t).lambda > margin {
            return RoleAdvice::DecodeToPrefill;
        }
    }
    RoleAdvice::Keep
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::profile::{DecodeProfile, PrefillProfile, ProfilePoint};

    fn model() -> ThroughputModel {
        let prof = PrefillProfile::new(vec![
            ProfilePoint {
                tokens: 1000.0,
                prefill_s: 0.2,
                kv_bytes: 1e8,
            },
            ProfilePoint {
                tokens: 100_000.0,
                prefill_s: 10.0,
                kv_bytes: 1e9,
            },
        ])
        .unwrap();
        ThroughputModel {
            remote_prefill: prof.clone(),
            local_prefill: prof,
            decode: DecodeProfile::new(vec![(1.0, 0.01), (64.0, 0.04)], 40.0).unwrap(),
            output_tokens: 1024.0,
            egress_bytes_per_s: 1e10,
        }
    }

    #[test]
    fn advises_towards_the_bottleneck_and_keeps_the_optimum() {
        let m = model();
        let d = LengthDistribution::lognormal_truncated(8.0, 1.0, 128.0, 100_000.0, 256).unwrap();
        let n = 10;
        let best = m
            .search(&d, 0, n, crate::policy::SearchMode::Homogeneous)
            .unwrap();
        assert_eq!(
            advise_role(&m, &d, best.split, f64::INFINITY, 0.01),
            RoleAdvice::Keep
        );
        let too_many_p = Split {
            prfaas: 0,
            prefill: n - 1,
            decode: 1,
        };
        assert_eq!(
            advise_role(&m, &d, too_many_p, f64::INFINITY, 0.01),
            RoleAdvice::PrefillToDecode
        );
        let too_many_d = Split {
            prfaas: 0,
            prefill: 1,
            decode: n - 1,
        };
        assert_eq!(
            advise_role(&m, &d, too_many_d, f64::INFINITY, 0.01),
            RoleAdvice::DecodeToPrefill
        );
    }
}
