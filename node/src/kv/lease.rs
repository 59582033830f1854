//! Leases: blocks (and a state slot) reserved for KV that is still on its way from a remote
//! prefill node.
//!
//! A lease is taken before the transfer starts (so the sender never streams into a full node),
//! is filled frame by frame, and then either [committed](super::KvStore::commit) into ordinary held
//! blocks or [cancelled](super::KvStore::cancel). A transfer that stalls or dies is caught by
//! [`super::KvStore::expire`]: a lease that was neither committed nor cancelled by its deadline is
//! freed, so nothing is stranded.

use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::store::{BlockId, StateSlot};

/// Identifies a lease within one [`super::KvStore`]. Never reused by that store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct LeaseId(pub u64);

impl std::fmt::Display for LeaseId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "lease#{}", self.0)
    }
}

/// What a lease reserved. The blocks are in sequence order: block `i` receives tokens
/// `i·block_size .. (i+1)·block_size` of the incoming KV.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvLease {
    pub id: LeaseId,
    pub blocks: Vec<BlockId>,
    /// The state slot the incoming linear-attention states go to (hybrid models).
    pub state: Option<StateSlot>,
    /// After this instant [`super::KvStore::expire`] frees the lease.
    pub expires_at: Instant,
}
