//! The URLs weft dials its own services at (the tracker, the CA), checked when they are given
//! rather than at every reconnection.

/// Why `url` can never be reached, if its host is neither a DNS name nor an IP address: a URI
/// allows `$(NAME)`, which is what a Service variable the kubelet left unexpanded looks like,
/// and a process that exits on it gets the address when it is restarted.
pub fn unreachable_host(url: &str) -> Option<String> {
    let uri: http::Uri = match url.parse() {
        Ok(uri) => uri,
        Err(e) => return Some(e.to_string()),
    };
    let Some(host) = uri.host() else {
        return Some("no host".to_owned());
    };
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    rustls_pki_types::ServerName::try_from(host)
        .err()
        .map(|_| format!("{host:?} is neither a DNS name nor an IP address"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_that_can_never_be_reached_are_named() {
        for good in [
            "https://10.96.0.10:19090",
            "https://[fd00::10]:19443",
            "http://weft-tracker.weft-system.svc:19090",
            "https://localhost:1",
        ] {
            assert_eq!(unreachable_host(good), None, "{good}");
        }
        assert_eq!(
            unreachable_host("https://$(WEFT_CA_SERVICE_HOST):19443").as_deref(),
            Some("\"$(WEFT_CA_SERVICE_HOST)\" is neither a DNS name nor an IP address")
        );
        assert_eq!(unreachable_host("/no/host").as_deref(), Some("no host"));
        assert!(unreachable_host("https://a b:1").is_some());
    }
}
