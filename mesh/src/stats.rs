//! Counters the mesh keeps (refusals, drops), readable at any time through the handle.

use std::sync::atomic::{AtomicU64, Ordering};

/// Live counters, shared between the swarm task, the KV acceptor and handles.
#[derive(Debug, Default)]
pub struct MeshStats {
    /// Connections refused or failed at admission (PSK mismatch, not allowlisted, limits).
    pub refused_connections: AtomicU64,
    /// Adverts rejected (undecodable, forged, replayed, not allowlisted).
    pub refused_adverts: AtomicU64,
    /// Auction requests refused (not allowlisted, overloaded).
    pub refused_auction: AtomicU64,
    /// KV streams refused (not allowlisted, bad hello, too many pending).
    pub refused_kv: AtomicU64,
    /// Events dropped because the application's event queue was full.
    pub dropped_events: AtomicU64,
    /// Adverts accepted.
    pub adverts_accepted: AtomicU64,
    /// Adverts refused as forged: bad signature, or signed by another key than the node named.
    pub adverts_forged: AtomicU64,
    /// Gossiped adverts refused as replays: older sequence number than the one held, or the same
    /// number with different bytes.
    pub adverts_replayed: AtomicU64,
    /// Adverts (new peers or newer sequence numbers) learned through table sync.
    pub adverts_from_sync: AtomicU64,
    /// Our own adverts published (every one costs the mesh ~N·`mesh_n` receptions).
    pub adverts_published: AtomicU64,
    /// Bids refused by the home's checks (bad price, claims contradicting the advert).
    pub bids_refused: AtomicU64,
    /// Awards we refused because we were serving as many as we can.
    pub awards_refused_busy: AtomicU64,
    /// Outgoing dials that failed (bootstrap, redials, discovery, requests).
    pub dials_failed: AtomicU64,
    /// Adverts refused or ignored as too old (or from the future) by their signed sequence
    /// number: expired adverts replayed, or aged out in a sync server's table.
    pub adverts_stale: AtomicU64,
    /// New adverts ignored because their signer exceeded its rate.
    pub adverts_rate_limited: AtomicU64,
    /// Bans started (peers whose KV failed verification repeatedly).
    pub peers_banned: AtomicU64,
    /// KV transfers refused because nobody here awaits them (no award to that peer for that
    /// request): per-peer quota, reason `unexpected`.
    pub kv_refused_unexpected: AtomicU64,
    /// KV streams refused because their peer (or all peers) already had their share of hellos
    /// being read: reason `hello_quota`.
    pub kv_refused_hello_quota: AtomicU64,
    /// Bandwidth probes refused because their peer already had one being received, or too
    /// large: reason `probe_quota`.
    pub kv_refused_probe_quota: AtomicU64,
    /// Table-sync entries dropped because one answer named more new peers than one sync may
    /// add: reason `table_quota`.
    pub table_entries_over_quota: AtomicU64,
}

/// A point-in-time copy of [`MeshStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct MeshStatsSnapshot {
    /// See [`MeshStats::refused_connections`].
    pub refused_connections: u64,
    /// See [`MeshStats::refused_adverts`].
    pub refused_adverts: u64,
    /// See [`MeshStats::refused_auction`].
    pub refused_auction: u64,
    /// See [`MeshStats::refused_kv`].
    pub refused_kv: u64,
    /// See [`MeshStats::dropped_events`].
    pub dropped_events: u64,
    /// See [`MeshStats::adverts_accepted`].
    pub adverts_accepted: u64,
    /// See [`MeshStats::adverts_forged`].
    pub adverts_forged: u64,
    /// See [`MeshStats::adverts_replayed`].
    pub adverts_replayed: u64,
    /// See [`MeshStats::adverts_from_sync`].
    pub adverts_from_sync: u64,
    /// See [`MeshStats::adverts_published`].
    pub adverts_published: u64,
    /// See [`MeshStats::bids_refused`].
    pub bids_refused: u64,
    /// See [`MeshStats::awards_refused_busy`].
    pub awards_refused_busy: u64,
    /// See [`MeshStats::dials_failed`].
    pub dials_failed: u64,
    /// See [`MeshStats::adverts_stale`].
    pub adverts_stale: u64,
    /// See [`MeshStats::adverts_rate_limited`].
    pub adverts_rate_limited: u64,
    /// See [`MeshStats::peers_banned`].
    pub peers_banned: u64,
    /// See [`MeshStats::kv_refused_unexpected`].
    pub kv_refused_unexpected: u64,
    /// See [`MeshStats::kv_refused_hello_quota`].
    pub kv_refused_hello_quota: u64,
    /// See [`MeshStats::kv_refused_probe_quota`].
    pub kv_refused_probe_quota: u64,
    /// See [`MeshStats::table_entries_over_quota`].
    pub table_entries_over_quota: u64,
}

impl MeshStatsSnapshot {
    /// Per-peer quota refusals by reason (the `reason` label of `prfaas_mesh_quota_refusals`).
    pub fn quota_refusals(&self) -> [(&'static str, u64); 4] {
        [
            ("unexpected", self.kv_refused_unexpected),
            ("hello_quota", self.kv_refused_hello_quota),
            ("probe_quota", self.kv_refused_probe_quota),
            ("table_quota", self.table_entries_over_quota),
        ]
    }
}

impl MeshStats {
    /// Reads every counter.
    pub fn snapshot(&self) -> MeshStatsSnapshot {
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        MeshStatsSnapshot {
            refused_connections: r(&self.refused_connections),
            refused_adverts: r(&self.refused_adverts),
            refused_auction: r(&self.refused_auction),
            refused_kv: r(&self.refused_kv),
            dropped_events: r(&self.dropped_events),
            adverts_accepted: r(&self.adverts_accepted),
            adverts_forged: r(&self.adverts_forged),
            adverts_replayed: r(&self.adverts_replayed),
            adverts_from_sync: r(&self.adverts_from_sync),
            adverts_published: r(&self.adverts_published),
            bids_refused: r(&self.bids_refused),
            awards_refused_busy: r(&self.awards_refused_busy),
            dials_failed: r(&self.dials_failed),
            adverts_stale: r(&self.adverts_stale),
            adverts_rate_limited: r(&self.adverts_rate_limited),
            peers_banned: r(&self.peers_banned),
            kv_refused_unexpected: r(&self.kv_refused_unexpected),
            kv_refused_hello_quota: r(&self.kv_refused_hello_quota),
            kv_refused_probe_quota: r(&self.kv_refused_probe_quota),
            table_entries_over_quota: r(&self.table_entries_over_quota),
        }
    }
}
