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
//!    transfer at the home's own link estimate. Candidates within [`NEAR_EQUAL_BAND`] of the best
//!    count as equal: among them the longer cached prefix first, then a per-home, per-request
//!    hash ([`rank_candidates`]), so homes reading the same adverts do not all call the same
//!    `k` peers.
//! 4. The bids are settled by [`super::settle`] with the home's own prefill as the reserve; for a
//!    prompt longer than `t` the reserve's delay counts `keep_ratio` times (the home's prefill
//!    is also its short prompts' path).

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
        /// What the reserve bid's delay counts for in the settlement
        /// ([`super::ScoringParams::reserve_delay_weight`]): `keep_ratio` for a prompt longer
        /// than `t`, 1 for one that spilled.
        reserve_delay_weight: f64,
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
    /// This home's key for this request ([`spread_key`]): spreads calls among near-equal peers.
    pub spread: u64,
    /// A prompt longer than `t` stays at home only when the home's own prefill is this many
    /// times faster than the best bid (1 = the plain reserve bid). The home's prefill is also
    /// the path of every short prompt it homes, so a long prompt kept there delays them all; the
    /// mirror of `spill_ratio`.
    pub keep_ratio: f64,
}

/// Candidates whose advertised delay is within this fraction of the best candidate's count as
/// near-equal. Adverts are up to a gossip interval old and every home reads the same ones, so a
/// strict order by advertised delay sends every home to the same `k` peers (they all look idle)
/// while equally good ones idle; within the band the order is the prefix rule, then a
/// per-request hash, so homes spread their calls and the live bids pick among them. 10 %: wider
/// than the noise between idle peers of one kind (link estimates, queue extrapolation), narrower
/// than one queued prefill.
pub const NEAR_EQUAL_BAND: f64 = 0.1;

/// A per-home, per-request key for [`rank_candidates`]: the same home and request always rank the
/// same way (a simulator run is deterministic for its seed), different requests spread.
pub fn spread_key(home: &[u8], request: u64) -> u64 {
    // FNV-1a over the home's id, then one mixing step with the request.
    let h = home.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    mix(h ^ mix(request))
}

/// splitmix64's finaliser: a bijection that spreads every input bit over the output.
fn mix(x: u64) -> u64 {
    let x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    let x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Candidates worth calling, best first, at most `k` (0 counts as 1): those with room, in groups
/// of near-equal ones. The first group is every candidate whose advertised delay is within
/// [`NEAR_EQUAL_BAND`] of the best; within a group the longer cached prefix comes first (a peer
/// that probably holds the prompt's prefix), then `hash(spread, id)`, so different requests and
/// homes call different near-equal peers. While fewer than `k` are chosen, the next group forms
/// the same way around the best of the rest.
///
/// Deterministic for a given `spread` ([`spread_key`]) and independent of the order the caller
/// lists the candidates in. `O(k·n)`: a few linear passes and a partial selection per group, so
/// a home in a mesh of thousands of peers pays little more per request than one with a handful.
pub fn rank_candidates(candidates: &[Candidate], k: usize, spread: u64) -> Vec<u32> {
    // (advertised delay, cached tokens, hash, id)
    type Entry = (f64, f64, u64, u32);
    let mut rest: Vec<Entry> = candidates
        .iter()
        .filter(|c| c.has_room)
        .map(|c| {
            let hash = mix(spread ^ mix(u64::from(c.id)));
            (c.advertised_delay_s(), c.cached_tokens, hash, c.id)
        })
        .collect();
    let k = k.max(1).min(rest.len());
    let in_group =
        |a: &Entry, b: &Entry| b.1.total_cmp(&a.1).then(a.2.cmp(&b.2)).then(a.3.cmp(&b.3));
    let mut out = Vec::with_capacity(k);
    while out.len() < k {
        let best = rest.iter().map(|e| e.0).fold(f64::INFINITY, f64::min);
        // An infinite best (no usable link anywhere) makes every one left near-equal.
        let band = best * (1.0 + NEAR_EQUAL_BAND);
        let mut n = 0;
        for i in 0..rest.len() {
            if rest[i].0 <= band || best.is_infinite() {
                rest.swap(i, n);
                n += 1;
            }
        }
        if n == 0 {
            break; // unreachable: the best one is always within its own band
        }
        let group = &mut rest[..n];
        let need = k - out.len();
        if need < group.len() {
            group.select_nth_unstable_by(need - 1, in_group);
        }
        let take = need.min(group.len());
        group[..take].sort_by(in_group);
        out.extend(group[..take].iter().map(|e| e.3));
        rest.drain(..n);
    }
    out
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
        let call = rank_candidates(input.candidates, input.top_k, input.spread);
        return if call.is_empty() {
            PlacementPlan::Local {
                incremental_tokens: l,
                reason: LocalReason::NoCandidates,
            }
        } else {
            PlacementPlan::Auction {
                call,
                spilled: false,
                reserve_delay_weight: input.keep_ratio.max(1.0),
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
            call: rank_candidates(input.candidates, input.top_k, input.spread),
            spilled: true,
            reserve_delay_weight: 1.0,
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
            spread: 0,
            keep_ratio: 2.0,
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
        assert_eq!(rank_candidates(&c, 2, 7), vec![4, 1]);
        assert_eq!(rank_candidates(&c, 10, 7), vec![4, 1, 0, 2, 5]);
        assert_eq!(rank_candidates(&c, 0, 7), vec![4]);
        assert_eq!(rank_candidates(&[], 4, 7), Vec::<u32>::new());
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
                spilled: false,
                reserve_delay_weight: 2.0,
            }
        );
        // Local queue 100 s vs 1 s remote: a short prompt spills.
        assert_eq!(
            plan(&input(500.0, &c, 100.0)),
            PlacementPlan::Auction {
                call: vec![0],
                spilled: true,
                reserve_delay_weight: 1.0,
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
            PlacementPlan::Auction { call, spilled, .. } => {
                assert_eq!((call, spilled), (vec![1, 0], false))
            }
            other => panic!("{other:?}"),
        }
    }

    /// `n` idle candidates of one kind, as every home sees them between two adverts.
    fn idle(n: u32) -> Vec<Candidate> {
        (0..n).map(|i| cand(i, 0.0, 2.0, 0.0, 1e9)).collect()
    }

    #[test]
    fn ranking_is_deterministic_for_a_key() {
        let c = idle(50);
        for key in [0, 1, spread_key(b"home-a", 42)] {
            assert_eq!(rank_candidates(&c, 4, key), rank_candidates(&c, 4, key));
        }
        assert_eq!(spread_key(b"home-a", 42), spread_key(b"home-a", 42));
        assert_ne!(spread_key(b"home-a", 42), spread_key(b"home-b", 42));
        assert_ne!(spread_key(b"home-a", 42), spread_key(b"home-a", 43));
        // The order does not depend on the order the caller lists the candidates in.
        let mut rev = c.clone();
        rev.reverse();
        assert_eq!(rank_candidates(&c, 4, 9), rank_candidates(&rev, 4, 9));
    }

    #[test]
    fn near_equal_candidates_share_the_calls() {
        // 100 idle peers, 2,000 requests from 20 homes, 4 calls each: 80 calls per peer on
        // average. A strict order called peers 0..4 every time.
        let c = idle(100);
        let mut calls = [0u32; 100];
        for home in 0..20u8 {
            for r in 0..100 {
                let call = rank_candidates(&c, 4, spread_key(&[home], r));
                assert_eq!(call.len(), 4);
                let mut d = call.clone();
                d.sort_unstable();
                d.dedup();
                assert_eq!(d.len(), 4, "a peer called twice: {call:?}");
                for id in call {
                    calls[id as usize] += 1;
                }
            }
        }
        let (lo, hi) = (calls.iter().min().unwrap(), calls.iter().max().unwrap());
        assert!(*lo >= 40 && *hi <= 130, "calls per peer {lo}..{hi}");
    }

    #[test]
    fn the_band_spreads_only_among_near_equal_peers() {
        // Peers 0..8 idle (2.0 s), 8..10 within 10 % (2.15 s), 10..20 one queued prefill behind.
        let mut c = idle(8);
        c.extend((8..10).map(|i| cand(i, 0.15, 2.0, 0.0, 1e9)));
        c.extend((10..20).map(|i| cand(i, 2.0, 2.0, 0.0, 1e9)));
        for key in 0..500 {
            let call = rank_candidates(&c, 4, key);
            assert_eq!(call.len(), 4);
            assert!(call.iter().all(|&i| i < 10), "{call:?}");
            // Asked for more than the band holds: the band first, then the rest by delay.
            let all = rank_candidates(&c, 20, key);
            assert!(all[..10].iter().all(|&i| i < 10), "{all:?}");
            assert!(all[10..].iter().all(|&i| i >= 10), "{all:?}");
        }
        // Someone outside the band is only called when the band has fewer than `k`.
        let few = [cand(0, 0.0, 2.0, 0.0, 1e9), cand(1, 5.0, 2.0, 0.0, 1e9)];
        assert_eq!(rank_candidates(&few, 2, 3), vec![0, 1]);
        assert_eq!(rank_candidates(&few, 1, 3), vec![0]);
    }

    #[test]
    fn prefix_holders_stay_first_and_top_k_holds() {
        // Holders 30 and 31 (a shorter prefill) among 30 idle peers: whatever the key, they are
        // the first two called; a holder whose advert shows a long queue is not.
        let mut c = idle(30);
        c.push(cand(30, 0.0, 1.5, 4000.0, 1e9));
        c.push(cand(31, 0.0, 1.9, 2000.0, 1e9));
        c.push(cand(32, 30.0, 0.5, 6000.0, 1e9));
        for key in 0..300 {
            for k in 1..=6 {
                let call = rank_candidates(&c, k, key);
                assert_eq!(call.len(), k);
                match k {
                    1 => assert_eq!(call, vec![30]),
                    _ => assert_eq!(call[..2], [30, 31]),
                }
                assert!(!call.contains(&32) || k > 31);
            }
        }
        // A holder just inside the band (2.1 s vs 2.0 s) still comes first.
        let mut c = idle(30);
        c.push(cand(30, 0.1, 2.0, 1000.0, 1e9));
        for key in 0..300 {
            assert_eq!(rank_candidates(&c, 4, key)[0], 30);
        }
    }

    #[test]
    fn plan_calls_spread_with_its_key() {
        let c = idle(40);
        let mut seen = std::collections::BTreeSet::new();
        for r in 0..50 {
            let mut i = input(5000.0, &c, 0.5);
            i.spread = spread_key(b"home", r);
            match plan(&i) {
                PlacementPlan::Auction { call, spilled, .. } => {
                    assert!(!spilled);
                    assert_eq!(call.len(), 2);
                    seen.extend(call);
                }
                other => panic!("{other:?}"),
            }
        }
        assert!(seen.len() > 20, "only {} peers called", seen.len());
    }
}
