//! Property tests over every decoder: random bytes never panic (and never allocate past limits).

use prfaas_mesh::advert::Advert;
use prfaas_mesh::auction::{AuctionRequest, AuctionResponse};
use prfaas_mesh::kv::codec::{read_frame, read_hello, write_piece};
use prfaas_mesh::kv::{FrameHeader, KvAck, PieceId, StreamHello};
use prfaas_mesh::wire;
use proptest::prelude::*;

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    futures::executor::block_on(f)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn random_bytes_never_panic_cbor_decoders(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let _ = wire::decode::<Advert>(&bytes, 64 * 1024);
        let _ = wire::decode::<AuctionRequest>(&bytes, 64 * 1024);
        let _ = wire::decode::<AuctionResponse>(&bytes, 64 * 1024);
        let _ = wire::decode::<StreamHello>(&bytes, 4096);
        let _ = wire::decode::<FrameHeader>(&bytes, 4096);
        let _ = wire::decode::<KvAck>(&bytes, 4096);
        let _ = prfaas_mesh::advert::codec::decode(&bytes, Some(prfaas_mesh::PeerId::random()), 64 * 1024);
        let _ = prfaas_mesh::advert::codec::open_verified(&bytes, 64 * 1024);
        let _ = wire::decode::<prfaas_mesh::advert::sync::TableResponse>(&bytes, 64 * 1024);
        let _ = wire::decode::<prfaas_mesh::advert::sync::TableRequest>(&bytes, 1024);
    }

    #[test]
    fn random_bytes_never_panic_stream_readers(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let mut r = futures::io::Cursor::new(bytes.clone());
        let _ = block_on(read_hello(&mut r, 16));
        let mut r = futures::io::Cursor::new(bytes.clone());
        // Small bounds: a random length prefix must be refused before allocation.
        let _ = block_on(read_frame(&mut r, 4096, 8192, 1024));
        let mut r = futures::io::Cursor::new(bytes);
        let _ = block_on(wire::read_framed::<_, AuctionRequest>(&mut r, 64 * 1024));
    }

    #[test]
    fn random_cbor_body_with_valid_length_prefix_never_panics(body in proptest::collection::vec(any::<u8>(), 0..512)) {
        let mut framed = (body.len() as u32).to_be_bytes().to_vec();
        framed.extend_from_slice(&body);
        let mut r = futures::io::Cursor::new(framed);
        let _ = block_on(read_frame(&mut r, 4096, 8192, 1024));
    }

    #[test]
    fn piece_frames_roundtrip_and_bit_flips_are_caught(
        payload in proptest::collection::vec(any::<u8>(), 1..4096),
        flip in any::<prop::sample::Index>(),
        start in 0u32..1000,
    ) {
        let id = PieceId { layer: 3, start, end: start + 17 };
        let mut buf = futures::io::Cursor::new(Vec::new());
        block_on(write_piece(&mut buf, id, &payload)).expect("write");
        let mut wire_bytes = buf.into_inner();
        let mut r = futures::io::Cursor::new(wire_bytes.clone());
        match block_on(read_frame(&mut r, 4096, 4096, 0)) {
            Ok(prfaas_mesh::kv::codec::Frame::Piece { piece, bytes, .. }) => {
                prop_assert_eq!(piece, id);
                prop_assert_eq!(bytes, payload.clone());
            }
            other => prop_assert!(false, "unexpected {:?}", other),
        }
        // Flip one payload bit: the checksum must catch it.
        let n = wire_bytes.len();
        let i = n - payload.len() + flip.index(payload.len());
        wire_bytes[i] ^= 0x10;
        let mut r = futures::io::Cursor::new(wire_bytes);
        let is_corrupt = matches!(
            block_on(read_frame(&mut r, 4096, 4096, 0)),
            Err(prfaas_mesh::kv::KvError::Corrupt { .. })
        );
        prop_assert!(is_corrupt);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Any single bit flip anywhere in a signed advert envelope (key, advert bytes, signature or
    /// CBOR framing) makes it fail to open or to verify: nothing altered is ever accepted.
    #[test]
    fn signed_advert_bit_flips_never_verify(flip in any::<prop::sample::Index>(), bit in 0u8..8) {
        let key = prfaas_mesh::identity::Keypair::generate_ed25519();
        let advert = Advert {
            node_id: key.public().to_peer_id().to_base58(),
            seq: 42,
            listen_addrs: vec!["/ip4/127.0.0.1/tcp/4001".into()],
            body: prfaas_mesh::AdvertBody::default(),
            observed_bandwidth: vec![],
        };
        let mut bytes = prfaas_mesh::advert::codec::sign(&advert, &key, 64 * 1024).expect("sign");
        prop_assert!(prfaas_mesh::advert::codec::open_verified(&bytes, 64 * 1024).is_ok());
        let i = flip.index(bytes.len());
        bytes[i] ^= 1 << bit;
        prop_assert!(prfaas_mesh::advert::codec::open_verified(&bytes, 64 * 1024).is_err());
    }
}
