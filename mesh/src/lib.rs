//! prfaas mesh: libp2p behaviours, wire types, the sans-IO offload policy and the simulator.
