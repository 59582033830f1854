// Matmul for a few rows (decode: m <= 8) over storage buffers (prefixed by dequant.wgsl):
// `out[r, n] = Σ_k x[r, k] · w[n, k]`. One 64-thread workgroup per output column: threads stride
// over k so a weight row is read contiguously (and dequantized) once and applied to every row of x,
// then a tree reduction per row. Decode is bound by weight bandwidth, which this reads once;
// the 64×64-tiled kernel would waste 63/64 of its work on one row.
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

const WG: u32 = 64u;
const MAX_ROWS: u32 = 8u;

var<workgroup> red: array<f32, 512>;

@compute @workgroup_size(64)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let col = wid.x + wid.y * nwg.x;
    if (col >= p.n) {
        return;
    }
    var part: array<f32, 8>;
    let wrow = col * p.k;
    for (var kk = li; kk < p.k; kk += WG) {
        let wv = wval(wrow + kk);
        for (var r = 0u; r < MAX_ROWS; r++) {
            if (r < p.m) {
                part[r] += x[r * p.k + kk] * wv;
            }
        }
    }
    for (var r = 0u; r < MAX_ROWS; r++) {
        red[r * WG + li] = part[r];
    }
    workgroupBarrier();
    for (var st = WG / 2u; st > 0u; st >>= 1u) {
        if (li < st) {
            for (var r = 0u; r < MAX_ROWS; r++) {
                red[r * WG + li] += red[r * WG + li + st];
            }
        }
        workgroupBarrier();
    }
    if (li < p.m) {
        out[li * p.ldo + p.col0 + col] = red[li * WG];
    }
}
