//! The data plane: `portico esp`, an ESP v1-compatible API proxy on hyper 1.x.
//!
//! (Module map is being built; see docs/architecture.md.)

pub mod auth;
pub mod config_source;
pub mod control;
pub mod error;

pub mod cli {
    use std::ffi::OsString;
    use std::process::ExitCode;

    /// Entry point for the `portico esp` subcommand; `args[0]` is the subcommand name.
    pub fn main(_args: Vec<OsString>) -> ExitCode {
        eprintln!("not built yet");
        ExitCode::from(3)
    }
}
