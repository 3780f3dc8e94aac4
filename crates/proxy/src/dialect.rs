//! One proxy, two dialects: `portico esp` speaks ESP v1's, `portico espv2` ESPv2's. The
//! dialect is chosen once at start ([`crate::settings::Settings::dialect`]) and read at the few
//! points where the two proxies answer differently; there is one pipeline, not two.
//!
//! Every difference is listed here. When you add one, add its row and read the dialect where
//! the difference is, never a copy of the code around it.
//!
//! | Where | ESP v1 (`portico esp`) | ESPv2 (`portico espv2`) | Read in |
//! |---|---|---|---|
//! | Start-up flags | ESP's `start_esp` flags, exit code 4 on a bad one | ESPv2's `start_proxy.py` flags (and its config manager's), exit code 1 | `cli`, `cli::espv2` |
//! | Serving ports | `--http_port`, `--http2_port`, `--ssl_port` | one `--listener_port` (default 8080) for HTTP/1.1, h2c and gRPC | `cli::espv2`, [`Dialect::serving_port_flag`] |
//! | Status server | on, `--status_port` default 8090 | off unless `--status_port`/`--admin_port` names a port | `cli::espv2` |
//! | Defaults | backend `127.0.0.1:8081`; access log on stdout; Service Control timeouts 1500/1500/3500 ms | backend `http://127.0.0.1:8082`; no access log unless `--access_log`; timeouts 1000/1000/2000 ms; CORS allow-headers add `X-User-Agent`; metadata server `http://169.254.169.254` unless `--non_gcp` | `cli::espv2` |
//! | `x-google-backend` routing | only with `--enable_backend_routing` | always | `cli::espv2` |

use std::fmt;

/// Which proxy's behaviour Portico reproduces. Plain data, `Copy`: read it wherever the two
/// differ (see the table above).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Dialect {
    /// ESP v1 (nginx-based, `endpoints-runtime:1`).
    #[default]
    Esp,
    /// ESPv2 (Envoy-based, `endpoints-runtime:2`).
    EspV2,
}

impl Dialect {
    /// The `portico` sub-command that speaks this dialect.
    pub fn command(self) -> &'static str {
        match self {
            Dialect::Esp => "esp",
            Dialect::EspV2 => "espv2",
        }
    }

    /// The flag that names the plain-text serving port, for messages about it.
    pub fn serving_port_flag(self) -> &'static str {
        match self {
            Dialect::Esp => "--http_port",
            Dialect::EspV2 => "--listener_port",
        }
    }
}

impl fmt::Display for Dialect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.command())
    }
}
