//! Few-row products `x[m, k] · w[n, k]ᵀ` with Q4_1 / Q8_0 weights, for decode (m = batch size).
//!
//! Decode is bound by reading the weights, so they stay quantized and every weight block is read
//! from memory **once for all `m` rows**: a block is decoded to f32 in registers and then
//! multiplied with the matching 32 values of each row. Activations stay f32 (no 8-bit rounding of
//! `x`), so results equal the dequantize-then-multiply reference up to summation order.
//!
//! Work is tiled as `C` weight rows × `R` activation rows with one accumulator per (row, column,
//! half-block): enough independent FMA chains to hide their latency, while a tile's decoded weights
//! and loaded activations are reused `R` and `C` times. Output columns are split over rayon in a
//! few large chunks, and not at all when the product is too small to pay for waking a thread.
//!
//! The kernels use AVX-512F explicitly (LLVM vectorises the generic nibble loop only 4 lanes
//! wide); [`available`] says whether this CPU can run them, otherwise the caller falls back to
//! the portable mat-vec in `matmul.rs`.

use rayon::prelude::*;

use crate::backend::DType;
use crate::quant::{self, QK};

/// Block-rows (`n · k/32 · m`) below which a product runs on the calling thread: about 10 µs of
/// work, comparable to what waking the pool and joining costs.
const PAR_MIN_BLOCK_ROWS: usize = 4096;
/// Chunks per thread when splitting columns: more than one so a thread slowed down by other load
/// on the machine does not hold the whole product back.
const CHUNKS_PER_THREAD: usize = 3;

/// True when the explicit kernels can run here (x86-64 with AVX-512F and F16C).
pub(crate) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// True when the one-row integer kernels can run (AVX-512 VNNI on 256-bit vectors).
fn vnni_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        available()
            && std::arch::is_x86_feature_detected!("avx512vnni")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// One activation row split into two 8-bit planes per 32-value block, for integer dot products:
/// `x ≈ d · (hi + lo/256)` with `hi, lo ∈ [-127, 127]`, plus the exact f32 block sums (Q4_1's
/// offset term). The second plane keeps `x` to ~16 bits (error ≤ `amax/32512` per value instead
/// of llama.cpp's `amax/254`), so the result still matches the f32 reference closely, while the
/// weights are consumed as bytes by `vpdpbusd`: for one row that needs about half the vector
/// instructions of decoding every block to f32.
pub(crate) struct SplitQ8Row {
    hi: Vec<i8>,
    lo: Vec<i8>,
    /// `d / 256` per block.
    scale: Vec<f32>,
    sum: Vec<f32>,
}

impl SplitQ8Row {
    pub(crate) fn new(x: &[f32]) -> Self {
        let nb = x.len() / QK;
        let mut r = SplitQ8Row {
            hi: vec![0; nb * QK],
            lo: vec![0; nb * QK],
            scale: vec![0.0; nb],
            sum: vec![0.0; nb],
        };
        split_q8(x, &mut r.hi, &mut r.lo, &mut r.scale, &mut r.sum);
        r
    }
}

super::simd::multiversion! {
    /// Fills the planes of a [`SplitQ8Row`] (compiled per ISA so `round` is one instruction, not
    /// a libm call per value).
    fn split_q8(x: &[f32], hi: &mut [i8], lo: &mut [i8], scale: &mut [f32], sum: &mut [f32]) {
        for (b, xb) in x.chunks_exact(QK).enumerate() {
            let amax = xb.iter().fold(0.0f32, |a, v| a.max(v.abs()));
            sum[b] = xb.iter().sum();
            if amax == 0.0 || !amax.is_finite() {
                // All zero, or non-finite input, which the f32 path would propagate: do the same.
                scale[b] = if amax == 0.0 { 0.0 } else { f32::NAN };
                continue;
            }
            let id = 127.0 / amax;
            scale[b] = amax / 127.0 / 256.0;
            for ((&v, h), l) in xb.iter().zip(&mut hi[b * QK..(b + 1) * QK]).zip(&mut lo[b * QK..(b + 1) * QK]) {
                let t = v * id;
                let r = t.round().clamp(-127.0, 127.0);
                *h = r as i8;
                *l = ((t - r) * 256.0).round().clamp(-127.0, 127.0) as i8;
            }
        }
    }
}

/// `out[m, n] = x[m, k] · w[n, k]ᵀ` for `dtype` ∈ {Q4_1, Q8_0}. The caller has checked the sizes
/// (`x.len() == m·k`, `w` holds `n·k` values, `k % 32 == 0`, `out.len() == m·n`) and
/// [`available`].
pub(crate) fn matmul(
    x: &[f32],
    m: usize,
    k: usize,
    dtype: DType,
    w: &[u8],
    n: usize,
    out: &mut [f32],
) {
    assert!(
        matches!(dtype, DType::Q4_1 | DType::Q8_0)
            && k.is_multiple_of(QK)
            && x.len() == m * k
            && w.len() == dtype.bytes_for(n * k)
            && out.len() == m * n,
        "qmatvec::matmul: sizes not checked by the caller"
    );
    if m == 0 || n == 0 {
        return;
    }
    let row_bytes = dtype.bytes_for(k);
    let work = n * (k / QK) * m;
    let threads = rayon::current_num_threads();
    // Each task fills `[cols, m]` (column-major) so column chunks are contiguous; for m = 1 that
    // is already the output layout.
    let split = (m == 1 && vnni_available()).then(|| SplitQ8Row::new(x));
    let run = |j0: usize, o: &mut [f32]| {
        let cols = o.len() / m;
        let wt = &w[j0 * row_bytes..(j0 + cols) * row_bytes];
        match &split {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `split` exists only when `vnni_available()` said the features are present.
            Some(xq) => unsafe { vnni::task(xq, k, dtype, wt, o) },
            _ => task(x, m, k, dtype, wt, o),
        }
    };
    let fill = |dst: &mut [f32]| {
        if work < PAR_MIN_BLOCK_ROWS || threads == 1 {
            run(0, dst);
        } else {
            let chunks = threads * CHUNKS_PER_THREAD;
            // Columns per chunk: a multiple of the widest column tile.
            let cols = n.div_ceil(chunks).next_multiple_of(4).max(4);
            dst.par_chunks_mut(cols * m)
                .enumerate()
                .for_each(|(t, o)| run(t * cols, o));
        }
    };
    if m == 1 {
        fill(out);
    } else {
        let mut transposed = vec![0.0f32; m * n];
        fill(&mut transposed);
        for j in 0..n {
            for i in 0..m {
                out[i * n + j] = transposed[j * m + i];
            }
        }
    }
}

/// All rows of `x` against the weight rows in `w`; `out: [cols, m]`.
fn task(x: &[f32], m: usize, k: usize, dtype: DType, w: &[u8], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if available() {
            // SAFETY: AVX-512F and F16C are present (checked just above).
            unsafe { avx512::task(x, m, k, dtype, w, out) };
            return;
        }
    }
    // Not reached: callers check `available` first. Still correct, just slow.
    let row_bytes = dtype.bytes_for(k);
    let mut wf = vec![0.0f32; k];
    for (c, o) in out.chunks_exact_mut(m).enumerate() {
        if quant::dequantize_into(dtype, &w[c * row_bytes..(c + 1) * row_bytes], &mut wf).is_err() {
            o.fill(f32::NAN);
            continue;
        }
        for (i, o) in o.iter_mut().enumerate() {
            *o = x[i * k..(i + 1) * k]
                .iter()
                .zip(&wf)
                .map(|(a, b)| a * b)
                .sum();
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use crate::backend::DType;
    use crate::quant::{Q4_1_BLOCK_BYTES, Q8_0_BLOCK_BYTES, QK};

    /// Decodes one block at `p` into its 32 values as two vectors (values 0..16, 16..32).
    ///
    /// # Safety
    /// `p` points to a whole block of the format (`Q4_1_BLOCK_BYTES` / `Q8_0_BLOCK_BYTES`).
    #[inline]
    #[target_feature(enable = "avx512f,f16c")]
    unsafe fn decode<const Q4: bool>(p: *const u8) -> (__m512, __m512) {
        // SAFETY (whole body): reads stay inside the block at `p`.
        unsafe {
            if Q4 {
                // {d: f16, m: f16, qs: [u8; 16]}; value j is the low nibble of qs[j], j+16 the high.
                let dm = _mm_cvtph_ps(_mm_cvtsi32_si128(p.cast::<i32>().read_unaligned()));
                let d = _mm512_broadcastss_ps(dm);
                let mn = _mm512_broadcastss_ps(_mm_movehdup_ps(dm));
                let qs = _mm_loadu_si128(p.add(4).cast());
                let mask = _mm_set1_epi8(0x0f);
                let lo = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(qs, mask)));
                let hi = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(
                    _mm_srli_epi16::<4>(qs),
                    mask,
                )));
                (_mm512_fmadd_ps(lo, d, mn), _mm512_fmadd_ps(hi, d, mn))
            } else {
                // {d: f16, qs: [i8; 32]}.
                let d16 = u16::from_le_bytes([*p, *p.add(1)]);
                let d = _mm512_broadcastss_ps(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(d16))));
                let q0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p.add(2).cast())));
                let q1 =
                    _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p.add(18).cast())));
                (_mm512_mul_ps(q0, d), _mm512_mul_ps(q1, d))
            }
        }
    }

    /// One tile: weight rows `w` (`C` rows of `row_bytes`) × activation rows `x` (`R` rows of
    /// `k`, row stride `k`) → `out[c·m + r]` for `c < C`, `r < R` (`out` starts at the tile).
    ///
    /// # Safety
    /// `w` holds `C` rows of `row_bytes` bytes; `x` holds `R` rows of `k` floats; `out` has
    /// `(C-1)·m + R` elements.
    #[inline]
    #[target_feature(enable = "avx512f,f16c")]
    unsafe fn tile<const Q4: bool, const C: usize, const R: usize>(
        x: *const f32,
        k: usize,
        w: *const u8,
        row_bytes: usize,
        out: *mut f32,
        m: usize,
    ) {
        let block_bytes = if Q4 {
            Q4_1_BLOCK_BYTES
        } else {
            Q8_0_BLOCK_BYTES
        };
        let zero = _mm512_setzero_ps();
        let mut acc0 = [[zero; R]; C];
        let mut acc1 = [[zero; R]; C];
        for b in 0..k / QK {
            let mut w0 = [zero; C];
            let mut w1 = [zero; C];
            for c in 0..C {
                // SAFETY: block `b` of weight row `c` is inside `w`.
                let (a, z) = unsafe { decode::<Q4>(w.add(c * row_bytes + b * block_bytes)) };
                w0[c] = a;
                w1[c] = z;
            }
            for r in 0..R {
                // SAFETY: values `b·32 .. b·32+32` of row `r` are inside `x`.
                let (x0, x1) = unsafe {
                    let xp = x.add(r * k + b * QK);
                    (_mm512_loadu_ps(xp), _mm512_loadu_ps(xp.add(16)))
                };
                for c in 0..C {
                    acc0[c][r] = _mm512_fmadd_ps(x0, w0[c], acc0[c][r]);
                    if R * C >= 16 {
                        // Enough independent chains already: one accumulator per output keeps
                        // the 16-row tile within the 32 vector registers.
                        acc0[c][r] = _mm512_fmadd_ps(x1, w1[c], acc0[c][r]);
                    } else {
                        acc1[c][r] = _mm512_fmadd_ps(x1, w1[c], acc1[c][r]);
                    }
                }
            }
        }
        for c in 0..C {
            for r in 0..R {
                // SAFETY: `c·m + r` is inside `out` (see the contract).
                unsafe {
                    *out.add(c * m + r) =
                        _mm512_reduce_add_ps(_mm512_add_ps(acc0[c][r], acc1[c][r]));
                }
            }
        }
    }

    /// Rows `0..m` of `x` against `C` weight rows, in row tiles of 16 and 8 (only with `C == 1`,
    /// for the register budget), 4, 2 and 1.
    ///
    /// # Safety
    /// As [`tile`], for all `m` rows.
    #[inline]
    #[target_feature(enable = "avx512f,f16c")]
    unsafe fn columns<const Q4: bool, const C: usize>(
        x: &[f32],
        m: usize,
        k: usize,
        w: *const u8,
        row_bytes: usize,
        out: *mut f32,
    ) {
        let mut r = 0;
        // SAFETY (all calls): rows r..r+R are < m, so inside `x`; out offsets stay in the tile.
        unsafe {
            while C == 1 && r + 16 <= m {
                tile::<Q4, C, 16>(x.as_ptr().add(r * k), k, w, row_bytes, out.add(r), m);
                r += 16;
            }
            while C == 1 && r + 8 <= m {
                tile::<Q4, C, 8>(x.as_ptr().add(r * k), k, w, row_bytes, out.add(r), m);
                r += 8;
            }
            while r + 4 <= m {
                tile::<Q4, C, 4>(x.as_ptr().add(r * k), k, w, row_bytes, out.add(r), m);
                r += 4;
            }
            if r + 2 <= m {
                tile::<Q4, C, 2>(x.as_ptr().add(r * k), k, w, row_bytes, out.add(r), m);
                r += 2;
            }
            if r < m {
                tile::<Q4, C, 1>(x.as_ptr().add(r * k), k, w, row_bytes, out.add(r), m);
            }
        }
    }

    /// See `super::task`. One row takes 4 weight rows at a time so that 8 FMA chains are in
    /// flight; a few rows take 2; 8 or more rows take 1, so a decoded block serves 8 rows (the
    /// decode costs as much as ~6 row updates, so reusing it is what makes batches cheap).
    ///
    /// # Safety
    /// The CPU supports AVX-512F and F16C.
    #[target_feature(enable = "avx512f,f16c")]
    pub(super) unsafe fn task(
        x: &[f32],
        m: usize,
        k: usize,
        dtype: DType,
        w: &[u8],
        out: &mut [f32],
    ) {
        let row_bytes = dtype.bytes_for(k);
        let cols = out.len() / m.max(1);
        assert!(
            x.len() >= m * k && w.len() >= cols * row_bytes && out.len() >= cols * m,
            "qmatvec task: operands too short"
        );
        let wide = match m {
            1 => 4,
            2..8 => 2,
            _ => 1,
        };
        let mut c = 0;
        // SAFETY: the assert above bounds every weight row, activation row and output slot the
        // tiles touch (columns c..c+C < cols, rows < m).
        unsafe {
            let (wp, op) = (w.as_ptr(), out.as_mut_ptr());
            macro_rules! run {
                ($q4:literal) => {{
                    while c + wide <= cols {
                        if wide == 4 {
                            columns::<$q4, 4>(
                                x,
                                m,
                                k,
                                wp.add(c * row_bytes),
                                row_bytes,
                                op.add(c * m),
                            );
                        } else if wide == 1 {
                            columns::<$q4, 1>(
                                x,
                                m,
                                k,
                                wp.add(c * row_bytes),
                                row_bytes,
                                op.add(c * m),
                            );
                        } else {
                            columns::<$q4, 2>(
                                x,
                                m,
                                k,
                                wp.add(c * row_bytes),
                                row_bytes,
                                op.add(c * m),
                            );
                        }
                        c += wide;
                    }
                    while c < cols {
                        columns::<$q4, 1>(x, m, k, wp.add(c * row_bytes), row_bytes, op.add(c * m));
                        c += 1;
                    }
                }};
            }
            match dtype {
                DType::Q4_1 => run!(true),
                _ => run!(false),
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod vnni {
    use std::arch::x86_64::*;

    use super::SplitQ8Row;
    use crate::backend::DType;
    use crate::quant::{Q4_1_BLOCK_BYTES, Q8_0_BLOCK_BYTES, QK};

    /// `Σ w·(hi + lo/256)` of one block as 8 i32 lanes scaled by 256: `w` as unsigned bytes,
    /// `hi`/`lo` the (sign-adjusted) activation planes.
    #[inline]
    #[target_feature(enable = "avx2,avx512f,avx512vl,avx512vnni")]
    fn dot2(w: __m256i, hi: __m256i, lo: __m256i) -> __m256i {
        let h = _mm256_dpbusd_epi32(_mm256_setzero_si256(), w, hi);
        _mm256_dpbusd_epi32(_mm256_slli_epi32::<8>(h), w, lo)
    }

    /// `C` weight rows at `w` (row stride `row_bytes`) against the split row → `out[0..C]`.
    ///
    /// # Safety
    /// `w` holds `C` rows of `k/32` blocks; `x` has `k/32` blocks; `out` has `C` elements.
    #[inline]
    #[target_feature(enable = "avx2,f16c,fma,avx512f,avx512vl,avx512vnni")]
    unsafe fn tile<const Q4: bool, const C: usize>(
        x: &SplitQ8Row,
        nb: usize,
        w: *const u8,
        row_bytes: usize,
        out: *mut f32,
    ) {
        let block_bytes = if Q4 {
            Q4_1_BLOCK_BYTES
        } else {
            Q8_0_BLOCK_BYTES
        };
        let mut acc = [_mm256_setzero_ps(); C];
        let mut off = [0.0f32; C];
        let mask = _mm256_set1_epi8(0x0f);
        for b in 0..nb {
            // SAFETY: block `b` of the activation planes is in bounds (nb blocks).
            let (hi, lo) = unsafe {
                (
                    _mm256_loadu_si256(x.hi.as_ptr().add(b * QK).cast()),
                    _mm256_loadu_si256(x.lo.as_ptr().add(b * QK).cast()),
                )
            };
            let (xs, xsum) = (x.scale[b], x.sum[b]);
            for c in 0..C {
                // SAFETY: block `b` of weight row `c` is inside `w`.
                let p = unsafe { w.add(c * row_bytes + b * block_bytes) };
                if Q4 {
                    // SAFETY: a Q4_1 block is 20 bytes: header at 0..4, nibbles at 4..20.
                    let (dm, qs) = unsafe {
                        (
                            _mm_cvtph_ps(_mm_cvtsi32_si128(p.cast::<i32>().read_unaligned())),
                            _mm_loadu_si128(p.add(4).cast()),
                        )
                    };
                    let q = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16::<4>(qs), qs), mask);
                    let s = dot2(q, hi, lo);
                    let d = _mm_cvtss_f32(dm) * xs;
                    acc[c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_set1_ps(d), acc[c]);
                    off[c] = _mm_cvtss_f32(_mm_movehdup_ps(dm)).mul_add(xsum, off[c]);
                } else {
                    // SAFETY: a Q8_0 block is 34 bytes: scale at 0..2, values at 2..34.
                    let (d16, q) = unsafe {
                        (
                            u16::from_le_bytes([*p, *p.add(1)]),
                            _mm256_loadu_si256(p.add(2).cast()),
                        )
                    };
                    // Signed weights: |w| as the unsigned operand, the sign moved to x.
                    let s = dot2(
                        _mm256_abs_epi8(q),
                        _mm256_sign_epi8(hi, q),
                        _mm256_sign_epi8(lo, q),
                    );
                    let d = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(d16)))) * xs;
                    acc[c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_set1_ps(d), acc[c]);
                }
            }
        }
        for c in 0..C {
            let v = acc[c];
            let h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
            let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
            let h = _mm_add_ss(h, _mm_movehdup_ps(h));
            // SAFETY: `c < C` and `out` has `C` elements.
            unsafe { *out.add(c) = _mm_cvtss_f32(h) + off[c] };
        }
    }

    /// One activation row against every weight row in `w` → `out` (one value per weight row).
    ///
    /// # Safety
    /// The CPU supports AVX2, F16C, FMA, AVX-512F/VL/VNNI.
    #[target_feature(enable = "avx2,f16c,fma,avx512f,avx512vl,avx512vnni")]
    pub(super) unsafe fn task(x: &SplitQ8Row, k: usize, dtype: DType, w: &[u8], out: &mut [f32]) {
        let nb = k / QK;
        let row_bytes = dtype.bytes_for(k);
        let cols = out.len();
        assert!(
            x.hi.len() >= nb * QK && x.scale.len() >= nb && w.len() >= cols * row_bytes,
            "vnni task: operands too short"
        );
        let (wp, op) = (w.as_ptr(), out.as_mut_ptr());
        let mut c = 0;
        // SAFETY: the assert bounds every block read; columns c..c+C are < cols.
        unsafe {
            macro_rules! run {
                ($q4:literal) => {{
                    while c + 4 <= cols {
                        tile::<$q4, 4>(x, nb, wp.add(c * row_bytes), row_bytes, op.add(c));
                        c += 4;
                    }
                    while c < cols {
                        tile::<$q4, 1>(x, nb, wp.add(c * row_bytes), row_bytes, op.add(c));
                        c += 1;
                    }
                }};
            }
            match dtype {
                DType::Q4_1 => run!(true),
                _ => run!(false),
            }
        }
    }
}
