//! A throwaway PKI for tests: a CA and certificates it issues (a SPIFFE id as the one URI SAN,
//! plus DNS and IP SANs for servers), written as PEM files into a temporary directory.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};

/// A CA whose files live in `dir`.
pub struct Pki {
    dir: PathBuf,
    ca_file: PathBuf,
    ca: CertifiedIssuer<'static, KeyPair>,
}

/// The files of one issued certificate.
pub struct Issued {
    /// The certificate chain (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
    /// The CA that issued it (PEM).
    pub ca: PathBuf,
}

impl Pki {
    /// A new CA named `name`, writing into `dir`.
    pub fn new(dir: &Path, name: &str) -> Self {
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        p.distinguished_name = dn;
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = CertifiedIssuer::self_signed(p, KeyPair::generate().expect("key")).expect("ca");
        let ca_file = dir.join(format!("{name}-ca.pem"));
        std::fs::write(&ca_file, ca.pem()).expect("write ca");
        Self {
            dir: dir.to_owned(),
            ca_file,
            ca,
        }
    }

    /// The CA certificate's file.
    pub fn ca_file(&self) -> PathBuf {
        self.ca_file.clone()
    }

    /// The CA's private key, written beside its certificate (for a CA that signs with it).
    pub fn ca_key_file(&self) -> PathBuf {
        let file = self.ca_file.with_extension("key");
        std::fs::write(&file, self.ca.key().serialize_pem()).expect("write ca key");
        file
    }

    /// Issues a certificate for `spiffe_id` (a client), also valid as a server for
    /// `localhost` and 127.0.0.1; files are named after `file`.
    pub fn issue(&self, file: &str, spiffe_id: &str) -> Issued {
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.subject_alt_names = vec![
            SanType::URI(spiffe_id.try_into().expect("uri")),
            SanType::DnsName("localhost".try_into().expect("dns")),
            SanType::IpAddress([127, 0, 0, 1].into()),
        ];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate().expect("key");
        let cert = p.signed_by(&key, &self.ca).expect("sign");
        let issued = Issued {
            cert: self.dir.join(format!("{file}.pem")),
            key: self.dir.join(format!("{file}-key.pem")),
            ca: self.ca_file.clone(),
        };
        std::fs::write(&issued.cert, cert.pem()).expect("write cert");
        std::fs::write(&issued.key, key.serialize_pem()).expect("write key");
        issued
    }
}
