//! Latest advert per peer, with expiry of silent peers. Sans-IO: the caller passes `now`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use libp2p::PeerId;

use super::{Advert, ModelRef};

/// One known peer.
#[derive(Debug, Clone)]
pub struct PeerEntry {
    /// Its latest advert.
    pub advert: Advert,
    /// When that advert arrived (local clock).
    pub received_at: Instant,
}

/// Latest advert per peer. Bounded by `max_peers`: when full, adverts from new peers are dropped
/// until someone expires (a flood of fake peers cannot grow memory).
#[derive(Debug, Clone)]
pub struct PeerTable {
    entries: HashMap<PeerId, PeerEntry>,
    /// The signed envelope (`/prfaas/advert/2`) each entry came from, when it came signed: what
    /// table sync serves, so a peer can verify every entry itself instead of trusting us.
    signed: HashMap<PeerId, Arc<[u8]>>,
    max_peers: usize,
}

/// What [`PeerTable::upsert`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upsert {
    /// First advert from this peer.
    New,
    /// Newer advert replaced an older one.
    Updated,
    /// Stale or duplicate sequence number: ignored.
    Stale,
    /// Table full: ignored.
    Full,
}

impl PeerTable {
    /// An empty table holding at most `max_peers` peers.
    pub fn new(max_peers: usize) -> Self {
        Self {
            entries: HashMap::new(),
            signed: HashMap::new(),
            max_peers,
        }
    }

    /// Like [`Self::upsert`] for an advert that arrived in (and was verified from) the signed
    /// envelope `signed`, which is kept for table sync. `received_at` may lie in the past (an
    /// entry learned through table sync is as old as the serving peer's copy, so two peers
    /// syncing from each other can never keep a dead node alive); an older `received_at` never
    /// replaces a newer one.
    pub fn upsert_signed(
        &mut self,
        peer: PeerId,
        advert: Advert,
        signed: Arc<[u8]>,
        received_at: Instant,
    ) -> Upsert {
        match self.entries.get_mut(&peer) {
            None => {
                if self.entries.len() >= self.max_peers {
                    return Upsert::Full;
                }
                self.entries.insert(
                    peer,
                    PeerEntry {
                        advert,
                        received_at,
                    },
                );
                self.signed.insert(peer, signed);
                Upsert::New
            }
            Some(e) if advert.seq <= e.advert.seq => {
                if advert.seq == e.advert.seq {
                    e.received_at = e.received_at.max(received_at);
                }
                Upsert::Stale
            }
            Some(e) => {
                *e = PeerEntry {
                    advert,
                    received_at: e.received_at.max(received_at),
                };
                self.signed.insert(peer, signed);
                Upsert::Updated
            }
        }
    }

    /// The signed envelope `peer`'s current advert came in, if it came signed.
    pub fn signed(&self, peer: &PeerId) -> Option<&Arc<[u8]>> {
        self.signed.get(peer)
    }

    /// Every entry that came signed: (peer, envelope, when it was received).
    pub fn signed_entries(&self) -> impl Iterator<Item = (&PeerId, &Arc<[u8]>, Instant)> {
        self.signed
            .iter()
            .filter_map(|(p, s)| self.entries.get(p).map(|e| (p, s, e.received_at)))
    }

    /// Stores `advert` from `peer` unless an advert with the same or a newer sequence is known.
    pub fn upsert(&mut self, peer: PeerId, advert: Advert, now: Instant) -> Upsert {
        if !self.entries.contains_key(&peer) {
            if self.entries.len() >= self.max_peers {
                return Upsert::Full;
            }
            self.entries.insert(
                peer,
                PeerEntry {
                    advert,
                    received_at: now,
                },
            );
            return Upsert::New;
        }
        match self.entries.get_mut(&peer) {
            Some(e) if advert.seq <= e.advert.seq => {
                // Same advert seen again still proves the peer is alive.
                e.received_at = now;
                Upsert::Stale
            }
            Some(e) => {
                *e = PeerEntry {
                    advert,
                    received_at: now,
                };
                // The stored envelope no longer matches the entry.
                self.signed.remove(&peer);
                Upsert::Updated
            }
            None => Upsert::Stale,
        }
    }

    /// Drops peers silent for longer than `ttl`; returns who was dropped.
    pub fn expire(&mut self, now: Instant, ttl: Duration) -> Vec<PeerId> {
        let dead: Vec<PeerId> = self
            .entries
            .iter()
            .filter(|(_, e)| now.saturating_duration_since(e.received_at) > ttl)
            .map(|(p, _)| *p)
            .collect();
        for p in &dead {
            self.entries.remove(p);
            self.signed.remove(p);
        }
        dead
    }

    /// Removes one peer (e.g. it was banned).
    pub fn remove(&mut self, peer: &PeerId) -> Option<PeerEntry> {
        self.signed.remove(peer);
        self.entries.remove(peer)
    }

    /// The latest advert of `peer`.
    pub fn get(&self, peer: &PeerId) -> Option<&PeerEntry> {
        self.entries.get(peer)
    }

    /// Number of known peers.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no peer is known.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// All known peers.
    pub fn peers(&self) -> impl Iterator<Item = (&PeerId, &PeerEntry)> {
        self.entries.iter()
    }

    /// Where to dial `peer`: its advertised addresses (see [`Advert::dial_addrs`]), if known.
    pub(crate) fn dial_addrs(&self, peer: &PeerId) -> Vec<libp2p::Multiaddr> {
        self.get(peer)
            .map(|e| e.advert.dial_addrs())
            .unwrap_or_default()
    }

    /// Every entry with its age at `now`, as [`crate::MeshHandle::adverts`] reports them.
    pub(crate) fn known_adverts(&self, now: Instant) -> Vec<crate::KnownAdvert> {
        self.peers()
            .map(|(p, e)| crate::KnownAdvert {
                peer: *p,
                advert: e.advert.clone(),
                age: now.saturating_duration_since(e.received_at),
            })
            .collect()
    }

    /// Peers that can prefill `model` (same weights hash and KV layout), most useful first:
    /// shortest queue, then lowest price, then fastest advertised prefill, then peer id (so the
    /// order is deterministic). Bid scoring proper (bandwidth-aware) happens in the auction.
    pub fn prefill_candidates(&self, model: &ModelRef) -> Vec<(PeerId, &Advert)> {
        let mut v: Vec<(PeerId, &Advert)> = self
            .entries
            .iter()
            .filter(|(_, e)| e.advert.can_prefill(model))
            .map(|(p, e)| (*p, &e.advert))
            .collect();
        v.sort_by(|(pa, a), (pb, b)| {
            a.body
                .queue_depth
                .cmp(&b.body.queue_depth)
                .then(
                    a.body
                        .price_per_1k_tokens
                        .total_cmp(&b.body.price_per_1k_tokens),
                )
                .then(b.peak_prefill_speed().total_cmp(&a.peak_prefill_speed()))
                .then(pa.cmp(pb))
        });
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::advert::{AdvertBody, PrefillPoint, Role};

    fn model(n: u8) -> ModelRef {
        ModelRef {
            model_id: format!("m{n}"),
            weights_hash: [n; 32],
            kv_layout_version: 1,
            kv_layout_hash: [0; 32],
        }
    }

    fn advert(peer: PeerId, seq: u64, queue: u32, price: f64, m: u8) -> Advert {
        Advert {
            node_id: peer.to_base58(),
            seq,
            listen_addrs: vec![],
            body: AdvertBody {
                roles: vec![Role::Prefill],
                models: vec![model(m)],
                queue_depth: queue,
                price_per_1k_tokens: price,
                prefill_profile: vec![PrefillPoint {
                    tokens: 512,
                    tokens_per_sec: 100.0,
                }],
                ..AdvertBody::default()
            },
            observed_bandwidth: vec![],
        }
    }

    #[test]
    fn a_peer_is_dialled_at_its_first_eight_addresses_that_parse() {
        let t0 = Instant::now();
        let mut t = PeerTable::new(8);
        let a = PeerId::random();
        let mut ad = advert(a, 1, 0, 1.0, 1);
        ad.listen_addrs = std::iter::once("not an address".to_string())
            .chain((1..=10).map(|port| format!("/ip4/127.0.0.1/tcp/{port}")))
            .collect();
        t.upsert(a, ad, t0);
        let addrs = t.dial_addrs(&a);
        assert_eq!(addrs.len(), 8);
        assert_eq!(addrs[0].to_string(), "/ip4/127.0.0.1/tcp/1");
        assert!(t.dial_addrs(&PeerId::random()).is_empty(), "unknown peer");
        let known = t.known_adverts(t0 + Duration::from_secs(2));
        assert_eq!(known.len(), 1);
        assert_eq!((known[0].peer, known[0].age), (a, Duration::from_secs(2)));
    }

    #[test]
    fn stale_seq_never_replaces_and_expiry_drops_silent_peers() {
        let t0 = Instant::now();
        let mut t = PeerTable::new(8);
        let a = PeerId::random();
        assert_eq!(t.upsert(a, advert(a, 5, 0, 1.0, 1), t0), Upsert::New);
        assert_eq!(t.upsert(a, advert(a, 4, 9, 1.0, 1), t0), Upsert::Stale);
        assert_eq!(t.get(&a).map(|e| e.advert.seq), Some(5));
        assert_eq!(t.upsert(a, advert(a, 6, 2, 1.0, 1), t0), Upsert::Updated);
        let b = PeerId::random();
        t.upsert(b, advert(b, 1, 0, 1.0, 1), t0 + Duration::from_secs(2));
        let gone = t.expire(t0 + Duration::from_secs(3), Duration::from_millis(1500));
        assert_eq!(gone, vec![a]);
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn signed_upsert_keeps_the_envelope_and_never_makes_an_entry_younger_from_the_past() {
        let t0 = Instant::now();
        let mut t = PeerTable::new(8);
        let a = PeerId::random();
        let env: Arc<[u8]> = Arc::from(&b"env-5"[..]);
        let later = t0 + Duration::from_secs(2);
        assert_eq!(
            t.upsert_signed(a, advert(a, 5, 0, 1.0, 1), env.clone(), later),
            Upsert::New
        );
        assert_eq!(t.signed(&a), Some(&env));
        // Same seq learned through sync with an older age: the entry does not get older.
        assert_eq!(
            t.upsert_signed(a, advert(a, 5, 0, 1.0, 1), env.clone(), t0),
            Upsert::Stale
        );
        assert_eq!(t.get(&a).map(|e| e.received_at), Some(later));
        // Older seq never replaces, and the envelope stays.
        assert_eq!(
            t.upsert_signed(a, advert(a, 4, 0, 1.0, 1), Arc::from(&b"x"[..]), later),
            Upsert::Stale
        );
        assert_eq!(t.signed(&a), Some(&env));
        assert_eq!(t.signed_entries().count(), 1);
        t.expire(later + Duration::from_secs(10), Duration::from_secs(1));
        assert_eq!(t.signed_entries().count(), 0);
        assert!(t.signed(&a).is_none());
    }

    #[test]
    fn full_table_refuses_new_peers() {
        let mut t = PeerTable::new(1);
        let now = Instant::now();
        let a = PeerId::random();
        let b = PeerId::random();
        assert_eq!(t.upsert(a, advert(a, 1, 0, 1.0, 1), now), Upsert::New);
        assert_eq!(t.upsert(b, advert(b, 1, 0, 1.0, 1), now), Upsert::Full);
    }

    #[test]
    fn candidates_filter_by_model_and_order_by_usefulness() {
        let now = Instant::now();
        let mut t = PeerTable::new(8);
        let busy = PeerId::random();
        let cheap = PeerId::random();
        let pricey = PeerId::random();
        let other_model = PeerId::random();
        t.upsert(busy, advert(busy, 1, 3, 0.1, 1), now);
        t.upsert(cheap, advert(cheap, 1, 0, 0.5, 1), now);
        t.upsert(pricey, advert(pricey, 1, 0, 2.0, 1), now);
        t.upsert(other_model, advert(other_model, 1, 0, 0.0, 2), now);
        let order: Vec<PeerId> = t
            .prefill_candidates(&model(1))
            .into_iter()
            .map(|(p, _)| p)
            .collect();
        assert_eq!(order, vec![cheap, pricey, busy]);
    }
}
