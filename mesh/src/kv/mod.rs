//! `/prfaas/kv/1` (libp2p-stream, winner → home): layer-wise KV transfer over one or several
//! parallel streams.
//!
//! Each stream starts with a [`StreamHello`] (transfer id, stream index/count, [`KvHeader`]).
//! Layer `L` always travels on stream `L % stream_count`, in increasing order, as a CBOR
//! [`FrameHeader::Layer`] `{layer, byte_len, checksum}` followed by `byte_len` raw bytes; each stream
//! ends with [`FrameHeader::End`] (stream 0's carries the [`KvTrailer`]). The receiver answers
//! on stream 0 with a [`KvAck`] once the sink accepted everything, so the sender's `finish`
//! means "delivered", and its elapsed time is true end-to-end goodput.
//!
//! The fixed layer→stream mapping is what keeps reassembly both ordered and bounded: the
//! receiver only ever waits on the one stream that carries the next layer, so at most one
//! layer per stream is buffered.

pub mod codec;
pub mod protocol;
pub mod receiver;
pub mod sender;

pub use codec::KvError;
pub use protocol::{FrameHeader, KvAck, KvHeader, KvTrailer, StreamHello, KV_PROTOCOL};
pub use receiver::{KvIncoming, KvReceived, KvSink, SinkError, VecSink};
pub use sender::{KvSender, KvSent};
