//! Structure-aware fuzzing of every mesh decoder: each input builds a *valid* message from
//! `arbitrary` data (signed adverts, table-sync answers, auction calls/bids/awards, KV hellos and
//! frames), encodes it as the sender would, applies byte-level mutations (truncation, bit flips,
//! inserted/deleted/duplicated bytes, rewritten length prefixes, CBOR markers) and decodes it as
//! the receiver does, then feeds what decoded to its consumers (bid checks, prefix summaries).
//!
//! Never a panic; an unmutated message always decodes to itself; a mutated signed advert that
//! still verifies must be the original. Short mode by default (CI); long mode:
//! `PRFAAS_FUZZ_ITERS=1000000 cargo test --workspace --test fuzz -- --nocapture`.
//! The KV receiver's frame-sequence state machine is fuzzed in its own module
//! (`mesh/src/kv/receiver/fuzz.rs`).

mod fuzz_harness;

use arbitrary::Unstructured;
use fuzz_harness::{mutate, run, tricky_string};
use prfaas_mesh::advert::codec::{decode, open, open_verified, sign};
use prfaas_mesh::advert::sync::{TableEntry, TableRequest, TableResponse};
use prfaas_mesh::advert::{
    Advert, AdvertBody, BandwidthReport, ModelRef, PrefillPoint, PrefixSummary, Role,
};
use prfaas_mesh::auction::{
    AuctionRequest, AuctionResponse, Award, AwardRefusal, Bid, Call, DeclineReason,
};
use prfaas_mesh::identity::Keypair;
use prfaas_mesh::kv::codec::{read_frame, read_hello, write_end, write_hello, write_piece};
use prfaas_mesh::kv::{FrameHeader, KvAck, KvHeader, KvTrailer, PieceId, StreamHello};
use prfaas_mesh::policy::bids::check_bid;
use prfaas_mesh::wire;

const MAX_ADVERT: usize = 64 * 1024;

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    futures::executor::block_on(f)
}

/// Floats a peer may send: finite, huge, tiny, negative, NaN, ±inf.
fn float(u: &mut Unstructured<'_>) -> arbitrary::Result<f64> {
    Ok(match u.int_in_range(0..=3u8)? {
        0 => *u.choose(&[
            0.0,
            -0.0,
            -1.0,
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::MAX,
            f64::MIN_POSITIVE,
            -1e308,
        ])?,
        1 => f64::from_bits(u.arbitrary()?),
        _ => f64::from(u.int_in_range(0..=100_000u32)?) / 100.0,
    })
}

fn model(u: &mut Unstructured<'_>) -> arbitrary::Result<ModelRef> {
    // Mostly the one model the tests bid for, so that checks reach their later branches.
    if u.ratio(3, 4)? {
        return Ok(ModelRef {
            model_id: "m".into(),
            weights_hash: [1; 32],
            kv_layout_version: 1,
            kv_layout_hash: [2; 32],
        });
    }
    Ok(ModelRef {
        model_id: tricky_string(u)?,
        weights_hash: u.arbitrary()?,
        kv_layout_version: u.arbitrary()?,
        kv_layout_hash: u.arbitrary()?,
    })
}

fn advert(u: &mut Unstructured<'_>, node_id: String) -> arbitrary::Result<Advert> {
    let mut roles = Vec::new();
    for _ in 0..u.int_in_range(0..=3u8)? {
        roles.push(if u.arbitrary()? {
            Role::Prefill
        } else {
            Role::Decode
        });
    }
    let mut models = Vec::new();
    for _ in 0..u.int_in_range(0..=2u8)? {
        models.push(model(u)?);
    }
    let mut prefill_profile = Vec::new();
    for _ in 0..u.int_in_range(0..=4u8)? {
        prefill_profile.push(PrefillPoint {
            tokens: u.arbitrary()?,
            tokens_per_sec: float(u)? as f32,
        });
    }
    let bloom_bytes = *u.choose(&[0usize, 1, 7, 64])?;
    let mut prefix_summary = PrefixSummary::with_size(bloom_bytes, u.arbitrary()?);
    for _ in 0..u.int_in_range(0..=8u8)? {
        prefix_summary.insert(u.arbitrary()?);
    }
    let mut observed_bandwidth = Vec::new();
    for _ in 0..u.int_in_range(0..=3u8)? {
        observed_bandwidth.push(BandwidthReport {
            peer: tricky_string(u)?,
            bytes_per_sec: float(u)?,
        });
    }
    let mut listen_addrs = Vec::new();
    for _ in 0..u.int_in_range(0..=2u8)? {
        listen_addrs.push(if u.arbitrary()? {
            "/ip4/127.0.0.1/tcp/4001".into()
        } else {
            tricky_string(u)?
        });
    }
    Ok(Advert {
        node_id,
        seq: u.arbitrary()?,
        listen_addrs,
        body: AdvertBody {
            region: tricky_string(u)?,
            roles,
            models,
            prefill_profile,
            queue_depth: u.arbitrary()?,
            free_kv_blocks: u.arbitrary()?,
            price_per_1k_tokens: float(u)?,
            prefix_summary,
            software_version: tricky_string(u)?,
            api_url: if u.arbitrary()? {
                Some(tricky_string(u)?)
            } else {
                None
            },
            queue_s: if u.arbitrary()? {
                Some(float(u)?)
            } else {
                None
            },
        },
        observed_bandwidth,
    })
}

fn call(u: &mut Unstructured<'_>) -> arbitrary::Result<Call> {
    let mut prefix_block_hashes = Vec::new();
    for _ in 0..u.int_in_range(0..=6u8)? {
        prefix_block_hashes.push(u.arbitrary()?);
    }
    Ok(Call {
        request_id: u.arbitrary()?,
        model: model(u)?,
        prompt_len: u.arbitrary()?,
        cached_prefix_tokens: u.arbitrary()?,
        prefix_block_hashes,
        kv_bytes_estimate: u.arbitrary()?,
        deadline_ms: u.arbitrary()?,
    })
}

fn bid(u: &mut Unstructured<'_>) -> arbitrary::Result<Bid> {
    Ok(Bid {
        request_id: u.arbitrary()?,
        bid_id: u.arbitrary()?,
        price: float(u)?,
        queue_delay_ms: u.arbitrary()?,
        est_prefill_ms: u.arbitrary()?,
        cached_tokens: u.arbitrary()?,
        valid_for_ms: u.arbitrary()?,
    })
}

/// What a home does with a decoded advert and bid: none of it may panic whatever the numbers.
fn consume(advert: &Advert, c: &Call, b: &Bid) {
    let _ = advert.peak_prefill_speed();
    let _ = advert.can_prefill(&c.model);
    let _ = advert
        .body
        .prefix_summary
        .cached_prefix_blocks(&c.prefix_block_hashes);
    let _ = check_bid(c, b, Some(advert));
    let _ = check_bid(c, b, None);
}

/// One signed envelope: signer index, whether the advert names its signer, the advert, bytes.
type Envelope = (usize, bool, Advert, Vec<u8>);

/// Builds (and signs) an envelope from `u`: most name their signer, some another node.
fn envelope(u: &mut Unstructured<'_>, keys: &[Keypair]) -> arbitrary::Result<Option<Envelope>> {
    let k = u.int_in_range(0..=keys.len() - 1)?;
    let signer = keys[k].public().to_peer_id().to_base58();
    let node_id = if u.ratio(1, 8)? {
        tricky_string(u)?
    } else {
        signer.clone()
    };
    let honest = node_id == signer;
    let a = advert(u, node_id)?;
    Ok(sign(&a, &keys[k], MAX_ADVERT)
        .ok()
        .map(|bytes| (k, honest, a, bytes)))
}

/// Envelopes signed once, up front: signing (~50 µs) would otherwise dominate each input, so
/// most inputs mutate one of these and one in sixteen builds and signs a fresh one.
fn envelope_pool(keys: &[Keypair], n: usize) -> Vec<Envelope> {
    let mut rng = fuzz_harness::SplitMix(0xE7E1_0BE5);
    let mut buf = vec![0u8; 512];
    let mut pool = Vec::new();
    while pool.len() < n {
        rng.fill(&mut buf);
        if let Ok(Some(e)) = envelope(&mut Unstructured::new(&buf), keys) {
            pool.push(e);
        }
    }
    pool
}

#[test]
fn signed_advert_envelopes() {
    let keys: Vec<Keypair> = (0..4).map(|_| Keypair::generate_ed25519()).collect();
    let pool = envelope_pool(&keys, 256);
    let (mut verified, mut refused) = (0u64, 0u64);
    run("signed advert envelopes", 20_000, 1024, |u| {
        let fresh;
        let (k, honest, a, original) = if u.ratio(1, 16)? {
            match envelope(u, &keys)? {
                Some(e) => {
                    fresh = e;
                    &fresh
                }
                None => return Ok(()),
            }
        } else {
            u.choose(&pool)?
        };
        let signer = keys[*k].public().to_peer_id();
        let mut bytes = original.clone();
        mutate(u, &mut bytes)?;
        let _ = open(&bytes, MAX_ADVERT);
        let c = call(u)?;
        let b = bid(u)?;
        match open_verified(&bytes, MAX_ADVERT) {
            Ok((peer, got)) => {
                assert!(*honest, "an advert naming another node verified");
                assert_eq!(peer, signer, "verified under another signer");
                // NaN fields make `==` false: compare encodings instead.
                assert_eq!(
                    wire::encode(&got, MAX_ADVERT).ok(),
                    wire::encode(a, MAX_ADVERT).ok(),
                    "a mutated envelope verified with different content"
                );
                consume(&got, &c, &b);
                verified += 1;
            }
            Err(_) => {
                assert!(
                    !*honest || bytes != *original,
                    "an honest envelope did not verify"
                );
                refused += 1;
            }
        }
        // The unsigned (v1) form as gossipsub-signed payload: decode with and without a source.
        let mut raw = wire::encode(a, MAX_ADVERT).expect("encode");
        mutate(u, &mut raw)?;
        if let Ok(got) = decode(&raw, Some(signer), MAX_ADVERT) {
            consume(&got, &c, &b);
        }
        let _ = decode(&raw, None, MAX_ADVERT);
        Ok(())
    });
    eprintln!("signed adverts: {verified} verified, {refused} refused");
    assert!(verified > 0 && refused > 0);
}

#[test]
fn table_sync_messages() {
    let keys: Vec<Keypair> = (0..2).map(|_| Keypair::generate_ed25519()).collect();
    let pool = envelope_pool(&keys, 64);
    let mut entries_opened = 0u64;
    run("table sync", 20_000, 1024, |u| {
        let mut entries = Vec::new();
        for _ in 0..u.int_in_range(0..=3u8)? {
            let signed = if u.arbitrary()? {
                u.choose(&pool)?.3.clone()
            } else {
                u.arbitrary()?
            };
            entries.push(TableEntry {
                age_ms: u.arbitrary()?,
                signed,
            });
        }
        let resp = TableResponse { entries };
        let max = *u.choose(&[64usize, 4096, MAX_ADVERT])?;
        let mut framed = futures::io::Cursor::new(Vec::new());
        if block_on(wire::write_framed(&mut framed, &resp, MAX_ADVERT)).is_err() {
            return Ok(());
        }
        let mut bytes = framed.into_inner();
        let mutated = mutate(u, &mut bytes)?;
        let got: Result<TableResponse, _> = block_on(wire::read_framed(&mut bytes.as_slice(), max));
        if let Ok(got) = &got {
            for e in &got.entries {
                if open_verified(&e.signed, MAX_ADVERT).is_ok() {
                    entries_opened += 1;
                }
            }
        }
        if !mutated && max == MAX_ADVERT {
            assert_eq!(got.expect("unmutated table decodes"), resp);
        }
        let mut req = wire::encode(
            &TableRequest {
                max_entries: u.arbitrary()?,
            },
            1024,
        )
        .expect("encode");
        mutate(u, &mut req)?;
        let _ = wire::decode::<TableRequest>(&req, 1024);
        Ok(())
    });
    assert!(entries_opened > 0, "no served entry ever verified");
}

fn auction_request(u: &mut Unstructured<'_>) -> arbitrary::Result<AuctionRequest> {
    Ok(match u.int_in_range(0..=2u8)? {
        0 => AuctionRequest::Call(call(u)?),
        1 => {
            let tokens: Vec<u32> = u.arbitrary()?;
            let mut packed = Award::pack_tokens(&tokens);
            if u.ratio(1, 4)? {
                packed.truncate(packed.len().saturating_sub(u.int_in_range(1..=3usize)?));
            }
            AuctionRequest::Award(Award {
                request_id: u.arbitrary()?,
                bid_id: u.arbitrary()?,
                price: float(u)?,
                tokens: packed,
                kv_wire: if u.arbitrary()? {
                    prfaas_mesh::kv::KvWire::Int8
                } else {
                    prfaas_mesh::kv::KvWire::F16
                },
            })
        }
        _ => AuctionRequest::Cancel {
            request_id: u.arbitrary()?,
        },
    })
}

fn auction_response(u: &mut Unstructured<'_>) -> arbitrary::Result<AuctionResponse> {
    let request_id = u.arbitrary()?;
    Ok(match u.int_in_range(0..=4u8)? {
        0 => AuctionResponse::Bid(bid(u)?),
        1 => AuctionResponse::Decline {
            request_id,
            reason: u
                .choose(&[
                    DeclineReason::Overloaded,
                    DeclineReason::UnknownModel,
                    DeclineReason::NotPrefilling,
                    DeclineReason::NoAnswer,
                ])?
                .clone(),
        },
        2 => AuctionResponse::AwardAccepted { request_id },
        3 => AuctionResponse::AwardRefused {
            request_id,
            reason: u
                .choose(&[
                    AwardRefusal::Expired,
                    AwardRefusal::UnknownBid,
                    AwardRefusal::PriceTooLow,
                    AwardRefusal::Overloaded,
                ])?
                .clone(),
        },
        _ => AuctionResponse::Cancelled { request_id },
    })
}

#[test]
fn auction_messages() {
    let key = Keypair::generate_ed25519();
    let id = key.public().to_peer_id().to_base58();
    run("auction messages", 20_000, 1024, |u| {
        let req = auction_request(u)?;
        let resp = auction_response(u)?;
        let max = *u.choose(&[16usize, 256, 64 * 1024])?;
        for (mut bytes, is_req) in [
            (wire::encode(&req, 64 * 1024).expect("encode"), true),
            (wire::encode(&resp, 64 * 1024).expect("encode"), false),
        ] {
            let original = bytes.clone();
            let mut framed = (bytes.len() as u32).to_be_bytes().to_vec();
            mutate(u, &mut bytes)?;
            framed.extend_from_slice(&bytes);
            if is_req {
                let direct = wire::decode::<AuctionRequest>(&bytes, max);
                let streamed: Result<AuctionRequest, _> =
                    block_on(wire::read_framed(&mut framed.as_slice(), max));
                if let Ok(AuctionRequest::Award(a)) = &direct {
                    if let Some(t) = a.unpack_tokens() {
                        assert_eq!(t.len() * 4, a.tokens.len());
                    }
                }
                if bytes == original && original.len() <= max {
                    let back = direct.expect("unmutated request decodes");
                    assert_eq!(wire::encode(&back, 64 * 1024).ok(), Some(original));
                    assert!(streamed.is_ok() || framed.len() != bytes.len() + 4);
                }
            } else {
                let direct = wire::decode::<AuctionResponse>(&bytes, max);
                let _: Result<AuctionResponse, _> =
                    block_on(wire::read_framed(&mut framed.as_slice(), max));
                if let (Ok(AuctionResponse::Bid(b)), AuctionRequest::Call(c)) = (&direct, &req) {
                    let a = advert(u, id.clone())?;
                    consume(&a, c, b);
                }
                if bytes == original && original.len() <= max {
                    let back = direct.expect("unmutated response decodes");
                    assert_eq!(wire::encode(&back, 64 * 1024).ok(), Some(original));
                }
            }
        }
        Ok(())
    });
}

fn kv_header(u: &mut Unstructured<'_>) -> arbitrary::Result<KvHeader> {
    if u.arbitrary()? {
        // The constructor a prober uses must accept any sizes.
        return Ok(KvHeader::opaque(
            u.arbitrary()?,
            model(u)?,
            u.arbitrary()?,
            u.arbitrary()?,
            u.arbitrary()?,
        ));
    }
    Ok(KvHeader {
        request_id: u.arbitrary()?,
        model: model(u)?,
        layers: u.arbitrary()?,
        tokens: u.arbitrary()?,
        dtype: tricky_string(u)?,
        max_piece_bytes: u.arbitrary()?,
        total_bytes: u.arbitrary()?,
        probe: u.arbitrary()?,
    })
}

#[test]
fn kv_hellos_frames_and_acks() {
    let (mut hellos, mut pieces) = (0u64, 0u64);
    run("kv hellos, frames and acks", 20_000, 1024, |u| {
        let hello = StreamHello {
            transfer_id: u.arbitrary()?,
            stream_index: u.int_in_range(0..=5u16)?,
            stream_count: u.int_in_range(0..=5u16)?,
            header: kv_header(u)?,
        };
        let mut buf = futures::io::Cursor::new(Vec::new());
        if block_on(write_hello(&mut buf, &hello)).is_err() {
            return Ok(());
        }
        // A few frames after the hello, as a stream carries them.
        for _ in 0..u.int_in_range(0..=3u8)? {
            if u.ratio(3, 4)? {
                let start: u32 = u.arbitrary()?;
                let id = PieceId {
                    layer: u.arbitrary()?,
                    start,
                    end: start.wrapping_add(u.int_in_range(0..=4u32)?),
                };
                let payload: Vec<u8> = u.arbitrary()?;
                block_on(write_piece(&mut buf, id, &payload)).expect("encode");
            } else {
                let trailer = if u.arbitrary()? {
                    Some(KvTrailer {
                        first_token: u.arbitrary()?,
                        payload: u.arbitrary()?,
                    })
                } else {
                    None
                };
                let _ = block_on(write_end(&mut buf, trailer.as_ref(), 256));
            }
        }
        let mut bytes = buf.into_inner();
        let original = bytes.clone();
        mutate(u, &mut bytes)?;
        let max_streams = u.int_in_range(1..=8u16)?;
        let mut r = futures::io::Cursor::new(bytes.as_slice());
        match block_on(read_hello(&mut r, max_streams)) {
            Ok(h) => {
                assert!(h.stream_count >= 1 && h.stream_index < h.stream_count);
                assert!(h.stream_count <= max_streams);
                assert!(h.header.max_piece_bytes <= h.header.total_bytes);
                hellos += 1;
                let max_piece = u.int_in_range(0..=4096u64)?;
                let remaining = u.int_in_range(0..=8192u64)?;
                let max_trailer = u.int_in_range(0..=512usize)?;
                while let Ok(f) = block_on(read_frame(&mut r, max_piece, remaining, max_trailer)) {
                    if let prfaas_mesh::kv::codec::Frame::Piece { bytes, .. } = f {
                        assert!(bytes.len() as u64 <= max_piece.min(remaining));
                        pieces += 1;
                    }
                }
            }
            Err(_) => {
                let valid = hello.stream_count >= 1
                    && hello.stream_index < hello.stream_count
                    && hello.stream_count <= max_streams
                    && hello.header.max_piece_bytes <= hello.header.total_bytes;
                assert!(!valid || bytes != original, "a valid hello was refused");
            }
        }
        // Decoders of single frames and acks, on the same (mutated) bytes.
        let _ = wire::decode::<FrameHeader>(&bytes, 4096);
        let _ = wire::decode::<KvAck>(&bytes, 4096);
        let mut ack = wire::encode(
            &KvAck {
                ok: u.arbitrary()?,
                bytes: u.arbitrary()?,
                error: if u.arbitrary()? {
                    Some(tricky_string(u)?)
                } else {
                    None
                },
                busy_us: u.arbitrary()?,
            },
            4096,
        )
        .unwrap_or_default();
        mutate(u, &mut ack)?;
        let _ = wire::decode::<KvAck>(&ack, 4096);
        Ok(())
    });
    eprintln!("kv: {hellos} hellos accepted, {pieces} pieces read");
    assert!(hellos > 0 && pieces > 0);
}
