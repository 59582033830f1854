//! Sending side of a KV transfer: layers go in as they are produced; `send_layer` blocks (async)
//! when the stream carrying that layer is still busy, so a fast producer cannot buffer more than
//! about two layers per stream.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::AsyncWriteExt;
use libp2p::{PeerId, Stream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::codec::{self, KvError};
use super::protocol::{stream_for_layer, KvAck, KvHeader, KvTrailer, StreamHello, KV_PROTOCOL};
use crate::bandwidth::BandwidthEstimator;
use crate::wire;

/// Result of a delivered transfer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KvSent {
    /// Payload bytes delivered (acknowledged by the receiver).
    pub bytes: u64,
    /// From opening the streams to the receiver's ack.
    pub elapsed: Duration,
    /// Streams used.
    pub streams: u16,
}

impl KvSent {
    /// End-to-end goodput in bytes per second.
    pub fn goodput(&self) -> f64 {
        self.bytes as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

enum WriterMsg {
    Layer(u32, Vec<u8>),
    End(Option<KvTrailer>),
}

/// Settings the sender needs from the mesh config.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SenderLimits {
    pub max_trailer_bytes: usize,
    pub idle_timeout: Duration,
    /// Emulated link rate towards this peer in bytes/s (tests and benchmarks; `None` = no pacing).
    pub emulated_rate: Option<f64>,
}

/// An open KV transfer. Call [`send_layer`](Self::send_layer) for layers `0..header.layers` in
/// order, then [`finish`](Self::finish). Dropping it aborts the transfer (the receiver sees a
/// truncated stream and rejects it).
pub struct KvSender {
    peer: PeerId,
    header: KvHeader,
    stream_count: u16,
    writers: Vec<mpsc::Sender<WriterMsg>>,
    tasks: Vec<JoinHandle<Result<Option<Stream>, KvError>>>,
    next_layer: u32,
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
            .field("next_layer", &self.next_layer)
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
        let opens = (0..stream_count).map(|_| {
            let mut c = control.clone();
            async move { c.open_stream(peer, KV_PROTOCOL).await }
        });
        let opened = tokio::time::timeout(limits.idle_timeout, futures::future::join_all(opens))
            .await
            .map_err(|_| KvError::Timeout("streams to open"))?;
        let mut writers = Vec::with_capacity(usize::from(stream_count));
        let mut tasks = Vec::with_capacity(usize::from(stream_count));
        for (i, stream) in opened.into_iter().enumerate() {
            let stream = stream.map_err(|e| KvError::Open(e.to_string()))?;
            let hello = StreamHello {
                transfer_id,
                stream_index: i as u16,
                stream_count,
                header: header.clone(),
            };
            // Capacity 1: with one layer being written, at most two layers wait per stream.
            let (tx, rx) = mpsc::channel(1);
            writers.push(tx);
            tasks.push(tokio::spawn(write_stream(stream, hello, rx, limits)));
        }
        Ok(Self {
            peer,
            header,
            stream_count,
            writers,
            tasks,
            next_layer: 0,
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

    /// Queues layer `layer` (must be the next one) for sending; waits while its stream is busy.
    pub async fn send_layer(&mut self, layer: u32, bytes: Vec<u8>) -> Result<(), KvError> {
        if self.failed {
            return Err(KvError::Usage("transfer already failed".into()));
        }
        if layer != self.next_layer || layer >= self.header.layers {
            return Err(KvError::Usage(format!(
                "layer {layer} sent, expected {} of {}",
                self.next_layer, self.header.layers
            )));
        }
        let len = bytes.len() as u64;
        if len > self.header.max_layer_bytes || self.bytes + len > self.header.total_bytes {
            return Err(KvError::Usage(format!(
                "layer {layer} of {len} bytes exceeds the header's bounds"
            )));
        }
        let s = usize::from(stream_for_layer(layer, self.stream_count));
        if self.writers[s]
            .send(WriterMsg::Layer(layer, bytes))
            .await
            .is_err()
        {
            return Err(self.writer_error(s).await);
        }
        self.next_layer += 1;
        self.bytes += len;
        self.pace().await;
        Ok(())
    }

    /// With an emulated link rate, waits until the bytes sent so far could have crossed it.
    async fn pace(&self) {
        if let Some(rate) = self.limits.emulated_rate.filter(|r| *r > 0.0) {
            let due = self.started + Duration::from_secs_f64(self.bytes as f64 / rate);
            tokio::time::sleep_until(due.into()).await;
        }
    }

    /// Ends every stream (stream 0 carries `trailer`), then waits for the receiver's ack.
    pub async fn finish(mut self, trailer: KvTrailer) -> Result<KvSent, KvError> {
        if self.failed {
            return Err(KvError::Usage("transfer already failed".into()));
        }
        if self.next_layer != self.header.layers {
            return Err(KvError::Usage(format!(
                "finish after {} of {} layers",
                self.next_layer, self.header.layers
            )));
        }
        let mut trailer = Some(trailer);
        for s in 0..self.writers.len() {
            let msg = WriterMsg::End(if s == 0 { trailer.take() } else { None });
            if self.writers[s].send(msg).await.is_err() {
                return Err(self.writer_error(s).await);
            }
        }
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
        let elapsed = self.started.elapsed();
        if let Ok(mut est) = self.estimator.lock() {
            est.record(self.peer, self.bytes, elapsed, Instant::now());
        }
        Ok(KvSent {
            bytes: self.bytes,
            elapsed,
            streams: self.stream_count,
        })
    }

    /// The error that stopped writer `s` (its channel closed because the task ended).
    async fn writer_error(&mut self, s: usize) -> KvError {
        self.failed = true;
        let t = &mut self.tasks[s];
        match t.await {
            Ok(Err(e)) => e,
            Ok(Ok(_)) => KvError::Protocol("writer ended early".into()),
            Err(e) => KvError::Protocol(format!("writer task: {e}")),
        }
    }
}

/// Owns one stream: hello, then frames in the order received, then `End`. Returns stream 0 so the
/// sender can read the ack; other streams are closed here.
async fn write_stream(
    mut stream: Stream,
    hello: StreamHello,
    mut rx: mpsc::Receiver<WriterMsg>,
    limits: SenderLimits,
) -> Result<Option<Stream>, KvError> {
    let idle = limits.idle_timeout;
    bounded(idle, codec::write_hello(&mut stream, &hello)).await?;
    while let Some(msg) = rx.recv().await {
        match msg {
            WriterMsg::Layer(layer, bytes) => {
                bounded(idle, codec::write_layer_header(&mut stream, layer, &bytes)).await?;
                for piece in bytes.chunks(WRITE_PIECE) {
                    bounded(idle, async {
                        stream.write_all(piece).await.map_err(KvError::from)
                    })
                    .await?;
                }
            }
            WriterMsg::End(trailer) => {
                let end = codec::write_end(&mut stream, trailer.as_ref(), limits.max_trailer_bytes);
                bounded(idle, end).await?;
                if hello.stream_index == 0 {
                    return Ok(Some(stream));
                }
                bounded(idle, async { stream.close().await.map_err(KvError::from) }).await?;
                return Ok(None);
            }
        }
    }
    Err(KvError::Usage("transfer dropped before finish".into()))
}

/// Largest piece of a layer written under one idle timeout: a receiver that stops reading
/// fails the transfer after `kv_idle_timeout` without progress, instead of holding the sender
/// (and the prefill feeding it) forever, while a slow but moving link is never cut.
const WRITE_PIECE: usize = 1 << 20;

/// `fut`, failed with [`KvError::Timeout`] when it takes longer than `idle`.
async fn bounded<T>(
    idle: Duration,
    fut: impl std::future::Future<Output = Result<T, KvError>>,
) -> Result<T, KvError> {
    tokio::time::timeout(idle, fut)
        .await
        .map_err(|_| KvError::Timeout("KV write (receiver not reading)"))?
}
