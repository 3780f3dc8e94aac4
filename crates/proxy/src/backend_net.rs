//! How backend connections are opened and how many requests a backend may carry at once: the
//! part of an Envoy cluster that ESPv2's `--cluster_connect_timeout`,
//! `--backend_dns_lookup_family`, `--dns_resolver_addresses` (`--dns`) and
//! `--backend_cluster_maximum_requests` tune.
//!
//! - Names are resolved at each new connection (as before: the system's resolver through
//!   `getaddrinfo`, with its own timeouts), or, with DNS servers named, by hickory-resolver
//!   asking those servers (its cache keeps answers for their TTL). A lookup there that gets no
//!   answer in [`DNS_LOOKUP_TIMEOUT`] fails as a name that does not resolve: ESPv2's 503
//!   `no healthy upstream`.
//! - The lookup family picks which of the addresses are tried, as Envoy's `dns_lookup_family`
//!   does: `v4only`/`v6only` one family; `v4preferred` IPv4 if the name has any, else IPv6;
//!   `auto` (Envoy's legacy name for v6-preferred) the other way round; `all` every address.
//!   The addresses left are tried in turn until one accepts.
//! - The connect timeout bounds opening the TCP connection (every address tried, the lookup
//!   not counted, as in Envoy where resolving is apart from connecting); past it the
//!   attempt fails with Envoy's reset reason `connection timeout` (503 in ESPv2's words), which
//!   the retry condition `connect-failure` retries.
//! - A cluster is one backend address (scheme, host and port): every client built for it, on
//!   every serving thread and across rollouts, shares one count of requests in flight. Over
//!   the maximum a request is refused at once, without waiting or retrying, as Envoy's circuit
//!   breaker does (reset reason `overflow`); its slot is held until the response body has been
//!   read to the end or dropped.

use crate::error::NetworkFailure;
use crate::request_body::ForwardError;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// ESPv2's `--cluster_connect_timeout` default.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(20);
/// Envoy's circuit-breaker `max_requests` when ESPv2 sets none (`--backend_cluster_maximum_requests`
/// 0 or absent).
pub const ENVOY_DEFAULT_MAX_REQUESTS: usize = 1024;
/// A lookup against `--dns_resolver_addresses` that has no answer by then fails.
pub const DNS_LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);
/// Port of a DNS server named without one.
pub const DNS_PORT: u16 = 53;
/// At most this many DNS servers: more is a mistake, not a configuration.
pub const MAX_DNS_SERVERS: usize = 16;

/// Which resolved addresses of a backend's name are tried (Envoy's `dns_lookup_family`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LookupFamily {
    /// Envoy's `AUTO`: IPv6 addresses if the name has any, else IPv4.
    Auto,
    V4Only,
    V6Only,
    /// IPv4 addresses if the name has any, else IPv6 (ESPv2's default).
    V4Preferred,
    /// Every address, in the resolver's order (`portico esp`: what connecting by name did).
    #[default]
    All,
}

impl LookupFamily {
    /// ESPv2's names for the families.
    pub const NAMES: [&'static str; 5] = ["auto", "v4only", "v6only", "v4preferred", "all"];

    pub fn parse(s: &str) -> Option<LookupFamily> {
        Some(match s {
            "auto" => LookupFamily::Auto,
            "v4only" => LookupFamily::V4Only,
            "v6only" => LookupFamily::V6Only,
            "v4preferred" => LookupFamily::V4Preferred,
            "all" => LookupFamily::All,
            _ => return None,
        })
    }

    /// The addresses to try, in order.
    pub fn pick(self, addrs: Vec<SocketAddr>) -> Vec<SocketAddr> {
        let has_v4 = addrs.iter().any(SocketAddr::is_ipv4);
        let has_v6 = addrs.iter().any(SocketAddr::is_ipv6);
        let keep_v4 = match self {
            LookupFamily::All => return addrs,
            LookupFamily::V4Only => true,
            LookupFamily::V6Only => false,
            LookupFamily::V4Preferred => has_v4,
            LookupFamily::Auto => !has_v6,
        };
        addrs
            .into_iter()
            .filter(|a| a.is_ipv4() == keep_v4)
            .collect()
    }

    fn hickory_strategy(self) -> hickory_resolver::config::LookupIpStrategy {
        use hickory_resolver::config::LookupIpStrategy as S;
        match self {
            LookupFamily::Auto => S::Ipv6thenIpv4,
            LookupFamily::V4Only => S::Ipv4Only,
            LookupFamily::V6Only => S::Ipv6Only,
            LookupFamily::V4Preferred => S::Ipv4thenIpv6,
            LookupFamily::All => S::Ipv4AndIpv6,
        }
    }
}

/// The start-up settings (plain data; [`BackendNet::new`] builds the working parts).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BackendNetSettings {
    /// `None`: the operating system's (`portico esp`, as nginx's 60 s is not enforced either).
    pub connect_timeout: Option<Duration>,
    pub lookup_family: LookupFamily,
    /// Empty: the system's resolver.
    pub dns_servers: Vec<SocketAddr>,
    /// Requests in flight per backend address; `None`: no limit.
    pub max_requests: Option<usize>,
}

/// `--dns_resolver_addresses`: `IP` or `IP:PORT`, separated by `;` (ESPv2's syntax; IPv6 as
/// `[IP]:PORT` or a bare IPv6 address, which ESPv2 cannot take). Empty items are refused.
pub fn parse_dns_servers(flag: &str, value: &str) -> Result<Vec<SocketAddr>, String> {
    let mut out = Vec::new();
    for item in value.split(';') {
        let item = item.trim();
        let addr = item
            .parse::<SocketAddr>()
            .ok()
            .or_else(|| {
                item.parse::<IpAddr>()
                    .ok()
                    .map(|ip| SocketAddr::new(ip, DNS_PORT))
            })
            .or_else(|| {
                let inner = item.strip_prefix('[')?.strip_suffix(']')?;
                inner
                    .parse::<std::net::Ipv6Addr>()
                    .ok()
                    .map(|ip| SocketAddr::new(IpAddr::V6(ip), DNS_PORT))
            })
            .filter(|a| a.port() != 0)
            .ok_or_else(|| {
                format!(
                    "invalid {flag} '{value}': {item:?} is not IP_ADDR or IP_ADDR:PORT (port 1 to \
                     65535); separate addresses with ';', e.g. 127.0.0.1;10.0.0.2:5353"
                )
            })?;
        if !out.contains(&addr) {
            out.push(addr);
        }
    }
    if out.len() > MAX_DNS_SERVERS {
        return Err(format!(
            "invalid {flag} '{value}': at most {MAX_DNS_SERVERS} DNS servers"
        ));
    }
    Ok(out)
}

/// Connecting to backends: resolver, lookup family, connect timeout and the per-cluster
/// request limits. One per process, shared by every backend client.
pub struct BackendNet {
    settings: BackendNetSettings,
    resolver: Option<hickory_resolver::TokioResolver>,
    clusters: Mutex<HashMap<String, Arc<Semaphore>>>,
}

impl std::fmt::Debug for BackendNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackendNet")
            .field("settings", &self.settings)
            .finish()
    }
}

impl BackendNet {
    pub fn new(settings: BackendNetSettings) -> Arc<BackendNet> {
        let resolver = (!settings.dns_servers.is_empty()).then(|| {
            use hickory_resolver::config::{
                NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts,
            };
            let mut config = ResolverConfig::new();
            for addr in &settings.dns_servers {
                config.add_name_server(NameServerConfig::new(
                    *addr,
                    hickory_resolver::proto::xfer::Protocol::Udp,
                ));
            }
            let mut opts = ResolverOpts::default();
            opts.ip_strategy = settings.lookup_family.hickory_strategy();
            // Only the servers named are asked, as Envoy's resolver with its own addresses.
            opts.use_hosts_file = ResolveHosts::Never;
            opts.timeout = Duration::from_secs(2);
            opts.attempts = 1;
            hickory_resolver::TokioResolver::builder_with_config(
                config,
                hickory_resolver::name_server::TokioConnectionProvider::default(),
            )
            .with_options(opts)
            .build()
        });
        Arc::new(BackendNet {
            settings,
            resolver,
            clusters: Mutex::new(HashMap::new()),
        })
    }

    /// The system's resolver, every address, no timeout or limit: `portico esp`'s behaviour.
    pub fn system() -> Arc<BackendNet> {
        BackendNet::new(BackendNetSettings::default())
    }

    pub fn settings(&self) -> &BackendNetSettings {
        &self.settings
    }

    /// The count of requests in flight for the backend `cluster` names (`scheme://host:port`),
    /// shared by every client for it; `None` without a limit.
    pub fn cluster(&self, cluster: &str) -> Option<Arc<Semaphore>> {
        let max = self.settings.max_requests?;
        let mut map = self.clusters.lock().unwrap_or_else(|p| p.into_inner());
        Some(
            map.entry(cluster.to_string())
                .or_insert_with(|| Arc::new(Semaphore::new(max.min(Semaphore::MAX_PERMITS))))
                .clone(),
        )
    }

    /// The addresses of `host` to try, in order, with `port`.
    pub async fn resolve(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, ForwardError> {
        let unresolved = |why: String| {
            ForwardError::Connect(NetworkFailure::Unresolved, format!("{host}: {why}"))
        };
        // A literal address is used as given, whatever the family says (Envoy's too).
        if let Ok(ip) = host.trim_start_matches('[').trim_end_matches(']').parse() {
            return Ok(vec![SocketAddr::new(ip, port)]);
        }
        let found: Vec<SocketAddr> = match &self.resolver {
            Some(r) => {
                let lookup = tokio::time::timeout(DNS_LOOKUP_TIMEOUT, r.lookup_ip(host))
                    .await
                    .map_err(|_| {
                        unresolved(format!(
                            "no answer from the DNS servers within {DNS_LOOKUP_TIMEOUT:?}"
                        ))
                    })?
                    .map_err(|e| unresolved(format!("dns error: {e}")))?;
                lookup.iter().map(|ip| SocketAddr::new(ip, port)).collect()
            }
            // The system's resolver keeps its own timeouts (resolv.conf's), as before these
            // flags existed.
            None => tokio::net::lookup_host((host, port))
                .await
                .map_err(|e| unresolved(format!("dns error: {e}")))?
                .collect(),
        };
        let picked = self.settings.lookup_family.pick(found);
        if picked.is_empty() {
            return Err(unresolved(format!(
                "dns error: no address of the family {:?}",
                self.settings.lookup_family
            )));
        }
        Ok(picked)
    }

    /// A TCP connection to `host:port`: the addresses [`Self::resolve`] gives, tried in turn,
    /// all within the connect timeout (the lookup is not counted: a name that does not resolve
    /// is told apart from an address that does not answer, as Envoy does).
    pub async fn connect(&self, host: &str, port: u16) -> Result<TcpStream, ForwardError> {
        let addrs = self.resolve(host, port).await?;
        let attempt = async {
            let mut last = None;
            for addr in addrs {
                match TcpStream::connect(addr).await {
                    Ok(tcp) => return Ok(tcp),
                    Err(e) => last = Some((addr, e)),
                }
            }
            let (addr, e) = last.ok_or_else(|| {
                ForwardError::Connect(NetworkFailure::Unresolved, format!("{host}: no address"))
            })?;
            Err(ForwardError::Connect(
                crate::error::network_failure(&e, true),
                format!("{host}:{port} ({addr}): {e}"),
            ))
        };
        match self.settings.connect_timeout {
            None => attempt.await,
            Some(limit) => tokio::time::timeout(limit, attempt)
                .await
                .unwrap_or_else(|_| {
                    Err(ForwardError::Connect(
                        NetworkFailure::ConnectTimeout,
                        format!("{host}:{port}: no connection within {limit:?}"),
                    ))
                }),
        }
    }
}

/// A request's slot in its backend's count of requests in flight ([`BackendNet::cluster`]).
pub type ClusterSlot = OwnedSemaphorePermit;

/// Takes a slot in `cluster`, or fails at once with Envoy's `overflow`.
pub fn take_slot(cluster: &Arc<Semaphore>, name: &str) -> Result<ClusterSlot, ForwardError> {
    cluster.clone().try_acquire_owned().map_err(|_| {
        ForwardError::Connect(
            NetworkFailure::Overflow,
            format!("{name}: too many requests in flight (--backend_cluster_maximum_requests)"),
        )
    })
}

/// hyper-util's `HttpConnector` resolving through a [`BackendNet`] (HTTP/2 backends).
#[derive(Clone)]
pub struct NetResolver(pub Arc<BackendNet>);

impl tower_service::Service<hyper_util::client::legacy::connect::dns::Name> for NetResolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = std::io::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: hyper_util::client::legacy::connect::dns::Name) -> Self::Future {
        let net = self.0.clone();
        Box::pin(async move {
            // The connector puts the port in; 0 here.
            net.resolve(name.as_str(), 0)
                .await
                .map(Vec::into_iter)
                .map_err(|e| std::io::Error::other(e.to_string()))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(list: &[&str]) -> Vec<SocketAddr> {
        list.iter().map(|a| a.parse().unwrap()).collect()
    }

    #[test]
    fn families_pick_as_envoy_does() {
        let both = addrs(&["127.0.0.1:1", "[::1]:1", "127.0.0.2:1"]);
        let v4 = addrs(&["127.0.0.1:1", "127.0.0.2:1"]);
        let v6 = addrs(&["[::1]:1"]);
        use LookupFamily::*;
        assert_eq!(V4Only.pick(both.clone()), v4);
        assert_eq!(V6Only.pick(both.clone()), v6);
        assert_eq!(V4Preferred.pick(both.clone()), v4);
        assert_eq!(V4Preferred.pick(v6.clone()), v6);
        assert_eq!(Auto.pick(both.clone()), v6);
        assert_eq!(Auto.pick(v4.clone()), v4);
        assert_eq!(All.pick(both.clone()), both);
        assert!(V6Only.pick(v4.clone()).is_empty());
        for n in LookupFamily::NAMES {
            assert!(LookupFamily::parse(n).is_some(), "{n}");
        }
        for bad in ["", "V4ONLY", "v6preferred", "any", " all"] {
            assert!(LookupFamily::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn dns_server_lists_are_read_as_espv2_writes_them() {
        let f = "--dns_resolver_addresses";
        assert_eq!(
            parse_dns_servers(f, "127.0.0.1;127.0.0.2;127.0.0.3:8000").unwrap(),
            addrs(&["127.0.0.1:53", "127.0.0.2:53", "127.0.0.3:8000"])
        );
        assert_eq!(
            parse_dns_servers(f, "[::1]:5353;::2;[::3]").unwrap(),
            addrs(&["[::1]:5353", "[::2]:53", "[::3]:53"])
        );
        // Duplicates are asked once.
        assert_eq!(
            parse_dns_servers(f, "10.0.0.1;10.0.0.1:53").unwrap(),
            addrs(&["10.0.0.1:53"])
        );
        for bad in [
            "",
            ";",
            "127.0.0.1;",
            "dns.example.com",
            "127.0.0.1:0",
            "127.0.0.1:65536",
            "127.0.0.1:53:53",
            "1.2.3.4,5.6.7.8",
            "300.1.1.1",
        ] {
            let e = parse_dns_servers(f, bad).expect_err(bad);
            assert!(e.starts_with("invalid --dns_resolver_addresses"), "{e}");
        }
        let many: Vec<String> = (1..=17).map(|p| format!("127.0.0.1:{p}")).collect();
        let e = parse_dns_servers(f, &many.join(";")).unwrap_err();
        assert!(e.contains("at most 16"), "{e}");
    }

    #[tokio::test]
    async fn overflow_is_refused_at_once_and_freed_on_drop() {
        let net = BackendNet::new(BackendNetSettings {
            max_requests: Some(1),
            ..Default::default()
        });
        let c = net.cluster("http://a:1").unwrap();
        // The same backend shares its count; another has its own.
        let again = net.cluster("http://a:1").unwrap();
        assert!(Arc::ptr_eq(&c, &again));
        let slot = take_slot(&c, "a").unwrap();
        let other = take_slot(&net.cluster("http://b:1").unwrap(), "b").unwrap();
        match take_slot(&again, "a") {
            Err(ForwardError::Connect(NetworkFailure::Overflow, _)) => {}
            other => panic!("{other:?}"),
        }
        drop(slot);
        assert!(take_slot(&c, "a").is_ok());
        drop(other);
        assert!(BackendNet::system().cluster("http://a:1").is_none());
    }

    #[tokio::test]
    async fn literal_addresses_skip_the_resolver_and_family() {
        let net = BackendNet::new(BackendNetSettings {
            lookup_family: LookupFamily::V4Only,
            dns_servers: addrs(&["127.0.0.1:9"]),
            ..Default::default()
        });
        assert_eq!(net.resolve("::1", 80).await.unwrap(), addrs(&["[::1]:80"]));
        assert_eq!(
            net.resolve("127.0.0.1", 80).await.unwrap(),
            addrs(&["127.0.0.1:80"])
        );
    }
}
