//! Plain, obvious Rust twins of every kernel: the oracle for tests of both backends.
//!
//! Each function mirrors one [`crate::Backend`] operation on host slices. They are
//! single-threaded, unoptimised and accumulate in `f64` where it matters, so a disagreement with a
//! backend points at the backend. Bad shapes are returned as [`KernelError::Shape`] errors, never
//! panics, so tests can also probe a backend's validation against the oracle's.
//!
//! Layouts are those of [`crate::Backend`]: row-major, last dimension contiguous; matmul weights
//! are `[n, k]` and `matmul(x, w) = x · wᵀ`; KV pools are `[n_blocks, block_size, n_kv_heads,
//! head_dim]` of any [`KvElem`] (`f32` or `f16`: values are rounded with [`KvElem::from_f32`] on
//! the way in and widened with [`KvElem::to_f32`] on the way out, one value at a time);
//! linear-attention state is `[heads, dv, dk]`.

use crate::backend::{
    AttnParams, AttnSeq, DType, GluAct, KernelError, LinearAttnParams, Result, RopeStyle,
};
use crate::kv::KvElem;
use crate::quant;

fn shape_err<T>(msg: String) -> Result<T> {
    Err(KernelError::Shape(msg))
}

fn check_len(what: &str, got: usize, want: usize) -> Result<()> {
    if got != want {
        return shape_err(format!("{what}: expected {want} values, got {got}"));
    }
    Ok(())
}

/// Rows `ids` of `table` (`[vocab, d]`, stored as `dtype`) → `[ids.len(), d]`.
pub fn embedding(
    dtype: DType,
    table: &[u8],
    vocab: usize,
    d: usize,
    ids: &[u32],
) -> Result<Vec<f32>> {
    if !d.is_multiple_of(dtype.block_len()) {
        return shape_err(format!(
            "embedding: row length {d} is not a multiple of {dtype:?} blocks"
        ));
    }
    check_len(
        "embedding table bytes",
        table.len(),
        dtype.bytes_for(vocab * d),
    )?;
    let row_bytes = dtype.bytes_for(d);
    let mut out = vec![0.0; ids.len() * d];
    for (o, &id) in out.chunks_exact_mut(d.max(1)).zip(ids) {
        let id = id as usize;
        if id >= vocab {
            return Err(KernelError::InvalidArgument(format!(
                "embedding: id {id} >= vocab {vocab}"
            )));
        }
        quant::dequantize_into(dtype, &table[id * row_bytes..(id + 1) * row_bytes], o)?;
    }
    Ok(out)
}

/// `x: [m, k]` · `w: [n, k]`ᵀ → `[m, n]`, all `f32`, accumulated in `f64`.
pub fn matmul_f32(x: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Result<Vec<f32>> {
    check_len("matmul x", x.len(), m * k)?;
    check_len("matmul w", w.len(), n * k)?;
    let mut out = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut acc = 0.0f64;
            for l in 0..k {
                acc += f64::from(x[i * k + l]) * f64::from(w[j * k + l]);
            }
            out[i * n + j] = acc as f32;
        }
    }
    Ok(out)
}

/// `x: [m, k]` · `w: [n, k]`ᵀ with `w` stored as `w_dtype` bytes (dequantized first).
pub fn matmul(
    x: &[f32],
    m: usize,
    k: usize,
    w_dtype: DType,
    w: &[u8],
    n: usize,
) -> Result<Vec<f32>> {
    check_len("matmul w bytes", w.len(), w_dtype.bytes_for(n * k))?;
    let wf = quant::dequantize(w_dtype, w, n * k)?;
    matmul_f32(x, &wf, m, k, n)
}

/// Row-wise RMSNorm of `x: [rows, d]` with weight `w: [d]`: `x / sqrt(mean(x²) + eps) · w`.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32) -> Result<Vec<f32>> {
    let d = w.len();
    if d == 0 || !x.len().is_multiple_of(d) {
        return shape_err(format!("rms_norm: {} values are not rows of {d}", x.len()));
    }
    let mut out = vec![0.0; x.len()];
    for (o, r) in out.chunks_exact_mut(d).zip(x.chunks_exact(d)) {
        let ms = r.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>() / d as f64;
        let inv = 1.0 / (ms + f64::from(eps)).sqrt();
        for ((o, &v), &g) in o.iter_mut().zip(r).zip(w) {
            *o = (f64::from(v) * inv * f64::from(g)) as f32;
        }
    }
    Ok(out)
}

/// Rotary angle of pair `i` at position `pos`: `pos · base^(-2i/head_dim)` (in `f64`).
pub fn rope_angle(pos: u32, i: usize, head_dim: usize, base: f32) -> f64 {
    f64::from(pos) * f64::from(base).powf(-2.0 * i as f64 / head_dim as f64)
}

/// Rotary position embedding of `x: [n, n_heads, head_dim]`, row `t` at `positions[t]`.
pub fn rope(
    x: &[f32],
    n_heads: usize,
    head_dim: usize,
    positions: &[u32],
    base: f32,
    style: RopeStyle,
) -> Result<Vec<f32>> {
    if !head_dim.is_multiple_of(2) {
        return shape_err(format!("rope: head_dim {head_dim} is odd"));
    }
    check_len("rope x", x.len(), positions.len() * n_heads * head_dim)?;
    let mut out = x.to_vec();
    let half = head_dim / 2;
    for (t, &pos) in positions.iter().enumerate() {
        for h in 0..n_heads {
            let base_idx = (t * n_heads + h) * head_dim;
            for i in 0..half {
                let (a, b) = match style {
                    RopeStyle::Normal => (base_idx + 2 * i, base_idx + 2 * i + 1),
                    RopeStyle::Neox => (base_idx + i, base_idx + i + half),
                };
                let (sin, cos) = rope_angle(pos, i, head_dim, base).sin_cos();
                let (x0, x1) = (f64::from(x[a]), f64::from(x[b]));
                out[a] = (x0 * cos - x1 * sin) as f32;
                out[b] = (x0 * sin + x1 * cos) as f32;
            }
        }
    }
    Ok(out)
}

/// `act(gate) · up`, elementwise (f64 inside).
pub fn glu(gate: &[f32], up: &[f32], act: GluAct) -> Result<Vec<f32>> {
    check_len("glu up", up.len(), gate.len())?;
    Ok(gate
        .iter()
        .zip(up)
        .map(|(&g, &u)| {
            let g = f64::from(g);
            let a = match act {
                GluAct::Silu => g / (1.0 + (-g).exp()),
                GluAct::GeluTanh => {
                    let z = (2.0 / std::f64::consts::PI).sqrt() * (g + 0.044715 * g * g * g);
                    0.5 * g * (1.0 + z.tanh())
                }
            };
            (a * f64::from(u)) as f32
        })
        .collect())
}

/// `x · s`, elementwise.
pub fn scale(x: &[f32], s: f32) -> Vec<f32> {
    x.iter().map(|v| v * s).collect()
}

/// `a + b`, elementwise.
pub fn add(a: &[f32], b: &[f32]) -> Result<Vec<f32>> {
    check_len("add b", b.len(), a.len())?;
    Ok(a.iter().zip(b).map(|(x, y)| x + y).collect())
}

/// Row-wise softmax of `x: [rows, d]`.
pub fn softmax(x: &[f32], d: usize) -> Result<Vec<f32>> {
    if d == 0 || !x.len().is_multiple_of(d) {
        return shape_err(format!("softmax: {} values are not rows of {d}", x.len()));
    }
    let mut out = vec![0.0; x.len()];
    for (o, r) in out.chunks_exact_mut(d).zip(x.chunks_exact(d)) {
        let max = r
            .iter()
            .fold(f64::NEG_INFINITY, |m, &v| m.max(f64::from(v)));
        let sum: f64 = r.iter().map(|&v| (f64::from(v) - max).exp()).sum();
        for (o, &v) in o.iter_mut().zip(r) {
            *o = ((f64::from(v) - max).exp() / sum) as f32;
        }
    }
    Ok(out)
}

/// Index of the maximum of each row of `x: [rows, d]`; the lowest index wins ties and NaNs never win
/// (an all-NaN row gives 0).
pub fn argmax(x: &[f32], d: usize) -> Result<Vec<u32>> {
    if d == 0 || !x.len().is_multiple_of(d) {
        return shape_err(format!("argmax: {} values are not rows of {d}", x.len()));
    }
    Ok(x.chunks_exact(d)
        .map(|r| {
            let mut best = 0usize;
            for (i, &v) in r.iter().enumerate() {
                if v > r[best] || (r[best].is_nan() && !v.is_nan()) {
                    best = i;
                }
            }
            best as u32
        })
        .collect())
}

/// Validate a `kv_write` of `slots.len()` rows of `row` values into pools of `pool_len` values each.
pub(crate) fn check_kv_write(
    k_len: usize,
    v_len: usize,
    k_pool_len: usize,
    v_pool_len: usize,
    row: usize,
    slots: &[u32],
) -> Result<()> {
    check_len("kv_write k", k_len, slots.len() * row)?;
    check_len("kv_write v", v_len, slots.len() * row)?;
    check_len("kv_write v_pool", v_pool_len, k_pool_len)?;
    let capacity = k_pool_len / row.max(1);
    if let Some(&s) = slots.iter().find(|&&s| s as usize >= capacity) {
        return Err(KernelError::InvalidArgument(format!(
            "kv_write: slot {s} >= pool capacity {capacity}"
        )));
    }
    Ok(())
}

/// Write `k`, `v` (`[n, row]`, `row = n_kv_heads · head_dim`) into paged pools (`[slots_total, row]`
/// viewed flat) at flat slots `slots[i] = block · block_size + offset`; a repeated slot keeps the
/// last row.
pub fn kv_write<T: KvElem>(
    k_pool: &mut [T],
    v_pool: &mut [T],
    k: &[f32],
    v: &[f32],
    row: usize,
    slots: &[u32],
) -> Result<()> {
    check_kv_write(k.len(), v.len(), k_pool.len(), v_pool.len(), row, slots)?;
    for (i, &s) in slots.iter().enumerate() {
        let s = s as usize;
        for e in 0..row {
            k_pool[s * row + e] = T::from_f32(k[i * row + e]);
            v_pool[s * row + e] = T::from_f32(v[i * row + e]);
        }
    }
    Ok(())
}

/// Validate attention arguments shared by the reference and the backends; returns total query rows.
pub(crate) fn check_attention(
    q_len: usize,
    pool_len: usize,
    block_size: usize,
    seqs: &[AttnSeq<'_>],
    p: &AttnParams,
) -> Result<usize> {
    if p.n_kv_heads == 0 || !p.n_heads.is_multiple_of(p.n_kv_heads) || p.head_dim == 0 {
        return shape_err(format!(
            "attention: n_kv_heads {} must divide n_heads {} (head_dim {})",
            p.n_kv_heads, p.n_heads, p.head_dim
        ));
    }
    if block_size == 0 {
        return shape_err("attention: block_size is 0".into());
    }
    if p.window == Some(0) {
        return Err(KernelError::InvalidArgument(
            "attention: window 0 sees no keys".into(),
        ));
    }
    let row = p.n_kv_heads * p.head_dim;
    let n_blocks = pool_len / (block_size * row);
    let mut rows = 0;
    for (si, s) in seqs.iter().enumerate() {
        let total = s.n_past + s.n_new;
        let need = total.div_ceil(block_size);
        if s.block_table.len() < need {
            return shape_err(format!(
                "attention: sequence {si} has {total} tokens but {} blocks of {block_size}",
                s.block_table.len()
            ));
        }
        if let Some(&b) = s.block_table[..need]
            .iter()
            .find(|&&b| b as usize >= n_blocks)
        {
            return Err(KernelError::InvalidArgument(format!(
                "attention: sequence {si} refers to block {b} of a pool of {n_blocks}"
            )));
        }
        rows += s.n_new;
    }
    check_len("attention q", q_len, rows * p.n_heads * p.head_dim)?;
    Ok(rows)
}

/// Causal attention of `q: [Σ n_new, n_heads, head_dim]` over paged K/V, exact two-pass softmax in
/// `f64` → `[Σ n_new, n_heads · head_dim]`. See [`crate::Backend::attention`].
pub fn attention<T: KvElem>(
    q: &[f32],
    k_pool: &[T],
    v_pool: &[T],
    block_size: usize,
    seqs: &[AttnSeq<'_>],
    p: &AttnParams,
) -> Result<Vec<f32>> {
    check_len("attention v_pool", v_pool.len(), k_pool.len())?;
    let rows = check_attention(q.len(), k_pool.len(), block_size, seqs, p)?;
    let (hd, nh) = (p.head_dim, p.n_heads);
    let row = p.n_kv_heads * hd;
    let group = nh / p.n_kv_heads;
    let mut out = vec![0.0; rows * nh * hd];
    let mut q_row = 0;
    for s in seqs {
        let slot =
            |pos: usize| s.block_table[pos / block_size] as usize * block_size + pos % block_size;
        for i in 0..s.n_new {
            let pos = s.n_past + i;
            let first = match p.window {
                Some(w) => (pos + 1).saturating_sub(w),
                None => 0,
            };
            for h in 0..nh {
                let kvh = h / group;
                let qv = &q[(q_row * nh + h) * hd..][..hd];
                let scores: Vec<f64> = (first..=pos)
                    .map(|kp| {
                        let kv = &k_pool[slot(kp) * row + kvh * hd..][..hd];
                        let dot: f64 = qv
                            .iter()
                            .zip(kv)
                            .map(|(&a, &b)| f64::from(a) * f64::from(b.to_f32()))
                            .sum();
                        dot * f64::from(p.scale)
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let sum: f64 = weights.iter().sum();
                let o = &mut out[(q_row * nh + h) * hd..][..hd];
                for (d, o) in o.iter_mut().enumerate() {
                    let mut acc = 0.0f64;
                    for (kp, w) in (first..=pos).zip(&weights) {
                        acc += w * f64::from(v_pool[slot(kp) * row + kvh * hd + d].to_f32());
                    }
                    *o = (acc / sum) as f32;
                }
            }
            q_row += 1;
        }
    }
    Ok(out)
}

/// Validate linear-attention arguments; returns the number of tokens.
pub(crate) fn check_linear_attention(
    q: usize,
    k: usize,
    v: usize,
    beta: usize,
    g: usize,
    state: usize,
    p: &LinearAttnParams,
) -> Result<usize> {
    let (h, dk, dv) = (p.n_heads, p.key_dim, p.value_dim);
    if h == 0 || dk == 0 || dv == 0 {
        return shape_err(format!(
            "linear_attention: empty dims (heads {h}, dk {dk}, dv {dv})"
        ));
    }
    let n = beta / h;
    check_len("linear_attention beta", beta, n * h)?;
    check_len("linear_attention g", g, n * h)?;
    check_len("linear_attention q", q, n * h * dk)?;
    check_len("linear_attention k", k, n * h * dk)?;
    check_len("linear_attention v", v, n * h * dv)?;
    check_len("linear_attention state", state, h * dv * dk)?;
    Ok(n)
}

/// Gated delta-rule linear attention, token by token, in `f64` (see
/// [`crate::LinearAttnParams`] for the recurrence). `state: [heads, dv, dk]` is updated in place;
/// returns `[n, heads · dv]`. `p.chunk` is ignored: this is the step form.
pub fn linear_attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    beta: &[f32],
    g: &[f32],
    state: &mut [f32],
    p: &LinearAttnParams,
) -> Result<Vec<f32>> {
    let n = check_linear_attention(
        q.len(),
        k.len(),
        v.len(),
        beta.len(),
        g.len(),
        state.len(),
        p,
    )?;
    let (nh, dk, dv) = (p.n_heads, p.key_dim, p.value_dim);
    let mut out = vec![0.0; n * nh * dv];
    for h in 0..nh {
        let mut s: Vec<f64> = state[h * dv * dk..(h + 1) * dv * dk]
            .iter()
            .map(|&x| f64::from(x))
            .collect();
        for t in 0..n {
            let kt = &k[(t * nh + h) * dk..][..dk];
            let qt = &q[(t * nh + h) * dk..][..dk];
            let vt = &v[(t * nh + h) * dv..][..dv];
            let decay = f64::from(g[t * nh + h]).exp();
            let b = f64::from(beta[t * nh + h]);
            s.iter_mut().for_each(|x| *x *= decay);
            for i in 0..dv {
                let srow = &mut s[i * dk..(i + 1) * dk];
                let sk: f64 = srow.iter().zip(kt).map(|(&a, &c)| a * f64::from(c)).sum();
                let u = b * (f64::from(vt[i]) - sk);
                for (x, &c) in srow.iter_mut().zip(kt) {
                    *x += u * f64::from(c);
                }
                let sq: f64 = srow.iter().zip(qt).map(|(&a, &c)| a * f64::from(c)).sum();
                out[(t * nh + h) * dv + i] = (f64::from(p.scale) * sq) as f32;
            }
        }
        for (dst, &x) in state[h * dv * dk..(h + 1) * dv * dk].iter_mut().zip(&s) {
            *dst = x as f32;
        }
    }
    Ok(out)
}

/// Validate a block index list against a pool of `pool_len` values in blocks of `block_elems`.
pub(crate) fn check_blocks(
    what: &str,
    pool_len: usize,
    block_elems: usize,
    indices: &[u32],
) -> Result<()> {
    if block_elems == 0 || !pool_len.is_multiple_of(block_elems) {
        return shape_err(format!(
            "{what}: pool of {pool_len} values is not blocks of {block_elems}"
        ));
    }
    let n_blocks = pool_len / block_elems;
    if let Some(&b) = indices.iter().find(|&&b| b as usize >= n_blocks) {
        return Err(KernelError::InvalidArgument(format!(
            "{what}: block {b} >= {n_blocks}"
        )));
    }
    Ok(())
}

/// Copy blocks `indices` (each `block_elems` values) out of `pool`, as `f32`.
pub fn gather_blocks<T: KvElem>(
    pool: &[T],
    block_elems: usize,
    indices: &[u32],
) -> Result<Vec<f32>> {
    check_blocks("gather_blocks", pool.len(), block_elems, indices)?;
    let mut out = Vec::with_capacity(indices.len() * block_elems);
    for &b in indices {
        out.extend(
            pool[b as usize * block_elems..][..block_elems]
                .iter()
                .map(|x| x.to_f32()),
        );
    }
    Ok(out)
}

/// Overwrite blocks `indices` of `pool` from `data` laid out as [`gather_blocks`] returns.
pub fn scatter_blocks<T: KvElem>(
    pool: &mut [T],
    block_elems: usize,
    indices: &[u32],
    data: &[f32],
) -> Result<()> {
    check_blocks("scatter_blocks", pool.len(), block_elems, indices)?;
    check_len(
        "scatter_blocks data",
        data.len(),
        indices.len() * block_elems,
    )?;
    for (&b, d) in indices.iter().zip(data.chunks_exact(block_elems)) {
        for (p, &x) in pool[b as usize * block_elems..][..block_elems]
            .iter_mut()
            .zip(d)
        {
            *p = T::from_f32(x);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matmul_small_by_hand() {
        // [[1,2],[3,4]] · [[1,0],[1,1],[0,2]]ᵀ
        let y = matmul_f32(&[1., 2., 3., 4.], &[1., 0., 1., 1., 0., 2.], 2, 2, 3).unwrap();
        assert_eq!(y, vec![1., 3., 4., 3., 7., 8.]);
    }

    #[test]
    fn rope_styles_rotate_the_documented_pairs() {
        // One head of 4 dims at position 1 with base 1: every pair rotates by 1 radian.
        let x = [1.0, 0.0, 0.0, 0.0];
        let (s, c) = 1.0f64.sin_cos();
        let n = rope(&x, 1, 4, &[1], 1.0, RopeStyle::Normal).unwrap();
        assert!((n[0] as f64 - c).abs() < 1e-6 && (n[1] as f64 - s).abs() < 1e-6 && n[2] == 0.0);
        let x = [1.0, 0.0, 0.0, 0.0];
        let r = rope(&x, 1, 4, &[1], 1.0, RopeStyle::Neox).unwrap();
        assert!((r[0] as f64 - c).abs() < 1e-6 && (r[2] as f64 - s).abs() < 1e-6 && r[1] == 0.0);
    }

    #[test]
    fn attention_single_key_returns_its_value() {
        let p = AttnParams {
            n_heads: 2,
            n_kv_heads: 1,
            head_dim: 2,
            scale: 1.0,
            window: None,
        };
        let k_pool = vec![0.5, 0.5, 9., 9.];
        let v_pool = vec![3.0, -1.0, 9., 9.];
        let table = [0u32];
        let seqs = [AttnSeq {
            block_table: &table,
            n_past: 0,
            n_new: 1,
        }];
        let o = attention(&[1., 2., 3., 4.], &k_pool, &v_pool, 2, &seqs, &p).unwrap();
        assert_eq!(o, vec![3.0, -1.0, 3.0, -1.0]);
    }

    #[test]
    fn linear_attention_one_step_by_hand() {
        // S = 0, g = 0, β = 1: S = v kᵀ, o = scale · v (kᵀ q).
        let p = LinearAttnParams {
            n_heads: 1,
            key_dim: 2,
            value_dim: 1,
            scale: 0.5,
            chunk: 1,
        };
        let mut state = vec![0.0; 2];
        let o =
            linear_attention(&[1., 1.], &[1., 0.], &[4.], &[1.], &[0.], &mut state, &p).unwrap();
        assert_eq!(state, vec![4.0, 0.0]);
        assert_eq!(o, vec![2.0]);
    }

    #[test]
    fn argmax_ties_and_nans() {
        assert_eq!(
            argmax(&[1., 3., 3., f32::NAN, 0., 0.], 3).unwrap(),
            vec![1, 1]
        );
        assert_eq!(argmax(&[f32::NAN, 2.0], 2).unwrap(), vec![1]);
    }

    #[test]
    fn bad_shapes_are_errors() {
        assert!(matmul_f32(&[1.0; 3], &[1.0; 4], 2, 2, 2).is_err());
        assert!(softmax(&[1.0; 3], 2).is_err());
        assert!(gather_blocks(&[0.0; 8], 4, &[2]).is_err());
        let p = AttnParams {
            n_heads: 3,
            n_kv_heads: 2,
            head_dim: 2,
            scale: 1.0,
            window: None,
        };
        assert!(attention(&[0.0; 6], &[0.0; 8], &[0.0; 8], 2, &[], &p).is_err());
    }
}
