//! Gated delta-rule linear attention on the CPU: a step form for decode and an exact chunked
//! form for prefill, parallel over heads.
//!
//! Chunked form (per head, chunk of `c` tokens, state `S₀` at its start, `Gₜ = Σ_{s≤t} g_s`):
//! writing the step `Sₜ = aₜ Sₜ₋₁ + wₜ kₜᵀ` with `wₜ = βₜ (vₜ − aₜ Sₜ₋₁ kₜ)` and unrolling gives
//!
//! * `wₜ = βₜ (vₜ − e^{Gₜ} S₀ kₜ) − βₜ Σ_{s<t} e^{Gₜ−G_s} (kₜ·k_s) w_s` — a unit lower-triangular
//!   system solved by forward substitution (the WY/UT form of DeltaNet);
//! * `oₜ = scale · (e^{Gₜ} S₀ qₜ + Σ_{s≤t} e^{Gₜ−G_s} (k_s·qₜ) w_s)`;
//! * `S_c = e^{G_c} S₀ + Σ_s e^{G_c−G_s} w_s k_sᵀ`.
//!
//! This is algebraically the token-by-token recurrence, so the two agree to rounding; but it does
//! its work as small dense products (`c²·d` and `c·d²`) instead of `c` rank-1 updates of the whole
//! state, and every decay factor `e^{Gₜ−G_s}` with `s ≤ t` is ≤ 1, so nothing overflows.

use rayon::prelude::*;

use super::simd::{self, multiversion};
use crate::backend::{LinearAttnParams, Result};
use crate::reference::check_linear_attention;

/// Longest chunk accepted; longer requests are clamped (scratch is `O(chunk²)` per head).
const MAX_CHUNK: usize = 256;

/// Returns `[n, heads · dv]`, updating `state: [heads, dv, dk]` in place.
#[allow(clippy::too_many_arguments)]
pub(crate) fn linear_attention(
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
    let chunk = p.chunk.clamp(1, MAX_CHUNK);
    let per_head: Vec<Vec<f32>> = state
        .par_chunks_mut(dv * dk)
        .enumerate()
        .map(|(h, s)| {
            let mut out = vec![0.0f32; n * dv];
            let mut t0 = 0;
            while t0 < n {
                let c = chunk.min(n - t0);
                if c == 1 {
                    step(
                        q,
                        k,
                        v,
                        beta,
                        g,
                        s,
                        p,
                        h,
                        t0,
                        &mut out[t0 * dv..(t0 + 1) * dv],
                    );
                } else {
                    chunk_form(
                        q,
                        k,
                        v,
                        beta,
                        g,
                        s,
                        p,
                        h,
                        t0,
                        c,
                        &mut out[t0 * dv..(t0 + c) * dv],
                    );
                }
                t0 += c;
            }
            out
        })
        .collect();
    let mut out = vec![0.0f32; n * nh * dv];
    for (h, o) in per_head.iter().enumerate() {
        for t in 0..n {
            out[(t * nh + h) * dv..][..dv].copy_from_slice(&o[t * dv..(t + 1) * dv]);
        }
    }
    Ok(out)
}

multiversion! {
    /// One token `t` of head `h`: decay, delta-rule update, read-out.
    fn step(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        beta: &[f32],
        g: &[f32],
        s: &mut [f32],
        p: &LinearAttnParams,
        h: usize,
        t: usize,
        out: &mut [f32],
    ) {
        let (nh, dk, dv) = (p.n_heads, p.key_dim, p.value_dim);
        let kt = &k[(t * nh + h) * dk..][..dk];
        let qt = &q[(t * nh + h) * dk..][..dk];
        let vt = &v[(t * nh + h) * dv..][..dv];
        let decay = g[t * nh + h].exp();
        let b = beta[t * nh + h];
        for i in 0..dv {
            let srow = &mut s[i * dk..(i + 1) * dk];
            simd::scale(srow, decay);
            let u = b * (vt[i] - simd::dot(srow, kt));
            simd::axpy(srow, u, kt);
            out[i] = p.scale * simd::dot(srow, qt);
        }
    }
}

multiversion! {
    /// Tokens `t0..t0 + c` of head `h` in the chunked form (see the module docs).
    fn chunk_form(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        beta: &[f32],
        g: &[f32],
        s: &mut [f32],
        p: &LinearAttnParams,
        h: usize,
        t0: usize,
        c: usize,
        out: &mut [f32],
    ) {
        let (nh, dk, dv) = (p.n_heads, p.key_dim, p.value_dim);
        let kc = |t: usize| &k[((t0 + t) * nh + h) * dk..][..dk];
        let qc = |t: usize| &q[((t0 + t) * nh + h) * dk..][..dk];
        // Cumulative log decay within the chunk.
        let mut gc = vec![0.0f32; c];
        let mut acc = 0.0f32;
        for (t, x) in gc.iter_mut().enumerate() {
            acc += g[(t0 + t) * nh + h];
            *x = acc;
        }
        // w: [c, dv], starts as βₜ (vₜ − e^{Gₜ} S₀ kₜ); o: S₀ qₜ e^{Gₜ} (scaled later).
        let mut w = vec![0.0f32; c * dv];
        for t in 0..c {
            let (kt, qt) = (kc(t), qc(t));
            let vt = &v[((t0 + t) * nh + h) * dv..][..dv];
            let b = beta[(t0 + t) * nh + h];
            let eg = gc[t].exp();
            let wt = &mut w[t * dv..(t + 1) * dv];
            let ot = &mut out[t * dv..(t + 1) * dv];
            for i in 0..dv {
                let srow = &s[i * dk..(i + 1) * dk];
                wt[i] = b * (vt[i] - eg * simd::dot(srow, kt));
                ot[i] = eg * simd::dot(srow, qt);
            }
        }
        // Forward substitution: wₜ −= βₜ Σ_{s<t} e^{Gₜ−G_s} (kₜ·k_s) w_s.
        for t in 1..c {
            let b = beta[(t0 + t) * nh + h];
            let (done, rest) = w.split_at_mut(t * dv);
            let wt = &mut rest[..dv];
            for s_ in 0..t {
                let a = b * (gc[t] - gc[s_]).exp() * simd::dot(kc(t), kc(s_));
                simd::axpy(wt, -a, &done[s_ * dv..(s_ + 1) * dv]);
            }
        }
        // oₜ += Σ_{s≤t} e^{Gₜ−G_s} (k_s·qₜ) w_s; then scale.
        for t in 0..c {
            let ot = &mut out[t * dv..(t + 1) * dv];
            for s_ in 0..=t {
                let a = (gc[t] - gc[s_]).exp() * simd::dot(kc(s_), qc(t));
                simd::axpy(ot, a, &w[s_ * dv..(s_ + 1) * dv]);
            }
            simd::scale(ot, p.scale);
        }
        // S ← e^{G_c} S₀ + Σ_s e^{G_c−G_s} w_s k_sᵀ.
        let gl = gc[c - 1];
        let decay_all = gl.exp();
        let coef: Vec<f32> = gc.iter().map(|&x| (gl - x).exp()).collect();
        for i in 0..dv {
            let srow = &mut s[i * dk..(i + 1) * dk];
            simd::scale(srow, decay_all);
            for t in 0..c {
                simd::axpy(srow, coef[t] * w[t * dv + i], kc(t));
            }
        }
    }
}
