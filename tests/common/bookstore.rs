//! `portico bookstore` for the gRPC end-to-end tests, and raw gRPC calls to it (or through a
//! proxy) with curl over h2c.

use super::{free_port, Proc};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The service of [`pass_through_config`].
pub const PASS_THROUGH_SERVICE: &str = "bookstore.endpoints.e2e-proj.cloud.goog";
/// The gRPC path of `GetShelf`.
pub const GET_SHELF: &str = "/endpoints.examples.bookstore.Bookstore/GetShelf";

/// A service config for `--service_json_path` with the Bookstore's `GetShelf` alone (no
/// descriptor set: gRPC pass-through only), callable without an API key.
pub fn pass_through_config(dir: &Path) -> PathBuf {
    let path = dir.join("service.json");
    std::fs::write(
        &path,
        json!({
            "name": PASS_THROUGH_SERVICE, "id": "2026-12-06r0",
            "apis": [{"name": "endpoints.examples.bookstore.Bookstore", "version": "v1",
                      "methods": [{"name": "GetShelf"}]}],
            "usage": {"rules": [{
                "selector": "endpoints.examples.bookstore.Bookstore.GetShelf",
                "allowUnregisteredCalls": true
            }]},
        })
        .to_string(),
    )
    .expect("config");
    path
}

/// `portico bookstore --port=PORT EXTRA...`, logging to `DIR/NAME.log`, once it listens.
pub fn start(dir: &Path, name: &str, extra: &[&str]) -> (Proc, u16) {
    let port = free_port();
    let mut args = vec!["bookstore".to_string(), format!("--port={port}")];
    args.extend(extra.iter().map(|s| s.to_string()));
    let mut p = Proc::spawn(&args, &dir.join(format!("{name}.log")));
    p.wait_for_port(port, name);
    (p, port)
}

/// One framed gRPC message (uncompressed).
pub fn frame(message: &[u8]) -> Vec<u8> {
    let mut v = vec![0];
    v.extend_from_slice(&(message.len() as u32).to_be_bytes());
    v.extend_from_slice(message);
    v
}

/// What curl saw of a gRPC call: HTTP status, every header and trailer line (lower-cased
/// names, in order), and the body bytes.
pub struct GrpcReply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl GrpcReply {
    /// The last value of a header or trailer (curl lists trailers after the headers).
    pub fn last(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A unary gRPC call with curl: `POST http://127.0.0.1:PORT/PATH`, the framed `message`,
/// `headers` (`name: value`), over h2c unless `http1` (then HTTP/1.1, chunked).
pub fn call(port: u16, path: &str, message: &[u8], headers: &[&str], http1: bool) -> GrpcReply {
    let dir = tempfile::tempdir().expect("tempdir");
    let head = dir.path().join("head");
    let out = dir.path().join("body");
    let req = dir.path().join("req");
    std::fs::write(&req, frame(message)).expect("request body");
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--max-time", "20", "-X", "POST"])
        .arg("-D")
        .arg(&head)
        .arg("-o")
        .arg(&out)
        .args(["-w", "%{http_code}"])
        .args(["-H", "content-type: application/grpc", "-H", "te: trailers"])
        .arg("--data-binary")
        .arg(format!("@{}", req.display()));
    if http1 {
        cmd.args(["--http1.1", "-H", "transfer-encoding: chunked"]);
    } else {
        cmd.arg("--http2-prior-knowledge");
    }
    for h in headers {
        cmd.args(["-H", h]);
    }
    cmd.arg(format!("http://127.0.0.1:{port}{path}"));
    let o = cmd.output().expect("curl runs");
    GrpcReply {
        status: String::from_utf8_lossy(&o.stdout)
            .trim()
            .parse()
            .unwrap_or(0),
        headers: std::fs::read_to_string(&head)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect(),
        body: std::fs::read(&out).unwrap_or_default(),
    }
}

/// `GetShelfRequest{shelf}` on the wire (field 1, varint).
pub fn get_shelf_request(shelf: u64) -> Vec<u8> {
    let mut v = vec![0x08];
    let mut n = shelf;
    loop {
        let b = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            v.push(b);
            return v;
        }
        v.push(b | 0x80);
    }
}
