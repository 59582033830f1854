//! The bidder's side of `/prfaas/auction/2` as a state machine: inbound calls waiting for the
//! application's answer, the bid book, and award-time capacity. Sans-IO and generic over the
//! response channel `C`, so it is tested without a swarm: the router passes each request in with
//! its channel and sends whatever response comes back on that channel.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use libp2p::PeerId;

use super::{
    AuctionRequest, AuctionResponse, AwardCheck, AwardRefusal, BidBook, DeclineReason, ServeGate,
};
use crate::event::{CallToken, MeshEvent};
use crate::handle::CallAnswer;
use crate::stats::MeshStats;
use crate::transport::Allowlist;

/// A call waiting for the application's answer.
#[derive(Debug)]
struct PendingCall<C> {
    peer: PeerId,
    request_id: u64,
    channel: C,
    deadline: Instant,
}

/// Bounds on what callers can make us hold.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ServerLimits {
    pub max_pending_calls: usize,
    pub max_pending_calls_per_peer: usize,
    pub max_outstanding_bids: usize,
    pub max_outstanding_bids_per_peer: usize,
}

impl ServerLimits {
    /// The bounds `limits` sets.
    pub fn new(limits: &crate::config::Limits) -> Self {
        Self {
            max_pending_calls: limits.max_pending_calls,
            max_pending_calls_per_peer: limits.max_pending_calls_per_peer,
            max_outstanding_bids: limits.max_outstanding_bids,
            max_outstanding_bids_per_peer: limits.max_outstanding_bids_per_peer,
        }
    }
}

/// Bidder-side auction state.
#[derive(Debug)]
pub(crate) struct AuctionServer<C> {
    limits: ServerLimits,
    pending: HashMap<u64, PendingCall<C>>,
    next_token: u64,
    book: BidBook,
    gate: ServeGate,
    /// Only these peers may call us.
    allowlist: Allowlist,
    stats: Arc<MeshStats>,
}

impl<C> AuctionServer<C> {
    pub fn new(
        limits: ServerLimits,
        gate: ServeGate,
        allowlist: Allowlist,
        stats: Arc<MeshStats>,
    ) -> Self {
        Self {
            book: BidBook::new(
                limits.max_outstanding_bids,
                limits.max_outstanding_bids_per_peer,
            ),
            limits,
            pending: HashMap::new(),
            next_token: 0,
            gate,
            allowlist,
            stats,
        }
    }

    fn emit(&self, emit: &mut impl FnMut(MeshEvent) -> bool, ev: MeshEvent) -> bool {
        let ok = emit(ev);
        if !ok {
            self.stats.dropped_events.fetch_add(1, Ordering::Relaxed);
        }
        ok
    }

    /// Handles one request from `peer`. Returns the response to send on `channel` now, or `None`
    /// when the call waits for the application (its answer comes through [`Self::answer`]) or
    /// the allowlist leaves `peer` out (the channel is dropped, which fails the request on the
    /// other side). `emit` delivers an event to the application and says whether it was taken.
    pub fn on_request(
        &mut self,
        peer: PeerId,
        req: AuctionRequest,
        channel: C,
        now: Instant,
        mut emit: impl FnMut(MeshEvent) -> bool,
    ) -> Option<(C, AuctionResponse)> {
        if !self.allowlist.allows(&peer) {
            self.stats.refused_auction.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let resp = match req {
            AuctionRequest::Call(call) => {
                let from_peer = self.pending.values().filter(|c| c.peer == peer).count();
                let overloaded = AuctionResponse::Decline {
                    request_id: call.request_id,
                    reason: DeclineReason::Overloaded,
                };
                if self.pending.len() >= self.limits.max_pending_calls
                    || from_peer >= self.limits.max_pending_calls_per_peer
                    || !self.book.has_room(&peer)
                {
                    overloaded
                } else {
                    let token = self.next_token;
                    self.next_token = self.next_token.wrapping_add(1);
                    let request_id = call.request_id;
                    let deadline = now + Duration::from_millis(u64::from(call.deadline_ms));
                    let ev = MeshEvent::AuctionCall {
                        peer,
                        call,
                        token: CallToken(token),
                    };
                    if !self.emit(&mut emit, ev) {
                        overloaded
                    } else {
                        self.pending.insert(
                            token,
                            PendingCall {
                                peer,
                                request_id,
                                channel,
                                deadline,
                            },
                        );
                        return None;
                    }
                }
            }
            AuctionRequest::Award(award) => {
                let request_id = award.request_id;
                let refused = |reason| AuctionResponse::AwardRefused { request_id, reason };
                match self.book.award(peer, &award, now) {
                    AwardCheck::Accepted => match self.gate.try_acquire() {
                        Some(slot) => {
                            let ev = MeshEvent::Awarded { peer, award, slot };
                            if self.emit(&mut emit, ev) {
                                AuctionResponse::AwardAccepted { request_id }
                            } else {
                                // Nobody would serve it: refuse now rather than let the home
                                // wait for a stream that never opens.
                                refused(AwardRefusal::Overloaded)
                            }
                        }
                        None => {
                            self.stats
                                .awards_refused_busy
                                .fetch_add(1, Ordering::Relaxed);
                            refused(AwardRefusal::Overloaded)
                        }
                    },
                    AwardCheck::Refused(reason) => refused(reason),
                }
            }
            AuctionRequest::Cancel { request_id } => {
                if self.book.cancel(peer, request_id) {
                    self.emit(&mut emit, MeshEvent::AuctionCancelled { peer, request_id });
                }
                AuctionResponse::Cancelled { request_id }
            }
        };
        Some((channel, resp))
    }

    /// The application's answer to call `token`; `None` when the call already timed out (and
    /// was declined on its behalf).
    pub fn answer(
        &mut self,
        token: CallToken,
        answer: CallAnswer,
        now: Instant,
    ) -> Option<(C, AuctionResponse)> {
        let pc = self.pending.remove(&token.0)?;
        let resp = match answer {
            CallAnswer::Bid(mut bid) => {
                bid.request_id = pc.request_id;
                if self.book.record(pc.peer, &bid, now) {
                    AuctionResponse::Bid(bid)
                } else {
                    AuctionResponse::Decline {
                        request_id: pc.request_id,
                        reason: DeclineReason::Overloaded,
                    }
                }
            }
            CallAnswer::Decline(reason) => AuctionResponse::Decline {
                request_id: pc.request_id,
                reason,
            },
        };
        Some((pc.channel, resp))
    }

    /// Drops lapsed bids and declines, on the application's behalf, the calls it did not answer
    /// in time.
    pub fn expire(&mut self, now: Instant) -> Vec<(C, AuctionResponse)> {
        self.book.expire(now);
        let late: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, c)| now >= c.deadline)
            .map(|(t, _)| *t)
            .collect();
        late.into_iter()
            .filter_map(|t| self.pending.remove(&t))
            .map(|pc| {
                let resp = AuctionResponse::Decline {
                    request_id: pc.request_id,
                    reason: DeclineReason::NoAnswer,
                };
                (pc.channel, resp)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::advert::ModelRef;
    use crate::auction::{Award, Bid, Call};

    fn limits() -> ServerLimits {
        ServerLimits {
            max_pending_calls: 4,
            max_pending_calls_per_peer: 2,
            max_outstanding_bids: 8,
            max_outstanding_bids_per_peer: 4,
        }
    }

    fn server() -> AuctionServer<u32> {
        AuctionServer::new(
            limits(),
            ServeGate::default(),
            Allowlist::default(),
            Arc::new(MeshStats::default()),
        )
    }

    fn call(request_id: u64) -> AuctionRequest {
        AuctionRequest::Call(Call {
            request_id,
            model: ModelRef {
                model_id: "m".into(),
                weights_hash: [0; 32],
                kv_layout_version: 1,
                kv_layout_hash: [0; 32],
            },
            prompt_len: 10,
            cached_prefix_tokens: 0,
            prefix_block_hashes: vec![],
            kv_bytes_estimate: 0,
            deadline_ms: 100,
        })
    }

    fn bid(bid_id: u64) -> Bid {
        Bid {
            request_id: 0,
            bid_id,
            price: 1.0,
            queue_delay_ms: 0,
            est_prefill_ms: 10,
            cached_tokens: 0,
            valid_for_ms: 1_000,
        }
    }

    fn award(request_id: u64, bid_id: u64) -> AuctionRequest {
        AuctionRequest::Award(Award {
            request_id,
            bid_id,
            price: 1.0,
            tokens: vec![],
            kv_wire: Default::default(),
        })
    }

    fn token_of(ev: &MeshEvent) -> CallToken {
        match ev {
            MeshEvent::AuctionCall { token, .. } => *token,
            other => panic!("expected a call, got {other:?}"),
        }
    }

    #[test]
    fn a_call_waits_for_the_answer_then_its_award_is_checked() {
        let mut s = server();
        let home = PeerId::random();
        let t0 = Instant::now();
        let mut events = Vec::new();
        assert!(s
            .on_request(home, call(7), 1, t0, |e| {
                events.push(e);
                true
            })
            .is_none());
        let token = token_of(&events[0]);
        let (ch, resp) = s
            .answer(token, CallAnswer::Bid(bid(3)), t0)
            .expect("pending");
        assert_eq!(ch, 1);
        assert!(matches!(resp, AuctionResponse::Bid(b) if b.request_id == 7 && b.bid_id == 3));
        assert!(
            s.answer(token, CallAnswer::Bid(bid(3)), t0).is_none(),
            "answered once"
        );
        // An award for a bid never made is refused; the real one is accepted once.
        let (_, r) = s
            .on_request(home, award(7, 99), 2, t0, |_| true)
            .expect("now");
        assert!(matches!(r, AuctionResponse::AwardRefused { .. }));
        let (_, r) = s
            .on_request(home, award(7, 3), 3, t0, |_| true)
            .expect("now");
        assert_eq!(r, AuctionResponse::AwardAccepted { request_id: 7 });
        let (_, r) = s
            .on_request(home, award(7, 3), 4, t0, |_| true)
            .expect("now");
        assert!(
            matches!(r, AuctionResponse::AwardRefused { .. }),
            "consumed"
        );
    }

    #[test]
    fn calls_from_peers_the_allowlist_leaves_out_are_dropped_and_counted() {
        let (local, friend, stranger) = (PeerId::random(), PeerId::random(), PeerId::random());
        let allow = Allowlist::from_config(Some(&[friend.to_base58()]), local).expect("list");
        let stats = Arc::new(MeshStats::default());
        let mut s = AuctionServer::new(limits(), ServeGate::default(), allow, stats.clone());
        let now = Instant::now();
        let mut ask = |peer, id| {
            let mut events = 0;
            let out = s.on_request(peer, call(id), 0u32, now, |_| {
                events += 1;
                true
            });
            (out.is_some(), events)
        };
        assert_eq!(ask(stranger, 1), (false, 0), "dropped, never shown");
        assert_eq!(stats.refused_auction.load(Ordering::Relaxed), 1);
        assert_eq!(ask(friend, 2), (false, 1), "waits for the application");
        assert_eq!(stats.refused_auction.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn pending_calls_are_bounded_per_peer_and_in_all() {
        let mut s = server();
        let (a, b, c) = (PeerId::random(), PeerId::random(), PeerId::random());
        let t0 = Instant::now();
        let mut declined = 0;
        for (i, p) in [a, a, a, b, b, c].into_iter().enumerate() {
            if let Some((_, r)) = s.on_request(p, call(i as u64), 0, t0, |_| true) {
                assert!(matches!(
                    r,
                    AuctionResponse::Decline {
                        reason: DeclineReason::Overloaded,
                        ..
                    }
                ));
                declined += 1;
            }
        }
        // a: 2 of 3 (per peer); b: 2; c: none (4 in all).
        assert_eq!(declined, 2);
        // A full event queue declines instead of leaving the caller waiting.
        let stats = s.stats.clone();
        let mut s2 = server();
        s2.stats = stats.clone();
        let r = s2.on_request(a, call(1), 0, t0, |_| false);
        assert!(matches!(r, Some((_, AuctionResponse::Decline { .. }))));
        assert_eq!(stats.dropped_events.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn unanswered_calls_are_declined_at_their_deadline() {
        let mut s = server();
        let home = PeerId::random();
        let t0 = Instant::now();
        assert!(s.on_request(home, call(1), 5, t0, |_| true).is_none());
        assert!(s.expire(t0 + Duration::from_millis(50)).is_empty());
        let late = s.expire(t0 + Duration::from_millis(100));
        assert_eq!(late.len(), 1);
        assert_eq!(late[0].0, 5);
        assert!(matches!(
            late[0].1,
            AuctionResponse::Decline {
                reason: DeclineReason::NoAnswer,
                ..
            }
        ));
    }

    #[test]
    fn awards_beyond_capacity_are_refused_as_overloaded() {
        let gate = ServeGate::default();
        gate.set_max(1);
        let stats = Arc::new(MeshStats::default());
        let mut s: AuctionServer<u32> =
            AuctionServer::new(limits(), gate, Allowlist::default(), stats.clone());
        let home = PeerId::random();
        let t0 = Instant::now();
        let mut tokens = Vec::new();
        for id in [1, 2] {
            s.on_request(home, call(id), 0, t0, |e| {
                tokens.push(token_of(&e));
                true
            });
        }
        for (i, t) in tokens.into_iter().enumerate() {
            s.answer(t, CallAnswer::Bid(bid(i as u64)), t0)
                .expect("pending");
        }
        let mut slots = Vec::new();
        let (_, r) = s
            .on_request(home, award(1, 0), 0, t0, |e| {
                slots.push(e);
                true
            })
            .expect("now");
        assert_eq!(r, AuctionResponse::AwardAccepted { request_id: 1 });
        let (_, r) = s
            .on_request(home, award(2, 1), 0, t0, |_| true)
            .expect("now");
        assert_eq!(
            r,
            AuctionResponse::AwardRefused {
                request_id: 2,
                reason: AwardRefusal::Overloaded
            }
        );
        assert_eq!(stats.awards_refused_busy.load(Ordering::Relaxed), 1);
    }
}
