//! The request path matcher: HTTP method + raw request target → the registered value (usually a
//! method's selector or its compiled per-method config), with ESP v1's matching rules.
//!
//! Build once with [`PathMatcherBuilder`], then [`PathMatcher::lookup`] per request. The trie is
//! keyed by template segment; at every node the children are tried in precedence order
//!
//! 1. the exact literal segment,
//! 2. a single-segment variable `{var}`,
//! 3. `*`,
//! 4. `**` (zero or more segments; literal segments may follow it),
//!
//! and a failed branch backtracks to the next alternative, so `/c/x/d/e` picks `/c/*/d/e` over
//! `/c/*/d/**` and a literal branch that has no rule for the method falls back to a wildcard one.
//! As in ESP, `**` followed by literals takes at least one segment and then as few as let the
//! literals match: `/other/bar/foo/const:verb` picks `/other/**/const:verb` over `/other/**:verb`,
//! and `/a/{x=**}/c` does not match `/a/c`. Templates without literals after `**` pay nothing
//! for this.
//!
//! Request handling, as ESP does it:
//! - the target is cut at `?` and matched **undecoded**, case-sensitively;
//! - trailing empty segments are dropped (`/a/` ≡ `/a`), inner ones are significant;
//! - `:verb` at the end of the last segment is a custom verb only if some template uses that
//!   verb and no `/` follows it; otherwise the colon is ordinary segment text
//!   (`/foo/other:verb` matches `/foo/*`, `/foo/x:verb/` never matches `/foo/*:verb`);
//! - a rule for the exact HTTP method beats a `*` (any method) rule at the same node, and `HEAD`
//!   falls back to `GET`.
//!
//! ESPv2's `--disallow_colon_in_wildcard_path_segment` ([`PathMatcherBuilder::disallow_colon_in_wildcards`]):
//! `{var}`, `*` and `**` never take a segment holding `:`, as the HTTP template grammar says
//! (a literal colon only separates the custom verb). `/v1/{name}` then does not match
//! `/v1/a:unknownVerb`, which answers 404 rather than reaching the method with `a:unknownVerb`
//! bound.
//!
//! [`PathMatcher::lookup`] does not allocate: segments are sliced out of the target as the trie
//! is walked. [`PathMatcher::lookup_with_bindings`] also returns the path variables, and
//! [`query_bindings`] turns a query string into bindings the same way ESP does.

use crate::template::{Segment, Template, TemplateError};
use percent_encoding::percent_decode_str;
use std::collections::{HashMap, HashSet};

/// A path variable bound by a match: `{shelf}` → `field_path: ["shelf"]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binding {
    pub field_path: Vec<String>,
    pub value: String,
}

#[derive(Debug)]
struct Entry<T> {
    value: T,
    template: Template,
    /// The template as registered (`/v1/shelves/{shelf}`).
    text: Box<str>,
}

/// Which rules a walk of the trie may end at.
#[derive(Debug, Clone, Copy)]
enum Want<'a> {
    /// A rule for this HTTP method (exact, `GET` for `HEAD`, or `*`).
    Method(&'a str),
    /// A rule for any method.
    Any,
}

/// A rule ending at a trie node.
#[derive(Debug)]
struct End {
    verb: Option<Box<str>>,
    method: Box<str>,
    entry: usize,
}

#[derive(Debug)]
struct Node {
    literals: HashMap<Box<str>, Node>,
    param: Option<Box<Node>>,
    star: Option<Box<Node>>,
    /// Only literal children follow `**` (the template grammar refuses other wildcards).
    double_star: Option<Box<Node>>,
    ends: Vec<End>,
}

impl Node {
    fn new() -> Node {
        Node {
            literals: HashMap::new(),
            param: None,
            star: None,
            double_star: None,
            ends: Vec::new(),
        }
    }

    fn child_mut(&mut self, seg: &Segment) -> &mut Node {
        match seg {
            Segment::Literal(l) => self
                .literals
                .entry(l.as_str().into())
                .or_insert_with(Node::new),
            Segment::Param => self.param.get_or_insert_with(|| Box::new(Node::new())),
            Segment::Star => self.star.get_or_insert_with(|| Box::new(Node::new())),
            Segment::DoubleStar => self
                .double_star
                .get_or_insert_with(|| Box::new(Node::new())),
        }
    }

    /// The entry wanted among this node's ends: for a method, the exact method, then GET for
    /// HEAD, then `*`; for any method, the first registered.
    fn pick(&self, want: Want<'_>, verb: Option<&str>) -> Option<usize> {
        let method = match want {
            Want::Method(m) => m,
            Want::Any => {
                return self
                    .ends
                    .iter()
                    .find(|e| e.verb.as_deref() == verb)
                    .map(|e| e.entry)
            }
        };
        let mut head_get = None;
        let mut any = None;
        for e in &self.ends {
            if e.verb.as_deref() != verb {
                continue;
            }
            if &*e.method == method {
                return Some(e.entry);
            }
            if method == "HEAD" && &*e.method == "GET" {
                head_get = Some(e.entry);
            } else if &*e.method == "*" {
                any = Some(e.entry);
            }
        }
        head_get.or(any)
    }

    /// Depth-first match of the remaining path. `rest` is `None` when every segment is consumed,
    /// otherwise the unconsumed text without its leading '/'.
    fn find(
        &self,
        rest: Option<&str>,
        method: Want<'_>,
        verb: Option<&str>,
        colon_free: bool,
    ) -> Option<usize> {
        let Some(rest) = rest else {
            return self.pick(method, verb).or_else(|| {
                // `**` also matches zero segments.
                self.double_star.as_ref().and_then(|n| n.pick(method, verb))
            });
        };
        let (seg, next) = match rest.find('/') {
            Some(i) => (&rest[..i], Some(&rest[i + 1..])),
            None => (rest, None),
        };
        if let Some(child) = self.literals.get(seg) {
            if let Some(e) = child.find(next, method, verb, colon_free) {
                return Some(e);
            }
        }
        if colon_free && seg.contains(':') {
            // No wildcard takes this segment.
            return None;
        }
        if let Some(child) = &self.param {
            if let Some(e) = child.find(next, method, verb, colon_free) {
                return Some(e);
            }
        }
        if let Some(child) = &self.star {
            if let Some(e) = child.find(next, method, verb, colon_free) {
                return Some(e);
            }
        }
        self.double_star
            .as_ref()
            .and_then(|n| n.find_after_double_star(next, method, verb, colon_free))
    }

    /// Matching inside a `**` node that has consumed one segment already: before giving each
    /// further segment to `**`, try it as the literal that follows; the rule at this node (a
    /// trailing `**`) applies once the path is used up. Iterative, so a path of 64,000 segments
    /// does not deepen the stack.
    fn find_after_double_star(
        &self,
        mut rest: Option<&str>,
        method: Want<'_>,
        verb: Option<&str>,
        colon_free: bool,
    ) -> Option<usize> {
        if self.literals.is_empty() {
            if colon_free && rest.is_some_and(|r| r.contains(':')) {
                return None;
            }
            return self.pick(method, verb);
        }
        while let Some(r) = rest {
            let (seg, next) = match r.find('/') {
                Some(i) => (&r[..i], Some(&r[i + 1..])),
                None => (r, None),
            };
            if let Some(child) = self.literals.get(seg) {
                if let Some(e) = child.find(next, method, verb, colon_free) {
                    return Some(e);
                }
            }
            if colon_free && seg.contains(':') {
                // `**` cannot take this segment, so nothing after it can be reached.
                return None;
            }
            rest = next;
        }
        self.pick(method, verb)
    }
}

/// Collects templates; see the module docs for the matching rules.
#[derive(Debug)]
pub struct PathMatcherBuilder<T> {
    root: Node,
    entries: Vec<Entry<T>>,
    verbs: HashSet<Box<str>>,
    /// (segments, verb, method) registered so far: the duplicate check is one lookup, not a
    /// scan of the node's ends (20,000 verbs on one path made that quadratic).
    registered: HashSet<(Vec<Segment>, Option<String>, Box<str>)>,
    colon_free: bool,
}

impl<T> Default for PathMatcherBuilder<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> PathMatcherBuilder<T> {
    pub fn new() -> Self {
        PathMatcherBuilder {
            root: Node::new(),
            entries: Vec::new(),
            verbs: HashSet::new(),
            registered: HashSet::new(),
            colon_free: false,
        }
    }

    /// ESPv2's `--disallow_colon_in_wildcard_path_segment`: wildcards (`{var}`, `*`, `**`) do
    /// not take a segment that holds `:` (see the module docs).
    pub fn disallow_colon_in_wildcards(mut self, on: bool) -> Self {
        self.colon_free = on;
        self
    }

    /// Registers `value` for `http_method` (`"GET"`, `"POST"`, ... or `"*"` for any method) and a
    /// path template. Errors on an invalid template, or on a method+template pair that is already
    /// registered (the first registration is kept).
    pub fn register(
        &mut self,
        http_method: &str,
        template: &str,
        value: T,
    ) -> Result<(), TemplateError> {
        if http_method.is_empty() {
            return Err(TemplateError::EmptyMethod);
        }
        let parsed = Template::parse(template)?;
        if !self.registered.insert((
            parsed.segments.clone(),
            parsed.verb.clone(),
            http_method.into(),
        )) {
            return Err(TemplateError::Duplicate {
                method: http_method.to_string(),
                template: template.to_string(),
            });
        }
        let mut node = &mut self.root;
        for seg in &parsed.segments {
            node = node.child_mut(seg);
        }
        let verb = parsed.verb.as_deref();
        node.ends.push(End {
            verb: verb.map(Into::into),
            method: http_method.into(),
            entry: self.entries.len(),
        });
        if let Some(v) = verb {
            self.verbs.insert(v.into());
        }
        self.entries.push(Entry {
            value,
            template: parsed,
            text: template.into(),
        });
        Ok(())
    }

    pub fn build(self) -> PathMatcher<T> {
        PathMatcher {
            root: self.root,
            entries: self.entries,
            verbs: self.verbs,
            colon_free: self.colon_free,
        }
    }
}

/// A successful lookup: the registered value, and the matched path for the bindings.
#[derive(Debug)]
pub struct Match<'m, 't, T> {
    entry: &'m Entry<T>,
    /// The path text that matched (leading '/', trailing slashes and verb removed).
    path: &'t str,
}

impl<'m, T> Match<'m, '_, T> {
    pub fn value(&self) -> &'m T {
        &self.entry.value
    }

    /// The path variable bindings, decoded as ESP decodes them: a single-segment variable is
    /// fully percent-decoded, a multi-segment one only has unreserved characters decoded (so
    /// `%2F` stays `%2F`).
    pub fn bindings(&self) -> Vec<Binding> {
        self.bindings_with(true)
    }

    /// The path variable bindings as the path spelled them, nothing decoded (a multi-segment
    /// value keeps its `/`): what ESP (`keep_binding_escaped`) and ESPv2 put in the query of a
    /// `CONSTANT_ADDRESS` backend.
    pub fn escaped_bindings(&self) -> Vec<Binding> {
        self.bindings_with(false)
    }

    fn bindings_with(&self, decode: bool) -> Vec<Binding> {
        let segments: Vec<&str> = if self.path.is_empty() {
            Vec::new()
        } else {
            self.path[1..].split('/').collect()
        };
        let template = &self.entry.template;
        let mut bindings = Vec::with_capacity(template.variables.len());
        for v in &template.variables {
            // A variable with `**` ends as many segments before the path's end as the template
            // has after the variable.
            let end = if v.double_star {
                let after = template.segments.len().saturating_sub(v.end);
                segments.len().saturating_sub(after)
            } else {
                v.end
            }
            .min(segments.len());
            let start = v.start.min(end);
            let value = if !decode {
                segments[start..end].join("/")
            } else if v.is_single_segment() {
                segments
                    .get(start)
                    .map(|s| percent_decode_str(s).decode_utf8_lossy().into_owned())
                    .unwrap_or_default()
            } else {
                decode_multi_segment(&segments[start..end].join("/"))
            };
            bindings.push(Binding {
                field_path: v.field_path.clone(),
                value,
            });
        }
        bindings
    }
}

/// An immutable, pre-built matcher; cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct PathMatcher<T> {
    root: Node,
    entries: Vec<Entry<T>>,
    verbs: HashSet<Box<str>>,
    colon_free: bool,
}

impl<T> PathMatcher<T> {
    /// Finds the value for a method and raw request target (`/path?query`). `HEAD` falls back to
    /// `GET`; an exact-method rule beats `*` at the same node. Does not allocate.
    pub fn lookup(&self, http_method: &str, target: &str) -> Option<&T> {
        self.matched(http_method, target).map(|m| m.value())
    }

    /// Like [`lookup`](Self::lookup), but the match can also give its path variable bindings
    /// ([`Match::bindings`]) without matching again. Does not allocate.
    pub fn matched<'m, 't>(
        &'m self,
        http_method: &str,
        target: &'t str,
    ) -> Option<Match<'m, 't, T>> {
        let (entry, path) = self.find(Want::Method(http_method), target)?;
        Some(Match {
            entry: self.entries.get(entry)?,
            path,
        })
    }

    /// [`lookup`](Self::lookup) and [`Match::bindings`] in one call.
    pub fn lookup_with_bindings(
        &self,
        http_method: &str,
        target: &str,
    ) -> Option<(&T, Vec<Binding>)> {
        let m = self.matched(http_method, target)?;
        Some((m.value(), m.bindings()))
    }

    /// The template, as registered, of a rule for some method that matches the target's path,
    /// found with the same precedence as [`lookup`](Self::lookup): how ESPv2 names the path a
    /// request with a method no rule has for it was matched to.
    pub fn template_for_any_method(&self, target: &str) -> Option<&str> {
        let (entry, _) = self.find(Want::Any, target)?;
        self.entries.get(entry).map(|e| &*e.text)
    }

    /// True when nothing was registered.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entry index and the path text (leading '/', trailing slashes and verb removed) that
    /// matched.
    fn find<'t>(&self, method: Want<'_>, target: &'t str) -> Option<(usize, &'t str)> {
        let path = match target.find('?') {
            Some(i) => &target[..i],
            None => target,
        };
        if !path.starts_with('/') {
            return None;
        }
        // As ESP: a verb is split off only when the last ':' comes after the last '/', so in
        // `/a/b:verb/` the colon is ordinary segment text.
        if !self.verbs.is_empty() && !path.ends_with('/') {
            let last_seg = path.rfind('/').map_or(0, |i| i + 1);
            if let Some(colon) = path[last_seg..].rfind(':') {
                let verb = &path[last_seg + colon + 1..];
                if self.verbs.contains(verb) {
                    // `/a/:verb` keeps its empty last segment, as ESP's split does.
                    let stem = &path[..last_seg + colon];
                    if let Some(e) =
                        self.root
                            .find(rest_of(stem), method, Some(verb), self.colon_free)
                    {
                        return Some((e, stem));
                    }
                }
            }
        }
        let path = path.trim_end_matches('/');
        self.root
            .find(rest_of(path), method, None, self.colon_free)
            .map(|e| (e, path))
    }
}

/// `""` (the root) has no segments; `/a/b` → `a/b`.
fn rest_of(path: &str) -> Option<&str> {
    if path.is_empty() {
        None
    } else {
        Some(&path[1..])
    }
}

/// Variable bindings from a query string, as ESP derives them for transcoding and
/// `CONSTANT_ADDRESS` backends: `a.b=v` binds field path `["a", "b"]` to `v`. Parameters named in
/// `skip` (the API-key system parameters: the configured query names, or `key` and `api_key`)
/// are left out, as are empty names. Names are percent-decoded; values are fully decoded when
/// `decode` is set and kept as sent otherwise. `+` is not treated as a space (it is not one in
/// a URI path or in ESP's decoding).
pub fn query_bindings(query: &str, skip: &[&str], decode: bool) -> Vec<Binding> {
    let query = query.strip_prefix('?').unwrap_or(query);
    let mut out = Vec::new();
    for pair in query.split('&') {
        let (raw_name, raw_value) = pair.split_once('=').unwrap_or((pair, ""));
        let name = percent_decode_str(raw_name).decode_utf8_lossy();
        if name.is_empty() || skip.iter().any(|s| *s == name) {
            continue;
        }
        let value = if decode {
            percent_decode_str(raw_value)
                .decode_utf8_lossy()
                .into_owned()
        } else {
            raw_value.to_string()
        };
        out.push(Binding {
            field_path: name.split('.').map(str::to_string).collect(),
            value,
        });
    }
    out
}

fn hex_val(c: u8) -> Option<u8> {
    (c as char).to_digit(16).map(|d| d as u8)
}

/// Decodes a multi-segment binding as ESP does: every `%XX` except those for RFC 6570's reserved
/// characters (`!#$&'()*+,/:;=?@[]`), so `%2F` stays `%2F` and `%20` becomes a space.
fn decode_multi_segment(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex_val(b[i + 1]), hex_val(b[i + 2])) {
                let v = h * 16 + l;
                if !is_reserved(v) {
                    out.push(v);
                    i += 3;
                    continue;
                }
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn is_reserved(c: u8) -> bool {
    matches!(
        c,
        b'!' | b'#'
            | b'$'
            | b'&'
            | b'\''
            | b'('
            | b')'
            | b'*'
            | b'+'
            | b','
            | b'/'
            | b':'
            | b';'
            | b'='
            | b'?'
            | b'@'
            | b'['
            | b']'
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matcher(rules: &[(&str, &str, &'static str)]) -> PathMatcher<&'static str> {
        let mut b = PathMatcherBuilder::new();
        for (m, t, v) in rules {
            b.register(m, t, *v)
                .unwrap_or_else(|e| panic!("{m} {t}: {e}"));
        }
        b.build()
    }

    #[test]
    fn template_for_any_method_names_the_rule_a_path_matches() {
        let m = matcher(&[
            ("GET", "/shelves", "list"),
            ("POST", "/shelves/{shelf}/books", "add"),
            ("GET", "/a/**", "dstar"),
            ("DELETE", "/a/{x}", "param"),
            ("POST", "/v:run", "verb"),
        ]);
        assert_eq!(m.template_for_any_method("/shelves"), Some("/shelves"));
        assert_eq!(m.template_for_any_method("/shelves/?q=1"), Some("/shelves"));
        assert_eq!(
            m.template_for_any_method("/shelves/7/books"),
            Some("/shelves/{shelf}/books")
        );
        // Same precedence as a lookup: the single-segment variable before `**`.
        assert_eq!(m.template_for_any_method("/a/b"), Some("/a/{x}"));
        assert_eq!(m.template_for_any_method("/a/b/c"), Some("/a/**"));
        assert_eq!(m.template_for_any_method("/v:run"), Some("/v:run"));
        assert_eq!(m.template_for_any_method("/nothing"), None);
        assert_eq!(m.template_for_any_method("/shelves/7"), None);
        assert_eq!(m.template_for_any_method("no-slash"), None);
        // The method-specific lookup is unchanged.
        assert_eq!(m.lookup("PUT", "/shelves"), None);
        assert_eq!(m.lookup("DELETE", "/a/b"), Some(&"param"));
    }

    #[test]
    fn literal_match_and_miss() {
        let m = matcher(&[("GET", "/shelves", "list"), ("POST", "/shelves", "create")]);
        assert_eq!(m.lookup("GET", "/shelves"), Some(&"list"));
        assert_eq!(m.lookup("POST", "/shelves"), Some(&"create"));
        assert_eq!(m.lookup("DELETE", "/shelves"), None);
        assert_eq!(m.lookup("GET", "/shelve"), None);
        assert_eq!(m.lookup("GET", "/shelves/1"), None);
        assert_eq!(m.lookup("GET", "shelves"), None);
        assert!(!m.is_empty());
        assert!(PathMatcherBuilder::<()>::new().build().is_empty());
    }

    #[test]
    fn query_is_ignored_and_trailing_slash_dropped() {
        let m = matcher(&[("GET", "/a/b", "ab")]);
        assert_eq!(m.lookup("GET", "/a/b?x=1/2"), Some(&"ab"));
        assert_eq!(m.lookup("GET", "/a/b/"), Some(&"ab"));
        assert_eq!(m.lookup("GET", "/a/b//"), Some(&"ab"));
        assert_eq!(m.lookup("GET", "/a//b"), None);
    }

    #[test]
    fn inner_empty_segments_are_significant() {
        let m = matcher(&[("GET", "/c/*/d/**", "x")]);
        assert_eq!(m.lookup("GET", "/c/v/d/w/x"), Some(&"x"));
        assert_eq!(m.lookup("GET", "/c//v/d/w/x"), None);
    }

    #[test]
    fn matching_is_case_sensitive_and_undecoded() {
        let m = matcher(&[("GET", "/widgets", "w"), ("GET", "/a b", "space")]);
        assert_eq!(m.lookup("GET", "/Widgets"), None);
        assert_eq!(m.lookup("GET", "/a%20b"), None);
        assert_eq!(m.lookup("GET", "/widget%73"), None);
    }

    #[test]
    fn precedence_literal_param_star_double_star() {
        let m = matcher(&[
            ("GET", "/a/**", "dstar"),
            ("GET", "/a/*", "star"),
            ("GET", "/a/{x}/y", "param"),
            ("GET", "/a/b", "literal"),
        ]);
        assert_eq!(m.lookup("GET", "/a/b"), Some(&"literal"));
        assert_eq!(m.lookup("GET", "/a/c"), Some(&"star"));
        assert_eq!(m.lookup("GET", "/a/c/y"), Some(&"param"));
        assert_eq!(m.lookup("GET", "/a/c/z"), Some(&"dstar"));
        assert_eq!(m.lookup("GET", "/a"), Some(&"dstar"));
    }

    #[test]
    fn param_beats_star_at_same_position() {
        let m = matcher(&[("GET", "/a/*", "star"), ("GET", "/a/{x}", "param")]);
        assert_eq!(m.lookup("GET", "/a/z"), Some(&"param"));
    }

    #[test]
    fn backtracks_out_of_a_literal_branch() {
        let m = matcher(&[("GET", "/c/*/d/**", "dstar"), ("GET", "/c/*/d/e", "e")]);
        assert_eq!(m.lookup("GET", "/c/x/d/e"), Some(&"e"));
        assert_eq!(m.lookup("GET", "/c/x/d/f/g"), Some(&"dstar"));
        let m = matcher(&[("GET", "/a/b/c", "abc"), ("GET", "/a/*/d", "a*d")]);
        // The literal branch /a/b has no /d child: fall back to the wildcard.
        assert_eq!(m.lookup("GET", "/a/b/d"), Some(&"a*d"));
        // A literal node without a rule for the method also falls back.
        let m = matcher(&[("POST", "/a/b", "post"), ("GET", "/a/{x}", "get")]);
        assert_eq!(m.lookup("GET", "/a/b"), Some(&"get"));
    }

    #[test]
    fn double_star_matches_root_and_everything() {
        let m = matcher(&[("*", "/**", "all")]);
        assert_eq!(m.lookup("GET", "/"), Some(&"all"));
        assert_eq!(m.lookup("DELETE", "/x/y/z?q"), Some(&"all"));
        assert_eq!(m.lookup("GET", "/x//y"), Some(&"all"));
    }

    #[test]
    fn method_specific_beats_any_and_head_falls_back_to_get() {
        let m = matcher(&[
            ("*", "/**", "allow-all"),
            ("GET", "/a", "get-a"),
            ("*", "/a", "any-a"),
        ]);
        assert_eq!(m.lookup("GET", "/a"), Some(&"get-a"));
        assert_eq!(m.lookup("POST", "/a"), Some(&"any-a"));
        assert_eq!(m.lookup("HEAD", "/a"), Some(&"get-a"));
        assert_eq!(m.lookup("HEAD", "/b"), Some(&"allow-all"));
        let m = matcher(&[("GET", "/a", "get-a"), ("HEAD", "/a", "head-a")]);
        assert_eq!(m.lookup("HEAD", "/a"), Some(&"head-a"));
        let m = matcher(&[("GET", "/a", "get-a")]);
        assert_eq!(m.lookup("head", "/a"), None, "methods compare exactly");
    }

    #[test]
    fn custom_verbs_only_when_configured() {
        let m = matcher(&[
            ("GET", "/foo/*", "star"),
            ("POST", "/foo/{name}:cancel", "cancel"),
        ]);
        assert_eq!(m.lookup("POST", "/foo/op1:cancel"), Some(&"cancel"));
        // `:other` is not a configured verb: it is part of the segment.
        assert_eq!(m.lookup("GET", "/foo/other:verb"), Some(&"star"));
        // A configured verb that has no rule for this method falls back to plain matching.
        assert_eq!(m.lookup("GET", "/foo/op1:cancel"), Some(&"star"));
        assert_eq!(m.lookup("POST", "/foo/op1"), None);
        let (_, b) = m
            .lookup_with_bindings("POST", "/foo/op%201:cancel")
            .unwrap();
        assert_eq!(b[0].value, "op 1");
    }

    #[test]
    fn colon_free_wildcards_refuse_segments_with_a_colon() {
        let rules = [
            ("POST", "/v1/shelves/{shelf}/single/*", "single"),
            ("POST", "/v1/shelves/{shelf}/double/**", "double"),
            (
                "POST",
                "/v1/shelves/{shelf}/books/{book}:registered",
                "verb",
            ),
            ("GET", "/v1/{name}", "param"),
            ("GET", "/v2/**/tail", "tail"),
            ("GET", "/lit/a:b", "literal"),
        ];
        let build = |on: bool| {
            let mut b = PathMatcherBuilder::new().disallow_colon_in_wildcards(on);
            for (m, t, v) in rules {
                b.register(m, t, v).unwrap();
            }
            b.build()
        };
        let (off, on) = (build(false), build(true));
        for (method, path, off_wants, on_wants) in [
            (
                "POST",
                "/v1/shelves/1/single/x:registered",
                Some("single"),
                None,
            ),
            ("POST", "/v1/shelves/1/single/x:other", Some("single"), None),
            ("POST", "/v1/shelves/1/double/a/b:c", Some("double"), None),
            ("POST", "/v1/shelves/1/double/a:b/c", Some("double"), None),
            ("POST", "/v1/shelves/1:2/single/x", Some("single"), None),
            ("GET", "/v1/a:b", Some("param"), None),
            ("GET", "/v2/a:b/tail", Some("tail"), None),
            ("GET", "/v2/a/b/tail", Some("tail"), Some("tail")),
            (
                "POST",
                "/v1/shelves/1/double/a/b",
                Some("double"),
                Some("double"),
            ),
            // The custom verb is split off before matching: still matched.
            (
                "POST",
                "/v1/shelves/1/books/2:registered",
                Some("verb"),
                Some("verb"),
            ),
            // A literal segment may hold a colon; only wildcards are restricted.
            ("GET", "/lit/a:b", Some("literal"), Some("literal")),
            // An escaped colon is not a colon to the matcher (the path is matched undecoded).
            ("GET", "/v1/a%3Ab", Some("param"), Some("param")),
        ] {
            assert_eq!(off.lookup(method, path).copied(), off_wants, "off {path}");
            assert_eq!(on.lookup(method, path).copied(), on_wants, "on {path}");
        }
        assert_eq!(on.template_for_any_method("/v1/a:b"), None);
    }

    #[test]
    fn verbs_after_double_star() {
        let m = matcher(&[("POST", "/v1/{name=**}:undelete", "undelete")]);
        let (v, b) = m
            .lookup_with_bindings("POST", "/v1/a/b/c:undelete")
            .unwrap();
        assert_eq!(*v, "undelete");
        assert_eq!(b[0].value, "a/b/c");
    }

    #[test]
    fn duplicate_registration_keeps_first() {
        let mut b = PathMatcherBuilder::new();
        b.register("GET", "/a/{x}", 1).unwrap();
        let err = b.register("GET", "/a/{y}", 2).unwrap_err();
        assert_eq!(
            err,
            TemplateError::Duplicate {
                method: "GET".into(),
                template: "/a/{y}".into()
            }
        );
        assert_eq!(
            err.to_string(),
            "GET /a/{y} is registered twice; the first registration wins"
        );
        b.register("POST", "/a/{y}", 3).unwrap();
        b.register("GET", "/a/{x}:v", 4).unwrap();
        let m = b.build();
        assert_eq!(m.lookup("GET", "/a/1"), Some(&1));
        assert_eq!(m.lookup("POST", "/a/1"), Some(&3));
        assert_eq!(m.lookup("GET", "/a/1:v"), Some(&4));
    }

    #[test]
    fn invalid_templates_are_rejected() {
        let mut b = PathMatcherBuilder::<u8>::new();
        for t in [
            "",
            "//",
            "/a//b",
            "/{}",
            "/a{x}",
            "/items/overview.{format}",
            "/a/**/*",
        ] {
            assert!(b.register("GET", t, 0).is_err(), "{t:?} accepted");
        }
        assert_eq!(b.register("", "/a", 0), Err(TemplateError::EmptyMethod));
        assert!(b.build().is_empty());
    }

    #[test]
    fn single_segment_bindings_are_fully_decoded() {
        let m = matcher(&[("GET", "/a/{x}/c", "v")]);
        let (_, b) = m.lookup_with_bindings("GET", "/a/p%20q%2Fr/c").unwrap();
        assert_eq!(
            b,
            vec![Binding {
                field_path: vec!["x".into()],
                value: "p q/r".into()
            }]
        );
    }

    #[test]
    fn multi_segment_bindings_keep_reserved_escapes() {
        let m = matcher(&[("GET", "/v1/{name=shelves/*/books/**}", "v")]);
        let (_, b) = m
            .lookup_with_bindings("GET", "/v1/shelves/s%2D1/books/a%2Fb/c%20d?x=1")
            .unwrap();
        assert_eq!(b[0].field_path, vec!["name"]);
        assert_eq!(b[0].value, "shelves/s-1/books/a%2Fb/c d");
    }

    #[test]
    fn escaped_bindings_are_the_path_as_spelled() {
        let m = matcher(&[("GET", "/p/{x}/{name=shelves/*/books/**}", "v")]);
        let t = "/p/a%20b-%41/shelves/s%2D1/books/a%2Fb/c%20d/?x=1";
        let b = m.matched("GET", t).unwrap().escaped_bindings();
        assert_eq!(b[0].value, "a%20b-%41");
        assert_eq!(b[1].value, "shelves/s%2D1/books/a%2Fb/c%20d");
        // The decoded ones for the same match.
        let d = m.matched("GET", t).unwrap().bindings();
        assert_eq!(
            (d[0].value.as_str(), d[1].value.as_str()),
            ("a b-A", "shelves/s-1/books/a%2Fb/c d")
        );
    }

    #[test]
    fn nested_field_paths_and_several_variables() {
        let m = matcher(&[("GET", "/shelves/{shelf.id}/books/{book}", "v")]);
        let (_, b) = m
            .lookup_with_bindings("GET", "/shelves/1/books/2/")
            .unwrap();
        assert_eq!(b[0].field_path, vec!["shelf", "id"]);
        assert_eq!(b[0].value, "1");
        assert_eq!(b[1].field_path, vec!["book"]);
        assert_eq!(b[1].value, "2");
    }

    #[test]
    fn double_star_variable_with_zero_segments_binds_empty() {
        let m = matcher(&[("GET", "/a/{rest=**}", "v")]);
        let (_, b) = m.lookup_with_bindings("GET", "/a").unwrap();
        assert_eq!(b[0].value, "");
    }

    #[test]
    fn query_bindings_skip_system_parameters() {
        let b = query_bindings(
            "?key=K&shelf.id=1&site=space%20plus%2B2U%3D&api_key=A&&flag",
            &["key", "api_key"],
            true,
        );
        assert_eq!(
            b,
            vec![
                Binding {
                    field_path: vec!["shelf".into(), "id".into()],
                    value: "1".into()
                },
                Binding {
                    field_path: vec!["site".into()],
                    value: "space plus+2U=".into()
                },
                Binding {
                    field_path: vec!["flag".into()],
                    value: String::new()
                },
            ]
        );
        let escaped = query_bindings("site=space%20plus%2B2U%3D&x=1", &[], false);
        assert_eq!(escaped[0].value, "space%20plus%2B2U%3D");
        assert!(query_bindings("", &[], true).is_empty());
    }

    #[test]
    fn multi_segment_decoding_keeps_reserved_and_bad_escapes() {
        assert_eq!(decode_multi_segment("%41%2f%7E%zz%4%20"), "A%2f~%zz%4 ");
        assert_eq!(decode_multi_segment("é%2D%C3%A9"), "é-é");
        assert_eq!(decode_multi_segment("%FF"), "\u{FFFD}");
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        fn literal() -> impl Strategy<Value = String> {
            "[a-zA-Z0-9._~-]{1,8}"
        }

        proptest! {
            #[test]
            fn every_registered_literal_path_is_found(
                paths in proptest::collection::vec(proptest::collection::vec(literal(), 1..5), 1..20)
            ) {
                let mut b = PathMatcherBuilder::new();
                let mut registered = Vec::new();
                for segs in &paths {
                    let t = format!("/{}", segs.join("/"));
                    if b.register("GET", &t, t.clone()).is_ok() {
                        registered.push(t);
                    }
                }
                let m = b.build();
                for t in &registered {
                    prop_assert_eq!(m.lookup("GET", t), Some(t));
                    let slashed = format!("{t}/?q=1");
                    prop_assert_eq!(m.lookup("GET", &slashed), Some(t));
                    prop_assert_eq!(m.lookup("HEAD", t), Some(t));
                    prop_assert_eq!(m.lookup("POST", t), None);
                }
            }

            #[test]
            fn lookup_never_panics(method in "\\PC{0,6}", target in "\\PC{0,40}") {
                let m = matcher(&[
                    ("GET", "/a/{x}/b/**", "1"),
                    ("*", "/**", "2"),
                    ("POST", "/v1/{name=x/*}:do", "3"),
                    ("GET", "/c/*/d", "4"),
                ]);
                let _ = m.lookup(&method, &target);
                let _ = m.lookup_with_bindings(&method, &target);
            }

            #[test]
            fn param_templates_bind_the_segment(seg in "[a-zA-Z0-9%:._~-]{1,12}") {
                let m = matcher(&[("GET", "/items/{id}", "v")]);
                let target = format!("/items/{seg}");
                let (_, b) = m.lookup_with_bindings("GET", &target).unwrap();
                prop_assert_eq!(b[0].value.clone(), percent_decode_str(&seg).decode_utf8_lossy().into_owned());
            }
        }
    }
}
