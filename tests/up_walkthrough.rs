//! `portico up` end to end: run it in a temp dir on ports chosen at run time, execute the curl
//! lines it prints with the real `curl`, then run it again on the same state and check that the
//! service, key file and API key are reused. Also: a busy port is a clear error; everything
//! under the data directory is owner-only, also after a start on files an
//! older version left readable; an unusable data directory is refused before any port is bound;
//! `--openapi` takes an OpenAPI 3.x file (the 3.x echo example in front of `portico echo`).

use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const START: Duration = Duration::from_secs(120);

/// A running `portico up`; SIGINT then kill on drop.
struct Up {
    child: Child,
    stdout: String,
}

impl Drop for Up {
    fn drop(&mut self) {
        stop(&mut self.child);
    }
}

fn stop(child: &mut Child) {
    if let Ok(None) = child.try_wait() {
        // SAFETY: kill(2) on our own unreaped child.
        unsafe {
            libc::kill(child.id() as libc::pid_t, libc::SIGINT);
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn start_up(dir: &Path, ports: [u16; 4]) -> Up {
    start_up_with(dir, ports, &[])
}

/// [`start_up`] with more arguments (`--openapi FILE --backend ADDR`).
fn start_up_with(dir: &Path, ports: [u16; 4], extra: &[&str]) -> Up {
    let [port, backend, cp, status] = ports;
    let mut child = Command::new(env!("CARGO_BIN_EXE_portico"))
        .current_dir(dir)
        .args(["up", "--port", &port.to_string()])
        .args(extra)
        .args(["--backend-port", &backend.to_string()])
        .args(["--control-plane-port", &cp.to_string()])
        .args(["--status-port", &status.to_string()])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn portico up");
    let out = child.stdout.take().expect("stdout");
    let err = child.stderr.take().expect("stderr");
    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let (etx, erx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            let _ = etx.send(line);
        }
    });
    let mut up = Up {
        child,
        stdout: String::new(),
    };
    let deadline = Instant::now() + START;
    loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(line) => {
                up.stdout.push_str(&line);
                up.stdout.push('\n');
                if line.contains("Press Ctrl-C to stop") {
                    return up;
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let _ = up.child.wait();
                let stderr: Vec<String> = erx.try_iter().collect();
                panic!(
                    "portico up exited before it was ready\nstdout:\n{}\nstderr:\n{}\nlogs:\n{}",
                    up.stdout,
                    stderr.join("\n"),
                    logs(dir)
                );
            }
        }
        if Instant::now() > deadline {
            let stderr: Vec<String> = erx.try_iter().collect();
            panic!(
                "portico up not ready within {START:?}\nstdout:\n{}\nstderr:\n{}\nlogs:\n{}",
                up.stdout,
                stderr.join("\n"),
                logs(dir)
            );
        }
    }
}

fn logs(dir: &Path) -> String {
    let mut s = String::new();
    for name in ["control-plane", "echo", "esp"] {
        let p = dir.join(".portico/logs").join(format!("{name}.log"));
        let text = std::fs::read_to_string(&p).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(20).collect();
        s.push_str(&format!("== {name}\n"));
        for l in tail.into_iter().rev() {
            s.push_str(l);
            s.push('\n');
        }
    }
    s
}

fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(p).expect("meta").permissions().mode() & 0o777
}

/// Every directory under `data` (itself included) is 0700 and every file 0600 or stricter;
/// the files named must be there.
fn assert_private(data: &Path, must_exist: &[&str]) {
    assert_eq!(mode(data), 0o700, "{} is {:o}", data.display(), mode(data));
    let mut seen = Vec::new();
    let mut stack = vec![data.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).expect("list") {
            let path = entry.expect("entry").path();
            let rel = path
                .strip_prefix(data)
                .expect("under data")
                .display()
                .to_string();
            if path.is_dir() {
                assert_eq!(mode(&path), 0o700, "{rel} is {:o}", mode(&path));
                stack.push(path);
            } else {
                assert_eq!(mode(&path) & 0o077, 0, "{rel} is {:o}", mode(&path));
            }
            seen.push(rel);
        }
    }
    for name in must_exist {
        assert!(
            seen.iter().any(|s| s == name),
            "{name} missing from {seen:?}"
        );
    }
}

/// Runs one printed curl line through the shell, returning (HTTP status, body).
fn run_curl(line: &str) -> (u16, String) {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "{line} --silent --show-error --max-time 10 --write-out '\\n%{{http_code}}'"
        ))
        .output()
        .expect("run curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (
        code.trim().parse().unwrap_or_else(|_| {
            panic!(
                "curl failed: {line}\n{}{}",
                text,
                String::from_utf8_lossy(&out.stderr)
            )
        }),
        body.to_string(),
    )
}

fn curl_lines(stdout: &str) -> Vec<String> {
    stdout
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("curl "))
        .map(str::to_string)
        .collect()
}

#[test]
fn up_runs_the_walkthrough_and_reuses_its_state() {
    if Command::new("curl").arg("--version").output().is_err() {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("curl is required on CI");
        }
        eprintln!("SKIPPED: curl is not installed");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let ports = [free_port(), free_port(), free_port(), free_port()];
    let read_state = |dir: &Path| -> Value {
        serde_json::from_slice(&std::fs::read(dir.join(".portico/state.json")).expect("state"))
            .expect("state JSON")
    };
    let (first_key, first_service) = {
        let up = start_up(dir.path(), ports);
        let lines = curl_lines(&up.stdout);
        assert_eq!(lines.len(), 3, "expected three curl lines:\n{}", up.stdout);

        let (status, body) = run_curl(&lines[0]);
        assert_eq!(status, 401, "{body}");
        let err: Value = serde_json::from_str(&body).expect("JSON error body");
        assert_eq!(err["code"], 16);
        assert_eq!(
            err["message"],
            "Method doesn't allow unregistered callers (callers without established identity). Please use API Key or other form of API consumer identity to call this API."
        );

        let (status, body) = run_curl(&lines[1]);
        assert_eq!(status, 200, "{body}\n{}", logs(dir.path()));
        let echoed: Value = serde_json::from_str(&body).expect("echo JSON");
        assert_eq!(echoed, serde_json::json!({"message": "hello world"}));

        // Tracing is on for the sample, and says so: the third line lists the traces, where
        // the two calls above are (their root spans name the service's Echo method).
        assert!(up.stdout.contains("Tracing is on"), "{}", up.stdout);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            let (status, body) = run_curl(&lines[2]);
            assert_eq!(status, 200, "{body}");
            let list: Value = serde_json::from_str(&body).expect("traces JSON");
            let echo_roots = list["traces"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|t| {
                    t["spans"][0]["name"]
                        .as_str()
                        .is_some_and(|n| n.ends_with(".Echo") || n.ends_with("/Echo"))
                })
                .count();
            if echo_roots >= 2 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the curl lines' traces are not listed: {list:#}\n{}",
                logs(dir.path())
            );
            std::thread::sleep(std::time::Duration::from_millis(250));
        }

        // The gcloud lines point at this control plane and its admin token.
        let token = dir.path().join(".portico/admin-token");
        assert!(token.exists());
        assert!(up.stdout.contains(&format!(
            "gcloud config set api_endpoint_overrides/servicemanagement http://127.0.0.1:{}/",
            ports[2]
        )));
        assert!(up.stdout.contains("auth/access_token_file"));
        let key_file = dir.path().join(".portico/service-account-creds.json");
        let key: Value =
            serde_json::from_slice(&std::fs::read(&key_file).expect("key file")).expect("key JSON");
        assert_eq!(key["type"], "service_account");
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&key_file)
            .expect("meta")
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600, "key file must be private");

        // The sample's JWT route works with the key `up` wrote: the service-account provider's
        // JWKS URL was pointed at this control plane, which publishes the key's certificate.
        let sa = portico_credentials::ServiceAccountKey::from_file(&key_file).expect("key file");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs();
        let jwt = sa
            .sign_jwt(&serde_json::json!({
                "iss": sa.client_email, "sub": sa.client_email,
                "aud": "echo.endpoints.sample.google.com",
                "iat": now, "exp": now + 600,
            }))
            .expect("sign");
        let proxy = lines[0]
            .split_whitespace()
            .last()
            .expect("proxy URL")
            .trim_end_matches("/echo")
            .to_string();
        let (status, body) = run_curl(&format!(
            "curl -H 'Authorization: Bearer {jwt}' {proxy}/auth/info/googlejwt"
        ));
        assert_eq!(status, 200, "{body}\n{}", logs(dir.path()));
        let info: Value = serde_json::from_str(&body).expect("user info JSON");
        assert_eq!(info["issuer"], sa.client_email, "{info}");
        let (status, _) = run_curl(&format!("curl {proxy}/auth/info/googlejwt"));
        assert_eq!(status, 401, "no token must be refused by the proxy");

        // The database (with SQLite's -wal and -shm), state, logs and secrets
        // are all owner-only while everything runs.
        assert_private(
            &dir.path().join(".portico"),
            &[
                "portico.db",
                "portico.db-wal",
                "portico.db-shm",
                "state.json",
                "admin-token",
                "master-key",
                "service-account-creds.json",
                "logs",
                "logs/control-plane.log",
                "logs/esp.log",
                "logs/echo.log",
            ],
        );

        let state = read_state(dir.path());
        (
            lines[1].clone(),
            state["service"].as_str().expect("service").to_string(),
        )
    };

    // Second run on the same state and ports: same service, same API key, config not resubmitted.
    let key_file = dir.path().join(".portico/service-account-creds.json");
    let key_before = std::fs::read(&key_file).expect("key file");
    let config_before = read_state(dir.path())["config_id"].clone();
    assert!(config_before.is_string());
    // What an older version left behind: the directories and these files readable by all.
    {
        use std::os::unix::fs::PermissionsExt as _;
        let data = dir.path().join(".portico");
        let chmod = |rel: &str, m: u32| {
            let p = if rel.is_empty() {
                data.clone()
            } else {
                data.join(rel)
            };
            if p.exists() {
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(m)).expect("chmod");
            }
        };
        for d in ["", "logs"] {
            chmod(d, 0o755);
        }
        for f in [
            "portico.db",
            "portico.db-wal",
            "portico.db-shm",
            "state.json",
            "logs/control-plane.log",
            "logs/esp.log",
            "logs/echo.log",
        ] {
            chmod(f, 0o644);
        }
    }
    let up = start_up(dir.path(), ports);
    assert_private(
        &dir.path().join(".portico"),
        &["portico.db", "state.json", "logs/control-plane.log"],
    );
    let lines = curl_lines(&up.stdout);
    assert_eq!(lines[1], first_key, "the API key was not reused");
    assert!(up.stdout.contains(&first_service));
    assert_eq!(
        read_state(dir.path())["config_id"],
        config_before,
        "an unchanged OpenAPI file was submitted again"
    );
    assert_eq!(
        std::fs::read(&key_file).expect("key file"),
        key_before,
        "the key file was replaced"
    );
    let (status, body) = run_curl(&lines[1]);
    assert_eq!(status, 200, "{body}");

    // A third instance on the same ports cannot start; the message names the flag.
    let out = Command::new(env!("CARGO_BIN_EXE_portico"))
        .current_dir(dir.path())
        .args(["up", "--port", &ports[0].to_string()])
        .stdin(Stdio::null())
        .output()
        .expect("run portico up");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("port {} is already in use; pass --port", ports[0])),
        "{stderr}"
    );

    // Ctrl-C: `up` exits 0 and takes every child with it, so all four ports are free again.
    let mut up = up;
    // SAFETY: kill(2) on our own unreaped child.
    unsafe {
        libc::kill(up.child.id() as libc::pid_t, libc::SIGINT);
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Ok(Some(status)) = up.child.try_wait() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "portico up did not stop on SIGINT"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "portico up exited with {status}");
    for port in ports {
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpListener::bind(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "port {port} still in use after portico up stopped: a child survived"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// A data directory that cannot be used is one sentence naming it, given
/// before any port is bound. As root, permission bits do not stop writes, so the cases use
/// paths no user can write: a regular file, and a path under a regular file.
#[test]
fn an_unusable_data_directory_is_refused_before_binding() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("plain-file");
    std::fs::write(&file, b"not a directory").expect("write");
    let under = file.join("data");

    // The control plane: its port is taken, so binding first would report that instead.
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    for (data, expected) in [
        (
            &file,
            format!("data directory {} is not a directory", file.display()),
        ),
        (
            &under,
            format!(
                "cannot use data directory {}: Not a directory (os error 20)",
                under.display()
            ),
        ),
    ] {
        let out = run_bounded(Command::new(env!("CARGO_BIN_EXE_portico")).args([
            "control-plane",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--data",
            &data.display().to_string(),
        ]));
        assert!(!out.status.success(), "{out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(&expected), "{stderr}");
        assert!(!stderr.contains("cannot bind"), "{stderr}");
    }

    // A read-only file system, the case from the issue (the server listened, never answered
    // and gave up after 30 s): a read-only tmpfs in a private mount namespace, which needs
    // root (or CAP_SYS_ADMIN) and unshare(1).
    let ro = dir.path().join("read-only");
    std::fs::create_dir(&ro).expect("mkdir");
    let script = format!(
        "mount -t tmpfs -o ro tmpfs '{ro}' && exec '{bin}' control-plane --listen 127.0.0.1:{port} --data '{ro}'",
        ro = ro.display(),
        bin = env!("CARGO_BIN_EXE_portico"),
    );
    match Command::new("unshare")
        .args(["-m", "sh", "-c", &script])
        .output()
    {
        Ok(out) if String::from_utf8_lossy(&out.stderr).contains("portico control-plane:") => {
            assert!(!out.status.success(), "{out:?}");
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(
                stderr.contains(&format!(
                    "portico control-plane: data directory {} is not writable: Read-only file system (os error 30)",
                    ro.display()
                )),
                "{stderr}"
            );
        }
        other => eprintln!(
            "SKIPPED: read-only file system case: cannot mount a read-only tmpfs here ({other:?})"
        ),
    }
    drop(taken);

    // `portico up` says the same before claiming ports or starting children.
    let out = run_bounded(
        Command::new(env!("CARGO_BIN_EXE_portico"))
            .current_dir(dir.path())
            .args(["up", "--data", &under.display().to_string()]),
    );
    assert!(!out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "portico up: cannot use data directory {}: Not a directory (os error 20)",
            under.display()
        )),
        "{stderr}"
    );
}

/// Runs a command that must exit on its own, killing it after 30 s.
fn run_bounded(cmd: &mut Command) -> std::process::Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn portico");
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().expect("output")
}

/// `portico up --grpc`: the Bookstore behind the proxy's h2c port, deployed from its descriptor
/// set and api_config.yaml; the grpcio line it prints reaches the backend with the API key and
/// is refused without it.
#[test]
fn up_grpc_serves_the_bookstore() {
    let python = "/usr/bin/python3";
    let has_grpc = Command::new(python)
        .args(["-c", "import grpc"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !has_grpc {
        if std::env::var_os("CI").is_some() {
            panic!("up_grpc_serves_the_bookstore: /usr/bin/python3 with grpcio (python3-grpcio) is required on CI");
        }
        eprintln!("SKIPPED: up_grpc_serves_the_bookstore: /usr/bin/python3 with grpcio (apt-get install python3-grpcio) is absent");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let ports = [free_port(), free_port(), free_port(), free_port()];
    let http_port = free_port().to_string();
    let up = start_up_with(dir.path(), ports, &["--grpc", "--http-port", &http_port]);
    assert!(
        up.stdout
            .contains("bookstore.endpoints.demo-proj.cloud.goog"),
        "{}",
        up.stdout
    );
    let line = up
        .stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("grpc client: "))
        .unwrap_or_else(|| panic!("no grpc client line:\n{}", up.stdout))
        .to_string();
    let line = line.replacen("python3", python, 1);
    let run = |cmd: &str| run_bounded(Command::new("sh").args(["-c", cmd]));
    let out = run(&line);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("Kids"),
        "{line}\nstdout: {stdout}\nstderr: {}\nlogs:\n{}",
        String::from_utf8_lossy(&out.stderr),
        logs(dir.path())
    );
    // The same call without the key: the proxy's UNAUTHENTICATED.
    let start = line.find(", metadata=").expect("metadata in the line");
    let end = line[start..].find("]").expect("end of metadata") + start + 1;
    let keyless = format!("{}{}", &line[..start], &line[end..]);
    let out = run(&keyless);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("UNAUTHENTICATED"),
        "{keyless}\nstderr: {stderr}"
    );
    // The printed curl lines: HTTP/JSON transcoded to the same backend, on --http-port.
    let curls: Vec<&str> = up
        .stdout
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("curl ") && l.contains(&format!(":{http_port}/v1/shelves")))
        .collect();
    assert_eq!(curls.len(), 2, "two transcoding curl lines:\n{}", up.stdout);
    let with_status = |cmd: &str| {
        run(&format!(
            "{cmd} --silent --write-out ' HTTP=%{{http_code}}'"
        ))
    };
    let out = with_status(curls[0]);
    let body = String::from_utf8_lossy(&out.stdout);
    assert!(
        body.contains(r#""theme":"Kids""#) && body.ends_with("HTTP=200"),
        "{}\n{body}\nlogs:\n{}",
        curls[0],
        logs(dir.path())
    );
    let out = with_status(curls[1]);
    let body = String::from_utf8_lossy(&out.stdout);
    assert!(
        body.contains(r#""theme":"Poetry""#) && body.ends_with("HTTP=200"),
        "{}\n{body}",
        curls[1]
    );
    // Without the key: ESP's JSON error for an HTTP caller, not a gRPC status.
    let keyless = curls[0].split("?key=").next().expect("url").to_string() + "\"";
    let out = with_status(&keyless);
    let body = String::from_utf8_lossy(&out.stdout);
    assert!(
        body.contains(r#""code": 16"#) && body.ends_with("HTTP=401"),
        "{keyless}\n{body}"
    );
    drop(up);
}

/// `portico up --openapi openapi3.yaml --backend ADDR`: the service is named by the server
/// carrying x-google-endpoint, and the proxy serves the 3.x file as it does the 2.0 sample.
#[test]
fn up_fronts_an_openapi3_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let echo_port = free_port();
    let mut echo = Command::new(env!("CARGO_BIN_EXE_portico"))
        .args(["echo", "--port", &echo_port.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn portico echo");
    struct Kill<'a>(&'a mut Child);
    impl Drop for Kill<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _echo = Kill(&mut echo);
    let spec =
        include_str!("../examples/echo/openapi3.yaml").replace("YOUR-PROJECT-ID", "demo-proj");
    std::fs::write(dir.path().join("openapi3.yaml"), spec).expect("write spec");
    let ports = [free_port(), free_port(), free_port(), free_port()];
    let backend = format!("127.0.0.1:{echo_port}");
    let up = start_up_with(
        dir.path(),
        ports,
        &["--openapi", "openapi3.yaml", "--backend", &backend],
    );
    assert!(
        up.stdout
            .contains("service echo-api.endpoints.demo-proj.cloud.goog"),
        "{}",
        up.stdout
    );
    let key = up
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("API key: "))
        .unwrap_or_else(|| panic!("no API key line:\n{}", up.stdout))
        .trim()
        .to_string();
    let client = reqwest::blocking::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(20))
        .build()
        .expect("client");
    let post = |target: &str| {
        let r = client
            .post(format!("http://127.0.0.1:{}{target}", ports[0]))
            .header("content-type", "application/json")
            .body(r#"{"message":"hello 3.x"}"#)
            .send()
            .expect("POST");
        (r.status().as_u16(), r.text().unwrap_or_default())
    };
    let (status, body) = post("/echo");
    assert_eq!(status, 401, "{body}\n{}", logs(dir.path()));
    let (status, body) = post(&format!("/echo?key={key}"));
    assert_eq!(status, 200, "{body}\n{}", logs(dir.path()));
    assert_eq!(
        serde_json::from_str::<Value>(&body).expect("echo JSON"),
        serde_json::json!({"message": "hello 3.x"})
    );
}
