// Matmul `out[m, n] = Σ_k x[m, k] · w[n, k]` reading both operands from textures (see repack.wgsl),
// for adapters with subgroups of >= 8 lanes; tuned for lavapipe, where it is ~10× faster than the
// storage-buffer kernel (DESIGN.md §7).
//
// A workgroup is 8 lanes (one subgroup) and computes R rows × 8·C columns; lane l owns columns
// n0 + l + 8c. Per step of 32 k-values each lane fetches one texel (4 values) of each of the R x rows
// and the 8 lanes share them with `subgroupBroadcast`, so x is fetched once per workgroup; each lane
// fetches its own weight texels. With Q4_1 weights (`WQ`), one rgba32uint texel holds a whole
// 32-value block: the step accumulates raw nibbles and applies `d·acc + m·Σx` once per block.
// k must be a multiple of 32 (checked on the host; otherwise the storage kernel runs).
//
// Tuning on lavapipe (Mesa 22.3, AVX2, GFLOP per CPU-second): R = 8, C = 4 is best (f32 ~12.3,
// Q4_1 ~17.7); 4×4, 8×2, 4×8, 8×3 and 12×2 are 5–35% slower, 8×8 and 16×4 spill registers and run
// at half speed. Everything in the k loop is written out on purpose: with loops over private arrays
// and `subgroupShuffle` the same kernel ran ~2× slower, and unrolling the column loop alone gained
// another ~20%. Keep R and C in sync with TEX_ROWS / TEX_COLS in gpu/ops.rs.

override WQ: bool = false;

struct Params {
    m: u32,
    n: u32,
    k: u32,
    rows_per_fold: u32,
    // Texels per weight row: k / 4 for f32 weights, k / 32 for Q4_1.
    row_texels: u32,
    // The weight may be one row part of a larger one (see `GpuStorage`): its `n` rows are output
    // columns `col0..col0 + n` of an output with `ldo` columns.
    ldo: u32,
    col0: u32,
    _c: u32,
}

@group(0) @binding(0) var xt: texture_2d<f32>;
@group(0) @binding(1) var wt: texture_2d<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;
@group(0) @binding(3) var<uniform> p: Params;
@group(0) @binding(4) var wq: texture_2d<u32>;
@group(0) @binding(5) var ws: texture_2d<f32>;

const R: u32 = 8u;
const C: u32 = 4u;

// Rows actually computed per workgroup (1..=R): few-row (decode) matmuls specialise it so no work
// is spent on padding rows; the `ROWS > r` tests fold away at pipeline creation.
override ROWS: u32 = R;

// Per-lane outputs (row r, column c at r * C + c) and the per-block partial sums of the Q4_1 path.
var<private> acc: array<f32, 32>;
var<private> bacc: array<f32, 32>;

// Texel coordinates of weight row `col`, texel 0.
fn wcoord(col: u32) -> vec2<u32> {
    return vec2<u32>((col / p.rows_per_fold) * p.row_texels, col % p.rows_per_fold);
}

// The 4 nibbles of word `word` starting at bit `shift`, as floats.
fn nibbles(word: u32, shift: u32) -> vec4<f32> {
    let b = (vec4<u32>(word) >> (vec4<u32>(0u, 8u, 16u, 24u) + vec4<u32>(shift))) & vec4<u32>(15u);
    return vec4<f32>(b);
}

// Multiply-accumulate one texel step: R broadcast x texels against this lane's C weight texels
// (into `acc` directly for f32 weights, into the per-block `bacc` for Q4_1).
fn fma_step(x0: vec4<f32>, x1: vec4<f32>, x2: vec4<f32>, x3: vec4<f32>, x4: vec4<f32>, x5: vec4<f32>, x6: vec4<f32>, x7: vec4<f32>, w0: vec4<f32>, w1: vec4<f32>, w2: vec4<f32>, w3: vec4<f32>) {
    if (ROWS > 0u) {
        if (WQ) {
            bacc[0] += dot(x0, w0);
            bacc[1] += dot(x0, w1);
            bacc[2] += dot(x0, w2);
            bacc[3] += dot(x0, w3);
        } else {
            acc[0] += dot(x0, w0);
            acc[1] += dot(x0, w1);
            acc[2] += dot(x0, w2);
            acc[3] += dot(x0, w3);
        }
    }
    if (ROWS > 1u) {
        if (WQ) {
            bacc[4] += dot(x1, w0);
            bacc[5] += dot(x1, w1);
            bacc[6] += dot(x1, w2);
            bacc[7] += dot(x1, w3);
        } else {
            acc[4] += dot(x1, w0);
            acc[5] += dot(x1, w1);
            acc[6] += dot(x1, w2);
            acc[7] += dot(x1, w3);
        }
    }
    if (ROWS > 2u) {
        if (WQ) {
            bacc[8] += dot(x2, w0);
            bacc[9] += dot(x2, w1);
            bacc[10] += dot(x2, w2);
            bacc[11] += dot(x2, w3);
        } else {
            acc[8] += dot(x2, w0);
            acc[9] += dot(x2, w1);
            acc[10] += dot(x2, w2);
            acc[11] += dot(x2, w3);
        }
    }
    if (ROWS > 3u) {
        if (WQ) {
            bacc[12] += dot(x3, w0);
            bacc[13] += dot(x3, w1);
            bacc[14] += dot(x3, w2);
            bacc[15] += dot(x3, w3);
        } else {
            acc[12] += dot(x3, w0);
            acc[13] += dot(x3, w1);
            acc[14] += dot(x3, w2);
            acc[15] += dot(x3, w3);
        }
    }
    if (ROWS > 4u) {
        if (WQ) {
            bacc[16] += dot(x4, w0);
            bacc[17] += dot(x4, w1);
            bacc[18] += dot(x4, w2);
            bacc[19] += dot(x4, w3);
        } else {
            acc[16] += dot(x4, w0);
            acc[17] += dot(x4, w1);
            acc[18] += dot(x4, w2);
            acc[19] += dot(x4, w3);
        }
    }
    if (ROWS > 5u) {
        if (WQ) {
            bacc[20] += dot(x5, w0);
            bacc[21] += dot(x5, w1);
            bacc[22] += dot(x5, w2);
            bacc[23] += dot(x5, w3);
        } else {
            acc[20] += dot(x5, w0);
            acc[21] += dot(x5, w1);
            acc[22] += dot(x5, w2);
            acc[23] += dot(x5, w3);
        }
    }
    if (ROWS > 6u) {
        if (WQ) {
            bacc[24] += dot(x6, w0);
            bacc[25] += dot(x6, w1);
            bacc[26] += dot(x6, w2);
            bacc[27] += dot(x6, w3);
        } else {
            acc[24] += dot(x6, w0);
            acc[25] += dot(x6, w1);
            acc[26] += dot(x6, w2);
            acc[27] += dot(x6, w3);
        }
    }
    if (ROWS > 7u) {
        if (WQ) {
            bacc[28] += dot(x7, w0);
            bacc[29] += dot(x7, w1);
            bacc[30] += dot(x7, w2);
            bacc[31] += dot(x7, w3);
        } else {
            acc[28] += dot(x7, w0);
            acc[29] += dot(x7, w1);
            acc[30] += dot(x7, w2);
            acc[31] += dot(x7, w3);
        }
    }
}

@compute @workgroup_size(8)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(subgroup_invocation_id) lane: u32,
) {
    let m0 = wid.y * ROWS;
    let n0 = wid.x * 8u * C;
    let last = p.m - 1u;
    let wc0 = wcoord(min(n0 + lane + 0u, p.n - 1u));
    let wc1 = wcoord(min(n0 + lane + 8u, p.n - 1u));
    let wc2 = wcoord(min(n0 + lane + 16u, p.n - 1u));
    let wc3 = wcoord(min(n0 + lane + 24u, p.n - 1u));
    let row0 = min(m0 + 0u, last);
    let row1 = min(m0 + 1u, last);
    let row2 = min(m0 + 2u, last);
    let row3 = min(m0 + 3u, last);
    let row4 = min(m0 + 4u, last);
    let row5 = min(m0 + 5u, last);
    let row6 = min(m0 + 6u, last);
    let row7 = min(m0 + 7u, last);
    for (var k0 = 0u; k0 < p.k; k0 += 32u) {
        let kt = k0 / 4u;
        let a0 = textureLoad(xt, vec2<u32>(kt + lane, row0), 0);
        var a1 = vec4<f32>(0.0);
        if (ROWS > 1u) {
            a1 = textureLoad(xt, vec2<u32>(kt + lane, row1), 0);
        }
        var a2 = vec4<f32>(0.0);
        if (ROWS > 2u) {
            a2 = textureLoad(xt, vec2<u32>(kt + lane, row2), 0);
        }
        var a3 = vec4<f32>(0.0);
        if (ROWS > 3u) {
            a3 = textureLoad(xt, vec2<u32>(kt + lane, row3), 0);
        }
        var a4 = vec4<f32>(0.0);
        if (ROWS > 4u) {
            a4 = textureLoad(xt, vec2<u32>(kt + lane, row4), 0);
        }
        var a5 = vec4<f32>(0.0);
        if (ROWS > 5u) {
            a5 = textureLoad(xt, vec2<u32>(kt + lane, row5), 0);
        }
        var a6 = vec4<f32>(0.0);
        if (ROWS > 6u) {
            a6 = textureLoad(xt, vec2<u32>(kt + lane, row6), 0);
        }
        var a7 = vec4<f32>(0.0);
        if (ROWS > 7u) {
            a7 = textureLoad(xt, vec2<u32>(kt + lane, row7), 0);
        }
        if (WQ) {
            let kb = k0 / 32u;
            let q0 = textureLoad(wq, vec2<u32>(wc0.x + kb, wc0.y), 0);
            let q1 = textureLoad(wq, vec2<u32>(wc1.x + kb, wc1.y), 0);
            let q2 = textureLoad(wq, vec2<u32>(wc2.x + kb, wc2.y), 0);
            let q3 = textureLoad(wq, vec2<u32>(wc3.x + kb, wc3.y), 0);
            let sc0 = textureLoad(ws, vec2<u32>(wc0.x + kb, wc0.y), 0).xy;
            let sc1 = textureLoad(ws, vec2<u32>(wc1.x + kb, wc1.y), 0).xy;
            let sc2 = textureLoad(ws, vec2<u32>(wc2.x + kb, wc2.y), 0).xy;
            let sc3 = textureLoad(ws, vec2<u32>(wc3.x + kb, wc3.y), 0).xy;
            bacc = array<f32, 32>();
            fma_step(subgroupBroadcast(a0, 0u), subgroupBroadcast(a1, 0u), subgroupBroadcast(a2, 0u), subgroupBroadcast(a3, 0u), subgroupBroadcast(a4, 0u), subgroupBroadcast(a5, 0u), subgroupBroadcast(a6, 0u), subgroupBroadcast(a7, 0u), nibbles(q0[0], 0u), nibbles(q1[0], 0u), nibbles(q2[0], 0u), nibbles(q3[0], 0u));
            fma_step(subgroupBroadcast(a0, 1u), subgroupBroadcast(a1, 1u), subgroupBroadcast(a2, 1u), subgroupBroadcast(a3, 1u), subgroupBroadcast(a4, 1u), subgroupBroadcast(a5, 1u), subgroupBroadcast(a6, 1u), subgroupBroadcast(a7, 1u), nibbles(q0[1], 0u), nibbles(q1[1], 0u), nibbles(q2[1], 0u), nibbles(q3[1], 0u));
            fma_step(subgroupBroadcast(a0, 2u), subgroupBroadcast(a1, 2u), subgroupBroadcast(a2, 2u), subgroupBroadcast(a3, 2u), subgroupBroadcast(a4, 2u), subgroupBroadcast(a5, 2u), subgroupBroadcast(a6, 2u), subgroupBroadcast(a7, 2u), nibbles(q0[2], 0u), nibbles(q1[2], 0u), nibbles(q2[2], 0u), nibbles(q3[2], 0u));
            fma_step(subgroupBroadcast(a0, 3u), subgroupBroadcast(a1, 3u), subgroupBroadcast(a2, 3u), subgroupBroadcast(a3, 3u), subgroupBroadcast(a4, 3u), subgroupBroadcast(a5, 3u), subgroupBroadcast(a6, 3u), subgroupBroadcast(a7, 3u), nibbles(q0[3], 0u), nibbles(q1[3], 0u), nibbles(q2[3], 0u), nibbles(q3[3], 0u));
            fma_step(subgroupBroadcast(a0, 4u), subgroupBroadcast(a1, 4u), subgroupBroadcast(a2, 4u), subgroupBroadcast(a3, 4u), subgroupBroadcast(a4, 4u), subgroupBroadcast(a5, 4u), subgroupBroadcast(a6, 4u), subgroupBroadcast(a7, 4u), nibbles(q0[0], 4u), nibbles(q1[0], 4u), nibbles(q2[0], 4u), nibbles(q3[0], 4u));
            fma_step(subgroupBroadcast(a0, 5u), subgroupBroadcast(a1, 5u), subgroupBroadcast(a2, 5u), subgroupBroadcast(a3, 5u), subgroupBroadcast(a4, 5u), subgroupBroadcast(a5, 5u), subgroupBroadcast(a6, 5u), subgroupBroadcast(a7, 5u), nibbles(q0[1], 4u), nibbles(q1[1], 4u), nibbles(q2[1], 4u), nibbles(q3[1], 4u));
            fma_step(subgroupBroadcast(a0, 6u), subgroupBroadcast(a1, 6u), subgroupBroadcast(a2, 6u), subgroupBroadcast(a3, 6u), subgroupBroadcast(a4, 6u), subgroupBroadcast(a5, 6u), subgroupBroadcast(a6, 6u), subgroupBroadcast(a7, 6u), nibbles(q0[2], 4u), nibbles(q1[2], 4u), nibbles(q2[2], 4u), nibbles(q3[2], 4u));
            fma_step(subgroupBroadcast(a0, 7u), subgroupBroadcast(a1, 7u), subgroupBroadcast(a2, 7u), subgroupBroadcast(a3, 7u), subgroupBroadcast(a4, 7u), subgroupBroadcast(a5, 7u), subgroupBroadcast(a6, 7u), subgroupBroadcast(a7, 7u), nibbles(q0[3], 4u), nibbles(q1[3], 4u), nibbles(q2[3], 4u), nibbles(q3[3], 4u));
            // Σx over this 32-value slice, per row, shared by all lanes.
            let one = vec4<f32>(1.0);
            let s0 = subgroupAdd(dot(a0, one));
            let s1 = subgroupAdd(dot(a1, one));
            let s2 = subgroupAdd(dot(a2, one));
            let s3 = subgroupAdd(dot(a3, one));
            let s4 = subgroupAdd(dot(a4, one));
            let s5 = subgroupAdd(dot(a5, one));
            let s6 = subgroupAdd(dot(a6, one));
            let s7 = subgroupAdd(dot(a7, one));
            if (ROWS > 0u) {
                acc[0] += sc0.x * bacc[0] + sc0.y * s0;
                acc[1] += sc1.x * bacc[1] + sc1.y * s0;
                acc[2] += sc2.x * bacc[2] + sc2.y * s0;
                acc[3] += sc3.x * bacc[3] + sc3.y * s0;
            }
            if (ROWS > 1u) {
                acc[4] += sc0.x * bacc[4] + sc0.y * s1;
                acc[5] += sc1.x * bacc[5] + sc1.y * s1;
                acc[6] += sc2.x * bacc[6] + sc2.y * s1;
                acc[7] += sc3.x * bacc[7] + sc3.y * s1;
            }
            if (ROWS > 2u) {
                acc[8] += sc0.x * bacc[8] + sc0.y * s2;
                acc[9] += sc1.x * bacc[9] + sc1.y * s2;
                acc[10] += sc2.x * bacc[10] + sc2.y * s2;
                acc[11] += sc3.x * bacc[11] + sc3.y * s2;
            }
            if (ROWS > 3u) {
                acc[12] += sc0.x * bacc[12] + sc0.y * s3;
                acc[13] += sc1.x * bacc[13] + sc1.y * s3;
                acc[14] += sc2.x * bacc[14] + sc2.y * s3;
                acc[15] += sc3.x * bacc[15] + sc3.y * s3;
            }
            if (ROWS > 4u) {
                acc[16] += sc0.x * bacc[16] + sc0.y * s4;
                acc[17] += sc1.x * bacc[17] + sc1.y * s4;
                acc[18] += sc2.x * bacc[18] + sc2.y * s4;
                acc[19] += sc3.x * bacc[19] + sc3.y * s4;
            }
            if (ROWS > 5u) {
                acc[20] += sc0.x * bacc[20] + sc0.y * s5;
                acc[21] += sc1.x * bacc[21] + sc1.y * s5;
                acc[22] += sc2.x * bacc[22] + sc2.y * s5;
                acc[23] += sc3.x * bacc[23] + sc3.y * s5;
            }
            if (ROWS > 6u) {
                acc[24] += sc0.x * bacc[24] + sc0.y * s6;
                acc[25] += sc1.x * bacc[25] + sc1.y * s6;
                acc[26] += sc2.x * bacc[26] + sc2.y * s6;
                acc[27] += sc3.x * bacc[27] + sc3.y * s6;
            }
            if (ROWS > 7u) {
                acc[28] += sc0.x * bacc[28] + sc0.y * s7;
                acc[29] += sc1.x * bacc[29] + sc1.y * s7;
                acc[30] += sc2.x * bacc[30] + sc2.y * s7;
                acc[31] += sc3.x * bacc[31] + sc3.y * s7;
            }
        } else {
            fma_step(subgroupBroadcast(a0, 0u), subgroupBroadcast(a1, 0u), subgroupBroadcast(a2, 0u), subgroupBroadcast(a3, 0u), subgroupBroadcast(a4, 0u), subgroupBroadcast(a5, 0u), subgroupBroadcast(a6, 0u), subgroupBroadcast(a7, 0u), textureLoad(wt, vec2<u32>(wc0.x + kt + 0u, wc0.y), 0), textureLoad(wt, vec2<u32>(wc1.x + kt + 0u, wc1.y), 0), textureLoad(wt, vec2<u32>(wc2.x + kt + 0u, wc2.y), 0), textureLoad(wt, vec2<u32>(wc3.x + kt + 0u, wc3.y), 0));
            fma_step(subgroupBroadcast(a0, 1u), subgroupBroadcast(a1, 1u), subgroupBroadcast(a2, 1u), subgroupBroadcast(a3, 1u), subgroupBroadcast(a4, 1u), subgroupBroadcast(a5, 1u), subgroupBroadcast(a6, 1u), subgroupBroadcast(a7, 1u), textureLoad(wt, vec2<u32>(wc0.x + kt + 1u, wc0.y), 0), textureLoad(wt, vec2<u32>(wc1.x + kt + 1u, wc1.y), 0), textureLoad(wt, vec2<u32>(wc2.x + kt + 1u, wc2.y), 0), textureLoad(wt, vec2<u32>(wc3.x + kt + 1u, wc3.y), 0));
            fma_step(subgroupBroadcast(a0, 2u), subgroupBroadcast(a1, 2u), subgroupBroadcast(a2, 2u), subgroupBroadcast(a3, 2u), subgroupBroadcast(a4, 2u), subgroupBroadcast(a5, 2u), subgroupBroadcast(a6, 2u), subgroupBroadcast(a7, 2u), textureLoad(wt, vec2<u32>(wc0.x + kt + 2u, wc0.y), 0), textureLoad(wt, vec2<u32>(wc1.x + kt + 2u, wc1.y), 0), textureLoad(wt, vec2<u32>(wc2.x + kt + 2u, wc2.y), 0), textureLoad(wt, vec2<u32>(wc3.x + kt + 2u, wc3.y), 0));
            fma_step(subgroupBroadcast(a0, 3u), subgroupBroadcast(a1, 3u), subgroupBroadcast(a2, 3u), subgroupBroadcast(a3, 3u), subgroupBroadcast(a4, 3u), subgroupBroadcast(a5, 3u), subgroupBroadcast(a6, 3u), subgroupBroadcast(a7, 3u), textureLoad(wt, vec2<u32>(wc0.x + kt + 3u, wc0.y), 0), textureLoad(wt, vec2<u32>(wc1.x + kt + 3u, wc1.y), 0), textureLoad(wt, vec2<u32>(wc2.x + kt + 3u, wc2.y), 0), textureLoad(wt, vec2<u32>(wc3.x + kt + 3u, wc3.y), 0));
            fma_step(subgroupBroadcast(a0, 4u), subgroupBroadcast(a1, 4u), subgroupBroadcast(a2, 4u), subgroupBroadcast(a3, 4u), subgroupBroadcast(a4, 4u), subgroupBroadcast(a5, 4u), subgroupBroadcast(a6, 4u), subgroupBroadcast(a7, 4u), textureLoad(wt, vec2<u32>(wc0.x + kt + 4u, wc0.y), 0), textureLoad(wt, vec2<u32>(wc1.x + kt + 4u, wc1.y), 0), textureLoad(wt, vec2<u32>(wc2.x + kt + 4u, wc2.y), 0), textureLoad(wt, vec2<u32>(wc3.x + kt + 4u, wc3.y), 0));
            fma_step(subgroupBroadcast(a0, 5u), subgroupBroadcast(a1, 5u), subgroupBroadcast(a2, 5u), subgroupBroadcast(a3, 5u), subgroupBroadcast(a4, 5u), subgroupBroadcast(a5, 5u), subgroupBroadcast(a6, 5u), subgroupBroadcast(a7, 5u), textureLoad(wt, vec2<u32>(wc0.x + kt + 5u, wc0.y), 0), textureLoad(wt, vec2<u32>(wc1.x + kt + 5u, wc1.y), 0), textureLoad(wt, vec2<u32>(wc2.x + kt + 5u, wc2.y), 0), textureLoad(wt, vec2<u32>(wc3.x + kt + 5u, wc3.y), 0));
            fma_step(subgroupBroadcast(a0, 6u), subgroupBroadcast(a1, 6u), subgroupBroadcast(a2, 6u), subgroupBroadcast(a3, 6u), subgroupBroadcast(a4, 6u), subgroupBroadcast(a5, 6u), subgroupBroadcast(a6, 6u), subgroupBroadcast(a7, 6u), textureLoad(wt, vec2<u32>(wc0.x + kt + 6u, wc0.y), 0), textureLoad(wt, vec2<u32>(wc1.x + kt + 6u, wc1.y), 0), textureLoad(wt, vec2<u32>(wc2.x + kt + 6u, wc2.y), 0), textureLoad(wt, vec2<u32>(wc3.x + kt + 6u, wc3.y), 0));
            fma_step(subgroupBroadcast(a0, 7u), subgroupBroadcast(a1, 7u), subgroupBroadcast(a2, 7u), subgroupBroadcast(a3, 7u), subgroupBroadcast(a4, 7u), subgroupBroadcast(a5, 7u), subgroupBroadcast(a6, 7u), subgroupBroadcast(a7, 7u), textureLoad(wt, vec2<u32>(wc0.x + kt + 7u, wc0.y), 0), textureLoad(wt, vec2<u32>(wc1.x + kt + 7u, wc1.y), 0), textureLoad(wt, vec2<u32>(wc2.x + kt + 7u, wc2.y), 0), textureLoad(wt, vec2<u32>(wc3.x + kt + 7u, wc3.y), 0));
        }
    }
    for (var r = 0u; r < ROWS; r++) {
        let row = m0 + r;
        for (var c = 0u; c < C; c++) {
            let col = n0 + lane + 8u * c;
            if (row < p.m && col < p.n) {
                out[row * p.ldo + p.col0 + col] = acc[r * C + c];
            }
        }
    }
}
