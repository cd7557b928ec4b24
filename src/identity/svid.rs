//! The leaf of a peer's X.509 SVID, checked by the X.509-SVID rules and weft's threat list
//! before anything else is read from it: exactly one URI SAN, naming a workload; no NUL in any
//! name; not a CA; a signing key that may sign handshakes (digitalSignature) and never
//! certificates or CRLs. Whether the chain is trusted is `verify`'s business.

use x509_parser::asn1_rs::{Any, FromDer as _, Tag};
use x509_parser::prelude::{GeneralName, ParsedExtension, X509Certificate};

use super::id::{IdError, WorkloadId};

/// A leaf certificate that is no valid workload SVID, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("certificate {cert}: {problem}")]
pub struct SvidError {
    cert: String,
    problem: SvidProblem,
}

/// What is wrong with a leaf certificate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SvidProblem {
    /// Not one DER X.509 certificate.
    #[error("not an X.509 certificate: {0}")]
    NotX509(String),
    /// An extension that cannot be read, or one present twice.
    #[error("malformed extension: {0}")]
    BadExtension(String),
    /// A subject alternative name that cannot be read (its GeneralName tag).
    #[error("malformed subject alternative name (tag {0})")]
    BadName(u32),
    /// A subject alternative name with a NUL byte (a truncation attack on string matching).
    #[error("a subject alternative name contains a NUL byte: {0}")]
    Nul(String),
    /// No URI SAN; DNS names and other names never count as an identity.
    #[error("no URI SAN (DNS and other names never count as an identity)")]
    NoUri,
    /// More than one URI SAN; an SVID has exactly one.
    #[error("{} URI SANs, an SVID has exactly one: {}", .0.len(), .0.join(", "))]
    ManyUris(Vec<String>),
    /// The URI SAN is no workload SPIFFE id.
    #[error(transparent)]
    Id(IdError),
    /// A CA certificate presented as a leaf.
    #[error("is a CA (basicConstraints cA=true)")]
    Ca,
    /// A leaf whose key may sign certificates (keyCertSign) or CRLs (cRLSign).
    #[error("may sign {0}, which a leaf never does")]
    Signs(&'static str),
    /// No keyUsage extension with digitalSignature.
    #[error("lacks keyUsage digitalSignature")]
    NoDigitalSignature,
}

impl SvidError {
    /// What is wrong.
    pub fn problem(&self) -> &SvidProblem {
        &self.problem
    }
}

/// Names in errors are the peer's: escaped, and cut short so that a 2 KiB name stays readable.
fn shown(name: &str) -> String {
    const MAX: usize = 96;
    if name.chars().count() > MAX {
        format!("{:?}…", name.chars().take(MAX).collect::<String>())
    } else {
        format!("{name:?}")
    }
}

/// The certificate as errors name it: its URI SAN, else its subject, else its serial.
fn described(cert: &X509Certificate<'_>) -> String {
    let uri = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .and_then(|san| {
            san.value.general_names.iter().find_map(|name| match name {
                GeneralName::URI(uri) => Some(shown(uri)),
                _ => None,
            })
        });
    let subject = cert.subject().to_string();
    uri.unwrap_or_else(|| {
        if subject.is_empty() {
            format!("serial {}", cert.raw_serial_as_string())
        } else {
            shown(&subject)
        }
    })
}

/// Whether an otherName's value is a string with a NUL character in it; `None` if the value
/// cannot be read.
fn other_name_has_nul(value: &[u8]) -> Option<bool> {
    // The value is `[0] EXPLICIT ANY`: the tagged wrapper, then the value itself.
    let (_, wrapper) = Any::from_der(value).ok()?;
    let (_, inner) = Any::from_der(wrapper.data).ok()?;
    // A NUL is one zero byte in 8-bit strings, a zero unit in UTF-16 and UTF-32 ones.
    let width = match inner.tag() {
        Tag::Utf8String
        | Tag::Ia5String
        | Tag::PrintableString
        | Tag::VisibleString
        | Tag::TeletexString
        | Tag::NumericString
        | Tag::GeneralString => 1,
        Tag::BmpString => 2,
        Tag::UniversalString => 4,
        _ => return Some(false),
    };
    Some(
        inner
            .data
            .chunks(width)
            .any(|unit| unit.iter().all(|&b| b == 0)),
    )
}

/// The workload a peer's leaf certificate (DER) names, if it is a valid X.509 SVID leaf.
pub fn leaf_identity(der: &[u8]) -> Result<WorkloadId, SvidError> {
    let cert = match X509Certificate::from_der(der) {
        Ok(([], cert)) => cert,
        Ok((rest, _)) => {
            return Err(SvidError {
                cert: format!("of {} bytes", der.len()),
                problem: SvidProblem::NotX509(format!("{} bytes after it", rest.len())),
            });
        }
        Err(e) => {
            return Err(SvidError {
                cert: format!("of {} bytes", der.len()),
                problem: SvidProblem::NotX509(e.to_string()),
            });
        }
    };
    let fail = |problem| SvidError {
        cert: described(&cert),
        problem,
    };

    // x509-parser keeps a certificate whose extension it cannot read; such an extension could
    // be the one that matters (a cA flag), so it is refused rather than read as absent.
    if let Some(ext) = cert
        .extensions()
        .iter()
        .find(|ext| matches!(ext.parsed_extension(), ParsedExtension::ParseError { .. }))
    {
        return Err(fail(SvidProblem::BadExtension(format!(
            "{} cannot be read",
            ext.oid
        ))));
    }

    // The getters refuse an extension present twice, so a second SAN extension cannot hide a
    // second URI.
    let sans = cert
        .subject_alternative_name()
        .map_err(|e| fail(SvidProblem::BadExtension(format!("subjectAltName: {e}"))))?;
    let names = sans.map_or(&[][..], |san| san.value.general_names.as_slice());
    let mut uris = Vec::new();
    for name in names {
        let text = match name {
            GeneralName::URI(text) => {
                uris.push(*text);
                Some(*text)
            }
            GeneralName::DNSName(text) | GeneralName::RFC822Name(text) => Some(*text),
            GeneralName::OtherName(oid, value) => match other_name_has_nul(value) {
                Some(false) => None,
                Some(true) => return Err(fail(SvidProblem::Nul(format!("otherName {oid}")))),
                None => return Err(fail(SvidProblem::BadName(0))),
            },
            GeneralName::Invalid(tag, _) => return Err(fail(SvidProblem::BadName(tag.0))),
            _ => None,
        };
        if let Some(text) = text.filter(|text| text.contains('\0')) {
            return Err(fail(SvidProblem::Nul(shown(text))));
        }
    }
    let uri = match uris.as_slice() {
        [] => return Err(fail(SvidProblem::NoUri)),
        [uri] => *uri,
        many => {
            return Err(fail(SvidProblem::ManyUris(
                many.iter().map(|uri| shown(uri)).collect(),
            )));
        }
    };
    let id = WorkloadId::parse(uri).map_err(|e| fail(SvidProblem::Id(e)))?;

    let constraints = cert
        .basic_constraints()
        .map_err(|e| fail(SvidProblem::BadExtension(format!("basicConstraints: {e}"))))?;
    if constraints.is_some_and(|bc| bc.value.ca) {
        return Err(fail(SvidProblem::Ca));
    }
    let usage = cert
        .key_usage()
        .map_err(|e| fail(SvidProblem::BadExtension(format!("keyUsage: {e}"))))?
        .ok_or_else(|| fail(SvidProblem::NoDigitalSignature))?
        .value;
    if usage.key_cert_sign() {
        return Err(fail(SvidProblem::Signs("certificates (keyCertSign)")));
    }
    if usage.crl_sign() {
        return Err(fail(SvidProblem::Signs("CRLs (cRLSign)")));
    }
    if !usage.digital_signature() {
        return Err(fail(SvidProblem::NoDigitalSignature));
    }
    Ok(id)
}

#[cfg(test)]
mod tests {
    use rcgen::{
        CertificateParams, CustomExtension, IsCa, KeyUsagePurpose, OtherNameValue, SanType,
    };

    use super::*;
    use crate::identity::testpki::{Ca, leaf_params, uri};

    const ID: &str = "spiffe://td/ns/demo/sa/web";

    fn dns(name: &str) -> SanType {
        SanType::DnsName(name.try_into().expect("IA5 name"))
    }

    /// A subjectAltName extension of `names` (tag, bytes), DER by hand: what rcgen will not
    /// write (a second SAN extension, a name that is not UTF-8).
    fn san_extension(names: &[(u8, &[u8])]) -> CustomExtension {
        let mut content = Vec::new();
        for (tag, name) in names {
            content.push(0x80 | tag);
            content.push(u8::try_from(name.len()).expect("short name"));
            content.extend_from_slice(name);
        }
        let mut der = vec![0x30, u8::try_from(content.len()).expect("short list")];
        der.extend(content);
        CustomExtension::from_oid_content(&[2, 5, 29, 17], der)
    }

    fn problem(ca: &Ca, params: CertificateParams) -> SvidProblem {
        leaf_identity(ca.issue(params).der())
            .expect_err("refused")
            .problem()
            .clone()
    }

    #[test]
    fn a_good_leaf_names_its_workload() {
        let ca = Ca::root("td");
        let id = leaf_identity(ca.leaf(ID).der()).expect("good SVID");
        assert_eq!(id, WorkloadId::parse(ID).expect("id"));
        // DNS names beside the URI SAN are allowed, and ignored.
        let id = leaf_identity(ca.issue(leaf_params(vec![uri(ID), dns("web.demo")])).der());
        assert_eq!(id.expect("good SVID").to_string(), ID);
    }

    #[test]
    fn names_that_are_not_exactly_one_workload_uri_are_refused() {
        let ca = Ca::root("td");
        let long = format!("spiffe://td/ns/demo/sa/{}", "a".repeat(2100));
        let other_name = |text: &str| {
            SanType::OtherName((
                vec![1, 3, 6, 1, 4, 1, 311, 20, 2, 3],
                OtherNameValue::Utf8String(text.into()),
            ))
        };
        let two_sans = {
            let mut p = leaf_params(vec![uri(ID)]);
            p.custom_extensions = vec![san_extension(&[(6, b"spiffe://td/ns/demo/sa/admin")])];
            p
        };
        let not_utf8 = {
            let mut p = leaf_params(Vec::new());
            p.custom_extensions = vec![san_extension(&[(6, b"spiffe://td/ns/\xff/sa/a")])];
            p
        };
        type Check = fn(&SvidProblem) -> bool;
        let cases: Vec<(&str, CertificateParams, Check)> = vec![
            (
                "two URI SANs (THREATS 4)",
                leaf_params(vec![uri(ID), uri("spiffe://td/ns/demo/sa/admin")]),
                |p| matches!(p, SvidProblem::ManyUris(uris) if uris.len() == 2),
            ),
            (
                "a SPIFFE id and an https URI",
                leaf_params(vec![uri("https://example.com/"), uri(ID)]),
                |p| matches!(p, SvidProblem::ManyUris(_)),
            ),
            (
                "a second SAN extension",
                two_sans,
                |p| matches!(p, SvidProblem::BadExtension(e) if e.contains("subjectAltName")),
            ),
            ("no SAN at all", leaf_params(Vec::new()), |p| {
                *p == SvidProblem::NoUri
            }),
            (
                "a DNS SAN spelling a SPIFFE id (THREATS 7)",
                leaf_params(vec![dns(ID)]),
                |p| *p == SvidProblem::NoUri,
            ),
            (
                "an otherName spelling a SPIFFE id (THREATS 7)",
                leaf_params(vec![other_name(ID)]),
                |p| *p == SvidProblem::NoUri,
            ),
            (
                "NUL in the URI SAN (THREATS 7)",
                leaf_params(vec![uri("spiffe://td/ns/demo/sa/web\0.evil")]),
                |p| matches!(p, SvidProblem::Nul(name) if name.contains("\\0")),
            ),
            (
                "NUL in a DNS SAN",
                leaf_params(vec![uri(ID), dns("web\0.evil")]),
                |p| matches!(p, SvidProblem::Nul(_)),
            ),
            (
                "NUL in an otherName",
                leaf_params(vec![uri(ID), other_name("admin\0web")]),
                |p| matches!(p, SvidProblem::Nul(name) if name.starts_with("otherName")),
            ),
            ("a URI that is not UTF-8", not_utf8, |p| {
                *p == SvidProblem::BadName(6)
            }),
            (
                "an id with no path (THREATS 5)",
                leaf_params(vec![uri("spiffe://td")]),
                |p| matches!(p, SvidProblem::Id(IdError::NotAWorkload { .. })),
            ),
            (
                "an id that is no workload",
                leaf_params(vec![uri("spiffe://td/weft/admin/alice")]),
                |p| matches!(p, SvidProblem::Id(IdError::NotAWorkload { .. })),
            ),
            (
                "a scheme other than spiffe",
                leaf_params(vec![uri("https://td/ns/demo/sa/web")]),
                |p| matches!(p, SvidProblem::Id(IdError::Spiffe { .. })),
            ),
            (
                "%-encoding",
                leaf_params(vec![uri("spiffe://td/ns/demo/sa/w%65b")]),
                |p| matches!(p, SvidProblem::Id(IdError::Spiffe { .. })),
            ),
            (
                "a .. segment",
                leaf_params(vec![uri("spiffe://td/ns/demo/sa/../sa/web")]),
                |p| matches!(p, SvidProblem::Id(IdError::Spiffe { .. })),
            ),
            (
                "an uppercase trust domain",
                leaf_params(vec![uri("spiffe://TD/ns/demo/sa/web")]),
                |p| matches!(p, SvidProblem::Id(IdError::TrustDomain { .. })),
            ),
            (
                "an id over 2048 bytes",
                leaf_params(vec![uri(&long)]),
                |p| matches!(p, SvidProblem::Id(IdError::Spiffe { error, .. }) if error.contains("2048")),
            ),
        ];
        for (case, params, check) in cases {
            let problem = problem(&ca, params);
            assert!(check(&problem), "{case}: {problem}");
        }
    }

    #[test]
    fn leaves_that_may_act_as_a_ca_are_refused() {
        let ca = Ca::root("td");
        let with = |f: fn(&mut CertificateParams)| {
            let mut p = leaf_params(vec![uri(ID)]);
            f(&mut p);
            problem(&ca, p)
        };
        use KeyUsagePurpose::{CrlSign, DigitalSignature, KeyCertSign, KeyEncipherment};
        assert_eq!(
            with(|p| p.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained)),
            SvidProblem::Ca
        );
        assert_eq!(
            with(|p| p.key_usages = vec![DigitalSignature, KeyCertSign]),
            SvidProblem::Signs("certificates (keyCertSign)")
        );
        assert_eq!(
            with(|p| p.key_usages = vec![DigitalSignature, CrlSign]),
            SvidProblem::Signs("CRLs (cRLSign)")
        );
        assert_eq!(
            with(|p| p.key_usages = vec![KeyEncipherment]),
            SvidProblem::NoDigitalSignature
        );
        assert_eq!(
            with(|p| p.key_usages = Vec::new()),
            SvidProblem::NoDigitalSignature
        );
    }

    #[test]
    fn errors_name_the_certificate() {
        let ca = Ca::root("td");
        let mut p = leaf_params(vec![uri(ID)]);
        p.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let e = leaf_identity(ca.issue(p).der()).expect_err("a CA");
        assert_eq!(
            e.to_string(),
            format!("certificate {ID:?}: is a CA (basicConstraints cA=true)")
        );
        let e = leaf_identity(b"\x30\x03\x02\x01\x01").expect_err("not X.509");
        assert!(
            e.to_string()
                .starts_with("certificate of 5 bytes: not an X.509"),
            "{e}"
        );
        let mut trailing = ca.leaf(ID).der().to_vec();
        trailing.push(0);
        let e = leaf_identity(&trailing).expect_err("trailing byte");
        assert!(e.to_string().contains("1 bytes after it"), "{e}");
    }
}
