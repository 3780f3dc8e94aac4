//! The Bookstore gRPC sample backend (`portico bookstore`): the `endpoints.examples.bookstore.Bookstore`
//! service of examples/bookstore-grpc/bookstore.proto, kept in memory, served over h2c or TLS.
//!
//! Where things are:
//! - [`proto`]: the message types and the tonic service trait, generated at build time from the
//!   proto (build.rs, with protox: no protoc binary needed).
//! - [`store`]: the shelves and books and the rules of each method ([`store::Store`]), plain
//!   synchronous code that the unit tests call directly.
//! - [`service`]: the tonic service over the store, including the streaming methods.
//! - [`control`]: request metadata a test can send to make a call fail on demand, echo metadata
//!   back, or slow a stream down. Applied around every method by [`serve`], documented in
//!   examples/bookstore-grpc/README.md.
//! - [`serve`] / [`serve_with_shutdown`]: the HTTP/2 server (cleartext with prior knowledge, or
//!   TLS with ALPN `h2` when given a [`tls::server_config`]).
//! - [`cli::main`]: the `portico bookstore` subcommand.
//!
//! Seed data, as ESPv2's test Bookstore has it: shelf 100 "Kids", shelf 200 "Classic", and book
//! 2001 (Shakspeare, "Hamlet") on shelf 200.

pub mod control;
pub mod service;
pub mod store;
pub mod tls;

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;

use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

/// Generated from examples/bookstore-grpc/bookstore.proto (package `endpoints.examples.bookstore`).
#[allow(clippy::all, missing_docs)]
pub mod proto {
    tonic::include_proto!("endpoints.examples.bookstore");
}

/// The Bookstore's descriptor set, as `protoc --include_imports --include_source_info
/// --descriptor_set_out=api_descriptor.pb bookstore.proto` writes it (built by build.rs), for
/// `portico up --grpc` to deploy.
pub const DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/bookstore_descriptor.pb"));

/// examples/bookstore-grpc/api_config.yaml (project `demo-proj`).
pub const API_CONFIG_YAML: &str = include_str!("../../../examples/bookstore-grpc/api_config.yaml");

/// The gRPC path prefix of the service: `/endpoints.examples.bookstore.Bookstore/`.
pub const SERVICE_PATH: &str = "/endpoints.examples.bookstore.Bookstore/";

/// Errors from starting the server.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("accepting a connection failed: {0}")]
    Accept(#[source] std::io::Error),
}

/// Serves the Bookstore on `listener` until the process ends.
pub async fn serve(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
) -> Result<(), ServeError> {
    serve_with_shutdown(listener, tls, std::future::pending()).await
}

/// Serves the Bookstore on `listener` until `shutdown` completes. Each connection is HTTP/2:
/// cleartext with prior knowledge (h2c) when `tls` is `None`, else TLS (the config should
/// offer ALPN `h2`; [`tls::server_config`] does). The standard health service
/// (`grpc.health.v1.Health`) is served next to the Bookstore.
pub async fn serve_with_shutdown<F>(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    shutdown: F,
) -> Result<(), ServeError>
where
    F: Future<Output = ()> + Send,
{
    serve_services(listener, tls, true, shutdown).await
}

/// [`serve_with_shutdown`], with the health service only when `health` is true.
pub async fn serve_services<F>(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    health: bool,
    shutdown: F,
) -> Result<(), ServeError>
where
    F: Future<Output = ()> + Send,
{
    let store = Arc::new(store::Store::seeded());
    let grpc = control::Services::new(store, health);
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                // Out of file descriptors and the like: wait a little rather than spin.
                Err(e) if is_transient(&e) => {
                    tracing::warn!(error = %e, "accept failed; retrying");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
                Err(e) => return Err(ServeError::Accept(e)),
            },
        };
        let _ = stream.set_nodelay(true);
        let grpc = grpc.clone();
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let grpc = grpc.clone();
                async move { Ok::<_, Infallible>(control::handle(req, grpc).await) }
            });
            let builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
            let result = match acceptor {
                None => builder.serve_connection(TokioIo::new(stream), svc).await,
                Some(acceptor) => match acceptor.accept(stream).await {
                    Ok(tls) => builder.serve_connection(TokioIo::new(tls), svc).await,
                    Err(e) => {
                        tracing::debug!(%peer, error = %e, "TLS handshake failed");
                        return;
                    }
                },
            };
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
}

fn is_transient(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionAborted | ConnectionReset | Interrupted | WouldBlock
    ) || e.raw_os_error() == Some(24) // EMFILE
        || e.raw_os_error() == Some(23) // ENFILE
}

/// The `portico bookstore` subcommand.
pub mod cli {
    use clap::Parser;
    use std::ffi::OsString;
    use std::net::{IpAddr, Ipv4Addr, SocketAddr};
    use std::path::PathBuf;
    use std::process::ExitCode;

    #[derive(Parser, Debug)]
    #[command(
        about = "The Bookstore gRPC sample backend (endpoints.examples.bookstore.Bookstore), in memory, over h2c or TLS"
    )]
    struct Args {
        /// Port to listen on; 0 picks a free port and prints it.
        #[arg(long, default_value_t = 8000)]
        port: u16,
        /// Address to bind (loopback unless given, e.g. 0.0.0.0 in a container).
        #[arg(long, default_value_t = IpAddr::V4(Ipv4Addr::LOCALHOST))]
        bind: IpAddr,
        /// PEM certificate chain: serve TLS (ALPN h2) instead of h2c. Needs --tls-key.
        #[arg(long, requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// PEM private key for --tls-cert.
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        /// Leave out the standard health service (grpc.health.v1.Health): its calls are then
        /// UNIMPLEMENTED, as from a server that does not implement it.
        #[arg(long)]
        no_health_service: bool,
    }

    /// Entry point for `portico bookstore`; `args[0]` is the subcommand name.
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
        let tls = match (&args.tls_cert, &args.tls_key) {
            (Some(cert), Some(key)) => match super::tls::server_config(cert, key) {
                Ok(c) => Some(c),
                Err(e) => {
                    eprintln!("portico bookstore: {e}");
                    return ExitCode::from(2);
                }
            },
            _ => None,
        };
        let addr = SocketAddr::new(args.bind, args.port);
        let runtime = match tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                eprintln!("portico bookstore: cannot start the runtime: {e}");
                return ExitCode::from(3);
            }
        };
        runtime.block_on(async move {
            let listener = match tokio::net::TcpListener::bind(addr).await {
                Ok(l) => l,
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                    eprintln!(
                        "portico bookstore: port {} is already in use; pass --port (0 picks one)",
                        addr.port()
                    );
                    return ExitCode::from(3);
                }
                Err(e) => {
                    eprintln!("portico bookstore: cannot listen on {addr}: {e}");
                    return ExitCode::from(3);
                }
            };
            let local = listener.local_addr().unwrap_or(addr);
            // Scripts and tests read this line to learn the port (--port 0).
            let scheme = if tls.is_some() { "grpcs" } else { "grpc" };
            println!("bookstore listening on {scheme}://{local}");
            tracing::info!(%local, tls = tls.is_some(), "bookstore listening");
            let shutdown = async {
                portico_listen::shutdown_signal().await;
                tracing::info!("shutting down");
            };
            let health = !args.no_health_service;
            match super::serve_services(listener, tls, health, shutdown).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("portico bookstore: {e}");
                    ExitCode::from(1)
                }
            }
        })
    }
}
