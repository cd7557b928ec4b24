//! Trust bundles: the X.509 authorities (roots) of one trust domain — several while a root
//! rotates, A → A+B → B — read from the SPIFFE bundle format (a JWK set) or PEM; and the set a
//! node trusts, one bundle for its own and for every federated trust domain.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject as _;
use serde::Deserialize;
use serde_json::Value;
use spiffe::TrustDomain;
use x509_parser::asn1_rs::{FromDer as _, Oid};
use x509_parser::oid_registry::{OID_EC_P256, OID_NIST_EC_P384, OID_SIG_ED25519};
use x509_parser::prelude::X509Certificate;
use x509_parser::public_key::PublicKey;

use super::id::{IdError, trust_domain};

/// Why a trust bundle, or a set of them, is refused.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// Not a SPIFFE bundle document.
    #[error("trust bundle of {trust_domain}: not a SPIFFE bundle: {error}")]
    Json {
        /// Whose bundle.
        trust_domain: String,
        /// Why, with where in the document.
        error: String,
    },
    /// A key or a certificate of the bundle that cannot be used as an X.509 authority.
    #[error("trust bundle of {trust_domain}: {entry}: {problem}")]
    Entry {
        /// Whose bundle.
        trust_domain: String,
        /// Which one (`keys[2]`, `certificate 1`).
        entry: String,
        /// Why.
        problem: String,
    },
    /// Not PEM, or PEM with no certificate.
    #[error("trust bundle of {trust_domain}: {error}")]
    Pem {
        /// Whose bundle.
        trust_domain: String,
        /// Why.
        error: String,
    },
    /// A bundle with no X.509 authority: every SVID of that trust domain would be refused,
    /// which is not what whoever configured it meant.
    #[error("trust bundle of {trust_domain} holds no X.509 authority")]
    Empty {
        /// Whose bundle.
        trust_domain: String,
    },
    /// Two bundles for one trust domain: which one to trust is not for weft to guess.
    #[error("trust domain {trust_domain} has more than one trust bundle")]
    Duplicate {
        /// The trust domain.
        trust_domain: String,
    },
    /// A bundle source that is not `TRUST-DOMAIN=FILE`, or names no valid trust domain.
    #[error("trust bundle {given:?}: {problem}")]
    Source {
        /// What was given (the argument, or the file in a directory).
        given: String,
        /// Why.
        problem: String,
    },
    /// A file or directory that cannot be read.
    #[error("{}: {error}", .path.display())]
    Read {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        error: std::io::Error,
    },
    /// A directory with no bundle file in it.
    #[error("{}: no trust bundle file", .dir.display())]
    NoFiles {
        /// The directory.
        dir: PathBuf,
    },
    /// A bundle file whose content is refused.
    #[error("{}: {error}", .path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        error: Box<BundleError>,
    },
}

/// A certificate's public key as a JWK (RFC 7517/7518): the SPIFFE format publishes it beside
/// the certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Jwk {
    kty: &'static str,
    /// The key's parameters (`crv`, `x`, `y`, `n`, `e`), base64url.
    params: Vec<(&'static str, String)>,
}

impl Jwk {
    fn of(cert: &X509Certificate<'_>) -> Result<Self, String> {
        let b64 = |bytes: &[u8]| URL_SAFE_NO_PAD.encode(bytes);
        // JWK integers are unsigned, without the sign byte DER may add.
        let unsigned = |bytes: &[u8]| {
            let start = bytes.iter().position(|&b| b != 0).unwrap_or(bytes.len());
            b64(&bytes[start..])
        };
        let spki = cert.public_key();
        if spki.algorithm.algorithm == OID_SIG_ED25519 {
            let x = b64(&spki.subject_public_key.data);
            return Ok(Self {
                kty: "OKP",
                params: vec![("crv", "Ed25519".into()), ("x", x)],
            });
        }
        match spki
            .parsed()
            .map_err(|e| format!("unreadable public key: {e}"))?
        {
            PublicKey::RSA(rsa) => Ok(Self {
                kty: "RSA",
                params: vec![("n", unsigned(rsa.modulus)), ("e", unsigned(rsa.exponent))],
            }),
            PublicKey::EC(point) => {
                let curve = spki
                    .algorithm
                    .parameters
                    .clone()
                    .and_then(|p| Oid::try_from(p).ok());
                let (crv, size) = match curve {
                    Some(oid) if oid == OID_EC_P256 => ("P-256", 32),
                    Some(oid) if oid == OID_NIST_EC_P384 => ("P-384", 48),
                    other => return Err(format!("unsupported elliptic curve {other:?}")),
                };
                match point.data() {
                    [4, xy @ ..] if xy.len() == 2 * size => Ok(Self {
                        kty: "EC",
                        params: vec![
                            ("crv", crv.into()),
                            ("x", b64(&xy[..size])),
                            ("y", b64(&xy[size..])),
                        ],
                    }),
                    _ => Err("elliptic-curve key is not an uncompressed point".into()),
                }
            }
            _ => Err(format!(
                "unsupported public key algorithm {}",
                spki.algorithm.algorithm
            )),
        }
    }
}

/// One X.509 authority of a bundle, checked when read.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Authority {
    der: CertificateDer<'static>,
    jwk: Jwk,
}

impl Authority {
    fn new(der: CertificateDer<'static>) -> Result<Self, String> {
        let cert = match X509Certificate::from_der(&der) {
            Ok(([], cert)) => cert,
            Ok((rest, _)) => return Err(format!("{} bytes after the certificate", rest.len())),
            Err(e) => return Err(format!("not an X.509 certificate: {e}")),
        };
        // A leaf loaded as a root (the wrong file) would otherwise be trusted to sign.
        let is_ca = cert
            .basic_constraints()
            .map_err(|e| format!("basicConstraints: {e}"))?
            .is_some_and(|bc| bc.value.ca);
        if !is_ca {
            return Err(format!(
                "{:?} is not a CA certificate (basicConstraints cA=true)",
                cert.subject().to_string()
            ));
        }
        let jwk = Jwk::of(&cert)?;
        Ok(Self { der, jwk })
    }
}

/// The SPIFFE bundle document as read: only x509-svid keys are looked into.
#[derive(Deserialize)]
struct DocumentIn {
    keys: Vec<KeyIn>,
    #[serde(default)]
    spiffe_sequence: Option<u64>,
    #[serde(default)]
    spiffe_refresh_hint: Option<u64>,
}

#[derive(Deserialize)]
struct KeyIn {
    #[serde(rename = "use", default)]
    usage: Option<Value>,
    #[serde(default)]
    kty: Option<Value>,
    #[serde(default)]
    x5c: Option<Value>,
}

const X509_SVID: &str = "x509-svid";

/// The X.509 authorities of one trust domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustBundle {
    trust_domain: TrustDomain,
    authorities: Vec<Authority>,
    sequence: Option<u64>,
    refresh_hint: Option<Duration>,
}

impl TrustBundle {
    /// The bundle of `trust_domain` holding `authorities` (DER CA certificates).
    pub fn new(
        trust_domain: TrustDomain,
        authorities: Vec<CertificateDer<'static>>,
    ) -> Result<Self, BundleError> {
        let authorities = authorities
            .into_iter()
            .enumerate()
            .map(|(i, der)| {
                Authority::new(der).map_err(|problem| BundleError::Entry {
                    trust_domain: trust_domain.to_string(),
                    entry: format!("certificate {}", i + 1),
                    problem,
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            trust_domain,
            authorities,
            sequence: None,
            refresh_hint: None,
        })
    }

    /// The bundle of `trust_domain` from PEM CA certificates (one at least).
    pub fn from_pem(trust_domain: TrustDomain, pem: &[u8]) -> Result<Self, BundleError> {
        let bad = |error: String| BundleError::Pem {
            trust_domain: trust_domain.to_string(),
            error,
        };
        let certs = CertificateDer::pem_slice_iter(pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad(format!("not PEM: {e}")))?;
        if certs.is_empty() {
            return Err(bad("no PEM certificate".into()));
        }
        Self::new(trust_domain, certs)
    }

    /// The bundle of `trust_domain` from a SPIFFE bundle document (a JWK set whose
    /// `x509-svid` keys each carry one certificate in `x5c`; other keys are ignored).
    pub fn from_spiffe_json(trust_domain: TrustDomain, json: &[u8]) -> Result<Self, BundleError> {
        let td = trust_domain.to_string();
        let doc: DocumentIn =
            serde_path_to_error::deserialize(&mut serde_json::Deserializer::from_slice(json))
                .map_err(|e| BundleError::Json {
                    trust_domain: td.clone(),
                    error: e.to_string(),
                })?;
        let mut authorities = Vec::new();
        for (i, key) in doc.keys.iter().enumerate() {
            if key.usage.as_ref().and_then(Value::as_str) != Some(X509_SVID) {
                continue;
            }
            let bad = |problem: String| BundleError::Entry {
                trust_domain: td.clone(),
                entry: format!("keys[{i}]"),
                problem,
            };
            let kty = key
                .kty
                .as_ref()
                .and_then(Value::as_str)
                .ok_or_else(|| bad("no \"kty\" string".into()))?;
            let x5c = match key
                .x5c
                .as_ref()
                .and_then(Value::as_array)
                .map(Vec::as_slice)
            {
                Some([one]) => one
                    .as_str()
                    .ok_or_else(|| bad("x5c[0] is not a string".into()))?,
                Some(many) => {
                    return Err(bad(format!(
                        "x5c holds {} certificates, an x509-svid key exactly one",
                        many.len()
                    )));
                }
                None => return Err(bad("no \"x5c\" array".into())),
            };
            let der = STANDARD
                .decode(x5c)
                .map_err(|e| bad(format!("x5c[0] is not base64: {e}")))?;
            let authority = Authority::new(der.into()).map_err(&bad)?;
            // The certificate is what is trusted; a key type that disagrees with it means the
            // document is not what its producer meant.
            if authority.jwk.kty != kty {
                return Err(bad(format!(
                    "kty {kty:?}, but the certificate's key is {:?}",
                    authority.jwk.kty
                )));
            }
            authorities.push(authority);
        }
        Ok(Self {
            trust_domain,
            authorities,
            sequence: doc.spiffe_sequence,
            refresh_hint: doc.spiffe_refresh_hint.map(Duration::from_secs),
        })
    }

    /// The bundle of `trust_domain` from a document that is either SPIFFE JSON or PEM.
    fn from_either(trust_domain: TrustDomain, bytes: &[u8]) -> Result<Self, BundleError> {
        if bytes.trim_ascii_start().starts_with(b"{") {
            Self::from_spiffe_json(trust_domain, bytes)
        } else {
            Self::from_pem(trust_domain, bytes)
        }
    }

    /// The same bundle with SPIFFE sequence number `sequence`.
    pub fn with_sequence(self, sequence: u64) -> Self {
        Self {
            sequence: Some(sequence),
            ..self
        }
    }

    /// The same bundle with refresh hint `hint` (whole seconds).
    pub fn with_refresh_hint(self, hint: Duration) -> Self {
        Self {
            refresh_hint: Some(Duration::from_secs(hint.as_secs())),
            ..self
        }
    }

    /// The SPIFFE bundle document (JSON) of this bundle.
    pub fn to_spiffe_json(&self) -> String {
        let keys: Vec<Value> = self
            .authorities
            .iter()
            .map(|a| {
                let mut key = serde_json::Map::new();
                key.insert("use".into(), X509_SVID.into());
                key.insert("kty".into(), a.jwk.kty.into());
                for (name, value) in &a.jwk.params {
                    key.insert((*name).into(), value.as_str().into());
                }
                key.insert("x5c".into(), vec![STANDARD.encode(&a.der)].into());
                key.into()
            })
            .collect();
        let mut doc = serde_json::Map::new();
        doc.insert("keys".into(), keys.into());
        if let Some(sequence) = self.sequence {
            doc.insert("spiffe_sequence".into(), sequence.into());
        }
        if let Some(hint) = self.refresh_hint {
            doc.insert("spiffe_refresh_hint".into(), hint.as_secs().into());
        }
        // `{:#}` is serde_json's pretty form.
        format!("{:#}", Value::from(doc))
    }

    /// Its trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// Its X.509 authorities (DER).
    pub fn authorities(&self) -> impl ExactSizeIterator<Item = &CertificateDer<'static>> {
        self.authorities.iter().map(|a| &a.der)
    }

    /// Its SPIFFE sequence number, if it has one.
    pub fn sequence(&self) -> Option<u64> {
        self.sequence
    }

    /// How often its publisher suggests fetching it again, if it says.
    pub fn refresh_hint(&self) -> Option<Duration> {
        self.refresh_hint
    }
}

/// Where to read one trust domain's bundle from: `TRUST-DOMAIN=FILE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundleFile {
    /// The trust domain.
    pub trust_domain: TrustDomain,
    /// The file, PEM or SPIFFE JSON.
    pub path: PathBuf,
}

impl FromStr for BundleFile {
    type Err = BundleError;

    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let bad = |problem: String| BundleError::Source {
            given: spec.to_owned(),
            problem,
        };
        let (name, path) = spec
            .split_once('=')
            .filter(|(name, path)| !name.is_empty() && !path.is_empty())
            .ok_or_else(|| bad("expected TRUST-DOMAIN=FILE".into()))?;
        Ok(Self {
            trust_domain: trust_domain(name).map_err(|e: IdError| bad(e.to_string()))?,
            path: path.into(),
        })
    }
}

/// The trust bundles a node verifies peers with: its own trust domain's and every federated
/// one's, by trust domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundleSet {
    bundles: BTreeMap<String, TrustBundle>,
}

impl BundleSet {
    /// The set of `bundles`; an empty bundle, or two for one trust domain, refuses them all.
    pub fn new(bundles: impl IntoIterator<Item = TrustBundle>) -> Result<Self, BundleError> {
        let mut set = BTreeMap::new();
        for bundle in bundles {
            let name = bundle.trust_domain.to_string();
            if bundle.authorities.is_empty() {
                return Err(BundleError::Empty { trust_domain: name });
            }
            if set.insert(name.clone(), bundle).is_some() {
                return Err(BundleError::Duplicate { trust_domain: name });
            }
        }
        Ok(Self { bundles: set })
    }

    /// Reads the bundle of each file (PEM or SPIFFE JSON, told apart by content).
    pub fn load(files: &[BundleFile]) -> Result<Self, BundleError> {
        let bundles = files.iter().map(|file| {
            let bytes = std::fs::read(&file.path).map_err(|error| BundleError::Read {
                path: file.path.clone(),
                error,
            })?;
            TrustBundle::from_either(file.trust_domain.clone(), &bytes).map_err(|error| {
                BundleError::File {
                    path: file.path.clone(),
                    error: Box::new(error),
                }
            })
        });
        Self::new(bundles.collect::<Result<Vec<_>, _>>()?)
    }

    /// Reads a directory of bundle files, each named after its trust domain (`TD`, `TD.pem`
    /// or `TD.json`); names starting with a dot are skipped (a ConfigMap volume's own files).
    pub fn load_dir(dir: &Path) -> Result<Self, BundleError> {
        let unreadable = |error| BundleError::Read {
            path: dir.to_owned(),
            error,
        };
        let mut files = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(unreadable)? {
            let path = entry.map_err(unreadable)?.path();
            let Some(name) = path.file_name().map(|n| n.to_string_lossy().into_owned()) else {
                continue;
            };
            if name.starts_with('.') {
                continue;
            }
            // Follows symbolic links, as a ConfigMap volume's files are.
            let metadata = std::fs::metadata(&path).map_err(|error| BundleError::Read {
                path: path.clone(),
                error,
            })?;
            if !metadata.is_file() {
                continue;
            }
            let stem = name
                .strip_suffix(".pem")
                .or_else(|| name.strip_suffix(".json"))
                .unwrap_or(&name);
            let trust_domain = trust_domain(stem).map_err(|e| BundleError::Source {
                given: path.display().to_string(),
                problem: e.to_string(),
            })?;
            files.push(BundleFile { trust_domain, path });
        }
        if files.is_empty() {
            return Err(BundleError::NoFiles {
                dir: dir.to_owned(),
            });
        }
        // Sorted, so that which error comes first does not depend on the directory's order.
        files.sort_by(|a, b| a.path.cmp(&b.path));
        Self::load(&files)
    }

    /// The bundle of `trust_domain`, if it is trusted.
    pub fn get(&self, trust_domain: &str) -> Option<&TrustBundle> {
        self.bundles.get(trust_domain)
    }

    /// Every bundle, by trust domain.
    pub fn iter(&self) -> impl Iterator<Item = &TrustBundle> {
        self.bundles.values()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::testpki::{Ca, leaf_params, uri};

    fn td(name: &str) -> TrustDomain {
        trust_domain(name).expect("trust domain")
    }

    fn bundle(name: &str, roots: &[&Ca]) -> TrustBundle {
        TrustBundle::new(td(name), roots.iter().map(|ca| ca.der()).collect()).expect("bundle")
    }

    #[test]
    fn spiffe_json_and_pem_round_trip() {
        let (r1, r2) = (Ca::root("r1"), Ca::root("r2"));
        let original = bundle("a.test", &[&r1, &r2])
            .with_sequence(7)
            .with_refresh_hint(Duration::from_secs(300));
        let json = original.to_spiffe_json();
        let doc: Value = serde_json::from_str(&json).expect("JSON");
        assert_eq!(doc["spiffe_sequence"], 7);
        assert_eq!(doc["spiffe_refresh_hint"], 300);
        let key = &doc["keys"][1];
        assert_eq!(
            (&key["use"], &key["kty"], &key["crv"]),
            (&"x509-svid".into(), &"EC".into(), &"P-256".into())
        );
        assert_eq!(
            key["x"].as_str().map(str::len),
            Some(43),
            "32 bytes, base64url"
        );
        let parsed = TrustBundle::from_spiffe_json(td("a.test"), json.as_bytes()).expect("parses");
        assert_eq!(parsed, original);
        assert_eq!(parsed.sequence(), Some(7));
        assert_eq!(parsed.refresh_hint(), Some(Duration::from_secs(300)));

        let pem = format!("{}{}", r1.pem(), r2.pem());
        let from_pem = TrustBundle::from_pem(td("a.test"), pem.as_bytes()).expect("PEM");
        assert_eq!(from_pem, bundle("a.test", &[&r1, &r2]));
        assert_eq!(
            from_pem.authorities().cloned().collect::<Vec<_>>(),
            vec![r1.der(), r2.der()]
        );
    }

    #[test]
    fn keys_for_other_uses_are_ignored() {
        let root = Ca::root("r");
        let x5c = STANDARD.encode(root.der());
        let json = format!(
            r#"{{"keys":[{{"use":"jwt-svid","kty":"EC","kid":"k1","crv":"P-256","x":"AA","y":"AA"}},
                {{"use":"x509-svid","kty":"EC","x5c":["{x5c}"]}}, {{"kty":"RSA","x5c":[1, 2]}}]}}"#
        );
        let parsed = TrustBundle::from_spiffe_json(td("a"), json.as_bytes()).expect("parses");
        assert_eq!(parsed.authorities().collect::<Vec<_>>(), vec![&root.der()]);
        assert_eq!((parsed.sequence(), parsed.refresh_hint()), (None, None));
    }

    #[test]
    fn bad_bundle_documents_are_refused_naming_the_culprit() {
        let root = STANDARD.encode(Ca::root("r").der());
        let leaf = STANDARD.encode(Ca::root("r").leaf("spiffe://a/ns/n/sa/s").der());
        let key = |fields: &str| {
            format!(r#"{{"keys":[{{"use":"jwt-svid"}},{{"use":"x509-svid",{fields}}}]}}"#)
        };
        for (json, says) in [
            ("not json".to_owned(), "not a SPIFFE bundle"),
            (
                r#"{"spiffe_sequence":1}"#.to_owned(),
                "missing field `keys`",
            ),
            (
                r#"{"keys":[],"spiffe_refresh_hint":-5}"#.to_owned(),
                "spiffe_refresh_hint",
            ),
            (r#"{"keys":{}}"#.to_owned(), "keys"),
            (key(r#""kty":"EC""#), "keys[1]: no \"x5c\" array"),
            (key(&format!(r#""x5c":["{root}"]"#)), "keys[1]: no \"kty\""),
            (
                key(&format!(r#""kty":"EC","x5c":["{root}","{root}"]"#)),
                "keys[1]: x5c holds 2 certificates",
            ),
            (key(r#""kty":"EC","x5c":[]"#), "keys[1]: x5c holds 0"),
            (
                key(r#""kty":"EC","x5c":[7]"#),
                "keys[1]: x5c[0] is not a string",
            ),
            (
                key(r#""kty":"EC","x5c":["@@@"]"#),
                "keys[1]: x5c[0] is not base64",
            ),
            (
                key(r#""kty":"EC","x5c":["AAAA"]"#),
                "keys[1]: not an X.509 certificate",
            ),
            (
                key(&format!(r#""kty":"RSA","x5c":["{root}"]"#)),
                "keys[1]: kty \"RSA\", but the certificate's key is \"EC\"",
            ),
            (
                key(&format!(r#""kty":"EC","x5c":["{leaf}"]"#)),
                "keys[1]: \"\" is not a CA certificate",
            ),
        ] {
            let e = TrustBundle::from_spiffe_json(td("a.test"), json.as_bytes())
                .expect_err(&json)
                .to_string();
            assert!(e.starts_with("trust bundle of a.test: "), "{json}: {e}");
            assert!(e.contains(says), "{json}: {e}");
        }
        for (pem, says) in [
            ("", "no PEM certificate"),
            (
                "-----BEGIN CERTIFICATE-----\n@@@\n-----END CERTIFICATE-----\n",
                "not PEM",
            ),
        ] {
            let e = TrustBundle::from_pem(td("a.test"), pem.as_bytes()).expect_err(pem);
            assert!(e.to_string().contains(says), "{pem}: {e}");
        }
        let e = TrustBundle::new(
            td("a.test"),
            vec![Ca::root("r").leaf("spiffe://a/ns/n/sa/s").der().clone()],
        )
        .expect_err("a leaf is no authority");
        assert!(
            e.to_string().contains("certificate 1: \"\" is not a CA"),
            "{e}"
        );
    }

    #[test]
    fn a_set_refuses_an_empty_bundle_and_two_bundles_of_one_trust_domain() {
        let root = Ca::root("r");
        let empty = TrustBundle::from_spiffe_json(td("b.test"), br#"{"keys":[]}"#).expect("valid");
        let e = BundleSet::new([bundle("a.test", &[&root]), empty]).expect_err("empty");
        assert_eq!(
            e.to_string(),
            "trust bundle of b.test holds no X.509 authority"
        );
        let e = BundleSet::new([bundle("a.test", &[&root]), bundle("a.test", &[&root])])
            .expect_err("duplicate");
        assert_eq!(
            e.to_string(),
            "trust domain a.test has more than one trust bundle"
        );
        let set = BundleSet::new([bundle("b.test", &[&root]), bundle("a.test", &[&root])])
            .expect("two trust domains");
        let names: Vec<String> = set.iter().map(|b| b.trust_domain().to_string()).collect();
        assert_eq!(names, ["a.test", "b.test"]);
        assert!(set.get("a.test").is_some() && set.get("c.test").is_none());
    }

    #[test]
    fn sets_load_from_files_and_directories() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (ra, rb) = (Ca::root("ra"), Ca::root("rb"));
        let write = |name: &str, content: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, content).expect("write");
            path
        };
        let a = write("a.test.pem", &ra.pem());
        let b = write("b.test.json", &bundle("b.test", &[&rb]).to_spiffe_json());
        // What a ConfigMap volume holds beside the files.
        std::fs::create_dir(dir.path().join("..2026_01_01")).expect("mkdir");
        write("..data", "not a bundle");

        let set = BundleSet::load_dir(dir.path()).expect("directory loads");
        assert_eq!(set.get("a.test"), Some(&bundle("a.test", &[&ra])));
        assert_eq!(set.get("b.test"), Some(&bundle("b.test", &[&rb])));
        let files: Vec<BundleFile> = [
            format!("a.test={}", a.display()),
            format!("b.test={}", b.display()),
        ]
        .iter()
        .map(|s| s.parse().expect("TD=FILE"))
        .collect();
        assert_eq!(BundleSet::load(&files).expect("files load"), set);

        for (spec, says) in [
            ("a.test", "expected TRUST-DOMAIN=FILE"),
            ("=x.pem", "expected TRUST-DOMAIN=FILE"),
            ("A.test=x.pem", "lowercase"),
        ] {
            let e = spec.parse::<BundleFile>().expect_err(spec);
            assert!(e.to_string().contains(says), "{spec}: {e}");
        }
        let missing: BundleFile = "c.test=/nonexistent/c.pem".parse().expect("TD=FILE");
        let e = BundleSet::load(&[missing]).expect_err("missing file");
        assert!(e.to_string().starts_with("/nonexistent/c.pem: "), "{e}");

        let bad = write("c.test.json", r#"{"keys":"#);
        let e = BundleSet::load_dir(dir.path()).expect_err("bad file");
        assert!(
            e.to_string()
                .starts_with(&format!("{}: trust bundle of c.test", bad.display())),
            "{e}"
        );
        std::fs::remove_file(&bad).expect("rm");
        write("a.test.json", &bundle("a.test", &[&rb]).to_spiffe_json());
        let e = BundleSet::load_dir(dir.path()).expect_err("two files for a.test");
        assert!(
            matches!(e, BundleError::Duplicate { ref trust_domain } if trust_domain == "a.test"),
            "{e}"
        );
        let e = BundleSet::load_dir(&dir.path().join("..2026_01_01")).expect_err("empty directory");
        assert!(e.to_string().contains("no trust bundle file"), "{e}");
    }

    #[test]
    fn ed25519_roots_publish_their_key() {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("Ed25519 key");
        let mut p = leaf_params(vec![uri("spiffe://a.test")]);
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let root = p.self_signed(&key).expect("self-signed");
        let b = TrustBundle::new(td("a.test"), vec![root.der().clone()]).expect("Ed25519 root");
        let doc: Value = serde_json::from_str(&b.to_spiffe_json()).expect("JSON");
        let key = &doc["keys"][0];
        assert_eq!(
            (&key["kty"], &key["crv"]),
            (&"OKP".into(), &"Ed25519".into())
        );
        assert_eq!(
            key["x"].as_str().map(str::len),
            Some(43),
            "32 bytes, base64url"
        );
        let parsed = TrustBundle::from_spiffe_json(td("a.test"), b.to_spiffe_json().as_bytes());
        assert_eq!(parsed.expect("parses"), b);
    }
}
