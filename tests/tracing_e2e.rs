//! End to end: the spans `portico esp` and `portico espv2` record for a traced request, the
//! context headers they read and send to the backend, and the export (issue 19;
//! docs/tracing.md).
//!
//! The proxy is the real binary; Service Control, the JWKS server, the backend and the Cloud
//! Trace API are doubles on loopback ports chosen at run time (tests/common/peer.rs): the trace
//! double records what `--cloud_trace_url_override` sends it, so the whole span tree can be
//! checked. The OTLP test decodes the export with the OpenTelemetry project's own Python
//! protobuf classes (PyPI `opentelemetry-proto`). The real control plane's Cloud Trace API,
//! and the `roles/cloudtrace.agent` binding, are in tests/tracing_cloudtrace.rs.

mod common;

use base64::Engine as _;
use common::peer::{self, Action, Request};
use common::{free_port, Proc};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const SERVICE: &str = "tracing.endpoints.e2e-proj.cloud.goog";
const ISSUER: &str = "https://issuer.example";
const AUDIENCE: &str = "e2e-audience";
const KID: &str = "e2e-kid";

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64
}

/// What the doubles saw.
#[derive(Default)]
struct Seen {
    checks: usize,
    /// The context headers (`traceparent`, `x-cloud-trace-context`) of each `:check`.
    check_context: Vec<(Option<String>, Option<String>)>,
    /// The backend's requests: path and headers.
    backend: Vec<(String, Vec<(String, String)>)>,
    /// The trace double's requests: method, path, authorization, body.
    exports: Vec<(String, String, Option<String>, Value)>,
    /// Service Control `:report` bodies.
    reports: Vec<Value>,
}

struct World {
    rt: tokio::runtime::Runtime,
    seen: Arc<Mutex<Seen>>,
    sc: std::net::SocketAddr,
    backend: std::net::SocketAddr,
    sink: std::net::SocketAddr,
    config: PathBuf,
    key: PathBuf,
    token: String,
}

fn world(dir: &Path) -> World {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let seen = Arc::new(Mutex::new(Seen::default()));
    let s = seen.clone();
    // The first `:check` for key `flaky` is hung up on, so the proxy retries it.
    let flaky = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sc = peer::start(
        &rt,
        Arc::new(move |req: &Request| {
            if req.path.ends_with(":check") {
                let mut seen = s.lock().unwrap();
                seen.checks += 1;
                seen.check_context.push((
                    req.header("traceparent").map(str::to_string),
                    req.header("x-cloud-trace-context").map(str::to_string),
                ));
                drop(seen);
                if req.body.contains("api_key:flaky")
                    && flaky.swap(false, std::sync::atomic::Ordering::SeqCst)
                {
                    return Action::HangUp;
                }
                return Action::Respond(
                    200,
                    json!({"operationId": "c",
                           "checkInfo": {"consumerInfo": {"projectNumber": "123456"}}})
                    .to_string(),
                );
            }
            if req.path.ends_with(":report") {
                let body = serde_json::from_str(&req.body).unwrap_or(Value::Null);
                s.lock().unwrap().reports.push(body);
            }
            Action::Respond(200, json!({"operationId": "x"}).to_string())
        }),
    );
    let s = seen.clone();
    let backend = peer::start(
        &rt,
        Arc::new(move |req: &Request| {
            s.lock()
                .unwrap()
                .backend
                .push((req.path.clone(), req.headers.clone()));
            Action::Respond(200, r#"{"ok":true}"#.into())
        }),
    );
    let s = seen.clone();
    let sink = peer::start(
        &rt,
        Arc::new(move |req: &Request| {
            let body = serde_json::from_str(&req.body).unwrap_or(Value::Null);
            s.lock().unwrap().exports.push((
                req.method.clone(),
                req.path.clone(),
                req.header("authorization").map(str::to_string),
                body,
            ));
            Action::Respond(200, "{}".into())
        }),
    );
    // The JWT provider's key set.
    let g = portico_credentials::generate_rsa_key().expect("keygen");
    let mut jwk = serde_json::to_value(&g.public_jwk).expect("jwk");
    jwk["kid"] = KID.into();
    let doc = json!({"keys": [jwk]}).to_string();
    let jwks = peer::start(
        &rt,
        Arc::new(move |_: &Request| Action::Respond(200, doc.clone())),
    );
    let signing = jsonwebtoken::EncodingKey::from_rsa_pem(g.private_pkcs8_pem.as_bytes())
        .expect("encoding key");
    let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
    h.kid = Some(KID.to_string());
    let token = jsonwebtoken::encode(
        &h,
        &json!({"iss": ISSUER, "aud": AUDIENCE, "sub": "u", "exp": now() + 3600}),
        &signing,
    )
    .expect("sign");

    // One method with everything ESP traces: a JWT, an API key (:check), a quota cost.
    let config = dir.join("service.json");
    let cfg = json!({
        "name": SERVICE,
        "id": "2026-12-06r0",
        "producerProjectId": "e2e-proj",
        "apis": [{"name": "e2e.Api", "version": "v1"}],
        "http": {"rules": [
            {"selector": "e2e.Api.Jwt", "get": "/jwt"},
            {"selector": "e2e.Api.Open", "get": "/open"},
        ]},
        "usage": {"rules": [{"selector": "e2e.Api.Open", "allowUnregisteredCalls": true}]},
        "authentication": {
            "providers": [{"id": "p1", "issuer": ISSUER,
                           "jwksUri": format!("http://{jwks}/jwks"), "audiences": AUDIENCE}],
            "rules": [{"selector": "e2e.Api.Jwt", "requirements": [{"providerId": "p1"}]}],
        },
        "quota": {"metricRules": [{"selector": "e2e.Api.Jwt", "metricCosts": {"reads": "1"}}]},
        // The request log, so reports carry their log entries (ESPv2's `trace` is in them).
        "logs": [{"name": "endpoints_log"}],
        "logging": {"producerDestinations": [
            {"monitoredResource": "api", "logs": ["endpoints_log"]}]},
    });
    std::fs::write(&config, cfg.to_string()).expect("config");
    let key = common::espv2::service_account_key(dir);
    World {
        rt,
        seen,
        sc,
        backend,
        sink,
        config,
        key,
        token,
    }
}

fn get(port: u16, path: &str, headers: &[(&str, &str)]) -> u16 {
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .expect("client");
    let mut r = client.get(format!("http://127.0.0.1:{port}{path}"));
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    r.send()
        .unwrap_or_else(|e| panic!("GET {path}: {e}"))
        .status()
        .as_u16()
}

/// The backend's headers for the request to `path` (with its query; the last one).
fn backend_headers(seen: &Mutex<Seen>, path: &str) -> Vec<(String, String)> {
    let s = seen.lock().unwrap();
    s.backend
        .iter()
        .rev()
        .find(|(p, _)| p == path)
        .map(|(_, h)| h.clone())
        .unwrap_or_else(|| panic!("the backend never got {path}"))
}

fn header<'a>(h: &'a [(String, String)], name: &str) -> Option<&'a str> {
    h.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

/// The v1 spans exported for `trace` (32 hex), waiting for the export (flushed every second).
fn v1_spans(seen: &Mutex<Seen>, trace: &str, log: &dyn Fn() -> String) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        {
            let s = seen.lock().unwrap();
            for (method, path, auth, body) in &s.exports {
                for t in body["traces"].as_array().into_iter().flatten() {
                    if t["traceId"] == trace {
                        assert_eq!(method, "PATCH");
                        assert_eq!(path, "/v1/projects/e2e-proj/traces");
                        assert!(
                            auth.as_deref().is_some_and(|a| a.starts_with("Bearer ")),
                            "ESP authenticates its trace export: {auth:?}"
                        );
                        assert_eq!(t["projectId"], "e2e-proj");
                        return t["spans"].as_array().cloned().unwrap_or_default();
                    }
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "trace {trace} not exported; exports: {:#?}\nproxy log:\n{}",
            seen.lock().unwrap().exports,
            log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The v1 `spanId` of the span named `name`.
fn span_id(spans: &[Value], name: &str) -> String {
    spans
        .iter()
        .find(|s| s["name"] == name)
        .and_then(|s| s["spanId"].as_str())
        .unwrap_or_else(|| panic!("no {name} span: {spans:#?}"))
        .to_string()
}

/// `name (parent name)` for each span, in export order.
fn tree(spans: &[Value], id: &str, parent: &str) -> Vec<String> {
    let name_of = |sid: &Value| {
        spans
            .iter()
            .find(|s| &s[id] == sid)
            .map(|s| s["name"].as_str().unwrap_or("?").to_string())
            .unwrap_or_else(|| format!("remote {sid}"))
    };
    spans
        .iter()
        .map(|s| {
            let n = s["name"].as_str().unwrap_or("?");
            match s.get(parent) {
                Some(p) if !p.is_null() => format!("{n} ({})", name_of(p)),
                _ => n.to_string(),
            }
        })
        .collect()
}

#[test]
fn esp_spans_sampling_and_context_headers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let w = world(dir.path());
    let credentials = [
        "--non_gcp".to_string(),
        format!("--service_account_key={}", w.key.display()),
    ];
    let (proxy, port) = start_esp(&w, &w.config, dir.path(), "esp", &credentials);
    let log = || proxy.log();
    let bearer = format!("Bearer {}", w.token);
    let t1 = "0123456789abcdef0123456789abcdef";
    // Upper-case hex: ESP forwards and exports it as sent.
    let t2 = "FEDCBA9876543210FEDCBA9876543210";

    // 1. Forced, joined to the client's span 123; the key is checked remotely (cache miss).
    let xctc = format!("{t1}/123;o=1");
    let h = [
        ("authorization", bearer.as_str()),
        ("x-cloud-trace-context", xctc.as_str()),
    ];
    assert_eq!(get(port, "/jwt?key=k1", &h), 200, "{}", log());
    // 2. Forced without a client span (ESP accepts `T;o=1`): the check is a cache hit.
    let xctc2 = format!("{t2}/0;o=1;extra");
    let h = [
        ("authorization", bearer.as_str()),
        ("x-cloud-trace-context", xctc2.as_str()),
    ];
    assert_eq!(get(port, "/jwt?key=k1&n=2", &h), 200, "{}", log());

    let spans = v1_spans(&w.seen, t1, &log);
    let root_name = format!("{SERVICE}/e2e.Api.Jwt");
    assert_eq!(
        tree(&spans, "spanId", "parentSpanId"),
        vec![
            format!("{root_name} (remote \"123\")"),
            format!("CheckAuth ({root_name})"),
            "HttpFetch (CheckAuth)".to_string(),
            format!("CheckServiceControl ({root_name})"),
            "CheckServiceControlCache (CheckServiceControl)".to_string(),
            "Call ServiceControl server (CheckServiceControlCache)".to_string(),
            format!("QuotaControl ({root_name})"),
            "QuotaServiceControlCache (QuotaControl)".to_string(),
            format!("Backend ({root_name})"),
        ],
        "{spans:#?}"
    );
    for s in &spans {
        assert_eq!(s["kind"], "RPC_SERVER");
        assert_eq!(
            s["labels"]["trace.cloud.google.com/agent"],
            format!("esp/portico-{}", env!("CARGO_PKG_VERSION"))
        );
        assert!(s["startTime"].as_str().is_some_and(|t| t.ends_with('Z')));
    }
    // The backend got the Backend span as the parent, the client's options kept.
    let backend_span = span_id(&spans, "Backend");
    let hb = backend_headers(&w.seen, "/jwt?key=k1");
    assert_eq!(
        header(&hb, "x-cloud-trace-context"),
        Some(format!("{t1}/{backend_span};o=1").as_str())
    );

    // The second: a cache hit (no remote call), the keys cached (no fetch), no parent, the
    // options text sent back as is.
    let spans = v1_spans(&w.seen, t2, &log);
    let names: Vec<&str> = spans.iter().filter_map(|s| s["name"].as_str()).collect();
    assert!(!names.contains(&"Call ServiceControl server"), "{names:?}");
    assert!(!names.contains(&"HttpFetch"), "{names:?}");
    assert!(names.contains(&"CheckAuth"), "{names:?}");
    assert!(names.contains(&"CheckServiceControlCache"), "{names:?}");
    assert!(spans[0].get("parentSpanId").is_none(), "{:#?}", spans[0]);
    let hb = backend_headers(&w.seen, "/jwt?key=k1&n=2");
    let sent = header(&hb, "x-cloud-trace-context").expect("context sent");
    assert!(
        sent.starts_with(&format!("{t2}/")) && sent.ends_with(";o=1;extra"),
        "{sent}"
    );
    assert_eq!(
        w.seen.lock().unwrap().checks,
        1,
        "the second check was a cache hit"
    );

    // Not traced: o=0 (and no header at all, auto-sampling being off). The client's header
    // reaches the backend untouched.
    let t3 = "11111111111111111111111111111111";
    let off = format!("{t3}/5;o=0");
    assert_eq!(
        get(
            port,
            "/open?n=3",
            &[("x-cloud-trace-context", off.as_str())]
        ),
        200
    );
    assert_eq!(get(port, "/open?n=4", &[]), 200);
    assert_eq!(
        header(
            &backend_headers(&w.seen, "/open?n=3"),
            "x-cloud-trace-context"
        ),
        Some(off.as_str())
    );
    assert_eq!(
        header(
            &backend_headers(&w.seen, "/open?n=4"),
            "x-cloud-trace-context"
        ),
        None
    );

    // grpc-trace-bin wins over X-Cloud-Trace-Context, and is what the backend gets back
    // (padded base64, ESP's way); X-Cloud-Trace-Context passes untouched.
    let t4 = [0x44u8; 16];
    let mut bin = vec![0u8, 0];
    bin.extend_from_slice(&t4);
    bin.push(1);
    bin.extend_from_slice(&77u64.to_be_bytes());
    bin.extend_from_slice(&[2, 1]);
    let bin = base64::engine::general_purpose::STANDARD.encode(&bin);
    let h = [
        ("grpc-trace-bin", bin.as_str()),
        ("x-cloud-trace-context", off.as_str()),
    ];
    assert_eq!(get(port, "/open?n=5", &h), 200);
    let spans = v1_spans(&w.seen, &"44".repeat(16), &log);
    assert_eq!(spans[0]["name"], format!("{SERVICE}/e2e.Api.Open"));
    assert_eq!(spans[0]["parentSpanId"], "77");
    let hb = backend_headers(&w.seen, "/open?n=5");
    assert_eq!(header(&hb, "x-cloud-trace-context"), Some(off.as_str()));
    let out = header(&hb, "grpc-trace-bin").expect("grpc-trace-bin sent");
    let raw = base64::engine::general_purpose::STANDARD
        .decode(out)
        .expect("padded base64");
    let backend_span = span_id(&spans, "Backend")
        .parse::<u64>()
        .expect("a decimal span id");
    assert_eq!(&raw[2..18], &t4);
    assert_eq!(
        u64::from_be_bytes(raw[19..27].try_into().unwrap()),
        backend_span
    );
    assert_eq!(raw[28], 1);

    // An unknown path is traced too (ESP exports it without a Backend span).
    let t5 = "55555555555555555555555555555555";
    let x5 = format!("{t5}/9;o=1");
    assert_eq!(
        get(port, "/nowhere", &[("x-cloud-trace-context", x5.as_str())]),
        404
    );
    let spans = v1_spans(&w.seen, t5, &log);
    let names: Vec<&str> = spans.iter().filter_map(|s| s["name"].as_str()).collect();
    assert_eq!(
        names,
        vec![format!("{SERVICE}/<Unknown Operation Name>").as_str()]
    );

    // ESP keeps the client's trace ID text as sent: upper-case hex comes back to the backend
    // and goes to Cloud Trace in the same case (the first `o=` decides: this one traces).
    let t6 = "ABCDEF0123456789ABCDEF0123456789";
    let x6 = format!("{t6}/12;o=1;o=0");
    assert_eq!(
        get(port, "/open?n=6", &[("x-cloud-trace-context", x6.as_str())]),
        200
    );
    let spans = v1_spans(&w.seen, t6, &log);
    assert_eq!(spans[0]["parentSpanId"], "12");
    let backend_span = span_id(&spans, "Backend");
    assert_eq!(
        header(
            &backend_headers(&w.seen, "/open?n=6"),
            "x-cloud-trace-context"
        ),
        Some(format!("{t6}/{backend_span};o=1;o=0").as_str())
    );

    // Exactly the five forced traces were exported.
    let exported: usize = w
        .seen
        .lock()
        .unwrap()
        .exports
        .iter()
        .map(|(_, _, _, b)| b["traces"].as_array().map_or(0, Vec::len))
        .sum();
    assert_eq!(exported, 5, "{}", log());
    drop(proxy);
    drop(w.rt);
}

#[test]
fn espv2_spans_sampling_and_context_headers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let w = world(dir.path());
    let (proxy, port) = start_espv2(
        &w,
        dir.path(),
        "espv2",
        &[
            format!("--cloud_trace_url_override=http://{}", w.sink),
            "--tracing_project_id=trace-proj".to_string(),
            "--tracing_sample_rate=0".to_string(),
        ],
    );
    let log = || proxy.log();
    let bearer = format!("Bearer {}", w.token);
    let t1 = "0af7651916cd43dd8448eb211c80319c";
    let tp = format!("00-{t1}-b7ad6b7169203331-01");
    let h = [
        ("authorization", bearer.as_str()),
        ("traceparent", tp.as_str()),
    ];
    assert_eq!(get(port, "/jwt?key=k1", &h), 200, "{}", log());

    let deadline = Instant::now() + Duration::from_secs(15);
    let spans = loop {
        let found: Vec<Value> = w
            .seen
            .lock()
            .unwrap()
            .exports
            .iter()
            .filter(|(m, p, a, _)| {
                m == "POST"
                    && p == "/v2/projects/trace-proj/traces:batchWrite"
                    && a.as_deref().is_some_and(|a| a.starts_with("Bearer "))
            })
            .flat_map(|(_, _, _, b)| b["spans"].as_array().cloned().unwrap_or_default())
            .filter(|s| {
                s["name"]
                    .as_str()
                    .is_some_and(|n| n.starts_with(&format!("projects/trace-proj/traces/{t1}/")))
            })
            .collect();
        if !found.is_empty() {
            break found;
        }
        assert!(Instant::now() < deadline, "nothing exported\n{}", log());
        std::thread::sleep(Duration::from_millis(100));
    };
    let display: Vec<Value> = spans
        .iter()
        .map(|s| {
            let mut s = s.clone();
            s["name"] = s["displayName"]["value"].clone();
            s
        })
        .collect();
    let t = tree(&display, "spanId", "parentSpanId");
    assert_eq!(t.len(), 4, "{t:?}");
    assert_eq!(t[0], "JWT Remote PubKey Fetch (ingress Jwt)");
    assert_eq!(t[1], "Service Control remote call: Check (ingress Jwt)");
    assert!(
        t[2].starts_with("router backend-cluster-")
            && t[2].ends_with(&format!("{} egress (ingress Jwt)", w.backend.port())),
        "{t:?}"
    );
    // Children first, then the ingress span, joined to the client's span.
    assert_eq!(t[3], "ingress Jwt (remote \"b7ad6b7169203331\")");
    let root = &spans[3];
    let attr = |k: &str| root["attributes"]["attributeMap"][k]["stringValue"]["value"].clone();
    assert_eq!(attr("http.status_code"), "200");
    assert_eq!(attr("http.method"), "GET");
    assert_eq!(
        attr("http.url"),
        "/jwt",
        "the query (and its key) is not recorded"
    );
    // The backend got both default outgoing headers with the egress span as parent.
    let egress = spans[2]["spanId"].as_str().expect("egress id").to_string();
    let hb = backend_headers(&w.seen, "/jwt?key=k1");
    assert_eq!(
        header(&hb, "traceparent"),
        Some(format!("00-{t1}-{egress}-01").as_str())
    );
    let dec = u64::from_str_radix(&egress, 16).expect("hex id");
    assert_eq!(
        header(&hb, "x-cloud-trace-context"),
        Some(format!("{t1}/{dec};o=1").as_str())
    );

    // The traced request's `:check` carried the context, the Check span as the parent.
    let check_span = spans[1]["spanId"].as_str().expect("check id").to_string();
    let check_dec = u64::from_str_radix(&check_span, 16).expect("hex id");
    assert_eq!(
        w.seen.lock().unwrap().check_context[0],
        (
            Some(format!("00-{t1}-{check_span}-01")),
            Some(format!("{t1}/{check_dec};o=1"))
        )
    );

    // ESPv2's parser refuses `T;o=1` (no span): no parent, so no trace at rate 0. Untraced,
    // the request still has a trace (a new one) that the backend's headers carry, flag off,
    // replacing the client's.
    let x = format!("{t1};o=1");
    assert_eq!(
        get(port, "/open?n=2", &[("x-cloud-trace-context", x.as_str())]),
        200
    );
    let hb = backend_headers(&w.seen, "/open?n=2");
    let (new_trace, _) = unsampled_pair(&hb);
    assert_ne!(new_trace, t1, "an invalid context is not joined");

    // An unsampled parent is joined (its trace ID kept, upper-case hex read and written in
    // lower case as opencensus does), not traced; the `:check` of a new key (a cache miss)
    // carries the context too, with its own span.
    let t2 = "ABCDEF0123456789ABCDEF0123456789";
    let x2 = format!("{t2}/5;o=0");
    let h = [
        ("x-cloud-trace-context", x2.as_str()),
        ("traceparent", "00-bad"),
    ];
    // traceparent comes first in the default list, so the invalid one decides: no parent.
    assert_eq!(get(port, "/open?n=3", &h), 200);
    let (t3, _) = unsampled_pair(&backend_headers(&w.seen, "/open?n=3"));
    assert_ne!(t3, t2.to_ascii_lowercase());
    let h = [
        ("authorization", bearer.as_str()),
        ("x-cloud-trace-context", x2.as_str()),
    ];
    assert_eq!(get(port, "/jwt?key=k2", &h), 200, "{}", log());
    let lower = t2.to_ascii_lowercase();
    let (t4, backend_span) = unsampled_pair(&backend_headers(&w.seen, "/jwt?key=k2"));
    assert_eq!(t4, lower);
    assert_ne!(backend_span, 5);
    let (tp, xc) = w.seen.lock().unwrap().check_context[1].clone();
    let tp = tp.expect("traceparent on the untraced request's :check");
    assert!(
        tp.starts_with(&format!("00-{lower}-")) && tp.ends_with("-00"),
        "{tp}"
    );
    let check_span = u64::from_str_radix(&tp[36..52], 16).expect("span");
    assert_ne!(check_span, backend_span, "the call has its own span");
    assert_eq!(xc, Some(format!("{lower}/{check_span};o=0")));

    // A retried `:check`: a span per attempt (`... - Retry 1`), each the parent of the context
    // its attempt carried.
    let t5 = "5555aaaa5555aaaa5555aaaa5555aaaa";
    let tp5 = format!("00-{t5}-00f067aa0ba902b7-01");
    let h = [
        ("authorization", bearer.as_str()),
        ("traceparent", tp5.as_str()),
    ];
    assert_eq!(get(port, "/jwt?key=flaky", &h), 200, "{}", log());
    let spans5 = v2_spans(&w.seen, t5, 4, &log);
    let checks: Vec<(String, String)> = spans5
        .iter()
        .filter_map(|s| {
            let name = s["displayName"]["value"].as_str()?;
            name.starts_with("Service Control remote call: Check")
                .then(|| {
                    (
                        name.to_string(),
                        s["spanId"].as_str().unwrap_or("").to_string(),
                    )
                })
        })
        .collect();
    let names: Vec<&str> = checks.iter().map(|c| c.0.as_str()).collect();
    assert_eq!(
        names,
        [
            "Service Control remote call: Check",
            "Service Control remote call: Check - Retry 1"
        ],
        "{spans5:#?}"
    );
    let sent: Vec<Option<String>> = w
        .seen
        .lock()
        .unwrap()
        .check_context
        .iter()
        .filter(|(tp, _)| tp.as_deref().is_some_and(|t| t.contains(t5)))
        .map(|(tp, _)| tp.clone())
        .collect();
    assert_eq!(
        sent,
        checks
            .iter()
            .map(|(_, id)| Some(format!("00-{t5}-{id}-01")))
            .collect::<Vec<_>>()
    );

    // ESPv2's report names the trace of every request, traced or not.
    let entry = |url: &str| report_entry(&w.seen, url, &log);
    let name = |t: &str| format!("projects/trace-proj/traces/{t}");
    assert_eq!(entry("/jwt")["trace"], name(t1), "{}", log());
    assert_eq!(entry("/open?n=2")["trace"], name(&new_trace), "{}", log());
    assert_eq!(entry("/open?n=3")["trace"], name(&t3), "{}", log());
    // The key is redacted in the URL: the second /jwt entry is k2's.
    let k2 = report_entry_where(
        &w.seen,
        "k2",
        &|e| e["structPayload"]["api_key"] == "k2",
        &log,
    );
    assert_eq!(k2["trace"], name(&lower), "{}", log());
    // Nothing of the untraced requests was exported.
    std::thread::sleep(Duration::from_millis(1500));
    let exported: Vec<String> = w
        .seen
        .lock()
        .unwrap()
        .exports
        .iter()
        .flat_map(|(_, _, _, b)| b["spans"].as_array().cloned().unwrap_or_default())
        .filter_map(|s| s["name"].as_str().map(str::to_string))
        .filter(|n| !n.contains(t1) && !n.contains(t5))
        .collect();
    assert!(exported.is_empty(), "{exported:?}");
    drop(proxy);

    // `--disable_tracing`: no context written, no trace in reports.
    let (proxy, port) = start_espv2(
        &w,
        dir.path(),
        "espv2-off",
        &[
            format!("--cloud_trace_url_override=http://{}", w.sink),
            "--tracing_project_id=trace-proj".to_string(),
            "--disable_tracing".to_string(),
        ],
    );
    assert_eq!(
        get(
            port,
            "/open?n=off",
            &[("x-cloud-trace-context", x2.as_str())]
        ),
        200
    );
    let hb = backend_headers(&w.seen, "/open?n=off");
    assert_eq!(header(&hb, "x-cloud-trace-context"), Some(x2.as_str()));
    assert_eq!(header(&hb, "traceparent"), None);
    let e = report_entry(&w.seen, "/open?n=off", &|| proxy.log());
    assert!(e.get("trace").is_none(), "{e:#}");
    drop(proxy);
    drop(w.rt);
}

/// `portico esp` on the world's doubles, exporting to the trace double, auto-sampling off (only
/// header-forced traces, so the test decides which requests are traced); `credentials` say
/// how it authenticates.
fn start_esp(
    w: &World,
    config: &Path,
    dir: &Path,
    name: &str,
    credentials: &[String],
) -> (Proc, u16) {
    let port = free_port();
    let mut args = vec![
        "esp".to_string(),
        format!("--http_port={port}"),
        format!("--status_port={}", free_port()),
        format!("--service_json_path={}", config.display()),
        format!("--backend=http://{}", w.backend),
        format!("--service_control_url_override=http://{}", w.sc),
        format!("--cloud_trace_url_override=http://{}", w.sink),
        "--disable_cloud_trace_auto_sampling".to_string(),
    ];
    args.extend_from_slice(credentials);
    let mut proxy = Proc::spawn(&args, &dir.join(format!("{name}.log")));
    proxy.wait_for_port(port, "portico esp");
    (proxy, port)
}

/// `portico espv2` on the world's doubles (config, backend, key file, Service Control), with
/// `extra` flags.
fn start_espv2(w: &World, dir: &Path, name: &str, extra: &[String]) -> (Proc, u16) {
    let mut args = vec![
        format!("--service_json_path={}", w.config.display()),
        format!("--backend=http://{}", w.backend),
        "--non_gcp".to_string(),
        format!("--service_account_key={}", w.key.display()),
        format!("--service_control_url=http://{}", w.sc),
    ];
    args.extend_from_slice(extra);
    common::espv2::start(dir, name, &args)
}

/// The v2 spans exported for trace `t` once there are at least `n`, waiting up to 15 s.
fn v2_spans(seen: &Mutex<Seen>, t: &str, n: usize, log: &dyn Fn() -> String) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let found: Vec<Value> = seen
            .lock()
            .unwrap()
            .exports
            .iter()
            .flat_map(|(_, _, _, b)| b["spans"].as_array().cloned().unwrap_or_default())
            .filter(|s| {
                s["name"]
                    .as_str()
                    .is_some_and(|n| n.starts_with(&format!("projects/trace-proj/traces/{t}/")))
            })
            .collect();
        if found.len() >= n {
            return found;
        }
        assert!(
            Instant::now() < deadline,
            "trace {t} not exported\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The trace ID and span of an untraced request's outgoing headers: `traceparent` and
/// `X-Cloud-Trace-Context` name the same trace and span, the sampled flag off.
fn unsampled_pair(h: &[(String, String)]) -> (String, u64) {
    let tp = header(h, "traceparent").expect("traceparent written");
    let xc = header(h, "x-cloud-trace-context").expect("x-cloud-trace-context written");
    assert!(
        tp.len() == 55 && tp.starts_with("00-") && tp.ends_with("-00"),
        "{tp}"
    );
    let trace = &tp[3..35];
    assert!(
        trace
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
        "{tp}"
    );
    let span = u64::from_str_radix(&tp[36..52], 16).expect("span");
    assert_ne!(span, 0);
    assert_eq!(xc, format!("{trace}/{span};o=0"));
    (trace.to_string(), span)
}

/// The `endpoints_log` entry of the first reported request whose URL starts with `url`,
/// waiting up to 15 s for the proxy's report flush.
fn report_entry(seen: &Mutex<Seen>, url: &str, log: &dyn Fn() -> String) -> Value {
    let pred = |e: &Value| {
        e["httpRequest"]["requestUrl"]
            .as_str()
            .is_some_and(|u| u.starts_with(url))
    };
    report_entry_where(seen, url, &pred, log)
}

/// The first reported log entry `pred` accepts, waiting up to 15 s.
fn report_entry_where(
    seen: &Mutex<Seen>,
    what: &str,
    pred: &dyn Fn(&Value) -> bool,
    log: &dyn Fn() -> String,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let found = seen
            .lock()
            .unwrap()
            .reports
            .iter()
            .flat_map(|r| r["operations"].as_array().cloned().unwrap_or_default())
            .flat_map(|o| o["logEntries"].as_array().cloned().unwrap_or_default())
            .find(|e| pred(e));
        if let Some(e) = found {
            return e;
        }
        assert!(
            Instant::now() < deadline,
            "no report for {what}; reports seen: {:?}\n{}",
            seen.lock().unwrap().reports,
            log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A Python interpreter with PyPI's `opentelemetry-proto`: `PORTICO_OTLP_PYTHON`, else the venv
/// `.ci/run` makes (`target/test-python`), else `python3`. Missing: a loud skip, or a failure
/// under `CI=true`.
fn otlp_python(test: &str) -> Option<String> {
    let venv =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-python/bin/python");
    let python = std::env::var("PORTICO_OTLP_PYTHON").unwrap_or_else(|_| {
        if venv.is_file() {
            venv.display().to_string()
        } else {
            "python3".into()
        }
    });
    let ok = std::process::Command::new(&python)
        .args([
            "-c",
            "import opentelemetry.proto.collector.trace.v1.trace_service_pb2",
        ])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if ok {
        return Some(python);
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{test}: {python} cannot import opentelemetry-proto (pip install opentelemetry-proto) and CI=true");
    }
    eprintln!(
        "SKIPPED: {test}: {python} cannot import opentelemetry-proto; pip install \
         opentelemetry-proto, or set PORTICO_OTLP_PYTHON to an interpreter that has it"
    );
    None
}

/// An OTLP/HTTP receiver: decodes each `ExportTraceServiceRequest` with the official classes
/// and writes one JSON line per span (IDs in hex) to the file in argv[2].
const RECEIVER: &str = r#"
import json, sys
from http.server import BaseHTTPRequestHandler, HTTPServer
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest, ExportTraceServiceResponse)
out = open(sys.argv[2], "a")
class H(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        req = ExportTraceServiceRequest()
        req.ParseFromString(body)
        for rs in req.resource_spans:
            res = {a.key: a.value.string_value for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    out.write(json.dumps({
                        "path": self.path, "ctype": self.headers.get("Content-Type"),
                        "resource": res, "scope": ss.scope.name,
                        "trace": s.trace_id.hex(), "span": s.span_id.hex(),
                        "parent": s.parent_span_id.hex(), "name": s.name, "kind": s.kind,
                        "start": s.start_time_unix_nano, "end": s.end_time_unix_nano,
                        "flags": s.flags,
                        "attributes": {a.key: a.value.string_value for a in s.attributes},
                    }) + "\n")
        out.flush()
        reply = ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)
    def log_message(self, *a):
        pass
HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"#;

#[test]
fn otlp_export_is_decoded_by_the_opentelemetry_protos() {
    let Some(python) = otlp_python("otlp_export_is_decoded_by_the_opentelemetry_protos") else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let w = world(dir.path());
    let script = dir.path().join("receiver.py");
    std::fs::write(&script, RECEIVER).expect("script");
    let spans_file = dir.path().join("spans.jsonl");
    let rport = free_port();
    let log = std::fs::File::create(dir.path().join("receiver.log")).expect("log");
    /// Stops the receiver however the test ends.
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _receiver = Kill(
        std::process::Command::new(&python)
            .arg(&script)
            .arg(rport.to_string())
            .arg(&spans_file)
            .stdout(log.try_clone().expect("fd"))
            .stderr(log)
            .spawn()
            .expect("start the receiver"),
    );
    receiver_wait(rport);

    let (proxy, port) = start_espv2(
        &w,
        dir.path(),
        "espv2",
        &[
            format!("--tracing_otlp_endpoint=http://127.0.0.1:{rport}/v1/traces"),
            // Every request.
            "--tracing_sample_rate=1".to_string(),
        ],
    );
    let bearer = format!("Bearer {}", w.token);
    assert_eq!(
        get(port, "/jwt?key=k1", &[("authorization", bearer.as_str())]),
        200,
        "{}",
        proxy.log()
    );

    let deadline = Instant::now() + Duration::from_secs(15);
    let spans: Vec<Value> = loop {
        let text = std::fs::read_to_string(&spans_file).unwrap_or_default();
        let v: Vec<Value> = text
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        if v.len() >= 4 {
            break v;
        }
        assert!(
            Instant::now() < deadline,
            "spans received: {v:#?}\nproxy log:\n{}",
            proxy.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(spans.len(), 4, "{spans:#?}");
    let root = spans
        .iter()
        .find(|s| s["name"] == "ingress Jwt")
        .expect("ingress span");
    assert_eq!(root["path"], "/v1/traces");
    assert_eq!(root["ctype"], "application/x-protobuf");
    assert_eq!(root["resource"]["service.name"], SERVICE);
    assert_eq!(root["scope"], "portico");
    assert_eq!(root["parent"], "", "a root");
    assert_eq!(root["kind"], 2, "SERVER");
    assert_eq!(root["flags"], 1);
    assert_eq!(root["attributes"]["http.status_code"], "200");
    assert_eq!(root["attributes"]["http.method"], "GET");
    assert!(root["trace"]
        .as_str()
        .is_some_and(|t| t.len() == 32 && t != "0".repeat(32)));
    assert!(root["end"].as_u64() >= root["start"].as_u64());
    for s in spans.iter().filter(|s| s["name"] != "ingress Jwt") {
        assert_eq!(s["trace"], root["trace"]);
        assert_eq!(s["parent"], root["span"], "{s:#}");
        assert_eq!(s["kind"], 3, "CLIENT: {s:#}");
    }
    let names: Vec<&str> = spans.iter().filter_map(|s| s["name"].as_str()).collect();
    assert!(
        names.contains(&"Service Control remote call: Check"),
        "{names:?}"
    );
    assert!(names.contains(&"JWT Remote PubKey Fetch"), "{names:?}");
    assert!(
        names
            .iter()
            .any(|n| n.starts_with("router backend-cluster-")),
        "{names:?}"
    );
    // The backend's traceparent names the egress span.
    let egress = spans
        .iter()
        .find(|s| s["name"].as_str().is_some_and(|n| n.starts_with("router ")))
        .expect("egress");
    let hb = backend_headers(&w.seen, "/jwt?key=k1");
    assert_eq!(
        header(&hb, "traceparent").map(str::to_string),
        Some(format!(
            "00-{}-{}-01",
            root["trace"].as_str().unwrap_or(""),
            egress["span"].as_str().unwrap_or("")
        ))
    );
    drop(proxy);
    drop(w.rt);
}

/// Waits until something listens on `port` (the Python receiver starts in a fraction of a
/// second; 20 s bounds a broken interpreter).
fn receiver_wait(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "the OTLP receiver did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn esp_fetch_access_token_span() {
    let dir = tempfile::tempdir().expect("tempdir");
    let w = world(dir.path());
    // The metadata server: short-lived tokens (due at once) until `long` is set.
    let long = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let fetches = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let id_fetches = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    // An ID token as the metadata server answers it: a JWT (the proxy reads its `exp`).
    let b64 = |v: Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    let id_token = format!(
        "{}.{}.c2ln",
        b64(json!({"alg": "RS256"})),
        b64(json!({"aud": "https://backend.example", "exp": now() + 3600}))
    );
    let sent_id_token = format!("Bearer {id_token}");
    let (l, f, id_tokens) = (long.clone(), fetches.clone(), id_fetches.clone());
    let md = peer::start(
        &w.rt,
        Arc::new(move |req: &Request| {
            if req
                .path
                .starts_with("/computeMetadata/v1/instance/service-accounts/default/identity?")
            {
                id_tokens.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                return Action::Respond(200, id_token.clone());
            }
            if req.path != "/computeMetadata/v1/instance/service-accounts/default/token" {
                return Action::Respond(404, "{}".into());
            }
            f.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let expires = if l.load(std::sync::atomic::Ordering::SeqCst) {
                3600
            } else {
                1
            };
            Action::Respond(
                200,
                json!({"access_token": "md-token", "expires_in": expires, "token_type": "Bearer"})
                    .to_string(),
            )
        }),
    );
    // The Open method's backend wants an ID token (`jwt_audience`), which also comes from the
    // metadata server.
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(&w.config).expect("config")).expect("json");
    cfg["backend"] =
        json!({"rules": [{"selector": "e2e.Api.Open", "jwtAudience": "https://backend.example"}]});
    let config = dir.path().join("service-id-token.json");
    std::fs::write(&config, cfg.to_string()).expect("config");
    let (proxy, port) = start_esp(
        &w,
        &config,
        dir.path(),
        "esp-md",
        &[format!("--metadata=http://{md}")],
    );
    let log = || proxy.log();
    let names = |t: &str| -> Vec<String> {
        let spans = v1_spans(&w.seen, t, &log);
        tree(&spans, "spanId", "parentSpanId")
    };
    let root = format!("{SERVICE}/e2e.Api.Open");

    // The token is due: the traced request fetches it first, under the root, before the
    // Service Control spans (ESP's check workflow order).
    let t1 = "a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1";
    let x1 = format!("{t1}/1;o=1");
    assert_eq!(
        get(port, "/open?n=1", &[("x-cloud-trace-context", x1.as_str())]),
        200,
        "{}",
        log()
    );
    let t = names(t1);
    assert_eq!(t[0], format!("{root} (remote \"1\")"), "{t:?}");
    assert_eq!(t[1], format!("FetchAccessToken ({root})"), "{t:?}");
    assert!(
        t.iter().any(|n| n.starts_with("CheckServiceControl")),
        "{t:?}"
    );
    // The backend's ID token, fetched once on this request's path: its own span.
    assert!(t.contains(&format!("FetchIdentityToken ({root})")), "{t:?}");
    assert_eq!(id_fetches.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert_eq!(
        header(&backend_headers(&w.seen, "/open?n=1"), "authorization"),
        Some(sent_id_token.as_str())
    );

    // A token that lasts: fetched once more (it was due), then fresh: no span.
    long.store(true, std::sync::atomic::Ordering::SeqCst);
    let t2 = "a2a2a2a2a2a2a2a2a2a2a2a2a2a2a2a2";
    let x2 = format!("{t2}/1;o=1");
    assert_eq!(
        get(port, "/open?n=2", &[("x-cloud-trace-context", x2.as_str())]),
        200
    );
    assert!(names(t2).contains(&format!("FetchAccessToken ({root})")));
    let before = fetches.load(std::sync::atomic::Ordering::SeqCst);
    let t3 = "a3a3a3a3a3a3a3a3a3a3a3a3a3a3a3a3";
    let x3 = format!("{t3}/1;o=1");
    assert_eq!(
        get(port, "/open?n=3", &[("x-cloud-trace-context", x3.as_str())]),
        200
    );
    let t = names(t3);
    assert!(
        !t.iter().any(|n| n.starts_with("FetchAccessToken")),
        "{t:?}"
    );
    assert!(
        !t.iter().any(|n| n.starts_with("FetchIdentityToken")),
        "cached: {t:?}"
    );
    assert_eq!(
        fetches.load(std::sync::atomic::Ordering::SeqCst),
        before,
        "a fresh token is not fetched again"
    );
    drop(proxy);
    drop(w.rt);
}
