//! The home's side of `/prfaas/auction/2`: requests in flight, each with the handle's reply
//! channel. Bounded, so a home that calls faster than answers come back is told `Overloaded`
//! instead of growing the map. Generic over the request id `K` so it is tested without a swarm.

use std::collections::HashMap;
use std::hash::Hash;

use tokio::sync::oneshot;

use super::AuctionResponse;
use crate::MeshError;

/// Where the answer to one request goes.
pub(crate) type Reply = oneshot::Sender<Result<AuctionResponse, MeshError>>;

/// Outbound auction requests in flight.
#[derive(Debug)]
pub(crate) struct AuctionClient<K> {
    outbound: HashMap<K, Reply>,
    max: usize,
}

impl<K: Hash + Eq> AuctionClient<K> {
    /// At most `max` requests in flight (at least one).
    pub fn new(max: usize) -> Self {
        Self {
            outbound: HashMap::new(),
            max: max.max(1),
        }
    }

    /// Whether another request may start; when not, `reply` is answered `Overloaded` and
    /// given back as `None`.
    pub fn admit(&self, reply: Reply) -> Option<Reply> {
        if self.outbound.len() >= self.max {
            let _ = reply.send(Err(MeshError::Overloaded));
            return None;
        }
        Some(reply)
    }

    /// Records a request sent under `id`.
    pub fn sent(&mut self, id: K, reply: Reply) {
        self.outbound.insert(id, reply);
    }

    /// The answer (or failure) to request `id`, passed on to whoever asked.
    pub fn resolve(&mut self, id: &K, result: Result<AuctionResponse, MeshError>) {
        if let Some(tx) = self.outbound.remove(id) {
            let _ = tx.send(result);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_and_each_answer_reaches_its_asker_once() {
        let mut c: AuctionClient<u32> = AuctionClient::new(1);
        let (tx, mut rx) = oneshot::channel();
        let tx = c.admit(tx).expect("room");
        c.sent(1, tx);
        let (tx2, mut rx2) = oneshot::channel();
        assert!(c.admit(tx2).is_none());
        assert!(matches!(rx2.try_recv(), Ok(Err(MeshError::Overloaded))));
        c.resolve(&1, Ok(AuctionResponse::Cancelled { request_id: 4 }));
        assert!(matches!(
            rx.try_recv(),
            Ok(Ok(AuctionResponse::Cancelled { request_id: 4 }))
        ));
        c.resolve(&1, Err(MeshError::Overloaded)); // nobody waits any more: ignored
        let (tx3, _rx3) = oneshot::channel();
        assert!(c.admit(tx3).is_some(), "room again");
    }
}
