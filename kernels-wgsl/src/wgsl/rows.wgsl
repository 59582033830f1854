// Row copies through an index list, used for paged-KV writes and KV export/import.
//   GATHER = true:  dst[r, :] = src[idx[r], :]   (gather_blocks)
//   GATHER = false: dst[idx[r], :] = src[r, :]   (kv_write, scatter_blocks)
// Indices are bounds-checked on the host; a scatter skips rows whose index is 0xffffffff (the host
// uses that to apply repeated indices in order, last write wins).
//
// F16 = true: the pool side (src of a gather, dst of a scatter) holds f16 values, two per 32-bit
// word, little-endian (element 2w in the low half of word w); the other side is f32. A gather
// widens (exact); a scatter rounds to nearest even with integer code below, so every adapter
// stores the same bits as the CPU backend (WGSL leaves the rounding of `pack2x16float` to the
// implementation). A scatter then runs one invocation per word and needs an even `row` (checked
// on the host). Words are copied as u32 so f32 values, NaN payloads included, move bit for bit.

override GATHER: bool = true;
override F16: bool = false;

struct Params {
    n_idx: u32,
    row: u32,
    _a: u32,
    _b: u32,
}

@group(0) @binding(0) var<storage, read> src: array<u32>;
@group(0) @binding(1) var<storage, read> idx: array<u32>;
@group(0) @binding(2) var<storage, read_write> dst: array<u32>;
@group(0) @binding(3) var<uniform> p: Params;

// f32 bits -> f16 bits, round to nearest, ties to even; overflow to ±inf; NaN stays NaN (quiet).
// The same steps as the `half` crate's software conversion.
fn f16_bits(x: u32) -> u32 {
    let sign = (x >> 16u) & 0x8000u;
    let exp = x & 0x7f800000u;
    let man = x & 0x007fffffu;
    if (exp == 0x7f800000u) {
        return sign | 0x7c00u | select(0u, 0x0200u, man != 0u) | (man >> 13u);
    }
    let half_exp = i32(exp >> 23u) - 112;
    if (half_exp >= 31) {
        return sign | 0x7c00u;
    }
    if (half_exp <= 0) {
        if (half_exp < -10) {
            return sign;
        }
        // Subnormal: the hidden bit joins the mantissa, shifted right by 14 - half_exp (14..24).
        let m = man | 0x00800000u;
        let sh = u32(14 - half_exp);
        let round_bit = 1u << (sh - 1u);
        var hm = m >> sh;
        if ((m & round_bit) != 0u && (m & (3u * round_bit - 1u)) != 0u) {
            hm += 1u;
        }
        return sign | hm;
    }
    let h = sign | (u32(half_exp) << 10u) | (man >> 13u);
    // A carry out of the mantissa correctly bumps the exponent (up to inf).
    if ((man & 0x1000u) != 0u && (man & 0x2fffu) != 0u) {
        return h + 1u;
    }
    return h;
}

// Element j of an f16 array stored as words.
fn f16_at(j: u32) -> u32 {
    let pair = unpack2x16float(src[j >> 1u]);
    return bitcast<u32>(select(pair.x, pair.y, (j & 1u) == 1u));
}

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 256u;
    if (F16 && !GATHER) {
        // One invocation per destination word.
        let half_row = p.row / 2u;
        if (i >= p.n_idx * half_row) {
            return;
        }
        let r = i / half_row;
        let w = i % half_row;
        if (idx[r] != 0xffffffffu) {
            let s = r * p.row + 2u * w;
            dst[idx[r] * half_row + w] = f16_bits(src[s]) | (f16_bits(src[s + 1u]) << 16u);
        }
        return;
    }
    if (i >= p.n_idx * p.row) {
        return;
    }
    let r = i / p.row;
    let e = i % p.row;
    if (GATHER) {
        if (F16) {
            dst[i] = f16_at(idx[r] * p.row + e);
        } else {
            dst[i] = src[idx[r] * p.row + e];
        }
    } else if (idx[r] != 0xffffffffu) {
        dst[idx[r] * p.row + e] = src[i];
    }
}
