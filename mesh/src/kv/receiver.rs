//! Receiving side of a KV transfer: streams are grouped by transfer, read in parallel, and
//! layers are handed to a caller-supplied [`KvSink`] strictly in order as they arrive.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{AsyncWriteExt, StreamExt};
use libp2p::{PeerId, Stream};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinHandle;

use super::codec::{self, Frame, KvError};
use super::protocol::{KvAck, KvHeader, KvTrailer, StreamHello};
use crate::bandwidth::BandwidthEstimator;
use crate::stats::MeshStats;
use crate::wire;

/// Error a sink returns to refuse data (e.g. no free KV blocks, layout mismatch).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct SinkError(pub String);

/// Where received layers go, e.g. straight into leased KV blocks. Called in layer order.
pub trait KvSink: Send {
    /// Takes layer `layer` (already checksum-verified).
    fn write_layer(&mut self, layer: u32, bytes: Vec<u8>) -> Result<(), SinkError>;
    /// Called once after the last layer with the transfer's trailer.
    fn finish(&mut self, trailer: KvTrailer) -> Result<(), SinkError>;
}

/// A sink that keeps everything in memory (tests, small transfers) or only counts (`keep = false`).
#[derive(Debug, Default)]
pub struct VecSink {
    /// Whether to keep the bytes; otherwise only `bytes` is counted.
    pub keep: bool,
    /// Layers received, in order (if `keep`).
    pub layers: Vec<Vec<u8>>,
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
    fn write_layer(&mut self, _layer: u32, bytes: Vec<u8>) -> Result<(), SinkError> {
        self.bytes += bytes.len() as u64;
        if self.keep {
            self.layers.push(bytes);
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
}

/// Receiver-side limits (from the mesh config).
#[derive(Debug, Clone, Copy)]
pub(crate) struct ReceiverLimits {
    pub max_layer_bytes: u64,
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

/// Receives the transfer's streams as the acceptor hands them over and starts each one's reader
/// at once. Returns the readers in stream-index order (the caller needs stream 0 for the ack).
/// A bad, duplicate or missing stream is reported to every reader slot not yet taken, which is
/// where the coordinator will be waiting.
async fn gather(
    mut streams: mpsc::Receiver<(u16, Stream)>,
    mut txs: Vec<Option<mpsc::Sender<ReaderItem>>>,
    idle: Duration,
    spawn_reader: impl Fn(Stream, u16, mpsc::Sender<ReaderItem>) -> JoinHandle<Result<Stream, KvError>>,
) -> AbortOnDrop {
    let n = txs.len();
    let mut slots: Vec<Option<JoinHandle<Result<Stream, KvError>>>> =
        (0..n).map(|_| None).collect();
    let mut have = 0;
    let failure = loop {
        if have == n {
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
        let Some(tx) = txs.get_mut(usize::from(i)).and_then(Option::take) else {
            break Some(KvError::Protocol(format!(
                "stream index {i} out of range or duplicate"
            )));
        };
        slots[usize::from(i)] = Some(spawn_reader(s, i, tx));
        have += 1;
    };
    let readers = AbortOnDrop(slots.into_iter().flatten().collect());
    if let Some(e) = failure {
        let msg = e.to_string();
        let mut first = Some(e);
        for tx in txs.into_iter().flatten() {
            let e = first
                .take()
                .unwrap_or_else(|| KvError::Protocol(msg.clone()));
            let _ = tx.send(Err(e)).await;
        }
    }
    readers
}

/// What a reader task hands to the in-order coordinator.
type ReaderItem = Result<Frame, KvError>;

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

    /// Receives the whole transfer into `sink`, layer by layer in order, then acks the sender.
    /// Never allocates more than the header announced and the configured maximum.
    pub async fn receive<S: KvSink>(mut self, sink: &mut S) -> Result<KvReceived, KvError> {
        let h = self.header.clone();
        if h.total_bytes > self.limits.max_transfer_bytes {
            return Err(KvError::Oversized {
                what: "announced transfer",
                len: h.total_bytes,
                max: self.limits.max_transfer_bytes,
            });
        }
        let max_layer = h.max_layer_bytes.min(self.limits.max_layer_bytes);
        let n = self.stream_count;
        let idle = self.limits.idle_timeout;

        // One reader per stream, each with a one-slot channel: a reader can be at most one layer
        // ahead of the coordinator, so buffered data is bounded by ~2 layers per stream.
        // Readers start as soon as their stream arrives, not once all have: a sender's early
        // layers on stream 0 may use up a shared connection window (QUIC) before the other
        // streams' hellos get through, and waiting for those would deadlock the transfer.
        let remaining = Arc::new(AtomicU64::new(h.total_bytes));
        let mut rxs = Vec::with_capacity(usize::from(n));
        let mut txs = Vec::with_capacity(usize::from(n));
        for _ in 0..n {
            let (tx, rx) = mpsc::channel::<ReaderItem>(1);
            txs.push(Some(tx));
            rxs.push(rx);
        }
        let streams = std::mem::replace(&mut self.streams, mpsc::channel(1).1);
        let spawn_reader = {
            let (layers, max_trailer) = (h.layers, self.limits.max_trailer_bytes);
            move |s: Stream, i: u16, tx: mpsc::Sender<ReaderItem>| {
                tokio::spawn(read_stream(
                    s,
                    i,
                    n,
                    layers,
                    max_layer,
                    remaining.clone(),
                    max_trailer,
                    tx,
                ))
            }
        };
        let gather = GatherOnDrop(Some(tokio::spawn(gather(streams, txs, idle, spawn_reader))));

        let result = coordinate(&mut rxs, &h, n, idle, sink).await;
        let elapsed = self.started.elapsed();
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
                };
                wire::write_framed(&mut s, &ack, 4096).await?;
                s.flush().await?;
                let _ = s.close().await;
                if let Ok(mut est) = self.estimator.lock() {
                    est.record(self.peer, bytes, elapsed, Instant::now());
                }
                Ok(KvReceived { bytes, elapsed })
            }
            (Ok(_), None) => Err(KvError::Protocol("stream 0 unavailable for the ack".into())),
            (Err(e), _) => Err(e),
        }
    }
}

/// Pulls layers in order (layer `L` from stream `L % n`) into the sink; then the `End` frames.
async fn coordinate<S: KvSink>(
    rxs: &mut [mpsc::Receiver<ReaderItem>],
    h: &KvHeader,
    n: u16,
    idle: Duration,
    sink: &mut S,
) -> Result<u64, KvError> {
    let mut bytes = 0u64;
    for layer in 0..h.layers {
        let s = usize::from(super::protocol::stream_for_layer(layer, n));
        match next_item(&mut rxs[s], idle).await? {
            Frame::Layer {
                layer: got,
                bytes: data,
            } if got == layer => {
                bytes += data.len() as u64;
                sink.write_layer(layer, data)
                    .map_err(|e| KvError::Sink(e.0))?;
            }
            Frame::Layer { layer: got, .. } => {
                return Err(KvError::OutOfOrder {
                    expected: layer,
                    got,
                })
            }
            Frame::End(_) => {
                return Err(KvError::Truncated(format!(
                    "stream {s} ended before layer {layer}"
                )))
            }
        }
    }
    let mut trailer = None;
    for (i, rx) in rxs.iter_mut().enumerate() {
        match next_item(rx, idle).await? {
            Frame::End(t) if i == 0 => trailer = t,
            Frame::End(_) => {}
            Frame::Layer { layer, .. } => {
                return Err(KvError::Protocol(format!(
                    "layer {layer} beyond the announced {}",
                    h.layers
                )))
            }
        }
    }
    let trailer = trailer.ok_or_else(|| KvError::Truncated("no trailer".into()))?;
    sink.finish(trailer).map_err(|e| KvError::Sink(e.0))?;
    Ok(bytes)
}

/// Next item from one reader, bounded by the idle timeout.
async fn next_item(rx: &mut mpsc::Receiver<ReaderItem>, idle: Duration) -> Result<Frame, KvError> {
    match tokio::time::timeout(idle, rx.recv()).await {
        Err(_) => Err(KvError::Timeout("next KV frame")),
        Ok(None) => Err(KvError::Truncated("stream reader ended".into())),
        Ok(Some(r)) => r,
    }
}

/// Reads stream `index`'s frames, checking each arrives where and when the layout says it must.
#[allow(clippy::too_many_arguments)]
async fn read_stream(
    mut stream: Stream,
    index: u16,
    n: u16,
    layers: u32,
    max_layer: u64,
    remaining: Arc<AtomicU64>,
    max_trailer: usize,
    tx: mpsc::Sender<ReaderItem>,
) -> Result<Stream, KvError> {
    let mut expected = u32::from(index);
    let step = u32::from(n);
    loop {
        let left = remaining.load(Ordering::Acquire);
        let frame = match codec::read_frame(&mut stream, max_layer, left, max_trailer).await {
            Ok(f) => f,
            Err(e) => {
                let msg = e.to_string();
                let _ = tx.send(Err(e)).await;
                return Err(KvError::Protocol(msg));
            }
        };
        let verdict = match &frame {
            Frame::Layer { layer, .. } if expected >= layers => Err(KvError::Protocol(format!(
                "layer {layer} beyond the announced {layers}"
            ))),
            Frame::Layer { layer, .. } if *layer != expected => Err(KvError::OutOfOrder {
                expected,
                got: *layer,
            }),
            Frame::Layer { bytes, .. } => {
                let len = bytes.len() as u64;
                // Readers share the announced total; claim this frame's share atomically.
                match remaining
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |r| r.checked_sub(len))
                {
                    Ok(_) => Ok(()),
                    Err(r) => Err(KvError::Oversized {
                        what: "transfer (announced total)",
                        len,
                        max: r,
                    }),
                }
            }
            Frame::End(_) if expected < layers => Err(KvError::Truncated(format!(
                "stream {index} ended before layer {expected}"
            ))),
            Frame::End(_) => Ok(()),
        };
        if let Err(e) = verdict {
            let msg = e.to_string();
            let _ = tx.send(Err(e)).await;
            return Err(KvError::Protocol(msg));
        }
        let end = matches!(frame, Frame::End(_));
        if tx.send(Ok(frame)).await.is_err() {
            return Err(KvError::Protocol("coordinator gone".into()));
        }
        if end {
            return Ok(stream);
        }
        expected = expected.saturating_add(step);
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
}

struct Pending {
    tx: mpsc::Sender<(u16, Stream)>,
    hello: StreamHello,
    opened: usize,
    since: Instant,
}

impl Acceptor {
    /// Runs until `incoming` ends or `cancel` fires. `emit` gets each new transfer; if it returns
    /// `false` (event queue full) the transfer is dropped and counted.
    pub async fn run(
        self,
        mut incoming: libp2p_stream::IncomingStreams,
        cancel: tokio_util::sync::CancellationToken,
        emit: impl Fn(KvIncoming) -> bool + Send,
    ) {
        let hello_slots = Arc::new(Semaphore::new(self.max_pending_transfers.max(1) * 4));
        let (hello_tx, mut hello_rx) = mpsc::channel::<(PeerId, StreamHello, Stream)>(16);
        let mut pending: HashMap<(PeerId, u64), Pending> = HashMap::new();
        loop {
            tokio::select! {
                biased;
                _ = cancel.cancelled() => return,
                s = incoming.next() => {
                    let Some((peer, stream)) = s else { return };
                    if self.allowlist.as_ref().is_some_and(|a| !a.contains(&peer)) {
                        self.stats.refused_kv.fetch_add(1, Ordering::Relaxed);
                        continue; // dropping the stream resets it
                    }
                    let Ok(permit) = hello_slots.clone().try_acquire_owned() else {
                        self.stats.refused_kv.fetch_add(1, Ordering::Relaxed);
                        continue;
                    };
                    let tx = hello_tx.clone();
                    let (idle, max_streams, stats) = (self.limits.idle_timeout, self.limits.max_streams, self.stats.clone());
                    tokio::spawn(async move {
                        let mut stream = stream;
                        match tokio::time::timeout(idle, codec::read_hello(&mut stream, max_streams)).await {
                            Ok(Ok(hello)) => { let _ = tx.send((peer, hello, stream)).await; }
                            _ => { stats.refused_kv.fetch_add(1, Ordering::Relaxed); }
                        }
                        drop(permit);
                    });
                }
                Some((peer, hello, stream)) = hello_rx.recv() => {
                    let now = Instant::now();
                    pending.retain(|_, p| now.saturating_duration_since(p.since) < self.limits.idle_timeout && !p.tx.is_closed());
                    let key = (peer, hello.transfer_id);
                    if let Some(p) = pending.get_mut(&key) {
                        if p.hello.header != hello.header || p.hello.stream_count != hello.stream_count {
                            self.stats.refused_kv.fetch_add(1, Ordering::Relaxed);
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
                        self.stats.refused_kv.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
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
                    if hello.header.probe {
                        if hello.header.total_bytes > self.probe_max_bytes {
                            self.stats.refused_kv.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                        tokio::spawn(async move {
                            let mut sink = VecSink::counting();
                            if let Err(e) = incoming.receive(&mut sink).await {
                                tracing::debug!(%peer, error = %e, "probe failed");
                            }
                        });
                    } else if !emit(incoming) {
                        self.stats.dropped_events.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
    }
}
