//! `portico esp` with TLS files or versions it cannot use exits at start with a sentence naming
//! the file or the flag (exit 3 for files, as start_esp for setup errors; 4 for flag values),
//! and says once at start when it raises a TLS minimum it cannot speak.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const CONFIG: &str = r#"{"name": "plain.example.com", "id": "2026-11-23r1",
  "http": {"rules": [{"selector": "1.plain.Get", "get": "/known"}]}}"#;

/// A certificate for `localhost` and its key, and another key, as PEM files in `dir`.
fn pem_files(dir: &Path) -> (String, String, String) {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("cert");
    let other = rcgen::KeyPair::generate().expect("key");
    let write = |name: &str, text: String| {
        let p = dir.join(name);
        std::fs::write(&p, text).expect("write");
        p.display().to_string()
    };
    (
        write("cert.pem", ck.cert.pem()),
        write("key.pem", ck.key_pair.serialize_pem()),
        write("other.key", other.serialize_pem()),
    )
}

/// Runs `portico esp` with `args` until it exits, or until its log says it is serving (then it
/// is stopped); at most 30 s. Returns (exit code if it exited by itself, stderr).
fn esp(dir: &Path, args: &[String]) -> (Option<i32>, String) {
    let config = dir.join("service.json");
    std::fs::write(&config, CONFIG).expect("config");
    let log = dir.join("esp.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_portico"))
        .arg("esp")
        .arg(format!("--service_json_path={}", config.display()))
        .args([
            "--status_port=0",
            "--backend=127.0.0.1:1",
            "--worker_threads=1",
        ])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log file"))
        .spawn()
        .expect("spawn portico esp");
    let deadline = Instant::now() + Duration::from_secs(30);
    let code = loop {
        if let Ok(Some(status)) = child.try_wait() {
            break status.code();
        }
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("portico esp serving") || Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    (code, std::fs::read_to_string(&log).unwrap_or_default())
}

#[test]
fn a_missing_certificate_is_named_and_exits_3() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_, key, _) = pem_files(dir.path());
    let missing = dir.path().join("ssl").join("nginx.crt");
    let (code, stderr) = esp(
        dir.path(),
        &[
            "--ssl_port=0".into(),
            format!("--ssl_cert_path={}", missing.display()),
            format!("--ssl_key_path={key}"),
        ],
    );
    assert_eq!(code, Some(3), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "TLS for clients: certificate {}: the directory {} does not exist",
            missing.display(),
            dir.path().join("ssl").display()
        )),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn a_backend_client_key_of_another_certificate_is_named_and_exits_3() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, _, other) = pem_files(dir.path());
    let (code, stderr) = esp(
        dir.path(),
        &[
            "--http_port=0".into(),
            "--tls_mutual_auth".into(),
            format!("--backend_client_cert_path={cert}"),
            format!("--backend_client_key_path={other}"),
        ],
    );
    assert_eq!(code, Some(3), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "TLS to backends: private key {other} does not belong to the certificate {cert}"
        )),
        "{stderr}"
    );
}

#[test]
fn ssl_protocols_portico_cannot_speak_are_refused_or_warned_about() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (code, stderr) = esp(
        dir.path(),
        &[
            "--ssl_port=0".into(),
            "--ssl_protocols=TLSv1 TLSv1.1".into(),
        ],
    );
    assert_eq!(code, Some(4), "{stderr}");
    assert!(
        stderr.contains("--ssl_protocols TLSv1 TLSv1.1 cannot be honoured"),
        "{stderr}"
    );

    // Next to a version it speaks, an old one is dropped with a warning and the proxy serves.
    let (cert, key, _) = pem_files(dir.path());
    let (code, stderr) = esp(
        dir.path(),
        &[
            "--ssl_port=0".into(),
            format!("--ssl_cert_path={cert}"),
            format!("--ssl_key_path={key}"),
            "--ssl_protocols=TLSv1.1".into(),
            "--ssl_protocols=TLSv1.2".into(),
        ],
    );
    assert_eq!(code, None, "it serves; {stderr}");
    assert!(stderr.contains("portico esp serving"), "{stderr}");
    assert_eq!(
        stderr
            .matches("--ssl_protocols: TLSv1.1 not available")
            .count(),
        1,
        "{stderr}"
    );
}
