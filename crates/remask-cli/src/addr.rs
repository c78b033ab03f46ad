//! Listening addresses of the servers: `HOST:PORT` where HOST is an IPv4
//! address, an IPv6 address in brackets (`[::1]:8000`) or a host name
//! (`localhost:8000`), resolved when the server starts.

use crate::{CliError, CliResult};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

/// A host (address or name) and a port, as given; not resolved yet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostPort {
    /// An IP address (IPv6 without brackets) or a host name.
    pub host: String,
    pub port: u16,
}

/// A host as `--host` takes it: an IP address (IPv6 with or without
/// brackets) or a host name.
pub fn parse_host(s: &str) -> Result<String, String> {
    let h = s.trim();
    let h = match h.strip_prefix('[') {
        Some(inner) => inner
            .strip_suffix(']')
            .ok_or_else(|| format!("'{s}': an IPv6 address in brackets needs its closing ']'"))?,
        None => h,
    };
    if h.is_empty() {
        return Err(
            "the host is empty: give an address (0.0.0.0, ::, 127.0.0.1) or a name (localhost)"
                .into(),
        );
    }
    if h.contains(':') {
        return h
            .parse::<std::net::Ipv6Addr>()
            .map(|a| a.to_string())
            .map_err(|_| format!("'{s}' is neither an IP address nor a host name"));
    }
    // A host name: dot-separated labels of letters, digits, '-' and '_'
    // (one trailing dot allowed: a fully qualified name).
    let name = h.strip_suffix('.').unwrap_or(h);
    let name_ok = name.split('.').all(|label| {
        !label.is_empty()
            && label
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    });
    if !name_ok {
        return Err(format!("'{s}' is neither an IP address nor a host name"));
    }
    Ok(h.to_string())
}

/// A port as `--port` and `--grpc-port` take it. A `tcp://IP:PORT` value is
/// what Kubernetes puts in `REMASK_PORT` for a Service named `remask` (and
/// in `REMASK_GRPC_PORT` for one named `remask-grpc`): said so.
pub fn parse_port(s: &str) -> Result<u16, String> {
    s.trim().parse::<u16>().map_err(|_| {
        if s.starts_with("tcp://") || s.starts_with("udp://") {
            format!(
                "'{s}' is not a port: it looks like a Kubernetes service link (a Service \
                 named after the variable); set `enableServiceLinks: false` in the pod spec"
            )
        } else {
            format!("'{s}' is not a port (0 to 65535)")
        }
    })
}

impl FromStr for HostPort {
    type Err = String;

    /// `HOST:PORT`: `0.0.0.0:8000`, `[::]:8000`, `localhost:8000`.
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let (host, port) = t.rsplit_once(':').ok_or_else(|| {
            format!("'{s}' is not HOST:PORT (e.g. 0.0.0.0:8000, [::1]:8000, localhost:8000)")
        })?;
        if host.contains(':') && !(host.starts_with('[') && host.ends_with(']')) {
            return Err(format!(
                "'{s}': an IPv6 address needs brackets, e.g. [::1]:8000"
            ));
        }
        let port = port
            .parse::<u16>()
            .map_err(|_| format!("'{s}': '{port}' is not a port (0 to 65535)"))?;
        Ok(HostPort {
            host: parse_host(host)?,
            port,
        })
    }
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl HostPort {
    pub fn new(host: &str, port: u16) -> HostPort {
        HostPort {
            host: host.to_string(),
            port,
        }
    }

    /// The socket addresses to try, in order: the address itself, or every
    /// address the name resolves to (tokio's `lookup_host`, i.e. the
    /// system resolver), IPv4 ones first. A name that does not resolve is a
    /// usage error (exit code 2) naming `what` (the flag and its value).
    pub async fn resolve(&self, what: &str) -> CliResult<Vec<SocketAddr>> {
        if let Ok(ip) = self.host.parse::<IpAddr>() {
            return Ok(vec![SocketAddr::new(ip, self.port)]);
        }
        let found = tokio::net::lookup_host((self.host.as_str(), self.port))
            .await
            .map_err(|e| {
                CliError::Usage(format!(
                    "{what}: cannot resolve host name '{}': {e}",
                    self.host
                ))
            })?;
        let mut addrs: Vec<SocketAddr> = Vec::new();
        for a in found {
            if !addrs.contains(&a) {
                addrs.push(a);
            }
        }
        // Stable: IPv4 first, each family in the resolver's order.
        addrs.sort_by_key(|a| a.is_ipv6());
        if addrs.is_empty() {
            return Err(CliError::Usage(format!(
                "{what}: host name '{}' resolves to no address",
                self.host
            )));
        }
        Ok(addrs)
    }
}

/// Binds the first of `addrs` that can be bound (as `std`'s `bind` does
/// with a name); the error is the first address's when none can.
pub async fn bind(addrs: &[SocketAddr]) -> CliResult<tokio::net::TcpListener> {
    let mut first_error = None;
    for &addr in addrs {
        match remask_cluster::server::bind(addr).await {
            Ok(l) => return Ok(l),
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    Err(first_error
        .unwrap_or_else(|| anyhow::anyhow!("no address to listen on"))
        .into())
}

/// Whether only this machine can connect to `addr`.
pub fn is_loopback(addr: &SocketAddr) -> bool {
    match addr.ip() {
        IpAddr::V4(a) => a.is_loopback(),
        IpAddr::V6(a) => a.is_loopback() || a.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_host_port() {
        let hp = |s: &str| s.parse::<HostPort>();
        assert_eq!(hp("0.0.0.0:8000").unwrap(), HostPort::new("0.0.0.0", 8000));
        assert_eq!(hp("[::]:8000").unwrap(), HostPort::new("::", 8000));
        assert_eq!(hp("[::1]:0").unwrap().to_string(), "[::1]:0");
        assert_eq!(
            hp("localhost:50051").unwrap(),
            HostPort::new("localhost", 50051)
        );
        assert_eq!(
            hp("worker-0.remask-worker.ns.svc.cluster.local:50061")
                .unwrap()
                .host,
            "worker-0.remask-worker.ns.svc.cluster.local"
        );
        assert!(hp("::1:80").unwrap_err().contains("brackets"));
        assert!(hp("127.0.0.1").unwrap_err().contains("HOST:PORT"));
        assert!(hp("127.0.0.1:99999").unwrap_err().contains("not a port"));
        assert!(hp(":8000").unwrap_err().contains("empty"));
        assert!(hp("a b:80").unwrap_err().contains("host name"));
        assert!(hp("[::1:80").is_err());
        assert_eq!(parse_port("8000").unwrap(), 8000);
        assert!(parse_port("70000").unwrap_err().contains("not a port"));
        assert!(
            parse_port("tcp://10.0.0.1:50051")
                .unwrap_err()
                .contains("enableServiceLinks")
        );
        assert_eq!(parse_host("[::]").unwrap(), "::");
        assert_eq!(parse_host("0.0.0.0").unwrap(), "0.0.0.0");
        assert!(parse_host("").is_err());
        assert!(parse_host("a..b").is_err());
    }

    #[test]
    fn loopback() {
        assert!(is_loopback(&"127.0.0.1:1".parse().unwrap()));
        assert!(is_loopback(&"[::1]:1".parse().unwrap()));
        assert!(is_loopback(&"[::ffff:127.0.0.1]:1".parse().unwrap()));
        assert!(!is_loopback(&"0.0.0.0:1".parse().unwrap()));
        assert!(!is_loopback(&"[::]:1".parse().unwrap()));
        assert!(!is_loopback(&"10.0.0.1:1".parse().unwrap()));
    }
}
