//! Service Control's layer rules, checked on the source text: its handlers
//! (`src/apis/servicecontrol`) run no SQL, and its store modules (`src/store/servicecontrol`)
//! import nothing above the store.

use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read_dir") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `(file:line, line)` of every non-comment line under `dir` that contains one of `needles`.
fn offending_lines(dir: &str, needles: &[&str]) -> Vec<String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
    let mut files = Vec::new();
    rust_files(&root, &mut files);
    assert!(!files.is_empty(), "no sources under {}", root.display());
    let mut out = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).expect("read");
        for (i, line) in text.lines().enumerate() {
            if line.trim_start().starts_with("//") {
                continue;
            }
            if needles.iter().any(|n| line.contains(n)) {
                out.push(format!("{}:{}: {}", f.display(), i + 1, line.trim()));
            }
        }
    }
    out
}

#[test]
fn servicecontrol_handlers_run_no_sql() {
    let found = offending_lines("src/apis/servicecontrol", &["sqlx"]);
    assert!(
        found.is_empty(),
        "SQL outside store/:\n{}",
        found.join("\n")
    );
}

#[test]
fn servicecontrol_store_imports_nothing_above_it() {
    let found = offending_lines(
        "src/store/servicecontrol",
        &["crate::apis", "crate::app", "crate::authz", "crate::error"],
    );
    assert!(
        found.is_empty(),
        "store/servicecontrol imports a layer above it:\n{}",
        found.join("\n")
    );
}
