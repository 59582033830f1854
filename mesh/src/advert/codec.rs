//! Advert encoding: bounded CBOR (ciborium), checked against the gossip source.

use libp2p::PeerId;

use super::Advert;
use crate::wire::{self, WireError};

/// Why a received advert was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AdvertError {
    /// Not decodable or too large.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// The advert claims to be from a different node than the one that signed the message.
    #[error("advert node id {claimed} does not match signed source {source_peer}")]
    SourceMismatch {
        /// `node_id` in the advert.
        claimed: String,
        /// Peer that signed the gossip message.
        source_peer: PeerId,
    },
    /// Gossip message had no source (strict signing makes this impossible for honest peers).
    #[error("unsigned advert")]
    Unsigned,
}

/// Encodes an advert, refusing ones above `max` bytes.
pub fn encode(advert: &Advert, max: usize) -> Result<Vec<u8>, WireError> {
    wire::encode(advert, max)
}

/// Decodes an advert and checks it was signed by the node it names.
pub fn decode(bytes: &[u8], source: Option<PeerId>, max: usize) -> Result<Advert, AdvertError> {
    let source = source.ok_or(AdvertError::Unsigned)?;
    let advert: Advert = wire::decode(bytes, max)?;
    if advert.node_id != source.to_base58() {
        return Err(AdvertError::SourceMismatch {
            claimed: advert.node_id,
            source_peer: source,
        });
    }
    Ok(advert)
}
