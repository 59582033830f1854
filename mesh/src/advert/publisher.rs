//! Our own advert: when to publish it and what it says. Sans-IO: the router asks
//! [`AdvertPublisher::due`] on each tick, gets signed bytes from [`AdvertPublisher::sign_next`]
//! and reports whether gossipsub took them.
//!
//! A tick publishes only when it can matter: our last advert reached nobody, a newcomer appeared,
//! or the refresh period passed. A quiet mesh thus gossips every `advert_refresh`, not every
//! `advert_interval` (N nodes cost each other ~N·mesh_n receptions per round, all of which are
//! paid in one process by the scale bench).

use std::sync::Arc;
use std::time::{Duration, Instant};

use libp2p::identity::Keypair;
use libp2p::Multiaddr;

use super::codec::{self, AdvertError};
use super::{Advert, AdvertBody, BandwidthReport};

/// Publishing state of our advert.
#[derive(Debug)]
pub(crate) struct AdvertPublisher {
    key: Keypair,
    region: String,
    refresh: Duration,
    max_bytes: usize,
    body: AdvertBody,
    seq: u64,
    /// Our latest signed advert, served first in table sync.
    own_signed: Option<Arc<[u8]>>,
    /// Our last advert reached nobody (no subscribed peer yet): publish again as soon as a peer
    /// subscribes instead of waiting a whole `advert_interval` (this is what makes joins fast).
    unsent: bool,
    /// A node we had not heard of appeared since our last publish: it may not know us yet, so
    /// the next tick publishes instead of waiting for the (slower) refresh period.
    newcomer_seen: bool,
    /// When our advert was last published (for the refresh period).
    last_publish: Option<Instant>,
}

impl AdvertPublisher {
    /// `seq` starts at the wall clock in ms, so a restarted node's adverts beat its old ones.
    pub fn new(
        key: Keypair,
        region: String,
        refresh: Duration,
        max_bytes: usize,
        seq: u64,
    ) -> Self {
        Self {
            key,
            body: AdvertBody {
                region: region.clone(),
                ..AdvertBody::default()
            },
            region,
            refresh,
            max_bytes,
            seq,
            own_signed: None,
            unsent: false,
            newcomer_seen: false,
            last_publish: None,
        }
    }

    /// The application's new body (our configured region when it names none).
    pub fn set_body(&mut self, body: AdvertBody) {
        self.body = body;
        if self.body.region.is_empty() {
            self.body.region = self.region.clone();
        }
    }

    /// Whether a tick at `now` should publish.
    pub fn due(&self, now: Instant) -> bool {
        let refresh_due = self.last_publish.is_none_or(|t| {
            now.saturating_duration_since(t) + Duration::from_millis(5) >= self.refresh
        });
        self.unsent || self.newcomer_seen || refresh_due
    }

    /// Whether the last advert reached nobody.
    pub fn unsent(&self) -> bool {
        self.unsent
    }

    /// A node we had not heard of appeared (see `newcomer_seen`).
    pub fn note_newcomer(&mut self) {
        self.newcomer_seen = true;
    }

    /// Our latest signed advert.
    pub fn own_signed(&self) -> Option<&Arc<[u8]>> {
        self.own_signed.as_ref()
    }

    /// Signs the next advert (sequence = max(previous + 1, `now_ms`)) and remembers it as ours.
    pub fn sign_next(
        &mut self,
        local: &libp2p::PeerId,
        listen_addrs: &[Multiaddr],
        observed_bandwidth: Vec<BandwidthReport>,
        now: Instant,
        now_ms: u64,
    ) -> Result<Vec<u8>, AdvertError> {
        self.newcomer_seen = false;
        self.last_publish = Some(now);
        self.seq = (self.seq + 1).max(now_ms);
        let advert = Advert {
            node_id: local.to_base58(),
            seq: self.seq,
            listen_addrs: listen_addrs.iter().take(8).map(|a| a.to_string()).collect(),
            body: self.body.clone(),
            observed_bandwidth,
        };
        let bytes = codec::sign(&advert, &self.key, self.max_bytes)?;
        self.own_signed = Some(Arc::from(bytes.as_slice()));
        Ok(bytes)
    }

    /// Whether gossipsub sent the advert to anyone.
    pub fn published(&mut self, reached_someone: bool) {
        self.unsent = !reached_someone;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn publisher() -> (AdvertPublisher, libp2p::PeerId) {
        let key = Keypair::generate_ed25519();
        let local = key.public().to_peer_id();
        (
            AdvertPublisher::new(key, "eu".into(), Duration::from_secs(10), 4096, 1_000),
            local,
        )
    }

    #[test]
    fn publishes_first_then_only_on_refresh_newcomer_or_unsent() {
        let (mut p, local) = publisher();
        let t0 = Instant::now();
        assert!(p.due(t0), "nothing published yet");
        p.sign_next(&local, &[], vec![], t0, 0).expect("sign");
        p.published(true);
        assert!(!p.due(t0 + Duration::from_secs(1)));
        assert!(p.due(t0 + Duration::from_secs(10)), "refresh period");
        p.note_newcomer();
        assert!(p.due(t0 + Duration::from_secs(1)), "a newcomer");
        p.sign_next(&local, &[], vec![], t0, 0).expect("sign");
        p.published(false);
        assert!(p.unsent());
        assert!(p.due(t0 + Duration::from_secs(1)), "reached nobody");
    }

    #[test]
    fn sequence_numbers_grow_and_follow_the_clock() {
        let (mut p, local) = publisher();
        let t0 = Instant::now();
        p.set_body(AdvertBody::default());
        let a = p.sign_next(&local, &[], vec![], t0, 0).expect("sign");
        let (signer, first) = codec::open_verified(&a, 4096).expect("verifies");
        assert_eq!(signer, local);
        assert_eq!(first.seq, 1_001);
        assert_eq!(first.body.region, "eu", "an empty region is ours");
        let b = p.sign_next(&local, &[], vec![], t0, 50_000).expect("sign");
        let (_, second) = codec::open_verified(&b, 4096).expect("verifies");
        assert_eq!(second.seq, 50_000);
        assert_eq!(p.own_signed().map(|s| s.to_vec()), Some(b));
    }
}
