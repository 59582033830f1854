//! KV stream wire types.

use libp2p::StreamProtocol;
use serde::{Deserialize, Serialize};

use crate::advert::ModelRef;

/// Protocol id (versioned).
pub const KV_PROTOCOL: StreamProtocol = StreamProtocol::new("/prfaas/kv/1");

/// What is being sent; identical on every stream of a transfer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KvHeader {
    /// Auction request id this KV belongs to.
    pub request_id: u64,
    /// Model and KV layout the KV was computed with; the receiver must check it.
    pub model: ModelRef,
    /// Number of layer frames that follow (layers `0..layers`).
    pub layers: u32,
    /// Number of tokens covered.
    pub tokens: u32,
    /// Element type label (opaque to the mesh, e.g. `"f16"`).
    pub dtype: String,
    /// Largest single layer frame, bytes. The receiver never accepts a frame above this.
    pub max_layer_bytes: u64,
    /// Total payload bytes over all layers. The receiver never accepts more than this.
    pub total_bytes: u64,
    /// A bandwidth probe: received internally and discarded, never shown to the application.
    pub probe: bool,
}

/// First message on every stream of a transfer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StreamHello {
    /// Sender-chosen id grouping the streams of one transfer (unique per sender).
    pub transfer_id: u64,
    /// This stream's index in `0..stream_count`.
    pub stream_index: u16,
    /// How many streams the transfer uses.
    pub stream_count: u16,
    /// The transfer's header.
    pub header: KvHeader,
}

/// Final data of a transfer (e.g. the last position's logits or the first sampled token).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct KvTrailer {
    /// First token sampled by the prefiller, if it sampled one.
    pub first_token: Option<u32>,
    /// Opaque payload (e.g. final logits), bounded by the trailer size limit.
    #[serde(with = "crate::wire::cbor_bytes")]
    pub payload: Vec<u8>,
}

/// Frame header preceding raw bytes (for `Layer`) or closing a stream (`End`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum FrameHeader {
    /// `byte_len` raw bytes of layer `layer` follow; their CRC-32C is `checksum`.
    Layer {
        /// Layer index.
        layer: u32,
        /// Payload length.
        byte_len: u64,
        /// CRC-32C (Castagnoli) of the payload.
        checksum: u32,
    },
    /// No more frames on this stream. Stream 0 carries the trailer; others carry `None`.
    End {
        /// The transfer's trailer (stream 0 only).
        trailer: Option<KvTrailer>,
    },
}

/// Receiver → sender on stream 0 after the transfer completed (or failed).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KvAck {
    /// Whether every layer and the trailer were accepted by the sink.
    pub ok: bool,
    /// Payload bytes accepted.
    pub bytes: u64,
    /// Short reason on failure.
    pub error: Option<String>,
}

/// CRC-32C of a layer payload (hardware-accelerated where the CPU has it).
pub fn checksum(bytes: &[u8]) -> u32 {
    crc32c::crc32c(bytes)
}

/// Which stream carries `layer`.
pub fn stream_for_layer(layer: u32, stream_count: u16) -> u16 {
    (layer % u32::from(stream_count.max(1))) as u16
}
