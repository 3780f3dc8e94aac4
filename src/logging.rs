//! Logging, set up once by the binary for every subcommand that serves: one tracing
//! subscriber, `RUST_LOG` filters (default `info`), lines on stderr (the proxy's stdout carries
//! its access log). The library crates only emit events.

use std::io::IsTerminal;
use tracing_subscriber::EnvFilter;

/// When log lines carry ANSI colours.
#[derive(Clone, Copy)]
pub enum Colours {
    /// tracing-subscriber's default (the control plane and the sample backend).
    Default,
    /// Only when stderr is a terminal (the proxy, whose logs are usually collected).
    OnTerminal,
}

/// The filter of `portico espv2 --enable_debug` (ESPv2's Envoy at debug level, its noisiest
/// parts kept at info): debug for Portico's crates, info for the libraries under them.
pub const DEBUG_FILTER: &str = "info,portico=debug,portico_proxy=debug,portico_config=debug,\
                                portico_servicecontrol=debug,portico_credentials=debug,\
                                portico_listen=debug";

pub fn init(colours: Colours) {
    init_with_default(colours, "info")
}

/// Like [`init`], with `default` as the filter when `RUST_LOG` is not set.
pub fn init_with_default(colours: Colours, default: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let builder = match colours {
        Colours::Default => builder,
        Colours::OnTerminal => builder.with_ansi(std::io::stderr().is_terminal()),
    };
    let _ = builder.try_init();
}
