//! `portico control-plane`: flag parsing and the process entry point.

use std::ffi::OsString;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

use crate::app::{serve, ServeOptions};

/// The control plane: Service Management, Service Usage, IAM, Resource Manager, API Keys and
/// Service Control APIs in Google's REST shapes.
#[derive(Debug, Parser)]
#[command(version)]
pub struct Args {
    /// Address to listen on. Loopback by default; use 0.0.0.0:PORT to serve other hosts.
    #[arg(long, default_value = "127.0.0.1:8000")]
    pub listen: SocketAddr,
    /// Data directory: SQLite database (unless --database-url) and the admin token.
    #[arg(long, env = "PORTICO_DATA")]
    pub data: Option<PathBuf>,
    /// PostgreSQL URL (postgres://user@host:port/db) instead of SQLite.
    #[arg(long, env = "PORTICO_DATABASE_URL")]
    pub database_url: Option<String>,
    /// PostgreSQL schema to use, created if absent.
    #[arg(long)]
    pub database_schema: Option<String>,
    /// Redis URL for quota counters (redis://127.0.0.1:6379).
    #[arg(long, env = "PORTICO_REDIS_URL")]
    pub redis_url: Option<String>,
    /// URL clients use to reach this server (default `http://<listen address>`).
    #[arg(long)]
    pub public_url: Option<String>,
    /// Admin bearer token file (default DATA/admin-token); created with a random token if absent.
    #[arg(long)]
    pub admin_token_file: Option<PathBuf>,
    /// Master key for API key encryption (default DATA/master-key, created if absent). Replicas
    /// sharing one database need the same key (or PORTICO_MASTER_KEY).
    #[arg(long, env = "PORTICO_MASTER_KEY_FILE")]
    pub master_key_file: Option<PathBuf>,
    /// Seconds a connection may take to send a request head, from accept or from the first
    /// byte after an idle period (nginx's client_header_timeout).
    #[arg(long, default_value_t = 60.0, value_parser = positive_seconds)]
    pub header_read_timeout: f64,
    /// Seconds an idle keep-alive connection is kept open (nginx's keepalive_timeout).
    #[arg(long, default_value_t = 75.0, value_parser = positive_seconds)]
    pub keepalive_timeout: f64,
}

fn positive_seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v <= 7.0 * 86_400.0 => Ok(v),
        _ => Err(format!(
            "{s:?}: expected a number of seconds, more than 0 and at most 7 days"
        )),
    }
}

impl From<Args> for ServeOptions {
    fn from(a: Args) -> Self {
        ServeOptions {
            listen: a.listen,
            data_dir: a.data,
            database_url: a.database_url,
            database_schema: a.database_schema,
            redis_url: a.redis_url,
            public_url: a.public_url,
            admin_token_file: a.admin_token_file,
            master_key_file: a.master_key_file,
            conn_limits: portico_listen::ConnLimits {
                header_read_timeout: std::time::Duration::from_secs_f64(a.header_read_timeout),
                keep_alive_timeout: std::time::Duration::from_secs_f64(a.keepalive_timeout),
            },
        }
    }
}

/// Entry point for `portico control-plane`; `args[0]` is the command name.
pub fn main(args: Vec<OsString>) -> ExitCode {
    let args = match Args::try_parse_from(args) {
        Ok(a) => a,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("portico control-plane: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(run(args.into()))
}

async fn run(opts: ServeOptions) -> ExitCode {
    let server = match serve(opts).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("portico control-plane: {e}");
            return ExitCode::FAILURE;
        }
    };
    eprintln!(
        "portico control-plane: admin token in {}",
        server.admin_token_path.display()
    );
    // Tests and scripts read this line to learn the port when --listen used port 0.
    println!("listening on http://{}", server.addr);
    let _ = std::io::stdout().flush();
    match server
        .run_until(termination(), std::time::Duration::from_secs(20))
        .await
    {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("portico control-plane: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Resolves on Ctrl-C or SIGTERM (what Kubernetes sends before killing a pod).
async fn termination() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
    tracing::info!("shutting down");
}
