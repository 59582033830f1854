//! What the mesh tells the application.

use libp2p::{Multiaddr, PeerId};

use crate::auction::{Award, Call};
use crate::kv::KvIncoming;

/// Opaque token identifying an inbound call awaiting an answer via `MeshHandle::answer_call`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CallToken(pub(crate) u64);

/// Events from the mesh. The queue is bounded; when the application falls behind, events are
/// dropped and counted (`MeshStats::dropped_events`), never buffered without limit.
#[derive(Debug)]
#[non_exhaustive]
pub enum MeshEvent {
    /// Now listening on `addr`.
    Listening {
        /// Address.
        addr: Multiaddr,
    },
    /// First connection to `peer` established.
    PeerConnected {
        /// Peer.
        peer: PeerId,
    },
    /// Last connection to `peer` closed.
    PeerDisconnected {
        /// Peer.
        peer: PeerId,
    },
    /// A connection was refused at admission (PSK mismatch, not allowlisted, limits).
    ConnectionRefused {
        /// Peer, when known.
        peer: Option<PeerId>,
        /// Why.
        reason: String,
    },
    /// First advert from `peer` (it is now in the peer table).
    PeerDiscovered {
        /// Peer.
        peer: PeerId,
    },
    /// `peer` stayed silent past the advert expiry and was dropped from the peer table.
    PeerExpired {
        /// Peer.
        peer: PeerId,
    },
    /// A home node asks us to bid; answer with `MeshHandle::answer_call(token, …)` before the
    /// call's deadline or it is declined for us.
    AuctionCall {
        /// Home node.
        peer: PeerId,
        /// The call.
        call: Call,
        /// Reply token.
        token: CallToken,
    },
    /// One of our bids won (the award was checked against our bid book and our capacity, and
    /// accepted).
    Awarded {
        /// Home node.
        peer: PeerId,
        /// The award.
        award: Award,
        /// Our place in the [`crate::auction::ServeGate`]: hold it while serving the award.
        slot: crate::auction::ServeSlot,
    },
    /// A home node cancelled a call we had bid on.
    AuctionCancelled {
        /// Home node.
        peer: PeerId,
        /// The call's id.
        request_id: u64,
    },
    /// A KV transfer is arriving; call `receive` with a sink, or drop it to refuse.
    KvIncoming(KvIncoming),
}
