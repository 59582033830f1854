//! Transport and swarm construction: TCP (+ optional PSK) or QUIC, noise, yamux, and the composed
//! behaviour with every protocol's bounds taken from the config. Nothing here runs; [`build`]
//! returns a swarm for the router in [`crate::node`] to drive.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use libp2p::core::muxing::StreamMuxerBox;
use libp2p::core::transport::{Boxed, Transport};
use libp2p::core::upgrade::Version;
use libp2p::gossipsub::{self, IdentTopic};
use libp2p::identity::Keypair;
use libp2p::pnet::{PnetConfig, PreSharedKey};
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::{
    allow_block_list, connection_limits, identify, mdns, noise, ping, tcp, yamux, Multiaddr,
    PeerId, Swarm,
};

use crate::advert::sync::{TableCodec, MAX_REQUEST_BYTES, TABLE_PROTOCOL};
use crate::advert::ADVERT_TOPIC;
use crate::auction::{AuctionCodec, AUCTION_PROTOCOL};
use crate::behaviour::MeshBehaviour;
use crate::config::MeshConfig;
use crate::kv::KV_PROTOCOL;
use crate::MeshError;

/// Who may connect: everyone (`None`) or the listed peers (ourselves included).
#[derive(Debug, Clone, Default)]
pub(crate) struct Allowlist(Option<Arc<HashSet<PeerId>>>);

impl Allowlist {
    /// Parses the configured list (base58 peer ids); `local` is always allowed.
    pub fn from_config(list: Option<&[String]>, local: PeerId) -> Result<Self, MeshError> {
        let Some(list) = list else {
            return Ok(Self(None));
        };
        let mut set = HashSet::new();
        for s in list {
            set.insert(
                s.parse::<PeerId>()
                    .map_err(|e| MeshError::Config(format!("allowlist {s}: {e}")))?,
            );
        }
        set.insert(local);
        Ok(Self(Some(Arc::new(set))))
    }

    /// Whether `peer` may talk to us.
    pub fn allows(&self, peer: &PeerId) -> bool {
        self.0.as_ref().is_none_or(|a| a.contains(peer))
    }

    /// The set, for the KV acceptor (which runs outside the swarm task).
    pub fn set(&self) -> Option<Arc<HashSet<PeerId>>> {
        self.0.clone()
    }
}

/// A built swarm and what the router needs next to it.
pub(crate) struct Built {
    pub swarm: Swarm<MeshBehaviour>,
    /// The configured bootstrap addresses, for the redialer to dial.
    pub bootstrap: Vec<Multiaddr>,
    /// Opens and accepts KV streams outside the swarm task.
    pub control: libp2p_stream::Control,
    /// Inbound `/prfaas/kv/2` streams, for the KV acceptor.
    pub incoming: libp2p_stream::IncomingStreams,
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

/// Inbound KV streams that may wait for the acceptor: every hello slot (shared and awaited
/// winners') at once, so no stream the quotas would admit is lost to a burst.
fn kv_accept_buffer(limits: &crate::config::Limits) -> usize {
    (limits.max_pending_transfers.max(1) * 4).clamp(16, 1024)
}

/// Gossip message id = the first 20 bytes of SHA-256 over the payload: identical adverts share
/// an id (so duplicates are dropped by a cache lookup), and nobody can make a different advert
/// collide with an honest one to have it suppressed.
fn content_message_id(m: &gossipsub::Message) -> gossipsub::MessageId {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(&m.data);
    gossipsub::MessageId::new(&digest[..20])
}

/// Builds the swarm for `cfg` (listening on its addresses) and parses its bootstrap addresses.
/// Must be called inside a tokio runtime.
pub(crate) fn build(
    cfg: &MeshConfig,
    key: &Keypair,
    allowlist: &Allowlist,
) -> Result<Built, MeshError> {
    let local = key.public().to_peer_id();
    let psk = cfg.psk.as_deref().map(parse_psk).transpose()?;
    let relay_listen = cfg
        .nat
        .relay_listen_addrs()
        .map_err(|e| MeshError::Config(e.to_string()))?;
    let (relay_transport, relay_client) = libp2p::relay::client::new(local);
    let transport = build_transport(
        key,
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

    let allow = allowlist.0.as_ref().map(|set| {
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
    // Inbound KV streams wait here until the acceptor takes them (it refuses what its quotas do
    // not admit at once); a burst larger than the buffer is reset by libp2p, not queued.
    let incoming = control
        .accept_with_buffer(KV_PROTOCOL, kv_accept_buffer(&cfg.limits))
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
        // The relay client dials the relay (through the swarm, so pnet applies) and reserves a
        // slot; the circuit address is reported as a listen address once accepted, and
        // gossiped in our adverts like any other.
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
    Ok(Built {
        swarm,
        bootstrap,
        control,
        incoming,
    })
}
