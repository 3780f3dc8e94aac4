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

/// Parses one document. `json` selects the JSON syntax check first.
pub fn parse(text: &str, json: bool) -> Result<Node, Vec<SyntaxError>> {
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
    if let Err(e) = parser.load(&mut builder, false) {
        let m = e.marker();
        return Err(vec![SyntaxError {
            pos: Pos {
                line: m.line().max(1),
                column: m.col() + 1,
            },
            message: format!("invalid YAML: {}", e.info()),
        }]);
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

enum Frame {
    Seq(Pos, usize, Vec<Node>),
    /// Position, anchor, entries, and a key waiting for its value.
    Map(Pos, usize, Vec<(Key, Node)>, Option<Key>),
}

#[derive(Default)]
struct Builder {
    stack: Vec<Frame>,
    root: Option<Node>,
    anchors: HashMap<usize, Node>,
    errors: Vec<SyntaxError>,
}

fn pos_of(m: &Marker) -> Pos {
    Pos {
        line: m.line().max(1),
        column: m.col() + 1,
    }
}

impl Builder {
    fn push_node(&mut self, node: Node, anchor: usize) {
        if anchor != 0 {
            self.anchors.insert(anchor, node.clone());
        }
        match self.stack.last_mut() {
            None => {
                if self.root.is_none() {
                    self.root = Some(node);
                }
            }
            Some(Frame::Seq(_, _, items)) => items.push(node),
            Some(Frame::Map(_, _, entries, pending)) => match pending.take() {
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
                    if let Some((first, _)) = entries.iter().find(|(k, _)| k.text == text) {
                        self.errors.push(SyntaxError {
                            pos: node.pos,
                            message: format!(
                                "duplicate key \"{text}\" (first defined at line {}, column {})",
                                first.pos.line, first.pos.column
                            ),
                        });
                    }
                    *pending = Some(Key {
                        text,
                        pos: node.pos,
                    });
                }
                Some(key) => entries.push((key, node)),
            },
        }
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
        let pos = pos_of(&mark);
        match ev {
            Event::Scalar(text, style, anchor, tag) => {
                let value = if style == TScalarStyle::Plain && !is_str_tag(&tag) {
                    resolve_plain(&text)
                } else {
                    Value::Str(text)
                };
                self.push_node(Node { value, pos }, anchor);
            }
            Event::SequenceStart(anchor, _) => self.stack.push(Frame::Seq(pos, anchor, Vec::new())),
            Event::MappingStart(anchor, _) => {
                self.stack.push(Frame::Map(pos, anchor, Vec::new(), None))
            }
            Event::SequenceEnd | Event::MappingEnd => {
                let (node, anchor) = match self.stack.pop() {
                    Some(Frame::Seq(p, a, items)) => (
                        Node {
                            value: Value::Seq(items),
                            pos: p,
                        },
                        a,
                    ),
                    // yaml-rust2 marks a block mapping at its first ':'; its first key is
                    // where a reader looks.
                    Some(Frame::Map(p, a, entries, _)) => (
                        Node {
                            pos: entries.first().map_or(p, |(k, _)| k.pos),
                            value: Value::Map(entries),
                        },
                        a,
                    ),
                    None => return,
                };
                self.push_node(node, anchor);
            }
            Event::Alias(id) => match self.anchors.get(&id).cloned() {
                Some(mut node) => {
                    node.pos = pos;
                    self.push_node(node, 0);
                }
                None => self.errors.push(SyntaxError {
                    pos,
                    message: "alias refers to an unknown anchor".to_string(),
                }),
            },
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

    #[test]
    fn json_parses_with_positions() {
        let n = parse("{\n  \"swagger\": \"2.0\"\n}", true).unwrap();
        let (k, v) = n.entry("swagger").unwrap();
        assert_eq!(k.pos, Pos { line: 2, column: 3 });
        assert_eq!(v.as_str(), Some("2.0"));
    }
}
