//! The control plane's layer rules, checked on the source text so a change that breaks them
//! fails here with the file and line, not in a review months later:
//! - SQL (anything from `sqlx`) appears only under `src/store/`;
//! - `src/store/` imports nothing above it (`app`, `apis`, `authz`, `error`);
//! - an API module under `src/apis/` never imports another API module;
//! - `src/authz/` imports no API module.

use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    for entry in entries {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Every `(file relative to src/, line number, line)` of the crate's sources, comments
/// excluded (a doc comment may name a layer it does not import).
fn source_lines() -> Vec<(String, usize, String)> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    let mut lines = Vec::new();
    for f in files {
        let rel = f
            .strip_prefix(&src)
            .expect("under src")
            .to_string_lossy()
            .replace('\\', "/");
        let text = std::fs::read_to_string(&f).expect("read source");
        for (i, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            if !code.trim().is_empty() {
                lines.push((rel.clone(), i + 1, code.to_string()));
            }
        }
    }
    lines
}

/// The API module a file belongs to (`apis/servicecontrol/quota/mod.rs` → `servicecontrol`).
fn api_of(rel: &str) -> Option<&str> {
    let rest = rel.strip_prefix("apis/")?;
    let first = rest.split('/').next()?;
    if first == "mod.rs" {
        return None;
    }
    Some(first.strip_suffix(".rs").unwrap_or(first))
}

/// Names of modules referenced as `crate::apis::<name>` on a line.
fn apis_referenced(line: &str) -> Vec<&str> {
    line.match_indices("crate::apis::")
        .filter_map(|(i, m)| {
            let rest = &line[i + m.len()..];
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            (end > 0).then(|| &rest[..end])
        })
        .collect()
}

#[test]
fn sql_lives_only_in_store() {
    let bad: Vec<String> = source_lines()
        .into_iter()
        .filter(|(rel, _, line)| !rel.starts_with("store/") && line.contains("sqlx"))
        .map(|(rel, n, line)| format!("src/{rel}:{n}: {}", line.trim()))
        .collect();
    assert!(bad.is_empty(), "SQL outside src/store/:\n{}", bad.join("\n"));
}

#[test]
fn store_imports_nothing_above_it() {
    let above = ["crate::app", "crate::apis", "crate::authz", "crate::error"];
    let bad: Vec<String> = source_lines()
        .into_iter()
        .filter(|(rel, _, line)| {
            rel.starts_with("store/") && above.iter().any(|a| line.contains(a))
        })
        .map(|(rel, n, line)| format!("src/{rel}:{n}: {}", line.trim()))
        .collect();
    assert!(bad.is_empty(), "store/ imports a layer above it:\n{}", bad.join("\n"));
}

#[test]
fn an_api_module_never_imports_another() {
    let bad: Vec<String> = source_lines()
        .into_iter()
        .filter_map(|(rel, n, line)| {
            let own = api_of(&rel)?;
            let others: Vec<&str> = apis_referenced(&line)
                .into_iter()
                .filter(|m| *m != own)
                .collect();
            (!others.is_empty()).then(|| format!("src/{rel}:{n}: {}", line.trim()))
        })
        .collect();
    assert!(bad.is_empty(), "API modules importing each other:\n{}", bad.join("\n"));
}

#[test]
fn authz_imports_no_api() {
    let bad: Vec<String> = source_lines()
        .into_iter()
        .filter(|(rel, _, line)| rel.starts_with("authz/") && line.contains("crate::apis"))
        .map(|(rel, n, line)| format!("src/{rel}:{n}: {}", line.trim()))
        .collect();
    assert!(bad.is_empty(), "authz/ imports an API module:\n{}", bad.join("\n"));
}

#[test]
fn the_checks_see_what_they_look_for() {
    assert_eq!(api_of("apis/servicecontrol/quota/mod.rs"), Some("servicecontrol"));
    assert_eq!(api_of("apis/iam.rs"), Some("iam"));
    assert_eq!(api_of("apis/mod.rs"), None);
    assert_eq!(api_of("store/keys.rs"), None);
    assert_eq!(
        apis_referenced("use crate::apis::iam::{self}; crate::apis::tokens::x()"),
        vec!["iam", "tokens"]
    );
    // The scan reads real files: the crate has store and API sources.
    let lines = source_lines();
    assert!(lines.iter().any(|(rel, _, _)| rel.starts_with("store/")));
    assert!(lines.iter().any(|(rel, _, _)| rel.starts_with("apis/")));
}
