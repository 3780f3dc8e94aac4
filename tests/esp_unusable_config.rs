//! `portico esp` given a service config it cannot use exits at start with a
//! sentence naming the file, the rule and the value — never a panic (exit 101), which under a
//! supervisor became a crash loop.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const SVC: &str = "echo-api.endpoints.demo-proj.cloud.goog";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Runs `portico esp` on `config`, bounded in time; returns (exit code, stderr).
fn esp_with(config: &serde_json::Value) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("service.json");
    std::fs::write(&path, config.to_string()).expect("write config");
    let log = dir.path().join("esp.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_portico"))
        .args([
            "esp",
            &format!("--service={SVC}"),
            &format!("--service_json_path={}", path.display()),
            &format!("--http_port={}", free_port()),
            &format!("--status_port={}", free_port()),
            "--backend=127.0.0.1:1",
            "--enable_backend_routing",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log file"))
        .spawn()
        .expect("spawn portico esp");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Ok(Some(status)) = child.try_wait() {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stderr = std::fs::read_to_string(&log).unwrap_or_default();
    (status.and_then(|s| s.code()), stderr)
}

#[test]
fn a_config_with_an_unusable_deadline_is_refused_at_start() {
    let config = serde_json::json!({
        "name": SVC,
        "id": "2026-01-01r0",
        "http": {"rules": [{"selector": "1.echo.Echo", "get": "/echo"}]},
        "backend": {"rules": [{"selector": "1.echo.Echo", "address": "http://127.0.0.1:1", "deadline": 1e300}]}
    });
    let (code, stderr) = esp_with(&config);
    assert_eq!(code, Some(1), "exit status; stderr:\n{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        stderr.contains(
            "cannot be used: backend rule \"1.echo.Echo\": deadline 1e300 is out of range"
        ),
        "{stderr}"
    );
    assert!(stderr.contains("service.json"), "{stderr}");
}

/// A backend `protocol` that is none of ESPv2's values (compared in any case) is refused at
/// start, as ESPv2 refuses one for an HTTP backend, naming the rule and the value; `H2` (the
/// rule checked before it) is not refused.
#[test]
fn a_config_with_an_unknown_backend_protocol_is_refused_at_start() {
    let config = |protocol: &str| {
        serde_json::json!({
            "name": SVC,
            "id": "2026-01-01r0",
            "http": {"rules": [{"selector": "1.echo.Echo", "get": "/echo"},
                               {"selector": "1.echo.Other", "get": "/other"}]},
            "backend": {"rules": [{"selector": "1.echo.Other", "protocol": "H2"},
                                  {"selector": "1.echo.Echo", "protocol": protocol}]}
        })
    };
    let (code, stderr) = esp_with(&config("h3"));
    assert_eq!(code, Some(1), "exit status; stderr:\n{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        stderr.contains(
            "cannot be used: backend rule \"1.echo.Echo\": protocol \"h3\" is not supported: \
             use \"http/1.1\", \"h2\" or \"grpc\" (in any case), or leave it unset"
        ),
        "{stderr}"
    );
    assert!(stderr.contains("service.json"), "{stderr}");
}
