//! The data plane's tunnels: HBONE (HTTP/2 CONNECT inside SPIFFE mTLS, port 15008) as a
//! server that admits tunnels to local pods (`hbone`) and a client pool that opens them
//! (`pool`), with the parsing of what a peer names made unambiguous (`authority`).

pub mod authority;
pub mod hbone;
pub mod pool;
mod stream;

pub use authority::{AuthorityError, canonical_authority, forwarded_for};
pub use hbone::{
    Admission, Inbound, Peer, Refusal, Server, ServerError, ServerSettings, ServerTls, TunnelEnd,
    hbone_server_config,
};
pub use pool::{ClientError, ClientSettings, Pool, PoolKey, Tunnel};

/// The HBONE port on every node.
pub const HBONE_PORT: u16 = 15008;

/// Per-stream HTTP/2 flow-control window: large enough that one bulk stream is not throttled
/// by round trips (the 64 KiB default caps a 1 ms path near 500 Mbit/s).
pub const DEFAULT_STREAM_WINDOW: u32 = 4 * 1024 * 1024;

/// Per-connection HTTP/2 flow-control window, shared by all streams of a connection.
pub const DEFAULT_CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;

/// Largest HTTP/2 frame either side accepts: the protocol's default, one TLS record's worth.
/// A frame is buffered whole before any of it moves on, so small frames pipeline through the
/// two proxies; A/B against 1 MiB frames, single-stream throughput was the same or better.
pub const DEFAULT_MAX_FRAME_SIZE: u32 = 16 * 1024;

/// Buffer of each direction of a carried connection: large enough that bulk transfers move
/// in few, large writes (tokio's default is 8 KiB).
pub const COPY_BUFFER: usize = 64 * 1024;

/// ALPN protocol id both sides offer.
const ALPN_H2: &[u8] = b"h2";

/// Connects to `target` from a socket carrying `mark` (weft's own sockets are never captured
/// again), with Nagle off: tunnels carry interactive traffic too. With `from`, the socket is
/// transparent and bound to its address, so that the destination sees the connection's true
/// source (the replies, addressed to it, are delivered to this socket by capture's `socket`
/// rule), at any port but `from`'s own: the source's connection, captured on this node, holds
/// that four-tuple in conntrack. An address of the other family than `target`'s is not used.
pub async fn connect(
    target: std::net::SocketAddr,
    mark: Option<u32>,
    from: Option<std::net::SocketAddr>,
) -> std::io::Result<tokio::net::TcpStream> {
    let from = from.filter(|from| from.is_ipv6() == target.is_ipv6());
    let mut socket = bound(target, mark, from)?;
    if let Some(from) = from.filter(|from| from.port() != 0) {
        // The kernel picks a bound port at random: a second pick is another port.
        while socket.local_addr()?.port() == from.port() {
            socket = bound(target, mark, Some(from))?;
        }
    }
    socket.connect(target).await
}

/// A socket for [`connect`] to `target`, bound to `from`'s address (an ephemeral port).
fn bound(
    target: std::net::SocketAddr,
    mark: Option<u32>,
    from: Option<std::net::SocketAddr>,
) -> std::io::Result<tokio::net::TcpSocket> {
    let socket = if target.is_ipv6() {
        tokio::net::TcpSocket::new_v6()?
    } else {
        tokio::net::TcpSocket::new_v4()?
    };
    let sock = socket2::SockRef::from(&socket);
    if let Some(mark) = mark {
        sock.set_mark(mark)?;
    }
    if let Some(from) = from {
        if from.is_ipv6() {
            sock.set_ip_transparent_v6(true)?;
        } else {
            sock.set_ip_transparent_v4(true)?;
        }
        socket.bind(std::net::SocketAddr::new(from.ip(), 0))?;
    }
    socket.set_nodelay(true)?;
    Ok(socket)
}
