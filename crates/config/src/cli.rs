//! `portico config validate FILE...`: convert OpenAPI files and print the service config as
//! pretty JSON on stdout, warnings on stderr (exit 0); or every error on stderr (exit 1).
//! Usage problems exit 2.

use crate::openapi::{convert, Severity, SourceFile};
use std::ffi::OsString;
use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

const USAGE: &str = "usage: portico config validate FILE...

Converts OpenAPI 2.0 files (YAML or JSON, with x-google-* extensions) into the service
configuration Service Management would generate, and prints it as JSON. Several files form one
service with one API per file. Errors are listed with file:line:column; the exit code is 1
when there are errors.
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
