//! Mutual TLS for the tracker's stream: a certificate, its key and the CA that both sides
//! verify each other against, read from PEM files and checked when read, so that a wrong
//! file is named at start rather than at the first handshake; read again when they change
//! (a renewed Secret is rewritten in place), so that each new connection, the tracker's as a
//! server (`incoming`, which also bounds each source's handshakes) and a subscriber's as a
//! client, uses the current ones. The CA's serving certificate (`ServingFiles`) and a node's
//! root for the CA are read the same way.

use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use rustls::server::danger::ClientCertVerifier;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

use crate::proxy::hbone::Sources;

/// Time from accept until a client's TLS handshake is done; past it the connection is closed.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Handshakes one source address may have under way at once (a node's agent has one); past
/// it, a new connection is reset at accept, before TLS or a task.
pub const PENDING_HANDSHAKES_PER_SOURCE: usize = 32;

/// Why TLS material cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file cannot be read.
    #[error("{flag} {}: {error}", .path.display())]
    Read {
        /// The flag that named it.
        flag: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        error: std::io::Error,
    },
    /// A file holds no usable PEM object of the kind expected.
    #[error("{flag} {}: {error}", .path.display())]
    Pem {
        /// The flag that named it.
        flag: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        error: String,
    },
}

/// Files read again when one of them changes (a Secret's files are replaced as a whole when
/// it is renewed): what they held when last read, the last good reading kept, and the failure
/// logged, while the new files do not load.
pub(crate) struct Watched<T> {
    files: Vec<File>,
    read: Reader<T>,
    loaded: Mutex<(Stamp, T)>,
}

impl<T> std::fmt::Debug for Watched<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watched")
            .field("files", &self.files)
            .finish()
    }
}

/// A file, with the flag that names it.
pub(crate) type File = (&'static str, PathBuf);

/// How the files are read and checked.
type Reader<T> = Box<dyn Fn(&[File]) -> Result<T, TlsError> + Send + Sync>;

/// Each file's inode, length and modification time: any renewal changes them.
type Stamp = Vec<Option<(u64, u64, SystemTime)>>;

fn stamp(files: &[File]) -> Stamp {
    files
        .iter()
        .map(|(_, path)| {
            let meta = std::fs::metadata(path).ok()?;
            Some((meta.ino(), meta.len(), meta.modified().ok()?))
        })
        .collect()
}

impl<T> Watched<T> {
    /// Reads `files` (each with the flag that names it) with `read`; an error names the file.
    pub(crate) fn load(
        files: Vec<File>,
        read: impl Fn(&[File]) -> Result<T, TlsError> + Send + Sync + 'static,
    ) -> Result<Self, TlsError> {
        let read: Reader<T> = Box::new(read);
        let loaded = Mutex::new((stamp(&files), read(&files)?));
        Ok(Self {
            files,
            read,
            loaded,
        })
    }

    /// `f` of what the files hold now: read again if they changed since last read.
    pub(crate) fn with<R>(&self, f: impl FnOnce(&T) -> R) -> R {
        let mut loaded = self.loaded.lock().unwrap_or_else(PoisonError::into_inner);
        let now = stamp(&self.files);
        if now != loaded.0 {
            // Once per change, not at every connection while the new files are bad.
            loaded.0 = now;
            let first = self
                .files
                .first()
                .map(|(_, path)| path.display().to_string());
            match (self.read)(&self.files) {
                Ok(fresh) => {
                    tracing::info!(file = first, "TLS files read again");
                    loaded.1 = fresh;
                }
                Err(error) => tracing::warn!(
                    %error,
                    "TLS files changed but do not load; the last good ones stay"
                ),
            }
        }
        f(&loaded.1)
    }
}

fn read(flag: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|error| TlsError::Read {
        flag,
        path: path.to_owned(),
        error,
    })
}

/// The error of a file named by `flag` whose content is not what it must be.
pub(crate) fn bad(flag: &'static str, path: &Path, error: String) -> TlsError {
    TlsError::Pem {
        flag,
        path: path.to_owned(),
        error,
    }
}

/// The PEM certificates of the file named by `flag`, checked: at least one, all PEM.
pub(crate) fn certificates(flag: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    let pem = read(flag, path)?;
    let mut count = 0;
    for cert in CertificateDer::pem_slice_iter(&pem) {
        cert.map_err(|e| bad(flag, path, format!("not a PEM certificate: {e}")))?;
        count += 1;
    }
    if count == 0 {
        return Err(bad(flag, path, "no PEM certificate in the file".into()));
    }
    Ok(pem)
}

/// A certificate chain and its key as PEM, checked, and the server configuration that
/// presents them.
struct Served {
    chain: Vec<u8>,
    key: Vec<u8>,
    config: Arc<rustls::ServerConfig>,
}

/// Reads `cert` and `key` (in that order, then what `clients` reads) into a configuration
/// serving HTTP/2 that asks for client certificates verified by what `clients` gives, or
/// for none.
fn served(
    (cert_flag, cert): &File,
    (key_flag, key): &File,
    clients: impl FnOnce() -> Result<Option<Arc<dyn ClientCertVerifier>>, TlsError>,
) -> Result<Served, TlsError> {
    let chain = certificates(cert_flag, cert)?;
    let key_pem = read(key_flag, key)?;
    let private = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| bad(key_flag, key, format!("no PEM private key: {e}")))?;
    let clients = clients()?;
    let certs = CertificateDer::pem_slice_iter(&chain)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(cert_flag, cert, e.to_string()))?;
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(cert_flag, cert, e.to_string()))?;
    let builder = match clients {
        Some(clients) => builder.with_client_cert_verifier(clients),
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(certs, private).map_err(|e| {
        bad(
            key_flag,
            key,
            format!("does not match {}: {e}", cert.display()),
        )
    })?;
    // gRPC is HTTP/2 only.
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Served {
        chain,
        key: key_pem,
        config: Arc::new(config),
    })
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A certificate chain, its key and the CA that peers are verified against (mutual TLS), as
/// their files hold them now. Cheap to clone.
#[derive(Debug, Clone)]
pub struct TlsFiles(Arc<Watched<Material>>);

/// The checked PEM material of [`TlsFiles`], and the server configuration made of it.
#[derive(Debug)]
struct Material {
    chain: Vec<u8>,
    key: Vec<u8>,
    ca: Vec<u8>,
    server: Arc<rustls::ServerConfig>,
}

impl Material {
    fn read(files: &[File]) -> Result<Self, TlsError> {
        let [cert, key, (ca_flag, ca)] = files else {
            unreachable!("TlsFiles watches three files");
        };
        let mut ca_pem = Vec::new();
        let clients = || {
            ca_pem = certificates(ca_flag, ca)?;
            let mut roots = rustls::RootCertStore::empty();
            for root in CertificateDer::pem_slice_iter(&ca_pem).flatten() {
                roots
                    .add(root)
                    .map_err(|e| bad(ca_flag, ca, format!("not a CA certificate: {e}")))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider(),
            )
            .build()
            .map_err(|e| bad(ca_flag, ca, e.to_string()))?;
            Ok(Some(verifier))
        };
        let served = served(cert, key, clients)?;
        Ok(Self {
            chain: served.chain,
            key: served.key,
            ca: ca_pem,
            server: served.config,
        })
    }
}

impl TlsFiles {
    /// Reads and checks the PEM files of `--tls-cert`, `--tls-key` and `--tls-ca`.
    pub fn load(cert: &Path, key: &Path, ca: &Path) -> Result<Self, TlsError> {
        let files = vec![
            ("--tls-cert", cert.to_owned()),
            ("--tls-key", key.to_owned()),
            ("--tls-ca", ca.to_owned()),
        ];
        Ok(Self(Arc::new(Watched::load(files, Material::read)?)))
    }

    /// The server's side, as the files hold it now: its certificate, and a client certificate
    /// required and verified against the CA.
    pub fn server_config(&self) -> Arc<rustls::ServerConfig> {
        self.0.with(|material| material.server.clone())
    }

    /// The client's side, as the files hold it now: the server verified against the CA (and
    /// its name against the URL's host), and this certificate presented.
    pub fn client(&self) -> ClientTlsConfig {
        self.0.with(|material| {
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(&material.ca))
                .identity(Identity::from_pem(&material.chain, &material.key))
        })
    }
}

/// A serving certificate and its key, with no client certificate asked for (the CA's: nodes
/// authenticate with tokens), as their files hold them now. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ServingFiles(Arc<Watched<Arc<rustls::ServerConfig>>>);

impl ServingFiles {
    /// Reads and checks the PEM files of `--serving-cert` and `--serving-key`.
    pub fn load(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let files = vec![
            ("--serving-cert", cert.to_owned()),
            ("--serving-key", key.to_owned()),
        ];
        let read = |files: &[File]| match files {
            [cert, key] => served(cert, key, || Ok(None)).map(|served| served.config),
            _ => unreachable!("ServingFiles watches two files"),
        };
        Ok(Self(Arc::new(Watched::load(files, read)?)))
    }

    /// The server configuration, as the files hold it now.
    pub fn server_config(&self) -> Arc<rustls::ServerConfig> {
        self.0.with(Arc::clone)
    }
}

/// The connections of `listener`, each after a TLS handshake with the configuration `tls`
/// gives at its accept (within [`HANDSHAKE_TIMEOUT`]; one that fails is logged and dropped),
/// for tonic's `serve_with_incoming`. Accepting stops once the stream is dropped.
pub fn incoming(
    listener: TcpListener,
    tls: impl Fn() -> Arc<rustls::ServerConfig> + Send + 'static,
) -> tokio_stream::wrappers::ReceiverStream<std::io::Result<TlsStream<TcpStream>>> {
    let (accepted, stream) = tokio::sync::mpsc::channel(64);
    let pending = Arc::new(Sources::new(
        "TLS handshakes",
        PENDING_HANDSHAKES_PER_SOURCE,
    ));
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = tokio::select! {
                next = listener.accept() => match next {
                    Ok(next) => next,
                    Err(error) => {
                        // Out of descriptors, say: pause rather than spin.
                        tracing::warn!(%error, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                () = accepted.closed() => return,
            };
            // A storm of connections that never finish TLS costs an accept and a reset each.
            let Some(slot) = pending.take(peer.ip()) else {
                let _ = socket2::SockRef::from(&tcp).set_linger(Some(Duration::ZERO));
                continue;
            };
            // Updates are small and must not wait for the peer's delayed ACK (Nagle).
            if let Err(error) = tcp.set_nodelay(true) {
                tracing::debug!(%peer, %error, "TCP_NODELAY not set");
            }
            let acceptor = tokio_rustls::TlsAcceptor::from(tls());
            let accepted = accepted.clone();
            tokio::spawn(async move {
                let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await;
                drop(slot);
                match handshake {
                    Ok(Ok(stream)) => {
                        let _ = accepted.send(Ok(stream)).await;
                    }
                    Ok(Err(error)) => tracing::debug!(%peer, %error, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_files_are_named_with_their_flag() {
        let dir = tempfile::tempdir().expect("tempdir");
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not pem at all\n").expect("write");
        let missing = dir.path().join("missing.pem");
        let e = TlsFiles::load(&missing, &junk, &junk).expect_err("missing");
        assert!(
            e.to_string().starts_with("--tls-cert ") && e.to_string().contains("missing.pem"),
            "{e}"
        );
        let e = TlsFiles::load(&junk, &junk, &junk).expect_err("junk");
        assert!(
            e.to_string().contains("--tls-cert") && e.to_string().contains("no PEM certificate"),
            "{e}"
        );
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("cert");
        let cert_file = dir.path().join("cert.pem");
        std::fs::write(&cert_file, cert.cert.pem()).expect("write");
        let e = TlsFiles::load(&cert_file, &cert_file, &cert_file).expect_err("no key");
        assert!(e.to_string().starts_with("--tls-key "), "{e}");
        let key_file = dir.path().join("key.pem");
        std::fs::write(&key_file, cert.signing_key.serialize_pem()).expect("write");
        let e = TlsFiles::load(&cert_file, &key_file, &key_file).expect_err("ca is a key");
        assert!(e.to_string().starts_with("--tls-ca "), "{e}");
        TlsFiles::load(&cert_file, &key_file, &cert_file).expect("good files");
    }
}
