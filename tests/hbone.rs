//! HBONE over loopback with real SPIFFE mTLS: bytes through client pool → server → an echo
//! server both ways, the admission seeing the proven identity and the forwarded source;
//! refusals and malformed requests answered without a dial (THREATS 14, 16, 23); the
//! handshake/preface timeout (THREATS 18); pooling and the stream limit; certificates refused
//! either way; revocation closing open tunnels; a rapid-reset burst (THREATS 19); keepalive
//! pings left unanswered closing the connection on either side; bytes written before the
//! server's answer.

mod hbone_fixture;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use http::{Method, Request, StatusCode};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use weft::proxy::{ClientError, ClientSettings, Inbound, Pool, PoolKey, ServerSettings};

use hbone_fixture::testpki::Ca;
use hbone_fixture::{
    ACK, CLIENT, Fixture, Gate, LOCAL, PING, SERVER, WAIT, connect_request, id, round_trip, source,
    status_of,
};

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
    let mut refused = Vec::new();
    for (case, req, want) in cases {
        assert_eq!(status_of(&mut h2, req).await.as_u16(), want, "{case}");
        refused.push(want);
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
    refused.push(400);
    assert!(f.seen().is_empty(), "admission asked: {:?}", f.seen());
    assert_eq!(f.echoed.load(Ordering::SeqCst), 0);
    // Each refusal of ours was told to the admission (the oversized header list is h2's own
    // answer), so that a node can count them.
    let told: Vec<u16> = f
        .gate
        .malformed
        .lock()
        .expect("lock")
        .iter()
        .map(|s| s.as_u16())
        .collect();
    assert_eq!(told, refused);
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

/// Keepalive of a second both ways: an unanswered ping shows within a few.
fn quick_keepalive() -> (Duration, Duration) {
    (Duration::from_millis(200), Duration::from_millis(300))
}

#[tokio::test]
async fn a_client_that_leaves_pings_unanswered_is_closed_by_the_server() {
    let (interval, timeout) = quick_keepalive();
    let f = Fixture::new(
        Gate::default(),
        ServerSettings {
            keepalive_interval: interval,
            keepalive_timeout: timeout,
            ..ServerSettings::default()
        },
    )
    .await;
    // A client that acknowledged the server's SETTINGS and then reads on without answering.
    let mut raw = f.raw_frames(LOCAL, &[]).await;
    let started = Instant::now();
    let (ended, frames) = raw.frames.end().await;
    assert!(
        frames.iter().any(|f| f.kind == PING && f.flags & ACK == 0),
        "the server pinged: {ended:?}"
    );
    assert!(
        started.elapsed() < interval + timeout + Duration::from_secs(2),
        "closed after {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_server_that_leaves_pings_unanswered_loses_its_pooled_connection() {
    let (interval, timeout) = quick_keepalive();
    let f = Fixture::new(Gate::default(), ServerSettings::default()).await;
    // A server that completes TLS and the HTTP/2 handshake, then stops reading.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let mute = listener.local_addr().expect("addr");
    let tls = weft::proxy::hbone_server_config(
        f.store
            .server_config(f.root.leaf(SERVER).resolver())
            .expect("server config"),
    );
    let (handshaken, mut held) = tokio::sync::mpsc::channel(1);
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.expect("accept");
        let tls = tokio_rustls::TlsAcceptor::from(tls)
            .accept(tcp)
            .await
            .expect("tls");
        let connection = h2::server::handshake(tls).await.expect("h2 handshake");
        let _ = handshaken.send(connection).await;
    });
    let pool = Pool::new(ClientSettings {
        keepalive_interval: interval,
        keepalive_timeout: timeout,
        ..ClientSettings::default()
    });
    let key = PoolKey {
        node: mute,
        ..f.key()
    };
    let mut tunnel = pool
        .request(&key, f.client_tls(&f.client_leaf()), f.echo, source())
        .await
        .expect("the request is sent without waiting for an answer");
    let _never_polled = held.recv().await.expect("the mute server's connection");
    assert_eq!(pool.connections(&key), 1);
    let answer = tokio::time::timeout(WAIT, tunnel.answered())
        .await
        .expect("the tunnel ends with its connection");
    assert!(answer.is_err(), "{answer:?}");
    let deadline = Instant::now() + WAIT;
    while pool.connections(&key) != 0 {
        assert!(
            Instant::now() < deadline,
            "the connection stayed in the pool"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn bytes_written_before_the_answer_arrive_once_admitted() {
    let f = Fixture::new(Gate::default(), ServerSettings::default()).await;
    let pool = Pool::new(ClientSettings::default());
    let mut tunnel = pool
        .request(&f.key(), f.client_tls(&f.client_leaf()), f.echo, source())
        .await
        .expect("request sent");
    tunnel
        .write_all(b"early")
        .await
        .expect("write before the answer");
    let mut back = [0; 5];
    tokio::time::timeout(WAIT, tunnel.read_exact(&mut back))
        .await
        .expect("echo in time")
        .expect("read after the answer");
    assert_eq!(&back, b"early");
    tunnel.answered().await.expect("answered 200");

    // Refused: the bytes written before go nowhere, and reading fails with the refusal.
    let f = Fixture::new(
        Gate {
            refuse: true,
            ..Gate::default()
        },
        ServerSettings::default(),
    )
    .await;
    // A tunnel through the refusing server, told its answer, with bytes written before it.
    let early = async || {
        let mut tunnel = pool
            .request(&f.key(), f.client_tls(&f.client_leaf()), f.echo, source())
            .await
            .expect("request sent");
        let answer = tunnel.on_answer();
        tunnel
            .write_all(b"early")
            .await
            .expect("write before the answer");
        (tunnel, answer)
    };
    let forbidden = |told: &Result<(), ClientError>| {
        matches!(
            told,
            Err(ClientError::Refused {
                status: StatusCode::FORBIDDEN,
                ..
            })
        )
    };
    let (mut tunnel, answer) = early().await;
    let read = tokio::time::timeout(WAIT, tunnel.read(&mut back))
        .await
        .expect("the refusal in time");
    assert!(read.is_err(), "{read:?}");
    let told = answer.await.expect("told");
    assert!(forbidden(&told), "{told:?}");
    assert_eq!(f.echoed.load(Ordering::SeqCst), 0, "nothing dialled");

    // The tunnel ends before any read saw the answer (the writer failed first, the refusal
    // having reset the stream): the answer is told all the same, not lost with the tunnel.
    let (mut tunnel, answer) = early().await;
    let failed = tokio::time::timeout(WAIT, async {
        loop {
            if tunnel.write_all(b"more").await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(failed.is_ok(), "the refusal ends the writes");
    drop(tunnel);
    let told = answer.await.expect("told, not dropped");
    assert!(forbidden(&told), "{told:?}");
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
        let sent = match flood.clone().ready().await {
            Ok(mut ready) => ready.send_request(connect_request(f.echo), false),
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
