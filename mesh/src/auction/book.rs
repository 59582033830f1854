//! Bidder-side record of outstanding bids, so an award can be checked against what was offered
//! and when it lapses. Sans-IO: the caller passes `now`.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use libp2p::PeerId;

use super::{Award, AwardRefusal, Bid};

#[derive(Debug, Clone)]
struct Outstanding {
    bid_id: u64,
    valid_until: Instant,
}

/// Outstanding bids keyed by (home peer, request id). Bounded: at most `max` entries, and at
/// most `max_per_home` for one home, so one peer calling for bids without ever awarding cannot
/// fill the book and starve every other home; when full the caller declines new calls.
#[derive(Debug)]
pub struct BidBook {
    bids: HashMap<(PeerId, u64), Outstanding>,
    max: usize,
    max_per_home: usize,
}

/// Result of checking an award.
#[derive(Debug, Clone, PartialEq)]
pub enum AwardCheck {
    /// The bid was live: it is now consumed.
    Accepted,
    /// Refused for this reason.
    Refused(AwardRefusal),
}

impl BidBook {
    /// Empty book holding at most `max` bids, at most `max_per_home` of them for one home.
    pub fn new(max: usize, max_per_home: usize) -> Self {
        Self {
            bids: HashMap::new(),
            max,
            max_per_home,
        }
    }

    /// Whether another bid for `home` can be recorded.
    pub fn has_room(&self, home: &PeerId) -> bool {
        self.bids.len() < self.max
            && self.bids.keys().filter(|(h, _)| h == home).count() < self.max_per_home
    }

    /// Records a bid sent to `home` at `now`. Returns `false` (and records nothing) when full.
    pub fn record(&mut self, home: PeerId, bid: &Bid, now: Instant) -> bool {
        if !self.has_room(&home) {
            return false;
        }
        let valid_until = now + Duration::from_millis(u64::from(bid.valid_for_ms));
        self.bids.insert(
            (home, bid.request_id),
            Outstanding {
                bid_id: bid.bid_id,
                valid_until,
            },
        );
        true
    }

    /// Checks and consumes an award from `home`. An award at or after the bid's expiry is refused.
    pub fn award(&mut self, home: PeerId, award: &Award, now: Instant) -> AwardCheck {
        let key = (home, award.request_id);
        match self.bids.get(&key) {
            Some(o) if o.bid_id != award.bid_id => AwardCheck::Refused(AwardRefusal::UnknownBid),
            Some(o) if now >= o.valid_until => {
                self.bids.remove(&key);
                AwardCheck::Refused(AwardRefusal::Expired)
            }
            Some(_) => {
                self.bids.remove(&key);
                AwardCheck::Accepted
            }
            None => AwardCheck::Refused(AwardRefusal::UnknownBid),
        }
    }

    /// Drops the bid for a cancelled call; returns whether there was one.
    pub fn cancel(&mut self, home: PeerId, request_id: u64) -> bool {
        self.bids.remove(&(home, request_id)).is_some()
    }

    /// Forgets lapsed bids (they would be refused anyway); keeps the book small.
    pub fn expire(&mut self, now: Instant) {
        self.bids.retain(|_, o| now < o.valid_until);
    }

    /// Number of outstanding bids.
    pub fn len(&self) -> usize {
        self.bids.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.bids.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bid(request_id: u64, bid_id: u64, valid_for_ms: u32) -> Bid {
        Bid {
            request_id,
            bid_id,
            price: 1.0,
            queue_delay_ms: 0,
            est_prefill_ms: 10,
            cached_tokens: 0,
            valid_for_ms,
        }
    }

    fn award(request_id: u64, bid_id: u64) -> Award {
        Award {
            request_id,
            bid_id,
            price: 1.0,
            tokens: Vec::new(),
            kv_wire: Default::default(),
        }
    }

    #[test]
    fn award_within_validity_is_accepted_once() {
        let t0 = Instant::now();
        let home = PeerId::random();
        let mut b = BidBook::new(4, 4);
        assert!(b.record(home, &bid(1, 10, 100), t0));
        assert_eq!(
            b.award(home, &award(1, 10), t0 + Duration::from_millis(99)),
            AwardCheck::Accepted
        );
        assert_eq!(
            b.award(home, &award(1, 10), t0 + Duration::from_millis(99)),
            AwardCheck::Refused(AwardRefusal::UnknownBid)
        );
    }

    #[test]
    fn expired_wrong_id_and_foreign_awards_are_refused() {
        let t0 = Instant::now();
        let home = PeerId::random();
        let mut b = BidBook::new(4, 4);
        b.record(home, &bid(1, 10, 100), t0);
        b.record(home, &bid(2, 20, 100), t0);
        assert_eq!(
            b.award(home, &award(2, 21), t0),
            AwardCheck::Refused(AwardRefusal::UnknownBid)
        );
        assert_eq!(
            b.award(PeerId::random(), &award(2, 20), t0),
            AwardCheck::Refused(AwardRefusal::UnknownBid)
        );
        assert_eq!(
            b.award(home, &award(1, 10), t0 + Duration::from_millis(100)),
            AwardCheck::Refused(AwardRefusal::Expired)
        );
        assert!(b.cancel(home, 2));
        assert!(b.is_empty());
    }

    #[test]
    fn full_book_refuses_and_expire_frees_room() {
        let t0 = Instant::now();
        let home = PeerId::random();
        let mut b = BidBook::new(1, 1);
        assert!(b.record(home, &bid(1, 1, 5), t0));
        assert!(!b.record(home, &bid(2, 2, 5), t0));
        b.expire(t0 + Duration::from_millis(5));
        assert!(b.record(home, &bid(2, 2, 5), t0));
    }

    #[test]
    fn one_home_cannot_fill_the_book() {
        let mut b = BidBook::new(4, 2);
        let now = Instant::now();
        let (greedy, other) = (PeerId::random(), PeerId::random());
        assert!(b.record(greedy, &bid(1, 1, 1000), now));
        assert!(b.record(greedy, &bid(2, 2, 1000), now));
        assert!(!b.has_room(&greedy));
        assert!(!b.record(greedy, &bid(3, 3, 1000), now), "over its share");
        assert!(b.has_room(&other));
        assert!(b.record(other, &bid(1, 4, 1000), now));
        assert_eq!(b.len(), 3);
    }
}
