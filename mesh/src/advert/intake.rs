//! Admission of signed adverts, from gossip or table sync. Sans-IO: the caller passes the clock
//! and the table, and acts on the verdict (reports it to gossipsub, dials the signer).
//!
//! Cheap checks come first — decoding, signer = named node, allowlist, age from the signed
//! sequence number, the sequence against the table, the signer's rate — so the signature is
//! verified once per unique, newer advert and never for replays or floods.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use libp2p::gossipsub::MessageAcceptance;
use libp2p::PeerId;

use super::codec::{self, AdvertError};
use super::sync::TokenBucket;
use super::table::Upsert;
use super::{Advert, PeerTable};
use crate::stats::MeshStats;
use crate::transport::Allowlist;

/// Where a signed advert came from (decides how stale copies are treated and how old it is).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Origin {
    /// Gossip: arrives as it is published; an older sequence number is a replay.
    Gossip,
    /// Table sync: the serving peer's copy, `age` old; it may legitimately lag behind gossip.
    /// `may_add`: whether this answer may still add peers we do not know (its quota of new
    /// peers is not spent).
    Sync { age: Duration, may_add: bool },
}

/// How old an advert with sequence number `seq` (the signer's wall clock, ms) is at `now_ms`,
/// giving the signer's clock `skew` either way; `None` when it claims to come from further in
/// the future than the skew allows (such a sequence number would outlive every honest one).
pub(crate) fn advert_age_from_seq(seq: u64, now_ms: u64, skew: Duration) -> Option<Duration> {
    let skew_ms = u64::try_from(skew.as_millis()).unwrap_or(u64::MAX);
    if seq > now_ms.saturating_add(skew_ms) {
        return None;
    }
    Some(Duration::from_millis(
        now_ms.saturating_sub(seq).saturating_sub(skew_ms),
    ))
}

/// Milliseconds since the Unix epoch (0 if the clock is before it). Advert sequence numbers
/// start here, so a restarted node's adverts still beat those it sent before the restart.
pub(crate) fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The bounds an intake applies.
#[derive(Debug, Clone)]
pub(crate) struct IntakeLimits {
    pub max_advert_bytes: usize,
    pub max_known_peers: usize,
    pub advert_interval: Duration,
    pub advert_expiry: Duration,
    pub max_clock_skew: Duration,
}

impl IntakeLimits {
    /// The bounds `cfg` sets.
    pub fn new(cfg: &crate::config::MeshConfig) -> Self {
        Self {
            max_advert_bytes: cfg.limits.max_advert_bytes,
            max_known_peers: cfg.limits.max_known_peers,
            advert_interval: cfg.advert_interval,
            advert_expiry: cfg.advert_expiry,
            max_clock_skew: cfg.limits.max_clock_skew,
        }
    }
}

/// An advert that passed every check and is about to be stored.
#[derive(Debug)]
pub(crate) struct Admitted {
    pub peer: PeerId,
    pub advert: Advert,
    /// How old it is (the larger of the sequence's age and a sync server's claim).
    pub age: Duration,
}

/// What [`AdvertIntake::store`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stored {
    pub verdict: MessageAcceptance,
    /// A peer we had not known.
    pub new: bool,
}

/// Advert admission state: the per-signer rate budgets (bounded like the peer table).
#[derive(Debug)]
pub(crate) struct AdvertIntake {
    limits: IntakeLimits,
    local: PeerId,
    allowlist: Allowlist,
    signer_buckets: HashMap<PeerId, TokenBucket>,
    stats: Arc<MeshStats>,
}

impl AdvertIntake {
    pub fn new(
        limits: IntakeLimits,
        local: PeerId,
        allowlist: Allowlist,
        stats: Arc<MeshStats>,
    ) -> Self {
        Self {
            limits,
            local,
            allowlist,
            signer_buckets: HashMap::new(),
            stats,
        }
    }

    fn refuse(&self, counter: Option<&AtomicU64>) -> MessageAcceptance {
        self.stats.refused_adverts.fetch_add(1, Ordering::Relaxed);
        if let Some(c) = counter {
            c.fetch_add(1, Ordering::Relaxed);
        }
        MessageAcceptance::Reject
    }

    /// Every check before the table write; `Err` carries the verdict for gossipsub.
    pub fn admit(
        &mut self,
        table: &PeerTable,
        data: &[u8],
        origin: Origin,
        now_ms: u64,
        now: Instant,
    ) -> Result<Admitted, MessageAcceptance> {
        let stats = self.stats.clone();
        let unverified = match codec::open(data, self.limits.max_advert_bytes) {
            Ok(u) => u,
            Err(e) => {
                tracing::debug!(error = %e, "advert rejected");
                let forged = matches!(e, AdvertError::SourceMismatch { .. });
                return Err(self.refuse(forged.then_some(&stats.adverts_forged)));
            }
        };
        let peer = unverified.signer;
        if !self.allowlist.allows(&peer) {
            return Err(self.refuse(None));
        }
        if peer == self.local {
            return Err(MessageAcceptance::Ignore);
        }
        // Sequence numbers are the signer's wall-clock ms: an advert is never younger than its
        // sequence says (minus clock skew), whatever a table-sync server claims, and one older
        // than the expiry (plus skew) is a replay of something that should have expired.
        let seq_age =
            advert_age_from_seq(unverified.advert.seq, now_ms, self.limits.max_clock_skew);
        let age = match (origin, seq_age) {
            (_, None) => {
                stats.adverts_stale.fetch_add(1, Ordering::Relaxed);
                return Err(self.refuse(None));
            }
            (Origin::Gossip, Some(a)) => a,
            (Origin::Sync { age, .. }, Some(a)) => age.max(a),
        };
        if age >= self.limits.advert_expiry {
            stats.adverts_stale.fetch_add(1, Ordering::Relaxed);
            return Err(match origin {
                // Gossip relays adverts as they are published: an expired one is a replay.
                Origin::Gossip => self.refuse(Some(&stats.adverts_replayed)),
                // A sync server's copy may just have aged out: not an offence.
                Origin::Sync { .. } => MessageAcceptance::Ignore,
            });
        }
        if let Some(known) = table.get(&peer).map(|e| e.advert.seq) {
            let seq = unverified.advert.seq;
            let same_bytes = seq == known && table.signed(&peer).is_some_and(|s| **s == *data);
            if same_bytes {
                // The advert we hold. Through gossip this means we had it from a table sync
                // (gossipsub drops byte-identical copies itself): accept so it is forwarded to
                // our mesh peers, who may not have it.
                return Err(match origin {
                    Origin::Gossip => MessageAcceptance::Accept,
                    Origin::Sync { .. } => MessageAcceptance::Ignore,
                });
            }
            if seq <= known {
                // A peer's table may lag behind what gossip told us, and two adverts of one node
                // published in quick succession can arrive out of order over different paths:
                // neither is an offence. Older than the expiry period (sequence numbers are
                // wall-clock ms) or the same number with other bytes is a replay or an
                // equivocation: rejected and counted. Either way it is never stored.
                let expiry_ms =
                    u64::try_from(self.limits.advert_expiry.as_millis()).unwrap_or(u64::MAX);
                let in_flight = seq < known && known - seq < expiry_ms;
                if matches!(origin, Origin::Sync { .. }) || in_flight {
                    return Err(MessageAcceptance::Ignore);
                }
                return Err(self.refuse(Some(&stats.adverts_replayed)));
            }
        }
        // One sync answer adds at most `max_new_per_sync` peers: made-up identities are free to
        // make, and one peer must not fill the table with them.
        if matches!(origin, Origin::Sync { may_add: false, .. }) && table.get(&peer).is_none() {
            stats
                .table_entries_over_quota
                .fetch_add(1, Ordering::Relaxed);
            return Err(MessageAcceptance::Ignore);
        }
        // Each signer gets a bounded rate of new adverts (honest nodes publish about one per
        // `advert_interval`; a few changes may come faster): a flood from one key costs one
        // map lookup each, not a signature check and a table write.
        if !self.signer_budget(table, peer, now) {
            stats.adverts_rate_limited.fetch_add(1, Ordering::Relaxed);
            return Err(MessageAcceptance::Ignore);
        }
        match unverified.verify() {
            Ok(advert) => Ok(Admitted { peer, advert, age }),
            Err(e) => {
                tracing::debug!(error = %e, "advert rejected");
                Err(self.refuse(Some(&stats.adverts_forged)))
            }
        }
    }

    /// Stores an admitted advert (received `age` before `now`) in `table`.
    pub fn store(
        &self,
        table: &mut PeerTable,
        admitted: Admitted,
        data: &[u8],
        origin: Origin,
        now: Instant,
    ) -> Stored {
        let received_at = now.checked_sub(admitted.age).unwrap_or(now);
        let new =
            match table.upsert_signed(admitted.peer, admitted.advert, Arc::from(data), received_at)
            {
                Upsert::New => true,
                Upsert::Updated => false,
                Upsert::Stale | Upsert::Full => {
                    return Stored {
                        verdict: MessageAcceptance::Ignore,
                        new: false,
                    }
                }
            };
        // Counters before the caller's event, so whoever reacts to the event sees them.
        self.stats.adverts_accepted.fetch_add(1, Ordering::Relaxed);
        if matches!(origin, Origin::Sync { .. }) {
            self.stats.adverts_from_sync.fetch_add(1, Ordering::Relaxed);
        }
        Stored {
            verdict: MessageAcceptance::Accept,
            new,
        }
    }

    /// Takes one advert from `signer`'s budget (burst `ADVERT_BURST`, refilled at two per
    /// `advert_interval`); `false` when it is spent. The map is bounded like the peer table.
    fn signer_budget(&mut self, table: &PeerTable, signer: PeerId, now: Instant) -> bool {
        const ADVERT_BURST: u32 = 5;
        let period = self.limits.advert_interval / 2;
        let max = self.limits.max_known_peers;
        if self.signer_buckets.len() >= max && !self.signer_buckets.contains_key(&signer) {
            self.signer_buckets.retain(|p, _| table.get(p).is_some());
            if self.signer_buckets.len() >= max {
                return false;
            }
        }
        self.signer_buckets
            .entry(signer)
            .or_insert_with(|| TokenBucket::new(ADVERT_BURST, period, now))
            .try_take(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::advert::AdvertBody;
    use libp2p::identity::Keypair;

    #[test]
    fn advert_age_comes_from_the_signed_sequence_number() {
        let skew = Duration::from_secs(2);
        let now = 1_000_000;
        assert_eq!(advert_age_from_seq(now, now, skew), Some(Duration::ZERO));
        assert_eq!(
            advert_age_from_seq(now - 1_500, now, skew),
            Some(Duration::ZERO),
            "within the skew"
        );
        assert_eq!(
            advert_age_from_seq(now - 10_000, now, skew),
            Some(Duration::from_secs(8))
        );
        assert_eq!(
            advert_age_from_seq(now + 2_000, now, skew),
            Some(Duration::ZERO),
            "a clock ahead by the skew"
        );
        assert_eq!(advert_age_from_seq(now + 2_001, now, skew), None);
        assert_eq!(advert_age_from_seq(u64::MAX, now, skew), None);
        assert_eq!(
            advert_age_from_seq(0, now, Duration::MAX),
            Some(Duration::ZERO)
        );
    }

    const NOW_MS: u64 = 10_000_000;

    fn signed(key: &Keypair, seq: u64) -> Vec<u8> {
        let advert = Advert {
            node_id: key.public().to_peer_id().to_base58(),
            seq,
            listen_addrs: vec![],
            body: AdvertBody::default(),
            observed_bandwidth: vec![],
        };
        codec::sign(&advert, key, 4096).expect("sign")
    }

    fn intake(max_known_peers: usize) -> (AdvertIntake, Arc<MeshStats>) {
        let stats = Arc::new(MeshStats::default());
        let limits = IntakeLimits {
            max_advert_bytes: 4096,
            max_known_peers,
            advert_interval: Duration::from_secs(1),
            advert_expiry: Duration::from_secs(30),
            max_clock_skew: Duration::from_secs(2),
        };
        let local = Keypair::generate_ed25519().public().to_peer_id();
        (
            AdvertIntake::new(limits, local, Allowlist::default(), stats.clone()),
            stats,
        )
    }

    fn take(
        i: &mut AdvertIntake,
        t: &mut PeerTable,
        d: &[u8],
        o: Origin,
        now: Instant,
    ) -> (MessageAcceptance, bool) {
        match i.admit(t, d, o, NOW_MS, now) {
            Ok(a) => {
                let s = i.store(t, a, d, o, now);
                (s.verdict, s.new)
            }
            Err(v) => (v, false),
        }
    }

    #[test]
    fn new_adverts_are_stored_and_replays_refused_without_a_swarm() {
        let (mut i, stats) = intake(16);
        let mut table = PeerTable::new(16);
        let now = Instant::now();
        let key = Keypair::generate_ed25519();
        let a1 = signed(&key, NOW_MS - 100);
        assert_eq!(
            take(&mut i, &mut table, &a1, Origin::Gossip, now),
            (MessageAcceptance::Accept, true)
        );
        let newer = signed(&key, NOW_MS);
        assert_eq!(
            take(&mut i, &mut table, &newer, Origin::Gossip, now),
            (MessageAcceptance::Accept, false)
        );
        // An advert older than the expiry through gossip is a replay.
        let old = signed(&key, NOW_MS - 60_000);
        assert_eq!(
            take(&mut i, &mut table, &old, Origin::Gossip, now).0,
            MessageAcceptance::Reject
        );
        assert_eq!(stats.adverts_replayed.load(Ordering::Relaxed), 1);
        // The same through sync is only ignored (the server's copy aged out).
        assert_eq!(
            take(
                &mut i,
                &mut table,
                &old,
                Origin::Sync {
                    age: Duration::ZERO,
                    may_add: true
                },
                now
            )
            .0,
            MessageAcceptance::Ignore
        );
        // From the future beyond the skew.
        let future = signed(&key, NOW_MS + 10_000);
        assert_eq!(
            take(&mut i, &mut table, &future, Origin::Gossip, now).0,
            MessageAcceptance::Reject
        );
        // Garbage.
        assert_eq!(
            take(&mut i, &mut table, b"not an advert", Origin::Gossip, now).0,
            MessageAcceptance::Reject
        );
        assert_eq!(stats.adverts_accepted.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn one_signer_gets_a_bounded_rate_of_new_adverts() {
        let (mut i, stats) = intake(16);
        let mut table = PeerTable::new(16);
        let now = Instant::now();
        let key = Keypair::generate_ed25519();
        let mut accepted = 0;
        for k in 0..20u64 {
            let a = signed(&key, NOW_MS - 1_000 + k);
            if take(&mut i, &mut table, &a, Origin::Gossip, now).0 == MessageAcceptance::Accept {
                accepted += 1;
            }
        }
        assert_eq!(accepted, 5, "the burst, then nothing at the same instant");
        assert_eq!(stats.adverts_rate_limited.load(Ordering::Relaxed), 15);
    }

    #[test]
    fn one_sync_answer_adds_a_bounded_number_of_peers() {
        let (mut i, stats) = intake(16);
        let mut table = PeerTable::new(16);
        let now = Instant::now();
        let known = Keypair::generate_ed25519();
        let full = Origin::Sync {
            age: Duration::ZERO,
            may_add: false,
        };
        let stranger = signed(&Keypair::generate_ed25519(), NOW_MS);
        assert_eq!(
            take(&mut i, &mut table, &stranger, full, now).0,
            MessageAcceptance::Ignore
        );
        assert_eq!(stats.table_entries_over_quota.load(Ordering::Relaxed), 1);
        assert!(table.is_empty());
        // Peers already known still get their updates.
        let first = signed(&known, NOW_MS - 10);
        take(&mut i, &mut table, &first, Origin::Gossip, now);
        let update = signed(&known, NOW_MS);
        assert_eq!(
            take(&mut i, &mut table, &update, full, now).0,
            MessageAcceptance::Accept
        );
        assert_eq!(stats.table_entries_over_quota.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn sync_ages_never_make_an_advert_younger_than_its_sequence() {
        let (mut i, _) = intake(16);
        let table = PeerTable::new(16);
        let key = Keypair::generate_ed25519();
        let a = signed(&key, NOW_MS - 20_000);
        let admitted = i
            .admit(
                &table,
                &a,
                Origin::Sync {
                    age: Duration::ZERO,
                    may_add: true,
                },
                NOW_MS,
                Instant::now(),
            )
            .expect("admitted");
        assert_eq!(
            admitted.age,
            Duration::from_secs(18),
            "20 s old minus 2 s skew"
        );
    }
}
