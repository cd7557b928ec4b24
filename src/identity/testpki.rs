//! A test PKI in memory (rcgen): CAs per trust domain, and leaves with whatever flaw a test
//! needs. Compiled into the unit tests and, by path, into `tests/identity_tls.rs`.
// Each of the two uses a part of it.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime};
use rustls::sign::{CertifiedKey, SingleCertAndKey};

/// Seconds since the epoch, now.
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

/// `secs` seconds since the epoch, as rustls takes the time.
pub fn at(secs: u64) -> UnixTime {
    UnixTime::since_unix_epoch(Duration::from_secs(secs))
}

/// Makes `params` valid from `from` to `until` (seconds since the epoch, both included).
pub fn valid(params: &mut CertificateParams, from: u64, until: u64) {
    params.not_before = rcgen::date_time_ymd(1970, 1, 1) + Duration::from_secs(from);
    params.not_after = rcgen::date_time_ymd(1970, 1, 1) + Duration::from_secs(until);
}

/// A URI SAN.
pub fn uri(uri: &str) -> SanType {
    SanType::URI(uri.try_into().expect("IA5 URI"))
}

/// What a good SVID leaf for `sans` looks like (as `weft ca` issues them), valid for an hour.
pub fn leaf_params(sans: Vec<SanType>) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.subject_alt_names = sans;
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    valid(&mut p, now_secs() - 300, now_secs() + 3600);
    p
}

/// A CA: a self-signed root, or an intermediate under one.
pub struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
    /// The intermediates between this CA and its root, this one first (empty for a root).
    above: Vec<CertificateDer<'static>>,
}

fn ca_params(name: &str) -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    valid(&mut p, now_secs() - 3600, now_secs() + 86400);
    p
}

/// A leaf certificate with its chain (leaf first, root excluded) and key.
pub struct Leaf {
    /// The leaf, then the intermediates.
    pub chain: Vec<CertificateDer<'static>>,
    /// The leaf's private key.
    pub key: PrivateKeyDer<'static>,
}

impl Leaf {
    /// The leaf alone.
    pub fn der(&self) -> &CertificateDer<'static> {
        &self.chain[0]
    }

    /// A rustls certificate resolver (client or server) that always presents this leaf.
    pub fn resolver(&self) -> Arc<SingleCertAndKey> {
        let key = CertifiedKey::from_der(
            self.chain.clone(),
            self.key.clone_key(),
            &rustls::crypto::ring::default_provider(),
        )
        .expect("certified key");
        Arc::new(SingleCertAndKey::from(key))
    }
}

impl Ca {
    /// A self-signed root CA named `name`.
    pub fn root(name: &str) -> Self {
        let key = KeyPair::generate().expect("key");
        Self {
            issuer: CertifiedIssuer::self_signed(ca_params(name), key).expect("root"),
            above: Vec::new(),
        }
    }

    /// An intermediate CA named `name` under this one.
    pub fn intermediate(&self, name: &str) -> Self {
        let key = KeyPair::generate().expect("key");
        let issuer =
            CertifiedIssuer::signed_by(ca_params(name), key, &self.issuer).expect("intermediate");
        let mut above = vec![issuer.der().clone()];
        above.extend(self.above.iter().cloned());
        Self { issuer, above }
    }

    /// Its certificate (DER).
    pub fn der(&self) -> CertificateDer<'static> {
        self.issuer.der().clone()
    }

    /// Its certificate (PEM).
    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// Issues a leaf from `params`.
    pub fn issue(&self, params: CertificateParams) -> Leaf {
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.issuer).expect("sign");
        let mut chain = vec![cert.der().clone()];
        chain.extend(self.above.iter().cloned());
        Leaf {
            chain,
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        }
    }

    /// Issues a good SVID leaf for `id`.
    pub fn leaf(&self, id: &str) -> Leaf {
        self.issue(leaf_params(vec![uri(id)]))
    }
}
