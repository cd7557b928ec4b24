//! The node agent (`weft node`): follows the tracker's view, keeps certificates for the
//! identities of its pods, keeps the capture in nftables in step with its pods, and serves
//! the outbound (15001), inbound plaintext (15006) and HBONE (15008) listeners, judging every
//! connection and closing those a tightened policy no longer allows; with admin (15000,
//! localhost), metrics (15020) and readiness (15021) endpoints.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use futures::FutureExt as _;
use futures::future::FusedFuture as _;
use rustls::{ClientConfig, ServerConfig};
use serde_json::json;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::task::TaskTracker;

use super::connections::{Connections, Recheck, Tracked};
use super::decision::{Decision, Denial, Direction, Layer};
use super::explain::{self, ExplainError, Here, Question};
use super::inbound::NodeAdmission;
use super::local::{self, Local, local_pod, view_complete};
use super::metrics::{CloseCause, Metrics};
use super::outbound::{self, Route, route};
use crate::identity::manager::IdentityManager;
use crate::identity::verify::Expected;
use crate::identity::{TrustStore, WorkloadId};
use crate::model::ClusterId;
use crate::proxy::pool::certificate_generation;
use crate::proxy::{self, ClientSettings, Pool, PoolKey, Server, ServerSettings, ServerTls};
use crate::redirect::{Mode, PodAddr, Redirect, Way, original_destination};
use crate::tracker::client::{ClientError, Follower, Target, follow};
use crate::tracker::replica::Replica;
use crate::tracker::sequence::ReplicaError;
use crate::tracker::wire::pb;

/// Why a connection is refused while capture holds.
pub(super) const HOLD_REASON: &str = "capture holds every connection until the view is complete";

/// Where a node listens and how it behaves.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The node's cluster.
    pub cluster: ClusterId,
    /// The node's name, as its Node object has it.
    pub node: String,
    /// Outbound listener (captured connections of local pods).
    pub outbound: SocketAddr,
    /// Inbound plaintext listener.
    pub inbound: SocketAddr,
    /// HBONE listener.
    pub hbone: SocketAddr,
    /// Admin endpoint (config dump); keep it on localhost.
    pub admin: SocketAddr,
    /// Metrics endpoint.
    pub metrics: SocketAddr,
    /// Readiness endpoint.
    pub readiness: SocketAddr,
    /// The mark of weft's own sockets.
    pub mark: u32,
    /// How often weft's table is checked against what it should hold.
    pub table_check_interval: Duration,
    /// How long open connections may go on once the agent is told to stop.
    pub drain_timeout: Duration,
    /// The HBONE server's limits.
    pub server: ServerSettings,
    /// The HBONE client pool's limits.
    pub client: ClientSettings,
}

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// A listener could not be bound.
    #[error("{what} {addr}: {source}")]
    Bind {
        /// Which flag.
        what: &'static str,
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// The view as the tracker client follows it, telling the agent of each change.
struct Notifying {
    view: Arc<RwLock<Replica>>,
    changed: watch::Sender<u64>,
}

impl Notifying {
    fn view(&self) -> std::sync::RwLockWriteGuard<'_, Replica> {
        self.view.write().unwrap_or_else(PoisonError::into_inner)
    }

    fn bump(&self) {
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }
}

impl Follower for Notifying {
    fn position(&self) -> Option<pb::Position> {
        self.view().position().cloned()
    }

    fn apply(&mut self, update: pb::Update) -> Result<(), ReplicaError> {
        let applied = self.view().apply(update);
        self.bump();
        applied
    }

    fn connected(&mut self) {
        self.view().set_connected(true);
        self.bump();
    }

    fn disconnected(&mut self, _: &ClientError) {
        self.view().set_connected(false);
        self.bump();
    }
}

/// A running node agent.
pub struct Agent {
    settings: Settings,
    view: Arc<RwLock<Replica>>,
    identities: Arc<IdentityManager>,
    trust: TrustStore,
    redirect: Arc<Redirect>,
    pool: Pool,
    admission: Arc<NodeAdmission>,
    connections: Connections,
    metrics: Arc<Metrics>,
    local: RwLock<Local>,
    /// The hold is installed (until capture replaces it).
    held: AtomicBool,
    /// Capture of the local pods is installed.
    captured: AtomicBool,
    client_configs: Mutex<HashMap<(WorkloadId, WorkloadId), Arc<ClientConfig>>>,
    server_configs: Mutex<HashMap<WorkloadId, Arc<ServerConfig>>>,
    /// The HBONE server, once running (for its counters).
    hbone: std::sync::OnceLock<Arc<Server<NodeAdmission>>>,
    /// The tasks of connections taken by the outbound and plaintext listeners.
    handlers: TaskTracker,
    /// Told to stop: the listeners are closed, open connections go on to their end.
    draining: AtomicBool,
}

impl Agent {
    /// An agent for `settings`, with certificates from `identities`, peers verified by
    /// `trust`, capture through `redirect`.
    pub fn new(
        settings: Settings,
        identities: Arc<IdentityManager>,
        trust: TrustStore,
        redirect: Redirect,
    ) -> Arc<Self> {
        let view = Arc::new(RwLock::new(Replica::new()));
        let metrics = Arc::new(Metrics::default());
        let connections = Connections::default();
        let admission = Arc::new(
            NodeAdmission::new(
                view.clone(),
                settings.cluster.clone(),
                &settings.node,
                trust.clone(),
            )
            .with_metrics(metrics.clone())
            .with_connections(connections.clone()),
        );
        Arc::new(Self {
            pool: Pool::new(settings.client.clone()),
            settings,
            view,
            identities,
            trust,
            redirect: Arc::new(redirect),
            admission,
            connections,
            metrics,
            local: RwLock::default(),
            held: AtomicBool::new(false),
            captured: AtomicBool::new(false),
            client_configs: Mutex::default(),
            server_configs: Mutex::default(),
            hbone: std::sync::OnceLock::new(),
            handlers: TaskTracker::new(),
            draining: AtomicBool::new(false),
        })
    }

    /// Binds every listener, then follows `tracker` and serves until `shutdown` resolves; then
    /// drains: the listeners close (new connections fail closed, as with no agent), the peers
    /// of its HBONE connections are told to open no more tunnels on them, and the connections
    /// already carried go on until they end, [`Settings::drain_timeout`] passes or `at_once`
    /// resolves. weft's table is left in place on exit: while no agent listens, captured
    /// connections fail closed.
    pub async fn run(
        self: Arc<Self>,
        tracker: Target,
        shutdown: impl Future<Output = ()>,
        at_once: impl Future<Output = ()>,
    ) -> Result<(), AgentError> {
        let s = &self.settings;
        let bind = |what: &'static str, addr: SocketAddr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| AgentError::Bind { what, addr, source })
        };
        // Capture's listeners: transparent (TPROXY) and carrying weft's mark.
        let transparent = |what: &'static str, addr: SocketAddr| {
            crate::redirect::transparent_listeners(addr, s.mark)
                .and_then(|all| {
                    all.into_iter()
                        .map(TcpListener::from_std)
                        .collect::<std::io::Result<Vec<_>>>()
                })
                .map_err(|source| AgentError::Bind { what, addr, source })
        };
        let outbound = transparent("--outbound", s.outbound)?;
        let inbound = transparent("--inbound", s.inbound)?;
        let hbone = transparent("--hbone", s.hbone)?;
        let admin = bind("--admin", s.admin).await?;
        let metrics = bind("--metrics", s.metrics).await?;
        let readiness = bind("--readiness", s.readiness).await?;
        tracing::info!(
            cluster = %s.cluster, node = %s.node, outbound = %s.outbound, inbound = %s.inbound,
            hbone = %s.hbone, admin = %s.admin, metrics = %s.metrics, readiness = %s.readiness,
            "node agent listening"
        );

        let (changed, mut changes) = watch::channel(0u64);
        let follower = Arc::new(RwLock::new(Notifying {
            view: self.view.clone(),
            changed,
        }));
        let request = pb::SubscribeRequest {
            node: s.node.clone(),
            cluster: s.cluster.to_string(),
            policy_scope: pb::PolicyScope::OwnCluster.into(),
            resume: None,
        };
        let mut tasks = tokio::task::JoinSet::new();
        tasks.spawn(follow(tracker, request, follower, Duration::from_secs(1)));
        let agent = self.clone();
        tasks.spawn(async move {
            let mut retry = tokio::time::interval(agent.settings.table_check_interval);
            retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                // At once (the hold, before any view), then on a change, or a tick: an
                // install that failed is tried again.
                agent.reconcile().await;
                tokio::select! {
                    changed = changes.changed() => if changed.is_err() { return },
                    _ = retry.tick(), if !agent.captured.load(Ordering::Relaxed) => {}
                }
            }
        });
        let mut listening = tokio::task::JoinSet::new();
        for listener in outbound {
            listening.spawn(self.clone().accept(listener, Self::outbound));
        }
        for listener in inbound {
            listening.spawn(self.clone().accept(listener, Self::plaintext));
        }
        let server = Arc::new(Server::with_tls(
            Box::new(NodeTls(self.clone())),
            ServerSettings {
                mark: Some(s.mark),
                ..s.server.clone()
            },
            self.admission.clone(),
        ));
        let _ = self.hbone.set(server.clone());
        for listener in hbone {
            listening.spawn(server.clone().run(listener));
        }
        for (listener, dump) in [(admin, true), (metrics, false), (readiness, false)] {
            let report = NodeReport {
                agent: self.clone(),
                dump,
            };
            tasks.spawn(crate::admin::serve(
                listener,
                report,
                std::future::pending(),
            ));
        }
        shutdown.await;
        // The peers first (GOAWAY), then the listeners; ready no more once both are done.
        server.drain();
        listening.shutdown().await;
        self.handlers.close();
        self.draining.store(true, Ordering::Relaxed);
        let timeout = self.settings.drain_timeout;
        tracing::info!(
            open = self.connections.len(),
            ?timeout,
            "node agent draining: listeners closed, open connections go on; capture stays in place"
        );
        let drained = async { tokio::join!(self.handlers.wait(), server.drained()) };
        tokio::select! {
            _ = drained => tracing::info!("node agent drained"),
            () = tokio::time::sleep(timeout) => tracing::info!(
                open = self.connections.len(),
                "node agent stopping: the drain timed out, closing what is still open"
            ),
            () = at_once => tracing::info!(
                open = self.connections.len(),
                "node agent stopping at once, closing what is still open"
            ),
        }
        tasks.shutdown().await;
        Ok(())
    }

    /// What weft's table does now, if the agent has installed it yet.
    fn mode(&self) -> Option<Mode> {
        if self.captured.load(Ordering::Relaxed) {
            Some(Mode::Captured)
        } else if self.held.load(Ordering::Relaxed) {
            Some(Mode::Hold)
        } else {
            None
        }
    }

    /// Records that the table is installed in `mode`; the first install starts the watch
    /// that restores the table, in whichever mode is wanted then.
    fn installed(&self, mode: Mode) {
        let first = self.mode().is_none();
        match mode {
            Mode::Hold => self.held.store(true, Ordering::Relaxed),
            Mode::Captured => self.captured.store(true, Ordering::Relaxed),
        }
        if first {
            let (redirect, interval) = (self.redirect.clone(), self.settings.table_check_interval);
            tokio::spawn(async move {
                redirect.watch(interval, std::future::pending()).await;
            });
        }
    }

    /// Brings capture, certificates and open connections in step with the view, once the
    /// view of this node's cluster is complete. Before the first complete view the node
    /// does not know its pods, so weft's table holds every connection the node forwards
    /// (issue 5 §1: refused, never passed unevaluated); a view incomplete again later keeps
    /// the capture (the listeners refuse meanwhile).
    async fn reconcile(&self) {
        let next = {
            let view = self.view.read().unwrap_or_else(PoisonError::into_inner);
            let s = &self.settings;
            view_complete(&view, &s.cluster).ok().map(|()| {
                let engine = view.engine();
                let pods: Vec<_> = view
                    .pods_on_node(&s.cluster, &s.node)
                    .filter_map(|p| engine.pod_by_name(s.cluster.as_str(), &p.namespace, &p.name))
                    .collect();
                (
                    Local::of(&view, &s.cluster, &s.node),
                    engine.packet_policy(pods),
                )
            })
        };
        let Some((next, packets)) = next else {
            if self.mode().is_none() {
                match self.redirect.hold().await {
                    Ok(()) => self.installed(Mode::Hold),
                    Err(error) => tracing::error!(%error, "cannot install the hold; will retry"),
                }
            }
            return;
        };
        // Before the table is installed this only records it: the install carries it.
        if let Err(error) = self.redirect.set_packets(&packets).await {
            // The desired state has it: the table watch restores it.
            tracing::error!(%error, "updating the packet layer");
        }
        let previous = std::mem::replace(
            &mut *self.local.write().unwrap_or_else(PoisonError::into_inner),
            next.clone(),
        );
        let pod = |ip| match PodAddr::new(ip) {
            Ok(pod) => Some(pod),
            Err(error) => {
                tracing::error!(%error, "a local pod's address cannot be captured");
                None
            }
        };
        if self.captured.load(Ordering::Relaxed) {
            let change = previous.change_to(&next);
            for ip in change.added {
                if let Some(pod) = pod(ip)
                    && let Err(error) = self.redirect.add_pod(pod).await
                {
                    // The desired state has it: the table watch restores it.
                    tracing::error!(%error, "capture of a new pod");
                }
            }
            for ip in change.removed {
                if let Some(pod) = pod(ip)
                    && let Err(error) = self.redirect.remove_pod(pod).await
                {
                    tracing::error!(%error, "release of a gone pod");
                }
            }
        } else {
            match self
                .redirect
                .install(next.addresses.iter().copied().filter_map(pod))
                .await
            {
                Ok(()) => self.installed(Mode::Captured),
                Err(error) => tracing::error!(%error, "cannot install capture; will retry"),
            }
        }
        self.identities.set_identities(&next.identities);
        // TLS configurations of identities no pod here runs as any more are not needed again.
        self.client_configs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|(source, _), _| next.identities.contains(source));
        self.server_configs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|identity, _| next.identities.contains(identity));
        for closed in self.connections.recheck(|r| self.still_allowed(r)) {
            tracing::info!(connection = ?closed, "closing: no longer allowed");
        }
    }

    /// Whether an open connection is still allowed by the current view.
    fn still_allowed(&self, recheck: &Recheck) -> bool {
        match recheck {
            Recheck::Outbound { source, target } => {
                let view = self.view.read().unwrap_or_else(PoisonError::into_inner);
                let s = &self.settings;
                route(&view, &s.cluster, &s.node, *source, *target, s.hbone.port()).is_ok()
            }
            Recheck::Inbound(inbound) => self.admission.judge(inbound).0.allowed,
            Recheck::Plaintext {
                source,
                destination,
            } => {
                self.admission
                    .judge_plaintext(*source, *destination)
                    .allowed
            }
        }
    }

    /// Accepts on `listener` until its task is aborted, handling each connection in a task
    /// that draining waits for.
    async fn accept<F, Fut>(self: Arc<Self>, listener: TcpListener, handle: F)
    where
        F: Fn(Arc<Self>, TcpStream, SocketAddr) -> Fut + Send + Copy + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        loop {
            match listener.accept().await {
                Ok((stream, from)) => {
                    // Small writes of interactive traffic must not wait (Nagle).
                    let _ = stream.set_nodelay(true);
                    self.handlers.spawn(handle(self.clone(), stream, from));
                }
                // Out of descriptors (THREATS 45), an aborted connection: back off, no spin.
                Err(error) => {
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    /// A connection of a local pod, captured on its way out.
    async fn outbound(self: Arc<Self>, stream: TcpStream, from: SocketAddr) {
        let Some(original) = self.original(&stream, from) else {
            return;
        };
        // The hold sends every connection the node forwards here, not only its pods': none
        // is carried until capture of the local pods replaces it.
        if self.mode() != Some(Mode::Captured) {
            let decision = Decision::new(Direction::Outbound, from, original);
            self.refuse(
                stream,
                decision.denied(Layer::View, Denial::NotReady, HOLD_REASON),
            );
            return;
        }
        let s = &self.settings;
        let judged = {
            let view = self.view.read().unwrap_or_else(PoisonError::into_inner);
            outbound::judge(&view, &s.cluster, &s.node, from, original, s.hbone.port())
        };
        let (route, why, mut decision) = match judged {
            Ok(judged) => judged,
            Err(denied) => {
                self.refuse(stream, *denied);
                return;
            }
        };
        match route {
            Route::Tunnel {
                source,
                node,
                destination,
                target,
            } => {
                let tls = self.client_config(&source, &destination);
                // THREATS 11: a renewed certificate is presented by new connections at once.
                let generation = self
                    .identities
                    .certificate(&source)
                    .and_then(|key| key.cert.first().map(|leaf| certificate_generation(leaf)))
                    .unwrap_or(0);
                let key = PoolKey {
                    source,
                    node,
                    destination,
                    generation,
                };
                match self.pool.request(&key, tls, target, from.ip()).await {
                    // Pipelined: the pod's first bytes leave with the CONNECT (the
                    // destination's node forwards nothing before it decides), and the node's
                    // answer settles the decision, one round trip sooner than waiting for it.
                    Ok(mut tunnel) => {
                        let answered = tunnel.on_answer();
                        let metrics = &self.metrics;
                        let settled = async move {
                            let decision = match answered.await {
                                Ok(Ok(())) => decision.allowed_by(Layer::NetworkPolicy, why),
                                Ok(Err(error)) => {
                                    let (layer, denial) = tunnel_cause(&error);
                                    decision.denied(layer, denial, error.to_string())
                                }
                                Err(_) => decision.denied(
                                    Layer::Transport,
                                    Denial::Unreachable,
                                    "the tunnel ended before the destination's node answered",
                                ),
                            };
                            decision.record(Some(metrics));
                            decision.allowed
                        };
                        let tracked = self.connections.track(Recheck::Outbound {
                            source: from.ip(),
                            target,
                        });
                        pipe(
                            stream,
                            tunnel,
                            tracked,
                            metrics,
                            Direction::Outbound,
                            settled,
                        )
                        .await;
                    }
                    Err(error) => {
                        let (layer, denial) = tunnel_cause(&error);
                        self.refuse(stream, decision.denied(layer, denial, error.to_string()));
                    }
                }
            }
            // From the pod's address too: a destination outside the mesh sees the pod, as
            // without weft (and the node's masquerade, if any, still applies on the way out).
            Route::Direct { target } => {
                match proxy::connect(target, Some(s.mark), s.server.from_source.then_some(from))
                    .await
                {
                    Ok(upstream) => {
                        decision = decision.allowed_by(Layer::NetworkPolicy, why);
                        self.carry(stream, upstream, decision, from.ip(), target)
                            .await;
                    }
                    Err(error) => {
                        let reason = format!("connecting to {target}: {error}");
                        self.refuse(stream, decision.unreachable(reason));
                    }
                }
            }
        }
    }

    /// A plaintext connection to a local pod from a source with no identity.
    async fn plaintext(self: Arc<Self>, stream: TcpStream, from: SocketAddr) {
        let Some(original) = self.original(&stream, from) else {
            return;
        };
        let decision = self.admission.judge_plaintext(from, original);
        if !decision.allowed {
            self.refuse(stream, decision);
            return;
        }
        let tracked = self.connections.track(Recheck::Plaintext {
            source: from,
            destination: original,
        });
        let s = &self.settings;
        let from = s.server.from_source.then_some(from);
        match proxy::connect(original, Some(s.mark), from).await {
            Ok(upstream) => {
                decision.record(Some(&self.metrics));
                let opened = std::future::ready(true);
                pipe(
                    stream,
                    upstream,
                    tracked,
                    &self.metrics,
                    Direction::Plaintext,
                    opened,
                )
                .await;
            }
            Err(error) => {
                let reason = format!("connecting to {original}: {error}");
                self.refuse(stream, decision.unreachable(reason));
            }
        }
    }

    /// The original destination of a captured connection; `None` (and the connection
    /// dropped) when it is unknown, or one of weft's own listeners.
    fn original(&self, stream: &TcpStream, from: SocketAddr) -> Option<SocketAddr> {
        match original_destination(stream) {
            Ok(original) if !self.is_own_listener(original) => Some(original),
            Ok(original) => {
                // THREATS 15: a connection to weft's own listeners would loop.
                tracing::info!(%from, %original, "refused: addressed to weft's own listener");
                let _ = stream.set_zero_linger();
                None
            }
            Err(error) => {
                tracing::info!(%from, %error, "refused: no original destination");
                None
            }
        }
    }

    /// Whether `addr` is one of weft's own listeners on this node: dialled for a pod, it would
    /// loop, or hand a pod the node's metrics and admin (THREATS 15).
    fn is_own_listener(&self, addr: SocketAddr) -> bool {
        let s = &self.settings;
        let ours = [
            s.outbound,
            s.inbound,
            s.hbone,
            s.admin,
            s.metrics,
            s.readiness,
        ]
        .iter()
        .any(|l| l.port() == addr.port());
        if !ours {
            return false;
        }
        let ip = addr.ip();
        ip.is_loopback()
            || ip.is_unspecified()
            || self
                .view
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .engine()
                .node_addresses(&s.cluster, &s.node)
                .contains(&ip)
    }

    /// The admin endpoint's `/explain` page for `query`: what this node would decide.
    fn explain(&self, query: &str) -> crate::admin::Page {
        use crate::admin::Page;
        let question = match Question::parse(query) {
            Ok(question) => question,
            Err(e) => return Page::text(400, format!("{e}\n")),
        };
        let s = &self.settings;
        let answer = if self.is_own_listener(question.to) {
            Err(ExplainError::OwnListener(question.to))
        } else {
            let here = Here {
                cluster: &s.cluster,
                node: &s.node,
                hbone_port: s.hbone.port(),
                captured: self.mode() == Some(Mode::Captured),
            };
            explain::explain(&self.view, &self.admission, here, &question)
        };
        match answer {
            Ok(answer) => Page::json(
                200,
                serde_json::to_string_pretty(&answer).unwrap_or_default(),
            ),
            Err(e) => Page::text(e.status(), format!("{e}\n")),
        }
    }

    /// Logs and counts a refusal, and resets the connection.
    fn refuse(&self, stream: TcpStream, decision: Decision) {
        decision.record(Some(&self.metrics));
        // A reset, not a FIN: the client sees a refusal, not an empty answer.
        let _ = stream.set_zero_linger();
    }

    /// Carries an allowed outbound connection, tracked until it ends or is no longer allowed.
    async fn carry(
        &self,
        stream: TcpStream,
        upstream: impl AsyncRead + AsyncWrite + Unpin,
        decision: Decision,
        source: std::net::IpAddr,
        target: SocketAddr,
    ) {
        decision.record(Some(&self.metrics));
        let tracked = self.connections.track(Recheck::Outbound { source, target });
        let opened = std::future::ready(true);
        pipe(
            stream,
            upstream,
            tracked,
            &self.metrics,
            Direction::Outbound,
            opened,
        )
        .await;
    }

    /// The client configuration presenting `source` and requiring `destination`.
    fn client_config(&self, source: &WorkloadId, destination: &WorkloadId) -> Arc<ClientConfig> {
        let mut configs = self
            .client_configs
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let key = (source.clone(), destination.clone());
        if let Some(config) = configs.get(&key) {
            return config.clone();
        }
        let config = match self.trust.client_config(
            Expected::Workload(destination.clone()),
            self.identities.resolver(source),
        ) {
            Ok(config) => Arc::new(config),
            // Building from a working store cannot fail; if it did, no tunnel could be made.
            Err(error) => {
                tracing::error!(%error, "client TLS configuration");
                return Arc::new(
                    ClientConfig::builder()
                        .with_root_certificates(rustls::RootCertStore::empty())
                        .with_no_client_auth(),
                );
            }
        };
        configs.insert(key, config.clone());
        config
    }

    /// What `/config_dump` shows: state, policies, certificates (never keys).
    fn config_dump(&self) -> serde_json::Value {
        let view = self.view.read().unwrap_or_else(PoisonError::into_inner);
        let s = &self.settings;
        let local = self.local.read().unwrap_or_else(PoisonError::into_inner);
        let position = view.position();
        let engine = view.engine();
        let pods: Vec<String> = view
            .pods_on_node(&s.cluster, &s.node)
            .map(|p| format!("{}/{}/{}", s.cluster, p.namespace, p.name))
            .collect();
        let mut packets = serde_json::Map::new();
        let installed = self.redirect.packets();
        let pod_links = self.redirect.pod_links();
        for way in Way::BOTH {
            let name = way.name();
            let allowed: Vec<String> = installed
                .allowed(way)
                .iter()
                .map(ToString::to_string)
                .collect();
            packets.insert(format!("{name}_isolated"), json!(installed.isolated(way)));
            packets.insert(format!("{name}_allowed"), json!(allowed));
            packets.insert(
                format!("{name}_dropped"),
                json!(self.redirect.packets_dropped(way)),
            );
        }
        json!({
            "cluster": s.cluster.as_str(),
            "node": s.node,
            "ready": self.ready().is_ok(),
            "not_ready_because": self.ready().err(),
            "epoch": position.map(|p| p.epoch.clone()),
            "revision": position.map_or(0, |p| p.revision),
            "tracker_disconnected_seconds": view.stale_for().map(|d| d.as_secs_f64()),
            "clusters": view.clusters().map(|c| json!({
                "cluster": c.cluster, "synced": c.synced, "connected": c.connected,
                "trust_domain": c.trust_domain, "stale_for_ms": c.stale_for_ms,
            })).collect::<Vec<_>>(),
            "policies": engine.policy_list().into_iter().map(|(kind, name)| {
                let mut parts = name.splitn(3, '/');
                json!({
                    "kind": kind,
                    "cluster": parts.next(),
                    "namespace": parts.next(),
                    "name": parts.next(),
                })
            }).collect::<Vec<_>>(),
            "local": {
                "pods": pods,
                "addresses": local.addresses.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "identities": local.identities.iter().map(ToString::to_string).collect::<Vec<_>>(),
            },
            "certificates": self.identities.status().iter().map(|st| json!({
                "identity": st.identity.to_string(),
                "expires_unix": st.expires.and_then(|e| e.duration_since(std::time::UNIX_EPOCH).ok()).map(|d| d.as_secs()),
                "expires_in_seconds": st.expires.map(|e| match e.duration_since(std::time::SystemTime::now()) {
                    Ok(left) => left.as_secs_f64(),
                    Err(past) => -past.duration().as_secs_f64(),
                }),
                "renewals": st.renewals,
                "failures": st.failures,
                "last_error": st.last_error,
            })).collect::<Vec<_>>(),
            "trust_domains": self.trust.bundles().iter().map(|b| b.trust_domain().to_string()).collect::<Vec<_>>(),
            "packets": packets,
            "capture": {
                "table": format!("{} {}", crate::redirect::FAMILY, crate::redirect::TABLE),
                "mode": self.mode(),
                "installed": self.captured.load(Ordering::Relaxed),
                "restores": self.redirect.restores(),
                // Interfaces leading to local pods, where a source must route back the same way.
                "pod_links": pod_links.links,
                "pods_without_link": pod_links.pods_without_link,
                // Where an address no known local pod has sends and receives nothing.
                "pod_interfaces": self.redirect.pod_interfaces().patterns(),
                "spoofed_dropped": self.redirect.spoofed_dropped(),
                "uncaptured_dropped": self.redirect.uncaptured_dropped(),
                "outbound": s.outbound.port(),
                "inbound": s.inbound.port(),
                "hbone": s.hbone.port(),
                "mark": s.mark,
            },
            "open_connections": self.connections.len(),
            "pool_connections": self.pool.len(),
            "server": s.server,
            "client": s.client,
        })
    }

    /// `Err` with the reason until the node may take traffic.
    fn ready(&self) -> Result<(), String> {
        if self.draining.load(Ordering::Relaxed) {
            return Err("draining: stopping, open connections go on to their end".into());
        }
        let view = self.view.read().unwrap_or_else(PoisonError::into_inner);
        let local = self.local.read().unwrap_or_else(PoisonError::into_inner);
        let ready = local::ready(&view, &self.settings.cluster, &local, &self.identities);
        match (self.mode(), ready) {
            (Some(Mode::Captured), ready) => ready,
            (Some(Mode::Hold), Ok(())) => Err("capture: hold (local pods not captured yet)".into()),
            (Some(Mode::Hold), Err(why)) => Err(format!("capture: hold; {why}")),
            (None, _) => Err("capture not installed yet".into()),
        }
    }

    fn metrics_text(&self) -> String {
        use prometheus_client::metrics::counter::Counter;
        use prometheus_client::metrics::family::Family;
        use prometheus_client::metrics::gauge::Gauge;
        let mut registry = prometheus_client::registry::Registry::with_prefix("weft_node");
        self.metrics.register(&mut registry);
        self.identities.register_metrics(&mut registry);
        let gauge = |registry: &mut prometheus_client::registry::Registry,
                     name: &str,
                     help: &str,
                     value: f64| {
            let g: Gauge<f64, std::sync::atomic::AtomicU64> = Gauge::default();
            g.set(value);
            registry.register(name, help, g);
        };
        let counter = |registry: &mut prometheus_client::registry::Registry,
                       name: &str,
                       help: &str,
                       value: u64| {
            let c: Counter = Counter::default();
            c.inc_by(value);
            registry.register(name, help, c);
        };
        let stale = {
            let view = self.view.read().unwrap_or_else(PoisonError::into_inner);
            view.stale_for().map_or(0.0, |d| d.as_secs_f64())
        };
        gauge(
            &mut registry,
            "tracker_disconnected_seconds",
            "How long the node has been without its tracker (0 while connected).",
            stale,
        );
        gauge(
            &mut registry,
            "ready",
            "The node takes traffic (1) or not (0).",
            if self.ready().is_ok() { 1.0 } else { 0.0 },
        );
        gauge(
            &mut registry,
            "open_connections",
            "Connections carried now, all directions.",
            self.connections.len() as f64,
        );
        gauge(
            &mut registry,
            "pool_connections",
            "HBONE connections in the client pool.",
            self.pool.len() as f64,
        );
        gauge(
            &mut registry,
            "hbone_connections_refused_over_cap",
            "HBONE connections reset at once because their source held --max-connections-per-source.",
            self.hbone
                .get()
                .map_or(0.0, |s| s.refused_over_cap() as f64),
        );
        let dropped: Family<PacketLabels, Counter> = Family::default();
        for way in Way::BOTH {
            dropped
                .get_or_create(&PacketLabels {
                    direction: way.name(),
                })
                .inc_by(self.redirect.packets_dropped(way));
        }
        registry.register(
            "packets_dropped",
            "Packets the packet layer dropped (NetworkPolicy on traffic the proxy does not carry: UDP, SCTP, ICMP and the rest), by direction; as of the last table check.",
            dropped,
        );
        counter(
            &mut registry,
            "spoofed_dropped",
            "Packets weft's antispoof chain dropped: a local pod's address from another interface, a source not routed back through the pod link it came in by, a link-local IPv6 source, or an unknown pod on a --pod-interfaces interface; as of the last table check.",
            self.redirect.spoofed_dropped(),
        );
        counter(
            &mut registry,
            "uncaptured_dropped",
            "Packets capture dropped rather than pass unjudged: TCP of local pods that no listener took (none of its family), or anything bound for an unknown pod on a --pod-interfaces interface; as of the last table check.",
            self.redirect.uncaptured_dropped(),
        );
        gauge(
            &mut registry,
            "capture_restores",
            "Times weft's table was found changed by another program and restored.",
            self.redirect.restores() as f64,
        );
        let mut text = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &registry);
        text
    }
}

/// Pipes `a` and `b` both ways until either closes or `tracked` is told to close; `opened`
/// resolves whether the connection counts as opened (a tunnel's answer).
async fn pipe(
    mut a: TcpStream,
    b: impl AsyncRead + AsyncWrite + Unpin,
    mut tracked: Tracked,
    metrics: &Metrics,
    direction: Direction,
    opened: impl Future<Output = bool>,
) {
    // `b` goes when the copy ends: a tunnel then tells `opened` it will never be answered.
    let copy = async {
        let mut b = b;
        tokio::io::copy_bidirectional_with_sizes(
            &mut a,
            &mut b,
            proxy::COPY_BUFFER,
            proxy::COPY_BUFFER,
        )
        .await
    };
    let mut opened = std::pin::pin!(opened.fuse());
    let ended = tokio::select! {
        ended = async { tokio::join!(copy, opened.as_mut()) } => Some(ended),
        () = tracked.closed() => None,
    };
    if ended.is_none() && !opened.is_terminated() {
        // Closed before a tunnel was answered: the tunnel is gone with the copy, and its
        // decision is logged now rather than lost.
        opened.await;
    }
    match ended {
        Some((_, false)) => {
            // Refused after all (a tunnel's answer): a reset, as any refusal.
            let _ = a.set_zero_linger();
        }
        Some((Ok((sent, received)), true)) => {
            metrics.closed(direction, CloseCause::Done, sent, received);
        }
        Some((Err(error), true)) => {
            tracing::debug!(%error, "connection failed");
            metrics.closed(direction, CloseCause::Error, 0, 0);
        }
        None => {
            let _ = a.set_zero_linger();
            metrics.closed(direction, CloseCause::Policy, 0, 0);
        }
    }
}

/// The layer that refused a tunnel, and why in one word: the destination's node when it
/// answered 4xx (its admission or policies), else the transport.
fn tunnel_cause(error: &proxy::ClientError) -> (Layer, Denial) {
    match error {
        proxy::ClientError::Refused { status, .. } if status.is_client_error() => {
            (Layer::Destination, Denial::Refused)
        }
        _ => (Layer::Transport, Denial::Unreachable),
    }
}

/// The label of the packet layer's drops: `ingress` or `egress`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, prometheus_client::encoding::EncodeLabelSet)]
struct PacketLabels {
    direction: &'static str,
}

/// Presents, on each HBONE connection, the certificate of the local pod it was addressed to.
struct NodeTls(Arc<Agent>);

impl ServerTls for NodeTls {
    fn config(&self, arrived_at: SocketAddr) -> Result<Arc<ServerConfig>, String> {
        let agent = &self.0;
        let identity = {
            let view = agent.view.read().unwrap_or_else(PoisonError::into_inner);
            let s = &agent.settings;
            let pod = local_pod(&view, &s.cluster, &s.node, arrived_at.ip())
                .ok_or_else(|| format!("{} is not a pod of this node", arrived_at.ip()))?;
            view.engine()
                .pod_identity(pod)
                .ok_or_else(|| format!("pod {} has no identity", view.engine().pod_name(pod)))?
        };
        let mut configs = agent
            .server_configs
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(config) = configs.get(&identity) {
            return Ok(config.clone());
        }
        let config = agent
            .trust
            .server_config(agent.identities.resolver(&identity))
            .map_err(|e| e.to_string())?;
        let config = proxy::hbone_server_config(config);
        configs.insert(identity, config.clone());
        Ok(config)
    }
}

/// The agent on one admin port: the config dump only on the localhost admin port.
#[derive(Clone)]
struct NodeReport {
    agent: Arc<Agent>,
    dump: bool,
}

impl crate::admin::Report for NodeReport {
    fn ready(&self) -> Result<(), String> {
        self.agent.ready()
    }

    fn metrics(&self) -> String {
        self.agent.metrics_text()
    }

    fn extra(&self, path: &str, query: Option<&str>) -> Option<crate::admin::Page> {
        match path {
            "/config_dump" if self.dump => Some(crate::admin::Page::json(
                200,
                serde_json::to_string_pretty(&self.agent.config_dump()).unwrap_or_default(),
            )),
            // Like the config dump, it shows policy: on the localhost admin port only.
            "/explain" if self.dump => Some(self.agent.explain(query.unwrap_or_default())),
            // ztunnel's readiness path, so that probes written for it work.
            "/healthz/ready" => Some(match self.agent.ready() {
                Ok(()) => crate::admin::Page::text(200, "ready\n".into()),
                Err(why) => crate::admin::Page::text(503, format!("{why}\n")),
            }),
            _ => None,
        }
    }
}
