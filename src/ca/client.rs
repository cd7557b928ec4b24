//! The node agent's side of the CA: a TLS channel to it (the CA verified against the
//! configured root), and one call that turns a CSR into a certificate chain.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject as _;
use tonic::metadata::MetadataValue;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use super::pb;
use crate::tracker::tls::{self, File, Watched};

/// Why no certificate came from the CA.
#[derive(Debug, thiserror::Error)]
pub enum CaClientError {
    /// The URL is not an `https://` URL a channel can be made from.
    #[error("CA {url}: {error}")]
    Url {
        /// The URL.
        url: String,
        /// Why.
        error: String,
    },
    /// The CA cannot be reached, or its certificate does not verify.
    #[error("CA {url}: cannot connect: {error}")]
    Connect {
        /// The URL.
        url: String,
        /// Why.
        error: tonic::transport::Error,
    },
    /// The token cannot be sent as metadata.
    #[error("the token is not a valid metadata value (visible ASCII only)")]
    Token,
    /// The CA refused.
    #[error("CA refused: {0}")]
    Refused(tonic::Status),
    /// The CA answered with something that is not a certificate for the identity asked for.
    #[error("CA answer: {0}")]
    Answer(String),
    /// The root file cannot be used.
    #[error("{0}")]
    Root(String),
}

/// A certificate chain from the CA.
#[derive(Debug, Clone)]
pub struct Svid {
    /// The chain, PEM, leaf first.
    pub chain: Vec<String>,
    /// The lifetime granted, from the time of signing.
    pub ttl: Duration,
}

/// A channel to the CA at `url` (`https://HOST:PORT`), whose certificate must verify against
/// `root` for that host.
pub async fn connect(url: &str, root: Certificate) -> Result<Channel, CaClientError> {
    endpoint(url, root, None)?
        .connect()
        .await
        .map_err(|error| CaClientError::Connect {
            url: url.to_owned(),
            error,
        })
}

/// A channel to the CA at `url` that connects at its first call (and again after a failure),
/// so that a node agent can start before its CA; the CA's certificate must verify against
/// `root` for `server_name`, or for the URL's host.
pub fn lazy(
    url: &str,
    root: Certificate,
    server_name: Option<&str>,
) -> Result<Channel, CaClientError> {
    Ok(endpoint(url, root, server_name)?.connect_lazy())
}

/// Why `url` cannot be the CA's: it must be `https://` and name a host that can be dialled.
fn check_url(url: &str) -> Result<(), CaClientError> {
    let bad = |error: String| CaClientError::Url {
        url: url.to_owned(),
        error,
    };
    if !url.starts_with("https://") {
        return Err(bad("the CA is reached over TLS: use https://".into()));
    }
    match crate::endpoint::unreachable_host(url) {
        Some(error) => Err(bad(error)),
        None => Ok(()),
    }
}

fn endpoint(
    url: &str,
    root: Certificate,
    server_name: Option<&str>,
) -> Result<Endpoint, CaClientError> {
    let bad = |error: String| CaClientError::Url {
        url: url.to_owned(),
        error,
    };
    check_url(url)?;
    let mut tls = ClientTlsConfig::new().ca_certificate(root);
    if let Some(name) = server_name {
        tls = tls.domain_name(name);
    }
    Ok(Endpoint::from_shared(url.to_owned())
        .map_err(|e| bad(e.to_string()))?
        .tls_config(tls)
        .map_err(|error| CaClientError::Connect {
            url: url.to_owned(),
            error,
        })?
        .connect_timeout(Duration::from_secs(5)))
}

/// Asks the CA on `channel`, as the node whose token is `token`, to sign `csr` (PEM or DER)
/// for `identity` with a lifetime of `ttl` (zero: the CA's maximum). The leaf is checked to
/// name exactly `identity`; the chain is verified by whoever uses it.
pub async fn create_certificate(
    channel: Channel,
    token: &str,
    csr: &[u8],
    identity: &str,
    ttl: Duration,
) -> Result<Svid, CaClientError> {
    let mut request = tonic::Request::new(pb::CreateCertificateRequest {
        csr: csr.to_vec(),
        identity: identity.to_owned(),
        ttl_seconds: ttl.as_secs(),
    });
    let bearer: MetadataValue<_> = format!("Bearer {token}")
        .parse()
        .map_err(|_| CaClientError::Token)?;
    request.metadata_mut().insert("authorization", bearer);
    let answer = pb::ca_client::CaClient::new(channel)
        .create_certificate(request)
        .await
        .map_err(CaClientError::Refused)?
        .into_inner();
    let leaf = answer
        .cert_chain
        .first()
        .ok_or_else(|| CaClientError::Answer("an empty chain".into()))?;
    let der = CertificateDer::from_pem_slice(leaf.as_bytes())
        .map_err(|e| CaClientError::Answer(format!("the leaf is not PEM: {e}")))?;
    let named = spiffe::cert::spiffe_id_from_der(&der)
        .map_err(|e| CaClientError::Answer(format!("the leaf: {e}")))?;
    if named.to_string() != identity {
        return Err(CaClientError::Answer(format!(
            "the leaf is for {named}, not {identity}"
        )));
    }
    Ok(Svid {
        chain: answer.cert_chain,
        ttl: Duration::from_secs(answer.ttl_seconds),
    })
}

/// The node's credential for the CA: a fixed bootstrap token, or a token file re-read on
/// every call (a projected ServiceAccount token is rotated in place by the kubelet).
#[derive(Debug, Clone)]
pub enum Token {
    /// A bootstrap token.
    Fixed(String),
    /// A file holding the token.
    File(std::path::PathBuf),
}

impl Token {
    fn read(&self) -> Result<String, String> {
        match self {
            Token::Fixed(token) => Ok(token.clone()),
            Token::File(path) => std::fs::read_to_string(path)
                .map(|t| t.trim().to_owned())
                .map_err(|e| format!("token file {}: {e}", path.display())),
        }
    }
}

/// The CA as the node's identity manager sees it: a channel and the node's credential.
#[derive(Debug, Clone)]
pub struct RemoteCa {
    channel: Arc<CaChannel>,
    token: Token,
}

/// Where the channel to the CA comes from.
#[derive(Debug)]
enum CaChannel {
    /// One made by the caller.
    Fixed(Channel),
    /// One made from the root file, made again when the file changes (a renewed root
    /// bundle takes effect at once, for the connections made from then on).
    Root(Watched<Channel>),
}

impl RemoteCa {
    /// The CA on `channel`, called with `token`.
    pub fn new(channel: Channel, token: Token) -> Self {
        Self {
            channel: Arc::new(CaChannel::Fixed(channel)),
            token,
        }
    }

    /// The CA at `url`, verified against the roots of the file `root` (`--ca-root`, read
    /// again when it changes) for `server_name` or the URL's host, connected at its first
    /// call; called with `token`. Call it inside the runtime.
    pub fn with_root_file(
        url: &str,
        root: &Path,
        server_name: Option<&str>,
        token: Token,
    ) -> Result<Self, CaClientError> {
        // A bad URL is named as such, not as a bad root file.
        check_url(url)?;
        let (url, server_name) = (url.to_owned(), server_name.map(str::to_owned));
        let read = move |files: &[File]| {
            let [(flag, path)] = files else {
                unreachable!("the CA's root is one file");
            };
            let pem = tls::certificates(flag, path)?;
            lazy(&url, Certificate::from_pem(pem), server_name.as_deref())
                .map_err(|e| tls::bad(flag, path, e.to_string()))
        };
        let watched = Watched::load(vec![("--ca-root", root.to_owned())], read)
            .map_err(|e| CaClientError::Root(e.to_string()))?;
        Ok(Self {
            channel: Arc::new(CaChannel::Root(watched)),
            token,
        })
    }

    /// The channel to call on now.
    fn channel(&self) -> Channel {
        match &*self.channel {
            CaChannel::Fixed(channel) => channel.clone(),
            CaChannel::Root(watched) => watched.with(Channel::clone),
        }
    }
}

impl crate::identity::manager::Authority for RemoteCa {
    fn sign<'a>(
        &'a self,
        csr: Vec<u8>,
        identity: &'a crate::identity::WorkloadId,
        ttl: Duration,
    ) -> crate::identity::manager::AuthorityFuture<'a> {
        Box::pin(async move {
            let token = self.token.read()?;
            let svid = create_certificate(self.channel(), &token, &csr, &identity.to_string(), ttl)
                .await
                .map_err(|e| e.to_string())?;
            let chain = svid
                .chain
                .iter()
                .map(|pem| {
                    CertificateDer::from_pem_slice(pem.as_bytes())
                        .map_err(|e| format!("CA answer: a certificate is not PEM: {e}"))
                })
                .collect::<Result<Vec<_>, _>>()?;
            Ok(crate::identity::manager::Issued {
                chain,
                ttl: svid.ttl,
            })
        })
    }
}
