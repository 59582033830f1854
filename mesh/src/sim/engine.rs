//! The discrete-event engine: virtual time, one event heap, deterministic for a seed.
//!
//! Model (each simplification is on purpose and stated):
//! * A prefill instance runs one prompt at a time, FIFO; its time comes from its profile, minus
//!   the part of a shared prefix it already caches (LRU of prefix groups).
//! * A remote prefill streams KV layer by layer: the transfer may start once the first layer is
//!   done, the link is a FIFO byte server with a time-varying rate, and the last layer can leave
//!   only after the prefill ends. KV is ready at the home after that plus the request's and the
//!   KV's one-way latencies. Local prefill → decode is intra-cluster (RDMA) and free.
//! * Decode instances batch continuously up to `BS_max` (the SLO cap); every step runs at the SLO
//!   step time, so a request holds a slot for `L_out` steps. The first token is out one step after
//!   joining a batch; TTFT is measured to that point.
//! * The central router sees every queue and the link exactly (it is central) and re-searches `t`
//!   when its trigger fires. The auction's home nodes (one per decode instance) know peers only
//!   from gossip snapshots taken every `gossip_interval_s` (liveness, utilisation, price, queue);
//!   bids carry the bidder's live queue after one Call/Bid round trip, or — with
//!   `bids_from_gossip` — the advert's queue extrapolated by what the home itself sent since.
//! * The decentralized policy is the node's code, not a model of it: each home keeps its own `t`
//!   in a [`ThresholdTracker`] re-searched from the bandwidth *it* observed
//!   ([`crate::policy::threshold`], what `prfaas node` runs), and places each prompt with
//!   [`crate::policy::placement::plan`]: a prompt the offload rule keeps local (its threshold,
//!   with the prefix rule applied when its last search found the link the bound) is settled among
//!   the home cluster's prefill instances, unless that would take `spill_ratio`× longer than the
//!   best advertised remote offer; otherwise the `top_k` remote instances its adverts rank best
//!   are called (near-equal ones spread by a hash of the home, the request and the seed), the
//!   home cluster bidding as reserve bids weighted by `auction.keep_ratio`. Prefix-cache summaries are taken as
//!   current. What differs from a node: the home cluster has several prefill instances (a node
//!   has its own; `hardware.colocated` makes each home a `pd` node with its own instance, as in a
//!   replay of real nodes, [`super::replay`]), bidders quote their exact prefill time unless
//!   `hardware.*_quote_tokens_per_s` makes them quote a moving-average rate as nodes do
//!   ([`crate::policy::QuoteRate`]), and there are no Bloom false positives, KV room limits or
//!   lying bidders.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, VecDeque};

use rand_core::{Rng, SeedableRng};
use rand_pcg::Pcg64Mcg;
use serde::Serialize;

use super::scenario::{Arrival, Scenario};
use crate::policy::{
    plan, settle, spread_key, Bid, BidderLoad, Candidate, LengthDistribution, Observation,
    OffloadRule, Placement, PlacementInput, PlacementPlan, PrefillProfile, PricingParams,
    QuoteRate, ReSearchTrigger, RequestShape, ScoringParams, Split, ThresholdInputs,
    ThresholdTracker, ThroughputModel,
};

/// The four policies compared side by side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum PolicyKind {
    /// All prefill and decode in one PD cluster of the slower instances.
    Homogeneous,
    /// Every prefill on the remote cluster.
    NaiveHeterogeneous,
    /// The paper's central router: threshold `t` + bandwidth awareness.
    PrfaasRouter,
    /// This project's decentralized auction with stale adverts.
    Auction,
}

impl PolicyKind {
    /// Label used in tables.
    pub fn label(self) -> &'static str {
        match self {
            Self::Homogeneous => "homogeneous PD",
            Self::NaiveHeterogeneous => "naive heterogeneous",
            Self::PrfaasRouter => "PrfaaS-PD (central router)",
            Self::Auction => "mesh auction (decentralized)",
        }
    }
}

/// One generated request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Request {
    /// Arrival time (s).
    pub arrival: f64,
    /// Prompt tokens.
    pub tokens: f64,
    /// Shared prefix `(group, tokens)`, if any.
    pub prefix: Option<(u32, f64)>,
}

fn uniform(rng: &mut Pcg64Mcg) -> f64 {
    // 53 random bits in [0, 1).
    (rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

fn exponential(rng: &mut Pcg64Mcg, rate: f64) -> f64 {
    if rate <= 0.0 {
        return f64::INFINITY;
    }
    -(1.0 - uniform(rng)).ln() / rate
}

/// Generate `n` requests: lengths from `dist`, arrivals from `arrival`, prefixes per scenario.
pub fn generate(
    scenario: &Scenario,
    dist: &LengthDistribution,
    arrival: &Arrival,
    n: usize,
    seed: u64,
) -> Vec<Request> {
    let mut rng = Pcg64Mcg::seed_from_u64(seed);
    let pre = &scenario.workload.prefixes;
    let mut out = Vec::with_capacity(n);
    let mut now = 0.0;
    // Bursty state: (high?, time of next switch).
    let mut high = true;
    let mut switch_at = 0.0;
    if let Arrival::Bursty { mean_high_s, .. } = arrival {
        switch_at = exponential(&mut rng, 1.0 / mean_high_s);
    }
    for _ in 0..n {
        match *arrival {
            Arrival::Poisson { rate_per_s } => now += exponential(&mut rng, rate_per_s),
            Arrival::Bursty {
                high_rate_per_s,
                low_rate_per_s,
                mean_high_s,
                mean_low_s,
            } => loop {
                let rate = if high {
                    high_rate_per_s
                } else {
                    low_rate_per_s
                };
                let next = now + exponential(&mut rng, rate);
                if next <= switch_at {
                    now = next;
                    break;
                }
                // Memorylessness: restart the draw from the switch instant in the new state.
                now = switch_at;
                high = !high;
                let mean = if high { mean_high_s } else { mean_low_s };
                switch_at = now + exponential(&mut rng, 1.0 / mean);
            },
        }
        let tokens = dist.quantile(uniform(&mut rng)).round().max(1.0);
        let prefix = if pre.share > 0.0 && uniform(&mut rng) < pre.share {
            let g = (uniform(&mut rng) * f64::from(pre.groups)) as u32;
            Some((
                g.min(pre.groups.saturating_sub(1)),
                pre.tokens.min(0.9 * tokens).floor(),
            ))
        } else {
            None
        };
        out.push(Request {
            arrival: now,
            tokens,
            prefix,
        });
    }
    out
}

/// Per-policy results.
#[derive(Debug, Clone, Serialize)]
pub struct RunMetrics {
    /// Policy.
    pub policy: PolicyKind,
    /// Requests offered.
    pub requests: usize,
    /// Requests completed.
    pub completed: usize,
    /// Completions per second after the first 10% (sustained throughput).
    pub throughput_per_s: f64,
    /// TTFT mean (s).
    pub ttft_mean_s: f64,
    /// TTFT median (s).
    pub ttft_p50_s: f64,
    /// TTFT P90 (s).
    pub ttft_p90_s: f64,
    /// TTFT P99 (s).
    pub ttft_p99_s: f64,
    /// Fraction prefilled remotely.
    pub offload_fraction: f64,
    /// Mean prompt length of offloaded requests.
    pub mean_offloaded_tokens: f64,
    /// Mean egress over the arrival window (Gbps).
    pub egress_gbps: f64,
    /// Times the router re-searched `t`.
    pub researches: u32,
    /// Threshold in force at the end (router).
    pub final_threshold: f64,
    /// Placements that hit a vanished site and were retried.
    pub retries: u64,
    /// Sorted TTFTs (for CDF charts; not serialised).
    #[serde(skip)]
    pub ttfts: Vec<f64>,
    /// TTFT of each request in input order, NaN where it did not finish (not serialised).
    #[serde(skip)]
    pub ttft_by_request: Vec<f64>,
    /// Whether each request was prefilled remotely, in input order (not serialised).
    #[serde(skip)]
    pub remote_by_request: Vec<bool>,
    /// Virtual time of the last completion (s; 0 when nothing completed).
    pub last_completion_s: f64,
}

/// Fixed inputs of one run.
pub struct RunSetup<'a> {
    /// Scenario.
    pub scenario: &'a Scenario,
    /// Requests (shared by all policies: common random numbers).
    pub requests: &'a [Request],
    /// Length distribution (for re-searches).
    pub dist: &'a LengthDistribution,
    /// Throughput model at nominal bandwidth.
    pub model: &'a ThroughputModel,
    /// Instance split.
    pub split: Split,
    /// Initial threshold (router).
    pub threshold: f64,
    /// Optional misreport `(instance index, price factor)` for truthfulness experiments.
    pub misreport: Option<(usize, f64)>,
    /// Keep up to this many auctions' bid vectors for replay.
    pub record_auctions: usize,
    /// The home cluster's instances' own prefill profiles (instance `k` uses entry `k mod
    /// len`): a replay of `pd` nodes that measured different speeds. Empty: every one runs the
    /// model's local profile.
    pub local_by_instance: &'a [PrefillProfile],
}

/// Auctions recorded for replay, and per-instance realised utility.
#[derive(Debug, Clone, Default)]
pub struct AuctionLog {
    /// Bids (with observed bandwidth) of recorded auctions, with each bid's true price.
    pub auctions: Vec<Vec<(Bid, f64, f64)>>,
    /// Per instance: Σ (payment − true price) over auctions won.
    pub utility: Vec<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Time(f64);
impl Eq for Time {}
impl PartialOrd for Time {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Time {
    fn cmp(&self, o: &Self) -> Ordering {
        self.0.total_cmp(&o.0)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ev {
    Arrival(usize),
    PrefillDone { inst: usize, epoch: u64 },
    KvReady(usize),
    DecodeDone,
    Gossip,
    RouterCheck,
    OutageStart,
    OutageEnd,
    Retry(usize),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    t: Time,
    seq: u64,
    ev: Ev,
}
impl PartialOrd for Entry {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Entry {
    // Min-heap on (time, seq): reverse for BinaryHeap.
    fn cmp(&self, o: &Self) -> Ordering {
        o.t.cmp(&self.t).then(o.seq.cmp(&self.seq))
    }
}

#[derive(Debug, Clone, Copy)]
struct Job {
    req: usize,
    work_s: f64,
    /// Uncached tokens it computes (0 for a verification).
    tokens: f64,
    /// A `pd` home verifying the KV it imported for `req` (`hardware.import_verify`), not a
    /// prefill.
    verify: bool,
}

#[derive(Debug, Clone)]
struct Instance {
    remote: bool,
    queue: VecDeque<Job>,
    running: Option<Job>,
    idle_at: f64,
    epoch: u64,
    online: bool,
    cache: VecDeque<u32>,
    busy_accum: f64,
    /// The rate its bids quote (`hardware.*_quote_tokens_per_s`), moving with what it serves.
    quote: Option<QuoteRate>,
}

#[derive(Debug, Clone, Copy, Default)]
struct Advert {
    at: f64,
    utilisation: f64,
    backlog_s: f64,
    price_per_ktok: f64,
    online: bool,
    busy_accum: f64,
}

/// A home's view of the instances. What it sent to a peer since that peer's last advert, and
/// which peers it found gone, hold only until the next gossip round; both are stamped with the
/// round they were written in, so a round starts them afresh without touching every entry
/// (homes × instances per round would dominate a large mesh).
#[derive(Debug, Clone)]
struct Home {
    bandwidth: Vec<f64>,
    /// Sum of `bandwidth` over the remote instances (kept as samples arrive).
    remote_bandwidth_sum: f64,
    /// `(gossip round, seconds of work sent)` per instance.
    sent_since: Vec<(u64, f64)>,
    /// Gossip round in which the instance was found gone (`u64::MAX`: never).
    dead_in_round: Vec<u64>,
    /// The last round in which this home found any instance gone.
    last_dead_round: u64,
    /// The same `t` tracker a node runs ([`crate::policy::threshold`]).
    threshold: ThresholdTracker,
}

#[derive(Debug, Clone, Copy, Default)]
struct ReqState {
    remote: bool,
    kv_ready: f64,
    ttft: f64,
    bw_sample: f64,
    home: usize,
    winner: usize,
    call_delay: f64,
}

struct Link {
    steps: Vec<(f64, f64)>,
    free_at: f64,
    latency_s: f64,
    layers: f64,
}

impl Link {
    fn rate_at(&self, t: f64) -> f64 {
        let k = self.steps.partition_point(|s| s.0 <= t);
        self.steps[k.saturating_sub(1)].1
    }

    /// Seconds to push `bytes` starting at `start` through the piecewise-constant rate.
    fn duration(&self, start: f64, bytes: f64) -> f64 {
        let mut t = start;
        let mut left = bytes;
        let mut k = self.steps.partition_point(|s| s.0 <= t).saturating_sub(1);
        loop {
            let rate = self.steps[k].1;
            let end = self.steps.get(k + 1).map_or(f64::INFINITY, |s| s.0);
            let cap = rate * (end - t);
            if left <= cap {
                return t + left / rate - start;
            }
            left -= cap;
            t = end;
            k += 1;
        }
    }
}

struct Sim<'a> {
    s: &'a RunSetup<'a>,
    kind: PolicyKind,
    remote_prof: PrefillProfile,
    local_prof: PrefillProfile,
    step_s: f64,
    l_out: f64,
    slots_free: u64,
    decode_fifo: VecDeque<usize>,
    insts: Vec<Instance>,
    /// Remote instances are `0..n_remote`, the home cluster's `n_remote..insts.len()`.
    n_remote: usize,
    /// Remote instances online now.
    remote_online: usize,
    link: Link,
    heap: BinaryHeap<Entry>,
    /// Whether each arrival schedules the next (requests in time order).
    chained_arrivals: bool,
    seq: u64,
    now: f64,
    st: Vec<ReqState>,
    completed: usize,
    completion_times: Vec<f64>,
    // Router.
    router: ThresholdTracker,
    window_bytes: f64,
    // Auction.
    homes: Vec<Home>,
    /// Gossip rounds so far.
    round: u64,
    /// Remote instances whose last advert says online.
    remote_adverts_online: usize,
    adverts: Vec<Advert>,
    pricing: PricingParams,
    scoring: ScoringParams,
    log: AuctionLog,
    // Metrics.
    egress_bytes: f64,
    offloaded: usize,
    offloaded_tokens: f64,
    retries: u64,
}

impl<'a> Sim<'a> {
    fn push(&mut self, t: f64, ev: Ev) {
        self.seq += 1;
        self.heap.push(Entry {
            t: Time(t),
            seq: self.seq,
            ev,
        });
    }

    fn cached(&self, inst: usize, r: usize) -> f64 {
        match self.s.requests[r].prefix {
            Some((g, len)) if self.insts[inst].cache.contains(&g) => len,
            _ => 0.0,
        }
    }

    fn work_s(&self, inst: usize, r: usize) -> f64 {
        let prof = if self.insts[inst].remote {
            &self.remote_prof
        } else {
            self.own_profile(inst).unwrap_or(&self.local_prof)
        };
        prof.incremental_prefill_time(self.s.requests[r].tokens, self.cached(inst, r))
    }

    /// A home-cluster instance's own profile, where the setup gives instances their own.
    fn own_profile(&self, inst: usize) -> Option<&PrefillProfile> {
        let own = self.s.local_by_instance;
        (!self.insts[inst].remote && !own.is_empty())
            .then(|| &own[(inst - self.n_remote) % own.len()])
    }

    fn backlog(&self, inst: usize) -> f64 {
        (self.insts[inst].idle_at - self.now).max(0.0)
    }

    /// Seconds of work an instance says it has queued: exact, or, where it quotes (as a node
    /// does), the prompt tokens of its queued and running jobs at its quoted rate.
    fn quoted_queue_s(&self, inst: usize) -> f64 {
        let i = &self.insts[inst];
        match i.quote {
            Some(q) => {
                i.running
                    .iter()
                    .chain(&i.queue)
                    .filter(|j| !j.verify)
                    .map(|j| self.s.requests[j.req].tokens)
                    .sum::<f64>()
                    / q.tokens_per_s()
            }
            None => self.backlog(inst),
        }
    }

    /// Indices of the remote or of the home cluster's instances.
    fn kind(&self, remote: bool) -> std::ops::Range<usize> {
        if remote {
            0..self.n_remote
        } else {
            self.n_remote..self.insts.len()
        }
    }

    /// `work_s` of every instance of a kind: `uncached` (the same for all of them) unless the
    /// instance caches part of the prompt, which only a request with a prefix can hit, or has
    /// a profile of its own.
    fn work_s_with(&self, inst: usize, r: usize, uncached: f64) -> f64 {
        if (self.s.requests[r].prefix.is_some() && self.cached(inst, r) > 0.0)
            || self.own_profile(inst).is_some()
        {
            self.work_s(inst, r)
        } else {
            uncached
        }
    }

    /// The prefill time an instance quotes for `r` in a bid: its exact `work_s`, or the uncached
    /// tokens at its quote's current rate (from `hardware.*_quote_tokens_per_s`).
    fn quoted_s(&self, inst: usize, r: usize, work_s: f64) -> f64 {
        match self.insts[inst].quote {
            Some(q) => {
                (self.s.requests[r].tokens - self.cached(inst, r)).max(0.0) / q.tokens_per_s()
            }
            None => work_s,
        }
    }

    /// Prefill time of `r` on an instance of the kind with nothing cached.
    fn uncached_work_s(&self, r: usize, remote: bool) -> f64 {
        let prof = if remote {
            &self.remote_prof
        } else {
            &self.local_prof
        };
        prof.prefill_time(self.s.requests[r].tokens)
    }

    /// The home's own prefill instance when homes are `pd` nodes (`hardware.colocated`).
    fn own_instance(&self, r: usize) -> Option<usize> {
        let n_local = self.insts.len() - self.n_remote;
        (self.s.scenario.hardware.colocated && n_local > 0)
            .then(|| self.n_remote + self.st[r].home % n_local)
    }

    /// Puts prefix group `g` at the fresh end of `inst`'s cache (LRU of the scenario's size).
    fn remember_prefix(&mut self, inst: usize, g: u32) {
        let cap = self.s.scenario.workload.prefixes.cache_capacity;
        let c = &mut self.insts[inst].cache;
        c.retain(|&x| x != g);
        c.push_back(g);
        while c.len() > cap {
            c.pop_front();
        }
    }

    /// Instance of the wanted kind finishing `r` first (fresh view: central router).
    fn best(&self, r: usize, remote: bool) -> Option<usize> {
        let uncached = self.uncached_work_s(r, remote);
        self.kind(remote)
            .filter(|&i| self.insts[i].online)
            .map(|i| (i, self.backlog(i) + self.work_s_with(i, r, uncached)))
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .map(|(i, _)| i)
    }

    fn enqueue(&mut self, inst: usize, r: usize) {
        let work_s = self.work_s(inst, r);
        let tokens = (self.s.requests[r].tokens - self.cached(inst, r)).max(0.0);
        let i = &mut self.insts[inst];
        i.idle_at = i.idle_at.max(self.now) + work_s;
        i.queue.push_back(Job {
            req: r,
            work_s,
            tokens,
            verify: false,
        });
        self.st[r].remote = i.remote;
        if i.running.is_none() {
            self.start_next(inst);
        }
    }

    /// Seconds a `pd` home's compute spends verifying the imported KV of a prompt of `tokens`
    /// (`hardware.import_verify`, interpolated; 0 where nothing is given).
    fn verify_s(&self, tokens: f64) -> f64 {
        let pts = &self.s.scenario.hardware.import_verify;
        match pts.len() {
            0 => 0.0,
            1 => pts[0].1.max(0.0),
            _ => crate::policy::profile::lerp_extrapolate(pts, tokens).max(0.0),
        }
    }

    /// Queues the verification of `r`'s imported KV on its home's own instance: like a node's
    /// `FinishImport` job, it waits behind the prefills queued there, and the request decodes
    /// when it is done.
    fn enqueue_verify(&mut self, inst: usize, r: usize, work_s: f64) {
        let i = &mut self.insts[inst];
        i.idle_at = i.idle_at.max(self.now) + work_s;
        i.queue.push_back(Job {
            req: r,
            work_s,
            tokens: 0.0,
            verify: true,
        });
        if i.running.is_none() {
            self.start_next(inst);
        }
    }

    fn start_next(&mut self, inst: usize) {
        let Some(job) = self.insts[inst].queue.pop_front() else {
            return;
        };
        let now = self.now;
        let r = job.req;
        let end = now + job.work_s;
        let mut kv_ready = end;
        if job.verify {
            // The KV is here already: only the compute is taken.
        } else if self.insts[inst].remote {
            let bytes = self.remote_prof.kv_bytes(self.s.requests[r].tokens);
            let first_layer = now + job.work_s / self.link.layers;
            let start = self.link.free_at.max(first_layer);
            let d = self.link.duration(start, bytes);
            self.link.free_at = start + d;
            kv_ready = (start + d).max(end + d / self.link.layers) + 2.0 * self.link.latency_s;
            self.egress_bytes += bytes;
            self.window_bytes += bytes;
            self.st[r].bw_sample = bytes / ((start - first_layer) + d);
        }
        if !job.verify {
            self.st[r].kv_ready = kv_ready + self.st[r].call_delay;
        }
        let i = &mut self.insts[inst];
        i.running = Some(job);
        i.busy_accum += job.work_s;
        let epoch = i.epoch;
        self.push(end, Ev::PrefillDone { inst, epoch });
    }

    fn place(&mut self, r: usize) {
        let remote_online = self.remote_online > 0;
        let local_exists = self.insts.len() > self.n_remote;
        let target = match self.kind {
            // A mesh of `pd` nodes prefills each prompt at its home; a cluster, anywhere.
            PolicyKind::Homogeneous => self.own_instance(r).or_else(|| self.best(r, false)),
            PolicyKind::NaiveHeterogeneous => self.best(r, true),
            PolicyKind::PrfaasRouter => {
                let req = &self.s.requests[r];
                let max_cached = |remote: bool| {
                    if req.prefix.is_none() {
                        return 0.0;
                    }
                    self.kind(remote)
                        .filter(|&i| self.insts[i].online)
                        .map(|i| self.cached(i, r))
                        .fold(0.0, f64::max)
                };
                let shape = RequestShape {
                    total_tokens: req.tokens,
                    cached_local_tokens: max_cached(false),
                    cached_remote_tokens: max_cached(true),
                };
                let scarce =
                    self.link.free_at - self.now > self.s.scenario.router.scarce_link_backlog_s;
                let rule = OffloadRule {
                    threshold_tokens: self.router.threshold,
                };
                let want_remote = rule.decide(&shape, scarce) == Placement::Offload;
                if (want_remote && remote_online) || !local_exists {
                    self.best(r, true)
                } else {
                    self.best(r, false)
                }
            }
            PolicyKind::Auction => {
                let Some(w) = self.auction(r) else {
                    self.retries += 1;
                    let t = self.now + self.s.scenario.auction.failure_timeout_s;
                    self.push(t, Ev::Retry(r));
                    return;
                };
                if !self.insts[w].online {
                    // Stale advert: the winner is gone. The home notices after a timeout.
                    let h = self.st[r].home;
                    self.homes[h].dead_in_round[w] = self.round;
                    self.homes[h].last_dead_round = self.round;
                    self.retries += 1;
                    let t = self.now + self.s.scenario.auction.failure_timeout_s;
                    self.push(t, Ev::Retry(r));
                    return;
                }
                Some(w)
            }
        };
        match target {
            Some(inst) => self.enqueue(inst, r),
            None => {
                // No site can prefill now (e.g. naive policy during an outage): try again later.
                self.retries += 1;
                let t = self.now + self.s.scenario.auction.failure_timeout_s;
                self.push(t, Ev::Retry(r));
            }
        }
    }

    /// Run the home's auction from its gossip view; returns the winning instance. Which
    /// instances are called is the node's placement code ([`crate::policy::placement`]) over
    /// the home's view: candidates are the remote instances its adverts show alive, each at its
    /// advertised queue (extrapolated by what this home sent since), the home's own link
    /// estimate and the prefix summary (taken as current); the home cluster's instances bid as
    /// reserve bids. A prompt the rule keeps local is settled among the home cluster only.
    fn auction(&mut self, r: usize) -> Option<usize> {
        let h = self.st[r].home;
        let tokens = self.s.requests[r].tokens;
        let round = self.round;
        let visible = |i: usize| self.adverts[i].online && self.homes[h].dead_in_round[i] != round;
        let advertised_queue = |i: usize| {
            let ad = self.adverts[i];
            let (at, sent) = self.homes[h].sent_since[i];
            let sent = if at == round { sent } else { 0.0 };
            (ad.backlog_s - (self.now - ad.at)).max(0.0) + sent
        };
        let (remote_work, local_work) = (
            self.uncached_work_s(r, true),
            self.uncached_work_s(r, false),
        );
        let kv_bytes = self.remote_prof.kv_bytes(tokens);
        // The reserve bids: the home node's own prefill, or its whole cluster's.
        let locals: Vec<usize> = match self.own_instance(r) {
            Some(own) => visible(own).then_some(own).into_iter().collect(),
            None => self.kind(false).filter(|&i| visible(i)).collect(),
        };
        let candidates: Vec<Candidate> = self
            .kind(true)
            .filter(|&i| visible(i))
            .map(|i| Candidate {
                id: i as u32,
                queue_delay_s: advertised_queue(i),
                prefill_s: self.work_s_with(i, r, remote_work),
                cached_tokens: self.cached(i, r),
                has_room: true,
                kv_bytes,
                bandwidth_bytes_per_s: self.homes[h].bandwidth[i],
            })
            .collect();
        // A `pd` home reads its own queue live; a cluster's instances, from their adverts.
        let own = self.own_instance(r);
        let local_queue = |i: usize| {
            if own == Some(i) {
                self.quoted_queue_s(i)
            } else {
                advertised_queue(i)
            }
        };
        let local_delay_s = locals
            .iter()
            .map(|&i| local_queue(i) + self.quoted_s(i, r, self.work_s_with(i, r, local_work)))
            .fold(f64::INFINITY, f64::min);
        // The home's id (with the run's seed, so seeds differ) and the request's index.
        let mut home_id = [0u8; 16];
        home_id[..8].copy_from_slice(&self.s.scenario.workload.seed.to_le_bytes());
        home_id[8..].copy_from_slice(&(h as u64).to_le_bytes());
        let spread = spread_key(&home_id, r as u64);
        let placement = plan(&PlacementInput {
            request: RequestShape {
                total_tokens: tokens,
                cached_local_tokens: locals
                    .iter()
                    .map(|&i| self.cached(i, r))
                    .fold(0.0, f64::max),
                cached_remote_tokens: 0.0,
            },
            threshold: self.homes[h].threshold.threshold,
            local_delay_s,
            candidates: &candidates,
            top_k: self.s.scenario.auction.top_k,
            spill_ratio: self.s.scenario.auction.spill_ratio,
            spread,
            keep_ratio: self.s.scenario.auction.keep_ratio,
        });
        let mut scoring = self.scoring;
        let called: Vec<usize> = match placement {
            PlacementPlan::Auction {
                call,
                reserve_delay_weight,
                ..
            } => {
                scoring.reserve_delay_weight = reserve_delay_weight;
                call.into_iter().map(|i| i as usize).collect()
            }
            // No home-cluster instance left: the mesh is the only place to prefill.
            PlacementPlan::Local { .. } if locals.is_empty() => {
                crate::policy::rank_candidates(&candidates, self.s.scenario.auction.top_k, spread)
                    .into_iter()
                    .map(|i| i as usize)
                    .collect()
            }
            PlacementPlan::Local { .. } => Vec::new(),
        };
        let mut bids = Vec::with_capacity(locals.len() + called.len());
        let mut truth = Vec::with_capacity(locals.len() + called.len());
        for i in locals.iter().chain(&called).copied() {
            let ad = self.adverts[i];
            let cached = self.cached(i, r);
            let work_tokens = (tokens - cached).max(0.0);
            let (queue, price_per_ktok) = if self.s.scenario.auction.bids_from_gossip {
                // Decide from the advert alone, extrapolated by what this home sent since.
                (advertised_queue(i), ad.price_per_ktok)
            } else {
                // DESIGN.md §3: the Call is answered by a Bid carrying the bidder's live queue.
                let q = self.quoted_queue_s(i);
                (
                    q,
                    self.pricing.price(
                        1000.0,
                        BidderLoad {
                            queue_delay_s: q,
                            utilisation: ad.utilisation,
                        },
                    ),
                )
            };
            let remote = self.insts[i].remote;
            let work_s = self.work_s_with(i, r, if remote { remote_work } else { local_work });
            let reserve_factor = if remote {
                1.0
            } else {
                self.s.scenario.auction.reserve_price_factor
            };
            let true_price = price_per_ktok * work_tokens / 1000.0 * reserve_factor;
            let factor = match self.s.misreport {
                Some((who, f)) if who == i => f,
                _ => 1.0,
            };
            let bid = Bid {
                bidder: i as u32,
                price: true_price * factor,
                queue_delay_s: queue,
                prefill_s: self.quoted_s(i, r, work_s),
                kv_bytes: if remote { kv_bytes } else { 0.0 },
                reserve: !remote,
            };
            let bw = if remote {
                self.homes[h].bandwidth[i]
            } else {
                f64::INFINITY
            };
            bids.push((bid, bw));
            truth.push(true_price);
        }
        let award = settle(&bids, &scoring)?;
        let w = award.bidder as usize;
        if !award.reserve {
            self.log.utility[w] += award.payment - truth[award.index];
        }
        if self.log.auctions.len() < self.s.record_auctions {
            self.log.auctions.push(
                bids.iter()
                    .zip(&truth)
                    .map(|(&(b, bw), &t)| (b, bw, t))
                    .collect(),
            );
        }
        if !self.s.scenario.auction.bids_from_gossip && bids.iter().any(|(b, _)| !b.reserve) {
            // One Call/Bid round trip across the link before the prompt can be sent.
            self.st[r].call_delay = 2.0 * self.link.latency_s;
        }
        let work = self.work_s(w, r);
        let sent = &mut self.homes[h].sent_since[w];
        *sent = if sent.0 == round {
            (round, sent.1 + work)
        } else {
            (round, work)
        };
        self.st[r].winner = w;
        Some(w)
    }

    /// Mean observed bandwidth from home `h` to the remote peers it believes alive.
    fn home_bandwidth(&self, h: usize) -> f64 {
        let home = &self.homes[h];
        if self.remote_adverts_online == self.n_remote && home.last_dead_round != self.round {
            // Every remote peer is visible: the running sum is the answer.
            return if self.n_remote == 0 {
                0.0
            } else {
                home.remote_bandwidth_sum / self.n_remote as f64
            };
        }
        let (sum, n) = self
            .kind(true)
            .filter(|&i| self.adverts[i].online && home.dead_in_round[i] != self.round)
            .fold((0.0, 0usize), |(s, n), i| (s + home.bandwidth[i], n + 1));
        if n == 0 {
            0.0
        } else {
            sum / n as f64
        }
    }

    /// Each home re-searches its own `t` from its own view (observed bandwidth, advertised
    /// queues of its cluster) with the node's threshold code (no central view).
    fn home_research(&mut self) {
        if !self.s.scenario.auction.adaptive_threshold {
            return;
        }
        // The home cluster's advertised queues: the same for every home.
        let queue = self
            .kind(false)
            .map(|i| self.adverts[i].backlog_s)
            .fold(0.0, f64::max);
        for h in 0..self.homes.len() {
            let bw = self.home_bandwidth(h);
            if bw <= 0.0 {
                continue;
            }
            let inputs = threshold_inputs(
                self.s,
                &self.local_prof,
                &self.remote_prof,
                Observation {
                    egress_utilisation: 0.0,
                    queue_delay_s: queue,
                    bandwidth_bytes_per_s: bw,
                },
            );
            // An infeasible search keeps the home's current `t`.
            let _ = self.homes[h].threshold.update(&inputs, false);
        }
    }

    fn gossip(&mut self) {
        for (i, inst) in self.insts.iter().enumerate() {
            let prev = self.adverts[i];
            let interval = self.s.scenario.auction.gossip_interval_s;
            let util = ((inst.busy_accum - prev.busy_accum) / interval).clamp(0.0, 1.0);
            let backlog = (inst.idle_at - self.now).max(0.0);
            let load = BidderLoad {
                queue_delay_s: backlog,
                utilisation: util,
            };
            self.adverts[i] = Advert {
                at: self.now,
                utilisation: util,
                backlog_s: backlog,
                price_per_ktok: self.pricing.price(1000.0, load),
                online: inst.online,
                busy_accum: inst.busy_accum,
            };
        }
        // A new round: what homes sent since the last adverts, and which peers they found gone,
        // start afresh (a fresh advert from a peer means it is back).
        self.round += 1;
        self.remote_adverts_online = self.kind(true).filter(|&i| self.adverts[i].online).count();
    }

    fn router_check(&mut self) {
        let interval = self.s.scenario.router.check_interval_s;
        let bw = self.link.rate_at(self.now);
        let obs = Observation {
            egress_utilisation: self.window_bytes / (bw * interval),
            queue_delay_s: (0..self.insts.len())
                .map(|i| self.backlog(i))
                .fold(0.0, f64::max),
            bandwidth_bytes_per_s: bw,
        };
        self.window_bytes = 0.0;
        let inputs = threshold_inputs(self.s, &self.local_prof, &self.remote_prof, obs);
        let _ = self.router.update(&inputs, false);
    }

    fn outage(&mut self, start: bool) {
        let detect = match self.kind {
            PolicyKind::Auction => self.s.scenario.auction.failure_timeout_s,
            _ => 0.0,
        };
        for inst in 0..self.insts.len() {
            if !self.insts[inst].remote {
                continue;
            }
            self.insts[inst].online = !start;
            if start {
                let i = &mut self.insts[inst];
                i.epoch += 1;
                i.idle_at = self.now;
                let lost: Vec<usize> = i
                    .running
                    .take()
                    .into_iter()
                    .chain(i.queue.drain(..))
                    .map(|j| j.req)
                    .collect();
                for r in lost {
                    self.retries += 1;
                    let t = self.now + detect;
                    self.push(t, Ev::Retry(r));
                }
            }
        }
        self.remote_online = if start { 0 } else { self.n_remote };
    }

    fn try_decode(&mut self) {
        while self.slots_free > 0 {
            let Some(r) = self.decode_fifo.pop_front() else {
                break;
            };
            self.slots_free -= 1;
            let first_token_s = if self.s.scenario.hardware.first_token_at_prefill {
                0.0
            } else {
                self.step_s
            };
            self.st[r].ttft = self.now + first_token_s - self.s.requests[r].arrival;
            let t = self.now + self.l_out * self.step_s;
            self.push(t, Ev::DecodeDone);
        }
    }

    fn run(&mut self) {
        let n = self.s.requests.len();
        let last_arrival = self.s.requests.last().map_or(0.0, |r| r.arrival);
        // Arrivals in time order (as generated) schedule each other, so the heap holds one of
        // them rather than every request of the run; any other order is scheduled up front.
        self.chained_arrivals = self
            .s
            .requests
            .windows(2)
            .all(|w| w[0].arrival <= w[1].arrival);
        if self.chained_arrivals {
            if let Some(r) = self.s.requests.first() {
                self.push(r.arrival, Ev::Arrival(0));
            }
        } else {
            for (i, r) in self.s.requests.iter().enumerate() {
                self.push(r.arrival, Ev::Arrival(i));
            }
        }
        for o in &self.s.scenario.outage {
            self.push(o.from_s, Ev::OutageStart);
            self.push(o.to_s, Ev::OutageEnd);
        }
        match self.kind {
            PolicyKind::Auction => self.push(0.0, Ev::Gossip),
            PolicyKind::PrfaasRouter => {
                self.push(self.s.scenario.router.check_interval_s, Ev::RouterCheck)
            }
            _ => {}
        }
        while let Some(Entry { t, ev, .. }) = self.heap.pop() {
            self.now = t.0;
            match ev {
                Ev::Arrival(r) => {
                    if let (true, Some(next)) = (self.chained_arrivals, self.s.requests.get(r + 1))
                    {
                        self.push(next.arrival, Ev::Arrival(r + 1));
                    }
                    self.place(r);
                }
                Ev::Retry(r) => self.place(r),
                Ev::PrefillDone { inst, epoch } => {
                    if self.insts[inst].epoch != epoch {
                        continue;
                    }
                    if let Some(job) = self.insts[inst].running.take() {
                        let r = job.req;
                        if job.verify {
                            self.decode_fifo.push_back(r);
                            self.try_decode();
                            self.start_next(inst);
                            continue;
                        }
                        if let Some(q) = &mut self.insts[inst].quote {
                            q.observe(job.tokens, job.work_s);
                        }
                        if let Some((g, _)) = self.s.requests[r].prefix {
                            self.remember_prefix(inst, g);
                        }
                        if self.insts[inst].remote {
                            self.st[r].winner = inst;
                            self.offloaded += 1;
                            self.offloaded_tokens += self.s.requests[r].tokens;
                        }
                        let ready = self.st[r].kv_ready.max(self.now);
                        self.push(ready, Ev::KvReady(r));
                    }
                    self.start_next(inst);
                }
                Ev::KvReady(r) => {
                    let st = self.st[r];
                    // A `pd` home keeps the KV it imported in its own prefix cache.
                    if let (true, Some(own), Some((g, _))) =
                        (st.remote, self.own_instance(r), self.s.requests[r].prefix)
                    {
                        self.remember_prefix(own, g);
                    }
                    if st.remote {
                        // The home measures the transfer when the last byte has arrived.
                        let alpha = self.s.scenario.auction.bandwidth_ewma_alpha;
                        let home = &mut self.homes[st.home];
                        let bw = &mut home.bandwidth[st.winner];
                        let old = *bw;
                        *bw = (1.0 - alpha) * old + alpha * st.bw_sample;
                        home.remote_bandwidth_sum += *bw - old;
                    }
                    // A `pd` home verifies imported KV on its own compute before decoding it.
                    let verify_s = self.verify_s(self.s.requests[r].tokens);
                    match self.own_instance(r) {
                        Some(own) if st.remote && verify_s > 0.0 => {
                            self.enqueue_verify(own, r, verify_s)
                        }
                        _ => {
                            self.decode_fifo.push_back(r);
                            self.try_decode();
                        }
                    }
                }
                Ev::DecodeDone => {
                    self.slots_free += 1;
                    self.completed += 1;
                    self.completion_times.push(self.now);
                    if self.completed == n {
                        break;
                    }
                    self.try_decode();
                }
                Ev::Gossip => {
                    self.gossip();
                    self.home_research();
                    if self.now <= last_arrival {
                        let t = self.now + self.s.scenario.auction.gossip_interval_s;
                        self.push(t, Ev::Gossip);
                    }
                }
                Ev::RouterCheck => {
                    self.router_check();
                    if self.now <= last_arrival {
                        let t = self.now + self.s.scenario.router.check_interval_s;
                        self.push(t, Ev::RouterCheck);
                    }
                }
                Ev::OutageStart => self.outage(true),
                Ev::OutageEnd => self.outage(false),
            }
        }
    }
}

/// What the router and every home pass to the threshold search: the run's profiles, split and
/// length distribution with what they observe now.
fn threshold_inputs<'b>(
    s: &'b RunSetup<'b>,
    local: &'b PrefillProfile,
    remote: &'b PrefillProfile,
    observation: Observation,
) -> ThresholdInputs<'b> {
    ThresholdInputs {
        local_prefill: local,
        remote_prefill: remote,
        decode: &s.model.decode,
        output_tokens: s.model.output_tokens,
        split: s.split,
        dist: s.dist,
        observation,
    }
}

/// Highest acceptable score (price units); far above any real bid, so it only matters for a lone bid.
pub const MAX_SCORE: f64 = 1e6;

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let k = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[k.min(sorted.len() - 1)]
}

/// Run one policy over the shared requests.
pub fn run_policy(setup: &RunSetup<'_>, kind: PolicyKind) -> (RunMetrics, AuctionLog) {
    let sc = setup.scenario;
    let hw = &sc.hardware;
    // Profiles were validated when the scenario loaded.
    let remote_prof = setup.model.remote_prefill.clone();
    let local_prof = setup.model.local_prefill.clone();
    let decode = &setup.model.decode;
    let bs = u64::from(decode.max_batch());
    let n_remote = if kind == PolicyKind::Homogeneous {
        0
    } else {
        setup.split.prfaas as usize
    };
    let n_local = if kind == PolicyKind::NaiveHeterogeneous {
        0
    } else {
        setup.split.prefill as usize
    };
    let inst = |remote| Instance {
        remote,
        queue: VecDeque::new(),
        running: None,
        idle_at: 0.0,
        epoch: 0,
        online: true,
        cache: VecDeque::new(),
        busy_accum: 0.0,
        quote: if remote {
            hw.remote_quote_tokens_per_s
        } else {
            hw.local_quote_tokens_per_s
        }
        .filter(|&r| r > 0.0)
        .map(QuoteRate::new),
    };
    let insts: Vec<Instance> = (0..n_remote)
        .map(|_| inst(true))
        .chain((0..n_local).map(|_| inst(false)))
        .collect();
    let gbps = |g: f64| g * 1e9 / 8.0;
    let mut steps = vec![(0.0, gbps(sc.link.bandwidth_gbps))];
    let mut sched = sc.link.schedule.clone();
    sched.sort_by(|a, b| a.at_s.total_cmp(&b.at_s));
    for s in sched {
        if s.at_s <= 0.0 {
            steps[0].1 = gbps(s.gbps);
        } else {
            steps.push((s.at_s, gbps(s.gbps)));
        }
    }
    let nominal = steps[0].1;
    // What every home believes of the link before its first transfer.
    let believed = sc
        .link
        .estimate_start_gbps
        .filter(|g| *g > 0.0)
        .map_or(nominal, gbps);
    let n_homes = setup.split.decode.max(1) as usize;
    let ni = insts.len();
    let a = &sc.auction;
    // Every threshold starts where the model's search at nominal bandwidth put it, as if that
    // search had just run.
    let mut tracker = ThresholdTracker::new(
        setup.threshold,
        ReSearchTrigger {
            egress_utilisation_high: sc.router.egress_utilisation_high,
            queue_delay_high_s: sc.router.queue_delay_high_s,
            bandwidth_change_factor: sc.router.bandwidth_change_factor,
        },
    );
    tracker.searched_bandwidth = believed;
    let mut sim = Sim {
        s: setup,
        kind,
        remote_prof,
        local_prof,
        step_s: decode.step_time(decode.max_batch()),
        l_out: f64::from(sc.workload.output_tokens),
        slots_free: u64::from(setup.split.decode) * bs,
        decode_fifo: VecDeque::new(),
        insts,
        n_remote,
        remote_online: n_remote,
        link: Link {
            steps,
            free_at: 0.0,
            latency_s: sc.link.latency_ms / 1000.0,
            layers: f64::from(sc.link.kv_layers),
        },
        heap: BinaryHeap::new(),
        chained_arrivals: false,
        seq: 0,
        now: 0.0,
        st: (0..setup.requests.len())
            .map(|i| ReqState {
                home: i % n_homes,
                ..Default::default()
            })
            .collect(),
        completed: 0,
        completion_times: Vec::with_capacity(setup.requests.len()),
        router: tracker.clone(),
        window_bytes: 0.0,
        round: 0,
        remote_adverts_online: n_remote,
        homes: (0..n_homes)
            .map(|_| Home {
                bandwidth: vec![believed; ni],
                remote_bandwidth_sum: believed * n_remote as f64,
                sent_since: vec![(u64::MAX, 0.0); ni],
                dead_in_round: vec![u64::MAX; ni],
                last_dead_round: u64::MAX,
                threshold: tracker
                    .clone()
                    .with_bounds(a.threshold_floor_tokens, f64::INFINITY),
            })
            .collect(),
        adverts: vec![
            Advert {
                online: true,
                ..Default::default()
            };
            ni
        ],
        // Validated in `Scenario::validate`; fall back to a neutral price if called without it.
        pricing: PricingParams::new(
            a.base_per_ktok,
            a.queue_premium_per_s,
            a.utilisation_premium,
        )
        .unwrap_or(PricingParams {
            base_per_ktok: 0.0,
            queue_premium_per_s: 0.0,
            utilisation_premium: 0.0,
        }),
        // A finite cap keeps a lone bidder's posted-reserve payment finite.
        scoring: ScoringParams {
            lambda_per_s: a.lambda_per_s,
            max_score: MAX_SCORE,
            reserve_delay_weight: 1.0,
        },
        log: AuctionLog {
            auctions: Vec::new(),
            utility: vec![0.0; ni],
        },
        egress_bytes: 0.0,
        offloaded: 0,
        offloaded_tokens: 0.0,
        retries: 0,
    };
    sim.run();
    let n = setup.requests.len();
    let mut ttfts: Vec<f64> = sim.st.iter().map(|s| s.ttft).filter(|&t| t > 0.0).collect();
    ttfts.sort_by(f64::total_cmp);
    let mean = if ttfts.is_empty() {
        f64::NAN
    } else {
        ttfts.iter().sum::<f64>() / ttfts.len() as f64
    };
    let first = setup.requests.first().map_or(0.0, |r| r.arrival);
    let last = setup.requests.last().map_or(0.0, |r| r.arrival);
    let ct = &sim.completion_times;
    let warm = ct.len() / 10;
    let throughput = if ct.len() > warm + 1 {
        (ct.len() - warm - 1) as f64 / (ct[ct.len() - 1] - ct[warm]).max(1e-9)
    } else {
        0.0
    };
    let metrics = RunMetrics {
        policy: kind,
        requests: n,
        completed: sim.completed,
        throughput_per_s: throughput,
        ttft_mean_s: mean,
        ttft_p50_s: percentile(&ttfts, 0.5),
        ttft_p90_s: percentile(&ttfts, 0.9),
        ttft_p99_s: percentile(&ttfts, 0.99),
        offload_fraction: sim.offloaded as f64 / n.max(1) as f64,
        mean_offloaded_tokens: if sim.offloaded > 0 {
            sim.offloaded_tokens / sim.offloaded as f64
        } else {
            0.0
        },
        egress_gbps: sim.egress_bytes * 8.0 / 1e9 / (last - first).max(1e-9),
        researches: match kind {
            PolicyKind::Auction => sim.homes.iter().map(|h| h.threshold.researches).sum(),
            _ => sim.router.researches,
        } as u32,
        final_threshold: match kind {
            PolicyKind::Auction => sim
                .homes
                .first()
                .map_or(sim.router.threshold, |h| h.threshold.threshold),
            _ => sim.router.threshold,
        },
        retries: sim.retries,
        ttfts,
        ttft_by_request: sim
            .st
            .iter()
            .map(|s| if s.ttft > 0.0 { s.ttft } else { f64::NAN })
            .collect(),
        remote_by_request: sim.st.iter().map(|s| s.remote).collect(),
        last_completion_s: ct.last().copied().unwrap_or(0.0),
    };
    let _ = hw;
    (metrics, sim.log)
}
