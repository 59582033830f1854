//! `/prfaas/advert/1`: what each node can do and how loaded it is, gossiped (gossipsub, strict
//! signing) every advert interval and whenever it changes; [`PeerTable`] keeps the latest per peer.

pub mod codec;
pub mod message;
pub mod table;

pub use message::{
    Advert, AdvertBody, BandwidthReport, ModelRef, PrefillPoint, PrefixSummary, Role,
};
pub use table::{PeerEntry, PeerTable};

/// The gossipsub topic adverts are published on; the version is part of the name so a wire change
/// lands on a new topic instead of confusing old nodes.
pub const ADVERT_TOPIC: &str = "/prfaas/advert/1";
