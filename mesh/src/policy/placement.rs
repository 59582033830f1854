//! Where one request's prefill runs: one function for the node's planner and the simulator's
//! decentralized homes (DESIGN.md §4 step 2).
//!
//! 1. The offload rule on the incremental length ([`super::OffloadRule`]) against the home's
//!    own cache: a peer's cached prefix cannot make the home's prefill shorter (nothing pulls it),
//!    it only ranks that peer first.
//! 2. A prompt within `t` stays local — unless the home's own prefill would take more than
//!    `spill_ratio` times as long as the best candidate's advertised estimate (a queue surge:
//!    the decentralized form of "re-search when queues surge").
//! 3. Otherwise the home calls the `top_k` candidates its adverts rank best: same model and
//!    layout (the caller filters), room for the prompt's KV, then by the delay the advert
//!    promises — queue, prefill of the part the peer's prefix summary says it lacks, and the KV
//!    transfer at the home's own link estimate — ties to the longer cached prefix.
//! 4. The bids are settled by [`super::settle`] with the home's own prefill as the reserve.

use serde::Serialize;

use super::offload::{OffloadRule, Placement, RequestShape};

/// One peer that could prefill, as the home sees it from its advert and its own link estimate.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Candidate {
    /// Caller's index of the peer.
    pub id: u32,
    /// Advertised queue in seconds (queued work at the advertised speed).
    pub queue_delay_s: f64,
    /// Prefill time of the tokens the peer lacks, at its advertised profile (s).
    pub prefill_s: f64,
    /// Prompt tokens the advert's prefix summary says the peer probably caches.
    pub cached_tokens: f64,
    /// Whether the advertised free KV can hold the prompt.
    pub has_room: bool,
    /// KV bytes to ship to the home.
    pub kv_bytes: f64,
    /// The home's link estimate towards the peer, bytes/s.
    pub bandwidth_bytes_per_s: f64,
}

impl Candidate {
    /// Delay to first token the advert promises: queue + prefill + transfer. NaN or a dead link
    /// is `+∞` (ranked last, never called unless nothing else exists).
    pub fn advertised_delay_s(&self) -> f64 {
        let transfer = if self.kv_bytes <= 0.0 {
            0.0
        } else if self.bandwidth_bytes_per_s > 0.0 {
            self.kv_bytes / self.bandwidth_bytes_per_s
        } else {
            f64::INFINITY
        };
        if self.queue_delay_s.is_nan() || self.prefill_s.is_nan() || transfer.is_nan() {
            return f64::INFINITY;
        }
        self.queue_delay_s.max(0.0) + self.prefill_s.max(0.0) + transfer
    }
}

/// What the home decided before any call goes out.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub enum PlacementPlan {
    /// Prefill here.
    Local {
        /// The incremental length the rule compared with `t`.
        incremental_tokens: f64,
        /// Why, for logs and metrics.
        reason: LocalReason,
    },
    /// Call these candidates (their `id`s, best first) with the home's own prefill as reserve.
    Auction {
        /// Who to call.
        call: Vec<u32>,
        /// True when the prompt was within `t` but the home's queue made it spill.
        spilled: bool,
    },
}

/// Why a prompt stays local.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum LocalReason {
    /// `l ≤ t`.
    Short,
    /// Longer than `t`, but no candidate has room for it.
    NoCandidates,
}

/// Inputs of one placement.
#[derive(Debug, Clone, Copy)]
pub struct PlacementInput<'a> {
    /// The prompt; `cached_remote_tokens` is ignored (remote hits only rank the candidates).
    pub request: RequestShape,
    /// Current `t`.
    pub threshold: f64,
    /// The home's own queue + prefill estimate for this prompt (s).
    pub local_delay_s: f64,
    /// Candidates (already filtered to the right model and layout).
    pub candidates: &'a [Candidate],
    /// How many to call at most (0 counts as 1).
    pub top_k: usize,
    /// A short prompt spills to the mesh when local is this many times slower than the best
    /// candidate (`∞` = never).
    pub spill_ratio: f64,
}

/// Candidates worth calling, best first, at most `k`: those with room, by advertised delay, ties
/// to the longer cached prefix then the lower id (deterministic). Linear in the candidates (a
/// partial selection, then a sort of the `k` chosen), so a home in a mesh of thousands of peers
/// pays little more per request than one with a handful.
pub fn rank_candidates(candidates: &[Candidate], k: usize) -> Vec<u32> {
    let mut c: Vec<(f64, f64, u32)> = candidates
        .iter()
        .filter(|c| c.has_room)
        .map(|c| (c.advertised_delay_s(), c.cached_tokens, c.id))
        .collect();
    let order = |a: &(f64, f64, u32), b: &(f64, f64, u32)| {
        a.0.total_cmp(&b.0)
            .then(b.1.total_cmp(&a.1))
            .then(a.2.cmp(&b.2))
    };
    let k = k.max(1).min(c.len());
    if k == 0 {
        return Vec::new();
    }
    if k < c.len() {
        c.select_nth_unstable_by(k - 1, order);
        c.truncate(k);
    }
    c.sort_by(order);
    c.into_iter().map(|c| c.2).collect()
}

/// Decide local or which peers to call (the auction itself is [`super::settle`]).
pub fn plan(input: &PlacementInput<'_>) -> PlacementPlan {
    // A peer's cached prefix shortens *its* prefill, not the home's: the home cannot pull that
    // KV except by offloading to the peer, which ships the whole KV anyway. So only the home's
    // own cache makes a prompt short enough to stay local (DESIGN.md §4: `l = len − h` with `h`
    // the home's hit); remote hits rank the candidates (their advertised prefill is shorter).
    let shape = RequestShape {
        cached_remote_tokens: 0.0,
        ..input.request
    };
    let rule = OffloadRule {
        threshold_tokens: input.threshold,
    };
    let l = rule.incremental_tokens(&shape, false);
    if rule.decide(&shape, false) == Placement::Offload {
        let call = rank_candidates(input.candidates, input.top_k);
        return if call.is_empty() {
            PlacementPlan::Local {
                incremental_tokens: l,
                reason: LocalReason::NoCandidates,
            }
        } else {
            PlacementPlan::Auction {
                call,
                spilled: false,
            }
        };
    }
    // Within `t`: local unless the home's queue makes it spill (only a candidate with room and
    // a finite advertised delay can take it).
    let best_remote = input
        .candidates
        .iter()
        .filter(|c| c.has_room)
        .map(Candidate::advertised_delay_s)
        .fold(f64::INFINITY, f64::min);
    if input.local_delay_s > input.spill_ratio * best_remote {
        PlacementPlan::Auction {
            call: rank_candidates(input.candidates, input.top_k),
            spilled: true,
        }
    } else {
        PlacementPlan::Local {
            incremental_tokens: l,
            reason: LocalReason::Short,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cand(id: u32, queue: f64, prefill: f64, cached: f64, bw: f64) -> Candidate {
        Candidate {
            id,
            queue_delay_s: queue,
            prefill_s: prefill,
            cached_tokens: cached,
            has_room: true,
            kv_bytes: 1e6,
            bandwidth_bytes_per_s: bw,
        }
    }

    fn input<'a>(total: f64, cands: &'a [Candidate], local_delay: f64) -> PlacementInput<'a> {
        PlacementInput {
            request: RequestShape {
                total_tokens: total,
                cached_local_tokens: 0.0,
                cached_remote_tokens: 0.0,
            },
            threshold: 1000.0,
            local_delay_s: local_delay,
            candidates: cands,
            top_k: 2,
            spill_ratio: 4.0,
        }
    }

    #[test]
    fn ranks_by_advertised_delay_and_calls_top_k() {
        let c = [
            cand(0, 5.0, 1.0, 0.0, 1e9),
            cand(1, 0.0, 1.0, 0.0, 1e9),
            cand(2, 0.0, 1.0, 0.0, 1e3), // slow link: 1000 s of transfer
            Candidate {
                has_room: false,
                ..cand(3, 0.0, 0.1, 0.0, 1e9)
            },
            cand(4, 0.0, 0.5, 500.0, 1e9), // holds the prefix: less to prefill
            cand(5, f64::NAN, 0.5, 0.0, 1e9),
        ];
        assert_eq!(rank_candidates(&c, 2), vec![4, 1]);
        assert_eq!(rank_candidates(&c, 10), vec![4, 1, 0, 2, 5]);
        assert_eq!(rank_candidates(&c, 0), vec![4]);
        assert_eq!(rank_candidates(&[], 4), Vec::<u32>::new());
    }

    #[test]
    fn short_stays_local_long_goes_to_auction_and_surges_spill() {
        let c = [cand(0, 0.0, 1.0, 0.0, 1e9)];
        assert!(matches!(
            plan(&input(500.0, &c, 0.5)),
            PlacementPlan::Local {
                reason: LocalReason::Short,
                ..
            }
        ));
        assert_eq!(
            plan(&input(5000.0, &c, 0.5)),
            PlacementPlan::Auction {
                call: vec![0],
                spilled: false
            }
        );
        // Local queue 100 s vs 1 s remote: a short prompt spills.
        assert_eq!(
            plan(&input(500.0, &c, 100.0)),
            PlacementPlan::Auction {
                call: vec![0],
                spilled: true
            }
        );
        assert!(matches!(
            plan(&input(5000.0, &[], 0.5)),
            PlacementPlan::Local {
                reason: LocalReason::NoCandidates,
                ..
            }
        ));
    }

    #[test]
    fn a_remote_prefix_never_keeps_a_prompt_local_but_ranks_its_holder_first() {
        // 5000 tokens, 4500 of them cached at candidate 1: the home still lacks all 5000, so
        // the prompt is offloaded, and the holder (shorter advertised prefill) is called first.
        let c = [cand(0, 0.0, 0.5, 0.0, 1e9), cand(1, 0.0, 0.05, 4500.0, 1e9)];
        match plan(&input(5000.0, &c, 0.3)) {
            PlacementPlan::Auction { call, spilled } => {
                assert_eq!((call, spilled), (vec![1, 0], false))
            }
            other => panic!("{other:?}"),
        }
    }
}
