//! Reading and writing KV frames, with every check that protects the receiver.

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use std::time::Instant;

use super::protocol::{checksum, FrameHeader, PieceId, StreamHello};
use crate::wire::{self, WireError};

/// Largest CBOR frame header (a `Piece` header is ~40 bytes; `End` may carry the trailer, which
/// has its own limit).
pub const MAX_FRAME_HEADER_BYTES: usize = 256;
/// Largest stream hello (header with model id and hashes).
pub const MAX_HELLO_BYTES: usize = 4096;

/// Everything that can go wrong with a KV transfer. Each corruption class has its own variant so
/// callers (and tests) can tell them apart.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KvError {
    /// The stream ended in the middle of a frame or before all pieces/trailer arrived.
    #[error("truncated transfer: {0}")]
    Truncated(String),
    /// A frame or the transfer is larger than announced or allowed.
    #[error("oversized: {what} of {len} bytes exceeds {max}")]
    Oversized {
        /// What was too big.
        what: &'static str,
        /// Its size.
        len: u64,
        /// The bound.
        max: u64,
    },
    /// A piece names a layer or token range outside the transfer's header.
    #[error("piece {piece:?} outside the transfer ({layers} layers, {tokens} tokens)")]
    OutOfRange {
        /// The piece received.
        piece: PieceId,
        /// Layers announced.
        layers: u32,
        /// Tokens announced.
        tokens: u32,
    },
    /// Checksum mismatch.
    #[error("corrupt piece {piece:?}: checksum {got:#010x}, expected {expected:#010x}")]
    Corrupt {
        /// The piece.
        piece: PieceId,
        /// Checksum from the frame header.
        expected: u32,
        /// Checksum of the bytes received.
        got: u32,
    },
    /// Malformed message (bad CBOR, inconsistent hello, unknown frame).
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// The caller's sink refused the data.
    #[error("sink refused: {0}")]
    Sink(String),
    /// The receiver reported failure in its ack.
    #[error("receiver rejected the transfer: {0}")]
    Rejected(String),
    /// Could not open a stream to the peer.
    #[error("cannot open stream: {0}")]
    Open(String),
    /// No progress within the idle timeout.
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    /// The receiver read slower than the configured minimum rate; the transfer was cut.
    #[error(
        "receiver too slow: {bytes_per_sec:.0} B/s while data was waiting (minimum {min:.0} B/s)"
    )]
    TooSlow {
        /// Rate measured while the sender had bytes waiting.
        bytes_per_sec: f64,
        /// The configured minimum.
        min: f64,
    },
    /// Misuse of the sender API (piece beyond the header's bounds, after an error).
    #[error("invalid use: {0}")]
    Usage(String),
    /// Stream I/O failed.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

impl From<WireError> for KvError {
    fn from(e: WireError) -> Self {
        match e {
            WireError::Io(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
                KvError::Truncated("stream ended inside a frame header".into())
            }
            WireError::Io(io) => KvError::Io(io),
            WireError::TooLarge { len, max } => KvError::Oversized {
                what: "frame header",
                len,
                max,
            },
            other => KvError::Protocol(other.to_string()),
        }
    }
}

/// Writes the stream hello.
pub async fn write_hello<W: AsyncWrite + Unpin>(
    io: &mut W,
    hello: &StreamHello,
) -> Result<(), KvError> {
    wire::write_framed(io, hello, MAX_HELLO_BYTES).await?;
    Ok(())
}

/// Reads and sanity-checks a stream hello.
pub async fn read_hello<R: AsyncRead + Unpin>(
    io: &mut R,
    max_streams: u16,
) -> Result<StreamHello, KvError> {
    let hello: StreamHello = wire::read_framed(io, MAX_HELLO_BYTES).await?;
    if hello.stream_count == 0 || hello.stream_index >= hello.stream_count {
        return Err(KvError::Protocol(format!(
            "stream index {} of {}",
            hello.stream_index, hello.stream_count
        )));
    }
    if hello.stream_count > max_streams {
        return Err(KvError::Oversized {
            what: "stream count",
            len: u64::from(hello.stream_count),
            max: u64::from(max_streams),
        });
    }
    if hello.header.max_piece_bytes > hello.header.total_bytes {
        // Not fatal by itself, but a header announcing a piece bigger than the whole transfer
        // is a sign of a broken sender; refuse early.
        return Err(KvError::Protocol(
            "max_piece_bytes exceeds total_bytes".into(),
        ));
    }
    Ok(hello)
}

/// Writes one piece frame: header, then the raw bytes.
pub async fn write_piece<W: AsyncWrite + Unpin>(
    io: &mut W,
    piece: PieceId,
    bytes: &[u8],
) -> Result<(), KvError> {
    write_piece_header(io, piece, bytes).await?;
    io.write_all(bytes).await?;
    Ok(())
}

/// Writes the header of the piece frame carrying `bytes`; the caller writes `bytes` next
/// (in small writes, e.g. to pace them or to bound each write's time).
pub async fn write_piece_header<W: AsyncWrite + Unpin>(
    io: &mut W,
    piece: PieceId,
    bytes: &[u8],
) -> Result<(), KvError> {
    let header = FrameHeader::Piece {
        piece,
        byte_len: bytes.len() as u64,
        checksum: checksum(bytes),
    };
    wire::write_framed(io, &header, MAX_FRAME_HEADER_BYTES).await?;
    Ok(())
}

/// Writes the end-of-stream frame.
pub async fn write_end<W: AsyncWrite + Unpin>(
    io: &mut W,
    trailer: Option<&super::KvTrailer>,
    max_trailer_bytes: usize,
) -> Result<(), KvError> {
    let end = FrameHeader::End {
        trailer: trailer.cloned(),
    };
    wire::write_framed(io, &end, MAX_FRAME_HEADER_BYTES + max_trailer_bytes).await?;
    io.flush().await?;
    Ok(())
}

/// A frame as read by [`read_frame`].
#[derive(Debug)]
pub enum Frame {
    /// A verified piece.
    Piece {
        /// What it holds.
        piece: PieceId,
        /// Its bytes (checksum already verified).
        bytes: Vec<u8>,
        /// When its header had arrived, i.e. its payload started arriving.
        first_at: Instant,
        /// When its last byte had arrived.
        last_at: Instant,
    },
    /// End of this stream.
    End(Option<super::KvTrailer>),
}

/// Reads one frame. `max_piece_bytes` is the smaller of the header's announcement and the local
/// limit, `remaining` the bytes still allowed for the whole transfer: the payload buffer is only
/// allocated after both checks pass.
pub async fn read_frame<R: AsyncRead + Unpin>(
    io: &mut R,
    max_piece_bytes: u64,
    remaining: u64,
    max_trailer_bytes: usize,
) -> Result<Frame, KvError> {
    let header: FrameHeader =
        wire::read_framed(io, MAX_FRAME_HEADER_BYTES + max_trailer_bytes).await?;
    let first_at = Instant::now();
    match header {
        FrameHeader::Piece {
            piece,
            byte_len,
            checksum: expected,
        } => {
            if byte_len > max_piece_bytes {
                return Err(KvError::Oversized {
                    what: "piece frame",
                    len: byte_len,
                    max: max_piece_bytes,
                });
            }
            if byte_len > remaining {
                return Err(KvError::Oversized {
                    what: "transfer (announced total)",
                    len: byte_len,
                    max: remaining,
                });
            }
            let len = usize::try_from(byte_len).map_err(|_| KvError::Oversized {
                what: "piece frame",
                len: byte_len,
                max: usize::MAX as u64,
            })?;
            let mut bytes = vec![0u8; len];
            io.read_exact(&mut bytes).await.map_err(|e| {
                if e.kind() == std::io::ErrorKind::UnexpectedEof {
                    KvError::Truncated(format!("payload of piece {piece:?}"))
                } else {
                    KvError::Io(e)
                }
            })?;
            let last_at = Instant::now();
            let got = checksum(&bytes);
            if got != expected {
                return Err(KvError::Corrupt {
                    piece,
                    expected,
                    got,
                });
            }
            Ok(Frame::Piece {
                piece,
                bytes,
                first_at,
                last_at,
            })
        }
        FrameHeader::End { trailer } => Ok(Frame::End(trailer)),
    }
}
