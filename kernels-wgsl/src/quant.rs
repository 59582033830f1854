//! GGUF block quantization formats (Q4_1, Q8_0, Q5_0, Q4_K, Q6_K): packing and unpacking.
//!
//! The byte layouts are exactly those of ggml/GGUF (`ggml-common.h`; the decoders follow
//! `dequantize_row_*` in llama.cpp's `ggml-quants.c` step for step, in the same float order), so
//! weights read from a GGUF file can be handed to either backend unchanged and tensors quantized
//! here load in llama.cpp:
//!
//! * **Q4_1** — 32 values per 20-byte block `{d: f16, m: f16, qs: [u8; 16]}`; value `j < 16` is the
//!   low nibble of `qs[j]`, value `j + 16` the high nibble; `x = d·q + m`.
//! * **Q8_0** — 32 values per 34-byte block `{d: f16, qs: [i8; 32]}`; `x = d·q`.
//! * **Q5_0** — 32 values per 22-byte block `{d: f16, qh: u32, qs: [u8; 16]}`; the low 4 bits as
//!   in Q4_1, bit `j` of `qh` is the 5th bit of value `j`; `x = d·(q − 16)`.
//! * **Q4_K** — 256 values per 144-byte super-block `{d: f16, dmin: f16, scales: [u8; 12],
//!   qs: [u8; 128]}`: 8 sub-blocks of 32 with 6-bit scale `sc` and min `m` packed in `scales`
//!   (`get_scale_min_k4`); each 64 values share 32 bytes of `qs` (low nibbles, then high);
//!   `x = d·sc·q − dmin·m`.
//! * **Q6_K** — 256 values per 210-byte super-block `{ql: [u8; 128], qh: [u8; 64],
//!   scales: [i8; 16], d: f16}`: 16 sub-blocks of 16 with an 8-bit signed scale; 6-bit `q` from a
//!   nibble of `ql` and 2 bits of `qh`; `x = d·sc·(q − 32)`.
//!
//! All multi-byte fields are little-endian. The Q4_1, Q8_0 and Q5_0 quantizers follow ggml's
//! reference (`quantize_row_*_ref`) so round-trip errors match llama.cpp's; the K-quant ones are
//! simple min/max fits (llama.cpp searches scales iteratively), used to make test weights.

use half::f16;

use crate::backend::{DType, KernelError, Result};

/// Values per quantized block (both Q4_1 and Q8_0).
pub const QK: usize = 32;
/// Bytes per Q4_1 block.
pub const Q4_1_BLOCK_BYTES: usize = 20;
/// Bytes per Q8_0 block.
pub const Q8_0_BLOCK_BYTES: usize = 34;
/// Bytes per Q5_0 block.
pub const Q5_0_BLOCK_BYTES: usize = 22;
/// Values per K-quant super-block.
pub const QK_K: usize = 256;
/// Bytes per Q4_K super-block.
pub const Q4_K_BLOCK_BYTES: usize = 144;
/// Bytes per Q6_K super-block.
pub const Q6_K_BLOCK_BYTES: usize = 210;

#[inline]
fn f16_at(bytes: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32()
}

fn check_blocks(what: &str, n: usize) -> Result<()> {
    check_len(what, n, QK)
}

fn check_len(what: &str, n: usize, block: usize) -> Result<()> {
    if !n.is_multiple_of(block) {
        return Err(KernelError::Shape(format!(
            "{what}: {n} values is not a multiple of the block length {block}"
        )));
    }
    Ok(())
}

/// `nearest_int` of ggml (round half away from zero).
fn nearest(v: f32) -> i32 {
    v.round() as i32
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

/// Quantize `x` to Q5_0 blocks (`x.len()` must be a multiple of 32), as `quantize_row_q5_0_ref`.
pub fn quantize_q5_0(x: &[f32]) -> Result<Vec<u8>> {
    check_blocks("quantize_q5_0", x.len())?;
    let mut out = Vec::with_capacity(x.len() / QK * Q5_0_BLOCK_BYTES);
    for block in x.chunks_exact(QK) {
        // The value of largest magnitude, with its sign, maps to -16.
        let max = block
            .iter()
            .fold(0.0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
        let d = max / -16.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let q = |v: f32| ((v * id + 16.5) as i8).clamp(0, 31) as u8;
        let mut qh = 0u32;
        let mut qs = [0u8; QK / 2];
        for j in 0..QK / 2 {
            let (q0, q1) = (q(block[j]), q(block[j + QK / 2]));
            qs[j] = (q0 & 15) | ((q1 & 15) << 4);
            qh |= u32::from(q0 >> 4) << j;
            qh |= u32::from(q1 >> 4) << (j + QK / 2);
        }
        out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
        out.extend_from_slice(&qh.to_le_bytes());
        out.extend_from_slice(&qs);
    }
    Ok(out)
}

/// Quantize `x` to Q4_K super-blocks (`x.len()` must be a multiple of 256): per sub-block of 32 a
/// min/max fit, scales and mins quantized to 6 bits against the super-block's `d` and `dmin`.
pub fn quantize_q4_k(x: &[f32]) -> Result<Vec<u8>> {
    check_len("quantize_q4_k", x.len(), QK_K)?;
    let mut out = Vec::with_capacity(x.len() / QK_K * Q4_K_BLOCK_BYTES);
    for sb in x.chunks_exact(QK_K) {
        let mut scale = [0.0f32; 8];
        let mut min = [0.0f32; 8];
        for (j, sub) in sb.chunks_exact(32).enumerate() {
            let lo = sub.iter().cloned().fold(0.0f32, f32::min);
            let hi = sub.iter().cloned().fold(f32::MIN, f32::max);
            scale[j] = (hi - lo) / 15.0;
            min[j] = -lo;
        }
        let max_scale = scale.iter().cloned().fold(0.0f32, f32::max);
        let max_min = min.iter().cloned().fold(0.0f32, f32::max);
        let d = f16::from_f32(max_scale / 63.0);
        let dmin = f16::from_f32(max_min / 63.0);
        let q6 = |v: f32, unit: f16| {
            let u = unit.to_f32();
            if u > 0.0 {
                nearest(v / u).clamp(0, 63) as u8
            } else {
                0
            }
        };
        let mut scales = [0u8; 12];
        let mut sc = [0u8; 8];
        let mut mn = [0u8; 8];
        for j in 0..8 {
            let (ls, lm) = (q6(scale[j], d), q6(min[j], dmin));
            (sc[j], mn[j]) = (ls, lm);
            if j < 4 {
                scales[j] = ls;
                scales[j + 4] = lm;
            } else {
                scales[j + 4] = (ls & 0xf) | ((lm & 0xf) << 4);
                scales[j - 4] |= (ls >> 4) << 6;
                scales[j] |= (lm >> 4) << 6;
            }
        }
        let mut l = [0u8; QK_K];
        for (j, sub) in sb.chunks_exact(32).enumerate() {
            let dj = d.to_f32() * f32::from(sc[j]);
            let mj = dmin.to_f32() * f32::from(mn[j]);
            for (i, &v) in sub.iter().enumerate() {
                l[32 * j + i] = if dj > 0.0 {
                    nearest((v + mj) / dj).clamp(0, 15) as u8
                } else {
                    0
                };
            }
        }
        out.extend_from_slice(&d.to_le_bytes());
        out.extend_from_slice(&dmin.to_le_bytes());
        out.extend_from_slice(&scales);
        for chunk in l.chunks_exact(64) {
            out.extend((0..32).map(|i| chunk[i] | (chunk[i + 32] << 4)));
        }
    }
    Ok(out)
}

/// Quantize `x` to Q6_K super-blocks (`x.len()` must be a multiple of 256): per sub-block of 16
/// the value of largest magnitude maps to -32; sub-block scales are quantized to 8 bits.
pub fn quantize_q6_k(x: &[f32]) -> Result<Vec<u8>> {
    check_len("quantize_q6_k", x.len(), QK_K)?;
    let mut out = Vec::with_capacity(x.len() / QK_K * Q6_K_BLOCK_BYTES);
    for sb in x.chunks_exact(QK_K) {
        let mut scale = [0.0f32; 16];
        for (s, sub) in scale.iter_mut().zip(sb.chunks_exact(16)) {
            let max = sub
                .iter()
                .fold(0.0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
            *s = max / -32.0;
        }
        let max_scale = scale
            .iter()
            .fold(0.0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
        let iscale = if max_scale != 0.0 {
            -128.0 / max_scale
        } else {
            0.0
        };
        let d = f16::from_f32(if iscale != 0.0 { 1.0 / iscale } else { 0.0 });
        let mut scales = [0i8; 16];
        let mut l = [0u8; QK_K];
        for (ib, sub) in sb.chunks_exact(16).enumerate() {
            let sc = nearest(iscale * scale[ib]).clamp(-128, 127) as i8;
            scales[ib] = sc;
            let u = d.to_f32() * f32::from(sc);
            for (i, &v) in sub.iter().enumerate() {
                l[16 * ib + i] = if u != 0.0 {
                    (nearest(v / u).clamp(-32, 31) + 32) as u8
                } else {
                    32
                };
            }
        }
        let mut ql = [0u8; 128];
        let mut qh = [0u8; 64];
        for h in 0..2 {
            let (lh, qlh, qhh) = (&l[128 * h..], &mut ql[64 * h..], &mut qh[32 * h..]);
            for i in 0..32 {
                qlh[i] = (lh[i] & 0xf) | ((lh[i + 64] & 0xf) << 4);
                qlh[i + 32] = (lh[i + 32] & 0xf) | ((lh[i + 96] & 0xf) << 4);
                qhh[i] = (lh[i] >> 4)
                    | ((lh[i + 32] >> 4) << 2)
                    | ((lh[i + 64] >> 4) << 4)
                    | ((lh[i + 96] >> 4) << 6);
            }
        }
        out.extend_from_slice(&ql);
        out.extend_from_slice(&qh);
        out.extend(scales.iter().map(|&s| s as u8));
        out.extend_from_slice(&d.to_le_bytes());
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
        DType::Q5_0 => quantize_q5_0(x),
        DType::Q4_K => quantize_q4_k(x),
        DType::Q6_K => quantize_q6_k(x),
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

/// Decode one Q5_0 block (22 bytes) into 32 values (`dequantize_row_q5_0`).
#[inline]
pub fn dequantize_block_q5_0(block: &[u8], out: &mut [f32]) {
    let d = f16_at(block, 0);
    let qh = u32::from_le_bytes([block[2], block[3], block[4], block[5]]);
    let qs = &block[6..6 + QK / 2];
    let (lo, hi) = out[..QK].split_at_mut(QK / 2);
    for j in 0..QK / 2 {
        let h0 = ((qh >> j) << 4) & 0x10;
        let h1 = (qh >> (j + 12)) & 0x10;
        lo[j] = ((u32::from(qs[j] & 0x0f) | h0) as i32 - 16) as f32 * d;
        hi[j] = ((u32::from(qs[j] >> 4) | h1) as i32 - 16) as f32 * d;
    }
}

/// The 6-bit scale and min of Q4_K sub-block `j` (`get_scale_min_k4`).
#[inline]
pub fn q4_k_scale_min(j: usize, scales: &[u8]) -> (u8, u8) {
    if j < 4 {
        (scales[j] & 63, scales[j + 4] & 63)
    } else {
        (
            (scales[j + 4] & 0xf) | ((scales[j - 4] >> 6) << 4),
            (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4),
        )
    }
}

/// Decode one Q4_K super-block (144 bytes) into 256 values (`dequantize_row_q4_K`).
#[inline]
pub fn dequantize_block_q4_k(block: &[u8], out: &mut [f32]) {
    let d = f16_at(block, 0);
    let min = f16_at(block, 2);
    let scales = &block[4..16];
    for (c, (q, y)) in block[16..16 + 128]
        .chunks_exact(32)
        .zip(out[..QK_K].chunks_exact_mut(64))
        .enumerate()
    {
        let (sc1, m1) = q4_k_scale_min(2 * c, scales);
        let (sc2, m2) = q4_k_scale_min(2 * c + 1, scales);
        let (d1, m1) = (d * f32::from(sc1), min * f32::from(m1));
        let (d2, m2) = (d * f32::from(sc2), min * f32::from(m2));
        let (ylo, yhi) = y.split_at_mut(32);
        for l in 0..32 {
            ylo[l] = d1 * f32::from(q[l] & 0xf) - m1;
            yhi[l] = d2 * f32::from(q[l] >> 4) - m2;
        }
    }
}

/// Decode one Q6_K super-block (210 bytes) into 256 values (`dequantize_row_q6_K`).
#[inline]
pub fn dequantize_block_q6_k(block: &[u8], out: &mut [f32]) {
    let d = f16_at(block, 208);
    for h in 0..2 {
        let ql = &block[64 * h..64 * h + 64];
        let qh = &block[128 + 32 * h..128 + 32 * h + 32];
        let sc = &block[192 + 8 * h..192 + 8 * h + 8];
        let y = &mut out[128 * h..128 * h + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = i32::from((ql[l] & 0xf) | ((qh[l] & 3) << 4)) - 32;
            let q2 = i32::from((ql[l + 32] & 0xf) | (((qh[l] >> 2) & 3) << 4)) - 32;
            let q3 = i32::from((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
            let q4 = i32::from((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
            let s = |i: usize| d * f32::from(sc[i] as i8);
            y[l] = s(is) * q1 as f32;
            y[l + 32] = s(is + 2) * q2 as f32;
            y[l + 64] = s(is + 4) * q3 as f32;
            y[l + 96] = s(is + 6) * q4 as f32;
        }
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
        _ => {
            if let Some(f) = block_decoder(dtype) {
                let (len, size) = (dtype.block_len(), dtype.block_bytes());
                for (o, b) in out.chunks_exact_mut(len).zip(bytes.chunks_exact(size)) {
                    f(b, o);
                }
            }
        }
    }
    Ok(())
}

/// Decodes one block (`dtype.block_bytes()` bytes) into `dtype.block_len()` values.
pub type BlockDecoder = fn(&[u8], &mut [f32]);

/// The decoder of one block of a block-quantized `dtype`; `None` for plain floats.
pub fn block_decoder(dtype: DType) -> Option<BlockDecoder> {
    match dtype {
        DType::F32 | DType::F16 => None,
        DType::Q4_1 => Some(dequantize_block_q4_1),
        DType::Q8_0 => Some(dequantize_block_q8_0),
        DType::Q5_0 => Some(dequantize_block_q5_0),
        DType::Q4_K => Some(dequantize_block_q4_k),
        DType::Q6_K => Some(dequantize_block_q6_k),
    }
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
                        _ => 0.0,
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

    /// Blocks written field by field from the GGUF definitions (`ggml-common.h`), decoded values
    /// worked out by hand from `dequantize_row_*` in `ggml-quants.c`.
    #[test]
    fn q5_0_block_by_hand() {
        let mut b = vec![0u8; Q5_0_BLOCK_BYTES];
        b[..2].copy_from_slice(&f16::from_f32(0.5).to_le_bytes());
        // qh: 5th bit of values 0 and 16.
        b[2..6].copy_from_slice(&(1u32 | (1 << 16)).to_le_bytes());
        b[6] = 0x3a; // value 0: low nibble 10, value 16: high nibble 3
        let y = dequantize(DType::Q5_0, &b, 32).unwrap();
        assert_eq!(y[0], ((10 | 16) - 16) as f32 * 0.5);
        assert_eq!(y[16], ((3 | 16) - 16) as f32 * 0.5);
        assert_eq!(y[1], -8.0);
        assert_eq!(y[17], -8.0);
    }

    #[test]
    fn q4_k_block_by_hand() {
        let mut b = vec![0u8; Q4_K_BLOCK_BYTES];
        b[..2].copy_from_slice(&f16::from_f32(1.0).to_le_bytes());
        b[2..4].copy_from_slice(&f16::from_f32(0.5).to_le_bytes());
        let scales = &mut b[4..16];
        // Sub-block 0: sc 3, m 2 (6 bits each in bytes 0 and 4).
        scales[0] = 3;
        scales[4] = 2;
        // Sub-block 5: sc 37 = 0b10_0101, m 19 = 0b01_0011: low nibbles in byte 9, top two bits in
        // the top of bytes 1 (sc) and 5 (m), whose own 6-bit sub-block 1 values stay 0.
        scales[9] = 5 | (3 << 4);
        scales[1] = 2 << 6;
        scales[5] = 1 << 6;
        assert_eq!(q4_k_scale_min(5, scales), (37, 19));
        assert_eq!(q4_k_scale_min(1, scales), (0, 0));
        let qs = &mut b[16..];
        qs[0] = 0x07; // value 0 (sub-block 0): q 7
        qs[65] = 0x90; // value 161 (sub-block 5 = high nibbles of bytes 64..96): q 9
        let y = dequantize(DType::Q4_K, &b, 256).unwrap();
        assert_eq!(y[0], 3.0 * 7.0 - 0.5 * 2.0);
        assert_eq!(y[161], 37.0 * 9.0 - 0.5 * 19.0);
        assert_eq!(y[33], 0.0, "sub-block 1 has scale 0 and min 0");
        assert_eq!(y[1], -1.0, "q 0 in sub-block 0 is -dmin·m");
    }

    #[test]
    fn q6_k_block_by_hand() {
        let mut b = vec![0u8; Q6_K_BLOCK_BYTES];
        b[208..].copy_from_slice(&f16::from_f32(0.25).to_le_bytes());
        let sc = |b: &mut [u8], i: usize, v: i8| b[192 + i] = v as u8;
        sc(&mut b, 0, 2);
        sc(&mut b, 2, 1);
        sc(&mut b, 4, 4);
        sc(&mut b, 6, -3);
        sc(&mut b, 8, 1);
        b[0] = 0x51; // ql[0]: value 0 low nibble 1, value 64 high nibble 5
        b[32] = 0xf2; // ql[32]: value 32 low nibble 2, value 96 high nibble 15
        b[128] = 0b10_00_01_11; // qh[0]: top bits of values 0, 32, 64, 96 = 3, 1, 0, 2
        let y = dequantize(DType::Q6_K, &b, 256).unwrap();
        assert_eq!(y[0], 0.25 * 2.0 * ((1 | (3 << 4)) - 32) as f32);
        assert_eq!(y[32], 0.25 * 1.0 * ((2 | (1 << 4)) - 32) as f32);
        assert_eq!(y[64], 0.25 * 4.0 * (5 - 32) as f32);
        assert_eq!(y[96], 0.25 * -3.0 * ((15 | (2 << 4)) - 32) as f32);
        assert_eq!(y[128], 0.25 * -32.0, "second half: ql[64], qh[32], scale 8");
    }

    /// Round trips of the formats whose quantizers fit a scale per (sub-)block: the error is at
    /// most about one quantization step of the sub-block (plus the rounding of the 6/8-bit scales).
    #[test]
    fn k_quant_and_q5_0_round_trips_are_close() {
        for seed in 0..4 {
            let x = wave(256 * 3, seed);
            for (dtype, steps) in [
                (DType::Q5_0, 31.0),
                (DType::Q4_K, 15.0),
                (DType::Q6_K, 63.0),
            ] {
                let y = dequantize(dtype, &quantize(dtype, &x).unwrap(), x.len()).unwrap();
                for (bx, by) in x.chunks(32).zip(y.chunks(32)) {
                    let lo = bx.iter().cloned().fold(f32::MAX, f32::min);
                    let hi = bx.iter().cloned().fold(f32::MIN, f32::max);
                    let step = (hi.max(0.0) - lo.min(0.0)) / steps;
                    for (a, b) in bx.iter().zip(by) {
                        assert!((a - b).abs() <= step * 1.1 + 1e-6, "{dtype:?} {a} vs {b}");
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
        assert!(quantize_q4_k(&[0.0; 255]).is_err());
        assert!(dequantize(DType::Q6_K, &[0u8; 209], 256).is_err());
        assert!(dequantize(DType::Q4_K, &[0u8; 144], 32).is_err());
    }
}
