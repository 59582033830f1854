//! Prompt-length distributions, discretised so the throughput model can take tail probabilities
//! and conditional means without special functions (std has no `erf`).

use super::{check_range, PolicyError};

/// A discrete distribution of prompt lengths: `lengths[i]` with probability `probs[i]`, sorted.
/// Prefix sums give `P(L > t)` and `E[L | L > t]` in O(log n).
#[derive(Debug, Clone, PartialEq)]
pub struct LengthDistribution {
    lengths: Vec<f64>,
    cum_prob: Vec<f64>,
    cum_mass: Vec<f64>,
}

/// `P(L > t)`, `E[L | L > t]` and `E[L | L ≤ t]` for one threshold.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tail {
    /// `p = P(L > t)`.
    pub p: f64,
    /// Mean length of offloaded (long) requests; 0 when `p = 0`.
    pub mean_long: f64,
    /// Mean length of locally prefilled (short) requests; 0 when `p = 1`.
    pub mean_short: f64,
}

impl LengthDistribution {
    /// Build from weighted points; weights need not be normalised.
    pub fn from_weighted(mut points: Vec<(f64, f64)>) -> Result<Self, PolicyError> {
        points.retain(|&(_, w)| w > 0.0);
        if points.is_empty() {
            return Err(PolicyError::Infeasible("empty length distribution"));
        }
        for &(l, w) in &points {
            check_range("length", l, 0.0, 1e12)?;
            check_range("weight", w, 0.0, 1e300)?;
        }
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
        let total: f64 = points.iter().map(|p| p.1).sum();
        let (mut cp, mut cm) = (0.0, 0.0);
        let mut cum_prob = Vec::with_capacity(points.len());
        let mut cum_mass = Vec::with_capacity(points.len());
        for &(l, w) in &points {
            cp += w / total;
            cm += w / total * l;
            cum_prob.push(cp);
            cum_mass.push(cm);
        }
        Ok(Self {
            lengths: points.into_iter().map(|p| p.0).collect(),
            cum_prob,
            cum_mass,
        })
    }

    /// Log-normal `ln L ~ N(mu, sigma²)` truncated to `[min, max]` (samples outside are redrawn,
    /// which is what gives the paper's mean ≈ 27K for μ = 9.90, σ = 1.00, [128, 128K]; clamping
    /// instead would give ≈ 30.5K). Discretised into `bins` equal steps of `ln L`.
    pub fn lognormal_truncated(
        mu: f64,
        sigma: f64,
        min: f64,
        max: f64,
        bins: usize,
    ) -> Result<Self, PolicyError> {
        check_range("sigma", sigma, 1e-9, 100.0)?;
        check_range("mu", mu, -100.0, 100.0)?;
        check_range("min", min, 1.0, max)?;
        check_range("bins", bins as f64, 1.0, 1e7)?;
        let (a, b) = (min.ln(), max.ln());
        let dz = (b - a) / bins as f64;
        let points = (0..bins)
            .map(|i| {
                let z = a + (i as f64 + 0.5) * dz;
                let w = (-0.5 * ((z - mu) / sigma).powi(2)).exp();
                (z.exp(), w)
            })
            .collect();
        Self::from_weighted(points)
    }

    /// Mean length.
    pub fn mean(&self) -> f64 {
        self.cum_mass.last().copied().unwrap_or(0.0)
    }

    /// The support points, ascending; every threshold between two of them is equivalent, so
    /// these are the grid the threshold search walks.
    pub fn lengths(&self) -> &[f64] {
        &self.lengths
    }

    /// Tail statistics for threshold `t` (offload iff `L > t`).
    pub fn tail(&self, t: f64) -> Tail {
        let k = self.lengths.partition_point(|&l| l <= t);
        let (p_short, m_short) = if k == 0 {
            (0.0, 0.0)
        } else {
            (self.cum_prob[k - 1], self.cum_mass[k - 1])
        };
        let p = (1.0 - p_short).max(0.0);
        let m_long = self.mean() - m_short;
        Tail {
            p: if p < 1e-12 { 0.0 } else { p },
            mean_long: if p < 1e-12 { 0.0 } else { m_long / p },
            mean_short: if p_short < 1e-12 {
                0.0
            } else {
                m_short / p_short
            },
        }
    }

    /// Inverse CDF, used by the simulator to draw lengths from the same table the model uses.
    pub fn quantile(&self, u: f64) -> f64 {
        let k = self
            .cum_prob
            .partition_point(|&c| c < u)
            .min(self.lengths.len() - 1);
        self.lengths[k]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paper_workload_mean_and_tail() {
        let d = LengthDistribution::lognormal_truncated(9.90, 1.00, 128.0, 131072.0, 4096).unwrap();
        assert!((d.mean() - 27_500.0).abs() < 300.0, "{}", d.mean());
        let t = d.tail(19_400.0);
        assert!((t.p - 0.497).abs() < 0.005, "{t:?}");
        assert!((t.mean_long - 45_000.0).abs() < 500.0, "{t:?}");
        // Law of total expectation.
        let recon = t.p * t.mean_long + (1.0 - t.p) * t.mean_short;
        assert!((recon - d.mean()).abs() < 1e-6 * d.mean());
        assert_eq!(d.tail(0.0).p, 1.0);
        assert_eq!(d.tail(1e9).p, 0.0);
        assert_eq!(d.tail(1e9).mean_long, 0.0);
    }

    #[test]
    fn quantile_inverts_cdf() {
        let d =
            LengthDistribution::from_weighted(vec![(10.0, 1.0), (20.0, 1.0), (30.0, 2.0)]).unwrap();
        assert_eq!(d.quantile(0.0), 10.0);
        assert_eq!(d.quantile(0.3), 20.0);
        assert_eq!(d.quantile(0.9), 30.0);
        assert_eq!(d.quantile(1.0), 30.0);
        assert!(LengthDistribution::from_weighted(vec![]).is_err());
        assert!(LengthDistribution::lognormal_truncated(9.9, -1.0, 128.0, 1e5, 10).is_err());
    }
}
