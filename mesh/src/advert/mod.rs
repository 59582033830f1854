//! `/prfaas/advert/2`: what each node can do and how loaded it is, gossiped every advert interval
//! and whenever it changes, each advert signed by its node inside the payload ([`codec`] says why
//! the signature moved there); [`PeerTable`] keeps the latest per peer. `/prfaas/table/1`
//! ([`sync`]) lets a joining node fetch a peer's table of signed adverts at once.

pub mod codec;
pub(crate) mod intake;
pub mod message;
pub(crate) mod publisher;
pub mod sync;
pub mod table;
pub(crate) mod table_sync;

pub use message::{
    Advert, AdvertBody, BandwidthReport, ModelRef, PrefillPoint, PrefixSummary, Role,
};
pub use table::{PeerEntry, PeerTable};

/// The gossipsub topic adverts are published on; the version is part of the name so a wire change
/// lands on a new topic instead of confusing old nodes. Version 2: self-signed envelopes
/// ([`codec::SignedAdvert`]) over unsigned gossip.
pub const ADVERT_TOPIC: &str = "/prfaas/advert/2";
