//! A YAML/JSON document tree that remembers where every node came from, so diagnostics can
//! point at `file:line:column`.
//!
//! YAML is parsed with `yaml-rust2`'s event API (JSON is YAML, but JSON files are first checked
//! with `serde_json` so a JSON syntax error is reported the way a JSON user expects). Scalars
//! follow the YAML 1.2 core schema, except that the YAML 1.1 spellings `True`/`False` are
//! booleans too: they occur in real Endpoints specs (`allowCors: True`). Mapping keys are kept
//! as their source text, so unquoted response codes (`200:`) are just the key `"200"`.

use std::collections::HashMap;
use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser, Tag};
use yaml_rust2::scanner::{Marker, TScalarStyle};

/// 1-based line and column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Pos {
    pub line: usize,
    pub column: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    Int(i64),
    /// The number and its source text (`1.0` stays "1.0" when read as text).
    Float(f64, String),
    Str(String),
    Seq(Vec<Node>),
    Map(Vec<(Key, Node)>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Key {
    pub text: String,
    pub pos: Pos,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub value: Value,
    pub pos: Pos,
}

impl Node {
    pub fn as_str(&self) -> Option<&str> {
        match &self.value {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_map(&self) -> Option<&[(Key, Node)]> {
        match &self.value {
            Value::Map(m) => Some(m),
            _ => None,
        }
    }

    pub fn as_seq(&self) -> Option<&[Node]> {
        match &self.value {
            Value::Seq(s) => Some(s),
            _ => None,
        }
    }

    /// The value under `key` in a mapping.
    pub fn get(&self, key: &str) -> Option<&Node> {
        self.entry(key).map(|(_, v)| v)
    }

    /// The key and value under `key` in a mapping.
    pub fn entry(&self, key: &str) -> Option<(&Key, &Node)> {
        self.as_map()?
            .iter()
            .find(|(k, _)| k.text == key)
            .map(|(k, v)| (k, v))
    }

    /// A short description of the node's type for messages ("a string", "a list", ...).
    pub fn kind(&self) -> &'static str {
        match &self.value {
            Value::Null => "null",
            Value::Bool(_) => "a boolean",
            Value::Int(_) => "an integer",
            Value::Float(..) => "a number",
            Value::Str(_) => "a string",
            Value::Seq(_) => "a list",
            Value::Map(_) => "a mapping",
        }
    }

    /// The scalar as text (numbers and booleans rendered), for places where YAML's typing of an
    /// unquoted value is irrelevant (`version: 1.0` is still the version "1.0").
    pub fn scalar_text(&self) -> Option<String> {
        match &self.value {
            Value::Str(s) => Some(s.clone()),
            Value::Int(i) => Some(i.to_string()),
            Value::Float(_, text) => Some(text.clone()),
            Value::Bool(b) => Some(b.to_string()),
            _ => None,
        }
    }
}

/// A syntax error with its position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyntaxError {
    pub pos: Pos,
    pub message: String,
}

/// Deepest nesting of lists and mappings a document may have. serde_json stops at the same
/// depth, so a JSON and a YAML spelling of one document are refused alike; real OpenAPI files
/// stay far below it (a schema nested 20 objects deep is about 45 levels). The limit also keeps
/// every recursive walk over the tree (the converter's, `Drop`'s) within a small stack.
pub const MAX_DEPTH: usize = 128;

/// Most nodes YAML aliases (`*name`) may copy in one document, counting the copy kept of each
/// anchored node. Without a bound, ten nested levels of ten aliases each (a 600-byte file)
/// expand to 10^10 nodes. The largest body the control plane accepts holds about 3 million
/// nodes written out (`- x` per line), so aliases may add a third of that again: a document
/// that reuses a 20-node block in each of 50,000 operations stays below it. A copied node costs
/// about 100 bytes, so this bounds the copies at about 100 MB.
pub const MAX_ALIAS_NODES: usize = 1_000_000;

/// Most scalar and key text YAML aliases may copy in one document (16 MiB, the control plane's
/// request size limit): one alias of a 10 MB string costs one node but 10 MB of memory.
pub const MAX_ALIAS_BYTES: usize = 16 << 20;

/// Parses one document. `json` selects the JSON syntax check first.
#[cfg(test)]
pub fn parse(text: &str, json: bool) -> Result<Node, Vec<SyntaxError>> {
    let opts = super::ConvertOptions::default();
    let watch = super::Watch::new(&opts);
    parse_watched(text, json, &watch)
}

/// [`parse`] that gives up, with an empty error list, once `watch` says so.
pub(crate) fn parse_watched(
    text: &str,
    json: bool,
    watch: &super::Watch<'_>,
) -> Result<Node, Vec<SyntaxError>> {
    if json {
        if let Err(e) = serde_json::from_str::<serde::de::IgnoredAny>(text) {
            return Err(vec![SyntaxError {
                pos: Pos {
                    line: e.line().max(1),
                    column: e.column().max(1),
                },
                message: format!("invalid JSON: {}", json_error_text(&e)),
            }]);
        }
    }
    let mut builder = Builder::default();
    let mut parser = Parser::new_from_str(text);
    // The events are pulled one by one rather than through `Parser::load`, which recurses once
    // per nesting level (a line of 100,000 `- ` overflows the stack before any limit applies)
    // and cannot be stopped half-way.
    loop {
        if watch.check().is_err() {
            return Err(Vec::new());
        }
        let (ev, mark) = match parser.next_token() {
            Ok(x) => x,
            Err(e) => {
                let m = e.marker();
                return Err(vec![SyntaxError {
                    pos: Pos {
                        line: m.line().max(1),
                        column: m.col() + 1,
                    },
                    message: format!("invalid YAML: {}", e.info()),
                }]);
            }
        };
        // Only the first document counts, as with `load(_, false)`.
        let last = matches!(ev, Event::DocumentEnd | Event::StreamEnd);
        builder.on_event(ev, mark);
        if builder.fatal || last {
            break;
        }
    }
    if !builder.errors.is_empty() {
        return Err(builder.errors);
    }
    builder.root.ok_or_else(|| {
        vec![SyntaxError {
            pos: Pos { line: 1, column: 1 },
            message: "the file is empty".to_string(),
        }]
    })
}

/// serde_json appends " at line X column Y" to its messages; the position is reported separately.
fn json_error_text(e: &serde_json::Error) -> String {
    let s = e.to_string();
    match s.rfind(" at line ") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

/// What a subtree costs to copy, and how deep it is.
#[derive(Debug, Clone, Copy, Default)]
struct Weight {
    nodes: usize,
    bytes: usize,
    /// Lists and mappings on the longest path down (0 for a scalar).
    height: usize,
}

impl Weight {
    fn add_child(&mut self, child: Weight) {
        self.nodes = self.nodes.saturating_add(child.nodes);
        self.bytes = self.bytes.saturating_add(child.bytes);
        self.height = self.height.max(child.height + 1);
    }
}

enum Frame {
    Seq(Pos, usize, Vec<Node>, Weight),
    /// Position, anchor, entries, a key waiting for its value, the keys seen (for duplicates).
    Map(
        Pos,
        usize,
        Vec<(Key, Node)>,
        Option<Key>,
        HashMap<String, Pos>,
        Weight,
    ),
}

#[derive(Default)]
struct Builder {
    stack: Vec<Frame>,
    root: Option<Node>,
    anchors: HashMap<usize, (Node, Weight)>,
    errors: Vec<SyntaxError>,
    /// Nodes and text copied for anchors and aliases so far.
    copied_nodes: usize,
    copied_bytes: usize,
    /// A limit was hit: stop reading, the tree is incomplete.
    fatal: bool,
}

fn pos_of(m: &Marker) -> Pos {
    Pos {
        line: m.line().max(1),
        column: m.col() + 1,
    }
}

impl Builder {
    fn fail(&mut self, pos: Pos, message: String) {
        self.errors.push(SyntaxError { pos, message });
        self.fatal = true;
    }

    /// Charges a copy of `w` to the alias budget; false (and a fatal error) past it.
    fn charge_copy(&mut self, w: Weight, pos: Pos) -> bool {
        self.copied_nodes = self.copied_nodes.saturating_add(w.nodes);
        self.copied_bytes = self.copied_bytes.saturating_add(w.bytes);
        if self.copied_nodes > MAX_ALIAS_NODES {
            self.fail(
                pos,
                format!(
                    "YAML aliases expand this document beyond {MAX_ALIAS_NODES} copied nodes; \
                     write the repeated parts out or share them with $ref"
                ),
            );
            return false;
        }
        if self.copied_bytes > MAX_ALIAS_BYTES {
            self.fail(
                pos,
                format!(
                    "YAML aliases expand this document beyond {} MiB of copied text; write the \
                     repeated parts out or share them with $ref",
                    MAX_ALIAS_BYTES >> 20
                ),
            );
            return false;
        }
        true
    }

    fn push_node(&mut self, node: Node, anchor: usize, weight: Weight) {
        if anchor != 0 {
            // The anchored node is kept for later aliases: that copy counts too, or nested
            // anchors (`&a [&b [&c [...]]]`) would copy each level again without any alias.
            if !self.charge_copy(weight, node.pos) {
                return;
            }
            self.anchors.insert(anchor, (node.clone(), weight));
        }
        match self.stack.last_mut() {
            None => {
                if self.root.is_none() {
                    self.root = Some(node);
                }
            }
            Some(Frame::Seq(_, _, items, w)) => {
                w.add_child(weight);
                items.push(node);
            }
            Some(Frame::Map(_, _, entries, pending, seen, w)) => {
                w.add_child(weight);
                match pending.take() {
                    None => {
                        let text = match &node.value {
                            Value::Str(s) => s.clone(),
                            Value::Null => String::new(),
                            _ => match node.scalar_text() {
                                Some(t) => t,
                                None => {
                                    self.errors.push(SyntaxError {
                                        pos: node.pos,
                                        message:
                                            "a mapping key must be a plain value, not a list or mapping"
                                                .to_string(),
                                    });
                                    String::new()
                                }
                            },
                        };
                        // A hash of the keys seen: a mapping with 60,000 paths is checked in
                        // linear time, not 60,000² comparisons.
                        match seen.get(&text) {
                            Some(first) => self.errors.push(SyntaxError {
                                pos: node.pos,
                                message: format!(
                                    "duplicate key \"{text}\" (first defined at line {}, column {})",
                                    first.line, first.column
                                ),
                            }),
                            None => {
                                seen.insert(text.clone(), node.pos);
                            }
                        }
                        *pending = Some(Key {
                            text,
                            pos: node.pos,
                        });
                    }
                    Some(key) => entries.push((key, node)),
                }
            }
        }
    }

    /// Opens a list or mapping, refusing nesting deeper than [`MAX_DEPTH`].
    fn open(&mut self, frame: Frame, pos: Pos) {
        if self.stack.len() >= MAX_DEPTH {
            self.fail(
                pos,
                format!("lists and mappings are nested more than {MAX_DEPTH} levels deep"),
            );
            return;
        }
        self.stack.push(frame);
    }
}

fn resolve_plain(s: &str) -> Value {
    match s {
        "" | "~" | "null" | "Null" | "NULL" => return Value::Null,
        "true" | "True" | "TRUE" => return Value::Bool(true),
        "false" | "False" | "FALSE" => return Value::Bool(false),
        _ => {}
    }
    let digits = s.strip_prefix(['-', '+']).unwrap_or(s);
    if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
        if let Ok(i) = s.parse::<i64>() {
            return Value::Int(i);
        }
    }
    let looks_float = !digits.is_empty()
        && digits
            .bytes()
            .all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'e' | b'E' | b'-' | b'+'))
        && digits
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_digit() || b == b'.')
        && digits.bytes().any(|b| b.is_ascii_digit());
    if looks_float {
        if let Ok(f) = s.parse::<f64>() {
            return Value::Float(f, s.to_string());
        }
    }
    Value::Str(s.to_string())
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        if self.fatal {
            return;
        }
        let pos = pos_of(&mark);
        match ev {
            Event::Scalar(text, style, anchor, tag) => {
                let weight = Weight {
                    nodes: 1,
                    bytes: text.len(),
                    height: 0,
                };
                let value = if style == TScalarStyle::Plain && !is_str_tag(&tag) {
                    resolve_plain(&text)
                } else {
                    Value::Str(text)
                };
                self.push_node(Node { value, pos }, anchor, weight);
            }
            Event::SequenceStart(anchor, _) => {
                self.open(Frame::Seq(pos, anchor, Vec::new(), Weight::default()), pos)
            }
            Event::MappingStart(anchor, _) => self.open(
                Frame::Map(
                    pos,
                    anchor,
                    Vec::new(),
                    None,
                    HashMap::new(),
                    Weight::default(),
                ),
                pos,
            ),
            Event::SequenceEnd | Event::MappingEnd => {
                let (node, anchor, mut weight) = match self.stack.pop() {
                    Some(Frame::Seq(p, a, items, w)) => (
                        Node {
                            value: Value::Seq(items),
                            pos: p,
                        },
                        a,
                        w,
                    ),
                    // yaml-rust2 marks a block mapping at its first ':'; its first key is
                    // where a reader looks.
                    Some(Frame::Map(p, a, entries, _, _, w)) => (
                        Node {
                            pos: entries.first().map_or(p, |(k, _)| k.pos),
                            value: Value::Map(entries),
                        },
                        a,
                        w,
                    ),
                    None => return,
                };
                weight.nodes = weight.nodes.saturating_add(1);
                weight.height = weight.height.max(1);
                self.push_node(node, anchor, weight);
            }
            Event::Alias(id) => {
                let Some(weight) = self.anchors.get(&id).map(|(_, w)| *w) else {
                    self.errors.push(SyntaxError {
                        pos,
                        message: "alias refers to an unknown anchor".to_string(),
                    });
                    return;
                };
                if self.stack.len() + weight.height > MAX_DEPTH {
                    self.fail(
                        pos,
                        format!(
                            "this alias nests lists and mappings more than {MAX_DEPTH} levels deep"
                        ),
                    );
                    return;
                }
                // Charged before copying, so the budget bounds the memory as well as the time.
                if !self.charge_copy(weight, pos) {
                    return;
                }
                let Some((node, _)) = self.anchors.get(&id) else {
                    return;
                };
                let mut node = node.clone();
                node.pos = pos;
                self.push_node(node, 0, weight);
            }
            Event::Nothing
            | Event::StreamStart
            | Event::StreamEnd
            | Event::DocumentStart
            | Event::DocumentEnd => {}
        }
    }
}

fn is_str_tag(tag: &Option<Tag>) -> bool {
    tag.as_ref().is_some_and(|t| t.suffix == "str")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_are_one_based() {
        let n = parse("a:\n  b: 1\n  c: [x, \"y\"]\n", false).unwrap();
        let (k, v) = n.entry("a").unwrap();
        assert_eq!(k.pos, Pos { line: 1, column: 1 });
        let (kb, vb) = v.entry("b").unwrap();
        assert_eq!(kb.pos, Pos { line: 2, column: 3 });
        assert_eq!(vb.value, Value::Int(1));
        assert_eq!(vb.pos, Pos { line: 2, column: 6 });
        let c = v.get("c").unwrap().as_seq().unwrap();
        assert_eq!(c[1].value, Value::Str("y".into()));
        assert_eq!(
            c[1].pos,
            Pos {
                line: 3,
                column: 10
            }
        );
    }

    #[test]
    fn scalars_resolve_like_yaml_1_2_plus_capitalised_booleans() {
        let n = parse(
            "a: True\nb: y\nc: '1'\nd: 1.5\ne: ~\n200: ok\nf: -3\ng: 1.0.0\n",
            false,
        )
        .unwrap();
        assert_eq!(n.get("a").unwrap().value, Value::Bool(true));
        assert_eq!(n.get("b").unwrap().value, Value::Str("y".into()));
        assert_eq!(n.get("c").unwrap().value, Value::Str("1".into()));
        assert_eq!(n.get("d").unwrap().value, Value::Float(1.5, "1.5".into()));
        assert_eq!(n.get("e").unwrap().value, Value::Null);
        assert_eq!(n.get("200").unwrap().value, Value::Str("ok".into()));
        assert_eq!(n.get("f").unwrap().value, Value::Int(-3));
        assert_eq!(n.get("g").unwrap().value, Value::Str("1.0.0".into()));
    }

    #[test]
    fn duplicate_keys_are_errors() {
        let e = parse("a: 1\nb: 2\na: 3\n", false).unwrap_err();
        assert_eq!(e[0].pos, Pos { line: 3, column: 1 });
        assert_eq!(
            e[0].message,
            "duplicate key \"a\" (first defined at line 1, column 1)"
        );
    }

    #[test]
    fn yaml_syntax_error_has_position() {
        let e = parse("a: [1, 2\nb: 3\n", false).unwrap_err();
        assert!(
            e[0].message.starts_with("invalid YAML: "),
            "{}",
            e[0].message
        );
        assert!(e[0].pos.line >= 1);
    }

    #[test]
    fn json_syntax_error_has_position() {
        let e = parse("{\n  \"a\": \"x\n\"\n}", true).unwrap_err();
        assert_eq!(e[0].pos.line, 2);
        assert!(
            e[0].message.starts_with("invalid JSON: "),
            "{}",
            e[0].message
        );
    }

    #[test]
    fn aliases_copy_the_anchored_node() {
        let n = parse("a: &x {k: v}\nb: *x\n", false).unwrap();
        assert_eq!(n.get("b").unwrap().get("k").unwrap().as_str(), Some("v"));
    }

    /// `levels` nested anchors of ten aliases each under an `x-` key (the shape of a YAML alias bomb).
    fn alias_bomb(levels: usize) -> String {
        let mut s =
            String::from("swagger: '2.0'\nx-bomb:\n  l0: &l0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..levels {
            let refs = vec![format!("*l{}", i - 1); 10].join(", ");
            s.push_str(&format!("  l{i}: &l{i} [{refs}]\n"));
        }
        s
    }

    #[test]
    fn alias_expansion_is_bounded() {
        // The 598-byte file expands to 10^10 nodes; it must fail fast, at the alias
        // that crosses the budget.
        let bomb = alias_bomb(10);
        assert!(bomb.len() < 700, "{}", bomb.len());
        let e = parse(&bomb, false).unwrap_err();
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(
            e[0].message
                .contains("YAML aliases expand this document beyond 1000000"),
            "{}",
            e[0].message
        );
        // l5's ten aliases of l4 (111,111 nodes each) cross the budget (line 8 = l5).
        assert_eq!(e[0].pos.line, 8);
        // Small enough to expand in full on the code before the bound (so this test can fail
        // there), large enough to cross it.
        let e = parse(&alias_bomb(7), false).unwrap_err();
        assert!(e[0].message.contains("YAML aliases"), "{}", e[0].message);
        // Reuse within the budget is fine.
        let n = parse(&alias_bomb(5), false).unwrap();
        let l4 = n.get("x-bomb").unwrap().get("l4").unwrap();
        assert_eq!(l4.as_seq().unwrap().len(), 10);
    }

    #[test]
    fn aliased_text_is_bounded_in_bytes() {
        // One 1 MiB string aliased 17 times: 17 nodes, but 17 MiB of copies.
        let big = "a".repeat(1 << 20);
        let mut s = format!("a: &big \"{big}\"\nb: [");
        s.push_str(&vec!["*big"; 17].join(", "));
        s.push_str("]\n");
        let e = parse(&s, false).unwrap_err();
        assert!(
            e[0].message.contains("16 MiB of copied text"),
            "{}",
            e[0].message
        );
        assert_eq!(e[0].pos.line, 2);
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_stack_overflow() {
        let n = 100_000;
        let nested = |open: &str, close: &str| format!("{}1{}", open.repeat(n), close.repeat(n));
        for (text, json) in [
            (nested("[", "]"), false),
            (nested("{a: ", "}"), false),
            (format!("{}x\n", "- ".repeat(n)), false),
            (format!("a:\n{}x\n", "  - ".repeat(n)), false),
            (nested("[", "]"), true),
            (nested("{\"a\": ", "}"), true),
        ] {
            let e = parse(&text, json).unwrap_err();
            assert_eq!(e.len(), 1, "{e:?}");
            // yaml-rust2's scanner reads ahead in flow collections and stops at 256 levels
            // itself, sometimes before the builder sees the 129th.
            assert!(
                e[0].message == "lists and mappings are nested more than 128 levels deep"
                    || e[0].message == "invalid YAML: recursion limit exceeded",
                "{}",
                e[0].message
            );
        }
        // Unterminated: whatever the first complaint is, it is one error, not a crash.
        for open in ["[", "{", "{a: "] {
            assert!(parse(&open.repeat(n), false).is_err());
            assert!(parse(&open.repeat(n), true).is_err());
        }
        // At the limit is fine.
        let ok = format!("{}x{}", "[".repeat(MAX_DEPTH), "]".repeat(MAX_DEPTH));
        parse(&ok, false).unwrap();
        let over = format!(
            "{}x{}",
            "[".repeat(MAX_DEPTH + 1),
            "]".repeat(MAX_DEPTH + 1)
        );
        let e = parse(&over, false).unwrap_err();
        assert_eq!(
            e[0].pos,
            Pos {
                line: 1,
                column: MAX_DEPTH + 1
            }
        );
    }

    #[test]
    fn aliases_cannot_stack_depth() {
        // Each level pastes the previous one 100 levels down: 2 levels fit, 3 do not.
        let open = "[".repeat(100);
        let close = "]".repeat(100);
        let text = format!("a: &a {open}x{close}\nb: &b {open}*a{close}\nc: &c {open}*b{close}\n");
        let e = parse(&text, false).unwrap_err();
        assert!(
            e[0].message.contains("this alias nests"),
            "{}",
            e[0].message
        );
        assert_eq!(e[0].pos.line, 2);
    }

    #[test]
    fn many_keys_and_duplicates() {
        let mut s = String::new();
        for i in 0..50_000 {
            s.push_str(&format!("k{i}: {i}\n"));
        }
        s.push_str("k17: again\n");
        let e = parse(&s, false).unwrap_err();
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].pos.line, 50_001);
        assert_eq!(
            e[0].message,
            "duplicate key \"k17\" (first defined at line 18, column 1)"
        );
    }

    #[test]
    fn huge_scalars_parse() {
        let big = "b".repeat(8 << 20);
        let n = parse(&format!("x-big: {big}\ny: '{big}'\n"), false).unwrap();
        assert_eq!(
            n.get("x-big").unwrap().as_str().map(str::len),
            Some(8 << 20)
        );
        assert_eq!(n.get("y").unwrap().as_str().map(str::len), Some(8 << 20));
    }

    #[test]
    fn json_parses_with_positions() {
        let n = parse("{\n  \"swagger\": \"2.0\"\n}", true).unwrap();
        let (k, v) = n.entry("swagger").unwrap();
        assert_eq!(k.pos, Pos { line: 2, column: 3 });
        assert_eq!(v.as_str(), Some("2.0"));
    }
}
