//! Causal flash-style attention over a paged KV pool on the CPU.
//!
//! Work is split into tasks of (sequence, KV head, query chunk, key range); all query heads that
//! share a KV head are processed together so each K/V tile is loaded once per group. Inside a task
//! keys are visited in tiles of [`TILE`] with an online softmax (running max `m`, sum `l`,
//! unnormalised accumulator), so memory stays O(tile) whatever the context length. When there are
//! too few tasks to keep every thread busy (decode: one query row), the key range is split too and
//! the partial softmax states are merged exactly afterwards (flash-decoding).
//!
//! Multi-row tasks have two kernels: on AVX-512 machines (head_dim a multiple of 16)
//! [`attn_task_tiles`], register tiles with the scores kept transposed so that the softmax runs
//! across query vectors; elsewhere [`attn_task`], small `gemm` calls per key tile. They agree to
//! f32 rounding (the conformance suite checks both against the reference).
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

    // Multi-row tasks take the AVX-512 register-tile kernels where they apply (head_dim a
    // multiple of 16 lanes), the portable `gemm` route elsewhere.
    let tiles_avx512 = tiles::available(hd);
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
            } else if tiles_avx512 {
                attn_task_tiles
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

impl KeyRuns<'_> {
    /// Copies the keys' K and V rows (`head_dim` values each, as f32) into rows `0..` of the
    /// `kt` and `vt` tiles.
    #[inline(always)]
    fn gather(
        &self,
        k_pool: KvRows<'_>,
        v_pool: KvRows<'_>,
        hd: usize,
        kt: &mut [f32],
        vt: &mut [f32],
    ) {
        self.for_each(|j, off| {
            k_pool.copy_row(off, &mut kt[j * hd..(j + 1) * hd]);
            v_pool.copy_row(off, &mut vt[j * hd..(j + 1) * hd]);
        });
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
            let mx = simd::max(srow);
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
            let keys = KeyRuns { ka: k0, kb: k1, block_size, table, row, col: t.kvh * hd };
            keys.gather(k_pool, v_pool, hd, &mut kt, &mut vt);
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
                    // Three vectorised passes over the row: max, exp in place with the sum,
                    // and zeros outside the visible keys.
                    let mx = simd::max(&srow[lo..hi]);
                    let mold = part.m[v];
                    let mnew = mold.max(mx);
                    let corr = if mold == f32::NEG_INFINITY { 0.0 } else { simd::exp_neg(mold - mnew) };
                    let mut sum = [0.0f32; simd::LANES];
                    let (chunks, tail) = srow[lo..hi].as_chunks_mut::<{ simd::LANES }>();
                    for c in chunks {
                        for (x, s) in c.iter_mut().zip(&mut sum) {
                            *x = simd::exp_neg(*x - mnew);
                            *s += *x;
                        }
                    }
                    for x in tail {
                        *x = simd::exp_neg(*x - mnew);
                        sum[0] += *x;
                    }
                    srow[..lo].fill(0.0);
                    srow[hi..].fill(0.0);
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

/// [`attn_task`] on AVX-512 register tiles, with the scores kept transposed.
///
/// Scores are laid out `[key, vector]` (`Sᵀ`): `Sᵀ = K·Qᵀ` broadcasts each key's values against
/// 16-vector rows of `Qᵀ` (transposed once per task), the online softmax then runs across 16
/// query vectors per instruction with no horizontal reductions, and `acc += P·V` broadcasts
/// `Sᵀ[key, vector]` against rows of V in their natural layout. Neither K nor V is transposed per
/// tile. Only tiles that a row cannot see in full (the diagonal, window edges) are masked.
#[allow(clippy::too_many_arguments)]
fn attn_task_tiles(
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
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `tiles::available` checked AVX-512F before this kernel was chosen.
    unsafe {
        tiles::attn_task(q, k_pool, v_pool, block_size, table, n_past, t, p, part)
    }
    #[cfg(not(target_arch = "x86_64"))]
    attn_task(q, k_pool, v_pool, block_size, table, n_past, t, p, part)
}

/// The AVX-512 kernels behind [`attn_task_tiles`].
mod tiles {
    use super::*;
    #[cfg(target_arch = "x86_64")]
    use std::arch::x86_64::*;

    /// Query vectors per register row (one zmm of f32).
    const L: usize = 16;
    /// Rows of a register tile: keys in `Sᵀ = K·Qᵀ`, query vectors in `P·V`.
    const R: usize = 6;
    /// Largest number of zmm columns of a register tile (`R·C` accumulators ≤ 24 of 32).
    const C: usize = 4;

    /// Calls `$f::<r, c>($args)` for a runtime tile shape: `r` in 1..=R rows, `c` in 1..=C
    /// zmm columns.
    macro_rules! tile {
        ($f:ident, $r:expr, $c:expr, $args:tt) => {
            tile!(@rows $f, $r, $c, $args, 1, 2, 3, 4, 5, 6)
        };
        (@rows $f:ident, $r:expr, $c:expr, $args:tt, $($rr:literal),*) => {
            match ($r, $c) {
                $(($rr, 1) => $f::<$rr, 1> $args,
                  ($rr, 2) => $f::<$rr, 2> $args,
                  ($rr, 3) => $f::<$rr, 3> $args,
                  ($rr, _) => $f::<$rr, 4> $args,)*
                _ => unreachable!("tile rows are 1..=R"),
            }
        };
    }

    /// Whether the tile kernels can run a head of `head_dim`.
    pub(super) fn available(head_dim: usize) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            head_dim.is_multiple_of(L) && super::simd::Isa::get() == super::simd::Isa::Avx512
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = head_dim;
            false
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn attn_task(
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
        let nvp = nv.next_multiple_of(L);
        // Scaled queries, transposed: qt[d·nvp + v]; vector v = (i - i0)·group + g is row i,
        // head kvh·group + g; the padding vectors are zero.
        let mut qt = vec![0.0f32; hd * nvp];
        for i in t.i0..t.i1 {
            for g in 0..group {
                let v = (i - t.i0) * group + g;
                let src = &q[((t.q_base + i) * nh + t.kvh * group + g) * hd..][..hd];
                for (d, &x) in src.iter().enumerate() {
                    qt[d * nvp + v] = x * p.scale;
                }
            }
        }
        // Each vector's visible keys: [first, qpos]. Padding vectors copy the last row.
        let qpos: Vec<usize> = (0..nvp)
            .map(|v| n_past + t.i0 + (v / group).min(t.i1 - t.i0 - 1))
            .collect();
        let first: Vec<usize> = qpos
            .iter()
            .map(|&qp| p.window.map_or(0, |w| (qp + 1).saturating_sub(w)))
            .collect();
        let mut m = vec![f32::NEG_INFINITY; nvp];
        let mut l = vec![0.0f32; nvp];
        let mut mnew = vec![0.0f32; nvp];
        let mut corr = vec![0.0f32; nvp];
        let mut kt = vec![0.0f32; TILE * hd]; // K tile: [TILE, hd]
        let mut vt = vec![0.0f32; TILE * hd]; // V tile: [TILE, hd]
        let mut st = vec![0.0f32; TILE * nvp]; // Sᵀ, then Pᵀ: [TILE, nvp]
        let mut k0 = t.ka;
        while k0 < t.kb {
            let k1 = (k0 + TILE).min(t.kb);
            let nk = k1 - k0;
            let keys = KeyRuns {
                ka: k0,
                kb: k1,
                block_size,
                table,
                row,
                col: t.kvh * hd,
            };
            keys.gather(k_pool, v_pool, hd, &mut kt, &mut vt);
            product(&kt, (hd, 1), &qt, nvp, &mut st, nvp, (nk, hd, nvp), false);
            // Mask keys a vector cannot see (first and qpos only grow with the vector).
            if k1 - 1 > qpos[0] || k0 < first[nvp - 1] {
                for (j, srow) in st.chunks_exact_mut(nvp).take(nk).enumerate() {
                    let key = k0 + j;
                    for ((s, &f), &qp) in srow.iter_mut().zip(&first).zip(&qpos) {
                        if key < f || key > qp {
                            *s = f32::NEG_INFINITY;
                        }
                    }
                }
            }
            // Online softmax across vectors: tile max, rescale factors, then probabilities.
            mnew.copy_from_slice(&m);
            for srow in st.chunks_exact(nvp).take(nk) {
                for (mx, &s) in mnew.iter_mut().zip(srow) {
                    *mx = if s > *mx { s } else { *mx };
                }
            }
            for ((c, &mo), &mn) in corr.iter_mut().zip(&m).zip(&mnew) {
                *c = if mo == f32::NEG_INFINITY {
                    0.0
                } else {
                    simd::exp_neg(mo - mn)
                };
            }
            for (l, &c) in l.iter_mut().zip(&corr) {
                *l *= c;
            }
            for srow in st.chunks_exact_mut(nvp).take(nk) {
                for ((s, &mn), l) in srow.iter_mut().zip(&mnew).zip(l.iter_mut()) {
                    // A vector that has seen no key yet (mn = −∞) gets weight 0, not NaN.
                    *s = if mn == f32::NEG_INFINITY {
                        0.0
                    } else {
                        simd::exp_neg(*s - mn)
                    };
                    *l += *s;
                }
            }
            m.copy_from_slice(&mnew);
            for (acc, &c) in part.acc.chunks_exact_mut(hd).zip(&corr) {
                if c != 1.0 {
                    simd::scale(acc, c);
                }
            }
            product(
                &st,
                (1, nvp),
                &vt,
                hd,
                &mut part.acc,
                hd,
                (nv, nk, hd),
                true,
            );
            k0 = k1;
        }
        part.m.copy_from_slice(&m[..nv]);
        part.l.copy_from_slice(&l[..nv]);
    }

    /// `out[i·o_r + e] (+)= Σ_{s < n} a[i·a_r + s·a_s] · b[s·b_s + e]` for rows `i < m` and
    /// columns `e < cols` (a multiple of `L`), in register tiles of up to `R` rows × `C·L`
    /// columns: each step broadcasts one `a` value per row against `C` vectors of a `b` row.
    /// Both attention products are this: `Sᵀ = K·Qᵀ` (rows = keys, `a` = K rows) and
    /// `acc += P·V` (rows = query vectors, `a` = columns of `Sᵀ`).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn product(
        a: &[f32],
        (a_r, a_s): (usize, usize),
        b: &[f32],
        b_s: usize,
        out: &mut [f32],
        o_r: usize,
        (m, n, cols): (usize, usize, usize),
        accumulate: bool,
    ) {
        if m == 0 || n == 0 || cols == 0 {
            return;
        }
        assert!(cols.is_multiple_of(L), "product: {cols} columns");
        assert!(
            a.len() > (m - 1) * a_r + (n - 1) * a_s,
            "product: a too short"
        );
        assert!(b.len() >= (n - 1) * b_s + cols, "product: b too short");
        assert!(out.len() >= (m - 1) * o_r + cols, "product: out too short");
        let mut i = 0;
        while i < m {
            let r = (m - i).min(R);
            let mut e = 0;
            while e < cols {
                let c = ((cols - e) / L).min(C);
                // SAFETY: rows i..i + r, columns e..e + c·L and steps < n are in bounds
                // (asserted above); AVX-512F is enabled.
                unsafe {
                    let (ap, bp, op) = (
                        a.as_ptr().add(i * a_r),
                        b.as_ptr().add(e),
                        out.as_mut_ptr().add(i * o_r + e),
                    );
                    tile!(
                        product_tile,
                        r,
                        c,
                        (ap, a_r, a_s, bp, b_s, op, o_r, n, accumulate)
                    );
                }
                e += c * L;
            }
            i += r;
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx2,fma")]
    #[inline]
    #[allow(clippy::too_many_arguments)]
    unsafe fn product_tile<const RR: usize, const CC: usize>(
        a: *const f32,
        a_r: usize,
        a_s: usize,
        b: *const f32,
        b_s: usize,
        out: *mut f32,
        o_r: usize,
        n: usize,
        accumulate: bool,
    ) {
        // SAFETY: the caller checked the bounds of every row, column and step touched.
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); CC]; RR];
            if accumulate {
                for (r, x) in acc.iter_mut().enumerate() {
                    for (c, x) in x.iter_mut().enumerate() {
                        *x = _mm512_loadu_ps(out.add(r * o_r + c * L));
                    }
                }
            }
            for s in 0..n {
                let mut bv = [_mm512_setzero_ps(); CC];
                for (c, x) in bv.iter_mut().enumerate() {
                    *x = _mm512_loadu_ps(b.add(s * b_s + c * L));
                }
                for (r, x) in acc.iter_mut().enumerate() {
                    let av = _mm512_set1_ps(*a.add(r * a_r + s * a_s));
                    for (c, x) in x.iter_mut().enumerate() {
                        *x = _mm512_fmadd_ps(av, bv[c], *x);
                    }
                }
            }
            for (r, x) in acc.iter().enumerate() {
                for (c, x) in x.iter().enumerate() {
                    _mm512_storeu_ps(out.add(r * o_r + c * L), *x);
                }
            }
        }
    }
}
