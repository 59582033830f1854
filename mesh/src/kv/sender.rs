//! Sending side of a KV transfer: pieces go in as they are produced, in any order; each of the
//! transfer's streams takes the next queued piece when it is free, so pieces spread over the
//! streams by how fast each drains. [`KvSender::send_piece`] waits (async) only while every
//! stream is busy and one piece per stream is already queued.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use futures::AsyncWriteExt;
use libp2p::{PeerId, Stream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::codec::{self, KvError};
use super::protocol::{KvAck, KvHeader, KvTrailer, PieceId, StreamHello, KV_PROTOCOL};
use crate::bandwidth::BandwidthEstimator;
use crate::wire;

/// Result of a delivered transfer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KvSent {
    /// Payload bytes delivered (acknowledged by the receiver).
    pub bytes: u64,
    /// From opening the streams to the receiver's ack.
    pub elapsed: Duration,
    /// Time the link was busy with this transfer, as the receiver measured it (see
    /// [`KvAck::busy_us`]).
    pub busy: Duration,
    /// Streams used.
    pub streams: u16,
}

impl KvSent {
    /// Goodput while the link was busy, bytes per second: the link's rate, not diluted by time
    /// the sender had nothing to send (e.g. while the prefill computed the next chunk).
    pub fn goodput(&self) -> f64 {
        self.bytes as f64 / self.busy.as_secs_f64().max(1e-9)
    }
}

/// Settings the sender needs from the mesh config.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SenderLimits {
    pub max_trailer_bytes: usize,
    pub idle_timeout: Duration,
    /// A receiver that takes bytes slower than this (bytes/s, measured over the time writes were
    /// blocked, after [`MIN_RATE_GRACE`] of it) is cut. 0 disables the check.
    pub min_rate: f64,
    /// Emulated link rate towards this peer in bytes/s (a test aid; `None` = no pacing).
    pub emulated_rate: Option<f64>,
}

impl SenderLimits {
    /// The limits a node's config sets (no emulated rate).
    pub(crate) fn new(limits: &crate::config::Limits) -> Self {
        Self {
            max_trailer_bytes: limits.max_trailer_bytes,
            idle_timeout: limits.kv_idle_timeout,
            min_rate: limits.kv_min_rate_bytes_per_s as f64,
            emulated_rate: None,
        }
    }
}

/// Per-peer emulated link rates in bytes/s (see [`crate::MeshHandle::set_emulated_bandwidth`]).
pub(crate) type EmulatedRates = Arc<RwLock<HashMap<PeerId, f64>>>;

/// What opening a KV transfer takes, shared by the handle (transfers) and the swarm task
/// (bandwidth probes), so both draw transfer ids and limits alike.
#[derive(Clone)]
pub(crate) struct KvOpener {
    pub control: libp2p_stream::Control,
    pub estimator: Arc<Mutex<BandwidthEstimator>>,
    /// Emulated link rate per peer (shared with the probes the swarm task starts).
    pub emulated_rate: EmulatedRates,
    next_transfer: Arc<AtomicU64>,
    limits: SenderLimits,
}

impl KvOpener {
    /// Transfer ids start at `first_id`.
    pub fn new(
        control: libp2p_stream::Control,
        estimator: Arc<Mutex<BandwidthEstimator>>,
        limits: SenderLimits,
        first_id: u64,
    ) -> Self {
        Self {
            control,
            estimator,
            emulated_rate: EmulatedRates::default(),
            next_transfer: Arc::new(AtomicU64::new(first_id)),
            limits,
        }
    }

    /// Opens a transfer to `peer` over `streams` streams, paced at its emulated rate if any.
    pub async fn open(
        &self,
        peer: PeerId,
        header: KvHeader,
        streams: u16,
    ) -> Result<KvSender, KvError> {
        let id = self.next_transfer.fetch_add(1, Ordering::Relaxed);
        let limits = SenderLimits {
            emulated_rate: self
                .emulated_rate
                .read()
                .ok()
                .and_then(|m| m.get(&peer).copied()),
            ..self.limits
        };
        KvSender::open(
            &self.control,
            peer,
            header,
            streams,
            id,
            limits,
            self.estimator.clone(),
        )
        .await
    }
}

/// A piece waiting for a free stream.
struct Queued {
    piece: PieceId,
    bytes: Vec<u8>,
}

/// An open KV transfer. Call [`send_piece`](Self::send_piece) for every piece (any order), then
/// [`finish`](Self::finish). Dropping it aborts the transfer (the receiver sees a truncated
/// transfer and rejects it).
pub struct KvSender {
    peer: PeerId,
    header: KvHeader,
    stream_count: u16,
    queue: Option<mpsc::Sender<Queued>>,
    trailer: Option<oneshot::Sender<KvTrailer>>,
    tasks: Vec<JoinHandle<Result<Option<Stream>, KvError>>>,
    bytes: u64,
    started: Instant,
    limits: SenderLimits,
    estimator: Arc<Mutex<BandwidthEstimator>>,
    /// Set once a writer failed: its task was already awaited and must not be polled again.
    failed: bool,
}

impl std::fmt::Debug for KvSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvSender")
            .field("peer", &self.peer)
            .field("request_id", &self.header.request_id)
            .field("stream_count", &self.stream_count)
            .field("bytes", &self.bytes)
            .finish()
    }
}

impl Drop for KvSender {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl KvSender {
    /// Opens `stream_count` streams to `peer` and sends each its hello.
    pub(crate) async fn open(
        control: &libp2p_stream::Control,
        peer: PeerId,
        header: KvHeader,
        stream_count: u16,
        transfer_id: u64,
        limits: SenderLimits,
        estimator: Arc<Mutex<BandwidthEstimator>>,
    ) -> Result<Self, KvError> {
        let stream_count = stream_count.max(1);
        let started = Instant::now();
        let opens = (0..stream_count).map(|_| open_stream(control.clone(), peer));
        let opened = tokio::time::timeout(limits.idle_timeout, futures::future::join_all(opens))
            .await
            .map_err(|_| KvError::Timeout("streams to open"))?;
        // One piece per stream may wait while every stream is writing.
        let (tx, rx) = mpsc::channel(usize::from(stream_count));
        let rx = Arc::new(tokio::sync::Mutex::new(rx));
        let (trailer_tx, trailer_rx) = oneshot::channel();
        let mut trailer_rx = Some(trailer_rx);
        let bucket = limits
            .emulated_rate
            .filter(|r| r.is_finite() && *r > 0.0)
            .map(|r| Arc::new(Mutex::new(TokenBucket::new(r, started))));
        let mut tasks = Vec::with_capacity(usize::from(stream_count));
        for (i, stream) in opened.into_iter().enumerate() {
            let stream = stream.map_err(|e| KvError::Open(e.to_string()))?;
            let hello = StreamHello {
                transfer_id,
                stream_index: i as u16,
                stream_count,
                header: header.clone(),
            };
            let writer = Writer {
                hello,
                queue: rx.clone(),
                trailer: if i == 0 { trailer_rx.take() } else { None },
                limits,
                bucket: bucket.clone(),
            };
            tasks.push(tokio::spawn(writer.run(stream)));
        }
        Ok(Self {
            peer,
            header,
            stream_count,
            queue: Some(tx),
            trailer: Some(trailer_tx),
            tasks,
            bytes: 0,
            started,
            limits,
            estimator,
            failed: false,
        })
    }

    /// The transfer's header.
    pub fn header(&self) -> &KvHeader {
        &self.header
    }

    /// Payload bytes queued so far.
    pub fn bytes_queued(&self) -> u64 {
        self.bytes
    }

    /// Queues `piece` for the next free stream; waits while every stream is busy and the queue
    /// is full. Pieces may be sent in any order; the header's bounds are enforced.
    pub async fn send_piece(&mut self, piece: PieceId, bytes: Vec<u8>) -> Result<(), KvError> {
        if self.failed {
            return Err(KvError::Usage("transfer already failed".into()));
        }
        let h = &self.header;
        if piece.layer >= h.layers || piece.start >= piece.end || piece.end > h.tokens {
            return Err(KvError::Usage(format!(
                "piece {piece:?} outside {} layers × {} tokens",
                h.layers, h.tokens
            )));
        }
        let len = bytes.len() as u64;
        if len > h.max_piece_bytes || self.bytes + len > h.total_bytes {
            return Err(KvError::Usage(format!(
                "piece {piece:?} of {len} bytes exceeds the header's bounds"
            )));
        }
        let Some(queue) = &self.queue else {
            return Err(KvError::Usage("transfer already finished".into()));
        };
        if queue.send(Queued { piece, bytes }).await.is_err() {
            return Err(self.writer_error().await);
        }
        self.bytes += len;
        Ok(())
    }

    /// Sends the whole of an [`KvHeader::opaque`] transfer, each piece cut from `fill` (repeated
    /// as needed).
    pub async fn send_opaque(&mut self, fill: &[u8]) -> Result<(), KvError> {
        if fill.is_empty() {
            return Err(KvError::Usage("empty fill".into()));
        }
        let piece_len = self.header.max_piece_bytes as usize;
        let mut left = self.header.total_bytes.saturating_sub(self.bytes);
        for layer in 0..self.header.layers {
            if left == 0 {
                break;
            }
            let n = left.min(piece_len as u64) as usize;
            left -= n as u64;
            let bytes: Vec<u8> = match fill.get(..n) {
                Some(b) => b.to_vec(),
                None => fill.iter().copied().cycle().take(n).collect(),
            };
            let piece = PieceId {
                layer,
                start: 0,
                end: 1,
            };
            self.send_piece(piece, bytes).await?;
        }
        Ok(())
    }

    /// Ends every stream once the queued pieces are written (stream 0 carries `trailer`), then
    /// waits for the receiver's ack.
    pub async fn finish(mut self, trailer: KvTrailer) -> Result<KvSent, KvError> {
        if self.failed {
            return Err(KvError::Usage("transfer already failed".into()));
        }
        if self.bytes != self.header.total_bytes {
            return Err(KvError::Usage(format!(
                "finish after {} of {} bytes",
                self.bytes, self.header.total_bytes
            )));
        }
        if let Some(t) = self.trailer.take() {
            // Writer 0 may already have failed; its error surfaces below.
            let _ = t.send(trailer);
        }
        // Closing the queue tells each writer to end its stream after the pieces still queued.
        self.queue = None;
        let mut stream0 = None;
        let tasks = std::mem::take(&mut self.tasks);
        for (i, t) in tasks.into_iter().enumerate() {
            let r = t
                .await
                .map_err(|e| KvError::Protocol(format!("writer task: {e}")))??;
            if i == 0 {
                stream0 = r;
            }
        }
        let mut stream0 =
            stream0.ok_or_else(|| KvError::Protocol("stream 0 not returned".into()))?;
        let ack: KvAck = tokio::time::timeout(
            self.limits.idle_timeout,
            wire::read_framed(&mut stream0, 4096),
        )
        .await
        .map_err(|_| KvError::Timeout("receiver ack"))?
        .map_err(|e| match KvError::from(e) {
            KvError::Truncated(_) => KvError::Rejected("stream closed without ack".into()),
            other => other,
        })?;
        let _ = stream0.close().await;
        if !ack.ok {
            return Err(KvError::Rejected(ack.error.unwrap_or_default()));
        }
        if ack.bytes != self.bytes {
            return Err(KvError::Rejected(format!(
                "ack for {} of {} bytes",
                ack.bytes, self.bytes
            )));
        }
        let busy = Duration::from_micros(ack.busy_us);
        if !busy.is_zero() {
            if let Ok(mut est) = self.estimator.lock() {
                est.record(self.peer, self.bytes, busy, Instant::now());
            }
        }
        Ok(KvSent {
            bytes: self.bytes,
            elapsed: self.started.elapsed(),
            busy,
            streams: self.stream_count,
        })
    }

    /// The error that stopped a writer (the queue closed because every writer ended, or one
    /// failed: the first failure found is reported).
    async fn writer_error(&mut self) -> KvError {
        self.failed = true;
        self.queue = None;
        let mut first = None;
        for t in std::mem::take(&mut self.tasks) {
            t.abort();
            let e = match t.await {
                Ok(Err(e)) => Some(e),
                Ok(Ok(_)) => None,
                Err(e) if e.is_cancelled() => None,
                Err(e) => Some(KvError::Protocol(format!("writer task: {e}"))),
            };
            if first.is_none() {
                first = e;
            }
        }
        first.unwrap_or_else(|| KvError::Protocol("writers ended early".into()))
    }
}

/// Owns one stream: hello, then whatever pieces it takes from the shared queue, then `End`.
struct Writer {
    hello: StreamHello,
    queue: Arc<tokio::sync::Mutex<mpsc::Receiver<Queued>>>,
    /// Stream 0 only: the trailer, sent once the queue is closed.
    trailer: Option<oneshot::Receiver<KvTrailer>>,
    limits: SenderLimits,
    bucket: Option<Arc<Mutex<TokenBucket>>>,
}

impl Writer {
    /// Returns stream 0 so the sender can read the ack; other streams are closed here.
    async fn run(mut self, mut stream: Stream) -> Result<Option<Stream>, KvError> {
        let idle = self.limits.idle_timeout;
        bounded(idle, codec::write_hello(&mut stream, &self.hello)).await?;
        let mut rate = WriteRate::default();
        loop {
            let next = { self.queue.lock().await.recv().await };
            let Some(Queued { piece, bytes }) = next else {
                break;
            };
            bounded(idle, codec::write_piece_header(&mut stream, piece, &bytes)).await?;
            let granule = if self.bucket.is_some() {
                PACED_WRITE
            } else {
                WRITE_PIECE
            };
            if let Some(b) = &self.bucket {
                if let Ok(mut b) = b.lock() {
                    b.start(Instant::now());
                }
            }
            for part in bytes.chunks(granule) {
                if let Some(b) = &self.bucket {
                    let wait = b
                        .lock()
                        .map(|mut b| b.take(part.len(), Instant::now()))
                        .unwrap_or_default();
                    if !wait.is_zero() {
                        tokio::time::sleep(wait).await;
                    }
                }
                let t0 = Instant::now();
                bounded(idle, async {
                    stream.write_all(part).await.map_err(KvError::from)
                })
                .await?;
                rate.record(part.len(), t0.elapsed());
                rate.check(self.limits.min_rate)?;
            }
        }
        let trailer = match self.trailer.take() {
            Some(rx) => Some(
                rx.await
                    .map_err(|_| KvError::Usage("transfer dropped before finish".into()))?,
            ),
            None => None,
        };
        let end = codec::write_end(&mut stream, trailer.as_ref(), self.limits.max_trailer_bytes);
        bounded(idle, end).await?;
        if self.hello.stream_index == 0 {
            return Ok(Some(stream));
        }
        bounded(idle, async { stream.close().await.map_err(KvError::from) }).await?;
        Ok(None)
    }
}

/// Extra attempts to open one KV stream after an I/O failure.
const OPEN_RETRIES: u32 = 2;
/// Pause before such a retry (lets the swarm drop the connection that failed).
const OPEN_RETRY_DELAY: Duration = Duration::from_millis(20);

/// Opens one KV stream to `peer`, retrying I/O failures: libp2p picks one of the peer's
/// connections at random for each new stream, and with two connections (both sides dialled) the
/// one picked may be closing while the other is healthy. A retry picks again among those still
/// open (or dials). The caller bounds the whole open by its idle timeout.
async fn open_stream(
    mut control: libp2p_stream::Control,
    peer: PeerId,
) -> Result<Stream, libp2p_stream::OpenStreamError> {
    let mut tries = 0;
    loop {
        match control.open_stream(peer, KV_PROTOCOL).await {
            Err(libp2p_stream::OpenStreamError::Io(e)) if tries < OPEN_RETRIES => {
                tries += 1;
                tracing::debug!(%peer, error = %e, tries, "KV stream did not open; retrying");
                tokio::time::sleep(OPEN_RETRY_DELAY).await;
            }
            r => return r,
        }
    }
}

/// Largest part of a piece written under one idle timeout: a receiver that stops reading
/// fails the transfer after `kv_idle_timeout` without progress, instead of holding the sender
/// forever, while a slow but moving link is never cut by that timeout (see [`WriteRate`]).
const WRITE_PIECE: usize = 1 << 20;
/// Write size under an emulated rate: small, so the pacing is smooth at the receiver.
const PACED_WRITE: usize = 16 * 1024;
/// Blocked-write time after which [`SenderLimits::min_rate`] is enforced.
pub(crate) const MIN_RATE_GRACE: Duration = Duration::from_secs(5);

/// Bytes written against the time writes took (time the stream had bytes it could not yet
/// hand over), for the minimum-rate check. Socket buffers make the first writes instant, so
/// the rate is only judged after [`MIN_RATE_GRACE`] of blocked time.
#[derive(Debug, Default)]
struct WriteRate {
    bytes: u64,
    blocked: Duration,
}

impl WriteRate {
    fn record(&mut self, bytes: usize, took: Duration) {
        self.bytes += bytes as u64;
        self.blocked += took;
    }

    fn check(&self, min_rate: f64) -> Result<(), KvError> {
        if min_rate <= 0.0 || self.blocked < MIN_RATE_GRACE {
            return Ok(());
        }
        let rate = self.bytes as f64 / self.blocked.as_secs_f64();
        if rate < min_rate {
            return Err(KvError::TooSlow {
                bytes_per_sec: rate,
                min: min_rate,
            });
        }
        Ok(())
    }
}

/// The emulated link: a pacer that lets bytes out at `rate`, with a credit of at most a few
/// milliseconds of the rate after an idle period, so a sender that waited (e.g. through a
/// prefill) cannot bank credit and then send everything at once. Within a piece it keeps to
/// its schedule even when a wake-up comes late (a loaded machine), so the link neither slows
/// down nor bursts more than one late wake-up's worth. A test aid for meshes on one machine;
/// real links are shaped by the kernel (`tc tbf`).
#[derive(Debug)]
pub(crate) struct TokenBucket {
    rate: f64,
    /// When everything taken so far has "left".
    due: Instant,
}

/// How much of the emulated rate may be sent at once after an idle period.
const BUCKET_BURST: Duration = Duration::from_millis(4);

impl TokenBucket {
    pub(crate) fn new(rate: f64, now: Instant) -> Self {
        Self { rate, due: now }
    }

    /// A new piece starts: an idle link banks at most [`BUCKET_BURST`] of credit.
    pub(crate) fn start(&mut self, now: Instant) {
        self.due = self.due.max(now.checked_sub(BUCKET_BURST).unwrap_or(now));
    }

    /// Takes `n` bytes; returns how long to wait before sending them.
    pub(crate) fn take(&mut self, n: usize, now: Instant) -> Duration {
        self.due += Duration::from_secs_f64(n as f64 / self.rate);
        self.due.saturating_duration_since(now)
    }
}

/// `fut`, failed with [`KvError::Timeout`] when it takes longer than `idle`.
async fn bounded<T>(
    idle: Duration,
    fut: impl std::future::Future<Output = Result<T, KvError>>,
) -> Result<T, KvError> {
    tokio::time::timeout(idle, fut)
        .await
        .map_err(|_| KvError::Timeout("KV write (receiver not reading)"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pacer_banks_at_most_its_burst_and_keeps_its_schedule() {
        let t0 = Instant::now();
        let rate = 1e6;
        let mut b = TokenBucket::new(rate, t0);
        // Idle for ten seconds, then 1 MB: only 4 ms of credit (4 KB) was banked.
        let later = t0 + Duration::from_secs(10);
        b.start(later);
        let wait = b.take(1_000_000, later);
        assert!((wait.as_secs_f64() - 0.996).abs() < 1e-6, "{wait:?}");
        // A wake-up 30 ms late: the next 10 KB go without waiting (the schedule is kept) ...
        let late = later + wait + Duration::from_millis(30);
        assert_eq!(b.take(10_000, late), Duration::ZERO);
        // ... and once caught up, bytes wait their time again.
        let w = b.take(30_000, late);
        assert!((w.as_secs_f64() - 0.01).abs() < 1e-6, "{w:?}");
    }

    #[test]
    fn min_rate_judged_only_after_grace() {
        let mut r = WriteRate::default();
        r.record(10, Duration::from_secs(1));
        assert!(r.check(1e6).is_ok(), "within the grace period");
        r.record(10, MIN_RATE_GRACE);
        assert!(matches!(r.check(1e6), Err(KvError::TooSlow { .. })));
        assert!(r.check(0.0).is_ok(), "0 disables the check");
    }
}
