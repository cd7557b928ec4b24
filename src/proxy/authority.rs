//! What a peer names in a tunnel request, made unambiguous (THREATS 16): the CONNECT
//! authority as exactly one (IP, port), and the source pod's address from `forwarded: for=`.
//! Policy is judged on these values, so anything with a second reading is refused.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// A CONNECT authority or `forwarded` header refused, with the text and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} {text:?} refused: {problem}")]
pub struct AuthorityError {
    /// Which field it was ("authority" or "forwarded").
    pub what: &'static str,
    /// The text as received.
    pub text: String,
    /// Why it was refused.
    pub problem: Problem,
}

/// Why an authority or a `forwarded` header was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    /// Nothing was given.
    #[error("empty")]
    Empty,
    /// Whitespace or control characters.
    #[error("contains whitespace or control characters")]
    Whitespace,
    /// A scheme or path: an absolute URI where an authority was expected.
    #[error("an absolute URI or a path, not host:port")]
    AbsoluteUri,
    /// `user@host`.
    #[error("has userinfo (@)")]
    Userinfo,
    /// `%` — an IPv6 zone id or percent-encoding.
    #[error("has a zone id or percent-encoding (%)")]
    ZoneOrPercent,
    /// No `:port`.
    #[error("has no port")]
    MissingPort,
    /// A port that is not 1–65535 in plain decimal.
    #[error("port {0:?} is not a decimal number in 1-65535 without leading zeros")]
    BadPort(String),
    /// A name rather than an address: tunnels carry addresses the source already resolved.
    #[error("host {0:?} is a name, not an IP address")]
    Hostname(String),
    /// `10.1`, `167772165`, `0x0a000005`: forms inet_aton reads as some other address.
    #[error("host {0:?} is not a dotted-quad IPv4 address (short, integer or hex form)")]
    NotDottedQuad(String),
    /// `010.0.0.1`: octal to some parsers, decimal to others.
    #[error("host {0:?} has a leading zero in an octet (octal to some parsers)")]
    LeadingZero(String),
    /// An octet above 255.
    #[error("host {0:?} has an octet above 255")]
    OctetRange(String),
    /// Brackets that do not hold an IPv6 address, or an IPv6 address without brackets.
    #[error("host {0:?} is not a bracketed IPv6 address")]
    BadIpv6(String),
    /// `::ffff:a.b.c.d`: the same host as its IPv4 form, which is the one policy is written for.
    #[error("{0} is IPv4-mapped; use the IPv4 form")]
    Ipv4Mapped(Ipv6Addr),
    /// `0.0.0.0` or `::`, which no peer can mean as a destination.
    #[error("{0} is the unspecified address")]
    Unspecified(IpAddr),
    /// An address in a spelling other than its canonical one (upper-case hex, zeros not
    /// compressed): one address, one spelling.
    #[error("not in canonical form; expected {0:?}")]
    NotCanonical(String),
    /// A `forwarded` header that is not exactly one `for=` with an address.
    #[error("is not a single for=<address>")]
    BadForwarded,
}

/// Parses a CONNECT authority into the one socket address it names, or refuses it. Accepts
/// only `a.b.c.d:port` and `[v6]:port` spelt exactly as `SocketAddr` prints them.
pub fn canonical_authority(text: &str) -> Result<SocketAddr, AuthorityError> {
    let refuse = |problem| AuthorityError {
        what: "authority",
        text: text.to_owned(),
        problem,
    };
    let (host, port) = split_host_port(text).map_err(refuse)?;
    let ip = host_ip(host).map_err(refuse)?;
    let port = parse_port(port).map_err(refuse)?;
    let addr = SocketAddr::new(ip, port);
    let canonical = addr.to_string();
    if canonical != text {
        return Err(refuse(Problem::NotCanonical(canonical)));
    }
    Ok(addr)
}

/// Parses the value of a `forwarded` header as HBONE clients send it: exactly `for=a.b.c.d`,
/// `for="a.b.c.d"` or `for="[v6]"` (RFC 7239 quoting), nothing else.
pub fn forwarded_for(text: &str) -> Result<IpAddr, AuthorityError> {
    let refuse = |problem| AuthorityError {
        what: "forwarded",
        text: text.to_owned(),
        problem,
    };
    check_characters(text).map_err(refuse)?;
    let value = text
        .strip_prefix("for=")
        .or_else(|| text.strip_prefix("For="))
        .or_else(|| text.strip_prefix("FOR="))
        .ok_or(refuse(Problem::BadForwarded))?;
    let quoted = value
        .strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .filter(|v| !v.contains('"'));
    // A bracketed IPv6 address must be quoted (RFC 7239 §6); a bare token cannot hold ':'.
    let host = match quoted {
        Some(inner) => inner,
        None if value.bytes().all(|b| b.is_ascii_digit() || b == b'.') => value,
        None => return Err(refuse(Problem::BadForwarded)),
    };
    let ip = host_ip(host).map_err(refuse)?;
    let canonical = match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("[{v6}]"),
    };
    if canonical != host {
        return Err(refuse(Problem::NotCanonical(canonical)));
    }
    Ok(ip)
}

/// Refuses the characters no address contains but that parsers disagree on.
fn check_characters(text: &str) -> Result<(), Problem> {
    if text.is_empty() {
        return Err(Problem::Empty);
    }
    if text.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(Problem::Whitespace);
    }
    if text.contains('/') || text.contains('?') || text.contains('#') {
        return Err(Problem::AbsoluteUri);
    }
    if text.contains('@') {
        return Err(Problem::Userinfo);
    }
    if text.contains('%') {
        return Err(Problem::ZoneOrPercent);
    }
    Ok(())
}

fn split_host_port(text: &str) -> Result<(&str, &str), Problem> {
    check_characters(text)?;
    if text.starts_with('[') {
        let end = text
            .find(']')
            .ok_or_else(|| Problem::BadIpv6(text.into()))?;
        let port = text[end + 1..]
            .strip_prefix(':')
            .ok_or(Problem::MissingPort)?;
        return Ok((&text[..=end], port));
    }
    let (host, port) = text.rsplit_once(':').ok_or(Problem::MissingPort)?;
    if host.contains(':') {
        // "http:" of an absolute URI without a path, or an unbracketed IPv6 address.
        return Err(if host.contains('.') || host.is_empty() {
            Problem::AbsoluteUri
        } else {
            Problem::BadIpv6(host.into())
        });
    }
    Ok((host, port))
}

/// An IP from `a.b.c.d` or `[v6]`, refusing every other spelling with its own reason.
fn host_ip(host: &str) -> Result<IpAddr, Problem> {
    if let Some(inner) = host.strip_prefix('[') {
        let inner = inner
            .strip_suffix(']')
            .ok_or_else(|| Problem::BadIpv6(host.into()))?;
        let v6: Ipv6Addr = inner.parse().map_err(|_| Problem::BadIpv6(host.into()))?;
        if v6.to_ipv4_mapped().is_some() {
            return Err(Problem::Ipv4Mapped(v6));
        }
        return unspecified(IpAddr::V6(v6));
    }
    if host.is_empty() {
        return Err(Problem::Empty);
    }
    if host.contains(':') {
        return Err(Problem::BadIpv6(host.into()));
    }
    let lower = host.to_ascii_lowercase();
    let parts: Vec<&str> = lower.split('.').collect();
    let digits_and_dots = lower.bytes().all(|b| b.is_ascii_digit() || b == b'.');
    if !digits_and_dots && !parts.iter().any(|p| p.starts_with("0x")) {
        return Err(Problem::Hostname(host.into()));
    }
    let numeric = |s: &&str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if parts.len() != 4 || !parts.iter().all(numeric) {
        return Err(Problem::NotDottedQuad(host.into()));
    }
    let mut octets = [0u8; 4];
    for (octet, part) in octets.iter_mut().zip(&parts) {
        if part.len() > 1 && part.starts_with('0') {
            return Err(Problem::LeadingZero(host.into()));
        }
        *octet = part.parse().map_err(|_| Problem::OctetRange(host.into()))?;
    }
    unspecified(IpAddr::V4(Ipv4Addr::from(octets)))
}

fn unspecified(ip: IpAddr) -> Result<IpAddr, Problem> {
    if ip.is_unspecified() {
        Err(Problem::Unspecified(ip))
    } else {
        Ok(ip)
    }
}

fn parse_port(port: &str) -> Result<u16, Problem> {
    if port.is_empty() {
        return Err(Problem::MissingPort);
    }
    let plain = port.bytes().all(|b| b.is_ascii_digit()) && !port.starts_with('0');
    match port.parse::<u16>() {
        Ok(n) if plain && n != 0 => Ok(n),
        _ => Err(Problem::BadPort(port.into())),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn authorities_accepted_and_refused() {
        let ok: &[(&str, &str)] = &[
            ("10.0.0.5:8080", "10.0.0.5:8080"),
            ("1.2.3.4:1", "1.2.3.4:1"),
            ("255.255.255.255:65535", "255.255.255.255:65535"),
            ("[2001:db8::1]:443", "[2001:db8::1]:443"),
            ("[fe80::1]:80", "[fe80::1]:80"),
            ("[::1]:15008", "[::1]:15008"),
        ];
        for (text, want) in ok {
            let got = canonical_authority(text).map(|a| a.to_string());
            assert_eq!(got.as_deref(), Ok(*want), "{text}");
        }
        let refused: &[(&str, &str)] = &[
            ("", "empty"),
            ("10.0.0.5", "has no port"),
            ("10.0.0.5:", "has no port"),
            ("[2001:db8::1]", "has no port"),
            ("10.0.0.5:0", "1-65535"),
            ("10.0.0.5:65536", "1-65535"),
            ("10.0.0.5:080", "1-65535"),
            ("10.0.0.5:+80", "1-65535"),
            ("10.0.0.5:http", "1-65535"),
            ("localhost:80", "is a name"),
            ("pod.ns.svc.cluster.local:80", "is a name"),
            ("10.0.0.5.nip.io:80", "is a name"),
            ("[fe80::1%eth0]:80", "zone id"),
            ("[fe80::1%25eth0]:80", "zone id"),
            ("[::ffff:10.0.0.5]:80", "IPv4-mapped"),
            ("[::ffff:a00:5]:80", "IPv4-mapped"),
            ("0x0a000005:80", "dotted-quad"),
            ("0x0a.0.0.5:80", "dotted-quad"),
            ("10.1:80", "dotted-quad"),
            ("10.0.5:80", "dotted-quad"),
            ("167772165:80", "dotted-quad"),
            ("10.0.0.5.:80", "dotted-quad"),
            ("010.0.0.5:80", "leading zero"),
            ("10.0.0.05:80", "leading zero"),
            ("10.0.0.256:80", "above 255"),
            ("user@10.0.0.5:80", "userinfo"),
            ("user:pw@10.0.0.5:80", "userinfo"),
            ("http://10.0.0.5:80", "absolute URI"),
            ("http://10.0.0.5:80/", "absolute URI"),
            ("10.0.0.5:80/path", "absolute URI"),
            ("http:10.0.0.5:80", "absolute URI"),
            (" 10.0.0.5:80", "whitespace"),
            ("10.0.0.5:80 ", "whitespace"),
            ("10.0.0.5 :80", "whitespace"),
            ("10.0.0.5:80\n", "whitespace"),
            ("10.0.0.5:\t80", "whitespace"),
            ("2001:db8::1:80", "bracketed IPv6"),
            ("[2001:db8::1:80", "bracketed IPv6"),
            ("[10.0.0.5]:80", "bracketed IPv6"),
            ("[2001:DB8::1]:80", "canonical form"),
            ("[2001:db8:0:0:0:0:0:1]:80", "canonical form"),
            ("0.0.0.0:80", "unspecified"),
            ("[::]:80", "unspecified"),
            (":80", "empty"),
        ];
        for (text, want) in refused {
            let err = canonical_authority(text).expect_err(text).to_string();
            assert!(err.contains(want), "{text:?}: {err}");
            assert!(err.contains(&format!("{text:?}")), "names the input: {err}");
        }
    }

    #[test]
    fn forwarded_headers_accepted_and_refused() {
        let ok: &[(&str, &str)] = &[
            ("for=10.0.0.7", "10.0.0.7"),
            ("for=\"10.0.0.7\"", "10.0.0.7"),
            ("For=10.0.0.7", "10.0.0.7"),
            ("for=\"[2001:db8::7]\"", "2001:db8::7"),
        ];
        for (text, want) in ok {
            let got = forwarded_for(text).map(|ip| ip.to_string());
            assert_eq!(got.as_deref(), Ok(*want), "{text}");
        }
        for text in [
            "",
            "for=",
            "for=\"\"",
            "for=unknown",
            "for=_hidden",
            "by=10.0.0.7",
            "for=10.0.0.7;proto=https",
            "for=10.0.0.7, for=10.0.0.8",
            "for=10.0.0.7:1234",
            "for=\"10.0.0.7:1234\"",
            "for=[2001:db8::7]",
            "for=\"2001:db8::7\"",
            "for=\"[::ffff:10.0.0.7]\"",
            "for=\"[fe80::1%eth0]\"",
            "for=10.1",
            "for=010.0.0.7",
            "for= 10.0.0.7",
            "for=\"10.0.0.7",
            "for=\"10.0.0.7\"\"",
        ] {
            assert!(forwarded_for(text).is_err(), "{text:?} accepted");
        }
    }

    proptest! {
        /// Whatever is accepted names one address, spelt exactly as it prints: no second reading.
        #[test]
        fn accepted_authorities_round_trip(text in prop_oneof![
            "[\\[\\]0-9a-fA-FxX.:%@/ ]{0,48}",
            "[0-9]{1,4}(\\.[0-9]{1,4}){0,4}:[0-9]{0,6}",
            "\\[[0-9a-fA-F:.]{0,40}\\]:[0-9]{0,6}",
        ]) {
            if let Ok(addr) = canonical_authority(&text) {
                prop_assert_eq!(addr.to_string(), text);
            }
        }

        /// Every socket address (but the refused kinds) is accepted as it prints.
        #[test]
        fn printed_addresses_are_accepted(addr in any::<SocketAddr>()) {
            let mapped = matches!(addr.ip(), IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some());
            if addr.port() != 0 && !addr.ip().is_unspecified() && !mapped {
                let addr = SocketAddr::new(addr.ip(), addr.port());
                prop_assert_eq!(canonical_authority(&addr.to_string()), Ok(addr));
            }
        }
    }
}
