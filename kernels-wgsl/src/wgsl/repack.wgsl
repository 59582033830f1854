// Repack a row-major matrix (prefixed by dequant.wgsl: the source is `w`, any WTYPE) into 2D
// textures for matmul_tex.wgsl. Lavapipe turns storage-buffer loads into per-lane scalar loops but
// texel fetches into vector gathers, which is what makes the texture matmul ~10× faster there.
// Long matrices are folded: row r lives at texture row r % rows_per_fold, column block r / rows_per_fold
// (max 2D texture size is 16384).
//   repack_f32:  one rgba32float texel per 4 values (any WTYPE, dequantized).
//   repack_q4_1: one rgba32uint texel per Q4_1 block (its 16 quant bytes) + one rgba32float texel
//                (d, m, 0, 0) per block in a second texture. WTYPE must be Q4_1.

struct Params {
    rows: u32,
    k: u32,
    rows_per_fold: u32,
    // Texels per row: ceil(k / 4) for repack_f32, k / 32 for repack_q4_1.
    row_texels: u32,
}

@group(0) @binding(2) var dst_f32: texture_storage_2d<rgba32float, write>;
@group(0) @binding(3) var<uniform> p: Params;
@group(0) @binding(4) var dst_q: texture_storage_2d<rgba32uint, write>;
@group(0) @binding(5) var dst_s: texture_storage_2d<rgba32float, write>;

fn texel_coord(row: u32, t: u32) -> vec2<u32> {
    return vec2<u32>((row / p.rows_per_fold) * p.row_texels + t, row % p.rows_per_fold);
}

@compute @workgroup_size(256)
fn repack_f32(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 256u;
    if (i >= p.rows * p.row_texels) {
        return;
    }
    let row = i / p.row_texels;
    let t = i % p.row_texels;
    var v = vec4<f32>(0.0);
    for (var c = 0u; c < 4u; c++) {
        let kk = 4u * t + c;
        if (kk < p.k) {
            v[c] = wval(row * p.k + kk);
        }
    }
    textureStore(dst_f32, texel_coord(row, t), v);
}

@compute @workgroup_size(256)
fn repack_q4_1(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 256u;
    if (i >= p.rows * p.row_texels) {
        return;
    }
    let row = i / p.row_texels;
    let t = i % p.row_texels;
    let base = i * 5u;
    let dm = unpack2x16float(w[base]);
    let at = texel_coord(row, t);
    textureStore(dst_q, at, vec4<u32>(w[base + 1u], w[base + 2u], w[base + 3u], w[base + 4u]));
    textureStore(dst_s, at, vec4<f32>(dm.x, dm.y, 0.0, 0.0));
}
