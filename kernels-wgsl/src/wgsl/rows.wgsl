// Row copies through an index list, used for paged-KV writes and KV export/import.
//   GATHER = true:  dst[r, :] = src[idx[r], :]   (gather_blocks)
//   GATHER = false: dst[idx[r], :] = src[r, :]   (kv_write, scatter_blocks)
// Indices are bounds-checked on the host; a scatter skips rows whose index is 0xffffffff (the host
// uses that to apply repeated indices in order, last write wins).

override GATHER: bool = true;

struct Params {
    n_idx: u32,
    row: u32,
    _a: u32,
    _b: u32,
}

@group(0) @binding(0) var<storage, read> src: array<f32>;
@group(0) @binding(1) var<storage, read> idx: array<u32>;
@group(0) @binding(2) var<storage, read_write> dst: array<f32>;
@group(0) @binding(3) var<uniform> p: Params;

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 256u;
    if (i >= p.n_idx * p.row) {
        return;
    }
    let r = i / p.row;
    let e = i % p.row;
    if (GATHER) {
        dst[i] = src[idx[r] * p.row + e];
    } else if (idx[r] != 0xffffffffu) {
        dst[idx[r] * p.row + e] = src[i];
    }
}
