//! Token sampling: greedy, temperature, top-k, top-p, seeded RNG, stop tokens, max tokens.
//!
//! Each sequence owns its own [`Sampler`] (its own RNG stream), so a batch's composition never
//! changes what any one sequence samples: the same seed gives the same tokens whether the sequence
//! runs alone, in a batch, or after a KV import on another node.

use super::synthetic::SplitMix64;

/// How to pick the next token and when to stop.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SamplingParams {
    /// `0` means greedy (argmax).
    pub temperature: f32,
    /// Keep only the `k` most likely tokens (`0` = no limit).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches `top_p` (`1.0` = no limit).
    pub top_p: f32,
    pub seed: u64,
    /// Generation stops after emitting one of these (the stop token is reported, not printed).
    pub stop_tokens: Vec<u32>,
    /// Upper bound on generated tokens, the first (prefill) token included.
    pub max_tokens: usize,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
            stop_tokens: Vec::new(),
            max_tokens: 64,
        }
    }
}

impl SamplingParams {
    pub fn greedy(max_tokens: usize) -> Self {
        Self {
            max_tokens,
            ..Self::default()
        }
    }
    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0 || self.top_k == 1
    }
}

/// Why a sequence stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum FinishReason {
    Stop,
    Length,
}

/// Per-sequence sampling state.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: SplitMix64,
    generated: usize,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = SplitMix64::new(params.seed);
        Self {
            params,
            rng,
            generated: 0,
        }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks a token from one row of logits (any finite or infinite values; NaN rows fall back
    /// to the lowest index, never panic).
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let tok = if self.params.is_greedy() {
            argmax(logits)
        } else {
            self.sample_stochastic(logits)
        };
        self.generated += 1;
        tok
    }

    /// Records a token chosen elsewhere (e.g. the backend's on-device argmax for greedy rows).
    pub fn accept(&mut self, _token: u32) {
        self.generated += 1;
    }

    /// `Some(reason)` when the sequence must stop after emitting `token`.
    pub fn finished(&self, token: u32) -> Option<FinishReason> {
        if self.params.stop_tokens.contains(&token) {
            Some(FinishReason::Stop)
        } else if self.generated >= self.params.max_tokens {
            Some(FinishReason::Length)
        } else {
            None
        }
    }

    fn sample_stochastic(&mut self, logits: &[f32]) -> u32 {
        let t = self.params.temperature.max(1e-6);
        let mut cand: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .filter(|(_, v)| !v.is_nan())
            .map(|(i, &v)| (i as u32, v / t))
            .collect();
        if cand.is_empty() {
            return 0;
        }
        // Descending by logit, ties by lower id, so the order (and the draw) is deterministic.
        cand.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if self.params.top_k > 0 {
            cand.truncate(self.params.top_k);
        }
        let max = cand[0].1;
        let mut probs: Vec<f64> = cand
            .iter()
            .map(|&(_, v)| f64::from(v - max).exp())
            .collect();
        let sum: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= sum);
        if self.params.top_p < 1.0 {
            let mut acc = 0.0;
            let mut keep = probs.len();
            for (i, p) in probs.iter().enumerate() {
                acc += p;
                if acc >= f64::from(self.params.top_p) {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
            let s: f64 = probs.iter().sum();
            probs.iter_mut().for_each(|p| *p /= s);
        }
        let r = self.rng.next_f64();
        let mut acc = 0.0;
        for (i, p) in probs.iter().enumerate() {
            acc += p;
            if r < acc {
                return cand[i].0;
            }
        }
        cand[probs.len() - 1].0
    }
}

/// Index of the largest value, lowest index on ties (matches `Backend::argmax`).
pub fn argmax(x: &[f32]) -> u32 {
    let mut best = 0usize;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] || x[best].is_nan() && !v.is_nan() {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits() -> Vec<f32> {
        vec![0.1, 2.0, 1.9, -1.0, 0.5, 2.0]
    }

    #[test]
    fn greedy_takes_lowest_index_of_max() {
        let mut s = Sampler::new(SamplingParams::greedy(4));
        assert_eq!(s.sample(&logits()), 1);
        assert_eq!(argmax(&[f32::NAN, 1.0, 3.0]), 2);
    }

    #[test]
    fn seeded_sampling_is_deterministic_and_respects_top_k() {
        let p = SamplingParams {
            temperature: 1.0,
            top_k: 2,
            seed: 42,
            max_tokens: 1000,
            ..Default::default()
        };
        let draw = |p: &SamplingParams| {
            let mut s = Sampler::new(p.clone());
            (0..200).map(|_| s.sample(&logits())).collect::<Vec<_>>()
        };
        let a = draw(&p);
        assert_eq!(a, draw(&p));
        // top-2 by logit are ids 1 and 5 (tie at 2.0, lower id first) → only those appear.
        assert!(a.iter().all(|&t| t == 1 || t == 5), "{a:?}");
        assert!(a.contains(&1) && a.contains(&5));
        let other = draw(&SamplingParams {
            seed: 43,
            ..p.clone()
        });
        assert_ne!(a, other);
    }

    #[test]
    fn top_p_keeps_the_nucleus() {
        // softmax of [5, 0, 0, 0]: p0 ≈ 0.98 → top_p 0.9 keeps only id 0.
        let p = SamplingParams {
            temperature: 1.0,
            top_p: 0.9,
            seed: 1,
            max_tokens: 100,
            ..Default::default()
        };
        let mut s = Sampler::new(p);
        assert!((0..100).all(|_| s.sample(&[5.0, 0.0, 0.0, 0.0]) == 0));
    }

    #[test]
    fn stop_and_length() {
        let mut s = Sampler::new(SamplingParams {
            stop_tokens: vec![7],
            max_tokens: 2,
            ..Default::default()
        });
        s.accept(3);
        assert_eq!(s.finished(7), Some(FinishReason::Stop));
        assert_eq!(s.finished(3), None);
        s.accept(3);
        assert_eq!(s.finished(3), Some(FinishReason::Length));
    }
}
