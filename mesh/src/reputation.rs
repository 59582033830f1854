//! Per-peer record of how its prefills went: failed, late and lying transfers count against it;
//! repeated lies ban it for a while. Sans-IO (the caller passes `now`); the mesh keeps one
//! instance, the home reports outcomes through the handle, banned peers are left out of the
//! candidates of every auction, and the penalty is available to scoring.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use libp2p::PeerId;
use serde::{Deserialize, Serialize};

/// How a transfer from a winner went, as the home saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum TransferOutcome {
    /// Arrived in time and verified.
    Ok,
    /// Refused after winning, cut, timed out or malformed.
    Failed,
    /// Arrived, but much later than the bid promised.
    Late,
    /// Failed verification (made-up, foreign or corrupted KV), or KV that arrived malformed,
    /// out of shape or non-finite: the stream is authenticated, so the winner sent it so.
    Lied,
}

/// Reputation settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReputationConfig {
    /// Lies (failed verifications) that ban a peer…
    pub ban_after_lies: u32,
    /// Late transfers (no stream within the winner's own claim plus `late_margin`: a bid it did
    /// not keep) that ban a peer, counted apart from lies. A winner that stalls after every award
    /// would otherwise cost each auction it wins the margin, for ever.
    pub ban_after_lates: u32,
    /// …for this long.
    #[serde(with = "humantime_serde")]
    pub ban_for: Duration,
}

impl Default for ReputationConfig {
    fn default() -> Self {
        Self {
            ban_after_lies: 2,
            ban_after_lates: 3,
            ban_for: Duration::from_secs(600),
        }
    }
}

/// One peer's record.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct PeerRecord {
    /// Transfers that arrived and passed.
    pub ok: u32,
    /// Transfers that failed.
    pub failed: u32,
    /// Transfers that arrived late.
    pub late: u32,
    /// Transfers that failed verification.
    pub lied: u32,
    /// Lies since the last ban ended (a ban starts at `ban_after_lies`).
    #[serde(skip)]
    lies_since_ban: u32,
    /// Late transfers since the last ban ended (a ban starts at `ban_after_lates`).
    #[serde(skip)]
    lates_since_ban: u32,
    /// Milliseconds of ban left when the record was read (0: not banned).
    pub banned_ms: u64,
}

#[derive(Debug, Clone, Copy, Default)]
struct Entry {
    record: PeerRecord,
    banned_until: Option<Instant>,
}

/// The records, bounded to `max` peers (the least-known are forgotten first).
#[derive(Debug)]
pub struct Reputation {
    cfg: ReputationConfig,
    peers: HashMap<PeerId, Entry>,
    max: usize,
}

impl Reputation {
    /// Empty, at most `max` peers remembered.
    pub fn new(cfg: ReputationConfig, max: usize) -> Self {
        Self {
            cfg,
            peers: HashMap::new(),
            max: max.max(1),
        }
    }

    /// Records `outcome` for `peer`; returns whether this started a ban.
    pub fn record(&mut self, peer: PeerId, outcome: TransferOutcome, now: Instant) -> bool {
        if !self.peers.contains_key(&peer) && self.peers.len() >= self.max {
            // Forget a peer without lies or bans first (those records matter most).
            let victim = self
                .peers
                .iter()
                .min_by_key(|(_, e)| (e.record.lied, e.banned_until.is_some(), e.record.ok))
                .map(|(p, _)| *p);
            if let Some(v) = victim {
                self.peers.remove(&v);
            }
        }
        let e = self.peers.entry(peer).or_default();
        if e.banned_until.is_some_and(|t| t <= now) {
            e.banned_until = None;
            e.record.lies_since_ban = 0;
            e.record.lates_since_ban = 0;
        }
        let r = &mut e.record;
        match outcome {
            TransferOutcome::Ok => r.ok = r.ok.saturating_add(1),
            TransferOutcome::Failed => r.failed = r.failed.saturating_add(1),
            TransferOutcome::Late => {
                r.late = r.late.saturating_add(1);
                r.lates_since_ban = r.lates_since_ban.saturating_add(1);
            }
            TransferOutcome::Lied => {
                r.lied = r.lied.saturating_add(1);
                r.lies_since_ban = r.lies_since_ban.saturating_add(1);
            }
        }
        let struck_out = r.lies_since_ban >= self.cfg.ban_after_lies.max(1)
            || r.lates_since_ban >= self.cfg.ban_after_lates.max(1);
        if e.banned_until.is_none() && struck_out {
            e.banned_until = Some(now + self.cfg.ban_for);
            return true;
        }
        false
    }

    /// Whether `peer` is banned at `now`.
    pub fn is_banned(&self, peer: &PeerId, now: Instant) -> bool {
        self.peers
            .get(peer)
            .and_then(|e| e.banned_until)
            .is_some_and(|t| t > now)
    }

    /// Factor (≥ 1) by which a bid's score should be multiplied for `peer`'s record: each
    /// failure or late transfer among its recent ones costs, lies cost most. A peer with a
    /// clean record, or none, gets 1.
    pub fn penalty(&self, peer: &PeerId) -> f64 {
        let Some(e) = self.peers.get(peer) else {
            return 1.0;
        };
        let r = e.record;
        let bad = f64::from(r.failed) + 0.5 * f64::from(r.late) + 4.0 * f64::from(r.lied);
        let total = f64::from(r.ok) + f64::from(r.failed) + f64::from(r.late) + f64::from(r.lied);
        1.0 + 4.0 * bad / total.max(1.0)
    }

    /// Every record, with the ban time left at `now`.
    pub fn records(&self, now: Instant) -> Vec<(PeerId, PeerRecord)> {
        self.peers
            .iter()
            .map(|(p, e)| {
                let mut r = e.record;
                r.banned_ms = e
                    .banned_until
                    .map_or(0, |t| t.saturating_duration_since(now).as_millis() as u64);
                (*p, r)
            })
            .collect()
    }

    /// Peers banned at `now`.
    pub fn banned(&self, now: Instant) -> usize {
        self.peers
            .values()
            .filter(|e| e.banned_until.is_some_and(|t| t > now))
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_lies_ban_for_a_period_and_records_penalise() {
        let t0 = Instant::now();
        let mut r = Reputation::new(ReputationConfig::default(), 16);
        let (liar, flaky, good) = (PeerId::random(), PeerId::random(), PeerId::random());
        for _ in 0..4 {
            r.record(good, TransferOutcome::Ok, t0);
        }
        r.record(flaky, TransferOutcome::Ok, t0);
        r.record(flaky, TransferOutcome::Failed, t0);
        assert_eq!(r.penalty(&good), 1.0);
        assert_eq!(r.penalty(&PeerId::random()), 1.0);
        assert!(r.penalty(&flaky) > 1.0);
        assert!(
            !r.record(liar, TransferOutcome::Lied, t0),
            "one lie: no ban yet"
        );
        assert!(!r.is_banned(&liar, t0));
        assert!(r.record(liar, TransferOutcome::Lied, t0), "second lie bans");
        assert!(r.is_banned(&liar, t0 + Duration::from_secs(599)));
        assert!(r.penalty(&liar) > r.penalty(&flaky));
        assert_eq!(r.banned(t0), 1);
        let rec = r
            .records(t0)
            .into_iter()
            .find(|(p, _)| *p == liar)
            .unwrap()
            .1;
        assert_eq!((rec.lied, rec.banned_ms), (2, 600_000));
        // The ban ends; a new ban needs new lies.
        let later = t0 + Duration::from_secs(601);
        assert!(!r.is_banned(&liar, later));
        assert!(!r.record(liar, TransferOutcome::Lied, later));
        assert!(r.record(liar, TransferOutcome::Lied, later));
    }

    #[test]
    fn a_winner_late_again_and_again_is_banned_too() {
        let t0 = Instant::now();
        let mut r = Reputation::new(ReputationConfig::default(), 16);
        let staller = PeerId::random();
        assert!(!r.record(staller, TransferOutcome::Late, t0));
        assert!(!r.record(staller, TransferOutcome::Late, t0));
        assert!(!r.is_banned(&staller, t0), "two lates: no ban yet");
        assert!(
            r.record(staller, TransferOutcome::Late, t0),
            "the third bans"
        );
        assert!(r.is_banned(&staller, t0 + Duration::from_secs(599)));
        // Lates and lies are counted apart: one of each bans nobody.
        let other = PeerId::random();
        assert!(!r.record(other, TransferOutcome::Late, t0));
        assert!(!r.record(other, TransferOutcome::Lied, t0));
        assert!(!r.is_banned(&other, t0));
    }

    #[test]
    fn bounded_and_liars_are_remembered_longest() {
        let t0 = Instant::now();
        let mut r = Reputation::new(ReputationConfig::default(), 2);
        let liar = PeerId::random();
        r.record(liar, TransferOutcome::Lied, t0);
        for _ in 0..10 {
            r.record(PeerId::random(), TransferOutcome::Ok, t0);
        }
        assert_eq!(r.records(t0).len(), 2);
        assert!(r.records(t0).iter().any(|(p, _)| *p == liar));
    }
}
