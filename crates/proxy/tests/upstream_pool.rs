//! The capped keep-alive pool (`portico_proxy::upstream::Pool`) and the `Forwarder` over it,
//! against a real HTTP/1.1 backend written here on raw sockets: a hyper server would hide
//! exactly what these tests count (connections accepted, open, requests in flight) and could
//! not misbehave on purpose (close idle connections, stall a body half-way).

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use portico_proxy::forward::{ForwardError, Forwarder, LimitedBody};
use portico_proxy::settings::{BackendAddr, BackendScheme};
use portico_proxy::upstream::{Dialer, Pool, PoolLimits, UpstreamBody};
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::JoinHandle;

/// Every test finishes well within this; a hang (a leaked slot makes requests wait forever)
/// fails instead of blocking the run.
const TEST_BUDGET: Duration = Duration::from_secs(20);

async fn bounded<F: Future<Output = ()>>(test: F) {
    tokio::time::timeout(TEST_BUDGET, test)
        .await
        .expect("test exceeded its time budget");
}

// ---------------------------------------------------------------------------------------------
// The backend.

#[derive(Default)]
struct Stats {
    accepted: AtomicUsize,
    open: AtomicUsize,
    max_open: AtomicUsize,
    inflight: AtomicUsize,
    max_inflight: AtomicUsize,
    requests: AtomicUsize,
    targets: Mutex<Vec<String>>,
}

impl Stats {
    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
    fn open(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }
}

#[derive(Clone, Copy, Default)]
struct Options {
    /// Close a keep-alive connection when no request arrives for this long, without saying so
    /// in the response (what a backend's keep-alive timeout does).
    idle_close: Option<Duration>,
}

struct Backend {
    port: u16,
    stats: Arc<Stats>,
    task: JoinHandle<()>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Backend {
    async fn start(opts: Options) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let stats = Arc::new(Stats::default());
        let st = stats.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((sock, _)) = listener.accept().await else {
                    return;
                };
                st.accepted.fetch_add(1, Ordering::SeqCst);
                let now = st.open.fetch_add(1, Ordering::SeqCst) + 1;
                st.max_open.fetch_max(now, Ordering::SeqCst);
                tokio::spawn(serve_conn(sock, st.clone(), opts));
            }
        });
        Backend { port, stats, task }
    }

    fn pool(&self, max: usize, max_idle: usize, idle_timeout: Duration) -> Pool {
        pool_to(self.port, max, max_idle, idle_timeout)
    }
}

fn pool_to(port: u16, max: usize, max_idle: usize, idle_timeout: Duration) -> Pool {
    Pool::new(
        Dialer::Plain {
            authority: format!("127.0.0.1:{port}"),
        },
        PoolLimits {
            max,
            max_idle,
            idle_timeout,
        },
    )
}

/// Counts the connection as closed however `serve_conn` ends.
struct OpenGuard(Arc<Stats>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Counts a request in flight from its head being read to its response being written.
struct InflightGuard(Arc<Stats>);

impl InflightGuard {
    fn new(st: &Arc<Stats>) -> InflightGuard {
        let now = st.inflight.fetch_add(1, Ordering::SeqCst) + 1;
        st.max_inflight.fetch_max(now, Ordering::SeqCst);
        InflightGuard(st.clone())
    }
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::SeqCst);
    }
}

const BIG_LEN: usize = 1 << 20;
const BIG_CHUNK: usize = 16 * 1024;
const CHUNKS: usize = 8;

async fn serve_conn(mut sock: TcpStream, st: Arc<Stats>, opts: Options) {
    let _open = OpenGuard(st.clone());
    let mut buf = Vec::new();
    loop {
        let head = match opts.idle_close {
            Some(idle) => match tokio::time::timeout(idle, read_head(&mut sock, &mut buf)).await {
                Ok(h) => h,
                Err(_) => return,
            },
            None => read_head(&mut sock, &mut buf).await,
        };
        let Some(target) = head else {
            return;
        };
        st.requests.fetch_add(1, Ordering::SeqCst);
        st.targets.lock().unwrap().push(target.clone());
        let _inflight = InflightGuard::new(&st);
        // Routes on the path whatever form the target came in, so that only the test about the
        // target's form fails when it is wrong.
        let path = match target.split_once("://") {
            Some((_, rest)) => rest.find('/').map_or("/", |i| &rest[i..]).to_string(),
            None => target,
        };
        if !respond(&mut sock, &path).await {
            return;
        }
    }
}

/// Writes the response for `path`; false when the connection is to end (closed by either side).
async fn respond(sock: &mut TcpStream, path: &str) -> bool {
    if let Some(ms) = path.strip_prefix("/delay/") {
        let ms: u64 = ms.parse().unwrap_or(0);
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    match path {
        "/big" => {
            let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {BIG_LEN}\r\n\r\n");
            if sock.write_all(head.as_bytes()).await.is_err() {
                return false;
            }
            let chunk = vec![b'x'; BIG_CHUNK];
            for _ in 0..BIG_LEN / BIG_CHUNK {
                if sock.write_all(&chunk).await.is_err() {
                    return false;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            true
        }
        "/chunked" => {
            let head = "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n";
            if sock.write_all(head.as_bytes()).await.is_err() {
                return false;
            }
            for i in 0..CHUNKS {
                let data = format!("chunk-{i}\n");
                let frame = format!("{:x}\r\n{data}\r\n", data.len());
                if sock.write_all(frame.as_bytes()).await.is_err() {
                    return false;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            sock.write_all(b"0\r\n\r\n").await.is_ok()
        }
        "/close" => {
            let resp = "HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 3\r\n\r\nbye";
            let _ = sock.write_all(resp.as_bytes()).await;
            false
        }
        _ => {
            let resp = "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
            sock.write_all(resp.as_bytes()).await.is_ok()
        }
    }
}

/// Reads one request head (and skips its body); returns the request target, or None when the
/// client closed the connection.
async fn read_head(sock: &mut TcpStream, buf: &mut Vec<u8>) -> Option<String> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head: Vec<u8> = buf.drain(..end + 4).collect();
            let head = String::from_utf8_lossy(&head).into_owned();
            let target = head.split(' ').nth(1)?.to_string();
            let len: usize = head
                .lines()
                .filter_map(|l| l.split_once(':'))
                .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
                .and_then(|(_, v)| v.trim().parse().ok())
                .unwrap_or(0);
            while buf.len() < len {
                if sock.read_buf(buf).await.ok()? == 0 {
                    return None;
                }
            }
            buf.drain(..len);
            return Some(target);
        }
        if sock.read_buf(buf).await.ok()? == 0 {
            return None;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Client helpers.

fn get(path: &str) -> Request<LimitedBody> {
    Request::builder()
        .uri(path)
        .header(http::header::HOST, "127.0.0.1")
        .body(LimitedBody::empty())
        .unwrap()
}

async fn read_all(resp: http::Response<UpstreamBody>) -> (StatusCode, Bytes) {
    let status = resp.status();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, body)
}

async fn fetch(pool: &Pool, path: &str) -> (StatusCode, Bytes) {
    read_all(pool.send(get(path)).await.unwrap()).await
}

/// Waits (bounded) for a condition another task brings about.
async fn wait_until(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

const LONG: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------------
// Reuse.

#[tokio::test]
async fn sequential_requests_reuse_one_connection() {
    bounded(async {
        let backend = Backend::start(Options::default()).await;
        let pool = backend.pool(4, 4, LONG);
        for _ in 0..5 {
            let (status, body) = fetch(&pool, "/").await;
            assert_eq!(status, StatusCode::OK);
            assert_eq!(&body[..], b"ok");
            assert_eq!(pool.open_connections(), 1);
            assert_eq!(pool.idle_connections(), 1);
        }
        assert_eq!(backend.stats.accepted(), 1);
        assert_eq!(backend.stats.requests.load(Ordering::SeqCst), 5);
    })
    .await;
}

#[tokio::test]
async fn chunked_body_read_to_the_end_returns_the_connection() {
    bounded(async {
        let backend = Backend::start(Options::default()).await;
        let pool = backend.pool(4, 4, LONG);
        for _ in 0..3 {
            let (status, body) = fetch(&pool, "/chunked").await;
            assert_eq!(status, StatusCode::OK);
            let expected: String = (0..CHUNKS).map(|i| format!("chunk-{i}\n")).collect();
            assert_eq!(body, Bytes::from(expected));
            assert_eq!(pool.idle_connections(), 1);
        }
        assert_eq!(backend.stats.accepted(), 1);
        assert_eq!(pool.open_connections(), 1);
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// The cap and waiting.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrency_is_capped_and_excess_requests_queue() {
    bounded(async {
        let backend = Backend::start(Options::default()).await;
        let pool = backend.pool(2, 2, LONG);

        let sampled_max = Arc::new(AtomicUsize::new(0));
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sampler = {
            let (pool, sampled_max, done) = (pool.clone(), sampled_max.clone(), done.clone());
            tokio::spawn(async move {
                while !done.load(Ordering::SeqCst) {
                    sampled_max.fetch_max(pool.open_connections(), Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            })
        };

        let started = Instant::now();
        let tasks: Vec<_> = (0..10)
            .map(|_| {
                let pool = pool.clone();
                tokio::spawn(async move { fetch(&pool, "/delay/100").await })
            })
            .collect();
        for t in tasks {
            let (status, body) = t.await.unwrap();
            assert_eq!(status, StatusCode::OK);
            assert_eq!(&body[..], b"ok");
        }
        let elapsed = started.elapsed();
        done.store(true, Ordering::SeqCst);
        sampler.await.unwrap();

        let st = &backend.stats;
        assert_eq!(st.accepted(), 2, "exactly `max` connections are dialled");
        assert!(st.max_open.load(Ordering::SeqCst) <= 2);
        assert_eq!(st.max_inflight.load(Ordering::SeqCst), 2);
        assert_eq!(st.requests.load(Ordering::SeqCst), 10);
        assert!(sampled_max.load(Ordering::SeqCst) <= 2);
        // 10 requests of 100 ms over 2 connections take 5 rounds.
        assert!(
            elapsed >= Duration::from_millis(480),
            "requests did not queue: {elapsed:?}"
        );
        assert_eq!(pool.open_connections(), 2);
        assert_eq!(pool.idle_connections(), 2);
    })
    .await;
}

#[tokio::test]
async fn waiter_abandoned_by_a_timeout_leaks_no_slot() {
    bounded(async {
        let backend = Backend::start(Options::default()).await;
        let pool = backend.pool(1, 1, LONG);

        let slow = {
            let pool = pool.clone();
            tokio::spawn(async move { fetch(&pool, "/delay/300").await })
        };
        let st = backend.stats.clone();
        wait_until("the slow request reaches the backend", || {
            st.inflight.load(Ordering::SeqCst) == 1
        })
        .await;

        let waited = tokio::time::timeout(Duration::from_millis(50), pool.send(get("/"))).await;
        assert!(
            waited.is_err(),
            "the second request should still be waiting"
        );
        assert_eq!(pool.open_connections(), 1);

        let (status, _) = slow.await.unwrap();
        assert_eq!(status, StatusCode::OK);
        // The connection skipped the abandoned waiter and went idle.
        assert_eq!(pool.open_connections(), 1);
        assert_eq!(pool.idle_connections(), 1);

        let (status, body) = fetch(&pool, "/").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(&body[..], b"ok");
        assert_eq!(pool.open_connections(), 1);
        assert_eq!(backend.stats.accepted(), 1);
        assert_eq!(backend.stats.requests.load(Ordering::SeqCst), 2);
    })
    .await;
}

#[tokio::test]
async fn waiter_dropped_after_being_handed_a_connection_gives_it_back() {
    bounded(async {
        let backend = Backend::start(Options::default()).await;
        let pool = backend.pool(1, 1, LONG);

        let first = pool.send(get("/")).await.unwrap();
        // Polled once so that it queues, then never again until dropped.
        let mut waiting = Box::pin(pool.send(get("/")));
        let polled = tokio::time::timeout(Duration::from_millis(20), &mut waiting).await;
        assert!(polled.is_err(), "the second request should be waiting");

        // Reading the first body to the end hands the connection to the waiter, which is
        // dropped before it could take it.
        let (status, _) = read_all(first).await;
        assert_eq!(status, StatusCode::OK);
        drop(waiting);
        assert_eq!(pool.open_connections(), 1);
        assert_eq!(pool.idle_connections(), 1);

        let (status, _) = fetch(&pool, "/").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(backend.stats.accepted(), 1);
        assert_eq!(backend.stats.requests.load(Ordering::SeqCst), 2);
    })
    .await;
}

#[tokio::test]
async fn waiter_dropped_after_being_handed_a_slot_gives_it_back() {
    bounded(async {
        let backend = Backend::start(Options::default()).await;
        let pool = backend.pool(1, 1, LONG);

        let first = pool.send(get("/big")).await.unwrap();
        let mut waiting = Box::pin(pool.send(get("/")));
        let polled = tokio::time::timeout(Duration::from_millis(20), &mut waiting).await;
        assert!(polled.is_err(), "the second request should be waiting");

        // The half-read body closes its connection; its slot goes to the waiter, which is
        // dropped before dialling.
        drop(first);
        assert_eq!(pool.open_connections(), 1, "the slot passed to the waiter");
        drop(waiting);
        assert_eq!(pool.open_connections(), 0);
        assert_eq!(pool.idle_connections(), 0);

        let (status, _) = fetch(&pool, "/").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(pool.open_connections(), 1);
        assert_eq!(backend.stats.accepted(), 2);
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Bodies dropped half-way.

async fn drop_after_first_frame(path: &str) {
    let backend = Backend::start(Options::default()).await;
    let pool = backend.pool(1, 1, LONG);

    let mut body = pool.send(get(path)).await.unwrap().into_body();
    let frame = body.frame().await.unwrap().unwrap();
    assert!(!frame.into_data().unwrap().is_empty());
    assert_eq!(pool.open_connections(), 1);
    drop(body);
    assert_eq!(
        pool.open_connections(),
        0,
        "dropping the body frees the slot"
    );
    assert_eq!(pool.idle_connections(), 0);
    let st = backend.stats.clone();
    wait_until("the backend sees the connection closed", || st.open() == 0).await;

    let (status, body) = fetch(&pool, "/").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(&body[..], b"ok");
    assert_eq!(
        backend.stats.accepted(),
        2,
        "a new connection after the drop"
    );
    assert_eq!(pool.open_connections(), 1);
}

#[tokio::test]
async fn body_with_length_dropped_half_way_closes_the_connection_and_frees_its_slot() {
    bounded(drop_after_first_frame("/big")).await;
}

#[tokio::test]
async fn chunked_body_dropped_half_way_closes_the_connection_and_frees_its_slot() {
    bounded(drop_after_first_frame("/chunked")).await;
}

#[tokio::test]
async fn body_dropped_half_way_hands_its_slot_to_a_waiter() {
    bounded(async {
        let backend = Backend::start(Options::default()).await;
        let pool = backend.pool(1, 1, LONG);

        let mut body = pool.send(get("/big")).await.unwrap().into_body();
        body.frame().await.unwrap().unwrap();
        let waiter = {
            let pool = pool.clone();
            tokio::spawn(async move { fetch(&pool, "/").await })
        };
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert!(
            !waiter.is_finished(),
            "the second request should be waiting"
        );

        drop(body);
        let (status, body) = waiter.await.unwrap();
        assert_eq!(status, StatusCode::OK);
        assert_eq!(&body[..], b"ok");
        assert_eq!(backend.stats.accepted(), 2);
        assert_eq!(pool.open_connections(), 1);
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Connections the backend closes.

#[tokio::test]
async fn idle_connection_closed_by_the_backend_is_not_an_error() {
    bounded(async {
        let backend = Backend::start(Options {
            idle_close: Some(Duration::from_millis(30)),
        })
        .await;
        let pool = backend.pool(1, 1, LONG);
        for round in 1..=3 {
            let (status, body) = fetch(&pool, "/").await;
            assert_eq!(status, StatusCode::OK, "round {round}");
            assert_eq!(&body[..], b"ok");
            assert_eq!(backend.stats.accepted(), round);
            let st = backend.stats.clone();
            wait_until("the backend closes the idle connection", || st.open() == 0).await;
            // Let the client side notice the close too.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(pool.open_connections() <= 1);
    })
    .await;
}

#[tokio::test]
async fn connection_close_responses_do_not_fail_the_next_request() {
    bounded(async {
        let backend = Backend::start(Options::default()).await;
        let pool = backend.pool(1, 1, LONG);
        for _ in 0..5 {
            let (status, body) = fetch(&pool, "/close").await;
            assert_eq!(status, StatusCode::OK);
            assert_eq!(&body[..], b"bye");
            assert!(pool.open_connections() <= 1);
        }
        assert_eq!(backend.stats.accepted(), 5);
        assert_eq!(backend.stats.requests.load(Ordering::SeqCst), 5);
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Dialling.

#[tokio::test]
async fn dial_failure_is_a_connect_error_and_frees_the_slot() {
    bounded(async {
        let port = {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            l.local_addr().unwrap().port()
        };
        // max 1: a slot leaked by a failed dial would make the next attempt wait forever.
        let pool = pool_to(port, 1, 1, LONG);
        for _ in 0..3 {
            let r = tokio::time::timeout(Duration::from_secs(5), pool.send(get("/")))
                .await
                .expect("a refused dial must fail, not wait");
            assert!(matches!(r, Err(ForwardError::Connect(..))), "{:?}", r.err());
            assert_eq!(pool.open_connections(), 0);
            assert_eq!(pool.idle_connections(), 0);
        }

        let fwd = forwarder(port, 1, Duration::from_secs(5));
        let r = fwd.send(get("/")).await;
        assert!(matches!(r, Err(ForwardError::Connect(..))), "{:?}", r.err());
        assert_eq!(fwd.open_connections(), Some(0));
    })
    .await;
}

#[tokio::test]
async fn dial_abandoned_by_a_timeout_frees_the_slot() {
    bounded(async {
        // A listener that never accepts, its queue filled so that further connects hang in
        // the handshake (Linux drops the SYN); the pool's dial then outlives the timeout.
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = socket.listen(1).unwrap();
        let addr = listener.local_addr().unwrap();
        let mut fillers = Vec::new();
        for _ in 0..4 {
            match tokio::time::timeout(Duration::from_millis(100), TcpStream::connect(addr)).await {
                Ok(Ok(s)) => fillers.push(s),
                _ => break,
            }
        }

        let pool = pool_to(addr.port(), 1, 1, LONG);
        for _ in 0..2 {
            let r = tokio::time::timeout(Duration::from_millis(100), pool.send(get("/"))).await;
            assert!(
                r.is_err(),
                "nothing should answer: {:?}",
                r.map(|r| r.err())
            );
            assert_eq!(pool.open_connections(), 0);
        }
        drop(fillers);
        drop(listener);
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Idle limits.

#[tokio::test]
async fn idle_connection_past_idle_timeout_is_not_reused() {
    bounded(async {
        let backend = Backend::start(Options::default()).await;
        let pool = backend.pool(4, 4, Duration::from_millis(50));

        fetch(&pool, "/").await;
        // Within the timeout: reused.
        fetch(&pool, "/").await;
        assert_eq!(backend.stats.accepted(), 1);

        tokio::time::sleep(Duration::from_millis(150)).await;
        let (status, _) = fetch(&pool, "/").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(backend.stats.accepted(), 2);
        assert_eq!(
            pool.open_connections(),
            1,
            "the expired connection is closed"
        );
        let st = backend.stats.clone();
        wait_until("the backend sees the expired connection closed", || {
            st.open() == 1
        })
        .await;
    })
    .await;
}

#[tokio::test]
async fn idle_connections_beyond_max_idle_are_closed() {
    bounded(async {
        let backend = Backend::start(Options::default()).await;
        let pool = backend.pool(4, 1, LONG);

        let (a, b, c) = tokio::join!(
            pool.send(get("/delay/50")),
            pool.send(get("/delay/50")),
            pool.send(get("/delay/50")),
        );
        assert_eq!(backend.stats.accepted(), 3);
        assert_eq!(pool.open_connections(), 3);
        for r in [a, b, c] {
            let (status, _) = read_all(r.unwrap()).await;
            assert_eq!(status, StatusCode::OK);
        }
        assert_eq!(pool.idle_connections(), 1);
        assert_eq!(pool.open_connections(), 1);
        let st = backend.stats.clone();
        wait_until("the backend sees the surplus closed", || st.open() == 1).await;
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Through the Forwarder.

fn forwarder(port: u16, max: usize, timeout: Duration) -> Forwarder {
    Forwarder::new(
        &BackendAddr {
            scheme: BackendScheme::Http,
            host: "127.0.0.1".into(),
            port,
        },
        timeout,
        None,
        PoolLimits {
            max,
            max_idle: max,
            idle_timeout: LONG,
        },
    )
    .unwrap()
}

fn forwarder_get(fwd: &Forwarder, target: &str) -> Request<LimitedBody> {
    Request::builder()
        .uri(fwd.upstream_uri(target).unwrap())
        .header(http::header::HOST, "127.0.0.1")
        .body(LimitedBody::empty())
        .unwrap()
}

#[tokio::test]
async fn forwarder_sends_origin_form_request_targets() {
    bounded(async {
        let backend = Backend::start(Options::default()).await;
        let fwd = forwarder(backend.port, 4, Duration::from_secs(5));
        for target in ["/v1/shelves?x=1&y=%20", "/"] {
            let resp = fwd.send(forwarder_get(&fwd, target)).await.unwrap();
            let (status, _) = read_all(resp).await;
            assert_eq!(status, StatusCode::OK);
        }
        // As ESP's nginx and hyper-util's client send them: not absolute-form.
        assert_eq!(
            *backend.stats.targets.lock().unwrap(),
            vec!["/v1/shelves?x=1&y=%20".to_string(), "/".to_string()]
        );
        assert_eq!(backend.stats.accepted(), 1);
    })
    .await;
}

#[tokio::test]
async fn forwarder_deadline_spent_waiting_for_a_connection_leaks_no_slot() {
    bounded(async {
        let backend = Backend::start(Options::default()).await;
        let fwd = forwarder(backend.port, 1, Duration::from_secs(5));

        let slow = {
            let (fwd, req) = (fwd.clone(), forwarder_get(&fwd, "/delay/300"));
            tokio::spawn(async move { read_all(fwd.send(req).await.unwrap()).await })
        };
        let st = backend.stats.clone();
        wait_until("the slow request reaches the backend", || {
            st.inflight.load(Ordering::SeqCst) == 1
        })
        .await;

        let deadline = Duration::from_millis(50);
        let r = fwd
            .send_within(forwarder_get(&fwd, "/"), Some(deadline))
            .await;
        assert!(
            matches!(r, Err(ForwardError::Timeout(d)) if d == deadline),
            "{:?}",
            r.err()
        );
        assert_eq!(fwd.open_connections(), Some(1));

        let (status, _) = slow.await.unwrap();
        assert_eq!(status, StatusCode::OK);
        let (status, body) = read_all(fwd.send(forwarder_get(&fwd, "/")).await.unwrap()).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(&body[..], b"ok");
        assert_eq!(fwd.open_connections(), Some(1));
        assert_eq!(backend.stats.accepted(), 1);
        assert_eq!(backend.stats.requests.load(Ordering::SeqCst), 2);
    })
    .await;
}

/// ESPv2's `connect-failure` retries (`portico_proxy::retry`): a connection that could not be
/// made (here a TLS handshake the peer cuts) is tried `--backend_retry_num` more times, then
/// fails as retried; without retries it is tried once. Counted by the connections the peer
/// accepted; every failed attempt gave its pool slot back.
#[tokio::test]
async fn connect_failures_are_retried_as_configured() {
    bounded(async {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = accepted.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                drop(s);
            }
        });
        let tls_forwarder = |retries: u32| {
            let policy = portico_proxy::retry::RetryPolicy {
                retries,
                on: portico_proxy::retry::RetryOn::parse("connect-failure").unwrap(),
                status_codes: vec![],
                per_try_timeout: None,
            };
            Forwarder::new(
                &BackendAddr {
                    scheme: BackendScheme::Https,
                    host: "127.0.0.1".into(),
                    port,
                },
                LONG,
                None,
                PoolLimits {
                    max: 1,
                    ..Default::default()
                },
            )
            .unwrap()
            .with_retries(Some(portico_proxy::retry::Retries::new(policy)))
        };
        let tls_failure = |e: &ForwardError| {
            matches!(
                e,
                ForwardError::Connect(portico_proxy::error::NetworkFailure::Tls, _)
            )
        };
        let fwd = tls_forwarder(0);
        let r = fwd.send(forwarder_get(&fwd, "/")).await;
        assert!(r.as_ref().is_err_and(tls_failure), "{:?}", r.err());
        assert_eq!(accepted.swap(0, Ordering::SeqCst), 1);
        let fwd = tls_forwarder(3);
        let r = fwd.send(forwarder_get(&fwd, "/")).await;
        assert!(
            matches!(&r, Err(ForwardError::Retried(last)) if tls_failure(last)),
            "{:?}",
            r.err()
        );
        assert_eq!(accepted.load(Ordering::SeqCst), 4);
        assert_eq!(fwd.open_connections(), Some(0));
    })
    .await;
}

/// A backend that closes each connection after reading a request, without answering: the
/// request is sent again only under a condition that covers it (`reset`, not
/// `connect-failure`), and at most `--backend_retry_num` more times.
#[tokio::test]
async fn resets_are_retried_only_when_asked() {
    bounded(async {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let requests = Arc::new(AtomicUsize::new(0));
        let counter = requests.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let counter = counter.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let mut head = Vec::new();
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    counter.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        for (on, retries, want) in [
            ("connect-failure", 3, 1),
            ("reset", 2, 3),
            ("5xx", 1, 2),
            ("gateway-error", 0, 1),
        ] {
            requests.store(0, Ordering::SeqCst);
            let policy = portico_proxy::retry::RetryPolicy {
                retries,
                on: portico_proxy::retry::RetryOn::parse(on).unwrap(),
                status_codes: vec![],
                per_try_timeout: None,
            };
            let fwd = forwarder(port, 4, LONG)
                .with_retries(Some(portico_proxy::retry::Retries::new(policy)));
            let r = fwd.send(forwarder_get(&fwd, "/")).await;
            let e = r.err().expect("no answer");
            assert_eq!(
                matches!(e, ForwardError::Retried(_)),
                want > 1,
                "{on}: {e:?}"
            );
            assert_eq!(requests.load(Ordering::SeqCst), want, "{on}");
        }
    })
    .await;
}
