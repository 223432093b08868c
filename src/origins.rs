//! Which browser pages may talk to this server: the server's own public origins
//! (`[server] public_url`, by default the bind address, `localhost` and `127.0.0.1` at the
//! listening port, `https` with TLS) and `[auth] allowed_origins`. An `Origin` header is
//! compared with them exactly — scheme, host and port — and never with the request's
//! `Host` header, which a DNS-rebinding page controls. Parsing only: the HTTP answers
//! live in `http::ctx` (`origin_refusal`).

use std::fmt;
use std::net::{IpAddr, SocketAddr};

#[derive(Debug, thiserror::Error)]
#[error("{0:?} is not an origin: write scheme://host[:port], with scheme http or https")]
pub struct OriginError(pub String);

/// A tuple origin: `http`/`https`, a lower-case host (IPv6 in brackets) and a port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    https: bool,
    host: String,
    port: u16,
}

impl Origin {
    /// Parses an `Origin` header value (`scheme://host[:port]`, a trailing `/` tolerated).
    pub fn parse(s: &str) -> Result<Origin, OriginError> {
        Self::parse_inner(s, false)
    }

    /// Parses a configured URL: like [`Origin::parse`], and a path after the authority
    /// (`https://chat.example/pigeon/`) is allowed and ignored.
    pub fn parse_url(s: &str) -> Result<Origin, OriginError> {
        Self::parse_inner(s, true)
    }

    fn parse_inner(s: &str, path_ok: bool) -> Result<Origin, OriginError> {
        let bad = || OriginError(s.chars().take(200).collect());
        let (scheme, rest) = s.trim().split_once("://").ok_or_else(bad)?;
        let https = match scheme.to_ascii_lowercase().as_str() {
            "http" => false,
            "https" => true,
            _ => return Err(bad()),
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        if !(path.is_empty() || path == "/" || path_ok) {
            return Err(bad());
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (addr, after) = v6.split_once(']').ok_or_else(bad)?;
            let ip: std::net::Ipv6Addr = addr.parse().map_err(|_| bad())?;
            (format!("[{ip}]"), after)
        } else {
            match authority.find(':') {
                Some(i) => (authority[..i].to_ascii_lowercase(), &authority[i..]),
                None => (authority.to_ascii_lowercase(), ""),
            }
        };
        let host_ok = !host.is_empty()
            && host.len() <= 253
            && (host.starts_with('[')
                || host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_'));
        if !host_ok {
            return Err(bad());
        }
        let port = match port {
            "" => {
                if https {
                    443
                } else {
                    80
                }
            }
            p => {
                let digits = p.strip_prefix(':').ok_or_else(bad)?;
                if digits.is_empty()
                    || digits.len() > 5
                    || !digits.bytes().all(|b| b.is_ascii_digit())
                {
                    return Err(bad());
                }
                match digits.parse::<u16>() {
                    Ok(0) | Err(_) => return Err(bad()),
                    Ok(p) => p,
                }
            }
        };
        Ok(Origin { https, host, port })
    }

    fn from_parts(https: bool, host: String, port: u16) -> Origin {
        Origin { https, host, port }
    }

    fn default_port(&self) -> bool {
        self.port == if self.https { 443 } else { 80 }
    }

    /// Whether the host is an IPv6 literal (CSP source lists cannot name those).
    pub fn is_ipv6(&self) -> bool {
        self.host.starts_with('[')
    }

    /// The WebSocket form of this origin (`ws://` or `wss://`), for `connect-src`.
    pub fn websocket(&self) -> String {
        let scheme = if self.https { "wss" } else { "ws" };
        match self.default_port() {
            true => format!("{scheme}://{}", self.host),
            false => format!("{scheme}://{}:{}", self.host, self.port),
        }
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.https { "https" } else { "http" };
        match self.default_port() {
            true => write!(f, "{scheme}://{}", self.host),
            false => write!(f, "{scheme}://{}:{}", self.host, self.port),
        }
    }
}

/// The origins a browser page may come from.
#[derive(Debug, Clone)]
pub struct Origins {
    /// The server's own: where its web client is served from.
    own: Vec<Origin>,
    /// Other pages allowed by `[auth] allowed_origins`.
    others: Vec<Origin>,
    /// `"*"` in `allowed_origins`: any page (the operator's explicit choice).
    any: bool,
}

impl Origins {
    /// `public_url` empty means the forms of the listening address `local`: its IP (unless
    /// it is 0.0.0.0 or ::), `localhost`, `127.0.0.1` and `[::1]`, at its port, `https`
    /// when `tls`.
    pub fn new(
        public_url: &[String],
        allowed: &[String],
        local: SocketAddr,
        tls: bool,
    ) -> Result<Origins, OriginError> {
        let mut own = Vec::new();
        for u in public_url {
            push_unique(&mut own, Origin::parse_url(u)?);
        }
        if own.is_empty() {
            let mut hosts = Vec::new();
            match local.ip() {
                ip if ip.is_unspecified() => {}
                IpAddr::V4(ip) => hosts.push(ip.to_string()),
                IpAddr::V6(ip) => hosts.push(format!("[{ip}]")),
            }
            hosts.extend(["localhost", "127.0.0.1", "[::1]"].map(String::from));
            for h in hosts {
                push_unique(&mut own, Origin::from_parts(tls, h, local.port()));
            }
        }
        let mut others = Vec::new();
        let mut any = false;
        for a in allowed {
            if a.trim() == "*" {
                any = true;
            } else {
                push_unique(&mut others, Origin::parse_url(a)?);
            }
        }
        Ok(Origins { own, others, any })
    }

    /// Whether a page whose `Origin` header is `origin` may use this server.
    pub fn allows(&self, origin: &str) -> bool {
        if self.any {
            return true;
        }
        match Origin::parse(origin) {
            Ok(o) => self.own.contains(&o) || self.others.contains(&o),
            Err(_) => false,
        }
    }

    /// The server's own origins.
    pub fn own(&self) -> &[Origin] {
        &self.own
    }

    /// Everything allowed, for the start-up log.
    pub fn describe(&self) -> String {
        let mut all: Vec<String> = self.own.iter().map(|o| o.to_string()).collect();
        all.extend(self.others.iter().map(|o| o.to_string()));
        if self.any {
            all.push("* (any)".into());
        }
        all.join(", ")
    }
}

fn push_unique(v: &mut Vec<Origin>, o: Origin) {
    if !v.contains(&o) {
        v.push(o);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origins(public: &[&str], allowed: &[&str], local: &str, tls: bool) -> Origins {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        Origins::new(&s(public), &s(allowed), local.parse().unwrap(), tls).unwrap()
    }

    #[test]
    fn defaults_are_the_listening_address_forms() {
        let o = origins(&[], &[], "127.0.0.1:8080", false);
        assert!(o.allows("http://127.0.0.1:8080"));
        assert!(o.allows("http://localhost:8080"));
        assert!(o.allows("http://LocalHost:8080/"));
        assert!(o.allows("http://[::1]:8080"));
        assert!(!o.allows("http://localhost"));
        assert!(!o.allows("https://localhost:8080"));
        assert!(!o.allows("http://localhost:8081"));
        assert!(!o.allows("http://evil.example:8080"));
        assert!(!o.allows("http://localhost:8080.evil.example"));
        assert!(!o.allows("http://localhost:8080@evil.example"));
        assert!(!o.allows("http://localhost:8080/x"));
        assert!(!o.allows("null"));
        assert!(!o.allows(""));
        let o = origins(&[], &[], "192.168.1.5:443", true);
        assert!(o.allows("https://192.168.1.5"));
        assert!(o.allows("https://192.168.1.5:443"));
        assert!(!o.allows("http://192.168.1.5:443"));
        let o = origins(&[], &[], "0.0.0.0:8080", false);
        assert!(!o.allows("http://0.0.0.0:8080"));
        assert!(o.allows("http://localhost:8080"));
    }

    #[test]
    fn configured_urls_replace_the_defaults() {
        let o = origins(
            &["https://chat.example/pigeon/"],
            &["http://app.example:3000", "https://[2001:db8::1]:8443"],
            "127.0.0.1:8080",
            false,
        );
        assert!(o.allows("https://chat.example"));
        assert!(o.allows("https://chat.example:443"));
        assert!(!o.allows("http://chat.example"));
        assert!(!o.allows("http://localhost:8080"));
        assert!(o.allows("http://app.example:3000"));
        assert!(o.allows("https://[2001:0db8::1]:8443"));
        assert!(!o.allows("http://app.example"));
        let ws: Vec<String> = o.own().iter().map(Origin::websocket).collect();
        assert_eq!(ws, ["wss://chat.example"]);
        assert!(origins(&[], &["*"], "127.0.0.1:1", false).allows("https://x.example"));
    }

    #[test]
    fn bad_configured_origins_are_errors() {
        for bad in [
            "chat.example",
            "ftp://x",
            "https://",
            "https://a b",
            "http://x:0",
            "http://x:99999",
        ] {
            assert!(Origin::parse_url(bad).is_err(), "{bad}");
        }
    }
}
