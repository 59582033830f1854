//! The `/prfaas/table/1` state machine ([`super::sync`] has the wire types): whom we asked, whom
//! we served and when, and the one follow-up sync. Sans-IO: the router sends the requests and
//! responses this returns and feeds every returned entry to the advert intake.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use libp2p::PeerId;

use super::sync::{TableEntry, TableRequest, TableResponse, TokenBucket, ENTRY_OVERHEAD};
use super::PeerTable;
use crate::config::TableSyncConfig;
use crate::transport::Allowlist;

/// Peers we synced from are remembered up to this many (the follow-up asks someone else).
const MAX_SYNCED_FROM: usize = 16;

/// Table sync state, both as asker and as server.
#[derive(Debug)]
pub(crate) struct TableSync {
    cfg: TableSyncConfig,
    max_known_peers: usize,
    /// Only these peers are asked and served.
    allowlist: Allowlist,
    /// Rate limit on the syncs we start.
    bucket: TokenBucket,
    /// Peers we asked and that have not answered yet.
    syncing: HashSet<PeerId>,
    /// When we last served each peer (bounded by `max_known_peers`).
    served: HashMap<PeerId, Instant>,
    /// Peers we synced from, so the follow-up asks someone else.
    synced_from: HashSet<PeerId>,
    /// When the one follow-up sync is due (set by the first sync's answer).
    followup_at: Option<Instant>,
    /// Whether the follow-up was scheduled already (it happens once per node).
    followup_done: bool,
}

impl TableSync {
    pub fn new(
        cfg: TableSyncConfig,
        max_known_peers: usize,
        allowlist: Allowlist,
        now: Instant,
    ) -> Self {
        Self {
            bucket: TokenBucket::new(cfg.burst, cfg.period, now),
            cfg,
            max_known_peers,
            allowlist,
            syncing: HashSet::new(),
            served: HashMap::new(),
            synced_from: HashSet::new(),
            followup_at: None,
            followup_done: false,
        }
    }

    /// A request for `peer` (just dialled), unless sync is off, the allowlist leaves `peer` out,
    /// we already asked it, or the token bucket is empty.
    pub fn on_dialled(&mut self, peer: PeerId, now: Instant) -> Option<TableRequest> {
        if !self.cfg.enabled
            || !self.allowlist.allows(&peer)
            || self.syncing.contains(&peer)
            || !self.bucket.try_take(now)
        {
            return None;
        }
        Some(self.start(peer))
    }

    fn start(&mut self, peer: PeerId) -> TableRequest {
        self.syncing.insert(peer);
        if self.synced_from.len() < MAX_SYNCED_FROM {
            self.synced_from.insert(peer);
        }
        TableRequest {
            max_entries: u32::try_from(self.cfg.max_entries).unwrap_or(u32::MAX),
        }
    }

    /// One follow-up sync, `followup_after` after our first sync completed, from a connected peer
    /// we have not synced from: adverts of nodes that joined at about the same time as us had not
    /// reached our first sync sources yet. O(N) entries once per node instead of every node
    /// republishing for every newcomer.
    pub fn followup<'a>(
        &mut self,
        now: Instant,
        mut connected: impl Iterator<Item = &'a PeerId>,
    ) -> Option<(PeerId, TableRequest)> {
        let due = self.followup_at?;
        if now < due {
            return None;
        }
        let peer =
            *connected.find(|p| !self.synced_from.contains(p) && !self.syncing.contains(p))?;
        self.followup_at = None;
        Some((peer, self.start(peer)))
    }

    /// Our table of signed adverts (ours first) for `peer`, within the entry and byte bounds; an
    /// empty table to a peer that asked within `serve_interval`; `None` when sync is off or the
    /// allowlist leaves `peer` out (the request is then refused).
    pub fn serve(
        &mut self,
        peer: PeerId,
        req: &TableRequest,
        own: Option<&Arc<[u8]>>,
        table: &PeerTable,
        now: Instant,
    ) -> Option<TableResponse> {
        if !self.cfg.enabled || !self.allowlist.allows(&peer) {
            return None;
        }
        let ts = &self.cfg;
        let mut res = TableResponse::default();
        let due = self
            .served
            .get(&peer)
            .is_none_or(|t| now.saturating_duration_since(*t) >= ts.serve_interval);
        if !due {
            return Some(res);
        }
        self.served.insert(peer, now);
        if self.served.len() > self.max_known_peers {
            let keep = ts.serve_interval;
            self.served
                .retain(|_, t| now.saturating_duration_since(*t) < keep);
        }
        let max_entries = (req.max_entries as usize).min(ts.max_entries);
        // Room for the response's own framing.
        let mut budget = ts.max_bytes.saturating_sub(64);
        let own = own.into_iter().map(|s| (s, Duration::ZERO));
        let others = table
            .signed_entries()
            .filter(|(p, _, _)| **p != peer)
            .map(|(_, s, at)| (s, now.saturating_duration_since(at)));
        for (signed, age) in own.chain(others).take(max_entries) {
            let cost = signed.len() + ENTRY_OVERHEAD;
            if cost > budget {
                break;
            }
            budget -= cost;
            res.entries.push(TableEntry {
                age_ms: u64::try_from(age.as_millis()).unwrap_or(u64::MAX),
                signed: signed.to_vec(),
            });
        }
        Some(res)
    }

    /// The entries of an answer (at most `max_entries`), each with its claimed age; nothing from
    /// a peer we did not ask.
    pub fn on_response(
        &mut self,
        peer: PeerId,
        res: TableResponse,
        now: Instant,
    ) -> Vec<(Vec<u8>, Duration)> {
        if !self.syncing.remove(&peer) {
            return Vec::new();
        }
        if !self.followup_done {
            self.followup_done = true;
            let after = self.cfg.followup_after;
            if !after.is_zero() {
                self.followup_at = Some(now + after);
            }
        }
        res.entries
            .into_iter()
            .take(self.cfg.max_entries)
            .map(|e| (e.signed, Duration::from_millis(e.age_ms)))
            .collect()
    }

    /// Our request to `peer` failed.
    pub fn on_failure(&mut self, peer: &PeerId) {
        self.syncing.remove(peer);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> TableSyncConfig {
        TableSyncConfig {
            enabled: true,
            max_entries: 3,
            max_new_per_sync: 256,
            max_bytes: 1 << 20,
            burst: 2,
            period: Duration::from_secs(10),
            serve_interval: Duration::from_secs(5),
            followup_after: Duration::from_secs(1),
        }
    }

    fn peer() -> PeerId {
        PeerId::random()
    }

    #[test]
    fn asks_each_peer_once_within_the_bucket() {
        let t0 = Instant::now();
        let mut s = TableSync::new(cfg(), 16, Allowlist::default(), t0);
        let (a, b, c) = (peer(), peer(), peer());
        assert_eq!(s.on_dialled(a, t0).map(|r| r.max_entries), Some(3));
        assert!(s.on_dialled(a, t0).is_none(), "already asked");
        assert!(s.on_dialled(b, t0).is_some());
        assert!(s.on_dialled(c, t0).is_none(), "bucket empty");
        s.on_failure(&a);
        assert!(s.on_dialled(a, t0 + Duration::from_secs(10)).is_some());
    }

    #[test]
    fn answers_only_from_asked_peers_bounded_and_schedules_one_followup() {
        let t0 = Instant::now();
        let mut s = TableSync::new(cfg(), 16, Allowlist::default(), t0);
        let (a, stranger, other) = (peer(), peer(), peer());
        s.on_dialled(a, t0).expect("asked");
        let res = TableResponse {
            entries: (0..10)
                .map(|i| TableEntry {
                    age_ms: i,
                    signed: vec![i as u8],
                })
                .collect(),
        };
        assert!(s.on_response(stranger, res.clone(), t0).is_empty());
        assert_eq!(s.on_response(a, res.clone(), t0).len(), 3, "max_entries");
        assert!(
            s.on_response(a, res, t0).is_empty(),
            "one answer per request"
        );
        let connected = [a, other];
        assert!(s.followup(t0, connected.iter()).is_none(), "not due yet");
        let later = t0 + Duration::from_secs(1);
        assert_eq!(
            s.followup(later, connected.iter()).map(|(p, _)| p),
            Some(other),
            "someone we did not sync from"
        );
        assert!(s.followup(later, connected.iter()).is_none(), "only once");
    }

    #[test]
    fn serves_ours_first_and_rate_limits_each_asker() {
        let t0 = Instant::now();
        let mut s = TableSync::new(cfg(), 16, Allowlist::default(), t0);
        let table = PeerTable::new(16);
        let own: Arc<[u8]> = Arc::from(&b"ours"[..]);
        let a = peer();
        let req = TableRequest { max_entries: 100 };
        let first = s.serve(a, &req, Some(&own), &table, t0).expect("served");
        assert_eq!(first.entries.len(), 1);
        assert_eq!(first.entries[0].signed, b"ours");
        let again = s.serve(a, &req, Some(&own), &table, t0).expect("served");
        assert!(again.entries.is_empty(), "within serve_interval");
        let mut off = TableSync::new(
            TableSyncConfig {
                enabled: false,
                ..cfg()
            },
            16,
            Allowlist::default(),
            t0,
        );
        assert!(off.serve(a, &req, Some(&own), &table, t0).is_none());
    }

    #[test]
    fn peers_the_allowlist_leaves_out_are_neither_asked_nor_served() {
        let t0 = Instant::now();
        let (local, friend, stranger) = (peer(), peer(), peer());
        let allow = Allowlist::from_config(Some(&[friend.to_base58()]), local).expect("list");
        let mut s = TableSync::new(cfg(), 16, allow, t0);
        let req = TableRequest { max_entries: 100 };
        let table = PeerTable::new(16);
        assert!(s.on_dialled(stranger, t0).is_none());
        assert!(s.serve(stranger, &req, None, &table, t0).is_none());
        assert!(s.on_dialled(friend, t0).is_some());
        assert!(s.serve(friend, &req, None, &table, t0).is_some());
    }
}
