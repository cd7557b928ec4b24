//! Shared by the HBONE tests (`tests/hbone.rs`, `tests/hbone_floods.rs`): a CA and the real
//! HBONE server on loopback, a test admission in front of an echo server, and three kinds of
//! client — the pool, the h2 crate (requests the pool would never send) and frames written by
//! hand (what h2 would never send: malformed or endless header blocks, floods of control frames).
// Each test file uses a part of it.
#![allow(dead_code)]

#[path = "../../src/identity/testpki.rs"]
pub mod testpki;

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use testpki::{Ca, Leaf};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _, ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use weft::identity::id::trust_domain;
use weft::identity::{BundleSet, Expected, TrustBundle, TrustStore, WorkloadId};
use weft::proxy::{
    Admission, Inbound, Peer, Pool, PoolKey, Refusal, Server, ServerSettings, Tunnel,
};

pub const CLIENT: &str = "spiffe://a.test/ns/demo/sa/client";
pub const SERVER: &str = "spiffe://a.test/ns/demo/sa/server";
pub const SOURCE: &str = "10.0.0.7";
pub const WAIT: Duration = Duration::from_secs(5);
/// Where the clients connect from unless a test says otherwise.
pub const LOCAL: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

pub fn id(s: &str) -> WorkloadId {
    WorkloadId::parse(s).expect("workload id")
}

pub fn source() -> IpAddr {
    SOURCE.parse().expect("ip")
}

/// The test's admission: records what it is asked and when it answered, refuses if told to,
/// waits while held, revokes on demand.
#[derive(Default)]
pub struct Gate {
    pub seen: Mutex<Vec<Inbound>>,
    /// The statuses of the CONNECTs refused before admission.
    pub malformed: Mutex<Vec<StatusCode>>,
    pub answered: Mutex<Vec<Instant>>,
    pub refuse: bool,
    /// When set, each admission waits until it reads true.
    pub hold: Option<watch::Receiver<bool>>,
    pub revoke: watch::Sender<bool>,
}

impl Admission for Gate {
    async fn admit(&self, inbound: &Inbound) -> Result<(), Refusal> {
        self.seen.lock().expect("lock").push(inbound.clone());
        if let Some(hold) = &self.hold {
            let _ = hold.clone().wait_for(|open| *open).await;
        }
        self.answered.lock().expect("lock").push(Instant::now());
        if self.refuse {
            Err(Refusal::forbidden("the test refuses"))
        } else {
            Ok(())
        }
    }

    fn malformed(&self, _peer: &Peer, refusal: &Refusal) {
        self.malformed.lock().expect("lock").push(refusal.status);
    }

    async fn revoked(&self, _peer: &Peer) {
        let mut revoked = self.revoke.subscribe();
        let _ = revoked.wait_for(|r| *r).await;
    }
}

/// An echo server that counts the connections it accepted.
pub async fn echo() -> (SocketAddr, Arc<AtomicUsize>) {
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
pub struct Fixture {
    pub root: Ca,
    pub store: TrustStore,
    pub node: SocketAddr,
    pub echo: SocketAddr,
    pub echoed: Arc<AtomicUsize>,
    pub gate: Arc<Gate>,
}

impl Fixture {
    pub async fn new(gate: Gate, settings: ServerSettings) -> Self {
        Self::presenting(gate, settings, SERVER).await
    }

    pub async fn presenting(gate: Gate, settings: ServerSettings, server_id: &str) -> Self {
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

    pub fn key(&self) -> PoolKey {
        PoolKey {
            source: id(CLIENT),
            node: self.node,
            destination: id(SERVER),
            generation: 0,
        }
    }

    pub fn client_tls(&self, leaf: &Leaf) -> Arc<ClientConfig> {
        let expected = Expected::Workload(id(SERVER));
        Arc::new(
            self.store
                .client_config(expected, leaf.resolver())
                .expect("client config"),
        )
    }

    pub fn client_leaf(&self) -> Leaf {
        self.root.leaf(CLIENT)
    }

    pub fn seen(&self) -> Vec<Inbound> {
        self.gate.seen.lock().expect("lock").clone()
    }

    /// A tunnel to the echo server through `pool`, as CLIENT.
    pub async fn tunnel(&self, pool: &Pool) -> Tunnel {
        pool.connect(
            &self.key(),
            self.client_tls(&self.client_leaf()),
            self.echo,
            source(),
        )
        .await
        .expect("tunnel")
    }

    /// A TLS connection as CLIENT on `socket`, offering h2.
    pub async fn tls_on(&self, socket: TcpSocket) -> TlsStream<TcpStream> {
        let tcp = socket.connect(self.node).await.expect("connect");
        let mut tls = Arc::unwrap_or_clone(self.client_tls(&self.client_leaf()));
        tls.alpn_protocols = vec![b"h2".to_vec()];
        let name = ServerName::try_from("spiffe.invalid").expect("name");
        TlsConnector::from(Arc::new(tls))
            .connect(name, tcp)
            .await
            .expect("tls")
    }

    /// A raw h2 connection as CLIENT, for requests the pool would never send.
    pub async fn raw_h2(&self) -> h2::client::SendRequest<Bytes> {
        self.raw_h2_from(LOCAL).await
    }

    /// A raw h2 connection as CLIENT from `from` (any IPv4 address of the loopback network).
    pub async fn raw_h2_from(&self, from: IpAddr) -> h2::client::SendRequest<Bytes> {
        let tls = self.tls_on(socket_from(from).expect("socket")).await;
        let (send, connection) = h2::client::handshake(tls).await.expect("h2 handshake");
        tokio::spawn(connection);
        send
    }

    /// A connection as CLIENT from `from` that speaks HTTP/2 frame by frame: the preface and
    /// SETTINGS with `settings` sent, the server's SETTINGS acknowledged as a client must, and
    /// every frame the server had to answer so far read.
    pub async fn raw_frames(&self, from: IpAddr, settings: &[(u16, u32)]) -> RawH2 {
        self.raw_frames_on(socket_from(from).expect("socket"), settings)
            .await
    }

    /// [`Fixture::raw_frames`] on `socket`.
    pub async fn raw_frames_on(&self, socket: TcpSocket, settings: &[(u16, u32)]) -> RawH2 {
        let tls = self.tls_on(socket).await;
        let (reader, writer) = tokio::io::split(tls);
        let mut raw = RawH2 {
            frames: Frames { io: reader },
            writer,
        };
        let mut start = PREFACE.to_vec();
        start.extend(settings_frame(settings));
        raw.send(&start).await.expect("preface");
        raw.frames
            .until(|f| f.kind == SETTINGS && f.flags & ACK == 0)
            .await
            .expect("the server's SETTINGS");
        raw.send(&frame(SETTINGS, ACK, 0, &[]))
            .await
            .expect("SETTINGS ACK");
        // The server acknowledges SETTINGS before it reads on: past this PING's answer, the
        // ack of ours is read too.
        raw.ping(*b"started!").await.expect("ping answered");
        raw
    }
}

/// A socket bound to `from` (an IPv4 address), to connect with.
pub fn socket_from(from: IpAddr) -> io::Result<TcpSocket> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(from, 0))?;
    Ok(socket)
}

pub async fn round_trip(tunnel: &mut Tunnel, message: &[u8]) {
    tunnel.write_all(message).await.expect("write");
    let mut back = vec![0; message.len()];
    tokio::time::timeout(WAIT, tunnel.read_exact(&mut back))
        .await
        .expect("echo in time")
        .expect("read");
    assert_eq!(back, message);
}

/// A well-formed CONNECT to `target` from SOURCE, as the pool sends it.
pub fn connect_request(target: SocketAddr) -> Request<()> {
    Request::builder()
        .method(Method::CONNECT)
        .uri(target.to_string())
        .header("forwarded", format!("for={SOURCE}"))
        .body(())
        .expect("request")
}

/// Sends one request on a raw h2 connection and returns the status.
pub async fn status_of(send: &mut h2::client::SendRequest<Bytes>, req: Request<()>) -> StatusCode {
    let mut send = send.clone().ready().await.expect("ready");
    let (response, _stream) = send.send_request(req, false).expect("send");
    tokio::time::timeout(WAIT, response)
        .await
        .expect("response in time")
        .expect("response")
        .status()
}

/// A tunnel opened with the h2 crate.
pub struct H2Tunnel {
    pub send: h2::SendStream<Bytes>,
    pub recv: h2::RecvStream,
}

impl H2Tunnel {
    /// A tunnel to `target` on `send`'s connection, once the server answered 200.
    pub async fn open(send: &h2::client::SendRequest<Bytes>, target: SocketAddr) -> Self {
        let mut ready = send.clone().ready().await.expect("ready");
        let (response, send) = ready
            .send_request(connect_request(target), false)
            .expect("send");
        let response = tokio::time::timeout(WAIT, response)
            .await
            .expect("response in time")
            .expect("response");
        assert_eq!(response.status(), StatusCode::OK);
        Self {
            send,
            recv: response.into_body(),
        }
    }

    /// Sends `message` and reads it back (the far end echoes).
    pub async fn round_trip(&mut self, message: &[u8]) {
        self.send
            .send_data(Bytes::copy_from_slice(message), false)
            .expect("send data");
        let mut back = Vec::new();
        while back.len() < message.len() {
            let data = tokio::time::timeout(WAIT, self.recv.data())
                .await
                .expect("echo in time")
                .expect("stream open")
                .expect("data");
            self.recv
                .flow_control()
                .release_capacity(data.len())
                .expect("release");
            back.extend_from_slice(&data);
        }
        assert_eq!(back, message);
    }
}

/// The client connection preface (RFC 9113 §3.4).
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

// Frame types (RFC 9113 §6).
pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
pub const RST_STREAM: u8 = 0x3;
pub const SETTINGS: u8 = 0x4;
pub const PING: u8 = 0x6;
pub const GOAWAY: u8 = 0x7;
pub const CONTINUATION: u8 = 0x9;
// Flags.
pub const END_STREAM: u8 = 0x1;
pub const ACK: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;
// Settings.
pub const HEADER_TABLE_SIZE: u16 = 0x1;
pub const INITIAL_WINDOW_SIZE: u16 = 0x4;

/// One frame: the 9-byte header (24-bit length, type, flags, 31-bit stream) and `payload`.
pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let length = u32::try_from(payload.len()).expect("length");
    assert!(length < 1 << 24, "frame too long");
    let mut frame = length.to_be_bytes()[1..].to_vec();
    frame.extend([kind, flags]);
    frame.extend((stream & 0x7fff_ffff).to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

/// A SETTINGS frame with `settings` (identifier, value).
pub fn settings_frame(settings: &[(u16, u32)]) -> Vec<u8> {
    let payload: Vec<u8> = settings
        .iter()
        .flat_map(|(id, value)| id.to_be_bytes().into_iter().chain(value.to_be_bytes()))
        .collect();
    frame(SETTINGS, 0, 0, &payload)
}

/// An HPACK integer (RFC 7541 §5.1) with a `prefix`-bit prefix, in a first byte that starts
/// with `first`.
fn hpack_integer(block: &mut Vec<u8>, first: u8, prefix: u32, value: usize) {
    let max = (1 << prefix) - 1;
    if value < max {
        block.push(first | value as u8);
        return;
    }
    block.push(first | max as u8);
    let mut rest = value - max;
    while rest >= 0x80 {
        block.push(0x80 | (rest & 0x7f) as u8);
        rest >>= 7;
    }
    block.push(rest as u8);
}

/// An HPACK string literal, not Huffman-coded (RFC 7541 §5.2).
fn hpack_string(block: &mut Vec<u8>, s: &str) {
    hpack_integer(block, 0, 7, s.len());
    block.extend_from_slice(s.as_bytes());
}

/// A field as an HPACK literal with a new name, not indexed (RFC 7541 §6.2.2).
pub fn literal(block: &mut Vec<u8>, name: &str, value: &str) {
    block.push(0);
    hpack_string(block, name);
    hpack_string(block, value);
}

/// A field as an HPACK literal with a new name, added to the dynamic table (RFC 7541 §6.2.1):
/// the newest entry, index 62.
pub fn literal_indexed(block: &mut Vec<u8>, name: &str, value: &str) {
    block.push(0x40);
    hpack_string(block, name);
    hpack_string(block, value);
}

/// A field as an index into the HPACK tables (RFC 7541 §6.1): one byte for a whole field.
pub fn indexed(block: &mut Vec<u8>, index: usize) {
    hpack_integer(block, 0x80, 7, index);
}

/// A header block of `fields` as plain literals.
pub fn header_block(fields: &[(&str, &str)]) -> Vec<u8> {
    let mut block = Vec::new();
    for (name, value) in fields {
        literal(&mut block, name, value);
    }
    block
}

/// The header block of a well-formed CONNECT to `target` from SOURCE.
pub fn connect_block(target: SocketAddr) -> Vec<u8> {
    let target = target.to_string();
    let forwarded = format!("for={SOURCE}");
    header_block(&[
        (":method", "CONNECT"),
        (":authority", &target),
        ("forwarded", &forwarded),
    ])
}

/// A frame the server sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
    pub payload: Vec<u8>,
}

impl Frame {
    /// The error code of a RST_STREAM or GOAWAY.
    pub fn reason(&self) -> Option<h2::Reason> {
        let at = match self.kind {
            RST_STREAM => 0,
            GOAWAY => 4,
            _ => return None,
        };
        let code = self.payload.get(at..at + 4)?;
        Some(u32::from_be_bytes(code.try_into().ok()?).into())
    }
}

/// How the server ended a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    /// A GOAWAY with this error code and debug data.
    GoAway(h2::Reason, String),
    /// Closed or reset without one.
    Closed,
}

impl Ended {
    fn from_goaway(frame: &Frame) -> Self {
        let debug = frame.payload.get(8..).unwrap_or_default();
        let reason = frame.reason().unwrap_or(h2::Reason::PROTOCOL_ERROR);
        Ended::GoAway(reason, String::from_utf8_lossy(debug).into_owned())
    }
}

/// The frames the server sends on a [`RawH2`] connection.
pub struct Frames {
    io: ReadHalf<TlsStream<TcpStream>>,
}

impl Frames {
    /// The next frame, or `None` once the server closed the connection (or reset it).
    pub async fn next(&mut self) -> Option<Frame> {
        let read = async {
            let mut head = [0; 9];
            self.io.read_exact(&mut head).await?;
            let length = u32::from_be_bytes([0, head[0], head[1], head[2]]);
            let mut payload = vec![0; length as usize];
            self.io.read_exact(&mut payload).await?;
            let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
            Ok::<_, io::Error>(Frame {
                kind: head[3],
                flags: head[4],
                stream,
                payload,
            })
        };
        tokio::time::timeout(WAIT, read)
            .await
            .expect("a frame or the end in time")
            .ok()
    }

    /// The frames up to and including the first `done` accepts, or how the server ended the
    /// connection before.
    pub async fn until(&mut self, done: impl Fn(&Frame) -> bool) -> Result<Vec<Frame>, Ended> {
        let mut frames = Vec::new();
        loop {
            let frame = self.next().await.ok_or(Ended::Closed)?;
            if frame.kind == GOAWAY {
                return Err(Ended::from_goaway(&frame));
            }
            let stop = done(&frame);
            frames.push(frame);
            if stop {
                return Ok(frames);
            }
        }
    }

    /// Reads to the end: how the server ended the connection, and the frames before.
    pub async fn end(&mut self) -> (Ended, Vec<Frame>) {
        let mut frames = Vec::new();
        while let Some(frame) = self.next().await {
            if frame.kind == GOAWAY {
                return (Ended::from_goaway(&frame), frames);
            }
            frames.push(frame);
        }
        (Ended::Closed, frames)
    }
}

/// An HTTP/2 connection written frame by frame (see [`Fixture::raw_frames`]).
pub struct RawH2 {
    pub frames: Frames,
    pub writer: WriteHalf<TlsStream<TcpStream>>,
}

impl RawH2 {
    /// Writes `bytes` (frames) at once; the server may have hung up.
    pub async fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.writer.write_all(bytes).await?;
        self.writer.flush().await
    }

    /// Sends a PING and reads up to its answer: the frames read, or how the server ended the
    /// connection before answering.
    pub async fn ping(&mut self, payload: [u8; 8]) -> Result<Vec<Frame>, Ended> {
        if self.send(&frame(PING, 0, 0, &payload)).await.is_err() {
            return Err(self.frames.end().await.0);
        }
        self.frames
            .until(|f| f.kind == PING && f.flags & ACK != 0 && f.payload == payload)
            .await
    }
}
