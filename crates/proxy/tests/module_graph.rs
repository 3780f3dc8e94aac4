//! The proxy's top-level modules import each other without a loop: reading `src/`, every
//! `crate::X` path (and `super::` paths that climb to the crate root) in a top-level module's
//! files is an edge to module `X`; comments, string literals and `#[cfg(test)]` modules do not
//! count. A cycle fails the test, named with the line of each import in it.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

/// Where an edge was first seen: file (relative to `src/`) and line.
type Site = (String, usize);
/// module -> (imported module -> first site).
type Graph = BTreeMap<String, BTreeMap<String, Site>>;

fn is_ident(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_'
}

/// The source with comments, string and char literals blanked (newlines kept, so byte offsets
/// and line numbers stay those of the file).
fn strip(src: &str) -> String {
    let b = src.as_bytes();
    let mut out = b.to_vec();
    let blank = |out: &mut Vec<u8>, from: usize, to: usize| {
        for c in &mut out[from..to.min(b.len())] {
            if *c != b'\n' {
                *c = b' ';
            }
        }
    };
    let mut i = 0;
    while i < b.len() {
        let prev_ident = i > 0 && is_ident(b[i - 1]);
        if b[i..].starts_with(b"//") {
            let end = b[i..]
                .iter()
                .position(|&c| c == b'\n')
                .map_or(b.len(), |p| i + p);
            blank(&mut out, i, end);
            i = end;
        } else if b[i..].starts_with(b"/*") {
            let (mut depth, mut j) = (0usize, i);
            while j < b.len() {
                if b[j..].starts_with(b"/*") {
                    depth += 1;
                    j += 2;
                } else if b[j..].starts_with(b"*/") {
                    depth -= 1;
                    j += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    j += 1;
                }
            }
            blank(&mut out, i, j);
            i = j;
        } else if b[i] == b'r' && !prev_ident && {
            let hashes = b[i + 1..].iter().take_while(|&&c| c == b'#').count();
            b.get(i + 1 + hashes) == Some(&b'"')
        } {
            let hashes = b[i + 1..].iter().take_while(|&&c| c == b'#').count();
            let body = i + 2 + hashes;
            let mut close = b"\"".to_vec();
            close.extend(std::iter::repeat_n(b'#', hashes));
            let end = b[body..]
                .windows(close.len())
                .position(|w| w == close.as_slice())
                .map_or(b.len(), |p| body + p + close.len());
            blank(&mut out, i, end);
            i = end;
        } else if b[i] == b'"' {
            let mut j = i + 1;
            while j < b.len() && b[j] != b'"' {
                j += if b[j] == b'\\' { 2 } else { 1 };
            }
            blank(&mut out, i, j + 1);
            i = j + 1;
        } else if b[i] == b'\'' {
            // A char literal ('x', '\n', '\u{..}', '"'); otherwise a lifetime or label.
            let end = if b.get(i + 1) == Some(&b'\\') {
                b[i + 2..]
                    .iter()
                    .position(|&c| c == b'\'')
                    .map(|p| i + 2 + p + 1)
            } else {
                let ch = src[i + 1..].chars().next().map_or(1, char::len_utf8);
                (b.get(i + 1 + ch) == Some(&b'\'')).then_some(i + 2 + ch)
            };
            match end {
                Some(end) => {
                    blank(&mut out, i, end);
                    i = end;
                }
                None => i += 1,
            }
        } else {
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while i < b.len() && b[i].is_ascii_whitespace() {
        i += 1;
    }
    i
}

fn ident_at(b: &[u8], i: usize) -> Option<(String, usize)> {
    let end = i + b[i..].iter().take_while(|&&c| is_ident(c)).count();
    (end > i).then(|| (String::from_utf8_lossy(&b[i..end]).into_owned(), end))
}

/// Index just past the `}` closing the `{` at `open`.
fn block_end(b: &[u8], open: usize) -> usize {
    let mut depth = 0usize;
    for (j, &c) in b.iter().enumerate().skip(open) {
        match c {
            b'{' => depth += 1,
            b'}' => {
                depth -= 1;
                if depth == 0 {
                    return j + 1;
                }
            }
            _ => {}
        }
    }
    b.len()
}

/// Blanks `#[cfg(test)] mod x { ... }` blocks; returns the names of `#[cfg(test)] mod x;`
/// (modules in their own files, left out by the caller).
fn drop_test_modules(text: &mut String) -> Vec<String> {
    let mut out_of_line = Vec::new();
    let mut from = 0;
    while let Some(p) = text[from..].find("#[cfg(test)]") {
        let at = from + p;
        from = at + 1;
        let b = text.as_bytes();
        let mut i = skip_ws(b, at + "#[cfg(test)]".len());
        // Further attributes and a visibility may sit between the cfg and `mod`.
        while b.get(i) == Some(&b'#') {
            match b[i..].iter().position(|&c| c == b']') {
                Some(p) => i = skip_ws(b, i + p + 1),
                None => break,
            }
        }
        if b[i..].starts_with(b"pub") {
            i = skip_ws(b, i + 3);
            if b.get(i) == Some(&b'(') {
                i = b[i..]
                    .iter()
                    .position(|&c| c == b')')
                    .map_or(i, |p| i + p + 1);
                i = skip_ws(b, i);
            }
        }
        if !(b[i..].starts_with(b"mod") && b.get(i + 3).is_some_and(|c| c.is_ascii_whitespace())) {
            continue;
        }
        let Some((name, after)) = ident_at(b, skip_ws(b, i + 3)) else {
            continue;
        };
        let j = skip_ws(b, after);
        match b.get(j) {
            Some(b'{') => {
                let end = block_end(b, j);
                let blanked: String = text[at..end]
                    .chars()
                    .map(|c| if c == '\n' { '\n' } else { ' ' })
                    .collect();
                text.replace_range(at..end, &blanked);
            }
            Some(b';') => out_of_line.push(name),
            _ => {}
        }
    }
    out_of_line
}

/// Top-level modules a file's code names, with the line of the first mention. `depth` is how
/// many `super::` reach the crate root from the file (1 for `src/x.rs` and `src/x/mod.rs`, 2 for
/// `src/x/y.rs`); inline modules other than test modules are not counted.
fn references(code: &str, depth: usize) -> BTreeMap<String, usize> {
    let b = code.as_bytes();
    let line_of = |i: usize| 1 + b[..i].iter().filter(|&&c| c == b'\n').count();
    let mut found = BTreeMap::new();
    let mut note = |name: String, at: usize| {
        if name != "self" && name != "super" {
            found.entry(name).or_insert_with(|| line_of(at));
        }
    };
    let mut i = 0;
    while i < b.len() {
        if i > 0 && is_ident(b[i - 1]) {
            i += 1;
            continue;
        }
        // `crate::`, or enough `super::` to climb to the root.
        let rest = if b[i..].starts_with(b"crate::") {
            Some(i + "crate::".len())
        } else if depth > 0 && b[i..].starts_with(b"super::") {
            let mut j = i;
            let mut n = 0;
            while b[j..].starts_with(b"super::") {
                j += "super::".len();
                n += 1;
            }
            (n >= depth).then_some(j)
        } else {
            None
        };
        let Some(start) = rest else {
            i += 1;
            continue;
        };
        let j = skip_ws(b, start);
        if b.get(j) == Some(&b'{') {
            let end = block_end(b, j);
            // Names at the group's top level: `crate::{a, b::c, d::{e}}` names a, b and d.
            let mut depth_in = 0usize;
            let mut item_start = true;
            for k in j + 1..end.saturating_sub(1) {
                match b[k] {
                    b'{' => depth_in += 1,
                    b'}' => depth_in -= 1,
                    b',' if depth_in == 0 => item_start = true,
                    c if item_start && is_ident(c) => {
                        if let Some((name, _)) = ident_at(b, k) {
                            note(name, k);
                        }
                        item_start = false;
                    }
                    _ => {}
                }
            }
            i = end;
        } else if let Some((name, end)) = ident_at(b, j) {
            note(name, i);
            i = end;
        } else {
            i = j;
        }
    }
    found
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = fs::read_dir(dir)
        .expect("read src")
        .map(|e| e.expect("dir entry").path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}

fn graph(src: &Path) -> Graph {
    let mut modules: BTreeMap<String, Vec<PathBuf>> = BTreeMap::new();
    for entry in fs::read_dir(src).expect("read src") {
        let p = entry.expect("dir entry").path();
        let name = p.file_stem().expect("name").to_string_lossy().into_owned();
        if p.is_dir() {
            let mut files = Vec::new();
            rust_files(&p, &mut files);
            modules.entry(name).or_default().extend(files);
        } else if p.extension().is_some_and(|e| e == "rs") && name != "lib" && name != "main" {
            modules.entry(name).or_default().push(p);
        }
    }
    let mut excluded: BTreeSet<PathBuf> = BTreeSet::new();
    let mut texts = Vec::new();
    for (module, files) in &modules {
        for f in files {
            let mut code = strip(&fs::read_to_string(f).expect("read source"));
            // `src/a/mod.rs` and `src/a.rs` hold module `a`: their children are `a/x.rs`.
            let child_dir = if f.file_stem().is_some_and(|s| s == "mod") {
                f.parent().expect("parent").to_path_buf()
            } else {
                f.with_extension("")
            };
            for child in drop_test_modules(&mut code) {
                excluded.insert(child_dir.join(format!("{child}.rs")));
                excluded.insert(child_dir.join(&child).join("mod.rs"));
            }
            let rel = f.strip_prefix(src).expect("under src");
            // The module's path length: `super::` that many times names the crate root.
            let depth = rel.components().count();
            let depth = if f.file_stem().is_some_and(|s| s == "mod") {
                depth - 1
            } else {
                depth
            };
            texts.push((
                module.clone(),
                f.clone(),
                rel.display().to_string(),
                code,
                depth,
            ));
        }
    }
    let mut g: Graph = modules
        .keys()
        .map(|m| (m.clone(), BTreeMap::new()))
        .collect();
    for (module, path, rel, code, depth) in texts {
        if excluded.contains(&path) {
            continue;
        }
        for (target, line) in references(&code, depth) {
            if target != module && modules.contains_key(&target) {
                g.get_mut(&module)
                    .expect("module")
                    .entry(target)
                    .or_insert((rel.clone(), line));
            }
        }
    }
    g
}

/// One cycle through each strongly connected component of more than one module.
fn cycles(g: &Graph) -> Vec<Vec<String>> {
    let reaches = |from: &str| {
        let mut seen = BTreeSet::new();
        let mut todo = vec![from.to_string()];
        while let Some(m) = todo.pop() {
            for next in g[&m].keys() {
                if seen.insert(next.clone()) {
                    todo.push(next.clone());
                }
            }
        }
        seen
    };
    let reach: BTreeMap<&String, BTreeSet<String>> = g.keys().map(|m| (m, reaches(m))).collect();
    let mut done = BTreeSet::new();
    let mut found = Vec::new();
    for m in g.keys() {
        if done.contains(m) || !reach[m].contains(m) {
            continue;
        }
        // The shortest way back to `m`, through modules of its component only.
        let component: BTreeSet<&String> = g
            .keys()
            .filter(|o| *o == m || (reach[m].contains(*o) && reach[*o].contains(m)))
            .collect();
        let mut prev: BTreeMap<String, String> = BTreeMap::new();
        let mut queue = std::collections::VecDeque::from([m.clone()]);
        'search: while let Some(at) = queue.pop_front() {
            for next in g[&at].keys().filter(|n| component.contains(n)) {
                if next == m {
                    prev.insert(m.clone(), at.clone());
                    break 'search;
                }
                if !prev.contains_key(next) {
                    prev.insert(next.clone(), at.clone());
                    queue.push_back(next.clone());
                }
            }
        }
        let mut path = vec![m.clone()];
        let mut at = prev[m].clone();
        while &at != m {
            path.push(at.clone());
            at = prev[&at].clone();
        }
        path.push(m.clone());
        path.reverse();
        done.extend(component.into_iter().cloned());
        found.push(path);
    }
    found
}

#[test]
fn top_level_modules_import_each_other_without_a_cycle() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let g = graph(&src);
    let edges: usize = g.values().map(BTreeMap::len).sum();
    assert!(
        g.len() >= 10 && edges >= 20,
        "read too little of {}: {} modules, {edges} imports",
        src.display(),
        g.len()
    );
    let found = cycles(&g);
    let described: Vec<String> = found
        .iter()
        .map(|path| {
            let sites: Vec<String> = path
                .windows(2)
                .map(|w| {
                    let (file, line) = &g[&w[0]][&w[1]];
                    format!("  {} -> {}: src/{file}:{line}", w[0], w[1])
                })
                .collect();
            format!("{}\n{}", path.join(" -> "), sites.join("\n"))
        })
        .collect();
    assert!(
        found.is_empty(),
        "module import cycles in crates/proxy/src (move the shared items into a lower module):\n{}",
        described.join("\n")
    );
}

#[test]
fn references_skip_comments_strings_and_test_modules() {
    let mut code = strip(concat!(
        "use crate::{a, b::c, d::{e, f}};\n",
        "// crate::comment\n",
        "/* crate::block /* nested */ crate::still */\n",
        "const S: &str = \"crate::string\";\n",
        "const R: &str = r#\"crate::raw\"#;\n",
        "const Q: char = '\"'; fn g<'x>(_: &'x str) { crate::h::call(); }\n",
        "#[cfg(test)]\nmod tests {\n    use crate::in_tests;\n}\n",
        "#[cfg(test)]\nmod helpers;\n",
        "fn k() { super::super::up::f(); super::sibling::f(); }\n",
    ));
    let out_of_line = drop_test_modules(&mut code);
    assert_eq!(out_of_line, ["helpers"]);
    // As if in `src/x/y.rs`: `super::super::up` is the crate's `up`, `super::sibling` is `x`'s.
    let names: Vec<String> = references(&code, 2).into_keys().collect();
    assert_eq!(names, ["a", "b", "d", "h", "up"]);
    assert_eq!(references(&code, 2)["h"], 6, "line numbers are the file's");
}

#[test]
fn a_cycle_is_found_and_named() {
    let mut g: Graph = BTreeMap::new();
    let site = || ("x.rs".to_string(), 1);
    for (from, to) in [("a", "b"), ("b", "c"), ("c", "a"), ("c", "d"), ("e", "d")] {
        g.entry(from.to_string())
            .or_default()
            .insert(to.to_string(), site());
        g.entry(to.to_string()).or_default();
    }
    assert_eq!(cycles(&g), [["a", "b", "c", "a"]]);
    g.get_mut("c").expect("c").remove("a");
    assert!(cycles(&g).is_empty());
}
