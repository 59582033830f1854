//! Paged KV bookkeeping: blocks, prefix cache, leases, eviction.
//!
//! Sans-IO and tensor-free: the engine owns the physical pools (one K and one V device tensor per
//! paged layer, `[n_blocks, block_size, n_kv_heads, head_dim]`) and addresses them with the
//! [`BlockId`]s handed out by a [`KvStore`]; linear-attention layers keep one fixed-size state per
//! sequence, addressed by a [`StateSlot`]. [`KvLayout`] describes the bytes (and the versioned
//! export layout that crosses the mesh); [`block_hashes`] are the prefix-cache keys.
//!
//! Typical flows:
//! * local prefill: `lookup_prefix` → `allocate` the rest → prefill → `insert_prefix` → decode →
//!   `release`;
//! * remote prefill (home node): `lease` → write frames into the leased blocks → `commit` (or
//!   `cancel`; a stalled transfer is freed by `expire`).

pub mod layout;
pub mod lease;
mod pool;
pub mod prefix;
pub mod store;
pub mod wire;

pub use layout::{KvDType, KvLayout, KvLayoutError, LayerKvShape, KV_LAYOUT_VERSION};
pub use lease::{KvLease, LeaseId};
pub use prefix::{block_hashes, BlockHash};
pub use store::{
    BlockId, BlockState, KvError, KvInvariantViolation, KvStats, KvStore, KvStoreConfig, PrefixHit,
    PrefixInsert, StateSlot, DEFAULT_MAX_LEASES,
};
