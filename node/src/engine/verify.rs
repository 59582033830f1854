//! Verified remote prefill (DESIGN.md §8): before a home decodes from KV a peer prefilled, it
//! recomputes a few positions from the received KV and compares.
//!
//! The received KV is the attention context for any position, so verifying position `p` costs
//! one decode step: token `p` goes through every layer attending to the received K/V of
//! positions `< p`, and the K/V it computes at `p` must match what was received there. The last
//! position is always checked, with its logits against the trailer's (they pick the first
//! token); `k` more are drawn at random. All `k + 1` run as one batched forward pass. A sender
//! that made the KV up fails at once; one that prefilled another prompt fails wherever the
//! tokens differ; a corrupted layer fails at every checked position; one corrupted position
//! fails when it is drawn, and usually also through the positions after it, whose attention
//! reads it. Every received value is also checked to be finite.
//!
//! A position of a layout with linear-attention state also depends on each linear layer's state
//! just before it, which the KV does not hold: such transfers carry checkpoints (the states,
//! and the sliding windows, after a few positions the token count fixes; see
//! `crate::kv::layout`). The home recomputes two *segments* as a prefill from a checkpoint's
//! state over the received KV: the **tail**, from the last checkpoint to the end (its K/V, the
//! final states and the last logits; at most 32 + one block of tokens), and one **random**
//! earlier segment, from a checkpoint (or token 0, whose state is zero) to the next (its K/V and
//! the next checkpoint's states). A sender that made the KV or the states up, prefilled another
//! prompt or corrupted a layer fails the tail; one that corrupted one position fails where a
//! recomputed segment reads it; a sender that fakes a checkpoint, even one that computes
//! everything after it consistently, fails whenever the segment ending there is drawn (one
//! chance in the number of checkpoints), as a dense import's corrupted position fails when it is
//! drawn. The random segment is most of the cost: about `1 / checkpoints` of the prefill.

use super::*;

/// How an import is verified.
#[derive(Debug, Clone, PartialEq)]
pub struct VerifyConfig {
    /// Random positions checked besides the last one.
    pub positions: usize,
    /// Largest accepted relative error `rms(computed − received) / rms(received)` of any
    /// checked (layer, position)'s K or V row.
    pub kv_tolerance: f32,
    /// Largest accepted relative error of the last position's logits against the trailer's.
    pub logits_tolerance: f32,
    /// Seed of the position draw (a sender must not know which positions will be checked:
    /// callers pass fresh randomness).
    pub seed: u64,
}

/// Tolerances measured on this project's backends: the K/V and logits a decode step computes
/// differ from the prefill's by well under 1 % (f32 KV, the same or the other backend, see
/// `node/tests/verify_import.rs`); made-up or foreign KV is off by order 1.
pub const DEFAULT_KV_TOLERANCE: f32 = 0.05;
/// See [`DEFAULT_KV_TOLERANCE`].
pub const DEFAULT_LOGITS_TOLERANCE: f32 = 0.05;

impl Default for VerifyConfig {
    fn default() -> Self {
        Self {
            positions: 4,
            kv_tolerance: DEFAULT_KV_TOLERANCE,
            logits_tolerance: DEFAULT_LOGITS_TOLERANCE,
            seed: 0x5eed,
        }
    }
}

impl VerifyConfig {
    /// The defaults with a seed nobody can predict (the clock's nanoseconds mixed with `salt`),
    /// so a sender cannot know which positions will be checked.
    pub fn fresh(salt: u64) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        Self {
            seed: (nanos ^ salt.rotate_left(32)).wrapping_mul(0x9E37_79B9_7F4A_7C15),
            ..Self::default()
        }
    }
}

/// What a verification found.
#[derive(Debug, Clone, PartialEq)]
pub struct VerifyReport {
    /// Positions recomputed (the last one included).
    pub positions: Vec<usize>,
    /// Largest relative K/V error over every checked (layer, position).
    pub max_kv_error: f32,
    /// Where it was: (layer, position).
    pub worst: Option<(usize, usize)>,
    /// Largest relative error of a recomputed linear-attention state (layouts with state).
    pub max_state_error: f32,
    /// Where it was: (linear layer, the token it follows).
    pub worst_state: Option<(usize, usize)>,
    /// Relative error of the last position's logits against the trailer's.
    pub logits_error: f32,
    /// Why the import is refused; `None`: it passed.
    pub failure: Option<String>,
}

impl VerifyReport {
    /// Whether the import passed.
    pub fn passed(&self) -> bool {
        self.failure.is_none()
    }
}

/// `rms(a − b) / max(rms(b), tiny)`; infinite when anything is not finite.
pub fn relative_error(computed: &[f32], received: &[f32]) -> f32 {
    if computed.len() != received.len() {
        return f32::INFINITY;
    }
    let (mut diff, mut norm) = (0f64, 0f64);
    for (a, b) in computed.iter().zip(received) {
        let d = f64::from(*a) - f64::from(*b);
        diff += d * d;
        norm += f64::from(*b) * f64::from(*b);
    }
    let n = computed.len().max(1) as f64;
    let e = ((diff / n).sqrt() / (norm / n).sqrt().max(1e-6)) as f32;
    if e.is_finite() {
        e
    } else {
        f32::INFINITY
    }
}

/// Elements of one token's K (or V) row in a paged layer (0 for state layers).
/// Layer's block table: the ring's for a layer kept there, else the shared one.
fn table_for<'a>(ring: Option<&'a [u32]>, shared: &'a [u32], in_ring: bool) -> &'a [u32] {
    match (ring, in_ring) {
        (Some(r), true) => r,
        _ => shared,
    }
}

fn paged_row(shape: &LayerKvShape) -> usize {
    match *shape {
        LayerKvShape::Paged {
            n_kv_heads,
            head_dim,
            ..
        } => n_kv_heads * head_dim,
        LayerKvShape::State { .. } => 0,
    }
}

/// `k` distinct positions from `0..n-1` (the last, `n-1`, is always checked separately), drawn
/// with xorshift64* from `seed`, plus `n-1`, sorted.
fn draw_positions(n: usize, k: usize, seed: u64) -> Vec<usize> {
    let mut out = vec![n - 1];
    let pool = n - 1;
    let k = k.min(pool);
    let mut x = seed | 1;
    let mut taken = std::collections::HashSet::new();
    // Floyd's algorithm: k distinct draws with k random numbers.
    for j in (pool - k)..pool {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        let r = (x.wrapping_mul(0x2545_F491_4F6C_DD1D) % (j as u64 + 1)) as usize;
        let pick = if taken.contains(&r) { j } else { r };
        taken.insert(pick);
        out.push(pick);
    }
    out.sort_unstable();
    out
}

impl Engine {
    /// Verifies import `id` (every layer written, not yet finished) against the trailer's
    /// `logits`. Leaves the received KV exactly as it was; the caller finishes or cancels.
    pub fn verify_import(
        &mut self,
        id: LeaseId,
        logits: &[f32],
        cfg: &VerifyConfig,
    ) -> Result<VerifyReport, EngineError> {
        let p = self.imports.get(&id).ok_or(KvError::UnknownLease(id))?;
        if let Some(layer) = self.missing_layer(p) {
            return Err(EngineError::Incompatible(format!(
                "verification with KV of layer {layer} missing"
            )));
        }
        let (tokens, blocks, state) = (
            p.tokens.clone(),
            p.blocks.iter().map(|b| b.0).collect::<Vec<u32>>(),
            p.state,
        );
        // Sliding-window layers of an engine with a ring read and write their own blocks.
        let ring = p.ring.as_ref().map(|r| ring_table(&r.window()));
        let n = tokens.len();
        if n == 0 {
            return Err(EngineError::Request("nothing imported to verify".into()));
        }
        let mut report = VerifyReport {
            positions: Vec::new(),
            max_kv_error: 0.0,
            worst: None,
            max_state_error: 0.0,
            worst_state: None,
            logits_error: 0.0,
            failure: None,
        };
        if logits.len() != self.model.config().vocab_size || logits.iter().any(|x| !x.is_finite()) {
            report.failure = Some("trailer logits missing, of the wrong size or not finite".into());
            return Ok(report);
        }
        if state.is_some() {
            return self.verify_segments(id, logits, cfg, report);
        }
        let bs = self.config.block_size;
        // Every received value must be finite; keep the blocks of the checked positions (as
        // received) to compare with and to restore.
        // Sliding-window layers send only the rows a decode reads (`transfer_rows`): a position
        // can be recomputed only where every such layer's window lies inside what was sent.
        let lo = (0..self.layout.layers.len())
            .filter_map(|l| match self.layout.layers[l] {
                LayerKvShape::Paged {
                    window: Some(w), ..
                } => {
                    let from = self.layout.transfer_rows(l, n).start;
                    (from > 0).then(|| from + w.saturating_sub(1))
                }
                _ => None,
            })
            .max()
            .unwrap_or(0)
            .min(n - 1);
        let positions: Vec<usize> = draw_positions(n - lo, cfg.positions, cfg.seed)
            .into_iter()
            .map(|q| q + lo)
            .collect();
        let in_ring = self.in_ring.clone();
        let table_of = |l: usize| table_for(ring.as_deref(), &blocks, in_ring[l]);
        let check_of = |table: &[u32]| -> Vec<u32> {
            let mut c: Vec<u32> = positions.iter().map(|q| table[q / bs]).collect();
            c.dedup();
            c
        };
        let mut received: Vec<Option<(Vec<f32>, Vec<f32>)>> = Vec::new();
        for (l, pool) in self.pools.iter().enumerate() {
            let Some(pool) = pool else {
                received.push(None);
                continue;
            };
            let blocks = table_of(l);
            let check_blocks = check_of(blocks);
            let row = paged_row(&self.layout.layers[l]);
            let k = self.backend.gather_blocks(&pool.k, blocks)?;
            let v = self.backend.gather_blocks(&pool.v, blocks)?;
            let sent = self.layout.transfer_rows(l, n);
            let sent = sent.start * row..sent.end * row;
            if k[sent.clone()]
                .iter()
                .chain(&v[sent])
                .any(|x| !x.is_finite())
            {
                report.failure = Some(format!("layer {l}: non-finite K/V"));
                return Ok(report);
            }
            let pick = |all: &[f32]| -> Vec<f32> {
                let per_block = bs * row;
                check_blocks
                    .iter()
                    .flat_map(|b| {
                        let i = blocks.iter().position(|x| x == b).unwrap_or(0);
                        all[i * per_block..(i + 1) * per_block].iter().copied()
                    })
                    .collect()
            };
            received.push(Some((pick(&k), pick(&v))));
        }
        // One forward pass: each checked position is a one-token "sequence" over the received
        // block table, writing its K/V into its own slot (restored below).
        let slots_in = |table: &[u32]| -> Vec<u32> {
            positions
                .iter()
                .map(|&q| table[q / bs] * bs as u32 + (q % bs) as u32)
                .collect()
        };
        let slots = slots_in(&blocks);
        let ring_slots = ring.as_deref().map(slots_in);
        let toks: Vec<u32> = positions.iter().map(|&q| tokens[q]).collect();
        let pos: Vec<u32> = positions.iter().map(|&q| q as u32).collect();
        let rows: Vec<SeqRows<'_>> = positions
            .iter()
            .map(|&q| SeqRows {
                block_table: &blocks,
                window_table: ring.as_deref(),
                n_past: q,
                n_new: 1,
                states: &[],
            })
            .collect();
        let batch = Batch {
            tokens: &toks,
            positions: &pos,
            slots: &slots,
            window_slots: ring_slots.as_deref(),
            seqs: &rows,
        };
        let last_row = (positions.len() - 1) as u32;
        let out = self
            .model
            .forward::<EngineError>(&self.pools, &batch, &[last_row], None);
        // Compare, then put the received values back whatever happened.
        let mut compared = Ok(());
        for (l, saved) in received.iter().enumerate() {
            let (Some((rk, rv)), Some(pool)) = (saved, &self.pools[l]) else {
                continue;
            };
            let blocks = table_of(l);
            let check_blocks = check_of(blocks);
            if compared.is_ok() && out.is_ok() {
                let at = positions.iter().map(|&q| {
                    let b = blocks[q / bs];
                    let i = check_blocks.iter().position(|x| *x == b).unwrap_or(0);
                    (q, i * bs + q % bs)
                });
                compared = self.compare_rows(l, pool, &check_blocks, (rk, rv), at, &mut report);
            }
            self.backend.scatter_blocks(&pool.k, &check_blocks, rk)?;
            self.backend.scatter_blocks(&pool.v, &check_blocks, rv)?;
        }
        compared?;
        let computed = self.backend.download(&out?)?;
        report.logits_error = relative_error(&computed, logits);
        report.positions = positions;
        Ok(judge(report, cfg))
    }

    /// Compares paged layer `l`'s K/V now in `blocks` (recomputed) with `received` (the same
    /// blocks as received) at the rows `at` yields — (position, row within `blocks`) — and keeps
    /// the largest relative error in `report`.
    fn compare_rows(
        &self,
        l: usize,
        pool: &PagedPool,
        blocks: &[u32],
        (rk, rv): (&[f32], &[f32]),
        at: impl Iterator<Item = (usize, usize)>,
        report: &mut VerifyReport,
    ) -> Result<(), EngineError> {
        let row = paged_row(&self.layout.layers[l]);
        let ck = self.backend.gather_blocks(&pool.k, blocks)?;
        let cv = self.backend.gather_blocks(&pool.v, blocks)?;
        for (q, i) in at {
            let at = i * row..(i + 1) * row;
            let e = relative_error(&ck[at.clone()], &rk[at.clone()])
                .max(relative_error(&cv[at.clone()], &rv[at]));
            if e > report.max_kv_error {
                report.max_kv_error = e;
                report.worst = Some((l, q));
            }
        }
        Ok(())
    }

    /// [`Engine::verify_import`] of a layout with linear-attention state (see the module docs).
    fn verify_segments(
        &mut self,
        id: LeaseId,
        logits: &[f32],
        cfg: &VerifyConfig,
        mut report: VerifyReport,
    ) -> Result<VerifyReport, EngineError> {
        let p = self.imports.get(&id).ok_or(KvError::UnknownLease(id))?;
        let (Some(slot), None) = (p.state, &p.ring) else {
            return Err(EngineError::Incompatible(
                "state verification of an import without a state slot, or with a ring".into(),
            ));
        };
        let n = p.tokens.len();
        let checkpoints = p.checkpoints.clone();
        let mut starts: Vec<(usize, Option<Vec<Vec<f32>>>)> = vec![(0, None)];
        for (c, states) in checkpoints.iter().zip(&p.checkpoint_states) {
            let states: Option<Vec<Vec<f32>>> = states.iter().cloned().collect();
            let Some(states) = states else {
                report.failure = Some(format!("the state checkpoint at token {c} is missing"));
                return Ok(report);
            };
            starts.push((*c, Some(states)));
        }
        let finals: Vec<Vec<f32>> = self
            .state_slot(slot)?
            .iter()
            .map(|t| self.backend.download(t))
            .collect::<Result<_, _>>()?;
        if starts
            .iter()
            .filter_map(|(_, s)| s.as_ref())
            .chain(std::iter::once(&finals))
            .flatten()
            .flatten()
            .any(|x| !x.is_finite())
        {
            report.failure = Some("non-finite linear-attention state".into());
            return Ok(report);
        }
        // The tail, from the last start, and a random earlier segment (none when token 0 is the
        // only start: the tail is then the whole sequence).
        let last = starts.len() - 1;
        let mut segments = vec![(last, n)];
        if last > 0 {
            let pick = draw_positions(last + 1, 1, cfg.seed)[0];
            segments.insert(0, (pick, starts[pick + 1].0));
        }
        for (i, b) in segments {
            let a = starts[i].0;
            // The states the segment must end with: the final ones, or the next checkpoint's.
            let want = if b == n {
                Some(&finals)
            } else {
                starts
                    .get(i + 1)
                    .filter(|s| s.0 == b)
                    .and_then(|s| s.1.as_ref())
            };
            let got = self.recompute_segment(id, a..b, starts[i].1.as_deref(), &mut report)?;
            for (l, (s, w)) in got
                .states
                .iter()
                .zip(want.into_iter().flatten())
                .enumerate()
            {
                let e = relative_error(s, w);
                if e > report.max_state_error {
                    report.max_state_error = e;
                    report.worst_state = Some((l, b));
                }
            }
            if b == n {
                report.logits_error = relative_error(&got.logits, logits);
            }
            report.positions.extend(a..b);
        }
        Ok(judge(report, cfg))
    }

    /// Runs import `id`'s tokens `rows` as a prefill from `start` (each linear layer's
    /// state before `rows.start`; `None`: zero) over the received KV, compares the paged K/V it
    /// computes with what was received wherever the transfer carried it (into `report`), puts
    /// the received K/V back and returns what the segment ended with. Computes in a state slot
    /// of its own (an error when none is free).
    fn recompute_segment(
        &mut self,
        id: LeaseId,
        rows: std::ops::Range<usize>,
        start: Option<&[Vec<f32>]>,
        report: &mut VerifyReport,
    ) -> Result<Segment, EngineError> {
        let p = self.imports.get(&id).ok_or(KvError::UnknownLease(id))?;
        let n = p.tokens.len();
        let tokens = p.tokens[rows.clone()].to_vec();
        let table: Vec<u32> = p.blocks.iter().map(|b| b.0).collect();
        let bs = self.config.block_size;
        let touched = table[rows.start / bs..rows.end.div_ceil(bs)].to_vec();
        let scratch = self.store.allocate_state()?;
        let states = self.state_slot(scratch)?.to_vec();
        let run = (|| -> Result<_, EngineError> {
            match start {
                None => self.zero_state(scratch)?,
                Some(s) => {
                    for (t, v) in states.iter().zip(s) {
                        self.backend.write(t, v)?;
                    }
                }
            }
            let mut saved = Vec::new();
            for pool in self.pools.iter() {
                saved.push(match pool {
                    Some(pool) => Some((
                        self.backend.gather_blocks(&pool.k, &touched)?,
                        self.backend.gather_blocks(&pool.v, &touched)?,
                    )),
                    None => None,
                });
            }
            // In chunks of `prefill_chunk` tokens, as a prefill runs; the states carry over.
            let mut out = Err(EngineError::Request("empty segment".into()));
            let mut a = rows.start;
            while a < rows.end && (a == rows.start || out.is_ok()) {
                let b = (a + self.config.prefill_chunk.max(1)).min(rows.end);
                let positions: Vec<u32> = (a as u32..b as u32).collect();
                let slots = slots_of(&table, a..b, bs);
                let seqs = [SeqRows {
                    block_table: &table,
                    window_table: None,
                    n_past: a,
                    n_new: b - a,
                    states: &states,
                }];
                let batch = Batch {
                    tokens: &tokens[a - rows.start..b - rows.start],
                    positions: &positions,
                    slots: &slots,
                    window_slots: None,
                    seqs: &seqs,
                };
                out = self.model.forward::<EngineError>(
                    &self.pools,
                    &batch,
                    &[(b - a - 1) as u32],
                    None,
                );
                a = b;
            }
            // Compare, then put the received values back whatever happened.
            let mut compared = Ok(());
            for (l, saved) in saved.iter().enumerate() {
                let (Some((rk, rv)), Some(pool)) = (saved, &self.pools[l]) else {
                    continue;
                };
                if compared.is_ok() && out.is_ok() {
                    // Only rows the transfer carried can be compared.
                    let spans = self.layout.transfer_spans(l, n);
                    let at = rows
                        .clone()
                        .filter(|q| spans.iter().any(|s| s.contains(q)))
                        .map(|q| (q, q - rows.start / bs * bs));
                    compared = self.compare_rows(l, pool, &touched, (rk, rv), at, report);
                }
                self.backend.scatter_blocks(&pool.k, &touched, rk)?;
                self.backend.scatter_blocks(&pool.v, &touched, rv)?;
            }
            compared?;
            let logits = self.backend.download(&out?)?;
            let after = states
                .iter()
                .map(|t| self.backend.download(t))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(Segment {
                states: after,
                logits,
            })
        })();
        self.store.release_state(scratch)?;
        run
    }
}

/// What a recomputed segment ended with.
struct Segment {
    /// Each linear layer's state after the segment.
    states: Vec<Vec<f32>>,
    /// The logits of its last position.
    logits: Vec<f32>,
}

/// Sets `report.failure` when an error exceeds its tolerance.
fn judge(mut report: VerifyReport, cfg: &VerifyConfig) -> VerifyReport {
    if report.max_kv_error > cfg.kv_tolerance {
        let (l, q) = report.worst.unwrap_or((0, 0));
        report.failure = Some(format!(
            "K/V at layer {l}, position {q} differs from its recomputation by {:.3} (tolerance {})",
            report.max_kv_error, cfg.kv_tolerance
        ));
    } else if report.max_state_error > cfg.kv_tolerance {
        let (l, c) = report.worst_state.unwrap_or((0, 0));
        report.failure = Some(format!(
            "linear layer {l}'s state after token {c} differs from its recomputation by {:.3} (tolerance {})",
            report.max_state_error, cfg.kv_tolerance
        ));
    } else if report.logits_error > cfg.logits_tolerance {
        report.failure = Some(format!(
            "last-position logits differ from the trailer's by {:.3} (tolerance {})",
            report.logits_error, cfg.logits_tolerance
        ));
    }
    report
}

impl Engine {
    /// [`Engine::verify_import`], then [`Engine::finish_import`] when it passed; otherwise the
    /// import is cancelled (its blocks freed, nothing enters the prefix cache) and the error is
    /// [`EngineError::Unverified`].
    pub fn finish_verified_import(
        &mut self,
        id: LeaseId,
        logits: &[f32],
        cfg: &VerifyConfig,
    ) -> Result<(SeqId, VerifyReport), EngineError> {
        let report = match self.verify_import(id, logits, cfg) {
            Ok(r) => r,
            Err(e) => {
                self.cancel_import(id);
                return Err(e);
            }
        };
        if let Some(why) = &report.failure {
            self.cancel_import(id);
            return Err(EngineError::Unverified(why.clone()));
        }
        Ok((self.finish_import(id)?, report))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_are_distinct_sorted_and_include_the_last() {
        for n in [1usize, 2, 3, 7, 33, 1000] {
            for k in [0usize, 1, 4, 50] {
                let p = draw_positions(n, k, n as u64 * 31 + k as u64);
                assert_eq!(p.len(), 1 + k.min(n - 1), "n {n} k {k}");
                assert_eq!(*p.last().unwrap(), n - 1);
                assert!(p.windows(2).all(|w| w[0] < w[1]), "{p:?}");
            }
        }
        assert_ne!(draw_positions(1000, 4, 1), draw_positions(1000, 4, 2));
    }

    #[test]
    fn relative_error_is_scale_free_and_catches_non_finite() {
        let a = [1.0, -2.0, 3.0];
        assert_eq!(relative_error(&a, &a), 0.0);
        let b = [1.01, -2.02, 3.03];
        assert!((relative_error(&b, &a) - 0.01).abs() < 1e-4);
        let big: Vec<f32> = a.iter().map(|x| x * 1e6).collect();
        let bigb: Vec<f32> = b.iter().map(|x| x * 1e6).collect();
        assert!((relative_error(&bigb, &big) - 0.01).abs() < 1e-4);
        assert_eq!(relative_error(&[f32::NAN, 0.0, 0.0], &a), f32::INFINITY);
        assert_eq!(relative_error(&a, &[1.0]), f32::INFINITY);
    }
}
