//! KV stream wire types (`/prfaas/kv/2`).

use libp2p::StreamProtocol;
use serde::{Deserialize, Serialize};

use crate::advert::ModelRef;

/// Protocol id (versioned). Version 2 carries pieces identified by (layer, token range), in any
/// order, on any stream of the transfer; version 1 (whole layers in order) is no longer spoken.
pub const KV_PROTOCOL: StreamProtocol = StreamProtocol::new("/prfaas/kv/2");

/// What is being sent; identical on every stream of a transfer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KvHeader {
    /// Auction request id this KV belongs to.
    pub request_id: u64,
    /// Model and KV layout the KV was computed with; the receiver must check it.
    pub model: ModelRef,
    /// Number of layers; every piece names a layer in `0..layers`.
    pub layers: u32,
    /// Number of tokens covered; every piece names a token range inside `0..tokens`.
    pub tokens: u32,
    /// Element type label (opaque to the mesh, e.g. `"f16"`).
    pub dtype: String,
    /// Largest single piece, bytes. The receiver never accepts a frame above this.
    pub max_piece_bytes: u64,
    /// Total payload bytes over all pieces: the transfer is complete when exactly this many
    /// bytes arrived and every stream ended.
    pub total_bytes: u64,
    /// A bandwidth probe: received internally and discarded, never shown to the application.
    pub probe: bool,
}

impl KvHeader {
    /// A header for `total` bytes of opaque data in pieces of at most `piece_len` bytes (bandwidth
    /// probes and benchmarks): piece `i` is "layer" `i`, token range `0..1`. Send the data with
    /// [`KvSender::send_opaque`](super::KvSender::send_opaque).
    pub fn opaque(
        request_id: u64,
        model: ModelRef,
        total: u64,
        piece_len: u64,
        probe: bool,
    ) -> Self {
        let piece_len = piece_len.clamp(1, total.max(1));
        Self {
            request_id,
            model,
            layers: total.div_ceil(piece_len).min(u64::from(u32::MAX)) as u32,
            tokens: 1,
            dtype: if probe { "probe" } else { "u8" }.into(),
            max_piece_bytes: piece_len.min(total),
            total_bytes: total,
            probe,
        }
    }
}

/// How paged KV crosses the network for one transfer: the home asks for it in the award
/// ([`crate::auction::Award::kv_wire`]), the winner encodes accordingly and names the encoding in
/// [`KvHeader::dtype`]. The values themselves are the application's business (the node's
/// `kv::wire` module encodes them); the mesh only carries the choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum KvWire {
    /// Exactly as stored (the KV layout's own dtype: f16 unless the node stores f32): exact, so
    /// a remote prefill is token-identical to a local one.
    #[default]
    F16,
    /// Int8 with one f32 scale per small block of values: about 1.8x fewer bytes than f16, lossy.
    /// For links slow enough that the transfer, not the prefill, bounds time to first token.
    Int8,
}

impl KvWire {
    /// The config / metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            KvWire::F16 => "f16",
            KvWire::Int8 => "int8",
        }
    }
}

impl std::fmt::Display for KvWire {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
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

/// Which part of the KV a piece holds: layer `layer`, tokens `start..end`. What the bytes mean
/// (K rows then V rows, or a recurrent state) is the application's layout, not the mesh's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PieceId {
    /// Layer index.
    pub layer: u32,
    /// First token (inclusive).
    pub start: u32,
    /// Last token (exclusive); `start < end`.
    pub end: u32,
}

/// Frame header preceding raw bytes (for `Piece`) or closing a stream (`End`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum FrameHeader {
    /// `byte_len` raw bytes of piece `piece` follow; their CRC-32C is `checksum`.
    Piece {
        /// What the bytes are.
        piece: PieceId,
        /// Payload length.
        byte_len: u64,
        /// CRC-32C (Castagnoli) of the payload.
        checksum: u32,
    },
    /// No more frames on this stream. Stream 0 carries the trailer (sent after every piece of
    /// the transfer was handed to its stream); others carry `None`.
    End {
        /// The transfer's trailer (stream 0 only).
        trailer: Option<KvTrailer>,
    },
}

/// Receiver → sender on stream 0 after the transfer completed (or failed).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KvAck {
    /// Whether every piece and the trailer were accepted by the sink.
    pub ok: bool,
    /// Payload bytes accepted.
    pub bytes: u64,
    /// Short reason on failure.
    pub error: Option<String>,
    /// Microseconds during which at least one piece was arriving (the receiver's measure of the
    /// time the link was busy with this transfer; time the sender had nothing to send does not
    /// count), so both ends derive the same goodput.
    pub busy_us: u64,
}

/// CRC-32C of a piece payload (hardware-accelerated where the CPU has it).
pub fn checksum(bytes: &[u8]) -> u32 {
    crc32c::crc32c(bytes)
}
