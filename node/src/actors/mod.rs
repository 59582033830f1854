//! The serving node as actix actors (DESIGN.md §3 "node", §4 "one request, end to end").
//!
//! * [`Node`] — supervisor: starts the others, answers `/mesh`, shuts down gracefully.
//! * [`Admission`] — HTTP → request: tokenizes, bounds what is in flight (429), hands to the planner.
//! * [`Planner`] — local prefill or auction (offload rule, bid scoring, fallback), KV reception.
//! * [`PrefillWorker`] — bids in others' auctions and serves the ones it wins, streaming KV per layer.
//! * [`DecodeEngine`] — the door to the compute thread (continuous batching; see [`compute`]).
//! * [`KvStore`] — the node's view of its KV cache: metrics and the prefix summary it advertises.
//! * [`MeshBridge`] — the only actor that talks to the libp2p swarm (through `MeshHandle`).
//!
//! Mailboxes are bounded and every hot-path send is `try_send`: a full mailbox is an overload
//! answer (429 or `Decline`), never unbounded memory.

pub mod admission;
pub mod bridge;
pub mod compute;
pub mod core;
pub mod decode;
pub mod kv_router;
pub mod kvstore;
pub mod node;
pub mod planner;
pub mod prefill;
pub mod scheduler;

pub use admission::Admission;
pub use bridge::MeshBridge;
pub use decode::DecodeEngine;
pub use kvstore::KvStore;
pub use node::{Node, NodeHandle, StartError};
pub use planner::Planner;
pub use prefill::PrefillWorker;

/// Mailbox capacity of every actor.
pub const MAILBOX: usize = 256;
