//! Mesh-level errors.

use crate::kv::KvError;

/// Errors from starting or talking to the mesh.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MeshError {
    /// The configuration is invalid (bad multiaddr, peer id, PSK…).
    #[error("invalid mesh config: {0}")]
    Config(String),
    /// A listen address other machines can reach, on a mesh anyone could join.
    #[error(
        "mesh.listen {addr} is reachable from other machines, but the mesh has neither a `psk` \
         nor an `allowlist`: anyone could join, bid, win auctions and read the prompts they \
         prefill. Set `mesh.psk` (64 hex chars, shared by your nodes) or `mesh.allowlist` (peer \
         ids), listen on 127.0.0.1 only, or set `mesh.open = true` to run an open mesh knowingly"
    )]
    Exposed {
        /// The first exposed listen address.
        addr: String,
    },
    /// Building the transport or behaviour failed.
    #[error("cannot start mesh: {0}")]
    Start(String),
    /// The swarm task has stopped (shutdown or crash).
    #[error("mesh is shut down")]
    ShutDown,
    /// Dialling a peer failed.
    #[error("dial failed: {0}")]
    Dial(String),
    /// An auction request failed (no connection, timeout, refused).
    #[error("auction request to {peer} failed: {reason}")]
    Request {
        /// Peer asked.
        peer: libp2p::PeerId,
        /// Why.
        reason: String,
    },
    /// Too many requests in flight.
    #[error("too many requests in flight")]
    Overloaded,
    /// A KV transfer failed.
    #[error(transparent)]
    Kv(#[from] KvError),
}
