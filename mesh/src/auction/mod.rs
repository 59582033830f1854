//! `/prfaas/auction/1`: home → candidates request-response (Call → Bid/Decline, Award, Cancel),
//! with a ciborium codec written here (libp2p's built-in `cbor` codec uses cbor4ii; DESIGN.md §7).

pub mod book;
pub(crate) mod client;
pub mod codec;
pub mod gate;
pub mod protocol;
pub(crate) mod server;

pub use book::{AwardCheck, BidBook};
pub use codec::AuctionCodec;
pub use gate::{ServeGate, ServeSlot};
pub use protocol::{
    AuctionRequest, AuctionResponse, Award, AwardRefusal, Bid, Call, DeclineReason,
    AUCTION_PROTOCOL,
};
