//! Shared wire helpers: one CBOR library (ciborium) for every message, always behind a size bound.
//!
//! Every mesh message on the wire is `u32 big-endian length || CBOR body`. The length is checked
//! against a caller-supplied maximum *before* any buffer is allocated, so a peer cannot make us
//! allocate more than the configured limit.

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use serde::{de::DeserializeOwned, Serialize};

/// Why a CBOR message could not be encoded, decoded or framed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// The encoded message is larger than the limit for its kind.
    #[error("message of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// Announced or encoded length.
        len: u64,
        /// Configured maximum.
        max: u64,
    },
    /// The bytes are not valid CBOR for the expected type.
    #[error("invalid CBOR: {0}")]
    Decode(String),
    /// Serialization failed (only on writer I/O errors for in-memory buffers, i.e. never in practice).
    #[error("CBOR encoding failed: {0}")]
    Encode(String),
    /// The underlying stream failed or ended early.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

impl From<WireError> for std::io::Error {
    fn from(e: WireError) -> Self {
        match e {
            WireError::Io(io) => io,
            other => std::io::Error::new(std::io::ErrorKind::InvalidData, other),
        }
    }
}

/// Encodes `value` as CBOR, refusing results longer than `max` bytes.
pub fn encode<T: Serialize>(value: &T, max: usize) -> Result<Vec<u8>, WireError> {
    let mut buf = Vec::with_capacity(128);
    ciborium::into_writer(value, &mut buf).map_err(|e| WireError::Encode(e.to_string()))?;
    if buf.len() > max {
        return Err(WireError::TooLarge {
            len: buf.len() as u64,
            max: max as u64,
        });
    }
    Ok(buf)
}

/// Decodes one CBOR value from `bytes` (at most `max` bytes). Trailing bytes are an error, so
/// two encodings of one message cannot differ.
pub fn decode<T: DeserializeOwned>(bytes: &[u8], max: usize) -> Result<T, WireError> {
    if bytes.len() > max {
        return Err(WireError::TooLarge {
            len: bytes.len() as u64,
            max: max as u64,
        });
    }
    let mut reader = bytes;
    let value = ciborium::from_reader(&mut reader).map_err(|e| WireError::Decode(e.to_string()))?;
    if !reader.is_empty() {
        return Err(WireError::Decode(format!(
            "{} trailing bytes after the message",
            reader.len()
        )));
    }
    Ok(value)
}

/// Writes `u32 length || CBOR(value)`.
pub async fn write_framed<W, T>(io: &mut W, value: &T, max: usize) -> Result<(), WireError>
where
    W: AsyncWrite + Unpin,
    T: Serialize,
{
    let body = encode(value, max)?;
    let len = u32::try_from(body.len()).map_err(|_| WireError::TooLarge {
        len: body.len() as u64,
        max: max as u64,
    })?;
    io.write_all(&len.to_be_bytes()).await?;
    io.write_all(&body).await?;
    Ok(())
}

/// Reads `u32 length || CBOR(value)`, allocating only after the length passed the `max` check.
pub async fn read_framed<R, T>(io: &mut R, max: usize) -> Result<T, WireError>
where
    R: AsyncRead + Unpin,
    T: DeserializeOwned,
{
    let mut len = [0u8; 4];
    io.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > max {
        return Err(WireError::TooLarge {
            len: len as u64,
            max: max as u64,
        });
    }
    let mut body = vec![0u8; len];
    io.read_exact(&mut body).await?;
    decode(&body, max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_trailing_bytes() {
        let v: (u32, String) = (7, "x".into());
        let mut b = encode(&v, 64).expect("encode");
        assert_eq!(decode::<(u32, String)>(&b, 64).expect("decode"), v);
        b.push(0);
        assert!(matches!(
            decode::<(u32, String)>(&b, 64),
            Err(WireError::Decode(_))
        ));
        assert!(matches!(
            encode(&vec![0u64; 100], 10),
            Err(WireError::TooLarge { .. })
        ));
    }

    #[test]
    fn framed_rejects_oversized_length_before_allocating() {
        let mut bytes: &[u8] = &[0xff, 0xff, 0xff, 0xff, 1, 2, 3];
        let r: Result<u32, _> = futures::executor::block_on(read_framed(&mut bytes, 1024));
        assert!(matches!(
            r,
            Err(WireError::TooLarge {
                len: 0xffff_ffff,
                max: 1024
            })
        ));
    }
}

/// `#[serde(with = "crate::wire::cbor_bytes")]` for `Vec<u8>` fields: encodes a CBOR byte string
/// (major type 2) instead of serde's default array of integers, which is up to 2× larger.
pub mod cbor_bytes {
    use serde::{de, Deserializer, Serializer};
    use std::fmt;

    /// Serializes as a byte string.
    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    /// Accepts a byte string (or, leniently, an array of small integers).
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        struct V;
        impl<'de> de::Visitor<'de> for V {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a byte string")
            }
            fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
            fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(v)
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
                // Cap the pre-allocation: the hint comes from the peer.
                let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
                while let Some(b) = seq.next_element::<u8>()? {
                    out.push(b);
                }
                Ok(out)
            }
        }
        // `deserialize_byte_buf`, not `deserialize_bytes`: ciborium serves the latter only for
        // strings that fit its small scratch buffer and rejects longer ones.
        d.deserialize_byte_buf(V)
    }
}

/// A libp2p request-response codec for one protocol: every message is `u32 length || CBOR`
/// ([`read_framed`] / [`write_framed`]), requests and responses each under their own bound.
pub struct CborCodec<Req, Resp> {
    /// Largest encoded request accepted or sent.
    pub max_request_bytes: usize,
    /// Largest encoded response accepted or sent.
    pub max_response_bytes: usize,
    _messages: std::marker::PhantomData<fn() -> (Req, Resp)>,
}

impl<Req, Resp> CborCodec<Req, Resp> {
    /// A codec refusing requests above `max_request_bytes` and responses above
    /// `max_response_bytes`.
    pub fn new(max_request_bytes: usize, max_response_bytes: usize) -> Self {
        Self {
            max_request_bytes,
            max_response_bytes,
            _messages: std::marker::PhantomData,
        }
    }
}

// By hand: a derive would require `Req: Clone`/`Debug`, which the codec does not need.
impl<Req, Resp> Clone for CborCodec<Req, Resp> {
    fn clone(&self) -> Self {
        Self::new(self.max_request_bytes, self.max_response_bytes)
    }
}

impl<Req, Resp> std::fmt::Debug for CborCodec<Req, Resp> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CborCodec")
            .field("max_request_bytes", &self.max_request_bytes)
            .field("max_response_bytes", &self.max_response_bytes)
            .finish()
    }
}

impl<Req, Resp> libp2p::request_response::Codec for CborCodec<Req, Resp>
where
    Req: Serialize + DeserializeOwned + Send + Sync + 'static,
    Resp: Serialize + DeserializeOwned + Send + Sync + 'static,
{
    type Protocol = libp2p::StreamProtocol;
    type Request = Req;
    type Response = Resp;

    async fn read_request<T>(&mut self, _: &Self::Protocol, io: &mut T) -> std::io::Result<Req>
    where
        T: AsyncRead + Unpin + Send,
    {
        Ok(read_framed(io, self.max_request_bytes).await?)
    }

    async fn read_response<T>(&mut self, _: &Self::Protocol, io: &mut T) -> std::io::Result<Resp>
    where
        T: AsyncRead + Unpin + Send,
    {
        Ok(read_framed(io, self.max_response_bytes).await?)
    }

    async fn write_request<T>(
        &mut self,
        _: &Self::Protocol,
        io: &mut T,
        req: Req,
    ) -> std::io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_framed(io, &req, self.max_request_bytes).await?;
        io.flush().await
    }

    async fn write_response<T>(
        &mut self,
        _: &Self::Protocol,
        io: &mut T,
        res: Resp,
    ) -> std::io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_framed(io, &res, self.max_response_bytes).await?;
        io.flush().await
    }
}
