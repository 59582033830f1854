//! Causal flash-style attention over a paged KV pool on the CPU.
//!
//! Work is split into tasks of (sequence, KV head, query chunk, key range); all query heads that
//! share a KV head are processed together so each K/V tile is loaded once per group. Inside a task
//! keys are visited in tiles of [`TILE`] with an online softmax (running max `m`, sum `l`,
//! unnormalised accumulator), so memory stays O(tile) whatever the context length. When there are
//! too few tasks to keep every thread busy (decode: one query row), the key range is split too and
//! the partial softmax states are merged exactly afterwards (flash-decoding).
//!
//! Pools may be `f32` or `f16` ([`KvRows`]); f16 rows are widened to f32 one key row at a time,
//! inside the vectorised kernels, so an f16 pool is read from memory at half the bytes.

use half::f16;
use rayon::prelude::*;

use super::simd::{self, multiversion};
use crate::backend::{AttnParams, AttnSeq, Result};
use crate::reference::check_attention;

/// Keys per tile.
const TILE: usize = 128;
/// Query rows per task.
const Q_CHUNK: usize = 32;
/// Smallest key range worth a task of its own when splitting keys. Decode (one query row per
/// sequence) at batch 1 has only `n_kv_heads` base tasks (3 for SmolLM2, an odd count for two
/// threads), so short contexts are split too; the exact merge costs ~1 µs.
const MIN_SPLIT_KEYS: usize = 64;

/// One unit of parallel work.
#[derive(Debug, Clone, Copy)]
struct Task {
    seq: usize,
    /// First row of this sequence in `q`.
    q_base: usize,
    kvh: usize,
    /// Query rows `i0..i1` of the sequence (0-based among its new tokens).
    i0: usize,
    i1: usize,
    /// Key positions `ka..kb`.
    ka: usize,
    kb: usize,
}

/// A KV pool's values, in the dtype they are stored in.
#[derive(Clone, Copy)]
pub(crate) enum KvRows<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
}

impl<'a> KvRows<'a> {
    fn len(&self) -> usize {
        match self {
            KvRows::F32(p) => p.len(),
            KvRows::F16(p) => p.len(),
        }
    }

    /// Values `off..off + buf.len()` as f32: a view of an f32 pool, or `buf` filled from an f16
    /// one.
    #[inline(always)]
    fn row<'b>(&self, off: usize, buf: &'b mut [f32]) -> &'b [f32]
    where
        'a: 'b,
    {
        match *self {
            KvRows::F32(p) => &p[off..off + buf.len()],
            KvRows::F16(p) => {
                simd::widen_f16(&p[off..off + buf.len()], buf);
                buf
            }
        }
    }

    /// Copies values `off..off + dst.len()` into `dst` as f32.
    #[inline(always)]
    fn copy_row(&self, off: usize, dst: &mut [f32]) {
        match *self {
            KvRows::F32(p) => dst.copy_from_slice(&p[off..off + dst.len()]),
            KvRows::F16(p) => simd::widen_f16(&p[off..off + dst.len()], dst),
        }
    }
}

/// Unnormalised softmax state of one task's query vectors.
struct Partial {
    m: Vec<f32>,
    l: Vec<f32>,
    acc: Vec<f32>,
}

/// Attention of `q: [rows, n_heads, head_dim]` → `[rows, n_heads · head_dim]`.
pub(crate) fn attention(
    q: &[f32],
    k_pool: KvRows<'_>,
    v_pool: KvRows<'_>,
    block_size: usize,
    seqs: &[AttnSeq<'_>],
    p: &AttnParams,
) -> Result<Vec<f32>> {
    if k_pool.len() != v_pool.len() {
        return Err(crate::KernelError::Shape(format!(
            "attention: k_pool has {} values, v_pool {}",
            k_pool.len(),
            v_pool.len()
        )));
    }
    let rows = check_attention(q.len(), k_pool.len(), block_size, seqs, p)?;
    let (nh, hd, nkv) = (p.n_heads, p.head_dim, p.n_kv_heads);
    let group = nh / nkv;

    // Base tasks: (sequence, kv head, query chunk).
    let mut base = Vec::new();
    let mut q_base = 0;
    for (si, s) in seqs.iter().enumerate() {
        for i0 in (0..s.n_new).step_by(Q_CHUNK) {
            let i1 = (i0 + Q_CHUNK).min(s.n_new);
            let ka = match p.window {
                Some(w) => (s.n_past + i0 + 1).saturating_sub(w),
                None => 0,
            };
            let kb = s.n_past + i1;
            for kvh in 0..nkv {
                base.push(Task {
                    seq: si,
                    q_base,
                    kvh,
                    i0,
                    i1,
                    ka,
                    kb,
                });
            }
        }
        q_base += s.n_new;
    }
    // Split long key ranges when there are too few tasks for the threads (decode).
    let want = 4 * rayon::current_num_threads();
    let mut tasks = Vec::with_capacity(base.len());
    for t in base.iter().copied() {
        let keys = t.kb - t.ka;
        let splits = if base.len() >= want {
            1
        } else {
            want.div_ceil(base.len()).min(keys / MIN_SPLIT_KEYS).max(1)
        };
        // Multi-row tasks work in tiles of TILE keys; one-row (decode) tasks have no tiles.
        let gran = if t.i1 - t.i0 == 1 {
            MIN_SPLIT_KEYS
        } else {
            TILE
        };
        let step = keys.div_ceil(splits).div_ceil(gran) * gran;
        let mut ka = t.ka;
        while ka < t.kb {
            let kb = (ka + step.max(gran)).min(t.kb);
            tasks.push(Task { ka, kb, ..t });
            ka = kb;
        }
    }

    let partials: Vec<Partial> = tasks
        .par_iter()
        .map(|t| {
            let s = &seqs[t.seq];
            let nv = (t.i1 - t.i0) * group;
            let mut part = Partial {
                m: vec![f32::NEG_INFINITY; nv],
                l: vec![0.0; nv],
                acc: vec![0.0; nv * hd],
            };
            // One query row (decode): scores for the whole key range fit a small buffer, so the
            // direct two-pass kernel beats tiled gemm calls on a 1-row problem.
            let attend = if t.i1 - t.i0 == 1 {
                decode_task
            } else {
                attn_task
            };
            attend(
                q,
                k_pool,
                v_pool,
                block_size,
                s.block_table,
                s.n_past,
                t,
                p,
                &mut part,
            );
            part
        })
        .collect();

    // Merge partial states exactly: o = Σ acc_s e^{m_s − M} / Σ l_s e^{m_s − M}.
    let mut gm = vec![f32::NEG_INFINITY; rows * nh];
    let mut gl = vec![0.0f32; rows * nh];
    let mut out = vec![0.0f32; rows * nh * hd];
    for (t, part) in tasks.iter().zip(&partials) {
        for i in t.i0..t.i1 {
            for g in 0..group {
                let v = (i - t.i0) * group + g;
                let o = (t.q_base + i) * nh + t.kvh * group + g;
                let (m, l) = (part.m[v], part.l[v]);
                if l == 0.0 {
                    continue;
                }
                let mnew = gm[o].max(m);
                let c_old = if gm[o] == f32::NEG_INFINITY {
                    0.0
                } else {
                    (gm[o] - mnew).exp()
                };
                let c_new = (m - mnew).exp();
                gl[o] = gl[o] * c_old + l * c_new;
                gm[o] = mnew;
                let dst = &mut out[o * hd..(o + 1) * hd];
                for (d, &a) in dst.iter_mut().zip(&part.acc[v * hd..(v + 1) * hd]) {
                    *d = *d * c_old + a * c_new;
                }
            }
        }
    }
    for (o, &l) in out.chunks_exact_mut(hd).zip(&gl) {
        if l > 0.0 {
            simd::scale(o, 1.0 / l);
        }
    }
    Ok(out)
}

/// The keys `ka..kb` of one sequence and KV head in a paged pool.
struct KeyRuns<'a> {
    ka: usize,
    kb: usize,
    block_size: usize,
    table: &'a [u32],
    /// Floats per pool slot (`n_kv_heads · head_dim`).
    row: usize,
    /// Offset of the KV head inside a slot.
    col: usize,
}

impl KeyRuns<'_> {
    /// Calls `f(j, offset)` for key `ka + j` at float `offset` of the pool, visiting runs of
    /// consecutive slots (one block at a time: no division per key). Generic and always inlined
    /// so the per-key body is compiled into the (multiversioned) caller: through a `dyn` closure
    /// it cost a call per key and lost the caller's vector ISA.
    #[inline(always)]
    fn for_each(&self, mut f: impl FnMut(usize, usize)) {
        let mut pos = self.ka;
        while pos < self.kb {
            let run = (self.block_size - pos % self.block_size).min(self.kb - pos);
            let slot = self.table[pos / self.block_size] as usize * self.block_size
                + pos % self.block_size;
            for r in 0..run {
                f(pos - self.ka + r, (slot + r) * self.row + self.col);
            }
            pos += run;
        }
    }
}

multiversion! {
    /// Attention of one query row (its `group` heads sharing KV head `t.kvh`) over keys
    /// `t.ka..t.kb`: scores into a buffer, one softmax pass, then `acc = Σ p·v` with each V row
    /// loaded once for the whole group. Leaves the unnormalised state in `part` like [`attn_task`].
    fn decode_task(
        q: &[f32],
        k_pool: KvRows<'_>,
        v_pool: KvRows<'_>,
        block_size: usize,
        table: &[u32],
        _n_past: usize,
        t: &Task,
        p: &AttnParams,
        part: &mut Partial,
    ) {
        let (nh, hd, nkv) = (p.n_heads, p.head_dim, p.n_kv_heads);
        let group = nh / nkv;
        let row = nkv * hd;
        let nk = t.kb - t.ka;
        if nk == 0 {
            return;
        }
        let qrow = &q[(t.q_base + t.i0) * nh * hd..][..nh * hd];
        let qs: Vec<f32> = qrow[t.kvh * group * hd..(t.kvh + 1) * group * hd]
            .iter()
            .map(|&v| v * p.scale)
            .collect();
        // scores[g·nk + j] for key ka + j.
        let mut scores = vec![0.0f32; group * nk];
        let keys = KeyRuns { ka: t.ka, kb: t.kb, block_size, table, row, col: t.kvh * hd };
        let mut buf = vec![0.0f32; hd];
        keys.for_each(|j, off| {
            let kr = k_pool.row(off, &mut buf);
            for g in 0..group {
                scores[g * nk + j] = simd::dot(&qs[g * hd..(g + 1) * hd], kr);
            }
        });
        for g in 0..group {
            let srow = &mut scores[g * nk..(g + 1) * nk];
            let mx = srow.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            for x in srow.iter_mut() {
                *x = simd::exp_neg(*x - mx);
            }
            part.m[g] = mx;
            part.l[g] = simd::sum(srow);
        }
        let acc = &mut part.acc;
        keys.for_each(|j, off| {
            let vr = v_pool.row(off, &mut buf);
            for g in 0..group {
                simd::axpy(&mut acc[g * hd..(g + 1) * hd], scores[g * nk + j], vr);
            }
        });
    }
}

multiversion! {
    /// Online-softmax attention of one task's query vectors over keys `t.ka..t.kb`.
    ///
    /// Per key tile: gather K and V rows (the paged layout makes them non-contiguous), scores
    /// `S = Q·Kᵀ` and the update `acc += P·V` as small single-threaded `gemm` calls (the task is
    /// already one of many parallel ones), and the causal/window mask and softmax bookkeeping on
    /// the `[vectors, tile]` score block in between.
    fn attn_task(
        q: &[f32],
        k_pool: KvRows<'_>,
        v_pool: KvRows<'_>,
        block_size: usize,
        table: &[u32],
        n_past: usize,
        t: &Task,
        p: &AttnParams,
        part: &mut Partial,
    ) {
        let (nh, hd, nkv) = (p.n_heads, p.head_dim, p.n_kv_heads);
        let group = nh / nkv;
        let row = nkv * hd;
        let nv = (t.i1 - t.i0) * group;
        // Scaled queries, [nv, hd]: vector (i - i0)·group + g is row i, head kvh·group + g.
        let mut qs = vec![0.0f32; nv * hd];
        for i in t.i0..t.i1 {
            for g in 0..group {
                let src = &q[((t.q_base + i) * nh + t.kvh * group + g) * hd..][..hd];
                let dst = &mut qs[((i - t.i0) * group + g) * hd..][..hd];
                for (d, &s) in dst.iter_mut().zip(src) {
                    *d = s * p.scale;
                }
            }
        }
        let mut kt = vec![0.0f32; TILE * hd]; // K tile: [TILE, hd]
        let mut vt = vec![0.0f32; TILE * hd]; // V tile: [TILE, hd]
        let mut s = vec![0.0f32; nv * TILE]; // scores, then probabilities: [nv, TILE]
        let mut k0 = t.ka;
        while k0 < t.kb {
            let k1 = (k0 + TILE).min(t.kb);
            let nk = k1 - k0;
            // Copy runs of consecutive slots (one pool block at a time).
            let mut pos = k0;
            while pos < k1 {
                let run = (block_size - pos % block_size).min(k1 - pos);
                let slot = table[pos / block_size] as usize * block_size + pos % block_size;
                for r in 0..run {
                    let off = (slot + r) * row + t.kvh * hd;
                    let j = pos - k0 + r;
                    k_pool.copy_row(off, &mut kt[j * hd..(j + 1) * hd]);
                    v_pool.copy_row(off, &mut vt[j * hd..(j + 1) * hd]);
                }
                pos += run;
            }
            super::matmul::gemm_local(&qs, hd, &kt, hd, false, &mut s, TILE, (nv, hd, nk), false);
            let mut any = false;
            for i in t.i0..t.i1 {
                let qpos = n_past + i;
                let first = match p.window {
                    Some(w) => (qpos + 1).saturating_sub(w),
                    None => 0,
                };
                // Visible keys of this row within the tile: [lo, hi).
                let lo = (first.max(k0) - k0).min(nk);
                let hi = (qpos + 1).min(k1).saturating_sub(k0).max(lo);
                for g in 0..group {
                    let v = (i - t.i0) * group + g;
                    let srow = &mut s[v * TILE..v * TILE + nk];
                    if lo >= hi {
                        srow.fill(0.0);
                        continue;
                    }
                    any = true;
                    let mx = srow[lo..hi].iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
                    let mold = part.m[v];
                    let mnew = mold.max(mx);
                    let corr = if mold == f32::NEG_INFINITY { 0.0 } else { simd::exp_neg(mold - mnew) };
                    let mut sum = [0.0f32; simd::LANES];
                    for (j, x) in srow.iter_mut().enumerate() {
                        let e = simd::exp_neg(*x - mnew);
                        *x = if j >= lo && j < hi { e } else { 0.0 };
                        sum[j % simd::LANES] += *x;
                    }
                    part.l[v] = part.l[v] * corr + simd::hsum(&sum);
                    part.m[v] = mnew;
                    simd::scale(&mut part.acc[v * hd..(v + 1) * hd], corr);
                }
            }
            if any {
                super::matmul::gemm_local(&s, TILE, &vt, hd, true, &mut part.acc, hd, (nv, nk, hd), true);
            }
            k0 = k1;
        }
    }
}
