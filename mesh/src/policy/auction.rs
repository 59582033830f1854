//! Auction economics of the decentralized mesh (DESIGN.md §3 "Auction").
//!
//! **Pricing.** A prefill node asks `price = base · work_ktok · (1 + α·queue_s + β·utilisation)`:
//! proportional to the work it would do (uncached tokens, so a prefix-cache hit lowers the bid)
//! and rising with its load, so busy nodes price themselves out and load spreads across the mesh.
//!
//! **Scoring.** The home node scores each bid
//! `score = price + λ · (queue_delay + prefill_time + kv_bytes / observed_bandwidth)`, where the
//! bandwidth is what the home has *measured* to that bidder (an EWMA of real transfers), not what
//! the bidder claims. `λ` converts seconds of time-to-first-token into price units. The home
//! cluster's own prefill enters as a **reserve bid**: priced by the same rule (its capacity has
//! the same opportunity cost), no transfer term, never paid, and it wins ties.
//!
//! **Settlement.** Lowest score wins. The winner is paid the price at which its score would tie
//! the runner-up's: `payment = score₂ − λ · delay_winner` (the multi-attribute Vickrey /
//! second-score rule). The payment does not depend on the winner's own price, so as long as the
//! delay components are checked by the home (queue and prefill from the bidder's profile, bandwidth
//! measured) asking one's true cost is a dominant strategy *in each auction*. With a single bid
//! the home's `max_score` acts as the runner-up (a posted reserve), which keeps the rule truthful.
//!
//! Limit (measured in the simulator, see the `prfaas simulate` notes): across *repeated* auctions
//! a bidder with a queue can gain by inflating its price — losing low-rent auctions keeps its
//! queue short, which raises the speed rent it earns in later ones. The per-auction argument does
//! not cover that; pricing the queue's opportunity cost (`queue_premium_per_s`) only narrows it.

use serde::Serialize;

use super::{check_range, PolicyError};

/// Identity of a bidder in one auction (a peer index; the node maps it to a `PeerId`).
pub type BidderId = u32;

/// Parameters of the pricing rule.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PricingParams {
    /// Price per 1K uncached tokens on an idle node.
    pub base_per_ktok: f64,
    /// Relative premium per second of queued work (`α`).
    pub queue_premium_per_s: f64,
    /// Relative premium at full utilisation (`β`).
    pub utilisation_premium: f64,
}

/// Load figures a bidder prices with.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BidderLoad {
    /// Seconds of work already queued.
    pub queue_delay_s: f64,
    /// Busy fraction over the last window, 0..1.
    pub utilisation: f64,
}

impl PricingParams {
    /// Validate.
    pub fn new(
        base_per_ktok: f64,
        queue_premium_per_s: f64,
        utilisation_premium: f64,
    ) -> Result<Self, PolicyError> {
        check_range("base_per_ktok", base_per_ktok, 0.0, 1e12)?;
        check_range("queue_premium_per_s", queue_premium_per_s, 0.0, 1e6)?;
        check_range("utilisation_premium", utilisation_premium, 0.0, 1e6)?;
        Ok(Self {
            base_per_ktok,
            queue_premium_per_s,
            utilisation_premium,
        })
    }

    /// The truthful price for `work_tokens` uncached tokens at `load`.
    pub fn price(&self, work_tokens: f64, load: BidderLoad) -> f64 {
        let q = load.queue_delay_s.max(0.0);
        let u = load.utilisation.clamp(0.0, 1.0);
        self.base_per_ktok * work_tokens.max(0.0) / 1000.0
            * (1.0 + self.queue_premium_per_s * q + self.utilisation_premium * u)
    }
}

/// One offer.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Bid {
    /// Who bids.
    pub bidder: BidderId,
    /// Asked price.
    pub price: f64,
    /// Queue delay before the bidder would start (s).
    pub queue_delay_s: f64,
    /// Prefill time of the uncached part (s).
    pub prefill_s: f64,
    /// KV bytes to ship to the home (0 for the reserve bid).
    pub kv_bytes: f64,
    /// True for the home's own prefill.
    pub reserve: bool,
}

/// Home-side scoring parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScoringParams {
    /// `λ`: price units per second of delay.
    pub lambda_per_s: f64,
    /// Highest acceptable score; also the runner-up when only one bid is valid.
    pub max_score: f64,
    /// The reserve bid's delay counts this many times (1 = plain). The placement sets it above
    /// 1 for prompts longer than `t` ([`super::PlacementPlan::Auction`]): keeping a long prompt
    /// at home also delays every short prompt that queues behind it there, which its own delay
    /// does not show.
    pub reserve_delay_weight: f64,
}

impl ScoringParams {
    /// Delay part of a bid's score in seconds.
    pub fn delay_s(&self, bid: &Bid, observed_bandwidth_bytes_per_s: f64) -> f64 {
        let transfer = if bid.reserve || bid.kv_bytes <= 0.0 {
            0.0
        } else if observed_bandwidth_bytes_per_s > 0.0 {
            bid.kv_bytes / observed_bandwidth_bytes_per_s
        } else {
            f64::INFINITY
        };
        let own = bid.queue_delay_s.max(0.0) + bid.prefill_s.max(0.0);
        if bid.reserve {
            own * self.reserve_delay_weight.max(1.0)
        } else {
            own + transfer
        }
    }

    /// `price + λ · delay`; NaN anywhere scores `+∞` (never wins).
    pub fn score(&self, bid: &Bid, observed_bandwidth_bytes_per_s: f64) -> f64 {
        let s = bid.price + self.lambda_per_s * self.delay_s(bid, observed_bandwidth_bytes_per_s);
        if s.is_nan() {
            f64::INFINITY
        } else {
            s
        }
    }
}

/// Result of one auction.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Award {
    /// Index into the bid slice.
    pub index: usize,
    /// The winning bidder.
    pub bidder: BidderId,
    /// Whether the home prefills itself.
    pub reserve: bool,
    /// Winner's score.
    pub score: f64,
    /// Score it had to beat (runner-up or `max_score`).
    pub runner_up_score: f64,
    /// Paid to the winner (0 for the reserve).
    pub payment: f64,
}

/// Run one second-score auction over `(bid, observed_bandwidth)` pairs. Returns `None` when no
/// bid scores within `max_score`. Ties go to the reserve bid, then to the lower bidder id, so the
/// outcome is deterministic.
pub fn settle(bids: &[(Bid, f64)], params: &ScoringParams) -> Option<Award> {
    // Lower score first; at equal scores the reserve (the home keeps the prompt), then the
    // lower bidder id. Only the best two matter: one pass, however many bid.
    let before = |a: (usize, f64), b: (usize, f64)| {
        a.1.total_cmp(&b.1)
            .then(bids[b.0].0.reserve.cmp(&bids[a.0].0.reserve))
            .then(bids[a.0].0.bidder.cmp(&bids[b.0].0.bidder))
            .is_lt()
    };
    let mut first: Option<(usize, f64)> = None;
    let mut second: Option<(usize, f64)> = None;
    for (i, (b, bw)) in bids.iter().enumerate() {
        let s = params.score(b, *bw);
        if s > params.max_score || s.is_nan() {
            continue;
        }
        let x = (i, s);
        match first {
            Some(f) if !before(x, f) => {
                if second.is_none_or(|t| before(x, t)) {
                    second = Some(x);
                }
            }
            _ => {
                second = first;
                first = Some(x);
            }
        }
    }
    let (index, score) = first?;
    let runner_up_score = second.map_or(params.max_score, |r| r.1);
    let (bid, bw) = bids[index];
    let payment = if bid.reserve {
        0.0
    } else {
        runner_up_score - params.lambda_per_s * params.delay_s(&bid, bw)
    };
    Some(Award {
        index,
        bidder: bid.bidder,
        reserve: bid.reserve,
        score,
        runner_up_score,
        payment,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SP: ScoringParams = ScoringParams {
        lambda_per_s: 1.0,
        max_score: 1e9,
        reserve_delay_weight: 1.0,
    };

    fn bid(bidder: BidderId, price: f64, prefill_s: f64, kv: f64) -> Bid {
        Bid {
            bidder,
            price,
            queue_delay_s: 0.0,
            prefill_s,
            kv_bytes: kv,
            reserve: false,
        }
    }

    #[test]
    fn price_rises_with_load_and_falls_with_cache() {
        let p = PricingParams::new(0.01, 0.2, 0.5).unwrap();
        let idle = BidderLoad {
            queue_delay_s: 0.0,
            utilisation: 0.0,
        };
        let busy = BidderLoad {
            queue_delay_s: 5.0,
            utilisation: 0.9,
        };
        assert!(p.price(10_000.0, busy) > p.price(10_000.0, idle));
        assert!(p.price(2_000.0, idle) < p.price(10_000.0, idle));
        assert_eq!(p.price(-5.0, idle), 0.0);
        assert!(PricingParams::new(f64::NAN, 0.0, 0.0).is_err());
    }

    #[test]
    fn second_score_payment_ties_runner_up() {
        let bids = [(bid(1, 2.0, 1.0, 1e9), 1e9), (bid(2, 3.0, 1.0, 1e9), 1e9)];
        let a = settle(&bids, &SP).unwrap();
        assert_eq!(a.bidder, 1);
        assert_eq!(a.runner_up_score, 5.0);
        assert!((a.payment - 3.0).abs() < 1e-12);
        assert!(a.payment >= bids[0].0.price);
        let solo = settle(
            &bids[..1],
            &ScoringParams {
                lambda_per_s: 1.0,
                max_score: 10.0,
                reserve_delay_weight: 1.0,
            },
        )
        .unwrap();
        assert!((solo.payment - 8.0).abs() < 1e-12);
        assert!(settle(
            &bids,
            &ScoringParams {
                lambda_per_s: 1.0,
                max_score: 1.0,
                reserve_delay_weight: 1.0,
            }
        )
        .is_none());
        assert!(settle(&[], &SP).is_none());
    }

    #[test]
    fn nan_and_zero_bandwidth_never_win() {
        let bids = [
            (bid(1, f64::NAN, 1.0, 1.0), 1e9),
            (bid(2, 1.0, 1.0, 1.0), 0.0),
            (bid(3, 9.0, 1.0, 1.0), 1e9),
        ];
        assert_eq!(settle(&bids, &SP).unwrap().bidder, 3);
    }

    #[test]
    fn reserve_wins_ties_and_is_not_paid() {
        let reserve = Bid {
            reserve: true,
            ..bid(0, 0.0, 2.0, 1e9)
        };
        let bids = [(bid(5, 1.0, 1.0, 0.0), 1e9), (reserve, 0.0)];
        let a = settle(&bids, &SP).unwrap();
        assert!(a.reserve);
        assert_eq!(a.payment, 0.0);
    }

    #[test]
    fn reserve_delay_weight_makes_home_keep_only_much_faster_prompts() {
        let reserve = Bid {
            bidder: 9,
            price: 0.0,
            queue_delay_s: 1.0,
            prefill_s: 2.0,
            kv_bytes: 0.0,
            reserve: true,
        };
        // Remote: 4 s of prefill, transfer free. Plain: home 3 s wins; weighted ×2: 6 s loses.
        let bids = [(reserve, 0.0), (bid(1, 0.0, 4.0, 0.0), 1e9)];
        assert!(settle(&bids, &SP).unwrap().reserve);
        let w2 = ScoringParams {
            reserve_delay_weight: 2.0,
            ..SP
        };
        let a = settle(&bids, &w2).unwrap();
        assert_eq!((a.bidder, a.reserve), (1, false));
        // The winner is paid up to the weighted reserve's score: 6 − 4 = 2.
        assert!((a.payment - 2.0).abs() < 1e-12);
        // Twice as fast at home (2 s vs 4.5 s): kept even when weighted.
        let fast = Bid {
            queue_delay_s: 0.0,
            ..reserve
        };
        let bids = [(fast, 0.0), (bid(1, 0.0, 4.5, 0.0), 1e9)];
        assert!(settle(&bids, &w2).unwrap().reserve);
        // Weights below 1 count as 1: the reserve is never favoured by it.
        let w0 = ScoringParams {
            reserve_delay_weight: 0.0,
            ..SP
        };
        assert_eq!(w0.delay_s(&reserve, 0.0), 3.0);
    }
}
