//! The data-plane benchmark: a client pod behind cluster-1's node and a server pod behind
//! cluster-2's (the lab of `tests/dataplane_lab/`), measured through weft (captured at node A,
//! an HBONE mTLS tunnel to node B, delivered to the server) and then directly between the same
//! two pod namespaces with capture off (node agents stopped, `weft node --cleanup` in each node
//! namespace): bulk throughput with 1 and 8 streams, 1 KiB request/response latency on one kept
//! connection, new connections per second with a 1 KiB exchange each, and the idle RSS of a
//! node agent. Then the same figures through two plain TCP relays in the node namespaces: the
//! cost of the two extra hops alone, the ceiling of any pair of user-space proxies here. Needs root, `ip` and `nft`; `WEFT_BENCH_SECONDS` sets each timed run (3 s).
//!
//! The `weft` the control plane runs is this build's (`CARGO_BIN_EXE_weft`: `cargo bench`
//! builds it with the bench profile, i.e. release).

#[path = "../tests/dataplane_lab/mod.rs"]
mod dataplane_lab;

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use dataplane_lab::{ECHO_PORT, SINK_PORT};
use weft::demo::plane::{ControlPlane, PlaneOptions};
use weft::lab::{LabNode, Netns};

const EXCHANGE: usize = 1024;
const RR_WARMUP: usize = 500;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// One side's figures.
#[derive(Debug, Default, Clone, Copy)]
struct Figures {
    gbps_1: f64,
    gbps_8: f64,
    p50_us: f64,
    p99_us: f64,
    conns_per_s: f64,
    failed_conns: usize,
}

fn main() {
    let missing = weft::lab::missing_prerequisites();
    if !missing.is_empty() {
        eprintln!("the dataplane benchmark needs {}", missing.join(", "));
        std::process::exit(1);
    }
    let seconds: f64 = std::env::var("WEFT_BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0);
    let run = Duration::from_secs_f64(seconds);
    // Medians of several runs, as ztunnel's reference figures are: this VM is noisy.
    let runs: usize = std::env::var("WEFT_BENCH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(3);
    // WEFT_BIN: the agent as shipped (`make bench-dataplane` builds the `dist` profile);
    // otherwise this build's.
    let shipped = std::env::var_os("WEFT_BIN").map(std::path::PathBuf::from);
    let weft = shipped
        .as_deref()
        .unwrap_or(Path::new(env!("CARGO_BIN_EXE_weft")));
    eprintln!("agent: {}", weft.display());
    let runtime = tokio::runtime::Runtime::new().expect("a runtime");
    let _entered = runtime.enter();
    let work = tempfile::tempdir().expect("a temporary directory");
    let (lab, set, step) = dataplane_lab::build_lab(work.path());
    let (client, server, node_a, node_b) = dataplane_lab::ends(&lab);
    // Tens of thousands of short connections from one address to one port: reuse TIME_WAIT
    // ports for the client and the nodes' own connections rather than run out of them.
    for netns in [&client.netns, &node_a.netns, &node_b.netns, &server.netns] {
        netns
            .sysctl(&[
                ("net/ipv4/ip_local_port_range".to_owned(), "1024 65535"),
                ("net/ipv4/tcp_tw_reuse".to_owned(), "1"),
            ])
            .expect("sysctl in a lab namespace");
    }
    serve(
        &server.netns,
        SocketAddr::new(server.ip.into(), SINK_PORT),
        sink,
    );
    serve(
        &server.netns,
        SocketAddr::new(server.ip.into(), ECHO_PORT),
        echo,
    );
    let sink_at = dataplane_lab::server_addr(&lab, SINK_PORT);
    let echo_at = dataplane_lab::server_addr(&lab, ECHO_PORT);

    // The agents run their own copy of the binary, as on a node, where no tracker or CA maps
    // it: pages those touched would count in the agents' RSS too.
    let agents = work.path().join("agent");
    std::fs::create_dir_all(&agents).expect("a directory for the agents' binary");
    std::fs::copy(weft, agents.join("weft")).expect("the agents' copy of weft");
    let options = PlaneOptions {
        node_binary: Some(agents.join("weft")),
        ..PlaneOptions::default()
    };
    let plane = runtime.block_on(dataplane_lab::start_plane_with(
        &lab,
        weft,
        work.path(),
        &set,
        &step,
        &options,
    ));
    println!(
        "lab {}: client {} behind {} (cluster-1), server {} behind {} (cluster-2); {seconds} s runs",
        lab.prefix(),
        client.ip,
        node_a.name,
        server.ip,
        node_b.name
    );

    let rss = |plane: &ControlPlane| -> Vec<(String, (f64, f64))> {
        plane
            .nodes
            .iter()
            .map(|n| {
                let pid = n.process.pid().expect("a node agent's pid");
                (n.node.name.clone(), vm_rss_mb(pid))
            })
            .collect()
    };
    std::thread::sleep(Duration::from_secs(2));
    let fresh = rss(&plane);

    let decided_before = runtime.block_on(decided(node_b));
    let through = median_of(runs, || {
        measure("weft", &client.netns, sink_at, echo_at, run)
    });
    let decided_after = runtime.block_on(decided(node_b));
    println!(
        "  node B decided {} connections during the weft run (the traffic went through weft)",
        decided_after - decided_before
    );
    assert!(
        decided_after - decided_before >= through.conns_per_s * seconds,
        "node B did not see the connections: the traffic bypassed weft"
    );

    std::thread::sleep(Duration::from_secs(5));
    let after = rss(&plane);

    // Capture off: the agents stopped, weft's table removed from each node namespace.
    runtime.block_on(async {
        for node in &plane.nodes {
            lab.kill(&node.process).await;
        }
    });
    for node in lab.nodes() {
        cleanup(weft, node);
        assert!(
            dataplane_lab::nft(node, &["list", "table", "inet", "weft"]).is_err(),
            "weft's table is still in {}",
            node.name
        );
    }
    let direct = median_of(runs, || {
        measure("direct", &client.netns, sink_at, echo_at, run)
    });
    let relayed = relays(node_a, node_b, sink_at, echo_at, || {
        median_of(runs, || {
            measure(
                "relays",
                &client.netns,
                SocketAddr::new(node_a.ip.into(), SINK_PORT),
                SocketAddr::new(node_a.ip.into(), ECHO_PORT),
                run,
            )
        })
    });
    drop(plane);
    drop(lab);

    report(&through, &direct, &relayed, &fresh, &after, seconds, runs);
}

/// Runs `measure` while node A and node B each run a plain TCP relay for the sink's and the
/// echo's ports (A's address to B's, B's to the server; tokio on one thread, weft's copy buffer,
/// Nagle off, a new A-to-B connection per connection): what any pair of user-space proxies
/// pays on this machine for the two extra hops alone, with no TLS, no HTTP/2 and no policy.
fn relays(
    node_a: &LabNode,
    node_b: &LabNode,
    sink_at: SocketAddr,
    echo_at: SocketAddr,
    measure: impl FnOnce() -> Figures,
) -> Figures {
    let (stop, stopped) = tokio::sync::watch::channel(false);
    std::thread::scope(|scope| {
        for (node, next) in [(node_a, IpAddr::from(node_b.ip)), (node_b, sink_at.ip())] {
            let listeners: Vec<(TcpListener, SocketAddr)> = [sink_at.port(), echo_at.port()]
                .into_iter()
                .map(|port| {
                    let at = SocketAddr::new(node.ip.into(), port);
                    let listener = node
                        .netns
                        .run(|| TcpListener::bind(at))
                        .expect("entering a node's namespace")
                        .expect("a relay listens");
                    listener
                        .set_nonblocking(true)
                        .expect("a non-blocking listener");
                    (listener, SocketAddr::new(next, port))
                })
                .collect();
            let stopped = stopped.clone();
            scope.spawn(move || {
                node.netns
                    .block_on(relay(listeners, stopped))
                    .expect("entering a node's namespace")
            });
        }
        let figures = measure();
        stop.send_replace(true);
        figures
    })
}

/// Accepts on each listener and carries every connection to the listener's next hop, until
/// `stopped` turns true.
async fn relay(
    listeners: Vec<(TcpListener, SocketAddr)>,
    mut stopped: tokio::sync::watch::Receiver<bool>,
) {
    let mut tasks = tokio::task::JoinSet::new();
    for (listener, next) in listeners {
        let listener = tokio::net::TcpListener::from_std(listener).expect("a relay's listener");
        tasks.spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let Ok(outbound) = tokio::net::TcpStream::connect(next).await else {
                        return;
                    };
                    let (mut inbound, mut outbound) = (inbound, outbound);
                    let _ = inbound.set_nodelay(true);
                    let _ = outbound.set_nodelay(true);
                    let _ = tokio::io::copy_bidirectional_with_sizes(
                        &mut inbound,
                        &mut outbound,
                        weft::proxy::COPY_BUFFER,
                        weft::proxy::COPY_BUFFER,
                    )
                    .await;
                });
            }
        });
    }
    let _ = stopped.wait_for(|&stop| stop).await;
}

/// Every figure of one side, printed as it is measured.
fn measure(
    side: &str,
    client: &Netns,
    sink_at: SocketAddr,
    echo_at: SocketAddr,
    run: Duration,
) -> Figures {
    client
        .run(|| {
            // Warm-up: a first connection (tunnel and certificates on the weft side).
            round_trips(echo_at, Rounds::Count(100));
            let gbps_1 = bulk(sink_at, 1, run);
            let gbps_8 = bulk(sink_at, 8, run);
            let mut rtts = round_trips(echo_at, Rounds::For(run));
            rtts.sort_unstable_by(f64::total_cmp);
            let (conns_per_s, failed_conns) = new_connections(echo_at, run);
            let f = Figures {
                gbps_1,
                gbps_8,
                p50_us: percentile(&rtts, 0.50),
                p99_us: percentile(&rtts, 0.99),
                conns_per_s,
                failed_conns,
            };
            eprintln!("  {side}: {f:?}");
            f
        })
        .expect("entering the client's namespace")
}

/// Each figure's median over `runs` measurements.
fn median_of(runs: usize, mut measure: impl FnMut() -> Figures) -> Figures {
    let all: Vec<Figures> = (0..runs).map(|_| measure()).collect();
    let median = |field: fn(&Figures) -> f64| {
        let mut values: Vec<f64> = all.iter().map(field).collect();
        values.sort_unstable_by(f64::total_cmp);
        values[values.len() / 2]
    };
    Figures {
        gbps_1: median(|f| f.gbps_1),
        gbps_8: median(|f| f.gbps_8),
        p50_us: median(|f| f.p50_us),
        p99_us: median(|f| f.p99_us),
        conns_per_s: median(|f| f.conns_per_s),
        failed_conns: all.iter().map(|f| f.failed_conns).sum(),
    }
}

/// Bulk throughput in Gbit/s of `streams` connections writing for `run`: the bytes the
/// server counted, over the time until its count came back.
fn bulk(to: SocketAddr, streams: usize, run: Duration) -> f64 {
    let start = Instant::now();
    let threads: Vec<_> = (0..streams)
        .map(|_| {
            std::thread::spawn(move || {
                let mut s = TcpStream::connect_timeout(&to, CONNECT_TIMEOUT).expect("connect");
                let buf = vec![0x5au8; 128 * 1024];
                while start.elapsed() < run {
                    s.write_all(&buf).expect("write");
                }
                s.shutdown(std::net::Shutdown::Write).expect("shutdown");
                let mut count = [0u8; 8];
                s.read_exact(&mut count).expect("the server's count");
                (u64::from_be_bytes(count), start.elapsed())
            })
        })
        .collect();
    let mut bytes = 0u64;
    let mut took = Duration::ZERO;
    for t in threads {
        let (n, at) = t.join().expect("a stream");
        bytes += n;
        took = took.max(at);
    }
    bytes as f64 * 8.0 / took.as_secs_f64() / 1e9
}

/// How many round trips to make.
#[derive(Clone, Copy)]
enum Rounds {
    /// This many, all kept.
    Count(usize),
    /// As many as fit in this time after a warm-up of `RR_WARMUP`, which is dropped.
    For(Duration),
}

/// Round trips of 1 KiB on one kept connection (TCP_NODELAY), each in µs.
fn round_trips(to: SocketAddr, rounds: Rounds) -> Vec<f64> {
    let mut s = TcpStream::connect_timeout(&to, CONNECT_TIMEOUT).expect("connect");
    s.set_nodelay(true).expect("nodelay");
    let out = [0x42u8; EXCHANGE];
    let mut back = [0u8; EXCHANGE];
    let mut one = || {
        let t = Instant::now();
        s.write_all(&out).expect("write");
        s.read_exact(&mut back).expect("read");
        t.elapsed().as_secs_f64() * 1e6
    };
    match rounds {
        Rounds::Count(n) => (0..n).map(|_| one()).collect(),
        Rounds::For(run) => {
            (0..RR_WARMUP).for_each(|_| {
                one();
            });
            let start = Instant::now();
            std::iter::from_fn(|| (start.elapsed() < run).then(&mut one)).collect()
        }
    }
}

/// New connections per second, one at a time, each with a 1 KiB exchange; and how many failed.
fn new_connections(to: SocketAddr, run: Duration) -> (f64, usize) {
    let start = Instant::now();
    let (mut done, mut failed) = (0usize, 0usize);
    let out = [0x43u8; EXCHANGE];
    let mut back = [0u8; EXCHANGE];
    while start.elapsed() < run {
        let ok = TcpStream::connect_timeout(&to, CONNECT_TIMEOUT).and_then(|mut s| {
            s.set_nodelay(true)?;
            s.write_all(&out)?;
            s.read_exact(&mut back)
        });
        match ok {
            Ok(()) => done += 1,
            Err(_) => failed += 1,
        }
    }
    (done as f64 / start.elapsed().as_secs_f64(), failed)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 * p) as usize).min(sorted.len().saturating_sub(1));
    sorted.get(i).copied().unwrap_or(f64::NAN)
}

/// Accepts on `addr` inside `netns`, a thread per connection running `handle`.
fn serve(netns: &Netns, addr: SocketAddr, handle: fn(TcpStream)) {
    let listener = netns
        .run(|| TcpListener::bind(addr))
        .expect("entering the server's namespace")
        .expect("the server listens");
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || handle(stream));
        }
    });
}

/// Reads to the end, then answers with the byte count.
fn sink(mut s: TcpStream) {
    let mut buf = vec![0u8; 256 * 1024];
    let mut n = 0u64;
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(k) => n += k as u64,
            Err(_) => return,
        }
    }
    let _ = s.write_all(&n.to_be_bytes());
}

/// Sends back every 1 KiB it reads.
fn echo(mut s: TcpStream) {
    let _ = s.set_nodelay(true);
    let mut buf = [0u8; EXCHANGE];
    while s.read_exact(&mut buf).is_ok() {
        if s.write_all(&buf).is_err() {
            return;
        }
    }
}

/// The connections node `node` has decided (`weft_node_connections_decided_total`, summed).
async fn decided(node: &LabNode) -> f64 {
    dataplane_lab::metrics(node)
        .await
        .lines()
        .filter(|l| l.starts_with("weft_node_connections_decided_total"))
        .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .sum()
}

/// The agent's resident set and, of it, the anonymous part (heap and stacks; the rest is the
/// binary's and libraries' mapped pages), in MB.
fn vm_rss_mb(pid: u32) -> (f64, f64) {
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).expect("the agent's status");
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    assert_eq!(comm.trim(), "weft", "pid {pid} is not weft");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
            .unwrap_or_else(|| panic!("{name} in the agent's status"))
            / 1024.0
    };
    (field("VmRSS:"), field("RssAnon:"))
}

/// `weft node --cleanup` inside `node`'s namespace.
fn cleanup(weft: &Path, node: &LabNode) {
    let status = node
        .netns
        .run(|| {
            std::process::Command::new(weft)
                .args(["node", "--cleanup"])
                .status()
        })
        .expect("entering the node's namespace")
        .expect("weft node --cleanup runs");
    assert!(status.success(), "weft node --cleanup in {}", node.name);
}

/// Each node's agent: its resident set and the anonymous part of it, in MB.
type Rss = [(String, (f64, f64))];

fn report(
    weft: &Figures,
    direct: &Figures,
    relays: &Figures,
    fresh: &Rss,
    after: &Rss,
    seconds: f64,
    runs: usize,
) {
    let pct = |a: f64, b: f64| 100.0 * a / b;
    println!();
    println!(
        "dataplane (weft through two node agents, HBONE mTLS, vs direct; medians of {runs} runs of {seconds} s):"
    );
    println!(
        "throughput, 1 stream:  weft {:.2} Gbit/s, direct {:.2} Gbit/s, ratio {:.0}%  (target >= 50%; ztunnel 6.25 vs 16.3 = 38%)",
        weft.gbps_1,
        direct.gbps_1,
        pct(weft.gbps_1, direct.gbps_1)
    );
    println!(
        "throughput, 8 streams: weft {:.2} Gbit/s, direct {:.2} Gbit/s, ratio {:.0}%",
        weft.gbps_8,
        direct.gbps_8,
        pct(weft.gbps_8, direct.gbps_8)
    );
    println!(
        "1 KiB round trip p50:  weft {:.0} µs, direct {:.0} µs, +{:.0} µs  (target <= +50 µs; ztunnel 147 vs 69 = +78)",
        weft.p50_us,
        direct.p50_us,
        weft.p50_us - direct.p50_us
    );
    println!(
        "1 KiB round trip p99:  weft {:.0} µs, direct {:.0} µs, +{:.0} µs  (ztunnel 233 vs 122 = +111)",
        weft.p99_us,
        direct.p99_us,
        weft.p99_us - direct.p99_us
    );
    println!(
        "new connections/s (sequential, 1 KiB exchange each): weft {:.0}, direct {:.0}, ratio {:.0}%  (target >= 40%; ztunnel 1,645 vs 8,404 = 20%){}",
        weft.conns_per_s,
        direct.conns_per_s,
        pct(weft.conns_per_s, direct.conns_per_s),
        if weft.failed_conns + direct.failed_conns + relays.failed_conns > 0 {
            format!(
                "; failed: weft {}, direct {}, relays {}",
                weft.failed_conns, direct.failed_conns, relays.failed_conns
            )
        } else {
            String::new()
        }
    );
    println!(
        "two plain TCP relays (the extra hops alone: no TLS, HTTP/2 or policy), against direct: 1 stream {:.2} Gbit/s ({:.0}%), 8 streams {:.2} Gbit/s ({:.0}%), p50 {:.0} µs (+{:.0}), p99 {:.0} µs, new connections {:.0}/s ({:.0}%)",
        relays.gbps_1,
        pct(relays.gbps_1, direct.gbps_1),
        relays.gbps_8,
        pct(relays.gbps_8, direct.gbps_8),
        relays.p50_us,
        relays.p50_us - direct.p50_us,
        relays.p99_us,
        relays.conns_per_s,
        pct(relays.conns_per_s, direct.conns_per_s),
    );
    for ((node, (rss, anon)), (_, (rss_after, anon_after))) in fresh.iter().zip(after) {
        println!(
            "idle RSS of weft node {node}: {rss:.1} MB ({anon:.1} anonymous) before traffic, {rss_after:.1} MB ({anon_after:.1}) after  (target <= 15 MB; ztunnel 13.5 MB)"
        );
    }
}
