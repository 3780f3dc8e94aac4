//! API key restrictions as Service Control enforces them on `:check`.
//!
//! A key may carry API targets (services, optionally narrowed to methods), server IP
//! restrictions (addresses or CIDR blocks), HTTP referrer patterns and mobile-app
//! restrictions. Each kind is independent: an empty list means "not restricted in that way".
//! The functions here are pure so they can be tested without a database; `check.rs` maps a
//! `false` to the check-error code Google uses (`API_TARGET_BLOCKED`, `IP_ADDRESS_BLOCKED`,
//! `REFERER_BLOCKED`, `CLIENT_APP_BLOCKED`).

use ipnet::IpNet;
use std::net::IpAddr;

/// One API target of a key: a service, and if `methods` is non-empty, only those methods.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ApiTarget {
    pub service: String,
    pub methods: Vec<String>,
}

/// The restrictions of one key, in the shape the checks need.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct KeyRestrictions {
    pub api_targets: Vec<ApiTarget>,
    pub allowed_ips: Vec<String>,
    pub allowed_referrers: Vec<String>,
    /// Android apps as `(package_name, sha1_fingerprint)`.
    pub allowed_android_apps: Vec<(String, String)>,
    pub allowed_ios_bundle_ids: Vec<String>,
}

/// Does the key's API-target list let it call `selector` on `service`?
///
/// Method patterns follow the API Keys documentation: either a full selector or a bare method
/// name, optionally prefixed by the service name, with `*` allowed as the last character.
pub fn api_target_allows(targets: &[ApiTarget], service: &str, selector: &str) -> bool {
    if targets.is_empty() {
        return true;
    }
    targets.iter().any(|t| {
        t.service == service
            && (t.methods.is_empty()
                || t.methods
                    .iter()
                    .any(|m| method_matches(m, service, selector)))
    })
}

fn method_matches(pattern: &str, service: &str, selector: &str) -> bool {
    let pattern = pattern.trim();
    // `service.Method` form: the service prefix is redundant once the service matched.
    let pattern = pattern
        .strip_prefix(service)
        .and_then(|p| p.strip_prefix('.'))
        .unwrap_or(pattern);
    // Selectors look like `1.echo_api_endpoints_demo_proj_cloud_goog.Echo`; keys usually name
    // just `Echo`, so compare against the last segment as well as the whole selector.
    let short = selector.rsplit('.').next().unwrap_or(selector);
    let one = |candidate: &str| match pattern.strip_suffix('*') {
        Some(prefix) => candidate.starts_with(prefix),
        None => candidate == pattern,
    };
    one(selector) || one(short)
}

/// Is `caller_ip` inside one of the allowed addresses / CIDR blocks? A key with IP restrictions
/// refuses callers whose address is unknown or unparsable.
pub fn ip_allowed(allowed: &[String], caller_ip: Option<&str>) -> bool {
    if allowed.is_empty() {
        return true;
    }
    let Some(ip) = caller_ip.and_then(parse_ip) else {
        return false;
    };
    allowed.iter().any(|entry| {
        let entry = entry.trim();
        if let Ok(net) = entry.parse::<IpNet>() {
            net.contains(&ip)
        } else if let Some(addr) = parse_ip(entry) {
            addr == ip
        } else {
            false
        }
    })
}

/// Parses an address, folding IPv4-mapped IPv6 (`::ffff:1.2.3.4`, what a dual-stack listener
/// reports) to plain IPv4 so it matches IPv4 restrictions.
fn parse_ip(s: &str) -> Option<IpAddr> {
    let ip: IpAddr = s.trim().parse().ok()?;
    Some(match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    })
}

/// Does the `Referer` header value match one of the allowed patterns?
///
/// Patterns are globs where `*` matches any run of characters: `https://www.example.com/*`,
/// `*.example.com/*`, `example.com/app`. A pattern without a scheme also matches the referrer
/// with its scheme removed, and a pattern that is only a host matches any path on that host.
pub fn referrer_allowed(patterns: &[String], referer: Option<&str>) -> bool {
    if patterns.is_empty() {
        return true;
    }
    let Some(referer) = referer.map(str::trim).filter(|r| !r.is_empty()) else {
        return false;
    };
    let without_scheme = referer
        .split_once("://")
        .map(|(_, rest)| rest)
        .unwrap_or(referer);
    let host = without_scheme
        .split(['/', '?', '#'])
        .next()
        .unwrap_or(without_scheme);
    let host_no_port = host.rsplit_once(':').map(|(h, _)| h).unwrap_or(host);
    patterns.iter().any(|p| {
        let p = p.trim();
        if p.is_empty() {
            return false;
        }
        if p.contains("://") {
            return glob(p, referer);
        }
        if glob(p, without_scheme) {
            return true;
        }
        !p.contains('/') && (glob(p, host) || glob(p, host_no_port))
    })
}

/// Mobile-app restriction: the proxy forwards the app identity as labels.
pub fn client_app_allowed(
    r: &KeyRestrictions,
    android_package: Option<&str>,
    android_cert: Option<&str>,
    ios_bundle: Option<&str>,
) -> bool {
    if r.allowed_android_apps.is_empty() && r.allowed_ios_bundle_ids.is_empty() {
        return true;
    }
    let android_ok = match (android_package, android_cert) {
        (Some(p), Some(c)) => r
            .allowed_android_apps
            .iter()
            .any(|(ap, ac)| ap == p && normalize_fingerprint(ac) == normalize_fingerprint(c)),
        _ => false,
    };
    let ios_ok = ios_bundle.is_some_and(|b| r.allowed_ios_bundle_ids.iter().any(|i| i == b));
    android_ok || ios_ok
}

fn normalize_fingerprint(f: &str) -> String {
    f.chars()
        .filter(|c| c.is_ascii_hexdigit())
        .map(|c| c.to_ascii_lowercase())
        .collect()
}

/// Case-insensitive glob with `*` only; iterative so hostile patterns cannot blow the stack.
fn glob(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.to_lowercase().chars().collect();
    let t: Vec<char> = text.to_lowercase().chars().collect();
    let (mut pi, mut ti) = (0usize, 0usize);
    let mut star: Option<usize> = None;
    let mut mark = 0usize;
    while ti < t.len() {
        if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if pi < p.len() && p[pi] == t[ti] {
            pi += 1;
            ti += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == '*' {
        pi += 1;
    }
    pi == p.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SVC: &str = "echo-api.endpoints.demo-proj.cloud.goog";
    const SEL: &str = "1.echo_api_endpoints_demo_proj_cloud_goog.Echo";

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn api_targets_by_service_and_method() {
        assert!(api_target_allows(&[], SVC, SEL));
        let svc_only = vec![ApiTarget {
            service: SVC.into(),
            methods: vec![],
        }];
        assert!(api_target_allows(&svc_only, SVC, SEL));
        assert!(!api_target_allows(&svc_only, "other.example.com", SEL));

        let m = |methods: &[&str]| {
            vec![ApiTarget {
                service: SVC.into(),
                methods: s(methods),
            }]
        };
        assert!(api_target_allows(&m(&["Echo"]), SVC, SEL));
        assert!(api_target_allows(&m(&[SEL]), SVC, SEL));
        assert!(api_target_allows(&m(&["Ech*"]), SVC, SEL));
        assert!(api_target_allows(&m(&[&format!("{SVC}.Echo")]), SVC, SEL));
        assert!(api_target_allows(&m(&["*"]), SVC, SEL));
        assert!(!api_target_allows(&m(&["AuthInfo*"]), SVC, SEL));
        assert!(!api_target_allows(&m(&["Ech"]), SVC, SEL));
        assert!(!api_target_allows(&m(&["EchoX"]), SVC, SEL));
    }

    #[test]
    fn ip_addresses_and_cidrs() {
        assert!(ip_allowed(&[], None));
        let allowed = s(&["10.0.0.0/8", "192.168.1.7", "2001:db8::/32"]);
        assert!(ip_allowed(&allowed, Some("10.1.2.3")));
        assert!(ip_allowed(&allowed, Some("192.168.1.7")));
        assert!(ip_allowed(&allowed, Some("::ffff:10.9.9.9")));
        assert!(ip_allowed(&allowed, Some("2001:db8::1")));
        assert!(!ip_allowed(&allowed, Some("192.168.1.8")));
        assert!(!ip_allowed(&allowed, Some("11.0.0.1")));
        assert!(!ip_allowed(&allowed, Some("2001:db9::1")));
        assert!(!ip_allowed(&allowed, None));
        assert!(!ip_allowed(&allowed, Some("not-an-ip")));
    }

    #[test]
    fn referrer_patterns() {
        assert!(referrer_allowed(&[], None));
        let p = s(&[
            "https://www.example.com/app/*",
            "*.corp.example.org/*",
            "plain.test",
        ]);
        assert!(referrer_allowed(
            &p,
            Some("https://www.example.com/app/page?x=1")
        ));
        assert!(!referrer_allowed(&p, Some("https://www.example.com/other")));
        assert!(!referrer_allowed(
            &p,
            Some("http://www.example.com/app/page")
        ));
        assert!(referrer_allowed(&p, Some("https://a.corp.example.org/x")));
        assert!(referrer_allowed(&p, Some("http://b.c.corp.example.org/")));
        assert!(!referrer_allowed(
            &p,
            Some("https://corp.example.org.evil.com/x")
        ));
        assert!(referrer_allowed(&p, Some("https://plain.test/anything")));
        assert!(referrer_allowed(&p, Some("https://PLAIN.test:8443/")));
        assert!(!referrer_allowed(&p, Some("https://notplain.test/")));
        assert!(!referrer_allowed(&p, None));
        assert!(!referrer_allowed(&p, Some("")));
        assert!(referrer_allowed(&s(&["*"]), Some("https://any.where/")));
    }

    #[test]
    fn glob_backtracks() {
        assert!(glob("a*b*c", "axxbyyc"));
        assert!(glob("*", ""));
        assert!(!glob("a*b", "ac"));
        assert!(glob("**x", "yyx"));
    }

    #[test]
    fn client_apps() {
        let r = KeyRestrictions {
            allowed_android_apps: vec![("com.example".into(), "AB:CD:EF".into())],
            allowed_ios_bundle_ids: s(&["com.example.ios"]),
            ..Default::default()
        };
        assert!(client_app_allowed(
            &r,
            Some("com.example"),
            Some("abcdef"),
            None
        ));
        assert!(!client_app_allowed(
            &r,
            Some("com.example"),
            Some("abcd00"),
            None
        ));
        assert!(client_app_allowed(&r, None, None, Some("com.example.ios")));
        assert!(!client_app_allowed(&r, None, None, None));
        assert!(client_app_allowed(
            &KeyRestrictions::default(),
            None,
            None,
            None
        ));
    }
}
