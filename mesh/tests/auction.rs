//! Auction protocol over real swarms: round trip, deadline with no bids, decline under load,
//! award to an expired bid refused.

mod common;

use std::time::{Duration, Instant};

use common::*;
use prfaas_mesh::auction::{
    AuctionRequest, AuctionResponse, Award, AwardRefusal, Bid, Call, DeclineReason,
};
use prfaas_mesh::{CallAnswer, MeshConfig, MeshEvent};

fn call(request_id: u64, deadline_ms: u32) -> Call {
    Call {
        request_id,
        model: model(),
        prompt_len: 2048,
        cached_prefix_tokens: 0,
        prefix_block_hashes: vec![1, 2, 3],
        kv_bytes_estimate: 48 << 20,
        deadline_ms,
    }
}

fn bid(valid_for_ms: u32) -> Bid {
    Bid {
        request_id: 0, // the mesh fills in the call's id
        bid_id: 42,
        price: 3.5,
        queue_delay_ms: 5,
        // 2048 tokens at the advertised 250 tokens/s (`prefill_body`): claims are checked.
        est_prefill_ms: 8_200,
        cached_tokens: 0,
        valid_for_ms,
    }
}

async fn pair(bidder_cfg: MeshConfig) -> (Node, Node) {
    let mut home = spawn(MeshConfig::local()).await;
    let mut cfg = bidder_cfg;
    cfg.bootstrap = vec![home.p2p_addr().to_string()];
    let mut bidder = spawn(cfg).await;
    let home_id = home.id();
    wait_for(&mut bidder.events, Duration::from_secs(10), |ev| match ev {
        MeshEvent::PeerConnected { peer } if peer == home_id => Some(()),
        _ => None,
    })
    .await
    .expect("connected");
    // The listener finishes the handshake after the dialer: wait for both sides.
    let bidder_id = bidder.id();
    wait_for(&mut home.events, Duration::from_secs(10), |ev| match ev {
        MeshEvent::PeerConnected { peer } if peer == bidder_id => Some(()),
        _ => None,
    })
    .await
    .expect("home connected");
    // Bids are checked against the bidder's advert: the home must hold it first.
    bidder
        .handle
        .set_advert(prefill_body(0, 1.0))
        .await
        .expect("advert");
    let deadline = Instant::now() + Duration::from_secs(10);
    while home
        .handle
        .prefill_candidates(model())
        .await
        .expect("candidates")
        .is_empty()
    {
        assert!(
            Instant::now() < deadline,
            "home never got the bidder's advert"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (home, bidder)
}

/// Answers every call with `answer` until the node's event queue closes.
fn auto_bidder(mut bidder: Node, answer: CallAnswer) -> tokio::task::JoinHandle<Vec<MeshEvent>> {
    tokio::spawn(async move {
        let mut other = Vec::new();
        while let Some(ev) = bidder.events.recv().await {
            match ev {
                MeshEvent::AuctionCall { token, .. } => {
                    let _ = bidder.handle.answer_call(token, answer.clone()).await;
                }
                ev @ MeshEvent::Awarded { .. } => {
                    other.push(ev);
                    break;
                }
                _ => {}
            }
        }
        other
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn call_bid_award_round_trip() {
    let (home, bidder) = pair(MeshConfig::local()).await;
    let bidder_id = bidder.id();
    let bidder_handle = bidder.handle.clone();
    let task = auto_bidder(bidder, CallAnswer::Bid(bid(10_000)));
    let round = home.handle.call_auction(&[bidder_id], call(7, 2_000)).await;
    assert_eq!(round.bids.len(), 1, "{round:?}");
    let (peer, b) = &round.bids[0];
    assert_eq!(*peer, bidder_id);
    assert_eq!(b.request_id, 7);
    assert_eq!(b.price, 3.5);
    let accepted = home
        .handle
        .award(
            bidder_id,
            Award {
                request_id: 7,
                bid_id: b.bid_id,
                price: 3.0,
                tokens: Vec::new(),
                kv_wire: Default::default(),
            },
        )
        .await
        .expect("award");
    assert!(accepted);
    let evs = tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("bidder saw award")
        .expect("join");
    assert!(
        matches!(&evs[0], MeshEvent::Awarded { award, .. } if award.request_id == 7 && award.price == 3.0)
    );
    // The bid is consumed: a second award is refused.
    let again = home
        .handle
        .request(
            bidder_id,
            AuctionRequest::Award(Award {
                request_id: 7,
                bid_id: 42,
                price: 3.0,
                tokens: Vec::new(),
                kv_wire: Default::default(),
            }),
        )
        .await
        .expect("second award answered");
    assert!(matches!(
        again,
        AuctionResponse::AwardRefused {
            reason: AwardRefusal::UnknownBid,
            ..
        }
    ));
    bidder_handle.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadline_without_bids_returns_empty_round() {
    // The bidder's application never answers.
    let (home, mut bidder) = pair(MeshConfig::local()).await;
    let bidder_id = bidder.id();
    let watcher = tokio::spawn(async move {
        wait_for(&mut bidder.events, Duration::from_secs(5), |ev| match ev {
            MeshEvent::AuctionCall { .. } => Some(()),
            _ => None,
        })
        .await;
        bidder // keep it alive (and its queue unanswered) until the round ends
    });
    let t0 = Instant::now();
    let round = home.handle.call_auction(&[bidder_id], call(1, 300)).await;
    let took = t0.elapsed();
    assert!(round.bids.is_empty(), "{round:?}");
    // The bidder's mesh declines on its application's behalf (`NoAnswer`) once the call's
    // deadline has passed on its side too, at its next maintenance tick. A home whose task
    // runs late (a loaded machine) may read that decline before its own timer: both mean
    // "no answer in time".
    let no_answer = round.declines == vec![(bidder_id, DeclineReason::NoAnswer)];
    assert!(
        round.silent == vec![bidder_id] || (round.silent.is_empty() && no_answer),
        "{round:?}"
    );
    assert!(
        took >= Duration::from_millis(300),
        "returned before the deadline: {took:?}"
    );
    assert!(
        took < Duration::from_secs(3),
        "deadline not honoured: {took:?}"
    );
    let _bidder = watcher.await.expect("join");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overloaded_bidder_declines() {
    let mut cfg = MeshConfig::local();
    cfg.limits.max_pending_calls = 2;
    let (home, bidder) = pair(cfg).await;
    let bidder_id = bidder.id();
    // Nobody answers the bidder's calls, so after two pending calls it is "under load".
    let _keep = bidder;
    let mut declines = 0;
    let mut handles = Vec::new();
    for i in 0..5u64 {
        let h = home.handle.clone();
        handles.push(tokio::spawn(async move {
            h.request(bidder_id, AuctionRequest::Call(call(100 + i, 1_000)))
                .await
        }));
    }
    for h in handles {
        match h.await.expect("join").expect("answered") {
            AuctionResponse::Decline {
                reason: DeclineReason::Overloaded,
                ..
            } => declines += 1,
            AuctionResponse::Decline {
                reason: DeclineReason::NoAnswer,
                ..
            } => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(
        declines, 3,
        "two calls pending, three declined as overloaded"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn award_to_expired_bid_is_refused() {
    let (home, bidder) = pair(MeshConfig::local()).await;
    let bidder_id = bidder.id();
    // valid_for_ms = 0: the bid has lapsed by the time any award can arrive.
    let _task = auto_bidder(bidder, CallAnswer::Bid(bid(0)));
    let round = home.handle.call_auction(&[bidder_id], call(9, 2_000)).await;
    assert_eq!(round.bids.len(), 1);
    let resp = home
        .handle
        .request(
            bidder_id,
            AuctionRequest::Award(Award {
                request_id: 9,
                bid_id: 42,
                price: 1.0,
                tokens: Vec::new(),
                kv_wire: Default::default(),
            }),
        )
        .await
        .expect("answered");
    assert!(
        matches!(
            resp,
            AuctionResponse::AwardRefused {
                reason: AwardRefusal::Expired,
                ..
            }
        ),
        "{resp:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emulated_latency_delays_the_round_trip() {
    let (home, bidder) = pair(MeshConfig::local()).await;
    let bidder_id = bidder.id();
    let _task = auto_bidder(bidder, CallAnswer::Decline(DeclineReason::NotPrefilling));
    home.handle
        .set_added_latency(bidder_id, Duration::from_millis(40));
    let t0 = Instant::now();
    let round = home.handle.call_auction(&[bidder_id], call(3, 2_000)).await;
    assert_eq!(
        round.declines,
        vec![(bidder_id, DeclineReason::NotPrefilling)]
    );
    assert!(
        t0.elapsed() >= Duration::from_millis(80),
        "{:?}",
        t0.elapsed()
    );
}

/// A home that learned a bidder only from gossip (no connection yet) still gets its bid: the
/// request dials the bidder's advertised address (large meshes call peers they are not
/// connected to all the time).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn call_reaches_a_bidder_known_only_from_gossip() {
    let hub = spawn(MeshConfig::local()).await;
    let boot = hub.p2p_addr().to_string();
    // One peer each, so neither dials the other when its advert arrives through the hub.
    let leaf = |boot: &str| MeshConfig {
        target_peers: 1,
        bootstrap: vec![boot.to_string()],
        ..MeshConfig::local()
    };
    let home = spawn(leaf(&boot)).await;
    let bidder = spawn(leaf(&boot)).await;
    bidder
        .handle
        .set_advert(prefill_body(0, 1.0))
        .await
        .expect("advert");
    let bidder_id = bidder.id();
    // Its prefill advert (bids are checked against it), not only its first one.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !home
        .handle
        .prefill_candidates(model())
        .await
        .expect("candidates")
        .iter()
        .any(|(p, _)| *p == bidder_id)
    {
        assert!(
            Instant::now() < deadline,
            "home never learned the bidder through the hub"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let connected = home.handle.connected_peers().await.expect("peers");
    assert!(
        !connected.contains(&bidder_id),
        "precondition: home must not be connected to the bidder yet"
    );
    let bidder_handle = bidder.handle.clone();
    let _task = auto_bidder(bidder, CallAnswer::Bid(bid(10_000)));
    let round = home.handle.call_auction(&[bidder_id], call(9, 5_000)).await;
    assert_eq!(round.bids.len(), 1, "{round:?}");
    assert_eq!(round.bids[0].0, bidder_id);
    bidder_handle.shutdown().await;
    hub.handle.shutdown().await;
}

/// Bids that would win on a lie are refused and counted: a non-finite or negative price, a
/// prefill claimed far faster than the bidder's advertised speed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dishonest_bids_are_refused_and_counted() {
    for (i, (price, est_prefill_ms)) in [(f64::NEG_INFINITY, 8_200), (-1.0, 8_200), (1.0, 0)]
        .into_iter()
        .enumerate()
    {
        let (home, bidder) = pair(MeshConfig::local()).await;
        let bidder_id = bidder.id();
        let lie = Bid {
            price,
            est_prefill_ms,
            ..bid(10_000)
        };
        let _task = auto_bidder(bidder, CallAnswer::Bid(lie));
        let round = home
            .handle
            .call_auction(&[bidder_id], call(20 + i as u64, 2_000))
            .await;
        assert!(round.bids.is_empty(), "case {i}: {round:?}");
        assert_eq!(round.refused.len(), 1, "case {i}: {round:?}");
        assert_eq!(home.handle.stats().bids_refused, 1, "case {i}");
    }
}

/// Capacity is checked again when an award arrives: two bids made while there was room for one
/// award, the second award is refused as overloaded until the first is done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn awards_beyond_capacity_are_refused() {
    let (home, mut bidder) = pair(MeshConfig::local()).await;
    let bidder_id = bidder.id();
    bidder.handle.serve_gate().set_max(1);
    let bidder_handle = bidder.handle.clone();
    let (slot_tx, mut slot_rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        while let Some(ev) = bidder.events.recv().await {
            match ev {
                MeshEvent::AuctionCall { token, .. } => {
                    let _ = bidder
                        .handle
                        .answer_call(token, CallAnswer::Bid(bid(10_000)))
                        .await;
                }
                MeshEvent::Awarded { slot, .. } => {
                    let _ = slot_tx.send(slot).await;
                }
                _ => {}
            }
        }
    });
    let award = |request_id| {
        AuctionRequest::Award(Award {
            request_id,
            bid_id: 42,
            price: 4.0,
            tokens: Vec::new(),
            kv_wire: Default::default(),
        })
    };
    for r in [31, 32, 33] {
        let round = home.handle.call_auction(&[bidder_id], call(r, 2_000)).await;
        assert_eq!(round.bids.len(), 1, "{round:?}");
    }
    let first = home
        .handle
        .request(bidder_id, award(31))
        .await
        .expect("answered");
    assert!(
        matches!(first, AuctionResponse::AwardAccepted { .. }),
        "{first:?}"
    );
    let second = home
        .handle
        .request(bidder_id, award(32))
        .await
        .expect("answered");
    assert!(
        matches!(
            second,
            AuctionResponse::AwardRefused {
                reason: AwardRefusal::Overloaded,
                ..
            }
        ),
        "{second:?}"
    );
    assert_eq!(bidder_handle.stats().awards_refused_busy, 1);
    // Serving the first award ends: its place is free again.
    drop(slot_rx.recv().await.expect("first award's slot"));
    let third = home
        .handle
        .request(bidder_id, award(33))
        .await
        .expect("answered");
    assert!(
        matches!(third, AuctionResponse::AwardAccepted { .. }),
        "{third:?}"
    );
}

/// Repeated lies (failed KV verifications reported by the home) ban the winner: it is left out
/// of the candidates of every auction, and the ban is counted and visible in its record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_liars_are_banned_from_auctions() {
    use prfaas_mesh::reputation::TransferOutcome;
    let (home, bidder) = pair(MeshConfig::local()).await;
    let liar = bidder.id();
    let listed = |c: Vec<(prfaas_mesh::PeerId, _)>| c.iter().any(|(p, _)| *p == liar);
    home.handle.record_transfer(liar, TransferOutcome::Failed);
    assert!(home.handle.reputation_penalty(&liar) > 1.0);
    home.handle.record_transfer(liar, TransferOutcome::Lied);
    assert!(listed(
        home.handle.prefill_candidates(model()).await.expect("c")
    ));
    home.handle.record_transfer(liar, TransferOutcome::Lied);
    assert!(!listed(
        home.handle.prefill_candidates(model()).await.expect("c")
    ));
    assert_eq!(home.handle.stats().peers_banned, 1);
    let rec = home.handle.reputation();
    assert!(rec
        .iter()
        .any(|(p, r)| *p == liar && r.lied == 2 && r.banned_ms > 0));
}
