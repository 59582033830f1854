//! `KvRouter`: which home request waits for which incoming KV transfer.
//!
//! Owned by the `MeshBridge` (the actor that receives `MeshEvent::KvIncoming`); the planner
//! registers a wait with [`ExpectKv`](super::bridge::ExpectKv) before it awards, and gets the
//! transfer through a oneshot channel. A waiter that gave up (its receiver dropped: award
//! refused, timeout, request cancelled) is pruned on the next registration or delivery, so no
//! "forget" call is needed and the table cannot grow past the requests in flight.
//!
//! When the connection to a winner closes, every wait on it is told at once
//! ([`KvRouter::peer_lost`]): a killed winner costs the home about a second, not its transfer
//! timeout.

use std::collections::HashMap;

use prfaas_mesh::kv::KvIncoming;
use prfaas_mesh::PeerId;
use tokio::sync::oneshot;

/// The winner's connection closed before its transfer arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the winner's connection closed before its KV arrived")]
pub struct PeerLost;

/// What a waiter gets: the transfer, or word that its winner is gone.
pub type KvArrival = Result<KvIncoming, PeerLost>;

/// Waiters keyed by (winner, request id).
#[derive(Debug, Default)]
pub struct KvRouter {
    waiting: HashMap<(PeerId, u64), oneshot::Sender<KvArrival>>,
}

impl KvRouter {
    /// Registers interest in the transfer `(peer, request_id)`; a second registration for the
    /// same key replaces the first (whose receiver then sees a closed channel).
    pub fn expect(&mut self, peer: PeerId, request_id: u64) -> oneshot::Receiver<KvArrival> {
        self.prune();
        let (tx, rx) = oneshot::channel();
        self.waiting.insert((peer, request_id), tx);
        rx
    }

    /// Hands `incoming` to its waiter; gives it back when nobody waits for it (the caller drops
    /// it, which resets the sender's streams).
    pub fn deliver(&mut self, incoming: KvIncoming) -> Result<(), Box<KvIncoming>> {
        self.prune();
        let key = (incoming.peer(), incoming.header().request_id);
        match self.waiting.remove(&key) {
            Some(tx) => match tx.send(Ok(incoming)) {
                Ok(()) => Ok(()),
                Err(Ok(inc)) => Err(Box::new(inc)),
                // What comes back is what was sent: a transfer, never a loss.
                Err(Err(PeerLost)) => Ok(()),
            },
            None => Err(Box::new(incoming)),
        }
    }

    /// The last connection to `peer` closed: every wait on it ends now with [`PeerLost`].
    /// Returns how many waits ended.
    pub fn peer_lost(&mut self, peer: &PeerId) -> usize {
        let lost: Vec<(PeerId, u64)> = self
            .waiting
            .keys()
            .filter(|(p, _)| p == peer)
            .copied()
            .collect();
        let n = lost.len();
        for key in lost {
            if let Some(tx) = self.waiting.remove(&key) {
                let _ = tx.send(Err(PeerLost));
            }
        }
        n
    }

    /// Transfers awaited right now.
    pub fn len(&self) -> usize {
        self.waiting.len()
    }

    /// True when no transfer is awaited.
    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }

    fn prune(&mut self) {
        self.waiting.retain(|_, tx| !tx.is_closed());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropped_waiters_are_pruned() {
        let mut r = KvRouter::default();
        let (a, b) = (PeerId::random(), PeerId::random());
        let keep = r.expect(a, 1);
        drop(r.expect(b, 2));
        assert_eq!(r.len(), 2);
        let _third = r.expect(a, 3);
        assert_eq!(r.len(), 2, "the dropped waiter is gone");
        drop(keep);
        drop(_third);
        let _fourth = r.expect(b, 4);
        assert_eq!(r.len(), 1);
    }

    #[test]
    fn a_lost_peer_ends_only_its_own_waits_at_once() {
        let mut r = KvRouter::default();
        let (a, b) = (PeerId::random(), PeerId::random());
        let mut a1 = r.expect(a, 1);
        let mut a2 = r.expect(a, 2);
        let mut b1 = r.expect(b, 1);
        assert_eq!(r.peer_lost(&a), 2);
        assert!(matches!(a1.try_recv(), Ok(Err(PeerLost))));
        assert!(matches!(a2.try_recv(), Ok(Err(PeerLost))));
        assert!(
            b1.try_recv().is_err(),
            "b's wait is untouched (still empty)"
        );
        assert_eq!(r.len(), 1);
        assert_eq!(r.peer_lost(&a), 0);
    }
}
