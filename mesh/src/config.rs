//! Mesh configuration (TOML/serde, human durations).

use std::time::Duration;

use libp2p::identity::Keypair;
use serde::{Deserialize, Serialize};

/// Everything a mesh node needs to start.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MeshConfig {
    /// Node identity; a fresh random ed25519 key when absent. Serialized as hex of the libp2p
    /// protobuf encoding (keep config files with a key private).
    #[serde(with = "keypair_hex")]
    pub keypair: Option<Keypair>,
    /// Multiaddrs to listen on, e.g. `/ip4/0.0.0.0/tcp/4001`, `/ip4/0.0.0.0/udp/4001/quic-v1`.
    /// Anything but a loopback address needs `psk`, `allowlist` or `open = true` (see
    /// [`MeshConfig::check_exposure`]).
    pub listen: Vec<String>,
    /// Multiaddrs (ideally with `/p2p/<id>`) dialled at start.
    pub bootstrap: Vec<String>,
    /// Pre-shared key (64 hex chars) for a private mesh. Forces TCP only: pnet cannot wrap QUIC.
    pub psk: Option<String>,
    /// If set, only these peer ids (base58) may connect, gossip, bid or stream KV.
    pub allowlist: Option<Vec<String>>,
    /// Run an open mesh: listen on non-loopback addresses with neither a PSK nor an allowlist,
    /// so anyone who can reach the port may join, bid, win auctions (and so read the prompts
    /// they prefill) and stream KV. Off by default: such a node refuses to start.
    pub open: bool,
    /// Also use QUIC (ignored with a PSK).
    pub quic: bool,
    /// Discover peers on the local network with mDNS.
    pub mdns: bool,
    /// Operator region label (copied into adverts).
    pub region: String,
    /// How often our advert may be re-published while something is new: our advert changed, or
    /// (only with table sync off) a node we had not heard of appeared and may not know us.
    /// Changes made through `set_advert` are published at once regardless.
    #[serde(with = "humantime_serde")]
    pub advert_interval: Duration,
    /// Re-publication period of an unchanged advert in a mesh without newcomers, so peers do not
    /// expire us. `None`: `max(advert_interval, advert_expiry / 3)`, i.e. three chances per
    /// expiry period. Every advert costs every node in the mesh about `gossip.mesh_n` receptions
    /// and one signature check, so a quiet mesh should not pay the join-time rate.
    #[serde(default, with = "humantime_serde")]
    pub advert_refresh: Option<Duration>,
    /// Peers whose last advert is older than this are dropped from the peer table.
    #[serde(with = "humantime_serde")]
    pub advert_expiry: Duration,
    /// Gossipsub heartbeat; shorter converges faster at more chatter.
    #[serde(with = "humantime_serde")]
    pub gossip_heartbeat: Duration,
    /// Keep dialling peers learned from adverts until this many are connected.
    pub target_peers: usize,
    /// Gossipsub mesh shape for the advert topic.
    pub gossip: GossipConfig,
    /// Parallel streams per KV transfer by default.
    pub streams_per_transfer: u16,
    /// How KV this node homes may cross the network: `f16` (default) always takes it as stored
    /// (exact); `int8` lets the home ask a winner for int8 KV (about 1.8x fewer bytes, lossy)
    /// whenever the bandwidth it observed to that winner makes the transfer, not the prefill,
    /// the longer of the two.
    pub kv_wire: crate::kv::KvWire,
    /// Bandwidth estimation.
    pub bandwidth: BandwidthConfig,
    /// Bounds on everything that can grow.
    pub limits: Limits,
    /// Table sync (`/prfaas/table/1`): fetch a peer's signed adverts on connecting to it.
    #[serde(default)]
    pub table_sync: TableSyncConfig,
    /// Redialling bootstrap addresses and lost peers (backoff with jitter).
    #[serde(default)]
    pub redial: crate::discovery::RedialConfig,
    /// Per-peer record of failed, late and lying transfers; bans repeated liars.
    #[serde(default)]
    pub reputation: crate::reputation::ReputationConfig,
    /// NAT traversal: relay server, relay reservations, AutoNAT (see [`crate::nat`]).
    #[serde(default)]
    pub nat: crate::nat::NatConfig,
}

/// Table sync: on each new outbound connection (rate-limited) a node asks the peer for its table
/// of signed adverts and verifies every entry, so a joining node knows the mesh without waiting
/// for everyone's next advert refresh.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TableSyncConfig {
    /// Ask peers we dial for their table (and answer peers that ask us).
    pub enabled: bool,
    /// Most entries asked for, served and used per sync.
    pub max_entries: usize,
    /// Most peers one sync answer may add to the table (updates of known peers are not
    /// counted): one peer cannot fill the table with made-up identities. Dropped entries are
    /// counted (reason `table_quota`).
    pub max_new_per_sync: usize,
    /// Largest encoded table response accepted or sent, bytes (checked before allocating).
    pub max_bytes: usize,
    /// Syncs a node may start at once (one per new outbound connection at most)…
    pub burst: u32,
    /// …and one more per this period after that.
    #[serde(with = "humantime_serde")]
    pub period: Duration,
    /// A peer asking again within this period gets an empty table.
    #[serde(with = "humantime_serde")]
    pub serve_interval: Duration,
    /// One more sync, from another connected peer, this long after the first one answered
    /// (zero: none). It picks up nodes that joined at about the same time as we did, whose
    /// adverts had not reached our first sync source yet; this replaces every node
    /// re-publishing its advert for every newcomer. Back-to-back runs of the 100-node
    /// in-process bench: convergence 1.9–2.0 s with 300 ms, 2.3 s without.
    #[serde(with = "humantime_serde")]
    pub followup_after: Duration,
}

impl Default for TableSyncConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            max_entries: 1024,
            max_new_per_sync: 256,
            max_bytes: 1024 * 1024,
            burst: 3,
            period: Duration::from_secs(10),
            serve_interval: Duration::from_secs(10),
            followup_after: Duration::from_millis(300),
        }
    }
}

/// Gossipsub parameters for the advert topic.
///
/// Adverts are small (well under 1 KiB), signed, and re-sent every `advert_refresh`, so the
/// defaults trade gossipsub's generic redundancy for less work per message: every copy a node
/// receives costs a reception (decode, hash, duplicate check; the signature is checked once per
/// unique advert), about `mesh_n` copies of every advert in the mesh. A smaller mesh (4 instead of libp2p's 6, at most
/// 8 instead of 12) keeps that cost down while still leaving several disjoint paths; lost
/// messages are repaired by the next periodic advert and by IHAVE/IWANT gossip.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GossipConfig {
    /// Target number of mesh peers (gossipsub `D`).
    pub mesh_n: usize,
    /// Graft more peers below this (`D_low`).
    pub mesh_n_low: usize,
    /// Prune peers above this (`D_high`).
    pub mesh_n_high: usize,
    /// Mesh peers that must be outbound connections (eclipse protection); `2 × this ≤ mesh_n`.
    pub mesh_outbound_min: usize,
    /// Peers we gossip IHAVE to each heartbeat (`D_lazy`).
    pub gossip_lazy: usize,
    /// Publish our own adverts to every subscribed peer, not only mesh peers. Costs one extra
    /// verification per connected peer; helps only while the mesh is still forming.
    pub flood_publish: bool,
    /// Messages at least this large make receivers send IDONTWANT to their mesh peers, so those
    /// do not forward a copy they would otherwise send. For sub-KiB adverts it costs more than it
    /// saves: one control message per mesh peer per advert, and every IDONTWANT makes the
    /// receiving handler scan its send queue (measured: ~11 % of a 100-node in-process mesh's
    /// CPU, and ~0.3 core more at 50 nodes with 256 than with the default), while on fast links
    /// the duplicate usually arrives before the IDONTWANT anyway. So only large messages use it.
    pub idontwant_threshold: usize,
}

impl Default for GossipConfig {
    fn default() -> Self {
        Self {
            mesh_n: 4,
            mesh_n_low: 3,
            mesh_n_high: 8,
            mesh_outbound_min: 2,
            gossip_lazy: 4,
            flood_publish: false,
            idontwant_threshold: 16 * 1024,
        }
    }
}

/// Bandwidth estimator settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BandwidthConfig {
    /// Weight of a new sample in the EWMA.
    pub ewma_alpha: f64,
    /// Transfers smaller than this do not count (they measure latency).
    pub min_sample_bytes: u64,
    /// Send probe transfers to connected peers whose estimate is older than this.
    pub probes: bool,
    /// Size of a probe transfer.
    pub probe_bytes: u64,
    /// Estimates older than this are stale and trigger a probe.
    #[serde(with = "humantime_serde")]
    pub stale_after: Duration,
}

/// Bounds.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Established connections in total.
    pub max_connections: u32,
    /// Established connections per peer.
    pub max_connections_per_peer: u32,
    /// Peers kept in the peer table.
    pub max_known_peers: usize,
    /// Largest advert accepted or sent, bytes.
    pub max_advert_bytes: usize,
    /// Largest auction message, bytes.
    pub max_auction_bytes: usize,
    /// Inbound calls awaiting the application's answer; more are declined as overloaded.
    pub max_pending_calls: usize,
    /// Inbound calls from one peer awaiting an answer; more from it are declined as overloaded
    /// (so one peer cannot hold every pending-call place).
    pub max_pending_calls_per_peer: usize,
    /// Outstanding bids remembered for award checks.
    pub max_outstanding_bids: usize,
    /// Outstanding bids for one home; calls from a home holding this many are declined.
    pub max_outstanding_bids_per_peer: usize,
    /// Auction request timeout (no answer ⇒ error).
    #[serde(with = "humantime_serde")]
    pub auction_timeout: Duration,
    /// Command queue from handles to the swarm task.
    pub command_queue: usize,
    /// Event queue from the mesh to the application; when full, events are dropped and counted.
    pub event_queue: usize,
    /// Largest KV piece frame accepted, bytes (a piece is one layer's KV for a range of tokens).
    #[serde(alias = "max_layer_bytes")]
    pub max_piece_bytes: u64,
    /// Largest KV transfer accepted, bytes.
    pub max_transfer_bytes: u64,
    /// Largest KV trailer, bytes.
    pub max_trailer_bytes: usize,
    /// Most parallel streams in one transfer.
    pub max_streams_per_transfer: u16,
    /// Incoming transfers being assembled at once.
    pub max_pending_transfers: usize,
    /// KV stream hellos one peer may have being read at once (more are refused, reason
    /// `hello_quota`).
    pub max_kv_hellos_per_peer: usize,
    /// Accept KV transfers nobody awaits (see `MeshHandle::expect_kv`). Off: a transfer is
    /// taken only from a peer this node awarded it to. For benches and tools without auctions.
    pub accept_unexpected_kv: bool,
    /// A KV transfer with no progress for this long fails.
    #[serde(with = "humantime_serde")]
    pub kv_idle_timeout: Duration,
    /// A peer's bandwidth probe is taken at most once per this period (more are refused,
    /// reason `probe_quota`). Honest nodes probe a peer once per `bandwidth.stale_after`.
    #[serde(with = "humantime_serde")]
    pub min_probe_interval: Duration,
    /// A receiver that takes KV slower than this many bytes/s (measured while data was waiting,
    /// after 5 s of it) is cut and the sender frees what it held for the transfer. 0 disables.
    pub kv_min_rate_bytes_per_s: u64,
    /// Connection set-up (pnet + noise + yamux) must finish within this.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// Largest clock difference assumed between nodes. Advert sequence numbers are the signer's
    /// wall-clock ms: an advert older than `advert_expiry` plus this is refused as a replay,
    /// one from further in the future is refused outright.
    #[serde(with = "humantime_serde")]
    pub max_clock_skew: Duration,
}

impl Default for MeshConfig {
    fn default() -> Self {
        Self {
            keypair: None,
            listen: vec!["/ip4/127.0.0.1/tcp/0".into()],
            bootstrap: vec![],
            psk: None,
            allowlist: None,
            open: false,
            quic: false,
            mdns: false,
            region: String::new(),
            advert_interval: Duration::from_secs(1),
            advert_refresh: None,
            advert_expiry: Duration::from_secs(5),
            gossip_heartbeat: Duration::from_millis(500),
            target_peers: 8,
            gossip: GossipConfig::default(),
            streams_per_transfer: 1,
            kv_wire: crate::kv::KvWire::F16,
            bandwidth: BandwidthConfig::default(),
            limits: Limits::default(),
            table_sync: TableSyncConfig::default(),
            redial: crate::discovery::RedialConfig::default(),
            reputation: crate::reputation::ReputationConfig::default(),
            nat: crate::nat::NatConfig::default(),
        }
    }
}

impl Default for BandwidthConfig {
    fn default() -> Self {
        Self {
            ewma_alpha: 0.3,
            min_sample_bytes: 256 * 1024,
            probes: true,
            probe_bytes: 1024 * 1024,
            stale_after: Duration::from_secs(30),
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 256,
            max_connections_per_peer: 2,
            max_known_peers: 1024,
            max_advert_bytes: 64 * 1024,
            max_auction_bytes: 1024 * 1024,
            max_pending_calls: 64,
            max_pending_calls_per_peer: 16,
            max_outstanding_bids: 256,
            max_outstanding_bids_per_peer: 64,
            auction_timeout: Duration::from_secs(5),
            command_queue: 256,
            event_queue: 1024,
            max_piece_bytes: 256 * 1024 * 1024,
            max_transfer_bytes: 8 * 1024 * 1024 * 1024,
            max_trailer_bytes: 1024 * 1024,
            max_streams_per_transfer: 16,
            max_pending_transfers: 64,
            max_kv_hellos_per_peer: 32,
            accept_unexpected_kv: false,
            kv_idle_timeout: Duration::from_secs(30),
            min_probe_interval: Duration::from_millis(250),
            kv_min_rate_bytes_per_s: 64 * 1024,
            handshake_timeout: Duration::from_secs(10),
            max_clock_skew: Duration::from_secs(10),
        }
    }
}

impl MeshConfig {
    /// The effective re-publication period of an unchanged advert (see `advert_refresh`).
    pub fn effective_advert_refresh(&self) -> Duration {
        self.advert_refresh
            .unwrap_or_else(|| self.advert_interval.max(self.advert_expiry / 3))
    }

    /// A config for tests and single-machine meshes: loopback TCP on port 0, fast timers.
    pub fn local() -> Self {
        Self {
            listen: vec!["/ip4/127.0.0.1/tcp/0".into()],
            advert_interval: Duration::from_millis(200),
            advert_expiry: Duration::from_millis(1500),
            gossip_heartbeat: Duration::from_millis(100),
            ..Self::default()
        }
    }

    /// Secure by default: refuses listen addresses other machines can reach (anything but
    /// loopback, an in-process memory transport, or nothing) unless the mesh is private (`psk`)
    /// or closed (`allowlist`), or the operator chose `open = true`.
    pub fn check_exposure(&self) -> Result<(), crate::MeshError> {
        if self.open || self.psk.is_some() || self.allowlist.is_some() {
            return Ok(());
        }
        // Listening through a relay makes us reachable by whoever reaches the relay.
        if let Some(relay) = self.nat.relays.first() {
            return Err(crate::MeshError::Exposed {
                addr: format!("{relay}/p2p-circuit"),
            });
        }
        match self.listen.iter().find(|a| !is_local_only(a)) {
            None => Ok(()),
            Some(addr) => Err(crate::MeshError::Exposed { addr: addr.clone() }),
        }
    }

    /// Parses a TOML config.
    pub fn from_toml(s: &str) -> Result<Self, crate::MeshError> {
        toml::from_str(s).map_err(|e| crate::MeshError::Config(e.to_string()))
    }
}

/// Hex (de)serialization of an optional keypair.
mod keypair_hex {
    use libp2p::identity::Keypair;
    use serde::{de::Error as _, Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(k: &Option<Keypair>, s: S) -> Result<S::Ok, S::Error> {
        match k {
            None => s.serialize_none(),
            Some(k) => {
                let bytes = k
                    .to_protobuf_encoding()
                    .map_err(serde::ser::Error::custom)?;
                s.serialize_some(&crate::config::hex_encode(&bytes))
            }
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Keypair>, D::Error> {
        let Some(s) = Option::<String>::deserialize(d)? else {
            return Ok(None);
        };
        let bytes = crate::config::hex_decode(&s)
            .ok_or_else(|| D::Error::custom("keypair: invalid hex"))?;
        Keypair::from_protobuf_encoding(&bytes)
            .map(Some)
            .map_err(|e| D::Error::custom(format!("keypair: {e}")))
    }
}

/// Whether a listen multiaddr is reachable from this machine only: a loopback IP or the
/// in-process memory transport. Unparsable addresses count as exposed (they fail later anyway).
fn is_local_only(addr: &str) -> bool {
    use libp2p::multiaddr::Protocol;
    let Ok(ma) = addr.parse::<libp2p::Multiaddr>() else {
        return false;
    };
    match ma.iter().next() {
        Some(Protocol::Ip4(ip)) => ip.is_loopback(),
        Some(Protocol::Ip6(ip)) => ip.is_loopback(),
        Some(Protocol::Memory(_)) => true,
        _ => false,
    }
}

/// Lower-case hex.
pub(crate) fn hex_encode(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Parses hex (either case); `None` on odd length or a non-hex digit.
pub(crate) fn hex_decode(s: &str) -> Option<Vec<u8>> {
    let s = s.trim();
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| s.get(i..i + 2).and_then(|p| u8::from_str_radix(p, 16).ok()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_roundtrip_with_human_durations_and_key() {
        let cfg = MeshConfig {
            keypair: Some(Keypair::generate_ed25519()),
            psk: Some("ab".repeat(32)),
            ..MeshConfig::local()
        };
        let text = toml::to_string(&cfg).expect("serialize");
        assert!(text.contains("advert_interval = \"200ms\""), "{text}");
        let back = MeshConfig::from_toml(&text).expect("parse");
        assert_eq!(
            back.keypair.map(|k| k.public().to_peer_id()),
            cfg.keypair.map(|k| k.public().to_peer_id())
        );
        assert_eq!(back.advert_expiry, Duration::from_millis(1500));
        let partial =
            MeshConfig::from_toml("advert_interval = \"2s\"\n[limits]\nevent_queue = 8\n")
                .expect("partial");
        assert_eq!(partial.advert_interval, Duration::from_secs(2));
        assert_eq!(partial.limits.event_queue, 8);
        assert!(MeshConfig::from_toml("bogus = 1").is_err());
    }

    #[test]
    fn advert_refresh_defaults_to_a_third_of_the_expiry_but_never_below_the_interval() {
        let mut c = MeshConfig::default();
        assert_eq!(
            c.effective_advert_refresh(),
            Duration::from_secs(5) / 3,
            "1 s interval, 5 s expiry"
        );
        c.advert_interval = Duration::from_secs(3);
        assert_eq!(c.effective_advert_refresh(), Duration::from_secs(3));
        c.advert_refresh = Some(Duration::from_millis(1500));
        assert_eq!(c.effective_advert_refresh(), Duration::from_millis(1500));
        let parsed = MeshConfig::from_toml("advert_refresh = \"2s\"\n").expect("parse");
        assert_eq!(parsed.advert_refresh, Some(Duration::from_secs(2)));
        assert_eq!(
            MeshConfig::from_toml("").expect("empty").advert_refresh,
            None
        );
    }

    #[test]
    fn exposed_listen_needs_a_psk_an_allowlist_or_open() {
        let mut c = MeshConfig::default();
        assert!(c.check_exposure().is_ok(), "default listens on loopback");
        for local in ["/ip4/127.0.0.1/tcp/0", "/ip6/::1/tcp/0", "/memory/7"] {
            c.listen = vec![local.into()];
            assert!(c.check_exposure().is_ok(), "{local}");
        }
        for exposed in [
            "/ip4/0.0.0.0/tcp/4001",
            "/ip4/10.0.0.2/udp/4001/quic-v1",
            "/ip6/::/tcp/0",
            "/dns4/example.org/tcp/1",
            "garbage",
        ] {
            c.listen = vec!["/ip4/127.0.0.1/tcp/0".into(), exposed.into()];
            let err = c.check_exposure().expect_err(exposed).to_string();
            assert!(
                err.contains(exposed) && err.contains("open = true"),
                "{err}"
            );
            assert!(err.contains("psk") && err.contains("allowlist"), "{err}");
        }
        let ok = |f: &dyn Fn(&mut MeshConfig)| {
            let mut c = c.clone();
            f(&mut c);
            c.check_exposure().is_ok()
        };
        assert!(ok(&|c| c.psk = Some("ab".repeat(32))));
        assert!(ok(&|c| c.allowlist = Some(vec![])));
        assert!(ok(&|c| c.open = true));
        let parsed = MeshConfig::from_toml("open = true\nlisten = [\"/ip4/0.0.0.0/tcp/0\"]\n")
            .expect("parse");
        assert!(parsed.open && parsed.check_exposure().is_ok());
        // Listening through a relay exposes the node to whoever reaches the relay.
        let mut relayed = MeshConfig::default();
        relayed.nat.relays = vec!["/ip4/203.0.113.7/tcp/4001/p2p/x".into()];
        let err = relayed.check_exposure().expect_err("relayed").to_string();
        assert!(err.contains("/p2p-circuit"), "{err}");
        relayed.psk = Some("ab".repeat(32));
        assert!(relayed.check_exposure().is_ok());
    }

    #[test]
    fn hex_helpers() {
        assert_eq!(
            hex_decode(&hex_encode(&[0, 255, 16])),
            Some(vec![0, 255, 16])
        );
        assert_eq!(hex_decode("abc"), None);
        assert_eq!(hex_decode("zz"), None);
    }
}
