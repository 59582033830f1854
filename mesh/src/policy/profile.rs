//! Profile curves: prefill time and KV size vs prompt length, decode step time vs batch size.

use serde::{Deserialize, Serialize};

use super::PolicyError;

/// One measured point of a prefill instance: a prompt of `tokens` takes `prefill_s` seconds and
/// produces `kv_bytes` of KV cache (hybrid models: a fixed linear-attention state plus a per-token
/// part for the few full-attention layers).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ProfilePoint {
    /// Prompt length in tokens.
    pub tokens: f64,
    /// Prefill wall time in seconds for the whole prompt on one instance.
    pub prefill_s: f64,
    /// KV cache bytes produced.
    pub kv_bytes: f64,
}

/// Piecewise-linear prefill profile `T_prefill(l)` and `S_kv(l)` of one instance type.
///
/// Between points it interpolates linearly; outside it extrapolates the end segments, because the
/// paper's table starts at 1K tokens while the workload starts at 128 and ends at 128K.
#[derive(Debug, Clone, PartialEq)]
pub struct PrefillProfile {
    points: Vec<ProfilePoint>,
    time_curve: Vec<(f64, f64)>,
    size_curve: Vec<(f64, f64)>,
    /// The points time prefills of `tokens` *uncached* tokens (what a node measures of itself:
    /// each prefill after its prefix-cache hit), rather than of whole fresh prompts.
    by_uncached: bool,
}

pub(crate) fn lerp_extrapolate(xs: &[(f64, f64)], x: f64) -> f64 {
    // `xs` is validated: at least two points with strictly increasing x.
    let n = xs.len();
    let seg = if x <= xs[0].0 {
        0
    } else if x >= xs[n - 1].0 {
        n - 2
    } else {
        xs.partition_point(|p| p.0 <= x)
            .saturating_sub(1)
            .min(n - 2)
    };
    let (x0, y0) = xs[seg];
    let (x1, y1) = xs[seg + 1];
    y0 + (x - x0) * (y1 - y0) / (x1 - x0)
}

impl PrefillProfile {
    /// Validate and build. Points must have strictly increasing, positive `tokens` and positive,
    /// non-decreasing time and size (a longer prompt never costs less).
    pub fn new(mut points: Vec<ProfilePoint>) -> Result<Self, PolicyError> {
        const WHAT: &str = "prefill";
        if points.len() < 2 {
            return Err(PolicyError::TooFewPoints(WHAT));
        }
        points.sort_by(|a, b| a.tokens.total_cmp(&b.tokens));
        for (index, p) in points.iter().enumerate() {
            let finite = p.tokens.is_finite() && p.prefill_s.is_finite() && p.kv_bytes.is_finite();
            if !finite || p.tokens <= 0.0 || p.prefill_s <= 0.0 || p.kv_bytes <= 0.0 {
                return Err(PolicyError::BadPoint {
                    what: WHAT,
                    index,
                    why: "values must be finite and > 0",
                });
            }
            if index > 0 {
                let q = points[index - 1];
                if p.tokens <= q.tokens {
                    return Err(PolicyError::BadPoint {
                        what: WHAT,
                        index,
                        why: "duplicate token count",
                    });
                }
                if p.prefill_s < q.prefill_s || p.kv_bytes < q.kv_bytes {
                    return Err(PolicyError::BadPoint {
                        what: WHAT,
                        index,
                        why: "time and size must not decrease",
                    });
                }
            }
        }
        let time_curve = points.iter().map(|p| (p.tokens, p.prefill_s)).collect();
        let size_curve = points.iter().map(|p| (p.tokens, p.kv_bytes)).collect();
        Ok(Self {
            points,
            time_curve,
            size_curve,
            by_uncached: false,
        })
    }

    /// The same points read as prefill time vs *uncached* length (a node's own measurements):
    /// a prompt with a cached prefix then costs `T(total − cached)` (see
    /// [`Self::incremental_prefill_time`]).
    pub fn measured_by_uncached(mut self) -> Self {
        self.by_uncached = true;
        self
    }

    /// The validated points, sorted by length.
    pub fn points(&self) -> &[ProfilePoint] {
        &self.points
    }

    /// `T_prefill(l)` in seconds for a prompt of `tokens` with nothing cached. Never below a
    /// tenth of the first point, so an extrapolation to tiny prompts stays positive.
    ///
    /// Beyond the longest point, a measured profile ([`Self::measured_by_uncached`]) extrapolates
    /// the *time per token* linearly when its last two points show it growing: attention makes
    /// each token cost time proportional to the context before it, so prefill time is quadratic
    /// in the length, and extending the last segment of a node that has only prefilled short
    /// prompts underestimates long ones (measured: 5.95 s predicted for a 2,078-token prompt that
    /// took 12.1 s, from points up to 1,033 tokens). A table given in full (the paper's, up to
    /// 128K) keeps its end segment.
    pub fn prefill_time(&self, tokens: f64) -> f64 {
        let floor = self.points[0].prefill_s * 0.1;
        let tokens = tokens.max(0.0);
        let n = self.time_curve.len();
        let (l1, t1) = self.time_curve[n - 2];
        let (l2, t2) = self.time_curve[n - 1];
        let (r1, r2) = (t1 / l1, t2 / l2);
        if self.by_uncached && tokens > l2 && r2 > r1 {
            let per_token = r2 + (tokens - l2) * (r2 - r1) / (l2 - l1);
            return (tokens * per_token).max(floor);
        }
        lerp_extrapolate(&self.time_curve, tokens).max(floor)
    }

    /// Prefill time when the first `cached` tokens are already in the prefix cache: the cost of
    /// the uncached suffix, `T(total) − T(cached)`, plus the fixed per-request overhead `T(0)`
    /// once (the cached part already paid its overhead when it was computed).
    /// A profile measured by uncached length answers `T(total − cached)` directly: its points
    /// already are such prefills, and differencing a noisy measured curve (a flat segment, a
    /// steep one) would charge a short remainder the slope of much longer prompts.
    pub fn incremental_prefill_time(&self, total: f64, cached: f64) -> f64 {
        let cached = cached.clamp(0.0, total.max(0.0));
        if cached <= 0.0 {
            return self.prefill_time(total);
        }
        if self.by_uncached {
            return self.prefill_time(total - cached);
        }
        let overhead = self.prefill_time(0.0);
        (self.prefill_time(total) - self.prefill_time(cached) + overhead).max(overhead)
    }

    /// `S_kv(l)` in bytes.
    pub fn kv_bytes(&self, tokens: f64) -> f64 {
        let floor = self.points[0].kv_bytes * 0.1;
        lerp_extrapolate(&self.size_curve, tokens.max(0.0)).max(floor)
    }

    /// KV bytes that must cross the link when the receiver already holds a prefix of `held`
    /// tokens: the per-token part of the held prefix need not be sent again.
    pub fn kv_bytes_to_ship(&self, total: f64, held: f64) -> f64 {
        let held = held.clamp(0.0, total.max(0.0));
        let per_token_held = self.kv_bytes(held) - self.kv_bytes(0.0);
        (self.kv_bytes(total) - per_token_held.max(0.0)).max(0.0)
    }

    /// `Φ_kv(l) = S_kv(l) / T_prefill(l)` in bytes/s: the egress one instance needs to stay busy.
    pub fn kv_throughput(&self, tokens: f64) -> f64 {
        self.kv_bytes(tokens) / self.prefill_time(tokens)
    }

    /// The same instance type with every prefill time multiplied by `factor(tokens)`; used to
    /// derive a slower GPU's profile from a reference one (see `configs/sim-paper-case.toml`).
    pub fn time_scaled(&self, factor: impl Fn(f64) -> f64) -> Result<Self, PolicyError> {
        let mut p = Self::new(
            self.points
                .iter()
                .map(|p| ProfilePoint {
                    prefill_s: p.prefill_s * factor(p.tokens),
                    ..*p
                })
                .collect(),
        )?;
        p.by_uncached = self.by_uncached;
        Ok(p)
    }
}

/// Decode step time vs batch size for one decode instance, and the tokens/s SLO that caps the batch.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodeProfile {
    points: Vec<(f64, f64)>,
    slo_tokens_per_s: f64,
}

impl DecodeProfile {
    /// `points` are `(batch, step_seconds)`, strictly increasing in batch and non-decreasing in
    /// time; `slo_tokens_per_s` is the per-request decode speed promised to users.
    pub fn new(mut points: Vec<(f64, f64)>, slo_tokens_per_s: f64) -> Result<Self, PolicyError> {
        const WHAT: &str = "decode";
        super::check_range("slo_tokens_per_s", slo_tokens_per_s, 1e-6, 1e9)?;
        if points.len() < 2 {
            return Err(PolicyError::TooFewPoints(WHAT));
        }
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
        for (index, &(b, s)) in points.iter().enumerate() {
            if !(b.is_finite() && s.is_finite() && b >= 1.0 && s > 0.0) {
                return Err(PolicyError::BadPoint {
                    what: WHAT,
                    index,
                    why: "batch ≥ 1 and step > 0",
                });
            }
            if index > 0 && (b <= points[index - 1].0 || s < points[index - 1].1) {
                return Err(PolicyError::BadPoint {
                    what: WHAT,
                    index,
                    why: "must increase in batch",
                });
            }
        }
        let profile = Self {
            points,
            slo_tokens_per_s,
        };
        if profile.max_batch() == 0 {
            return Err(PolicyError::Infeasible(
                "decode SLO cannot be met even at batch 1",
            ));
        }
        Ok(profile)
    }

    /// Step time in seconds at `batch` concurrent sequences.
    pub fn step_time(&self, batch: u32) -> f64 {
        lerp_extrapolate(&self.points, f64::from(batch.max(1))).max(1e-9)
    }

    /// The per-request tokens/s SLO.
    pub fn slo_tokens_per_s(&self) -> f64 {
        self.slo_tokens_per_s
    }

    /// `BS_max`: the largest batch whose step time still meets the SLO (0 if none).
    pub fn max_batch(&self) -> u32 {
        let budget = 1.0 / self.slo_tokens_per_s;
        // Step time is monotone, so binary search over a generous range.
        let (mut lo, mut hi) = (0u32, 1u32 << 20);
        while lo < hi {
            let mid = lo + (hi - lo).div_ceil(2);
            if self.step_time(mid) <= budget * (1.0 + 1e-12) {
                lo = mid;
            } else {
                hi = mid - 1;
            }
        }
        lo
    }

    /// `Θ_pd-d = N_d · BS_max / (T_decode · L_out)` in requests/s, with `T_decode` the step time
    /// at `BS_max`.
    pub fn throughput(&self, decode_instances: u32, output_tokens: f64) -> f64 {
        let bs = self.max_batch();
        if bs == 0 || output_tokens <= 0.0 {
            return 0.0;
        }
        f64::from(decode_instances) * f64::from(bs) / (self.step_time(bs) * output_tokens)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h200() -> PrefillProfile {
        let mib = 1024.0 * 1024.0;
        PrefillProfile::new(vec![
            ProfilePoint {
                tokens: 1024.0,
                prefill_s: 0.44,
                kv_bytes: 190.8 * mib,
            },
            ProfilePoint {
                tokens: 8192.0,
                prefill_s: 0.72,
                kv_bytes: 308.9 * mib,
            },
            ProfilePoint {
                tokens: 32768.0,
                prefill_s: 1.84,
                kv_bytes: 701.3 * mib,
            },
            ProfilePoint {
                tokens: 131072.0,
                prefill_s: 7.40,
                kv_bytes: 2316.3 * mib,
            },
        ])
        .unwrap()
    }

    #[test]
    fn interpolates_and_matches_paper_phi_kv() {
        let p = h200();
        assert!((p.prefill_time(8192.0) - 0.72).abs() < 1e-12);
        assert!((p.prefill_time(20480.0) - 1.28).abs() < 1e-9);
        // Φ_kv column of the paper's table, within the rounding of its 2-digit times (0.44 s).
        for (l, gbps) in [
            (1024.0, 3.61),
            (8192.0, 3.59),
            (32768.0, 3.19),
            (131072.0, 2.62),
        ] {
            let got = p.kv_throughput(l) * 8.0 / 1e9;
            assert!((got / gbps - 1.0).abs() < 0.01, "{l}: {got}");
        }
        assert!(p.prefill_time(128.0) > 0.0 && p.prefill_time(128.0) < 0.44);
        assert!(p.prefill_time(262144.0) > 7.40);
    }

    #[test]
    fn cached_prefix_reduces_work_and_shipping() {
        let p = h200();
        let full = p.prefill_time(32768.0);
        let inc = p.incremental_prefill_time(32768.0, 30000.0);
        assert!(inc < full / 3.0, "{inc} vs {full}");
        assert!(inc >= p.prefill_time(0.0));
        assert_eq!(
            p.incremental_prefill_time(1000.0, 0.0),
            p.prefill_time(1000.0)
        );
        assert!(p.kv_bytes_to_ship(32768.0, 32768.0) < p.kv_bytes(32768.0) / 2.0);
        assert_eq!(p.kv_bytes_to_ship(32768.0, 0.0), p.kv_bytes(32768.0));
    }

    #[test]
    fn measured_profiles_charge_the_uncached_remainder_itself() {
        // A node's measurements: 30 uncached tokens took 0.08 s, 128 took 0.32 s, 771 took
        // 2.74 s. A 158-token prompt with 128 cached is a 30-token prefill: 0.08 s, not
        // T(158) − T(128) + T(0) (30 tokens at the 128→771 slope: ≈ 0.12 s).
        let pt = |t: f64, s: f64| ProfilePoint {
            tokens: t,
            prefill_s: s,
            kv_bytes: t * 1e3,
        };
        let fresh =
            PrefillProfile::new(vec![pt(30.0, 0.08), pt(128.0, 0.32), pt(771.0, 2.74)]).unwrap();
        let measured = fresh.clone().measured_by_uncached();
        assert!((measured.incremental_prefill_time(158.0, 128.0) - 0.08).abs() < 1e-12);
        assert!(fresh.incremental_prefill_time(158.0, 128.0) > 0.11);
        // Nothing cached: the same curve either way; scaling keeps the reading.
        assert_eq!(
            measured.incremental_prefill_time(500.0, 0.0),
            fresh.prefill_time(500.0)
        );
        let slower = measured.time_scaled(|_| 2.0).unwrap();
        assert!((slower.incremental_prefill_time(158.0, 128.0) - 0.16).abs() < 1e-12);
    }

    #[test]
    fn measured_profiles_extrapolate_the_time_per_token() {
        let pt = |t: f64, s: f64| ProfilePoint {
            tokens: t,
            prefill_s: s,
            kv_bytes: t * 1e3,
        };
        // 1.95 ms/token at 512, 2.34 at 1,024: at 2,048 it is 3.125 ms/token (6.4 s), where the
        // end segment (2.73 ms per added token) says 5.2 s.
        let table = PrefillProfile::new(vec![pt(512.0, 1.0), pt(1024.0, 2.4)]).unwrap();
        let measured = table.clone().measured_by_uncached();
        assert!((measured.prefill_time(2048.0) - 6.4).abs() < 1e-9);
        assert!((table.prefill_time(2048.0) - 5.2).abs() < 1e-9);
        // Inside the points, and with a flat or falling time per token, both read the same.
        assert_eq!(measured.prefill_time(700.0), table.prefill_time(700.0));
        let flat = PrefillProfile::new(vec![pt(512.0, 1.0), pt(1024.0, 2.0)])
            .unwrap()
            .measured_by_uncached();
        assert!((flat.prefill_time(4096.0) - 8.0).abs() < 1e-9);
    }

    #[test]
    fn rejects_bad_profiles() {
        assert!(PrefillProfile::new(vec![]).is_err());
        let pt = |t: f64, s: f64| ProfilePoint {
            tokens: t,
            prefill_s: s,
            kv_bytes: 1.0,
        };
        assert!(PrefillProfile::new(vec![pt(1.0, 1.0), pt(1.0, 2.0)]).is_err());
        assert!(PrefillProfile::new(vec![pt(1.0, 2.0), pt(2.0, 1.0)]).is_err());
        assert!(PrefillProfile::new(vec![pt(1.0, f64::NAN), pt(2.0, 1.0)]).is_err());
        assert!(DecodeProfile::new(vec![(1.0, 0.5), (2.0, 0.6)], 40.0).is_err());
        assert!(DecodeProfile::new(vec![(1.0, 0.01)], 40.0).is_err());
    }

    #[test]
    fn decode_batch_cap_follows_slo() {
        // 12 ms at batch 1 growing 0.76 ms per sequence: 25 ms budget at 40 tok/s ⇒ BS_max 18.
        let d =
            DecodeProfile::new(vec![(1.0, 0.012), (33.0, 0.012 + 32.0 * 0.00076)], 40.0).unwrap();
        assert_eq!(d.max_batch(), 18);
        let theta = d.throughput(3, 1024.0);
        assert!((theta - 3.0 * 18.0 / (d.step_time(18) * 1024.0)).abs() < 1e-12);
        assert_eq!(d.throughput(0, 1024.0), 0.0);
    }
}
