//! Paged KV bookkeeping: blocks, prefix cache, leases, eviction.
