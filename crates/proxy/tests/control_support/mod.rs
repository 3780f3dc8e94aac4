//! TEST DOUBLE for the control plane's HTTP surface (Service Management + Service Control).
//!
//! A tiny hyper server on 127.0.0.1:0 that records every request and answers with whatever the
//! test's responder returns. It can be stopped (connections refused) and restarted on the same
//! port to simulate an outage. It is not the real control plane; it only stands in for the
//! network peer so the proxy's client behaviour can be observed.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use portico_credentials::{GeneratedKey, ServiceAccountKey};

#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    /// Path and query, as sent.
    pub uri: String,
    pub authorization: Option<String>,
    pub content_type: Option<String>,
    pub body: String,
}

impl Recorded {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

pub type Responder = Arc<dyn Fn(&Recorded) -> (u16, String) + Send + Sync>;

pub struct FakePeer {
    pub addr: SocketAddr,
    pub requests: Arc<Mutex<Vec<Recorded>>>,
    responder: Arc<Mutex<Responder>>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl FakePeer {
    pub async fn start(
        responder: impl Fn(&Recorded) -> (u16, String) + Send + Sync + 'static,
    ) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let peer = FakePeer {
            addr,
            requests: Arc::new(Mutex::new(Vec::new())),
            responder: Arc::new(Mutex::new(Arc::new(responder))),
            task: Mutex::new(None),
        };
        peer.serve(listener);
        peer
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set_responder(&self, r: impl Fn(&Recorded) -> (u16, String) + Send + Sync + 'static) {
        *self.responder.lock().expect("lock") = Arc::new(r);
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.requests.lock().expect("lock").clone()
    }

    pub fn requests_to(&self, suffix: &str) -> Vec<Recorded> {
        self.requests()
            .into_iter()
            .filter(|r| r.uri.split('?').next().unwrap_or("").ends_with(suffix))
            .collect()
    }

    pub fn clear(&self) {
        self.requests.lock().expect("lock").clear();
    }

    /// Stops accepting and drops open connections: callers now get "connection refused".
    pub fn stop(&self) {
        if let Some(t) = self.task.lock().expect("lock").take() {
            t.abort();
        }
    }

    /// Listens again on the same port.
    pub async fn restart(&self) {
        self.stop();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        let listener = loop {
            match tokio::net::TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(e) if tokio::time::Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("rebind {}: {e}", self.addr),
            }
        };
        self.serve(listener);
    }

    fn serve(&self, listener: tokio::net::TcpListener) {
        let requests = self.requests.clone();
        let responder = self.responder.clone();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let requests = requests.clone();
                let responder = responder.clone();
                conns.spawn(async move {
                    let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let requests = requests.clone();
                        let responder = responder.clone();
                        async move {
                            let method = req.method().to_string();
                            let uri = req
                                .uri()
                                .path_and_query()
                                .map(|p| p.to_string())
                                .unwrap_or_default();
                            let header = |n: &str| {
                                req.headers()
                                    .get(n)
                                    .and_then(|v| v.to_str().ok())
                                    .map(str::to_string)
                            };
                            let authorization = header("authorization");
                            let content_type = header("content-type");
                            let body = req.into_body().collect().await?.to_bytes();
                            let rec = Recorded {
                                method,
                                uri,
                                authorization,
                                content_type,
                                body: String::from_utf8_lossy(&body).into_owned(),
                            };
                            let r = responder.lock().expect("lock").clone();
                            // On the blocking pool: a responder that sleeps to play a slow
                            // peer must not stall the test's runtime (and its timers) too.
                            let (rec, (status, body)) = tokio::task::spawn_blocking(move || {
                                let answer = r(&rec);
                                (rec, answer)
                            })
                            .await
                            .expect("responder");
                            requests.lock().expect("lock").push(rec);
                            let resp = hyper::Response::builder()
                                .status(status)
                                .header("content-type", "application/json")
                                .body(Full::new(Bytes::from(body)))
                                .expect("response");
                            Ok::<_, hyper::Error>(resp)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        *self.task.lock().expect("lock") = Some(task);
    }
}

impl Drop for FakePeer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One RSA key per test binary (generation is the slow part).
pub fn test_key() -> &'static GeneratedKey {
    static KEY: std::sync::OnceLock<GeneratedKey> = std::sync::OnceLock::new();
    KEY.get_or_init(|| portico_credentials::generate_rsa_key().expect("keygen"))
}

/// A Google-format key file whose `token_uri` points at `base`.
pub fn service_account(base: &str) -> Arc<ServiceAccountKey> {
    let g = test_key();
    let json = serde_json::json!({
        "type": "service_account",
        "project_id": "demo-proj",
        "private_key_id": g.key_id,
        "private_key": g.private_pkcs8_pem,
        "client_email": "esp@demo-proj.iam.gserviceaccount.com",
        "client_id": "1",
        "auth_uri": format!("{base}/o/oauth2/auth"),
        "token_uri": format!("{base}/token"),
    });
    Arc::new(ServiceAccountKey::from_json_str(&json.to_string(), "test").expect("key"))
}

/// Verifies a recorded `Authorization: Bearer` token with the test key's public half.
pub fn verify_bearer(rec: &Recorded) -> serde_json::Value {
    let auth = rec
        .authorization
        .as_deref()
        .expect("Authorization header present");
    let token = auth.strip_prefix("Bearer ").expect("Bearer scheme");
    portico_credentials::verify_rs256(token, &test_key().public_spki_pem).expect("token verifies")
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes.
pub async fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
