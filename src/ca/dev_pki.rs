//! A development PKI (`weft certs init`): for each trust domain a root, the certificates the
//! CA and the tracker serve with, client certificates for the tracker's subscribers, and a
//! bootstrap token file, so that `weft tracker`, `weft ca` and node agents run with TLS on one
//! machine. Never for production: the root key sits beside everything it signed.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};
use spiffe::TrustDomain;
use time::OffsetDateTime;

use crate::model::ClusterId;

/// How long the development certificates are valid.
const VALIDITY: time::Duration = time::Duration::days(365);

/// Why the development PKI cannot be written.
#[derive(Debug, thiserror::Error)]
pub enum DevPkiError {
    /// The trust domain cannot also be the cluster id in the tracker's SPIFFE ids.
    #[error("--trust-domain {trust_domain}: not usable as a cluster id: {error}")]
    ClusterId {
        /// The trust domain.
        trust_domain: String,
        /// Why.
        error: String,
    },
    /// The directory has files already, and overwriting was not asked for.
    #[error("{}: already holds a PKI; pass --force to replace it", .dir.display())]
    Exists {
        /// The directory.
        dir: PathBuf,
    },
    /// A file cannot be written.
    #[error("{}: {error}", .path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        error: std::io::Error,
    },
    /// A certificate cannot be generated.
    #[error("generating {what}: {error}")]
    Generate {
        /// Which.
        what: String,
        /// Why.
        error: rcgen::Error,
    },
    /// No random bytes for a token.
    #[error("no random bytes for a bootstrap token")]
    Random,
    /// A server name is no DNS name.
    #[error("--server-name {name:?}: not a DNS name")]
    ServerName {
        /// The name.
        name: String,
    },
}

/// Writes `contents` to `path`, readable by its owner only when `secret`.
fn write(path: &Path, contents: &str, secret: bool) -> Result<(), DevPkiError> {
    let error = |error| DevPkiError::Write {
        path: path.to_owned(),
        error,
    };
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    let mut file = options.open(path).map_err(error)?;
    file.write_all(contents.as_bytes()).map_err(error)
}

/// A certificate to issue from the root.
struct Leaf<'a> {
    file: &'a str,
    spiffe_id: Option<String>,
    server: bool,
    client: bool,
}

/// The files of one trust domain's development PKI.
#[derive(Debug, Clone)]
pub struct Written {
    /// The directory they are in.
    pub dir: PathBuf,
    /// The files, relative to it.
    pub files: Vec<String>,
}

/// Writes the development PKI of `trust_domain` into `out/TRUST-DOMAIN/`, with bootstrap tokens
/// and tracker client certificates for `nodes` nodes (`node-0`, `node-1`, …) and one for every
/// node agent of the cluster (`nodes`, as a DaemonSet mounts it). The serving certificates
/// are for localhost and `server_names`. The trust domain is also the cluster id in the
/// tracker's SPIFFE ids, as it is by default in weft. A directory that has files already is
/// refused unless `force`.
pub fn generate(
    out: &Path,
    trust_domain: &TrustDomain,
    nodes: usize,
    server_names: &[String],
    force: bool,
) -> Result<Written, DevPkiError> {
    let td = trust_domain.as_str();
    let server_names = server_names
        .iter()
        .map(|name| {
            let bad = || DevPkiError::ServerName { name: name.clone() };
            rustls_pki_types::DnsName::try_from(name.as_str()).map_err(|_| bad())?;
            name.clone()
                .try_into()
                .map(SanType::DnsName)
                .map_err(|_| bad())
        })
        .collect::<Result<Vec<_>, _>>()?;
    let cluster = ClusterId::new(td).map_err(|e| DevPkiError::ClusterId {
        trust_domain: td.to_owned(),
        error: e.reason,
    })?;
    let dir = out.join(td);
    let occupied = std::fs::read_dir(&dir).is_ok_and(|mut entries| entries.next().is_some());
    if occupied && !force {
        return Err(DevPkiError::Exists { dir });
    }
    std::fs::create_dir_all(&dir).map_err(|error| DevPkiError::Write {
        path: dir.clone(),
        error,
    })?;
    let generate = |what: &str| {
        let what = what.to_owned();
        move |error| DevPkiError::Generate {
            what: what.clone(),
            error,
        }
    };
    let now = OffsetDateTime::now_utc();
    let mut files = Vec::new();
    let mut put = |name: &str, contents: &str, secret: bool| {
        write(&dir.join(name), contents, secret)?;
        files.push(name.to_owned());
        Ok::<_, DevPkiError>(())
    };

    let mut root = CertificateParams::default();
    root.distinguished_name
        .push(DnType::CommonName, format!("weft development root {td}"));
    root.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    root.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    root.subject_alt_names = vec![SanType::URI(
        format!("spiffe://{td}")
            .try_into()
            .map_err(generate("the root"))?,
    )];
    root.not_before = now - time::Duration::minutes(5);
    root.not_after = now + VALIDITY;
    let root_key = KeyPair::generate().map_err(generate("the root key"))?;
    put("root-key.pem", &root_key.serialize_pem(), true)?;
    let root = CertifiedIssuer::self_signed(root, root_key).map_err(generate("the root"))?;
    put("root.pem", &root.pem(), false)?;

    let cluster_id = |rest: &str| Some(format!("spiffe://{td}/weft/cluster/{cluster}/{rest}"));
    let node_names: Vec<String> = (0..nodes).map(|i| format!("node-{i}")).collect();
    let mut leaves = vec![
        Leaf {
            file: "ca",
            spiffe_id: None,
            server: true,
            client: false,
        },
        Leaf {
            file: "tracker",
            spiffe_id: cluster_id("tracker"),
            server: true,
            client: true,
        },
        Leaf {
            file: "admin",
            spiffe_id: Some(format!("spiffe://{td}/weft/admin/admin")),
            server: false,
            client: true,
        },
    ];
    leaves.extend(node_names.iter().map(|node| Leaf {
        file: node,
        spiffe_id: cluster_id(&format!("node/{node}")),
        server: false,
        client: true,
    }));
    leaves.push(Leaf {
        file: "nodes",
        spiffe_id: cluster_id("nodes"),
        server: false,
        client: true,
    });
    leaves.push(Leaf {
        file: "ca-client",
        spiffe_id: cluster_id("ca"),
        server: false,
        client: true,
    });
    for leaf in leaves {
        let what = generate(leaf.file);
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.distinguished_name.push(DnType::CommonName, leaf.file);
        if let Some(id) = &leaf.spiffe_id {
            p.subject_alt_names
                .push(SanType::URI(id.clone().try_into().map_err(&what)?));
        }
        if leaf.server {
            p.subject_alt_names.extend([
                SanType::DnsName("localhost".try_into().map_err(&what)?),
                SanType::IpAddress([127, 0, 0, 1].into()),
                SanType::IpAddress(std::net::Ipv6Addr::LOCALHOST.into()),
            ]);
            p.subject_alt_names.extend(server_names.iter().cloned());
            p.extended_key_usages
                .push(ExtendedKeyUsagePurpose::ServerAuth);
        }
        if leaf.client {
            p.extended_key_usages
                .push(ExtendedKeyUsagePurpose::ClientAuth);
        }
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.not_before = now - time::Duration::minutes(5);
        p.not_after = now + VALIDITY;
        let key = KeyPair::generate().map_err(&what)?;
        let cert = p.signed_by(&key, &root).map_err(&what)?;
        put(
            &format!("{}-key.pem", leaf.file),
            &key.serialize_pem(),
            true,
        )?;
        put(&format!("{}.pem", leaf.file), &cert.pem(), false)?;
    }

    let random = rustls::crypto::ring::default_provider().secure_random;
    let mut tokens =
        String::from("# TOKEN NODE: the bootstrap tokens of `weft ca --bootstrap-tokens`\n");
    for node in &node_names {
        let mut secret = [0u8; 32];
        random.fill(&mut secret).map_err(|_| DevPkiError::Random)?;
        let hex: String = secret.iter().map(|b| format!("{b:02x}")).collect();
        tokens.push_str(&format!("{hex} {node}\n"));
    }
    put("bootstrap-tokens", &tokens, true)?;
    Ok(Written { dir, files })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::authn::Authenticator as _;
    use crate::ca::{BootstrapTokens, Signer, TtlLimits};
    use crate::tracker::subscriber::Subscriber;
    use crate::tracker::tls::TlsFiles;

    #[tokio::test]
    async fn the_files_work_where_they_are_meant_to() {
        let out = tempfile::tempdir().expect("tempdir");
        let td = TrustDomain::new("cluster-1").expect("td");
        let names = ["weft-tracker.weft-system.svc".to_owned()];
        let written = generate(out.path(), &td, 2, &names, false).expect("written");
        let dir = &written.dir;
        assert_eq!(dir, &out.path().join("cluster-1"));
        Signer::load(
            &dir.join("root.pem"),
            &dir.join("root-key.pem"),
            None,
            &td,
            TtlLimits::default(),
        )
        .expect("the root signs");
        for name in [
            "tracker",
            "admin",
            "node-0",
            "node-1",
            "nodes",
            "ca-client",
            "ca",
        ] {
            TlsFiles::load(
                &dir.join(format!("{name}.pem")),
                &dir.join(format!("{name}-key.pem")),
                &dir.join("root.pem"),
            )
            .expect(name);
        }
        let subscriber = |name: &str| {
            let pem = std::fs::read(dir.join(format!("{name}.pem"))).expect("read");
            let der = rustls_pki_types::pem::PemObject::from_pem_slice(&pem).expect("pem");
            let der: rustls_pki_types::CertificateDer<'_> = der;
            Subscriber::from_certificate(&der)
        };
        assert!(matches!(
            subscriber("tracker"),
            Ok(Subscriber::Tracker { .. })
        ));
        assert!(matches!(subscriber("admin"), Ok(Subscriber::Admin { .. })));
        assert!(
            matches!(subscriber("node-1"), Ok(Subscriber::Node { node: Some(node), .. }) if node == "node-1")
        );
        assert!(matches!(
            subscriber("nodes"),
            Ok(Subscriber::Node { node: None, .. })
        ));
        assert!(matches!(subscriber("ca-client"), Ok(Subscriber::Ca { .. })));
        for serving in ["tracker", "ca"] {
            let pem = std::fs::read(dir.join(format!("{serving}.pem"))).expect("read");
            let (_, pem) = x509_parser::pem::parse_x509_pem(&pem).expect("pem");
            let cert = pem.parse_x509().expect("x509");
            let sans = cert
                .subject_alternative_name()
                .expect("extension")
                .expect("names");
            assert!(
                sans.value.general_names.iter().any(|n| matches!(
                    n,
                    x509_parser::extensions::GeneralName::DNSName("weft-tracker.weft-system.svc")
                )),
                "{serving}"
            );
        }
        let tokens = BootstrapTokens::load(&dir.join("bootstrap-tokens")).expect("tokens");
        let text = std::fs::read_to_string(dir.join("bootstrap-tokens")).expect("read");
        let token = text
            .lines()
            .nth(2)
            .and_then(|l| l.split(' ').next())
            .expect("a line");
        assert_eq!(tokens.authenticate(token).await, Ok("node-1".into()));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(dir.join("root-key.pem"))
                .expect("meta")
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0, "keys are private");
        }
        let e = generate(out.path(), &td, 1, &[], false).expect_err("exists");
        assert!(e.to_string().contains("--force"), "{e}");
        generate(out.path(), &td, 1, &[], true).expect("forced");
        for bad in ["bäd.example", "a b", "", "10.0.0.1"] {
            let e = generate(out.path(), &td, 1, &[bad.to_owned()], true).expect_err(bad);
            assert_eq!(
                e.to_string(),
                format!("--server-name {bad:?}: not a DNS name")
            );
        }
        let long = TrustDomain::new("a".repeat(70)).expect("td");
        let e = generate(out.path(), &long, 1, &[], false).expect_err("not a cluster id");
        assert!(e.to_string().starts_with("--trust-domain "), "{e}");
    }
}
