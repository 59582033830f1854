//! Bandwidth probes: small opaque transfers whose only purpose is to measure goodput to a peer
//! whose estimate is stale. [`Prober`] decides whom to probe (one probe at a time, each peer at
//! most once per `stale_after`); [`Prober::start_next`] runs that decision against the live
//! estimator and starts the probe in its own task.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use libp2p::PeerId;

use crate::config::BandwidthConfig;
use crate::kv::sender::KvOpener;
use crate::kv::{KvHeader, KvTrailer};

/// Whom to probe next.
#[derive(Debug)]
pub(crate) struct Prober {
    enabled: bool,
    stale_after: Duration,
    probe_bytes: u64,
    max_known_peers: usize,
    running: Arc<AtomicBool>,
    last_probe: HashMap<PeerId, Instant>,
}

/// A probe that may start; dropping it (when the probe ends) lets the next one start.
#[derive(Debug)]
pub(crate) struct ProbeTicket {
    pub peer: PeerId,
    running: Arc<AtomicBool>,
}

impl Drop for ProbeTicket {
    fn drop(&mut self) {
        self.running.store(false, Ordering::Release);
    }
}

impl Prober {
    pub fn new(cfg: &BandwidthConfig, max_known_peers: usize) -> Self {
        Self {
            enabled: cfg.probes,
            stale_after: cfg.stale_after,
            probe_bytes: cfg.probe_bytes.max(1),
            max_known_peers,
            running: Arc::new(AtomicBool::new(false)),
            last_probe: HashMap::new(),
        }
    }

    /// The first of `candidates` (connected mesh peers) whose estimate is stale and that was not
    /// probed within `stale_after`, unless probes are off or one is running.
    pub fn next(
        &mut self,
        now: Instant,
        candidates: impl Iterator<Item = PeerId>,
        is_stale: impl Fn(&PeerId) -> bool,
    ) -> Option<ProbeTicket> {
        if !self.enabled || self.running.load(Ordering::Acquire) {
            return None;
        }
        let stale_after = self.stale_after;
        let peer = candidates.filter(|p| is_stale(p)).find(|p| {
            self.last_probe
                .get(p)
                .is_none_or(|t| now.saturating_duration_since(*t) > stale_after)
        })?;
        self.last_probe.insert(peer, now);
        if self.last_probe.len() > self.max_known_peers {
            self.last_probe
                .retain(|_, t| now.saturating_duration_since(*t) <= stale_after);
        }
        self.running.store(true, Ordering::Release);
        Some(ProbeTicket {
            peer,
            running: self.running.clone(),
        })
    }

    /// Starts at most one probe at a time, towards the first of `candidates` (connected mesh
    /// peers) whose estimate in `kv`'s estimator is stale (see [`Self::next`]).
    pub fn start_next(
        &mut self,
        now: Instant,
        candidates: impl Iterator<Item = PeerId>,
        kv: &KvOpener,
    ) {
        let stale_after = self.stale_after;
        let ticket = {
            let Ok(est) = kv.estimator.lock() else {
                return;
            };
            self.next(now, candidates, |p| est.is_stale(p, now, stale_after))
        };
        let Some(ticket) = ticket else { return };
        let (kv, bytes) = (kv.clone(), self.probe_bytes);
        tokio::spawn(async move {
            let peer = ticket.peer;
            if let Err(e) = probe(&kv, peer, bytes).await {
                tracing::debug!(%peer, error = %e, "bandwidth probe failed");
            }
            drop(ticket);
        });
    }
}

/// A small transfer in 256 KiB pieces whose only purpose is to measure goodput to `peer`.
async fn probe(kv: &KvOpener, peer: PeerId, bytes: u64) -> Result<(), crate::kv::KvError> {
    let model = crate::advert::ModelRef {
        model_id: String::new(),
        weights_hash: [0; 32],
        kv_layout_version: 0,
        kv_layout_hash: [0; 32],
    };
    let header = KvHeader::opaque(0, model, bytes, 256 * 1024, true);
    let mut s = kv.open(peer, header, 1).await?;
    s.send_opaque(&[0xA5]).await?;
    s.finish(KvTrailer::default()).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_probe_at_a_time_each_stale_peer_once_per_period() {
        let stale = Duration::from_secs(30);
        let cfg = |probes| BandwidthConfig {
            probes,
            stale_after: stale,
            ..BandwidthConfig::default()
        };
        let mut p = Prober::new(&cfg(true), 16);
        let (a, b) = (PeerId::random(), PeerId::random());
        let t0 = Instant::now();
        let first = p.next(t0, [a, b].into_iter(), |_| true).expect("a probe");
        assert_eq!(first.peer, a);
        assert!(
            p.next(t0, [a, b].into_iter(), |_| true).is_none(),
            "one at a time"
        );
        drop(first);
        let second = p.next(t0, [a, b].into_iter(), |_| true).expect("b now");
        assert_eq!(second.peer, b);
        drop(second);
        assert!(
            p.next(t0, [a, b].into_iter(), |_| true).is_none(),
            "both probed recently"
        );
        assert!(
            p.next(t0 + stale * 2, [a].into_iter(), |_| false).is_none(),
            "fresh estimate"
        );
        assert_eq!(
            p.next(t0 + stale * 2, [a].into_iter(), |_| true)
                .map(|t| t.peer),
            Some(a)
        );
        let mut off = Prober::new(&cfg(false), 16);
        assert!(off.next(t0, [a].into_iter(), |_| true).is_none());
    }
}
