//! Token sampling: greedy, temperature, top-k, top-p, min-p, logit bias, presence / frequency /
//! repetition penalties, seeded RNG, stop tokens, max tokens, and the log-probabilities of what
//! was sampled (OpenAI's `logprobs`).
//!
//! Each sequence owns its own [`Sampler`] (its own RNG stream), so a batch's composition never
//! changes what any one sequence samples: the same seed gives the same tokens whether the sequence
//! runs alone, in a batch, or after a KV import on another node.

use std::collections::{HashMap, HashSet};

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
    /// Drop tokens whose probability is below `min_p` times the most likely one's (`0` = off).
    #[serde(default)]
    pub min_p: f32,
    /// OpenAI's `presence_penalty`: subtracted once from the logit of every token already
    /// generated (`0` = off).
    #[serde(default)]
    pub presence_penalty: f32,
    /// OpenAI's `frequency_penalty`: subtracted from a token's logit once per time it was
    /// generated (`0` = off).
    #[serde(default)]
    pub frequency_penalty: f32,
    /// vLLM's / llama.cpp's `repetition_penalty` over prompt and output tokens: positive logits
    /// are divided by it, negative ones multiplied (`1` = off).
    #[serde(default = "one")]
    pub repetition_penalty: f32,
    /// Added to the logits of these token ids before sampling (OpenAI's `logit_bias`).
    #[serde(default)]
    pub logit_bias: Vec<(u32, f32)>,
    /// Report the sampled token's log-probability and this many top alternatives (`None` = off).
    /// Log-probabilities are those of the model's own distribution, before penalties, bias and
    /// temperature (as vLLM reports them by default).
    #[serde(default)]
    pub logprobs: Option<usize>,
}

fn one() -> f32 {
    1.0
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
            min_p: 0.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            logit_bias: Vec::new(),
            logprobs: None,
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

    /// Whether the logits are changed before the pick (bias or penalties).
    fn processes_logits(&self) -> bool {
        self.presence_penalty != 0.0
            || self.frequency_penalty != 0.0
            || self.repetition_penalty != 1.0
            || !self.logit_bias.is_empty()
    }

    /// Whether sampling needs the logits on the host; when it does not (plain greedy), the
    /// backend's argmax is enough and only the ids cross to the host.
    pub fn needs_logits(&self) -> bool {
        !self.is_greedy() || self.processes_logits() || self.logprobs.is_some()
    }
}

/// A sampled token's log-probability and the most likely alternatives at that step.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    pub token: u32,
    pub logprob: f32,
    /// Most likely tokens first (ties by lower id), at most the number asked for.
    pub top: Vec<(u32, f32)>,
}

/// Log-softmax of `logits` at `token` and the `k` most likely tokens (NaN logits count as -inf).
pub fn logprobs_of(logits: &[f32], token: u32, k: usize) -> TokenLogprobs {
    let val = |v: f32| if v.is_nan() { f32::NEG_INFINITY } else { v };
    let max = logits
        .iter()
        .copied()
        .map(val)
        .fold(f32::NEG_INFINITY, f32::max);
    let lse = if max.is_finite() {
        let sum: f64 = logits.iter().map(|&v| f64::from(val(v) - max).exp()).sum();
        f64::from(max) + sum.ln()
    } else {
        0.0
    };
    let lp = |id: u32| {
        logits
            .get(id as usize)
            .map_or(f32::NEG_INFINITY, |&v| (f64::from(val(v)) - lse) as f32)
    };
    let order = |a: &u32, b: &u32| {
        val(logits[*b as usize])
            .total_cmp(&val(logits[*a as usize]))
            .then(a.cmp(b))
    };
    let mut ids: Vec<u32> = (0..logits.len() as u32).collect();
    let k = k.min(ids.len());
    if k > 0 && k < ids.len() {
        ids.select_nth_unstable_by(k - 1, order);
    }
    ids.truncate(k);
    ids.sort_by(order);
    TokenLogprobs {
        token,
        logprob: lp(token),
        top: ids.into_iter().map(|id| (id, lp(id))).collect(),
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
    /// How often each token was generated (only kept when a penalty needs it).
    counts: HashMap<u32, u32>,
    /// Prompt tokens (only kept for the repetition penalty).
    prompt: HashSet<u32>,
    /// Log-probabilities of the last sampled token, when asked for.
    last_logprobs: Option<TokenLogprobs>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        Self::for_prompt(params, &[])
    }

    /// A sampler whose repetition penalty also covers `prompt`'s tokens.
    pub fn for_prompt(params: SamplingParams, prompt: &[u32]) -> Self {
        let rng = SplitMix64::new(params.seed);
        let prompt = if params.repetition_penalty != 1.0 {
            prompt.iter().copied().collect()
        } else {
            HashSet::new()
        };
        Self {
            params,
            rng,
            generated: 0,
            counts: HashMap::new(),
            prompt,
            last_logprobs: None,
        }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks a token from one row of logits (any finite or infinite values; NaN rows fall back
    /// to the lowest index, never panic).
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let processed;
        let row = if self.params.processes_logits() {
            processed = self.process(logits);
            &processed[..]
        } else {
            logits
        };
        let tok = if self.params.is_greedy() {
            argmax(row)
        } else {
            self.sample_stochastic(row)
        };
        self.last_logprobs = self.params.logprobs.map(|k| logprobs_of(logits, tok, k));
        self.accept(tok);
        tok
    }

    /// Records a token chosen elsewhere (e.g. the backend's on-device argmax for greedy rows).
    pub fn accept(&mut self, token: u32) {
        self.generated += 1;
        if self.params.presence_penalty != 0.0
            || self.params.frequency_penalty != 0.0
            || self.params.repetition_penalty != 1.0
        {
            *self.counts.entry(token).or_default() += 1;
        }
    }

    /// The log-probabilities of the token [`Sampler::sample`] returned last (once).
    pub fn take_logprobs(&mut self) -> Option<TokenLogprobs> {
        self.last_logprobs.take()
    }

    /// Logits after bias and penalties.
    fn process(&self, logits: &[f32]) -> Vec<f32> {
        let p = &self.params;
        let mut out = logits.to_vec();
        if p.repetition_penalty != 1.0 {
            let r = p.repetition_penalty;
            let output = self.counts.keys().filter(|t| !self.prompt.contains(t));
            for &t in self.prompt.iter().chain(output) {
                if let Some(v) = out.get_mut(t as usize) {
                    *v = if *v > 0.0 { *v / r } else { *v * r };
                }
            }
        }
        for (&t, &n) in &self.counts {
            if let Some(v) = out.get_mut(t as usize) {
                *v -= p.presence_penalty + p.frequency_penalty * n as f32;
            }
        }
        for &(t, b) in &p.logit_bias {
            if let Some(v) = out.get_mut(t as usize) {
                *v += b;
            }
        }
        out
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
        if self.params.min_p > 0.0 {
            // Sorted descending: probs[0] is the most likely one.
            let floor = probs[0] * f64::from(self.params.min_p);
            let keep = probs.iter().take_while(|&&p| p >= floor).count().max(1);
            probs.truncate(keep);
            let s: f64 = probs.iter().sum();
            probs.iter_mut().for_each(|p| *p /= s);
        }
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

    #[test]
    fn logit_bias_and_penalties_change_the_greedy_pick() {
        let greedy = |p: SamplingParams, steps: usize| {
            let mut s = Sampler::for_prompt(p, &[1]);
            (0..steps).map(|_| s.sample(&logits())).collect::<Vec<_>>()
        };
        // Plain greedy repeats id 1.
        assert_eq!(greedy(SamplingParams::greedy(9), 3), vec![1, 1, 1]);
        // A bias moves the pick; -100 bans a token.
        let bias = SamplingParams {
            logit_bias: vec![(1, -100.0), (4, 1.6)],
            ..SamplingParams::greedy(9)
        };
        assert!(bias.needs_logits());
        assert_eq!(greedy(bias, 1), vec![4]);
        // Presence: after 1 is generated, 5 (tied) wins, then 2 (1.9 > 2.0 - 0.5).
        let presence = SamplingParams {
            presence_penalty: 0.5,
            ..SamplingParams::greedy(9)
        };
        assert_eq!(greedy(presence, 3), vec![1, 5, 2]);
        // Frequency grows with each repeat: 0.06 per use lets 1 and 5 alternate twice each
        // before 2 (1.9) wins.
        let freq = SamplingParams {
            frequency_penalty: 0.06,
            ..SamplingParams::greedy(9)
        };
        assert_eq!(greedy(freq, 5), vec![1, 5, 1, 5, 2]);
        // Repetition covers the prompt (id 1): 2.0 / 1.1 < 1.9, so 5 first.
        let rep = SamplingParams {
            repetition_penalty: 1.1,
            ..SamplingParams::greedy(9)
        };
        assert_eq!(greedy(rep, 2), vec![5, 2]);
    }

    #[test]
    fn min_p_drops_the_unlikely_tail() {
        // p ≈ [0.84, 0.11, 0.04, …]: min_p 0.2 keeps only id 0.
        let p = SamplingParams {
            temperature: 1.0,
            min_p: 0.2,
            seed: 3,
            max_tokens: 1000,
            ..Default::default()
        };
        let mut s = Sampler::new(p.clone());
        let row = [4.0, 2.0, 1.0, 0.0];
        assert!((0..300).all(|_| s.sample(&row) == 0));
        // Without it the tail shows up.
        let mut s = Sampler::new(SamplingParams { min_p: 0.0, ..p });
        assert!((0..300).any(|_| s.sample(&row) != 0));
    }

    #[test]
    fn logprobs_are_the_model_distribution() {
        let p = SamplingParams {
            logprobs: Some(2),
            temperature: 0.0,
            logit_bias: vec![(0, 100.0)],
            ..SamplingParams::greedy(9)
        };
        let mut s = Sampler::new(p);
        let row = [0.0f32, 1.0, 1.0, f32::NAN];
        assert_eq!(s.sample(&row), 0, "the bias picks id 0");
        let lp = s.take_logprobs().expect("asked for");
        assert!(s.take_logprobs().is_none(), "taken once");
        let lse = (1.0f64 + 2.0 * 1.0f64.exp()).ln();
        assert_eq!(lp.token, 0);
        assert!((f64::from(lp.logprob) + lse).abs() < 1e-5, "{lp:?}");
        // Top 2: ids 1 and 2 (tie, lower id first); NaN never appears.
        let ids: Vec<u32> = lp.top.iter().map(|t| t.0).collect();
        assert_eq!(ids, vec![1, 2]);
        assert!((f64::from(lp.top[0].1) - (1.0 - lse)).abs() < 1e-5);
        let sum: f64 = [0.0f32, 1.0, 1.0]
            .iter()
            .map(|&v| (f64::from(v) - lse).exp())
            .sum();
        assert!((sum - 1.0).abs() < 1e-9);
        // k larger than the vocabulary is clamped; k = 0 lists none.
        assert_eq!(logprobs_of(&row, 1, 10).top.len(), 4);
        assert!(logprobs_of(&row, 1, 0).top.is_empty());
        assert!(!SamplingParams::greedy(1).needs_logits());
    }
}
