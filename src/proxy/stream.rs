//! One HTTP/2 stream as the byte stream a tunnel carries, read and written straight on h2's
//! stream handles (hyper's upgrade relays every write through a channel to a task of its own:
//! one more wake-up per write on each side), and the keepalive pings of a connection.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf as _, Bytes};
use h2::{Ping, PingPong, Reason, RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Writes what `buf` holds that the stream's flow-control window takes now (at least one
/// byte once the window opens): the writer feels the peer's back-pressure, h2 buffers nothing
/// past the window.
fn poll_send(
    send: &mut SendStream<Bytes>,
    cx: &mut Context<'_>,
    buf: &[u8],
) -> Poll<io::Result<usize>> {
    if buf.is_empty() {
        return Poll::Ready(Ok(0));
    }
    if let Poll::Ready(reset) = send.poll_reset(cx) {
        return Poll::Ready(Err(match reset {
            Ok(reason) => reset_error(reason),
            Err(e) => h2_error(e),
        }));
    }
    send.reserve_capacity(buf.len());
    let capacity = loop {
        match send.capacity() {
            0 => match ready!(send.poll_capacity(cx)) {
                Some(Ok(_)) => {}
                Some(Err(e)) => return Poll::Ready(Err(h2_error(e))),
                // The stream can send no more: it ended, or the peer reset it.
                None => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
            },
            capacity => break capacity,
        }
    };
    let n = capacity.min(buf.len());
    send.send_data(Bytes::copy_from_slice(&buf[..n]), false)
        .map_err(h2_error)?;
    Poll::Ready(Ok(n))
}

/// Ends the stream's sending side (END_STREAM), once.
fn finish(send: &mut SendStream<Bytes>, finished: &mut bool) -> io::Result<()> {
    if !*finished {
        *finished = true;
        send.send_data(Bytes::new(), true).map_err(h2_error)?;
    }
    Ok(())
}

/// Reads into `out` from `pending` (what arrived and was not read yet), else from the stream;
/// nothing read and `Ok` once the peer ended the stream. The window is opened again by what
/// is read, so a slow reader slows the peer.
fn poll_receive(
    recv: &mut RecvStream,
    pending: &mut Bytes,
    cx: &mut Context<'_>,
    out: &mut ReadBuf<'_>,
) -> Poll<io::Result<()>> {
    while pending.is_empty() {
        match ready!(recv.poll_data(cx)) {
            Some(Ok(data)) => *pending = data,
            Some(Err(e)) if e.reason() == Some(Reason::NO_ERROR) => return Poll::Ready(Ok(())),
            Some(Err(e)) => return Poll::Ready(Err(h2_error(e))),
            None => return Poll::Ready(Ok(())),
        }
    }
    let n = pending.len().min(out.remaining());
    out.put_slice(&pending[..n]);
    pending.advance(n);
    // Only fails past what was received, which `n` never is.
    let _ = recv.flow_control().release_capacity(n);
    Poll::Ready(Ok(()))
}

/// An HTTP/2 error as an I/O error, its reason kept in the message.
fn h2_error(e: h2::Error) -> io::Error {
    if e.is_io() {
        return e.into_io().unwrap_or_else(|| io::ErrorKind::Other.into());
    }
    io::Error::other(e)
}

fn reset_error(reason: Reason) -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionReset,
        format!("stream reset by the peer: {reason}"),
    )
}

/// How a tunnel's stream is read: its receiving side, open or still to be answered.
pub(super) trait Receive: Unpin {
    /// Reads into `out` (nothing read and `Ok` at the end of the stream).
    fn poll_receive(&mut self, cx: &mut Context<'_>, out: &mut ReadBuf<'_>)
    -> Poll<io::Result<()>>;
}

/// An open receiving side: the server's, whose request came with it.
pub(super) struct Received {
    recv: RecvStream,
    pending: Bytes,
}

impl Received {
    pub(super) fn new(recv: RecvStream) -> Self {
        Self {
            recv,
            pending: Bytes::new(),
        }
    }
}

impl Receive for Received {
    fn poll_receive(
        &mut self,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        poll_receive(&mut self.recv, &mut self.pending, cx, out)
    }
}

/// A tunnel's stream as a byte stream: written at once, read as `R` receives.
pub(super) struct H2Io<R> {
    send: SendStream<Bytes>,
    finished: bool,
    /// The receiving side.
    pub(super) recv: R,
}

impl<R> H2Io<R> {
    pub(super) fn new(send: SendStream<Bytes>, recv: R) -> Self {
        Self {
            send,
            finished: false,
            recv,
        }
    }
}

impl<R: Receive> AsyncRead for H2Io<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.recv.poll_receive(cx, out)
    }
}

impl<R: Unpin> AsyncWrite for H2Io<R> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        poll_send(&mut self.send, cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        // h2's connection task writes what was sent as soon as it runs.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        let me = &mut *self;
        Poll::Ready(finish(&mut me.send, &mut me.finished))
    }
}

/// Pings the peer every `interval`; resolves when one went unanswered for `timeout` (the
/// peer or the path is gone). Never resolves once the connection itself ended: its owner
/// sees that.
pub(super) async fn keepalive(mut pings: PingPong, interval: Duration, timeout: Duration) {
    loop {
        tokio::time::sleep(interval).await;
        match tokio::time::timeout(timeout, pings.ping(Ping::opaque())).await {
            Ok(Ok(_)) => {}
            Ok(Err(_)) => std::future::pending().await,
            Err(_) => return,
        }
    }
}
