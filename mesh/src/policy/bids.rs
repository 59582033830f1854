//! Honest-bid checks: a home takes no bid at face value. Sans-IO: the caller passes the call it
//! sent, the bid it got and the bidder's signed advert.
//!
//! Only claims that make a bid *win* are checked. A price of 0 is a legitimate gift; a negative
//! or non-finite one would win every second-score auction outright (and poison the payment
//! rule). A bidder claiming to prefill much faster than its advertised speed would win on a lie;
//! claiming to be slower only loses, so it is never refused. Cached-token claims are only
//! bounded by the prompt: the advertised prefix summary lags the bidder's cache by up to an
//! advert refresh, so an honest bidder that just cached a prefix would be refused if claims
//! had to match it (a cache claim that turns out false shows up as a late transfer).

use crate::advert::Advert;
use crate::auction::{Bid, Call};

/// How much faster than its advertised speed a bidder may claim to be. Advertised speeds are
/// measured at one or a few lengths and move with load, so the bound is loose: it catches
/// bids that are off by orders of magnitude (a 0 ms prefill of 10k tokens), not jitter.
pub const SPEED_TOLERANCE: f64 = 4.0;

/// Absolute slack on a claimed prefill time, ms (timer granularity, rounding, tiny prompts).
pub const PREFILL_SLACK_MS: f64 = 50.0;

/// Why a bid was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum BidFault {
    /// NaN, ±inf or a negative price.
    #[error("price {0} is not a finite, non-negative number")]
    BadPrice(f64),
    /// The bidder is not in the peer table (no advert to check against).
    #[error("bidder has no advert")]
    NoAdvert,
    /// The bidder does not advertise prefill for the called model.
    #[error("bidder does not advertise this model")]
    WrongModel,
    /// More cached tokens than the prompt has.
    #[error("claims {claimed} cached tokens of a {prompt_len}-token prompt")]
    CacheClaim {
        /// Claimed.
        claimed: u32,
        /// The prompt's length.
        prompt_len: u32,
    },
    /// The advert has no usable prefill speed to check claims against.
    #[error("bidder advertises no prefill speed")]
    NoProfile,
    /// Claims a prefill far faster than the bidder's advertised speed.
    #[error(
        "claims {claimed_ms} ms of prefill; its advertised speed needs about {expected_ms:.0} ms"
    )]
    TooFast {
        /// Claimed `est_prefill_ms`.
        claimed_ms: u32,
        /// Time at the advertised speed.
        expected_ms: f64,
    },
}

/// Checks `bid` (an answer to `call`) against the bidder's advert. `Ok` means the bid may be
/// scored; a fault is refused and counted by the caller.
pub fn check_bid(call: &Call, bid: &Bid, advert: Option<&Advert>) -> Result<(), BidFault> {
    if !bid.price.is_finite() || bid.price < 0.0 {
        return Err(BidFault::BadPrice(bid.price));
    }
    let advert = advert.ok_or(BidFault::NoAdvert)?;
    if !advert.can_prefill(&call.model) {
        return Err(BidFault::WrongModel);
    }
    if bid.cached_tokens > call.prompt_len {
        return Err(BidFault::CacheClaim {
            claimed: bid.cached_tokens,
            prompt_len: call.prompt_len,
        });
    }
    let speed = f64::from(advert.peak_prefill_speed());
    if !speed.is_finite() || speed <= 0.0 {
        return Err(BidFault::NoProfile);
    }
    let work = f64::from(call.prompt_len.saturating_sub(bid.cached_tokens));
    let expected_ms = work / speed * 1e3;
    if f64::from(bid.est_prefill_ms) + PREFILL_SLACK_MS < expected_ms / SPEED_TOLERANCE {
        return Err(BidFault::TooFast {
            claimed_ms: bid.est_prefill_ms,
            expected_ms,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::advert::{AdvertBody, ModelRef, PrefillPoint, PrefixSummary, Role};

    fn model() -> ModelRef {
        ModelRef {
            model_id: "m".into(),
            weights_hash: [1; 32],
            kv_layout_version: 1,
            kv_layout_hash: [2; 32],
        }
    }

    fn advert(tokens_per_sec: f32, cached: &[u64]) -> Advert {
        let mut prefix_summary = PrefixSummary::with_size(256, 3);
        for h in cached {
            prefix_summary.insert(*h);
        }
        Advert {
            node_id: String::new(),
            seq: 1,
            listen_addrs: vec![],
            body: AdvertBody {
                roles: vec![Role::Prefill],
                models: vec![model()],
                prefill_profile: vec![PrefillPoint {
                    tokens: 1024,
                    tokens_per_sec,
                }],
                prefix_summary,
                ..AdvertBody::default()
            },
            observed_bandwidth: vec![],
        }
    }

    fn call(prompt_len: u32, hashes: Vec<u64>) -> Call {
        Call {
            request_id: 1,
            model: model(),
            prompt_len,
            cached_prefix_tokens: 0,
            prefix_block_hashes: hashes,
            kv_bytes_estimate: 0,
            deadline_ms: 100,
        }
    }

    fn bid(price: f64, est_prefill_ms: u32, cached_tokens: u32) -> Bid {
        Bid {
            request_id: 1,
            bid_id: 1,
            price,
            queue_delay_ms: 0,
            est_prefill_ms,
            cached_tokens,
            valid_for_ms: 1000,
        }
    }

    #[test]
    fn honest_bids_pass_and_lies_that_win_are_refused() {
        let hashes: Vec<u64> = (1..=10).collect();
        let c = call(1000, hashes.clone());
        let a = advert(1000.0, &hashes[..4]); // 1000 tok/s, first 4 of 10 blocks cached
                                              // Honest: 1000 tokens at 1000 tok/s = 1 s; with 400 cached, 0.6 s.
        assert_eq!(check_bid(&c, &bid(1.0, 1000, 0), Some(&a)), Ok(()));
        assert_eq!(check_bid(&c, &bid(0.6, 600, 400), Some(&a)), Ok(()));
        assert_eq!(
            check_bid(&c, &bid(0.0, 1000, 0), Some(&a)),
            Ok(()),
            "a gift"
        );
        assert_eq!(
            check_bid(&c, &bid(9.0, 60_000, 0), Some(&a)),
            Ok(()),
            "slow"
        );
        // Within the tolerance (load moves speeds): 4× faster than advertised still passes.
        assert_eq!(check_bid(&c, &bid(1.0, 250, 0), Some(&a)), Ok(()));
        for p in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, -1.0, -1e308] {
            assert!(matches!(
                check_bid(&c, &bid(p, 1000, 0), Some(&a)),
                Err(BidFault::BadPrice(_))
            ));
        }
        assert_eq!(
            check_bid(&c, &bid(1.0, 1000, 0), None),
            Err(BidFault::NoAdvert)
        );
        assert!(matches!(
            check_bid(&c, &bid(1.0, 0, 0), Some(&a)),
            Err(BidFault::TooFast { claimed_ms: 0, .. })
        ));
        assert!(matches!(
            check_bid(&c, &bid(0.0, 0, 1001), Some(&a)),
            Err(BidFault::CacheClaim {
                claimed: 1001,
                prompt_len: 1000
            })
        ));
        let mut other = advert(1000.0, &[]);
        other.body.models[0].weights_hash = [9; 32];
        assert_eq!(
            check_bid(&c, &bid(1.0, 1000, 0), Some(&other)),
            Err(BidFault::WrongModel)
        );
    }

    #[test]
    fn tiny_prompts_pass_and_missing_profiles_are_refused() {
        let a = advert(1000.0, &[]);
        // 10 tokens: 10 ms expected; 0 ms claimed is within the absolute slack.
        assert_eq!(
            check_bid(&call(10, vec![]), &bid(1.0, 0, 0), Some(&a)),
            Ok(())
        );
        let mut none = advert(0.0, &[]);
        none.body.prefill_profile.clear();
        assert_eq!(
            check_bid(&call(100_000, vec![]), &bid(1.0, 0, 0), Some(&none)),
            Err(BidFault::NoProfile),
            "no profile: no claim can be checked"
        );
    }
}
