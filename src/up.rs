//! `portico up`: the whole walkthrough on one machine with nothing else installed.
//!
//! It starts three child processes of this same binary, the way production runs them:
//! `portico control-plane` on SQLite under `./.portico/`, the `portico echo` sample (unless
//! `--backend` names the user's own API), and `portico esp` with ESP's own flags. In between it
//! performs, over the control plane's REST API and with its admin token, the calls gcloud makes in
//! the walkthrough: create the service, submit the OpenAPI file, roll it out, enable it; create a
//! service account, a key file for it and the serviceController binding; create an API key.
//!
//! `portico up --grpc` does the same for the gRPC sample: `portico bookstore` as the backend,
//! the Bookstore's descriptor set and api_config.yaml deployed as `gcloud endpoints services
//! deploy api_descriptor.pb api_config.yaml` does, and the proxy with `--http2_port` and
//! `--backend=grpc://...`.
//!
//! Re-running reuses everything in `.portico/` (`state.json` names the service, the key file and
//! the API key); only a changed OpenAPI file is submitted again. Ctrl-C (or SIGTERM) stops the
//! children and waits for them. Child output goes to `.portico/logs/`.
//!
//! Everything under `.portico/` is private: the directories are 0700 and the files 0600 (files
//! an older version left readable are tightened at start), and a directory that cannot be
//! used is refused before any port is claimed or child started.

use anyhow::{anyhow, bail, Context, Result};
use base64::Engine as _;
use serde_json::{json, Value};
use std::ffi::OsString;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};

/// The getting-started API; `YOUR-...` placeholders are filled in for the local project.
const SAMPLE_OPENAPI: &str = include_str!("../examples/echo/openapi.yaml");

const SA_ACCOUNT_ID: &str = "portico-up";
const SERVICE_CONTROLLER: &str = "roles/servicemanagement.serviceController";
const CLOUDTRACE_AGENT: &str = "roles/cloudtrace.agent";
/// The proxy's auto-sampling for the sample: up to this many traced requests a second, so
/// every curl line printed is traced (ESP's default is one request per 10 s).
const TRACES_PER_SECOND: u32 = 100;
/// How long a child gets to start listening, and an API operation to finish.
const START_TIMEOUT: Duration = Duration::from_secs(60);
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

const USAGE: &str = "usage: portico up [flags]

Runs the control plane (SQLite under --data), the echo sample backend and the proxy on this
machine, deploys the API, creates a service account key and an API key, and prints the curl and
gcloud lines that use them. Ctrl-C stops everything. Re-running reuses the state in --data.

flags:
  --port N                proxy port (ESP's --http_port)                   [8082]
  --backend-port N        port of the echo sample backend                  [8080]
  --control-plane-port N  port of the control plane                        [8000]
  --status-port N         proxy status port (/endpoints_status, /healthz)  [8090]
                          (a port of 0 picks a free one)
  --data DIR              state directory                                  [./.portico]
  --project ID            producer and consumer project                    [demo-proj]
  --openapi FILE          front your own API (OpenAPI 2.0 or 3.x) instead of the sample (needs --backend)
  --backend ADDR          your API's address, e.g. 127.0.0.1:3000 (with --openapi)
  --access-log DEST       the proxy's access log: a file, or off   [.portico/logs/esp.log]
  --grpc                  the gRPC sample instead: the Bookstore (portico bookstore) behind
                          the proxy's h2c port (--port is then ESP's --http2_port)
  --http-port N           with --grpc: the proxy's HTTP/1.1 port (ESP's --http_port), where
                          HTTP/JSON calls are transcoded to gRPC and gRPC-Web is served  [8083]
";

#[derive(Debug, Clone)]
struct Options {
    port: u16,
    backend_port: u16,
    control_plane_port: u16,
    status_port: u16,
    data: PathBuf,
    project: String,
    openapi: Option<PathBuf>,
    backend: Option<String>,
    access_log: Option<String>,
    grpc: bool,
    /// With `grpc`: ESP's `--http_port`, where curl's HTTP/JSON calls are transcoded.
    http_port: Option<u16>,
}

fn parse(args: &[OsString]) -> Result<Option<Options>> {
    let mut o = Options {
        port: 8082,
        backend_port: 8080,
        control_plane_port: 8000,
        status_port: 8090,
        data: PathBuf::from(".portico"),
        project: "demo-proj".into(),
        openapi: None,
        backend: None,
        access_log: None,
        grpc: false,
        http_port: None,
    };
    let mut it = args
        .iter()
        .skip(1)
        .map(|a| a.to_string_lossy().into_owned());
    while let Some(arg) = it.next() {
        if arg == "-h" || arg == "--help" {
            print!("{USAGE}");
            return Ok(None);
        }
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) => (n.to_string(), Some(v.to_string())),
            None => (arg.clone(), None),
        };
        let mut value = |what: &str| -> Result<String> {
            inline
                .clone()
                .or_else(|| it.next())
                .ok_or_else(|| anyhow!("{what} needs a value"))
        };
        let port = |v: String, what: &str| -> Result<u16> {
            v.parse()
                .map_err(|_| anyhow!("{what} takes a port number (0-65535), got {v:?}"))
        };
        match name.as_str() {
            "--port" | "--http_port" => o.port = port(value(&name)?, &name)?,
            "--backend-port" => o.backend_port = port(value(&name)?, &name)?,
            "--control-plane-port" => o.control_plane_port = port(value(&name)?, &name)?,
            "--status-port" => o.status_port = port(value(&name)?, &name)?,
            "--data" => o.data = PathBuf::from(value(&name)?),
            "--project" => o.project = value(&name)?,
            "--openapi" => o.openapi = Some(PathBuf::from(value(&name)?)),
            "--backend" => o.backend = Some(value(&name)?),
            "--access-log" => o.access_log = Some(value(&name)?),
            "--grpc" if inline.is_none() => o.grpc = true,
            "--http-port" => o.http_port = Some(port(value(&name)?, &name)?),
            _ => bail!("unknown flag {arg:?}\n\n{USAGE}"),
        }
    }
    if o.http_port.is_some() && !o.grpc {
        bail!("--http-port is the gRPC sample's HTTP/JSON port; it needs --grpc (without --grpc, --port is the HTTP port)");
    }
    if o.grpc && o.http_port.is_none() {
        o.http_port = Some(8083);
    }
    if o.grpc && (o.openapi.is_some() || o.backend.is_some()) {
        bail!(
            "--grpc runs the Bookstore sample; it cannot be combined with --openapi and --backend"
        );
    }
    if o.openapi.is_some() != o.backend.is_some() {
        bail!("--openapi and --backend go together: the proxy needs both your API's description and its address");
    }
    if o.project.is_empty()
        || !o
            .project
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    {
        bail!("--project must be a project ID: lower-case letters, digits and hyphens");
    }
    Ok(Some(o))
}

pub fn main(args: Vec<OsString>) -> ExitCode {
    let opts = match parse(&args) {
        Ok(Some(o)) => o,
        Ok(None) => return ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("portico up: {e:#}");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("portico up: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        let mut children = Children::default();
        let result = run(opts, &mut children).await;
        children.stop().await;
        match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("portico up: {e:#}");
                ExitCode::FAILURE
            }
        }
    })
}

// ---------------------------------------------------------------------------------------------
// Child processes.

struct Proc {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

/// The children, stopped in reverse start order (proxy first, control plane last).
#[derive(Default)]
struct Children(Vec<Proc>);

impl Children {
    fn spawn(&mut self, name: &'static str, args: &[String], logs: &Path) -> Result<()> {
        let exe = std::env::current_exe().context("cannot find the portico executable")?;
        let log = logs.join(format!("{name}.log"));
        let out = {
            use std::os::unix::fs::OpenOptionsExt as _;
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&log)
                .with_context(|| format!("cannot create {}", log.display()))?
        };
        // The mode above applies to new files only.
        portico_control_plane::datadir::tighten(&log, 0o600);
        let err = out.try_clone()?;
        let child = Command::new(exe)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start portico {name}"))?;
        self.0.push(Proc { name, child, log });
        Ok(())
    }

    /// Fails if a child has exited, naming it and the tail of its log.
    fn check(&mut self) -> Result<()> {
        for p in &mut self.0 {
            if let Ok(Some(status)) = p.child.try_wait() {
                bail!(
                    "portico {} exited ({status}); last lines of {}:\n{}",
                    p.name,
                    p.log.display(),
                    tail(&p.log, 15)
                );
            }
        }
        Ok(())
    }

    /// Resolves when any child exits.
    async fn any_exit(&mut self) -> (&'static str, PathBuf, String) {
        loop {
            for p in &mut self.0 {
                if let Ok(Some(status)) = p.child.try_wait() {
                    return (p.name, p.log.clone(), status.to_string());
                }
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    async fn stop(&mut self) {
        while let Some(mut p) = self.0.pop() {
            if let Ok(Some(_)) = p.child.try_wait() {
                continue;
            }
            // SIGINT: every subcommand treats it as Ctrl-C and shuts down cleanly.
            if let Some(pid) = p.child.id() {
                // SAFETY: kill(2) with a pid we spawned and still own (not yet reaped).
                unsafe {
                    libc::kill(pid as libc::pid_t, libc::SIGINT);
                }
            }
            match tokio::time::timeout(STOP_TIMEOUT, p.child.wait()).await {
                Ok(_) => {}
                Err(_) => {
                    eprintln!(
                        "portico up: {} did not stop within {STOP_TIMEOUT:?}; killing it",
                        p.name
                    );
                    let _ = p.child.kill().await;
                }
            }
        }
    }
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Resolves a requested port: 0 picks a free one; a busy port is a clear error naming the flag.
fn claim_port(port: u16, flag: &str) -> Result<u16> {
    match TcpListener::bind((Ipv4Addr::LOCALHOST, port)) {
        Ok(l) => Ok(l.local_addr()?.port()),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            bail!("port {port} is already in use; pass {flag}")
        }
        Err(e) => bail!("cannot use port {port} ({flag}): {e}"),
    }
}

/// Waits until something accepts TCP connections on `port`, failing early if a child dies.
async fn wait_listening(children: &mut Children, port: u16, what: &str) -> Result<()> {
    let deadline = Instant::now() + START_TIMEOUT;
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    loop {
        children.check()?;
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{what} did not start listening on {addr} within {START_TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The control plane binds its port before it has opened the database and written the admin
/// token, so listening is not enough: wait for the token itself.
async fn wait_admin_token(children: &mut Children, path: &Path) -> Result<String> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        children.check()?;
        match std::fs::read_to_string(path) {
            Ok(t) if !t.trim().is_empty() => return Ok(t.trim().to_string()),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("cannot read the admin token {}", path.display()))
            }
        }
        if Instant::now() > deadline {
            bail!(
                "the control plane did not write {} within {START_TIMEOUT:?}",
                path.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// State kept between runs.

#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct State {
    project: String,
    service: String,
    #[serde(default)]
    config_id: Option<String>,
    /// Exactly what was last submitted, so an unchanged file is not submitted again.
    #[serde(default)]
    submitted_openapi: Option<String>,
    #[serde(default)]
    service_account: Option<String>,
    #[serde(default)]
    api_key_name: Option<String>,
}

impl State {
    fn load(path: &Path) -> Result<Option<State>> {
        match std::fs::read_to_string(path) {
            Ok(text) => Ok(Some(serde_json::from_str(&text).with_context(|| {
                format!("{} is not valid; delete it to start over", path.display())
            })?)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
        }
    }

    fn save(&self, path: &Path) -> Result<()> {
        let tmp = path.with_extension("json.tmp");
        write_private(&tmp, &serde_json::to_vec_pretty(self)?)?;
        std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
    }
}

/// Writes `bytes` to `path` readable by the owner only (key files are credentials).
fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    f.write_all(bytes)?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The control plane's REST API, called as gcloud calls it.

struct Api {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Api {
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<(u16, Value)> {
        let url = format!("{}{path}", self.base);
        let mut req = self
            .http
            .request(method.clone(), &url)
            .bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req
            .send()
            .await
            .with_context(|| format!("{method} {url}"))?;
        let status = resp.status().as_u16();
        let text = resp
            .text()
            .await
            .with_context(|| format!("{method} {url}"))?;
        let value = if text.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        Ok((status, value))
    }

    /// A call that must succeed.
    async fn ok(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Result<Value> {
        let (status, v) = self.call(method.clone(), path, body).await?;
        if !(200..300).contains(&status) {
            bail!("{method} {path}: HTTP {status}: {}", error_message(&v));
        }
        Ok(v)
    }

    async fn get(&self, path: &str) -> Result<(u16, Value)> {
        self.call(reqwest::Method::GET, path, None).await
    }

    async fn post(&self, path: &str, body: Value) -> Result<Value> {
        self.ok(reqwest::Method::POST, path, Some(body)).await
    }

    /// Waits for a long-running operation; `version` is `v1` (Service Management, Service
    /// Usage) or `v2` (API Keys). Returns the operation's `response`.
    async fn wait(&self, op: Value, version: &str) -> Result<Value> {
        let deadline = Instant::now() + START_TIMEOUT;
        let mut op = op;
        loop {
            if op["done"] == true {
                if !op["error"].is_null() {
                    bail!(
                        "operation {} failed: {}",
                        op["name"],
                        op["error"]["message"].as_str().unwrap_or("(no message)")
                    );
                }
                return Ok(op["response"].clone());
            }
            let name = op["name"]
                .as_str()
                .ok_or_else(|| anyhow!("operation without a name: {op}"))?;
            let id = name.strip_prefix("operations/").unwrap_or(name);
            if Instant::now() > deadline {
                bail!("operation {name} did not finish within {START_TIMEOUT:?}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            let encoded = id
                .replace('%', "%25")
                .replace(':', "%3A")
                .replace('/', "%2F");
            op = self
                .ok(
                    reqwest::Method::GET,
                    &format!("/{version}/operations/{encoded}"),
                    None,
                )
                .await?;
        }
    }
}

fn error_message(v: &Value) -> String {
    v["error"]["message"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| v.to_string())
}

/// The service name, as gcloud derives it: OpenAPI 2.0's `host`, or in OpenAPI 3.x the host of
/// the server marked `x-google-endpoint` (the converter finds it; a 2.0 file with errors still
/// names its service by its `host` line, and the control plane then lists the errors).
fn openapi_host(text: &str) -> Result<String> {
    let conversion = portico_config::convert(&[portico_config::SourceFile::new("openapi", text)]);
    if let Ok(c) = &conversion {
        return Ok(c.service.name.clone());
    }
    for line in text.lines() {
        let l = line.trim_end();
        // Top-level key only (no indentation), YAML or JSON-ish.
        let rest = l
            .strip_prefix("host:")
            .or_else(|| l.trim_start().strip_prefix("\"host\":"));
        if let Some(rest) = rest {
            let host = rest
                .trim()
                .trim_end_matches(',')
                .trim_matches(|c| c == '"' || c == '\'')
                .to_string();
            if !host.is_empty() {
                return Ok(host);
            }
        }
    }
    let errors = conversion.err().map(|e| e.to_string()).unwrap_or_default();
    bail!("the OpenAPI file names no service: OpenAPI 2.0 needs a top-level `host` (e.g. host: \"my-api.endpoints.PROJECT.cloud.goog\"), OpenAPI 3.x a server with x-google-endpoint (servers: [{{url: \"https://my-api.endpoints.PROJECT.cloud.goog\", x-google-endpoint: {{}}}}]):\n{errors}")
}

/// The sample with its placeholders filled in for this machine: the project, the service
/// account that `up` creates, and JWKS URLs served by the local control plane instead of Google.
fn sample_openapi(project: &str, sa_email: &str, control_plane: &str) -> String {
    SAMPLE_OPENAPI
        .replace("https://www.googleapis.com/", &format!("{control_plane}/"))
        .replace("YOUR-SERVICE-ACCOUNT-EMAIL", sa_email)
        .replace("YOUR-CLIENT-PROJECT-ID", project)
        .replace("YOUR-PROJECT-ID", project)
        .replace("YOUR-CLIENT-ID", &format!("{project}-client"))
}

/// examples/bookstore-grpc/api_config.yaml for this project.
fn grpc_sample_yaml(project: &str) -> String {
    portico_bookstore::API_CONFIG_YAML.replace("demo-proj", project)
}

/// The top-level `name:` of a service config YAML (the service it deploys).
fn yaml_service_name(yaml: &str) -> Result<String> {
    yaml.lines()
        .find_map(|l| l.strip_prefix("name:"))
        .map(|v| v.trim().trim_matches(|c| c == '"' || c == '\'').to_string())
        .filter(|n| !n.is_empty())
        .ok_or_else(|| anyhow!("the service config YAML has no top-level name"))
}

struct Deployed {
    service: String,
    config_id: String,
    key_file: PathBuf,
    api_key: String,
}

async fn deploy(
    api: &Api,
    opts: &Options,
    state: &mut State,
    state_path: &Path,
) -> Result<Deployed> {
    let project = &opts.project;
    let sa_email = format!("{SA_ACCOUNT_ID}@{project}.iam.gserviceaccount.com");
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE.encode(b);
    // What is submitted (the `configSource.files`), the service it names, and a text that
    // changes whenever the files do (kept in state.json to skip an unchanged submission).
    let (files, service, submitted) = if opts.grpc {
        let yaml = grpc_sample_yaml(project);
        let service = yaml_service_name(&yaml)?;
        let files = json!([
            {"fileContents": b64(portico_bookstore::DESCRIPTOR_SET), "filePath": "api_descriptor.pb", "fileType": "FILE_DESCRIPTOR_SET_PROTO"},
            {"fileContents": b64(yaml.as_bytes()), "filePath": "api_config.yaml", "fileType": "SERVICE_CONFIG_YAML"},
        ]);
        let submitted = format!(
            "grpc\n{yaml}\n{}",
            base64::engine::general_purpose::STANDARD.encode(portico_bookstore::DESCRIPTOR_SET)
        );
        (files, service, submitted)
    } else {
        let openapi = match &opts.openapi {
            Some(path) => std::fs::read_to_string(path)
                .with_context(|| format!("cannot read --openapi {}", path.display()))?,
            None => sample_openapi(project, &sa_email, &api.base),
        };
        let service = openapi_host(&openapi)?;
        let file_name = opts
            .openapi
            .as_ref()
            .and_then(|p| p.file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "openapi.yaml".into());
        let files = json!([{"fileContents": b64(openapi.as_bytes()), "filePath": file_name, "fileType": "OPEN_API_YAML"}]);
        (files, service, openapi)
    };

    // Service Management: create the service when it does not exist (gcloud reads 403/404 so).
    let (status, _) = api.get(&format!("/v1/services/{service}")).await?;
    let created = match status {
        200 => false,
        403 | 404 => {
            let op = api
                .post(
                    "/v1/services",
                    json!({"producerProjectId": project, "serviceName": service}),
                )
                .await?;
            api.wait(op, "v1").await.context("creating the service")?;
            true
        }
        s => bail!("GET /v1/services/{service}: unexpected HTTP {s}"),
    };
    let unchanged = !created
        && state.service == service
        && state.submitted_openapi.as_deref() == Some(submitted.as_str())
        && state.config_id.is_some();
    let config_id = match (&state.config_id, unchanged) {
        (Some(id), true) => id.clone(),
        _ => {
            let op = api
                .post(
                    &format!("/v1/services/{service}/configs:submit"),
                    json!({"configSource": {"files": files}, "validateOnly": false}),
                )
                .await?;
            let resp = api
                .wait(op, "v1")
                .await
                .context("submitting the service's files")?;
            // The sample's warnings (no API key on the JWT methods) are by design; the user's
            // own file gets every diagnostic, as gcloud prints them.
            let diagnostics = resp["diagnostics"].as_array().into_iter().flatten();
            for d in diagnostics.filter(|d| opts.openapi.is_some() || d["kind"] == "ERROR") {
                eprintln!(
                    "portico up: {}: {}: {}",
                    d["kind"].as_str().unwrap_or("NOTE"),
                    d["location"].as_str().unwrap_or(""),
                    d["message"].as_str().unwrap_or("")
                );
            }
            let id = resp["serviceConfig"]["id"]
                .as_str()
                .ok_or_else(|| anyhow!("configs:submit returned no serviceConfig.id: {resp}"))?
                .to_string();
            let op = api
                .post(
                    &format!("/v1/services/{service}/rollouts"),
                    json!({"serviceName": service, "trafficPercentStrategy": {"percentages": {id.clone(): 100.0}}}),
                )
                .await?;
            api.wait(op, "v1").await.context("rolling out the config")?;
            id
        }
    };
    // Service Usage: enable it for the project (idempotent).
    let op = api
        .post(
            &format!("/v1/projects/{project}/services/{service}:enable"),
            json!({}),
        )
        .await?;
    api.wait(op, "v1").await.context("enabling the service")?;
    state.project = project.clone();
    state.service = service.clone();
    state.config_id = Some(config_id.clone());
    state.submitted_openapi = Some(submitted);
    state.save(state_path)?;

    // IAM: the proxy's service account (409 = it already exists).
    let (status, v) = api
        .call(
            reqwest::Method::POST,
            &format!("/v1/projects/{project}/serviceAccounts"),
            Some(json!({"accountId": SA_ACCOUNT_ID, "serviceAccount": {"displayName": "portico up proxy"}})),
        )
        .await?;
    if !(200..300).contains(&status) && status != 409 {
        bail!(
            "creating service account {sa_email}: HTTP {status}: {}",
            error_message(&v)
        );
    }
    state.service_account = Some(sa_email.clone());
    state.save(state_path)?;

    // The serviceController binding on the service, and (so the proxy's traces are accepted)
    // the walkthrough's roles/cloudtrace.agent on the project, each added unless present.
    let member = format!("serviceAccount:{sa_email}");
    ensure_binding(
        api,
        &format!("/v1/services/{service}"),
        SERVICE_CONTROLLER,
        &member,
    )
    .await?;
    ensure_binding(
        api,
        &format!("/v1/projects/{}", opts.project),
        CLOUDTRACE_AGENT,
        &member,
    )
    .await?;

    // The key file: reused while its key still exists and its token_uri names this control plane.
    let key_file = opts.data.join("service-account-creds.json");
    let existing = std::fs::read(&key_file)
        .ok()
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok());
    let keys = api
        .ok(
            reqwest::Method::GET,
            &format!("/v1/projects/-/serviceAccounts/{sa_email}/keys"),
            None,
        )
        .await?;
    let reusable = existing.as_ref().is_some_and(|k| {
        let id = k["private_key_id"].as_str().unwrap_or_default();
        k["client_email"] == sa_email.as_str()
            && k["token_uri"]
                .as_str()
                .is_some_and(|u| u.starts_with(&api.base))
            && !id.is_empty()
            && keys["keys"].as_array().into_iter().flatten().any(|key| {
                key["name"]
                    .as_str()
                    .is_some_and(|n| n.ends_with(&format!("/keys/{id}")))
            })
    });
    if !reusable {
        let key = api
            .post(
                &format!("/v1/projects/-/serviceAccounts/{sa_email}/keys"),
                json!({"privateKeyType": "TYPE_GOOGLE_CREDENTIALS_FILE"}),
            )
            .await?;
        let data = key["privateKeyData"]
            .as_str()
            .ok_or_else(|| anyhow!("key creation returned no privateKeyData"))?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(data)
            .or_else(|_| base64::engine::general_purpose::URL_SAFE.decode(data))
            .context("privateKeyData is not base64")?;
        write_private(&key_file, &bytes)?;
    }

    // API Keys: reuse the recorded key while it exists, else create one.
    let mut api_key = None;
    if let Some(name) = &state.api_key_name {
        let (status, v) = api.get(&format!("/v2/{name}/keyString")).await?;
        if status == 200 {
            api_key = v["keyString"].as_str().map(str::to_string);
        }
    }
    let api_key = match api_key {
        Some(k) => k,
        None => {
            let op = api
                .post(
                    &format!("/v2/projects/{project}/locations/global/keys"),
                    json!({"displayName": "portico up", "restrictions": {}}),
                )
                .await?;
            let key = api.wait(op, "v2").await.context("creating the API key")?;
            let name = key["name"]
                .as_str()
                .ok_or_else(|| anyhow!("API key without a name: {key}"))?;
            state.api_key_name = Some(name.to_string());
            state.save(state_path)?;
            key["keyString"]
                .as_str()
                .ok_or_else(|| anyhow!("API key operation returned no keyString"))?
                .to_string()
        }
    };
    Ok(Deployed {
        service,
        config_id,
        key_file,
        api_key,
    })
}

/// Waits until the proxy has loaded the config: an unauthenticated call is refused by the
/// proxy itself (401/403/404 with a JSON body), not by a connection error or a 503.
async fn wait_proxy_ready(children: &mut Children, port: u16, grpc: bool) -> Result<()> {
    let mut http = reqwest::Client::builder().timeout(Duration::from_secs(5));
    if grpc {
        http = http.http2_prior_knowledge();
    }
    let http = http.build()?;
    let deadline = Instant::now() + START_TIMEOUT;
    let url = if grpc {
        format!("http://127.0.0.1:{port}/endpoints.examples.bookstore.Bookstore/ListShelves")
    } else {
        format!("http://127.0.0.1:{port}/echo")
    };
    loop {
        children.check()?;
        let req = if grpc {
            // An empty ListShelves request, framed (no key needed for it).
            http.post(&url)
                .header("content-type", "application/grpc")
                .header("te", "trailers")
                .body(vec![0u8, 0, 0, 0, 0])
        } else {
            http.post(&url).body("{}")
        };
        if let Ok(resp) = req.send().await {
            // gRPC: the call reached the Bookstore (a gRPC answer with status 0 at once, or in
            // the trailers); before the config is loaded the proxy refuses it.
            let ready = if grpc {
                resp.status() == 200
                    && resp.headers().get("grpc-status").is_none_or(|s| s == "0")
                    && resp
                        .headers()
                        .get("content-type")
                        .is_some_and(|c| c.as_bytes().starts_with(b"application/grpc"))
            } else {
                !resp.status().is_server_error()
            };
            if ready {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!("the proxy on port {port} did not become ready within {START_TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Checks and creates the data directory and its `logs/`, both 0700, and tightens the files an
/// older version left readable by others.
fn prepare_data(data: &Path) -> Result<()> {
    portico_control_plane::datadir::prepare(data)?;
    let logs = data.join("logs");
    {
        use std::os::unix::fs::DirBuilderExt as _;
        match std::fs::DirBuilder::new().mode(0o700).create(&logs) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e).with_context(|| format!("cannot create {}", logs.display())),
        }
    }
    let tighten = portico_control_plane::datadir::tighten;
    tighten(&logs, 0o700);
    if let Ok(entries) = std::fs::read_dir(&logs) {
        for entry in entries.flatten() {
            tighten(&entry.path(), 0o600);
        }
    }
    for name in ["state.json", "service-account-creds.json"] {
        tighten(&data.join(name), 0o600);
    }
    Ok(())
}

async fn run(opts: Options, children: &mut Children) -> Result<()> {
    let mut opts = opts;
    // Before anything else: an unusable --data is one sentence, not a child that never answers.
    prepare_data(&opts.data)?;
    // Claim every port before starting anything, so a conflict costs nothing.
    opts.port = claim_port(opts.port, "--port")?;
    opts.status_port = claim_port(opts.status_port, "--status-port")?;
    opts.control_plane_port = claim_port(opts.control_plane_port, "--control-plane-port")?;
    if opts.backend.is_none() {
        opts.backend_port = claim_port(opts.backend_port, "--backend-port")?;
    }
    if let Some(p) = opts.http_port {
        opts.http_port = Some(claim_port(p, "--http-port")?);
    }
    let ports: Vec<u16> = [opts.port, opts.status_port, opts.control_plane_port]
        .into_iter()
        .chain(opts.http_port)
        .collect();
    for (i, p) in ports.iter().enumerate() {
        if ports[i + 1..].contains(p) || (opts.backend.is_none() && *p == opts.backend_port) {
            bail!("port {p} is given twice; pass distinct --port, --status-port, --control-plane-port, --backend-port (and --http-port)");
        }
    }

    let data = std::fs::canonicalize(&opts.data)?;
    opts.data = data.clone();
    let logs = data.join("logs");
    let state_path = data.join("state.json");
    let mut state = State::load(&state_path)?.unwrap_or_default();
    if !state.project.is_empty() && state.project != opts.project {
        bail!(
            "{} was set up for project {}; pass --project {} or use another --data directory",
            data.display(),
            state.project,
            state.project
        );
    }

    let cp_addr = format!("127.0.0.1:{}", opts.control_plane_port);
    children.spawn(
        "control-plane",
        &[
            "control-plane".into(),
            "--listen".into(),
            cp_addr.clone(),
            "--data".into(),
            data.display().to_string(),
        ],
        &logs,
    )?;
    wait_listening(children, opts.control_plane_port, "the control plane").await?;

    let backend = match &opts.backend {
        Some(b) => b.clone(),
        None if opts.grpc => {
            children.spawn(
                "bookstore",
                &[
                    "bookstore".into(),
                    "--port".into(),
                    opts.backend_port.to_string(),
                ],
                &logs,
            )?;
            wait_listening(children, opts.backend_port, "the Bookstore backend").await?;
            format!("grpc://127.0.0.1:{}", opts.backend_port)
        }
        None => {
            children.spawn(
                "echo",
                &[
                    "echo".into(),
                    "--port".into(),
                    opts.backend_port.to_string(),
                ],
                &logs,
            )?;
            wait_listening(children, opts.backend_port, "the echo backend").await?;
            format!("127.0.0.1:{}", opts.backend_port)
        }
    };

    let token_path = data.join("admin-token");
    let token = wait_admin_token(children, &token_path).await?;
    let api = Api {
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()?,
        base: format!("http://{cp_addr}"),
        token,
    };
    let d = deploy(&api, &opts, &mut state, &state_path).await?;

    let mut esp_args = vec![
        "esp".into(),
        format!("--service={}", d.service),
        "--rollout_strategy=managed".into(),
        if opts.grpc {
            format!("--http2_port={}", opts.port)
        } else {
            format!("--http_port={}", opts.port)
        },
        format!("--status_port={}", opts.status_port),
        format!("--backend={backend}"),
        format!("--service_account_key={}", d.key_file.display()),
        // Trace the sample's requests (Portico's knob for ESP's `minimum_qps`).
        format!("--cloud_trace_minimum_qps={TRACES_PER_SECOND}"),
    ];
    if let Some(p) = opts.http_port {
        esp_args.push(format!("--http_port={p}"));
    }
    if let Some(dest) = &opts.access_log {
        esp_args.push(format!("--access_log={dest}"));
    }
    children.spawn("esp", &esp_args, &logs)?;
    wait_proxy_ready(children, opts.port, opts.grpc).await?;
    if let Some(p) = opts.http_port {
        wait_listening(children, p, "the proxy's HTTP/JSON port").await?;
    }

    print_summary(&opts, &api.base, &token_path, &logs, &d, &backend);

    let stop = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(|e| anyhow!("cannot watch SIGTERM: {e}"))?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        Ok::<(), anyhow::Error>(())
    };
    tokio::select! {
        r = stop => {
            r?;
            eprintln!("portico up: stopping");
            Ok(())
        }
        (name, log, status) = children.any_exit() => {
            bail!("portico {name} exited ({status}); last lines of {}:\n{}", log.display(), tail(&log, 15))
        }
    }
}

/// Adds `role` for `member` to the IAM policy of `resource` (`/v1/services/S`,
/// `/v1/projects/P`) unless it is there: read, modify, write.
async fn ensure_binding(api: &Api, resource: &str, role: &str, member: &str) -> Result<()> {
    let policy = api
        .post(&format!("{resource}:getIamPolicy"), json!({}))
        .await?;
    let bound = policy["bindings"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|b| {
            b["role"] == role
                && b["members"]
                    .as_array()
                    .is_some_and(|m| m.contains(&json!(member)))
        });
    if !bound {
        let mut policy = policy;
        let mut bindings = policy["bindings"].as_array().cloned().unwrap_or_default();
        bindings.push(json!({"role": role, "members": [member]}));
        policy["bindings"] = Value::Array(bindings);
        api.post(
            &format!("{resource}:setIamPolicy"),
            json!({"policy": policy}),
        )
        .await?;
    }
    Ok(())
}

fn print_summary(opts: &Options, cp: &str, token: &Path, logs: &Path, d: &Deployed, backend: &str) {
    use std::io::Write as _;
    let proxy = format!("http://127.0.0.1:{}", opts.port);
    let mut out = String::new();
    out.push_str("Portico is up.\n\n");
    out.push_str(&format!(
        "  control plane  {cp}   (data in {})\n",
        opts.data.display()
    ));
    if opts.grpc {
        out.push_str(&format!(
            "  backend        {backend}   (portico bookstore)\n"
        ));
    } else {
        out.push_str(&format!("  backend        http://{backend}\n"));
    }
    let proxy_shown = if opts.grpc {
        match opts.http_port {
            Some(h) => format!(
                "127.0.0.1:{} (h2c, for gRPC), http://127.0.0.1:{h} (HTTP/JSON, gRPC-Web)",
                opts.port
            ),
            None => format!("127.0.0.1:{} (h2c, for gRPC)", opts.port),
        }
    } else {
        proxy.clone()
    };
    out.push_str(&format!(
        "  proxy          {proxy_shown}   service {}, config {}\n",
        d.service, d.config_id
    ));
    out.push_str(&format!(
        "  status         http://127.0.0.1:{}/endpoints_status\n",
        opts.status_port
    ));
    out.push_str(&format!("  key file       {}\n", d.key_file.display()));
    out.push_str(&format!("  admin token    {}\n", token.display()));
    // The console asks for the admin token on its sign-in form; it is never put in the URL here.
    out.push_str(&format!("  console        {cp}/console\n"));
    out.push_str(&format!("  logs           {}\n\n", logs.display()));
    let body = r#"--header "content-type:application/json" --data '{"message":"hello world"}'"#;
    if opts.grpc {
        let addr = format!("127.0.0.1:{}", opts.port);
        out.push_str("gRPC clients call the proxy's h2c port. GetShelf needs the API key:\n");
        out.push_str(&format!(
            "  grpcurl -plaintext -import-path examples/bookstore-grpc -proto bookstore.proto -H 'x-api-key: {}' -d '{{\"shelf\": 100}}' {addr} endpoints.examples.bookstore.Bookstore/GetShelf\n\n",
            d.api_key
        ));
        out.push_str("The same with Python's grpcio (the request is GetShelfRequest{shelf: 100}, encoded):\n");
        out.push_str(&format!(
            "  grpc client: python3 -c 'import grpc; f = grpc.insecure_channel(\"{addr}\").unary_unary(\"/endpoints.examples.bookstore.Bookstore/GetShelf\"); print(f(b\"\\x08\\x64\", metadata=[(\"x-api-key\", \"{}\")]))'\n\n",
            d.api_key
        ));
        out.push_str("Without the key the proxy answers grpc-status 16 (UNAUTHENTICATED).\n\n");
        if let Some(h) = opts.http_port {
            out.push_str(
                "HTTP/JSON calls are transcoded to gRPC by the proxy (the proto's google.api.http rules):\n",
            );
            out.push_str(&format!(
                "  curl \"http://127.0.0.1:{h}/v1/shelves/100?key={}\"\n",
                d.api_key
            ));
            out.push_str(&format!(
                "  curl --request POST --header \"content-type:application/json\" --data '{{\"theme\":\"Poetry\"}}' \"http://127.0.0.1:{h}/v1/shelves?key={}\"\n\n",
                d.api_key
            ));
        }
    } else if opts.openapi.is_none() {
        out.push_str("Without an API key the proxy refuses the call (401):\n");
        out.push_str(&format!("  curl --request POST {body} {proxy}/echo\n\n"));
        out.push_str("With the API key it reaches the echo backend:\n");
        out.push_str(&format!(
            "  curl --request POST {body} \"{proxy}/echo?key={}\"\n\n",
            d.api_key
        ));
    } else {
        out.push_str(&format!("API key: {}\n", d.api_key));
        out.push_str(&format!(
            "  curl \"{proxy}/YOUR/PATH?key={}\"\n\n",
            d.api_key
        ));
    }
    out.push_str(&format!(
        "Tracing is on: up to {TRACES_PER_SECOND} requests a second are traced (every curl \
         line above), sent to the control plane's Cloud Trace API within a second. The \
         latest traces:\n"
    ));
    out.push_str(&format!(
        "  curl --header \"Authorization: Bearer $(cat {})\" \"{cp}/v1/projects/{}/traces?view=ROOTSPAN\"\n\n",
        token.display(),
        opts.project
    ));
    out.push_str("Point gcloud at this control plane (in its own configuration):\n");
    out.push_str("  gcloud config configurations create portico\n");
    out.push_str(&format!("  gcloud config set project {}\n", opts.project));
    out.push_str(&format!(
        "  gcloud config set auth/access_token_file {}\n",
        token.display()
    ));
    for api in [
        "servicemanagement",
        "serviceusage",
        "iam",
        "cloudresourcemanager",
        "apikeys",
    ] {
        out.push_str(&format!(
            "  gcloud config set api_endpoint_overrides/{api} {cp}/\n"
        ));
    }
    out.push_str("\nPress Ctrl-C to stop.\n");
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(out.as_bytes());
    let _ = stdout.flush();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<OsString> {
        std::iter::once("portico up")
            .chain(a.iter().copied())
            .map(OsString::from)
            .collect()
    }

    #[test]
    fn flags_parse_in_both_forms() {
        let o = parse(&args(&[
            "--port",
            "9000",
            "--backend-port=9001",
            "--data",
            "/tmp/x",
        ]))
        .expect("parse")
        .expect("options");
        assert_eq!(
            (o.port, o.backend_port, o.control_plane_port),
            (9000, 9001, 8000)
        );
        assert_eq!(o.data, PathBuf::from("/tmp/x"));
        assert!(parse(&args(&["--port", "http"])).is_err());
        assert!(parse(&args(&["--bogus"])).is_err());
        let e = parse(&args(&["--openapi", "a.yaml"])).expect_err("needs --backend");
        assert!(e.to_string().contains("--backend"), "{e}");
    }

    #[test]
    fn http_port_belongs_to_the_grpc_sample() {
        let o = parse(&args(&["--grpc"])).expect("parse").expect("options");
        assert_eq!(o.http_port, Some(8083));
        let o = parse(&args(&["--grpc", "--http-port=0"]))
            .expect("parse")
            .expect("options");
        assert_eq!(o.http_port, Some(0));
        let e = parse(&args(&["--http-port", "9000"])).expect_err("needs --grpc");
        assert!(e.to_string().contains("needs --grpc"), "{e}");
        for bad in ["65536", "-1", "http", ""] {
            let e = parse(&args(&["--grpc", &format!("--http-port={bad}")])).expect_err(bad);
            assert!(
                e.to_string().contains("--http-port takes a port number"),
                "{e}"
            );
        }
        assert!(parse(&args(&["--grpc", "--http-port"])).is_err());
        // The last of repeated flags wins, as for every other flag of portico up.
        let o = parse(&args(&["--grpc", "--http-port=1", "--http-port=2"]))
            .expect("parse")
            .expect("options");
        assert_eq!(o.http_port, Some(2));
    }

    #[test]
    fn busy_port_names_the_flag() {
        let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
        let port = l.local_addr().expect("addr").port();
        let e = claim_port(port, "--port").expect_err("busy");
        assert_eq!(
            e.to_string(),
            format!("port {port} is already in use; pass --port")
        );
        assert_ne!(claim_port(0, "--port").expect("free"), 0);
    }

    #[test]
    fn sample_is_filled_in_and_names_the_service() {
        let text = sample_openapi("p1", "sa@p1.iam.gserviceaccount.com", "http://127.0.0.1:1");
        let left: Vec<&str> = text
            .lines()
            .filter(|l| !l.trim_start().starts_with('#') && l.contains("YOUR-"))
            .collect();
        assert!(left.is_empty(), "placeholders left: {left:?}");
        assert!(!text.contains("www.googleapis.com"));
        assert_eq!(
            openapi_host(&text).expect("host"),
            "echo-api.endpoints.p1.cloud.goog"
        );
        assert!(openapi_host("swagger: \"2.0\"\n").is_err());
        // OpenAPI 3.x: the host of the server carrying x-google-endpoint, port and path dropped.
        let v3 = include_str!("../examples/echo/openapi3.yaml").replace(
            "https://echo-api.endpoints.YOUR-PROJECT-ID.cloud.goog",
            "https://echo-api.endpoints.p3.cloud.goog:443/v1",
        );
        assert_eq!(
            openapi_host(&v3).expect("3.x host"),
            "echo-api.endpoints.p3.cloud.goog"
        );
        let err = openapi_host("openapi: 3.0.3\ninfo: {title: T, version: v1}\npaths: {}\n")
            .expect_err("no server");
        assert!(err.to_string().contains("missing \"servers\""), "{err}");
        assert_eq!(
            openapi_host("{\n  \"host\": \"a.b\",\n}").expect("json host"),
            "a.b"
        );
    }
}
