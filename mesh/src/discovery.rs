//! Redialling: bootstrap addresses and peers we lost are dialled again, with exponential backoff
//! and jitter, until a connection stands. Nodes may thus start in any order, and a mesh re-forms
//! after a partition heals or a peer restarts. Sans-IO: the swarm task reports dials and
//! connections and asks which dials are due; this module never touches the swarm.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use libp2p::multiaddr::Protocol;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::ConnectionId;
use libp2p::{Multiaddr, PeerId};
use serde::{Deserialize, Serialize};

/// Redial timing.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedialConfig {
    /// First retry after a failed dial or a lost connection.
    #[serde(with = "humantime_serde")]
    pub initial: Duration,
    /// Longest wait between retries (the backoff doubles up to this). Bounds how long a healed
    /// partition or a restarted peer stays unconnected.
    #[serde(with = "humantime_serde")]
    pub max: Duration,
}

impl Default for RedialConfig {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(250),
            max: Duration::from_secs(5),
        }
    }
}

/// What to redial.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DialKey {
    /// The bootstrap address at this index of the config's list.
    Bootstrap(usize),
    /// A peer we were connected to and lost, while its advert is in our table.
    Lost(PeerId),
}

/// A dial that is due: dial `addrs` (as `peer` when known), then report the connection id with
/// [`Redialer::dialing`].
#[derive(Debug, Clone, PartialEq)]
pub struct Dial {
    /// What is being redialled.
    pub key: DialKey,
    /// The peer, when known (a bootstrap address without `/p2p` learns it on connecting).
    pub peer: Option<PeerId>,
    /// Where.
    pub addrs: Vec<Multiaddr>,
}

impl Dial {
    /// The swarm's dial: as `peer` at every address when known (unless already connected or
    /// being dialled), else the bootstrap address as an unknown peer.
    pub fn into_opts(self) -> DialOpts {
        match self.peer {
            Some(p) => dial_known(p, self.addrs),
            None => DialOpts::unknown_peer_id()
                .address(self.addrs[0].clone())
                .build(),
        }
    }
}

/// Dials `peer` at `addrs` unless it is connected or being dialled already.
fn dial_known(peer: PeerId, addrs: Vec<Multiaddr>) -> DialOpts {
    DialOpts::peer_id(peer)
        .addresses(addrs)
        .condition(PeerCondition::DisconnectedAndNotDialing)
        .build()
}

/// Logs that redial `key` failed `failures` times in a row: at warn for bootstrap addresses (a
/// node alone in its mesh is the symptom an operator must be able to find), quieter for other
/// peers. `bootstrap` is the configured list, as written.
pub(crate) fn log_failed_redial(
    key: DialKey,
    failures: u32,
    error: &dyn std::fmt::Display,
    bootstrap: &[String],
) {
    match key {
        DialKey::Bootstrap(i) => tracing::warn!(
            bootstrap = %bootstrap.get(i).map_or("", String::as_str),
            failures,
            %error,
            "bootstrap dial failed; retrying with backoff"
        ),
        DialKey::Lost(p) => tracing::info!(
            peer = %p,
            failures,
            %error,
            "redial of a lost peer failed; retrying with backoff"
        ),
    }
}

#[derive(Debug)]
struct Target {
    addrs: Vec<Multiaddr>,
    peer: Option<PeerId>,
    /// Failed attempts since the last connection.
    failures: u32,
    /// When to dial next; `None` while connected or while a dial is in flight.
    due: Option<Instant>,
}

/// The redial state machine.
#[derive(Debug)]
pub struct Redialer {
    cfg: RedialConfig,
    bootstrap: Vec<Target>,
    lost: HashMap<PeerId, Target>,
    max_lost: usize,
    in_flight: HashMap<ConnectionId, DialKey>,
    rng: u64,
}

/// The peer id at the end of a multiaddr (`…/p2p/<id>`), if any.
fn peer_of(addr: &Multiaddr) -> Option<PeerId> {
    addr.iter().last().and_then(|p| match p {
        Protocol::P2p(id) => Some(id),
        _ => None,
    })
}

impl Redialer {
    /// Every bootstrap address is due at `now`; at most `max_lost` lost peers are tracked.
    pub fn new(
        cfg: RedialConfig,
        bootstrap: Vec<Multiaddr>,
        max_lost: usize,
        now: Instant,
        seed: u64,
    ) -> Self {
        let bootstrap = bootstrap
            .into_iter()
            .map(|a| Target {
                peer: peer_of(&a),
                addrs: vec![a],
                failures: 0,
                due: Some(now),
            })
            .collect();
        Self {
            cfg,
            bootstrap,
            lost: HashMap::new(),
            max_lost,
            in_flight: HashMap::new(),
            rng: seed | 1,
        }
    }

    fn target(&mut self, key: DialKey) -> Option<&mut Target> {
        match key {
            DialKey::Bootstrap(i) => self.bootstrap.get_mut(i),
            DialKey::Lost(p) => self.lost.get_mut(&p),
        }
    }

    /// Dials due at `now`, skipping targets whose peer `is_connected`. Each returned dial is out
    /// of the schedule until [`Redialer::dialing`] and its outcome are reported (or, if the swarm
    /// refused to start it, [`Redialer::failed_to_start`]).
    pub fn due(&mut self, now: Instant, is_connected: impl Fn(&PeerId) -> bool) -> Vec<Dial> {
        let mut out = Vec::new();
        let keys = (0..self.bootstrap.len())
            .map(DialKey::Bootstrap)
            .chain(self.lost.keys().copied().map(DialKey::Lost))
            .collect::<Vec<_>>();
        for key in keys {
            let Some(t) = self.target(key) else { continue };
            if t.due.is_none_or(|d| d > now) {
                continue;
            }
            if t.peer.as_ref().is_some_and(&is_connected) {
                t.due = None;
                t.failures = 0;
                continue;
            }
            t.due = None;
            out.push(Dial {
                key,
                peer: t.peer,
                addrs: t.addrs.clone(),
            });
        }
        out
    }

    /// The swarm started dial `key` as connection `id`.
    pub fn dialing(&mut self, key: DialKey, id: ConnectionId) {
        self.in_flight.insert(id, key);
    }

    /// The swarm refused to start dial `key` (e.g. already dialling): retry later.
    pub fn failed_to_start(&mut self, key: DialKey, now: Instant) {
        self.schedule(key, now);
    }

    /// A connection to `peer` stands (dialled or not): its targets stop redialling.
    pub fn on_connected(&mut self, peer: PeerId, id: ConnectionId) {
        if let Some(DialKey::Bootstrap(i)) = self.in_flight.remove(&id) {
            if let Some(t) = self.bootstrap.get_mut(i) {
                t.peer.get_or_insert(peer);
            }
        }
        for t in self.bootstrap.iter_mut().filter(|t| t.peer == Some(peer)) {
            t.failures = 0;
            t.due = None;
        }
        self.lost.remove(&peer);
    }

    /// Dial `id` failed; returns what it was for (a redial is scheduled) and the failures in a
    /// row, or `None` when the dial was not ours.
    pub fn on_dial_failed(&mut self, id: ConnectionId, now: Instant) -> Option<(DialKey, u32)> {
        let key = self.in_flight.remove(&id)?;
        self.schedule(key, now);
        let failures = self.target(key).map_or(0, |t| t.failures);
        Some((key, failures))
    }

    /// The last connection to `peer` closed. Bootstrap targets for it are redialled; other peers
    /// only when `addrs` (their advertised addresses) are given.
    pub fn on_disconnected(&mut self, peer: PeerId, addrs: Vec<Multiaddr>, now: Instant) {
        let boot: Vec<usize> = (0..self.bootstrap.len())
            .filter(|&i| self.bootstrap[i].peer == Some(peer))
            .collect();
        let first = now + self.cfg.initial;
        for i in &boot {
            let t = &mut self.bootstrap[*i];
            t.failures = 0;
            t.due.get_or_insert(first);
        }
        if boot.is_empty() && !addrs.is_empty() && self.lost.len() < self.max_lost {
            self.lost.insert(
                peer,
                Target {
                    addrs,
                    peer: Some(peer),
                    failures: 0,
                    due: Some(first),
                },
            );
        }
    }

    /// `peer` left the peer table (advert expired): stop redialling it, unless it is a bootstrap
    /// peer (those are redialled for as long as the node runs).
    pub fn forget(&mut self, peer: &PeerId) {
        self.lost.remove(peer);
    }

    /// Lost peers being redialled.
    pub fn lost_len(&self) -> usize {
        self.lost.len()
    }

    fn schedule(&mut self, key: DialKey, now: Instant) {
        let jitter = self.next_unit();
        let (initial, max) = (self.cfg.initial, self.cfg.max);
        if let Some(t) = self.target(key) {
            t.failures = t.failures.saturating_add(1);
            t.due = Some(now + backoff(initial, max, t.failures, jitter));
        }
    }

    /// A uniform number in [0, 1) (xorshift64*; jitter needs no cryptographic quality).
    fn next_unit(&mut self) -> f64 {
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Wait before retry number `failures` (1 = after the first failure): `initial · 2^(failures−1)`
/// capped at `max`, times a jitter factor in [0.75, 1.25) so that nodes cut off together do not
/// all redial at the same instant.
pub fn backoff(initial: Duration, max: Duration, failures: u32, jitter_unit: f64) -> Duration {
    let exp = 2f64.powi(failures.saturating_sub(1).min(30) as i32);
    let base = (initial.as_secs_f64() * exp).min(max.as_secs_f64());
    Duration::from_secs_f64(base * (0.75 + 0.5 * jitter_unit.clamp(0.0, 1.0)))
}

/// Discovery dials (from adverts / mDNS) in flight. They count towards `target_peers`: counting
/// only established connections made every node dial every peer whose advert arrived before its
/// first dials completed — an all-to-all connection storm at 50+ nodes.
#[derive(Debug)]
pub struct DiscoveryDials {
    in_flight: HashMap<PeerId, Instant>,
    target_peers: usize,
    /// A dial that never reports back (should not happen) is forgotten after this long, so it
    /// cannot block discovery forever.
    give_up_after: Duration,
}

impl DiscoveryDials {
    /// Dial while connections plus dials in flight stay below `target_peers`.
    pub fn new(target_peers: usize, give_up_after: Duration) -> Self {
        Self {
            in_flight: HashMap::new(),
            target_peers,
            give_up_after,
        }
    }

    /// Whether to dial `peer` now (not connected, not being dialled, below the target); the
    /// caller reports a started dial with [`Self::dialing`].
    pub fn wants(
        &mut self,
        peer: &PeerId,
        connected: bool,
        connections: usize,
        now: Instant,
    ) -> bool {
        if connected || self.in_flight.contains_key(peer) {
            return false;
        }
        let give_up = self.give_up_after;
        self.in_flight
            .retain(|_, t| now.saturating_duration_since(*t) < give_up);
        connections + self.in_flight.len() < self.target_peers
    }

    /// The dial to start towards `peer` (which [`Self::wants`]) at `addrs`, if any: none without
    /// addresses, nor when both of us are behind NATs and `peer` is to dial us.
    ///
    /// Two peers both behind NATs (each holds a relay reservation) learn of each other at the
    /// same moment from their adverts; if both dial, two relayed connections form and both start
    /// a hole punch at once, dialling and listening on the same ports, and the punches collide
    /// and fail. Only the smaller peer id dials such a peer; the other waits for it.
    pub fn dial_opts(
        local: &PeerId,
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        we_are_relayed: impl FnOnce() -> bool,
    ) -> Option<DialOpts> {
        if addrs.is_empty() {
            return None;
        }
        let via_relay = addrs
            .iter()
            .any(|a| a.iter().any(|p| matches!(p, Protocol::P2pCircuit)));
        if via_relay && we_are_relayed() && *local > peer {
            return None;
        }
        Some(dial_known(peer, addrs))
    }

    /// A dial to `peer` started.
    pub fn dialing(&mut self, peer: PeerId, now: Instant) {
        self.in_flight.insert(peer, now);
    }

    /// The dial to `peer` ended (connected or failed).
    pub fn done(&mut self, peer: &PeerId) {
        self.in_flight.remove(peer);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16, peer: Option<PeerId>) -> Multiaddr {
        let a: Multiaddr = format!("/ip4/127.0.0.1/tcp/{port}").parse().expect("addr");
        match peer {
            Some(p) => a.with(Protocol::P2p(p)),
            None => a,
        }
    }

    #[test]
    fn backoff_doubles_caps_and_jitters() {
        let (i, m) = (Duration::from_millis(250), Duration::from_secs(5));
        assert_eq!(backoff(i, m, 1, 0.5), Duration::from_millis(250));
        assert_eq!(backoff(i, m, 2, 0.5), Duration::from_millis(500));
        assert_eq!(backoff(i, m, 3, 0.5), Duration::from_secs(1));
        assert_eq!(backoff(i, m, 20, 0.5), m, "capped");
        assert_eq!(backoff(i, m, u32::MAX, 0.5), m, "no overflow");
        assert_eq!(backoff(i, m, 1, 0.0), Duration::from_micros(187_500));
        assert!(backoff(i, m, 1, 0.999) < Duration::from_micros(312_500));
    }

    #[test]
    fn bootstrap_is_redialled_until_connected_then_after_every_loss() {
        let t0 = Instant::now();
        let mut r = Redialer::new(RedialConfig::default(), vec![addr(1, None)], 8, t0, 7);
        let none = |_: &PeerId| false;
        let d = r.due(t0, none);
        assert_eq!(d.len(), 1);
        assert_eq!(r.due(t0, none), vec![], "in flight: not due again");
        let c1 = ConnectionId::new_unchecked(1);
        r.dialing(d[0].key, c1);
        assert_eq!(r.on_dial_failed(c1, t0), Some((DialKey::Bootstrap(0), 1)));
        assert_eq!(r.due(t0, none), vec![], "backing off");
        let mut t = t0;
        let mut waits = Vec::new();
        for n in 2..=8u32 {
            // Step time until due (bounded).
            let before = t;
            let d = loop {
                t += Duration::from_millis(10);
                let d = r.due(t, none);
                if !d.is_empty() || t - before > Duration::from_secs(10) {
                    break d;
                }
            };
            assert_eq!(d.len(), 1, "retry {n} came");
            waits.push(t - before);
            let c = ConnectionId::new_unchecked(n as usize);
            r.dialing(d[0].key, c);
            assert_eq!(r.on_dial_failed(c, t).map(|x| x.1), Some(n));
        }
        assert!(waits[1] > waits[0], "{waits:?}");
        assert!(
            waits.iter().all(|w| *w <= Duration::from_millis(6_300)),
            "{waits:?}"
        );
        // Connected: learns the peer, stops dialling; lost: dialled again soon.
        let peer = PeerId::random();
        let d = loop {
            t += Duration::from_millis(10);
            let d = r.due(t, none);
            if !d.is_empty() {
                break d;
            }
        };
        let c = ConnectionId::new_unchecked(100);
        r.dialing(d[0].key, c);
        r.on_connected(peer, c);
        assert_eq!(r.due(t + Duration::from_secs(60), |_| false), vec![]);
        r.on_disconnected(peer, vec![], t);
        let d = r.due(t + Duration::from_millis(250), none);
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].peer, Some(peer));
    }

    #[test]
    fn lost_peers_are_redialled_while_known_and_bounded() {
        let t0 = Instant::now();
        let mut r = Redialer::new(RedialConfig::default(), vec![], 2, t0, 1);
        let (a, b, c) = (PeerId::random(), PeerId::random(), PeerId::random());
        r.on_disconnected(a, vec![addr(1, Some(a))], t0);
        r.on_disconnected(b, vec![addr(2, Some(b))], t0);
        r.on_disconnected(c, vec![addr(3, Some(c))], t0);
        assert_eq!(r.lost_len(), 2, "bounded");
        r.on_disconnected(PeerId::random(), vec![], t0);
        assert_eq!(r.lost_len(), 2, "no addresses: nothing to redial");
        let later = t0 + Duration::from_secs(1);
        // `b` reconnected on its own meanwhile: skipped and dropped from the schedule.
        let d = r.due(later, |p| *p == b);
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].key, DialKey::Lost(a));
        r.forget(&a);
        r.on_connected(b, ConnectionId::new_unchecked(9));
        assert_eq!(r.lost_len(), 0);
    }

    #[test]
    fn due_dials_are_by_peer_when_known_else_by_address() {
        let peer = PeerId::random();
        let known = Dial {
            key: DialKey::Lost(peer),
            peer: Some(peer),
            addrs: vec![addr(1, Some(peer))],
        };
        assert_eq!(known.into_opts().get_peer_id(), Some(peer));
        let bootstrap = Dial {
            key: DialKey::Bootstrap(0),
            peer: None,
            addrs: vec![addr(1, None)],
        };
        assert_eq!(bootstrap.into_opts().get_peer_id(), None);
    }

    #[test]
    fn of_two_relayed_peers_only_the_smaller_id_dials_a_circuit() {
        let (a, b) = (PeerId::random(), PeerId::random());
        let (small, large) = if a < b { (a, b) } else { (b, a) };
        let relay = PeerId::random();
        let circuit = addr(1, Some(relay))
            .with(Protocol::P2pCircuit)
            .with(Protocol::P2p(small));
        let dial = |local: &PeerId, peer, addrs, relayed| {
            DiscoveryDials::dial_opts(local, peer, addrs, || relayed).map(|o| o.get_peer_id())
        };
        assert_eq!(dial(&large, small, vec![], false), None, "no address");
        assert_eq!(
            dial(&large, small, vec![circuit.clone()], true),
            None,
            "the smaller id dials us"
        );
        let circuit_to_large = addr(1, Some(relay))
            .with(Protocol::P2pCircuit)
            .with(Protocol::P2p(large));
        assert_eq!(
            dial(&small, large, vec![circuit_to_large], true),
            Some(Some(large))
        );
        assert_eq!(
            dial(&large, small, vec![circuit], false),
            Some(Some(small)),
            "we are reachable: no collision"
        );
        assert_eq!(
            dial(&large, small, vec![addr(2, Some(small))], true),
            Some(Some(small)),
            "a direct address"
        );
    }

    #[test]
    fn discovery_dials_count_towards_the_target_and_lapse() {
        let mut d = DiscoveryDials::new(2, Duration::from_secs(4));
        let (a, b, c) = (PeerId::random(), PeerId::random(), PeerId::random());
        let t0 = Instant::now();
        assert!(!d.wants(&a, true, 0, t0), "connected already");
        assert!(d.wants(&a, false, 0, t0));
        d.dialing(a, t0);
        assert!(!d.wants(&a, false, 0, t0), "being dialled");
        assert!(d.wants(&b, false, 0, t0));
        d.dialing(b, t0);
        assert!(
            !d.wants(&c, false, 0, t0),
            "two dials in flight reach the target"
        );
        d.done(&a);
        assert!(d.wants(&c, false, 0, t0));
        assert!(!d.wants(&c, false, 1, t0), "one connection and one dial");
        assert!(
            d.wants(&c, false, 1, t0 + Duration::from_secs(4)),
            "b's dial lapsed"
        );
    }
}
