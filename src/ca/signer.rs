//! The CA's signing key and what it signs: its certificate and key (a root, or an intermediate
//! with the chain above it) loaded from PEM files and checked when loaded, and X.509 SVIDs
//! built from the CA's own template for a CSR whose signature verifies. Of the CSR only the
//! public key is used: whatever else it asks for (a CA, other names, extensions, a lifetime)
//! is ignored, and a SPIFFE id in it must be the one authorised.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    CertificateParams, DistinguishedName, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PublicKeyData as _, SanType, SerialNumber, SubjectPublicKeyInfo,
};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, CertificateSigningRequestDer};
use spiffe::TrustDomain;
use time::OffsetDateTime;
use x509_parser::certificate::X509Certificate;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::FromDer as _;

use crate::identity::WorkloadId;

/// How far back a leaf's NotBefore is set, so that peers whose clocks are up to this much
/// behind already accept it.
pub const BACKDATE: Duration = Duration::from_secs(5 * 60);
/// The longest lifetime granted unless configured otherwise.
pub const DEFAULT_MAX_TTL: Duration = Duration::from_secs(24 * 3600);
/// The shortest lifetime granted unless configured otherwise: shorter asks are raised to it,
/// so that no node can make the CA sign every few seconds for every pod.
pub const DEFAULT_MIN_TTL: Duration = Duration::from_secs(10 * 60);
/// A CSR is a key and a few names; anything larger is not one weft's nodes send.
pub const MAX_CSR_BYTES: usize = 16 << 10;

/// Why the CA's key, certificate or settings cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SignerError {
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
    /// A file does not hold what its flag asks for, or it is not usable as such.
    #[error("{flag} {}: {error}", .path.display())]
    Invalid {
        /// The flag that named it.
        flag: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        error: String,
    },
    /// The lifetime limits contradict each other.
    #[error("--min-ttl {min:?} / --max-ttl {max:?}: {error}")]
    Limits {
        /// The minimum.
        min: Duration,
        /// The maximum.
        max: Duration,
        /// Why.
        error: &'static str,
    },
}

/// Why a CSR is not signed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CsrError {
    /// The CSR is larger than any CSR weft signs.
    #[error("the CSR is {bytes} bytes, more than the {MAX_CSR_BYTES} a CSR may have")]
    TooLarge {
        /// Its size.
        bytes: usize,
    },
    /// Not a PKCS#10 request, in PEM or in DER.
    #[error("not a PKCS#10 certificate signing request (PEM or DER): {0}")]
    Malformed(String),
    /// The request's signature does not verify with its own key: whoever sent it does not
    /// hold the key.
    #[error("the CSR's signature does not verify: {0}")]
    Signature(String),
    /// A public key of a kind the CA does not sign.
    #[error("the CSR's public key is not ECDSA P-256/P-384, Ed25519 or RSA: {0}")]
    Key(String),
    /// The CSR names another SPIFFE id than the one asked for.
    #[error("the CSR asks for {found:?}, not the requested identity {identity}")]
    OtherIdentity {
        /// The name in the CSR.
        found: String,
        /// The identity asked for.
        identity: String,
    },
    /// The certificate could not be built (a bug, or a key rcgen cannot encode).
    #[error("signing failed: {0}")]
    Signing(String),
}

/// The lifetimes the CA grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TtlLimits {
    min: Duration,
    max: Duration,
}

impl Default for TtlLimits {
    fn default() -> Self {
        Self {
            min: DEFAULT_MIN_TTL,
            max: DEFAULT_MAX_TTL,
        }
    }
}

impl TtlLimits {
    /// Lifetimes from `min` to `max`, in whole seconds, at least one second.
    pub fn new(min: Duration, max: Duration) -> Result<Self, SignerError> {
        let error = |error| SignerError::Limits { min, max, error };
        if min < Duration::from_secs(1) {
            return Err(error("the minimum must be at least one second"));
        }
        if min > max {
            return Err(error("the minimum exceeds the maximum"));
        }
        Ok(Self {
            min: Duration::from_secs(min.as_secs()),
            max: Duration::from_secs(max.as_secs()),
        })
    }

    /// The lifetime granted for `asked`: the maximum for zero, else `asked` within the limits.
    pub fn grant(&self, asked: Duration) -> Duration {
        if asked.is_zero() {
            return self.max;
        }
        Duration::from_secs(asked.as_secs()).clamp(self.min, self.max)
    }

    /// The shortest lifetime granted.
    pub fn min(&self) -> Duration {
        self.min
    }

    /// The longest lifetime granted.
    pub fn max(&self) -> Duration {
        self.max
    }
}

/// A signed certificate.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The chain, PEM, leaf first.
    pub chain: Vec<String>,
    /// The leaf's serial number, hex.
    pub serial: String,
    /// The lifetime granted, from the time of signing.
    pub ttl: Duration,
}

/// The CA's signing key and certificate.
pub struct Signer {
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate and those above it, PEM, appended to every leaf.
    chain: Vec<String>,
    /// No leaf outlives the CA certificate.
    not_after: OffsetDateTime,
    /// The SPIFFE ids the CA certificate names (a trust domain's, if any).
    spiffe_ids: Vec<String>,
    /// The file it came from, for errors.
    cert_path: PathBuf,
    limits: TtlLimits,
    random: &'static dyn rustls::crypto::SecureRandom,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("issuer", &self.issuer)
            .field("not_after", &self.not_after)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

/// PEM of a DER certificate.
fn pem(der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::with_capacity(b64.len() + b64.len() / 64 + 60);
    out.push_str("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        // Base64 is ASCII.
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

/// A file named by a flag.
struct File<'a> {
    flag: &'static str,
    path: &'a Path,
}

impl File<'_> {
    fn invalid(&self, error: impl Into<String>) -> SignerError {
        SignerError::Invalid {
            flag: self.flag,
            path: self.path.to_owned(),
            error: error.into(),
        }
    }

    fn read(&self) -> Result<Vec<u8>, SignerError> {
        std::fs::read(self.path).map_err(|error| SignerError::Read {
            flag: self.flag,
            path: self.path.to_owned(),
            error,
        })
    }

    fn certificates(&self) -> Result<Vec<CertificateDer<'static>>, SignerError> {
        let pem = self.read()?;
        let certs = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.invalid(format!("not a PEM certificate: {e}")))?;
        if certs.is_empty() {
            return Err(self.invalid("no PEM certificate in the file"));
        }
        Ok(certs)
    }
}

fn parse<'a>(file: &File<'_>, der: &'a [u8]) -> Result<X509Certificate<'a>, SignerError> {
    X509Certificate::from_der(der)
        .map(|(_, cert)| cert)
        .map_err(|e| file.invalid(format!("not an X.509 certificate: {e}")))
}

/// A certificate that may sign others: a CA by its basic constraints, and with keyCertSign if
/// it restricts its key usage.
fn check_ca(file: &File<'_>, cert: &X509Certificate<'_>) -> Result<(), SignerError> {
    let subject = cert.subject().to_string();
    let ca = cert
        .basic_constraints()
        .map_err(|e| file.invalid(format!("{subject}: bad basic constraints: {e}")))?
        .is_some_and(|bc| bc.value.ca);
    if !ca {
        return Err(file.invalid(format!("{subject}: not a CA certificate")));
    }
    let usage = cert
        .key_usage()
        .map_err(|e| file.invalid(format!("{subject}: bad key usage: {e}")))?;
    if usage.is_some_and(|ku| !ku.value.key_cert_sign()) {
        return Err(file.invalid(format!("{subject}: its key usage excludes keyCertSign")));
    }
    Ok(())
}

impl Signer {
    /// Loads the CA certificate (`--ca-cert`, possibly followed by the chain above it) and its
    /// PKCS#8 key (`--ca-key`), and for an intermediate the chain above it (`--ca-chain`).
    /// Checked: the certificate is a CA, it has not expired, the key is its key, each
    /// certificate is signed by the next, and a SPIFFE id the CA carries names `trust_domain`.
    pub fn load(
        cert: &Path,
        key: &Path,
        chain: Option<&Path>,
        trust_domain: &TrustDomain,
        limits: TtlLimits,
    ) -> Result<Self, SignerError> {
        let signer = Self::load_any(cert, key, chain, limits)?;
        signer.check_trust_domain(trust_domain)?;
        Ok(signer)
    }

    /// Checks that a SPIFFE id the CA certificate carries names `trust_domain` (for a trust
    /// domain known only once the tracker has said it).
    pub fn check_trust_domain(&self, trust_domain: &TrustDomain) -> Result<(), SignerError> {
        let expected = format!("spiffe://{trust_domain}");
        match self.spiffe_ids.iter().find(|uri| **uri != expected) {
            Some(uri) => Err(File {
                flag: "--ca-cert",
                path: &self.cert_path,
            }
            .invalid(format!(
                "the CA names {uri}, not this CA's trust domain {expected}"
            ))),
            None => Ok(()),
        }
    }

    /// [`Signer::load`] but for the trust domain, to be checked with
    /// [`Signer::check_trust_domain`].
    pub fn load_any(
        cert: &Path,
        key: &Path,
        chain: Option<&Path>,
        limits: TtlLimits,
    ) -> Result<Self, SignerError> {
        let cert_file = File {
            flag: "--ca-cert",
            path: cert,
        };
        let key_file = File {
            flag: "--ca-key",
            path: key,
        };
        let mut certs = cert_file.certificates()?;
        // Which file each certificate came from, for errors.
        let mut files: Vec<&File<'_>> = vec![&cert_file; certs.len()];
        let chain_file = chain.map(|path| File {
            flag: "--ca-chain",
            path,
        });
        if let Some(chain_file) = &chain_file {
            let more = chain_file.certificates()?;
            files.extend(std::iter::repeat_n(chain_file, more.len()));
            certs.extend(more);
        }
        let parsed = certs
            .iter()
            .zip(&files)
            .map(|(der, file)| parse(file, der))
            .collect::<Result<Vec<_>, _>>()?;
        for (cert, file) in parsed.iter().zip(&files) {
            check_ca(file, cert)?;
        }
        // Each certificate is signed by the next one's key.
        for (i, pair) in parsed.windows(2).enumerate() {
            if pair[0]
                .verify_signature(Some(pair[1].public_key()))
                .is_err()
            {
                return Err(files[i + 1].invalid(format!(
                    "{} is not signed by {}: the chain does not link",
                    pair[0].subject(),
                    pair[1].subject()
                )));
            }
        }
        let ca = &parsed[0];
        let not_after = ca.validity().not_after.to_datetime();
        if not_after <= OffsetDateTime::now_utc() {
            return Err(cert_file.invalid(format!("{}: expired at {not_after}", ca.subject())));
        }
        let mut spiffe_ids = Vec::new();
        if let Ok(Some(san)) = ca.subject_alternative_name() {
            for name in &san.value.general_names {
                if let GeneralName::URI(uri) = name
                    && uri.starts_with("spiffe://")
                {
                    spiffe_ids.push((*uri).to_owned());
                }
            }
        }
        let key_pem = key_file.read()?;
        let key_pem = std::str::from_utf8(&key_pem)
            .map_err(|_| key_file.invalid("not a PEM file (not text)"))?;
        let key = KeyPair::from_pem(key_pem).map_err(|e| {
            key_file.invalid(format!(
                "not a PKCS#8 private key (ECDSA P-256/P-384, Ed25519 or RSA): {e}"
            ))
        })?;
        if key.der_bytes() != &*ca.public_key().subject_public_key.data {
            return Err(key_file.invalid(format!(
                "not the key of {} in {}",
                ca.subject(),
                cert.display()
            )));
        }
        let issuer = Issuer::from_ca_cert_der(&certs[0], key)
            .map_err(|e| cert_file.invalid(format!("not usable as an issuer: {e}")))?;
        Ok(Self {
            issuer,
            chain: certs.iter().map(|c| pem(c)).collect(),
            not_after,
            spiffe_ids,
            cert_path: cert.to_owned(),
            limits,
            random: rustls::crypto::ring::default_provider().secure_random,
        })
    }

    /// A random serial number: 16 bytes, positive, its first byte not zero (so exactly 16
    /// bytes in DER).
    fn serial(&self) -> Result<[u8; 16], CsrError> {
        let mut serial = [0u8; 16];
        self.random
            .fill(&mut serial)
            .map_err(|_| CsrError::Signing("no random bytes for a serial number".into()))?;
        serial[0] = (serial[0] & 0x7f).max(1);
        Ok(serial)
    }

    /// Signs `csr` (PEM or DER) as an X.509 SVID of `id` with a lifetime of `ttl` as the
    /// limits allow (and never past the CA's own expiry).
    pub fn sign(&self, csr: &[u8], id: &WorkloadId, ttl: Duration) -> Result<Issued, CsrError> {
        if csr.len() > MAX_CSR_BYTES {
            return Err(CsrError::TooLarge { bytes: csr.len() });
        }
        let der = if csr.trim_ascii_start().starts_with(b"-----BEGIN") {
            CertificateSigningRequestDer::from_pem_slice(csr)
                .map_err(|e| CsrError::Malformed(e.to_string()))?
        } else {
            CertificateSigningRequestDer::from(csr.to_vec())
        };
        let request = match X509CertificationRequest::from_der(&der) {
            Ok(([], request)) => request,
            Ok(_) => return Err(CsrError::Malformed("trailing bytes after the CSR".into())),
            Err(e) => return Err(CsrError::Malformed(e.to_string())),
        };
        request
            .verify_signature()
            .map_err(|e| CsrError::Signature(e.to_string()))?;
        let identity = id.to_string();
        for extension in request.requested_extensions().into_iter().flatten() {
            match extension {
                ParsedExtension::SubjectAlternativeName(san) => {
                    for name in &san.general_names {
                        if let GeneralName::URI(uri) = name
                            && *uri != identity
                        {
                            return Err(CsrError::OtherIdentity {
                                found: (*uri).to_owned(),
                                identity,
                            });
                        }
                    }
                }
                // A names extension that does not parse cannot be checked: refuse it.
                ParsedExtension::ParseError { error } => {
                    return Err(CsrError::Malformed(format!("an extension: {error}")));
                }
                _ => {}
            }
        }
        let key =
            SubjectPublicKeyInfo::from_der(request.certification_request_info.subject_pki.raw)
                .map_err(|e| CsrError::Key(e.to_string()))?;
        let serial = self.serial()?;
        let now = OffsetDateTime::now_utc();
        let mut granted = self.limits.grant(ttl);
        let not_after = time::Duration::try_from(granted)
            .ok()
            .and_then(|d| now.checked_add(d))
            .filter(|t| *t <= self.not_after)
            .unwrap_or_else(|| {
                granted = Duration::from_secs((self.not_after - now).whole_seconds().max(0) as u64);
                self.not_after
            });
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        let uri = identity
            .clone()
            .try_into()
            .map_err(|e| CsrError::Signing(format!("{identity}: {e}")))?;
        p.subject_alt_names = vec![SanType::URI(uri)];
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.use_authority_key_identifier_extension = true;
        p.serial_number = Some(SerialNumber::from_slice(&serial));
        p.not_before = now - BACKDATE;
        p.not_after = not_after;
        let leaf = p
            .signed_by(&key, &self.issuer)
            .map_err(|e| CsrError::Signing(e.to_string()))?;
        let mut chain = Vec::with_capacity(1 + self.chain.len());
        chain.push(pem(leaf.der()));
        chain.extend(self.chain.iter().cloned());
        Ok(Issued {
            chain,
            serial: serial.iter().fold(String::with_capacity(32), |mut s, b| {
                let _ = write!(s, "{b:02x}");
                s
            }),
            ttl: granted,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertifiedIssuer, DnType};

    const TD: &str = "cluster-1.weft";
    const ID: &str = "spiffe://cluster-1.weft/ns/demo/sa/web";

    fn td() -> TrustDomain {
        TrustDomain::new(TD).expect("trust domain")
    }

    fn id() -> WorkloadId {
        WorkloadId::parse(ID).expect("id")
    }

    fn ca_params(name: &str, uri: Option<&str>) -> CertificateParams {
        let mut p = CertificateParams::default();
        p.distinguished_name.push(DnType::CommonName, name);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        p.subject_alt_names = uri
            .map(|u| SanType::URI(u.try_into().expect("uri")))
            .into_iter()
            .collect();
        p
    }

    /// A self-signed CA written to `dir`: (cert file, key file, issuer).
    fn root(dir: &Path, name: &str) -> (PathBuf, PathBuf, CertifiedIssuer<'static, KeyPair>) {
        let key = KeyPair::generate().expect("key");
        let key_pem = key.serialize_pem();
        let ca =
            CertifiedIssuer::self_signed(ca_params(name, Some(&format!("spiffe://{TD}"))), key)
                .expect("ca");
        let (cert, key) = (
            dir.join(format!("{name}.pem")),
            dir.join(format!("{name}-key.pem")),
        );
        std::fs::write(&cert, ca.pem()).expect("write");
        std::fs::write(&key, key_pem).expect("write");
        (cert, key, ca)
    }

    fn signer(dir: &Path, limits: TtlLimits) -> Signer {
        let (cert, key, _) = root(dir, "root");
        Signer::load(&cert, &key, None, &td(), limits).expect("signer")
    }

    /// A CSR with `params` for a new key: (PEM, the key's PKCS#8 DER).
    fn csr(mut params: CertificateParams) -> (String, Vec<u8>) {
        let key = KeyPair::generate().expect("key");
        params.distinguished_name = DistinguishedName::new();
        let csr = params.serialize_request(&key).expect("csr");
        (csr.pem().expect("pem"), key.serialize_der())
    }

    fn plain_csr(uri: Option<&str>) -> (String, Vec<u8>) {
        let mut p = CertificateParams::default();
        p.subject_alt_names = uri
            .map(|u| SanType::URI(u.try_into().expect("uri")))
            .into_iter()
            .collect();
        csr(p)
    }

    fn der_chain(issued: &Issued) -> Vec<Vec<u8>> {
        issued
            .chain
            .iter()
            .map(|p| {
                CertificateDer::from_pem_slice(p.as_bytes())
                    .expect("pem")
                    .to_vec()
            })
            .collect()
    }

    #[test]
    fn a_leaf_is_built_from_the_template_whatever_the_csr_asks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let signer = signer(dir.path(), TtlLimits::default());
        // Asks to be a CA, for DNS and IP names, key usages and an hour: all ignored.
        let mut greedy = ca_params("evil", Some(ID));
        greedy.subject_alt_names.extend([
            SanType::DnsName("kubernetes.default".try_into().expect("dns")),
            SanType::IpAddress([10, 0, 0, 1].into()),
        ]);
        greedy.extended_key_usages = vec![ExtendedKeyUsagePurpose::CodeSigning];
        for (csr, key) in [plain_csr(Some(ID)), plain_csr(None), csr(greedy)] {
            let before = OffsetDateTime::now_utc();
            let issued = signer
                .sign(csr.as_bytes(), &id(), Duration::from_secs(365 * 86400))
                .expect("signed");
            assert_eq!(issued.ttl, DEFAULT_MAX_TTL);
            let ders = der_chain(&issued);
            assert_eq!(ders.len(), 2, "leaf and CA");
            let svid = spiffe::X509Svid::parse_from_der(&ders.concat(), &key).expect("an SVID");
            assert_eq!(svid.spiffe_id().to_string(), ID);
            let (_, leaf) = X509Certificate::from_der(&ders[0]).expect("leaf");
            let san = leaf.subject_alternative_name().expect("san").expect("san");
            assert_eq!(san.value.general_names, vec![GeneralName::URI(ID)]);
            assert!(san.critical, "the subject is empty");
            assert!(!leaf.is_ca());
            let ku = leaf.key_usage().expect("ku").expect("ku");
            assert!(ku.critical);
            assert!(ku.value.digital_signature() && !ku.value.key_cert_sign());
            assert_eq!(ku.value.flags.count_ones(), 1, "digitalSignature only");
            let eku = leaf.extended_key_usage().expect("eku").expect("eku").value;
            assert!(eku.server_auth && eku.client_auth && !eku.code_signing);
            assert!(eku.other.is_empty());
            let serial = leaf.raw_serial();
            assert_eq!(serial.len(), 16);
            assert_eq!(serial[0] & 0x80, 0);
            assert_eq!(hex(serial), issued.serial);
            let nb = leaf.validity().not_before.to_datetime();
            let na = leaf.validity().not_after.to_datetime();
            let backdated = before - nb;
            assert!(
                backdated >= time::Duration::seconds(299)
                    && backdated <= time::Duration::seconds(302),
                "{backdated}"
            );
            assert!((na - before - time::Duration::hours(24)).abs() <= time::Duration::seconds(2));
            assert!(leaf.tbs_certificate.subject.iter().next().is_none());
        }
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn lifetimes_are_capped_raised_and_defaulted() {
        let limits = TtlLimits::new(Duration::from_secs(2), Duration::from_secs(600)).expect("ok");
        assert_eq!(limits.grant(Duration::ZERO), Duration::from_secs(600));
        assert_eq!(
            limits.grant(Duration::from_millis(500)),
            Duration::from_secs(2)
        );
        assert_eq!(
            limits.grant(Duration::from_secs(30)),
            Duration::from_secs(30)
        );
        assert_eq!(
            limits.grant(Duration::from_secs(u64::MAX)),
            Duration::from_secs(600)
        );
        for (min, max, says) in [
            (0, 10, "at least one second"),
            (20, 10, "exceeds the maximum"),
        ] {
            let e = TtlLimits::new(Duration::from_secs(min), Duration::from_secs(max))
                .expect_err("bad limits");
            assert!(e.to_string().contains(says), "{e}");
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let s = signer(dir.path(), limits);
        let (csr, _) = plain_csr(None);
        let issued = s
            .sign(csr.as_bytes(), &id(), Duration::from_secs(1))
            .expect("ok");
        assert_eq!(issued.ttl, Duration::from_secs(2));
    }

    #[test]
    fn bad_csrs_are_refused_by_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = signer(dir.path(), TtlLimits::default());
        let sign = |csr: &[u8]| s.sign(csr, &id(), Duration::ZERO).expect_err("refused");
        assert!(matches!(sign(b"garbage"), CsrError::Malformed(_)));
        assert!(matches!(sign(b""), CsrError::Malformed(_)));
        assert!(matches!(
            sign(b"-----BEGIN CERTIFICATE REQUEST-----\n!!!\n-----END CERTIFICATE REQUEST-----\n"),
            CsrError::Malformed(_)
        ));
        assert_eq!(
            sign(&vec![b'a'; MAX_CSR_BYTES + 1]),
            CsrError::TooLarge {
                bytes: MAX_CSR_BYTES + 1
            }
        );
        let (pem_csr, _) = plain_csr(Some(ID));
        let der = CertificateSigningRequestDer::from_pem_slice(pem_csr.as_bytes()).expect("der");
        s.sign(&der, &id(), Duration::ZERO)
            .expect("DER is fine too");
        let mut trailing = der.to_vec();
        trailing.push(0);
        assert!(matches!(sign(&trailing), CsrError::Malformed(_)));
        // The signature is the last bytes of the DER: flip one.
        let mut forged = der.to_vec();
        let last = forged.len() - 3;
        forged[last] ^= 0x55;
        assert!(
            matches!(sign(&forged), CsrError::Signature(_)),
            "{:?}",
            sign(&forged)
        );
        let other = "spiffe://cluster-1.weft/ns/demo/sa/admin";
        let (csr, _) = plain_csr(Some(other));
        assert_eq!(
            sign(csr.as_bytes()),
            CsrError::OtherIdentity {
                found: other.into(),
                identity: ID.into()
            }
        );
        let (csr, _) = plain_csr(Some("https://example.com/"));
        assert!(matches!(
            sign(csr.as_bytes()),
            CsrError::OtherIdentity { .. }
        ));
    }

    #[test]
    fn an_intermediate_signs_with_its_chain() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (root_cert, _, root_ca) = root(dir.path(), "root");
        let key = KeyPair::generate().expect("key");
        let key_file = dir.path().join("int-key.pem");
        std::fs::write(&key_file, key.serialize_pem()).expect("write");
        let int = ca_params("intermediate", None)
            .signed_by(&key, &root_ca)
            .expect("int");
        let int_file = dir.path().join("int.pem");
        std::fs::write(&int_file, int.pem()).expect("write");
        let s = Signer::load(
            &int_file,
            &key_file,
            Some(&root_cert),
            &td(),
            TtlLimits::default(),
        )
        .expect("an intermediate");
        let (csr, key) = plain_csr(None);
        let issued = s
            .sign(csr.as_bytes(), &id(), Duration::ZERO)
            .expect("signed");
        let ders = der_chain(&issued);
        assert_eq!(ders.len(), 3, "leaf, intermediate, root");
        spiffe::X509Svid::parse_from_der(&ders.concat(), &key).expect("an SVID");
        // The chain must link: the intermediate with an unrelated root is refused.
        let (other_root, _, _) = root(dir.path(), "other");
        let e = Signer::load(
            &int_file,
            &key_file,
            Some(&other_root),
            &td(),
            TtlLimits::default(),
        )
        .expect_err("does not link");
        assert!(
            e.to_string().starts_with("--ca-chain ") && e.to_string().contains("does not link"),
            "{e}"
        );
    }

    #[test]
    fn bad_ca_files_are_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        let (cert, key, _) = root(d, "root");
        let (_, other_key, _) = root(d, "other");
        let load = |cert: &Path, key: &Path| {
            Signer::load(cert, key, None, &td(), TtlLimits::default())
                .expect_err("refused")
                .to_string()
        };
        let junk = d.join("junk.pem");
        std::fs::write(&junk, "junk\n").expect("write");
        let leaf = rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("leaf");
        let leaf_file = d.join("leaf.pem");
        std::fs::write(&leaf_file, leaf.cert.pem()).expect("write");
        for (got, says) in [
            (load(&d.join("missing.pem"), &key), "--ca-cert "),
            (load(&junk, &key), "no PEM certificate"),
            (load(&leaf_file, &key), "not a CA certificate"),
            (load(&cert, &junk), "--ca-key "),
            (load(&cert, &cert), "not a PKCS#8 private key"),
            (load(&cert, &other_key), "not the key of CN=root"),
        ] {
            assert!(got.contains(says), "{got}");
        }
        let e = Signer::load(
            &cert,
            &key,
            None,
            &TrustDomain::new("other.weft").expect("td"),
            TtlLimits::default(),
        )
        .expect_err("another trust domain");
        assert!(e.to_string().contains("not this CA's trust domain"), "{e}");
    }
}
