//! The HBONE client (outbound): HTTP/2 connections over SPIFFE mTLS pooled per (source
//! identity, destination node, destination identity), each carrying up to a set number of
//! CONNECT streams; a tunnel is one stream, which carries bytes out as soon as its request is
//! sent (the server forwards nothing before it decides) and back once the server answered 200.

use std::collections::HashMap;
use std::future::Future as _;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use h2::client::{Connection as H2Connection, ResponseFuture, SendRequest};
use http::{Method, Request, StatusCode, header::FORWARDED};
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{oneshot, watch};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use super::stream::{H2Io, Receive, Received, keepalive};
use crate::identity::WorkloadId;

/// Default for [`ClientSettings::max_streams_per_connection`].
pub const DEFAULT_MAX_STREAMS_PER_CONNECTION: usize = 100;
/// Default for [`ClientSettings::connect_timeout`].
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default for [`ClientSettings::idle_timeout`].
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Default for [`ClientSettings::keepalive_interval`].
pub const DEFAULT_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// Default for [`ClientSettings::keepalive_timeout`].
pub const DEFAULT_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// The name sent in SNI: servers are known by their SPIFFE id, which the verifier checks.
const SNI: &str = "spiffe.invalid";

/// Limits of the client pool.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ClientSettings {
    /// Tunnels one connection carries at once; past it a new connection is opened.
    pub max_streams_per_connection: usize,
    /// Time allowed for TCP, TLS and the HTTP/2 handshake of a new connection.
    pub connect_timeout: Duration,
    /// A connection without tunnels for this long is closed.
    pub idle_timeout: Duration,
    /// Interval of keepalive pings, also while idle.
    pub keepalive_interval: Duration,
    /// Time a ping may go unanswered before the connection is closed.
    pub keepalive_timeout: Duration,
    /// Per-stream flow-control window.
    pub stream_window: u32,
    /// Per-connection flow-control window.
    pub connection_window: u32,
    /// Largest frame accepted.
    pub max_frame_size: u32,
}

impl Default for ClientSettings {
    fn default() -> Self {
        Self {
            max_streams_per_connection: DEFAULT_MAX_STREAMS_PER_CONNECTION,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            keepalive_interval: DEFAULT_KEEPALIVE_INTERVAL,
            keepalive_timeout: DEFAULT_KEEPALIVE_TIMEOUT,
            stream_window: super::DEFAULT_STREAM_WINDOW,
            connection_window: super::DEFAULT_CONNECTION_WINDOW,
            max_frame_size: super::DEFAULT_MAX_FRAME_SIZE,
        }
    }
}

/// What a pooled connection is for: tunnels of one source workload to one destination
/// workload through one node.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    /// The identity the client presents.
    pub source: WorkloadId,
    /// The destination node's HBONE address.
    pub node: SocketAddr,
    /// The identity the server must present.
    pub destination: WorkloadId,
    /// Which certificate of the source's the connection presents (see [`certificate_generation`]):
    /// once it is renewed, new tunnels go on new connections, and the old ones idle out.
    pub generation: u64,
}

/// A number that changes when `leaf` (a DER certificate) does: its signature's last 8 bytes,
/// which a CA's signature makes unique per certificate.
pub fn certificate_generation(leaf: &[u8]) -> u64 {
    let mut tail = [0u8; 8];
    let n = leaf.len().min(8);
    tail[8 - n..].copy_from_slice(&leaf[leaf.len() - n..]);
    u64::from_be_bytes(tail)
}

/// Why a tunnel could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Connecting to the node, TLS and HTTP/2 set-up took too long.
    #[error("hbone connection to {node} timed out after {after:?}")]
    Timeout {
        /// The node.
        node: SocketAddr,
        /// The limit.
        after: Duration,
    },
    /// TCP to the node failed.
    #[error("hbone connection to {node}: {source}")]
    Dial {
        /// The node.
        node: SocketAddr,
        /// Why.
        source: io::Error,
    },
    /// TLS failed: the server is not the expected workload, or refused our certificate.
    #[error("hbone TLS to {node} as {expected}: {source}")]
    Tls {
        /// The node.
        node: SocketAddr,
        /// The identity the server had to present.
        expected: WorkloadId,
        /// What rustls or the socket said.
        source: io::Error,
    },
    /// HTTP/2 failed on the connection or the stream.
    #[error("hbone HTTP/2 with {node}: {source}")]
    Http {
        /// The node.
        node: SocketAddr,
        /// What h2 said.
        source: h2::Error,
    },
    /// The CONNECT request could not be built.
    #[error("hbone CONNECT to {target}: {source}")]
    Request {
        /// The target.
        target: SocketAddr,
        /// Why.
        source: http::Error,
    },
    /// The tunnel was refused or failed already.
    #[error("hbone tunnel to {target} via {node} is closed")]
    Closed {
        /// The node.
        node: SocketAddr,
        /// The target.
        target: SocketAddr,
    },
    /// The server answered the CONNECT with something other than 200.
    #[error("hbone CONNECT to {target} via {node} refused with {status}")]
    Refused {
        /// The node.
        node: SocketAddr,
        /// The target.
        target: SocketAddr,
        /// The status it answered.
        status: StatusCode,
    },
}

/// Pooled HBONE connections; cheap to share behind an `Arc`.
pub struct Pool {
    settings: ClientSettings,
    // A std lock: never held across an await, only to pick or insert a connection.
    connections: Mutex<HashMap<PoolKey, Vec<Connection>>>,
}

/// One pooled HTTP/2 connection.
struct Connection {
    sender: SendRequest<Bytes>,
    /// Tunnels open on it; the connection's task closes it once this stays 0 for the idle
    /// timeout, and drops the receiving side when the connection ended.
    streams: Arc<watch::Sender<usize>>,
}

impl Connection {
    fn is_closed(&self) -> bool {
        self.streams.is_closed()
    }
}

/// A tunnel's place on a connection, given back when the tunnel drops.
struct Slot(Arc<watch::Sender<usize>>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// An open tunnel: a byte stream to the target, through the destination node. What is
/// written goes out at once; reading waits for the server's answer first, and fails if it
/// refused.
pub struct Tunnel {
    io: H2Io<Answering>,
    _slot: Slot,
}

/// A tunnel's receiving side: the answer awaited, then the stream it opened.
struct Answering {
    answer: Answer,
    /// Told the server's answer when it arrives (see [`Tunnel::on_answer`]).
    notify: Option<oneshot::Sender<Result<(), ClientError>>>,
    node: SocketAddr,
    target: SocketAddr,
}

/// Where a tunnel's answer stands.
enum Answer {
    Awaited(ResponseFuture),
    Open(Received),
    /// Refused or failed: nothing will come back.
    Closed,
}

impl Pool {
    /// An empty pool.
    pub fn new(settings: ClientSettings) -> Self {
        Self {
            settings,
            connections: Mutex::default(),
        }
    }

    /// Opens a tunnel to `target` for source pod `source` and waits for the server's answer
    /// ([`Pool::request`], then [`Tunnel::answered`]).
    pub async fn connect(
        &self,
        key: &PoolKey,
        tls: Arc<ClientConfig>,
        target: SocketAddr,
        source: IpAddr,
    ) -> Result<Tunnel, ClientError> {
        let mut tunnel = self.request(key, tls, target, source).await?;
        tunnel.answered().await?;
        Ok(tunnel)
    }

    /// Sends the CONNECT for a tunnel to `target` for source pod `source` over a connection
    /// for `key`, reusing one with room or opening one with `tls` (from
    /// `TrustStore::client_config` with `Expected::Workload(key.destination)` and the source
    /// workload's certificate); does not wait for the answer.
    pub async fn request(
        &self,
        key: &PoolKey,
        tls: Arc<ClientConfig>,
        target: SocketAddr,
        source: IpAddr,
    ) -> Result<Tunnel, ClientError> {
        let node = key.node;
        let request = Request::builder()
            .method(Method::CONNECT)
            .uri(target.to_string())
            .header(FORWARDED, forwarded(source))
            .body(())
            .map_err(|source| ClientError::Request { target, source })?;
        let send = async |sender: SendRequest<Bytes>, request| {
            sender
                .ready()
                .await
                .and_then(|mut ready| ready.send_request(request, false))
        };
        let (sent, slot) = match self.reserve(key) {
            // A reused connection may have closed (idle, GOAWAY) since it was picked: once
            // more on a fresh one.
            Some((sender, slot)) => match send(sender, request.clone()).await {
                Ok(sent) => (Ok(sent), slot),
                Err(_) => {
                    drop(slot);
                    let (sender, slot) = self.open(key, tls).await?;
                    (send(sender, request).await, slot)
                }
            },
            None => {
                let (sender, slot) = self.open(key, tls).await?;
                (send(sender, request).await, slot)
            }
        };
        let (response, send) = sent.map_err(|source| ClientError::Http { node, source })?;
        tracing::debug!(source = %key.source, destination = %key.destination, %node, %target, "hbone tunnel requested");
        let answering = Answering {
            answer: Answer::Awaited(response),
            notify: None,
            node,
            target,
        };
        Ok(Tunnel {
            io: H2Io::new(send, answering),
            _slot: slot,
        })
    }

    /// How many open connections the pool holds, for every key.
    pub fn len(&self) -> usize {
        let pool = self.lock();
        pool.values().flatten().filter(|c| !c.is_closed()).count()
    }

    /// Whether the pool holds no open connection.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How many open connections the pool holds for `key`.
    pub fn connections(&self, key: &PoolKey) -> usize {
        let pool = self.lock();
        pool.get(key)
            .map_or(0, |c| c.iter().filter(|c| !c.is_closed()).count())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PoolKey, Vec<Connection>>> {
        // Every update leaves the map consistent, so a poisoned lock still holds a good one.
        self.connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes a stream on a live connection for `key` with room for one more.
    fn reserve(&self, key: &PoolKey) -> Option<(SendRequest<Bytes>, Slot)> {
        let mut pool = self.lock();
        let connections = pool.get_mut(key)?;
        connections.retain(|c| !c.is_closed());
        let max = self.settings.max_streams_per_connection;
        let connection = connections.iter().find(|c| *c.streams.borrow() < max)?;
        connection.streams.send_modify(|n| *n += 1);
        Some((connection.sender.clone(), Slot(connection.streams.clone())))
    }

    /// Opens a connection for `key`, adds it to the pool and takes one stream on it.
    async fn open(
        &self,
        key: &PoolKey,
        tls: Arc<ClientConfig>,
    ) -> Result<(SendRequest<Bytes>, Slot), ClientError> {
        let node = key.node;
        let after = self.settings.connect_timeout;
        let (sender, connection) = tokio::time::timeout(after, self.handshake(key, tls))
            .await
            .map_err(|_| ClientError::Timeout { node, after })??;
        let (streams, watched) = watch::channel(1);
        let streams = Arc::new(streams);
        tokio::spawn(drive(connection, watched, self.settings.clone(), node));
        let mut pool = self.lock();
        // Closed connections of every key go here, so that keys no longer used do not stay.
        pool.retain(|_, connections| {
            connections.retain(|c| !c.is_closed());
            !connections.is_empty()
        });
        pool.entry(key.clone()).or_default().push(Connection {
            sender: sender.clone(),
            streams: streams.clone(),
        });
        tracing::debug!(source = %key.source, destination = %key.destination, %node, "hbone connection opened");
        Ok((sender, Slot(streams)))
    }

    async fn handshake(
        &self,
        key: &PoolKey,
        tls: Arc<ClientConfig>,
    ) -> Result<
        (
            SendRequest<Bytes>,
            H2Connection<TlsStream<TcpStream>, Bytes>,
        ),
        ClientError,
    > {
        let node = key.node;
        let tcp = TcpStream::connect(node)
            .await
            .map_err(|source| ClientError::Dial { node, source })?;
        // Tunnels carry interactive traffic too; Nagle would hold back small writes.
        tcp.set_nodelay(true)
            .map_err(|source| ClientError::Dial { node, source })?;
        let mut tls = Arc::unwrap_or_clone(tls);
        tls.alpn_protocols = vec![super::ALPN_H2.to_vec()];
        let name = ServerName::try_from(SNI).map_err(|e| ClientError::Tls {
            node,
            expected: key.destination.clone(),
            source: io::Error::new(io::ErrorKind::InvalidInput, e),
        })?;
        let stream = TlsConnector::from(Arc::new(tls))
            .connect(name, tcp)
            .await
            .map_err(|source| ClientError::Tls {
                node,
                expected: key.destination.clone(),
                source,
            })?;
        let s = &self.settings;
        h2::client::Builder::new()
            .enable_push(false)
            .initial_window_size(s.stream_window)
            .initial_connection_window_size(s.connection_window)
            .max_frame_size(s.max_frame_size)
            .handshake(stream)
            .await
            .map_err(|source| ClientError::Http { node, source })
    }
}

/// Runs a connection until it fails, a keepalive ping goes unanswered, or it has had no
/// tunnels for the idle timeout; dropping `streams` then marks it closed in the pool.
async fn drive(
    mut connection: H2Connection<TlsStream<TcpStream>, Bytes>,
    mut streams: watch::Receiver<usize>,
    settings: ClientSettings,
    node: SocketAddr,
) {
    let idle = settings.idle_timeout;
    let idled = async {
        loop {
            if streams.wait_for(|n| *n == 0).await.is_err() {
                return;
            }
            match tokio::time::timeout(idle, streams.wait_for(|n| *n > 0)).await {
                Ok(Ok(_)) => {}
                Ok(Err(_)) | Err(_) => return,
            }
        }
    };
    let pings = connection.ping_pong();
    let pinged = async {
        match pings {
            Some(pings) => {
                keepalive(
                    pings,
                    settings.keepalive_interval,
                    settings.keepalive_timeout,
                )
                .await;
            }
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        ended = &mut connection => match ended {
            Ok(()) => tracing::debug!(%node, "hbone connection closed"),
            Err(e) => tracing::debug!(%node, error = %e, "hbone connection failed"),
        },
        () = idled => tracing::debug!(%node, "hbone connection closed: idle"),
        () = pinged => tracing::info!(%node, "hbone connection closed: keepalive ping unanswered"),
    }
}

impl Tunnel {
    /// Waits for the server's answer: `Ok` once it answered 200, the refusal otherwise.
    pub async fn answered(&mut self) -> Result<(), ClientError> {
        std::future::poll_fn(|cx| self.io.recv.poll_answer(cx)).await
    }

    /// A channel told the server's answer when a read of the tunnel receives it (an error
    /// that read then returns too): for a caller that carries bytes before the answer.
    pub fn on_answer(&mut self) -> oneshot::Receiver<Result<(), ClientError>> {
        let (tx, rx) = oneshot::channel();
        self.io.recv.notify = Some(tx);
        rx
    }
}

impl Answering {
    fn poll_answer(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ClientError>> {
        let (node, target) = (self.node, self.target);
        let Answer::Awaited(response) = &mut self.answer else {
            return Poll::Ready(match self.answer {
                Answer::Open(_) => Ok(()),
                _ => Err(ClientError::Closed { node, target }),
            });
        };
        let answer = match ready!(Pin::new(response).poll(cx)) {
            Ok(response) if response.status() == StatusCode::OK => {
                self.answer = Answer::Open(Received::new(response.into_body()));
                Ok(())
            }
            Ok(response) => Err(ClientError::Refused {
                node,
                target,
                status: response.status(),
            }),
            Err(source) => Err(ClientError::Http { node, source }),
        };
        if answer.is_err() {
            self.answer = Answer::Closed;
        }
        Poll::Ready(answer)
    }
}

impl Drop for Answering {
    /// A tunnel can end before a read saw the answer: a destination's node that refuses a
    /// CONNECT whose bytes came with it answers and resets the stream, and the write that
    /// fails first ends the tunnel. The answer is in by then: told, not left to a guess.
    fn drop(&mut self) {
        if let Some(notify) = self.notify.take() {
            let mut cx = Context::from_waker(std::task::Waker::noop());
            if let Poll::Ready(answer) = self.poll_answer(&mut cx) {
                let _ = notify.send(answer);
            }
        }
    }
}

impl Receive for Answering {
    fn poll_receive(
        &mut self,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Answer::Awaited(_) = self.answer {
            let answer = ready!(self.poll_answer(cx));
            let error = answer
                .as_ref()
                .err()
                .map(|e| io::Error::new(io::ErrorKind::ConnectionRefused, e.to_string()));
            if let Some(notify) = self.notify.take() {
                let _ = notify.send(answer);
            }
            if let Some(error) = error {
                return Poll::Ready(Err(error));
            }
        }
        match &mut self.answer {
            Answer::Open(received) => received.poll_receive(cx, out),
            _ => Poll::Ready(Err(io::ErrorKind::ConnectionRefused.into())),
        }
    }
}

/// The `forwarded` header naming the source pod (RFC 7239: IPv6 quoted in brackets).
fn forwarded(source: IpAddr) -> String {
    match source {
        IpAddr::V4(v4) => format!("for={v4}"),
        IpAddr::V6(v6) => format!("for=\"[{v6}]\""),
    }
}

impl AsyncRead for Tunnel {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Tunnel {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::forwarded_for;

    #[test]
    fn a_certificate_generation_is_its_signature_tail() {
        assert_eq!(certificate_generation(&[1, 2, 3]), 0x010203);
        assert_eq!(
            certificate_generation(&[9, 1, 2, 3, 4, 5, 6, 7, 8]),
            0x0102030405060708
        );
        assert_ne!(
            certificate_generation(b"a certificate ending in one signature"),
            certificate_generation(b"a certificate ending in another signatur")
        );
    }

    #[test]
    fn the_forwarded_header_sent_is_the_one_accepted() {
        for ip in ["10.0.0.7", "2001:db8::7", "fe80::1"] {
            let ip: IpAddr = ip.parse().expect("ip");
            assert_eq!(forwarded_for(&forwarded(ip)), Ok(ip));
        }
    }
}
