//! Element types of paged KV pools.
//!
//! A KV pool (see [`crate::Backend::kv_write`]) holds `F32` or `F16` values. Everything that goes
//! in or comes out of a pool is `f32` on the host side: `kv_write` and `scatter_blocks` round
//! `f32 → f16` to nearest, ties to even (IEEE-754 `roundTiesToEven`, as the `half` crate and x86
//! F16C do; out-of-range values become ±inf, NaN stays NaN), and `attention` and `gather_blocks`
//! widen `f16 → f32`, which is exact. So `gather_blocks` after `scatter_blocks` of values that
//! already are f16 values returns them bit for bit: exported f16 KV re-imports unchanged.

use half::f16;
use half::slice::HalfFloatSliceExt;

use crate::backend::DType;

/// A value type a KV pool may hold. Implemented for `f32` and [`half::f16`].
pub trait KvElem: bytemuck::Pod + Default + Send + Sync + 'static {
    /// The pool's [`DType`].
    const DTYPE: DType;
    /// One value from `f32` (rounded to nearest even for `f16`).
    fn from_f32(x: f32) -> Self;
    /// One value as `f32` (exact).
    fn to_f32(self) -> f32;
    /// `dst[i] = from_f32(src[i])`, vectorised where the CPU allows (lengths must match).
    fn slice_from_f32(dst: &mut [Self], src: &[f32]);
    /// `dst[i] = src[i].to_f32()`, vectorised where the CPU allows (lengths must match).
    fn slice_to_f32(src: &[Self], dst: &mut [f32]);
}

impl KvElem for f32 {
    const DTYPE: DType = DType::F32;
    #[inline]
    fn from_f32(x: f32) -> Self {
        x
    }
    #[inline]
    fn to_f32(self) -> f32 {
        self
    }
    fn slice_from_f32(dst: &mut [Self], src: &[f32]) {
        dst.copy_from_slice(src);
    }
    fn slice_to_f32(src: &[Self], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }
}

impl KvElem for f16 {
    const DTYPE: DType = DType::F16;
    #[inline]
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }
    #[inline]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    /// `half`'s slice conversion: 8 values per F16C instruction when the CPU has it (checked
    /// at run time), the same rounding as [`f16::from_f32`] otherwise.
    fn slice_from_f32(dst: &mut [Self], src: &[f32]) {
        dst.convert_from_f32_slice(src);
    }
    fn slice_to_f32(src: &[Self], dst: &mut [f32]) {
        src.convert_to_f32_slice(dst);
    }
}

/// Whether a pool may hold `dtype` (`F32` or `F16`).
pub fn is_kv_dtype(dtype: DType) -> bool {
    matches!(dtype, DType::F32 | DType::F16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_slice_conversion_rounds_like_the_scalar_one() {
        // Ties (exactly between two f16 values), values just above/below them, the overflow
        // threshold, subnormals, zeros, infinities and NaN.
        let one_ulp = 2f32.powi(-10);
        let mut src = vec![
            1.0 + one_ulp / 2.0,
            1.0 + 3.0 * one_ulp / 2.0,
            1.0 + one_ulp / 2.0 + f32::EPSILON,
            65504.0,
            65519.0,
            65520.0,
            -1.0e9,
            2f32.powi(-24),
            2f32.powi(-25),
            3.0 * 2f32.powi(-26),
            -0.0,
            0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
        ];
        src.extend((0..1000).map(|i| (i as f32 - 500.0) * 0.0123));
        let mut got = vec![f16::ZERO; src.len()];
        f16::slice_from_f32(&mut got, &src);
        for (g, &s) in got.iter().zip(&src) {
            assert_eq!(g.to_bits(), f16::from_f32(s).to_bits(), "{s}");
        }
        assert_eq!(
            f16::from_f32(1.0 + one_ulp / 2.0).to_f32(),
            1.0,
            "tie to even"
        );
        assert_eq!(
            f16::from_f32(1.0 + 3.0 * one_ulp / 2.0).to_f32(),
            1.0 + 2.0 * one_ulp,
            "tie to even (up)"
        );
        assert_eq!(f16::from_f32(65520.0).to_f32(), f32::INFINITY);
        assert_eq!(f16::from_f32(65519.0).to_f32(), 65504.0);
        let mut nan = [f16::ZERO];
        f16::slice_from_f32(&mut nan, &[f32::NAN]);
        assert!(nan[0].is_nan());
        let mut back = vec![0.0f32; got.len()];
        f16::slice_to_f32(&got, &mut back);
        for (b, g) in back.iter().zip(&got) {
            assert_eq!(b.to_bits(), g.to_f32().to_bits());
        }
    }
}
