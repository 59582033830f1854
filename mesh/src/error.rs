//! Mesh-level errors.

use crate::kv::KvError;

/// Errors from starting or talking to the mesh.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MeshError {
    /// The configuration is invalid (bad multiaddr, peer id, PSK…).
    #[error("invalid mesh config: {0}")]
    Config(String),
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
