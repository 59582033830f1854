//! The composed libp2p behaviour.

use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::NetworkBehaviour;
use libp2p::{
    allow_block_list, autonat, connection_limits, dcutr, gossipsub, identify, mdns, ping, relay,
    request_response,
};

use crate::advert::sync::TableCodec;
use crate::auction::AuctionCodec;

/// One node's behaviours. Admission (`allow`, `limits`) comes first so denied connections never
/// reach the protocols.
#[derive(NetworkBehaviour)]
pub(crate) struct MeshBehaviour {
    pub allow: Toggle<allow_block_list::Behaviour<allow_block_list::AllowedPeers>>,
    pub limits: connection_limits::Behaviour,
    pub identify: identify::Behaviour,
    pub ping: ping::Behaviour,
    pub gossipsub: gossipsub::Behaviour,
    pub auction: request_response::Behaviour<AuctionCodec>,
    pub table: request_response::Behaviour<TableCodec>,
    pub kv: libp2p_stream::Behaviour,
    pub mdns: Toggle<mdns::tokio::Behaviour>,
    /// NAT traversal (`crate::nat`): dial and listen through relays, serve as one, punch holes,
    /// learn our reachability.
    pub relay_client: relay::client::Behaviour,
    pub relay: Toggle<relay::Behaviour>,
    pub dcutr: dcutr::Behaviour,
    pub autonat: Toggle<autonat::Behaviour>,
}
