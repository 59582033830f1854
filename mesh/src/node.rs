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
//! * [`Prober`] — bandwidth probes, opened through the [`KvOpener`] the handle uses too;
//! * [`Redialer`] / [`DiscoveryDials`] — membership: redials, discovery dials and whom to leave
//!   a dial to;
//!
//! and [`transport`] builds the swarm and parses the listen and bootstrap addresses. What stays
//! here is what needs the swarm or more than one machine: carrying out dials and responses,
//! feeding table-sync answers to the intake, and the command replies.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use futures::StreamExt;
use libp2p::gossipsub;
use libp2p::identity::Keypair;
use libp2p::request_response::{self, OutboundRequestId, ResponseChannel};
use libp2p::swarm::dial_opts::DialOpts;
use libp2p::swarm::{ConnectionId, DialError, SwarmEvent};
use libp2p::{mdns, Multiaddr, PeerId, Swarm};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::advert::intake::{unix_ms, AdvertIntake, IntakeLimits, Origin};
use crate::advert::publisher::AdvertPublisher;
use crate::advert::table_sync::TableSync;
use crate::advert::PeerTable;
use crate::auction::client::AuctionClient;
use crate::auction::server::{AuctionServer, ServerLimits};
use crate::auction::{AuctionResponse, ServeGate};
use crate::bandwidth::BandwidthEstimator;
use crate::behaviour::{MeshBehaviour, MeshBehaviourEvent};
use crate::config::MeshConfig;
use crate::discovery::{self, DiscoveryDials, Redialer};
use crate::event::MeshEvent;
use crate::handle::{Command, MeshHandle, Shared};
use crate::kv::quota::ExpectedTransfers;
use crate::kv::receiver::Acceptor;
use crate::kv::sender::{KvOpener, SenderLimits};
use crate::nat::{NatAction, NatEvent, NatState, SharedNat};
use crate::probe::Prober;
use crate::reputation::Reputation;
use crate::stats::MeshStats;
use crate::transport::{self, Allowlist};
use crate::MeshError;

/// Entry point: builds a node from a [`MeshConfig`] and runs it in its own task.
#[derive(Debug)]
pub struct Mesh;

struct Task {
    swarm: Swarm<MeshBehaviour>,
    /// Relayed vs direct connections, hole punches, reachability (`crate::nat`).
    nat: SharedNat,
    cfg: MeshConfig,
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
    /// The bandwidth estimator and what probes need to open a transfer.
    kv: KvOpener,
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
            bootstrap,
            control,
            incoming,
        } = transport::build(&cfg, &key, &allowlist)?;

        let (cmd_tx, cmd_rx) = mpsc::channel(cfg.limits.command_queue.max(1));
        let (ev_tx, ev_rx) = mpsc::channel(cfg.limits.event_queue.max(1));
        let cancel = CancellationToken::new();
        let stats = Arc::new(MeshStats::default());
        let l = &cfg.limits;
        let estimator = Arc::new(Mutex::new(BandwidthEstimator::new(
            cfg.bandwidth.ewma_alpha,
            cfg.bandwidth.min_sample_bytes,
            l.max_known_peers,
        )));
        // Unique-ish start so a restarted sender does not reuse ids a receiver still remembers.
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let kv = KvOpener::new(control, estimator.clone(), SenderLimits::new(l), seed);

        // Awards in flight bound the transfers a home awaits; this bound is far above them.
        let expected = ExpectedTransfers::new(l.max_pending_transfers.max(1) * 16);
        let acceptor = Acceptor::new(
            &cfg,
            estimator,
            stats.clone(),
            allowlist.set(),
            expected.clone(),
        );
        let max_streams = acceptor.limits.max_streams;
        let kv_events = ev_tx.clone();
        tokio::spawn(acceptor.run(incoming, cancel.clone(), move |inc| {
            kv_events.try_send(MeshEvent::KvIncoming(inc)).is_ok()
        }));

        let serve_gate = ServeGate::default();
        let reputation = Arc::new(Mutex::new(Reputation::new(
            cfg.reputation.clone(),
            l.max_known_peers,
        )));
        let nat: SharedNat = Arc::new(Mutex::new(NatState::new(&cfg.nat)));
        let now = Instant::now();
        let task = Task {
            swarm,
            nat: nat.clone(),
            events: ev_tx,
            stats: stats.clone(),
            table: PeerTable::new(l.max_known_peers),
            publisher: AdvertPublisher::new(key, &cfg, unix_ms()),
            intake: AdvertIntake::new(
                IntakeLimits::new(&cfg),
                local,
                allowlist.clone(),
                stats.clone(),
            ),
            sync: TableSync::new(
                cfg.table_sync.clone(),
                l.max_known_peers,
                allowlist.clone(),
                now,
            ),
            server: AuctionServer::new(
                ServerLimits::new(l),
                serve_gate.clone(),
                allowlist.clone(),
                stats.clone(),
            ),
            client: AuctionClient::new(l.max_pending_calls.max(1) * 4),
            prober: Prober::new(&cfg.bandwidth, l.max_known_peers),
            redial: Redialer::new(cfg.redial.clone(), bootstrap, l.max_known_peers, now, seed),
            discovery: DiscoveryDials::new(cfg.target_peers, l.handshake_timeout * 2),
            dials: HashMap::new(),
            listen_addrs: vec![],
            listen_waiters: vec![],
            allowlist,
            kv: kv.clone(),
            reputation: reputation.clone(),
            cfg: cfg.clone(),
        };
        let join = tokio::spawn(task.run(cmd_rx, cancel.clone()));
        let shared = Shared {
            local_peer_id: local,
            commands: cmd_tx,
            cancel,
            task: tokio::sync::Mutex::new(Some(join)),
            kv,
            stats,
            added_latency: RwLock::new(HashMap::new()),
            streams_per_transfer: cfg.streams_per_transfer.max(1),
            max_streams,
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
        let ticker = |period| {
            let mut t = tokio::time::interval(period);
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            t
        };
        let mut advert_tick = ticker(self.cfg.advert_interval.max(Duration::from_millis(10)));
        let mut maintenance = ticker(
            (self.cfg.advert_expiry / 4).clamp(Duration::from_millis(20), Duration::from_secs(1)),
        );
        // Redials are checked more often than maintenance runs, so a healed link is used soon.
        let mut redial_tick = ticker(
            (self.cfg.redial.initial / 2)
                .clamp(Duration::from_millis(20), Duration::from_millis(250)),
        );
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
                let _ = reply.send(self.table.known_adverts(Instant::now()));
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
                    self.table.dial_addrs(&peer)
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
        let nat = &self.nat;
        let we_are_relayed = || nat.lock().is_ok_and(|n| n.has_reservation());
        let local = self.swarm.local_peer_id();
        let Some(opts) = DiscoveryDials::dial_opts(local, peer, addrs(), we_are_relayed) else {
            return;
        };
        if self.swarm.dial(opts).is_ok() {
            self.discovery.dialing(peer, now);
        }
    }

    fn publish_advert(&mut self) {
        let local = *self.swarm.local_peer_id();
        let gossipsub = &mut self.swarm.behaviour_mut().gossipsub;
        let (addrs, stats) = (&self.listen_addrs, &self.stats);
        self.publisher
            .publish(gossipsub, &local, addrs, &self.kv.estimator, stats);
    }

    /// Starts the redials that are due (bootstrap addresses, lost peers).
    fn redial(&mut self) {
        let now = Instant::now();
        let swarm = &self.swarm;
        let due = self.redial.due(now, |p| swarm.is_connected(p));
        for d in due {
            let key = d.key;
            let opts = d.into_opts();
            let id = opts.connection_id();
            match self.swarm.dial(opts) {
                Ok(()) => self.redial.dialing(key, id),
                Err(e) => {
                    tracing::debug!(?key, error = %e, "redial not started");
                    self.redial.failed_to_start(key, now);
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
            if let Ok(mut e) = self.kv.estimator.lock() {
                e.forget(&peer);
            }
            self.emit(MeshEvent::PeerExpired { peer });
        }
        // Calls the application did not answer in time are declined on its behalf.
        for out in self.server.expire(now) {
            self.respond(Some(out));
        }
        // Probes go to connected mesh peers whose estimate is stale.
        let swarm = &self.swarm;
        let peers = self
            .table
            .peers()
            .map(|(p, _)| *p)
            .filter(|p| swarm.is_connected(p));
        self.prober.start_next(now, peers, &self.kv);
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
                if num_established.get() == 1 && endpoint.is_dialer() {
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
                let addrs = self.table.dial_addrs(&peer_id);
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
            discovery::log_failed_redial(key, failures, &error, &self.cfg.bootstrap);
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
                if self.publisher.unsent_on(&topic) =>
            {
                self.publish_advert();
            }
            MeshBehaviourEvent::Auction(request_response::Event::Message {
                peer, message, ..
            }) => match message {
                request_response::Message::Request {
                    request, channel, ..
                } => {
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
                    let own = self.publisher.own_signed();
                    let now = Instant::now();
                    match self.sync.serve(peer, &request, own, &self.table, now) {
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
        let advert = &admitted.advert;
        self.discovery_dial(peer, || advert.dial_addrs());
        let stored = self
            .intake
            .store(&mut self.table, admitted, data, origin, now);
        if stored.new {
            self.publisher.note_newcomer();
            self.emit(MeshEvent::PeerDiscovered { peer });
        }
        (stored.verdict, stored.new)
    }
}
