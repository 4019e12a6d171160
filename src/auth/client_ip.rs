//! The client address: the socket peer (or its PROXY-protocol source), unless that peer is
//! a trusted proxy, in which case the right-most `X-Forwarded-For` entry that is not itself
//! a trusted proxy. A header from an untrusted peer is ignored: anyone can write one.

use std::net::IpAddr;

use ipnet::IpNet;

pub fn client_ip(peer: IpAddr, forwarded_for: Option<&str>, trusted: &[IpNet]) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|net| net.contains(ip));
    if trusted.is_empty() || !is_trusted(&peer) {
        return peer;
    }
    let Some(chain) = forwarded_for else {
        return peer;
    };
    let mut last_seen = peer;
    for entry in chain.rsplit(',') {
        let Some(ip) = parse_entry(entry.trim()) else {
            // A malformed hop: nothing to its left can be trusted either.
            return last_seen;
        };
        if !is_trusted(&ip) {
            return ip;
        }
        last_seen = ip;
    }
    last_seen
}

/// `1.2.3.4`, `1.2.3.4:567`, `2001:db8::1` or `[2001:db8::1]:567`.
fn parse_entry(entry: &str) -> Option<IpAddr> {
    if let Ok(ip) = entry.parse() {
        return Some(ip);
    }
    if let Ok(addr) = entry.parse::<std::net::SocketAddr>() {
        return Some(addr.ip());
    }
    None
}

/// The host of a `Referer` URL, lower-case, without port.
pub fn referer_host(referer: &str) -> Option<String> {
    let uri: http::Uri = referer.parse().ok()?;
    let host = uri.host()?.trim_end_matches('.');
    (!host.is_empty()).then(|| host.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|n| n.parse().unwrap()).collect()
    }

    #[test]
    fn untrusted_peer_is_the_client_whatever_it_claims() {
        let peer: IpAddr = "203.0.113.7".parse().unwrap();
        assert_eq!(client_ip(peer, Some("1.1.1.1"), &nets(&["10.0.0.0/8"])), peer);
        assert_eq!(client_ip(peer, Some("1.1.1.1"), &[]), peer);
    }

    #[test]
    fn trusted_peer_yields_rightmost_untrusted_entry() {
        let peer: IpAddr = "10.0.0.2".parse().unwrap();
        let trusted = nets(&["10.0.0.0/8", "192.168.0.0/16"]);
        // The client spoofed 6.6.6.6; the edge proxy appended the real 198.51.100.4.
        let ip = client_ip(peer, Some("6.6.6.6, 198.51.100.4, 192.168.1.1"), &trusted);
        assert_eq!(ip, "198.51.100.4".parse::<IpAddr>().unwrap());
        assert_eq!(
            client_ip(peer, Some("10.1.1.1, 192.168.3.3"), &trusted),
            "10.1.1.1".parse::<IpAddr>().unwrap()
        );
        assert_eq!(client_ip(peer, None, &trusted), peer);
        assert_eq!(
            client_ip(peer, Some("garbage, 10.9.9.9"), &trusted),
            "10.9.9.9".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            client_ip(peer, Some("[2001:db8::1]:443"), &trusted),
            "2001:db8::1".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn referer_hosts() {
        assert_eq!(
            referer_host("https://Shop.Example.com:8443/page?q=1").as_deref(),
            Some("shop.example.com")
        );
        assert_eq!(referer_host("not a url"), None);
        assert_eq!(referer_host("/relative"), None);
    }
}
