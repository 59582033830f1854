// Causal flash attention over a paged KV pool for adapters with subgroups of >= 8 lanes, reading
// Q, K and V through textures: the route matmul_tex.wgsl took on lavapipe, where storage-buffer
// and workgroup-memory loads are per-lane scalar loops but texel fetches are vector gathers
// (DESIGN.md §7). Two entry points:
//
// * `gather` copies "lines" (one head of one token: head_dim values, zero-padded to whole texels)
//   into an rgba32float texture: the new tokens' query heads (`PAGED` off), or the keys or values
//   the call needs from the paged pool (`PAGED`: `slots[token]` is the pool slot, `KV_F16` for f16
//   pools), each sequence's tokens contiguous. Line `L` lives in texture row `L >> LPR_SHIFT` at
//   texel column `(L & (2^LPR_SHIFT - 1)) · head_texels` (a power of two per row: no division).
// * `main`: one workgroup is one subgroup of 8 lanes and computes up to `R` attention rows
//   that share a KV head: item `i` of a sequence is its new token `i / group`, query head
//   `kvh · group + i % group`, so a tile is all GQA heads of one or more consecutive tokens of
//   one sequence (tiles never cross sequences; `tiles` is built on the host). Keys are visited in
//   tiles of `8·C`: lane l owns keys `t0 + l + 8c`. Scores: per step of 8 head texels each lane
//   fetches one texel of each query row, the 8 lanes share them with `subgroupBroadcast`, and
//   each lane fetches its own keys' texels, so one K texel serves all R rows. Online softmax per
//   row (subgroupMax over the tile; each lane keeps a partial row sum, added up at the end).
//   Output: lane l owns output texels `l + 8·oc`; for each key the probabilities of the R rows
//   are broadcast from the lane that owns the key and each V texel serves all R rows.
//
// The host picks R, C and OC (= ceil(head_texels / 8), <= 8, so head_dim <= 256) so that the
// R·OC vec4 accumulators fit the CPU's vector registers. Everything with a lane index is written
// out per lane: `subgroupBroadcast` takes a constant lane.

override KV_F16: bool = false;
override PAGED: bool = true;
// Attention rows per workgroup (1..=8), keys per lane per tile (1..=4), output texels per lane.
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

@compute @workgroup_size(64)
fn gather(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 64u;
    if (i >= gp.lines * gp.head_texels) {
        return;
    }
    let line = i / gp.head_texels;
    let j = i % gp.head_texels;
    var src_line = line;
    if (PAGED) {
        src_line = slots[line / gp.heads] * gp.heads + line % gp.heads;
    }
    let base = src_line * gp.head_dim;
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
    textureStore(dst, line_coord(line, j, gp.lpr_shift, gp.head_texels), v);
}

var<private> lane_id: u32;
// Texel 0 of this lane's keys (C of them) in the K/V textures.
var<private> kc: array<vec2<u32>, 4>;
// Scores, then probabilities, of row r and this lane's key c at r * C + c.
var<private> s: array<f32, 32>;
// Output accumulators of row r, texel lane + 8·oc at r * OC + oc.
var<private> o: array<vec4<f32>, 64>;

// One head texel `jt` of the scores: `qb[r]` is query row r's texel jt (broadcast).
fn score_step(jt: u32, qb: array<vec4<f32>, 8>) {
    for (var c = 0u; c < C; c++) {
        let kv = textureLoad(kt, kc[c] + vec2<u32>(jt, 0u), 0);
        for (var r = 0u; r < R; r++) {
            s[r * C + c] += dot(qb[r], kv);
        }
    }
}

// One key (texel 0 at `vc`): `pa`/`pb` hold the probabilities of rows 0..4 / 4..8.
fn pv_step(vc: vec2<u32>, pa: vec4<f32>, pb: vec4<f32>) {
    let pr = array<f32, 8>(pa.x, pa.y, pa.z, pa.w, pb.x, pb.y, pb.z, pb.w);
    for (var oc = 0u; oc < OC; oc++) {
        let v = textureLoad(vt, vc + vec2<u32>(lane_id + 8u * oc, 0u), 0);
        for (var r = 0u; r < R; r++) {
            o[r * OC + oc] += pr[r] * v;
        }
    }
}

fn prob(r: u32, c: u32) -> f32 {
    return select(0.0, s[r * C + c], r < R);
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
    let row0 = ta.x;
    let i0 = ta.y;
    let cnt = ta.z;
    let n_past = ta.w;
    let kv_off = tb.x;
    let kmin = tb.y;
    let ht = p.head_texels;
    let sh = p.lpr_shift;

    // Rows past `cnt` repeat the last one (computed, never written).
    var pos: array<u32, 8>;
    var line: array<u32, 8>;
    var qc: array<vec2<u32>, 8>;
    var m: array<f32, 8>;
    var l: array<f32, 8>;
    for (var r = 0u; r < R; r++) {
        let it = i0 + min(r, cnt - 1u);
        let j = it / p.group;
        pos[r] = n_past + j;
        line[r] = (row0 + j) * p.n_heads + kvh * p.group + it % p.group;
        qc[r] = line_coord(line[r], 0u, sh, ht);
        m[r] = NEG;
        l[r] = 0.0;
    }
    for (var i = 0u; i < R * OC; i++) {
        o[i] = vec4<f32>(0.0);
    }
    let kend = pos[R - 1u] + 1u;
    var kstart = 0u;
    if (p.window > 0u && pos[0] + 1u > p.window) {
        kstart = pos[0] + 1u - p.window;
    }

    for (var t0 = kstart; t0 < kend; t0 += 8u * C) {
        for (var c = 0u; c < C; c++) {
            let t = min(t0 + lane + 8u * c, kend - 1u);
            kc[c] = line_coord((kv_off + t - kmin) * p.n_kv + kvh, 0u, sh, ht);
        }
        for (var i = 0u; i < R * C; i++) {
            s[i] = 0.0;
        }
        for (var j0 = 0u; j0 < ht; j0 += 8u) {
            var qa: array<vec4<f32>, 8>;
            for (var r = 0u; r < R; r++) {
                qa[r] = select(vec4<f32>(0.0), textureLoad(qt, qc[r] + vec2<u32>(j0 + lane, 0u), 0), j0 + lane < ht);
            }
            score_step(j0 + 0u, array<vec4<f32>, 8>(subgroupBroadcast(qa[0], 0u), subgroupBroadcast(qa[1], 0u), subgroupBroadcast(qa[2], 0u), subgroupBroadcast(qa[3], 0u), subgroupBroadcast(qa[4], 0u), subgroupBroadcast(qa[5], 0u), subgroupBroadcast(qa[6], 0u), subgroupBroadcast(qa[7], 0u)));
            if (j0 + 1u < ht) {
                score_step(j0 + 1u, array<vec4<f32>, 8>(subgroupBroadcast(qa[0], 1u), subgroupBroadcast(qa[1], 1u), subgroupBroadcast(qa[2], 1u), subgroupBroadcast(qa[3], 1u), subgroupBroadcast(qa[4], 1u), subgroupBroadcast(qa[5], 1u), subgroupBroadcast(qa[6], 1u), subgroupBroadcast(qa[7], 1u)));
            }
            if (j0 + 2u < ht) {
                score_step(j0 + 2u, array<vec4<f32>, 8>(subgroupBroadcast(qa[0], 2u), subgroupBroadcast(qa[1], 2u), subgroupBroadcast(qa[2], 2u), subgroupBroadcast(qa[3], 2u), subgroupBroadcast(qa[4], 2u), subgroupBroadcast(qa[5], 2u), subgroupBroadcast(qa[6], 2u), subgroupBroadcast(qa[7], 2u)));
            }
            if (j0 + 3u < ht) {
                score_step(j0 + 3u, array<vec4<f32>, 8>(subgroupBroadcast(qa[0], 3u), subgroupBroadcast(qa[1], 3u), subgroupBroadcast(qa[2], 3u), subgroupBroadcast(qa[3], 3u), subgroupBroadcast(qa[4], 3u), subgroupBroadcast(qa[5], 3u), subgroupBroadcast(qa[6], 3u), subgroupBroadcast(qa[7], 3u)));
            }
            if (j0 + 4u < ht) {
                score_step(j0 + 4u, array<vec4<f32>, 8>(subgroupBroadcast(qa[0], 4u), subgroupBroadcast(qa[1], 4u), subgroupBroadcast(qa[2], 4u), subgroupBroadcast(qa[3], 4u), subgroupBroadcast(qa[4], 4u), subgroupBroadcast(qa[5], 4u), subgroupBroadcast(qa[6], 4u), subgroupBroadcast(qa[7], 4u)));
            }
            if (j0 + 5u < ht) {
                score_step(j0 + 5u, array<vec4<f32>, 8>(subgroupBroadcast(qa[0], 5u), subgroupBroadcast(qa[1], 5u), subgroupBroadcast(qa[2], 5u), subgroupBroadcast(qa[3], 5u), subgroupBroadcast(qa[4], 5u), subgroupBroadcast(qa[5], 5u), subgroupBroadcast(qa[6], 5u), subgroupBroadcast(qa[7], 5u)));
            }
            if (j0 + 6u < ht) {
                score_step(j0 + 6u, array<vec4<f32>, 8>(subgroupBroadcast(qa[0], 6u), subgroupBroadcast(qa[1], 6u), subgroupBroadcast(qa[2], 6u), subgroupBroadcast(qa[3], 6u), subgroupBroadcast(qa[4], 6u), subgroupBroadcast(qa[5], 6u), subgroupBroadcast(qa[6], 6u), subgroupBroadcast(qa[7], 6u)));
            }
            if (j0 + 7u < ht) {
                score_step(j0 + 7u, array<vec4<f32>, 8>(subgroupBroadcast(qa[0], 7u), subgroupBroadcast(qa[1], 7u), subgroupBroadcast(qa[2], 7u), subgroupBroadcast(qa[3], 7u), subgroupBroadcast(qa[4], 7u), subgroupBroadcast(qa[5], 7u), subgroupBroadcast(qa[6], 7u), subgroupBroadcast(qa[7], 7u)));
            }
        }

        // Online softmax: mask, tile max per row, rescale, probabilities.
        for (var r = 0u; r < R; r++) {
            var first = 0u;
            if (p.window > 0u && pos[r] + 1u > p.window) {
                first = pos[r] + 1u - p.window;
            }
            var mt = NEG;
            for (var c = 0u; c < C; c++) {
                let t = t0 + lane + 8u * c;
                let sv = select(NEG, s[r * C + c] * p.scale, t >= first && t <= pos[r]);
                s[r * C + c] = sv;
                mt = max(mt, sv);
            }
            let m_new = max(m[r], subgroupMax(mt));
            let alpha = exp(m[r] - m_new);
            m[r] = m_new;
            var ps = 0.0;
            for (var c = 0u; c < C; c++) {
                let sv = s[r * C + c];
                let pv = select(0.0, exp(sv - m_new), sv > 0.5 * NEG);
                s[r * C + c] = pv;
                ps += pv;
            }
            l[r] = l[r] * alpha + ps;
            for (var oc = 0u; oc < OC; oc++) {
                o[r * OC + oc] *= alpha;
            }
        }

        // O += P·V, one key at a time, from the lane that owns it.
        for (var c = 0u; c < C; c++) {
            let tc = t0 + 8u * c;
            if (tc >= kend) {
                break;
            }
            let pa = vec4<f32>(prob(0u, c), prob(1u, c), prob(2u, c), prob(3u, c));
            let pb = vec4<f32>(prob(4u, c), prob(5u, c), prob(6u, c), prob(7u, c));
            pv_step(subgroupBroadcast(kc[c], 0u), subgroupBroadcast(pa, 0u), subgroupBroadcast(pb, 0u));
            if (tc + 1u < kend) {
                pv_step(subgroupBroadcast(kc[c], 1u), subgroupBroadcast(pa, 1u), subgroupBroadcast(pb, 1u));
            }
            if (tc + 2u < kend) {
                pv_step(subgroupBroadcast(kc[c], 2u), subgroupBroadcast(pa, 2u), subgroupBroadcast(pb, 2u));
            }
            if (tc + 3u < kend) {
                pv_step(subgroupBroadcast(kc[c], 3u), subgroupBroadcast(pa, 3u), subgroupBroadcast(pb, 3u));
            }
            if (tc + 4u < kend) {
                pv_step(subgroupBroadcast(kc[c], 4u), subgroupBroadcast(pa, 4u), subgroupBroadcast(pb, 4u));
            }
            if (tc + 5u < kend) {
                pv_step(subgroupBroadcast(kc[c], 5u), subgroupBroadcast(pa, 5u), subgroupBroadcast(pb, 5u));
            }
            if (tc + 6u < kend) {
                pv_step(subgroupBroadcast(kc[c], 6u), subgroupBroadcast(pa, 6u), subgroupBroadcast(pb, 6u));
            }
            if (tc + 7u < kend) {
                pv_step(subgroupBroadcast(kc[c], 7u), subgroupBroadcast(pa, 7u), subgroupBroadcast(pb, 7u));
            }
        }
    }

    for (var r = 0u; r < R; r++) {
        let inv = 1.0 / subgroupAdd(l[r]);
        if (r < cnt) {
            let ob = line[r] * p.head_dim;
            for (var oc = 0u; oc < OC; oc++) {
                let jt = lane + 8u * oc;
                let v = o[r * OC + oc] * inv;
                for (var e = 0u; e < 4u; e++) {
                    if (jt < ht && 4u * jt + e < p.head_dim) {
                        out[ob + 4u * jt + e] = v[e];
                    }
                }
            }
        }
    }
}
