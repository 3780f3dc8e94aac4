//! (being built)

pub mod cli {
    use std::ffi::OsString;
    use std::process::ExitCode;

    /// Entry point for the `portico` subcommand; `args[0]` is the subcommand name.
    pub fn main(_args: Vec<OsString>) -> ExitCode {
        eprintln!("not built yet");
        ExitCode::from(3)
    }
}
