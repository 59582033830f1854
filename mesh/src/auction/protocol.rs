//! Auction wire types. Times are *relative* milliseconds because peers' clocks are not
//! synchronised: each side converts them to its own `Instant` on receipt.

use libp2p::StreamProtocol;
use serde::{Deserialize, Serialize};

use crate::advert::ModelRef;

/// Protocol id (versioned: a wire change is a new id; 2 added `AwardRefusal::Overloaded`).
pub const AUCTION_PROTOCOL: StreamProtocol = StreamProtocol::new("/prfaas/auction/2");

/// Call for bids: "who will prefill this, at what price and how soon?"
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Call {
    /// Home-chosen id, echoed in every answer.
    pub request_id: u64,
    /// Model and KV layout the prefill must use.
    pub model: ModelRef,
    /// Prompt length in tokens.
    pub prompt_len: u32,
    /// Tokens the home already has cached (no need to prefill them).
    pub cached_prefix_tokens: u32,
    /// Hashes of the prompt's blocks, so bidders can price their own cache hits (bounded by the
    /// message size limit).
    pub prefix_block_hashes: Vec<u64>,
    /// Estimated KV bytes the winner would stream back.
    pub kv_bytes_estimate: u64,
    /// How long the home waits for bids, in milliseconds from receipt.
    pub deadline_ms: u32,
}

/// An offer to prefill.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Bid {
    /// The call's id.
    pub request_id: u64,
    /// Bidder-chosen id of this offer, quoted back in the award.
    pub bid_id: u64,
    /// Asking price for the whole prefill (mesh currency units).
    pub price: f64,
    /// Expected wait before the bidder starts, ms.
    pub queue_delay_ms: u32,
    /// Expected prefill time once started, ms.
    pub est_prefill_ms: u32,
    /// Prompt tokens the bidder already has cached.
    pub cached_tokens: u32,
    /// The offer holds for this long after it was sent, ms; awards arriving later are refused.
    pub valid_for_ms: u32,
}

/// Why a bidder will not bid.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum DeclineReason {
    /// Too many calls or prefills in progress.
    Overloaded,
    /// This node does not serve that model/layout.
    UnknownModel,
    /// This node does not prefill for others right now.
    NotPrefilling,
    /// The application gave no answer before the deadline.
    NoAnswer,
}

/// The home picks a bid. `price` is the clearing price (second-score rule), not the asked one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Award {
    /// The call's id.
    pub request_id: u64,
    /// The bid being accepted.
    pub bid_id: u64,
    /// Price the home will pay.
    pub price: f64,
    /// The prompt's token ids (only the winner ever sees the prompt), little-endian `u32`s.
    /// Bounded by the auction message size limit.
    #[serde(with = "crate::wire::cbor_bytes", default)]
    pub tokens: Vec<u8>,
    /// How the winner must encode the KV it streams back (absent from older homes: as stored).
    #[serde(default)]
    pub kv_wire: crate::kv::KvWire,
}

impl Award {
    /// Packs `tokens` into [`Award::tokens`].
    pub fn pack_tokens(tokens: &[u32]) -> Vec<u8> {
        tokens.iter().flat_map(|t| t.to_le_bytes()).collect()
    }

    /// The prompt tokens, or `None` when the byte length is not a multiple of 4.
    pub fn unpack_tokens(&self) -> Option<Vec<u32>> {
        self.tokens.len().is_multiple_of(4).then(|| {
            self.tokens
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        })
    }
}

/// Why an award was refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum AwardRefusal {
    /// The bid's validity ran out before the award arrived.
    Expired,
    /// No such bid (never made, already awarded or cancelled).
    UnknownBid,
    /// The clearing price is below the bidder's ask.
    PriceTooLow,
    /// The bidder is serving as many awards as it can (awards of bids made concurrently).
    Overloaded,
}

/// Home → bidder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum AuctionRequest {
    /// Ask for a bid.
    Call(Call),
    /// Accept a bid.
    Award(Award),
    /// Withdraw a call (e.g. the client went away); bidders drop matching bids.
    Cancel {
        /// The call's id.
        request_id: u64,
    },
}

/// Bidder → home.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum AuctionResponse {
    /// An offer.
    Bid(Bid),
    /// No offer.
    Decline {
        /// The call's id.
        request_id: u64,
        /// Why.
        reason: DeclineReason,
    },
    /// The award is accepted: the bidder starts prefilling and will open a KV stream.
    AwardAccepted {
        /// The call's id.
        request_id: u64,
    },
    /// The award is refused; the home must pick someone else or prefill locally.
    AwardRefused {
        /// The call's id.
        request_id: u64,
        /// Why.
        reason: AwardRefusal,
    },
    /// Cancel acknowledged.
    Cancelled {
        /// The call's id.
        request_id: u64,
    },
}
