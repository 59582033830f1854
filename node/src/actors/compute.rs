//! The compute thread: the one place the [`Engine`] lives.
//!
//! The engine is not `Sync` and its kernels block (CPU work, `device.poll` on wgpu), so it runs on
//! a dedicated OS thread, never on an actix/tokio worker. Actors hand it [`Job`]s through a bounded
//! channel; it interleaves them with **continuous batching**: between two decode steps of all live
//! sequences it takes at most one prefill-type job, so a long prompt delays running decodes by one
//! prefill at a time, never starves them.
//!
//! Each request's tokens go out as [`GenerateEvent`]s on its own bounded channel. The thread never
//! waits on a client: a full channel (client not reading) or a closed one (client gone) cancels
//! that request and frees its KV at once.
//!
//! KV prefilled by a peer arrives through an [`ImportTicket`]: blocks are leased when the offload
//! starts, each piece is written into them by position as soon as it is received (these small
//! copies jump the queue: they never wait behind a prefill), and [`Job::FinishImport`] turns the
//! lease into a decoding sequence once every piece and the trailer are in.
//!
//! A prefill served for a peer hands its KV out piece by piece while it computes
//! ([`Job::ServePrefill`]); the compute thread never waits on the network for it.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc as std_mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use prfaas_mesh::kv::PieceId;
use prfaas_mesh::policy::{DecodeEstimator, PrefillEstimator, QuoteRate};
use tokio::sync::{mpsc, oneshot};

use crate::engine::loader::{TextCodec, Utf8Stream};
use crate::engine::{
    Engine, EngineError, FinishReason, KvPiece, KvSink, Sampler, SamplingParams, SeqId, SinkError,
    TokenLogprobs, VerifyConfig,
};
use crate::kv::prefix::block_hashes;
use crate::kv::wire::KvWire;
use crate::kv::{KvStats, LeaseId};
use crate::metrics::{Metrics, RequestLabels};
use crate::service::{GenerateEvent, PrefillRoute, Timings, TokenLogprob, TopLogprob, Usage};

/// Decrements the node's in-flight count when the request ends, however it ends.
#[derive(Debug)]
pub struct InflightGuard(Arc<AtomicUsize>, Arc<Metrics>);

impl InflightGuard {
    /// Counts one more request in flight.
    pub fn new(count: Arc<AtomicUsize>, metrics: Arc<Metrics>) -> Self {
        count.fetch_add(1, Ordering::AcqRel);
        metrics.inflight.inc();
        Self(count, metrics)
    }
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
        self.1.inflight.dec();
    }
}

/// A request that ends in local decode.
#[derive(Debug)]
pub struct DecodeJob {
    /// Node-unique id: the key of this request's auction and KV transfer in the mesh.
    pub request_id: u64,
    /// The request's span on this (home) node: `request_id` (the client's), `mesh_request`
    /// (carried in the auction call, award and KV header, so the winner's `serve_prefill` span
    /// names it too), and `route` / `peer` once the prompt is prefilled.
    pub span: tracing::Span,
    /// The whole prompt.
    pub tokens: Vec<u32>,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    pub events: mpsc::Sender<GenerateEvent>,
    /// How the prompt was (or will be) prefilled; for `Started` and metrics.
    pub route: PrefillRoute,
    pub admitted: Instant,
    pub guard: InflightGuard,
}

/// A prefill served for a peer (the auction winner's side).
#[derive(Debug)]
pub struct ServedPrefill {
    /// Last-position logits (the trailer).
    pub logits: Vec<f32>,
    /// Prompt tokens that came from this node's prefix cache.
    pub cached_tokens: usize,
    pub elapsed: Duration,
}

/// Work for the compute thread.
#[derive(Debug)]
pub enum Job {
    /// Prefill locally, then decode.
    Generate(Box<DecodeJob>),
    /// Decode from KV a peer prefilled, all of whose pieces went through `ticket`; `logits` are
    /// the prompt's last-position logits (the transfer's trailer). If the import failed, the
    /// prompt is prefilled here instead (the client only sees extra latency).
    FinishImport {
        job: Box<DecodeJob>,
        ticket: ImportTicket,
        logits: Vec<f32>,
    },
    /// Prefill `tokens` for a peer: each piece of KV goes to `pieces`, encoded for the wire, as
    /// soon as it is computed; the sequence is released afterwards (its prefix stays cached).
    /// `pieces` is unbounded so that the compute thread never waits on the network; what it
    /// can hold is bounded by this one request's KV, and closing it (the transfer failed or was
    /// cut) stops the prefill early.
    ServePrefill {
        tokens: Vec<u32>,
        /// How the pieces are encoded (the home's choice, from the award).
        wire: KvWire,
        pieces: mpsc::UnboundedSender<(PieceId, Vec<u8>)>,
        done: oneshot::Sender<Result<ServedPrefill, String>>,
    },
}

impl Job {
    fn prefill_tokens(&self) -> usize {
        match self {
            Job::Generate(j) => j.tokens.len(),
            Job::FinishImport { .. } => 0,
            Job::ServePrefill { tokens, .. } => tokens.len(),
        }
    }
}

/// What the rest of the node may read without waiting for the compute thread (which can be
/// busy for seconds in a long prefill): refreshed after every job and decode step.
#[derive(Debug, Default, Clone)]
pub struct EngineView {
    pub kv: KvStats,
    /// Short (64-bit) hashes of every block in the prefix cache, for bids and adverts.
    pub cached_blocks: HashSet<u64>,
    /// Sequences decoding now.
    pub live: usize,
    /// Prefill throughput estimate (EWMA of measured prefills, see
    /// [`EngineView::prefill_tokens_per_s`]), with where it started (exported for replays).
    pub prefill_quote: QuoteRate,
    /// Measured prefill time vs uncached length (start-up calibration, then served prefills).
    pub prefill_profile: PrefillEstimator,
    /// Measured time to turn an imported prompt's KV into a decoding sequence (its
    /// verification), vs the prompt's length.
    pub import_profile: PrefillEstimator,
    /// Measured decode step time vs batch size.
    pub decode_profile: DecodeEstimator,
}

impl EngineView {
    /// Prefill throughput estimate, tokens/s: what the node quotes now.
    pub fn prefill_tokens_per_s(&self) -> f64 {
        self.prefill_quote.tokens_per_s()
    }
}

/// Shared counters between the compute thread and its handle.
#[derive(Debug, Default)]
struct Counters {
    /// Jobs queued or running.
    queued_jobs: AtomicUsize,
    /// Prompt tokens queued for prefill (for queue-delay estimates).
    queued_prefill_tokens: AtomicU64,
}

/// What the compute thread receives: queued work, or a step of a KV import (run at once).
#[derive(Debug)]
enum Msg {
    Work(Job),
    Import(ImportOp),
    /// The node is shutting down: fail what waits, stop, release the engine.
    Stop,
}

#[derive(Debug)]
enum ImportOp {
    Begin {
        key: u64,
        tokens: Vec<u32>,
        failed: ImportFailure,
    },
    Piece {
        key: u64,
        piece: KvPiece,
    },
    Cancel {
        key: u64,
    },
}

/// Handle to the compute thread (cloneable; the thread ends when every handle is dropped).
#[derive(Clone)]
pub struct ComputeHandle {
    /// Unbounded as a channel; queued *work* is bounded by `queue` through `counters` (import
    /// steps are not: their bytes are bounded by the KV leases they write into).
    jobs: std_mpsc::Sender<Msg>,
    queue: usize,
    counters: Arc<Counters>,
    view: Arc<Mutex<EngineView>>,
    next_import: Arc<AtomicU64>,
    verdicts: VerdictHook,
    /// The thread, for [`ComputeHandle::stop`] (taken by the first caller).
    thread: Arc<Mutex<Option<std::thread::JoinHandle<()>>>>,
}

/// Told, for each verified import from a peer, the peer id and whether its KV passed (set once,
/// after the mesh starts: the node feeds it to the mesh's reputation records).
pub type VerdictHook = Arc<std::sync::OnceLock<VerdictFn>>;

/// See [`VerdictHook`]: called with the peer id and whether the import passed.
pub type VerdictFn = Box<dyn Fn(&str, bool) + Send + Sync>;

/// Why a KV import failed on the home.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ImportError {
    /// No blocks (or state slot) could be leased for the KV.
    #[error("no room for the KV here: {0}")]
    NoRoom(String),
    /// A piece did not fit the prompt (range, size, overlap, non-finite values, wrong layout).
    #[error("bad piece of layer {layer}: {reason}")]
    BadPiece { layer: usize, reason: String },
    /// The sender went silent for a whole lease.
    #[error("KV lease expired: the transfer stalled")]
    LeaseExpired,
    /// Committing the import failed (pieces missing).
    #[error("import incomplete: {0}")]
    Incomplete(String),
    /// The KV failed verification (DESIGN.md §8): made up, of another prompt, corrupted.
    #[error("{0}")]
    Unverified(String),
    /// The compute thread is gone (the node is shutting down).
    #[error("compute thread stopped")]
    Stopped,
}

/// Where the compute thread records why an import failed (first reason wins).
type ImportFailure = Arc<Mutex<Option<ImportError>>>;

/// One KV import in progress on the compute thread (see the module docs). Dropping it without
/// finishing cancels the import and frees its leased blocks.
#[derive(Debug)]
pub struct ImportTicket {
    key: u64,
    jobs: std_mpsc::Sender<Msg>,
    failed: ImportFailure,
    finished: bool,
}

impl ImportTicket {
    /// Hands `piece` to the compute thread to write into the leased blocks. Fails when the
    /// import already failed (no room for the KV, a bad piece, lease expired) or the thread is
    /// gone, so the caller can abandon the transfer early.
    pub fn piece(&self, piece: KvPiece) -> Result<(), ImportError> {
        if let Some(e) = self.failure() {
            return Err(e);
        }
        self.jobs
            .send(Msg::Import(ImportOp::Piece {
                key: self.key,
                piece,
            }))
            .map_err(|_| ImportError::Stopped)
    }

    /// Why the import failed, if it did (as far as the compute thread got).
    pub fn failure(&self) -> Option<ImportError> {
        self.failed.lock().ok().and_then(|f| f.clone())
    }
}

impl Drop for ImportTicket {
    fn drop(&mut self) {
        if !self.finished {
            let _ = self
                .jobs
                .send(Msg::Import(ImportOp::Cancel { key: self.key }));
        }
    }
}

impl std::fmt::Debug for ComputeHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ComputeHandle").finish_non_exhaustive()
    }
}

/// The compute queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("compute queue is full or stopped")]
pub struct QueueFull;

impl ComputeHandle {
    /// Tells the compute thread to stop (what waits is failed with "node shutting down") and
    /// returns it to join, to the first caller only. The thread drops the engine, and with it
    /// any GPU device, before it ends.
    pub fn stop(&self) -> Option<std::thread::JoinHandle<()>> {
        let _ = self.jobs.send(Msg::Stop);
        self.thread.lock().ok()?.take()
    }

    /// Queues a job; fails at once when the queue is full (the caller answers 429 / declines).
    pub fn submit(&self, job: Job) -> Result<(), (QueueFull, Box<Job>)> {
        let tokens = job.prefill_tokens() as u64;
        // A finishing import is not new work: its KV is already here, refusing it would waste
        // the transfer.
        let bounded = !matches!(job, Job::FinishImport { .. });
        if self.counters.queued_jobs.fetch_add(1, Ordering::AcqRel) >= self.queue && bounded {
            self.counters.queued_jobs.fetch_sub(1, Ordering::AcqRel);
            return Err((QueueFull, Box::new(job)));
        }
        self.counters
            .queued_prefill_tokens
            .fetch_add(tokens, Ordering::AcqRel);
        match self.jobs.send(Msg::Work(job)) {
            Ok(()) => Ok(()),
            Err(std_mpsc::SendError(msg)) => {
                self.counters.queued_jobs.fetch_sub(1, Ordering::AcqRel);
                self.counters
                    .queued_prefill_tokens
                    .fetch_sub(tokens, Ordering::AcqRel);
                match msg {
                    Msg::Work(job) => Err((QueueFull, Box::new(job))),
                    Msg::Import(_) | Msg::Stop => unreachable!("a work job was sent"),
                }
            }
        }
    }

    /// Starts importing the KV of `tokens` from a peer: the compute thread leases blocks for it
    /// (ahead of any queued work). Feed the pieces through the ticket, in any order, then submit
    /// [`Job::FinishImport`].
    pub fn begin_import(&self, tokens: Vec<u32>) -> ImportTicket {
        let key = self.next_import.fetch_add(1, Ordering::Relaxed);
        let failed = Arc::new(Mutex::new(None));
        let sent = self.jobs.send(Msg::Import(ImportOp::Begin {
            key,
            tokens,
            failed: failed.clone(),
        }));
        if sent.is_err() {
            if let Ok(mut f) = failed.lock() {
                *f = Some(ImportError::Stopped);
            }
        }
        ImportTicket {
            key,
            jobs: self.jobs.clone(),
            failed,
            finished: false,
        }
    }

    /// Runs a prefill of `tokens` on the compute thread as a peer's would run (chunked, its KV
    /// streamed out) and discards the KV: it warms the prefix cache, and its time is the
    /// `T_prefill` of benchmarks.
    pub async fn prefill_and_discard(&self, tokens: Vec<u32>) -> Result<ServedPrefill, String> {
        let (ptx, mut prx) = mpsc::unbounded_channel();
        let (dtx, drx) = oneshot::channel();
        self.submit(Job::ServePrefill {
            tokens,
            wire: KvWire::F16,
            pieces: ptx,
            done: dtx,
        })
        .map_err(|(e, _)| e.to_string())?;
        while prx.recv().await.is_some() {}
        drx.await
            .map_err(|_| "compute thread dropped the prefill".to_string())?
    }

    /// Sets who hears import verdicts (once; later calls are ignored).
    pub fn on_import_verdict(&self, hook: VerdictFn) {
        let _ = self.verdicts.set(hook);
    }

    /// A copy of the latest engine view.
    pub fn view(&self) -> EngineView {
        self.view.lock().map(|v| v.clone()).unwrap_or_default()
    }

    /// Jobs queued or running.
    pub fn queued_jobs(&self) -> usize {
        self.counters.queued_jobs.load(Ordering::Acquire)
    }

    /// Seconds of prefill work queued ahead of a new job.
    pub fn queue_delay_s(&self) -> f64 {
        let rate = self.view().prefill_tokens_per_s().max(1.0);
        self.counters.queued_prefill_tokens.load(Ordering::Acquire) as f64 / rate
    }

    /// Leading prompt tokens whose KV this node's prefix cache probably holds (from the view;
    /// the prefill itself does the exact lookup).
    pub fn cached_prefix_tokens(&self, tokens: &[u32], block_size: usize) -> usize {
        let n = tokens.len().saturating_sub(1);
        let hashes: Vec<u64> = block_hashes(&tokens[..n], block_size)
            .iter()
            .map(|h| h.short())
            .collect();
        cached_leading(&self.view(), &hashes) * block_size
    }
}

/// Leading entries of `short_hashes` present in the view's cache.
pub fn cached_leading(view: &EngineView, short_hashes: &[u64]) -> usize {
    short_hashes
        .iter()
        .take_while(|h| view.cached_blocks.contains(h))
        .count()
}

/// Settings of the compute thread.
#[derive(Debug, Clone)]
pub struct ComputeConfig {
    pub max_batch: usize,
    pub queue: usize,
    /// Initial prefill speed estimate (tokens/s), refined by measurement.
    pub prefill_tokens_per_s: f64,
    /// Start-up calibration prefills: `(tokens, seconds)`.
    pub calibration: Vec<(f64, f64)>,
}

/// Starts the compute thread owning `engine`.
pub fn spawn(
    engine: Engine,
    codec: TextCodec,
    metrics: Arc<Metrics>,
    cfg: ComputeConfig,
) -> std::io::Result<ComputeHandle> {
    let (tx, rx) = std_mpsc::channel();
    let counters = Arc::new(Counters::default());
    let mut prefill_profile = PrefillEstimator::default();
    for &(tokens, secs) in &cfg.calibration {
        prefill_profile.observe(tokens, secs);
    }
    let quote = QuoteRate::new(cfg.prefill_tokens_per_s);
    let view = Arc::new(Mutex::new(EngineView {
        prefill_quote: quote,
        prefill_profile: prefill_profile.clone(),
        ..EngineView::default()
    }));
    let handle = ComputeHandle {
        jobs: tx,
        queue: cfg.queue.max(1),
        counters: counters.clone(),
        view: view.clone(),
        next_import: Arc::new(AtomicU64::new(1)),
        verdicts: VerdictHook::default(),
        thread: Arc::default(),
    };
    let worker = Worker {
        engine,
        codec,
        metrics,
        max_batch: cfg.max_batch.max(1),
        live: Vec::new(),
        counters,
        view,
        prefill_rate: quote,
        prefill_profile,
        import_profile: PrefillEstimator::default(),
        decode_profile: DecodeEstimator::default(),
        imports: HashMap::new(),
        verdicts: handle.verdicts.clone(),
        stopping: false,
    };
    let join = std::thread::Builder::new()
        .name("prfaas-compute".into())
        .spawn(move || worker.run(rx))?;
    if let Ok(mut t) = handle.thread.lock() {
        *t = Some(join);
    }
    Ok(handle)
}

/// One sequence being decoded.
struct Live {
    job: Box<DecodeJob>,
    seq: SeqId,
    sampler: Sampler,
    /// Next input token (already sampled and emitted).
    next: u32,
    generated: usize,
    utf8: Utf8Stream,
    text: String,
    /// Bytes of `text` already sent.
    sent: usize,
    first_token_at: Instant,
    /// When the last token was emitted (inter-token latency).
    last_token_at: Instant,
    cached_tokens: usize,
}

enum Step {
    Continue,
    Done(FinishReason),
    Cancelled,
}

struct Worker {
    engine: Engine,
    codec: TextCodec,
    metrics: Arc<Metrics>,
    max_batch: usize,
    live: Vec<Live>,
    counters: Arc<Counters>,
    view: Arc<Mutex<EngineView>>,
    prefill_rate: QuoteRate,
    prefill_profile: PrefillEstimator,
    import_profile: PrefillEstimator,
    decode_profile: DecodeEstimator,
    /// Imports in progress: ticket key → (lease, where to report a failure).
    imports: HashMap<u64, (LeaseId, ImportFailure)>,
    verdicts: VerdictHook,
    /// [`Msg::Stop`] arrived.
    stopping: bool,
}

/// How long an idle compute thread sleeps before checking for expired KV leases.
const IDLE_TICK: Duration = Duration::from_secs(1);

impl Worker {
    /// Reports a verification verdict on the peer that prefilled for `route`.
    fn verdict(&self, route: &PrefillRoute, passed: bool) {
        if let (PrefillRoute::Remote { peer, .. }, Some(hook)) = (route, self.verdicts.get()) {
            hook(peer, passed);
        }
    }

    fn run(mut self, rx: std_mpsc::Receiver<Msg>) {
        // The KV figures are real from the start: adverts (free KV blocks) and the homes that
        // rank candidates by them must not see an empty default before the first job.
        self.publish_view();
        // Work taken off the channel but not started yet (import steps run as they come).
        let mut waiting: VecDeque<Job> = VecDeque::new();
        let mut open = true;
        while open || !waiting.is_empty() || !self.live.is_empty() {
            // Idle: block for a message (waking now and then to expire leases). Busy: take what
            // is there without waiting.
            if open && waiting.is_empty() && self.live.is_empty() {
                match rx.recv_timeout(IDLE_TICK) {
                    Ok(m) => self.accept(m, &mut waiting),
                    Err(std_mpsc::RecvTimeoutError::Timeout) => {}
                    Err(std_mpsc::RecvTimeoutError::Disconnected) => open = false,
                }
            }
            while open {
                match rx.try_recv() {
                    Ok(m) => self.accept(m, &mut waiting),
                    Err(std_mpsc::TryRecvError::Empty) => break,
                    Err(std_mpsc::TryRecvError::Disconnected) => open = false,
                }
            }
            if !open || self.stopping {
                // Every handle is gone, or the node said stop: it is shutting down.
                break;
            }
            // At most one job between two decode steps; a new sequence only while the batch
            // has room (a served prefill adds none).
            let runnable = match waiting.front() {
                Some(Job::ServePrefill { .. }) => true,
                Some(_) => self.live.len() < self.max_batch,
                None => false,
            };
            if runnable {
                if let Some(job) = waiting.pop_front() {
                    let tokens = job.prefill_tokens() as u64;
                    self.run_job(job);
                    self.counters.queued_jobs.fetch_sub(1, Ordering::AcqRel);
                    self.counters
                        .queued_prefill_tokens
                        .fetch_sub(tokens, Ordering::AcqRel);
                }
            }
            if !self.live.is_empty() {
                self.decode_step();
            }
            self.expire_imports();
            self.publish_view();
        }
        // Shutting down: whoever is still waiting or decoding is told so.
        for job in waiting {
            match job {
                Job::Generate(j) | Job::FinishImport { job: j, .. } => {
                    fail(&self.metrics, j, "node shutting down")
                }
                Job::ServePrefill { done, .. } => {
                    let _ = done.send(Err("node shutting down".into()));
                }
            }
        }
        for l in std::mem::take(&mut self.live) {
            let _ = l.job.events.try_send(GenerateEvent::Failed {
                message: "node shutting down".into(),
            });
            let _ = self.engine.release(l.seq);
        }
    }

    /// Runs an import step at once, or queues work.
    fn accept(&mut self, msg: Msg, waiting: &mut VecDeque<Job>) {
        let op = match msg {
            Msg::Work(job) => return waiting.push_back(job),
            Msg::Import(op) => op,
            Msg::Stop => {
                self.stopping = true;
                return;
            }
        };
        match op {
            ImportOp::Begin {
                key,
                tokens,
                failed,
            } => match self.engine.begin_import(tokens, Instant::now()) {
                Ok(lease) => {
                    self.imports.insert(key, (lease, failed));
                }
                Err(e) => report(&failed, ImportError::NoRoom(e.to_string())),
            },
            ImportOp::Piece { key, piece } => {
                let Some((lease, failed)) = self.imports.get(&key) else {
                    return; // already failed or cancelled
                };
                if let Err(e) = self.engine.import_piece(*lease, &piece, Instant::now()) {
                    let reason = e.to_string();
                    report(
                        failed,
                        ImportError::BadPiece {
                            layer: piece.layer,
                            reason,
                        },
                    );
                    self.imports.remove(&key);
                }
            }
            ImportOp::Cancel { key } => {
                if let Some((lease, _)) = self.imports.remove(&key) {
                    self.engine.cancel_import(lease);
                }
            }
        }
    }

    /// Frees the blocks of imports whose sender went silent for a whole lease.
    fn expire_imports(&mut self) {
        let expired = self.engine.expire_imports(Instant::now());
        if expired.is_empty() {
            return;
        }
        self.imports.retain(|_, (lease, failed)| {
            let gone = expired.contains(lease);
            if gone {
                report(failed, ImportError::LeaseExpired);
            }
            !gone
        });
    }

    fn publish_view(&mut self) {
        let kv = self.engine.kv_stats();
        let cached_blocks = self
            .engine
            .kv_store_mut()
            .cached_block_hashes()
            .map(|h| h.short())
            .collect();
        let m = &self.metrics;
        for (kind, v) in [
            ("used", kv.in_use),
            ("leased", kv.leased),
            ("free", kv.free),
            ("cached", kv.cached),
        ] {
            m.kv_blocks
                .get_or_create(&crate::metrics::KindLabel { kind: kind.into() })
                .set(v as i64);
        }
        if let Ok(mut v) = self.view.lock() {
            *v = EngineView {
                kv,
                cached_blocks,
                live: self.live.len(),
                prefill_quote: self.prefill_rate,
                prefill_profile: self.prefill_profile.clone(),
                import_profile: self.import_profile.clone(),
                decode_profile: self.decode_profile.clone(),
            };
        }
    }

    fn note_prefill(&mut self, tokens: usize, elapsed: Duration) {
        self.prefill_profile
            .observe(tokens as f64, elapsed.as_secs_f64());
        self.prefill_rate
            .observe(tokens as f64, elapsed.as_secs_f64());
    }

    fn note_prefix_cache(&self, tokens: usize, cached: usize) {
        self.metrics.prefix_cache_queries.inc_by(tokens as u64);
        self.metrics.prefix_cache_hits.inc_by(cached as u64);
    }

    fn run_job(&mut self, job: Job) {
        match job {
            Job::Generate(j) => {
                let t0 = Instant::now();
                self.metrics
                    .queue_time
                    .observe(t0.duration_since(j.admitted).as_secs_f64());
                match self.engine.prefill(&j.tokens, &mut crate::engine::NullSink) {
                    Ok(out) => {
                        let uncached = j.tokens.len() - out.cached_tokens;
                        self.note_prefill(uncached, t0.elapsed());
                        self.note_prefix_cache(j.tokens.len(), out.cached_tokens);
                        self.metrics
                            .prefill_time
                            .observe(t0.elapsed().as_secs_f64());
                        Metrics::inc_by(&self.metrics.prefill_tokens, "local", uncached as u64);
                        self.start_decode(j, out.seq, &out.logits, out.cached_tokens);
                    }
                    Err(e) => fail(&self.metrics, j, &format!("prefill failed: {e}")),
                }
            }
            Job::FinishImport {
                mut job,
                mut ticket,
                logits,
            } => {
                ticket.finished = true;
                let t0 = Instant::now();
                let done = match self.imports.remove(&ticket.key) {
                    // Verified before decoding (DESIGN.md §8); only KV that passed enters the
                    // prefix cache.
                    Some((lease, _)) => self
                        .engine
                        .finish_verified_import(
                            lease,
                            &logits,
                            &VerifyConfig::fresh(job.request_id),
                        )
                        .map(|(seq, _)| {
                            self.verdict(&job.route, true);
                            seq
                        })
                        .map_err(|e| match e {
                            EngineError::Unverified(why) => {
                                Metrics::inc(&self.metrics.auctions, "kv_rejected");
                                self.verdict(&job.route, false);
                                ImportError::Unverified(why)
                            }
                            e => ImportError::Incomplete(e.to_string()),
                        }),
                    None => Err(ticket.failure().unwrap_or(ImportError::Incomplete(
                        "import unknown to the compute thread".into(),
                    ))),
                };
                match done {
                    Ok(seq) => {
                        self.import_profile
                            .observe(job.tokens.len() as f64, t0.elapsed().as_secs_f64());
                        let m = &self.metrics;
                        m.prefill_time.observe(job.admitted.elapsed().as_secs_f64());
                        if let PrefillRoute::Remote {
                            kv_bytes,
                            transfer_s,
                            ..
                        } = &job.route
                        {
                            m.kv_transfer_time.observe(*transfer_s);
                            m.kv_transfer_size.observe(*kv_bytes as f64);
                        }
                        self.start_decode(job, seq, &logits, 0)
                    }
                    Err(e) => {
                        // The KV is unusable but the request is not lost: prefill it here.
                        tracing::warn!(request = job.request_id, error = %e, "imported KV unusable; prefilling locally");
                        job.route = PrefillRoute::Local {
                            reason: format!("imported KV unusable ({e}); prefilled locally"),
                        };
                        self.run_job(Job::Generate(job));
                    }
                }
            }
            Job::ServePrefill {
                tokens,
                wire,
                pieces,
                done,
            } => {
                let t0 = Instant::now();
                let mut sink = ChannelSink {
                    tx: pieces,
                    dtype: self.engine.layout().dtype,
                    wire,
                };
                let r = self.engine.prefill(&tokens, &mut sink);
                // Close the piece channel before answering, so the sender sees the end.
                drop(sink);
                let r = match r {
                    Ok(out) => {
                        let uncached = tokens.len() - out.cached_tokens;
                        self.note_prefill(uncached, t0.elapsed());
                        self.note_prefix_cache(tokens.len(), out.cached_tokens);
                        Metrics::inc_by(&self.metrics.prefill_tokens, "served", uncached as u64);
                        let _ = self.engine.release(out.seq);
                        Ok(ServedPrefill {
                            logits: out.logits,
                            cached_tokens: out.cached_tokens,
                            elapsed: t0.elapsed(),
                        })
                    }
                    Err(e) => Err(e.to_string()),
                };
                let _ = done.send(r);
            }
        }
    }

    /// Samples the first token from the prefill logits and adds the sequence to the batch.
    fn start_decode(&mut self, job: Box<DecodeJob>, seq: SeqId, logits: &[f32], cached: usize) {
        let span = job.span.clone();
        let _entered = span.enter();
        match &job.route {
            PrefillRoute::Local { .. } => {
                span.record("route", "local");
            }
            PrefillRoute::Remote { peer, .. } => {
                span.record("route", "remote");
                span.record("peer", peer.as_str());
            }
        }
        tracing::debug!(cached, "decoding");
        let mut sampler = Sampler::for_prompt(job.sampling.clone(), &job.tokens);
        let first = sampler.sample(logits);
        let logprobs = sampler.take_logprobs();
        let started = GenerateEvent::Started {
            request_id: job.request_id,
            prompt_tokens: job.tokens.len(),
            route: job.route.clone(),
        };
        if job.events.try_send(started).is_err() {
            let _ = self.engine.release(seq);
            record(&self.metrics, &job.route, "cancelled");
            return;
        }
        let now = Instant::now();
        let ttft = now.duration_since(job.admitted).as_secs_f64();
        self.metrics.ttft.observe(ttft);
        self.metrics
            .history
            .record(ttft, matches!(job.route, PrefillRoute::Remote { .. }));
        let mut live = Live {
            job,
            seq,
            sampler,
            next: first,
            generated: 0,
            utf8: Utf8Stream::default(),
            text: String::new(),
            sent: 0,
            first_token_at: now,
            last_token_at: now,
            cached_tokens: cached,
        };
        match emit(&self.codec, &mut live, first, logprobs) {
            Step::Continue => self.live.push(live),
            other => self.finish(live, other),
        }
    }

    fn decode_step(&mut self) {
        let batch: Vec<(SeqId, u32)> = self.live.iter().map(|l| (l.seq, l.next)).collect();
        let step0 = Instant::now();
        let stepped = self.engine.decode_step(&batch);
        if stepped.is_ok() {
            self.decode_profile
                .observe(batch.len(), step0.elapsed().as_secs_f64());
        }
        let toks = stepped.and_then(|logits| {
            let mut samplers: Vec<&mut Sampler> =
                self.live.iter_mut().map(|l| &mut l.sampler).collect();
            self.engine.sample(&logits, &mut samplers)
        });
        let toks = match toks {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(error = %e, batch = batch.len(), "decode step failed");
                for l in std::mem::take(&mut self.live) {
                    let _ = self.engine.release(l.seq);
                    fail(&self.metrics, l.job, &format!("decode failed: {e}"));
                }
                return;
            }
        };
        let mut done = Vec::new();
        let now = Instant::now();
        for (i, t) in toks.into_iter().enumerate().take(self.live.len()) {
            let l = &mut self.live[i];
            self.metrics
                .inter_token_latency
                .observe(now.duration_since(l.last_token_at).as_secs_f64());
            l.last_token_at = now;
            l.next = t;
            let logprobs = l.sampler.take_logprobs();
            match emit(&self.codec, l, t, logprobs) {
                Step::Continue => {}
                other => done.push((i, other)),
            }
        }
        // Highest index first: `swap_remove` then only moves sequences that stay.
        for (i, how) in done.into_iter().rev() {
            let l = self.live.swap_remove(i);
            self.finish(l, how);
        }
    }

    fn finish(&mut self, mut l: Live, how: Step) {
        let span = l.job.span.clone();
        let _entered = span.enter();
        let _ = self.engine.release(l.seq);
        match how {
            Step::Continue => {}
            Step::Cancelled => record(&self.metrics, &l.job.route, "cancelled"),
            Step::Done(finish) => {
                let tail = l.utf8.finish();
                l.text.push_str(&tail);
                if l.sent < l.text.len() {
                    let text = l.text[l.sent..].to_string();
                    let _ = l.job.events.try_send(GenerateEvent::Delta {
                        text,
                        token: None,
                        logprobs: None,
                    });
                }
                let decode_s = l.first_token_at.elapsed().as_secs_f64();
                let tokens_per_s = if l.generated > 1 && decode_s > 0.0 {
                    (l.generated - 1) as f64 / decode_s
                } else {
                    0.0
                };
                let ev = GenerateEvent::Finished {
                    finish,
                    usage: Usage {
                        prompt_tokens: l.job.tokens.len(),
                        completion_tokens: l.generated,
                        cached_tokens: l.cached_tokens,
                    },
                    timings: Timings {
                        ttft_s: l
                            .first_token_at
                            .duration_since(l.job.admitted)
                            .as_secs_f64(),
                        decode_s,
                        tokens_per_s,
                    },
                };
                self.metrics.generated_tokens.inc_by(l.generated as u64);
                self.metrics
                    .e2e_latency
                    .observe(l.job.admitted.elapsed().as_secs_f64());
                if tokens_per_s > 0.0 {
                    self.metrics.decode_rate.observe(tokens_per_s);
                }
                let outcome = if l.job.events.try_send(ev).is_ok() {
                    "ok"
                } else {
                    "cancelled"
                };
                tracing::info!(
                    completion_tokens = l.generated,
                    ttft_s = l
                        .first_token_at
                        .duration_since(l.job.admitted)
                        .as_secs_f64(),
                    decode_s,
                    outcome,
                    "request finished"
                );
                record(&self.metrics, &l.job.route, outcome);
            }
        }
    }
}

/// A sampled token's log-probabilities with the tokens' text, for the client.
fn token_logprob(codec: &TextCodec, lp: TokenLogprobs) -> TokenLogprob {
    let text = |id: u32| {
        let bytes = codec.token_bytes(id);
        (String::from_utf8_lossy(&bytes).into_owned(), bytes)
    };
    let (token, bytes) = text(lp.token);
    TokenLogprob {
        token,
        bytes,
        logprob: lp.logprob,
        top: lp
            .top
            .into_iter()
            .map(|(id, logprob)| {
                let (token, bytes) = text(id);
                TopLogprob {
                    token,
                    bytes,
                    logprob,
                }
            })
            .collect(),
    }
}

/// Handles one generated token: stop tokens, stop strings, max tokens, and sending the text
/// (with the token's log-probabilities, if asked for; a stop token's are not reported, as
/// OpenAI reports none for the end of a message).
fn emit(codec: &TextCodec, l: &mut Live, tok: u32, logprobs: Option<TokenLogprobs>) -> Step {
    l.generated += 1;
    let stop_token = l.job.sampling.stop_tokens.contains(&tok);
    let logprobs = logprobs
        .filter(|_| !stop_token)
        .map(|lp| token_logprob(codec, lp));
    if !stop_token {
        let piece = l.utf8.push(&codec.token_bytes(tok));
        l.text.push_str(&piece);
    }
    // Stop strings: cut before the first occurrence in the unsent text (plus overlap).
    let search_from = l
        .sent
        .saturating_sub(l.job.stop.iter().map(String::len).max().unwrap_or(0));
    let search_from = floor_char_boundary(&l.text, search_from);
    let hit = l
        .job
        .stop
        .iter()
        .filter(|s| !s.is_empty())
        .filter_map(|s| {
            l.text[search_from..]
                .find(s.as_str())
                .map(|p| p + search_from)
        })
        .min();
    if let Some(pos) = hit {
        let pos = pos.max(l.sent);
        if pos > l.sent {
            let text = l.text[l.sent..pos].to_string();
            if !send_delta(l, text, tok, logprobs) {
                return Step::Cancelled;
            }
        }
        l.text.truncate(pos);
        l.sent = pos;
        return Step::Done(FinishReason::Stop);
    }
    if stop_token {
        return Step::Done(FinishReason::Stop);
    }
    // Hold back what could still become a stop string.
    let hold = l
        .job
        .stop
        .iter()
        .map(|s| s.len().saturating_sub(1))
        .max()
        .unwrap_or(0);
    let safe = floor_char_boundary(&l.text, l.text.len().saturating_sub(hold)).max(l.sent);
    let text = l.text[l.sent..safe].to_string();
    l.sent = safe;
    if !send_delta(l, text, tok, logprobs) {
        return Step::Cancelled;
    }
    if l.generated >= l.job.sampling.max_tokens {
        return Step::Done(FinishReason::Length);
    }
    Step::Continue
}

/// Sends `text` (produced by token `tok`); `false` when the client is gone or not reading, which
/// cancels the request.
fn send_delta(l: &Live, text: String, tok: u32, logprobs: Option<TokenLogprob>) -> bool {
    l.job
        .events
        .try_send(GenerateEvent::Delta {
            text,
            token: Some(tok),
            logprobs,
        })
        .is_ok()
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    i = i.min(s.len());
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

fn route_label(route: &PrefillRoute) -> &'static str {
    match route {
        PrefillRoute::Local { .. } => "local",
        PrefillRoute::Remote { .. } => "remote",
    }
}

fn record(metrics: &Metrics, route: &PrefillRoute, outcome: &str) {
    metrics
        .requests
        .get_or_create(&RequestLabels {
            route: route_label(route).into(),
            outcome: outcome.into(),
        })
        .inc();
}

/// Records why an import failed, for its ticket's holder.
fn report(failed: &Mutex<Option<ImportError>>, why: ImportError) {
    tracing::debug!(%why, "KV import failed");
    if let Ok(mut f) = failed.lock() {
        f.get_or_insert(why);
    }
}

/// Ends a request that could not start or continue.
#[allow(clippy::boxed_local)] // jobs travel boxed; unboxing to fail one would only copy it
pub fn fail(metrics: &Metrics, job: Box<DecodeJob>, message: &str) {
    let _entered = job.span.enter();
    tracing::warn!(%message, "request failed");
    record(metrics, &job.route, "error");
    let _ = job.events.try_send(GenerateEvent::Failed {
        message: message.into(),
    });
}

/// Encodes each piece for the wire and queues it for the KV sender task without waiting: the
/// compute thread serves every other request too, and must not stall behind one slow link.
struct ChannelSink {
    tx: mpsc::UnboundedSender<(PieceId, Vec<u8>)>,
    /// The engine's KV dtype (what goes on the wire unless `wire` says otherwise).
    dtype: crate::kv::KvDType,
    wire: KvWire,
}

impl KvSink for ChannelSink {
    fn piece(&mut self, piece: KvPiece) -> Result<(), SinkError> {
        let id = PieceId {
            layer: piece.layer as u32,
            start: piece.tokens.start as u32,
            end: piece.tokens.end as u32,
        };
        let bytes = piece
            .kv
            .to_wire(self.dtype, self.wire)
            .map_err(|e| SinkError::BadWire {
                layer: piece.layer,
                error: e,
            })?;
        self.tx
            .send((id, bytes))
            .map_err(|_| SinkError::Closed("KV transfer ended".into()))
    }
}
