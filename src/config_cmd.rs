//! `portico config validate FILE...`: convert OpenAPI files (2.0, 3.0.x, 3.1.x) and print the service config as
//! pretty JSON on stdout, warnings on stderr (exit 0); or every error on stderr (exit 1).
//! Usage problems exit 2.
//!
//! The file reading and printing live here, in the binary, so that crates/config stays pure
//! (it converts the bytes it is given).

use portico_config::{convert, Severity, SourceFile};
use std::ffi::OsString;
use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

const USAGE: &str = "usage: portico config validate FILE...

Converts OpenAPI 2.0, 3.0.x and 3.1.x files (YAML or JSON, with Google's x-google-*
extensions; the version is read from swagger: or openapi:, and one run cannot mix them) into the service
configuration Service Management would generate, and prints it as JSON. Several files form one
service with one API per OpenAPI file; a file that the others only refer to by $ref holds
shared definitions. A $ref's path is relative to the referring file, as given here (gcloud sends
base names only, so \"./common.yaml\" works both ways). Errors are listed with
file:line:column; the exit code is 1 when there are errors.
";

/// `args[0]` is the program name (`portico config`), then the subcommand and files.
pub fn main(args: Vec<OsString>) -> ExitCode {
    let mut rest = args.into_iter().skip(1);
    match rest.next().as_ref().and_then(|s| s.to_str()) {
        Some("validate") => {}
        Some("-h") | Some("--help") | Some("help") => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        _ => {
            eprint!("{USAGE}");
            return ExitCode::from(2);
        }
    }
    let paths: Vec<OsString> = rest.collect();
    if paths.iter().any(|p| p == "-h" || p == "--help") {
        print!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    if paths.is_empty() {
        eprint!("{USAGE}");
        return ExitCode::from(2);
    }
    let stdout = std::io::stdout();
    let stderr = std::io::stderr();
    validate(&paths, &mut stdout.lock(), &mut stderr.lock())
}

/// Reads and converts `paths`, writing the config JSON to `out` and diagnostics to `err`.
/// Messages name each file by the path as given.
pub fn validate(paths: &[OsString], out: &mut dyn Write, err: &mut dyn Write) -> ExitCode {
    let mut files = Vec::new();
    let mut unreadable = false;
    for p in paths {
        let shown = Path::new(p).display().to_string();
        match std::fs::read(p) {
            Ok(contents) => files.push(SourceFile::new(shown, contents)),
            Err(e) => {
                let _ = writeln!(err, "ERROR: {shown}: cannot read the file: {e}");
                unreadable = true;
            }
        }
    }
    if unreadable {
        return ExitCode::from(1);
    }
    match convert(&files) {
        Ok(conv) => {
            for w in &conv.warnings {
                let _ = writeln!(err, "WARNING: {w}");
            }
            match serde_json::to_string_pretty(&conv.service) {
                Ok(json) => {
                    let _ = writeln!(out, "{json}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    let _ = writeln!(err, "ERROR: cannot render the service config: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Err(e) => {
            let mut errors = 0;
            for d in &e.diagnostics {
                let _ = writeln!(err, "{}: {d}", d.severity.as_str());
                if d.severity == Severity::Error {
                    errors += 1;
                }
            }
            let _ = writeln!(
                err,
                "{errors} error{} found; no service config was produced",
                if errors == 1 { "" } else { "s" }
            );
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    // The crate's fixture, shared rather than copied: it is the same getting-started file.
    const GETTING_STARTED: &str =
        include_str!("../crates/config/tests/fixtures/getting-started.yaml");

    #[test]
    fn cli_validate_prints_json_or_errors() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("openapi.yaml");
        std::fs::write(&good, GETTING_STARTED).unwrap();
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let code = validate(&[good.clone().into()], &mut out, &mut err);
        assert_eq!(code, std::process::ExitCode::SUCCESS);
        let svc: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(svc["name"], "echo-api.endpoints.YOUR-PROJECT-ID.cloud.goog");
        let err = String::from_utf8(err).unwrap();
        assert_eq!(err.lines().count(), 3, "{err}");
        assert!(err.starts_with(&format!(
            "WARNING: {}:39:5: Operation 'get'",
            good.display()
        )));

        let bad = dir.path().join("bad.yaml");
        std::fs::write(
            &bad,
            "swagger: '2.0'\ninfo: {title: T, version: v1}\npaths: {}\n",
        )
        .unwrap();
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let code = validate(&[bad.clone().into()], &mut out, &mut err);
        assert_eq!(code, std::process::ExitCode::from(1));
        assert!(out.is_empty());
        let err = String::from_utf8(err).unwrap();
        assert_eq!(
            err,
            format!(
                "ERROR: {}:1:1: missing required field \"host\": the service name is taken from host (e.g. host: \"my-api.endpoints.my-project.cloud.goog\")\n1 error found; no service config was produced\n",
                bad.display()
            )
        );

        let (mut out, mut err) = (Vec::new(), Vec::new());
        let missing = dir.path().join("nope.yaml");
        let code = validate(&[missing.into()], &mut out, &mut err);
        assert_eq!(code, std::process::ExitCode::from(1));
        assert!(String::from_utf8(err)
            .unwrap()
            .contains("cannot read the file"));
    }

    /// OpenAPI 3.x files validate like 2.0 ones: the config, or every error with its place.
    #[test]
    fn cli_validate_takes_openapi_3() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("openapi3.yaml");
        std::fs::write(&good, include_str!("../examples/echo/openapi3.yaml")).unwrap();
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let code = validate(&[good.into()], &mut out, &mut err);
        assert_eq!(code, std::process::ExitCode::SUCCESS);
        let svc: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(svc["name"], "echo-api.endpoints.YOUR-PROJECT-ID.cloud.goog");
        assert_eq!(svc["http"]["rules"][0]["post"], "/echo");

        let bad = dir.path().join("bad3.yaml");
        std::fs::write(
            &bad,
            "openapi: 3.1.0\ninfo: {title: T, version: v1}\nservers:\n  - url: /v1\n    x-google-endpoint: {}\npaths: {}\n",
        )
        .unwrap();
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let code = validate(&[bad.clone().into()], &mut out, &mut err);
        assert_eq!(code, std::process::ExitCode::from(1));
        assert!(out.is_empty());
        assert_eq!(
            String::from_utf8(err).unwrap(),
            format!(
                "ERROR: {}:4:10: server url \"/v1\" cannot name the service: a relative url gives no host; write https://HOST[/basePath], e.g. https://my-api.endpoints.my-project.cloud.goog/v1\n1 error found; no service config was produced\n",
                bad.display()
            )
        );
    }

    /// The files given by their paths (absolute here): `$ref`s between them resolve.
    #[test]
    fn cli_validate_resolves_refs_between_the_files_given() {
        let dir = tempfile::tempdir().unwrap();
        let mut paths: Vec<OsString> = Vec::new();
        for (name, text) in [
            (
                "api.yaml",
                include_str!("../crates/config/tests/fixtures/refs/api.yaml"),
            ),
            (
                "common.yaml",
                include_str!("../crates/config/tests/fixtures/refs/common.yaml"),
            ),
            (
                "books.yaml",
                include_str!("../crates/config/tests/fixtures/refs/books.yaml"),
            ),
        ] {
            let p = dir.path().join(name);
            std::fs::write(&p, text).unwrap();
            paths.push(p.into());
        }
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let code = validate(&paths, &mut out, &mut err);
        assert_eq!(
            code,
            std::process::ExitCode::SUCCESS,
            "{}",
            String::from_utf8_lossy(&err)
        );
        let svc: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(svc["apis"].as_array().map(Vec::len), Some(1));
        assert_eq!(svc["http"]["rules"].as_array().map(Vec::len), Some(5));
        // Without the shared file, the error names it.
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let code = validate(&[paths[0].clone(), paths[2].clone()], &mut out, &mut err);
        assert_eq!(code, std::process::ExitCode::from(1));
        let err = String::from_utf8(err).unwrap();
        assert!(
            err.contains("cannot be resolved: the submission has no file"),
            "{err}"
        );
        assert!(err.contains("common.yaml\""), "{err}");
    }
}
