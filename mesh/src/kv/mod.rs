//! `/prfaas/kv/2` (libp2p-stream, winner → home): KV transfer in pieces over one or several
//! parallel streams, overlapping the prefill that produces it.
//!
//! Each stream starts with a [`StreamHello`] (transfer id, stream index/count, [`KvHeader`]).
//! The sender queues pieces as the prefill makes them — a piece is the KV of one layer for a
//! range of tokens ([`PieceId`]), e.g. one prefill chunk — and each stream takes the next queued
//! piece when it is free: a CBOR [`FrameHeader::Piece`] `{piece, byte_len, checksum}` followed by
//! `byte_len` raw bytes. Pieces may arrive in any order; the receiving application places each
//! by its layer and token range. Each stream ends with [`FrameHeader::End`]; stream 0's carries
//! the [`KvTrailer`]. The transfer is complete when every stream ended and exactly the announced
//! `total_bytes` arrived. The receiver answers on stream 0 with a [`KvAck`] once the sink
//! accepted everything, including how long pieces were arriving (`busy_us`), so both ends
//! measure goodput over the time the link was busy, not over the prefill's compute.
//!
//! Buffering is bounded: the sender queues at most one piece per stream beyond those being
//! written; each receiver stream holds at most one frame while the coordinator is busy.

pub mod codec;
pub mod protocol;
pub mod quota;
pub mod receiver;
pub mod sender;

pub use codec::KvError;
pub use protocol::{
    FrameHeader, KvAck, KvHeader, KvTrailer, KvWire, PieceId, StreamHello, KV_PROTOCOL,
};
pub use quota::{ExpectedTransfers, KvExpectation, KvRefusal};
pub use receiver::{BusyClock, KvIncoming, KvReceived, KvSink, SinkError, VecSink};
pub use sender::{KvSender, KvSent};
