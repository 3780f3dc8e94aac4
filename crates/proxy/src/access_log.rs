//! Access log: one JSON object per request on stdout (ESP's nginx logs to `/dev/stdout` too).
//! `tracing` diagnostics go to stderr, so the two streams never mix. API keys and credentials
//! are never written here: the pipeline masks the URI, the referer and the error message with
//! the rule the control plane applies to stored logs (`portico_servicecontrol::redact`).

pub mod format;

pub use format::{Format, FormatError, Record};

use serde::Serialize;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Mutex;

/// Where access-log lines go (`--access_log`: a path, `/dev/stdout` (default) or `off`).
pub enum AccessLog {
    Off,
    Stdout,
    File(Mutex<std::fs::File>),
}

/// One access-log line.
#[derive(Debug, Serialize)]
pub struct Entry<'a> {
    /// RFC 3339, UTC.
    pub time: &'a str,
    pub remote_addr: &'a str,
    pub method: &'a str,
    pub uri: &'a str,
    pub protocol: &'a str,
    pub status: u16,
    pub request_bytes: u64,
    pub response_bytes: u64,
    pub latency_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend_latency_ms: Option<f64>,
    #[serde(skip_serializing_if = "str::is_empty")]
    pub api_method: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    pub config_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_agent: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub referer: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<&'a str>,
}

impl AccessLog {
    pub fn from_flag(flag: Option<&str>) -> std::io::Result<AccessLog> {
        match flag {
            None | Some("/dev/stdout") | Some("-") => Ok(AccessLog::Stdout),
            Some("off") => Ok(AccessLog::Off),
            Some(path) => {
                let f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(PathBuf::from(path))?;
                Ok(AccessLog::File(Mutex::new(f)))
            }
        }
    }

    pub fn enabled(&self) -> bool {
        !matches!(self, AccessLog::Off)
    }

    /// Writes one line. A failed write is dropped: logging must never fail a request.
    pub fn write(&self, entry: &Entry<'_>) {
        if !self.enabled() {
            return;
        }
        let mut line = match serde_json::to_vec(entry) {
            Ok(v) => v,
            Err(_) => return,
        };
        line.push(b'\n');
        self.write_raw(&line);
    }

    /// Writes one rendered entry (`--access_log_format`), newline included, in one write so
    /// entries from concurrent requests never interleave.
    pub fn write_raw(&self, line: &[u8]) {
        match self {
            AccessLog::Off => {}
            AccessLog::Stdout => {
                let _ = std::io::stdout().lock().write_all(line);
            }
            AccessLog::File(f) => {
                if let Ok(mut f) = f.lock() {
                    let _ = f.write_all(line);
                }
            }
        }
    }
}

/// RFC 3339 timestamp with milliseconds, UTC.
pub fn now_rfc3339() -> String {
    let now = time::OffsetDateTime::now_utc();
    now.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_log_writes_one_json_line_per_entry() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("access.log");
        let log = AccessLog::from_flag(p.to_str()).unwrap();
        let e = Entry {
            time: "2026-01-01T00:00:00Z",
            remote_addr: "127.0.0.1",
            method: "GET",
            uri: "/a?b=\"c\"",
            protocol: "HTTP/1.1",
            status: 200,
            request_bytes: 0,
            response_bytes: 5,
            latency_ms: 1.5,
            backend_latency_ms: None,
            api_method: "",
            config_id: "",
            user_agent: None,
            referer: None,
            error: None,
        };
        log.write(&e);
        log.write(&e);
        let text = std::fs::read_to_string(&p).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        let v: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
        assert_eq!(v["uri"], "/a?b=\"c\"");
        assert!(v.get("api_method").is_none());
        assert!(!now_rfc3339().is_empty());
    }
}
