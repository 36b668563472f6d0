//! A byte pipe made of `BytesMessage` frames: the `Control.Session` bidi
//! stream seen as one `AsyncRead + AsyncWrite` object.
//!
//! Reads pull the next inbound message and hand out its bytes; writes copy the
//! buffer into one outbound message. Shutting the write side down drops the
//! outbound sender, which ends the outbound gRPC stream (CloseSend on the
//! client end, end of the response stream on the daemon end). An inbound error
//! or the end of the inbound stream reads as EOF / an I/O error.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use futures::Stream;
use kiln_proto::moby::buildkit::v1::BytesMessage;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;
use tokio_util::sync::{DropGuard, PollSender};

/// Largest payload put in one outbound message. tonic decodes at most 4 MiB
/// per message by default; HTTP/2 writes are far smaller anyway.
const MAX_FRAME: usize = 1 << 20;

/// The inbound half: any stream of `BytesMessage` results (a
/// `tonic::Streaming` on either end).
pub(crate) type Inbound =
    Pin<Box<dyn Stream<Item = Result<BytesMessage, tonic::Status>> + Send + 'static>>;

/// `AsyncRead + AsyncWrite` over an inbound message stream and an outbound
/// message sender.
pub(crate) struct Tunnel {
    inbound: Inbound,
    pending: Bytes,
    inbound_done: bool,
    outbound: PollSender<BytesMessage>,
    /// Fires (drops) when the tunnel is dropped, i.e. when the HTTP/2
    /// connection that owns it has ended.
    _closed: Option<DropGuard>,
}

impl Tunnel {
    /// Joins the two halves. `closed`, when given, is dropped together with
    /// the tunnel.
    pub(crate) fn new(
        inbound: Inbound,
        outbound: mpsc::Sender<BytesMessage>,
        closed: Option<DropGuard>,
    ) -> Self {
        Tunnel {
            inbound,
            pending: Bytes::new(),
            inbound_done: false,
            outbound: PollSender::new(outbound),
            _closed: closed,
        }
    }
}

impl AsyncRead for Tunnel {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.pending.is_empty() {
                let n = this.pending.len().min(buf.remaining());
                buf.put_slice(&this.pending[..n]);
                this.pending.advance(n);
                return Poll::Ready(Ok(()));
            }
            if this.inbound_done {
                return Poll::Ready(Ok(()));
            }
            match this.inbound.as_mut().poll_next(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => {
                    this.inbound_done = true;
                    return Poll::Ready(Ok(()));
                }
                Poll::Ready(Some(Ok(message))) => this.pending = Bytes::from(message.data),
                Poll::Ready(Some(Err(status))) => {
                    this.inbound_done = true;
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::ConnectionAborted,
                        status,
                    )));
                }
            }
        }
    }
}

impl AsyncWrite for Tunnel {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        match this.outbound.poll_reserve(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Err(_)) => return Poll::Ready(Err(broken_pipe())),
            Poll::Ready(Ok(())) => {}
        }
        let n = buf.len().min(MAX_FRAME);
        let message = BytesMessage {
            data: buf[..n].to_vec(),
        };
        match this.outbound.send_item(message) {
            Ok(()) => Poll::Ready(Ok(n)),
            Err(_) => Poll::Ready(Err(broken_pipe())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Every write is already a whole message in the channel.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().outbound.close();
        Poll::Ready(Ok(()))
    }
}

fn broken_pipe() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "session stream closed")
}

impl tonic::transport::server::Connected for Tunnel {
    type ConnectInfo = ();

    fn connect_info(&self) -> Self::ConnectInfo {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_stream::wrappers::ReceiverStream;
    use tokio_stream::StreamExt;

    #[tokio::test]
    async fn bytes_cross_both_ways_and_shutdown_ends_the_stream() {
        // a → b over channel 1, b → a over channel 2.
        let (tx1, rx1) = mpsc::channel(4);
        let (tx2, rx2) = mpsc::channel(4);
        let mut a = Tunnel::new(Box::pin(ReceiverStream::new(rx2).map(Ok)), tx1, None);
        let mut b = Tunnel::new(Box::pin(ReceiverStream::new(rx1).map(Ok)), tx2, None);

        let writer = tokio::spawn(async move {
            a.write_all(b"hello tunnel").await.unwrap();
            a.shutdown().await.unwrap();
            let mut back = Vec::new();
            a.read_to_end(&mut back).await.unwrap();
            back
        });
        let mut got = Vec::new();
        b.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"hello tunnel");
        b.write_all(b"reply").await.unwrap();
        b.shutdown().await.unwrap();
        assert_eq!(writer.await.unwrap(), b"reply");
    }
}
