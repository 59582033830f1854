//! `KvRouter`: which home request waits for which incoming KV transfer.
//!
//! Owned by the `MeshBridge` (the actor that receives `MeshEvent::KvIncoming`); the planner
//! registers a wait with [`ExpectKv`](super::bridge::ExpectKv) before it awards, and gets the
//! transfer through a oneshot channel. A waiter that gave up (its receiver dropped: award
//! refused, timeout, request cancelled) is pruned on the next registration or delivery, so no
//! "forget" call is needed and the table cannot grow past the requests in flight.

use std::collections::HashMap;

use prfaas_mesh::kv::KvIncoming;
use prfaas_mesh::PeerId;
use tokio::sync::oneshot;

/// Waiters keyed by (winner, request id).
#[derive(Debug, Default)]
pub struct KvRouter {
    waiting: HashMap<(PeerId, u64), oneshot::Sender<KvIncoming>>,
}

impl KvRouter {
    /// Registers interest in the transfer `(peer, request_id)`; a second registration for the
    /// same key replaces the first (whose receiver then sees a closed channel).
    pub fn expect(&mut self, peer: PeerId, request_id: u64) -> oneshot::Receiver<KvIncoming> {
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
            Some(tx) => tx.send(incoming).map_err(Box::new),
            None => Err(Box::new(incoming)),
        }
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
}
