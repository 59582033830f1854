//! The swarm task: owns the `Swarm`, the peer table and the bid book; serves handle commands.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use futures::StreamExt;
use libp2p::core::muxing::StreamMuxerBox;
use libp2p::core::transport::{Boxed, Transport};
use libp2p::core::upgrade::Version;
use libp2p::gossipsub::{self, IdentTopic, MessageAcceptance};
use libp2p::identity::Keypair;
use libp2p::pnet::{PnetConfig, PreSharedKey};
use libp2p::request_response::{self, ProtocolSupport, ResponseChannel};
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{ConnectionId, DialError, SwarmEvent};
use libp2p::{
    allow_block_list, connection_limits, identify, mdns, noise, ping, tcp, yamux, Multiaddr,
    PeerId, Swarm,
};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::advert::sync::{
    TableCodec, TableEntry, TableRequest, TableResponse, TokenBucket, ENTRY_OVERHEAD,
    MAX_REQUEST_BYTES, TABLE_PROTOCOL,
};
use crate::advert::{self, Advert, AdvertBody, BandwidthReport, PeerTable, ADVERT_TOPIC};
use crate::auction::{
    AuctionCodec, AuctionRequest, AuctionResponse, AwardCheck, AwardRefusal, BidBook,
    DeclineReason, ServeGate, AUCTION_PROTOCOL,
};
use crate::bandwidth::BandwidthEstimator;
use crate::behaviour::{MeshBehaviour, MeshBehaviourEvent};
use crate::config::MeshConfig;
use crate::discovery::{DialKey, Redialer};
use crate::event::{CallToken, MeshEvent};
use crate::handle::{emulated_rate, CallAnswer, Command, EmulatedRates, MeshHandle, Shared};
use crate::kv::receiver::{Acceptor, ReceiverLimits};
use crate::kv::sender::SenderLimits;
use crate::kv::{KvHeader, KvTrailer, KV_PROTOCOL};
use crate::nat::{NatAction, NatEvent, NatState, SharedNat};
use crate::reputation::Reputation;
use crate::stats::MeshStats;
use crate::MeshError;

/// Entry point: builds a node from a [`MeshConfig`] and runs it in its own task.
#[derive(Debug)]
pub struct Mesh;

struct PendingCall {
    peer: PeerId,
    request_id: u64,
    channel: ResponseChannel<AuctionResponse>,
    deadline: Instant,
}

/// Where a signed advert came from (decides how stale copies are treated and how old it is).
#[derive(Debug, Clone, Copy)]
enum Origin {
    /// Gossip: arrives as it is published; an older sequence number is a replay.
    Gossip,
    /// Table sync: the serving peer's copy, `age` old; it may legitimately lag behind gossip.
    Sync { age: Duration },
}

/// How old an advert with sequence number `seq` (the signer's wall clock, ms) is at `now_ms`,
/// giving the signer's clock `skew` either way; `None` when it claims to come from further in
/// the future than the skew allows (such a sequence number would outlive every honest one).
fn advert_age_from_seq(seq: u64, now_ms: u64, skew: Duration) -> Option<Duration> {
    let skew_ms = u64::try_from(skew.as_millis()).unwrap_or(u64::MAX);
    if seq > now_ms.saturating_add(skew_ms) {
        return None;
    }
    Some(Duration::from_millis(
        now_ms.saturating_sub(seq).saturating_sub(skew_ms),
    ))
}

/// Milliseconds since the Unix epoch (0 if the clock is before it). Advert sequence numbers
/// start here, so a restarted node's adverts still beat those it sent before the restart.
fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

struct Task {
    swarm: Swarm<MeshBehaviour>,
    /// Relayed vs direct connections, hole punches, reachability (`crate::nat`).
    nat: SharedNat,
    /// Redials bootstrap addresses and lost peers (backoff + jitter).
    redial: Redialer,
    /// Signs our adverts (`/prfaas/advert/2` carries the signature in the payload).
    key: Keypair,
    /// Our latest signed advert, served first in table sync.
    own_signed: Option<Arc<[u8]>>,
    /// Rate limit on the table syncs we start.
    sync_bucket: TokenBucket,
    /// Per-signer rate limit on new adverts (bounded by `max_known_peers`).
    signer_buckets: HashMap<PeerId, TokenBucket>,
    /// Peers we asked for their table and have not answered yet.
    syncing: HashSet<PeerId>,
    /// When we last served each peer's table request (bounded by `max_known_peers`).
    served: HashMap<PeerId, Instant>,
    /// Peers we synced from (at most 16 remembered), so the follow-up asks someone else.
    synced_from: HashSet<PeerId>,
    /// When the one follow-up sync is due (set by the first sync's answer).
    followup_sync_at: Option<Instant>,
    /// Whether the follow-up was scheduled already (it happens once per node).
    followup_done: bool,
    cfg: MeshConfig,
    topic: IdentTopic,
    events: mpsc::Sender<MeshEvent>,
    table: PeerTable,
    book: BidBook,
    body: AdvertBody,
    seq: u64,
    /// Our last advert reached nobody (no subscribed peer yet): publish again as soon as a peer
    /// subscribes instead of waiting a whole `advert_interval` (this is what makes joins fast).
    advert_unsent: bool,
    /// A node we had not heard of appeared since our last publish: it may not know us yet, so
    /// the next advert tick publishes instead of waiting for the (slower) refresh period.
    newcomer_seen: bool,
    /// When our advert was last published (for the refresh period).
    last_publish: Option<Instant>,
    listen_addrs: Vec<Multiaddr>,
    listen_waiters: Vec<oneshot::Sender<Vec<Multiaddr>>>,
    pending_calls: HashMap<u64, PendingCall>,
    next_token: u64,
    outbound: HashMap<
        request_response::OutboundRequestId,
        oneshot::Sender<Result<AuctionResponse, MeshError>>,
    >,
    dials: HashMap<ConnectionId, oneshot::Sender<Result<PeerId, MeshError>>>,
    /// Discovery dials (from adverts / mDNS) still in flight. They count towards `target_peers`:
    /// counting only established connections made every node dial every peer whose advert
    /// arrived before its first dials completed — an all-to-all connection storm at 50+ nodes.
    discovery_dials: HashMap<PeerId, Instant>,
    stats: Arc<MeshStats>,
    estimator: Arc<Mutex<BandwidthEstimator>>,
    allowlist: Option<Arc<HashSet<PeerId>>>,
    control: libp2p_stream::Control,
    probe_running: Arc<AtomicBool>,
    last_probe: HashMap<PeerId, Instant>,
    emulated_rate: EmulatedRates,
    next_transfer: Arc<AtomicU64>,
    /// Awards being served (shared with the application, which sets the maximum).
    serve_gate: ServeGate,
    /// Transfer records; banned peers are no auction candidates.
    reputation: Arc<Mutex<Reputation>>,
}

fn parse_psk(hex: &str) -> Result<PreSharedKey, MeshError> {
    let bytes =
        crate::config::hex_decode(hex).ok_or_else(|| MeshError::Config("psk: not hex".into()))?;
    let key: [u8; 32] = bytes
        .try_into()
        .map_err(|_| MeshError::Config("psk: need 32 bytes (64 hex chars)".into()))?;
    Ok(PreSharedKey::new(key))
}

fn build_transport(
    key: &Keypair,
    psk: Option<PreSharedKey>,
    quic: bool,
    handshake_timeout: Duration,
    relay: libp2p::relay::client::Transport,
) -> Result<Boxed<(PeerId, StreamMuxerBox)>, MeshError> {
    let noise = noise::Config::new(key).map_err(|e| MeshError::Start(e.to_string()))?;
    // Relayed connections (`crate::nat`): a circuit inside a connection to the relay, which
    // already passed pnet, so only noise and yamux on top.
    let relayed = relay
        .upgrade(Version::V1Lazy)
        .authenticate(noise.clone())
        .multiplex(yamux::Config::default())
        .timeout(handshake_timeout)
        .map(|(p, m), _| (p, StreamMuxerBox::new(m)));
    let tcp_cfg = tcp::Config::default().nodelay(true);
    let tcp = match psk {
        Some(psk) => tcp::tokio::Transport::new(tcp_cfg)
            .and_then(move |socket, _| PnetConfig::new(psk).handshake(socket))
            .upgrade(Version::V1Lazy)
            .authenticate(noise)
            .multiplex(yamux::Config::default())
            // A peer with the wrong PSK produces garbage that can stall negotiation: bound it.
            .timeout(handshake_timeout)
            .map(|(p, m), _| (p, StreamMuxerBox::new(m)))
            .boxed(),
        None => tcp::tokio::Transport::new(tcp_cfg)
            .upgrade(Version::V1Lazy)
            .authenticate(noise)
            .multiplex(yamux::Config::default())
            // A peer with the wrong PSK produces garbage that can stall negotiation: bound it.
            .timeout(handshake_timeout)
            .map(|(p, m), _| (p, StreamMuxerBox::new(m)))
            .boxed(),
    };
    let tcp = relayed.or_transport(tcp).map(|e, _| e.into_inner()).boxed();
    if !quic || psk.is_some() {
        return Ok(tcp);
    }
    let q = libp2p::quic::tokio::Transport::new(libp2p::quic::Config::new(key))
        .map(|(p, c), _| (p, StreamMuxerBox::new(c)));
    Ok(tcp.or_transport(q).map(|e, _| e.into_inner()).boxed())
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
        let psk = cfg.psk.as_deref().map(parse_psk).transpose()?;
        let allowlist = match &cfg.allowlist {
            None => None,
            Some(list) => {
                let mut set = HashSet::new();
                for s in list {
                    set.insert(
                        s.parse::<PeerId>()
                            .map_err(|e| MeshError::Config(format!("allowlist {s}: {e}")))?,
                    );
                }
                set.insert(local);
                Some(Arc::new(set))
            }
        };
        let relay_listen = cfg
            .nat
            .relay_listen_addrs()
            .map_err(|e| MeshError::Config(e.to_string()))?;
        let (relay_transport, relay_client) = libp2p::relay::client::new(local);
        let transport = build_transport(
            &key,
            psk,
            cfg.quic,
            cfg.limits.handshake_timeout,
            relay_transport,
        )?;

        let g = &cfg.gossip;
        let gossip_cfg = gossipsub::ConfigBuilder::default()
            .heartbeat_interval(cfg.gossip_heartbeat)
            // libp2p waits 5 s before the first heartbeat; a joining node's mesh would only be
            // repaired (grafts to reach `mesh_n_low`) after that.
            .heartbeat_initial_delay(cfg.gossip_heartbeat)
            .mesh_n(g.mesh_n)
            .mesh_n_low(g.mesh_n_low)
            .mesh_n_high(g.mesh_n_high)
            .mesh_outbound_min(g.mesh_outbound_min)
            .gossip_lazy(g.gossip_lazy)
            .flood_publish(g.flood_publish)
            .idontwant_message_size_threshold(g.idontwant_threshold)
            // Adverts sign themselves (advert::codec says why): gossip messages carry no
            // author, sequence number or signature, and are identified by a hash of their
            // content, so duplicates are dropped before any signature work.
            .validation_mode(gossipsub::ValidationMode::Anonymous)
            .message_id_fn(content_message_id)
            .validate_messages()
            .max_transmit_size(cfg.limits.max_advert_bytes + 1024)
            .build()
            .map_err(|e| MeshError::Config(format!("gossipsub: {e}")))?;
        let mut gossipsub =
            gossipsub::Behaviour::new(gossipsub::MessageAuthenticity::Anonymous, gossip_cfg)
                .map_err(|e| MeshError::Start(format!("gossipsub: {e}")))?;
        let topic = IdentTopic::new(ADVERT_TOPIC);
        gossipsub
            .subscribe(&topic)
            .map_err(|e| MeshError::Start(format!("subscribe: {e}")))?;

        let allow = allowlist.as_ref().map(|set| {
            let mut b = allow_block_list::Behaviour::<allow_block_list::AllowedPeers>::default();
            for p in set.iter() {
                b.allow_peer(*p);
            }
            b
        });
        let limits = connection_limits::Behaviour::new(
            connection_limits::ConnectionLimits::default()
                .with_max_established(Some(cfg.limits.max_connections))
                .with_max_established_per_peer(Some(cfg.limits.max_connections_per_peer)),
        );
        let auction = request_response::Behaviour::with_codec(
            AuctionCodec::new(cfg.limits.max_auction_bytes, cfg.limits.max_auction_bytes),
            [(AUCTION_PROTOCOL, ProtocolSupport::Full)],
            request_response::Config::default()
                .with_request_timeout(cfg.limits.auction_timeout)
                .with_max_concurrent_streams(
                    // Pending calls hold their stream; leave room for the immediate answers
                    // (overload declines, awards) so those are not dropped at capacity.
                    cfg.limits.max_pending_calls + 64,
                ),
        );
        let table = request_response::Behaviour::with_codec(
            TableCodec::new(MAX_REQUEST_BYTES, cfg.table_sync.max_bytes),
            [(TABLE_PROTOCOL, ProtocolSupport::Full)],
            request_response::Config::default()
                .with_request_timeout(cfg.limits.auction_timeout)
                .with_max_concurrent_streams(16),
        );
        let mdns = if cfg.mdns {
            Some(
                mdns::tokio::Behaviour::new(mdns::Config::default(), local)
                    .map_err(|e| MeshError::Start(format!("mdns: {e}")))?,
            )
        } else {
            None
        };
        let kv = libp2p_stream::Behaviour::new();
        let mut control = kv.new_control();
        let incoming = control
            .accept(KV_PROTOCOL)
            .map_err(|e| MeshError::Start(format!("kv protocol: {e}")))?;
        let behaviour = MeshBehaviour {
            allow: allow.into(),
            limits,
            identify: identify::Behaviour::new(identify::Config::new(
                "/prfaas/id/1".into(),
                key.public(),
            )),
            ping: ping::Behaviour::new(ping::Config::new()),
            gossipsub,
            auction,
            table,
            kv,
            mdns: mdns.into(),
            relay_client,
            relay: cfg.nat.relay_server(local).into(),
            dcutr: libp2p::dcutr::Behaviour::new(local),
            autonat: cfg.nat.autonat(local).into(),
        };
        let mut swarm = Swarm::new(
            transport,
            behaviour,
            local,
            libp2p::swarm::Config::with_tokio_executor()
                .with_idle_connection_timeout(Duration::from_secs(60)),
        );
        for a in &cfg.listen {
            let addr: Multiaddr = a
                .parse()
                .map_err(|e| MeshError::Config(format!("listen {a}: {e}")))?;
            swarm
                .listen_on(addr)
                .map_err(|e| MeshError::Start(format!("listen {a}: {e}")))?;
        }
        for addr in relay_listen {
            // The relay client dials the relay (through the swarm, so pnet applies) and
            // reserves a slot; the circuit address is reported as a listen address once
            // accepted, and gossiped in our adverts like any other.
            swarm
                .listen_on(addr.clone())
                .map_err(|e| MeshError::Start(format!("listen {addr}: {e}")))?;
        }
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

        let acceptor = Acceptor {
            limits: recv_limits,
            estimator: estimator.clone(),
            stats: stats.clone(),
            allowlist: allowlist.clone(),
            max_pending_transfers: cfg.limits.max_pending_transfers,
            probe_max_bytes: cfg.bandwidth.probe_bytes.max(1),
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
        let nat: SharedNat = Arc::new(Mutex::new(NatState::new(&cfg.nat)));
        let task = Task {
            nat: nat.clone(),
            redial,
            swarm,
            key: key.clone(),
            own_signed: None,
            sync_bucket: TokenBucket::new(
                cfg.table_sync.burst,
                cfg.table_sync.period,
                Instant::now(),
            ),
            syncing: HashSet::new(),
            signer_buckets: HashMap::new(),
            served: HashMap::new(),
            synced_from: HashSet::new(),
            followup_sync_at: None,
            followup_done: false,
            topic,
            events: ev_tx,
            table: PeerTable::new(cfg.limits.max_known_peers),
            book: BidBook::new(
                cfg.limits.max_outstanding_bids,
                cfg.limits.max_outstanding_bids_per_peer,
            ),
            body: AdvertBody {
                region: cfg.region.clone(),
                ..AdvertBody::default()
            },
            seq: unix_ms(),
            advert_unsent: false,
            newcomer_seen: false,
            last_publish: None,
            listen_addrs: vec![],
            listen_waiters: vec![],
            pending_calls: HashMap::new(),
            next_token: 0,
            outbound: HashMap::new(),
            dials: HashMap::new(),
            discovery_dials: HashMap::new(),
            stats: stats.clone(),
            estimator: estimator.clone(),
            allowlist,
            control: control.clone(),
            probe_running: Arc::new(AtomicBool::new(false)),
            last_probe: HashMap::new(),
            emulated_rate: emulated_rate.clone(),
            next_transfer: next_transfer.clone(),
            serve_gate: serve_gate.clone(),
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
                _ = advert_tick.tick() => self.on_advert_tick(),
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

    fn allowed(&self, peer: &PeerId) -> bool {
        self.allowlist.as_ref().is_none_or(|a| a.contains(peer))
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
                self.body = *body;
                if self.body.region.is_empty() {
                    self.body.region = self.cfg.region.clone();
                }
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
                if self.outbound.len() >= self.cfg.limits.max_pending_calls.max(1) * 4 {
                    let _ = reply.send(Err(MeshError::Overloaded));
                    return;
                }
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
                self.outbound.insert(id, reply);
            }
            Command::AnswerCall(token, answer) => {
                let Some(pc) = self.pending_calls.remove(&token.0) else {
                    return; // already timed out and declined for the app
                };
                let resp = match answer {
                    CallAnswer::Bid(mut bid) => {
                        bid.request_id = pc.request_id;
                        if self.book.record(pc.peer, &bid, Instant::now()) {
                            AuctionResponse::Bid(bid)
                        } else {
                            AuctionResponse::Decline {
                                request_id: pc.request_id,
                                reason: DeclineReason::Overloaded,
                            }
                        }
                    }
                    CallAnswer::Decline(reason) => AuctionResponse::Decline {
                        request_id: pc.request_id,
                        reason,
                    },
                };
                let _ = self
                    .swarm
                    .behaviour_mut()
                    .auction
                    .send_response(pc.channel, resp);
            }
        }
    }

    /// Dials a peer learned from an advert or mDNS while established connections plus discovery
    /// dials in flight stay below `target_peers`.
    fn discovery_dial(&mut self, peer: PeerId, addrs: impl FnOnce() -> Vec<Multiaddr>) {
        if self.swarm.is_connected(&peer) || self.discovery_dials.contains_key(&peer) {
            return;
        }
        // A dial that never reports back (should not happen) must not block discovery forever.
        let now = Instant::now();
        let timeout = self.cfg.limits.handshake_timeout * 2;
        self.discovery_dials
            .retain(|_, t| now.saturating_duration_since(*t) < timeout);
        if self.swarm.connected_peers().count() + self.discovery_dials.len()
            >= self.cfg.target_peers
        {
            return;
        }
        let addrs = addrs();
        if addrs.is_empty() {
            return;
        }
        let opts = DialOpts::peer_id(peer)
            .addresses(addrs)
            .condition(PeerCondition::DisconnectedAndNotDialing)
            .build();
        if self.swarm.dial(opts).is_ok() {
            self.discovery_dials.insert(peer, now);
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

    /// Publishes on a tick only when it can matter: our last advert reached nobody, a newcomer
    /// appeared, or the refresh period passed. A quiet mesh thus gossips every
    /// `advert_refresh`, not every `advert_interval` (N nodes cost each other ~N·mesh_n
    /// receptions per round, all of which are paid in one process by the scale bench).
    fn on_advert_tick(&mut self) {
        let due = self.last_publish.is_none_or(|t| {
            t.elapsed() + Duration::from_millis(5) >= self.cfg.effective_advert_refresh()
        });
        if self.advert_unsent || self.newcomer_seen || due {
            self.publish_advert();
        }
    }

    fn publish_advert(&mut self) {
        self.newcomer_seen = false;
        self.last_publish = Some(Instant::now());
        self.seq = (self.seq + 1).max(unix_ms());
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
        let advert = Advert {
            node_id: self.swarm.local_peer_id().to_base58(),
            seq: self.seq,
            listen_addrs: self
                .listen_addrs
                .iter()
                .take(8)
                .map(|a| a.to_string())
                .collect(),
            body: self.body.clone(),
            observed_bandwidth,
        };
        match advert::codec::sign(&advert, &self.key, self.cfg.limits.max_advert_bytes) {
            Ok(bytes) => {
                self.own_signed = Some(Arc::from(bytes.as_slice()));
                match self
                    .swarm
                    .behaviour_mut()
                    .gossipsub
                    .publish(self.topic.clone(), bytes)
                {
                    Ok(_) => {
                        self.stats.adverts_published.fetch_add(1, Ordering::Relaxed);
                        self.advert_unsent = false;
                    }
                    Err(e) => {
                        // InsufficientPeers before anyone joined is expected.
                        self.advert_unsent = true;
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
        self.maybe_followup_sync(now);
        for peer in self.table.expire(now, self.cfg.advert_expiry) {
            self.redial.forget(&peer);
            if let Ok(mut e) = self.estimator.lock() {
                e.forget(&peer);
            }
            self.emit(MeshEvent::PeerExpired { peer });
        }
        self.book.expire(now);
        // Calls the application did not answer in time are declined on its behalf.
        let late: Vec<u64> = self
            .pending_calls
            .iter()
            .filter(|(_, c)| now >= c.deadline)
            .map(|(t, _)| *t)
            .collect();
        for t in late {
            if let Some(pc) = self.pending_calls.remove(&t) {
                let _ = self.swarm.behaviour_mut().auction.send_response(
                    pc.channel,
                    AuctionResponse::Decline {
                        request_id: pc.request_id,
                        reason: DeclineReason::NoAnswer,
                    },
                );
            }
        }
        self.maybe_probe(now);
    }

    /// Starts at most one probe at a time, towards a connected mesh peer whose estimate is stale.
    fn maybe_probe(&mut self, now: Instant) {
        let bw = &self.cfg.bandwidth;
        if !bw.probes || self.probe_running.load(Ordering::Acquire) {
            return;
        }
        let stale_after = bw.stale_after;
        let target = {
            let Ok(est) = self.estimator.lock() else {
                return;
            };
            self.table
                .peers()
                .map(|(p, _)| *p)
                .filter(|p| self.swarm.is_connected(p))
                .filter(|p| est.is_stale(p, now, stale_after))
                .find(|p| {
                    self.last_probe
                        .get(p)
                        .is_none_or(|t| now.saturating_duration_since(*t) > stale_after)
                })
        };
        let Some(peer) = target else { return };
        self.last_probe.insert(peer, now);
        if self.last_probe.len() > self.cfg.limits.max_known_peers {
            self.last_probe
                .retain(|_, t| now.saturating_duration_since(*t) <= stale_after);
        }
        self.probe_running.store(true, Ordering::Release);
        let running = self.probe_running.clone();
        let control = self.control.clone();
        let estimator = self.estimator.clone();
        let limits = SenderLimits {
            emulated_rate: emulated_rate(&self.emulated_rate, &peer),
            ..SenderLimits::new(&self.cfg.limits)
        };
        let probe_bytes = bw.probe_bytes.max(1);
        let id = self.next_transfer.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            let r = probe(control, peer, probe_bytes, id, limits, estimator).await;
            if let Err(e) = r {
                tracing::debug!(%peer, error = %e, "bandwidth probe failed");
            }
            running.store(false, Ordering::Release);
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
                if num_established.get() == 1 && endpoint.is_dialer() {
                    self.maybe_sync(peer_id);
                }
                self.redial.on_connected(peer_id, connection_id);
                self.discovery_dials.remove(&peer_id);
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
            } => {
                if matches!(error, DialError::Denied { .. }) {
                    self.stats
                        .refused_connections
                        .fetch_add(1, Ordering::Relaxed);
                }
                if let Some(p) = peer_id {
                    self.discovery_dials.remove(&p);
                }
                self.stats.dials_failed.fetch_add(1, Ordering::Relaxed);
                if let Some((key, failures)) =
                    self.redial.on_dial_failed(connection_id, Instant::now())
                {
                    // Logged at warn for bootstrap peers (a node alone in its mesh is the
                    // symptom an operator must be able to find), quieter for other peers.
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
                if let Some(d) = self.dials.remove(&connection_id) {
                    let _ = d.send(Err(MeshError::Dial(error.to_string())));
                } else {
                    tracing::debug!(?peer_id, %error, "outgoing connection failed");
                }
            }
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
                let verdict = self.on_signed_advert(&message.data, Origin::Gossip);
                let _ = self
                    .swarm
                    .behaviour_mut()
                    .gossipsub
                    .report_message_validation_result(&message_id, &propagation_source, verdict);
            }
            MeshBehaviourEvent::Gossipsub(gossipsub::Event::Subscribed { topic, .. })
                if self.advert_unsent && topic == self.topic.hash() =>
            {
                self.publish_advert();
            }
            MeshBehaviourEvent::Auction(request_response::Event::Message {
                peer, message, ..
            }) => match message {
                request_response::Message::Request {
                    request, channel, ..
                } => self.on_request(peer, request, channel),
                request_response::Message::Response {
                    request_id,
                    response,
                } => {
                    if let Some(tx) = self.outbound.remove(&request_id) {
                        let _ = tx.send(Ok(response));
                    }
                }
            },
            MeshBehaviourEvent::Auction(request_response::Event::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            }) => {
                if let Some(tx) = self.outbound.remove(&request_id) {
                    let _ = tx.send(Err(MeshError::Request {
                        peer,
                        reason: error.to_string(),
                    }));
                }
            }
            MeshBehaviourEvent::Table(request_response::Event::Message {
                peer, message, ..
            }) => match message {
                request_response::Message::Request {
                    request, channel, ..
                } => self.on_table_request(peer, request, channel),
                request_response::Message::Response { response, .. } => {
                    self.on_table_response(peer, response)
                }
            },
            MeshBehaviourEvent::Table(request_response::Event::OutboundFailure {
                peer,
                error,
                ..
            }) => {
                tracing::debug!(%peer, %error, "table sync failed");
                self.syncing.remove(&peer);
            }
            MeshBehaviourEvent::RelayClient(e) => self.on_nat(NatEvent::RelayClient(e)),
            MeshBehaviourEvent::Relay(e) => self.on_nat(NatEvent::Relay(e)),
            MeshBehaviourEvent::Dcutr(e) => self.on_nat(NatEvent::Dcutr(e)),
            MeshBehaviourEvent::Autonat(e) => self.on_nat(NatEvent::Autonat(e)),
            MeshBehaviourEvent::Mdns(mdns::Event::Discovered(list)) => {
                for (peer, addr) in list {
                    if self.allowed(&peer) {
                        self.discovery_dial(peer, || vec![addr]);
                    }
                }
            }
            _ => {}
        }
    }

    /// Checks a signed advert (from gossip or table sync) and stores it. Cheap checks first:
    /// decoding, signer = named node, allowlist, and the sequence number against the table, so
    /// the signature is verified once per unique, newer advert and never for replays.
    fn on_signed_advert(&mut self, data: &[u8], origin: Origin) -> MessageAcceptance {
        let refuse = |stats: &MeshStats, counter: Option<&AtomicU64>| {
            stats.refused_adverts.fetch_add(1, Ordering::Relaxed);
            if let Some(c) = counter {
                c.fetch_add(1, Ordering::Relaxed);
            }
            MessageAcceptance::Reject
        };
        let unverified = match advert::codec::open(data, self.cfg.limits.max_advert_bytes) {
            Ok(u) => u,
            Err(e) => {
                tracing::debug!(error = %e, "advert rejected");
                let forged = matches!(e, advert::codec::AdvertError::SourceMismatch { .. });
                return refuse(&self.stats, forged.then_some(&self.stats.adverts_forged));
            }
        };
        let peer = unverified.signer;
        if !self.allowed(&peer) {
            return refuse(&self.stats, None);
        }
        if peer == *self.swarm.local_peer_id() {
            return MessageAcceptance::Ignore;
        }
        // Sequence numbers are the signer's wall-clock ms: an advert is never younger than its
        // sequence says (minus clock skew), whatever a table-sync server claims, and one older
        // than the expiry (plus skew) is a replay of something that should have expired.
        let seq_age = advert_age_from_seq(
            unverified.advert.seq,
            unix_ms(),
            self.cfg.limits.max_clock_skew,
        );
        let age = match (origin, seq_age) {
            (_, None) => {
                self.stats.adverts_stale.fetch_add(1, Ordering::Relaxed);
                return refuse(&self.stats, None);
            }
            (Origin::Gossip, Some(a)) => a,
            (Origin::Sync { age }, Some(a)) => age.max(a),
        };
        if age >= self.cfg.advert_expiry {
            self.stats.adverts_stale.fetch_add(1, Ordering::Relaxed);
            return match origin {
                // Gossip relays adverts as they are published: an expired one is a replay.
                Origin::Gossip => refuse(&self.stats, Some(&self.stats.adverts_replayed)),
                // A sync server's copy may just have aged out: not an offence.
                Origin::Sync { .. } => MessageAcceptance::Ignore,
            };
        }
        if let Some(known) = self.table.get(&peer).map(|e| e.advert.seq) {
            let seq = unverified.advert.seq;
            let same_bytes = seq == known && self.table.signed(&peer).is_some_and(|s| **s == *data);
            if same_bytes {
                // The advert we hold. Through gossip this means we had it from a table sync
                // (gossipsub drops byte-identical copies itself): accept so it is forwarded to
                // our mesh peers, who may not have it.
                return match origin {
                    Origin::Gossip => MessageAcceptance::Accept,
                    Origin::Sync { .. } => MessageAcceptance::Ignore,
                };
            }
            if seq <= known {
                // A peer's table may lag behind what gossip told us, and two adverts of one node
                // published in quick succession can arrive out of order over different paths:
                // neither is an offence. Older than the expiry period (sequence numbers are
                // wall-clock ms) or the same number with other bytes is a replay or an
                // equivocation: rejected and counted. Either way it is never stored.
                let expiry_ms =
                    u64::try_from(self.cfg.advert_expiry.as_millis()).unwrap_or(u64::MAX);
                let in_flight = seq < known && known - seq < expiry_ms;
                if matches!(origin, Origin::Sync { .. }) || in_flight {
                    return MessageAcceptance::Ignore;
                }
                return refuse(&self.stats, Some(&self.stats.adverts_replayed));
            }
        }
        // Each signer gets a bounded rate of new adverts (honest nodes publish about one per
        // `advert_interval`; a few changes may come faster): a flood from one key costs one
        // map lookup each, not a signature check and a table write.
        if !self.signer_budget(peer) {
            self.stats
                .adverts_rate_limited
                .fetch_add(1, Ordering::Relaxed);
            return MessageAcceptance::Ignore;
        }
        let advert = match unverified.verify() {
            Ok(a) => a,
            Err(e) => {
                tracing::debug!(error = %e, "advert rejected");
                return refuse(&self.stats, Some(&self.stats.adverts_forged));
            }
        };
        // Learn the mesh: dial advertised addresses while below the target peer count. The
        // addresses are parsed only when a dial will happen (most adverts come from peers we are
        // connected to or do not need).
        self.discovery_dial(peer, || {
            advert
                .listen_addrs
                .iter()
                .filter_map(|a| a.parse().ok())
                .take(8)
                .collect()
        });
        let now = Instant::now();
        let received_at = now.checked_sub(age).unwrap_or(now);
        let upsert = self
            .table
            .upsert_signed(peer, advert, Arc::from(data), received_at);
        let new = match upsert {
            advert::table::Upsert::New => true,
            advert::table::Upsert::Updated => false,
            advert::table::Upsert::Stale | advert::table::Upsert::Full => {
                return MessageAcceptance::Ignore
            }
        };
        // Counters before the event, so whoever reacts to the event sees them.
        self.stats.adverts_accepted.fetch_add(1, Ordering::Relaxed);
        if matches!(origin, Origin::Sync { .. }) {
            self.stats.adverts_from_sync.fetch_add(1, Ordering::Relaxed);
        }
        if new {
            self.newcomer_seen |= self.newcomer_needs_us();
            self.emit(MeshEvent::PeerDiscovered { peer });
        }
        MessageAcceptance::Accept
    }

    /// Takes one advert from `signer`'s budget (burst `ADVERT_BURST`, refilled at two per
    /// `advert_interval`); `false` when it is spent. The map is bounded like the peer table.
    fn signer_budget(&mut self, signer: PeerId) -> bool {
        const ADVERT_BURST: u32 = 5;
        let now = Instant::now();
        let period = self.cfg.advert_interval / 2;
        if self.signer_buckets.len() >= self.cfg.limits.max_known_peers
            && !self.signer_buckets.contains_key(&signer)
        {
            let table = &self.table;
            self.signer_buckets.retain(|p, _| table.get(p).is_some());
            if self.signer_buckets.len() >= self.cfg.limits.max_known_peers {
                return false;
            }
        }
        self.signer_buckets
            .entry(signer)
            .or_insert_with(|| TokenBucket::new(ADVERT_BURST, period, now))
            .try_take(now)
    }

    /// Whether a node we just heard of for the first time may not know us yet, so our next
    /// advert tick should publish instead of waiting for the refresh period. With table sync
    /// the newcomer fetches its bootstrap peers' tables on connecting (and once more a little
    /// later, see [`Task::maybe_followup_sync`]), which hold every advert that had spread by
    /// then, so nobody needs to republish for it. Republishing for every newcomer cost N adverts
    /// (N²·`mesh_n` receptions in one process) per join: measured at 100 nodes, 651 adverts
    /// published instead of 100 while joining, convergence 7.9 s instead of 3.2 s and auction
    /// P99 2.2 s instead of 38 ms.
    fn newcomer_needs_us(&self) -> bool {
        !self.cfg.table_sync.enabled
    }

    /// One follow-up table sync, `table_sync.followup_after` after our first sync completed, from a
    /// connected peer we have not synced from: adverts of nodes that joined at about the same
    /// time as us had not reached our first sync sources yet. O(N) entries once per node
    /// instead of every node republishing for every newcomer.
    fn maybe_followup_sync(&mut self, now: Instant) {
        let Some(due) = self.followup_sync_at else {
            return;
        };
        if now < due {
            return;
        }
        let candidate = self
            .swarm
            .connected_peers()
            .find(|p| !self.synced_from.contains(p) && !self.syncing.contains(p))
            .copied();
        if let Some(peer) = candidate {
            self.followup_sync_at = None;
            self.send_sync(peer);
        }
    }

    /// Asks `peer` (just dialled) for its table, unless sync is off, we already asked it, or
    /// the token bucket is empty.
    fn maybe_sync(&mut self, peer: PeerId) {
        let ts = &self.cfg.table_sync;
        if !ts.enabled || !self.allowed(&peer) || self.syncing.contains(&peer) {
            return;
        }
        if !self.sync_bucket.try_take(Instant::now()) {
            return;
        }
        self.send_sync(peer);
    }

    fn send_sync(&mut self, peer: PeerId) {
        let max_entries = u32::try_from(self.cfg.table_sync.max_entries).unwrap_or(u32::MAX);
        self.syncing.insert(peer);
        if self.synced_from.len() < 16 {
            self.synced_from.insert(peer);
        }
        self.swarm
            .behaviour_mut()
            .table
            .send_request(&peer, TableRequest { max_entries });
    }

    /// Serves our table of signed adverts (ours first), within the entry and byte bounds; an
    /// empty table to a peer that asked within `serve_interval`.
    fn on_table_request(
        &mut self,
        peer: PeerId,
        req: TableRequest,
        channel: ResponseChannel<TableResponse>,
    ) {
        if !self.allowed(&peer) || !self.cfg.table_sync.enabled {
            self.stats.refused_auction.fetch_add(1, Ordering::Relaxed);
            return; // dropping the channel fails the request on the other side
        }
        let ts = &self.cfg.table_sync;
        let now = Instant::now();
        let mut res = TableResponse::default();
        let due = self
            .served
            .get(&peer)
            .is_none_or(|t| now.saturating_duration_since(*t) >= ts.serve_interval);
        if due {
            self.served.insert(peer, now);
            if self.served.len() > self.cfg.limits.max_known_peers {
                let keep = ts.serve_interval;
                self.served
                    .retain(|_, t| now.saturating_duration_since(*t) < keep);
            }
            let max_entries = (req.max_entries as usize).min(ts.max_entries);
            // Room for the response's own framing.
            let mut budget = ts.max_bytes.saturating_sub(64);
            let own = self.own_signed.iter().map(|s| (s, Duration::ZERO));
            let others = self
                .table
                .signed_entries()
                .filter(|(p, _, _)| **p != peer)
                .map(|(_, s, at)| (s, now.saturating_duration_since(at)));
            for (signed, age) in own.chain(others).take(max_entries) {
                let cost = signed.len() + ENTRY_OVERHEAD;
                if cost > budget {
                    break;
                }
                budget -= cost;
                res.entries.push(TableEntry {
                    age_ms: u64::try_from(age.as_millis()).unwrap_or(u64::MAX),
                    signed: signed.to_vec(),
                });
            }
        }
        let _ = self.swarm.behaviour_mut().table.send_response(channel, res);
    }

    /// Verifies and stores every entry of a table we asked for (only from peers we asked).
    fn on_table_response(&mut self, peer: PeerId, res: TableResponse) {
        if !self.syncing.remove(&peer) {
            return;
        }
        if !self.followup_done {
            self.followup_done = true;
            let after = self.cfg.table_sync.followup_after;
            if !after.is_zero() {
                self.followup_sync_at = Some(Instant::now() + after);
            }
        }
        let max = self.cfg.table_sync.max_entries;
        for e in res.entries.into_iter().take(max) {
            let age = Duration::from_millis(e.age_ms);
            let _ = self.on_signed_advert(&e.signed, Origin::Sync { age });
        }
    }

    fn on_request(
        &mut self,
        peer: PeerId,
        req: AuctionRequest,
        channel: ResponseChannel<AuctionResponse>,
    ) {
        if !self.allowed(&peer) {
            self.stats.refused_auction.fetch_add(1, Ordering::Relaxed);
            return; // dropping the channel fails the request on the other side
        }
        let now = Instant::now();
        let resp = match req {
            AuctionRequest::Call(call) => {
                let from_peer = self
                    .pending_calls
                    .values()
                    .filter(|c| c.peer == peer)
                    .count();
                if self.pending_calls.len() >= self.cfg.limits.max_pending_calls
                    || from_peer >= self.cfg.limits.max_pending_calls_per_peer
                    || !self.book.has_room(&peer)
                {
                    AuctionResponse::Decline {
                        request_id: call.request_id,
                        reason: DeclineReason::Overloaded,
                    }
                } else {
                    let token = self.next_token;
                    self.next_token = self.next_token.wrapping_add(1);
                    let request_id = call.request_id;
                    let deadline = now + Duration::from_millis(u64::from(call.deadline_ms));
                    let ev = MeshEvent::AuctionCall {
                        peer,
                        call,
                        token: CallToken(token),
                    };
                    if self.events.try_send(ev).is_err() {
                        self.stats.dropped_events.fetch_add(1, Ordering::Relaxed);
                        AuctionResponse::Decline {
                            request_id,
                            reason: DeclineReason::Overloaded,
                        }
                    } else {
                        self.pending_calls.insert(
                            token,
                            PendingCall {
                                peer,
                                request_id,
                                channel,
                                deadline,
                            },
                        );
                        return;
                    }
                }
            }
            AuctionRequest::Award(award) => {
                let request_id = award.request_id;
                let refused = |reason| AuctionResponse::AwardRefused { request_id, reason };
                match self.book.award(peer, &award, now) {
                    AwardCheck::Accepted => match self.serve_gate.try_acquire() {
                        Some(slot) => {
                            let ev = MeshEvent::Awarded { peer, award, slot };
                            if self.events.try_send(ev).is_ok() {
                                AuctionResponse::AwardAccepted { request_id }
                            } else {
                                // Nobody would serve it: refuse now rather than let the home
                                // wait for a stream that never opens.
                                self.stats.dropped_events.fetch_add(1, Ordering::Relaxed);
                                refused(AwardRefusal::Overloaded)
                            }
                        }
                        None => {
                            self.stats
                                .awards_refused_busy
                                .fetch_add(1, Ordering::Relaxed);
                            refused(AwardRefusal::Overloaded)
                        }
                    },
                    AwardCheck::Refused(reason) => refused(reason),
                }
            }
            AuctionRequest::Cancel { request_id } => {
                if self.book.cancel(peer, request_id) {
                    self.emit(MeshEvent::AuctionCancelled { peer, request_id });
                }
                AuctionResponse::Cancelled { request_id }
            }
        };
        let _ = self
            .swarm
            .behaviour_mut()
            .auction
            .send_response(channel, resp);
    }
}

/// Gossip message id = the first 20 bytes of SHA-256 over the payload: identical adverts share
/// an id (so duplicates are dropped by a cache lookup), and nobody can make a different advert
/// collide with an honest one to have it suppressed.
fn content_message_id(m: &gossipsub::Message) -> gossipsub::MessageId {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(&m.data);
    gossipsub::MessageId::new(&digest[..20])
}

/// A small transfer in 256 KiB pieces whose only purpose is to measure goodput to `peer`.
async fn probe(
    control: libp2p_stream::Control,
    peer: PeerId,
    bytes: u64,
    id: u64,
    limits: SenderLimits,
    estimator: Arc<Mutex<BandwidthEstimator>>,
) -> Result<(), crate::kv::KvError> {
    let model = crate::advert::ModelRef {
        model_id: String::new(),
        weights_hash: [0; 32],
        kv_layout_version: 0,
        kv_layout_hash: [0; 32],
    };
    let header = KvHeader::opaque(0, model, bytes, 256 * 1024, true);
    let mut s = crate::kv::KvSender::open(&control, peer, header, 1, id, limits, estimator).await?;
    s.send_opaque(&[0xA5]).await?;
    s.finish(KvTrailer::default()).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advert_age_comes_from_the_signed_sequence_number() {
        let skew = Duration::from_secs(2);
        let now = 1_000_000;
        assert_eq!(advert_age_from_seq(now, now, skew), Some(Duration::ZERO));
        assert_eq!(
            advert_age_from_seq(now - 1_500, now, skew),
            Some(Duration::ZERO),
            "within the skew"
        );
        assert_eq!(
            advert_age_from_seq(now - 10_000, now, skew),
            Some(Duration::from_secs(8))
        );
        assert_eq!(
            advert_age_from_seq(now + 2_000, now, skew),
            Some(Duration::ZERO),
            "a clock ahead by the skew"
        );
        assert_eq!(advert_age_from_seq(now + 2_001, now, skew), None);
        assert_eq!(advert_age_from_seq(u64::MAX, now, skew), None);
        assert_eq!(
            advert_age_from_seq(0, now, Duration::MAX),
            Some(Duration::ZERO)
        );
    }
}
