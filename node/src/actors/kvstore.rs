//! `KvStore`: the node's view of its KV cache for the rest of the node (metrics, adverts, bids).
//!
//! The blocks themselves live in the engine on the compute thread; this actor serves what others
//! may know without waiting for that thread (which can be busy in a long prefill): block counts,
//! the prefix cache's block hashes and the advertised bloom summary, refreshed from the engine's
//! published view.

use actix::prelude::*;
use prfaas_mesh::advert::message::PrefixSummary;

use super::compute::cached_leading;
use super::core::Core;
use super::MAILBOX;

/// Bloom filter size of the advertised prefix summary (bytes) and probes per key: 32 Kibit keeps
/// the false-positive rate under 1% up to ~3,000 cached blocks (48K tokens at 16 per block).
const SUMMARY_BYTES: usize = 4096;
const SUMMARY_PROBES: u8 = 5;

#[derive(Debug)]
pub struct KvStore {
    core: Core,
}

impl KvStore {
    pub fn new(core: Core) -> Self {
        Self { core }
    }
}

impl Actor for KvStore {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(MAILBOX);
    }
}

/// How many leading blocks of a prompt (given by its short block hashes) are cached here.
#[derive(Debug, Message)]
#[rtype(result = "usize")]
pub struct CachedBlocks(pub Vec<u64>);

impl Handler<CachedBlocks> for KvStore {
    type Result = usize;

    fn handle(&mut self, CachedBlocks(h): CachedBlocks, _: &mut Self::Context) -> usize {
        cached_leading(&self.core.compute.view(), &h)
    }
}

/// The advert's part about the KV cache.
#[derive(Debug, Clone, PartialEq)]
pub struct KvAdvert {
    /// Whether the engine has reported its KV pool yet (before that every count reads 0).
    pub ready: bool,
    pub free_blocks: u64,
    pub summary: PrefixSummary,
}

#[derive(Debug, Message)]
#[rtype(result = "KvAdvert")]
pub struct AdvertPart;

impl Handler<AdvertPart> for KvStore {
    type Result = MessageResult<AdvertPart>;

    fn handle(&mut self, _: AdvertPart, _: &mut Self::Context) -> Self::Result {
        let view = self.core.compute.view();
        let mut summary = PrefixSummary::with_size(SUMMARY_BYTES, SUMMARY_PROBES);
        if view.cached_blocks.is_empty() {
            summary = PrefixSummary::default();
        }
        for h in &view.cached_blocks {
            summary.insert(*h);
        }
        MessageResult(KvAdvert {
            ready: view.kv.total_blocks > 0,
            free_blocks: (view.kv.free + view.kv.cached) as u64,
            summary,
        })
    }
}
