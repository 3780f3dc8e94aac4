//! `$ref`s: inside one file, and between the files of one submission (`configs:submit`, or
//! `gcloud endpoints services deploy api.yaml common.yaml`).
//!
//! # How a reference finds its file
//!
//! Every file of a submission is known by its `filePath`, read as a `/`-separated path with `.`
//! segments dropped (`./a/b.yaml` is `a/b.yaml`). The part of a `$ref` before `#` is a path
//! relative to the directory of the file the `$ref` is written in, as in a browser or an editor:
//! from `v1/api.yaml`, `common.yaml` and `./common.yaml` both name `v1/common.yaml`. gcloud
//! sends every file under its base name, so through gcloud all files sit side by side and
//! `./common.yaml` is the way to write it. Names are compared exactly (case included), and a
//! `%XX` escape in the path stands for its byte.
//!
//! Refused, each with its own message: a URL (`https://...`, `file:...`: the control plane never
//! fetches anything), an absolute path, a path with a `..` segment, a `\` separator, and a name
//! that two files of the submission share. The part after `#` is a JSON pointer
//! (`#/definitions/Pet`, `~1` for `/`, `~0` for `~`); without one the whole file is meant.
//! Inside an OpenAPI file a reference to the file itself must start with `#/definitions/`,
//! `#/parameters/` or `#/responses/`, as Google's converter requires.
//!
//! # Which files are APIs
//!
//! A file that another file of the submission refers to, and that has no operations (no
//! `swagger` field, or no `paths` entries), only holds shared definitions: it is read through
//! references and not converted. gcloud sends only files with `swagger` and `host`, so through
//! gcloud such a file carries those two fields and nothing else it needs.
//!
//! # Bounds
//!
//! Nothing is expanded: a schema reached by a thousand references is looked at once. Following
//! a chain of `$ref`s to a parameter or path item stops after [`MAX_REF_HOPS`] and at a loop;
//! path items pulled in by `$ref` may add at most [`MAX_REF_NODES`] nodes to one submission, so
//! a small file that points 100,000 paths at one large path item cannot make the converter
//! build 100,000 copies of it. Pointers into large mappings are hash lookups.

use super::tree::{Node, Pos, Value};
use super::{Severity, SourceFile, Watch};
use std::cell::Cell;
use std::collections::{HashMap, HashSet};

/// Most `$ref`s followed one after another to reach a parameter or a path item. Real files
/// use one, at most two.
pub(crate) const MAX_REF_HOPS: usize = 32;

/// Most nodes path items pulled in by `$ref` may add to one submission: the YAML alias budget,
/// for the same reason (a reference costs a few bytes, what it brings in does not).
pub(crate) const MAX_REF_NODES: usize = super::tree::MAX_ALIAS_NODES;

/// Mappings with more entries than this get a hash index for pointer lookups.
const INDEXED_MAP_MIN: usize = 8;

/// File names listed in a "no such file" message.
const FILES_LISTED: usize = 5;

/// Why a reference cannot be followed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Problem {
    pub message: String,
    /// The target is merely missing (a warning inside `definitions`, which Google's converter
    /// compiles only on demand); every other problem is an error wherever it is.
    pub lenient: bool,
}

impl Problem {
    fn error(message: String) -> Problem {
        Problem {
            message,
            lenient: false,
        }
    }
    fn missing(message: String) -> Problem {
        Problem {
            message,
            lenient: true,
        }
    }
}

/// The parsed files of one submission, for resolving references between them.
pub(crate) struct Submission<'n> {
    files: &'n [SourceFile],
    roots: &'n [Option<Node>],
    /// Each file's normalised path.
    paths: Vec<String>,
    by_path: HashMap<String, Vec<usize>>,
    /// For hints when a name is not found: base name, and path in lower case → files.
    by_base: HashMap<String, Vec<usize>>,
    by_lower: HashMap<String, Vec<usize>>,
    /// Files that only hold definitions for others.
    shared: Vec<bool>,
    /// Hash indexes of the larger mappings, by address.
    maps: HashMap<*const Node, HashMap<&'n str, &'n Node>>,
    /// Nodes still allowed to path items brought in by `$ref`, and whether a reference has
    /// already found it insufficient.
    ref_budget: Cell<usize>,
    ref_budget_spent: Cell<bool>,
}

impl<'n> Submission<'n> {
    /// Indexes the files (`roots[i]` is `files[i]` parsed, `None` if it could not be) and
    /// decides which only hold shared definitions. Gives up early once `watch` says so.
    pub(crate) fn new(
        files: &'n [SourceFile],
        roots: &'n [Option<Node>],
        watch: &Watch<'_>,
    ) -> Submission<'n> {
        let paths: Vec<String> = files.iter().map(|f| normalize(&f.path)).collect();
        let mut by_path: HashMap<String, Vec<usize>> = HashMap::new();
        let mut by_base: HashMap<String, Vec<usize>> = HashMap::new();
        let mut by_lower: HashMap<String, Vec<usize>> = HashMap::new();
        for (i, p) in paths.iter().enumerate() {
            by_path.entry(p.clone()).or_default().push(i);
            by_base.entry(base_name(p).to_string()).or_default().push(i);
            by_lower.entry(p.to_lowercase()).or_default().push(i);
        }
        let mut sub = Submission {
            files,
            roots,
            paths,
            by_path,
            by_base,
            by_lower,
            shared: vec![false; files.len()],
            maps: HashMap::new(),
            ref_budget: Cell::new(MAX_REF_NODES),
            ref_budget_spent: Cell::new(false),
        };
        let mut referenced = vec![false; files.len()];
        for (i, root) in roots.iter().enumerate() {
            let Some(root) = root else { continue };
            let mut refs = Vec::new();
            index_maps(root, &mut sub.maps, &mut refs, watch);
            if watch.stopped().is_some() {
                return sub;
            }
            for r in refs {
                let file = r.split_once('#').map_or(r, |(f, _)| f);
                if file.is_empty() {
                    continue;
                }
                if let Ok(target) = sub.target_path(i, file) {
                    for &t in sub.by_path.get(&target).into_iter().flatten() {
                        if t != i {
                            referenced[t] = true;
                        }
                    }
                }
            }
        }
        for (i, root) in roots.iter().enumerate() {
            sub.shared[i] = referenced[i] && root.as_ref().is_some_and(|r| !has_operations(r));
        }
        // A submission of nothing but shared files has nothing to convert: treat them all as
        // APIs, so each says what it lacks.
        if roots
            .iter()
            .zip(&sub.shared)
            .all(|(r, s)| r.is_none() || *s)
        {
            sub.shared.iter_mut().for_each(|s| *s = false);
        }
        sub
    }

    /// Files in the submission.
    pub(crate) fn len(&self) -> usize {
        self.files.len()
    }

    /// Whether file `i` only holds definitions for other files.
    pub(crate) fn is_shared(&self, i: usize) -> bool {
        self.shared.get(i).copied().unwrap_or(false)
    }

    /// The name file `i` was submitted under.
    pub(crate) fn path(&self, i: usize) -> &'n str {
        self.files.get(i).map_or("", |f| f.path.as_str())
    }

    /// The target of `r`, a `$ref` written in file `from`.
    pub(crate) fn resolve(&self, from: usize, r: &str) -> Result<(usize, &'n Node), Problem> {
        if r.is_empty() {
            return Err(Problem::error(
                "reference is empty; write \"#/definitions/Name\", or \"./file.yaml#/Name\" for another file of the submission".to_string(),
            ));
        }
        let (file, fragment) = match r.split_once('#') {
            Some((f, p)) => (f, Some(p)),
            None => (r, None),
        };
        let doc = if file.is_empty() {
            from
        } else {
            self.file(from, r, file)?
        };
        let Some(root) = self.roots.get(doc).and_then(Option::as_ref) else {
            return Err(Problem::error(format!(
                "reference \"{r}\" cannot be resolved: {} could not be read (see its own errors)",
                self.path(doc)
            )));
        };
        if file.is_empty() && !self.is_shared(from) {
            return self.section_ref(root, r).map(|n| (doc, n));
        }
        match fragment {
            None | Some("") => Ok((doc, root)),
            Some(p) if p.starts_with('/') => self.pointer(root, p).map(|n| (doc, n)).map_err(|why| {
                Problem::missing(format!(
                    "reference \"{r}\" cannot be resolved: {} {why}",
                    self.path(doc)
                ))
            }),
            Some(p) => Err(Problem::error(format!(
                "reference \"{r}\": the part after \"#\" must be a JSON pointer starting with \"/\" (\"{file}#/{p}\")"
            ))),
        }
    }

    /// Follows `$ref`s from `node` (written in file `doc`) to a node that is not one. A broken
    /// reference ends the walk where it is (the reference check reports it); a loop or a chain
    /// longer than [`MAX_REF_HOPS`] is the error returned.
    pub(crate) fn follow(&self, doc: usize, node: &'n Node) -> Result<(usize, &'n Node), String> {
        let mut at = (doc, node);
        let mut seen: Vec<*const Node> = Vec::new();
        let mut chain: Vec<&str> = Vec::new();
        loop {
            let Some(r) = at.1.get("$ref").and_then(Node::as_str) else {
                return Ok(at);
            };
            let here: *const Node = at.1;
            chain.push(r);
            if seen.contains(&here) {
                return Err(format!("the $refs loop ({})", show_chain(&chain)));
            }
            if seen.len() == MAX_REF_HOPS {
                return Err(format!(
                    "more than {MAX_REF_HOPS} $refs in a row ({}); refer to the target directly",
                    show_chain(&chain)
                ));
            }
            seen.push(here);
            match self.resolve(at.0, r) {
                Ok(next) => at = next,
                Err(_) => return Ok(at),
            }
        }
    }

    /// Takes `nodes` from the budget of nodes path items may bring in by `$ref`. `Err(true)` the
    /// first time it does not suffice (that reference is reported), `Err(false)` after that
    /// (the rest are skipped quietly: one error, not one per remaining path).
    pub(crate) fn charge(&self, nodes: usize) -> Result<(), bool> {
        if self.ref_budget_spent.get() {
            return Err(false);
        }
        match self.ref_budget.get().checked_sub(nodes) {
            Some(rest) => {
                self.ref_budget.set(rest);
                Ok(())
            }
            None => {
                self.ref_budget_spent.set(true);
                Err(true)
            }
        }
    }

    /// The entry `key` of a mapping, by hash when the mapping is large.
    pub(crate) fn child(&self, map: &'n Node, key: &str) -> Option<&'n Node> {
        if let Some(index) = self.maps.get(&(map as *const Node)) {
            return index.get(key).copied();
        }
        map.get(key)
    }

    /// A reference inside an OpenAPI file to that file: Google's three sections only.
    fn section_ref(&self, root: &'n Node, r: &str) -> Result<&'n Node, Problem> {
        let must_begin = || {
            Problem::error(format!(
                "reference \"{r}\" must begin with \"#/definitions/\", \"#/parameters/\" or \"#/responses/\""
            ))
        };
        let local = r.strip_prefix("#/").ok_or_else(must_begin)?;
        // OpenAPI 3.x keeps them all under `components` (`#/components/schemas/Pet`).
        if let Some(rest) = local.strip_prefix("components/") {
            let (section, name) = rest.split_once('/').unwrap_or((rest, ""));
            let entries = self
                .child(root, "components")
                .and_then(|c| self.child(c, &unescape(section)))
                .ok_or_else(|| {
                    Problem::error(format!(
                        "reference \"{r}\" cannot be resolved: the file has no \"components.{section}\" section"
                    ))
                })?;
            let name = unescape(name);
            let found = match entries.value {
                Value::Map(_) => self.child(entries, &name),
                _ => None,
            };
            return found.ok_or_else(|| {
                Problem::missing(format!(
                    "reference \"{r}\" cannot be resolved: \"{name}\" is not defined under \"components.{section}\""
                ))
            });
        }
        let (section, name) = local.split_once('/').unwrap_or((local, ""));
        if !matches!(section, "definitions" | "parameters" | "responses") {
            return Err(must_begin());
        }
        let name = unescape(name);
        let Some(entries) = self.child(root, section) else {
            return Err(Problem::error(format!(
                "reference \"{r}\" cannot be resolved: the file has no \"{section}\" section"
            )));
        };
        let found = match entries.value {
            Value::Map(_) => self.child(entries, &name),
            _ => None,
        };
        found.ok_or_else(|| {
            Problem::missing(format!(
                "reference \"{r}\" cannot be resolved: \"{name}\" is not defined under \"{section}\""
            ))
        })
    }

    /// Evaluates a JSON pointer (`/a/b~1c/0`); the error completes "<file> ...".
    fn pointer(&self, root: &'n Node, pointer: &str) -> Result<&'n Node, String> {
        let mut node = root;
        let mut at = String::new();
        for raw in pointer.split('/').skip(1) {
            let seg = unescape(raw);
            let place = || {
                if at.is_empty() {
                    "at its top level".to_string()
                } else {
                    format!("under \"{at}\"")
                }
            };
            node = match &node.value {
                Value::Map(_) => self
                    .child(node, &seg)
                    .ok_or_else(|| format!("has no \"{seg}\" {}", place()))?,
                Value::Seq(items) => {
                    array_index(&seg)
                        .and_then(|i| items.get(i))
                        .ok_or_else(|| {
                            format!(
                                "has no item \"{seg}\" in the list of {} {}",
                                items.len(),
                                place()
                            )
                        })?
                }
                _ => {
                    return Err(format!(
                        "has {} {}, not a mapping or list to look up \"{seg}\" in",
                        node.kind(),
                        place()
                    ))
                }
            };
            at.push('/');
            at.push_str(raw);
        }
        Ok(node)
    }

    /// The file the path part `file` of `r` (written in file `from`) names.
    fn file(&self, from: usize, r: &str, file: &str) -> Result<usize, Problem> {
        let target = self
            .target_path(from, file)
            .map_err(|why| Problem::error(format!("reference \"{r}\" {why}")))?;
        match self.by_path.get(&target).map(Vec::as_slice) {
            Some([only]) => Ok(*only),
            Some(several) => Err(Problem::error(format!(
                "reference \"{r}\" is ambiguous: {} files of the submission are named \"{target}\"",
                several.len()
            ))),
            None => Err(Problem::error(format!(
                "reference \"{r}\" cannot be resolved: the submission has no file \"{target}\"{}",
                self.no_file_hint(from, r, &target)
            ))),
        }
    }

    /// The normalised path `file` (the part of a `$ref` before `#`, written in file `from`)
    /// stands for, or why it cannot stand for a file of the submission.
    fn target_path(&self, from: usize, file: &str) -> Result<String, String> {
        let scheme = file.split_once(':').map(|(s, _)| s).filter(|s| {
            !s.contains('/')
                && s.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
        });
        match scheme {
            Some(s) if s.len() == 1 => {
                return Err("is an absolute path; refer to a file of the submission by its path relative to this file, e.g. \"./common.yaml\"".to_string())
            }
            Some(_) => {
                return Err("is a URL; only files of the same submission can be referred to (Portico fetches nothing): add the file to the deployment and refer to it by its relative path, e.g. \"./common.yaml\"".to_string())
            }
            None => {}
        }
        if file.starts_with('/') {
            return Err("is an absolute path; refer to a file of the submission by its path relative to this file, e.g. \"./common.yaml\"".to_string());
        }
        if file.contains('\\') {
            return Err("uses \"\\\" in its path; separate directories with \"/\"".to_string());
        }
        let decoded = percent_decode(file)
            .ok_or_else(|| "has %-escapes that do not spell UTF-8 text".to_string())?;
        if decoded.contains('\\') {
            return Err("uses \"\\\" in its path; separate directories with \"/\"".to_string());
        }
        if decoded.split('/').any(|s| s == "..") {
            return Err("goes up a directory (\"..\"); refer to files of the submission without \"..\", e.g. \"./common.yaml\" for a file next to this one".to_string());
        }
        let from_path = self.paths.get(from).map_or("", String::as_str);
        let dir = from_path.rsplit_once('/').map_or("", |(d, _)| d);
        let joined = normalize(&format!("{dir}/{decoded}"));
        if joined.is_empty() || decoded.ends_with('/') {
            return Err("names a directory, not a file".to_string());
        }
        Ok(joined)
    }

    /// What to say after "the submission has no file X".
    fn no_file_hint(&self, from: usize, r: &str, target: &str) -> String {
        if let Some(&i) = self
            .by_lower
            .get(&target.to_lowercase())
            .and_then(|v| v.first())
        {
            return format!(
                " (\"{}\" differs only in case; names are compared exactly)",
                self.path(i)
            );
        }
        if let Some(&i) = self.by_base.get(base_name(target)).and_then(|v| v.first()) {
            return format!(
                " (\"{}\" has that name, but references are resolved against the referring file's path \"{}\"; gcloud sends every file under its base name, so refer to it as \"./{}\")",
                self.path(i),
                self.path(from),
                base_name(target)
            );
        }
        if !r.contains(['#', '/', '.']) {
            return format!(
                "; to refer to a part of this file, write \"#/definitions/{r}\", \"#/parameters/{r}\" or \"#/responses/{r}\""
            );
        }
        let mut names: Vec<&str> = self
            .files
            .iter()
            .take(FILES_LISTED)
            .map(|f| f.path.as_str())
            .collect();
        if self.files.len() > FILES_LISTED {
            names.push("...");
        }
        format!(
            " (its files: {}); add the file to the deployment",
            names.join(", ")
        )
    }
}

/// Checks `$ref`s: an OpenAPI file's own, as its conversion goes, and then the parts of shared
/// files they lead to, each part once.
#[derive(Default)]
pub(crate) struct RefCheck<'n> {
    strict: Vec<(usize, &'n Node)>,
    lenient: Vec<(usize, &'n Node)>,
    /// Nodes of shared files already checked.
    seen: HashSet<*const Node>,
    /// Cycles of `$ref`s between shared files already reported, by their first member.
    pub(crate) cycles_reported: HashSet<*const Node>,
}

/// Receives the problems found: (file index, position, severity, message).
pub(crate) type Report<'r> = dyn FnMut(usize, Pos, Severity, String) + 'r;

impl<'n> RefCheck<'n> {
    /// Checks every `$ref` under `node`, a part of file `doc`. `lenient`: a missing target is
    /// a warning. Targets in shared files are queued for [`RefCheck::finish`].
    pub(crate) fn check(
        &mut self,
        sub: &Submission<'n>,
        doc: usize,
        node: &'n Node,
        lenient: bool,
        watch: &Watch<'_>,
        report: &mut Report<'_>,
    ) {
        if !matches!(node.value, Value::Map(_) | Value::Seq(_)) || watch.check().is_err() {
            return;
        }
        if sub.is_shared(doc) && !self.seen.insert(node as *const Node) {
            return;
        }
        match &node.value {
            Value::Map(entries) => {
                for (k, v) in entries {
                    if k.text != "$ref" {
                        self.check(sub, doc, v, lenient, watch, report);
                        continue;
                    }
                    // A `$ref` that is not a string is a property or key of that name.
                    let Some(r) = v.as_str() else {
                        self.check(sub, doc, v, lenient, watch, report);
                        continue;
                    };
                    match sub.resolve(doc, r) {
                        Ok((target, n)) => {
                            if sub.is_shared(target) {
                                if lenient {
                                    self.lenient.push((target, n));
                                } else {
                                    self.strict.push((target, n));
                                }
                            }
                        }
                        Err(p) => {
                            let severity = if p.lenient && lenient {
                                Severity::Warning
                            } else {
                                Severity::Error
                            };
                            report(doc, v.pos, severity, p.message);
                        }
                    }
                }
            }
            Value::Seq(items) => {
                for i in items {
                    self.check(sub, doc, i, lenient, watch, report);
                }
            }
            _ => {}
        }
    }

    /// Checks the queued parts of shared files: first every part an API reaches outside its
    /// `definitions`, then the rest (whose missing targets are warnings).
    pub(crate) fn finish(
        &mut self,
        sub: &Submission<'n>,
        watch: &Watch<'_>,
        report: &mut Report<'_>,
    ) {
        while let Some((doc, node)) = self.strict.pop() {
            self.check(sub, doc, node, false, watch, report);
            if watch.stopped().is_some() {
                return;
            }
        }
        while let Some((doc, node)) = self.lenient.pop() {
            self.check(sub, doc, node, true, watch, report);
            if watch.stopped().is_some() {
                return;
            }
        }
    }
}

/// `a → b → c` for a message, each reference cut to a readable length.
fn show_chain(chain: &[&str]) -> String {
    const SHOWN: usize = 80;
    chain
        .iter()
        .map(|r| match r.char_indices().nth(SHOWN) {
            Some((i, _)) => format!("{}…", &r[..i]),
            None => (*r).to_string(),
        })
        .collect::<Vec<_>>()
        .join(" → ")
}

/// Indexes the large mappings under `node` and collects its `$ref` strings.
fn index_maps<'n>(
    node: &'n Node,
    maps: &mut HashMap<*const Node, HashMap<&'n str, &'n Node>>,
    refs: &mut Vec<&'n str>,
    watch: &Watch<'_>,
) {
    if watch.check().is_err() {
        return;
    }
    match &node.value {
        Value::Map(entries) => {
            if entries.len() > INDEXED_MAP_MIN {
                let mut index = HashMap::with_capacity(entries.len());
                for (k, v) in entries {
                    // Duplicate keys are errors already; the first is the one `get` finds.
                    index.entry(k.text.as_str()).or_insert(v);
                }
                maps.insert(node as *const Node, index);
            }
            for (k, v) in entries {
                match v.as_str() {
                    Some(r) if k.text == "$ref" => refs.push(r),
                    _ => index_maps(v, maps, refs, watch),
                }
            }
        }
        Value::Seq(items) => {
            for i in items {
                index_maps(i, maps, refs, watch);
            }
        }
        _ => {}
    }
}

/// Whether an OpenAPI file defines operations (a file without is a candidate for sharing).
fn has_operations(root: &Node) -> bool {
    root.get("swagger").is_some()
        && root
            .get("paths")
            .and_then(Node::as_map)
            .is_some_and(|m| m.iter().any(|(k, _)| !k.text.starts_with("x-")))
}

/// `a/./b//c` → `a/b/c`; `a/../b` → `b`. A leading `..` that has nothing to undo stays.
pub(crate) fn normalize(path: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    for seg in path.split('/') {
        match seg {
            "" | "." => {}
            ".." if out.last().is_some_and(|s| *s != "..") => {
                out.pop();
            }
            s => out.push(s),
        }
    }
    out.join("/")
}

fn base_name(path: &str) -> &str {
    path.rsplit_once('/').map_or(path, |(_, b)| b)
}

/// A JSON pointer segment: `~1` is `/`, `~0` is `~`.
fn unescape(seg: &str) -> String {
    if seg.contains('~') {
        seg.replace("~1", "/").replace("~0", "~")
    } else {
        seg.to_string()
    }
}

/// A JSON pointer array index: `0` or digits without a leading zero.
fn array_index(seg: &str) -> Option<usize> {
    let digits = !seg.is_empty() && seg.bytes().all(|b| b.is_ascii_digit());
    if !digits || (seg.len() > 1 && seg.starts_with('0')) {
        return None;
    }
    seg.parse().ok()
}

/// `%XX` escapes decoded; a `%` not followed by two hex digits stays as it is. `None` when the
/// bytes are not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    if !s.contains('%') {
        return Some(s.to_string());
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%' {
            if let (Some(h), Some(l)) = (
                bytes.get(i + 1).and_then(|b| hex(*b)),
                bytes.get(i + 2).and_then(|b| hex(*b)),
            ) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_normalise() {
        assert_eq!(normalize("./a/./b//c.yaml"), "a/b/c.yaml");
        assert_eq!(normalize("a/../b.yaml"), "b.yaml");
        assert_eq!(normalize("../b.yaml"), "../b.yaml");
        assert_eq!(normalize("/abs/x.json"), "abs/x.json");
    }

    #[test]
    fn pointer_segments() {
        assert_eq!(unescape("a~1b~0c"), "a/b~c");
        assert_eq!(array_index("0"), Some(0));
        assert_eq!(array_index("12"), Some(12));
        assert_eq!(array_index("01"), None);
        assert_eq!(array_index("-1"), None);
        assert_eq!(array_index(""), None);
    }

    #[test]
    fn percent_escapes() {
        assert_eq!(percent_decode("a%20b.json").as_deref(), Some("a b.json"));
        assert_eq!(percent_decode("%2e%2e/x").as_deref(), Some("../x"));
        assert_eq!(percent_decode("100%").as_deref(), Some("100%"));
        assert_eq!(percent_decode("%zz%4").as_deref(), Some("%zz%4"));
        assert_eq!(percent_decode("%ff"), None);
    }
}
