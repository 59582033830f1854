//! Bounded online estimates a node keeps of itself, turned into the profiles and distributions the
//! throughput model takes: prefill time vs length, decode step time vs batch, and the lengths of
//! the uncached prompts it homes. Fixed log-spaced buckets, so memory is bounded whatever runs.

use serde::{Deserialize, Serialize};

use super::profile::{DecodeProfile, PrefillProfile, ProfilePoint};
use super::workload::LengthDistribution;
use super::PolicyError;

/// Weight of a new sample in a bucket's moving average.
const EWMA_ALPHA: f64 = 0.3;
/// Prefill length buckets: powers of two from 2^4 to 2^21 tokens.
const PREFILL_BUCKETS: usize = 18;
/// Length histogram: quarter-octave buckets from 1 to 2^22 tokens.
const LENGTH_BUCKETS: usize = 88;
/// Histogram weight at which every bucket is halved (old prompts fade, counts stay bounded).
const LENGTH_HALVE_AT: f64 = 4096.0;

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
struct Avg {
    x: f64,
    y: f64,
    n: u64,
}

impl Avg {
    fn add(&mut self, x: f64, y: f64) {
        if self.n == 0 {
            (self.x, self.y) = (x, y);
        } else {
            self.x += EWMA_ALPHA * (x - self.x);
            self.y += EWMA_ALPHA * (y - self.y);
        }
        self.n = self.n.saturating_add(1);
    }
}

/// Measured prefill time vs prompt length (moving averages in power-of-two length buckets).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PrefillEstimator {
    buckets: Vec<Avg>,
}

impl Default for PrefillEstimator {
    fn default() -> Self {
        Self {
            buckets: vec![Avg::default(); PREFILL_BUCKETS],
        }
    }
}

impl PrefillEstimator {
    /// Records a prefill of `tokens` that took `seconds`. Nonsense (NaN, zero) is ignored.
    pub fn observe(&mut self, tokens: f64, seconds: f64) {
        if !(tokens.is_finite() && seconds.is_finite() && tokens >= 1.0 && seconds > 0.0) {
            return;
        }
        let b = (tokens.log2().floor() as i64 - 4).clamp(0, PREFILL_BUCKETS as i64 - 1) as usize;
        self.buckets[b].add(tokens, seconds);
    }

    /// Measured `(tokens, seconds)` points, ascending, made non-decreasing in time (a longer
    /// prompt never costs less; a noisy short sample is raised to its predecessor's).
    pub fn points(&self) -> Vec<(f64, f64)> {
        let mut out: Vec<(f64, f64)> = Vec::new();
        for a in self.buckets.iter().filter(|a| a.n > 0) {
            let y = out.last().map_or(a.y, |p| a.y.max(p.1));
            if out.last().is_none_or(|p| a.x > p.0) {
                out.push((a.x, y));
            }
        }
        out
    }

    /// The profile, with `kv_bytes(tokens)` from the KV layout. With one measured point the
    /// profile is linear through it and the origin; with none, `fallback_tokens_per_s` is used.
    pub fn profile(
        &self,
        kv_bytes: impl Fn(f64) -> f64,
        fallback_tokens_per_s: f64,
    ) -> Result<PrefillProfile, PolicyError> {
        let mut pts = self.points();
        if pts.is_empty() {
            let r = fallback_tokens_per_s;
            if !(r.is_finite() && r > 0.0) {
                return Err(PolicyError::TooFewPoints("measured prefill"));
            }
            pts.push((1024.0, 1024.0 / r));
        }
        if pts.len() == 1 {
            let (x, y) = pts[0];
            pts.push((x * 16.0, y * 16.0));
        }
        points_to_profile(&pts, kv_bytes)
    }
}

/// A profile from measured `(uncached tokens, seconds)` points (a node's own, or a peer's
/// advert) and the layout's KV size; read by uncached length
/// ([`PrefillProfile::measured_by_uncached`]).
pub fn points_to_profile(
    points: &[(f64, f64)],
    kv_bytes: impl Fn(f64) -> f64,
) -> Result<PrefillProfile, PolicyError> {
    let mut pts: Vec<(f64, f64)> = points.to_vec();
    pts.sort_by(|a, b| a.0.total_cmp(&b.0));
    pts.dedup_by(|b, a| b.0 <= a.0);
    // Monotone in time, as `PrefillProfile` requires (measurements are noisy).
    for i in 1..pts.len() {
        pts[i].1 = pts[i].1.max(pts[i - 1].1);
    }
    if pts.len() == 1 {
        let (x, y) = pts[0];
        pts.push((x * 16.0, y * 16.0));
    }
    Ok(PrefillProfile::new(
        pts.into_iter()
            .map(|(tokens, prefill_s)| ProfilePoint {
                tokens,
                prefill_s,
                kv_bytes: kv_bytes(tokens).max(1.0),
            })
            .collect(),
    )?
    .measured_by_uncached())
}

/// Measured decode step time vs batch size (power-of-two batch buckets).
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct DecodeEstimator {
    buckets: Vec<Avg>,
}

impl DecodeEstimator {
    /// Most buckets (batch up to 2^15).
    const BUCKETS: usize = 16;

    /// Records one decode step of `batch` sequences that took `seconds`.
    pub fn observe(&mut self, batch: usize, seconds: f64) {
        if batch == 0 || !(seconds.is_finite() && seconds > 0.0) {
            return;
        }
        if self.buckets.is_empty() {
            self.buckets = vec![Avg::default(); Self::BUCKETS];
        }
        let b = (batch.ilog2() as usize).min(Self::BUCKETS - 1);
        self.buckets[b].add(batch as f64, seconds);
    }

    /// Measured `(batch, seconds)` points, ascending, made non-decreasing in time.
    pub fn points(&self) -> Vec<(f64, f64)> {
        let mut pts: Vec<(f64, f64)> = Vec::new();
        for a in self.buckets.iter().filter(|a| a.n > 0) {
            let y = pts.last().map_or(a.y, |p: &(f64, f64)| a.y.max(p.1));
            if pts.last().is_none_or(|p| a.x > p.0) {
                pts.push((a.x, y));
            }
        }
        pts
    }

    /// Step time at `max_batch` from the measurements (flat beyond the measured batches).
    /// The profile's SLO is that step's speed, so `BS_max = max_batch`: the node decodes as many
    /// sequences as it is configured to, at the speed it measured. `None` before any step.
    pub fn profile(&self, max_batch: usize) -> Option<DecodeProfile> {
        decode_points_to_profile(&self.points(), max_batch)
    }
}

/// A decode profile from measured `(batch, seconds)` points (a node's own, or exported from one)
/// for a node that runs at most `max_batch` sequences; see [`DecodeEstimator::profile`].
pub fn decode_points_to_profile(points: &[(f64, f64)], max_batch: usize) -> Option<DecodeProfile> {
    let mut pts: Vec<(f64, f64)> = points
        .iter()
        .copied()
        .filter(|p| p.0.is_finite() && p.1.is_finite() && p.0 >= 1.0 && p.1 > 0.0)
        .collect();
    pts.sort_by(|a, b| a.0.total_cmp(&b.0));
    pts.dedup_by(|b, a| b.0 <= a.0);
    for i in 1..pts.len() {
        pts[i].1 = pts[i].1.max(pts[i - 1].1);
    }
    let max_batch = max_batch.max(1) as f64;
    pts.retain(|p| p.0 <= max_batch);
    let last = *pts.last()?;
    if last.0 < max_batch {
        // Flat beyond what was measured: the step at the largest measured batch.
        pts.push((max_batch, last.1));
    }
    let at_max = last.1.max(1e-9);
    // A node never runs more than its configured batch: a step far over the SLO just past
    // it makes `BS_max` exactly `max_batch`.
    pts.push((max_batch + 1.0, at_max * 1e3));
    DecodeProfile::new(pts, 1.0 / at_max).ok()
}

/// The prefill speed a node quotes in its bids and reserve estimates: a moving average of the
/// tokens/s its prefills achieved, starting at its start-up calibration. A prompt's speed
/// depends on its length, so the quote moves with the mix the node just served; the node's
/// compute thread and the simulator's instances both keep one, so a replay quotes what the node
/// quoted at that point of the run, not its final figure.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct QuoteRate {
    start: f64,
    now: f64,
}

impl Default for QuoteRate {
    /// Nothing measured: 1 token/s (the floor).
    fn default() -> Self {
        Self::new(1.0)
    }
}

impl QuoteRate {
    /// Prefills shorter than this (uncached tokens) measure overheads, not throughput: skipped.
    pub const MIN_TOKENS: f64 = 64.0;

    /// Starting at `tokens_per_s` (floored at 1 token/s).
    pub fn new(tokens_per_s: f64) -> Self {
        let start = if tokens_per_s.is_finite() {
            tokens_per_s.max(1.0)
        } else {
            1.0
        };
        Self { start, now: start }
    }

    /// One served prefill of `tokens` uncached tokens that took `seconds`.
    pub fn observe(&mut self, tokens: f64, seconds: f64) {
        if !(tokens >= Self::MIN_TOKENS && seconds.is_finite()) {
            return;
        }
        let rate = tokens / seconds.max(1e-6);
        self.now = (1.0 - EWMA_ALPHA) * self.now + EWMA_ALPHA * rate;
    }

    /// The rate quoted now (tokens/s).
    pub fn tokens_per_s(&self) -> f64 {
        self.now
    }

    /// The rate it started at.
    pub fn start_tokens_per_s(&self) -> f64 {
        self.start
    }
}

/// What one node measured of itself, in a form it can export (`/mesh`, `prfaas bench e2e`) and
/// the simulator can replay: prefill time vs uncached length, decode step time vs batch, its
/// batch limit, and the KV bytes its layout ships at a few lengths.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MeasuredProfile {
    /// `(tokens, seconds)` of measured prefills, ascending.
    pub prefill: Vec<(f64, f64)>,
    /// Prefill speed assumed where nothing is measured yet, and quoted now (tokens/s): the
    /// node's [`QuoteRate`] at export.
    pub prefill_tokens_per_s: f64,
    /// The [`QuoteRate`] the node started with (its start-up calibration); 0 where unknown
    /// (older exports): a replay then starts its quotes at `prefill_tokens_per_s`.
    #[serde(default)]
    pub prefill_start_tokens_per_s: f64,
    /// `(prompt tokens, seconds)` a `pd` home's compute spent turning imported KV into a
    /// decoding sequence (verifying it), ascending; empty where it imported nothing.
    #[serde(default)]
    pub import: Vec<(f64, f64)>,
    /// `(batch, seconds)` of measured decode steps, ascending.
    pub decode: Vec<(f64, f64)>,
    /// Most sequences the node decodes at once.
    pub max_batch: usize,
    /// `(tokens, bytes)` of KV shipped for a prompt of that length.
    pub kv_bytes: Vec<(f64, f64)>,
}

impl MeasuredProfile {
    /// Lengths at which [`Self::kv_bytes`] is sampled: the layout is affine in the length (a
    /// fixed state plus a per-token part), or piecewise so where a sliding window saturates.
    pub const KV_SAMPLE_TOKENS: [f64; 6] = [1.0, 512.0, 1024.0, 4096.0, 32768.0, 131072.0];

    /// From a node's estimators (prefills, imports, decode steps), its quote and its layout's
    /// `kv_bytes(tokens)`.
    pub fn new(
        prefill: &PrefillEstimator,
        quote: QuoteRate,
        import: &PrefillEstimator,
        decode: &DecodeEstimator,
        max_batch: usize,
        kv_bytes: impl Fn(f64) -> f64,
    ) -> Self {
        Self {
            prefill: prefill.points(),
            prefill_tokens_per_s: quote.tokens_per_s(),
            prefill_start_tokens_per_s: quote.start_tokens_per_s(),
            import: import.points(),
            decode: decode.points(),
            max_batch,
            kv_bytes: Self::KV_SAMPLE_TOKENS
                .iter()
                .map(|&t| (t, kv_bytes(t)))
                .collect(),
        }
    }

    /// The rate the node's quotes started at (its calibration, or the final quote for an
    /// export without one).
    pub fn quote_start_tokens_per_s(&self) -> f64 {
        if self.prefill_start_tokens_per_s > 0.0 {
            self.prefill_start_tokens_per_s
        } else {
            self.prefill_tokens_per_s
        }
    }

    /// KV bytes at `tokens`, interpolated between the sampled lengths.
    pub fn kv_bytes_at(&self, tokens: f64) -> f64 {
        // Exported figures may come from a file: sort and drop repeated lengths first.
        let mut k: Vec<(f64, f64)> = self
            .kv_bytes
            .iter()
            .copied()
            .filter(|p| p.0.is_finite() && p.1.is_finite())
            .collect();
        k.sort_by(|a, b| a.0.total_cmp(&b.0));
        k.dedup_by(|b, a| b.0 <= a.0);
        match k.len() {
            0 => 0.0,
            1 => k[0].1,
            _ => super::profile::lerp_extrapolate(&k, tokens).max(0.0),
        }
    }

    /// The prefill profile (see [`PrefillEstimator::profile`] for one or no measured point).
    pub fn prefill_profile(&self) -> Result<PrefillProfile, PolicyError> {
        let mut e = PrefillEstimator::default();
        for &(t, s) in &self.prefill {
            e.observe(t, s);
        }
        e.profile(|t| self.kv_bytes_at(t), self.prefill_tokens_per_s)
    }

    /// The decode profile, `None` before the node decoded anything.
    pub fn decode_profile(&self) -> Option<DecodeProfile> {
        decode_points_to_profile(&self.decode, self.max_batch)
    }
}

/// Bounded histogram of uncached prompt lengths (quarter-octave buckets, old samples fading).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LengthHistogram {
    weight: Vec<f64>,
    mass: Vec<f64>,
    samples: u64,
}

impl Default for LengthHistogram {
    fn default() -> Self {
        Self {
            weight: vec![0.0; LENGTH_BUCKETS],
            mass: vec![0.0; LENGTH_BUCKETS],
            samples: 0,
        }
    }
}

impl LengthHistogram {
    /// Records one prompt of `tokens` uncached tokens (0 counts as 1).
    pub fn observe(&mut self, tokens: f64) {
        if !tokens.is_finite() || tokens < 0.0 {
            return;
        }
        let t = tokens.max(1.0);
        let b = ((t.log2() * 4.0).floor() as usize).min(LENGTH_BUCKETS - 1);
        self.weight[b] += 1.0;
        self.mass[b] += t;
        self.samples = self.samples.saturating_add(1);
        if self.weight.iter().sum::<f64>() > LENGTH_HALVE_AT {
            self.weight.iter_mut().for_each(|w| *w *= 0.5);
            self.mass.iter_mut().for_each(|m| *m *= 0.5);
        }
    }

    /// Prompts recorded since start.
    pub fn samples(&self) -> u64 {
        self.samples
    }

    /// The distribution (each bucket at its mean length), or `None` while empty.
    pub fn distribution(&self) -> Option<LengthDistribution> {
        let pts: Vec<(f64, f64)> = self
            .weight
            .iter()
            .zip(&self.mass)
            .filter(|(w, _)| **w > 1e-9)
            .map(|(w, m)| (m / w, *w))
            .collect();
        LengthDistribution::from_weighted(pts).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quote_rate_follows_served_prefills_and_skips_short_ones() {
        let mut q = QuoteRate::new(1000.0);
        q.observe(32.0, 1.0);
        assert_eq!(
            q.tokens_per_s(),
            1000.0,
            "a short prefill measures overhead"
        );
        q.observe(f64::NAN, 1.0);
        q.observe(1000.0, f64::INFINITY);
        assert_eq!(q.tokens_per_s(), 1000.0, "non-finite samples are ignored");
        q.observe(2000.0, 1.0);
        assert!((q.tokens_per_s() - (0.7 * 1000.0 + 0.3 * 2000.0)).abs() < 1e-9);
        assert_eq!(q.start_tokens_per_s(), 1000.0);
        assert_eq!(QuoteRate::new(f64::NAN).tokens_per_s(), 1.0);
    }

    #[test]
    fn prefill_estimate_is_monotone_and_falls_back() {
        let mut e = PrefillEstimator::default();
        let kv = |t: f64| 1000.0 + 10.0 * t;
        let p = e.profile(kv, 100.0).unwrap();
        assert!((p.prefill_time(1024.0) - 10.24).abs() < 1e-9);
        assert!(e.profile(kv, 0.0).is_err());
        e.observe(100.0, 0.1);
        e.observe(1000.0, 0.5);
        e.observe(5000.0, 0.4); // noise: faster than a shorter one
        for bad in [
            (f64::NAN, 1.0),
            (10.0, 0.0),
            (0.0, 1.0),
            (10.0, f64::INFINITY),
        ] {
            e.observe(bad.0, bad.1);
        }
        let pts = e.points();
        assert_eq!(pts.len(), 3);
        assert!(pts.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1));
        let p = e.profile(kv, 100.0).unwrap();
        assert!((p.kv_bytes(1000.0) - 11_000.0).abs() < 1e-6);
        // Bounded: a million samples fit the same buckets.
        for i in 0..1_000_000u64 {
            e.observe((i % 3_000_000 + 1) as f64, 1.0 + i as f64);
        }
        assert!(e.points().len() <= PREFILL_BUCKETS);
    }

    #[test]
    fn decode_profile_caps_at_the_configured_batch() {
        let mut d = DecodeEstimator::default();
        assert!(d.profile(16).is_none());
        d.observe(1, 0.010);
        let p = d.profile(16).unwrap();
        assert_eq!(p.max_batch(), 16);
        d.observe(8, 0.020);
        d.observe(0, 1.0);
        let p = d.profile(16).unwrap();
        assert_eq!(p.max_batch(), 16);
        assert!((p.step_time(8) - 0.020).abs() < 1e-9);
    }

    #[test]
    fn histogram_is_bounded_and_tracks_recent_lengths() {
        let mut h = LengthHistogram::default();
        assert!(h.distribution().is_none());
        for _ in 0..10_000 {
            h.observe(100.0);
        }
        h.observe(f64::NAN);
        h.observe(-1.0);
        for _ in 0..10_000 {
            h.observe(10_000.0);
        }
        let d = h.distribution().unwrap();
        assert_eq!(h.samples(), 20_000);
        assert!(d.lengths().len() <= LENGTH_BUCKETS);
        // The newer long prompts dominate after halving.
        assert!(d.mean() > 5_000.0, "{}", d.mean());
        assert!((d.lengths()[0] - 100.0).abs() < 1e-9);
    }
}
