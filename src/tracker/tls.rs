//! Mutual TLS for the tracker's stream: a certificate, its key and the CA that both sides
//! verify each other against, read from PEM files and checked when read, so that a wrong
//! file is named at start rather than at the first handshake. The CA's serving certificate
//! is read the same way (`identity`).

use std::path::{Path, PathBuf};

use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

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

/// A certificate chain, its key and the CA that peers are verified against.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    identity: Identity,
    ca: Certificate,
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

impl TlsFiles {
    /// Reads and checks the PEM files of `--tls-cert`, `--tls-key` and `--tls-ca`.
    pub fn load(cert: &Path, key: &Path, ca: &Path) -> Result<Self, TlsError> {
        Ok(Self {
            identity: identity("--tls-cert", cert, "--tls-key", key)?,
            ca: ca_certificate("--tls-ca", ca)?,
        })
    }

    /// The server's side: its certificate, and a client certificate required and verified
    /// against the CA.
    pub fn server(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(self.identity.clone())
            .client_ca_root(self.ca.clone())
    }

    /// The client's side: the server verified against the CA (and its name against the
    /// URL's host), and this certificate presented.
    pub fn client(&self) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(self.ca.clone())
            .identity(self.identity.clone())
    }
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
