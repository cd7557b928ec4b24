//! rustls verifiers for SPIFFE mutual TLS (TLS 1.3, ring): a peer's certificate must be a
//! valid SVID leaf (`svid`) and chain to the bundle of the trust domain its own id names —
//! never to "any trusted root" — and a server must be the workload its client expects. The
//! bundles can be replaced at run time: every handshake that starts afterwards sees the new
//! set, without rebuilding a TLS configuration.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, PoisonError, RwLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, Resumption, verify_server_cert_signed_by_trust_anchor};
use rustls::crypto::{
    CryptoProvider, WebPkiSupportedAlgorithms, verify_tls12_signature, verify_tls13_signature,
};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{
    NoServerSessionStorage, ParsedCertificate, ResolvesServerCert, WebPkiClientVerifier,
};
use rustls::time_provider::{DefaultTimeProvider, TimeProvider};
use rustls::{
    CertificateError, ClientConfig, CommonState, DigitallySignedStruct, DistinguishedName,
    OtherError, RootCertStore, ServerConfig, SignatureScheme,
};

use super::bundle::BundleSet;
use super::id::WorkloadId;
use super::svid::{SvidError, leaf_identity};

/// Why a peer, or a bundle set, is refused.
#[derive(thiserror::Error)]
pub enum VerifyError {
    /// The leaf is no valid workload SVID.
    #[error(transparent)]
    Svid(#[from] SvidError),
    /// The peer's trust domain has no bundle: it is neither this one nor federated.
    #[error("{peer}: trust domain {} is not trusted (no bundle for it)", .peer.trust_domain())]
    Untrusted {
        /// The peer's claimed identity.
        peer: WorkloadId,
    },
    /// The chain does not verify against the bundle of the peer's trust domain (another
    /// root, expired, not yet valid, wrong key usage, bad signature).
    #[error("{peer}: not verified by the trust bundle of {}: {error}", .peer.trust_domain())]
    Chain {
        /// The peer's claimed identity.
        peer: WorkloadId,
        /// What rustls (webpki) found (boxed: it is large, and errors are rare).
        error: Box<rustls::Error>,
    },
    /// A verified server that is not the one the client meant to reach.
    #[error("{peer}: not the expected server ({expected})")]
    Unexpected {
        /// The server's proven identity.
        peer: WorkloadId,
        /// What was expected.
        expected: String,
    },
    /// A connection with no peer certificate.
    #[error("the peer presented no certificate")]
    NoCertificate,
    /// A bundle's authority that rustls cannot use as a trust anchor.
    #[error("trust bundle of {trust_domain}: {error}")]
    Anchor {
        /// Whose bundle.
        trust_domain: String,
        /// Why.
        error: String,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Config(rustls::Error),
}

// rustls shows a certificate error of ours by its `Debug` form (in handshake errors, logs of
// whoever holds the connection): make that the message.
impl fmt::Debug for VerifyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl VerifyError {
    fn peer(&self) -> Option<&WorkloadId> {
        match self {
            Self::Untrusted { peer } | Self::Chain { peer, .. } | Self::Unexpected { peer, .. } => {
                Some(peer)
            }
            _ => None,
        }
    }
}

/// The identities a client accepts from a server.
#[derive(Clone)]
pub enum Expected {
    /// Exactly this workload (HBONE: the destination workload).
    Workload(WorkloadId),
    /// Any workload the predicate accepts; `what` describes it in errors and logs.
    Matching {
        /// What the predicate accepts, for people.
        what: String,
        /// The predicate.
        accepts: Arc<dyn Fn(&WorkloadId) -> bool + Send + Sync>,
    },
}

impl Expected {
    fn accepts(&self, peer: &WorkloadId) -> bool {
        match self {
            Self::Workload(id) => id == peer,
            Self::Matching { accepts, .. } => accepts(peer),
        }
    }
}

impl fmt::Display for Expected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Workload(id) => id.fmt(f),
            Self::Matching { what, .. } => f.write_str(what),
        }
    }
}

impl fmt::Debug for Expected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Expected({self})")
    }
}

/// One trust domain's bundle, as rustls uses it.
struct Domain {
    roots: Arc<RootCertStore>,
    clients: Arc<dyn ClientCertVerifier>,
}

/// A bundle set made ready for verification: built off the lock, swapped in whole.
struct Trust {
    bundles: Arc<BundleSet>,
    domains: HashMap<String, Domain>,
}

impl Trust {
    fn new(bundles: BundleSet, provider: &Arc<CryptoProvider>) -> Result<Self, VerifyError> {
        let mut domains = HashMap::new();
        for bundle in bundles.iter() {
            let trust_domain = bundle.trust_domain().to_string();
            let anchor = |error: String| VerifyError::Anchor {
                trust_domain: trust_domain.clone(),
                error,
            };
            let mut roots = RootCertStore::empty();
            for der in bundle.authorities() {
                roots.add(der.clone()).map_err(|e| anchor(e.to_string()))?;
            }
            let roots = Arc::new(roots);
            // rustls's own client verifier, one per trust domain, so that client certificates
            // get webpki's client-usage checks; which one applies is chosen per peer.
            let clients =
                WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
                    .build()
                    .map_err(|e| anchor(e.to_string()))?;
            domains.insert(trust_domain, Domain { roots, clients });
        }
        Ok(Self {
            bundles: Arc::new(bundles),
            domains,
        })
    }

    /// The bundle of `peer`'s trust domain.
    fn domain(&self, peer: &WorkloadId) -> Result<&Domain, VerifyError> {
        self.domains
            .get(peer.trust_domain())
            .ok_or_else(|| VerifyError::Untrusted { peer: peer.clone() })
    }
}

/// The trust bundles the verifiers consult, shared by every configuration built from it and
/// replaceable at run time (root rotation, federation changes).
#[derive(Clone)]
pub struct TrustStore {
    // A std lock: it is taken in rustls's synchronous callbacks, only to clone an Arc.
    current: Arc<RwLock<Arc<Trust>>>,
    provider: Arc<CryptoProvider>,
    clock: Arc<dyn TimeProvider>,
    /// Counts replacements: long-lived connections check their peer again at each.
    generation: Arc<tokio::sync::watch::Sender<u64>>,
}

/// Which side of a connection a peer is, for checking it again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerSide {
    /// The peer is the client (this side serves).
    Client,
    /// The peer is the server.
    Server,
}

impl fmt::Debug for TrustStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let trust = self.current();
        f.debug_struct("TrustStore")
            .field("trust_domains", &trust.domains.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl TrustStore {
    /// A store holding `bundles`, with the ring provider and the system clock.
    pub fn new(bundles: BundleSet) -> Result<Self, VerifyError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let trust = Trust::new(bundles, &provider)?;
        Ok(Self {
            current: Arc::new(RwLock::new(Arc::new(trust))),
            provider,
            clock: Arc::new(DefaultTimeProvider),
            generation: Arc::new(tokio::sync::watch::channel(0).0),
        })
    }

    /// The same store, whose configurations check validity periods against `clock`.
    pub fn with_clock(self, clock: Arc<dyn TimeProvider>) -> Self {
        Self { clock, ..self }
    }

    /// Replaces the bundles for every handshake that starts from now on; on error the old
    /// ones stay.
    pub fn replace(&self, bundles: BundleSet) -> Result<(), VerifyError> {
        let trust = Arc::new(Trust::new(bundles, &self.provider)?);
        let trust_domains: Vec<&String> = trust.domains.keys().collect();
        tracing::info!(?trust_domains, "trust bundles replaced");
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = trust.clone();
        self.generation.send_modify(|g| *g += 1);
        Ok(())
    }

    /// Reads `dir` (see [`BundleSet::load_dir`]) every `interval` and replaces the bundles
    /// when they changed, so that a root rotation reaches the node without a restart; a
    /// directory that does not load is logged and the bundles in force stay.
    pub async fn follow_dir(&self, dir: std::path::PathBuf, interval: std::time::Duration) {
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            match BundleSet::load_dir(&dir) {
                Ok(set) if *self.bundles() == set => {}
                Ok(set) => {
                    if let Err(error) = self.replace(set) {
                        tracing::warn!(dir = %dir.display(), %error, "trust bundles not replaced");
                    }
                }
                Err(error) => {
                    tracing::warn!(dir = %dir.display(), %error, "trust bundles unreadable; keeping those in force");
                }
            }
        }
    }

    /// Resolves, with the reason, once the peer that showed `chain` (leaf first) on a
    /// connection is no longer trusted by the bundles in force — its root dropped, its trust
    /// domain no longer federated: a long-lived connection selects on this and closes rather
    /// than outlive the trust it was admitted on. Never resolves while the peer stays trusted.
    pub async fn until_distrusted(
        &self,
        chain: Vec<CertificateDer<'static>>,
        side: PeerSide,
    ) -> VerifyError {
        let mut changes = self.generation.subscribe();
        loop {
            if changes.changed().await.is_err() {
                // The store is gone with everything built on it.
                return std::future::pending().await;
            }
            let Some((leaf, intermediates)) = chain.split_first() else {
                return VerifyError::NoCertificate;
            };
            let Some(now) = self.clock.current_time() else {
                continue;
            };
            let checked = match side {
                PeerSide::Client => self.client_verifier().check(leaf, intermediates, now),
                PeerSide::Server => self
                    .server_verifier(Expected::Matching {
                        what: "any workload".into(),
                        accepts: Arc::new(|_| true),
                    })
                    .check(leaf, intermediates, now),
            };
            if let Err(e) = checked {
                tracing::info!(error = %e, "a connection's peer is no longer trusted");
                return e;
            }
        }
    }

    /// The bundles in force.
    pub fn bundles(&self) -> Arc<BundleSet> {
        self.current().bundles.clone()
    }

    fn algorithms(&self) -> &WebPkiSupportedAlgorithms {
        &self.provider.signature_verification_algorithms
    }

    fn current(&self) -> Arc<Trust> {
        // The value is only ever swapped whole, so a poisoned lock still holds a good one.
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// A verifier of client certificates, for servers. A configuration built around it
    /// elsewhere than `server_config` must turn session resumption off, which skips it.
    pub fn client_verifier(&self) -> Arc<SpiffeClientVerifier> {
        Arc::new(SpiffeClientVerifier {
            store: self.clone(),
        })
    }

    /// A verifier of server certificates that accepts only `expected`, for clients. A
    /// configuration built around it elsewhere than `client_config` must turn session
    /// resumption off, which skips it.
    pub fn server_verifier(&self, expected: Expected) -> Arc<SpiffeServerVerifier> {
        Arc::new(SpiffeServerVerifier {
            store: self.clone(),
            expected,
        })
    }

    /// A TLS 1.3 server configuration that requires and verifies client SVIDs and presents
    /// what `certs` resolves.
    pub fn server_config(
        &self,
        certs: Arc<dyn ResolvesServerCert>,
    ) -> Result<ServerConfig, VerifyError> {
        let mut config =
            ServerConfig::builder_with_details(self.provider.clone(), self.clock.clone())
                .with_protocol_versions(&[&rustls::version::TLS13])
                .map_err(VerifyError::Config)?
                .with_client_cert_verifier(self.client_verifier())
                .with_cert_resolver(certs);
        // A resumed session skips the verifier: a peer whose root was dropped from the
        // bundle could come back on an old ticket.
        config.session_storage = Arc::new(NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
        Ok(config)
    }

    /// A TLS 1.3 client configuration that accepts only an `expected` server and presents
    /// what `certs` resolves.
    pub fn client_config(
        &self,
        expected: Expected,
        certs: Arc<dyn ResolvesClientCert>,
    ) -> Result<ClientConfig, VerifyError> {
        let mut config =
            ClientConfig::builder_with_details(self.provider.clone(), self.clock.clone())
                .with_protocol_versions(&[&rustls::version::TLS13])
                .map_err(VerifyError::Config)?
                .dangerous()
                .with_custom_certificate_verifier(self.server_verifier(expected))
                .with_client_cert_resolver(certs);
        // As on the server: resumption would skip verification against the current bundles.
        config.resumption = Resumption::disabled();
        Ok(config)
    }
}

/// What rustls is told of a refusal; the log line says who and why.
fn refused(side: &'static str, error: VerifyError) -> rustls::Error {
    tracing::debug!(side, peer = ?error.peer().map(ToString::to_string), %error, "peer certificate refused");
    match error {
        // webpki's own error keeps its specific alert (expired, unknown CA, ...).
        VerifyError::Chain { error, .. } => *error,
        other => {
            rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(other))))
        }
    }
}

/// Verifies client certificates against the bundle of each client's own trust domain.
#[derive(Debug)]
pub struct SpiffeClientVerifier {
    store: TrustStore,
}

impl SpiffeClientVerifier {
    fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<WorkloadId, VerifyError> {
        let peer = leaf_identity(end_entity)?;
        let trust = self.store.current();
        trust
            .domain(&peer)?
            .clients
            .verify_client_cert(end_entity, intermediates, now)
            .map_err(|error| VerifyError::Chain {
                peer: peer.clone(),
                error: Box::new(error),
            })?;
        Ok(peer)
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // Hints would change with the bundles; a workload has one certificate to show anyway.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let peer = self
            .check(end_entity, intermediates, now)
            .map_err(|e| refused("client", e))?;
        tracing::trace!(%peer, "client certificate verified");
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, self.store.algorithms())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, self.store.algorithms())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.store.algorithms().supported_schemes()
    }
}

/// Verifies a server certificate against the bundle of the server's trust domain, and that
/// the server is the one expected. The TLS server name is not used.
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    store: TrustStore,
    expected: Expected,
}

impl SpiffeServerVerifier {
    fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<WorkloadId, VerifyError> {
        let peer = leaf_identity(end_entity)?;
        let trust = self.store.current();
        let domain = trust.domain(&peer)?;
        let chain = |error| VerifyError::Chain {
            peer: peer.clone(),
            error: Box::new(error),
        };
        let parsed = ParsedCertificate::try_from(end_entity).map_err(chain)?;
        let algorithms = self.store.algorithms().all;
        verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &domain.roots,
            intermediates,
            now,
            algorithms,
        )
        .map_err(chain)?;
        if !self.expected.accepts(&peer) {
            return Err(VerifyError::Unexpected {
                peer,
                expected: self.expected.to_string(),
            });
        }
        Ok(peer)
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let peer = self
            .check(end_entity, intermediates, now)
            .map_err(|e| refused("server", e))?;
        tracing::trace!(%peer, "server certificate verified");
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, self.store.algorithms())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, self.store.algorithms())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.store.algorithms().supported_schemes()
    }
}

/// The verified identity of the peer of a connection these verifiers accepted (pass the
/// `ServerConnection` or `ClientConnection`).
pub fn peer_identity(conn: &CommonState) -> Result<WorkloadId, VerifyError> {
    let leaf = conn
        .peer_certificates()
        .and_then(<[_]>::first)
        .ok_or(VerifyError::NoCertificate)?;
    Ok(leaf_identity(leaf)?)
}

#[cfg(test)]
mod tests {
    use rcgen::ExtendedKeyUsagePurpose::{ClientAuth, ServerAuth};
    use rustls::pki_types::ServerName;

    use super::*;
    use crate::identity::bundle::TrustBundle;
    use crate::identity::id::trust_domain;
    use crate::identity::testpki::{Ca, Leaf, at, leaf_params, now_secs, uri, valid};

    const A: &str = "spiffe://a.test/ns/demo/sa/web";
    const B: &str = "spiffe://b.test/ns/demo/sa/api";

    /// A bundle set of `(trust domain, roots)`.
    fn set(bundles: &[(&str, &[&Ca])]) -> BundleSet {
        BundleSet::new(bundles.iter().map(|(name, roots)| {
            let td = trust_domain(name).expect("trust domain");
            TrustBundle::new(td, roots.iter().map(|ca| ca.der()).collect()).expect("bundle")
        }))
        .expect("bundle set")
    }

    fn id(s: &str) -> WorkloadId {
        WorkloadId::parse(s).expect("workload id")
    }

    /// Both verifiers' verdicts on `leaf` at `now`: as a client's, then as a server's (which
    /// must be `A` to be expected).
    fn verdicts(
        store: &TrustStore,
        leaf: &Leaf,
        now: UnixTime,
    ) -> (
        Result<WorkloadId, VerifyError>,
        Result<WorkloadId, VerifyError>,
    ) {
        let client = store.client_verifier();
        let server = store.server_verifier(Expected::Workload(id(A)));
        let (end_entity, intermediates) = (leaf.der(), &leaf.chain[1..]);
        (
            client.check(end_entity, intermediates, now),
            server.check(end_entity, intermediates, now),
        )
    }

    fn now() -> UnixTime {
        at(now_secs())
    }

    /// Our reason inside what rustls was told (its `Display` shows only our `Debug`).
    fn reason(e: &rustls::Error) -> String {
        match e {
            rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(inner))) => {
                inner.to_string()
            }
            other => other.to_string(),
        }
    }

    #[test]
    fn good_leaves_verify_directly_and_through_an_intermediate() {
        let root = Ca::root("a-root");
        let store = TrustStore::new(set(&[("a.test", &[&root])])).expect("store");
        for leaf in [root.leaf(A), root.intermediate("a-ca").leaf(A)] {
            let (client, server) = verdicts(&store, &leaf, now());
            assert_eq!(client.expect("client verified"), id(A));
            assert_eq!(server.expect("server verified"), id(A));
        }
    }

    #[test]
    fn a_chain_to_an_untrusted_root_is_refused() {
        let (root, rogue) = (Ca::root("a-root"), Ca::root("rogue"));
        let store = TrustStore::new(set(&[("a.test", &[&root])])).expect("store");
        let (client, server) = verdicts(&store, &rogue.leaf(A), now());
        for verdict in [client, server] {
            let e = verdict.expect_err("rogue root");
            let unknown = rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer);
            assert!(
                matches!(e, VerifyError::Chain { ref error, .. } if **error == unknown),
                "{e}"
            );
        }
        // What rustls is told keeps webpki's reason, so the alert says "unknown CA".
        let e = store
            .client_verifier()
            .verify_client_cert(rogue.leaf(A).der(), &[], now())
            .expect_err("rogue root");
        assert_eq!(
            e,
            rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)
        );
    }

    #[test]
    fn leaves_are_valid_from_not_before_to_not_after_included() {
        let root = Ca::root("a-root");
        let store = TrustStore::new(set(&[("a.test", &[&root])])).expect("store");
        let (from, until) = (2_000_000_000, 2_000_003_600);
        let mut p = leaf_params(vec![uri(A)]);
        valid(&mut p, from, until);
        let leaf = root.issue(p);
        for (secs, ok) in [
            (from - 1, false),
            (from, true),
            (until, true),
            (until + 1, false),
        ] {
            let (client, server) = verdicts(&store, &leaf, at(secs));
            for verdict in [client, server] {
                match verdict {
                    Ok(_) => assert!(ok, "accepted at {secs}"),
                    Err(VerifyError::Chain { error, .. }) => {
                        assert!(!ok, "refused at {secs}: {error}");
                        assert!(
                            matches!(
                                (secs < from, &*error),
                                (
                                    true,
                                    rustls::Error::InvalidCertificate(
                                        CertificateError::NotValidYetContext { .. }
                                    )
                                ) | (
                                    false,
                                    rustls::Error::InvalidCertificate(
                                        CertificateError::ExpiredContext { .. }
                                    )
                                )
                            ),
                            "at {secs}: {error}"
                        );
                    }
                    Err(e) => panic!("at {secs}: {e}"),
                }
            }
        }
    }

    #[test]
    fn the_bundle_is_the_one_of_the_peers_own_trust_domain() {
        let (ra, rb) = (Ca::root("a-root"), Ca::root("b-root"));
        // A trust domain b id signed by a's root: a's root is trusted, but not for b.
        let store = TrustStore::new(set(&[("a.test", &[&ra]), ("b.test", &[&rb])])).expect("store");
        let (client, _) = verdicts(&store, &ra.leaf(B), now());
        assert!(
            matches!(client, Err(VerifyError::Chain { ref peer, .. }) if *peer == id(B)),
            "{client:?}"
        );
        // Federation {a}: b's own certificates are refused, whoever signed them.
        let store = TrustStore::new(set(&[("a.test", &[&ra])])).expect("store");
        let b_leaf = rb.leaf(B);
        let (client, _) = verdicts(&store, &b_leaf, now());
        let e = client.expect_err("unfederated");
        assert_eq!(
            e.to_string(),
            format!("{B}: trust domain b.test is not trusted (no bundle for it)")
        );
        // Federation {a, b}: the same verifier now accepts them.
        let verifier = store.client_verifier();
        store
            .replace(set(&[("a.test", &[&ra]), ("b.test", &[&rb])]))
            .expect("replace");
        assert_eq!(
            verifier.check(b_leaf.der(), &[], now()).expect("federated"),
            id(B)
        );
        assert!(store.bundles().get("b.test").is_some());
    }

    #[test]
    fn a_server_must_be_the_expected_workload() {
        let root = Ca::root("a-root");
        let store = TrustStore::new(set(&[("a.test", &[&root])])).expect("store");
        let leaf = root.leaf(A);
        let name = ServerName::try_from("spiffe.invalid").expect("name");
        let other = store.server_verifier(Expected::Workload(id("spiffe://a.test/ns/demo/sa/db")));
        let e = other
            .check(leaf.der(), &[], now())
            .expect_err("another workload");
        assert_eq!(
            e.to_string(),
            format!("{A}: not the expected server (spiffe://a.test/ns/demo/sa/db)")
        );
        let demo = store.server_verifier(Expected::Matching {
            what: "namespace demo".into(),
            accepts: Arc::new(|peer: &WorkloadId| peer.namespace() == "demo"),
        });
        demo.verify_server_cert(leaf.der(), &[], &name, &[], now())
            .expect("a workload of namespace demo");
        let prod = store.server_verifier(Expected::Matching {
            what: "namespace prod".into(),
            accepts: Arc::new(|peer: &WorkloadId| peer.namespace() == "prod"),
        });
        let e = prod
            .verify_server_cert(leaf.der(), &[], &name, &[], now())
            .expect_err("not of namespace prod");
        assert_eq!(
            reason(&e),
            format!("{A}: not the expected server (namespace prod)")
        );
    }

    #[test]
    fn a_leaf_is_used_only_for_its_extended_key_usage() {
        let root = Ca::root("a-root");
        let store = TrustStore::new(set(&[("a.test", &[&root])])).expect("store");
        let only = |usage| {
            let mut p = leaf_params(vec![uri(A)]);
            p.extended_key_usages = vec![usage];
            root.issue(p)
        };
        let (client, server) = verdicts(&store, &only(ClientAuth), now());
        assert!(client.is_ok() && server.is_err(), "{client:?} {server:?}");
        let (client, server) = verdicts(&store, &only(ServerAuth), now());
        assert!(client.is_err() && server.is_ok(), "{client:?} {server:?}");
    }

    #[test]
    fn svid_checks_come_first() {
        let root = Ca::root("a-root");
        let store = TrustStore::new(set(&[("a.test", &[&root])])).expect("store");
        let leaf = root.issue(leaf_params(vec![uri(A), uri(B)]));
        let (client, server) = verdicts(&store, &leaf, now());
        for verdict in [client, server] {
            assert!(matches!(verdict, Err(VerifyError::Svid(_))), "{verdict:?}");
        }
        let e = store
            .client_verifier()
            .verify_client_cert(leaf.der(), &[], now())
            .expect_err("two URI SANs");
        assert!(
            reason(&e).contains(": 2 URI SANs, an SVID has exactly one"),
            "{e}"
        );
    }
}
