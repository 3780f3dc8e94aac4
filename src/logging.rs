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

pub fn init(colours: Colours) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let builder = match colours {
        Colours::Default => builder,
        Colours::OnTerminal => builder.with_ansi(std::io::stderr().is_terminal()),
    };
    let _ = builder.try_init();
}
