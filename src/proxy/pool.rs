//! The HBONE client (outbound): HTTP/2 connections over SPIFFE mTLS pooled per (source
//! identity, destination node, destination identity), each carrying up to a set number of
//! CONNECT streams; a tunnel is one stream, open once the server answered 200.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode, header::FORWARDED};
use http_body_util::Empty;
use hyper::client::conn::http2;
use hyper::upgrade::Upgraded;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

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
        /// What hyper said.
        source: hyper::Error,
    },
    /// The CONNECT request could not be built.
    #[error("hbone CONNECT to {target}: {source}")]
    Request {
        /// The target.
        target: SocketAddr,
        /// Why.
        source: http::Error,
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
    http: http2::Builder<TokioExecutor>,
    // A std lock: never held across an await, only to pick or insert a connection.
    connections: Mutex<HashMap<PoolKey, Vec<Connection>>>,
}

/// One pooled HTTP/2 connection.
struct Connection {
    sender: http2::SendRequest<Empty<Bytes>>,
    /// Tunnels open on it; the connection's task closes it once this stays 0 for the idle
    /// timeout.
    streams: Arc<watch::Sender<usize>>,
}

/// A tunnel's place on a connection, given back when the tunnel drops.
struct Slot(Arc<watch::Sender<usize>>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// An open tunnel: a byte stream to the target, through the destination node.
pub struct Tunnel {
    io: TokioIo<Upgraded>,
    _slot: Slot,
}

impl Pool {
    /// An empty pool.
    pub fn new(settings: ClientSettings) -> Self {
        let mut http = http2::Builder::new(TokioExecutor::new());
        http.timer(TokioTimer::new())
            .initial_stream_window_size(settings.stream_window)
            .initial_connection_window_size(settings.connection_window)
            .max_frame_size(settings.max_frame_size)
            .keep_alive_interval(settings.keepalive_interval)
            .keep_alive_timeout(settings.keepalive_timeout)
            .keep_alive_while_idle(true);
        Self {
            settings,
            http,
            connections: Mutex::default(),
        }
    }

    /// Opens a tunnel to `target` for source pod `source` over a connection for `key`,
    /// reusing one with room or opening one with `tls` (from `TrustStore::client_config` with
    /// `Expected::Workload(key.destination)` and the source workload's certificate).
    pub async fn connect(
        &self,
        key: &PoolKey,
        tls: Arc<ClientConfig>,
        target: SocketAddr,
        source: IpAddr,
    ) -> Result<Tunnel, ClientError> {
        let request = || {
            Request::builder()
                .method(Method::CONNECT)
                .uri(target.to_string())
                .header(FORWARDED, forwarded(source))
                .body(Empty::new())
                .map_err(|source| ClientError::Request { target, source })
        };
        let node = key.node;
        let (mut sender, slot, reused) = match self.reserve(key) {
            Some((sender, slot)) => (sender, slot, true),
            None => {
                let (sender, slot) = self.open(key, tls.clone()).await?;
                (sender, slot, false)
            }
        };
        let (sent, slot) = match sender.send_request(request()?).await {
            // A reused connection may have closed (idle, GOAWAY) since it was picked: once
            // more on a fresh one.
            Err(_) if reused && sender.is_closed() => {
                drop(slot);
                let (mut sender, slot) = self.open(key, tls).await?;
                (sender.send_request(request()?).await, slot)
            }
            sent => (sent, slot),
        };
        let response = sent.map_err(|source| ClientError::Http { node, source })?;
        if response.status() != StatusCode::OK {
            return Err(ClientError::Refused {
                node,
                target,
                status: response.status(),
            });
        }
        let upgraded = hyper::upgrade::on(response)
            .await
            .map_err(|source| ClientError::Http { node, source })?;
        tracing::debug!(source = %key.source, destination = %key.destination, %node, %target, "hbone tunnel open");
        Ok(Tunnel {
            io: TokioIo::new(upgraded),
            _slot: slot,
        })
    }

    /// How many open connections the pool holds, for every key.
    pub fn len(&self) -> usize {
        let pool = self.lock();
        pool.values()
            .flatten()
            .filter(|c| !c.sender.is_closed())
            .count()
    }

    /// Whether the pool holds no open connection.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How many open connections the pool holds for `key`.
    pub fn connections(&self, key: &PoolKey) -> usize {
        let pool = self.lock();
        pool.get(key)
            .map_or(0, |c| c.iter().filter(|c| !c.sender.is_closed()).count())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PoolKey, Vec<Connection>>> {
        // Every update leaves the map consistent, so a poisoned lock still holds a good one.
        self.connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes a stream on a live connection for `key` with room for one more.
    fn reserve(&self, key: &PoolKey) -> Option<(http2::SendRequest<Empty<Bytes>>, Slot)> {
        let mut pool = self.lock();
        let connections = pool.get_mut(key)?;
        connections.retain(|c| !c.sender.is_closed());
        let max = self.settings.max_streams_per_connection;
        let connection = connections
            .iter()
            .find(|c| *c.streams.borrow() < max && c.sender.is_ready())?;
        connection.streams.send_modify(|n| *n += 1);
        Some((connection.sender.clone(), Slot(connection.streams.clone())))
    }

    /// Opens a connection for `key`, adds it to the pool and takes one stream on it.
    async fn open(
        &self,
        key: &PoolKey,
        tls: Arc<ClientConfig>,
    ) -> Result<(http2::SendRequest<Empty<Bytes>>, Slot), ClientError> {
        let node = key.node;
        let after = self.settings.connect_timeout;
        let (sender, connection) = tokio::time::timeout(after, self.handshake(key, tls))
            .await
            .map_err(|_| ClientError::Timeout { node, after })??;
        let (streams, watched) = watch::channel(1);
        let streams = Arc::new(streams);
        tokio::spawn(drive(connection, watched, self.settings.idle_timeout, node));
        let mut pool = self.lock();
        // Closed connections of every key go here, so that keys no longer used do not stay.
        pool.retain(|_, connections| {
            connections.retain(|c| !c.sender.is_closed());
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
    ) -> Result<(http2::SendRequest<Empty<Bytes>>, H2Connection), ClientError> {
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
        self.http
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|source| ClientError::Http { node, source })
    }
}

type H2Connection = http2::Connection<TokioIo<TlsStream<TcpStream>>, Empty<Bytes>, TokioExecutor>;

/// Runs a connection until it fails or has had no tunnels for `idle`.
async fn drive(
    connection: H2Connection,
    mut streams: watch::Receiver<usize>,
    idle: Duration,
    node: SocketAddr,
) {
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
    tokio::select! {
        ended = connection => match ended {
            Ok(()) => tracing::debug!(%node, "hbone connection closed"),
            Err(e) => tracing::debug!(%node, error = %e, "hbone connection failed"),
        },
        () = idled => tracing::debug!(%node, "hbone connection closed: idle"),
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
