//! Per-peer quotas of the KV receiver: what one peer can make this node hold.
//!
//! * A transfer (anything but a bandwidth probe) is accepted only when this node expects it: the
//!   home registers each award with [`ExpectedTransfers::expect`] before sending it, and the
//!   hello must name a (peer, request id) registered that way. A stranger cannot hold pending
//!   transfer slots, receive buffers or the application's attention.
//! * Stream hellos being read at once, per peer ([`PeerSlots`]): one peer cannot take every
//!   hello slot.
//! * Probes received at once, per peer.
//!
//! Every refusal is counted under its [`KvRefusal`] reason.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use libp2p::PeerId;

use crate::stats::MeshStats;
use crate::MeshError;

/// Why the KV receiver refused a stream or a transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum KvRefusal {
    /// Not on the allowlist.
    NotAllowed,
    /// Every hello slot is taken (all peers together).
    HelloSlots,
    /// This peer already has its share of hellos being read.
    HelloQuota,
    /// A transfer nobody here awaits (no outstanding award to this peer for that request).
    Unexpected,
    /// This peer already has its share of probes being received.
    ProbeQuota,
    /// A probe larger than probes may be.
    ProbeTooLarge,
    /// Too many multi-stream transfers are being assembled.
    PendingTransfers,
    /// A stream whose hello does not match its transfer's first one, or unreadable.
    BadHello,
}

impl KvRefusal {
    /// The reason as a metric label.
    pub fn label(self) -> &'static str {
        match self {
            KvRefusal::NotAllowed => "not_allowed",
            KvRefusal::HelloSlots => "hello_slots",
            KvRefusal::HelloQuota => "hello_quota",
            KvRefusal::Unexpected => "unexpected",
            KvRefusal::ProbeQuota => "probe_quota",
            KvRefusal::ProbeTooLarge => "probe_too_large",
            KvRefusal::PendingTransfers => "pending_transfers",
            KvRefusal::BadHello => "bad_hello",
        }
    }

    /// Counts this refusal (in the total and under its reason).
    pub(crate) fn count(self, stats: &MeshStats) {
        stats.refused_kv.fetch_add(1, Ordering::Relaxed);
        let c = match self {
            KvRefusal::Unexpected => &stats.kv_refused_unexpected,
            KvRefusal::HelloQuota | KvRefusal::HelloSlots => &stats.kv_refused_hello_quota,
            KvRefusal::ProbeQuota | KvRefusal::ProbeTooLarge => &stats.kv_refused_probe_quota,
            _ => return,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }
}

/// Counts held per peer, up to `max` each; a [`PeerSlot`] gives its place back when dropped.
/// The map holds only peers with a slot, so it is bounded by the slots themselves.
#[derive(Debug, Clone)]
pub(crate) struct PeerSlots {
    held: Arc<Mutex<HashMap<PeerId, usize>>>,
    max: usize,
}

/// One place taken by a peer in [`PeerSlots`].
#[derive(Debug)]
pub(crate) struct PeerSlot {
    held: Arc<Mutex<HashMap<PeerId, usize>>>,
    peer: PeerId,
}

impl PeerSlots {
    pub fn new(max: usize) -> Self {
        Self {
            held: Arc::default(),
            max: max.max(1),
        }
    }

    /// A place for `peer`, or `None` when it holds `max` already.
    pub fn try_take(&self, peer: PeerId) -> Option<PeerSlot> {
        let mut held = self.held.lock().ok()?;
        let n = held.entry(peer).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(PeerSlot {
            held: self.held.clone(),
            peer,
        })
    }

    #[cfg(test)]
    fn held_by(&self, peer: &PeerId) -> usize {
        self.held
            .lock()
            .map(|h| h.get(peer).copied().unwrap_or(0))
            .unwrap_or(0)
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        if let Ok(mut held) = self.held.lock() {
            if let Some(n) = held.get_mut(&self.peer) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    held.remove(&self.peer);
                }
            }
        }
    }
}

/// At most one admission per peer per `min_interval` (e.g. bandwidth probes: an honest node
/// probes a peer once per estimate period, a flood of them only costs the link).
#[derive(Debug)]
pub(crate) struct PeerRate {
    last: HashMap<PeerId, Instant>,
    min_interval: Duration,
}

/// Peers remembered by [`PeerRate`] before the ones outside their interval are forgotten.
const PEER_RATE_PRUNE_AT: usize = 1024;

impl PeerRate {
    pub fn new(min_interval: Duration) -> Self {
        Self {
            last: HashMap::new(),
            min_interval,
        }
    }

    /// Whether `peer` may be admitted at `now` (and if so, its period starts again).
    pub fn admit(&mut self, peer: PeerId, now: Instant) -> bool {
        if let Some(&t) = self.last.get(&peer) {
            if now.saturating_duration_since(t) < self.min_interval {
                return false;
            }
        }
        if self.last.len() >= PEER_RATE_PRUNE_AT {
            let min = self.min_interval;
            self.last
                .retain(|_, t| now.saturating_duration_since(*t) < min);
            // Still full (that many peers within one period): forget the oldest.
            if self.last.len() >= PEER_RATE_PRUNE_AT {
                if let Some(oldest) = self.last.iter().min_by_key(|(_, t)| **t).map(|(p, _)| *p) {
                    self.last.remove(&oldest);
                }
            }
        }
        self.last.insert(peer, now);
        true
    }
}

/// Transfers this node awaits, keyed by (sender, request id); shared by the handle (which
/// registers them) and the KV acceptor (which checks hellos against them). Bounded.
#[derive(Debug, Clone)]
pub struct ExpectedTransfers {
    inner: Arc<Mutex<Expected>>,
    max: usize,
}

/// Registrations per (sender, request id), and per sender (so a stream's sender can be checked
/// before its hello is read).
#[derive(Debug, Default)]
struct Expected {
    by_key: HashMap<(PeerId, u64), usize>,
    by_peer: HashMap<PeerId, usize>,
}

/// A registered expectation; dropping it withdraws it.
#[derive(Debug)]
pub struct KvExpectation {
    inner: Arc<Mutex<Expected>>,
    key: (PeerId, u64),
}

impl ExpectedTransfers {
    /// At most `max` expectations at once.
    pub fn new(max: usize) -> Self {
        Self {
            inner: Arc::default(),
            max: max.max(1),
        }
    }

    /// Expects the transfer for `request_id` from `peer` until the returned value is dropped.
    pub fn expect(&self, peer: PeerId, request_id: u64) -> Result<KvExpectation, MeshError> {
        let mut m = self.inner.lock().map_err(|_| MeshError::ShutDown)?;
        let key = (peer, request_id);
        if !m.by_key.contains_key(&key) && m.by_key.len() >= self.max {
            return Err(MeshError::Overloaded);
        }
        *m.by_key.entry(key).or_insert(0) += 1;
        *m.by_peer.entry(peer).or_insert(0) += 1;
        Ok(KvExpectation {
            inner: self.inner.clone(),
            key,
        })
    }

    /// Whether the transfer for `request_id` from `peer` is awaited.
    pub fn is_expected(&self, peer: &PeerId, request_id: u64) -> bool {
        self.inner
            .lock()
            .is_ok_and(|m| m.by_key.contains_key(&(*peer, request_id)))
    }

    /// Whether any transfer from `peer` is awaited (a winner with an outstanding award).
    pub fn expects_from(&self, peer: &PeerId) -> bool {
        self.inner
            .lock()
            .is_ok_and(|m| m.by_peer.contains_key(peer))
    }

    /// Expectations registered now.
    pub fn len(&self) -> usize {
        self.inner.lock().map_or(0, |m| m.by_key.len())
    }

    /// Whether none is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for KvExpectation {
    fn drop(&mut self) {
        /// One registration fewer under `k`; the entry goes with the last.
        fn release<K: std::hash::Hash + Eq>(map: &mut HashMap<K, usize>, k: &K) {
            if let Some(n) = map.get_mut(k) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    map.remove(k);
                }
            }
        }
        if let Ok(mut m) = self.inner.lock() {
            release(&mut m.by_key, &self.key);
            release(&mut m.by_peer, &self.key.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_is_admitted_once_per_interval_and_the_map_stays_bounded() {
        let mut r = PeerRate::new(Duration::from_millis(250));
        let (a, b) = (PeerId::random(), PeerId::random());
        let t0 = Instant::now();
        assert!(r.admit(a, t0));
        assert!(
            !r.admit(a, t0 + Duration::from_millis(100)),
            "within the interval"
        );
        assert!(r.admit(b, t0 + Duration::from_millis(100)), "another peer");
        assert!(
            r.admit(a, t0 + Duration::from_millis(260)),
            "after the interval"
        );
        let later = t0 + Duration::from_secs(1);
        for _ in 0..3 * PEER_RATE_PRUNE_AT {
            assert!(r.admit(PeerId::random(), later));
        }
        assert!(
            r.last.len() <= PEER_RATE_PRUNE_AT,
            "{} peers kept",
            r.last.len()
        );
    }

    #[test]
    fn slots_are_per_peer_and_come_back_when_dropped() {
        let slots = PeerSlots::new(2);
        let (a, b) = (PeerId::random(), PeerId::random());
        let a1 = slots.try_take(a).expect("first");
        let _a2 = slots.try_take(a).expect("second");
        assert!(slots.try_take(a).is_none(), "a's quota is spent");
        let _b1 = slots.try_take(b).expect("b is not affected");
        drop(a1);
        assert_eq!(slots.held_by(&a), 1);
        assert!(slots.try_take(a).is_some());
    }

    #[test]
    fn expectations_are_keyed_bounded_and_withdrawn_on_drop() {
        let ex = ExpectedTransfers::new(2);
        let (a, b) = (PeerId::random(), PeerId::random());
        let e1 = ex.expect(a, 1).expect("room");
        assert!(ex.is_expected(&a, 1));
        assert!(!ex.is_expected(&a, 2), "another request");
        assert!(!ex.is_expected(&b, 1), "another peer");
        let again = ex.expect(a, 1).expect("same key does not take room");
        let _e2 = ex.expect(b, 7).expect("room");
        assert!(matches!(ex.expect(b, 8), Err(MeshError::Overloaded)));
        drop(e1);
        assert!(
            ex.is_expected(&a, 1),
            "still expected by the second registration"
        );
        assert!(ex.expects_from(&a));
        drop(again);
        assert!(!ex.is_expected(&a, 1));
        assert!(
            !ex.expects_from(&a),
            "no request from a is awaited any more"
        );
        assert!(ex.expects_from(&b));
        assert_eq!(ex.len(), 1);
    }

    #[test]
    fn refusals_are_counted_by_reason() {
        let stats = MeshStats::default();
        KvRefusal::Unexpected.count(&stats);
        KvRefusal::HelloQuota.count(&stats);
        KvRefusal::ProbeQuota.count(&stats);
        KvRefusal::BadHello.count(&stats);
        let s = stats.snapshot();
        assert_eq!(s.refused_kv, 4);
        assert_eq!(
            (
                s.kv_refused_unexpected,
                s.kv_refused_hello_quota,
                s.kv_refused_probe_quota
            ),
            (1, 1, 1)
        );
        assert_eq!(KvRefusal::Unexpected.label(), "unexpected");
    }
}
