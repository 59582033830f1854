//! Receiving side of a KV transfer: streams are grouped by transfer and read in parallel;
//! pieces are handed to a caller-supplied [`KvSink`] in the order they arrive (the sink places
//! each by its (layer, token range)), then the trailer once every stream has ended.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{AsyncWriteExt, StreamExt};
use libp2p::{PeerId, Stream};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinHandle;

use super::codec::{self, Frame, KvError};
use super::protocol::{KvAck, KvHeader, KvTrailer, PieceId, StreamHello};
use super::quota::{ExpectedTransfers, KvRefusal, PeerRate, PeerSlots};
use crate::bandwidth::BandwidthEstimator;
use crate::stats::MeshStats;
use crate::wire;

/// Error a sink returns to refuse data (e.g. no free KV blocks, layout mismatch).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct SinkError(pub String);

/// Where received pieces go, e.g. straight into leased KV blocks by position.
pub trait KvSink: Send {
    /// Takes one piece (checksum-verified, inside the header's layers and tokens). Pieces come
    /// in arrival order, which need not be layer or token order.
    fn write_piece(&mut self, piece: PieceId, bytes: Vec<u8>) -> Result<(), SinkError>;
    /// Called once, after every stream ended and exactly the announced bytes arrived.
    fn finish(&mut self, trailer: KvTrailer) -> Result<(), SinkError>;
}

/// A sink that keeps everything in memory (tests, small transfers) or only counts (`keep = false`).
#[derive(Debug, Default)]
pub struct VecSink {
    /// Whether to keep the bytes; otherwise only `bytes` is counted.
    pub keep: bool,
    /// Pieces received, in arrival order (if `keep`).
    pub pieces: Vec<(PieceId, Vec<u8>)>,
    /// Total payload bytes received.
    pub bytes: u64,
    /// The trailer, once finished.
    pub trailer: Option<KvTrailer>,
}

impl VecSink {
    /// A sink keeping the data.
    pub fn keeping() -> Self {
        Self {
            keep: true,
            ..Self::default()
        }
    }

    /// A sink that only counts bytes.
    pub fn counting() -> Self {
        Self::default()
    }
}

impl KvSink for VecSink {
    fn write_piece(&mut self, piece: PieceId, bytes: Vec<u8>) -> Result<(), SinkError> {
        self.bytes += bytes.len() as u64;
        if self.keep {
            self.pieces.push((piece, bytes));
        }
        Ok(())
    }

    fn finish(&mut self, trailer: KvTrailer) -> Result<(), SinkError> {
        self.trailer = Some(trailer);
        Ok(())
    }
}

/// Outcome of a received transfer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KvReceived {
    /// Payload bytes accepted.
    pub bytes: u64,
    /// From the first stream's hello to the last frame.
    pub elapsed: Duration,
    /// Time during which at least one piece was arriving (see [`BusyClock`]).
    pub busy: Duration,
}

impl KvReceived {
    /// Goodput while pieces were arriving, bytes per second (the link's rate, not diluted by
    /// the time the sender was computing the next piece).
    pub fn goodput(&self) -> f64 {
        self.bytes as f64 / self.busy.as_secs_f64().max(1e-9)
    }
}

/// Receiver-side limits (from the mesh config).
#[derive(Debug, Clone, Copy)]
pub(crate) struct ReceiverLimits {
    pub max_piece_bytes: u64,
    pub max_transfer_bytes: u64,
    pub max_trailer_bytes: usize,
    pub max_streams: u16,
    pub idle_timeout: Duration,
}

/// An incoming transfer, delivered as `MeshEvent::KvIncoming`. Inspect [`header`](Self::header)
/// (model hash, layout, size) and either [`receive`](Self::receive) into a sink or drop it to
/// refuse (the sender sees its streams reset).
pub struct KvIncoming {
    peer: PeerId,
    header: KvHeader,
    stream_count: u16,
    streams: mpsc::Receiver<(u16, Stream)>,
    limits: ReceiverLimits,
    estimator: Arc<Mutex<BandwidthEstimator>>,
    started: Instant,
}

impl std::fmt::Debug for KvIncoming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvIncoming")
            .field("peer", &self.peer)
            .field("header", &self.header)
            .field("stream_count", &self.stream_count)
            .finish()
    }
}

/// Aborts reader tasks when the receive ends early (error, timeout, caller dropped the future).
struct AbortOnDrop(Vec<JoinHandle<Result<Stream, KvError>>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

/// Aborts the stream-gathering task (and through it the readers it owns) on early exit.
struct GatherOnDrop(Option<JoinHandle<AbortOnDrop>>);

impl GatherOnDrop {
    fn take(mut self) -> Option<JoinHandle<AbortOnDrop>> {
        self.0.take()
    }
}

impl Drop for GatherOnDrop {
    fn drop(&mut self) {
        if let Some(t) = &self.0 {
            t.abort();
        }
    }
}

/// What a reader task hands to the coordinator: its stream index and a frame or its error.
type ReaderItem = (u16, Result<Frame, KvError>);

/// Receives the transfer's streams as the acceptor hands them over and starts each one's reader
/// at once. Returns the readers in stream-index order (the caller needs stream 0 for the ack).
/// A bad, duplicate or missing stream is reported to the coordinator.
async fn gather(
    mut streams: mpsc::Receiver<(u16, Stream)>,
    n: u16,
    tx: mpsc::Sender<ReaderItem>,
    idle: Duration,
    spawn_reader: impl Fn(Stream, u16) -> JoinHandle<Result<Stream, KvError>>,
) -> AbortOnDrop {
    let mut slots: Vec<Option<JoinHandle<Result<Stream, KvError>>>> =
        (0..n).map(|_| None).collect();
    let mut have = 0;
    let failure = loop {
        if have == usize::from(n) {
            break None;
        }
        let (i, s) = match tokio::time::timeout(idle, streams.recv()).await {
            Err(_) => break Some(KvError::Timeout("all streams of the transfer")),
            Ok(None) => {
                break Some(KvError::Truncated(
                    "sender gave up before opening all streams".into(),
                ))
            }
            Ok(Some(x)) => x,
        };
        match slots.get_mut(usize::from(i)) {
            Some(slot @ None) => *slot = Some(spawn_reader(s, i)),
            _ => {
                break Some(KvError::Protocol(format!(
                    "stream index {i} out of range or duplicate"
                )))
            }
        }
        have += 1;
    };
    if let Some(e) = failure {
        let _ = tx.send((u16::MAX, Err(e))).await;
    }
    AbortOnDrop(slots.into_iter().flatten().collect())
}

/// The union of the intervals during which pieces were arriving. Pieces of one stream arrive one
/// after the other; with several streams their intervals overlap and are merged. Bounded: past
/// [`BusyClock::MAX_SPANS`] spans the list is merged, and spans that still remain are joined with
/// their gaps (counting a gap as busy only makes the estimate lower, never higher).
#[derive(Debug, Default)]
pub struct BusyClock {
    spans: Vec<(Instant, Instant)>,
}

impl BusyClock {
    const MAX_SPANS: usize = 4096;

    /// Records that a piece arrived between `first` and `last`.
    pub fn add(&mut self, first: Instant, last: Instant) {
        self.spans.push((first, last.max(first)));
        if self.spans.len() >= Self::MAX_SPANS {
            self.merge();
            if self.spans.len() > Self::MAX_SPANS / 2 {
                let (a, b) = (self.spans[0].0, self.spans[self.spans.len() - 1].1);
                self.spans = vec![(a, b)];
            }
        }
    }

    fn merge(&mut self) {
        self.spans.sort_by_key(|s| s.0);
        let mut out: Vec<(Instant, Instant)> = Vec::with_capacity(self.spans.len());
        for &(a, b) in &self.spans {
            match out.last_mut() {
                Some(last) if a <= last.1 => last.1 = last.1.max(b),
                _ => out.push((a, b)),
            }
        }
        self.spans = out;
    }

    /// Total busy time.
    pub fn total(&mut self) -> Duration {
        self.merge();
        self.spans.iter().map(|(a, b)| *b - *a).sum()
    }
}

impl KvIncoming {
    /// The sending peer.
    pub fn peer(&self) -> PeerId {
        self.peer
    }

    /// The transfer's header.
    pub fn header(&self) -> &KvHeader {
        &self.header
    }

    /// Number of parallel streams the sender uses.
    pub fn stream_count(&self) -> u16 {
        self.stream_count
    }

    /// Bounds the wait for each next frame (and for the sender's remaining streams) to `idle`
    /// where that is shorter than the configured `kv_idle_timeout`. A receiver that knows how
    /// long the sender may honestly pause (e.g. a home that knows what its winner claimed) uses
    /// it to notice a stalled or partitioned sender long before the transfer's overall timeout.
    pub fn limit_idle(&mut self, idle: Duration) {
        self.limits.idle_timeout = self.limits.idle_timeout.min(idle);
    }

    /// The wait for each next frame (see [`limit_idle`](Self::limit_idle)).
    pub fn idle_timeout(&self) -> Duration {
        self.limits.idle_timeout
    }

    /// Receives the whole transfer into `sink`, then acks the sender. Never allocates more than
    /// the header announced and the configured maximum.
    pub async fn receive<S: KvSink>(mut self, sink: &mut S) -> Result<KvReceived, KvError> {
        let h = self.header.clone();
        if h.total_bytes > self.limits.max_transfer_bytes {
            return Err(KvError::Oversized {
                what: "announced transfer",
                len: h.total_bytes,
                max: self.limits.max_transfer_bytes,
            });
        }
        let max_piece = h.max_piece_bytes.min(self.limits.max_piece_bytes);
        let n = self.stream_count;
        let idle = self.limits.idle_timeout;

        // Readers share one channel of `n` slots to the coordinator, and each holds at most one
        // more frame while it waits: buffered data is bounded by ~2 pieces per stream.
        // Readers start as soon as their stream arrives, not once all have: a sender's early
        // pieces on stream 0 may use up a shared connection window (QUIC) before the other
        // streams' hellos get through, and waiting for those would deadlock the transfer.
        let remaining = Arc::new(AtomicU64::new(h.total_bytes));
        let (tx, mut rx) = mpsc::channel::<ReaderItem>(usize::from(n));
        let streams = std::mem::replace(&mut self.streams, mpsc::channel(1).1);
        let spawn_reader = {
            let (max_trailer, tx) = (self.limits.max_trailer_bytes, tx.clone());
            move |s: Stream, i: u16| {
                tokio::spawn(read_stream(
                    s,
                    i,
                    max_piece,
                    remaining.clone(),
                    max_trailer,
                    tx.clone(),
                ))
            }
        };
        let gather = GatherOnDrop(Some(tokio::spawn(gather(
            streams,
            n,
            tx,
            idle,
            spawn_reader,
        ))));

        let mut busy = BusyClock::default();
        let result = coordinate(&mut rx, &h, n, idle, sink, &mut busy).await;
        let elapsed = self.started.elapsed();
        let busy = busy.total();
        // Ack on stream 0 (success or failure), then let the other readers finish.
        let stream0 = match result {
            Ok(_) => match gather.take() {
                Some(g) => match g.await {
                    Ok(mut readers) => match readers.0.first_mut() {
                        Some(t) => tokio::time::timeout(idle, t)
                            .await
                            .ok()
                            .and_then(|r| r.ok())
                            .and_then(|r| r.ok()),
                        None => None,
                    },
                    Err(_) => None,
                },
                None => None,
            },
            Err(_) => None,
        };
        match (result, stream0) {
            (Ok(bytes), Some(mut s)) => {
                let ack = KvAck {
                    ok: true,
                    bytes,
                    error: None,
                    busy_us: busy.as_micros().min(u128::from(u64::MAX)) as u64,
                };
                wire::write_framed(&mut s, &ack, 4096).await?;
                s.flush().await?;
                let _ = s.close().await;
                if !busy.is_zero() {
                    if let Ok(mut est) = self.estimator.lock() {
                        est.record(self.peer, bytes, busy, Instant::now());
                    }
                }
                Ok(KvReceived {
                    bytes,
                    elapsed,
                    busy,
                })
            }
            (Ok(_), None) => Err(KvError::Protocol("stream 0 unavailable for the ack".into())),
            (Err(e), _) => Err(e),
        }
    }
}

/// Hands pieces to the sink as they arrive, until every stream ended; then checks that exactly
/// the announced bytes came and hands over the trailer.
async fn coordinate<S: KvSink>(
    rx: &mut mpsc::Receiver<ReaderItem>,
    h: &KvHeader,
    n: u16,
    idle: Duration,
    sink: &mut S,
    busy: &mut BusyClock,
) -> Result<u64, KvError> {
    let mut bytes = 0u64;
    let mut ended = 0u16;
    let mut trailer = None;
    while ended < n {
        let (stream, item) = match tokio::time::timeout(idle, rx.recv()).await {
            Err(_) => return Err(KvError::Timeout("next KV frame")),
            Ok(None) => return Err(KvError::Truncated("stream readers ended".into())),
            Ok(Some(x)) => x,
        };
        match item? {
            Frame::Piece {
                piece,
                bytes: data,
                first_at,
                last_at,
            } => {
                if piece.layer >= h.layers || piece.start >= piece.end || piece.end > h.tokens {
                    return Err(KvError::OutOfRange {
                        piece,
                        layers: h.layers,
                        tokens: h.tokens,
                    });
                }
                busy.add(first_at, last_at);
                bytes += data.len() as u64;
                sink.write_piece(piece, data)
                    .map_err(|e| KvError::Sink(e.0))?;
            }
            Frame::End(t) => {
                ended += 1;
                if stream == 0 {
                    trailer = t;
                }
            }
        }
    }
    if bytes != h.total_bytes {
        return Err(KvError::Truncated(format!(
            "{bytes} of {} announced bytes",
            h.total_bytes
        )));
    }
    let trailer = trailer.ok_or_else(|| KvError::Truncated("no trailer".into()))?;
    sink.finish(trailer).map_err(|e| KvError::Sink(e.0))?;
    Ok(bytes)
}

/// Reads stream `index`'s frames until its `End`, claiming each piece's bytes from the
/// transfer's announced total. Generic over the byte stream so that the fuzz tests can drive the
/// reader and [`coordinate`] with in-memory frame sequences.
async fn read_stream<S: futures::AsyncRead + Unpin>(
    mut stream: S,
    index: u16,
    max_piece: u64,
    remaining: Arc<AtomicU64>,
    max_trailer: usize,
    tx: mpsc::Sender<ReaderItem>,
) -> Result<S, KvError> {
    loop {
        let left = remaining.load(Ordering::Acquire);
        let frame = codec::read_frame(&mut stream, max_piece, left, max_trailer)
            .await
            .and_then(|frame| {
                if let Frame::Piece { bytes, .. } = &frame {
                    let len = bytes.len() as u64;
                    // Readers share the announced total; claim this frame's share atomically.
                    remaining
                        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |r| r.checked_sub(len))
                        .map_err(|r| KvError::Oversized {
                            what: "transfer (announced total)",
                            len,
                            max: r,
                        })?;
                }
                Ok(frame)
            });
        let frame = match frame {
            Ok(f) => f,
            Err(e) => {
                let msg = e.to_string();
                let _ = tx.send((index, Err(e))).await;
                return Err(KvError::Protocol(msg));
            }
        };
        let end = matches!(frame, Frame::End(_));
        if tx.send((index, Ok(frame))).await.is_err() {
            return Err(KvError::Protocol("coordinator gone".into()));
        }
        if end {
            return Ok(stream);
        }
    }
}

/// Accepts inbound KV streams, groups them by (peer, transfer id) and emits one
/// [`KvIncoming`] per transfer via `emit` (or receives probes internally).
pub(crate) struct Acceptor {
    pub limits: ReceiverLimits,
    pub estimator: Arc<Mutex<BandwidthEstimator>>,
    pub stats: Arc<MeshStats>,
    pub allowlist: Option<Arc<std::collections::HashSet<PeerId>>>,
    pub max_pending_transfers: usize,
    pub probe_max_bytes: u64,
    /// Transfers this node awaits; any other (non-probe) transfer is refused.
    pub expected: ExpectedTransfers,
    /// Hellos one peer may have being read at once.
    pub max_hellos_per_peer: usize,
    /// One probe per peer per this period.
    pub min_probe_interval: Duration,
    /// Take transfers nobody awaits (benches, tools).
    pub accept_unexpected: bool,
}

/// Probes one peer may have being received at once.
const PROBES_PER_PEER: usize = 1;

struct Pending {
    tx: mpsc::Sender<(u16, Stream)>,
    hello: StreamHello,
    opened: usize,
    since: Instant,
}

impl Acceptor {
    /// An acceptor with the bounds `cfg` sets, awaiting the transfers in `expected`.
    pub fn new(
        cfg: &crate::config::MeshConfig,
        estimator: Arc<Mutex<BandwidthEstimator>>,
        stats: Arc<MeshStats>,
        allowlist: Option<Arc<std::collections::HashSet<PeerId>>>,
        expected: ExpectedTransfers,
    ) -> Self {
        let l = &cfg.limits;
        Self {
            limits: ReceiverLimits {
                max_piece_bytes: l.max_piece_bytes,
                max_transfer_bytes: l.max_transfer_bytes,
                max_trailer_bytes: l.max_trailer_bytes,
                max_streams: l.max_streams_per_transfer.max(1),
                idle_timeout: l.kv_idle_timeout,
            },
            estimator,
            stats,
            allowlist,
            max_pending_transfers: l.max_pending_transfers,
            probe_max_bytes: cfg.bandwidth.probe_bytes.max(1),
            expected,
            max_hellos_per_peer: l.max_kv_hellos_per_peer.max(1),
            min_probe_interval: l.min_probe_interval,
            accept_unexpected: l.accept_unexpected_kv,
        }
    }

    /// Runs until `incoming` ends or `cancel` fires. `emit` gets each new transfer; if it returns
    /// `false` (event queue full) the transfer is dropped and counted.
    pub async fn run(
        self,
        mut incoming: libp2p_stream::IncomingStreams,
        cancel: tokio_util::sync::CancellationToken,
        emit: impl Fn(KvIncoming) -> bool + Send,
    ) {
        let hello_slots = Arc::new(Semaphore::new(self.max_pending_transfers.max(1) * 4));
        let peer_hellos = PeerSlots::new(self.max_hellos_per_peer);
        let peer_probes = PeerSlots::new(PROBES_PER_PEER);
        let mut probe_rate = PeerRate::new(self.min_probe_interval);
        let (hello_tx, mut hello_rx) = mpsc::channel::<(PeerId, StreamHello, Stream)>(16);
        let mut pending: HashMap<(PeerId, u64), Pending> = HashMap::new();
        let refuse = |why: KvRefusal, peer: &PeerId| {
            tracing::debug!(%peer, reason = why.label(), "KV stream refused");
            why.count(&self.stats);
        };
        loop {
            tokio::select! {
                biased;
                _ = cancel.cancelled() => return,
                s = incoming.next() => {
                    let Some((peer, stream)) = s else { return };
                    if self.allowlist.as_ref().is_some_and(|a| !a.contains(&peer)) {
                        refuse(KvRefusal::NotAllowed, &peer);
                        continue; // dropping the stream resets it
                    }
                    // A winner with an outstanding award reads its hellos outside the shared
                    // slots (its per-peer quota still bounds it), so peers nobody awaits (probe
                    // senders, or a flood of made-up identities) cannot crowd it out.
                    let permit = if self.expected.expects_from(&peer) {
                        None
                    } else {
                        let Ok(permit) = hello_slots.clone().try_acquire_owned() else {
                            refuse(KvRefusal::HelloSlots, &peer);
                            continue;
                        };
                        Some(permit)
                    };
                    let Some(peer_slot) = peer_hellos.try_take(peer) else {
                        refuse(KvRefusal::HelloQuota, &peer);
                        continue;
                    };
                    let tx = hello_tx.clone();
                    let (idle, max_streams, stats) = (self.limits.idle_timeout, self.limits.max_streams, self.stats.clone());
                    tokio::spawn(async move {
                        let mut stream = stream;
                        match tokio::time::timeout(idle, codec::read_hello(&mut stream, max_streams)).await {
                            Ok(Ok(hello)) => { let _ = tx.send((peer, hello, stream)).await; }
                            _ => KvRefusal::BadHello.count(&stats),
                        }
                        drop((permit, peer_slot));
                    });
                }
                Some((peer, hello, stream)) = hello_rx.recv() => {
                    let now = Instant::now();
                    pending.retain(|_, p| now.saturating_duration_since(p.since) < self.limits.idle_timeout && !p.tx.is_closed());
                    let key = (peer, hello.transfer_id);
                    if let Some(p) = pending.get_mut(&key) {
                        if p.hello.header != hello.header || p.hello.stream_count != hello.stream_count {
                            refuse(KvRefusal::BadHello, &peer);
                            continue;
                        }
                        let _ = p.tx.try_send((hello.stream_index, stream));
                        p.opened += 1;
                        if p.opened >= usize::from(p.hello.stream_count) {
                            pending.remove(&key);
                        }
                        continue;
                    }
                    if pending.len() >= self.max_pending_transfers {
                        refuse(KvRefusal::PendingTransfers, &peer);
                        continue;
                    }
                    // Quotas before anything is allocated for the transfer.
                    let probe_slot = if hello.header.probe {
                        if hello.header.total_bytes > self.probe_max_bytes {
                            refuse(KvRefusal::ProbeTooLarge, &peer);
                            continue;
                        }
                        if !probe_rate.admit(peer, now) {
                            refuse(KvRefusal::ProbeQuota, &peer);
                            continue;
                        }
                        let Some(slot) = peer_probes.try_take(peer) else {
                            refuse(KvRefusal::ProbeQuota, &peer);
                            continue;
                        };
                        Some(slot)
                    } else {
                        if !self.accept_unexpected && !self.expected.is_expected(&peer, hello.header.request_id) {
                            refuse(KvRefusal::Unexpected, &peer);
                            continue;
                        }
                        None
                    };
                    let count = hello.stream_count;
                    let (tx, rx) = mpsc::channel(usize::from(count));
                    let _ = tx.try_send((hello.stream_index, stream));
                    let incoming = KvIncoming {
                        peer,
                        header: hello.header.clone(),
                        stream_count: count,
                        streams: rx,
                        limits: self.limits,
                        estimator: self.estimator.clone(),
                        started: now,
                    };
                    if count > 1 {
                        pending.insert(key, Pending { tx, hello: hello.clone(), opened: 1, since: now });
                    }
                    if let Some(slot) = probe_slot {
                        tokio::spawn(async move {
                            let mut sink = VecSink::counting();
                            if let Err(e) = incoming.receive(&mut sink).await {
                                tracing::debug!(%peer, error = %e, "probe failed");
                            }
                            drop(slot);
                        });
                    } else if !emit(incoming) {
                        self.stats.dropped_events.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod fuzz;
