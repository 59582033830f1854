// Causal flash-style attention over a paged KV pool, for several sequences in one dispatch: the
// portable storage-buffer kernel, for adapters without 8-lane subgroups (GL, `KernelPath::Storage`).
// Where subgroups exist on a software adapter attention_tex.wgsl runs instead: on lavapipe this
// kernel's per-lane storage and workgroup loads hold it to 0.05–0.4 GFLOP/s (BENCHMARKS.md).
//
// One 64-thread workgroup per (query row, query head). Keys are visited in tiles of 64: each thread
// scores one key of the tile, the tile max updates the running max `m` (online softmax), each
// thread turns its score into a weight, and each thread accumulates the output dimensions it owns
// (d = lane + 64·j) over the tile's weighted values. GQA maps query head h to KV
// head h / group. `rowinfo[2r..2r+2] = (absolute position, offset of the sequence's block table in
// `bt`)`, built on the host, so sequences with different cached prefixes share the dispatch.
// Pools are `[n_blocks, block_size, n_kv_heads, head_dim]`; head_dim <= 256 (checked on the host).
// They are bound as words: f32 bits, or (KV_F16) two f16 values per word, element 2w in the low
// half of word w, widened exactly with `unpack2x16float` (no SHADER_F16 needed).

override KV_F16: bool = false;

struct Params {
    n_heads: u32,
    n_kv: u32,
    head_dim: u32,
    group: u32,
    block_size: u32,
    // 0 = no window; otherwise a query at position p sees keys at positions > p - window.
    window: u32,
    rows: u32,
    scale: f32,
}

@group(0) @binding(0) var<storage, read> q: array<f32>;
@group(0) @binding(1) var<storage, read> kp: array<u32>;
@group(0) @binding(2) var<storage, read> vp: array<u32>;
@group(0) @binding(3) var<storage, read> rowinfo: array<u32>;
@group(0) @binding(4) var<storage, read> bt: array<u32>;
@group(0) @binding(5) var<storage, read_write> out: array<f32>;
@group(0) @binding(6) var<uniform> p: Params;

const WG: u32 = 64u;
const NEG: f32 = -1.0e30;

var<workgroup> qs: array<f32, 256>;
var<workgroup> sc: array<f32, 64>;
var<workgroup> red: array<f32, 64>;

// Element i of the K pool and of the V pool.
fn k_at(i: u32) -> f32 {
    if (KV_F16) {
        let pair = unpack2x16float(kp[i >> 1u]);
        return select(pair.x, pair.y, (i & 1u) == 1u);
    }
    return bitcast<f32>(kp[i]);
}

fn v_at(i: u32) -> f32 {
    if (KV_F16) {
        let pair = unpack2x16float(vp[i >> 1u]);
        return select(pair.x, pair.y, (i & 1u) == 1u);
    }
    return bitcast<f32>(vp[i]);
}

// Offset of (token position t, kv head) in the pools.
fn kv_base(bt_off: u32, t: u32, kvh: u32) -> u32 {
    let blk = bt[bt_off + t / p.block_size];
    return ((blk * p.block_size + t % p.block_size) * p.n_kv + kvh) * p.head_dim;
}

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let h = wid.x;
    let r = wid.y + wid.z * 65535u;
    if (r >= p.rows) {
        return;
    }
    let kvh = h / p.group;
    let pos = rowinfo[2u * r];
    let bt_off = rowinfo[2u * r + 1u];
    let kend = pos + 1u;
    var kstart = 0u;
    if (p.window > 0u && kend > p.window) {
        kstart = kend - p.window;
    }
    let qbase = (r * p.n_heads + h) * p.head_dim;
    for (var d = li; d < p.head_dim; d += WG) {
        qs[d] = q[qbase + d] * p.scale;
    }
    workgroupBarrier();

    var acc: array<f32, 4>;
    var m = NEG;
    var l = 0.0;
    for (var t0 = kstart; t0 < kend; t0 += WG) {
        let t = t0 + li;
        var s = NEG;
        if (t < kend) {
            let kb = kv_base(bt_off, t, kvh);
            var dot = 0.0;
            for (var d = 0u; d < p.head_dim; d++) {
                dot += qs[d] * k_at(kb + d);
            }
            s = dot;
        }
        sc[li] = s;
        red[li] = s;
        workgroupBarrier();
        for (var st = WG / 2u; st > 0u; st >>= 1u) {
            if (li < st) {
                red[li] = max(red[li], red[li + st]);
            }
            workgroupBarrier();
        }
        let m_new = max(m, red[0]);
        let alpha = exp(m - m_new);
        l *= alpha;
        for (var j = 0u; j < 4u; j++) {
            acc[j] *= alpha;
        }
        // Each lane exponentiates its own key once (not every lane every key).
        sc[li] = select(0.0, exp(s - m_new), t < kend);
        workgroupBarrier();
        let cnt = min(WG, kend - t0);
        for (var tt = 0u; tt < cnt; tt++) {
            let pj = sc[tt];
            l += pj;
            let vb = kv_base(bt_off, t0 + tt, kvh);
            for (var j = 0u; j < 4u; j++) {
                let d = li + j * WG;
                if (d < p.head_dim) {
                    acc[j] += pj * v_at(vb + d);
                }
            }
        }
        m = m_new;
        workgroupBarrier();
    }
    let inv = 1.0 / l;
    for (var j = 0u; j < 4u; j++) {
        let d = li + j * WG;
        if (d < p.head_dim) {
            out[qbase + d] = acc[j] * inv;
        }
    }
}
