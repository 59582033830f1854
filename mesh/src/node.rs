//! The swarm task: a router. It owns the `Swarm` and one state machine per protocol, passes each
//! swarm event and handle command to the machine it concerns, and carries out what the machine
//! returns (send a response, dial, publish, emit an event). The decisions live in the machines,
//! each tested without a swarm:
//!
//! * [`AdvertPublisher`] — our advert, when to publish it (`/prfaas/advert/2`);
//! * [`AdvertIntake`] — admission of signed adverts from gossip and table sync;
//! * [`TableSync`] — `/prfaas/table/1`, as asker and as server;
//! * [`AuctionServer`] / [`AuctionClient`] — `/prfaas/auction/2`, bidder and home;
//! * the KV [`Acceptor`] — `/prfaas/kv/2` receiver (its own task);
//! * [`Prober`] — bandwidth probes;
//! * [`Redialer`] / [`DiscoveryDials`] — membership, with [`transport`](crate::transport)
//!   building the swarm.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use futures::StreamExt;
use libp2p::gossipsub::{self, IdentTopic};
use libp2p::identity::Keypair;
use libp2p::multiaddr::Protocol;
use libp2p::request_response::{self, OutboundRequestId, ResponseChannel};
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{ConnectionId, DialError, SwarmEvent};
use libp2p::{mdns, Multiaddr, PeerId, Swarm};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::advert::intake::{unix_ms, AdvertIntake, IntakeLimits, Origin};
use crate::advert::publisher::AdvertPublisher;
use crate::advert::table_sync::TableSync;
use crate::advert::{BandwidthReport, PeerTable};
use crate::auction::client::AuctionClient;
use crate::auction::server::{AuctionServer, ServerLimits};
use crate::auction::{AuctionResponse, ServeGate};
use crate::bandwidth::BandwidthEstimator;
use crate::behaviour::{MeshBehaviour, MeshBehaviourEvent};
use crate::config::MeshConfig;
use crate::discovery::{DialKey, DiscoveryDials, Redialer};
use crate::event::MeshEvent;
use crate::handle::{emulated_rate, Command, EmulatedRates, MeshHandle, Shared};
use crate::kv::quota::ExpectedTransfers;
use crate::kv::receiver::{Acceptor, ReceiverLimits};
use crate::kv::sender::SenderLimits;
use crate::nat::{NatAction, NatEvent, NatState, SharedNat};
use crate::probe::{probe, Prober};
use crate::reputation::Reputation;
use crate::stats::MeshStats;
use crate::transport::{self, Allowlist};
use crate::MeshError;
use std::sync::atomic::Ordering;

/// Entry point: builds a node from a [`MeshConfig`] and runs it in its own task.
#[derive(Debug)]
pub struct Mesh;

struct Task {
    swarm: Swarm<MeshBehaviour>,
    /// Relayed vs direct connections, hole punches, reachability (`crate::nat`).
    nat: SharedNat,
    cfg: MeshConfig,
    topic: IdentTopic,
    events: mpsc::Sender<MeshEvent>,
    stats: Arc<MeshStats>,
    allowlist: Allowlist,
    table: PeerTable,
    publisher: AdvertPublisher,
    intake: AdvertIntake,
    sync: TableSync,
    server: AuctionServer<ResponseChannel<AuctionResponse>>,
    client: AuctionClient<OutboundRequestId>,
    prober: Prober,
    /// Redials bootstrap addresses and lost peers (backoff + jitter).
    redial: Redialer,
    discovery: DiscoveryDials,
    /// Dials the application asked for, answered when they connect or fail.
    dials: HashMap<ConnectionId, oneshot::Sender<Result<PeerId, MeshError>>>,
    listen_addrs: Vec<Multiaddr>,
    listen_waiters: Vec<oneshot::Sender<Vec<Multiaddr>>>,
    estimator: Arc<Mutex<BandwidthEstimator>>,
    control: libp2p_stream::Control,
    emulated_rate: EmulatedRates,
    next_transfer: Arc<AtomicU64>,
    /// Transfer records; banned peers are no auction candidates.
    reputation: Arc<Mutex<Reputation>>,
}

impl Mesh {
    /// Starts a node. Must be called inside a tokio runtime. Returns the handle and the bounded
    /// event stream; the node runs until [`MeshHandle::shutdown`] or every handle is dropped.
    pub fn spawn(cfg: MeshConfig) -> Result<(MeshHandle, mpsc::Receiver<MeshEvent>), MeshError> {
        cfg.check_exposure()?;
        let key = cfg
            .keypair
            .clone()
            .unwrap_or_else(Keypair::generate_ed25519);
        let local = key.public().to_peer_id();
        let allowlist = Allowlist::from_config(cfg.allowlist.as_deref(), local)?;
        let transport::Built {
            swarm,
            topic,
            control,
            incoming,
        } = transport::build(&cfg, &key, &allowlist)?;
        let bootstrap = cfg
            .bootstrap
            .iter()
            .map(|b| {
                b.parse::<Multiaddr>()
                    .map_err(|e| MeshError::Config(format!("bootstrap {b}: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;

        let (cmd_tx, cmd_rx) = mpsc::channel(cfg.limits.command_queue.max(1));
        let (ev_tx, ev_rx) = mpsc::channel(cfg.limits.event_queue.max(1));
        let cancel = CancellationToken::new();
        let stats = Arc::new(MeshStats::default());
        let estimator = Arc::new(Mutex::new(BandwidthEstimator::new(
            cfg.bandwidth.ewma_alpha,
            cfg.bandwidth.min_sample_bytes,
            cfg.limits.max_known_peers,
        )));
        let max_streams = cfg.limits.max_streams_per_transfer.max(1);
        let recv_limits = ReceiverLimits {
            max_piece_bytes: cfg.limits.max_piece_bytes,
            max_transfer_bytes: cfg.limits.max_transfer_bytes,
            max_trailer_bytes: cfg.limits.max_trailer_bytes,
            max_streams,
            idle_timeout: cfg.limits.kv_idle_timeout,
        };
        let sender_limits = SenderLimits::new(&cfg.limits);
        let emulated_rate = EmulatedRates::default();
        // Unique-ish start so a restarted sender does not reuse ids a receiver still remembers.
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let next_transfer = Arc::new(AtomicU64::new(seed));

        // Awards in flight bound the transfers a home awaits; this bound is far above them.
        let expected = ExpectedTransfers::new(cfg.limits.max_pending_transfers.max(1) * 16);
        let acceptor = Acceptor {
            limits: recv_limits,
            estimator: estimator.clone(),
            stats: stats.clone(),
            allowlist: allowlist.set(),
            max_pending_transfers: cfg.limits.max_pending_transfers,
            probe_max_bytes: cfg.bandwidth.probe_bytes.max(1),
            expected: expected.clone(),
            max_hellos_per_peer: cfg.limits.max_kv_hellos_per_peer.max(1),
            min_probe_interval: cfg.limits.min_probe_interval,
            accept_unexpected: cfg.limits.accept_unexpected_kv,
        };
        let kv_events = ev_tx.clone();
        let serve_gate = ServeGate::default();
        let reputation = Arc::new(Mutex::new(Reputation::new(
            cfg.reputation.clone(),
            cfg.limits.max_known_peers,
        )));
        tokio::spawn(acceptor.run(incoming, cancel.clone(), move |inc| {
            kv_events.try_send(MeshEvent::KvIncoming(inc)).is_ok()
        }));

        let redial = Redialer::new(
            cfg.redial.clone(),
            bootstrap,
            cfg.limits.max_known_peers,
            Instant::now(),
            seed,
        );
        let now = Instant::now();
        let l = &cfg.limits;
        let nat: SharedNat = Arc::new(Mutex::new(NatState::new(&cfg.nat)));
        let task = Task {
            nat: nat.clone(),
            swarm,
            topic,
            events: ev_tx,
            stats: stats.clone(),
            table: PeerTable::new(l.max_known_peers),
            publisher: AdvertPublisher::new(
                key,
                cfg.region.clone(),
                cfg.effective_advert_refresh(),
                l.max_advert_bytes,
                unix_ms(),
            ),
            intake: AdvertIntake::new(
                IntakeLimits {
                    max_advert_bytes: l.max_advert_bytes,
                    max_known_peers: l.max_known_peers,
                    advert_interval: cfg.advert_interval,
                    advert_expiry: cfg.advert_expiry,
                    max_clock_skew: l.max_clock_skew,
                },
                local,
                allowlist.clone(),
                stats.clone(),
            ),
            sync: TableSync::new(cfg.table_sync.clone(), l.max_known_peers, now),
            server: AuctionServer::new(
                ServerLimits {
                    max_pending_calls: l.max_pending_calls,
                    max_pending_calls_per_peer: l.max_pending_calls_per_peer,
                    max_outstanding_bids: l.max_outstanding_bids,
                    max_outstanding_bids_per_peer: l.max_outstanding_bids_per_peer,
                },
                serve_gate.clone(),
                stats.clone(),
            ),
            client: AuctionClient::new(l.max_pending_calls.max(1) * 4),
            prober: Prober::new(
                cfg.bandwidth.probes,
                cfg.bandwidth.stale_after,
                l.max_known_peers,
            ),
            redial,
            discovery: DiscoveryDials::new(cfg.target_peers, l.handshake_timeout * 2),
            dials: HashMap::new(),
            listen_addrs: vec![],
            listen_waiters: vec![],
            estimator: estimator.clone(),
            allowlist,
            control: control.clone(),
            emulated_rate: emulated_rate.clone(),
            next_transfer: next_transfer.clone(),
            reputation: reputation.clone(),
            cfg: cfg.clone(),
        };
        let join = tokio::spawn(task.run(cmd_rx, cancel.clone()));
        let shared = Shared {
            local_peer_id: local,
            commands: cmd_tx,
            cancel,
            task: tokio::sync::Mutex::new(Some(join)),
            control,
            estimator,
            stats,
            added_latency: RwLock::new(HashMap::new()),
            emulated_rate,
            next_transfer,
            streams_per_transfer: cfg.streams_per_transfer.max(1),
            max_streams,
            sender_limits,
            serve_gate,
            reputation,
            nat,
            expected,
        };
        Ok((
            MeshHandle {
                shared: Arc::new(shared),
            },
            ev_rx,
        ))
    }
}

impl Task {
    async fn run(mut self, mut commands: mpsc::Receiver<Command>, cancel: CancellationToken) {
        let mut advert_tick =
            tokio::time::interval(self.cfg.advert_interval.max(Duration::from_millis(10)));
        advert_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let maint_period =
            (self.cfg.advert_expiry / 4).clamp(Duration::from_millis(20), Duration::from_secs(1));
        let mut maintenance = tokio::time::interval(maint_period);
        maintenance.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Redials are checked more often than maintenance runs, so a healed link is used soon.
        let mut redial_tick = tokio::time::interval(
            (self.cfg.redial.initial / 2)
                .clamp(Duration::from_millis(20), Duration::from_millis(250)),
        );
        redial_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = cancel.cancelled() => break,
                cmd = commands.recv() => match cmd {
                    Some(c) => self.on_command(c),
                    None => break,
                },
                ev = self.swarm.select_next_some() => self.on_swarm_event(ev),
                _ = advert_tick.tick() => {
                    if self.publisher.due(Instant::now()) {
                        self.publish_advert();
                    }
                }
                _ = maintenance.tick() => self.maintain(),
                _ = redial_tick.tick() => self.redial(),
            }
        }
        cancel.cancel(); // stop the KV acceptor too when every handle was dropped
        tracing::debug!(peer = %self.swarm.local_peer_id(), "mesh task stopped");
    }

    fn emit(&self, ev: MeshEvent) {
        if self.events.try_send(ev).is_err() {
            self.stats.dropped_events.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn respond(&mut self, out: Option<(ResponseChannel<AuctionResponse>, AuctionResponse)>) {
        if let Some((channel, resp)) = out {
            let _ = self
                .swarm
                .behaviour_mut()
                .auction
                .send_response(channel, resp);
        }
    }

    fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::Dial(addr, reply) => {
                let opts = DialOpts::unknown_peer_id().address(addr).build();
                let id = opts.connection_id();
                match self.swarm.dial(opts) {
                    Ok(()) => {
                        self.dials.insert(id, reply);
                    }
                    Err(e) => {
                        let _ = reply.send(Err(MeshError::Dial(e.to_string())));
                    }
                }
            }
            Command::SetAdvert(body) => {
                self.publisher.set_body(*body);
                self.publish_advert();
            }
            Command::Candidates(model, reply) => {
                let now = Instant::now();
                let rep = self.reputation.lock().ok();
                let v = self
                    .table
                    .prefill_candidates(&model)
                    .into_iter()
                    .filter(|(p, _)| rep.as_ref().is_none_or(|r| !r.is_banned(p, now)))
                    .map(|(p, a)| (p, a.clone()))
                    .collect();
                let _ = reply.send(v);
            }
            Command::KnownPeers(reply) => {
                let _ = reply.send(self.table.peers().map(|(p, _)| *p).collect());
            }
            Command::Adverts(reply) => {
                let now = Instant::now();
                let _ = reply.send(
                    self.table
                        .peers()
                        .map(|(p, e)| crate::handle::KnownAdvert {
                            peer: *p,
                            advert: e.advert.clone(),
                            age: now.saturating_duration_since(e.received_at),
                        })
                        .collect(),
                );
            }
            Command::ConnectedPeers(reply) => {
                let _ = reply.send(self.swarm.connected_peers().copied().collect());
            }
            Command::ListenAddrs(reply) => {
                if self.listen_addrs.is_empty() {
                    self.listen_waiters.push(reply);
                } else {
                    let _ = reply.send(self.listen_addrs.clone());
                }
            }
            Command::Request(peer, req, reply) => {
                let Some(reply) = self.client.admit(reply) else {
                    return;
                };
                // One dial, owned by request-response, with the advertised addresses: it queues
                // the request until that connection is up (or fails it if the dial fails).
                let addrs = if self.swarm.is_connected(&peer) {
                    Vec::new()
                } else {
                    self.advertised_addrs(&peer)
                };
                let id = self
                    .swarm
                    .behaviour_mut()
                    .auction
                    .send_request_with_addresses(&peer, req, addrs);
                self.client.sent(id, reply);
            }
            Command::AnswerCall(token, answer) => {
                let out = self.server.answer(token, answer, Instant::now());
                self.respond(out);
            }
        }
    }

    /// Dials a peer learned from an advert or mDNS while established connections plus discovery
    /// dials in flight stay below `target_peers`.
    fn discovery_dial(&mut self, peer: PeerId, addrs: impl FnOnce() -> Vec<Multiaddr>) {
        let now = Instant::now();
        let connected = self.swarm.is_connected(&peer);
        let connections = self.swarm.connected_peers().count();
        if !self.discovery.wants(&peer, connected, connections, now) {
            return;
        }
        let addrs = addrs();
        if addrs.is_empty() {
            return;
        }
        // Two peers both behind NATs (each holds a relay reservation) learn of each other at the
        // same moment from their adverts; if both dial, two relayed connections form and both
        // start a hole punch at once, dialling and listening on the same ports, and the punches
        // collide and fail. Only the smaller peer id dials such a peer; the other waits for it.
        let via_relay = addrs
            .iter()
            .any(|a| a.iter().any(|p| matches!(p, Protocol::P2pCircuit)));
        let we_are_relayed = self.nat.lock().is_ok_and(|n| n.has_reservation());
        if via_relay && we_are_relayed && *self.swarm.local_peer_id() > peer {
            return;
        }
        let opts = DialOpts::peer_id(peer)
            .addresses(addrs)
            .condition(PeerCondition::DisconnectedAndNotDialing)
            .build();
        if self.swarm.dial(opts).is_ok() {
            self.discovery.dialing(peer, now);
        }
    }

    /// `peer`'s advertised listen addresses (at most 8), for dialling it.
    fn advertised_addrs(&self, peer: &PeerId) -> Vec<Multiaddr> {
        self.table
            .get(peer)
            .map(|e| {
                e.advert
                    .listen_addrs
                    .iter()
                    .filter_map(|a| a.parse().ok())
                    .take(8)
                    .collect()
            })
            .unwrap_or_default()
    }

    fn publish_advert(&mut self) {
        let observed_bandwidth = self
            .estimator
            .lock()
            .map(|e| e.top(8))
            .unwrap_or_default()
            .into_iter()
            .map(|(p, b)| BandwidthReport {
                peer: p.to_base58(),
                bytes_per_sec: b,
            })
            .collect();
        let local = *self.swarm.local_peer_id();
        let signed = self.publisher.sign_next(
            &local,
            &self.listen_addrs,
            observed_bandwidth,
            Instant::now(),
            unix_ms(),
        );
        match signed {
            Ok(bytes) => {
                let topic = self.topic.clone();
                match self.swarm.behaviour_mut().gossipsub.publish(topic, bytes) {
                    Ok(_) => {
                        self.stats.adverts_published.fetch_add(1, Ordering::Relaxed);
                        self.publisher.published(true);
                    }
                    Err(e) => {
                        // InsufficientPeers before anyone joined is expected.
                        self.publisher.published(false);
                        tracing::trace!(error = %e, "advert not published");
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "own advert does not encode within the limit"),
        }
    }

    /// Starts the redials that are due (bootstrap addresses, lost peers).
    fn redial(&mut self) {
        let now = Instant::now();
        let swarm = &self.swarm;
        let due = self.redial.due(now, |p| swarm.is_connected(p));
        for d in due {
            let opts = match d.peer {
                Some(p) => DialOpts::peer_id(p)
                    .addresses(d.addrs)
                    .condition(PeerCondition::DisconnectedAndNotDialing)
                    .build(),
                None => DialOpts::unknown_peer_id()
                    .address(d.addrs[0].clone())
                    .build(),
            };
            let id = opts.connection_id();
            match self.swarm.dial(opts) {
                Ok(()) => self.redial.dialing(d.key, id),
                Err(e) => {
                    tracing::debug!(key = ?d.key, error = %e, "redial not started");
                    self.redial.failed_to_start(d.key, now);
                }
            }
        }
    }

    fn maintain(&mut self) {
        let now = Instant::now();
        let connected: Vec<PeerId> = self.swarm.connected_peers().copied().collect();
        if let Some((peer, req)) = self.sync.followup(now, connected.iter()) {
            self.swarm.behaviour_mut().table.send_request(&peer, req);
        }
        for peer in self.table.expire(now, self.cfg.advert_expiry) {
            self.redial.forget(&peer);
            if let Ok(mut e) = self.estimator.lock() {
                e.forget(&peer);
            }
            self.emit(MeshEvent::PeerExpired { peer });
        }
        // Calls the application did not answer in time are declined on its behalf.
        for out in self.server.expire(now) {
            self.respond(Some(out));
        }
        self.maybe_probe(now);
    }

    /// Starts at most one probe at a time, towards a connected mesh peer whose estimate is stale.
    fn maybe_probe(&mut self, now: Instant) {
        let ticket = {
            let Ok(est) = self.estimator.lock() else {
                return;
            };
            let stale_after = self.cfg.bandwidth.stale_after;
            let swarm = &self.swarm;
            let peers = self
                .table
                .peers()
                .map(|(p, _)| *p)
                .filter(|p| swarm.is_connected(p));
            self.prober
                .next(now, peers, |p| est.is_stale(p, now, stale_after))
        };
        let Some(ticket) = ticket else { return };
        let peer = ticket.peer;
        let control = self.control.clone();
        let estimator = self.estimator.clone();
        let limits = SenderLimits {
            emulated_rate: emulated_rate(&self.emulated_rate, &peer),
            ..SenderLimits::new(&self.cfg.limits)
        };
        let probe_bytes = self.cfg.bandwidth.probe_bytes.max(1);
        let id = self.next_transfer.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            let r = probe(control, peer, probe_bytes, id, limits, estimator).await;
            if let Err(e) = r {
                tracing::debug!(%peer, error = %e, "bandwidth probe failed");
            }
            drop(ticket);
        });
    }

    fn on_swarm_event(&mut self, ev: SwarmEvent<MeshBehaviourEvent>) {
        for action in crate::nat::on_swarm_event(&self.nat, &ev) {
            self.apply_nat(action);
        }
        match ev {
            SwarmEvent::NewListenAddr { address, .. } => {
                self.listen_addrs.push(address.clone());
                for w in self.listen_waiters.drain(..) {
                    let _ = w.send(self.listen_addrs.clone());
                }
                self.emit(MeshEvent::Listening { addr: address });
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                num_established,
                endpoint,
                ..
            } => {
                if num_established.get() == 1
                    && endpoint.is_dialer()
                    && self.allowlist.allows(&peer_id)
                {
                    if let Some(req) = self.sync.on_dialled(peer_id, Instant::now()) {
                        self.swarm.behaviour_mut().table.send_request(&peer_id, req);
                    }
                }
                self.redial.on_connected(peer_id, connection_id);
                self.discovery.done(&peer_id);
                if let Some(d) = self.dials.remove(&connection_id) {
                    let _ = d.send(Ok(peer_id));
                }
                if num_established.get() == 1 {
                    self.emit(MeshEvent::PeerConnected { peer: peer_id });
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established: 0,
                ..
            } => {
                // Peers we still hold an advert of are redialled (a partition, a restart).
                let addrs = self.advertised_addrs(&peer_id);
                self.redial.on_disconnected(peer_id, addrs, Instant::now());
                self.emit(MeshEvent::PeerDisconnected { peer: peer_id });
            }
            SwarmEvent::OutgoingConnectionError {
                connection_id,
                peer_id,
                error,
            } => self.on_dial_failed(connection_id, peer_id, error),
            SwarmEvent::IncomingConnectionError { error, .. } => {
                // PSK mismatch (handshake fails), allowlist or limits denial.
                self.stats
                    .refused_connections
                    .fetch_add(1, Ordering::Relaxed);
                self.emit(MeshEvent::ConnectionRefused {
                    peer: None,
                    reason: error.to_string(),
                });
            }
            SwarmEvent::Behaviour(b) => self.on_behaviour(b),
            _ => {}
        }
    }

    fn on_dial_failed(&mut self, id: ConnectionId, peer: Option<PeerId>, error: DialError) {
        if matches!(error, DialError::Denied { .. }) {
            self.stats
                .refused_connections
                .fetch_add(1, Ordering::Relaxed);
        }
        if let Some(p) = peer {
            self.discovery.done(&p);
        }
        self.stats.dials_failed.fetch_add(1, Ordering::Relaxed);
        if let Some((key, failures)) = self.redial.on_dial_failed(id, Instant::now()) {
            // Logged at warn for bootstrap peers (a node alone in its mesh is the symptom an
            // operator must be able to find), quieter for other peers.
            match key {
                DialKey::Bootstrap(i) => tracing::warn!(
                    bootstrap = %self.cfg.bootstrap.get(i).map_or("", String::as_str),
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
        if let Some(d) = self.dials.remove(&id) {
            let _ = d.send(Err(MeshError::Dial(error.to_string())));
        } else {
            tracing::debug!(?peer, %error, "outgoing connection failed");
        }
    }

    fn on_nat(&mut self, ev: NatEvent) {
        for action in crate::nat::on_behaviour_event(&self.nat, ev) {
            self.apply_nat(action);
        }
    }

    fn apply_nat(&mut self, action: NatAction) {
        match action {
            NatAction::Close(c) => {
                self.swarm.close_connection(c);
            }
            NatAction::ConfirmExternal(a) => self.swarm.add_external_address(a),
        }
    }

    fn on_behaviour(&mut self, ev: MeshBehaviourEvent) {
        match ev {
            MeshBehaviourEvent::Gossipsub(gossipsub::Event::Message {
                propagation_source,
                message_id,
                message,
            }) => {
                let (verdict, _) = self.on_signed_advert(&message.data, Origin::Gossip);
                let _ = self
                    .swarm
                    .behaviour_mut()
                    .gossipsub
                    .report_message_validation_result(&message_id, &propagation_source, verdict);
            }
            MeshBehaviourEvent::Gossipsub(gossipsub::Event::Subscribed { topic, .. })
                if self.publisher.unsent() && topic == self.topic.hash() =>
            {
                self.publish_advert();
            }
            MeshBehaviourEvent::Auction(request_response::Event::Message {
                peer, message, ..
            }) => match message {
                request_response::Message::Request {
                    request, channel, ..
                } => {
                    if !self.allowlist.allows(&peer) {
                        self.stats.refused_auction.fetch_add(1, Ordering::Relaxed);
                        return; // dropping the channel fails the request on the other side
                    }
                    let events = &self.events;
                    let out = self
                        .server
                        .on_request(peer, request, channel, Instant::now(), |e| {
                            events.try_send(e).is_ok()
                        });
                    self.respond(out);
                }
                request_response::Message::Response {
                    request_id,
                    response,
                } => self.client.resolve(&request_id, Ok(response)),
            },
            MeshBehaviourEvent::Auction(request_response::Event::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            }) => self.client.resolve(
                &request_id,
                Err(MeshError::Request {
                    peer,
                    reason: error.to_string(),
                }),
            ),
            MeshBehaviourEvent::Table(request_response::Event::Message {
                peer, message, ..
            }) => match message {
                request_response::Message::Request {
                    request, channel, ..
                } => {
                    let res = if self.allowlist.allows(&peer) {
                        let own = self.publisher.own_signed();
                        self.sync
                            .serve(peer, &request, own, &self.table, Instant::now())
                    } else {
                        None
                    };
                    match res {
                        Some(res) => {
                            let _ = self.swarm.behaviour_mut().table.send_response(channel, res);
                        }
                        // Dropping the channel fails the request on the other side.
                        None => {
                            self.stats.refused_auction.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                request_response::Message::Response { response, .. } => {
                    let max_new = self.cfg.table_sync.max_new_per_sync;
                    let mut added = 0;
                    for (signed, age) in self.sync.on_response(peer, response, Instant::now()) {
                        let may_add = added < max_new;
                        let (_, new) =
                            self.on_signed_advert(&signed, Origin::Sync { age, may_add });
                        added += usize::from(new);
                    }
                }
            },
            MeshBehaviourEvent::Table(request_response::Event::OutboundFailure {
                peer,
                error,
                ..
            }) => {
                tracing::debug!(%peer, %error, "table sync failed");
                self.sync.on_failure(&peer);
            }
            MeshBehaviourEvent::RelayClient(e) => self.on_nat(NatEvent::RelayClient(e)),
            MeshBehaviourEvent::Relay(e) => self.on_nat(NatEvent::Relay(e)),
            MeshBehaviourEvent::Dcutr(e) => self.on_nat(NatEvent::Dcutr(e)),
            MeshBehaviourEvent::Autonat(e) => self.on_nat(NatEvent::Autonat(e)),
            MeshBehaviourEvent::Mdns(mdns::Event::Discovered(list)) => {
                for (peer, addr) in list {
                    if self.allowlist.allows(&peer) {
                        self.discovery_dial(peer, || vec![addr]);
                    }
                }
            }
            _ => {}
        }
    }

    /// Passes a signed advert (from gossip or table sync) through the intake; learns the mesh
    /// from it (dials the signer while below the target peer count) and stores it. Returns the
    /// verdict for gossipsub and whether the signer is a peer we had not known.
    fn on_signed_advert(
        &mut self,
        data: &[u8],
        origin: Origin,
    ) -> (gossipsub::MessageAcceptance, bool) {
        let now = Instant::now();
        let admitted = match self.intake.admit(&self.table, data, origin, unix_ms(), now) {
            Ok(a) => a,
            Err(verdict) => return (verdict, false),
        };
        // The addresses are parsed only when a dial will happen (most adverts come from peers
        // we are connected to or do not need).
        let peer = admitted.peer;
        let listen = &admitted.advert.listen_addrs;
        self.discovery_dial(peer, || {
            listen
                .iter()
                .filter_map(|a| a.parse().ok())
                .take(8)
                .collect()
        });
        let stored = self
            .intake
            .store(&mut self.table, admitted, data, origin, now);
        if stored.new {
            if !self.cfg.table_sync.enabled {
                // Without table sync a newcomer learns of us only from our adverts (see
                // `AdvertPublisher`); with it, the newcomer fetches its bootstrap peers' tables
                // on connecting and once more a little later, which hold every advert that had
                // spread by then. Republishing for every newcomer cost N adverts (N²·`mesh_n`
                // receptions in one process) per join: measured at 100 nodes, 651 adverts
                // published instead of 100 while joining, convergence 7.9 s instead of 3.2 s and
                // auction P99 2.2 s instead of 38 ms.
                self.publisher.note_newcomer();
            }
            self.emit(MeshEvent::PeerDiscovered { peer });
        }
        (stored.verdict, stored.new)
    }
}
