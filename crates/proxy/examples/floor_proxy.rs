//! The floor for `bench/`: the least a hyper reverse proxy does per request, built from the
//! same parts as `portico esp` (one current-thread runtime per core with `SO_REUSEPORT`,
//! hyper's HTTP/1 server, Portico's capped backend pool) and nothing else: no routing, no
//! policy, no metrics, no timers, no forwarding headers. Its CPU per request is what the rest
//! of the proxy's work is measured against (`bench/cpu_per_request.sh`).
//!
//!   cargo run --release -p portico-proxy --example floor_proxy -- 127.0.0.1:PORT BACKEND:PORT
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use portico_proxy::forward::LimitedBody;
use portico_proxy::pipeline::ProxyBody;
use portico_proxy::upstream::{Dialer, Pool, PoolLimits};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    portico_proxy::memory::tune_allocator();
    let mut args = std::env::args().skip(1);
    let (Some(listen), Some(backend)) = (args.next(), args.next()) else {
        eprintln!("usage: floor_proxy LISTEN_ADDR BACKEND_HOST:PORT");
        std::process::exit(2);
    };
    let Ok(addr) = listen.parse::<SocketAddr>() else {
        eprintln!("floor_proxy: {listen} is not an address");
        std::process::exit(2);
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    for _ in 0..threads {
        let backend = backend.clone();
        std::thread::spawn(move || worker(addr, backend));
    }
    // The workers serve until the process ends: on SIGINT or SIGTERM (the benchmarks' cleanup).
    let stopped = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map(|rt| {
            rt.block_on(async {
                use tokio::signal::unix::{signal, SignalKind};
                let (Ok(mut int), Ok(mut term)) = (
                    signal(SignalKind::interrupt()),
                    signal(SignalKind::terminate()),
                ) else {
                    return;
                };
                tokio::select! {
                    _ = int.recv() => {}
                    _ = term.recv() => {}
                }
            })
        });
    if let Err(e) = stopped {
        eprintln!("floor_proxy: {e}");
        std::process::exit(1);
    }
}

fn worker(addr: SocketAddr, backend: String) {
    let listener = portico_proxy::server::bind_reuseport(addr);
    let listener = match listener {
        Ok(l) => l,
        Err(e) => {
            eprintln!("floor_proxy: cannot listen on {addr}: {e}");
            std::process::exit(1);
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("floor_proxy: {e}");
            std::process::exit(1);
        }
    };
    rt.block_on(async move {
        let pool = Arc::new(Pool::new(
            Dialer::Plain { authority: backend },
            PoolLimits::default(),
        ));
        let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
            return;
        };
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            let pool = pool.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let pool = pool.clone();
                    async move {
                        let (parts, body) = req.into_parts();
                        let req = hyper::Request::from_parts(parts, LimitedBody::new(body, 0));
                        let resp = match pool.send(req).await {
                            Ok(r) => {
                                let (p, b) = r.into_parts();
                                hyper::Response::from_parts(p, ProxyBody::upstream(b))
                            }
                            Err(_) => {
                                let mut r = hyper::Response::new(ProxyBody::empty());
                                *r.status_mut() = hyper::StatusCode::BAD_GATEWAY;
                                r
                            }
                        };
                        Ok::<_, Infallible>(resp)
                    }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
}
