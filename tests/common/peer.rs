//! A raw HTTP/1.1 peer for end-to-end tests: one request per connection, answered as the test's
//! handler says, so a double can also misbehave (stall, hang up). Runs on a tokio runtime the
//! test owns, on a loopback port chosen at run time.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A request as the peer received it.
pub struct Request {
    pub method: String,
    /// The request target (path and query).
    pub path: String,
    /// Header names lower-cased, in order.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Request {
    /// The first value of a header (name lower-case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// How the peer answers.
pub enum Action {
    /// This status and JSON body.
    Respond(u16, String),
    /// Wait, then answer 200 (make it longer than any deadline the test sets).
    Stall(Duration),
    /// Close the connection without answering.
    HangUp,
}

pub type Handler = Arc<dyn Fn(&Request) -> Action + Send + Sync>;

async fn read_request(s: &mut TcpStream) -> Option<Request> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        if buf.len() > 1 << 20 {
            return None;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let mut first = lines.next()?.split(' ');
    let method = first.next()?.to_string();
    let path = first.next()?.to_string();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let length: usize = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    while buf.len() < head_end + length {
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = String::from_utf8_lossy(&buf[head_end..]).into_owned();
    Some(Request {
        method,
        path,
        headers,
        body,
    })
}

async fn serve(listener: TcpListener, handler: Handler) {
    loop {
        let Ok((mut s, _)) = listener.accept().await else {
            continue;
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            let Some(req) = read_request(&mut s).await else {
                return;
            };
            let (status, body) = match handler(&req) {
                Action::Respond(status, body) => (status, body),
                Action::Stall(d) => {
                    tokio::time::sleep(d).await;
                    (200, "{}".to_string())
                }
                Action::HangUp => return,
            };
            let resp = format!(
                "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
                 Connection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = s.write_all(resp.as_bytes()).await;
            let _ = s.shutdown().await;
        });
    }
}

/// Starts a peer on `rt`; it runs until the runtime is dropped.
pub fn start(rt: &tokio::runtime::Runtime, handler: Handler) -> SocketAddr {
    start_on(rt, "127.0.0.1:0", handler)
}

/// [`start`] on another address (`[::1]:0` for an IPv6-only peer).
pub fn start_on(rt: &tokio::runtime::Runtime, bind: &str, handler: Handler) -> SocketAddr {
    let listener = rt.block_on(TcpListener::bind(bind)).expect("bind peer");
    let addr = listener.local_addr().expect("peer addr");
    rt.spawn(serve(listener, handler));
    addr
}
