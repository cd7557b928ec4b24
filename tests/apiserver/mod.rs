//! A test Kubernetes API server for kube-rs's real client: JSON lists with resourceVersion and
//! paging (`limit`/`continue`), GET of one object by name, watch streams with ADDED / MODIFIED /
//! DELETED / BOOKMARK, 410 Gone both as a watch ERROR event and as an HTTP status, knobs to
//! inject faults (down, 500, hang, slow events, events held back then delivered out of order, a
//! kind not installed), and authentication: a required bearer token, and HTTPS with a required
//! client certificate; and kubeconfig files naming servers. It also reviews tokens (POST
//! TokenReview) that a test registers with who they are ([`ApiServer::add_reviewed_token`]),
//! and can authorize requests by RBAC rules ([`ApiServer::authorize`]), answering 403 to
//! what they do not grant, as a real server does.
//! Reusable by every test that needs a cluster: include it with `mod apiserver;`.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt as _;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::broadcast;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// An RBAC rule granted to the client: for every namespace (a ClusterRole bound by a
/// ClusterRoleBinding) or for one (bound by a RoleBinding in it).
#[derive(Debug, Clone)]
pub struct Grant {
    /// The namespace it is for, or `None` for all and for cluster-scoped resources.
    pub namespace: Option<String>,
    /// The rule.
    pub rule: k8s_openapi::api::rbac::v1::PolicyRule,
}

/// What a request asks, as RBAC sees it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Attributes {
    /// `get`, `list`, `watch` or `create`.
    pub verb: String,
    /// The API group (`""` for the core group).
    pub group: String,
    /// The resource (plural).
    pub resource: String,
    /// The namespace of a namespaced request.
    pub namespace: Option<String>,
    /// The object's name, for a `get`.
    pub name: Option<String>,
}

impl Attributes {
    /// Whether `grant` allows it: verb, group and resource match (or `*`), the grant is for
    /// its namespace, and names, if the rule lists any, include its name.
    fn allowed_by(&self, grant: &Grant) -> bool {
        let has = |list: &[String], v: &str| list.iter().any(|x| x == "*" || x == v);
        let rule = &grant.rule;
        let names = rule.resource_names.as_deref().unwrap_or_default();
        grant
            .namespace
            .as_ref()
            .is_none_or(|ns| self.namespace.as_ref() == Some(ns))
            && has(&rule.verbs, &self.verb)
            && has(rule.api_groups.as_deref().unwrap_or_default(), &self.group)
            && has(
                rule.resources.as_deref().unwrap_or_default(),
                &self.resource,
            )
            && (names.is_empty() || self.name.as_ref().is_some_and(|n| names.contains(n)))
    }
}

impl std::fmt::Display for Attributes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let group = if self.group.is_empty() {
            "core"
        } else {
            &self.group
        };
        write!(f, "{} {group}/{}", self.verb, self.resource)?;
        if let Some(name) = &self.name {
            write!(f, " {name}")?;
        }
        if let Some(ns) = &self.namespace {
            write!(f, " in {ns}")?;
        }
        Ok(())
    }
}

/// The kinds the server serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// v1 Namespace.
    Namespace,
    /// v1 Pod.
    Pod,
    /// v1 Node.
    Node,
    /// v1 Service.
    Service,
    /// networking.k8s.io/v1 NetworkPolicy.
    NetworkPolicy,
    /// discovery.k8s.io/v1 EndpointSlice.
    EndpointSlice,
    /// about.k8s.io/v1alpha1 ClusterProperty (KEP-2149), cluster-scoped: the one named
    /// `cluster.clusterset.k8s.io` holds the cluster's id in `spec.value`.
    ClusterProperty,
    /// weft.dev/v1alpha1 IdentityPolicy, weft's own namespaced resource.
    IdentityPolicy,
}

/// A request's target: a kind, in a namespace or all, one object by name or all.
struct Target {
    kind: Kind,
    namespace: Option<String>,
    name: Option<String>,
}

impl Kind {
    const ALL: [Kind; 8] = [
        Kind::Namespace,
        Kind::Pod,
        Kind::Node,
        Kind::Service,
        Kind::NetworkPolicy,
        Kind::EndpointSlice,
        Kind::ClusterProperty,
        Kind::IdentityPolicy,
    ];

    /// (URL prefix, plural, namespaced, apiVersion, kind).
    fn api(self) -> (&'static str, &'static str, bool, &'static str, &'static str) {
        match self {
            Kind::Namespace => ("/api/v1", "namespaces", false, "v1", "Namespace"),
            Kind::Pod => ("/api/v1", "pods", true, "v1", "Pod"),
            Kind::Node => ("/api/v1", "nodes", false, "v1", "Node"),
            Kind::Service => ("/api/v1", "services", true, "v1", "Service"),
            Kind::NetworkPolicy => (
                "/apis/networking.k8s.io/v1",
                "networkpolicies",
                true,
                "networking.k8s.io/v1",
                "NetworkPolicy",
            ),
            Kind::EndpointSlice => (
                "/apis/discovery.k8s.io/v1",
                "endpointslices",
                true,
                "discovery.k8s.io/v1",
                "EndpointSlice",
            ),
            Kind::ClusterProperty => (
                "/apis/about.k8s.io/v1alpha1",
                "clusterproperties",
                false,
                "about.k8s.io/v1alpha1",
                "ClusterProperty",
            ),
            Kind::IdentityPolicy => (
                "/apis/weft.dev/v1alpha1",
                "identitypolicies",
                true,
                "weft.dev/v1alpha1",
                "IdentityPolicy",
            ),
        }
    }

    /// What a request path lists, watches or gets: `PREFIX/PLURAL[/NAME]`, or for a
    /// namespaced kind also `PREFIX/namespaces/NS/PLURAL[/NAME]`.
    fn target(path: &str) -> Option<Target> {
        Kind::ALL.into_iter().find_map(|kind| {
            let (prefix, plural, namespaced, _, _) = kind.api();
            let rest = path.strip_prefix(prefix)?.strip_prefix('/')?;
            let (namespace, rest) = match rest.strip_prefix("namespaces/") {
                Some(in_ns) if namespaced => {
                    let (ns, rest) = in_ns.split_once('/')?;
                    (Some(ns.to_owned()), rest)
                }
                _ => (None, rest),
            };
            let name = match rest.strip_prefix(plural)? {
                "" => None,
                named => Some(named.strip_prefix('/')?.to_owned()),
            };
            if name
                .as_deref()
                .is_some_and(|n| n.is_empty() || n.contains('/'))
            {
                return None;
            }
            Some(Target {
                kind,
                namespace,
                name,
            })
        })
    }
}

/// A fault the server can be told to have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Fault {
    /// Serve normally.
    #[default]
    None,
    /// Close every connection as soon as it is accepted, and every open watch.
    Down,
    /// Answer every request with 500.
    InternalError,
    /// Never answer, and stop delivering events on open watches.
    Hang,
}

/// What open watches are told.
#[derive(Debug, Clone)]
enum Signal {
    Event {
        rv: u64,
        kind: Kind,
        namespace: String,
        kind_of_change: &'static str,
        object: Arc<Value>,
    },
    Bookmark,
    Expire,
    Close,
}

#[derive(Debug)]
struct Recorded {
    rv: u64,
    kind: Kind,
    namespace: String,
    kind_of_change: &'static str,
    object: Arc<Value>,
}

#[derive(Debug, Default)]
struct State {
    rv: u64,
    objects: BTreeMap<(Kind, String, String), Value>,
    history: Vec<Recorded>,
    /// Watches and continue tokens older than this get 410 Gone.
    oldest: u64,
    fault: Fault,
    /// Answer an expired watch with an HTTP 410 instead of a 200 with an ERROR event.
    gone_as_status: bool,
    event_delay: Duration,
    /// While events are held: the resourceVersion they were held from. Held events are in the
    /// history but not yet sent on open watches.
    holding_since: Option<u64>,
    requests: Vec<String>,
    /// Lists taken, by (kind, namespace, resourceVersion), for their continue tokens.
    lists: BTreeMap<(Kind, Option<String>, u64), Arc<Vec<Value>>>,
    /// The bearer token every request must carry, if any.
    token: Option<String>,
    /// Kinds served as a real server serves a group it does not have (a CRD not installed).
    uninstalled: BTreeSet<Kind>,
    /// Tokens the TokenReview endpoint authenticates, and who they are.
    reviewed: BTreeMap<String, TokenUser>,
    /// When set, only what these grant is served (403 otherwise).
    grants: Option<Vec<Grant>>,
    /// What requests asked under [`State::grants`], and whether it was allowed.
    authorized: Vec<(Attributes, bool)>,
}

/// Who a token is, as TokenReview answers: its user and the audiences it was issued for.
#[derive(Debug, Clone, Default)]
pub struct TokenUser {
    /// `status.user.username`.
    pub username: String,
    /// `status.user.uid`.
    pub uid: String,
    /// `status.user.groups`.
    pub groups: Vec<String>,
    /// `status.user.extra` (a bound token's pod and node).
    pub extra: BTreeMap<String, Vec<String>>,
    /// The audiences the token is for.
    pub audiences: Vec<String>,
}

impl TokenUser {
    /// A projected token of ServiceAccount `namespace/account` for `audience`, bound to pod
    /// `pod` (uid `pod_uid`) and, when given, naming its node as Kubernetes 1.30+ does.
    pub fn bound(
        namespace: &str,
        account: &str,
        audience: &str,
        pod: &str,
        pod_uid: &str,
        node: Option<&str>,
    ) -> Self {
        let mut extra = BTreeMap::from([
            (
                "authentication.kubernetes.io/pod-name".to_owned(),
                vec![pod.to_owned()],
            ),
            (
                "authentication.kubernetes.io/pod-uid".to_owned(),
                vec![pod_uid.to_owned()],
            ),
        ]);
        if let Some(node) = node {
            extra.insert(
                "authentication.kubernetes.io/node-name".to_owned(),
                vec![node.to_owned()],
            );
        }
        Self {
            username: format!("system:serviceaccount:{namespace}:{account}"),
            uid: format!("uid-sa-{namespace}-{account}"),
            groups: vec![
                "system:serviceaccounts".to_owned(),
                format!("system:serviceaccounts:{namespace}"),
                "system:authenticated".to_owned(),
            ],
            extra,
            audiences: vec![audience.to_owned()],
        }
    }
}

/// A running test API server on 127.0.0.1.
pub struct ApiServer {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    signals: broadcast::Sender<Signal>,
    task: tokio::task::JoinHandle<()>,
    pki: Option<Pki>,
}

/// The certificates of a server started with [`ApiServer::start_tls`]: its CA, which signed
/// both the server's certificate (for 127.0.0.1) and a client certificate the server accepts.
pub struct Pki {
    /// The CA certificate, PEM.
    pub ca_pem: String,
    /// A client certificate the server accepts, PEM.
    pub client_cert_pem: String,
    /// The client certificate's private key, PKCS#8 PEM.
    pub client_key_pem: String,
    ca_cert: CertificateDer<'static>,
    server_cert: CertificateDer<'static>,
    server_key: Vec<u8>,
}

fn base64(data: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(data)
}

impl Pki {
    /// A fresh CA, a server certificate for 127.0.0.1 and a client certificate.
    fn generate() -> Self {
        use rcgen::{
            BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose,
            IsCa, KeyPair, KeyUsagePurpose,
        };
        let mut ca = CertificateParams::default();
        ca.distinguished_name
            .push(DnType::CommonName, "weft test API server CA");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().expect("key")).expect("CA");
        let leaf = |sans: Vec<String>, name: &str, usage: ExtendedKeyUsagePurpose| {
            let mut p = CertificateParams::new(sans).expect("params");
            p.distinguished_name.push(DnType::CommonName, name);
            p.extended_key_usages = vec![usage];
            let key = KeyPair::generate().expect("key");
            let cert = p.signed_by(&key, &ca).expect("sign");
            (cert, key)
        };
        let (server, server_key) = leaf(
            vec!["127.0.0.1".into(), "localhost".into()],
            "apiserver",
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        let (client, client_key) = leaf(
            Vec::new(),
            "weft-tracker",
            ExtendedKeyUsagePurpose::ClientAuth,
        );
        Self {
            ca_pem: ca.pem(),
            ca_cert: ca.der().clone(),
            client_cert_pem: client.pem(),
            client_key_pem: client_key.serialize_pem(),
            server_cert: server.der().clone(),
            server_key: server_key.serialize_der(),
        }
    }

    /// The kubeconfig `users[].user` of the client certificate, as a YAML flow mapping.
    pub fn user_entry(&self) -> String {
        format!(
            "{{client-certificate-data: \"{}\", client-key-data: \"{}\"}}",
            base64(&self.client_cert_pem),
            base64(&self.client_key_pem)
        )
    }

    /// A TLS acceptor that requires a client certificate signed by the CA.
    /// The server's TLS side; a client certificate required, or only checked if one comes.
    fn acceptor(&self, client_certificate: bool) -> TlsAcceptor {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca_cert.clone()).expect("CA");
        let builder = rustls::server::WebPkiClientVerifier::builder_with_provider(
            roots.into(),
            provider.clone(),
        );
        let builder = if client_certificate {
            builder
        } else {
            builder.allow_unauthenticated()
        };
        let verifier = builder.build().expect("client verifier");
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.server_key.clone()));
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_client_cert_verifier(verifier)
            .with_single_cert(vec![self.server_cert.clone()], key)
            .expect("server certificate");
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        TlsAcceptor::from(Arc::new(config))
    }
}

/// A kubeconfig with one context per (name, server, user), each context's cluster and user
/// under its name, the user a YAML flow mapping of `users[].user`.
pub fn kubeconfig_with(contexts: &[(&str, &ApiServer, &str)]) -> String {
    let (mut clusters, mut users, mut ctxs) = (String::new(), String::new(), String::new());
    for (name, server, user) in contexts {
        clusters.push_str(&format!(
            "- name: {name}\n  cluster: {}\n",
            server.cluster_entry()
        ));
        users.push_str(&format!("- name: {name}\n  user: {user}\n"));
        ctxs.push_str(&format!(
            "- name: {name}\n  context: {{cluster: {name}, user: {name}}}\n"
        ));
    }
    format!("apiVersion: v1\nkind: Config\nclusters:\n{clusters}contexts:\n{ctxs}users:\n{users}")
}

/// A kubeconfig with one context per (name, server), all with a token the servers ignore
/// unless told otherwise ([`ApiServer::set_token`]).
pub fn kubeconfig(contexts: &[(&str, &ApiServer)]) -> String {
    let with_user: Vec<_> = contexts
        .iter()
        .map(|(n, s)| (*n, *s, "{token: t}"))
        .collect();
    kubeconfig_with(&with_user)
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    // A test that panicked while holding the lock has failed already.
    state.lock().unwrap_or_else(|e| e.into_inner())
}

type Body = BoxBody<Bytes, Infallible>;

fn full(status: StatusCode, body: Value) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())).boxed());
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        "application/json".parse().expect("header"),
    );
    r
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

impl ApiServer {
    /// Starts a plain-HTTP server on an ephemeral port of 127.0.0.1.
    pub async fn start() -> Self {
        Self::start_with(None, true).await
    }

    /// Starts an HTTPS server on an ephemeral port of 127.0.0.1 that requires a client
    /// certificate signed by its CA (see [`ApiServer::pki`]).
    pub async fn start_tls() -> Self {
        Self::start_with(Some(Pki::generate()), true).await
    }

    /// Starts an HTTPS server as a cluster serves its pods: no client certificate required,
    /// who a client is comes from its bearer token ([`ApiServer::set_token`]).
    pub async fn start_tls_for_tokens(token: &str) -> Self {
        let server = Self::start_with(Some(Pki::generate()), false).await;
        server.set_token(Some(token));
        server
    }

    async fn start_with(pki: Option<Pki>, client_certificate: bool) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let state = Arc::new(Mutex::new(State {
            rv: 1,
            oldest: 1,
            ..State::default()
        }));
        let (signals, _) = broadcast::channel(4096);
        let acceptor = pki.as_ref().map(|p| p.acceptor(client_certificate));
        let task = tokio::spawn(serve(listener, acceptor, state.clone(), signals.clone()));
        Self {
            addr,
            state,
            signals,
            task,
            pki,
        }
    }

    /// `http://127.0.0.1:PORT`, or `https://` for a server started with TLS.
    pub fn url(&self) -> String {
        let scheme = if self.pki.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// The certificates of a server started with TLS.
    pub fn pki(&self) -> Option<&Pki> {
        self.pki.as_ref()
    }

    /// The kubeconfig `clusters[].cluster` of this server (its URL, and its CA when it serves
    /// TLS), as a YAML flow mapping.
    pub fn cluster_entry(&self) -> String {
        match &self.pki {
            Some(pki) => format!(
                "{{server: \"{}\", certificate-authority-data: \"{}\"}}",
                self.url(),
                base64(&pki.ca_pem)
            ),
            None => format!("{{server: \"{}\"}}", self.url()),
        }
    }

    /// A kube client for this server, if it is plain HTTP and requires no token.
    pub fn client(&self) -> kube::Client {
        let mut config = kube::Config::new(self.url().parse().expect("url"));
        config.connect_timeout = Some(Duration::from_secs(2));
        config.read_timeout = None;
        kube::Client::try_from(config).expect("client")
    }

    /// Creates or replaces an object (by kind, namespace, name); returns its resourceVersion.
    pub fn apply(&self, kind: Kind, mut object: Value) -> u64 {
        let (_, _, namespaced, api_version, kind_name) = kind.api();
        let name = object["metadata"]["name"]
            .as_str()
            .expect("metadata.name")
            .to_owned();
        let namespace = if namespaced {
            object["metadata"]["namespace"]
                .as_str()
                .unwrap_or("default")
                .to_owned()
        } else {
            String::new()
        };
        let mut st = lock(&self.state);
        st.rv += 1;
        let rv = st.rv;
        object["apiVersion"] = json!(api_version);
        object["kind"] = json!(kind_name);
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        if namespaced {
            object["metadata"]["namespace"] = json!(namespace);
        }
        if object["metadata"]["uid"].is_null() {
            // Unique across servers too, as real UIDs are.
            let port = self.addr.port();
            object["metadata"]["uid"] =
                json!(format!("uid-{kind_name}-{namespace}-{name}-{rv}-{port}"));
        }
        let key = (kind, namespace.clone(), name);
        let change = if st.objects.contains_key(&key) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        st.objects.insert(key, object.clone());
        self.record(&mut st, rv, kind, namespace, change, object);
        rv
    }

    /// Deletes an object; returns the resourceVersion of the deletion, if it existed.
    pub fn delete(&self, kind: Kind, namespace: &str, name: &str) -> Option<u64> {
        let mut st = lock(&self.state);
        let mut object = st
            .objects
            .remove(&(kind, namespace.to_owned(), name.to_owned()))?;
        st.rv += 1;
        let rv = st.rv;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        self.record(&mut st, rv, kind, namespace.to_owned(), "DELETED", object);
        Some(rv)
    }

    fn record(
        &self,
        st: &mut State,
        rv: u64,
        kind: Kind,
        namespace: String,
        kind_of_change: &'static str,
        object: Value,
    ) {
        let object = Arc::new(object);
        st.history.push(Recorded {
            rv,
            kind,
            namespace: namespace.clone(),
            kind_of_change,
            object: object.clone(),
        });
        if st.holding_since.is_some() {
            return;
        }
        // No open watch is fine: the event is in the history.
        let _ = self.signals.send(Signal::Event {
            rv,
            kind,
            namespace,
            kind_of_change,
            object,
        });
    }

    /// Forgets the history: watches and continue tokens from before now get 410 Gone, and
    /// every open watch is told so (as the real server does when its watch cache moves on).
    pub fn compact(&self) {
        let mut st = lock(&self.state);
        st.oldest = st.rv;
        st.history.clear();
        st.lists.clear();
        let _ = self.signals.send(Signal::Expire);
    }

    /// Sends a BOOKMARK with the current resourceVersion on every open watch.
    pub fn bookmark(&self) {
        let _ = self.signals.send(Signal::Bookmark);
    }

    /// Ends every open watch, as a server's watch timeout does.
    pub fn close_watches(&self) {
        let _ = self.signals.send(Signal::Close);
    }

    /// Sets a fault; `Fault::Down` also closes open watches.
    pub fn set_fault(&self, fault: Fault) {
        lock(&self.state).fault = fault;
        if fault == Fault::Down {
            self.close_watches();
        }
    }

    /// Requires `Authorization: Bearer TOKEN` on every request from now on (401 otherwise), or
    /// no token with `None`. Open watches carry on, as on a real server.
    pub fn set_token(&self, token: Option<&str>) {
        lock(&self.state).token = token.map(str::to_owned);
    }

    /// Serves from now on only what `grants` allow, answering anything else 403 Forbidden as
    /// RBAC does; `None` serves everything.
    pub fn authorize(&self, grants: Option<Vec<Grant>>) {
        lock(&self.state).grants = grants;
    }

    /// What requests asked while grants were set ([`ApiServer::authorize`]), and whether they
    /// were allowed, oldest first.
    pub fn authorized(&self) -> Vec<(Attributes, bool)> {
        lock(&self.state).authorized.clone()
    }

    /// Makes TokenReview authenticate `token` as `user` (for the audiences it is for).
    pub fn add_reviewed_token(&self, token: &str, user: TokenUser) {
        lock(&self.state).reviewed.insert(token.to_owned(), user);
    }

    /// Makes TokenReview refuse `token` from now on, as for a revoked or expired token.
    pub fn revoke_reviewed_token(&self, token: &str) {
        lock(&self.state).reviewed.remove(token);
    }

    /// Serves `kind` (true) or answers it as a real server answers a group it does not have
    /// (false): a plain-text 404, as for a CRD not installed.
    pub fn set_installed(&self, kind: Kind, on: bool) {
        let mut st = lock(&self.state);
        if on {
            st.uninstalled.remove(&kind);
        } else {
            st.uninstalled.insert(kind);
        }
    }

    /// Answers expired watches with HTTP 410 (true) or with a 200 carrying an ERROR event.
    pub fn set_gone_as_status(&self, on: bool) {
        lock(&self.state).gone_as_status = on;
    }

    /// Delays every event sent on a watch.
    pub fn set_event_delay(&self, delay: Duration) {
        lock(&self.state).event_delay = delay;
    }

    /// Holds back the events of every change from now on: open watches (and watches started
    /// meanwhile) do not see them until [`ApiServer::release_events_reversed`]. Lists and
    /// GETs see the changes at once. Bookmarks (naming the current version, past the held
    /// events), expiry and closed watches still go out at once; [`ApiServer::compact`]
    /// meanwhile forgets the events held so far (the watches relist).
    pub fn hold_events(&self) {
        let mut st = lock(&self.state);
        let rv = st.rv;
        st.holding_since.get_or_insert(rv);
    }

    /// Sends the events held since [`ApiServer::hold_events`] on every open watch, newest
    /// first: the order a watch would never deliver, for clients that must not trust it (a
    /// delete arriving after the create of an object that reuses the deleted one's address).
    pub fn release_events_reversed(&self) {
        let mut st = lock(&self.state);
        let Some(since) = st.holding_since.take() else {
            return;
        };
        for h in st.history.iter().rev().take_while(|h| h.rv > since) {
            let _ = self.signals.send(Signal::Event {
                rv: h.rv,
                kind: h.kind,
                namespace: h.namespace.clone(),
                kind_of_change: h.kind_of_change,
                object: h.object.clone(),
            });
        }
    }

    /// The current resourceVersion.
    pub fn resource_version(&self) -> u64 {
        lock(&self.state).rv
    }

    /// The requests served so far (`path?query`), oldest first.
    pub fn requests(&self) -> Vec<String> {
        lock(&self.state).requests.clone()
    }
}

async fn serve(
    listener: TcpListener,
    acceptor: Option<TlsAcceptor>,
    state: Arc<Mutex<State>>,
    signals: broadcast::Sender<Signal>,
) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        if lock(&state).fault == Fault::Down {
            drop(tcp);
            continue;
        }
        let (state, signals, acceptor) = (state.clone(), signals.clone(), acceptor.clone());
        tokio::spawn(async move {
            match acceptor {
                // A client without an acceptable certificate fails the handshake.
                Some(acceptor) => {
                    if let Ok(tls) = acceptor.accept(tcp).await {
                        serve_connection(tls, state, signals).await;
                    }
                }
                None => serve_connection(tcp, state, signals).await,
            }
        });
    }
}

async fn serve_connection(
    io: impl AsyncRead + AsyncWrite + Unpin + Send + 'static,
    state: Arc<Mutex<State>>,
    signals: broadcast::Sender<Signal>,
) {
    let service = hyper::service::service_fn(move |req| {
        let (state, signals) = (state.clone(), signals.clone());
        async move { Ok::<_, Infallible>(handle(req, state, signals).await) }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(io), service)
        .await;
}

/// Decodes `%XX` escapes (the client escapes continue tokens and selectors).
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = b
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (b[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn query(req: &Request<Incoming>) -> BTreeMap<String, String> {
    req.uri()
        .query()
        .unwrap_or_default()
        .split('&')
        .filter_map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (!k.is_empty()).then(|| (percent_decode(k), percent_decode(v)))
        })
        .collect()
}

async fn handle(
    req: Request<Incoming>,
    state: Arc<Mutex<State>>,
    signals: broadcast::Sender<Signal>,
) -> Response<Body> {
    let q = query(&req);
    let (fault, token) = {
        let mut st = lock(&state);
        st.requests.push(req.uri().to_string());
        (st.fault, st.token.clone())
    };
    match fault {
        Fault::InternalError => {
            return full(
                StatusCode::INTERNAL_SERVER_ERROR,
                status(500, "InternalError", "injected fault"),
            );
        }
        Fault::Hang => std::future::pending::<()>().await,
        // A client's pooled connection outlives the fault: refuse and close it.
        Fault::Down => {
            let mut r = full(
                StatusCode::SERVICE_UNAVAILABLE,
                status(503, "ServiceUnavailable", "injected fault: down"),
            );
            r.headers_mut()
                .insert(http::header::CONNECTION, "close".parse().expect("header"));
            return r;
        }
        Fault::None => {}
    }
    if let Some(token) = token {
        let presented = req
            .headers()
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if presented != Some(token.as_str()) {
            return full(
                StatusCode::UNAUTHORIZED,
                status(401, "Unauthorized", "Unauthorized"),
            );
        }
    }
    if let Some(asked) = attributes(&req, &q) {
        let mut st = lock(&state);
        if let Some(grants) = &st.grants {
            let allowed = grants.iter().any(|g| asked.allowed_by(g));
            st.authorized.push((asked.clone(), allowed));
            if !allowed {
                let scope = match &asked.namespace {
                    Some(ns) => format!("in the namespace \"{ns}\""),
                    None => "at the cluster scope".to_owned(),
                };
                let message = format!(
                    "{} is forbidden: User \"test\" cannot {} resource \"{}\" in API group \"{}\" {scope}",
                    asked.resource, asked.verb, asked.resource, asked.group
                );
                return full(StatusCode::FORBIDDEN, status(403, "Forbidden", &message));
            }
        }
    }
    if req.method() == http::Method::POST && req.uri().path() == TOKEN_REVIEWS {
        return token_review(req, &state).await;
    }
    let Some(target) = Kind::target(req.uri().path()) else {
        return full(
            StatusCode::NOT_FOUND,
            status(
                404,
                "NotFound",
                "the server could not find the requested resource",
            ),
        );
    };
    if lock(&state).uninstalled.contains(&target.kind) {
        // What kube-apiserver answers for a group or version it does not serve.
        let mut r = Response::new(Full::new(Bytes::from("404 page not found\n")).boxed());
        *r.status_mut() = StatusCode::NOT_FOUND;
        r.headers_mut().insert(
            http::header::CONTENT_TYPE,
            "text/plain; charset=utf-8".parse().expect("header"),
        );
        return r;
    }
    let Target {
        kind,
        namespace,
        name,
    } = target;
    if let Some(name) = name {
        get(kind, namespace.as_deref(), &name, &state)
    } else if is_watch(&q) {
        watch(kind, namespace, &q, state, signals)
    } else {
        list(kind, namespace.as_deref(), &q, &state)
    }
}

/// Whether a request's query asks for a watch.
fn is_watch(q: &BTreeMap<String, String>) -> bool {
    q.get("watch").is_some_and(|w| w == "true" || w == "1")
}

/// Where TokenReviews are created.
const TOKEN_REVIEWS: &str = "/apis/authentication.k8s.io/v1/tokenreviews";

/// What `req` asks, as RBAC sees it; `None` for a path the server does not serve.
fn attributes(req: &Request<Incoming>, q: &BTreeMap<String, String>) -> Option<Attributes> {
    let path = req.uri().path();
    if path == TOKEN_REVIEWS {
        return Some(Attributes {
            verb: "create".into(),
            group: "authentication.k8s.io".into(),
            resource: "tokenreviews".into(),
            namespace: None,
            name: None,
        });
    }
    let target = Kind::target(path)?;
    let (prefix, plural, ..) = target.kind.api();
    let group = prefix
        .strip_prefix("/apis/")
        .and_then(|gv| gv.split_once('/'))
        .map_or("", |(group, _)| group);
    let verb = if target.name.is_some() {
        "get"
    } else if is_watch(q) {
        "watch"
    } else {
        "list"
    };
    Some(Attributes {
        verb: verb.into(),
        group: group.into(),
        resource: plural.into(),
        namespace: target.namespace,
        name: target.name,
    })
}

/// A TokenReview: a registered token for one of the audiences asked for is authenticated,
/// with those audiences; any other is not, with the error a real server gives.
async fn token_review(req: Request<Incoming>, state: &Mutex<State>) -> Response<Body> {
    let review: Value = match req.into_body().collect().await {
        Ok(body) => serde_json::from_slice(&body.to_bytes()).unwrap_or(Value::Null),
        Err(_) => Value::Null,
    };
    let Some(token) = review["spec"]["token"].as_str() else {
        return full(
            StatusCode::BAD_REQUEST,
            status(400, "BadRequest", "spec.token is required"),
        );
    };
    let asked: Vec<String> = review["spec"]["audiences"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let user = lock(state).reviewed.get(token).cloned();
    let answer = match user {
        None => {
            json!({"user": {}, "error": "[invalid bearer token, service account token has been invalidated]"})
        }
        Some(user) => {
            let audiences: Vec<&String> = if asked.is_empty() {
                user.audiences.iter().collect()
            } else {
                user.audiences
                    .iter()
                    .filter(|a| asked.contains(a))
                    .collect()
            };
            if audiences.is_empty() {
                json!({"user": {}, "error": "[invalid bearer token, token audiences is invalid for the target audiences]"})
            } else {
                json!({"authenticated": true, "audiences": audiences,
                       "user": {"username": user.username, "uid": user.uid,
                                "groups": user.groups, "extra": user.extra}})
            }
        }
    };
    full(
        StatusCode::CREATED,
        json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
               "metadata": {"creationTimestamp": null},
               "spec": review["spec"], "status": answer}),
    )
}

/// One object by name, or a 404 Status as the real server words it.
fn get(kind: Kind, namespace: Option<&str>, name: &str, state: &Mutex<State>) -> Response<Body> {
    let (prefix, plural, namespaced, _, _) = kind.api();
    let found = match (namespaced, namespace) {
        (true, Some(ns)) => lock(state)
            .objects
            .get(&(kind, ns.to_owned(), name.to_owned()))
            .cloned(),
        (false, _) => lock(state)
            .objects
            .get(&(kind, String::new(), name.to_owned()))
            .cloned(),
        (true, None) => None,
    };
    match found {
        Some(object) => full(StatusCode::OK, object),
        None => {
            let group = prefix
                .strip_prefix("/apis/")
                .and_then(|gv| gv.split_once('/'))
                .map_or("", |(g, _)| g);
            let resource = if group.is_empty() {
                plural.to_owned()
            } else {
                format!("{plural}.{group}")
            };
            let mut body = status(404, "NotFound", &format!("{resource} \"{name}\" not found"));
            body["details"] = json!({"name": name, "group": group, "kind": plural});
            full(StatusCode::NOT_FOUND, body)
        }
    }
}

fn list(
    kind: Kind,
    namespace: Option<&str>,
    q: &BTreeMap<String, String>,
    state: &Mutex<State>,
) -> Response<Body> {
    let mut st = lock(state);
    let (_, _, _, api_version, kind_name) = kind.api();
    let limit: usize = q.get("limit").and_then(|l| l.parse().ok()).unwrap_or(0);
    // A continue token is "resourceVersion:offset" into the list taken at that version.
    let (list_rv, offset) = match q.get("continue").filter(|c| !c.is_empty()) {
        Some(token) => {
            let parsed = token
                .split_once(':')
                .and_then(|(rv, off)| Some((rv.parse::<u64>().ok()?, off.parse::<usize>().ok()?)));
            match parsed {
                Some((rv, _)) if rv < st.oldest => {
                    return full(
                        StatusCode::GONE,
                        status(410, "Expired", "The provided continue parameter is too old"),
                    );
                }
                Some(p) => p,
                None => {
                    return full(
                        StatusCode::BAD_REQUEST,
                        status(400, "BadRequest", "invalid continue token"),
                    );
                }
            }
        }
        None => (st.rv, 0),
    };
    let key = (kind, namespace.map(str::to_owned), list_rv);
    let items = match st.lists.get(&key) {
        Some(items) => items.clone(),
        None => {
            let items: Arc<Vec<Value>> = Arc::new(
                st.objects
                    .iter()
                    .filter(|((k, ns, _), _)| *k == kind && namespace.is_none_or(|n| n == ns))
                    .map(|(_, v)| v.clone())
                    .collect(),
            );
            st.lists.insert(key, items.clone());
            items
        }
    };
    let end = if limit == 0 {
        items.len()
    } else {
        (offset + limit).min(items.len())
    };
    let page = items.get(offset..end).unwrap_or_default().to_vec();
    let next = (end < items.len()).then(|| format!("{list_rv}:{end}"));
    full(
        StatusCode::OK,
        json!({"apiVersion": api_version, "kind": format!("{kind_name}List"),
               "metadata": {"resourceVersion": list_rv.to_string(), "continue": next.unwrap_or_default()},
               "items": page}),
    )
}

fn watch_line(kind_of_change: &str, object: &Value) -> Bytes {
    let mut line = json!({"type": kind_of_change, "object": object}).to_string();
    line.push('\n');
    Bytes::from(line)
}

fn watch(
    kind: Kind,
    namespace: Option<String>,
    q: &BTreeMap<String, String>,
    state: Arc<Mutex<State>>,
    signals: broadcast::Sender<Signal>,
) -> Response<Body> {
    let from: u64 = q
        .get("resourceVersion")
        .and_then(|rv| rv.parse().ok())
        .unwrap_or(0);
    let bookmarks = q.get("allowWatchBookmarks").is_some_and(|b| b == "true");
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|t| t.parse().ok())
        .map(Duration::from_secs);
    let (_, _, _, api_version, kind_name) = kind.api();
    let gone = watch_line("ERROR", &status(410, "Expired", "too old resource version"));
    // Subscribe and read the history under one lock: no event is missed or seen twice.
    let (backlog, mut rx, delay) = {
        let st = lock(&state);
        if from != 0 && from < st.oldest {
            if st.gone_as_status {
                return full(
                    StatusCode::GONE,
                    status(410, "Expired", "too old resource version"),
                );
            }
            let body = futures::stream::iter([Ok::<_, Infallible>(Frame::data(gone))]);
            return Response::new(http_body_util::BodyExt::boxed(StreamBody::new(body)));
        }
        let in_scope =
            |k: Kind, ns: &str| k == kind && namespace.as_deref().is_none_or(|n| n == ns);
        let backlog: Vec<Bytes> = st
            .history
            .iter()
            .filter(|h| h.rv > from && in_scope(h.kind, &h.namespace))
            // Held events go out on release, to this watch too.
            .filter(|h| st.holding_since.is_none_or(|since| h.rv <= since))
            .map(|h| watch_line(h.kind_of_change, &h.object))
            .collect();
        (backlog, signals.subscribe(), st.event_delay)
    };
    let (tx, body_rx) = tokio::sync::mpsc::channel::<Bytes>(1024);
    tokio::spawn(async move {
        let run = async {
            for line in backlog {
                if tx.send(line).await.is_err() {
                    return;
                }
            }
            loop {
                let line = match rx.recv().await {
                    Ok(Signal::Event {
                        rv,
                        kind: k,
                        namespace: ns,
                        kind_of_change,
                        object,
                    }) => {
                        if rv <= from || k != kind || namespace.as_deref().is_some_and(|n| n != ns)
                        {
                            continue;
                        }
                        watch_line(kind_of_change, &object)
                    }
                    Ok(Signal::Bookmark) if bookmarks => {
                        let rv = lock(&state).rv;
                        watch_line(
                            "BOOKMARK",
                            &json!({"apiVersion": api_version, "kind": kind_name,
                                    "metadata": {"resourceVersion": rv.to_string()}}),
                        )
                    }
                    Ok(Signal::Bookmark) => continue,
                    Ok(Signal::Expire) => {
                        let _ = tx.send(gone.clone()).await;
                        return;
                    }
                    Ok(Signal::Close) | Err(_) => return,
                };
                if lock(&state).fault == Fault::Hang {
                    std::future::pending::<()>().await;
                }
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                if tx.send(line).await.is_err() {
                    return;
                }
            }
        };
        match timeout {
            Some(t) => {
                let _ = tokio::time::timeout(t, run).await;
            }
            None => run.await,
        }
    });
    let body = tokio_stream::wrappers::ReceiverStream::new(body_rx)
        .map(|b| Ok::<_, Infallible>(Frame::data(b)));
    let mut r = Response::new(http_body_util::BodyExt::boxed(StreamBody::new(body)));
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        "application/json".parse().expect("header"),
    );
    r
}
