//! Floods and storms against the real HBONE server on loopback, each checked for the server's
//! own answer and for an unrelated tunnel on another connection that keeps working: a
//! connection storm from one source (THREATS 18, 44), protocol-error resets (20),
//! CONTINUATION floods and oversized or HPACK-amplified header lists (21), SETTINGS, PING and
//! empty DATA floods beside busy legit multiplexing (22), and bytes sent before the 200 (23).

mod hbone_fixture;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::StatusCode;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use weft::proxy::{ClientSettings, Pool, ServerSettings, Tunnel};

use hbone_fixture::{
    ACK, CONTINUATION, DATA, END_HEADERS, Ended, Fixture, Frame, GOAWAY, Gate, H2Tunnel,
    HEADER_TABLE_SIZE, HEADERS, INITIAL_WINDOW_SIZE, LOCAL, PING, RST_STREAM, RawH2, SETTINGS,
    WAIT, connect_block, connect_request, frame, header_block, indexed, literal, literal_indexed,
    round_trip, settings_frame, source, status_of,
};

/// Another source address on the loopback network: another node.
const OTHER: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
/// The slowest round trip allowed on a healthy tunnel while another connection floods: far
/// above loopback, yet far below a starved server (2 shared cores, a debug build).
const RESPONSIVE: Duration = Duration::from_secs(1);

/// A healthy tunnel from the same client node, on its own pooled connection.
async fn good_tunnel(f: &Fixture) -> (Pool, Tunnel) {
    let pool = Pool::new(ClientSettings::default());
    let mut tunnel = f.tunnel(&pool).await;
    round_trip(&mut tunnel, b"before").await;
    (pool, tunnel)
}

/// `good` still carries bytes, and a fresh tunnel opens.
async fn still_serving(f: &Fixture, pool: &Pool, good: &mut Tunnel) {
    round_trip(good, b"after").await;
    let mut fresh = f.tunnel(pool).await;
    round_trip(&mut fresh, b"fresh").await;
}

/// The admission was asked for the good tunnel only, and only it was dialled.
fn assert_only_the_good_tunnel_went_through(f: &Fixture) {
    assert_eq!(f.seen().len(), 1, "admission asked: {:?}", f.seen());
    assert_eq!(f.echoed.load(Ordering::SeqCst), 1);
}

/// Whether a new connection from here to `node` is closed (or reset) before any byte.
async fn refused(node: SocketAddr) -> bool {
    // The reset may come before the connect even returns.
    let Ok(mut tcp) = TcpStream::connect(node).await else {
        return true;
    };
    let read = tokio::time::timeout(WAIT, tcp.read(&mut [0; 16])).await;
    matches!(read, Ok(Ok(0) | Err(_)))
}

fn is_calm_goaway(ended: &Ended) -> bool {
    matches!(ended, Ended::GoAway(reason, _) if *reason == h2::Reason::ENHANCE_YOUR_CALM)
}

#[tokio::test]
async fn a_source_over_its_connection_cap_is_refused_at_once_while_others_are_served() {
    let settings = ServerSettings {
        max_connections_per_source: 3,
        ..ServerSettings::default()
    };
    let f = Fixture::new(Gate::default(), settings).await;
    // Three silent connections take the source's places while still in the handshake.
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(TcpStream::connect(f.node).await.expect("connect"));
    }
    // A storm past the cap: each connection is closed at once, long before the handshake
    // timeout (10 s) could have closed it.
    for _ in 0..20 {
        let started = Instant::now();
        assert!(refused(f.node).await, "not refused");
        let refused_after = started.elapsed();
        assert!(refused_after < Duration::from_secs(2), "{refused_after:?}");
    }
    // The held ones are untouched.
    let read = tokio::time::timeout(Duration::from_millis(200), held[0].read(&mut [0; 16])).await;
    assert!(read.is_err(), "a held connection was closed: {read:?}");
    // Another node is served meanwhile.
    let other = f.raw_h2_from(OTHER).await;
    let mut tunnel = H2Tunnel::open(&other, f.echo).await;
    tunnel.round_trip(b"from another node").await;
    // Once one place is given back (the server notices the close in its own time), the source
    // connects again: to the cap, not past it.
    drop(held.pop());
    let deadline = Instant::now() + WAIT;
    let pool = Pool::new(ClientSettings::default());
    let mut tunnel = loop {
        let tls = f.client_tls(&f.client_leaf());
        match pool.connect(&f.key(), tls, f.echo, source()).await {
            Ok(tunnel) => break tunnel,
            Err(e) => assert!(Instant::now() < deadline, "no place given back: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    round_trip(&mut tunnel, b"again").await;
    assert!(refused(f.node).await, "past the cap again, yet not refused");
}

#[tokio::test]
async fn protocol_error_resets_past_the_configured_limit_end_the_connection() {
    let settings = ServerSettings {
        max_local_error_reset_streams: 5,
        ..ServerSettings::default()
    };
    let f = Fixture::new(Gate::default(), settings).await;
    let (pool, mut good) = good_tunnel(&f).await;
    // The flooder's window is closed: the server may send it nothing but control frames.
    let mut raw = f.raw_frames(LOCAL, &[(INITIAL_WINDOW_SIZE, 0)]).await;
    // A CONNECT with a :path is malformed (RFC 9113 §8.5): h2 resets the stream itself.
    let target = f.echo.to_string();
    let malformed = |stream| {
        let block = header_block(&[
            (":method", "CONNECT"),
            (":authority", &target),
            (":path", "/"),
            ("forwarded", "for=10.0.0.7"),
        ]);
        frame(HEADERS, END_HEADERS, stream, &block)
    };
    let mut streams = (1..).step_by(2);
    // Up to the limit, each gets its RST_STREAM and the connection lives on.
    let burst: Vec<u8> = streams.by_ref().take(5).flat_map(&malformed).collect();
    raw.send(&burst).await.expect("send");
    let frames = raw.ping(*b"up-to-5!").await.expect("alive at the limit");
    let resets: Vec<_> = frames.iter().filter(|f| f.kind == RST_STREAM).collect();
    assert_eq!(resets.len(), 5, "{frames:?}");
    assert!(
        resets
            .iter()
            .all(|f| f.reason() == Some(h2::Reason::PROTOCOL_ERROR))
    );
    // Past it, a flood the client does not read: the server queues no more resets and ends
    // the connection (under weft's default, 256, 251 more resets would have come first).
    let flood: Vec<u8> = streams.take(1000).flat_map(&malformed).collect();
    let _ = raw.send(&flood).await;
    let (ended, frames) = raw.frames.end().await;
    assert!(is_calm_goaway(&ended), "{ended:?}");
    assert!(
        frames.iter().all(|f| f.kind != RST_STREAM),
        "more resets past the limit: {frames:?}"
    );
    assert_only_the_good_tunnel_went_through(&f);
    still_serving(&f, &pool, &mut good).await;
}

#[tokio::test]
async fn a_header_list_over_the_configured_size_gets_431_before_admission() {
    let settings = ServerSettings {
        max_header_list_size: 4096,
        ..ServerSettings::default()
    };
    let f = Fixture::new(Gate::default(), settings).await;
    let mut h2 = f.raw_h2().await;
    let with_cookie = |size| {
        let mut req = connect_request(f.echo);
        let cookie = "a".repeat(size).parse().expect("value");
        req.headers_mut().insert("cookie", cookie);
        req
    };
    // Under the configured 4 KiB: admitted.
    assert_eq!(
        status_of(&mut h2, with_cookie(3 * 1024)).await,
        StatusCode::OK
    );
    // Over it, and far under the 64 KiB default: refused by h2 itself.
    assert_eq!(
        status_of(&mut h2, with_cookie(5 * 1024)).await,
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
    );
    assert_eq!(f.seen().len(), 1, "admission asked past the limit");
    assert_eq!(f.echoed.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn an_hpack_amplified_header_list_ends_the_connection_before_admission() {
    let settings = ServerSettings {
        max_header_list_size: 4096,
        ..ServerSettings::default()
    };
    let f = Fixture::new(Gate::default(), settings).await;
    let (pool, mut good) = good_tunnel(&f).await;
    let mut raw = f.raw_frames(LOCAL, &[]).await;
    // ~3 KiB of cookie into the dynamic table, then 13 one-byte references to it: ~40 KiB
    // decoded from ~3 KiB sent. h2 stops decoding at 4 times the list size (so a 1 MB list ends
    // just the same); this one is past 4 times the configured size but not 4 times hyper's
    // default (16 KiB), which would have got a 431 instead: the limit reached h2.
    let mut block = connect_block(f.echo);
    literal_indexed(&mut block, "cookie", &"a".repeat(3000));
    for _ in 0..13 {
        indexed(&mut block, 62);
    }
    assert!(block.len() < 4 * 1024);
    let _ = raw.send(&frame(HEADERS, END_HEADERS, 1, &block)).await;
    let (ended, _) = raw.frames.end().await;
    assert!(is_calm_goaway(&ended), "{ended:?}");
    assert_only_the_good_tunnel_went_through(&f);
    still_serving(&f, &pool, &mut good).await;
}

#[tokio::test]
async fn a_continuation_flood_ends_the_connection_while_the_flooder_still_writes() {
    let settings = ServerSettings {
        max_header_list_size: 4096,
        ..ServerSettings::default()
    };
    let f = Fixture::new(Gate::default(), settings).await;
    let (pool, mut good) = good_tunnel(&f).await;
    let RawH2 {
        mut frames,
        mut writer,
    } = f.raw_frames(LOCAL, &[]).await;
    // HEADERS without END_HEADERS, then CONTINUATION frames that never end the block, each a
    // small complete field: the decoded list stays small, only the frames are endless. h2
    // allows a block max(list size / frame size × 1.25, 5) of them: 5 here.
    const LIMIT: usize = 32 << 20;
    let headers = frame(HEADERS, 0, 1, &connect_block(f.echo));
    let flooding = tokio::spawn(async move {
        let mut unit = Vec::new();
        for _ in 0..1000 {
            let mut field = Vec::new();
            literal(&mut field, "x", "y");
            unit.extend(frame(CONTINUATION, 0, 1, &field));
        }
        let mut sent = 0;
        writer.write_all(&headers).await?;
        while sent < LIMIT {
            writer.write_all(&unit).await?;
            sent += unit.len();
        }
        Ok::<_, std::io::Error>(sent)
    });
    let (ended, _) = frames.end().await;
    assert!(is_calm_goaway(&ended), "{ended:?}");
    // The server stopped reading and hung up: the flood could not all be written.
    let written = tokio::time::timeout(WAIT, flooding)
        .await
        .expect("the flood ends in time")
        .expect("task");
    assert!(written.is_err(), "{LIMIT} bytes of CONTINUATION accepted");
    assert_only_the_good_tunnel_went_through(&f);
    still_serving(&f, &pool, &mut good).await;
}

#[tokio::test]
async fn empty_data_frames_end_the_connection() {
    let f = Fixture::new(Gate::default(), ServerSettings::default()).await;
    let (pool, mut good) = good_tunnel(&f).await;
    let mut raw = f.raw_frames(LOCAL, &[]).await;
    // A well-formed tunnel, then empty DATA frames on it: each costs the server a frame's work
    // and carries nothing.
    let mut flood = frame(HEADERS, END_HEADERS, 1, &connect_block(f.echo));
    for _ in 0..10_000 {
        flood.extend(frame(DATA, 0, 1, &[]));
    }
    let _ = raw.send(&flood).await;
    let (ended, _) = raw.frames.end().await;
    assert!(is_calm_goaway(&ended), "{ended:?}");
    still_serving(&f, &pool, &mut good).await;
}

/// What [`flood_while_probing`] saw.
#[derive(Debug)]
struct Flood {
    /// Units written.
    sent: usize,
    /// Answers of the server on the flooded connection.
    answers: usize,
    /// Round trips on the good tunnel meanwhile.
    probes: usize,
    slowest: Duration,
}

impl Flood {
    fn assert_others_stayed_responsive(&self) {
        assert!(self.probes > 0 && self.slowest < RESPONSIVE, "{self:?}");
    }
}

/// Writes `unit` over and over on `raw` for `span` while probing `good` with round trips,
/// then a PING marking the end; meanwhile counts the frames the server answers with that
/// `is_answer` accepts, up to the marker's answer.
async fn flood_while_probing(
    raw: &mut RawH2,
    unit: &[u8],
    is_answer: impl Fn(&Frame) -> bool,
    span: Duration,
    good: &mut Tunnel,
) -> Flood {
    const MARKER: [u8; 8] = *b"the-end!";
    let deadline = Instant::now() + span;
    let RawH2 { frames, writer } = raw;
    let flood = async {
        let mut sent = 0;
        while Instant::now() < deadline {
            writer.write_all(unit).await.expect("flood");
            sent += 1;
            // Lets the probes and the server run between writes on this one thread.
            tokio::task::yield_now().await;
        }
        writer
            .write_all(&frame(PING, 0, 0, &MARKER))
            .await
            .expect("marker");
        sent
    };
    let answers = async {
        let mut answers = 0;
        loop {
            let frame = frames.next().await.expect("the flooded connection open");
            assert_ne!(frame.kind, GOAWAY, "{frame:?}");
            if frame.kind == PING && frame.flags & ACK != 0 && frame.payload == MARKER {
                return answers;
            }
            answers += usize::from(is_answer(&frame));
        }
    };
    let probes = async {
        let (mut count, mut slowest) = (0, Duration::ZERO);
        while Instant::now() < deadline {
            let started = Instant::now();
            round_trip(good, b"probe").await;
            slowest = slowest.max(started.elapsed());
            count += 1;
        }
        (count, slowest)
    };
    let (sent, answers, (probes, slowest)) = tokio::join!(flood, answers, probes);
    Flood {
        sent,
        answers,
        probes,
        slowest,
    }
}

/// 100 PINGs.
fn pings() -> Vec<u8> {
    (0..100u64)
        .flat_map(|i| frame(PING, 0, 0, &i.to_be_bytes()))
        .collect()
}

/// 100 SETTINGS, each changing something: the server has work to apply, not only an ACK.
fn settings() -> Vec<u8> {
    let mut unit = Vec::new();
    for _ in 0..50 {
        unit.extend(settings_frame(&[
            (INITIAL_WINDOW_SIZE, 1 << 20),
            (HEADER_TABLE_SIZE, 0),
        ]));
        unit.extend(settings_frame(&[
            (INITIAL_WINDOW_SIZE, 65_535),
            (HEADER_TABLE_SIZE, 4096),
        ]));
    }
    unit
}

#[tokio::test]
async fn a_ping_flood_is_answered_one_for_one_while_other_tunnels_stay_responsive() {
    let f = Fixture::new(Gate::default(), ServerSettings::default()).await;
    let (pool, mut good) = good_tunnel(&f).await;
    let mut raw = f.raw_frames(LOCAL, &[]).await;
    let unit = pings();
    let is_pong = |f: &Frame| f.kind == PING && f.flags & ACK != 0;
    let flood = flood_while_probing(
        &mut raw,
        &unit,
        is_pong,
        Duration::from_millis(500),
        &mut good,
    )
    .await;
    assert_eq!(flood.answers, flood.sent * 100, "one answer per PING");
    flood.assert_others_stayed_responsive();
    still_serving(&f, &pool, &mut good).await;
}

#[tokio::test]
async fn a_settings_flood_is_answered_one_for_one_while_other_tunnels_stay_responsive() {
    let f = Fixture::new(Gate::default(), ServerSettings::default()).await;
    let (pool, mut good) = good_tunnel(&f).await;
    let mut raw = f.raw_frames(LOCAL, &[]).await;
    let unit = settings();
    let is_ack = |f: &Frame| f.kind == SETTINGS && f.flags & ACK != 0;
    let flood = flood_while_probing(
        &mut raw,
        &unit,
        is_ack,
        Duration::from_millis(500),
        &mut good,
    )
    .await;
    assert_eq!(flood.answers, flood.sent * 100, "one ACK per SETTINGS");
    flood.assert_others_stayed_responsive();
    still_serving(&f, &pool, &mut good).await;
}

/// Floods `unit` on a connection whose client never reads the answers: the server must stop reading once it cannot write them, so that only the kernel's
/// buffers fill (or hang up), never a queue in its memory; other tunnels stay served.
async fn an_unread_flood_stalls(unit: &[u8]) {
    // Far more than the socket buffers of both ends can hold (tcp_rmem may reach 32 MiB).
    const CAP: usize = 128 << 20;
    let f = Fixture::new(Gate::default(), ServerSettings::default()).await;
    let (pool, mut good) = good_tunnel(&f).await;
    let socket = hbone_fixture::socket_from(LOCAL).expect("socket");
    // A small receive buffer, so that the answers fill it and the server's send buffer soon.
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    let mut raw = f.raw_frames_on(socket, &[]).await;
    let mut written = 0;
    while written < CAP {
        // A write that makes no progress for this long: the server stopped reading.
        let stall = Duration::from_millis(500);
        match tokio::time::timeout(stall, raw.writer.write_all(unit)).await {
            Ok(Ok(())) => written += unit.len(),
            Err(_) | Ok(Err(_)) => break,
        }
    }
    assert!(written < CAP, "{written} bytes read, no answer read back");
    round_trip(&mut good, b"during").await;
    still_serving(&f, &pool, &mut good).await;
}

#[tokio::test]
async fn an_unread_ping_flood_stalls_instead_of_queueing_answers() {
    an_unread_flood_stalls(&pings()).await;
}

#[tokio::test]
async fn an_unread_settings_flood_stalls_instead_of_queueing_acks() {
    an_unread_flood_stalls(&settings()).await;
}

#[tokio::test]
async fn a_hundred_busy_tunnels_on_one_connection_all_get_their_bytes_back() {
    let f = Fixture::new(Gate::default(), ServerSettings::default()).await;
    let pool = Pool::new(ClientSettings::default());
    let mut tunnels = Vec::new();
    for _ in 0..100 {
        tunnels.push(f.tunnel(&pool).await);
    }
    assert_eq!(pool.connections(&f.key()), 1);
    let busy = tunnels
        .into_iter()
        .enumerate()
        .map(|(i, mut tunnel)| async move {
            // Interactive first (one-byte DATA frames, the kind a small-frame guard counts), then
            // bulk.
            for j in 0..20 {
                round_trip(&mut tunnel, &[(i + j) as u8]).await;
            }
            let bulk: Vec<u8> = (0..64 * 1024).map(|k| (k + i) as u8).collect();
            round_trip(&mut tunnel, &bulk).await;
        });
    tokio::time::timeout(2 * WAIT, futures::future::join_all(busy))
        .await
        .expect("all tunnels done in time");
    assert_eq!(f.echoed.load(Ordering::SeqCst), 100);
    assert_eq!(pool.connections(&f.key()), 1);
}

/// What the destination saw, and when.
#[derive(Debug)]
enum Arrival {
    Connected(Instant),
    Bytes(Instant, Vec<u8>),
}

/// A destination that reports every connection and every read.
async fn recorder() -> (SocketAddr, mpsc::UnboundedReceiver<Arrival>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let _ = tx.send(Arrival::Connected(Instant::now()));
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = [0; 1024];
                while let Ok(n @ 1..) = tcp.read(&mut buf).await {
                    let _ = tx.send(Arrival::Bytes(Instant::now(), buf[..n].to_vec()));
                }
            });
        }
    });
    (addr, rx)
}

const EARLY: &[u8] = b"sent with the CONNECT, before any answer";

/// Sends a CONNECT to `target` and, at once, bytes on its stream: the response to come, and
/// the stream (to keep open).
fn connect_with_early_bytes(
    h2: &mut h2::client::SendRequest<Bytes>,
    target: SocketAddr,
) -> (h2::client::ResponseFuture, h2::SendStream<Bytes>) {
    let (response, mut stream) = h2
        .send_request(connect_request(target), false)
        .expect("send");
    stream
        .send_data(Bytes::from_static(EARLY), false)
        .expect("early bytes");
    (response, stream)
}

#[tokio::test]
async fn bytes_sent_before_the_200_reach_nothing_when_the_tunnel_is_refused() {
    let gate = Gate {
        refuse: true,
        ..Gate::default()
    };
    let f = Fixture::new(gate, ServerSettings::default()).await;
    let (destination, mut arrivals) = recorder().await;
    let mut h2 = f.raw_h2().await.ready().await.expect("ready");
    let (response, _stream) = connect_with_early_bytes(&mut h2, destination);
    let response = tokio::time::timeout(WAIT, response)
        .await
        .expect("in time")
        .expect("response");
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    // Nothing was dialled, and nothing trickles through later either.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        arrivals.try_recv().is_err(),
        "the destination saw something"
    );
    assert_eq!(f.seen().len(), 1);
}

#[tokio::test]
async fn bytes_sent_before_the_200_reach_the_destination_only_after_admission() {
    let (open, hold) = watch::channel(false);
    let gate = Gate {
        hold: Some(hold),
        ..Gate::default()
    };
    let f = Fixture::new(gate, ServerSettings::default()).await;
    let (destination, mut arrivals) = recorder().await;
    let mut h2 = f.raw_h2().await.ready().await.expect("ready");
    let (response, _stream) = connect_with_early_bytes(&mut h2, destination);
    // While the admission deliberates, the early bytes wait at the server.
    let deadline = Instant::now() + WAIT;
    while f.seen().is_empty() {
        assert!(Instant::now() < deadline, "admission never asked");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        arrivals.try_recv().is_err(),
        "the destination saw something"
    );
    open.send_replace(true);
    let response = tokio::time::timeout(WAIT, response)
        .await
        .expect("in time")
        .expect("response");
    assert_eq!(response.status(), StatusCode::OK);
    let admitted = f.gate.answered.lock().expect("lock")[0];
    let mut early = Vec::new();
    while early.len() < EARLY.len() {
        let arrival = tokio::time::timeout(WAIT, arrivals.recv())
            .await
            .expect("in time")
            .expect("recorder running");
        let (Arrival::Connected(at) | Arrival::Bytes(at, _)) = arrival;
        assert!(at > admitted, "{arrival:?} before the admission answered");
        if let Arrival::Bytes(_, bytes) = arrival {
            early.extend(bytes);
        }
    }
    assert_eq!(early, EARLY);
}
