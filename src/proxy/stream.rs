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

/// Most bytes one DATA frame carries: with its 9-byte header, one full TLS record. A frame of
/// 16 KiB would be sealed as a full record and a second one of 9 bytes, each encrypted,
/// framed and decrypted on its own.
const FRAME_PAYLOAD: usize = 16 * 1024 - 9;

/// Writes what `buf` holds that the stream's flow-control window takes now (at least one
/// byte once the window opens, at most one record's frame): the writer feels the peer's
/// back-pressure, h2 buffers nothing past the window but the first frame. That one is taken
/// at once: a stream still to be opened has no capacity until its HEADERS are written, and
/// waiting for it would send the CONNECT and the first bytes in two records and segments.
fn poll_send(
    send: &mut SendStream<Bytes>,
    cx: &mut Context<'_>,
    buf: &[u8],
    first: &mut bool,
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
    let capacity = if std::mem::take(first) {
        buf.len()
    } else {
        send.reserve_capacity(buf.len());
        loop {
            match send.capacity() {
                0 => match ready!(send.poll_capacity(cx)) {
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Poll::Ready(Err(h2_error(e))),
                    // The stream can send no more: it ended, or the peer reset it.
                    None => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
                },
                capacity => break capacity,
            }
        }
    };
    let n = capacity.min(buf.len()).min(FRAME_PAYLOAD);
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
    /// Nothing written yet.
    first: bool,
    finished: bool,
    /// The receiving side.
    pub(super) recv: R,
}

impl<R> H2Io<R> {
    pub(super) fn new(send: SendStream<Bytes>, recv: R) -> Self {
        Self {
            send,
            first: true,
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
        let me = &mut *self;
        poll_send(&mut me.send, cx, buf, &mut me.first)
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt as _;

    /// What a transport was asked to write, call by call.
    struct Recording<S> {
        inner: S,
        writes: std::sync::Arc<std::sync::Mutex<Vec<Vec<u8>>>>,
    }

    impl<S: AsyncRead + Unpin> AsyncRead for Recording<S> {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_read(cx, buf)
        }
    }

    impl<S: AsyncWrite + Unpin> AsyncWrite for Recording<S> {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let written = ready!(Pin::new(&mut self.inner).poll_write(cx, buf))?;
            self.writes
                .lock()
                .expect("writes")
                .push(buf[..written].to_vec());
            Poll::Ready(Ok(written))
        }

        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_flush(cx)
        }

        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_shutdown(cx)
        }
    }

    /// An h2 server on `far` that reads every stream to its end, answering none.
    fn drain(far: tokio::io::DuplexStream) {
        tokio::spawn(async move {
            let mut connection = h2::server::handshake(far).await.expect("server handshake");
            while let Some(Ok((request, respond))) = connection.accept().await {
                let mut body = request.into_body();
                tokio::spawn(async move {
                    let _respond = respond;
                    while let Some(Ok(data)) = body.data().await {
                        let _ = body.flow_control().release_capacity(data.len());
                    }
                });
            }
        });
    }

    #[tokio::test]
    async fn a_streams_first_bytes_are_written_with_its_headers() {
        let (near, far) = tokio::io::duplex(1 << 20);
        drain(far);
        let writes = std::sync::Arc::default();
        let near = Recording {
            inner: near,
            writes: std::sync::Arc::clone(&writes),
        };
        let (client, connection) = h2::client::handshake(near).await.expect("client handshake");
        tokio::spawn(connection);
        // The second stream too: its HEADERS are compressed against the first's.
        for _ in 0..2 {
            let mut client = client.clone().ready().await.expect("ready");
            tokio::time::sleep(Duration::from_millis(20)).await;
            writes.lock().expect("writes").clear();
            let request = http::Request::post("http://weft.test/")
                .body(())
                .expect("request");
            let (_, send) = client.send_request(request, false).expect("send");
            let mut io = H2Io::new(send, ());
            io.write_all(&[1u8; 1024]).await.expect("write");
            tokio::time::sleep(Duration::from_millis(20)).await;
            let writes = writes.lock().expect("writes");
            // The first write: a HEADERS frame, then a DATA frame's header.
            let first = writes.first().expect("a write");
            let headers =
                usize::from(first[0]) << 16 | usize::from(first[1]) << 8 | usize::from(first[2]);
            assert_eq!(first[3], 1, "not a HEADERS frame: {first:?}");
            assert!(
                first.len() >= 9 + headers + 9 && first[9 + headers + 3] == 0,
                "the HEADERS were written without the DATA: {:?}",
                writes.iter().map(Vec::len).collect::<Vec<_>>()
            );
        }
    }

    /// A client stream written through `H2Io` and the DATA frames the server receives.
    #[tokio::test]
    async fn each_data_frame_fits_one_tls_record() {
        let (near, far) = tokio::io::duplex(1 << 20);
        let server = tokio::spawn(async move {
            let mut connection = h2::server::handshake(far).await.expect("server handshake");
            let (request, respond) = connection
                .accept()
                .await
                .expect("a stream")
                .expect("a request");
            tokio::spawn(async move { while connection.accept().await.is_some() {} });
            drop(respond);
            let mut body = request.into_body();
            let mut frames = Vec::new();
            while let Some(data) = body.data().await {
                let data = data.expect("data");
                let _ = body.flow_control().release_capacity(data.len());
                frames.push(data.len());
            }
            frames
        });
        let (client, connection) = h2::client::handshake(near).await.expect("client handshake");
        tokio::spawn(connection);
        let mut client = client.ready().await.expect("ready");
        let request = http::Request::post("http://weft.test/")
            .body(())
            .expect("request");
        let (_, send) = client.send_request(request, false).expect("send");
        let mut io = H2Io::new(send, ());
        let bulk = vec![7u8; 64 * 1024 + 100];
        io.write_all(&bulk).await.expect("write");
        io.shutdown().await.expect("end of stream");
        let frames = server.await.expect("server");
        assert_eq!(frames.iter().sum::<usize>(), bulk.len());
        assert!(frames.len() >= 5, "{frames:?}");
        assert!(
            frames.iter().all(|&n| n + 9 <= 16 * 1024),
            "a frame with its header is larger than a TLS record: {frames:?}"
        );
    }
}
