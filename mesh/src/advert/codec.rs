//! Advert encoding: bounded CBOR (ciborium) inside a self-signed envelope.
//!
//! # Why the signature lives in the payload (`/prfaas/advert/2`)
//!
//! `/prfaas/advert/1` relied on gossipsub's strict message signing. gossipsub checks that
//! signature in its *decoder*, before its duplicate filter, so every node paid one ed25519
//! verification per received **copy** of every advert: about `mesh_n` copies per advert, i.e.
//! N²·`mesh_n` verifications per advert round for an N-node mesh run in one process. Profiles
//! of the 100-node scale bench put signature checks at 16–19 % of the process's CPU (and the
//! per-message work around them at more), enough that a loaded 2-core machine could not keep up
//! (23.9 s convergence, no bid in time).
//!
//! Version 2 keeps the same guarantee (an advert is accepted only if the node it names signed
//! exactly these bytes) but moves the signature into the advert itself: gossipsub runs
//! unsigned (`ValidationMode::Anonymous`) with a content-hash message id, so duplicates are
//! dropped by a hash lookup, and the node verifies the envelope **once per unique message**
//! (and not at all for replays of a sequence number it already holds). A second benefit: a
//! signed envelope stays verifiable when it is relayed outside gossip, which is what lets a
//! joining node fetch a peer's whole table (`/prfaas/table/1`) and still trust every entry.
//!
//! The envelope is CBOR `{ key, advert, signature }`: the signer's libp2p public key
//! (protobuf encoding), the CBOR-encoded [`Advert`], and the signer's signature over
//! [`SIGNING_DOMAIN`] ‖ `advert`. The advert's `node_id` must be the peer id of `key`, and its
//! `seq` (a wall-clock-based, strictly increasing number) orders adverts from one signer, so a
//! replayed older advert never replaces a newer one.

use libp2p::identity::{Keypair, PublicKey};
use libp2p::PeerId;
use serde::{Deserialize, Serialize};

use super::Advert;
use crate::wire::{self, WireError};

/// Prefix of every signed message, so an advert signature can never be confused with (or
/// replayed as) a signature the same key makes for another purpose (noise, identify…).
pub const SIGNING_DOMAIN: &[u8] = b"prfaas/advert/2:";

/// Why a received advert was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AdvertError {
    /// Not decodable or too large.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// The advert claims to be from a different node than the one that signed the message.
    #[error("advert node id {claimed} does not match signed source {source_peer}")]
    SourceMismatch {
        /// `node_id` in the advert.
        claimed: String,
        /// Peer that signed the gossip message.
        source_peer: PeerId,
    },
    /// Gossip message had no source (strict signing makes this impossible for honest peers).
    #[error("unsigned advert")]
    Unsigned,
    /// The envelope's public key does not decode.
    #[error("advert signer key: {0}")]
    BadKey(String),
    /// The signature does not match the key and the advert bytes (forged or altered).
    #[error("advert signature from {signer} does not verify")]
    BadSignature {
        /// Peer id of the envelope's key.
        signer: PeerId,
    },
    /// Signing our own advert failed (key type cannot sign).
    #[error("cannot sign advert: {0}")]
    Sign(String),
    /// The envelope decodes but is not in the encoding [`sign`] produces (e.g. a map key sent as
    /// a byte string instead of text, which ciborium also accepts). The signature covers only
    /// the advert bytes, so such a re-framed copy would verify, yet get a new content-hash id
    /// and slip past gossip's duplicate filter: only the canonical encoding is accepted.
    #[error("advert envelope is not canonically encoded")]
    NonCanonical,
}

/// The signed envelope gossiped on `/prfaas/advert/2` and served by table sync.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedAdvert {
    /// The signer's public key, libp2p protobuf encoding.
    #[serde(with = "crate::wire::cbor_bytes")]
    pub key: Vec<u8>,
    /// The CBOR-encoded [`Advert`] exactly as signed.
    #[serde(with = "crate::wire::cbor_bytes")]
    pub advert: Vec<u8>,
    /// Signature over [`SIGNING_DOMAIN`] ‖ `advert`.
    #[serde(with = "crate::wire::cbor_bytes")]
    pub signature: Vec<u8>,
}

/// A decoded envelope whose signer matches the advert's `node_id` but whose signature has not
/// been checked yet: callers first drop stale sequence numbers (cheap), then [`Self::verify`].
#[derive(Debug, Clone)]
pub struct Unverified {
    /// Peer id of the envelope's key (equals `advert.node_id`).
    pub signer: PeerId,
    /// The advert as claimed.
    pub advert: Advert,
    /// Protobuf-encoded key, decoded only in [`Self::verify`]: decoding an ed25519 key
    /// decompresses a curve point (a field square root), which a stale or already-known advert
    /// (most table-sync entries) should not pay.
    key: Vec<u8>,
    signed_bytes: Vec<u8>,
    signature: Vec<u8>,
}

impl Unverified {
    /// Checks the signature; the advert is authentic only if this returns it.
    pub fn verify(self) -> Result<Advert, AdvertError> {
        let key = PublicKey::try_decode_protobuf(&self.key)
            .map_err(|e| AdvertError::BadKey(e.to_string()))?;
        if key.to_peer_id() != self.signer {
            return Err(AdvertError::BadKey(
                "key does not hash to its peer id".into(),
            ));
        }
        let mut msg = Vec::with_capacity(SIGNING_DOMAIN.len() + self.signed_bytes.len());
        msg.extend_from_slice(SIGNING_DOMAIN);
        msg.extend_from_slice(&self.signed_bytes);
        if key.verify(&msg, &self.signature) {
            Ok(self.advert)
        } else {
            Err(AdvertError::BadSignature {
                signer: self.signer,
            })
        }
    }
}

/// Encodes an advert (v1, unsigned CBOR), refusing ones above `max` bytes.
pub fn encode(advert: &Advert, max: usize) -> Result<Vec<u8>, WireError> {
    wire::encode(advert, max)
}

/// Decodes a v1 advert and checks it was signed (by gossipsub) by the node it names.
pub fn decode(bytes: &[u8], source: Option<PeerId>, max: usize) -> Result<Advert, AdvertError> {
    let source = source.ok_or(AdvertError::Unsigned)?;
    let advert: Advert = wire::decode(bytes, max)?;
    if advert.node_id != source.to_base58() {
        return Err(AdvertError::SourceMismatch {
            claimed: advert.node_id,
            source_peer: source,
        });
    }
    Ok(advert)
}

/// Encodes and signs `advert` with `key` into a [`SignedAdvert`] envelope of at most `max` bytes.
pub fn sign(advert: &Advert, key: &Keypair, max: usize) -> Result<Vec<u8>, AdvertError> {
    let body = wire::encode(advert, max)?;
    let mut msg = Vec::with_capacity(SIGNING_DOMAIN.len() + body.len());
    msg.extend_from_slice(SIGNING_DOMAIN);
    msg.extend_from_slice(&body);
    let signature = key
        .sign(&msg)
        .map_err(|e| AdvertError::Sign(e.to_string()))?;
    let env = SignedAdvert {
        key: key.public().encode_protobuf(),
        advert: body,
        signature,
    };
    Ok(wire::encode(&env, max)?)
}

/// Decodes an envelope of at most `max` bytes and checks that the advert names the key's peer
/// id. Does **not** check the signature (see [`Unverified::verify`]).
pub fn open(bytes: &[u8], max: usize) -> Result<Unverified, AdvertError> {
    let env: SignedAdvert = wire::decode(bytes, max)?;
    if wire::encode(&env, max)? != bytes {
        return Err(AdvertError::NonCanonical);
    }
    let signer = peer_id_of_key_bytes(&env.key)?;
    let advert: Advert = wire::decode(&env.advert, max)?;
    let claimed: Option<PeerId> = advert.node_id.parse().ok();
    if claimed != Some(signer) {
        return Err(AdvertError::SourceMismatch {
            claimed: advert.node_id,
            source_peer: signer,
        });
    }
    Ok(Unverified {
        signer,
        advert,
        key: env.key,
        signed_bytes: env.advert,
        signature: env.signature,
    })
}

/// Longest protobuf key encoding libp2p inlines into the peer id (identity multihash); longer
/// keys (RSA, ECDSA) are hashed with SHA-256.
const MAX_INLINE_KEY_LENGTH: usize = 42;

/// The peer id of a protobuf-encoded public key without decoding the key (no curve work): for
/// ed25519 (and other short keys) the peer id is the identity multihash of these exact bytes.
/// A byte string that is not a valid key is caught by [`Unverified::verify`].
fn peer_id_of_key_bytes(key: &[u8]) -> Result<PeerId, AdvertError> {
    if key.len() <= MAX_INLINE_KEY_LENGTH {
        // Multihash: varint code 0x00 (identity), varint length (< 128: one byte), digest.
        let mut mh = Vec::with_capacity(2 + key.len());
        mh.push(0x00);
        mh.push(key.len() as u8);
        mh.extend_from_slice(key);
        return PeerId::from_bytes(&mh).map_err(|e| AdvertError::BadKey(e.to_string()));
    }
    PublicKey::try_decode_protobuf(key)
        .map(|k| k.to_peer_id())
        .map_err(|e| AdvertError::BadKey(e.to_string()))
}

/// [`open`] then [`Unverified::verify`]: the signer and its authentic advert.
pub fn open_verified(bytes: &[u8], max: usize) -> Result<(PeerId, Advert), AdvertError> {
    let u = open(bytes, max)?;
    let signer = u.signer;
    Ok((signer, u.verify()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::advert::AdvertBody;

    fn advert_of(key: &Keypair, seq: u64) -> Advert {
        Advert {
            node_id: key.public().to_peer_id().to_base58(),
            seq,
            listen_addrs: vec!["/ip4/127.0.0.1/tcp/1".into()],
            body: AdvertBody {
                region: "r".into(),
                queue_depth: 3,
                ..AdvertBody::default()
            },
            observed_bandwidth: vec![],
        }
    }

    #[test]
    fn signed_advert_roundtrips_and_names_its_signer() {
        let key = Keypair::generate_ed25519();
        let a = advert_of(&key, 7);
        let bytes = sign(&a, &key, 64 * 1024).expect("sign");
        let (signer, back) = open_verified(&bytes, 64 * 1024).expect("open");
        assert_eq!(signer, key.public().to_peer_id());
        assert_eq!(back, a);
    }

    #[test]
    fn api_url_is_signed_and_absent_from_adverts_without_one() {
        let key = Keypair::generate_ed25519();
        let mut a = advert_of(&key, 9);
        // Without a URL the advert has no `api_url` key at all: it encodes as before the field
        // existed, so older nodes verify and decode it unchanged.
        let plain = wire::encode(&a, 64 * 1024).expect("enc");
        assert!(!plain.windows(7).any(|w| w == b"api_url"));
        a.body.api_url = Some("http://10.0.0.5:8080".into());
        let bytes = sign(&a, &key, 64 * 1024).expect("sign");
        let (_, back) = open_verified(&bytes, 64 * 1024).expect("open");
        assert_eq!(back.body.api_url.as_deref(), Some("http://10.0.0.5:8080"));
        // The URL is covered by the signature.
        let env: SignedAdvert = wire::decode(&bytes, 64 * 1024).expect("env");
        a.body.api_url = Some("http://evil.example".into());
        let forged = SignedAdvert {
            advert: wire::encode(&a, 64 * 1024).expect("enc"),
            ..env
        };
        let r = open_verified(&wire::encode(&forged, 64 * 1024).expect("enc"), 64 * 1024);
        assert!(matches!(r, Err(AdvertError::BadSignature { .. })), "{r:?}");
    }

    #[test]
    fn altered_body_wrong_signer_and_foreign_key_are_refused() {
        let key = Keypair::generate_ed25519();
        let bytes = sign(&advert_of(&key, 1), &key, 64 * 1024).expect("sign");
        let env: SignedAdvert = wire::decode(&bytes, 64 * 1024).expect("env");

        // Altered advert (queue depth changed) under the original signature.
        let mut altered = advert_of(&key, 1);
        altered.body.queue_depth = 0;
        let forged = SignedAdvert {
            advert: wire::encode(&altered, 64 * 1024).expect("enc"),
            ..env.clone()
        };
        let r = open_verified(&wire::encode(&forged, 64 * 1024).expect("enc"), 64 * 1024);
        assert!(matches!(r, Err(AdvertError::BadSignature { .. })), "{r:?}");

        // Someone else signs an advert that names `key`'s peer id.
        let mallory = Keypair::generate_ed25519();
        let claim = sign(&advert_of(&key, 2), &mallory, 64 * 1024).expect("sign");
        let r = open(&claim, 64 * 1024);
        assert!(
            matches!(r, Err(AdvertError::SourceMismatch { .. })),
            "{r:?}"
        );

        // Mallory's key in the envelope, the honest advert and signature: signer mismatch.
        let swapped = SignedAdvert {
            key: mallory.public().encode_protobuf(),
            ..env
        };
        let r = open(&wire::encode(&swapped, 64 * 1024).expect("enc"), 64 * 1024);
        assert!(
            matches!(r, Err(AdvertError::SourceMismatch { .. })),
            "{r:?}"
        );
    }

    #[test]
    fn reframed_envelope_is_refused_though_its_signature_holds() {
        let key = Keypair::generate_ed25519();
        let bytes = sign(&advert_of(&key, 1), &key, 64 * 1024).expect("sign");
        // The map key "key" as a CBOR byte string (0x43) instead of text (0x63): ciborium
        // decodes it to the same envelope, whose signature still verifies.
        let at = bytes
            .windows(4)
            .position(|w| w == b"\x63key")
            .expect("map key");
        let mut reframed = bytes.clone();
        reframed[at] = 0x43;
        let env: SignedAdvert = wire::decode(&reframed, 64 * 1024).expect("still decodes");
        assert_eq!(wire::encode(&env, 64 * 1024).expect("enc"), bytes);
        assert!(matches!(
            open(&reframed, 64 * 1024),
            Err(AdvertError::NonCanonical)
        ));
        assert!(open_verified(&bytes, 64 * 1024).is_ok());
    }

    #[test]
    fn peer_id_from_key_bytes_matches_libp2p() {
        let key = Keypair::generate_ed25519();
        let bytes = key.public().encode_protobuf();
        assert_eq!(
            peer_id_of_key_bytes(&bytes).expect("peer id"),
            key.public().to_peer_id()
        );
        assert!(peer_id_of_key_bytes(&[0xff; 100]).is_err());
    }

    #[test]
    fn oversized_envelope_is_refused_before_decoding() {
        let key = Keypair::generate_ed25519();
        let bytes = sign(&advert_of(&key, 1), &key, 64 * 1024).expect("sign");
        assert!(matches!(
            open(&bytes, bytes.len() - 1),
            Err(AdvertError::Wire(WireError::TooLarge { .. }))
        ));
        assert!(sign(&advert_of(&key, 1), &key, 16).is_err());
    }
}
