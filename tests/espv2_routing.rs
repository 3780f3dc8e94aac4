//! End to end: where `portico espv2` sends a request, through real processes. Backend rules
//! (`x-google-backend`) with `CONSTANT_ADDRESS` build the target as ESPv2's path-rewrite filter
//! does: the address's path, then the client's query as sent (API key included), then the path
//! bindings as query parameters, their values as they were in the path; `APPEND_PATH_TO_ADDRESS`
//! puts the request path after the address's path; a method without a backend rule goes to
//! `--backend`. Expected targets are ESPv2's own (its `dynamic_routing_integration_test`).
//!
//! The backends are raw HTTP/1.1 doubles that answer with the request target they received.

mod common;

use common::espv2;
use common::peer::{self, Action, Request};
use common::{free_port, Proc};
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;

const SERVICE: &str = "espv2-routing.endpoints.e2e-proj.cloud.goog";

/// A backend that answers with who it is and the target it got.
fn reflector(name: &'static str) -> peer::Handler {
    Arc::new(move |r: &Request| {
        let original = r.header("x-envoy-original-path");
        Action::Respond(
            200,
            json!({"backend": name, "uri": r.path, "original": original}).to_string(),
        )
    })
}

fn service_config(remote: std::net::SocketAddr) -> serde_json::Value {
    let rule = |name: &str, verb: &str, path: &str| json!({"selector": format!("e2e.Api.{name}"), verb: path});
    let names = [
        "GetPet",
        "BookInfo",
        "BookId",
        "FieldPath",
        "EmptyPath",
        "SearchPet",
        "SearchDogs",
        "Local",
        "LocalDeadline",
    ];
    let usage: Vec<_> = names
        .iter()
        .map(|n| json!({"selector": format!("e2e.Api.{n}"), "allowUnregisteredCalls": true}))
        .collect();
    let constant = |name: &str, path: &str| {
        json!({"selector": format!("e2e.Api.{name}"), "address": format!("http://{remote}{path}"),
               "pathTranslation": "CONSTANT_ADDRESS"})
    };
    let append = |name: &str, path: &str| {
        json!({"selector": format!("e2e.Api.{name}"), "address": format!("http://{remote}{path}"),
               "pathTranslation": "APPEND_PATH_TO_ADDRESS"})
    };
    json!({
        "name": SERVICE,
        "id": "2024-01-01r0",
        "apis": [{"name": "e2e.Api", "version": "v1", "methods": [
            {"name": "BookInfo", "requestTypeUrl": "type.googleapis.com/GetBookRequest"},
            {"name": "BookId", "requestTypeUrl": "type.googleapis.com/GetBookRequest"},
        ]}],
        "types": [{"name": "GetBookRequest", "fields": [
            {"name": "s_h_e_l_f", "jsonName": "SHELF"},
            {"name": "b_o_o_k", "jsonName": "BOOK"},
        ]}],
        "http": {"rules": [
            rule("GetPet", "get", "/pet/{pet_id}/num/{number}"),
            rule("BookInfo", "get", "/shelves/{s_h_e_l_f}/books/info/{b_o_o_k}"),
            rule("BookId", "get", "/shelves/{s_h_e_l_f.i_d}/books/id/{b_o_o_k.id}"),
            rule("FieldPath", "get", "/field_path/{s_1=a/*/b/*}/{s_2=x/**}:upload"),
            rule("EmptyPath", "post", "/empty_path"),
            rule("SearchPet", "get", "/searchpet"),
            rule("SearchDogs", "get", "/searchdog"),
            rule("Local", "get", "/local/{id}"),
            rule("LocalDeadline", "get", "/localdeadline"),
        ]},
        "usage": {"rules": usage},
        "backend": {"rules": [
            constant("GetPet", "/dynamicrouting/getpetbyid"),
            constant("BookInfo", "/dynamicrouting/bookinfo"),
            constant("BookId", "/dynamicrouting/bookid"),
            constant("FieldPath", "/dynamicrouting/const_wildcard"),
            constant("EmptyPath", ""),
            append("SearchPet", "/dynamicrouting/searchpet"),
            append("SearchDogs", "/dynamicrouting/searchdogs/"),
            // A rule without an address: --backend, within the rule's deadline.
            {"selector": "e2e.Api.LocalDeadline", "deadline": 5.0},
        ]},
    })
}

#[test]
fn backend_rules_route_as_espv2_does() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let remote = peer::start(&rt, reflector("remote"));
    let local = peer::start(&rt, reflector("local"));
    let sc = peer::start(
        &rt,
        Arc::new(|_: &Request| Action::Respond(200, "{}".into())),
    );
    let config = dir.path().join("service.json");
    std::fs::write(&config, service_config(remote).to_string()).expect("config");
    let key = espv2::service_account_key(dir.path());

    let port = free_port();
    let mut proxy = Proc::spawn(
        &[
            "espv2".to_string(),
            format!("--listener_port={port}"),
            format!("--service_json_path={}", config.display()),
            format!("--backend=http://{local}"),
            "--non_gcp".to_string(),
            format!("--service_account_key={}", key.display()),
            format!("--service_control_url=http://{sc}"),
        ],
        &dir.path().join("proxy.log"),
    );
    proxy.wait_for_port(port, "portico espv2");
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .expect("client");

    // (method, request target, backend, target the backend must receive)
    let cases: &[(&str, &str, &str, &str)] = &[
        (
            "GET",
            "/pet/123/num/987",
            "remote",
            "/dynamicrouting/getpetbyid?pet_id=123&number=987",
        ),
        (
            "GET",
            "/pet/123/num/987/",
            "remote",
            "/dynamicrouting/getpetbyid?pet_id=123&number=987",
        ),
        (
            "GET",
            "/pet/a%20b/num/9%3B8",
            "remote",
            "/dynamicrouting/getpetbyid?pet_id=a%20b&number=9%3B8",
        ),
        // The client's query first, then the bindings.
        (
            "GET",
            "/pet/31/num/565?lang=US&zone=us-west1",
            "remote",
            "/dynamicrouting/getpetbyid?lang=US&zone=us-west1&pet_id=31&number=565",
        ),
        (
            "GET",
            "/pet/a%20b/num/9%3B8?lang=U%20S&zone=us%3Bwest",
            "remote",
            "/dynamicrouting/getpetbyid?lang=U%20S&zone=us%3Bwest&pet_id=a%20b&number=9%3B8",
        ),
        // ESPv2 keeps the API key in the query (ESP v1 drops it).
        (
            "GET",
            "/pet/1/num/2?key=k-1&x=y",
            "remote",
            "/dynamicrouting/getpetbyid?key=k-1&x=y&pet_id=1&number=2",
        ),
        // Values as they were in the path, not re-encoded.
        (
            "GET",
            "/pet/us-west1/num/a~b_c.d",
            "remote",
            "/dynamicrouting/getpetbyid?pet_id=us-west1&number=a~b_c.d",
        ),
        // A '&' inside a path segment stays inside its parameter.
        (
            "GET",
            "/pet/a&admin=1/num/2",
            "remote",
            "/dynamicrouting/getpetbyid?pet_id=a%26admin=1&number=2",
        ),
        // Field names by their JSON names (the first segment), as ESPv2 does.
        (
            "GET",
            "/shelves/123/books/info/987",
            "remote",
            "/dynamicrouting/bookinfo?SHELF=123&BOOK=987",
        ),
        (
            "GET",
            "/shelves/221/books/id/2019",
            "remote",
            "/dynamicrouting/bookid?SHELF.i_d=221&BOOK.id=2019",
        ),
        // Multi-segment bindings keep their slashes.
        (
            "GET",
            "/field_path/a/1/b/2/x/9/8/7:upload",
            "remote",
            "/dynamicrouting/const_wildcard?s_1=a/1/b/2&s_2=x/9/8/7",
        ),
        ("POST", "/empty_path", "remote", "/"),
        ("POST", "/empty_path?q=1", "remote", "/?q=1"),
        // APPEND_PATH_TO_ADDRESS.
        (
            "GET",
            "/searchpet?timezone=PST&lang=US",
            "remote",
            "/dynamicrouting/searchpet/searchpet?timezone=PST&lang=US",
        ),
        (
            "GET",
            "/searchdog?timezone=U%20C%3BT",
            "remote",
            "/dynamicrouting/searchdogs/searchdog?timezone=U%20C%3BT",
        ),
        // No backend rule, or one without an address: --backend, target unchanged.
        ("GET", "/local/7?key=k", "local", "/local/7?key=k"),
        ("GET", "/localdeadline?a=b", "local", "/localdeadline?a=b"),
    ];
    for (method, target, backend, want) in cases {
        let url = format!("http://127.0.0.1:{port}{target}");
        let resp = client
            .request(
                reqwest::Method::from_bytes(method.as_bytes()).unwrap(),
                &url,
            )
            .send()
            .unwrap_or_else(|e| panic!("{method} {target}: {e}"));
        let status = resp.status().as_u16();
        let body = resp.text().expect("body");
        assert_eq!(
            status,
            200,
            "{method} {target}: {body}\nlog:\n{}",
            proxy.log()
        );
        let v: serde_json::Value = serde_json::from_str(&body).expect("json");
        assert_eq!(
            (v["backend"].as_str(), v["uri"].as_str()),
            (Some(*backend), Some(*want)),
            "{method} {target}"
        );
        // ESPv2's path-rewrite filter records the path it replaced (every rule here with an
        // address has a path or is CONSTANT_ADDRESS); `--backend` calls are not rewritten.
        let original = (*backend == "remote").then_some(*target);
        assert_eq!(v["original"].as_str(), original, "{method} {target}");
    }
    // A client's own copy does not pass for the proxy's.
    let v: serde_json::Value = client
        .get(format!("http://127.0.0.1:{port}/pet/1/num/2"))
        .header("x-envoy-original-path", "/admin")
        .send()
        .and_then(|r| r.json())
        .expect("json");
    assert_eq!(v["original"], "/pet/1/num/2");
    drop(rt);
}

/// ESPv2 routes every request by the service config, even one with neither Service Control nor
/// JWT rules (ESP v1 then proxies everything as is): backend rules apply, and a path the API
/// does not define is ESPv2's 404.
#[test]
fn a_config_without_checks_is_still_routed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let remote = peer::start(&rt, reflector("remote"));
    let local = peer::start(&rt, reflector("local"));
    let config = dir.path().join("service.json");
    let mut svc = service_config(remote);
    assert!(svc.get("control").is_none());
    svc["usage"] = json!({});
    std::fs::write(&config, svc.to_string()).expect("config");
    let key = espv2::service_account_key(dir.path());
    let port = free_port();
    let mut proxy = Proc::spawn(
        &[
            "espv2".to_string(),
            format!("--listener_port={port}"),
            format!("--service_json_path={}", config.display()),
            format!("--backend=http://{local}"),
            "--non_gcp".to_string(),
            format!("--service_account_key={}", key.display()),
        ],
        &dir.path().join("proxy.log"),
    );
    proxy.wait_for_port(port, "portico espv2");
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .expect("client");
    let get = |target: &str| {
        let resp = client
            .get(format!("http://127.0.0.1:{port}{target}"))
            .send()
            .unwrap_or_else(|e| panic!("{target}: {e}"));
        (resp.status().as_u16(), resp.text().expect("body"))
    };
    let (status, body) = get("/pet/1/num/2?x=y");
    assert_eq!(status, 200, "{body}\n{}", proxy.log());
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(
        (v["backend"].as_str(), v["uri"].as_str()),
        (
            Some("remote"),
            Some("/dynamicrouting/getpetbyid?x=y&pet_id=1&number=2")
        )
    );
    let (status, body) = get("/local/3");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"local\""), "{body}");
    assert_eq!(
        get("/nowhere"),
        (
            404,
            "{\"code\":404,\"message\":\"The current request is not defined by this API.\"}\n"
                .to_string()
        )
    );
    drop(rt);
}
