//! Products `x[m, k] · w[n, k]ᵀ` with Q4_1 / Q8_0 weights (and Q5_0, Q4_K, Q6_K repacked to them)
//! and **8-bit activations**: for decode (m = batch size, up to
//! [`super::matmul::QMATVEC_MAX_ROWS`]) on CPUs with AVX-512 VNNI, and for every `m`, prefill
//! included, on CPUs with AMX tiles ([`super::q8amx`]).
//!
//! Decode reads every weight once per step, so what a batch costs beyond batch 1 is arithmetic.
//! Decoding each weight block to f32 and using f32 FMAs costs ~2.5 cycles per (block, row) here;
//! integer dot products (`vpdpbusd`: 64 byte products per instruction) cost a fraction of that, as
//! in llama.cpp's q8_1 path. To make them pay the weights are **repacked once at upload** into
//! panels of [`PANEL`] weight rows in which vector lane `c` holds 4 consecutive quants of row `c`
//! (see [`PackedWeight`]): one `vpdpbusd` then advances 16 output columns by 4 products each
//! against 4 broadcast activation bytes, and after the 8 groups of a block each lane holds a whole
//! block's integer dot product, so the float scaling runs once per (block, row, 16 columns)
//! instead of once per product. The panel's weights are loaded and unpacked once for all rows.
//!
//! Activations are quantized once per op and row block (32 values) to `x ≈ d·(hi + lo/256)`
//! with `hi, lo ∈ [-127, 127]` ([`Planes::Two`], the default: error ≤ `amax/65024` per value,
//! so results match the f32 reference to ~1e-4 and the engine's tokens do not depend on the
//! batch a sequence decodes in) or `x ≈ d·hi` ([`Planes::One`], llama.cpp's precision, about
//! twice as fast in the arithmetic). The Q4_1 offset term uses the exact f32 block sums of `x`.
//!
//! Kernels: AVX-512 VNNI (explicit intrinsics, picked at run time) and a portable scalar twin on
//! the same layout that produces the same integers (tests compare the two and both against the
//! f32 reference). Work is split over rayon by panels only when the product is big enough to pay
//! for it; the activation scratch is per thread and reused, so a decode step does not allocate
//! here beyond the output the backend returns.

use std::cell::RefCell;

use rayon::prelude::*;

use crate::backend::DType;
use crate::quant::{Q5_0_BLOCK_BYTES, QK};

/// Weight rows per packed panel: one 512-bit vector of i32 lanes.
pub(crate) const PANEL: usize = 16;
/// Quant bytes of one (panel, block): Q4_1 keeps its nibbles packed (16 × 16 bytes), Q8_0 its
/// bytes (16 × 32).
pub(super) const Q4_QUANT_BYTES: usize = PANEL * 16;
pub(super) const Q8_QUANT_BYTES: usize = PANEL * QK;
/// Estimated cost, in nanoseconds, below which a product runs on the calling thread: waking the
/// other workers and joining them costs several microseconds (far more on a loaded machine).
/// Since the model's layers run on a pool worker (`Backend::run`), the other workers are usually
/// still spinning between ops, and splitting SmolLM2's 576×576 products (≈ 20 µs) pays: 8 µs
/// instead of 25 µs took batch-1 decode on 2 idle cores from 96–111 to 131–175 tok/s (A/B of
/// two builds, alternating runs of `prfaas generate`, 2026-11-23).
const PAR_MIN_NS: f64 = 8_000.0;
/// Activation values from which quantizing them is split over rayon (prefill-sized products).
const PAR_QUANT_MIN_VALUES: usize = 1 << 16;
/// Chunks per thread when splitting panels, so a thread slowed down by other load on the machine
/// does not hold the whole product back.
const CHUNKS_PER_THREAD: usize = 3;

/// How many 8-bit planes each activation is split into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Planes {
    /// `x ≈ d·q`: llama.cpp's q8 precision (~7 bits).
    One,
    /// `x ≈ d·(hi + lo/256)`: ~15 bits, twice the integer work.
    Two,
}

/// The activation precision the backend uses (see the module docs for why two planes).
pub(crate) const DEFAULT_PLANES: Planes = Planes::Two;

/// A Q4_1, Q8_0, Q5_0 or Q4_K weight `[n, k]` repacked into panels of [`PANEL`] rows. Q5_0
/// takes the Q8_0 layout and Q4_K the Q4_1 one with the same integers (exact up to f16 scales,
/// see [`q4_k_as_q4_1`]). Q6_K (16-value sub-blocks, each with its own scale) is packed exactly
/// for the AMX kernel only ([`pack_q6_k`]; the VNNI kernel multiplies unsigned by signed bytes);
/// requantizing it to Q8_0 was tried and failed the conformance suite's tolerance.
///
/// Panel `p` (rows `16p .. 16p+16`, zero rows past `n`) holds its `k/32` blocks one after the
/// other; each (panel, block) is `quants ‖ scales`:
/// * Q4_1: 4 × 64 quant bytes, vector `i` lane `c` = bytes `4i .. 4i+4` of row `c`'s `qs` (so its
///   low nibbles are values `4i..4i+4`, its high nibbles values `16+4i..`), then 16 f16 `d`,
///   then 16 f16 `m` — 320 bytes, the same as 16 GGUF blocks;
/// * Q8_0: 8 × 64 quant bytes, vector `g` lane `c` = values `4g .. 4g+4` of row `c` plus 128 (as
///   unsigned bytes: `vpdpbusd` multiplies unsigned by signed), then 16 f16 `d` — 544 bytes;
/// * Q6_K (AMX only, whose tile products multiply signed by signed): the Q8_0 quant layout of
///   the signed integers `q − 32`, then 16 f32 scales of values 0..16 and 16 of values 16..32
///   (see [`pack_q6_k`]) — 640 bytes.
pub(crate) struct PackedWeight {
    /// The kernel layout: Q4_1, Q8_0 or Q6_K (Q5_0 weights are packed as Q8_0, Q4_K as Q4_1).
    pub(super) dtype: DType,
    pub(super) n: usize,
    k: usize,
    pub(super) data: Vec<u8>,
}

/// Q4_K bytes of a `[n, k]` weight as Q4_1 blocks (`None` when the sizes do not fit). Each
/// 32-value sub-block of a Q4_K super-block is `d·sc·q − dmin·m` with its 4-bit `q`, so it is
/// the Q4_1 block `(d' = d·sc, m' = −dmin·m, q)`: the same integers, with the two products
/// rounded to f16 (relative error ≤ 2⁻¹¹ of a sub-block's scale, 1/60 of the 4-bit step).
fn q4_k_as_q4_1(raw: &[u8], n: usize, k: usize) -> Option<Vec<u8>> {
    use crate::quant::{q4_k_scale_min, Q4_K_BLOCK_BYTES, QK_K};
    if !k.is_multiple_of(QK_K) || raw.len() != n * k / QK_K * Q4_K_BLOCK_BYTES {
        return None;
    }
    let f16_at = |b: &[u8], at: usize| half::f16::from_le_bytes([b[at], b[at + 1]]).to_f32();
    let mut out = Vec::with_capacity(n * k / QK * DType::Q4_1.block_bytes());
    for sb in raw.chunks_exact(Q4_K_BLOCK_BYTES) {
        let (d, dmin, scales) = (f16_at(sb, 0), f16_at(sb, 2), &sb[4..16]);
        for (c, q) in sb[16..16 + 128].chunks_exact(32).enumerate() {
            for (j, high) in [(2 * c, false), (2 * c + 1, true)] {
                let (sc, m) = q4_k_scale_min(j, scales);
                out.extend_from_slice(&half::f16::from_f32(d * f32::from(sc)).to_le_bytes());
                out.extend_from_slice(&half::f16::from_f32(-dmin * f32::from(m)).to_le_bytes());
                let v = |l: usize| if high { q[l] >> 4 } else { q[l] & 0xf };
                out.extend((0..16).map(|i| v(i) | (v(i + 16) << 4)));
            }
        }
    }
    Some(out)
}

impl PackedWeight {
    /// Repacks GGUF bytes of a `[n, k]` weight, or `None` for other dtypes, `k % 32 != 0` or a
    /// byte count that does not match (the caller keeps the raw bytes and their paths).
    pub(crate) fn pack(dtype: DType, raw: &[u8], n: usize, k: usize) -> Option<Self> {
        if dtype == DType::Q4_K {
            return q4_k_as_q4_1(raw, n, k).and_then(|q| Self::pack(DType::Q4_1, &q, n, k));
        }
        if dtype == DType::Q6_K {
            return pack_q6_k(raw, n, k);
        }
        if !matches!(dtype, DType::Q4_1 | DType::Q8_0 | DType::Q5_0)
            || k == 0
            || n == 0
            || !k.is_multiple_of(QK)
            || raw.len() != dtype.bytes_for(n * k)
        {
            return None;
        }
        // Q5_0 values are `d·(q − 16)` with `q − 16 ∈ [−16, 15]`: exactly a Q8_0 block, so Q5_0
        // weights take the Q8_0 kernels unchanged (same integers, same f16 scale).
        let layout = if dtype == DType::Q5_0 {
            DType::Q8_0
        } else {
            dtype
        };
        let nb = k / QK;
        let row_bytes = dtype.bytes_for(k);
        let bb = dtype.block_bytes();
        let pbb = panel_block_bytes(layout);
        let panels = n.div_ceil(PANEL);
        let mut data = vec![0u8; panels * nb * pbb];
        let mut vals = [0.0f32; QK];
        for (p, dst) in data.chunks_exact_mut(nb * pbb).enumerate() {
            for c in 0..PANEL.min(n - p * PANEL) {
                let row = &raw[(p * PANEL + c) * row_bytes..][..row_bytes];
                for (b, d) in dst.chunks_exact_mut(pbb).enumerate() {
                    let blk = &row[b * bb..][..bb];
                    match dtype {
                        DType::Q4_1 => {
                            for i in 0..4 {
                                d[i * 64 + c * 4..][..4].copy_from_slice(&blk[4 + 4 * i..][..4]);
                            }
                            d[Q4_QUANT_BYTES + 2 * c..][..2].copy_from_slice(&blk[0..2]);
                            d[Q4_QUANT_BYTES + 32 + 2 * c..][..2].copy_from_slice(&blk[2..4]);
                        }
                        DType::Q5_0 => {
                            // The integers `q − 16`: decode with d = 1 (exact in f32).
                            let mut unit = [0u8; Q5_0_BLOCK_BYTES];
                            unit.copy_from_slice(blk);
                            unit[..2].copy_from_slice(&half::f16::ONE.to_le_bytes());
                            crate::quant::dequantize_block_q5_0(&unit, &mut vals);
                            for (j, v) in vals.iter().enumerate() {
                                d[(j / 4) * 64 + c * 4 + j % 4] = (*v as i8 as u8) ^ 0x80;
                            }
                            d[Q8_QUANT_BYTES + 2 * c..][..2].copy_from_slice(&blk[0..2]);
                        }
                        _ => {
                            for g in 0..8 {
                                for t in 0..4 {
                                    d[g * 64 + c * 4 + t] = blk[2 + 4 * g + t] ^ 0x80;
                                }
                            }
                            d[Q8_QUANT_BYTES + 2 * c..][..2].copy_from_slice(&blk[0..2]);
                        }
                    }
                }
            }
        }
        Some(Self {
            dtype: layout,
            n,
            k,
            data,
        })
    }

    pub(crate) fn n(&self) -> usize {
        self.n
    }

    pub(crate) fn k(&self) -> usize {
        self.k
    }

    fn panels(&self) -> usize {
        self.n.div_ceil(PANEL)
    }

    /// Bytes of one whole panel (all its blocks).
    pub(super) fn panel_bytes(&self) -> usize {
        self.k / QK * panel_block_bytes(self.dtype)
    }
}

/// Q6_K weights in panels for the AMX kernel (see [`PackedWeight`]): every 16-value sub-block is
/// `(d·sc)·(q − 32)` with a 6-bit `q`, so a 32-value block is the signed integers `q − 32` (as in
/// Q8_0's quant layout, without the +128) with two exact f32 scales `d·sc` (an f16 times an
/// 8-bit integer). Nothing is requantized: the products are those of the Q6_K values.
fn pack_q6_k(raw: &[u8], n: usize, k: usize) -> Option<PackedWeight> {
    use crate::quant::{dequantize_block_q6_k, Q6_K_BLOCK_BYTES, QK_K};
    if n == 0 || !k.is_multiple_of(QK_K) || raw.len() != n * k / QK_K * Q6_K_BLOCK_BYTES {
        return None;
    }
    let (nb, pbb) = (k / QK, panel_block_bytes(DType::Q6_K));
    let row_bytes = k / QK_K * Q6_K_BLOCK_BYTES;
    let mut data = vec![0u8; n.div_ceil(PANEL) * nb * pbb];
    let mut q = vec![0.0f32; k];
    let mut scale = vec![0.0f32; k / 16];
    for (p, dst) in data.chunks_exact_mut(nb * pbb).enumerate() {
        for c in 0..PANEL.min(n - p * PANEL) {
            let row = &raw[(p * PANEL + c) * row_bytes..][..row_bytes];
            for (sb, blk) in row.chunks_exact(Q6_K_BLOCK_BYTES).enumerate() {
                // The integers `q − 32`: decode with d = 1 and every scale 1 (exact in f32).
                let mut unit = [0u8; Q6_K_BLOCK_BYTES];
                unit.copy_from_slice(blk);
                unit[192..208].fill(1);
                unit[208..].copy_from_slice(&half::f16::ONE.to_le_bytes());
                dequantize_block_q6_k(&unit, &mut q[sb * QK_K..(sb + 1) * QK_K]);
                let d = half::f16::from_le_bytes([blk[208], blk[209]]).to_f32();
                for (i, s) in scale[sb * 16..(sb + 1) * 16].iter_mut().enumerate() {
                    *s = d * f32::from(blk[192 + i] as i8);
                }
            }
            for (b, d) in dst.chunks_exact_mut(pbb).enumerate() {
                for j in 0..QK {
                    d[(j / 4) * 64 + c * 4 + j % 4] = q[b * QK + j] as i8 as u8;
                }
                for h in 0..2 {
                    let at = Q8_QUANT_BYTES + (h * PANEL + c) * 4;
                    d[at..at + 4].copy_from_slice(&scale[2 * b + h].to_le_bytes());
                }
            }
        }
    }
    Some(PackedWeight {
        dtype: DType::Q6_K,
        n,
        k,
        data,
    })
}

/// Bytes of one (panel, block).
pub(super) const fn panel_block_bytes(dtype: DType) -> usize {
    match dtype {
        DType::Q4_1 => Q4_QUANT_BYTES + 2 * 2 * PANEL,
        DType::Q6_K => Q8_QUANT_BYTES + 2 * 4 * PANEL,
        _ => Q8_QUANT_BYTES + 2 * PANEL,
    }
}

/// `m` activation rows quantized per 32-value block, reused between calls (per thread).
#[derive(Default)]
pub(crate) struct ActQ8 {
    pub(super) m: usize,
    pub(super) k: usize,
    /// `[m, k]`, the high plane (or the only one).
    pub(super) hi: Vec<i8>,
    /// `[m, k]`, the low plane (two planes only).
    pub(super) lo: Vec<i8>,
    /// `[m, k/32]`: what one integer unit of the combined dot product is worth (`d` for one
    /// plane, `d/256` for two).
    pub(super) scale: Vec<f32>,
    /// `[m, k/32]`: exact f32 block sums (Q4_1's offset term `m_w · Σx`).
    pub(super) sum: Vec<f32>,
    /// `[m, k/32]`: `Σx − Σx̃`, what rounding took from the block sum. Q4_1 quants are all
    /// positive (0..15), so the rounding errors of `x` add up through them; adding back
    /// `8·d_w·(Σx − Σx̃)` makes the error that of the centred quants `q − 8`, about half.
    pub(super) delta: Vec<f32>,
    /// `[m, k/32]`: `128 · Σ q` of the combined integer activations, which the Q8_0 kernels
    /// subtract because their weights are stored `+128`.
    pub(super) corr: Vec<i32>,
}

impl ActQ8 {
    /// Quantizes `x: [m, k]` (`k % 32 == 0`), reusing this scratch's buffers.
    pub(crate) fn quantize(&mut self, x: &[f32], m: usize, k: usize, planes: Planes) {
        debug_assert!(k.is_multiple_of(QK) && x.len() == m * k);
        let nb = k / QK;
        self.m = m;
        self.k = k;
        // `quantize_rows` writes every element, so the buffers keep their old contents and only
        // change length (no zero-fill of a prefill's megabytes per product).
        self.hi.resize(m * k, 0);
        self.lo
            .resize(if planes == Planes::Two { m * k } else { 0 }, 0);
        for v in [&mut self.scale, &mut self.sum, &mut self.delta] {
            v.resize(m * nb, 0.0);
        }
        self.corr.resize(m * nb, 0);
        let two = planes == Planes::Two;
        if m * k < PAR_QUANT_MIN_VALUES || k == 0 {
            quantize_rows(
                x,
                two,
                &mut self.hi,
                &mut self.lo,
                &mut self.scale,
                &mut self.sum,
                &mut self.delta,
                &mut self.corr,
            );
            return;
        }
        // Prefill-sized activations (AMX products take every m): rows in parallel chunks.
        let rows = (PAR_QUANT_MIN_VALUES / 4).div_ceil(k);
        let (rk, rb) = (rows * k, rows * nb);
        let mut lo = self.lo.chunks_mut(rk);
        let jobs: Vec<_> = x
            .chunks(rk)
            .zip(self.hi.chunks_mut(rk))
            .zip(self.scale.chunks_mut(rb))
            .zip(self.sum.chunks_mut(rb))
            .zip(self.delta.chunks_mut(rb))
            .zip(self.corr.chunks_mut(rb))
            .map(|(((((x, h), s), su), d), c)| (x, h, lo.next().unwrap_or_default(), s, su, d, c))
            .collect();
        jobs.into_par_iter()
            .for_each(|(x, h, l, s, su, d, c)| quantize_rows(x, two, h, l, s, su, d, c));
    }

    pub(super) fn planes(&self) -> Planes {
        if self.lo.is_empty() {
            Planes::One
        } else {
            Planes::Two
        }
    }
}

super::simd::multiversion! {
    /// Fills the planes, scales, sums and corrections of an [`ActQ8`]. Fixed-size blocks and
    /// `round_ties_even` (one `vrndscaleps`; `round` is a libm call per value) so the whole loop
    /// vectorises: this runs once per projection and used to cost as much as small products.
    fn quantize_rows(
        x: &[f32],
        two: bool,
        hi: &mut [i8],
        lo: &mut [i8],
        scale: &mut [f32],
        sum: &mut [f32],
        delta: &mut [f32],
        corr: &mut [i32],
    ) {
        let (xb, _) = x.as_chunks::<QK>();
        for (b, xb) in xb.iter().enumerate() {
            // The largest |x| that is not NaN, as 16 lanes then across them: compare-and-select
            // (one `vmaxps`) instead of `f32::max`, whose NaN rule kept this loop scalar.
            let mut lanes = [0.0f32; super::simd::LANES];
            for c in xb.as_chunks::<{ super::simd::LANES }>().0 {
                for (m, v) in lanes.iter_mut().zip(c) {
                    let a = v.abs();
                    *m = if a > *m { a } else { *m };
                }
            }
            let amax = lanes.iter().fold(0.0f32, |m, &a| if a > m { a } else { m });
            sum[b] = super::simd::sum(xb);
            if amax == 0.0 || !amax.is_finite() || !sum[b].is_finite() {
                // All zero, or non-finite input, which the f32 path would propagate: do the same.
                scale[b] = if amax == 0.0 && sum[b] == 0.0 { 0.0 } else { f32::NAN };
                delta[b] = scale[b];
                hi[b * QK..(b + 1) * QK].fill(0);
                if two {
                    lo[b * QK..(b + 1) * QK].fill(0);
                }
                corr[b] = 0;
                continue;
            }
            let id = 127.0 / amax;
            let mut hq = [0i32; QK];
            let mut lq = [0i32; QK];
            for j in 0..QK {
                let t = xb[j] * id;
                let r = t.round_ties_even().clamp(-127.0, 127.0);
                let l = ((t - r) * 256.0).round_ties_even().clamp(-127.0, 127.0);
                // SAFETY: `amax` is finite and non-zero (checked above), so `t`, `r` and `l` are
                // finite and clamped to ±127: in range, and a plain `vcvttps2dq` (`as` adds a
                // saturating NaN-checking sequence per value that kept this loop scalar).
                unsafe {
                    hq[j] = r.to_int_unchecked::<i32>();
                    lq[j] = l.to_int_unchecked::<i32>();
                }
            }
            let h = &mut hi[b * QK..(b + 1) * QK];
            for (h, &q) in h.iter_mut().zip(&hq) {
                *h = q as i8;
            }
            let mut qsum = hq.iter().sum::<i32>();
            if two {
                scale[b] = amax / 127.0 / 256.0;
                for (l, &q) in lo[b * QK..(b + 1) * QK].iter_mut().zip(&lq) {
                    *l = q as i8;
                }
                qsum = 256 * qsum + lq.iter().sum::<i32>();
            } else {
                scale[b] = amax / 127.0;
            }
            corr[b] = 128 * qsum;
            delta[b] = sum[b] - qsum as f32 * scale[b];
        }
    }
}

thread_local! {
    /// Per-thread activation scratch: decode calls this once per projection, so its buffers are
    /// allocated once and then reused.
    static SCRATCH: RefCell<ActQ8> = RefCell::new(ActQ8::default());
}

/// True when this CPU runs the explicit AVX-512 VNNI kernels.
pub(crate) fn vnni_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Which kernel runs a product.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kernel {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    Avx512Vnni,
    /// [`super::q8amx`] for products of at least [`AMX_MIN_ROWS`] rows, VNNI below.
    #[cfg(target_arch = "x86_64")]
    Amx,
}

/// Rows from which AMX tiles beat the VNNI kernel (below, a product is bound by reading the
/// weights and the tiles' fixed cost per block does not pay).
const AMX_MIN_ROWS: usize = 2;

impl Kernel {
    /// True for the AMX kernel (the only one with a Q6_K path besides the scalar twin).
    pub(crate) fn has_amx(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        if self == Kernel::Amx {
            return true;
        }
        false
    }

    /// The fastest kernel this CPU can run.
    pub(crate) fn best() -> Kernel {
        #[cfg(target_arch = "x86_64")]
        if super::q8amx::available() {
            return Kernel::Amx;
        }
        #[cfg(target_arch = "x86_64")]
        if vnni_available() {
            return Kernel::Avx512Vnni;
        }
        Kernel::Scalar
    }
}

/// Raw output pointer shared by the panel tasks, which write disjoint column ranges.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: tasks write disjoint (row, column) elements of one live `&mut [f32]` (see `matmul`).
unsafe impl Send for OutPtr {}
// SAFETY: as above.
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// Through a method so closures capture the whole (Send) wrapper, not its raw field.
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// `out[m, n] = x[m, k] · wᵀ` with `x` quantized to `planes` 8-bit planes. `x.len() == m·k`,
/// `out.len() == m·n` (checked).
pub(crate) fn matmul(
    x: &[f32],
    m: usize,
    w: &PackedWeight,
    out: &mut [f32],
    planes: Planes,
    kernel: Kernel,
) {
    matmul_many(x, m, &[w], &mut [out], planes, kernel);
}

/// `outs[i][m, nᵢ] = x[m, k] · wᵢᵀ` for weights that share `k` (a layer's q/k/v, or gate/up):
/// `x` is quantized once and the panels of every weight are split over the threads as one
/// parallel region, instead of one quantization and one fork/join per product.
/// `x.len() == m·k`, `outs[i].len() == m·nᵢ` (checked).
pub(crate) fn matmul_many(
    x: &[f32],
    m: usize,
    ws: &[&PackedWeight],
    outs: &mut [&mut [f32]],
    planes: Planes,
    kernel: Kernel,
) {
    let k = ws.first().map_or(0, |w| w.k);
    assert!(
        ws.len() == outs.len()
            && x.len() == m * k
            && ws
                .iter()
                .zip(outs.iter())
                .all(|(w, o)| w.k == k && o.len() == m * w.n),
        "q8act::matmul_many: x has {} values for [{m}, {k}]; weights {:?}, outputs {:?}",
        x.len(),
        ws.iter().map(|w| [w.n, w.k]).collect::<Vec<_>>(),
        outs.iter().map(|o| o.len()).collect::<Vec<_>>()
    );
    if m == 0 || ws.is_empty() {
        return;
    }
    let optrs: Vec<OutPtr> = outs.iter_mut().map(|o| OutPtr(o.as_mut_ptr())).collect();
    let run = |act: &ActQ8| {
        // SAFETY (both branches): panels p0..p1 of weight i write only columns 16·p0 ..
        // min(16·p1, nᵢ) of each of the m rows of `outs[i]`, which has m·nᵢ elements; the
        // ranges of different tasks are disjoint.
        let threads = rayon::current_num_threads();
        let cost: f64 = ws.iter().map(|w| estimate_ns(w, m, planes)).sum();
        if threads == 1 || cost < PAR_MIN_NS {
            for (w, o) in ws.iter().zip(&optrs) {
                unsafe { run_panels(w, act, 0, w.panels(), o.get(), kernel) };
            }
            return;
        }
        let total: usize = ws.iter().map(|w| w.panels()).sum();
        let per = total.div_ceil(threads * CHUNKS_PER_THREAD).max(1);
        let tasks: Vec<(usize, usize, usize)> = ws
            .iter()
            .enumerate()
            .flat_map(|(i, w)| {
                (0..w.panels().div_ceil(per))
                    .map(move |c| (i, c * per, ((c + 1) * per).min(w.panels())))
            })
            .collect();
        tasks.par_iter().for_each(|&(i, p0, p1)| unsafe {
            run_panels(ws[i], act, p0, p1, optrs[i].get(), kernel)
        });
    };
    SCRATCH.with(|s| match s.try_borrow_mut() {
        Ok(mut act) => {
            act.quantize(x, m, k, planes);
            run(&act);
        }
        // A nested call on this thread (rayon can run another job while this one waits):
        // a fresh scratch keeps it correct.
        Err(_) => {
            let mut act = ActQ8::default();
            act.quantize(x, m, k, planes);
            run(&act);
        }
    });
}

/// Rough single-thread time of a product: streaming the weights (~10 GB/s from memory or L3)
/// plus ~2 ns per (panel, block, row, plane) of arithmetic.
fn estimate_ns(w: &PackedWeight, m: usize, planes: Planes) -> f64 {
    let pbr = (w.panels() * (w.k / QK) * m) as f64;
    let per = if planes == Planes::Two { 2.0 } else { 1.0 };
    w.data.len() as f64 / 10.0 + pbr * per * 2.0
}

/// Panels `p0..p1` against every activation row.
///
/// # Safety
/// `out` points to an `[act.m, w.n]` row-major buffer; no other thread writes columns
/// `16·p0 .. 16·p1` of it meanwhile.
unsafe fn run_panels(
    w: &PackedWeight,
    act: &ActQ8,
    p0: usize,
    p1: usize,
    out: *mut f32,
    kernel: Kernel,
) {
    let pb = w.panel_bytes();
    #[cfg(target_arch = "x86_64")]
    if kernel == Kernel::Amx && (act.m >= AMX_MIN_ROWS || w.dtype == DType::Q6_K) {
        // SAFETY: `Kernel::Amx` is only chosen when `q8amx::available()`; `out` as required.
        unsafe { super::q8amx::run_panels(w, act, p0, p1, out) };
        return;
    }
    for p in p0..p1 {
        let panel = &w.data[p * pb..(p + 1) * pb];
        let cols = PANEL.min(w.n - p * PANEL);
        // SAFETY: column 16·p is inside every row of `out` (p < panels), and the kernels write
        // `cols` columns from there (contract of this function).
        let o = unsafe { out.add(p * PANEL) };
        if w.dtype == DType::Q6_K {
            // Only the AMX kernel (above) and the scalar twin multiply signed by signed bytes.
            // SAFETY: `o` as above.
            unsafe { scalar_panel(w.dtype, panel, act, o, w.n, cols) };
            continue;
        }
        match kernel {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Kernel::Avx512Vnni` and `Kernel::Amx` are only chosen when
            // `vnni_available()`; `o` as above.
            Kernel::Avx512Vnni | Kernel::Amx => unsafe {
                avx512::panel(w.dtype, panel, act, o, w.n, cols)
            },
            // SAFETY: `o` as above.
            Kernel::Scalar => unsafe { scalar_panel(w.dtype, panel, act, o, w.n, cols) },
        }
    }
}

/// Portable twin of the SIMD kernels: the same integers, the same float operations in the same
/// order, so its results are bitwise those of [`avx512::panel`].
///
/// # Safety
/// `out` points to row 0, column `16·p` of an `[act.m, n]` buffer with `cols` valid columns.
unsafe fn scalar_panel(
    dtype: DType,
    panel: &[u8],
    act: &ActQ8,
    out: *mut f32,
    n: usize,
    cols: usize,
) {
    let (k, nb) = (act.k, act.k / QK);
    let q4 = dtype == DType::Q4_1;
    let q6 = dtype == DType::Q6_K;
    let pbb = panel_block_bytes(dtype);
    let two = act.planes() == Planes::Two;
    for r in 0..act.m {
        let mut acc = [0.0f32; PANEL];
        for b in 0..nb {
            let blk = &panel[b * pbb..(b + 1) * pbb];
            let xh = &act.hi[r * k + b * QK..][..QK];
            let xl = if two {
                &act.lo[r * k + b * QK..][..QK]
            } else {
                &[][..]
            };
            let (xs, xsum, corr) = (
                act.scale[r * nb + b],
                act.sum[r * nb + b],
                act.corr[r * nb + b],
            );
            for (c, acc) in acc.iter_mut().enumerate() {
                // Weight value j of row c as the unsigned byte the kernel multiplies.
                let wq = |j: usize| -> i32 {
                    if q4 {
                        let byte = blk[(j % 16) / 4 * 64 + c * 4 + j % 4];
                        i32::from(if j < 16 { byte & 0x0f } else { byte >> 4 })
                    } else {
                        i32::from(blk[j / 4 * 64 + c * 4 + j % 4])
                    }
                };
                if q6 {
                    // Two 16-value halves, each with its f32 scale, signed weights (no +128).
                    for h in 0..2 {
                        let (mut ih, mut il) = (0i32, 0i32);
                        for j in 16 * h..16 * h + 16 {
                            let wq = i32::from(blk[j / 4 * 64 + c * 4 + j % 4] as i8);
                            ih += wq * i32::from(xh[j]);
                            if two {
                                il += wq * i32::from(xl[j]);
                            }
                        }
                        let i = if two { (ih << 8) + il } else { ih };
                        let at = Q8_QUANT_BYTES + (h * PANEL + c) * 4;
                        let d = f32::from_le_bytes(blk[at..at + 4].try_into().unwrap());
                        *acc = (i as f32).mul_add(d * xs, *acc);
                    }
                    continue;
                }
                let mut ih = 0i32;
                let mut il = 0i32;
                for j in 0..QK {
                    ih += wq(j) * i32::from(xh[j]);
                    if two {
                        il += wq(j) * i32::from(xl[j]);
                    }
                }
                let mut i = if two { (ih << 8) + il } else { ih };
                let qb = if q4 { Q4_QUANT_BYTES } else { Q8_QUANT_BYTES };
                let d = half::f16::from_le_bytes([blk[qb + 2 * c], blk[qb + 2 * c + 1]]).to_f32();
                if !q4 {
                    i -= corr;
                }
                *acc = (i as f32).mul_add(d * xs, *acc);
                if q4 {
                    let mw = half::f16::from_le_bytes([blk[qb + 32 + 2 * c], blk[qb + 33 + 2 * c]])
                        .to_f32();
                    *acc = mw.mul_add(xsum, *acc);
                    *acc = (8.0 * d).mul_add(act.delta[r * nb + b], *acc);
                }
            }
        }
        for (c, &v) in acc.iter().enumerate().take(cols) {
            // SAFETY: row r < m, column c < cols (contract).
            unsafe { *out.add(r * n + c) = v };
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{panel_block_bytes, ActQ8, Planes, PANEL, Q4_QUANT_BYTES, Q8_QUANT_BYTES};
    use crate::backend::DType;
    use crate::quant::QK;

    /// Rows per register tile: 8 weight vectors + `R` accumulators + temporaries stay within the
    /// 32 vector registers.
    const MAX_R: usize = 8;

    /// Every activation row against one panel, in row tiles of up to [`MAX_R`] (the panel's few
    /// KiB stay in L1 between tiles).
    ///
    /// # Safety
    /// The CPU has AVX-512F/BW/VNNI; `out` points to row 0, column `16·p` of an `[act.m, n]`
    /// buffer with `cols ≤ 16` valid columns; `panel` is one whole panel of `dtype`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,fma,f16c")]
    pub(super) unsafe fn panel(
        dtype: DType,
        panel: &[u8],
        act: &ActQ8,
        out: *mut f32,
        n: usize,
        cols: usize,
    ) {
        let nb = act.k / QK;
        assert!(
            panel.len() >= nb * panel_block_bytes(dtype)
                && act.hi.len() >= act.m * act.k
                && [
                    act.scale.len(),
                    act.sum.len(),
                    act.delta.len(),
                    act.corr.len()
                ]
                .iter()
                .all(|&l| l >= act.m * nb)
                && (act.lo.is_empty() || act.lo.len() >= act.m * act.k)
                && cols <= PANEL,
            "q8act panel: operands too short"
        );
        let two = act.planes() == Planes::Two;
        let mut r = 0;
        // SAFETY (all calls): rows r..r+R < m; the assert bounds the panel and activations.
        unsafe {
            macro_rules! go {
                ($q4:literal, $two:literal) => {{
                    while r < act.m {
                        let left = act.m - r;
                        // Balanced tiles (17 rows → 6+6+5, not 8+8+1), each a constant size.
                        let tiles = left.div_ceil(MAX_R);
                        let rt = left.div_ceil(tiles);
                        let o = out.add(r * n);
                        match rt {
                            1 => tile::<$q4, $two, 1>(panel, act, r, o, n, cols),
                            2 => tile::<$q4, $two, 2>(panel, act, r, o, n, cols),
                            3 => tile::<$q4, $two, 3>(panel, act, r, o, n, cols),
                            4 => tile::<$q4, $two, 4>(panel, act, r, o, n, cols),
                            5 => tile::<$q4, $two, 5>(panel, act, r, o, n, cols),
                            6 => tile::<$q4, $two, 6>(panel, act, r, o, n, cols),
                            7 => tile::<$q4, $two, 7>(panel, act, r, o, n, cols),
                            _ => tile::<$q4, $two, 8>(panel, act, r, o, n, cols),
                        }
                        r += rt.min(MAX_R);
                    }
                }};
            }
            match (dtype == DType::Q4_1, two) {
                (true, true) => go!(true, true),
                (true, false) => go!(true, false),
                (false, true) => go!(false, true),
                (false, false) => go!(false, false),
            }
        }
    }

    /// `Σ_g vpdpbusd(w[g], broadcast(x[4g..4g+4]))` in two chains (halves the latency chain).
    ///
    /// # Safety
    /// `x` points to 32 readable bytes.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn block_dot(w: &[__m512i; 8], x: *const i8) -> __m512i {
        let xp = x.cast::<i32>();
        let z = _mm512_setzero_si512();
        let (mut a, mut b) = (z, z);
        for g in (0..8).step_by(2) {
            // SAFETY: 4·(g+1)+4 ≤ 32 bytes from `x`.
            let (x0, x1) = unsafe { (xp.add(g).read_unaligned(), xp.add(g + 1).read_unaligned()) };
            a = _mm512_dpbusd_epi32(a, w[g], _mm512_set1_epi32(x0));
            b = _mm512_dpbusd_epi32(b, w[g + 1], _mm512_set1_epi32(x1));
        }
        _mm512_add_epi32(a, b)
    }

    /// `R` activation rows from row `r0` against one panel → `out[r·n + c]`, `c < cols`.
    ///
    /// # Safety
    /// As [`panel`], and rows `r0..r0+R` exist.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,fma,f16c")]
    unsafe fn tile<const Q4: bool, const TWO: bool, const R: usize>(
        panel: &[u8],
        act: &ActQ8,
        r0: usize,
        out: *mut f32,
        n: usize,
        cols: usize,
    ) {
        let (k, nb) = (act.k, act.k / QK);
        let pbb = if Q4 {
            panel_block_bytes(DType::Q4_1)
        } else {
            panel_block_bytes(DType::Q8_0)
        };
        let qb = if Q4 { Q4_QUANT_BYTES } else { Q8_QUANT_BYTES };
        let mask = _mm512_set1_epi8(0x0f);
        let mut acc = [_mm512_setzero_ps(); R];
        let pp = panel.as_ptr();
        for b in 0..nb {
            // SAFETY (whole block body): (panel, block) b spans `pbb` bytes inside `panel`;
            // activation rows r0..r0+R have k values, block b at b·32.
            unsafe {
                let p = pp.add(b * pbb);
                let w: [__m512i; 8] = if Q4 {
                    let v = [0, 1, 2, 3].map(|i| _mm512_loadu_si512(p.add(i * 64).cast()));
                    let lo = v.map(|v| _mm512_and_si512(v, mask));
                    let hi = v.map(|v| _mm512_and_si512(_mm512_srli_epi16::<4>(v), mask));
                    [lo[0], lo[1], lo[2], lo[3], hi[0], hi[1], hi[2], hi[3]]
                } else {
                    [0, 1, 2, 3, 4, 5, 6, 7].map(|g| _mm512_loadu_si512(p.add(g * 64).cast()))
                };
                let wd = _mm512_cvtph_ps(_mm256_loadu_si256(p.add(qb).cast()));
                let (wm, wd8) = if Q4 {
                    (
                        _mm512_cvtph_ps(_mm256_loadu_si256(p.add(qb + 32).cast())),
                        _mm512_mul_ps(wd, _mm512_set1_ps(8.0)),
                    )
                } else {
                    (_mm512_setzero_ps(), _mm512_setzero_ps())
                };
                for (r, acc) in acc.iter_mut().enumerate() {
                    let row = r0 + r;
                    let mut i = block_dot(&w, act.hi.as_ptr().add(row * k + b * QK));
                    if TWO {
                        let l = block_dot(&w, act.lo.as_ptr().add(row * k + b * QK));
                        i = _mm512_add_epi32(_mm512_slli_epi32::<8>(i), l);
                    }
                    let ab = row * nb + b;
                    if !Q4 {
                        i = _mm512_sub_epi32(i, _mm512_set1_epi32(*act.corr.get_unchecked(ab)));
                    }
                    let s = _mm512_mul_ps(wd, _mm512_set1_ps(*act.scale.get_unchecked(ab)));
                    *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i), s, *acc);
                    if Q4 {
                        *acc =
                            _mm512_fmadd_ps(wm, _mm512_set1_ps(*act.sum.get_unchecked(ab)), *acc);
                        let dl = _mm512_set1_ps(*act.delta.get_unchecked(ab));
                        *acc = _mm512_fmadd_ps(wd8, dl, *acc);
                    }
                }
            }
        }
        let m: __mmask16 = if cols >= PANEL {
            0xffff
        } else {
            (1u16 << cols) - 1
        };
        for (r, &a) in acc.iter().enumerate() {
            // SAFETY: row r0 + r exists and columns < cols are inside it (contract).
            unsafe { _mm512_mask_storeu_ps(out.add(r * n), m, a) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{quant, reference};

    /// Values in [-1, 1) (exactly twice the bench stream: both steps are exact in f32).
    fn vals(n: usize, seed: u64) -> Vec<f32> {
        crate::bench::pseudo_random(n, seed)
            .into_iter()
            .map(|x| x * 2.0)
            .collect()
    }

    /// Q4_K weights take the Q4_1 kernels: the same 4-bit integers, each sub-block's `d·sc` and
    /// `−dmin·m` rounded to f16 (≤ 2⁻¹¹ of the scale), so within 2e-3 of the f32 reference of the
    /// Q4_K bytes with two planes and within the 8-bit rounding with one.
    #[test]
    fn q4_k_weights_take_the_q4_1_kernels() {
        for planes in [Planes::One, Planes::Two] {
            for &(m, k, n) in &[(1, 256, 1), (3, 512, 17), (17, 768, 40), (16, 256, 33)] {
                let tol = if planes == Planes::Two { 2e-3 } else { 3e-2 };
                check(
                    DType::Q4_K,
                    planes,
                    &vals(m * k, 5 + m as u64),
                    m,
                    k,
                    n,
                    tol,
                    false,
                );
            }
        }
        // Sizes a Q4_K weight cannot have.
        assert!(PackedWeight::pack(DType::Q4_K, &[0; 144], 1, 32).is_none());
        assert!(PackedWeight::pack(DType::Q4_K, &[0; 143], 1, 256).is_none());
    }

    /// Q6_K weights are packed exactly (the integers `q − 32`, scales `d·sc` in f32): the scalar
    /// twin is within the activation rounding of the f32 reference of the Q6_K bytes, and the
    /// AMX kernel gives its bits.
    #[test]
    fn q6_k_weights_pack_exactly() {
        for planes in [Planes::One, Planes::Two] {
            for &(m, k, n) in &[(1, 256, 1), (3, 512, 17), (17, 768, 40), (16, 256, 33)] {
                let tol = if planes == Planes::Two { 5e-4 } else { 3e-2 };
                check(
                    DType::Q6_K,
                    planes,
                    &vals(m * k, 9 + m as u64),
                    m,
                    k,
                    n,
                    tol,
                    false,
                );
            }
        }
        assert!(PackedWeight::pack(DType::Q6_K, &[0; 210], 1, 32).is_none());
        assert!(PackedWeight::pack(DType::Q6_K, &[0; 209], 1, 256).is_none());
    }

    /// Throughput of each kernel on decode- and prefill-shaped products (no assertion: a
    /// measurement, `cargo test --release -p prfaas-kernels --lib q8act_speed -- --ignored
    /// --nocapture`).
    #[test]
    #[ignore]
    fn q8act_speed() {
        for dtype in [DType::Q8_0, DType::Q4_1] {
            for &(m, k, n) in &[(16, 640, 16384), (512, 640, 2048), (512, 2048, 640)] {
                let raw = quant::quantize(dtype, &vals(n * k, 1)).unwrap();
                let pw = PackedWeight::pack(dtype, &raw, n, k).unwrap();
                let x = vals(m * k, 2);
                let mut out = vec![0.0f32; m * n];
                let mut line = format!("{dtype:?} {m}x{k}x{n}:");
                let mut kernels = vec![];
                #[cfg(target_arch = "x86_64")]
                {
                    if vnni_available() {
                        kernels.push(("vnni", Kernel::Avx512Vnni));
                    }
                    if super::super::q8amx::available() {
                        kernels.push(("amx", Kernel::Amx));
                    }
                }
                for (name, kernel) in kernels {
                    matmul(&x, m, &pw, &mut out, Planes::Two, kernel);
                    let reps = 5;
                    let t = std::time::Instant::now();
                    for _ in 0..reps {
                        matmul(&x, m, &pw, &mut out, Planes::Two, kernel);
                    }
                    let s = t.elapsed().as_secs_f64() / reps as f64;
                    line += &format!(" {name} {:.1} GMAC/s", (m * n * k) as f64 / s / 1e9);
                }
                println!("{line}");
            }
        }
    }

    #[test]
    fn pack_rejects_what_it_cannot_pack() {
        assert!(PackedWeight::pack(DType::F32, &[0; 128], 1, 32).is_none());
        assert!(PackedWeight::pack(DType::Q4_1, &[0; 20], 1, 31).is_none());
        assert!(PackedWeight::pack(DType::Q4_1, &[0; 19], 1, 32).is_none());
    }

    /// Activations already on the 8-bit grid of their blocks (each block holds ±amax and
    /// multiples of amax/127): quantizing them is exact, so every kernel must equal the f32
    /// reference up to summation order, for both plane counts.
    fn grid_vals(m: usize, k: usize, seed: u64) -> Vec<f32> {
        let r = vals(m * k, seed);
        r.chunks_exact(QK)
            .enumerate()
            .flat_map(|(b, c)| {
                let s = 0.01 * (1.0 + (b % 5) as f32);
                c.iter().enumerate().map(move |(j, v)| {
                    if j == b % QK {
                        127.0 * s
                    } else {
                        (v * 127.0).round() * s
                    }
                })
            })
            .collect()
    }

    #[allow(clippy::too_many_arguments)]
    fn check(
        dtype: DType,
        planes: Planes,
        x: &[f32],
        m: usize,
        k: usize,
        n: usize,
        tol: f32,
        grid: bool,
    ) {
        let wf = vals(n * k, 11 + n as u64);
        let raw = quant::quantize(dtype, &wf).unwrap();
        let pw = PackedWeight::pack(dtype, &raw, n, k).unwrap();
        let mut scalar = vec![0.0f32; m * n];
        matmul(x, m, &pw, &mut scalar, planes, Kernel::Scalar);
        let want = reference::matmul(x, m, k, dtype, &raw, n).unwrap();
        let scale = want.iter().map(|v| v.abs()).sum::<f32>() / want.len() as f32;
        let what = format!("{dtype:?} {planes:?} {m}x{k}x{n} grid={grid}");
        for (i, (g, w)) in scalar.iter().zip(&want).enumerate() {
            assert!(
                (g - w).abs() <= tol * (w.abs() + scale),
                "{what} [{i}]: {g} vs {w}"
            );
        }
        #[cfg(target_arch = "x86_64")]
        if vnni_available() {
            let mut simd = vec![0.0f32; m * n];
            matmul(x, m, &pw, &mut simd, planes, Kernel::Avx512Vnni);
            assert_eq!(
                simd.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                scalar.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "{what}: avx512 vs scalar"
            );
        }
        #[cfg(target_arch = "x86_64")]
        if super::super::q8amx::available() {
            let mut tiles = vec![0.0f32; m * n];
            matmul(x, m, &pw, &mut tiles, planes, Kernel::Amx);
            assert_eq!(
                tiles.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                scalar.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "{what}: amx vs scalar"
            );
        } else {
            eprintln!("{what}: AMX kernel NOT checked: this CPU or kernel has no AMX tiles");
        }
    }

    /// Scalar and AVX-512 kernels produce the same bits; both equal the f32 reference exactly
    /// (up to rounding) on grid activations, within 5e-4 with two planes on arbitrary ones (the
    /// rounding error of ~2^-16 of a block's maximum per value, summed over k products), and
    /// within the 8-bit rounding error (~1/254 of a block's maximum per value) with one plane.
    #[test]
    fn kernels_agree_with_each_other_and_the_reference() {
        for dtype in [DType::Q4_1, DType::Q8_0] {
            for planes in [Planes::One, Planes::Two] {
                for &(m, k, n) in &[
                    (1, 32, 1),
                    (3, 64, 17),
                    (16, 96, 33),
                    (17, 576, 40),
                    (9, 160, 16),
                    // Prefill-sized: activations quantized in parallel chunks, 19 AMX row tiles.
                    (300, 256, 20),
                ] {
                    check(
                        dtype,
                        planes,
                        &grid_vals(m, k, 3 + m as u64),
                        m,
                        k,
                        n,
                        1e-5,
                        true,
                    );
                    let tol = if planes == Planes::Two { 5e-4 } else { 3e-2 };
                    check(
                        dtype,
                        planes,
                        &vals(m * k, 7 + m as u64),
                        m,
                        k,
                        n,
                        tol,
                        false,
                    );
                }
            }
        }
    }
}
