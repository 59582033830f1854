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

/// What a node that may serve both roles serves now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RoleMode {
    /// Both, as configured (`pd`).
    Both,
    /// Prefill only: homes no new requests.
    PrefillOnly,
    /// Decode only: bids in no auctions.
    DecodeOnly,
}

impl RoleMode {
    /// Whether a node in this mode prefills for others (of a `pd` node's two roles).
    pub fn prefills(self) -> bool {
        self != RoleMode::DecodeOnly
    }

    /// Whether a node in this mode homes (admits and decodes) requests.
    pub fn homes(self) -> bool {
        self != RoleMode::PrefillOnly
    }
}

/// A node's role over time, with the drain between two modes: moving to a mode that gives a
/// role up first stops taking new work of that role (no bids, or no new requests) while the
/// node still advertises its old roles and finishes what it has in flight; only then does it
/// advertise the new mode. A move that only adds a role takes effect at once.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct RoleState {
    /// The mode the node advertises (and serves, for work in flight).
    pub advertised: RoleMode,
    /// The mode it is moving to (`== advertised` when not draining).
    pub target: RoleMode,
    /// When the last change began (s, the caller's clock).
    pub since_s: f64,
}

impl RoleState {
    /// Serving `mode` since `now_s`.
    pub fn new(mode: RoleMode, now_s: f64) -> Self {
        Self {
            advertised: mode,
            target: mode,
            since_s: now_s,
        }
    }

    /// Whether a drain is under way.
    pub fn draining(&self) -> bool {
        self.advertised != self.target
    }

    /// Whether new prefill work (bids, awards) is taken now.
    pub fn takes_prefill(&self) -> bool {
        self.advertised.prefills() && self.target.prefills()
    }

    /// Whether new requests are homed now.
    pub fn takes_homing(&self) -> bool {
        self.advertised.homes() && self.target.homes()
    }

    /// Starts moving to `to` at `now_s`: at once when no role is given up, else by a drain.
    pub fn begin(&mut self, to: RoleMode, now_s: f64) {
        let gives_up = (self.advertised.prefills() && !to.prefills())
            || (self.advertised.homes() && !to.homes());
        self.target = to;
        self.since_s = now_s;
        if !gives_up {
            self.advertised = to;
        }
    }

    /// Ends a drain once nothing of the role given up is in flight (`prefills_in_flight`:
    /// prefills served for others; `homed_in_flight`: requests this node homes). Returns `true`
    /// when the advertised mode changed.
    pub fn poll_drain(&mut self, prefills_in_flight: usize, homed_in_flight: usize) -> bool {
        if !self.draining() {
            return false;
        }
        let prefill_done = self.target.prefills() || prefills_in_flight == 0;
        let homing_done = self.target.homes() || homed_in_flight == 0;
        if prefill_done && homing_done {
            self.advertised = self.target;
            return true;
        }
        false
    }
}

/// The runtime role conversion rule: where `advice` points from `current`, unless the last
/// change (or the start) was less than `min_interval_s` ago. A converted node moves back to
/// `Both` when the advice reverses, before converting the other way, so roles move one step at
/// a time. Returns the new mode, or `None` to keep the current one.
pub fn next_role(
    current: RoleMode,
    advice: RoleAdvice,
    now_s: f64,
    last_change_s: f64,
    min_interval_s: f64,
) -> Option<RoleMode> {
    let elapsed = now_s - last_change_s;
    if elapsed.is_nan() || elapsed < min_interval_s.max(0.0) {
        return None;
    }
    let next = match (current, advice) {
        (_, RoleAdvice::Keep) => return None,
        // Decode is the bottleneck: give up prefill.
        (RoleMode::Both, RoleAdvice::PrefillToDecode) => RoleMode::DecodeOnly,
        (RoleMode::PrefillOnly, RoleAdvice::PrefillToDecode) => RoleMode::Both,
        // Prefill is the bottleneck: give up homing.
        (RoleMode::Both, RoleAdvice::DecodeToPrefill) => RoleMode::PrefillOnly,
        (RoleMode::DecodeOnly, RoleAdvice::DecodeToPrefill) => RoleMode::Both,
        _ => return None,
    };
    Some(next)
}

#[cfg(test)]
mod tests {
    #[test]
    fn role_changes_are_rate_limited_and_step_by_step() {
        use RoleAdvice::*;
        use RoleMode::*;
        assert_eq!(
            next_role(Both, PrefillToDecode, 100.0, 0.0, 60.0),
            Some(DecodeOnly)
        );
        assert_eq!(
            next_role(Both, DecodeToPrefill, 100.0, 0.0, 60.0),
            Some(PrefillOnly)
        );
        // Too soon after the last change (or the start), or NaN time: keep.
        assert_eq!(next_role(Both, PrefillToDecode, 30.0, 0.0, 60.0), None);
        assert_eq!(next_role(Both, PrefillToDecode, f64::NAN, 0.0, 60.0), None);
        assert_eq!(next_role(DecodeOnly, Keep, 1e9, 0.0, 60.0), None);
        // Already converted the way the advice points: nothing more to give.
        assert_eq!(next_role(DecodeOnly, PrefillToDecode, 1e9, 0.0, 60.0), None);
        // The advice reversed: back to both first, never straight across.
        assert_eq!(
            next_role(DecodeOnly, DecodeToPrefill, 1e9, 0.0, 60.0),
            Some(Both)
        );
        assert_eq!(
            next_role(PrefillOnly, PrefillToDecode, 1e9, 0.0, 60.0),
            Some(Both)
        );
    }

    use super::*;
    use crate::policy::profile::{DecodeProfile, PrefillProfile, ProfilePoint};

    #[test]
    fn giving_up_a_role_drains_before_it_is_advertised() {
        use RoleMode::*;
        let mut r = RoleState::new(Both, 0.0);
        assert!(r.takes_prefill() && r.takes_homing() && !r.draining());
        // Both → decode only: no new prefill work at once, the old roles advertised while two
        // served prefills finish; homed requests in flight do not hold the drain.
        r.begin(DecodeOnly, 10.0);
        assert!(r.draining() && !r.takes_prefill() && r.takes_homing());
        assert_eq!(
            (r.advertised, r.target, r.since_s),
            (Both, DecodeOnly, 10.0)
        );
        assert!(!r.poll_drain(2, 5));
        assert!(!r.poll_drain(1, 0));
        assert!(r.poll_drain(0, 5));
        assert_eq!(r.advertised, DecodeOnly);
        assert!(!r.draining() && !r.takes_prefill() && r.takes_homing());
        assert!(!r.poll_drain(0, 0), "nothing left to drain");
        // Back to both only adds a role: at once.
        r.begin(Both, 20.0);
        assert!(!r.draining() && r.takes_prefill() && r.takes_homing());
        // Both → prefill only waits for the homed requests, not for served prefills.
        r.begin(PrefillOnly, 30.0);
        assert!(r.draining() && r.takes_prefill() && !r.takes_homing());
        assert!(!r.poll_drain(0, 1));
        assert!(r.poll_drain(3, 0));
        assert_eq!(r.advertised, PrefillOnly);
    }

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
