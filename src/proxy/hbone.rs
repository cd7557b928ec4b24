//! The HBONE server (inbound, port 15008): terminates mTLS with the destination workload's
//! certificate, accepts HTTP/2 CONNECT streams, canonicalises what each names, asks the
//! caller's [`Admission`] and only then dials the destination and pipes bytes both ways.
//! Each source address may hold only so many connections at once (THREATS 18, 44).

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use h2::RecvStream;
use h2::server::SendResponse;
use http::{Method, Request, Response, StatusCode, header::FORWARDED};
use rustls::ServerConfig;
use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_util::task::TaskTracker;

use super::authority::{canonical_authority, forwarded_for};
use super::stream::{H2Io, Received, keepalive};
use crate::identity::{VerifyError, WorkloadId, peer_identity};

/// The client connection preface every HTTP/2 connection starts with (RFC 9113 §3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Default for [`ServerSettings::handshake_timeout`] (THREATS 18).
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default for [`ServerSettings::max_concurrent_streams`] (as ztunnel).
pub const DEFAULT_MAX_CONCURRENT_STREAMS: u32 = 200;
/// Default for [`ServerSettings::max_header_list_size`] (as ztunnel; THREATS 21).
pub const DEFAULT_MAX_HEADER_LIST_SIZE: u32 = 64 * 1024;
/// Default for [`ServerSettings::max_pending_accept_reset_streams`] (THREATS 19).
pub const DEFAULT_MAX_PENDING_ACCEPT_RESET_STREAMS: usize = 20;
/// Default for [`ServerSettings::max_local_error_reset_streams`] (THREATS 20).
pub const DEFAULT_MAX_LOCAL_ERROR_RESET_STREAMS: usize = 256;
/// Default for [`ServerSettings::max_connections_per_source`] (THREATS 18, 44). A source is a
/// node, whose pool opens a connection per (source identity, destination identity) pair it
/// carries here, and one more past each 100 streams: 512 leaves a densely packed node ample room,
/// while one source cannot take more than 512 descriptors and TLS and HTTP/2 states here.
pub const DEFAULT_MAX_CONNECTIONS_PER_SOURCE: usize = 512;
/// At most one log line per this interval for a refusal a peer can repeat at will (a
/// connection over the per-source cap, a malformed CONNECT): a storm must not become a log
/// storm (THREATS 47).
const LOG_INTERVAL: Duration = Duration::from_secs(1);
/// Default for [`ServerSettings::dial_timeout`].
pub const DEFAULT_DIAL_TIMEOUT: Duration = Duration::from_secs(5);
/// Default for [`ServerSettings::keepalive_interval`].
pub const DEFAULT_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// Default for [`ServerSettings::keepalive_timeout`].
pub const DEFAULT_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Limits of the HBONE server; those of HTTP/2 reach h2 as the setting of the same name.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ServerSettings {
    /// Time from TCP accept until TLS is done and the HTTP/2 preface has arrived; past it the
    /// connection is closed.
    pub handshake_timeout: Duration,
    /// Connections one source address may hold open at once, counted from accept (handshakes
    /// included) to close; past it a new connection is closed before TLS. Sources behind one
    /// NAT share it.
    pub max_connections_per_source: usize,
    /// Concurrent CONNECT streams per connection.
    pub max_concurrent_streams: u32,
    /// Largest decoded header list of one request, in bytes.
    pub max_header_list_size: u32,
    /// Streams the client may reset before they are accepted, before GOAWAY.
    pub max_pending_accept_reset_streams: usize,
    /// Streams this side may reset for protocol errors, before GOAWAY.
    pub max_local_error_reset_streams: usize,
    /// Per-stream flow-control window.
    pub stream_window: u32,
    /// Per-connection flow-control window.
    pub connection_window: u32,
    /// Largest frame accepted.
    pub max_frame_size: u32,
    /// Time allowed to connect to the destination.
    pub dial_timeout: Duration,
    /// Interval of keepalive pings to the client.
    pub keepalive_interval: Duration,
    /// Time a ping may go unanswered before the connection is closed.
    pub keepalive_timeout: Duration,
    /// The socket mark of dials to destinations (so that capture lets them through).
    pub mark: Option<u32>,
    /// Dials destinations from the tunnel's source address (the `forwarded` pod's, a
    /// transparent socket) rather than from the node's, so that the pod sees who connected;
    /// the node agent's plaintext and direct outbound dials follow the same setting.
    pub from_source: bool,
}

impl Default for ServerSettings {
    fn default() -> Self {
        Self {
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            max_connections_per_source: DEFAULT_MAX_CONNECTIONS_PER_SOURCE,
            max_concurrent_streams: DEFAULT_MAX_CONCURRENT_STREAMS,
            max_header_list_size: DEFAULT_MAX_HEADER_LIST_SIZE,
            max_pending_accept_reset_streams: DEFAULT_MAX_PENDING_ACCEPT_RESET_STREAMS,
            max_local_error_reset_streams: DEFAULT_MAX_LOCAL_ERROR_RESET_STREAMS,
            stream_window: super::DEFAULT_STREAM_WINDOW,
            connection_window: super::DEFAULT_CONNECTION_WINDOW,
            max_frame_size: super::DEFAULT_MAX_FRAME_SIZE,
            dial_timeout: DEFAULT_DIAL_TIMEOUT,
            keepalive_interval: DEFAULT_KEEPALIVE_INTERVAL,
            keepalive_timeout: DEFAULT_KEEPALIVE_TIMEOUT,
            mark: None,
            from_source: false,
        }
    }
}

/// The client side of an HBONE connection, as its certificate proved it.
#[derive(Debug, Clone)]
pub struct Peer {
    /// The proven SPIFFE identity (the source workload's).
    pub identity: WorkloadId,
    /// The certificate chain it presented, leaf first (for re-checking it later).
    pub chain: Vec<CertificateDer<'static>>,
    /// Its TCP address (the source node's).
    pub address: SocketAddr,
    /// Where its connection was addressed.
    pub arrived_at: SocketAddr,
}

/// One tunnel asked for, canonicalised, for the caller to admit or refuse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inbound {
    /// The proven identity of the client.
    pub peer: WorkloadId,
    /// The source pod's address, from `forwarded: for=`.
    pub source: IpAddr,
    /// Where the tunnel goes: the CONNECT authority.
    pub destination: SocketAddr,
    /// Where the tunnel's connection was addressed: the destination pod's HBONE address when
    /// capture diverted it, else the listener's own address.
    pub arrived_at: SocketAddr,
}

/// Why a tunnel is refused, and the HTTP status the client gets.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{status}: {reason}")]
pub struct Refusal {
    /// Status of the response (4xx).
    pub status: StatusCode,
    /// Why, for the log (not sent to the client).
    pub reason: String,
}

impl Refusal {
    /// A 403: the tunnel is well formed but not allowed.
    pub fn forbidden(reason: impl Into<String>) -> Self {
        Self {
            status: StatusCode::FORBIDDEN,
            reason: reason.into(),
        }
    }

    /// A 400: the tunnel names something this node does not serve (THREATS 14).
    pub fn bad_request(reason: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            reason: reason.into(),
        }
    }
}

/// Why a carried tunnel ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TunnelEnd {
    /// Either end closed it.
    Done,
    /// [`Admission::carried`] resolved: it is no longer allowed.
    Closed,
    /// Its peer was revoked, or its connection is gone.
    Revoked,
    /// Copying failed.
    Failed,
}

/// The caller's checks on each tunnel (local pod, service account of the source, policy).
pub trait Admission: Send + Sync + 'static {
    /// Admits or refuses one tunnel; nothing is dialled before it answers.
    fn admit(&self, inbound: &Inbound) -> impl Future<Output = Result<(), Refusal>> + Send;

    /// Called once the tunnel `inbound` is admitted and dialled: resolves when it must close
    /// before either end closes it (a tightened policy). Never, by default.
    fn carried(&self, inbound: &Inbound) -> impl Future<Output = ()> + Send + 'static {
        let _ = inbound;
        std::future::pending()
    }

    /// Called when a carried tunnel ends: the bytes it carried to the destination and back
    /// (0 when cut short), and why it ended.
    fn ended(&self, inbound: &Inbound, sent: u64, received: u64, end: TunnelEnd) {
        let _ = (inbound, sent, received, end);
    }

    /// Called when a CONNECT from `peer` is refused before admission, being malformed,
    /// ambiguous or no tunnel this server carries: nothing was judged, nothing dialled.
    fn malformed(&self, peer: &Peer, refusal: &Refusal) {
        let _ = (peer, refusal);
    }

    /// Resolves once `peer` may no longer be served (e.g. `TrustStore::until_distrusted`);
    /// its connection and every tunnel on it then close. Never, by default.
    fn revoked(&self, peer: &Peer) -> impl Future<Output = ()> + Send {
        let _ = peer;
        std::future::pending()
    }
}

/// Why an HBONE connection ended in error.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// TLS and the preface did not complete in time.
    #[error("connection from {peer}: TLS and HTTP/2 preface not done within {after:?}")]
    HandshakeTimeout {
        /// The client's address.
        peer: SocketAddr,
        /// The limit.
        after: Duration,
    },
    /// No certificate to present for where the connection was addressed.
    #[error("connection from {peer} to {arrived_at}: {reason}")]
    NoCertificate {
        /// The client's address.
        peer: SocketAddr,
        /// Where it was addressed.
        arrived_at: SocketAddr,
        /// Why there is none.
        reason: String,
    },
    /// The TLS handshake failed (a refused certificate, among others).
    #[error("connection from {peer}: TLS handshake failed: {source}")]
    Tls {
        /// The client's address.
        peer: SocketAddr,
        /// What rustls or the socket said.
        source: io::Error,
    },
    /// The first bytes inside TLS were not the HTTP/2 preface.
    #[error("connection from {peer}: no HTTP/2 preface")]
    Preface {
        /// The client's address.
        peer: SocketAddr,
    },
    /// The client's certificate names no workload identity.
    #[error("connection from {peer}: {source}")]
    Identity {
        /// The client's address.
        peer: SocketAddr,
        /// Why.
        source: VerifyError,
    },
    /// HTTP/2 failed (a protocol error, a GOAWAY we sent, the socket).
    #[error("connection from {peer} ({identity}): HTTP/2: {source}")]
    Http {
        /// The client's address.
        peer: SocketAddr,
        /// Its proven identity.
        identity: WorkloadId,
        /// What h2 said.
        source: h2::Error,
    },
}

/// The TLS configuration for each accepted connection, chosen by where it was addressed (a
/// node presents the certificate of the pod a tunnel's connection names).
pub trait ServerTls: Send + Sync + 'static {
    /// The configuration for a connection addressed to `arrived_at`, or why there is none.
    fn config(&self, arrived_at: SocketAddr) -> Result<Arc<ServerConfig>, String>;
}

/// One configuration for every connection.
struct Fixed(Arc<ServerConfig>);

impl ServerTls for Fixed {
    fn config(&self, _: SocketAddr) -> Result<Arc<ServerConfig>, String> {
        Ok(self.0.clone())
    }
}

/// `config` with the ALPN protocol HBONE speaks, for a [`ServerTls`].
pub fn hbone_server_config(mut config: ServerConfig) -> Arc<ServerConfig> {
    config.alpn_protocols = vec![super::ALPN_H2.to_vec()];
    Arc::new(config)
}

/// The HBONE server: one per node, sharing the caller's TLS configuration and admission.
pub struct Server<A> {
    tls: Box<dyn ServerTls>,
    h2: h2::server::Builder,
    settings: ServerSettings,
    admission: Arc<A>,
    sources: Arc<Sources>,
    /// The log of CONNECTs refused before admission.
    malformed: Arc<LogThrottle>,
    /// Every connection's and tunnel's task, waited for when draining.
    tasks: TaskTracker,
    /// Turned true to drain: accept nothing more, tell every connection's peer (GOAWAY).
    draining: watch::Sender<bool>,
}

impl<A: Admission> Server<A> {
    /// A server presenting what `tls` resolves (built with `TrustStore::server_config`).
    pub fn new(tls: Arc<ServerConfig>, settings: ServerSettings, admission: Arc<A>) -> Self {
        let tls = hbone_server_config(Arc::unwrap_or_clone(tls));
        Self::with_tls(Box::new(Fixed(tls)), settings, admission)
    }

    /// A server choosing each connection's configuration with `tls`.
    pub fn with_tls(tls: Box<dyn ServerTls>, settings: ServerSettings, admission: Arc<A>) -> Self {
        let mut h2 = h2::server::Builder::new();
        h2.max_concurrent_streams(settings.max_concurrent_streams)
            .max_header_list_size(settings.max_header_list_size)
            .max_pending_accept_reset_streams(settings.max_pending_accept_reset_streams)
            .max_local_error_reset_streams(Some(settings.max_local_error_reset_streams))
            .initial_window_size(settings.stream_window)
            .initial_connection_window_size(settings.connection_window)
            .max_frame_size(settings.max_frame_size)
            // Lets `:protocol` requests reach us so that they get a 400, not a bare reset.
            .enable_connect_protocol();
        let sources = Arc::new(Sources::new(
            "hbone connections",
            settings.max_connections_per_source,
        ));
        Self {
            tls,
            h2,
            settings,
            admission,
            sources,
            malformed: Arc::default(),
            tasks: TaskTracker::new(),
            draining: watch::Sender::new(false),
        }
    }

    /// Starts draining: the listeners stop accepting, and every connection's peer is told to
    /// open no more tunnels on it (GOAWAY) while the tunnels it carries go on.
    pub fn drain(&self) {
        self.draining.send_replace(true);
        self.tasks.close();
    }

    /// Resolves once draining and every connection has ended.
    pub async fn drained(&self) {
        self.tasks.wait().await;
    }

    /// Accepts connections on `listener` until the server drains, serving each in its own
    /// task; a connection from a source that holds
    /// [`ServerSettings::max_connections_per_source`] already is closed at once.
    pub async fn run(self: Arc<Self>, listener: TcpListener) {
        let mut draining = self.draining.subscribe();
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                _ = draining.wait_for(|draining| *draining) => return,
            };
            let (tcp, from) = match accepted {
                Ok(accepted) => accepted,
                // Out of descriptors, an aborted connection: back off rather than spin.
                Err(e) => {
                    tracing::warn!(error = %e, "hbone accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            // Refused before TLS or a task: a storm from one source costs an accept and a close.
            let Some(slot) = self.sources.take(from.ip()) else {
                // Reset when dropped rather than closed, so that a storm leaves no TIME_WAIT
                // sockets here; should that fail, a plain close still refuses it.
                let _ = socket2::SockRef::from(&tcp).set_linger(Some(Duration::ZERO));
                continue;
            };
            // HTTP/2 writes small frames (HEADERS, WINDOW_UPDATE): with Nagle they wait for the
            // peer's delayed ACK, some 40 ms, on every new tunnel.
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!(%from, error = %e, "hbone: TCP_NODELAY not set");
            }
            let server = self.clone();
            self.tasks.spawn(async move {
                let _slot = slot;
                if let Err(e) = server.serve(tcp, from).await {
                    // Debug shows the h2 cause (GOAWAY reason) that hyper's Display hides.
                    tracing::debug!(%from, error = ?e, "hbone connection ended");
                }
            });
        }
    }

    /// Connections refused so far because their source held its cap.
    pub fn refused_over_cap(&self) -> u64 {
        self.sources.lock().refused_total
    }

    /// Serves one accepted connection from `from` until it closes (not counted against the
    /// per-source cap: [`Server::run`] counts).
    pub async fn serve(&self, tcp: TcpStream, from: SocketAddr) -> Result<(), ServerError> {
        let after = self.settings.handshake_timeout;
        let arrived_at = crate::redirect::original_destination(&tcp)
            .map_err(|source| ServerError::Tls { peer: from, source })?;
        let config = self
            .tls
            .config(arrived_at)
            .map_err(|reason| ServerError::NoCertificate {
                peer: from,
                arrived_at,
                reason,
            })?;
        let handshake = async {
            let tls_error = |source| ServerError::Tls { peer: from, source };
            let mut tls = TlsAcceptor::from(config)
                .accept(tcp)
                .await
                .map_err(tls_error)?;
            let mut preface = [0u8; PREFACE.len()];
            tls.read_exact(&mut preface).await.map_err(tls_error)?;
            if &preface != PREFACE {
                return Err(ServerError::Preface { peer: from });
            }
            Ok(tls)
        };
        let tls = tokio::time::timeout(after, handshake)
            .await
            .map_err(|_| ServerError::HandshakeTimeout { peer: from, after })??;
        let state = tls.get_ref().1;
        let identity =
            peer_identity(state).map_err(|source| ServerError::Identity { peer: from, source })?;
        let peer = Arc::new(Peer {
            identity: identity.clone(),
            chain: state.peer_certificates().unwrap_or_default().to_vec(),
            address: from,
            arrived_at,
        });
        tracing::debug!(%from, %identity, "hbone connection accepted");

        let http_error = |source| ServerError::Http {
            peer: from,
            identity: identity.clone(),
            source,
        };
        let mut connection = self
            .h2
            .handshake::<_, Bytes>(Replayed::new(tls))
            .await
            .map_err(http_error)?;
        let pinged = connection.ping_pong().map(|pings| {
            let s = &self.settings;
            keepalive(pings, s.keepalive_interval, s.keepalive_timeout)
        });
        // Tells this connection's tunnels to close: they outlive the HTTP/2 connection object.
        let (revoke, revoked) = watch::channel(false);
        let dial = Dial {
            timeout: self.settings.dial_timeout,
            mark: self.settings.mark,
            from_source: self.settings.from_source,
        };
        // Accepting drives the connection, the streams of every tunnel on it included.
        let served = async {
            let mut draining = self.draining.subscribe();
            let mut told = false;
            loop {
                let accepted = tokio::select! {
                    accepted = connection.accept() => Some(accepted),
                    _ = draining.wait_for(|draining| *draining), if !told => None,
                };
                let Some(accepted) = accepted else {
                    // The peer opens no more tunnels here; those open go on to their end.
                    connection.graceful_shutdown();
                    told = true;
                    continue;
                };
                let Some(accepted) = accepted else { break };
                let (request, respond) = accepted.map_err(http_error)?;
                self.tasks.spawn(tunnel(
                    (self.admission.clone(), self.malformed.clone()),
                    peer.clone(),
                    dial,
                    revoked.clone(),
                    request,
                    respond,
                ));
            }
            Ok(())
        };
        tokio::select! {
            ended = served => ended,
            () = async { match pinged { Some(pinged) => pinged.await, None => std::future::pending().await } } => {
                tracing::info!(%from, %identity, "hbone connection closed: keepalive ping unanswered");
                Ok(())
            }
            () = self.admission.revoked(&peer) => {
                tracing::info!(%from, %identity, "hbone connection closed: peer revoked");
                revoke.send_replace(true);
                Ok(())
            }
        }
    }
}

/// Connections open per source address, against a limit
/// ([`ServerSettings::max_connections_per_source`] for HBONE).
pub(crate) struct Sources {
    /// What is counted, for the log: `hbone connections`, say.
    what: &'static str,
    limit: usize,
    counts: Mutex<SourceCounts>,
    log: LogThrottle,
}

#[derive(Default)]
struct SourceCounts {
    /// Only sources with a connection open: the map is as large as the connections are many.
    open: HashMap<IpAddr, usize>,
    /// Connections refused since the server started.
    refused_total: u64,
}

/// One log line per [`LOG_INTERVAL`] at most for events a peer can repeat at will; each line
/// tells how many there were since the last (a burst's tail is told by the next line).
#[derive(Debug, Default)]
struct LogThrottle {
    state: Mutex<Throttled>,
}

#[derive(Debug, Default)]
struct Throttled {
    logged_at: Option<Instant>,
    since: u64,
}

impl LogThrottle {
    /// Counts one event: `Some(n)` when a line is due, `n` the events it tells (this one
    /// included), `None` while the interval since the last line runs.
    fn event(&self) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.since += 1;
        let now = Instant::now();
        if state
            .logged_at
            .is_some_and(|at| now.duration_since(at) < LOG_INTERVAL)
        {
            return None;
        }
        state.logged_at = Some(now);
        Some(std::mem::take(&mut state.since))
    }
}

impl Sources {
    /// At most `limit` of `what` per source address.
    pub(crate) fn new(what: &'static str, limit: usize) -> Self {
        Self {
            what,
            limit,
            counts: Mutex::default(),
            log: LogThrottle::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, SourceCounts> {
        // Every update leaves the counts consistent, so a poisoned lock still holds good ones.
        self.counts.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A place for one more connection from `ip`, or `None` if it holds its limit already.
    pub(crate) fn take(self: &Arc<Self>, ip: IpAddr) -> Option<Slot> {
        // A dual-stack listener sees IPv4 peers as ::ffff:a.b.c.d: one source, one count.
        let ip = ip.to_canonical();
        let mut counts = self.lock();
        let open = counts.open.get(&ip).copied().unwrap_or(0);
        if open < self.limit {
            counts.open.insert(ip, open + 1);
            return Some(Slot {
                sources: self.clone(),
                ip,
            });
        }
        counts.refused_total += 1;
        drop(counts);
        // One line per interval, naming the latest source only; never a per-source metric.
        if let Some(refused) = self.log.event() {
            tracing::debug!(
                what = self.what,
                latest = %ip,
                limit = self.limit,
                refused,
                "refused: their source holds its cap"
            );
        }
        None
    }
}

/// One open connection's place in [`Sources`], given back when dropped.
pub(crate) struct Slot {
    sources: Arc<Sources>,
    ip: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Entry::Occupied(mut open) = self.sources.lock().open.entry(self.ip) {
            *open.get_mut() -= 1;
            if *open.get() == 0 {
                open.remove();
            }
        }
    }
}

/// How a tunnel's destination is dialled.
#[derive(Debug, Clone, Copy)]
struct Dial {
    timeout: Duration,
    mark: Option<u32>,
    from_source: bool,
}

/// Handles one stream: checks it, asks the admission, dials, then answers 200 and pipes.
async fn tunnel<A: Admission>(
    (admission, malformed): (Arc<A>, Arc<LogThrottle>),
    peer: Arc<Peer>,
    dial: Dial,
    mut revoked: watch::Receiver<bool>,
    req: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
) {
    let inbound = match inbound(&peer, &req) {
        Ok(inbound) => inbound,
        Err(refusal) => {
            admission.malformed(&peer, &refusal);
            if let Some(refused) = malformed.event() {
                tracing::info!(
                    peer = %peer.identity,
                    from = %peer.address,
                    status = refusal.status.as_u16(),
                    reason = %refusal.reason,
                    refused,
                    "hbone requests refused before admission (the latest named)"
                );
            }
            return answer(respond, refusal.status);
        }
    };
    if let Err(refusal) = admission.admit(&inbound).await {
        return refuse(&peer, &inbound, refusal, respond);
    }
    let destination = inbound.destination;
    // The source's own connection is on its node, not this one: no port to keep clear of.
    let from = dial
        .from_source
        .then_some(SocketAddr::new(inbound.source, 0));
    let dialled = super::connect(destination, dial.mark, from);
    let upstream = match tokio::time::timeout(dial.timeout, dialled).await {
        Ok(Ok(upstream)) => upstream,
        Ok(Err(e)) => {
            tracing::info!(peer = %peer.identity, %destination, error = %e, "hbone dial failed");
            return answer(respond, StatusCode::SERVICE_UNAVAILABLE);
        }
        Err(_) => {
            tracing::info!(peer = %peer.identity, %destination, "hbone dial timed out");
            return answer(respond, StatusCode::GATEWAY_TIMEOUT);
        }
    };
    let closing = admission.carried(&inbound);
    let mut downstream = match respond.send_response(Response::new(()), false) {
        Ok(send) => H2Io::new(send, Received::new(req.into_body())),
        Err(e) => {
            tracing::debug!(%destination, error = %e, "hbone stream ended before the tunnel");
            admission.ended(&inbound, 0, 0, TunnelEnd::Failed);
            return;
        }
    };
    tracing::debug!(peer = %peer.identity, source = %inbound.source, %destination, "hbone tunnel open");
    let mut upstream = upstream;
    let (sent, received, end) = tokio::select! {
        copied = tokio::io::copy_bidirectional_with_sizes(&mut downstream, &mut upstream, super::COPY_BUFFER, super::COPY_BUFFER) => match copied {
            Ok((sent, received)) => (sent, received, TunnelEnd::Done),
            Err(e) => {
                tracing::debug!(%destination, error = %e, "hbone tunnel failed");
                (0, 0, TunnelEnd::Failed)
            }
        },
        () = closing => {
            tracing::info!(%destination, peer = %peer.identity, "hbone tunnel closed: no longer allowed");
            (0, 0, TunnelEnd::Closed)
        }
        // Also when the connection is gone: its streams cannot carry anything more.
        _ = revoked.wait_for(|revoked| *revoked) => {
            tracing::info!(%destination, "hbone tunnel closed: peer revoked");
            (0, 0, TunnelEnd::Revoked)
        }
    };
    tracing::debug!(%destination, sent, received, ?end, "hbone tunnel ended");
    admission.ended(&inbound, sent, received, end);
}

/// The tunnel `req` asks for, or why it is malformed.
fn inbound(peer: &Peer, req: &Request<RecvStream>) -> Result<Inbound, Refusal> {
    if req.method() != Method::CONNECT {
        return Err(Refusal {
            status: StatusCode::METHOD_NOT_ALLOWED,
            reason: format!("method {} is not CONNECT", req.method()),
        });
    }
    if let Some(protocol) = req.extensions().get::<h2::ext::Protocol>() {
        return Err(Refusal::bad_request(format!(
            "extended CONNECT (:protocol {:?}) is not HBONE",
            protocol.as_str()
        )));
    }
    let authority = req
        .uri()
        .authority()
        .ok_or_else(|| Refusal::bad_request("CONNECT without an authority"))?;
    let destination =
        canonical_authority(authority.as_str()).map_err(|e| Refusal::bad_request(e.to_string()))?;
    let mut forwarded = req.headers().get_all(FORWARDED).iter();
    let (Some(value), None) = (forwarded.next(), forwarded.next()) else {
        return Err(Refusal::bad_request(
            "not exactly one forwarded header naming the source",
        ));
    };
    let value = value
        .to_str()
        .map_err(|_| Refusal::bad_request("forwarded header is not visible ASCII"))?;
    let source = forwarded_for(value).map_err(|e| Refusal::bad_request(e.to_string()))?;
    Ok(Inbound {
        peer: peer.identity.clone(),
        source,
        destination,
        arrived_at: peer.arrived_at,
    })
}

/// Answers a tunnel the admission refused.
fn refuse(peer: &Peer, inbound: &Inbound, refusal: Refusal, respond: SendResponse<Bytes>) {
    // The admission's own record (a node's decision log) says it at info.
    tracing::debug!(
        peer = %peer.identity,
        from = %peer.address,
        source = %inbound.source,
        destination = %inbound.destination,
        status = refusal.status.as_u16(),
        reason = %refusal.reason,
        "hbone tunnel refused"
    );
    answer(respond, refusal.status);
}

/// Answers `status` and ends the stream (nothing was dialled).
fn answer(mut respond: SendResponse<Bytes>, status: StatusCode) {
    let mut response = Response::new(());
    *response.status_mut() = status;
    // Fails only if the client reset the stream already: nothing to tell it then.
    let _ = respond.send_response(response, true);
}

/// A stream whose preface was read (to time it) and is handed to h2 again from the start.
struct Replayed<S> {
    io: S,
    replayed: usize,
}

impl<S> Replayed<S> {
    fn new(io: S) -> Self {
        Self { io, replayed: 0 }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Replayed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let rest = &PREFACE[self.replayed..];
        if rest.is_empty() {
            return Pin::new(&mut self.io).poll_read(cx, buf);
        }
        let n = rest.len().min(buf.remaining());
        buf.put_slice(&rest[..n]);
        self.replayed += n;
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Replayed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
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

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn each_source_holds_up_to_its_cap_and_gets_places_back() {
        let sources = Arc::new(Sources::new("connections", 2));
        let a = [sources.take(ip("10.0.0.1")), sources.take(ip("10.0.0.1"))];
        assert!(a.iter().all(Option::is_some));
        assert!(sources.take(ip("10.0.0.1")).is_none());
        // The same node through a dual-stack listener is the same source.
        assert!(sources.take(ip("::ffff:10.0.0.1")).is_none());
        assert!(
            sources
                .take(ip("10.0.0.2"))
                .is_some_and(|b| b.ip == ip("10.0.0.2"))
        );
        let [first, second] = a;
        drop(first);
        let again = sources.take(ip("::ffff:10.0.0.1"));
        assert!(again.is_some());
        assert_eq!(sources.lock().open.get(&ip("10.0.0.1")), Some(&2));
        drop((second, again));
        assert!(
            sources.lock().open.is_empty(),
            "counts of closed sources kept"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn refusals_are_logged_at_most_once_an_interval_with_their_count() {
        let log = LogThrottle::default();
        // The first is told at once; the next ones wait for the interval to pass.
        assert_eq!(log.event(), Some(1));
        for _ in 0..3 {
            assert_eq!(log.event(), None);
        }
        tokio::time::advance(LOG_INTERVAL).await;
        assert_eq!(log.event(), Some(4), "told, with the 3 before it");
        assert_eq!(log.event(), None);

        // Refusals over the cap are all counted, and logged through such a throttle.
        let sources = Arc::new(Sources::new("connections", 0));
        for _ in 0..5 {
            assert!(sources.take(ip("10.0.0.1")).is_none());
        }
        assert_eq!(sources.lock().refused_total, 5, "every refusal is counted");
        assert_eq!(
            sources.log.event(),
            None,
            "logged once already this interval"
        );
    }
}
