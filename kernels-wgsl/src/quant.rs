//! GGUF block quantization formats (Q4_1, Q8_0): packing and unpacking.
//!
//! The byte layouts are exactly those of ggml/GGUF, so weights read from a GGUF file can be handed
//! to either backend unchanged and tensors quantized here load in llama.cpp:
//!
//! * **Q4_1** — 32 values per 20-byte block `{d: f16, m: f16, qs: [u8; 16]}`; value `j < 16` is the
//!   low nibble of `qs[j]`, value `j + 16` the high nibble; `x = d·q + m`.
//! * **Q8_0** — 32 values per 34-byte block `{d: f16, qs: [i8; 32]}`; `x = d·q`.
//!
//! All multi-byte fields are little-endian. The quantizers follow ggml's reference
//! (`quantize_row_q4_1_ref`, `quantize_row_q8_0_ref`) so round-trip errors match llama.cpp's.

use half::f16;

use crate::backend::{DType, KernelError, Result};

/// Values per quantized block (both Q4_1 and Q8_0).
pub const QK: usize = 32;
/// Bytes per Q4_1 block.
pub const Q4_1_BLOCK_BYTES: usize = 20;
/// Bytes per Q8_0 block.
pub const Q8_0_BLOCK_BYTES: usize = 34;

#[inline]
fn f16_at(bytes: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32()
}

fn check_blocks(what: &str, n: usize) -> Result<()> {
    if !n.is_multiple_of(QK) {
        return Err(KernelError::Shape(format!(
            "{what}: {n} values is not a multiple of the block length {QK}"
        )));
    }
    Ok(())
}

/// Quantize `x` to Q4_1 blocks (`x.len()` must be a multiple of 32).
pub fn quantize_q4_1(x: &[f32]) -> Result<Vec<u8>> {
    check_blocks("quantize_q4_1", x.len())?;
    let mut out = Vec::with_capacity(x.len() / QK * Q4_1_BLOCK_BYTES);
    for block in x.chunks_exact(QK) {
        let (mut min, mut max) = (f32::MAX, f32::MIN);
        for &v in block {
            min = min.min(v);
            max = max.max(v);
        }
        // ggml quantizes with the f32 scale and minimum, then stores them as f16.
        let d = (max - min) / 15.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
        out.extend_from_slice(&f16::from_f32(min).to_le_bytes());
        for j in 0..QK / 2 {
            let q = |v: f32| (((v - min) * id + 0.5) as u8).min(15);
            out.push(q(block[j]) | (q(block[j + QK / 2]) << 4));
        }
    }
    Ok(out)
}

/// Quantize `x` to Q8_0 blocks (`x.len()` must be a multiple of 32).
pub fn quantize_q8_0(x: &[f32]) -> Result<Vec<u8>> {
    check_blocks("quantize_q8_0", x.len())?;
    let mut out = Vec::with_capacity(x.len() / QK * Q8_0_BLOCK_BYTES);
    for block in x.chunks_exact(QK) {
        let amax = block.iter().fold(0.0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
        for &v in block {
            out.push(((v * id).round() as i8) as u8);
        }
    }
    Ok(out)
}

/// Encode `x` as little-endian F16.
pub fn quantize_f16(x: &[f32]) -> Vec<u8> {
    x.iter()
        .flat_map(|&v| f16::from_f32(v).to_le_bytes())
        .collect()
}

/// Encode `x` in `dtype` (F32, F16, Q4_1 or Q8_0).
pub fn quantize(dtype: DType, x: &[f32]) -> Result<Vec<u8>> {
    match dtype {
        DType::F32 => Ok(x.iter().flat_map(|v| v.to_le_bytes()).collect()),
        DType::F16 => Ok(quantize_f16(x)),
        DType::Q4_1 => quantize_q4_1(x),
        DType::Q8_0 => quantize_q8_0(x),
    }
}

/// Decode one Q4_1 block (20 bytes) into 32 values.
#[inline]
pub fn dequantize_block_q4_1(block: &[u8], out: &mut [f32]) {
    let d = f16_at(block, 0);
    let m = f16_at(block, 2);
    let qs = &block[4..4 + QK / 2];
    let (lo, hi) = out[..QK].split_at_mut(QK / 2);
    for j in 0..QK / 2 {
        lo[j] = d * f32::from(qs[j] & 0x0f) + m;
        hi[j] = d * f32::from(qs[j] >> 4) + m;
    }
}

/// Decode one Q8_0 block (34 bytes) into 32 values.
#[inline]
pub fn dequantize_block_q8_0(block: &[u8], out: &mut [f32]) {
    let d = f16_at(block, 0);
    for (o, &q) in out[..QK].iter_mut().zip(&block[2..2 + QK]) {
        *o = d * f32::from(q as i8);
    }
}

/// Decode `out.len()` values of `dtype` from the start of `bytes` into `out`.
///
/// Used for whole tensors and for single rows / tiles (a row of a quantized matrix starts on a
/// block boundary whenever the row length is a multiple of 32).
pub fn dequantize_into(dtype: DType, bytes: &[u8], out: &mut [f32]) -> Result<()> {
    let n = out.len();
    if !n.is_multiple_of(dtype.block_len()) {
        return Err(KernelError::Shape(format!(
            "{dtype:?}: {n} values is not a multiple of the block length {}",
            dtype.block_len()
        )));
    }
    let need = dtype.bytes_for(n);
    if bytes.len() < need {
        return Err(KernelError::Shape(format!(
            "{dtype:?}: {n} values need {need} bytes, got {}",
            bytes.len()
        )));
    }
    match dtype {
        DType::F32 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        DType::F16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        DType::Q4_1 => {
            for (o, b) in out
                .chunks_exact_mut(QK)
                .zip(bytes.chunks_exact(Q4_1_BLOCK_BYTES))
            {
                dequantize_block_q4_1(b, o);
            }
        }
        DType::Q8_0 => {
            for (o, b) in out
                .chunks_exact_mut(QK)
                .zip(bytes.chunks_exact(Q8_0_BLOCK_BYTES))
            {
                dequantize_block_q8_0(b, o);
            }
        }
    }
    Ok(())
}

/// Decode the first `n` values of `dtype` stored in `bytes`.
pub fn dequantize(dtype: DType, bytes: &[u8], n: usize) -> Result<Vec<f32>> {
    let mut out = vec![0.0f32; n];
    dequantize_into(dtype, bytes, &mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wave(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| ((i as f32 * 0.37 + seed as f32).sin() * 3.0) - 0.5)
            .collect()
    }

    #[test]
    fn q4_1_layout_matches_ggml() {
        // Values 0..32 → min 0, d = 31/15; value j is q = round(j*15/31).
        let x: Vec<f32> = (0..32).map(|i| i as f32).collect();
        let b = quantize_q4_1(&x).unwrap();
        assert_eq!(b.len(), 20);
        assert_eq!(f16_at(&b, 0), f16::from_f32(31.0 / 15.0).to_f32());
        assert_eq!(f16_at(&b, 2), 0.0);
        for j in 0..16 {
            let q = |v: usize| ((v as f32 * 15.0 / 31.0) + 0.5) as u8;
            assert_eq!(b[4 + j] & 15, q(j), "low nibble {j}");
            assert_eq!(b[4 + j] >> 4, q(j + 16), "high nibble {j}");
        }
    }

    #[test]
    fn q8_0_layout_matches_ggml() {
        let mut x = vec![0.0f32; 32];
        x[3] = -2.0;
        x[7] = 1.0;
        let b = quantize_q8_0(&x).unwrap();
        assert_eq!(b.len(), 34);
        assert_eq!(f16_at(&b, 0), f16::from_f32(2.0 / 127.0).to_f32());
        assert_eq!(b[2 + 3] as i8, -127);
        assert_eq!(b[2 + 7] as i8, 64); // round(63.5) away from zero
    }

    #[test]
    fn round_trip_error_is_bounded_by_half_a_step() {
        for seed in 0..8 {
            let x = wave(32 * 37, seed);
            for dtype in [DType::Q4_1, DType::Q8_0, DType::F16, DType::F32] {
                let y = dequantize(dtype, &quantize(dtype, &x).unwrap(), x.len()).unwrap();
                for (bx, by) in x.chunks(32).zip(y.chunks(32)) {
                    let lo = bx.iter().cloned().fold(f32::MAX, f32::min);
                    let hi = bx.iter().cloned().fold(f32::MIN, f32::max);
                    let amax = lo.abs().max(hi.abs());
                    // Half a quantization step, plus the f16 rounding of the scale/offset.
                    let bound = match dtype {
                        DType::Q4_1 => (hi - lo) / 15.0 * 0.5 + amax * 2e-3,
                        DType::Q8_0 => amax / 127.0 * 0.5 + amax * 2e-3,
                        DType::F16 => amax * 1e-3,
                        DType::F32 => 0.0,
                    };
                    for (a, b) in bx.iter().zip(by) {
                        assert!(
                            (a - b).abs() <= bound + 1e-7,
                            "{dtype:?} {a} vs {b} (bound {bound})"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn constant_blocks_are_exact() {
        let x = vec![1.5f32; 64];
        // Q4_1 stores a constant block as d = 0, m = value.
        let y = dequantize(DType::Q4_1, &quantize_q4_1(&x).unwrap(), 64).unwrap();
        assert!(y.iter().all(|&v| v == 1.5), "{y:?}");
        let z = dequantize(DType::Q8_0, &quantize_q8_0(&[0.0; 32]).unwrap(), 32).unwrap();
        assert!(z.iter().all(|&v| v == 0.0));
    }

    #[test]
    fn bad_lengths_are_errors() {
        assert!(quantize_q4_1(&[0.0; 31]).is_err());
        assert!(quantize_q8_0(&[0.0; 33]).is_err());
        assert!(dequantize(DType::Q4_1, &[0u8; 19], 32).is_err());
        assert!(dequantize(DType::Q8_0, &[0u8; 34], 48).is_err());
    }
}
