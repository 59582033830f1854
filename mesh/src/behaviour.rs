//! The composed libp2p behaviour.

use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::NetworkBehaviour;
use libp2p::{
    allow_block_list, connection_limits, gossipsub, identify, mdns, ping, request_response,
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
}
