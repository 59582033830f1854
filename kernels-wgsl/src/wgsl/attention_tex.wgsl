// Causal flash attention over a paged KV pool for adapters with subgroups of >= 8 lanes, reading
// Q, K and V through textures: the route matmul_tex.wgsl took on lavapipe, where storage-buffer
// and workgroup-memory loads are per-lane scalar loops but texel fetches are vector gathers
// (DESIGN.md §7). Two entry points:
//
// * `gather` copies "lines" (one head of one token: head_dim values, zero-padded to whole texels)
//   into an rgba32float texture: the new tokens' query heads (`PAGED` off), or the keys or values
//   the call needs from the paged pool (`PAGED`: `slots[token]` is the pool slot, `KV_F16` for f16
//   pools), each sequence's tokens contiguous. Line `L` lives in texture row `L >> lpr_shift` at
//   texel column `(L & (2^lpr_shift - 1)) · head_texels` (a power of two per row: no division).
// * `main`: one workgroup is one subgroup of 8 lanes and computes up to `R` attention rows
//   that share a KV head: item `i` of a sequence is its new token `i / group`, query head
//   `kvh · group + i % group`, so a tile is all GQA heads of one or more consecutive tokens of
//   one sequence (tiles never cross sequences; `tiles` is built on the host). Keys are visited in
//   tiles of `8·C`: lane l owns keys `t0 + l + 8c`. Scores: per step of 8 head texels each lane
//   fetches one texel of each query row, the 8 lanes share them with `subgroupBroadcast`, and
//   each lane fetches its own keys' texels, so one K texel serves all R rows. Online softmax per
//   row (subgroupMax over the tile; each lane keeps a partial row sum, added up at the end).
//   Output: lane l owns output texels `l + 8k` (k < OC); for each key the probabilities of the R rows
//   are broadcast from the lane that owns the key and each V texel serves all R rows.
//
// The host picks R = 4 (fewer only for sequences with fewer rows), C = 2 and OC =
// ceil(head_texels / 8) (<= 8: head_dim <= 256). Nothing in the key loop loops over a row, key or
// output texel: every private array is indexed by constants (helpers take the index as a
// parameter and are called with literals), so lavapipe can keep them in registers; with loops the
// same kernel ran at 2/3 of the speed (as matmul_tex.wgsl found). `subgroupBroadcast` takes a
// constant lane, so steps over lanes are written out too.
//
// Measured on lavapipe (GFLOP per CPU-second, same run, BENCHMARKS.md): prefill 6.2 (SmolLM2,
// head_dim 64) and 8.1 (Gemma 3, 256), 32× and 18× attention.wgsl. Decode is bound by the gather
// (every visible key and value copied into textures on every call): 0.6–0.9, 2–3.5×.

override KV_F16: bool = false;
override PAGED: bool = true;
// Attention rows per workgroup (1..=4), keys per lane per tile (1..=2), output texels per lane
// (1..=8).
override R: u32 = 4u;
override C: u32 = 2u;
override OC: u32 = 2u;

struct Params {
    n_heads: u32,
    n_kv: u32,
    group: u32,
    head_dim: u32,
    head_texels: u32,
    lpr_shift: u32,
    // 0 = no window; otherwise a query at position p sees keys at positions > p - window.
    window: u32,
    scale: f32,
    tiles: u32,
    _a: u32,
    _b: u32,
    _c: u32,
}

struct GatherParams {
    lines: u32,
    // Heads per token in the source (n_kv_heads for pools, n_heads for q).
    heads: u32,
    head_dim: u32,
    head_texels: u32,
    lpr_shift: u32,
    _a: u32,
    _b: u32,
    _c: u32,
}

@group(0) @binding(0) var qt: texture_2d<f32>;
@group(0) @binding(1) var kt: texture_2d<f32>;
@group(0) @binding(2) var vt: texture_2d<f32>;
// Per tile two words-quads: (first q row of the sequence, first item, items, n_past) and
// (first gathered token of the sequence, its position, 0, 0).
@group(0) @binding(3) var<storage, read> tiles: array<vec4<u32>>;
@group(0) @binding(5) var<storage, read_write> out: array<f32>;
@group(0) @binding(6) var<uniform> p: Params;

@group(0) @binding(7) var<uniform> gp: GatherParams;
@group(0) @binding(8) var<storage, read> src: array<u32>;
@group(0) @binding(9) var<storage, read> slots: array<u32>;
@group(0) @binding(10) var dst: texture_storage_2d<rgba32float, write>;

const NEG: f32 = -1.0e30;

fn line_coord(line: u32, texel: u32, shift: u32, texels: u32) -> vec2<u32> {
    return vec2<u32>((line & ((1u << shift) - 1u)) * texels + texel, line >> shift);
}

// One line per invocation, its texels in a loop: the line's source needs a division by `heads`,
// which lavapipe runs lane by lane, so it is done once per line, not once per texel.
@compute @workgroup_size(64)
fn gather(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let line = gid.x + gid.y * nwg.x * 64u;
    if (line >= gp.lines) {
        return;
    }
    var src_line = line;
    if (PAGED) {
        src_line = slots[line / gp.heads] * gp.heads + line % gp.heads;
    }
    let base = src_line * gp.head_dim;
    let at = line_coord(line, 0u, gp.lpr_shift, gp.head_texels);
    for (var j = 0u; j < gp.head_texels; j++) {
        var v = vec4<f32>(0.0);
        for (var c = 0u; c < 4u; c++) {
            let d = 4u * j + c;
            if (d < gp.head_dim) {
                let e = base + d;
                if (KV_F16) {
                    let pair = unpack2x16float(src[e >> 1u]);
                    v[c] = select(pair.x, pair.y, (e & 1u) == 1u);
                } else {
                    v[c] = bitcast<f32>(src[e]);
                }
            }
        }
        textureStore(dst, at + vec2<u32>(j, 0u), v);
    }
}

var<private> lane_id: u32;
// Texel 0 of this lane's keys (C of them) in the K/V textures.
var<private> kc: array<vec2<u32>, 2>;
// Scores, then probabilities, of row r and this lane's key c at 2r + c.
var<private> s: array<f32, 8>;
// Output accumulators of row r, texel lane + 8k at 8r + k.
var<private> o: array<vec4<f32>, 32>;
// Per row: position, q/out line, q texel 0, running max, this lane's part of the running sum.
var<private> pos: array<u32, 4>;
var<private> line: array<u32, 4>;
var<private> qc: array<vec2<u32>, 4>;
var<private> m: array<f32, 4>;
var<private> l: array<f32, 4>;

// Row r of the tile: item i0 + r (rows past `cnt` repeat the last one: computed, never written).
fn init_row(r: u32, kvh: u32, row0: u32, i0: u32, cnt: u32, n_past: u32) {
    let it = i0 + min(r, cnt - 1u);
    let j = it / p.group;
    pos[r] = n_past + j;
    line[r] = (row0 + j) * p.n_heads + kvh * p.group + it % p.group;
    qc[r] = line_coord(line[r], 0u, p.lpr_shift, p.head_texels);
    m[r] = NEG;
    l[r] = 0.0;
}

// Head texel `jt` of key c against the broadcast query texels q0..q3 of the rows.
fn score_key(c: u32, jt: u32, q0: vec4<f32>, q1: vec4<f32>, q2: vec4<f32>, q3: vec4<f32>) {
    let kv = textureLoad(kt, kc[c] + vec2<u32>(jt, 0u), 0);
    s[c] += dot(q0, kv);
    if (R > 1u) {
        s[2u + c] += dot(q1, kv);
    }
    if (R > 2u) {
        s[4u + c] += dot(q2, kv);
    }
    if (R > 3u) {
        s[6u + c] += dot(q3, kv);
    }
}

fn score_step(jt: u32, q0: vec4<f32>, q1: vec4<f32>, q2: vec4<f32>, q3: vec4<f32>) {
    score_key(0u, jt, q0, q1, q2, q3);
    if (C > 1u) {
        score_key(1u, jt, q0, q1, q2, q3);
    }
}

// One step of 8 head texels: lane l holds texel j0 + l of every row; step i uses lane i's.
fn score_texels(j0: u32) {
    let ht = p.head_texels;
    let inb = j0 + lane_id < ht;
    let zero = vec4<f32>(0.0);
    let a0 = select(zero, textureLoad(qt, qc[0] + vec2<u32>(j0 + lane_id, 0u), 0), inb);
    var a1 = zero;
    var a2 = zero;
    var a3 = zero;
    if (R > 1u) {
        a1 = select(zero, textureLoad(qt, qc[1] + vec2<u32>(j0 + lane_id, 0u), 0), inb);
    }
    if (R > 2u) {
        a2 = select(zero, textureLoad(qt, qc[2] + vec2<u32>(j0 + lane_id, 0u), 0), inb);
    }
    if (R > 3u) {
        a3 = select(zero, textureLoad(qt, qc[3] + vec2<u32>(j0 + lane_id, 0u), 0), inb);
    }
    score_step(j0 + 0u, subgroupBroadcast(a0, 0u), subgroupBroadcast(a1, 0u), subgroupBroadcast(a2, 0u), subgroupBroadcast(a3, 0u));
    if (j0 + 1u < ht) {
        score_step(j0 + 1u, subgroupBroadcast(a0, 1u), subgroupBroadcast(a1, 1u), subgroupBroadcast(a2, 1u), subgroupBroadcast(a3, 1u));
    }
    if (j0 + 2u < ht) {
        score_step(j0 + 2u, subgroupBroadcast(a0, 2u), subgroupBroadcast(a1, 2u), subgroupBroadcast(a2, 2u), subgroupBroadcast(a3, 2u));
    }
    if (j0 + 3u < ht) {
        score_step(j0 + 3u, subgroupBroadcast(a0, 3u), subgroupBroadcast(a1, 3u), subgroupBroadcast(a2, 3u), subgroupBroadcast(a3, 3u));
    }
    if (j0 + 4u < ht) {
        score_step(j0 + 4u, subgroupBroadcast(a0, 4u), subgroupBroadcast(a1, 4u), subgroupBroadcast(a2, 4u), subgroupBroadcast(a3, 4u));
    }
    if (j0 + 5u < ht) {
        score_step(j0 + 5u, subgroupBroadcast(a0, 5u), subgroupBroadcast(a1, 5u), subgroupBroadcast(a2, 5u), subgroupBroadcast(a3, 5u));
    }
    if (j0 + 6u < ht) {
        score_step(j0 + 6u, subgroupBroadcast(a0, 6u), subgroupBroadcast(a1, 6u), subgroupBroadcast(a2, 6u), subgroupBroadcast(a3, 6u));
    }
    if (j0 + 7u < ht) {
        score_step(j0 + 7u, subgroupBroadcast(a0, 7u), subgroupBroadcast(a1, 7u), subgroupBroadcast(a2, 7u), subgroupBroadcast(a3, 7u));
    }
}

// Score of row r, key c at position t: scaled, or NEG when the row does not see the key.
fn mask(r: u32, c: u32, t: u32) -> f32 {
    var first = 0u;
    if (p.window > 0u && pos[r] + 1u > p.window) {
        first = pos[r] + 1u - p.window;
    }
    return select(NEG, s[2u * r + c] * p.scale, t >= first && t <= pos[r]);
}

fn rescale(i: u32, alpha: f32) {
    o[i] *= alpha;
}

// Online softmax of row r over the tile at t0: new running max, rescaled sum and accumulators,
// scores turned into probabilities.
fn row_update(r: u32, t0: u32) {
    let s0 = mask(r, 0u, t0 + lane_id);
    var s1 = NEG;
    if (C > 1u) {
        s1 = mask(r, 1u, t0 + lane_id + 8u);
    }
    let m_new = max(m[r], subgroupMax(max(s0, s1)));
    let alpha = exp(m[r] - m_new);
    m[r] = m_new;
    // A masked key has probability 0 even while no key of the row was seen (m_new = NEG).
    let p0 = select(0.0, exp(s0 - m_new), s0 > 0.5 * NEG);
    let p1 = select(0.0, exp(s1 - m_new), s1 > 0.5 * NEG);
    s[2u * r] = p0;
    s[2u * r + 1u] = p1;
    l[r] = l[r] * alpha + p0 + p1;
    let b = 8u * r;
    rescale(b, alpha);
    if (OC > 1u) {
        rescale(b + 1u, alpha);
    }
    if (OC > 2u) {
        rescale(b + 2u, alpha);
    }
    if (OC > 3u) {
        rescale(b + 3u, alpha);
    }
    if (OC > 4u) {
        rescale(b + 4u, alpha);
    }
    if (OC > 5u) {
        rescale(b + 5u, alpha);
    }
    if (OC > 6u) {
        rescale(b + 6u, alpha);
    }
    if (OC > 7u) {
        rescale(b + 7u, alpha);
    }
}

// Output texel lane + 8k of every row += its probability (pr) × the key's V texel.
fn pv_texel(k: u32, vc: vec2<u32>, pr: vec4<f32>) {
    let v = textureLoad(vt, vc + vec2<u32>(lane_id + 8u * k, 0u), 0);
    o[k] += pr.x * v;
    if (R > 1u) {
        o[8u + k] += pr.y * v;
    }
    if (R > 2u) {
        o[16u + k] += pr.z * v;
    }
    if (R > 3u) {
        o[24u + k] += pr.w * v;
    }
}

// One key (texel 0 at `vc`) with the probabilities `pr` of rows 0..4.
fn pv_step(vc: vec2<u32>, pr: vec4<f32>) {
    pv_texel(0u, vc, pr);
    if (OC > 1u) {
        pv_texel(1u, vc, pr);
    }
    if (OC > 2u) {
        pv_texel(2u, vc, pr);
    }
    if (OC > 3u) {
        pv_texel(3u, vc, pr);
    }
    if (OC > 4u) {
        pv_texel(4u, vc, pr);
    }
    if (OC > 5u) {
        pv_texel(5u, vc, pr);
    }
    if (OC > 6u) {
        pv_texel(6u, vc, pr);
    }
    if (OC > 7u) {
        pv_texel(7u, vc, pr);
    }
}

// The 8 keys of lane-key c (positions t0 + 8c + i, i = the owning lane), in order.
fn pv_keys(c: u32, t0: u32, kend: u32) {
    let tc = t0 + 8u * c;
    let vc = kc[c];
    let pr = vec4<f32>(s[c], s[2u + c], s[4u + c], s[6u + c]);
    pv_step(subgroupBroadcast(vc, 0u), subgroupBroadcast(pr, 0u));
    if (tc + 1u < kend) {
        pv_step(subgroupBroadcast(vc, 1u), subgroupBroadcast(pr, 1u));
    }
    if (tc + 2u < kend) {
        pv_step(subgroupBroadcast(vc, 2u), subgroupBroadcast(pr, 2u));
    }
    if (tc + 3u < kend) {
        pv_step(subgroupBroadcast(vc, 3u), subgroupBroadcast(pr, 3u));
    }
    if (tc + 4u < kend) {
        pv_step(subgroupBroadcast(vc, 4u), subgroupBroadcast(pr, 4u));
    }
    if (tc + 5u < kend) {
        pv_step(subgroupBroadcast(vc, 5u), subgroupBroadcast(pr, 5u));
    }
    if (tc + 6u < kend) {
        pv_step(subgroupBroadcast(vc, 6u), subgroupBroadcast(pr, 6u));
    }
    if (tc + 7u < kend) {
        pv_step(subgroupBroadcast(vc, 7u), subgroupBroadcast(pr, 7u));
    }
}

fn write_texel(r: u32, k: u32, inv: f32) {
    let jt = lane_id + 8u * k;
    let v = o[8u * r + k] * inv;
    let ob = line[r] * p.head_dim + 4u * jt;
    for (var e = 0u; e < 4u; e++) {
        if (jt < p.head_texels && 4u * jt + e < p.head_dim) {
            out[ob + e] = v[e];
        }
    }
}

fn write_row(r: u32, cnt: u32) {
    let inv = 1.0 / subgroupAdd(l[r]);
    if (r >= cnt) {
        return;
    }
    write_texel(r, 0u, inv);
    if (OC > 1u) {
        write_texel(r, 1u, inv);
    }
    if (OC > 2u) {
        write_texel(r, 2u, inv);
    }
    if (OC > 3u) {
        write_texel(r, 3u, inv);
    }
    if (OC > 4u) {
        write_texel(r, 4u, inv);
    }
    if (OC > 5u) {
        write_texel(r, 5u, inv);
    }
    if (OC > 6u) {
        write_texel(r, 6u, inv);
    }
    if (OC > 7u) {
        write_texel(r, 7u, inv);
    }
}

@compute @workgroup_size(8)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(subgroup_invocation_id) lane: u32) {
    lane_id = lane;
    let kvh = wid.x;
    let tile = wid.y + wid.z * 65535u;
    if (tile >= p.tiles) {
        return;
    }
    let ta = tiles[2u * tile];
    let tb = tiles[2u * tile + 1u];
    let cnt = ta.z;
    let kv_off = tb.x;
    let kmin = tb.y;
    init_row(0u, kvh, ta.x, ta.y, cnt, ta.w);
    if (R > 1u) {
        init_row(1u, kvh, ta.x, ta.y, cnt, ta.w);
    }
    if (R > 2u) {
        init_row(2u, kvh, ta.x, ta.y, cnt, ta.w);
    }
    if (R > 3u) {
        init_row(3u, kvh, ta.x, ta.y, cnt, ta.w);
    }
    o = array<vec4<f32>, 32>();
    let kend = pos[R - 1u] + 1u;
    var kstart = 0u;
    if (p.window > 0u && pos[0] + 1u > p.window) {
        kstart = pos[0] + 1u - p.window;
    }

    for (var t0 = kstart; t0 < kend; t0 += 8u * C) {
        let key0 = min(t0 + lane, kend - 1u);
        kc[0] = line_coord((kv_off + key0 - kmin) * p.n_kv + kvh, 0u, p.lpr_shift, p.head_texels);
        if (C > 1u) {
            let key1 = min(t0 + lane + 8u, kend - 1u);
            kc[1] = line_coord((kv_off + key1 - kmin) * p.n_kv + kvh, 0u, p.lpr_shift, p.head_texels);
        }
        s = array<f32, 8>();
        for (var j0 = 0u; j0 < p.head_texels; j0 += 8u) {
            score_texels(j0);
        }
        row_update(0u, t0);
        if (R > 1u) {
            row_update(1u, t0);
        }
        if (R > 2u) {
            row_update(2u, t0);
        }
        if (R > 3u) {
            row_update(3u, t0);
        }
        pv_keys(0u, t0, kend);
        if (C > 1u && t0 + 8u < kend) {
            pv_keys(1u, t0, kend);
        }
    }

    write_row(0u, cnt);
    if (R > 1u) {
        write_row(1u, cnt);
    }
    if (R > 2u) {
        write_row(2u, cnt);
    }
    if (R > 3u) {
        write_row(3u, cnt);
    }
}
