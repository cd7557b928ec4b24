//! A node's workload certificates: for every identity of a pod on the node, a key generated
//! here (ECDSA P-256, never sent), a CSR to the CA, the certificate cached and renewed at half
//! its lifetime (measured from issuance, with ±10 % jitter so that a node's identities do not
//! renew in step), failures retried with capped exponential backoff while the old certificate
//! stays in use, and identities whose pods left dropped. TLS configurations take certificates
//! through resolvers that look the identity up at each handshake: a renewal changes what new
//! connections present and drops none.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::hash::{BuildHasher as _, Hasher as _};
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::task::JoinHandle;

use super::id::WorkloadId;

/// Why a certificate could not be obtained.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The key or the CSR could not be made.
    #[error("{identity}: making the key or the CSR: {error}")]
    Csr {
        /// The identity.
        identity: WorkloadId,
        /// Why.
        error: rcgen::Error,
    },
    /// The CA refused or could not be reached.
    #[error("{identity}: the CA: {error}")]
    Authority {
        /// The identity.
        identity: WorkloadId,
        /// What the CA said.
        error: String,
    },
    /// What the CA returned is not a certificate for this key and identity.
    #[error("{identity}: the CA's answer: {error}")]
    Answer {
        /// The identity.
        identity: WorkloadId,
        /// Why it is refused.
        error: String,
    },
}

/// A certificate chain as a CA issued it.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The chain, leaf first (DER).
    pub chain: Vec<CertificateDer<'static>>,
    /// How long it is valid from now.
    pub ttl: Duration,
}

/// The answer of an authority.
pub type AuthorityFuture<'a> = Pin<Box<dyn Future<Output = Result<Issued, String>> + Send + 'a>>;

/// What signs a CSR for an identity: the CA's client, or a local CA in tests.
pub trait Authority: Send + Sync + 'static {
    /// Asks for a certificate for `identity` from `csr` (DER), valid for about `ttl`.
    fn sign<'a>(
        &'a self,
        csr: Vec<u8>,
        identity: &'a WorkloadId,
        ttl: Duration,
    ) -> AuthorityFuture<'a>;
}

/// How certificates are asked for and renewed.
#[derive(Debug, Clone)]
pub struct Renewal {
    /// The lifetime asked for (the CA may grant less).
    pub ttl: Duration,
    /// The first retry after a failure; it doubles on each failure.
    pub retry: Duration,
    /// The longest pause between retries while a certificate is in use.
    pub retry_cap: Duration,
    /// The longest pause between retries while the identity has no certificate yet: its pods'
    /// traffic is refused until one comes, so a CA that lagged (its view of a new pod, a
    /// restart) is asked again soon.
    pub first_retry_cap: Duration,
}

impl Default for Renewal {
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(24 * 3600),
            retry: Duration::from_secs(1),
            retry_cap: Duration::from_secs(60),
            first_retry_cap: Duration::from_secs(5),
        }
    }
}

/// One identity's certificate and its history.
#[derive(Debug)]
struct Entry {
    key: Option<Arc<CertifiedKey>>,
    expires: Option<SystemTime>,
    renewals: u64,
    failures: u64,
    last_error: Option<String>,
}

/// What the manager holds, shared with its tasks and resolvers.
#[derive(Debug, Default)]
struct Certificates {
    entries: RwLock<HashMap<WorkloadId, Entry>>,
    /// Counts identities dropped: connections of a dropped identity close.
    dropped: tokio::sync::watch::Sender<u64>,
}

impl Certificates {
    fn current(&self, id: &WorkloadId) -> Option<Arc<CertifiedKey>> {
        self.entries
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .and_then(|e| e.key.clone())
    }

    fn update(&self, id: &WorkloadId, f: impl FnOnce(&mut Entry)) {
        let mut entries = self.entries.write().unwrap_or_else(|e| e.into_inner());
        if let Some(entry) = entries.get_mut(id) {
            f(entry);
        }
    }
}

/// One identity's state, as metrics and logs show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityStatus {
    /// The identity.
    pub identity: WorkloadId,
    /// When its certificate expires (`None` before the first one).
    pub expires: Option<SystemTime>,
    /// Certificates obtained after the first.
    pub renewals: u64,
    /// Failed attempts.
    pub failures: u64,
    /// The last failure, if the last attempt failed.
    pub last_error: Option<String>,
}

/// The certificates of a node's workloads.
pub struct IdentityManager {
    authority: Arc<dyn Authority>,
    renewal: Renewal,
    certificates: Arc<Certificates>,
    tasks: Mutex<HashMap<WorkloadId, JoinHandle<()>>>,
}

impl std::fmt::Debug for IdentityManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentityManager")
            .field("renewal", &self.renewal)
            .field("certificates", &self.certificates)
            .finish_non_exhaustive()
    }
}

impl Drop for IdentityManager {
    fn drop(&mut self) {
        for task in self
            .tasks
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .values()
        {
            task.abort();
        }
    }
}

/// A key pair and a CSR for `identity` (its one URI SAN).
fn key_and_csr(identity: &WorkloadId) -> Result<(KeyPair, Vec<u8>), IdentityError> {
    let bad = |error| IdentityError::Csr {
        identity: identity.clone(),
        error,
    };
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(bad)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(identity.to_string().try_into().map_err(bad)?)];
    let csr = params.serialize_request(&key).map_err(bad)?;
    Ok((key, csr.der().to_vec()))
}

/// The certificate the CA returned, checked against what was asked for: the key made here
/// and the identity requested.
fn certified(
    identity: &WorkloadId,
    key: &KeyPair,
    issued: Issued,
) -> Result<CertifiedKey, IdentityError> {
    let bad = |error: String| IdentityError::Answer {
        identity: identity.clone(),
        error,
    };
    let leaf = issued
        .chain
        .first()
        .ok_or_else(|| bad("an empty chain".into()))?;
    let named = super::svid::leaf_identity(leaf).map_err(|e| bad(e.to_string()))?;
    if named != *identity {
        return Err(bad(format!("the certificate is for {named}")));
    }
    let private = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    CertifiedKey::from_der(
        issued.chain,
        private,
        &rustls::crypto::ring::default_provider(),
    )
    .map_err(|e| bad(format!("the certificate does not fit the key: {e}")))
}

/// A fraction in [-1, 1), random enough to spread renewals.
fn jitter() -> f64 {
    let random = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    (random >> 11) as f64 / (1u64 << 52) as f64 - 1.0
}

/// When to renew a certificate valid for `ttl` from now: at half of it, ±10 % of it.
fn renew_after(ttl: Duration) -> Duration {
    ttl.mul_f64((0.5 + 0.1 * jitter()).clamp(0.0, 1.0))
}

impl IdentityManager {
    /// A manager asking `authority` for certificates as `renewal` says.
    pub fn new(authority: Arc<dyn Authority>, renewal: Renewal) -> Self {
        Self {
            authority,
            renewal,
            certificates: Arc::default(),
            tasks: Mutex::new(HashMap::new()),
        }
    }

    /// The identities of the node's pods now: new ones get certificates, those no pod uses
    /// any more are dropped (their certificates with them).
    pub fn set_identities(&self, wanted: &BTreeSet<WorkloadId>) {
        let mut tasks = self.tasks.lock().unwrap_or_else(|e| e.into_inner());
        tasks.retain(|id, task| {
            let keep = wanted.contains(id);
            if !keep {
                task.abort();
                self.certificates
                    .entries
                    .write()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(id);
                self.certificates.dropped.send_modify(|n| *n += 1);
                tracing::info!(identity = %id, "identity dropped: no pod on this node uses it");
            }
            keep
        });
        for id in wanted {
            if tasks.contains_key(id) {
                continue;
            }
            self.certificates
                .entries
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .insert(
                    id.clone(),
                    Entry {
                        key: None,
                        expires: None,
                        renewals: 0,
                        failures: 0,
                        last_error: None,
                    },
                );
            let task = tokio::spawn(keep_certified(
                id.clone(),
                self.authority.clone(),
                self.renewal.clone(),
                self.certificates.clone(),
            ));
            tasks.insert(id.clone(), task);
        }
    }

    /// The current certificate of `identity`, if it has one.
    pub fn certificate(&self, identity: &WorkloadId) -> Option<Arc<CertifiedKey>> {
        self.certificates.current(identity)
    }

    /// Resolves once `identity` is dropped (no pod on the node uses it any more): its
    /// connections select on this and close.
    pub async fn until_dropped(&self, identity: &WorkloadId) {
        let mut changes = self.certificates.dropped.subscribe();
        loop {
            let held = self
                .certificates
                .entries
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .contains_key(identity);
            if !held || changes.changed().await.is_err() {
                return;
            }
        }
    }

    /// A resolver presenting `identity`'s current certificate at each handshake, as a server
    /// or as a client.
    pub fn resolver(&self, identity: &WorkloadId) -> Arc<IdentityResolver> {
        Arc::new(IdentityResolver {
            certificates: self.certificates.clone(),
            identity: identity.clone(),
        })
    }

    /// Every identity's state.
    pub fn status(&self) -> Vec<IdentityStatus> {
        let entries = self
            .certificates
            .entries
            .read()
            .unwrap_or_else(|e| e.into_inner());
        let mut all: Vec<IdentityStatus> = entries
            .iter()
            .map(|(id, e)| IdentityStatus {
                identity: id.clone(),
                expires: e.expires,
                renewals: e.renewals,
                failures: e.failures,
                last_error: e.last_error.clone(),
            })
            .collect();
        all.sort_by(|a, b| a.identity.cmp(&b.identity));
        all
    }

    /// Adds the identities' metrics to `registry`: seconds until each certificate expires
    /// (negative once expired), renewals and failures.
    pub fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        use prometheus_client::metrics::counter::Counter;
        use prometheus_client::metrics::family::Family;
        use prometheus_client::metrics::gauge::Gauge;
        type Labels = Vec<(&'static str, String)>;
        let expiry = Family::<Labels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        let renewals = Family::<Labels, Counter>::default();
        let failures = Family::<Labels, Counter>::default();
        let now = SystemTime::now();
        for s in self.status() {
            let labels = vec![("identity", s.identity.to_string())];
            if let Some(expires) = s.expires {
                let left = match expires.duration_since(now) {
                    Ok(left) => left.as_secs_f64(),
                    Err(past) => -past.duration().as_secs_f64(),
                };
                expiry.get_or_create(&labels).set(left);
            }
            renewals.get_or_create(&labels).inc_by(s.renewals);
            failures.get_or_create(&labels).inc_by(s.failures);
        }
        registry.register(
            "weft_identity_expiry_seconds",
            "Seconds until the identity's certificate expires.",
            expiry,
        );
        registry.register(
            "weft_identity_renewals",
            "Certificates obtained after the first.",
            renewals,
        );
        registry.register(
            "weft_identity_failures",
            "Failed attempts to obtain a certificate.",
            failures,
        );
    }
}

/// Obtains and renews one identity's certificate until aborted.
async fn keep_certified(
    identity: WorkloadId,
    authority: Arc<dyn Authority>,
    renewal: Renewal,
    certificates: Arc<Certificates>,
) {
    let mut retry = renewal.retry;
    loop {
        match obtain(&identity, authority.as_ref(), renewal.ttl).await {
            Ok((key, ttl)) => {
                let expires = SystemTime::now() + ttl;
                certificates.update(&identity, |e| {
                    if e.key.is_some() {
                        e.renewals += 1;
                    }
                    e.key = Some(Arc::new(key));
                    e.expires = Some(expires);
                    e.last_error = None;
                });
                let wait = renew_after(ttl);
                tracing::info!(identity = %identity, ttl_s = ttl.as_secs_f64(), renew_in_s = wait.as_secs_f64(), "certificate obtained");
                retry = renewal.retry;
                tokio::time::sleep(wait).await;
            }
            Err(e) => {
                tracing::warn!(identity = %identity, error = %e, retry_in = ?retry, "certificate not obtained; the current one stays in use");
                certificates.update(&identity, |entry| {
                    entry.failures += 1;
                    entry.last_error = Some(e.to_string());
                });
                let cap = if certificates.current(&identity).is_some() {
                    renewal.retry_cap
                } else {
                    renewal.first_retry_cap
                };
                retry = retry.min(cap);
                tokio::time::sleep(retry).await;
                retry = (retry * 2).min(cap);
            }
        }
    }
}

/// One certificate: a fresh key, a CSR, the CA's answer checked.
async fn obtain(
    identity: &WorkloadId,
    authority: &dyn Authority,
    ttl: Duration,
) -> Result<(CertifiedKey, Duration), IdentityError> {
    let (key, csr) = key_and_csr(identity)?;
    let issued =
        authority
            .sign(csr, identity, ttl)
            .await
            .map_err(|error| IdentityError::Authority {
                identity: identity.clone(),
                error,
            })?;
    let granted = issued.ttl;
    Ok((certified(identity, &key, issued)?, granted))
}

/// Presents one identity's current certificate: renewals take effect at the next handshake.
#[derive(Debug)]
pub struct IdentityResolver {
    certificates: Arc<Certificates>,
    identity: WorkloadId,
}

impl rustls::server::ResolvesServerCert for IdentityResolver {
    fn resolve(&self, _: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.certificates.current(&self.identity)
    }
}

impl rustls::client::ResolvesClientCert for IdentityResolver {
    fn resolve(&self, _: &[&[u8]], _: &[rustls::SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.certificates.current(&self.identity)
    }

    fn has_certs(&self) -> bool {
        self.certificates.current(&self.identity).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use rcgen::{
        BasicConstraints, CertificateSigningRequestParams, CertifiedIssuer, IsCa, KeyUsagePurpose,
    };
    use rustls_pki_types::CertificateSigningRequestDer;

    /// A CA in the test: signs whatever it is asked for `ttl`, failing the first `fail`
    /// requests; or, `wrong`, signs for another identity.
    struct LocalCa {
        ca: CertifiedIssuer<'static, KeyPair>,
        fail: AtomicUsize,
        signed: AtomicUsize,
        wrong: bool,
    }

    impl LocalCa {
        fn new(fail: usize, wrong: bool) -> Arc<Self> {
            let mut p = CertificateParams::default();
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            p.key_usages = vec![KeyUsagePurpose::KeyCertSign];
            let ca =
                CertifiedIssuer::self_signed(p, KeyPair::generate().expect("key")).expect("ca");
            Arc::new(Self {
                ca,
                fail: AtomicUsize::new(fail),
                signed: AtomicUsize::new(0),
                wrong,
            })
        }
    }

    impl Authority for LocalCa {
        fn sign<'a>(
            &'a self,
            csr: Vec<u8>,
            identity: &'a WorkloadId,
            ttl: Duration,
        ) -> AuthorityFuture<'a> {
            Box::pin(async move {
                if self
                    .fail
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok()
                {
                    return Err("the CA is down".to_owned());
                }
                let mut csr = CertificateSigningRequestParams::from_der(
                    &CertificateSigningRequestDer::from(csr),
                )
                .map_err(|e| e.to_string())?;
                let now = time::OffsetDateTime::now_utc();
                csr.params.not_before = now - time::Duration::minutes(5);
                csr.params.not_after = now + ttl;
                csr.params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
                if self.wrong {
                    csr.params.subject_alt_names = vec![SanType::URI(
                        format!("spiffe://{}/ns/other/sa/other", identity.trust_domain())
                            .try_into()
                            .map_err(|e: rcgen::Error| e.to_string())?,
                    )];
                }
                let cert = csr.signed_by(&self.ca).map_err(|e| e.to_string())?;
                self.signed.fetch_add(1, Ordering::SeqCst);
                Ok(Issued {
                    chain: vec![cert.der().clone()],
                    ttl,
                })
            })
        }
    }

    fn id(sa: &str) -> WorkloadId {
        WorkloadId::parse(&format!("spiffe://c1/ns/demo/sa/{sa}")).expect("id")
    }

    fn quick(ttl: Duration) -> Renewal {
        Renewal {
            ttl,
            retry: Duration::from_millis(20),
            retry_cap: Duration::from_millis(80),
            first_retry_cap: Duration::from_millis(80),
        }
    }

    async fn eventually(what: &str, check: impl Fn() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !check() {
            assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[test]
    fn renewal_is_at_half_the_lifetime_give_or_take_a_tenth() {
        let ttl = Duration::from_secs(100);
        let mut seen = BTreeSet::new();
        for _ in 0..200 {
            let at = renew_after(ttl);
            assert!(
                (Duration::from_secs(40)..=Duration::from_secs(60)).contains(&at),
                "{at:?}"
            );
            seen.insert(at.as_secs());
        }
        assert!(seen.len() > 5, "jitter spreads renewals: {seen:?}");
    }

    #[tokio::test]
    async fn certificates_are_obtained_renewed_and_dropped() {
        let ca = LocalCa::new(0, false);
        let manager = IdentityManager::new(ca.clone(), quick(Duration::from_millis(400)));
        let (web, db) = (id("web"), id("db"));
        manager.set_identities(&[web.clone(), db.clone()].into());
        eventually("both certificates", || {
            manager.certificate(&web).is_some() && manager.certificate(&db).is_some()
        })
        .await;
        let first = manager.certificate(&web).expect("cert");
        eventually("a renewal", || {
            manager
                .status()
                .iter()
                .all(|s| s.renewals >= 2 && s.failures == 0)
        })
        .await;
        let renewed = manager.certificate(&web).expect("cert");
        assert_ne!(first.cert, renewed.cert, "a new certificate");
        assert!(
            manager.status()[1].expires.expect("expires") > SystemTime::now(),
            "valid"
        );

        manager.set_identities(&[web.clone()].into());
        assert!(manager.certificate(&db).is_none(), "dropped with its pods");
        let signed = ca.signed.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(600)).await;
        let since = ca.signed.load(Ordering::SeqCst) - signed;
        assert!(
            (1..=4).contains(&since),
            "only web is renewed now ({since} in 600 ms)"
        );
    }

    #[tokio::test]
    async fn failures_are_retried_with_backoff_and_counted() {
        let ca = LocalCa::new(3, false);
        let manager = IdentityManager::new(ca.clone(), quick(Duration::from_secs(60)));
        let web = id("web");
        manager.set_identities(&[web.clone()].into());
        eventually("a certificate after three failures", || {
            manager.certificate(&web).is_some()
        })
        .await;
        let status = &manager.status()[0];
        assert_eq!((status.failures, status.renewals), (3, 0));
        assert_eq!(status.last_error, None);
        let mut registry = prometheus_client::registry::Registry::default();
        manager.register_metrics(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        let labels = "{identity=\"spiffe://c1/ns/demo/sa/web\"}";
        assert!(
            text.contains(&format!("weft_identity_failures_total{labels} 3")),
            "{text}"
        );
        let expiry = text
            .lines()
            .find_map(|l| l.strip_prefix(&format!("weft_identity_expiry_seconds{labels} ")))
            .and_then(|v| v.parse::<f64>().ok())
            .expect("expiry");
        assert!((50.0..=60.0).contains(&expiry), "{expiry}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_first_certificate_is_asked_for_again_within_the_shorter_cap() {
        let ca = LocalCa::new(6, false);
        let renewal = Renewal {
            retry: Duration::from_millis(100),
            retry_cap: Duration::from_secs(60),
            first_retry_cap: Duration::from_millis(200),
            ..quick(Duration::from_secs(60))
        };
        let manager = IdentityManager::new(ca.clone(), renewal);
        let web = id("web");
        let started = tokio::time::Instant::now();
        manager.set_identities(&[web.clone()].into());
        eventually("a certificate after six failures", || {
            manager.certificate(&web).is_some()
        })
        .await;
        // 100 ms, then 200 ms five times; the renewal cap would have made it 6.3 s.
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(1100) && took < Duration::from_millis(1300),
            "{took:?}"
        );
    }

    #[tokio::test]
    async fn a_certificate_for_another_identity_is_refused() {
        let ca = LocalCa::new(0, true);
        let manager = IdentityManager::new(ca, quick(Duration::from_secs(60)));
        let web = id("web");
        manager.set_identities(&[web.clone()].into());
        eventually("a refusal", || manager.status()[0].failures > 0).await;
        assert!(manager.certificate(&web).is_none());
        let error = manager.status()[0].last_error.clone().expect("error");
        assert!(
            error.contains("the certificate is for spiffe://c1/ns/other/sa/other"),
            "{error}"
        );
    }
}
