//! `portico echo` as a process: the walkthrough's direct call to the backend, `--listen`, a busy
//! port, and a clean exit on SIGTERM (what Kubernetes and `portico up` send).

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Echo(Child);

impl Drop for Echo {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn wait_up(port: u16, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("portico echo exited early: {status}");
        }
        assert!(
            Instant::now() < deadline,
            "portico echo did not listen on {port}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn wait_exit(child: &mut Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return status;
        }
        assert!(Instant::now() < deadline, "portico echo did not exit");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn echo_serves_the_walkthrough_call_and_stops_on_sigterm() {
    let port = free_port();
    let mut echo = Echo(
        Command::new(env!("CARGO_BIN_EXE_portico"))
            .args(["echo", "--port", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn portico echo"),
    );
    wait_up(port, &mut echo.0);

    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("client");
    let resp = client
        .post(format!("http://127.0.0.1:{port}/echo"))
        .header("content-type", "application/json")
        .body(r#"{"message":"hello world"}"#)
        .send()
        .expect("POST /echo");
    assert_eq!(resp.status(), 200);
    let body: serde_json::Value = resp.json().expect("JSON");
    assert_eq!(body, serde_json::json!({"message": "hello world"}));

    // A second instance on the same port fails with a message naming the flag.
    let out = Command::new(env!("CARGO_BIN_EXE_portico"))
        .args(["echo", "--port", &port.to_string()])
        .stdin(Stdio::null())
        .output()
        .expect("run portico echo");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("port {port} is already in use; pass --port")),
        "{stderr}"
    );

    // SAFETY: kill(2) on our own unreaped child.
    unsafe {
        libc::kill(echo.0.id() as libc::pid_t, libc::SIGTERM);
    }
    let status = wait_exit(&mut echo.0);
    assert!(
        status.success(),
        "SIGTERM should be a clean exit, got {status}"
    );
}

#[test]
fn echo_listen_takes_a_full_address_and_bad_flags_fail() {
    let port = free_port();
    let mut echo = Echo(
        Command::new(env!("CARGO_BIN_EXE_portico"))
            .args(["echo", "--listen", &format!("127.0.0.1:{port}")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn portico echo"),
    );
    wait_up(port, &mut echo.0);

    let out = Command::new(env!("CARGO_BIN_EXE_portico"))
        .args(["echo", "--port", "eighty"])
        .stdin(Stdio::null())
        .output()
        .expect("run portico echo");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--port"));
}
