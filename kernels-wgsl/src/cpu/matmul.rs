//! `x · wᵀ` on the CPU for F32/F16/Q4_1/Q8_0 weights.
//!
//! (On CPUs with AMX tiles, packed quantized weights take [`super::q8act`] at every row count
//! instead; this module then serves f32/f16 weights and the rest.)
//! * Many rows (prefill): the `gemm` crate on f32. Non-f32 weights are dequantized panel by panel
//!   (a bounded f32 scratch of at most [`PANEL_BYTES`]) and each panel goes through `gemm`, writing
//!   straight into its column range of the output, so dequantization costs `n·k` against `2·m·n·k`
//!   flops.
//! * Few rows (decode mat-vec): memory-bound, so weights stay in their stored format and are
//!   decoded on the fly inside the dot products; output columns are split over rayon.

use gemm::Parallelism;
use half::f16;
use rayon::prelude::*;

pub(crate) use super::simd::f16_bits_to_f32;
use super::simd::{self, multiversion, LANES};
use crate::backend::{DType, KernelError, Result};
use crate::quant::{self, QK, QK_K};

/// Row count from which weights are dequantized to f32 and multiplied with `gemm` (portable path).
pub(crate) const GEMM_MIN_ROWS: usize = 8;
/// Row count up to which Q4_1/Q8_0 products use the explicit small-M kernels of
/// [`super::qmatvec`] when the CPU has them: there every weight block is read once for all rows,
/// which beats dequantizing whole panels for `gemm` until the batch is large.
pub(crate) const QMATVEC_MAX_ROWS: usize = 32;
/// Upper bound of the f32 scratch used to dequantize one weight panel.
const PANEL_BYTES: usize = 4 << 20;
/// Output columns per rayon task in the mat-vec path.
const MATVEC_COLS_PER_TASK: usize = 32;

fn parallelism() -> Parallelism {
    let t = rayon::current_num_threads();
    if t > 1 {
        Parallelism::Rayon(t)
    } else {
        Parallelism::None
    }
}

/// `out[m, n] = x[m, k] · w[n, k]ᵀ` for f32 slices, via `gemm`. `out` may have a row stride
/// (`out_rs ≥ n`) so a caller can fill a column range of a wider matrix.
pub(crate) fn gemm_f32(
    x: &[f32],
    w: &[f32],
    out: &mut [f32],
    m: usize,
    k: usize,
    n: usize,
    out_rs: usize,
) {
    assert!(
        x.len() >= m * k && w.len() >= n * k,
        "gemm_f32: operand too short"
    );
    assert!(
        m == 0 || n == 0 || out.len() >= (m - 1) * out_rs + n,
        "gemm_f32: output too short"
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        for r in 0..m {
            out[r * out_rs..r * out_rs + n].fill(0.0);
        }
        return;
    }
    // SAFETY: the asserts above bound every index gemm touches: lhs (m×k, row stride k),
    // rhs (k×n with rhs[l][j] = w[j·k + l]), dst (m×n, row stride out_rs).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            out_rs as isize,
            false,
            x.as_ptr(),
            1,
            k as isize,
            w.as_ptr(),
            k as isize,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            parallelism(),
        );
    }
}

/// Single-threaded `out[m, n] (+)= x[m, k] · w[n, k]ᵀ` (row strides `x_rs`, `w_rs`, `out_rs`) for
/// use inside an already-parallel task (attention tiles). `w_t` says `w` is given as `[k, n]`
/// (row stride `w_rs`) instead, i.e. `out = x · w`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_local(
    x: &[f32],
    x_rs: usize,
    w: &[f32],
    w_rs: usize,
    w_t: bool,
    out: &mut [f32],
    out_rs: usize,
    (m, k, n): (usize, usize, usize),
    accumulate: bool,
) {
    if m == 0 || n == 0 || k == 0 {
        return;
    }
    let w_need = if w_t {
        (k - 1) * w_rs + n
    } else {
        (n - 1) * w_rs + k
    };
    assert!(
        x.len() >= (m - 1) * x_rs + k && w.len() >= w_need,
        "gemm_local: operand too short"
    );
    assert!(
        out.len() >= (m - 1) * out_rs + n,
        "gemm_local: output too short"
    );
    let (rhs_cs, rhs_rs) = if w_t {
        (1, w_rs as isize)
    } else {
        (w_rs as isize, 1)
    };
    // SAFETY: the asserts above bound every index gemm touches for these strides.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            out_rs as isize,
            accumulate,
            x.as_ptr(),
            1,
            x_rs as isize,
            w.as_ptr(),
            rhs_cs,
            rhs_rs,
            1.0,
            1.0,
            false,
            false,
            false,
            Parallelism::None,
        );
    }
}

/// `x[m, k] · w[n, k]ᵀ → [m, n]` with `w` stored as `dtype` bytes.
pub(crate) fn matmul(
    x: &[f32],
    m: usize,
    k: usize,
    dtype: DType,
    w: &[u8],
    n: usize,
) -> Result<Vec<f32>> {
    if !k.is_multiple_of(dtype.block_len()) {
        return Err(KernelError::Shape(format!(
            "matmul: k = {k} is not a multiple of the {dtype:?} block length"
        )));
    }
    if w.len() != dtype.bytes_for(n * k) || x.len() != m * k {
        return Err(KernelError::Shape(format!(
            "matmul: x has {} values for [{m}, {k}], w has {} bytes for {dtype:?} [{n}, {k}]",
            x.len(),
            w.len()
        )));
    }
    let mut out = vec![0.0f32; m * n];
    if m == 0 || n == 0 {
        return Ok(out);
    }
    if dtype == DType::F32 {
        let wf: &[f32] =
            bytemuck::try_cast_slice(w).map_err(|e| KernelError::Device(format!("{e:?}")))?;
        gemm_f32(x, wf, &mut out, m, k, n, n);
        return Ok(out);
    }
    if matches!(dtype, DType::Q4_1 | DType::Q8_0)
        && m <= QMATVEC_MAX_ROWS
        && super::qmatvec::available()
    {
        super::qmatvec::matmul(x, m, k, dtype, w, n, &mut out);
        return Ok(out);
    }
    if m >= GEMM_MIN_ROWS {
        matmul_panels(x, m, k, dtype, w, n, &mut out)?;
    } else {
        matvec(x, m, k, dtype, w, n, &mut out);
    }
    Ok(out)
}

/// Dequantize `w` in panels of rows and multiply each with `gemm`.
fn matmul_panels(
    x: &[f32],
    m: usize,
    k: usize,
    dtype: DType,
    w: &[u8],
    n: usize,
    out: &mut [f32],
) -> Result<()> {
    let panel_rows = (PANEL_BYTES / 4 / k.max(1)).max(16).min(n);
    let row_bytes = dtype.bytes_for(k);
    let mut scratch = vec![0.0f32; panel_rows * k];
    let mut j0 = 0;
    while j0 < n {
        let rows = panel_rows.min(n - j0);
        let panel = &mut scratch[..rows * k];
        let src = &w[j0 * row_bytes..(j0 + rows) * row_bytes];
        panel
            .par_chunks_mut(k * 16)
            .zip(src.par_chunks(row_bytes * 16))
            .try_for_each(|(dst, s)| quant::dequantize_into(dtype, s, dst))?;
        gemm_f32(x, panel, &mut out[j0..], m, k, rows, n);
        j0 += rows;
    }
    Ok(())
}

/// Few-row product decoding weights on the fly; output columns split over rayon.
fn matvec(x: &[f32], m: usize, k: usize, dtype: DType, w: &[u8], n: usize, out: &mut [f32]) {
    let row_bytes = dtype.bytes_for(k);
    // Per-(row, block) sums of x, used by the Q4_1 offset term `m · Σx`.
    let xsum: Vec<f32> = if dtype == DType::Q4_1 {
        x.chunks_exact(QK).map(|c| c.iter().sum()).collect()
    } else {
        Vec::new()
    };
    let mut outt = vec![0.0f32; n * m]; // [n, m]: each task writes a contiguous column block
    outt.par_chunks_mut(MATVEC_COLS_PER_TASK * m)
        .enumerate()
        .for_each(|(t, o)| {
            let j0 = t * MATVEC_COLS_PER_TASK;
            let cols = o.len() / m;
            let wt = &w[j0 * row_bytes..(j0 + cols) * row_bytes];
            #[cfg(target_arch = "x86_64")]
            if dtype == DType::Q4_1 && simd::Isa::get() == simd::Isa::Avx512 {
                // SAFETY: the CPU supports AVX-512F (checked just above).
                unsafe { matvec_q4_1_avx512(x, &xsum, m, k, wt, o) };
                return;
            }
            matvec_task(x, &xsum, m, k, dtype, wt, o);
        });
    for j in 0..n {
        for i in 0..m {
            out[i * n + j] = outt[j * m + i];
        }
    }
}

multiversion! {
    /// Dot products of `m` rows of `x` with the weight rows in `w` (`out: [cols, m]`).
    fn matvec_task(x: &[f32], xsum: &[f32], m: usize, k: usize, dtype: DType, w: &[u8], out: &mut [f32]) {
        let row_bytes = dtype.bytes_for(k);
        let cols = out.len() / m.max(1);
        let mut buf = [0.0f32; QK_K];
        for c in 0..cols {
            let wr = &w[c * row_bytes..(c + 1) * row_bytes];
            for i in 0..m {
                let xr = &x[i * k..(i + 1) * k];
                out[c * m + i] = match dtype {
                    DType::F32 | DType::F16 => {
                        // Plain floats: any k, decoded 32 at a time (unaligned bytes are fine).
                        let es = if dtype == DType::F32 { 4 } else { 2 };
                        let mut acc = 0.0f32;
                        for (xc, wc) in xr.chunks(QK).zip(wr.chunks(es * QK)) {
                            let len = xc.len();
                            for (b, v) in buf[..len].iter_mut().zip(wc.chunks_exact(es)) {
                                *b = if es == 4 {
                                    f32::from_le_bytes([v[0], v[1], v[2], v[3]])
                                } else {
                                    f16::from_le_bytes([v[0], v[1]]).to_f32()
                                };
                            }
                            acc += simd::dot(xc, &buf[..len]);
                        }
                        acc
                    }
                    DType::Q4_1 => dot_q4_1(xr, &xsum[i * (k / QK)..(i + 1) * (k / QK)], wr),
                    DType::Q8_0 => dot_q8_0(xr, wr),
                    _ => {
                        // Other block formats: decode a block, then one vectorised dot.
                        let (len, size) = (dtype.block_len(), dtype.block_bytes());
                        let decode = quant::block_decoder(dtype).unwrap_or(|_: &[u8], o: &mut [f32]| o.fill(0.0));
                        let mut acc = 0.0f32;
                        for (xc, wc) in xr.chunks_exact(len).zip(wr.chunks_exact(size)) {
                            decode(wc, &mut buf[..len]);
                            acc += simd::dot(xc, &buf[..len]);
                        }
                        acc
                    }
                };
            }
        }
    }
}

/// [`matvec_task`] for Q4_1 with explicit AVX-512: LLVM vectorises the generic nibble loop only
/// 4 lanes wide, and decode mat-vecs are the one place the quantized format is used directly.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn matvec_q4_1_avx512(x: &[f32], xsum: &[f32], m: usize, k: usize, w: &[u8], out: &mut [f32]) {
    use std::arch::x86_64::*;
    let row_bytes = DType::Q4_1.bytes_for(k);
    let nb = k / QK;
    let cols = out.len() / m.max(1);
    let mask = _mm_set1_epi8(0x0f);
    for c in 0..cols {
        let (wb, _) =
            w[c * row_bytes..(c + 1) * row_bytes].as_chunks::<{ quant::Q4_1_BLOCK_BYTES }>();
        for i in 0..m {
            let (xb, _) = x[i * k..(i + 1) * k].as_chunks::<QK>();
            let xs = &xsum[i * nb..(i + 1) * nb];
            let (mut acc0, mut acc1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
            let mut off = 0.0f32;
            for ((xb, &sx), wb) in xb.iter().zip(xs).zip(wb) {
                let d = _mm512_set1_ps(f16_at(wb, 0));
                off = f16_at(wb, 2).mul_add(sx, off);
                // SAFETY: `wb` is 20 bytes, so bytes 4..20 are in bounds; `xb` is 32 floats.
                let (qs, x0, x1) = unsafe {
                    (
                        _mm_loadu_si128(wb.as_ptr().add(4).cast()),
                        _mm512_loadu_ps(xb.as_ptr()),
                        _mm512_loadu_ps(xb.as_ptr().add(16)),
                    )
                };
                let lo = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(qs, mask)));
                let hi = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(
                    _mm_srli_epi16::<4>(qs),
                    mask,
                )));
                acc0 = _mm512_fmadd_ps(_mm512_mul_ps(x0, d), lo, acc0);
                acc1 = _mm512_fmadd_ps(_mm512_mul_ps(x1, d), hi, acc1);
            }
            out[c * m + i] = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1)) + off;
        }
    }
}

/// f16 → f32 by bit manipulation: `half`'s conversion checks CPU features on every call, which
/// costs more than the 32 multiply-adds of a block in the decode loop.
#[inline(always)]
fn f16_at(b: &[u8], at: usize) -> f32 {
    f16_bits_to_f32(u16::from_le_bytes([b[at], b[at + 1]]))
}

/// `Σ x·w` for one Q4_1 row: per block `d·Σ x_j q_j + m·Σ x_j`. Fixed-size arrays so the
/// inner loops have no bounds checks and vectorise.
#[inline(always)]
fn dot_q4_1(x: &[f32], xsum: &[f32], w: &[u8]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let mut off = 0.0f32;
    let (xb, _) = x.as_chunks::<QK>();
    let (wb, _) = w.as_chunks::<{ quant::Q4_1_BLOCK_BYTES }>();
    for ((xb, &xs), wb) in xb.iter().zip(xsum).zip(wb) {
        let d = f16_at(wb, 0);
        let mn = f16_at(wb, 2);
        let mut blk = [0.0f32; LANES];
        for l in 0..LANES {
            let q = wb[4 + l];
            let lo = f32::from(q & 0x0f);
            let hi = f32::from(q >> 4);
            blk[l] = xb[l].mul_add(lo, xb[l + 16] * hi);
        }
        for l in 0..LANES {
            acc[l] = d.mul_add(blk[l], acc[l]);
        }
        off = mn.mul_add(xs, off);
    }
    simd::hsum(&acc) + off
}

/// `Σ x·w` for one Q8_0 row: per block `d·Σ x_j q_j`.
#[inline(always)]
fn dot_q8_0(x: &[f32], w: &[u8]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let (xb, _) = x.as_chunks::<QK>();
    let (wb, _) = w.as_chunks::<{ quant::Q8_0_BLOCK_BYTES }>();
    for (xb, wb) in xb.iter().zip(wb) {
        let d = f16_at(wb, 0);
        let mut blk = [0.0f32; LANES];
        for l in 0..LANES {
            blk[l] = xb[l].mul_add(
                f32::from(wb[2 + l] as i8),
                xb[l + 16] * f32::from(wb[18 + l] as i8),
            );
        }
        for l in 0..LANES {
            acc[l] = d.mul_add(blk[l], acc[l]);
        }
    }
    simd::hsum(&acc)
}
