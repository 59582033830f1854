// Weight element decoding shared by `matmul.wgsl` and `embedding.wgsl` (prepended to them at build
// time). The weight tensor is bound as raw 32-bit words so one kernel handles every storage dtype;
// `WTYPE` is a pipeline constant, so the `switch` folds away and each dtype gets its own pipeline.
//   0 = F32, 1 = F16 (unpacked without SHADER_F16), 2 = GGUF Q4_1, 3 = GGUF Q8_0.

override WTYPE: u32 = 0u;

@group(0) @binding(1) var<storage, read> w: array<u32>;

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
