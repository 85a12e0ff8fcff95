//! Where fhirgate may connect on a caller's behalf, and which certificates it trusts.
//!
//! Sources, destinations, identity providers and CDS servers are named by the operator in
//! configuration. A URL a *caller* names (a PAS subscription's endpoint) may only point at a
//! host in `outbound.allow_hosts`: an exact host (optionally with `:port`) or a `*.domain`
//! pattern. Only exact entries may reach private, loopback or link-local addresses — as an IP
//! literal, or by a name that resolves to one (checked when connecting, so a DNS answer that
//! changes after the check does not get through). Redirects are never followed.
//!
//! Every outbound client trusts the system's roots plus, when configured, the CAs in
//! `outbound.ca_file`; certificates are always verified.

use std::net::{IpAddr, SocketAddr};

use anyhow::Context;

use crate::config::OutboundConfig;

/// The outbound policy, shared by every client fhirgate builds.
#[derive(Default)]
pub struct Outbound {
    /// Lowercased allow-list entries.
    allow: Vec<String>,
    roots: Vec<reqwest::Certificate>,
}

/// Whether `ip` is an address outside the public internet.
pub fn is_private(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            v4.is_private()
                || v4.is_loopback()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || a == 0
                // Carrier-grade NAT 100.64.0.0/10, IETF 192.0.0.0/24, benchmarking
                // 198.18.0.0/15, reserved 240.0.0.0/4.
                || (a == 100 && (64..128).contains(&b))
                || (a == 192 && b == 0 && v4.octets()[2] == 0)
                || (a == 198 && (b == 18 || b == 19))
                || a >= 240
        }
        IpAddr::V6(v6) => {
            let first = v6.segments()[0];
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                // Unique local fc00::/7 and link-local fe80::/10.
                || (first & 0xfe00) == 0xfc00
                || (first & 0xffc0) == 0xfe80
                || v6.to_ipv4_mapped().is_some_and(|v4| is_private(IpAddr::V4(v4)))
                // IPv4 carried in IPv6: IPv4-compatible ::a.b.c.d, NAT64 64:ff9b::/96, and
                // 6to4 2002::/16 — judged by the IPv4 address inside.
                || embedded_v4(&v6).is_some_and(|v4| is_private(IpAddr::V4(v4)))
        }
    }
}

/// The IPv4 address an IPv6 address carries, for the transition prefixes.
fn embedded_v4(v6: &std::net::Ipv6Addr) -> Option<std::net::Ipv4Addr> {
    let s = v6.segments();
    let from = |hi: u16, lo: u16| {
        let [a, b] = hi.to_be_bytes();
        let [c, d] = lo.to_be_bytes();
        std::net::Ipv4Addr::new(a, b, c, d)
    };
    match s {
        [0, 0, 0, 0, 0, 0, hi, lo] if hi != 0 => Some(from(hi, lo)),
        [0x64, 0xff9b, 0, 0, 0, 0, hi, lo] => Some(from(hi, lo)),
        [0x2002, hi, lo, ..] => Some(from(hi, lo)),
        _ => None,
    }
}

impl Outbound {
    pub fn new(config: &OutboundConfig) -> anyhow::Result<Self> {
        let roots = match &config.ca_file {
            Some(path) => {
                let pem = std::fs::read(path)
                    .with_context(|| format!("reading outbound.ca_file {}", path.display()))?;
                let certs = reqwest::Certificate::from_pem_bundle(&pem)
                    .with_context(|| format!("{} is not a PEM bundle", path.display()))?;
                if certs.is_empty() {
                    anyhow::bail!("{} holds no certificate", path.display());
                }
                certs
            }
            None => Vec::new(),
        };
        for entry in &config.allow_hosts {
            let host = entry.strip_prefix("*.").unwrap_or(entry);
            if host.is_empty() || host.contains('/') || host.contains('*') {
                anyhow::bail!(
                    "outbound.allow_hosts: {entry:?} is not a host, host:port or *.domain"
                );
            }
        }
        Ok(Self {
            allow: config
                .allow_hosts
                .iter()
                .map(|h| h.trim().to_ascii_lowercase())
                .collect(),
            roots,
        })
    }

    /// A client builder that trusts the system roots and the configured extra CAs.
    pub fn client(&self) -> reqwest::ClientBuilder {
        reqwest::Client::builder().tls_certs_merge(self.roots.iter().cloned())
    }

    /// How `host` (at `port`) is allowed: `Some(true)` by an exact entry, `Some(false)` by a
    /// wildcard, `None` not at all.
    fn allowed(&self, host: &str, port: u16) -> Option<bool> {
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_ascii_lowercase();
        let with_port = format!("{host}:{port}");
        if self.allow.iter().any(|a| *a == host || *a == with_port) {
            return Some(true);
        }
        self.allow
            .iter()
            .filter_map(|a| a.strip_prefix("*."))
            .any(|domain| host.ends_with(&format!(".{domain}")))
            .then_some(false)
    }

    /// Checks a URL a caller gave: http(s), an allow-listed host, and no private address
    /// unless that exact host is listed.
    pub fn check_caller_url(&self, url: &str) -> Result<(), String> {
        let parsed = reqwest::Url::parse(url).map_err(|_| "not a URL".to_owned())?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err("only http and https are allowed".into());
        }
        let host = parsed.host_str().ok_or("the URL has no host")?;
        let port = parsed.port_or_known_default().unwrap_or(443);
        let exact = self.allowed(host, port).ok_or_else(|| {
            format!(
                "the host {host} is not in the server's outbound allow-list (outbound.allow_hosts)"
            )
        })?;
        let literal = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>();
        if let Ok(ip) = literal {
            if is_private(ip) && !exact {
                return Err(format!("{ip} is a private address"));
            }
        }
        Ok(())
    }

    /// A client for one caller-named URL: no redirects, no proxy, and its host may resolve
    /// to private addresses only if that host (and port) is listed exactly.
    pub fn caller_client(&self, url: &str) -> reqwest::ClientBuilder {
        let allow_private = reqwest::Url::parse(url).ok().is_some_and(|u| {
            let port = u.port_or_known_default().unwrap_or(443);
            u.host_str()
                .and_then(|host| self.allowed(host, port))
                .unwrap_or(false)
        });
        self.client()
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .dns_resolver(GuardedResolver { allow_private })
    }
}

struct GuardedResolver {
    /// The URL's host and port are listed exactly.
    allow_private: bool,
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_owned();
        let allow_private = self.allow_private;
        Box::pin(async move {
            let addresses: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let usable: Vec<SocketAddr> = addresses
                .into_iter()
                .filter(|a| allow_private || !is_private(a.ip()))
                .collect();
            if usable.is_empty() {
                return Err(format!("{host} resolves only to private addresses").into());
            }
            Ok(Box::new(usable.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(allow: &[&str]) -> Outbound {
        Outbound::new(&OutboundConfig {
            allow_hosts: allow.iter().map(|s| s.to_string()).collect(),
            ca_file: None,
        })
        .expect("policy")
    }

    #[test]
    fn caller_urls_need_an_allow_listed_public_host() {
        let p = policy(&[
            "hooks.payer.example",
            "*.provider.example",
            "127.0.0.1:9000",
        ]);
        assert!(p
            .check_caller_url("https://hooks.payer.example/notify")
            .is_ok());
        assert!(p.check_caller_url("https://a.b.provider.example/x").is_ok());
        assert!(p.check_caller_url("https://provider.example/x").is_err());
        assert!(p.check_caller_url("https://evil.example/x").is_err());
        assert!(p.check_caller_url("http://127.0.0.1:9000/x").is_ok());
        assert!(p.check_caller_url("http://127.0.0.1:9001/x").is_err());
        assert!(p.check_caller_url("ftp://hooks.payer.example/x").is_err());
        // The exact entry's port matters: a wildcard match elsewhere is not exact.
        let ported = policy(&["internal.payer.example:8443", "*.payer.example"]);
        assert_eq!(ported.allowed("internal.payer.example", 8443), Some(true));
        assert_eq!(ported.allowed("internal.payer.example", 6379), Some(false));
        let wild = policy(&["*.internal.example", "10.1.2.3"]);
        assert!(wild.check_caller_url("http://10.1.2.3/x").is_ok());
        assert!(wild
            .check_caller_url("http://169.254.169.254/latest")
            .is_err());
        assert!(policy(&[])
            .check_caller_url("https://hooks.payer.example/")
            .is_err());
    }

    #[test]
    fn private_ranges_are_recognised() {
        for private in [
            "10.0.0.1",
            "172.16.5.4",
            "192.168.1.1",
            "127.0.0.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.64.0.1",
            "::1",
            "fc00::1",
            "fe80::1",
            "::ffff:10.0.0.1",
        ] {
            assert!(is_private(private.parse().expect("ip")), "{private}");
        }
        for public in ["8.8.8.8", "2001:4860:4860::8888", "100.128.0.1"] {
            assert!(!is_private(public.parse().expect("ip")), "{public}");
        }
    }

    #[tokio::test]
    async fn names_resolving_to_private_addresses_are_refused() {
        use reqwest::dns::Resolve;
        let resolver = GuardedResolver {
            allow_private: false,
        };
        let refused = resolver.resolve("localhost".parse().expect("name")).await;
        assert!(refused.is_err());
        let exact = GuardedResolver {
            allow_private: true,
        };
        let addresses: Vec<SocketAddr> = exact
            .resolve("localhost".parse().expect("name"))
            .await
            .expect("resolved")
            .collect();
        assert!(!addresses.is_empty());
    }
}
