//! Wire encodings of paged KV for one transfer (`mesh.kv_wire`), as pure functions.
//!
//! Both ends store KV in the layout's dtype ([`super::KvDType`], f16 by default); what crosses
//! the network may differ per transfer:
//!
//! * [`KvWire::F16`] (default): the layout's own encoding ([`super::KvDType::encode`]), exact: a
//!   remote prefill is then token-identical to a local one.
//! * [`KvWire::Int8`] (opt-in): paged K/V as int8 with one f32 scale per [`INT8_BLOCK`] values
//!   ([`encode_int8`] / [`decode_int8`]): 1.125 bytes per value instead of 2, for links slow
//!   enough that the transfer, not the prefill, bounds time to first token. Lossy: see
//!   BENCHMARKS.md for what it costs on SmolLM2. Linear-attention state always travels as f32.

pub use prfaas_mesh::kv::KvWire;

/// The [`KvHeader::dtype`](prfaas_mesh::kv::KvHeader::dtype) label of a transfer of `layout`'s
/// KV in `wire`: the layout's dtype (`f16`, `f32`) for the exact encoding, `int8` otherwise. The
/// home accepts only the label of what it asked for (or the exact one from a winner too old to
/// know the choice).
pub fn wire_label(layout: &super::KvLayout, wire: KvWire) -> String {
    match wire {
        KvWire::Int8 => KvWire::Int8.as_str().to_string(),
        _ => layout.dtype.to_string(),
    }
}

/// Values per int8 scale: one K or V head row of 64 values is two blocks.
pub const INT8_BLOCK: usize = 32;

/// Why an int8 encoding or decoding was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    #[error("int8 block size must be at least 1 value")]
    ZeroBlock,
    #[error("value {index} is {value}: only finite KV can be int8-encoded")]
    NonFinite { index: usize, value: f32 },
    #[error("{got} bytes of int8 KV; {values} values in blocks of {block} take {want}")]
    BadLength {
        got: usize,
        want: usize,
        values: usize,
        block: usize,
    },
    #[error("int8 block {index}: scale {scale} is not finite and non-negative")]
    BadScale { index: usize, scale: f32 },
}

/// Bytes [`encode_int8`] produces for `n` values in blocks of `block` (`block ≥ 1`): `n` bytes
/// of quants plus 4 per (possibly partial) block.
pub fn int8_encoded_len(n: usize, block: usize) -> usize {
    // Saturating: a count too large for memory must make `decode_int8` refuse the length, not
    // overflow (it promises never to panic).
    n.saturating_add(n.div_ceil(block.max(1)).saturating_mul(4))
}

/// Appends `values` to `out` as int8 blocks.
///
/// Contract: the values are cut into consecutive blocks of `block` (the last one may be
/// shorter). Each block is written as its scale `s = max|x| / 127` (f32, little-endian) followed
/// by one `i8` per value, `q = round(x · 127 / max|x|)` (ties to even; all zeros when the block
/// is), so [`decode_int8`] returns `q · s`, within `s / 2 + 2⁻²⁰ · max|x|` of `x` (half a
/// quantization step plus f32 rounding): the error is
/// relative to the largest value of the block, never to the whole tensor. Exactly
/// [`int8_encoded_len`]`(values.len(), block)` bytes are appended. Infinite or NaN input is
/// refused ([`WireError::NonFinite`], nothing appended): KV holding them is broken, and one
/// would poison its whole block.
pub fn encode_int8(values: &[f32], block: usize, out: &mut Vec<u8>) -> Result<(), WireError> {
    if block == 0 {
        return Err(WireError::ZeroBlock);
    }
    if let Some((index, &value)) = values.iter().enumerate().find(|(_, v)| !v.is_finite()) {
        return Err(WireError::NonFinite { index, value });
    }
    out.reserve(int8_encoded_len(values.len(), block));
    for chunk in values.chunks(block) {
        let amax = chunk.iter().fold(0.0f32, |m, x| m.max(x.abs()));
        let scale = amax / 127.0;
        let inv = if amax > 0.0 { 127.0 / amax } else { 0.0 };
        out.extend_from_slice(&scale.to_le_bytes());
        out.extend(
            chunk
                .iter()
                .map(|&x| ((x * inv).round_ties_even().clamp(-127.0, 127.0) as i8) as u8),
        );
    }
    Ok(())
}

/// Parses `n` values written by [`encode_int8`] with the same `block`.
///
/// Contract: `bytes` must be exactly [`int8_encoded_len`]`(n, block)` long
/// ([`WireError::BadLength`] otherwise) and every scale finite and non-negative
/// ([`WireError::BadScale`]); the result is `q · s` per value, so it is finite and bounded by
/// `128 · s` whatever the quants are. Never panics on any input.
pub fn decode_int8(bytes: &[u8], n: usize, block: usize) -> Result<Vec<f32>, WireError> {
    if block == 0 {
        return Err(WireError::ZeroBlock);
    }
    let want = int8_encoded_len(n, block);
    if bytes.len() != want {
        return Err(WireError::BadLength {
            got: bytes.len(),
            want,
            values: n,
            block,
        });
    }
    let mut out = Vec::with_capacity(n);
    let mut rest = bytes;
    let mut index = 0;
    while out.len() < n {
        let len = block.min(n - out.len());
        let (head, tail) = rest.split_at(4 + len);
        let scale = f32::from_le_bytes([head[0], head[1], head[2], head[3]]);
        if !scale.is_finite() || scale < 0.0 {
            return Err(WireError::BadScale { index, scale });
        }
        out.extend(head[4..].iter().map(|&q| f32::from(q as i8) * scale));
        rest = tail;
        index += 1;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values with a wide dynamic range.
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed | 1;
        (0..n)
            .map(|i| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                let u = (s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0;
                u * [1e-3, 1.0, 40.0][i % 3]
            })
            .collect()
    }

    /// Found by `node/tests/fuzz.rs` (`int8_wire_codec`): a value count near `usize::MAX`
    /// overflowed the length computation and panicked instead of refusing the length.
    #[test]
    fn huge_value_counts_are_refused_not_overflowed() {
        for (n, block) in [
            (usize::MAX, 32),
            (usize::MAX - 3, 32),
            (usize::MAX / 4 + 1, 1),
        ] {
            assert_eq!(int8_encoded_len(n, block), usize::MAX);
            assert!(matches!(
                decode_int8(&[0; 40], n, block),
                Err(WireError::BadLength { .. })
            ));
        }
        assert_eq!(int8_encoded_len(33, 32), 33 + 8);
    }

    #[test]
    fn round_trip_error_is_bounded_per_block_for_odd_sizes() {
        for &block in &[1, 7, INT8_BLOCK, 33] {
            for &n in &[0, 1, 7, 31, 32, 33, 100, 1000] {
                let x = values(n, (n * 31 + block) as u64);
                let mut bytes = vec![0xee];
                encode_int8(&x, block, &mut bytes).unwrap();
                assert_eq!(bytes.len(), 1 + int8_encoded_len(n, block));
                let y = decode_int8(&bytes[1..], n, block).unwrap();
                assert_eq!(y.len(), n);
                for (c, (xs, ys)) in x.chunks(block).zip(y.chunks(block)).enumerate() {
                    let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
                    let bound = amax / 127.0 / 2.0 + amax * 2f32.powi(-20);
                    for (a, b) in xs.iter().zip(ys) {
                        assert!(
                            (a - b).abs() <= bound,
                            "block {block} n {n} chunk {c}: {a} -> {b} (bound {bound})"
                        );
                    }
                    // The largest value of a block survives exactly up to rounding of 127·s.
                    if amax > 0.0 {
                        assert!(ys.iter().any(|v| (v.abs() - amax).abs() <= amax * 1e-6));
                    }
                }
            }
        }
        // All-zero blocks decode to zeros (scale 0).
        let mut z = Vec::new();
        encode_int8(&[0.0; 40], 32, &mut z).unwrap();
        assert_eq!(decode_int8(&z, 40, 32).unwrap(), vec![0.0; 40]);
    }

    #[test]
    fn non_finite_input_is_refused_and_nothing_is_written() {
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut x = values(70, 3);
            x[41] = bad;
            let mut out = vec![1, 2];
            match encode_int8(&x, INT8_BLOCK, &mut out) {
                Err(WireError::NonFinite { index: 41, .. }) => {}
                other => panic!("{bad}: {other:?}"),
            }
            assert_eq!(out, vec![1, 2]);
        }
        assert_eq!(
            encode_int8(&[1.0], 0, &mut Vec::new()),
            Err(WireError::ZeroBlock)
        );
    }

    #[test]
    fn malformed_bytes_are_errors_not_panics() {
        let mut ok = Vec::new();
        encode_int8(&values(33, 9), 32, &mut ok).unwrap();
        assert!(decode_int8(&ok, 33, 32).is_ok());
        for cut in 0..ok.len() {
            assert!(matches!(
                decode_int8(&ok[..cut], 33, 32),
                Err(WireError::BadLength { .. })
            ));
        }
        assert!(decode_int8(&ok, 34, 32).is_err());
        assert!(decode_int8(&ok, 33, 0).is_err());
        for scale in [f32::NAN, f32::INFINITY, -1.0] {
            let mut bad = ok.clone();
            bad[36..40].copy_from_slice(&scale.to_le_bytes());
            assert!(matches!(
                decode_int8(&bad, 33, 32),
                Err(WireError::BadScale { index: 1, .. })
            ));
        }
        // Arbitrary bytes of the right length decode to finite values.
        let junk: Vec<u8> = (0..int8_encoded_len(65, 32))
            .map(|i| (i * 37 % 251) as u8)
            .collect();
        if let Ok(v) = decode_int8(&junk, 65, 32) {
            assert!(v.iter().all(|x| x.is_finite()));
        }
    }

    #[test]
    fn int8_is_smaller_than_f16() {
        // 1.125 bytes per value at the default block, against 2 for f16.
        assert_eq!(int8_encoded_len(64 * 1000, INT8_BLOCK), 72_000);
        let w: KvWire = serde_json::from_str("\"int8\"").unwrap();
        assert_eq!(w, KvWire::Int8);
        assert_eq!(KvWire::default(), KvWire::F16);
    }
}
