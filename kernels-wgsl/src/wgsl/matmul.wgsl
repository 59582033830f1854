// Portable tiled matmul `out[m, n] = Σ_k x[m, k] · w[n, k]` over storage buffers (prefixed by
// dequant.wgsl, so `w` may be F32/F16/Q4_1/Q8_0). A 16×16 workgroup computes a 64×64 output tile,
// 4×4 per thread, staging 64×16 slices of x and (dequantized) w in workgroup memory.
// This is the fallback path: on lavapipe the texture kernel in matmul_tex.wgsl is ~10× faster.
// `w` may be one row part of a larger weight (see `GpuStorage`): its `n` rows are output columns
// `col0..col0 + n` of an output with `ldo` columns.

struct Params {
    m: u32,
    n: u32,
    k: u32,
    ldo: u32,
    col0: u32,
    _a: u32,
    _b: u32,
    _c: u32,
}

@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;
@group(0) @binding(3) var<uniform> p: Params;

const TM: u32 = 64u;
const TN: u32 = 64u;
const TK: u32 = 16u;

var<workgroup> xs: array<f32, 1024>;
var<workgroup> ws: array<f32, 1024>;

@compute @workgroup_size(16, 16)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let row0 = wid.y * TM;
    let col0 = wid.x * TN;
    var acc: array<f32, 16>;
    for (var k0 = 0u; k0 < p.k; k0 += TK) {
        for (var r = 0u; r < 4u; r++) {
            let idx = li + r * 256u;
            let tr = idx / TK;
            let gk = k0 + idx % TK;
            let gr = row0 + tr;
            var xv = 0.0;
            if (gr < p.m && gk < p.k) {
                xv = x[gr * p.k + gk];
            }
            xs[idx] = xv;
            let gn = col0 + tr;
            var wv = 0.0;
            if (gn < p.n && gk < p.k) {
                wv = wval(gn * p.k + gk);
            }
            ws[idx] = wv;
        }
        workgroupBarrier();
        for (var kk = 0u; kk < TK; kk++) {
            var a: array<f32, 4>;
            var b: array<f32, 4>;
            for (var i = 0u; i < 4u; i++) {
                a[i] = xs[(lid.y * 4u + i) * TK + kk];
                b[i] = ws[(lid.x * 4u + i) * TK + kk];
            }
            for (var i = 0u; i < 4u; i++) {
                for (var j = 0u; j < 4u; j++) {
                    acc[i * 4u + j] += a[i] * b[j];
                }
            }
        }
        workgroupBarrier();
    }
    for (var i = 0u; i < 4u; i++) {
        let gr = row0 + lid.y * 4u + i;
        for (var j = 0u; j < 4u; j++) {
            let gn = col0 + lid.x * 4u + j;
            if (gr < p.m && gn < p.n) {
                out[gr * p.ldo + p.col0 + gn] = acc[i * 4u + j];
            }
        }
    }
}
