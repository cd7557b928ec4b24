//! HBONE over loopback with real SPIFFE mTLS: bytes through client pool → server → an echo
//! server both ways, the admission seeing the proven identity and the forwarded source;
//! refusals and malformed requests answered without a dial (THREATS 14, 16, 23); the
//! handshake/preface timeout (THREATS 18); pooling and the stream limit; certificates refused
//! either way; revocation closing open tunnels; a rapid-reset burst (THREATS 19).

#[path = "../src/identity/testpki.rs"]
mod testpki;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use testpki::{Ca, Leaf};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::TlsConnector;
use weft::identity::id::trust_domain;
use weft::identity::{BundleSet, Expected, TrustBundle, TrustStore, WorkloadId};
use weft::proxy::{
    Admission, ClientError, ClientSettings, Inbound, Peer, Pool, PoolKey, Refusal, Server,
    ServerSettings,
};

const CLIENT: &str = "spiffe://a.test/ns/demo/sa/client";
const SERVER: &str = "spiffe://a.test/ns/demo/sa/server";
const SOURCE: &str = "10.0.0.7";
const WAIT: Duration = Duration::from_secs(5);

fn id(s: &str) -> WorkloadId {
    WorkloadId::parse(s).expect("workload id")
}

fn source() -> IpAddr {
    SOURCE.parse().expect("ip")
}

/// The test's admission: records what it is asked, refuses if told to, revokes on demand.
#[derive(Default)]
struct Gate {
    seen: Mutex<Vec<Inbound>>,
    refuse: bool,
    revoke: watch::Sender<bool>,
}

impl Admission for Gate {
    async fn admit(&self, inbound: &Inbound) -> Result<(), Refusal> {
        self.seen.lock().expect("lock").push(inbound.clone());
        if self.refuse {
            Err(Refusal::forbidden("the test refuses"))
        } else {
            Ok(())
        }
    }

    async fn revoked(&self, _peer: &Peer) {
        let mut revoked = self.revoke.subscribe();
        let _ = revoked.wait_for(|r| *r).await;
    }
}

/// An echo server that counts the connections it accepted.
async fn echo() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let (mut r, mut w) = tcp.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    (addr, accepted)
}

/// A CA, an HBONE server presenting SERVER's certificate, an echo server behind it.
struct Fixture {
    root: Ca,
    store: TrustStore,
    node: SocketAddr,
    echo: SocketAddr,
    echoed: Arc<AtomicUsize>,
    gate: Arc<Gate>,
}

impl Fixture {
    async fn new(gate: Gate, settings: ServerSettings) -> Self {
        Self::presenting(gate, settings, SERVER).await
    }

    async fn presenting(gate: Gate, settings: ServerSettings, server_id: &str) -> Self {
        let root = Ca::root("a-root");
        let td = trust_domain("a.test").expect("trust domain");
        let bundle = TrustBundle::new(td, vec![root.der()]).expect("bundle");
        let store = TrustStore::new(BundleSet::new([bundle]).expect("set")).expect("store");
        let tls = store
            .server_config(root.leaf(server_id).resolver())
            .expect("server config");
        let gate = Arc::new(gate);
        let server = Arc::new(Server::new(Arc::new(tls), settings, gate.clone()));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let node = listener.local_addr().expect("addr");
        tokio::spawn(server.run(listener));
        let (echo, echoed) = echo().await;
        Self {
            root,
            store,
            node,
            echo,
            echoed,
            gate,
        }
    }

    fn key(&self) -> PoolKey {
        PoolKey {
            source: id(CLIENT),
            node: self.node,
            destination: id(SERVER),
        }
    }

    fn client_tls(&self, leaf: &Leaf) -> Arc<ClientConfig> {
        let expected = Expected::Workload(id(SERVER));
        Arc::new(
            self.store
                .client_config(expected, leaf.resolver())
                .expect("client config"),
        )
    }

    fn client_leaf(&self) -> Leaf {
        self.root.leaf(CLIENT)
    }

    fn seen(&self) -> Vec<Inbound> {
        self.gate.seen.lock().expect("lock").clone()
    }

    /// A raw h2 connection as CLIENT, for requests the pool would never send.
    async fn raw_h2(&self) -> h2::client::SendRequest<Bytes> {
        let tcp = TcpStream::connect(self.node).await.expect("connect");
        let mut tls = Arc::unwrap_or_clone(self.client_tls(&self.client_leaf()));
        tls.alpn_protocols = vec![b"h2".to_vec()];
        let name = ServerName::try_from("spiffe.invalid").expect("name");
        let tls = TlsConnector::from(Arc::new(tls))
            .connect(name, tcp)
            .await
            .expect("tls");
        let (send, connection) = h2::client::handshake(tls).await.expect("h2 handshake");
        tokio::spawn(connection);
        send
    }
}

async fn round_trip(tunnel: &mut weft::proxy::Tunnel, message: &[u8]) {
    tunnel.write_all(message).await.expect("write");
    let mut back = vec![0; message.len()];
    tokio::time::timeout(WAIT, tunnel.read_exact(&mut back))
        .await
        .expect("echo in time")
        .expect("read");
    assert_eq!(back, message);
}

/// Sends one request on a raw h2 connection and returns the status.
async fn status_of(send: &mut h2::client::SendRequest<Bytes>, req: Request<()>) -> StatusCode {
    let mut send = send.clone().ready().await.expect("ready");
    let (response, _stream) = send.send_request(req, false).expect("send");
    tokio::time::timeout(WAIT, response)
        .await
        .expect("response in time")
        .expect("response")
        .status()
}

#[tokio::test]
async fn bytes_flow_both_ways_and_the_admission_sees_the_proven_peer_and_source() {
    let f = Fixture::new(Gate::default(), ServerSettings::default()).await;
    let pool = Pool::new(ClientSettings::default());
    let mut tunnel = pool
        .connect(&f.key(), f.client_tls(&f.client_leaf()), f.echo, source())
        .await
        .expect("tunnel");
    round_trip(&mut tunnel, b"hello through hbone").await;
    // Bulk both ways at once: 4 MiB out while reading it back.
    let bulk: Vec<u8> = (0..4 << 20).map(|i| (i % 251) as u8).collect();
    let (mut r, mut w) = tokio::io::split(tunnel);
    let writing = {
        let bulk = bulk.clone();
        tokio::spawn(async move { w.write_all(&bulk).await.map(|()| w) })
    };
    let mut back = vec![0; bulk.len()];
    tokio::time::timeout(WAIT, r.read_exact(&mut back))
        .await
        .expect("bulk in time")
        .expect("read");
    assert!(back == bulk, "bulk bytes differ");
    writing.await.expect("task").expect("write");
    assert_eq!(
        f.seen(),
        vec![Inbound {
            peer: id(CLIENT),
            source: source(),
            destination: f.echo,
            arrived_at: f.node,
        }]
    );
    assert_eq!(f.echoed.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_refused_tunnel_gets_403_and_nothing_is_dialled() {
    let gate = Gate {
        refuse: true,
        ..Gate::default()
    };
    let f = Fixture::new(gate, ServerSettings::default()).await;
    let pool = Pool::new(ClientSettings::default());
    let err = pool
        .connect(&f.key(), f.client_tls(&f.client_leaf()), f.echo, source())
        .await
        .err()
        .expect("refused");
    assert!(
        matches!(err, ClientError::Refused { status: StatusCode::FORBIDDEN, target, .. } if target == f.echo),
        "{err}"
    );
    assert_eq!(f.seen().len(), 1);
    assert_eq!(f.echoed.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn malformed_requests_get_4xx_before_admission_and_without_a_dial() {
    let f = Fixture::new(Gate::default(), ServerSettings::default()).await;
    let mut h2 = f.raw_h2().await;
    let port = f.echo.port();
    let connect = |authority: String, forwarded: Option<&str>| {
        let mut req = Request::builder().method(Method::CONNECT).uri(authority);
        if let Some(value) = forwarded {
            req = req.header("forwarded", value);
        }
        req.body(()).expect("request")
    };
    let cases = [
        (
            "hostname",
            connect(format!("localhost:{port}"), Some("for=10.0.0.7")),
            400,
        ),
        (
            "short IPv4",
            connect(format!("127.1:{port}"), Some("for=10.0.0.7")),
            400,
        ),
        (
            "hex IPv4",
            connect(format!("0x7f000001:{port}"), Some("for=10.0.0.7")),
            400,
        ),
        (
            "leading zero",
            connect(format!("127.0.0.01:{port}"), Some("for=10.0.0.7")),
            400,
        ),
        (
            "mapped IPv6",
            connect(format!("[::ffff:127.0.0.1]:{port}"), Some("for=10.0.0.7")),
            400,
        ),
        (
            "userinfo",
            connect(format!("u@127.0.0.1:{port}"), Some("for=10.0.0.7")),
            400,
        ),
        ("no forwarded", connect(f.echo.to_string(), None), 400),
        (
            "garbled forwarded",
            connect(f.echo.to_string(), Some("for=10.1")),
            400,
        ),
        (
            "forwarded with a port",
            connect(f.echo.to_string(), Some("for=\"10.0.0.7:9\"")),
            400,
        ),
        (
            "GET",
            Request::builder()
                .method(Method::GET)
                .uri(format!("https://{}/", f.echo))
                .body(())
                .expect("request"),
            405,
        ),
        (
            "POST",
            Request::builder()
                .method(Method::POST)
                .uri(format!("https://{}/", f.echo))
                .body(())
                .expect("request"),
            405,
        ),
    ];
    for (case, req, want) in cases {
        assert_eq!(status_of(&mut h2, req).await.as_u16(), want, "{case}");
    }
    // A header list over the 64 KiB limit is answered by h2 itself (the limit reached it).
    let big = connect(f.echo.to_string(), Some("for=10.0.0.7"));
    let (mut parts, ()) = big.into_parts();
    parts
        .headers
        .insert("cookie", "a".repeat(100 * 1024).parse().expect("value"));
    let big = Request::from_parts(parts, ());
    let mut ready = h2.clone().ready().await.expect("ready");
    let answered = match ready.send_request(big, false) {
        Ok((response, _stream)) => tokio::time::timeout(WAIT, response).await.expect("in time"),
        Err(e) => Err(e),
    };
    let status = answered.map(|r| r.status());
    assert_eq!(
        status.ok(),
        Some(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE)
    );
    // Extended CONNECT (RFC 8441): allowed by SETTINGS, so that it is answered, not reset.
    let mut req = connect(f.echo.to_string(), Some("for=10.0.0.7"));
    *req.uri_mut() = format!("https://{}/", f.echo).parse().expect("uri");
    req.extensions_mut()
        .insert(h2::ext::Protocol::from_static("websocket"));
    assert_eq!(
        status_of(&mut h2, req).await,
        StatusCode::BAD_REQUEST,
        "extended CONNECT"
    );
    assert!(f.seen().is_empty(), "admission asked: {:?}", f.seen());
    assert_eq!(f.echoed.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_silent_client_is_closed_after_the_handshake_timeout() {
    let settings = ServerSettings {
        handshake_timeout: Duration::from_millis(300),
        ..ServerSettings::default()
    };
    let f = Fixture::new(Gate::default(), settings).await;
    // Plain TCP, nothing sent.
    let started = Instant::now();
    let mut tcp = TcpStream::connect(f.node).await.expect("connect");
    let mut buf = [0; 64];
    let read = tokio::time::timeout(WAIT, tcp.read(&mut buf)).await;
    assert!(matches!(read, Ok(Ok(0) | Err(_))), "not closed: {read:?}");
    let closed_after = started.elapsed();
    assert!(
        closed_after >= Duration::from_millis(250),
        "{closed_after:?}"
    );
    // TLS done, no HTTP/2 preface.
    let tcp = TcpStream::connect(f.node).await.expect("connect");
    let name = ServerName::try_from("spiffe.invalid").expect("name");
    let mut tls = TlsConnector::from(f.client_tls(&f.client_leaf()))
        .connect(name, tcp)
        .await
        .expect("tls");
    let read = tokio::time::timeout(WAIT, tls.read(&mut buf)).await;
    assert!(matches!(read, Ok(Ok(0) | Err(_))), "not closed: {read:?}");
}

#[tokio::test]
async fn tunnels_share_a_connection_up_to_the_stream_limit() {
    let f = Fixture::new(Gate::default(), ServerSettings::default()).await;
    let pool = Pool::new(ClientSettings {
        max_streams_per_connection: 4,
        ..ClientSettings::default()
    });
    let key = f.key();
    let tls = f.client_tls(&f.client_leaf());
    let mut tunnels = Vec::new();
    for i in 0..4u8 {
        let mut t = pool
            .connect(&key, tls.clone(), f.echo, source())
            .await
            .expect("tunnel");
        round_trip(&mut t, &[i; 100]).await;
        tunnels.push(t);
    }
    assert_eq!(pool.connections(&key), 1);
    let mut fifth = pool
        .connect(&key, tls.clone(), f.echo, source())
        .await
        .expect("tunnel");
    round_trip(&mut fifth, b"fifth").await;
    assert_eq!(pool.connections(&key), 2, "a new connection past the limit");
    // Once tunnels close, their places are reused: many more, no new connection.
    tunnels.clear();
    for _ in 0..20 {
        let mut t = pool
            .connect(&key, tls.clone(), f.echo, source())
            .await
            .expect("tunnel");
        round_trip(&mut t, b"again").await;
    }
    assert_eq!(pool.connections(&key), 2);
    assert_eq!(f.echoed.load(Ordering::SeqCst), 25);
}

#[tokio::test]
async fn an_idle_connection_is_closed() {
    let f = Fixture::new(Gate::default(), ServerSettings::default()).await;
    let pool = Pool::new(ClientSettings {
        idle_timeout: Duration::from_millis(200),
        ..ClientSettings::default()
    });
    let key = f.key();
    let mut t = pool
        .connect(&key, f.client_tls(&f.client_leaf()), f.echo, source())
        .await
        .expect("tunnel");
    round_trip(&mut t, b"x").await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(pool.connections(&key), 1, "not idle while a tunnel is open");
    drop(t);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(pool.connections(&key), 0);
}

#[tokio::test]
async fn an_untrusted_client_certificate_fails_the_handshake() {
    let f = Fixture::new(Gate::default(), ServerSettings::default()).await;
    let pool = Pool::new(ClientSettings::default());
    let rogue = Ca::root("rogue").leaf(CLIENT);
    let result = pool
        .connect(&f.key(), f.client_tls(&rogue), f.echo, source())
        .await;
    // TLS 1.3: the client may finish before the server refuses; then HTTP/2 fails.
    assert!(
        matches!(
            result,
            Err(ClientError::Tls { .. } | ClientError::Http { .. })
        ),
        "{:?}",
        result.err()
    );
    assert!(f.seen().is_empty());
    assert_eq!(f.echoed.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_server_that_is_not_the_destination_fails_on_the_client() {
    let impostor = "spiffe://a.test/ns/demo/sa/impostor";
    let f = Fixture::presenting(Gate::default(), ServerSettings::default(), impostor).await;
    let pool = Pool::new(ClientSettings::default());
    let err = pool
        .connect(&f.key(), f.client_tls(&f.client_leaf()), f.echo, source())
        .await
        .err()
        .expect("refused");
    let text = err.to_string();
    assert!(matches!(err, ClientError::Tls { .. }), "{text}");
    assert!(text.contains(SERVER), "names the expected identity: {text}");
    assert!(f.seen().is_empty());
}

#[tokio::test]
async fn revoking_the_peer_closes_its_open_tunnels() {
    let f = Fixture::new(Gate::default(), ServerSettings::default()).await;
    let pool = Pool::new(ClientSettings::default());
    let mut tunnel = pool
        .connect(&f.key(), f.client_tls(&f.client_leaf()), f.echo, source())
        .await
        .expect("tunnel");
    round_trip(&mut tunnel, b"before").await;
    f.gate.revoke.send_replace(true);
    let mut buf = [0; 16];
    let read = tokio::time::timeout(Duration::from_secs(1), tunnel.read(&mut buf)).await;
    assert!(matches!(read, Ok(Ok(0) | Err(_))), "still open: {read:?}");
}

#[tokio::test]
async fn a_rapid_reset_burst_ends_its_connection_while_other_tunnels_work() {
    let f = Fixture::new(Gate::default(), ServerSettings::default()).await;
    let pool = Pool::new(ClientSettings::default());
    let mut good = pool
        .connect(&f.key(), f.client_tls(&f.client_leaf()), f.echo, source())
        .await
        .expect("tunnel");
    round_trip(&mut good, b"before").await;

    let flood = f.raw_h2().await;
    let mut ended = None;
    for _ in 0..2000 {
        let req = Request::builder()
            .method(Method::CONNECT)
            .uri(f.echo.to_string())
            .header("forwarded", "for=10.0.0.7")
            .body(())
            .expect("request");
        let sent = match flood.clone().ready().await {
            Ok(mut ready) => ready.send_request(req, false),
            Err(e) => Err(e),
        };
        match sent {
            Ok((_, mut stream)) => stream.send_reset(h2::Reason::CANCEL),
            Err(e) => {
                ended = Some(e);
                break;
            }
        }
        tokio::task::yield_now().await;
    }
    let ended = ended.expect("the flood's connection was not ended");
    // The server sends GOAWAY ENHANCE_YOUR_CALM and closes; the client sees one or the other
    // depending on whether it was writing.
    assert!(
        ended.reason() == Some(h2::Reason::ENHANCE_YOUR_CALM) || ended.is_io(),
        "{ended:?}"
    );
    round_trip(&mut good, b"after").await;
    let mut fresh = pool
        .connect(&f.key(), f.client_tls(&f.client_leaf()), f.echo, source())
        .await
        .expect("tunnel");
    round_trip(&mut fresh, b"fresh").await;
}
