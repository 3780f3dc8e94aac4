//! `portico`: one binary, one subcommand per part. Each part owns its flag parsing; this file
//! dispatches, and sets up logging ([`logging`]) for the parts that serve.
//!
//! - `portico esp ...`            the proxy (ESP v1's flags)            → crates/proxy
//! - `portico espv2 ...`          the same proxy, ESPv2's flags and answers → crates/proxy
//! - `portico control-plane ...`  the Google-shaped APIs                → crates/control-plane
//! - `portico echo ...`           the getting-started sample backend    → crates/echo
//! - `portico bookstore ...`      the gRPC sample backend (Bookstore)   → crates/bookstore
//! - `portico config validate F`  OpenAPI → service config, or errors   → src/config_cmd.rs,
//!   converting with crates/config
//! - `portico up ...`             everything on one machine              → src/up.rs

mod config_cmd;
mod logging;
mod up;

use std::ffi::OsString;
use std::process::ExitCode;

#[cfg(not(feature = "system-allocator"))]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const USAGE: &str = "usage: portico <command> [flags]

commands:
  up               run everything locally: control plane, sample backend, proxy
  esp              the API proxy; accepts ESP's startup flags (portico esp --help)
  espv2            the same proxy with ESPv2's startup flags and answers (portico espv2 --help)
  control-plane    the control plane (Service Management, IAM, API keys, Service Control)
  echo             the getting-started sample backend
  bookstore        the gRPC sample backend (the Bookstore service, h2c or TLS)
  config validate  convert an OpenAPI file to a service config, or list its errors
";

/// Runs before `main` (and before the Rust runtime's first allocation reserves mimalloc's first
/// arena), which is the only point where mimalloc's arena options still take effect.
#[cfg(all(target_os = "linux", not(feature = "system-allocator")))]
#[used]
#[link_section = ".init_array"]
static TUNE_ALLOCATOR: extern "C" fn() = {
    extern "C" fn tune() {
        portico_proxy::memory::tune_allocator();
    }
    tune
};

fn main() -> ExitCode {
    let mut args: Vec<OsString> = std::env::args_os().collect();
    if args.len() < 2 {
        eprint!("{USAGE}");
        return ExitCode::from(2);
    }
    let sub = args.remove(1);
    // args[0] becomes "portico <sub>" so each parser names itself correctly in --help.
    args[0] = OsString::from(format!("portico {}", sub.to_string_lossy()));
    match sub.to_str() {
        Some("up") => up::main(args),
        Some("esp") => {
            logging::init(logging::Colours::OnTerminal);
            portico_proxy::cli::main(args)
        }
        // Logging waits for the command line: `--enable_debug` sets its level.
        Some("espv2") => portico_proxy::cli::espv2::main_with_logging(args, |settings| {
            let filter = if settings.enable_debug {
                logging::DEBUG_FILTER
            } else {
                "info"
            };
            logging::init_with_default(logging::Colours::OnTerminal, filter);
        }),
        Some("control-plane") => {
            logging::init(logging::Colours::Default);
            portico_control_plane::cli::main(args)
        }
        Some("echo") => {
            logging::init(logging::Colours::Default);
            portico_echo::cli::main(args)
        }
        Some("bookstore") => {
            logging::init(logging::Colours::Default);
            portico_bookstore::cli::main(args)
        }
        Some("config") => config_cmd::main(args),
        Some("-h") | Some("--help") | Some("help") => {
            print!("{USAGE}");
            ExitCode::SUCCESS
        }
        _ => {
            eprintln!("portico: unknown command {:?}\n", sub);
            eprint!("{USAGE}");
            ExitCode::from(2)
        }
    }
}
