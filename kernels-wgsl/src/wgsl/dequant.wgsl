// Weight element decoding shared by `matmul.wgsl` and `embedding.wgsl` (prepended to them at build
// time). The weight tensor is bound as raw 32-bit words so one kernel handles every storage dtype;
// `WTYPE` is a pipeline constant, so the `switch` folds away and each dtype gets its own pipeline.
//   0 = F32, 1 = F16 (unpacked without SHADER_F16), 2 = GGUF Q4_1, 3 = GGUF Q8_0, 4 = GGUF Q5_0,
//   5 = GGUF Q4_K, 6 = GGUF Q6_K. The decoding follows llama.cpp's `dequantize_row_*`
//   (ggml-quants.c), in the same float order; `quant.rs` has the byte layouts.

override WTYPE: u32 = 0u;

@group(0) @binding(1) var<storage, read> w: array<u32>;

// Byte `a` of the weight buffer.
fn wbyte(a: u32) -> u32 {
    return (w[a >> 2u] >> ((a & 3u) * 8u)) & 0xffu;
}

// The f16 at byte `a` (2-byte aligned).
fn wf16(a: u32) -> f32 {
    return unpack2x16float((w[a >> 2u] >> ((a & 2u) * 8u)) & 0xffffu).x;
}

// Value of flat element `e` of the row-major weight tensor. Quantized rows must start on a block
// boundary (row length a multiple of 32), which the host checks.
fn wval(e: u32) -> f32 {
    switch WTYPE {
        case 0u: {
            return bitcast<f32>(w[e]);
        }
        case 1u: {
            let pair = unpack2x16float(w[e >> 1u]);
            return select(pair.x, pair.y, (e & 1u) == 1u);
        }
        case 2u: {
            // Q4_1 block: {d: f16, m: f16, qs: [u8; 16]} = 5 words; value j < 16 is the low nibble
            // of qs[j], value j >= 16 the high nibble of qs[j - 16].
            let base = (e >> 5u) * 5u;
            let j = e & 31u;
            let dm = unpack2x16float(w[base]);
            let jj = j & 15u;
            let byte = (w[base + 1u + (jj >> 2u)] >> ((jj & 3u) * 8u)) & 0xffu;
            let q = select(byte & 0xfu, byte >> 4u, j >= 16u);
            return dm.x * f32(q) + dm.y;
        }
        case 4u: {
            // Q5_0 block: {d: f16, qh: u32, qs: [u8; 16]} = 22 bytes; the low 4 bits as in Q4_1,
            // bit j of qh is the 5th bit of value j; x = d·(q − 16).
            let base = (e >> 5u) * 22u;
            let j = e & 31u;
            let qh = wbyte(base + 2u) | (wbyte(base + 3u) << 8u) | (wbyte(base + 4u) << 16u)
                | (wbyte(base + 5u) << 24u);
            let byte = wbyte(base + 6u + (j & 15u));
            let lo = select(byte & 0xfu, byte >> 4u, j >= 16u);
            return f32(i32(lo | (((qh >> j) & 1u) << 4u)) - 16) * wf16(base);
        }
        case 5u: {
            // Q4_K super-block: {d, dmin: f16, scales: [u8; 12], qs: [u8; 128]} = 144 bytes;
            // sub-block sb (32 values) has 6-bit scale/min (get_scale_min_k4); values 64c..64c+32
            // are the low nibbles of qs[32c..32c+32], the next 32 the high ones.
            let base = (e >> 8u) * 144u;
            let i = e & 255u;
            let sb = i >> 5u;
            let byte = wbyte(base + 16u + (i >> 6u) * 32u + (i & 31u));
            let q = select(byte & 0xfu, byte >> 4u, (i & 32u) != 0u);
            let s = base + 4u;
            var sc: u32;
            var m: u32;
            if (sb < 4u) {
                sc = wbyte(s + sb) & 63u;
                m = wbyte(s + sb + 4u) & 63u;
            } else {
                sc = (wbyte(s + sb + 4u) & 0xfu) | ((wbyte(s + sb - 4u) >> 6u) << 4u);
                m = (wbyte(s + sb + 4u) >> 4u) | ((wbyte(s + sb) >> 6u) << 4u);
            }
            return wf16(base) * f32(sc) * f32(q) - wf16(base + 2u) * f32(m);
        }
        case 6u: {
            // Q6_K super-block: {ql: [u8; 128], qh: [u8; 64], scales: [i8; 16], d: f16} = 210
            // bytes. In half h (128 values), quarter t (32 values), lane l: the low 4 bits are a
            // nibble of ql[64h + l + 32(t & 1)] (high nibble for t >= 2), the top 2 bits are bits
            // 2t.. of qh[32h + l]; the scale is scales[8h + l/16 + 2t]; x = d·sc·(q − 32).
            let base = (e >> 8u) * 210u;
            let i = e & 255u;
            let h = i >> 7u;
            let t = (i >> 5u) & 3u;
            let l = i & 31u;
            let qlb = wbyte(base + h * 64u + l + (t & 1u) * 32u);
            let lo = select(qlb & 0xfu, qlb >> 4u, t >= 2u);
            let hi = (wbyte(base + 128u + h * 32u + l) >> (2u * t)) & 3u;
            let sc = i32(wbyte(base + 192u + h * 8u + l / 16u + 2u * t) << 24u) >> 24;
            return wf16(base + 208u) * f32(sc) * f32(i32(lo | (hi << 4u)) - 32);
        }
        default: {
            // Q8_0 block: {d: f16, qs: [i8; 32]} = 34 bytes, so blocks are only 2-byte aligned.
            let base = (e >> 5u) * 34u;
            let j = e & 31u;
            let d = unpack2x16float((w[base >> 2u] >> ((base & 2u) * 8u)) & 0xffffu).x;
            let addr = base + 2u + j;
            let byte = (w[addr >> 2u] >> ((addr & 3u) * 8u)) & 0xffu;
            let q = i32(byte << 24u) >> 24u;
            return d * f32(q);
        }
    }
}
