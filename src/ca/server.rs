//! The CA's gRPC service, served over TLS: every call is authenticated (the bearer token in its
//! metadata names a node), authorised (the identity is of a Running pod of this cluster on that
//! node) and only then signed — per call, never per connection, so that a node evicted or a
//! token revoked between two calls on one channel is refused on the second.

use std::sync::Arc;
use std::time::Duration;

use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status};

use super::authn::{Authenticator, AuthnError};
use super::authz::{Authorizer, AuthzError};
use super::pb;
use super::signer::{CsrError, MAX_CSR_BYTES, Signer};
use crate::identity::WorkloadId;
use crate::tracker::tls::{self, ServingFiles};

/// A request is a CSR and an identity; anything larger is not one.
const MAX_REQUEST_BYTES: usize = MAX_CSR_BYTES + 8192;
/// HTTP/2 pings find a node that vanished without closing its connection.
const KEEPALIVE: Duration = Duration::from_secs(30);

/// The CA: who signs, who authenticates nodes, and who authorises identities.
#[derive(Debug, Clone)]
pub struct Ca {
    signer: Arc<Signer>,
    authn: Arc<dyn Authenticator>,
    authz: Authorizer,
    outcomes: Arc<Outcomes>,
}

/// How calls ended, by gRPC status code (`ok` for a certificate issued).
#[derive(Debug, Default)]
struct Outcomes(std::sync::Mutex<std::collections::BTreeMap<&'static str, u64>>);

impl Outcomes {
    fn count<T>(&self, outcome: &Result<T, Status>) {
        let code = match outcome {
            Ok(_) => "ok",
            Err(s) => match s.code() {
                tonic::Code::Unauthenticated => "unauthenticated",
                tonic::Code::PermissionDenied => "permission_denied",
                tonic::Code::InvalidArgument => "invalid_argument",
                tonic::Code::Unavailable => "unavailable",
                _ => "other",
            },
        };
        *self
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(code)
            .or_default() += 1;
    }
}

impl crate::admin::Report for Ca {
    fn ready(&self) -> Result<(), String> {
        self.authz.ready()
    }

    fn metrics(&self) -> String {
        use prometheus_client::metrics::counter::Counter;
        use prometheus_client::metrics::family::Family;
        let mut registry = prometheus_client::registry::Registry::with_prefix("weft_ca");
        let calls = Family::<Vec<(&'static str, &'static str)>, Counter>::default();
        for (code, n) in self
            .outcomes
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            calls.get_or_create(&vec![("outcome", *code)]).inc_by(*n);
        }
        registry.register(
            "certificate_requests",
            "Certificate requests, by outcome: ok (issued) or the refusal's status.",
            calls,
        );
        let mut text = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &registry);
        text
    }
}

/// The token of an `authorization: Bearer TOKEN` entry, the only one of the request.
fn bearer(metadata: &MetadataMap) -> Result<&str, Status> {
    let mut all = metadata.get_all("authorization").iter();
    let value = all
        .next()
        .ok_or_else(|| Status::unauthenticated("no authorization metadata: send `Bearer TOKEN`"))?;
    if all.next().is_some() {
        return Err(Status::unauthenticated(
            "more than one authorization entry in the metadata",
        ));
    }
    value
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| Status::unauthenticated("the authorization metadata is not `Bearer TOKEN`"))
}

fn authn_status(e: &AuthnError) -> Status {
    match e {
        AuthnError::Refused(_) => Status::unauthenticated(e.to_string()),
        AuthnError::NotTheAgent { .. } | AuthnError::NoNode(_) => {
            Status::permission_denied(e.to_string())
        }
        AuthnError::Unavailable(_) => Status::unavailable(e.to_string()),
    }
}

fn authz_status(e: &AuthzError) -> Status {
    match e {
        AuthzError::NotReady(_) => Status::unavailable(e.to_string()),
        AuthzError::TrustDomain { .. } | AuthzError::NoPod { .. } => {
            Status::permission_denied(e.to_string())
        }
    }
}

fn csr_status(e: &CsrError) -> Status {
    match e {
        CsrError::Signing(_) => Status::internal(e.to_string()),
        _ => Status::invalid_argument(e.to_string()),
    }
}

impl Ca {
    /// A CA that signs with `signer` for nodes that `authn` authenticates, identities that
    /// `authz` authorises.
    pub fn new(signer: Signer, authn: Arc<dyn Authenticator>, authz: Authorizer) -> Self {
        Self {
            signer: Arc::new(signer),
            authn,
            authz,
            outcomes: Arc::default(),
        }
    }

    /// The gRPC service.
    pub fn service(&self) -> pb::ca_server::CaServer<Self> {
        pb::ca_server::CaServer::new(self.clone()).max_decoding_message_size(MAX_REQUEST_BYTES)
    }

    /// Serves the service over TLS with `serving` (the CA's serving certificate and key, as
    /// their files hold them at each connection) on `listener` until `shutdown` resolves.
    pub async fn serve(
        &self,
        listener: tokio::net::TcpListener,
        serving: ServingFiles,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<(), tonic::transport::Error> {
        let incoming = tls::incoming(listener, move || serving.server_config());
        tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(KEEPALIVE))
            .http2_keepalive_timeout(Some(KEEPALIVE / 3))
            .add_service(self.service())
            .serve_with_incoming_shutdown(incoming, shutdown)
            .await
    }
}

#[tonic::async_trait]
impl pb::ca_server::Ca for Ca {
    async fn create_certificate(
        &self,
        request: Request<pb::CreateCertificateRequest>,
    ) -> Result<Response<pb::CreateCertificateResponse>, Status> {
        let outcome = self.issue(request).await;
        self.outcomes.count(&outcome);
        outcome
    }
}

impl Ca {
    /// One call: who asks, for what, and the certificate or the refusal.
    async fn issue(
        &self,
        request: Request<pb::CreateCertificateRequest>,
    ) -> Result<Response<pb::CreateCertificateResponse>, Status> {
        let (metadata, _, request) = request.into_parts();
        let token = bearer(&metadata).inspect_err(|s| {
            tracing::warn!(error = s.message(), "certificate refused: no credentials");
        })?;
        let node = self.authn.authenticate(token).await.map_err(|e| {
            tracing::warn!(error = %e, "certificate refused: node not authenticated");
            authn_status(&e)
        })?;
        let refused = |error: &dyn std::fmt::Display| {
            tracing::warn!(%node, %error, "certificate refused");
        };
        let id = WorkloadId::parse(&request.identity).map_err(|e| {
            refused(&e);
            Status::invalid_argument(format!("identity: {e}"))
        })?;
        let entitled = self.authz.authorize(&node, &id).map_err(|e| {
            refused(&e);
            authz_status(&e)
        })?;
        let issued = self
            .signer
            .sign(&request.csr, &id, Duration::from_secs(request.ttl_seconds))
            .map_err(|e| {
                refused(&e);
                csr_status(&e)
            })?;
        tracing::info!(
            %node,
            identity = %id,
            serial = %issued.serial,
            ttl_seconds = issued.ttl.as_secs(),
            pod = %entitled.pod,
            pod_uid = %entitled.uid,
            cluster = %self.authz.cluster(),
            "certificate issued"
        );
        Ok(Response::new(pb::CreateCertificateResponse {
            cert_chain: issued.chain,
            ttl_seconds: issued.ttl.as_secs(),
        }))
    }
}
