//! Small building blocks written so LLVM vectorises them, plus runtime CPU-feature dispatch.
//!
//! The workspace builds for the baseline x86-64 target (SSE2) so that binaries run anywhere; the
//! hot kernels are therefore compiled several times with `#[target_feature]` (AVX-512, AVX2+FMA)
//! and the widest one the running CPU supports is picked once per call ([`Isa::get`]). Everything
//! here is `#[inline(always)]` so it is compiled inside those feature-enabled callers.

/// Lanes of the independent accumulators in reductions: enough for one AVX-512 register or two
/// AVX2 registers, which also hides FMA latency.
pub(crate) const LANES: usize = 16;

/// The instruction set a kernel was dispatched to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Isa {
    Avx512,
    Avx2,
    Generic,
}

impl Isa {
    /// The widest instruction set the running CPU supports (detection is cached by std).
    #[inline]
    pub(crate) fn get() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                return Isa::Avx512;
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                return Isa::Avx2;
            }
        }
        Isa::Generic
    }
}

/// Define `$name(args) -> ret` that runs `$body` compiled for the widest available ISA.
///
/// The body is pasted into three functions (`avx512f`, `avx2,fma`, baseline) so that the
/// `#[inline(always)]` helpers it calls are vectorised for that ISA.
macro_rules! multiversion {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        #[allow(clippy::too_many_arguments)]
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f,avx2,fma")]
            #[allow(clippy::too_many_arguments)]
            fn avx512($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            #[allow(clippy::too_many_arguments)]
            fn avx2($($arg: $ty),*) $(-> $ret)? $body
            #[allow(clippy::too_many_arguments)]
            fn generic($($arg: $ty),*) $(-> $ret)? $body
            match $crate::cpu::simd::Isa::get() {
                // SAFETY: `Isa::get` checked that the CPU supports these target features.
                #[cfg(target_arch = "x86_64")]
                $crate::cpu::simd::Isa::Avx512 => unsafe { avx512($($arg),*) },
                // SAFETY: as above.
                #[cfg(target_arch = "x86_64")]
                $crate::cpu::simd::Isa::Avx2 => unsafe { avx2($($arg),*) },
                _ => generic($($arg),*),
            }
        }
    };
}
pub(crate) use multiversion;

/// `Σ a[i]·b[i]` with [`LANES`] independent accumulators (vectorises; order differs from a
/// sequential sum by normal rounding only).
#[inline(always)]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0.0f32; LANES];
    let mut ca = a.chunks_exact(LANES);
    let mut cb = b.chunks_exact(LANES);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for l in 0..LANES {
            acc[l] = x[l].mul_add(y[l], acc[l]);
        }
    }
    let mut tail = 0.0;
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        tail = x.mul_add(*y, tail);
    }
    hsum(&acc) + tail
}

/// `Σ x[i]` with [`LANES`] independent accumulators.
#[inline(always)]
pub(crate) fn sum(x: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let mut c = x.chunks_exact(LANES);
    for v in &mut c {
        for l in 0..LANES {
            acc[l] += v[l];
        }
    }
    hsum(&acc) + c.remainder().iter().sum::<f32>()
}

/// Sum of the accumulator lanes, pairwise.
#[inline(always)]
pub(crate) fn hsum(acc: &[f32; LANES]) -> f32 {
    let mut h = [0.0f32; LANES / 2];
    for l in 0..LANES / 2 {
        h[l] = acc[l] + acc[l + LANES / 2];
    }
    let mut q = [0.0f32; LANES / 4];
    for l in 0..LANES / 4 {
        q[l] = h[l] + h[l + LANES / 4];
    }
    (q[0] + q[2]) + (q[1] + q[3])
}

/// `y[i] += a · x[i]`.
#[inline(always)]
pub(crate) fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y = a.mul_add(x, *y);
    }
}

/// `y[i] *= a`.
#[inline(always)]
pub(crate) fn scale(y: &mut [f32], a: f32) {
    for y in y.iter_mut() {
        *y *= a;
    }
}

/// `f16 → f32` (exact), branch-free integer and float operations so that loops over it
/// vectorise in every ISA variant (the `half` crate's conversions go through a run-time feature
/// check per call, which a per-key-row loop cannot afford).
///
/// Shifts exponent and mantissa into place and rescales by `2^112` (which also normalises
/// subnormals exactly); inputs that were infinite or NaN get the all-ones exponent back.
/// F. Giesen's `half_to_float_fast5`.
#[inline(always)]
pub(crate) fn f16_bits_to_f32(h: u16) -> f32 {
    const MAGIC: f32 = f32::from_bits((254 - 15) << 23);
    const WAS_INF_NAN: f32 = f32::from_bits((127 + 16) << 23);
    let h = u32::from(h);
    let o = f32::from_bits((h & 0x7fff) << 13) * MAGIC;
    let bits = if o >= WAS_INF_NAN {
        o.to_bits() | (255 << 23)
    } else {
        o.to_bits()
    };
    f32::from_bits(bits | ((h & 0x8000) << 16))
}

/// `dst[i] = src[i] as f32` (see [`f16_bits_to_f32`]).
#[inline(always)]
pub(crate) fn widen_f16(src: &[half::f16], dst: &mut [f32]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = f16_bits_to_f32(s.to_bits());
    }
}

/// `e^x` for `x ≤ 0` (attention weights), branch-free so that loops over it vectorise.
///
/// Cephes-style: `x = n·ln2 + r` with `|r| ≤ ln2/2`, a degree-6 polynomial for `e^r`, and `2^n`
/// built in the exponent bits. Relative error ≲ 2 ulp; inputs below -87 flush to 0 (the weights
/// they stand for are below f32's normal range anyway) and NaN stays NaN.
///
/// `n` is rounded by adding `1.5·2²³` (round-to-nearest-even in the low mantissa bits) and read
/// back as an integer from those bits: `f32::round` and `as i32` (NaN and saturation rules) each
/// kept LLVM from vectorising callers, which made the attention softmax scalar.
#[inline(always)]
pub(crate) fn exp_neg(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const SHIFT: f32 = 12_582_912.0; // 1.5·2²³
                                     // Compare-selects (not `clamp`) so that a NaN `x` gives a finite `xc`: the integer steps
                                     // below stay well defined, and the NaN is put back at the end.
    let xc = if x > -87.0 { x } else { -87.0 };
    let xc = if xc < 0.0 { xc } else { 0.0 };
    let t = xc.mul_add(std::f32::consts::LOG2_E, SHIFT);
    let n = t - SHIFT; // integral, in [-126, 0]
    let r = n.mul_add(-LN2_LO, n.mul_add(-LN2_HI, xc));
    let mut p = 1.987_569_1e-4f32;
    p = p.mul_add(r, 1.398_2e-3);
    p = p.mul_add(r, 8.333_452e-3);
    p = p.mul_add(r, 4.166_579_6e-2);
    p = p.mul_add(r, 1.666_666_5e-1);
    p = p.mul_add(r, 0.5);
    let er = p.mul_add(r * r, r) + 1.0;
    // t's low mantissa bits hold 2²² + n; 2ⁿ has the biased exponent n + 127.
    let ni = t.to_bits().wrapping_sub(SHIFT.to_bits()) as i32;
    let v = er * f32::from_bits(((ni + 127) as u32) << 23);
    if x < -87.0 {
        0.0
    } else if x.is_nan() {
        x
    } else {
        v
    }
}

/// The largest value of `x` that is not NaN (−∞ when there is none), in [`LANES`] independent
/// compare-selects (`f32::max`'s NaN rule keeps a fold over it scalar).
#[inline(always)]
pub(crate) fn max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let (chunks, tail) = x.as_chunks::<LANES>();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            // `v > a` is false for a NaN `v`, so NaNs never enter (one `vmaxps`).
            *a = if v > *a { v } else { *a };
        }
    }
    for &v in tail {
        acc[0] = if v > acc[0] { v } else { acc[0] };
    }
    acc.iter()
        .fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_neg_matches_std() {
        let mut worst = 0.0f64;
        for i in 0..=200_000 {
            let x = -(i as f32) * 87.0 / 200_000.0;
            let want = f64::from(x).exp();
            let got = f64::from(exp_neg(x));
            worst = worst.max(((got - want) / want).abs());
        }
        assert!(worst < 5e-7, "worst relative error {worst}");
        assert_eq!(exp_neg(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_neg(-100.0), 0.0);
        assert_eq!(exp_neg(0.0), 1.0);
        assert!(exp_neg(f32::NAN).is_nan());
        // Ties of the range reduction round to even: both neighbours stay accurate.
        for x in [-0.5 * std::f32::consts::LN_2, -1.5 * std::f32::consts::LN_2] {
            let rel = (f64::from(exp_neg(x)) - f64::from(x).exp()).abs() / f64::from(x).exp();
            assert!(rel < 5e-7, "exp_neg({x}): relative error {rel}");
        }
    }

    #[test]
    fn f16_bits_to_f32_is_exact_for_every_f16() {
        for bits in 0..=u16::MAX {
            let want = half::f16::from_bits(bits).to_f32();
            let got = f16_bits_to_f32(bits);
            if want.is_nan() {
                assert!(got.is_nan(), "{bits:#06x}");
            } else {
                assert_eq!(got.to_bits(), want.to_bits(), "{bits:#06x}");
            }
        }
    }

    #[test]
    fn max_skips_nan() {
        let mut x: Vec<f32> = (0..37).map(|i| (i as f32 * 0.37).sin()).collect();
        let want = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        x[3] = f32::NAN;
        x[36] = f32::NAN;
        let want_nan = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        assert_eq!(max(&x), want_nan);
        assert!(max(&x) <= want);
        assert_eq!(max(&[]), f32::NEG_INFINITY);
        assert_eq!(max(&[f32::NAN]), f32::NEG_INFINITY);
    }

    #[test]
    fn dot_and_hsum() {
        let a: Vec<f32> = (0..37).map(|i| i as f32).collect();
        let b = vec![2.0f32; 37];
        assert_eq!(dot(&a, &b), 2.0 * (0..37).sum::<i32>() as f32);
    }
}
