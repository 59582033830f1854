//! Request-response codec over ciborium: `u32 length || CBOR`, bounded both ways.

use futures::{AsyncRead, AsyncWrite, AsyncWriteExt};
use libp2p::StreamProtocol;

use super::{AuctionRequest, AuctionResponse};
use crate::wire;

/// Ciborium codec for [`AuctionRequest`] / [`AuctionResponse`], refusing messages above `max_bytes`.
#[derive(Debug, Clone, Copy)]
pub struct AuctionCodec {
    /// Largest encoded message accepted or sent.
    pub max_bytes: usize,
}

impl Default for AuctionCodec {
    fn default() -> Self {
        Self {
            max_bytes: 64 * 1024,
        }
    }
}

impl libp2p::request_response::Codec for AuctionCodec {
    type Protocol = StreamProtocol;
    type Request = AuctionRequest;
    type Response = AuctionResponse;

    async fn read_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> std::io::Result<AuctionRequest>
    where
        T: AsyncRead + Unpin + Send,
    {
        Ok(wire::read_framed(io, self.max_bytes).await?)
    }

    async fn read_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> std::io::Result<AuctionResponse>
    where
        T: AsyncRead + Unpin + Send,
    {
        Ok(wire::read_framed(io, self.max_bytes).await?)
    }

    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: AuctionRequest,
    ) -> std::io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        wire::write_framed(io, &req, self.max_bytes).await?;
        io.flush().await
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: AuctionResponse,
    ) -> std::io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        wire::write_framed(io, &res, self.max_bytes).await?;
        io.flush().await
    }
}
