//! Mutual TLS for the tracker's stream: a certificate, its key and the CA that both sides
//! verify each other against, read from PEM files and checked when read, so that a wrong
//! file is named at start rather than at the first handshake; read again when they change
//! (a renewed Secret is rewritten in place), so that each new connection, the tracker's as a
//! server (`incoming`) and a subscriber's as a client, uses the current ones. The CA's
//! serving certificate is read the same way (`identity`).

use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

/// Time from accept until a client's TLS handshake is done; past it the connection is closed.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

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

/// A certificate chain, its key and the CA that peers are verified against, as their files
/// held them when last read: read again when one of them changes, the last good ones kept
/// (and the failure logged) while the new ones do not load. Cheap to clone.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    paths: Arc<[PathBuf; 3]>,
    loaded: Arc<Mutex<Loaded>>,
}

/// What the files held when last read, and how they looked then.
#[derive(Debug)]
struct Loaded {
    stamp: Stamp,
    material: Material,
}

/// The PEM material of the three files, checked, and the server configuration made of it.
#[derive(Debug, Clone)]
struct Material {
    chain: Vec<u8>,
    key: Vec<u8>,
    ca: Vec<u8>,
    server: Arc<rustls::ServerConfig>,
}

/// Each file's inode, length and modification time: a Secret's files are replaced, not
/// edited, so any renewal changes them.
type Stamp = [Option<(u64, u64, SystemTime)>; 3];

/// The flags that name the files, in the order of [`TlsFiles::paths`].
const FLAGS: [&str; 3] = ["--tls-cert", "--tls-key", "--tls-ca"];

fn stamp(paths: &[PathBuf; 3]) -> Stamp {
    paths.each_ref().map(|path| {
        let meta = std::fs::metadata(path).ok()?;
        Some((meta.ino(), meta.len(), meta.modified().ok()?))
    })
}

fn read(flag: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|error| TlsError::Read {
        flag,
        path: path.to_owned(),
        error,
    })
}

fn certificates(flag: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    let pem = read(flag, path)?;
    let bad = |error: String| TlsError::Pem {
        flag,
        path: path.to_owned(),
        error,
    };
    let mut count = 0;
    for cert in CertificateDer::pem_slice_iter(&pem) {
        cert.map_err(|e| bad(format!("not a PEM certificate: {e}")))?;
        count += 1;
    }
    if count == 0 {
        return Err(bad("no PEM certificate in the file".into()));
    }
    Ok(pem)
}

/// A certificate chain and its key, read from the PEM files named by `cert_flag` and
/// `key_flag`.
pub fn identity(
    cert_flag: &'static str,
    cert: &Path,
    key_flag: &'static str,
    key: &Path,
) -> Result<Identity, TlsError> {
    let chain = certificates(cert_flag, cert)?;
    let key_pem = read(key_flag, key)?;
    PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsError::Pem {
        flag: key_flag,
        path: key.to_owned(),
        error: format!("no PEM private key: {e}"),
    })?;
    Ok(Identity::from_pem(chain, key_pem))
}

/// The CA certificates (PEM) of the file named by `flag`, to verify peers against.
pub fn ca_certificate(flag: &'static str, path: &Path) -> Result<Certificate, TlsError> {
    Ok(Certificate::from_pem(certificates(flag, path)?))
}

impl Material {
    /// Reads and checks the files of `paths` (those of [`FLAGS`]).
    fn read(paths: &[PathBuf; 3]) -> Result<Self, TlsError> {
        let [cert, key, ca] = paths.each_ref();
        let chain = certificates(FLAGS[0], cert)?;
        let key_pem = read(FLAGS[1], key)?;
        let ca_pem = certificates(FLAGS[2], ca)?;
        let bad = |flag: &'static str, path: &Path, error: String| TlsError::Pem {
            flag,
            path: path.to_owned(),
            error,
        };
        let private = PrivateKeyDer::from_pem_slice(&key_pem)
            .map_err(|e| bad(FLAGS[1], key, format!("no PEM private key: {e}")))?;
        let mut roots = rustls::RootCertStore::empty();
        for root in CertificateDer::pem_slice_iter(&ca_pem).flatten() {
            roots
                .add(root)
                .map_err(|e| bad(FLAGS[2], ca, format!("not a CA certificate: {e}")))?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let clients = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            provider.clone(),
        )
        .build()
        .map_err(|e| bad(FLAGS[2], ca, e.to_string()))?;
        let certs = CertificateDer::pem_slice_iter(&chain)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad(FLAGS[0], cert, e.to_string()))?;
        let mut server = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| bad(FLAGS[0], cert, e.to_string()))?
            .with_client_cert_verifier(clients)
            .with_single_cert(certs, private)
            .map_err(|e| {
                bad(
                    FLAGS[1],
                    key,
                    format!("does not match {}: {e}", cert.display()),
                )
            })?;
        // gRPC is HTTP/2 only.
        server.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Self {
            chain,
            key: key_pem,
            ca: ca_pem,
            server: Arc::new(server),
        })
    }
}

impl TlsFiles {
    /// Reads and checks the PEM files of `--tls-cert`, `--tls-key` and `--tls-ca`.
    pub fn load(cert: &Path, key: &Path, ca: &Path) -> Result<Self, TlsError> {
        let paths = [cert.to_owned(), key.to_owned(), ca.to_owned()];
        let loaded = Loaded {
            stamp: stamp(&paths),
            material: Material::read(&paths)?,
        };
        Ok(Self {
            paths: Arc::new(paths),
            loaded: Arc::new(Mutex::new(loaded)),
        })
    }

    /// The material as the files hold it now, read again if they changed since last read.
    fn current(&self) -> Material {
        let mut loaded = self.loaded.lock().unwrap_or_else(PoisonError::into_inner);
        let now = stamp(&self.paths);
        if now != loaded.stamp {
            // Once per change, not at every connection while the new files are bad.
            loaded.stamp = now;
            match Material::read(&self.paths) {
                Ok(material) => {
                    tracing::info!(cert = %self.paths[0].display(), "TLS files read again");
                    loaded.material = material;
                }
                Err(error) => {
                    tracing::warn!(%error, "TLS files changed but do not load; the last good ones stay");
                }
            }
        }
        loaded.material.clone()
    }

    /// The server's side, as the files hold it now: its certificate, and a client certificate
    /// required and verified against the CA.
    pub fn server_config(&self) -> Arc<rustls::ServerConfig> {
        self.current().server
    }

    /// The client's side, as the files hold it now: the server verified against the CA (and
    /// its name against the URL's host), and this certificate presented.
    pub fn client(&self) -> ClientTlsConfig {
        let material = self.current();
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(material.ca))
            .identity(Identity::from_pem(material.chain, material.key))
    }
}

/// The connections of `listener`, each after a TLS handshake with what `tls` holds at its
/// accept (within [`HANDSHAKE_TIMEOUT`]; one that fails is logged and dropped), for tonic's
/// `serve_with_incoming`. Accepting stops once the stream is dropped.
pub fn incoming(
    listener: TcpListener,
    tls: TlsFiles,
) -> tokio_stream::wrappers::ReceiverStream<std::io::Result<TlsStream<TcpStream>>> {
    let (accepted, stream) = tokio::sync::mpsc::channel(64);
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
            // Updates are small and must not wait for the peer's delayed ACK (Nagle).
            if let Err(error) = tcp.set_nodelay(true) {
                tracing::debug!(%peer, %error, "TCP_NODELAY not set");
            }
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.server_config());
            let accepted = accepted.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
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
