//! Request-response codec of `/prfaas/auction/1` over ciborium: `u32 length || CBOR`, bounded
//! both ways ([`crate::wire::CborCodec`]).

use super::{AuctionRequest, AuctionResponse};

/// Ciborium codec for [`AuctionRequest`] / [`AuctionResponse`]; both directions share one bound
/// (`limits.max_auction_bytes`): `AuctionCodec::new(max, max)`.
pub type AuctionCodec = crate::wire::CborCodec<AuctionRequest, AuctionResponse>;
