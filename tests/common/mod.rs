//! Shared helpers for the end-to-end tests (`mod common;` in a test file).
//!
//! - [`ControlPlane`]: runs `portico control-plane` as a child process on a port chosen at run
//!   time (`--listen 127.0.0.1:0`; the server prints `listening on http://ADDR`), with SQLite
//!   under a data dir or PostgreSQL in a fresh schema. Killed on drop. Its log (stderr) goes to
//!   `<data dir>/control-plane.log`; [`ControlPlane::log`] returns it for failure messages.
//! - [`Db`] and [`postgres_or_skip`]: pick the storage; PostgreSQL tests print `SKIPPED:` when
//!   the server is absent and fail instead when `CI=true`.
//! - [`Gcloud`]: the real `gcloud` with its own `CLOUDSDK_CONFIG` temp dir, every API endpoint
//!   override pointed at the control plane and `auth/access_token_file` set. The config file is
//!   written directly (one `gcloud config set` costs ~1 s). [`Gcloud::run`] has a timeout and
//!   captures stdout/stderr.
//! - [`gcloud_available`]: skip loudly when gcloud is missing (fail when `CI=true`).
//! - [`drop_postgres_schema`]: clean up after a passing PostgreSQL test.
//! - [`today_utc`]: `YYYY-MM-DD`, the prefix of config ids.
//! - [`Api`]: the control plane's REST API with the admin token ([`ControlPlane::api`]):
//!   calls, long-running operations followed to their response, service-account key files,
//!   a deploy as gcloud does it ([`Api::deploy`], [`Api::deploy_file`]).
//! - [`echo_and_esp`]: `portico echo` with `portico esp` in front, for a deployed service.
//!
//! - [`bookstore`]: `portico bookstore` on a free port, and raw gRPC calls with curl.
//! - [`peer`]: a raw HTTP/1.1 double (backend, Service Control, JWKS) that can also stall or
//!   hang up.
//!
//! Not every test binary uses every helper.
#![allow(dead_code)]

pub mod bookstore;
pub mod espv2;
pub mod peer;

use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Where the control plane keeps its state.
#[derive(Debug, Clone)]
pub enum Db {
    Sqlite,
    /// `url` of the `test` database and a schema unique to this run.
    Postgres {
        url: String,
        schema: String,
    },
}

pub const PG_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

fn port_open(addr: &str) -> bool {
    addr.parse::<SocketAddr>()
        .ok()
        .and_then(|a| TcpStream::connect_timeout(&a, Duration::from_millis(500)).ok())
        .is_some()
}

/// A fresh PostgreSQL schema, or `None` (after a loud `SKIPPED:`) when PostgreSQL is absent.
/// Panics when it is absent and `CI=true`.
pub fn postgres_or_skip(test: &str) -> Option<Db> {
    if !port_open("127.0.0.1:5432") {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("{test}: PostgreSQL is not reachable on 127.0.0.1:5432 and CI=true");
        }
        eprintln!("SKIPPED: {test}: PostgreSQL is not reachable on 127.0.0.1:5432");
        return None;
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    Some(Db::Postgres {
        url: PG_URL.to_string(),
        schema: format!("t_{}_{}", std::process::id(), nanos % 1_000_000_000_000),
    })
}

/// Drops a test's PostgreSQL schema (call at the end of a passing test; a failing test leaves
/// it behind for inspection). Errors are reported, not fatal.
pub fn drop_postgres_schema(db: &Db) {
    let Db::Postgres { url, schema } = db else {
        return;
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("drop schema {schema}: {e}");
            return;
        }
    };
    let res: Result<(), sqlx::Error> = rt.block_on(async {
        use sqlx::Connection;
        let mut c = sqlx::PgConnection::connect(url).await?;
        sqlx::query(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
            .execute(&mut c)
            .await?;
        c.close().await
    });
    if let Err(e) = res {
        eprintln!("drop schema {schema}: {e}");
    }
}

/// Whether the real `gcloud` can run; prints a loud `SKIPPED:` when it cannot (a panic when
/// `CI=true`, where it is part of the required environment).
pub fn gcloud_available(test: &str) -> bool {
    let ok = Command::new("gcloud")
        .arg("--version")
        .env("CLOUDSDK_CORE_DISABLE_PROMPTS", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("{test}: gcloud is not installed and CI=true");
        }
        eprintln!("SKIPPED: {test}: gcloud is not installed");
    }
    ok
}

/// Today's date in UTC as `YYYY-MM-DD` (config ids are `<today>rN`).
pub fn today_utc() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = secs.div_euclid(86_400) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

/// A running `portico control-plane`. Killed on drop.
pub struct ControlPlane {
    child: Option<Child>,
    pub addr: SocketAddr,
    /// `http://127.0.0.1:PORT`
    pub url: String,
    pub data_dir: PathBuf,
    pub db: Db,
}

impl ControlPlane {
    /// Starts the control plane with its data (admin token, SQLite) under `data_dir`.
    /// Waits up to 60 s for it to listen.
    pub fn start(data_dir: &Path, db: &Db) -> ControlPlane {
        Self::start_with(data_dir, db, &[])
    }

    /// Like [`ControlPlane::start`], with extra flags.
    pub fn start_with(data_dir: &Path, db: &Db, extra: &[&str]) -> ControlPlane {
        Self::start_on(data_dir, db, "127.0.0.1:0", extra)
    }

    /// Like [`ControlPlane::start_with`], listening on `listen` (e.g. to come back on the same
    /// address after [`ControlPlane::stop`], as key files name the control plane's URL).
    pub fn start_on(data_dir: &Path, db: &Db, listen: &str, extra: &[&str]) -> ControlPlane {
        Self::spawn(data_dir, db, listen, extra, None)
    }

    /// Like [`ControlPlane::start_with`], in a process allowed only `nofile` file descriptors.
    pub fn start_with_fd_limit(
        data_dir: &Path,
        db: &Db,
        extra: &[&str],
        nofile: u64,
    ) -> ControlPlane {
        Self::spawn(data_dir, db, "127.0.0.1:0", extra, Some(nofile))
    }

    fn spawn(
        data_dir: &Path,
        db: &Db,
        listen: &str,
        extra: &[&str],
        nofile: Option<u64>,
    ) -> ControlPlane {
        std::fs::create_dir_all(data_dir).expect("create data dir");
        let log_path = data_dir.join("control-plane.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .expect("open log");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_portico"));
        cmd.arg("control-plane")
            .arg("--listen")
            .arg(listen)
            .arg("--data")
            .arg(data_dir);
        if let Db::Postgres { url, schema } = db {
            cmd.arg("--database-url")
                .arg(url)
                .arg("--database-schema")
                .arg(schema);
        }
        cmd.args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log));
        if let Some(n) = nofile {
            limit_fds(&mut cmd, n);
        }
        let mut child = cmd.spawn().expect("spawn portico control-plane");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            while let Some(Ok(line)) = lines.next() {
                if let Some(a) = line.strip_prefix("listening on http://") {
                    let _ = tx.send(a.trim().to_string());
                }
            }
        });
        let mut cp = ControlPlane {
            child: Some(child),
            addr: "127.0.0.1:1".parse().expect("addr"),
            url: String::new(),
            data_dir: data_dir.to_path_buf(),
            db: db.clone(),
        };
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(a) => {
                cp.addr = a.parse().expect("listen address");
                cp.url = format!("http://{}", cp.addr);
            }
            Err(_) => panic!(
                "control plane did not start within 60 s; log:\n{}",
                cp.log()
            ),
        }
        cp
    }

    /// The admin token's path (`<data>/admin-token`).
    pub fn admin_token_path(&self) -> PathBuf {
        self.data_dir.join("admin-token")
    }

    pub fn admin_token(&self) -> String {
        std::fs::read_to_string(self.admin_token_path())
            .expect("admin token")
            .trim()
            .to_string()
    }

    /// Everything the server logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data_dir.join("control-plane.log")).unwrap_or_default()
    }

    /// Kills the process and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops and starts again on the same data (a new port).
    pub fn restart(&mut self) {
        self.stop();
        let next = ControlPlane::start(&self.data_dir.clone(), &self.db.clone());
        // Move the new child into self; `next` must not kill it on drop.
        let mut next = next;
        self.child = next.child.take();
        self.addr = next.addr;
        self.url = next.url.clone();
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Runs `cmd`'s process with at most `nofile` file descriptors (soft and hard limit).
pub fn limit_fds(cmd: &mut Command, nofile: u64) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the child between fork and exec; it only calls setrlimit(2),
    // which is async-signal-safe, and touches no memory shared with the parent.
    unsafe {
        cmd.pre_exec(move || {
            let lim = libc::rlimit {
                rlim_cur: nofile as libc::rlim_t,
                rlim_max: nofile as libc::rlim_t,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Result of one gcloud run.
#[derive(Debug)]
pub struct Output {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn ok(&self) -> bool {
        self.code == Some(0)
    }
}

impl std::fmt::Display for Output {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// The real gcloud, configured for one control plane.
pub struct Gcloud {
    dir: tempfile::TempDir,
    pub project: String,
}

/// APIs whose endpoint overrides point at the control plane.
pub const OVERRIDDEN_APIS: &[&str] = &[
    "servicemanagement",
    "serviceusage",
    "iam",
    "cloudresourcemanager",
    "apikeys",
];

impl Gcloud {
    /// A fresh `CLOUDSDK_CONFIG` pointing every override at `base_url`, authenticating with the
    /// token in `token_file`, project `demo-proj`.
    pub fn new(base_url: &str, token_file: &Path) -> Gcloud {
        let g = Gcloud {
            dir: tempfile::tempdir().expect("gcloud config dir"),
            project: "demo-proj".to_string(),
        };
        g.configure(base_url, token_file);
        g
    }

    /// Rewrites the configuration (e.g. after the control plane moved to a new port).
    pub fn configure(&self, base_url: &str, token_file: &Path) {
        let base = base_url.trim_end_matches('/');
        let mut ini = format!(
            "[core]\ndisable_prompts = true\nproject = {}\ndisable_usage_reporting = true\n\
             [component_manager]\ndisable_update_check = true\n\
             [auth]\naccess_token_file = {}\n\
             [api_endpoint_overrides]\n",
            self.project,
            token_file.display()
        );
        for api in OVERRIDDEN_APIS {
            ini.push_str(&format!("{api} = {base}/\n"));
        }
        let confs = self.dir.path().join("configurations");
        std::fs::create_dir_all(&confs).expect("configurations dir");
        std::fs::write(confs.join("config_default"), ini).expect("write gcloud config");
        std::fs::write(self.dir.path().join("active_config"), "default").expect("active_config");
    }

    pub fn config_dir(&self) -> &Path {
        self.dir.path()
    }

    /// Runs `gcloud <args>` in `cwd` (or the config dir), killing it after `timeout`.
    pub fn run_in(&self, cwd: Option<&Path>, args: &[&str], timeout: Duration) -> Output {
        let mut cmd = Command::new("gcloud");
        cmd.args(args)
            .current_dir(cwd.unwrap_or(self.dir.path()))
            .env("CLOUDSDK_CONFIG", self.dir.path())
            .env("CLOUDSDK_CORE_DISABLE_PROMPTS", "1")
            .env_remove("CLOUDSDK_AUTH_ACCESS_TOKEN")
            .env_remove("CLOUDSDK_AUTH_ACCESS_TOKEN_FILE")
            .env_remove("CLOUDSDK_CORE_PROJECT")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn gcloud");
        let out = child.stdout.take().expect("stdout");
        let err = child.stderr.take().expect("stderr");
        let read = |mut r: Box<dyn Read + Send>| {
            std::thread::spawn(move || {
                let mut s = String::new();
                let _ = r.read_to_string(&mut s);
                s
            })
        };
        let out_t = read(Box::new(out));
        let err_t = read(Box::new(err));
        let deadline = Instant::now() + timeout;
        let code = loop {
            match child.try_wait() {
                Ok(Some(st)) => break st.code(),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    let stderr = err_t.join().unwrap_or_default();
                    panic!("gcloud {args:?} timed out after {timeout:?}; stderr:\n{stderr}");
                }
            }
        };
        Output {
            code,
            stdout: out_t.join().unwrap_or_default(),
            stderr: err_t.join().unwrap_or_default(),
        }
    }

    /// `run_in` with the config dir as working directory and a 120 s limit.
    pub fn run(&self, args: &[&str]) -> Output {
        self.run_in(None, args, Duration::from_secs(120))
    }
}

/// A `portico <subcommand>` child process with its output in a log file; killed on drop.
pub struct Proc {
    child: Child,
    log: PathBuf,
}

impl Proc {
    /// Spawns `portico <args>`, stdout and stderr to `log`.
    pub fn spawn<S: AsRef<std::ffi::OsStr>>(args: &[S], log: &Path) -> Proc {
        let out = std::fs::File::create(log).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_portico"))
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log fd"))
            .stderr(out)
            .spawn()
            .expect("spawn portico");
        Proc {
            child,
            log: log.to_path_buf(),
        }
    }

    /// Everything the process printed so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits up to 60 s for `127.0.0.1:port` to accept connections; fails early, with the log,
    /// if the process exits first.
    pub fn wait_for_port(&mut self, port: u16, what: &str) {
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let deadline = Instant::now() + Duration::from_secs(60);
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("{what} exited ({status}); log:\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "{what} did not listen on {port} within 60 s; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loopback port that was free a moment ago (bind to port 0, read it back, release it).
/// `portico echo` and, in front of it, `portico esp` for `service` (managed rollout, the
/// proxy's identity from `key_file`, then `extra` flags), each logging into `dir`. Returns
/// both processes (killed on drop) and the proxy's port.
pub fn echo_and_esp(
    dir: &Path,
    service: &str,
    key_file: &Path,
    extra: &[String],
) -> (Proc, Proc, u16) {
    let echo_port = free_port();
    let mut echo = Proc::spawn(
        &["echo".into(), "--port".into(), echo_port.to_string()],
        &dir.join("echo.log"),
    );
    echo.wait_for_port(echo_port, "portico echo");
    let proxy_port = free_port();
    let mut args = vec![
        "esp".to_string(),
        format!("--service={service}"),
        "--rollout_strategy=managed".into(),
        format!("--http_port={proxy_port}"),
        format!("--status_port={}", free_port()),
        format!("--backend=127.0.0.1:{echo_port}"),
        format!("--service_account_key={}", key_file.display()),
    ];
    args.extend_from_slice(extra);
    let mut esp = Proc::spawn(&args, &dir.join("esp.log"));
    esp.wait_for_port(proxy_port, "portico esp");
    (echo, esp, proxy_port)
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// `curl` as the seed runs it (POST `{"message":"hello world"}` as JSON); returns (status, body).
pub fn curl_echo(url: &str) -> (u16, String) {
    let out = Command::new("curl")
        .args([
            "--silent",
            "--show-error",
            "--max-time",
            "10",
            "--request",
            "POST",
            "--header",
            "content-type:application/json",
            "--data",
            r#"{"message":"hello world"}"#,
            "--write-out",
            "\n%{http_code}",
            url,
        ])
        .output()
        .expect("run curl");
    assert!(
        out.status.success(),
        "curl {url} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').expect("curl write-out");
    (code.trim().parse().expect("status code"), body.to_string())
}

/// Fails the test with gcloud's output unless it exited 0.
pub fn expect_ok(what: &str, out: &Output) {
    assert!(out.ok(), "{what} failed:\n{out}");
}

/// Parses a response body, failing the test with the body when it is not JSON.
pub fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

/// Sum of `requestCount` over every point of the echo method's series in a
/// `/portico/v1/services/{svc}/timeseries` answer (counts may be numbers or proto3 strings).
pub fn echo_request_count(timeseries: &serde_json::Value) -> i64 {
    timeseries["timeSeries"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|ts| {
            ts["method"]
                .as_str()
                .is_some_and(|m| m.ends_with(".echo") || m.ends_with(".Echo"))
        })
        .flat_map(|ts| ts["points"].as_array().cloned().unwrap_or_default())
        .map(|p| {
            p["requestCount"]
                .as_i64()
                .or_else(|| p["requestCount"].as_str().and_then(|s| s.parse().ok()))
                .unwrap_or(0)
        })
        .sum()
}

/// The control plane's REST API as the admin (what gcloud would send, without gcloud's start-up
/// cost), for the set-up steps of tests that are about something else.
pub struct Api {
    http: reqwest::blocking::Client,
    pub base: String,
    token: String,
}

impl ControlPlane {
    /// The REST API of this control plane, with its admin token.
    pub fn api(&self) -> Api {
        Api::new(&self.url, &self.admin_token())
    }
}

impl Api {
    pub fn new(base: &str, token: &str) -> Api {
        Api {
            http: reqwest::blocking::Client::builder()
                .timeout(Duration::from_secs(30))
                .no_proxy()
                .build()
                .expect("client"),
            base: base.to_string(),
            token: token.trim().to_string(),
        }
    }

    /// Status and body (JSON, or the text as a JSON string).
    pub fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> (u16, serde_json::Value) {
        let mut req = self
            .http
            .request(method.clone(), format!("{}{path}", self.base))
            .bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req
            .send()
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let status = resp.status().as_u16();
        let text = resp.text().unwrap_or_default();
        (
            status,
            serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)),
        )
    }

    /// The body of a call that must succeed (any 2xx).
    pub fn ok(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> serde_json::Value {
        let (status, v) = self.call(method.clone(), path, body);
        assert!(
            (200..300).contains(&status),
            "{method} {path}: HTTP {status}: {v}"
        );
        v
    }

    pub fn post(&self, path: &str, body: serde_json::Value) -> serde_json::Value {
        self.ok(reqwest::Method::POST, path, Some(body))
    }

    /// Follows a Service Management / Service Usage / IAM operation (`/v1/operations/...`) to
    /// its `response`.
    pub fn wait(&self, op: serde_json::Value) -> serde_json::Value {
        self.follow(op, |name| {
            let id = name.strip_prefix("operations/").unwrap_or(name);
            let encoded = id
                .replace('%', "%25")
                .replace(':', "%3A")
                .replace('/', "%2F");
            format!("/v1/operations/{encoded}")
        })
    }

    /// Follows an API Keys operation (`/v2/operations/...`) to its `response`.
    pub fn wait_v2(&self, op: serde_json::Value) -> serde_json::Value {
        self.follow(op, |name| format!("/v2/{name}"))
    }

    fn follow(
        &self,
        mut op: serde_json::Value,
        path_of: impl Fn(&str) -> String,
    ) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        while op["done"] != true {
            assert!(Instant::now() < deadline, "operation did not finish: {op}");
            std::thread::sleep(Duration::from_millis(100));
            let name = op["name"].as_str().expect("operation name").to_string();
            op = self.ok(reqwest::Method::GET, &path_of(&name), None);
        }
        assert!(op["error"].is_null(), "operation failed: {op}");
        op["response"].clone()
    }

    /// What `gcloud endpoints services deploy` does for one OpenAPI file, then the rollout:
    /// creates `service` in `producer`, submits `openapi`, rolls the new config out to 100 %
    /// and binds `roles/servicemanagement.serviceController` for `controller` (the proxy's
    /// service account). Returns the config id.
    pub fn deploy(&self, service: &str, producer: &str, openapi: &str, controller: &str) -> String {
        self.deploy_file(service, producer, "openapi.yaml", openapi, controller)
    }

    /// [`Api::deploy`] of a file named `file_path`, sent as gcloud sends any OpenAPI file
    /// (2.0 or, from gcloud 543, 3.x): `OPEN_API_YAML`, URL-safe base64, `validateOnly: false`.
    pub fn deploy_file(
        &self,
        service: &str,
        producer: &str,
        file_path: &str,
        openapi: &str,
        controller: &str,
    ) -> String {
        use base64::Engine as _;
        let op = self.post(
            "/v1/services",
            serde_json::json!({"producerProjectId": producer, "serviceName": service}),
        );
        self.wait(op);
        let contents = base64::engine::general_purpose::URL_SAFE.encode(openapi.as_bytes());
        let op = self.post(
            &format!("/v1/services/{service}/configs:submit"),
            serde_json::json!({"configSource": {"files": [{"fileContents": contents,
                "filePath": file_path, "fileType": "OPEN_API_YAML"}]}, "validateOnly": false}),
        );
        let config_id = self.wait(op)["serviceConfig"]["id"]
            .as_str()
            .expect("config id")
            .to_string();
        let op = self.post(
            &format!("/v1/services/{service}/rollouts"),
            serde_json::json!({"serviceName": service,
                "trafficPercentStrategy": {"percentages": {config_id.as_str(): 100.0}}}),
        );
        self.wait(op);
        self.post(
            &format!("/v1/services/{service}:setIamPolicy"),
            serde_json::json!({"policy": {"bindings": [{
                "role": "roles/servicemanagement.serviceController",
                "members": [format!("serviceAccount:{controller}")]}]}}),
        );
        config_id
    }

    /// `gcloud services enable` of `service` in `project`.
    pub fn enable(&self, project: &str, service: &str) {
        let op = self.post(
            &format!("/v1/projects/{project}/services/{service}:enable"),
            serde_json::json!({}),
        );
        self.wait(op);
    }

    /// Creates the service account `account_id@project` and a key for it, written to
    /// `dir/<account_id>-key.json`: the proxy's identity. Returns the email and the key file.
    pub fn proxy_account(&self, project: &str, account_id: &str, dir: &Path) -> (String, PathBuf) {
        let email = format!("{account_id}@{project}.iam.gserviceaccount.com");
        self.post(
            &format!("/v1/projects/{project}/serviceAccounts"),
            serde_json::json!({"accountId": account_id}),
        );
        let (_, text) = self.create_key(&email);
        let key_file = dir.join(format!("{account_id}-key.json"));
        std::fs::write(&key_file, text).expect("write key file");
        (email, key_file)
    }

    /// Creates a key for the service account: the parsed key file and its text.
    pub fn create_key(&self, email: &str) -> (portico_credentials::ServiceAccountKey, String) {
        use base64::Engine as _;
        let key = self.post(
            &format!("/v1/projects/-/serviceAccounts/{email}/keys"),
            serde_json::json!({"privateKeyType": "TYPE_GOOGLE_CREDENTIALS_FILE"}),
        );
        let data = key["privateKeyData"].as_str().expect("privateKeyData");
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(data)
            .expect("base64 key file");
        let text = String::from_utf8(bytes).expect("utf-8 key file");
        let parsed = portico_credentials::ServiceAccountKey::from_json_str(&text, "created key")
            .expect("key file");
        (parsed, text)
    }
}
