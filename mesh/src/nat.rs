//! NAT traversal for edge nodes: libp2p circuit relay v2, DCUtR hole punching and AutoNAT.
//!
//! * A publicly reachable node may serve as a **relay** (`nat.relay_server`): nodes behind NAT
//!   reserve a slot on it and listen on `<relay addr>/p2p-circuit`, an address they gossip in
//!   their adverts like any other, so a home can reach (call, award) an edge node it could never
//!   dial directly. Circuits are bounded in number, duration and bytes; the bounds default high
//!   enough for KV transfers to cross a relay when hole punching fails.
//! * Over each relayed connection, **DCUtR** (`/libp2p/dcutr`) synchronises a simultaneous dial
//!   from both ends through both NATs (TCP simultaneous open). When it succeeds the relayed
//!   connection is closed, so every later stream (auction calls, KV) takes the direct one.
//!   DCUtR works with the addresses peers observed us at (identify), which a NAT that keeps
//!   source ports makes dialable: TCP dials reuse the listen port.
//! * **AutoNAT** (`nat.autonat`) asks connected peers to dial us back, and answers such asks, so
//!   a node learns whether it is publicly reachable; the verdict is shown in `/mesh`.
//!
//! The relay client transport and behaviours are always built (cheap when idle): any node may
//! dial a peer whose only address is a relayed one. This module keeps the state the swarm task
//! needs ([`NatState`]: which connections are relayed, what succeeded) as a plain state machine
//! over the events; the swarm task forwards events here and closes what it is told to.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use libp2p::multiaddr::Protocol;
use libp2p::swarm::ConnectionId;
use libp2p::{autonat, dcutr, relay, Multiaddr, PeerId};
use serde::{Deserialize, Serialize};

/// `[mesh.nat]`: relay server, relay reservations, AutoNAT.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NatConfig {
    /// Serve circuit relay v2 for other nodes (a node with a public address).
    pub relay_server: bool,
    /// Relays to reserve a slot on and listen through (multiaddrs ending in `/p2p/<relay id>`):
    /// what a node behind NAT sets so others can reach it.
    pub relays: Vec<String>,
    /// Run AutoNAT (v1): probe whether we are publicly reachable, answer others' probes.
    pub autonat: bool,
    /// AutoNAT answers and picks only peers at global IP addresses (`false` for private
    /// networks and tests on private address ranges).
    pub autonat_only_global_ips: bool,
    /// Relay server bounds.
    pub relay_limits: RelayLimits,
}

/// Bounds of a relay server ([`NatConfig::relay_server`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RelayLimits {
    /// Reservations held at once, and per peer.
    pub max_reservations: usize,
    pub max_reservations_per_peer: usize,
    /// How long a reservation lasts before the client renews it.
    #[serde(with = "humantime_serde")]
    pub reservation_duration: Duration,
    /// Circuits relayed at once, and per peer.
    pub max_circuits: usize,
    pub max_circuits_per_peer: usize,
    /// A circuit is closed after this long…
    #[serde(with = "humantime_serde")]
    pub max_circuit_duration: Duration,
    /// …or after this many bytes in each direction (KV transfers cross relays when hole
    /// punching fails: libp2p's default of 128 KiB would cut them).
    pub max_circuit_bytes: u64,
    /// New reservations and circuits one peer may open per minute.
    pub per_peer_per_minute: u32,
}

impl Default for NatConfig {
    fn default() -> Self {
        Self {
            relay_server: false,
            relays: Vec::new(),
            autonat: false,
            autonat_only_global_ips: true,
            relay_limits: RelayLimits::default(),
        }
    }
}

impl Default for RelayLimits {
    fn default() -> Self {
        Self {
            max_reservations: 128,
            max_reservations_per_peer: 4,
            reservation_duration: Duration::from_secs(3600),
            max_circuits: 64,
            max_circuits_per_peer: 8,
            max_circuit_duration: Duration::from_secs(600),
            max_circuit_bytes: 1 << 30,
            per_peer_per_minute: 60,
        }
    }
}

/// Why a NAT setting is unusable.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NatConfigError {
    /// A relay address does not parse or lacks the relay's `/p2p/<id>`.
    #[error("nat.relays entry {addr:?}: {why}")]
    BadRelay {
        /// The configured string.
        addr: String,
        /// What is wrong with it.
        why: String,
    },
}

impl NatConfig {
    /// The listen addresses for the configured relays: `<relay>/p2p-circuit`.
    pub fn relay_listen_addrs(&self) -> Result<Vec<Multiaddr>, NatConfigError> {
        self.relays
            .iter()
            .map(|s| {
                let bad = |why: String| NatConfigError::BadRelay {
                    addr: s.clone(),
                    why,
                };
                let addr: Multiaddr = s.parse().map_err(|e| bad(format!("{e}")))?;
                if !matches!(addr.iter().last(), Some(Protocol::P2p(_))) {
                    return Err(bad("must end in /p2p/<relay peer id>".into()));
                }
                if addr.iter().any(|p| p == Protocol::P2pCircuit) {
                    return Err(bad("name the relay itself, without /p2p-circuit".into()));
                }
                Ok(addr.with(Protocol::P2pCircuit))
            })
            .collect()
    }

    /// The relay server behaviour, when this node serves as a relay.
    pub(crate) fn relay_server(&self, local: PeerId) -> Option<relay::Behaviour> {
        if !self.relay_server {
            return None;
        }
        let l = &self.relay_limits;
        let rate = NonZeroU32::new(l.per_peer_per_minute.max(1)).unwrap_or(NonZeroU32::MIN);
        let cfg = relay::Config {
            max_reservations: l.max_reservations,
            max_reservations_per_peer: l.max_reservations_per_peer,
            reservation_duration: l.reservation_duration,
            max_circuits: l.max_circuits,
            max_circuits_per_peer: l.max_circuits_per_peer,
            max_circuit_duration: l.max_circuit_duration,
            max_circuit_bytes: l.max_circuit_bytes,
            ..relay::Config::default()
        }
        .reservation_rate_per_peer(rate, Duration::from_secs(60))
        .circuit_src_per_peer(rate, Duration::from_secs(60));
        Some(relay::Behaviour::new(local, cfg))
    }

    /// The AutoNAT behaviour, when enabled.
    pub(crate) fn autonat(&self, local: PeerId) -> Option<autonat::Behaviour> {
        self.autonat.then(|| {
            autonat::Behaviour::new(
                local,
                autonat::Config {
                    // The defaults wait 15 s before the first probe; adverts need an answer
                    // within a few advert rounds.
                    boot_delay: Duration::from_secs(2),
                    retry_interval: Duration::from_secs(20),
                    refresh_interval: Duration::from_secs(300),
                    timeout: Duration::from_secs(10),
                    only_global_ips: self.autonat_only_global_ips,
                    ..autonat::Config::default()
                },
            )
        })
    }
}

/// Whether `addr` goes through a relay.
pub fn is_relayed(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| p == Protocol::P2pCircuit)
}

/// How this node is linked to a peer right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Link {
    /// Only through a relay.
    Relayed,
    /// At least one direct connection.
    Direct,
}

/// Counters and verdicts for `/mesh`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct NatSnapshot {
    /// AutoNAT's verdict: `public <addr>`, `private`, `unknown`, or `off`.
    pub reachability: String,
    /// Relays that accepted our reservation (current).
    pub reservations: Vec<String>,
    /// Relayed connections opened (either way).
    pub relayed_connections: u64,
    /// Circuits this node relayed for others.
    pub circuits_relayed: u64,
    /// Hole punches that gave a direct connection / that failed.
    pub hole_punches_ok: u64,
    pub hole_punches_failed: u64,
}

/// What the swarm task must do after an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NatAction {
    /// Close this (relayed) connection: a direct one to the same peer replaces it.
    Close(ConnectionId),
    /// Confirm this address as externally reachable: a relay server serves reservations only
    /// once it has one (libp2p's relay disables itself without).
    ConfirmExternal(Multiaddr),
}

/// NAT state: which connections are relayed, reservations, counters. Shared (read-only) with
/// handles for `/mesh`; written only by the swarm task.
#[derive(Debug, Default)]
pub struct NatState {
    /// Open connections per peer: `true` when relayed.
    conns: HashMap<PeerId, HashMap<ConnectionId, bool>>,
    snapshot: NatSnapshot,
    /// We serve as a relay: our listen addresses are taken as reachable.
    relay_server: bool,
}

/// The shared handle on [`NatState`].
pub type SharedNat = Arc<Mutex<NatState>>;

impl NatState {
    /// A state for a node configured with `cfg`.
    pub fn new(cfg: &NatConfig) -> Self {
        Self {
            conns: HashMap::new(),
            snapshot: NatSnapshot {
                reachability: if cfg.autonat { "unknown" } else { "off" }.into(),
                ..NatSnapshot::default()
            },
            relay_server: cfg.relay_server,
        }
    }

    /// We listen on `addr`: a relay server announces it as reachable (the operator made it
    /// the relay because it is; a relay behind NAT would be of no use).
    pub fn on_new_listen_addr(&mut self, addr: &Multiaddr) -> Vec<NatAction> {
        if self.relay_server && !is_relayed(addr) {
            vec![NatAction::ConfirmExternal(addr.clone())]
        } else {
            Vec::new()
        }
    }

    /// A connection to `peer` opened; `relayed` when its address has `/p2p-circuit`.
    pub fn on_established(&mut self, peer: PeerId, conn: ConnectionId, relayed: bool) {
        if relayed {
            self.snapshot.relayed_connections += 1;
        }
        self.conns.entry(peer).or_default().insert(conn, relayed);
    }

    /// A connection closed.
    pub fn on_closed(&mut self, peer: PeerId, conn: ConnectionId) {
        if let Some(m) = self.conns.get_mut(&peer) {
            m.remove(&conn);
            if m.is_empty() {
                self.conns.remove(&peer);
            }
        }
    }

    /// How we are linked to `peer` (`None`: not connected).
    pub fn link(&self, peer: &PeerId) -> Option<Link> {
        let m = self.conns.get(peer)?;
        if m.values().any(|relayed| !relayed) {
            Some(Link::Direct)
        } else if m.is_empty() {
            None
        } else {
            Some(Link::Relayed)
        }
    }

    /// Whether a relay holds a reservation for us (we are reachable through a circuit).
    pub fn has_reservation(&self) -> bool {
        !self.snapshot.reservations.is_empty()
    }

    /// Counters and verdicts.
    pub fn snapshot(&self) -> NatSnapshot {
        self.snapshot.clone()
    }

    /// A hole punch to `peer` ended. On success, every relayed connection to it is to be
    /// closed: libp2p picks a random connection for each new stream, and a relayed one costs
    /// the relay's bandwidth and its circuit limits.
    pub fn on_dcutr(&mut self, ev: &dcutr::Event) -> Vec<NatAction> {
        match &ev.result {
            Ok(direct) => {
                self.snapshot.hole_punches_ok += 1;
                tracing::info!(peer = %ev.remote_peer_id, "hole punch succeeded: direct connection");
                self.conns
                    .get(&ev.remote_peer_id)
                    .map(|m| {
                        m.iter()
                            .filter(|(c, relayed)| **relayed && *c != direct)
                            .map(|(c, _)| NatAction::Close(*c))
                            .collect()
                    })
                    .unwrap_or_default()
            }
            Err(e) => {
                self.snapshot.hole_punches_failed += 1;
                tracing::info!(peer = %ev.remote_peer_id, error = %e, "hole punch failed: staying on the relay");
                Vec::new()
            }
        }
    }

    /// A relay client event (our reservations, circuits through relays).
    pub fn on_relay_client(&mut self, ev: &relay::client::Event) {
        match ev {
            relay::client::Event::ReservationReqAccepted {
                relay_peer_id,
                renewal,
                ..
            } => {
                let r = relay_peer_id.to_string();
                if !self.snapshot.reservations.contains(&r) {
                    self.snapshot.reservations.push(r);
                }
                if !renewal {
                    tracing::info!(relay = %relay_peer_id, "relay reservation accepted: reachable through it");
                }
            }
            other => tracing::debug!(event = ?other, "relay client"),
        }
    }

    /// A relay server event (circuits we relay for others).
    pub fn on_relay_server(&mut self, ev: &relay::Event) {
        match ev {
            relay::Event::CircuitReqAccepted {
                src_peer_id,
                dst_peer_id,
            } => {
                self.snapshot.circuits_relayed += 1;
                tracing::info!(src = %src_peer_id, dst = %dst_peer_id, "relaying a circuit");
            }
            relay::Event::ReservationReqAccepted { src_peer_id, .. } => {
                tracing::info!(peer = %src_peer_id, "relay reservation granted");
            }
            other => tracing::debug!(event = ?other, "relay server"),
        }
    }

    /// An AutoNAT event.
    pub fn on_autonat(&mut self, ev: &autonat::Event) {
        if let autonat::Event::StatusChanged { new, .. } = ev {
            self.snapshot.reachability = match new {
                autonat::NatStatus::Public(a) => format!("public {a}"),
                autonat::NatStatus::Private => "private".into(),
                autonat::NatStatus::Unknown => "unknown".into(),
            };
            tracing::info!(status = %self.snapshot.reachability, "AutoNAT reachability changed");
        }
    }
}

/// Follows connections opening and closing (which are relayed) and our listen addresses.
pub(crate) fn on_swarm_event<E>(
    nat: &SharedNat,
    ev: &libp2p::swarm::SwarmEvent<E>,
) -> Vec<NatAction> {
    use libp2p::swarm::SwarmEvent;
    match ev {
        SwarmEvent::NewListenAddr { address, .. } => write(nat, |n| n.on_new_listen_addr(address)),
        SwarmEvent::ConnectionEstablished {
            peer_id,
            connection_id,
            endpoint,
            ..
        } => {
            write(nat, |n| {
                n.on_established(*peer_id, *connection_id, endpoint.is_relayed())
            });
            Vec::new()
        }
        SwarmEvent::ConnectionClosed {
            peer_id,
            connection_id,
            ..
        } => {
            write(nat, |n| n.on_closed(*peer_id, *connection_id));
            Vec::new()
        }
        _ => Vec::new(),
    }
}

/// A NAT behaviour's event, for [`on_behaviour_event`].
pub(crate) enum NatEvent {
    RelayClient(relay::client::Event),
    Relay(relay::Event),
    Dcutr(dcutr::Event),
    Autonat(autonat::Event),
}

/// Handles a NAT behaviour's event; returns what the swarm task must do.
pub(crate) fn on_behaviour_event(nat: &SharedNat, ev: NatEvent) -> Vec<NatAction> {
    write(nat, |n| match ev {
        NatEvent::RelayClient(e) => {
            n.on_relay_client(&e);
            Vec::new()
        }
        NatEvent::Relay(e) => {
            n.on_relay_server(&e);
            Vec::new()
        }
        NatEvent::Dcutr(e) => n.on_dcutr(&e),
        NatEvent::Autonat(e) => {
            n.on_autonat(&e);
            Vec::new()
        }
    })
}

/// Reads the shared state without poisoning concerns (a panicked writer leaves counters only).
pub fn read<T>(nat: &SharedNat, f: impl FnOnce(&NatState) -> T) -> T {
    match nat.lock() {
        Ok(g) => f(&g),
        Err(p) => f(&p.into_inner()),
    }
}

/// Writes the shared state (see [`read`]).
pub fn write<T>(nat: &SharedNat, f: impl FnOnce(&mut NatState) -> T) -> T {
    match nat.lock() {
        Ok(mut g) => f(&mut g),
        Err(p) => f(&mut p.into_inner()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer() -> PeerId {
        libp2p::identity::Keypair::generate_ed25519()
            .public()
            .to_peer_id()
    }

    #[test]
    fn relay_addresses_need_the_relay_id() {
        let id = peer();
        let mut c = NatConfig {
            relays: vec![format!("/ip4/203.0.113.7/tcp/4001/p2p/{id}")],
            ..NatConfig::default()
        };
        let got = c.relay_listen_addrs().expect("valid");
        assert_eq!(
            got[0].to_string(),
            format!("/ip4/203.0.113.7/tcp/4001/p2p/{id}/p2p-circuit")
        );
        assert!(is_relayed(&got[0]));
        for bad in [
            "/ip4/203.0.113.7/tcp/4001".to_owned(),
            "not an address".to_owned(),
            format!("/ip4/203.0.113.7/tcp/4001/p2p/{id}/p2p-circuit/p2p/{id}"),
        ] {
            c.relays = vec![bad.clone()];
            let e = c.relay_listen_addrs().expect_err(&bad).to_string();
            assert!(e.contains("nat.relays"), "{bad}: {e}");
        }
    }

    #[test]
    fn a_successful_hole_punch_closes_the_relayed_connections() {
        let mut s = NatState::new(&NatConfig::default());
        let p = peer();
        let (relayed, direct) = (
            ConnectionId::new_unchecked(1),
            ConnectionId::new_unchecked(2),
        );
        s.on_established(p, relayed, true);
        assert_eq!(s.link(&p), Some(Link::Relayed));
        s.on_established(p, direct, false);
        assert_eq!(s.link(&p), Some(Link::Direct));
        let actions = s.on_dcutr(&dcutr::Event {
            remote_peer_id: p,
            result: Ok(direct),
        });
        assert_eq!(actions, vec![NatAction::Close(relayed)]);
        s.on_closed(p, relayed);
        s.on_closed(p, direct);
        assert_eq!(s.link(&p), None);
        let snap = s.snapshot();
        assert_eq!(
            (snap.hole_punches_ok, snap.relayed_connections),
            (1, 1),
            "{snap:?}"
        );
        assert_eq!(snap.reachability, "off");
        let tcp: Multiaddr = "/ip4/203.0.113.7/tcp/4001".parse().expect("static");
        assert!(s.on_new_listen_addr(&tcp).is_empty(), "not a relay server");
        let mut relay = NatState::new(&NatConfig {
            relay_server: true,
            ..NatConfig::default()
        });
        assert_eq!(
            relay.on_new_listen_addr(&tcp),
            vec![NatAction::ConfirmExternal(tcp.clone())]
        );
        assert!(relay
            .on_new_listen_addr(&tcp.with(Protocol::P2pCircuit))
            .is_empty());
    }
}
