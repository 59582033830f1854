//! Structure-aware fuzzing of the KV receiver's state machine: the per-stream readers and the
//! coordinator, fed sequences of frames (not only random bytes). Each input is a valid transfer
//! (header, pieces spread over 1–4 streams, ends and trailer) with frame-level mutations —
//! dropped, duplicated or reordered frames, wrong lengths, out-of-range pieces, bad checksums,
//! garbage frames, frames after the end, truncated streams — and sometimes byte-level ones.
//!
//! Invariants checked on every input: no panic, no timeout (every stream is in memory, so a
//! timeout would be a deadlock), the sink never gets more than the announced bytes nor a piece
//! outside the header, `finish` only after exactly the announced bytes, and an unmutated
//! transfer is always accepted. Long mode: `PRFAAS_FUZZ_ITERS=1000000 cargo test --workspace
//! --lib -- kv::receiver::fuzz --nocapture`.

#[path = "../../../tests/fuzz_harness/mod.rs"]
mod harness;

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use arbitrary::Unstructured;
use tokio::sync::mpsc;

use super::{coordinate, read_stream, BusyClock, KvSink, ReaderItem, SinkError};
use crate::advert::ModelRef;
use crate::kv::codec::{write_end, write_piece, MAX_FRAME_HEADER_BYTES};
use crate::kv::protocol::{checksum, FrameHeader, KvHeader, KvTrailer, PieceId};
use crate::kv::KvError;
use crate::wire;

/// Records what the coordinator hands over and checks it against the header as it goes.
struct CheckSink {
    header: KvHeader,
    bytes: u64,
    finished: u32,
    /// Refuse the n-th piece (sink errors must end the transfer cleanly).
    refuse_at: Option<usize>,
    pieces: usize,
}

impl KvSink for CheckSink {
    fn write_piece(&mut self, piece: PieceId, bytes: Vec<u8>) -> Result<(), SinkError> {
        let h = &self.header;
        assert!(
            piece.layer < h.layers && piece.start < piece.end && piece.end <= h.tokens,
            "piece {piece:?} outside {} layers × {} tokens reached the sink",
            h.layers,
            h.tokens
        );
        self.bytes += bytes.len() as u64;
        assert!(
            self.bytes <= h.total_bytes,
            "sink got {} of {} announced bytes",
            self.bytes,
            h.total_bytes
        );
        assert_eq!(self.finished, 0, "piece after finish");
        self.pieces += 1;
        if self.refuse_at == Some(self.pieces) {
            return Err(SinkError("refused by the test sink".into()));
        }
        Ok(())
    }

    fn finish(&mut self, _trailer: KvTrailer) -> Result<(), SinkError> {
        assert_eq!(
            self.bytes, self.header.total_bytes,
            "finish before all bytes"
        );
        self.finished += 1;
        Ok(())
    }
}

/// One frame of a stream, before encoding.
#[derive(Debug, Clone)]
enum Frame {
    Piece {
        id: PieceId,
        payload: Vec<u8>,
    },
    /// A piece header whose announced length or checksum lies.
    Lying {
        id: PieceId,
        payload: Vec<u8>,
        byte_len: u64,
        checksum: u32,
    },
    End {
        trailer: Option<KvTrailer>,
    },
    Garbage(Vec<u8>),
}

fn model() -> ModelRef {
    ModelRef {
        model_id: "fuzz".into(),
        weights_hash: [7; 32],
        kv_layout_version: 1,
        kv_layout_hash: [9; 32],
    }
}

/// A valid transfer: every layer's tokens cut into 1–3 pieces, spread over the streams.
fn plan(u: &mut Unstructured<'_>) -> arbitrary::Result<(KvHeader, Vec<Vec<Frame>>)> {
    let layers = u.int_in_range(1..=4u32)?;
    let tokens = u.int_in_range(1..=12u32)?;
    let row_bytes = u.int_in_range(1..=6u32)?;
    let n_streams = u.int_in_range(1..=4usize)?;
    let mut pieces = Vec::new();
    for layer in 0..layers {
        let mut start = 0;
        while start < tokens {
            let end = (start + u.int_in_range(1..=tokens)?).min(tokens);
            let id = PieceId { layer, start, end };
            let len = ((end - start) * row_bytes) as usize;
            let payload: Vec<u8> = (0..len).map(|i| (i as u8) ^ (layer as u8) ^ 0xA5).collect();
            pieces.push(Frame::Piece { id, payload });
            start = end;
        }
    }
    let total: u64 = pieces
        .iter()
        .map(|f| match f {
            Frame::Piece { payload, .. } => payload.len() as u64,
            _ => 0,
        })
        .sum();
    let max_piece = pieces
        .iter()
        .map(|f| match f {
            Frame::Piece { payload, .. } => payload.len() as u64,
            _ => 0,
        })
        .max()
        .unwrap_or(1);
    let mut streams: Vec<Vec<Frame>> = vec![Vec::new(); n_streams];
    for p in pieces {
        let s = u.int_in_range(0..=n_streams - 1)?;
        streams[s].push(p);
    }
    for (i, s) in streams.iter_mut().enumerate() {
        s.push(Frame::End {
            trailer: (i == 0).then(|| KvTrailer {
                first_token: Some(1),
                payload: vec![0; 8],
            }),
        });
    }
    let header = KvHeader {
        request_id: 1,
        model: model(),
        layers,
        tokens,
        dtype: "u8".into(),
        max_piece_bytes: max_piece,
        total_bytes: total,
        probe: false,
    };
    Ok((header, streams))
}

/// Frame-level mutations; returns whether anything changed.
fn mutate_frames(
    u: &mut Unstructured<'_>,
    h: &KvHeader,
    streams: &mut [Vec<Frame>],
) -> arbitrary::Result<bool> {
    let rounds = u.int_in_range(0..=3u8)?;
    let mut any = false;
    for _ in 0..rounds {
        let s = u.int_in_range(0..=streams.len() - 1)?;
        let frames = &mut streams[s];
        if frames.is_empty() {
            continue;
        }
        let i = u.int_in_range(0..=frames.len() - 1)?;
        let mut changed = true;
        match u.int_in_range(0..=9u8)? {
            0 => {
                frames.remove(i);
            }
            1 => {
                let f = frames[i].clone();
                frames.insert(i, f);
            }
            2 => {
                let j = u.int_in_range(0..=frames.len() - 1)?;
                frames.swap(i, j);
                changed = i != j;
            }
            3 => {
                // Out-of-range or empty range.
                if let Frame::Piece { id, .. } = &mut frames[i] {
                    match u.int_in_range(0..=3u8)? {
                        0 => id.layer = h.layers + u.int_in_range(0..=3u32)?,
                        1 => id.end = h.tokens + u.int_in_range(1..=3u32)?,
                        2 => id.start = id.end,
                        _ => (id.start, id.end) = (id.end, id.start),
                    }
                } else {
                    changed = false;
                }
            }
            4 | 5 => {
                // A header that lies about the length or the checksum.
                if let Frame::Piece { id, payload } = frames[i].clone() {
                    let n = payload.len() as u64;
                    let (byte_len, sum) = if u.arbitrary()? {
                        let d = u.int_in_range(1..=3u64)?;
                        (
                            if u.arbitrary()? {
                                n + d
                            } else {
                                n.saturating_sub(d)
                            },
                            checksum(&payload),
                        )
                    } else {
                        (n, checksum(&payload) ^ 1 << u.int_in_range(0..=31u32)?)
                    };
                    changed = byte_len != n || sum != checksum(&payload);
                    frames[i] = Frame::Lying {
                        id,
                        payload,
                        byte_len,
                        checksum: sum,
                    };
                } else {
                    changed = false;
                }
            }
            6 => {
                let g: Vec<u8> = u.arbitrary()?;
                frames.insert(i, Frame::Garbage(g));
            }
            7 => {
                // Frames after End, or no End at all.
                if matches!(frames.last(), Some(Frame::End { .. })) && u.arbitrary()? {
                    frames.pop();
                } else {
                    let f = frames[i].clone();
                    frames.push(f);
                }
            }
            8 => {
                // A piece moved to another stream, before its End: still a valid transfer.
                changed = false;
                if matches!(frames[i], Frame::Piece { .. }) {
                    let f = frames.remove(i);
                    let t = u.int_in_range(0..=streams.len() - 1)?;
                    let end = streams[t]
                        .iter()
                        .position(|f| matches!(f, Frame::End { .. }))
                        .unwrap_or(streams[t].len());
                    let at = u.int_in_range(0..=end)?;
                    streams[t].insert(at, f);
                }
            }
            _ => {
                // A payload byte flipped under a correct-looking header.
                if let Frame::Piece { payload, .. } = &mut frames[i] {
                    let at = u.int_in_range(0..=payload.len() - 1)?;
                    payload[at] ^= 0x40;
                    let Frame::Piece { id, payload } = frames[i].clone() else {
                        unreachable!()
                    };
                    let mut orig = payload.clone();
                    orig[at] ^= 0x40;
                    frames[i] = Frame::Lying {
                        id,
                        byte_len: payload.len() as u64,
                        checksum: checksum(&orig),
                        payload,
                    };
                } else {
                    changed = false;
                }
            }
        }
        any |= changed;
    }
    Ok(any)
}

async fn encode(frames: &[Frame]) -> Vec<u8> {
    let mut out = futures::io::Cursor::new(Vec::new());
    for f in frames {
        match f {
            Frame::Piece { id, payload } => {
                write_piece(&mut out, *id, payload).await.expect("encode")
            }
            Frame::Lying {
                id,
                payload,
                byte_len,
                checksum,
            } => {
                let header = FrameHeader::Piece {
                    piece: *id,
                    byte_len: *byte_len,
                    checksum: *checksum,
                };
                wire::write_framed(&mut out, &header, MAX_FRAME_HEADER_BYTES)
                    .await
                    .expect("encode");
                futures::AsyncWriteExt::write_all(&mut out, payload)
                    .await
                    .expect("encode");
            }
            Frame::End { trailer } => write_end(&mut out, trailer.as_ref(), 64)
                .await
                .expect("encode"),
            Frame::Garbage(g) => {
                out.get_mut()
                    .extend_from_slice(&(g.len() as u32).to_be_bytes());
                out.get_mut().extend_from_slice(g);
                out.set_position(out.get_ref().len() as u64);
            }
        }
    }
    out.into_inner()
}

/// Readers + coordinator over in-memory streams, as `KvIncoming::receive` runs them.
async fn receive(
    h: &KvHeader,
    streams: Vec<Vec<u8>>,
    sink: &mut CheckSink,
) -> Result<u64, KvError> {
    let n = streams.len() as u16;
    let idle = Duration::from_secs(5);
    let max_piece = h.max_piece_bytes.min(1 << 20);
    let remaining = Arc::new(AtomicU64::new(h.total_bytes));
    let (tx, mut rx) = mpsc::channel::<ReaderItem>(usize::from(n));
    let readers: Vec<_> = streams
        .into_iter()
        .enumerate()
        .map(|(i, bytes)| {
            tokio::spawn(read_stream(
                futures::io::Cursor::new(bytes),
                i as u16,
                max_piece,
                remaining.clone(),
                64,
                tx.clone(),
            ))
        })
        .collect();
    drop(tx);
    let mut busy = BusyClock::default();
    let r = coordinate(&mut rx, h, n, idle, sink, &mut busy).await;
    drop(rx);
    for t in readers {
        t.abort();
    }
    r
}

#[test]
fn kv_receiver_frame_sequences() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");
    let (mut accepted, mut refused) = (0u64, 0u64);
    harness::run("kv receiver frame sequences", 20_000, 512, |u| {
        let (h, mut streams) = plan(u)?;
        let framed = mutate_frames(u, &h, &mut streams)?;
        let mut bytes: Vec<Vec<u8>> = rt.block_on(async {
            let mut v = Vec::new();
            for s in &streams {
                v.push(encode(s).await);
            }
            v
        });
        let mut bytewise = false;
        if u.ratio(1, 4)? {
            let s = u.int_in_range(0..=bytes.len() - 1)?;
            bytewise = harness::mutate(u, &mut bytes[s])?;
        }
        let refuse_at = if u.ratio(1, 8)? {
            Some(u.int_in_range(1..=4usize)?)
        } else {
            None
        };
        let mut sink = CheckSink {
            header: h.clone(),
            bytes: 0,
            finished: 0,
            refuse_at,
            pieces: 0,
        };
        let r = rt.block_on(receive(&h, bytes, &mut sink));
        match &r {
            Ok(b) => {
                assert_eq!(*b, h.total_bytes);
                assert_eq!(sink.finished, 1);
                accepted += 1;
            }
            Err(KvError::Timeout(what)) => {
                panic!("in-memory transfer timed out waiting for {what}")
            }
            Err(_) => {
                assert_eq!(sink.finished, 0);
                refused += 1;
            }
        }
        if !framed && !bytewise && refuse_at.is_none() {
            assert!(r.is_ok(), "valid transfer refused: {r:?}");
        }
        Ok(())
    });
    eprintln!("kv receiver: {accepted} transfers accepted, {refused} refused");
    assert!(
        accepted > 0 && refused > 0,
        "the generator must produce both outcomes"
    );
}
