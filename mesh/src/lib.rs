//! prfaas mesh: libp2p behaviours, wire types, the sans-IO offload policy and the simulator.
//!
//! Start a node with [`Mesh::spawn`]; talk to it through the cloneable [`MeshHandle`] and read
//! [`MeshEvent`]s. The mesh knows nothing of models or kernels: models are opaque [`ModelRef`]s.

pub mod advert;
pub mod auction;
pub mod bandwidth;
mod behaviour;
pub mod bench;
pub mod config;
pub mod discovery;
pub mod error;
pub mod event;
pub mod handle;
pub mod kv;
pub mod nat;
mod node;
mod probe;
pub mod reputation;
pub mod stats;
mod transport;
pub mod wire;

pub use advert::{Advert, AdvertBody, ModelRef, PeerTable, Role};
pub use config::MeshConfig;
pub use error::MeshError;
pub use event::{CallToken, MeshEvent};
pub use handle::{AuctionRound, CallAnswer, KnownAdvert, MeshHandle};
pub use libp2p::{identity, multiaddr, Multiaddr, PeerId};
pub use node::Mesh;
pub use stats::MeshStatsSnapshot;
pub mod policy;
pub mod sim;
