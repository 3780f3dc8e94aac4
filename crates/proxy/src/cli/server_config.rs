//! ESP v1's server config as `--server_config_template` gives it: the protobuf text format of
//! ESP's `ServerConfig` (`src/api_manager/proto/server_config.proto`), which start_esp renders
//! as a Mako template before nginx reads it.
//!
//! Portico reads one field from it, the one ESP has no flag for:
//! `service_control_config { intermediate_report_min_interval: N }` (seconds between the
//! intermediate reports of a long gRPC stream). Everything else in the file is flag-driven in
//! Portico and is skipped. Mako is not rendered: its control lines (`% if ...`, `% endfor`)
//! are skipped and a `${...}` expression stands for an unknown value, so start_esp's own
//! template, with the field added, reads as it would after rendering; the field itself must
//! be a plain number.

/// What Portico takes from a server config.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServerConfigFacts {
    /// `service_control_config.intermediate_report_min_interval`, when set (the last one, as
    /// protobuf's text parser keeps the last value of a singular field).
    pub intermediate_report_min_interval: Option<i32>,
}

/// Deepest nesting accepted; ESP's server config is four levels deep at most.
const MAX_DEPTH: usize = 32;

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    /// A number, string or Mako expression: a field's value.
    Scalar(Scalar),
    Punct(char),
}

#[derive(Debug, Clone, PartialEq)]
enum Scalar {
    Number(String),
    Str,
    Template,
}

struct Lexer<'a> {
    src: &'a [u8],
    pos: usize,
    line: usize,
    at_line_start: bool,
}

impl Lexer<'_> {
    fn err(&self, what: impl std::fmt::Display) -> String {
        format!("line {}: {what}", self.line)
    }

    fn skip_line(&mut self) {
        while let Some(&c) = self.src.get(self.pos) {
            if c == b'\n' {
                break;
            }
            self.pos += 1;
        }
    }

    fn next(&mut self) -> Result<Option<(Tok, usize)>, String> {
        loop {
            let Some(&c) = self.src.get(self.pos) else {
                return Ok(None);
            };
            match c {
                b'\n' => {
                    self.line += 1;
                    self.pos += 1;
                    self.at_line_start = true;
                }
                b' ' | b'\t' | b'\r' | 0x0b | 0x0c => self.pos += 1,
                b'#' => self.skip_line(),
                // A Mako control line (`% if x:`, `% endfor`, `%if`).
                b'%' if self.at_line_start => self.skip_line(),
                _ => break,
            }
        }
        self.at_line_start = false;
        let line = self.line;
        let start = self.pos;
        let c = self.src[start];
        let tok = match c {
            b'$' if self.src.get(start + 1) == Some(&b'{') => {
                let Some(end) = self.src[start..].iter().position(|&b| b == b'}') else {
                    return Err(self.err("a Mako expression `${` is not closed"));
                };
                if self.src[start..start + end].contains(&b'\n') {
                    return Err(self.err("a Mako expression `${` is not closed on its line"));
                }
                self.pos = start + end + 1;
                Tok::Scalar(Scalar::Template)
            }
            b'"' | b'\'' => {
                self.pos += 1;
                loop {
                    match self.src.get(self.pos) {
                        None | Some(b'\n') => return Err(self.err("a string is not closed")),
                        Some(b'\\') => self.pos += 2,
                        Some(&q) if q == c => {
                            self.pos += 1;
                            break;
                        }
                        Some(_) => self.pos += 1,
                    }
                }
                Tok::Scalar(Scalar::Str)
            }
            b'{' | b'}' | b'<' | b'>' | b':' | b'[' | b']' | b',' | b';' => {
                self.pos += 1;
                Tok::Punct(c as char)
            }
            c if c.is_ascii_digit() || c == b'-' || c == b'+' || c == b'.' => {
                self.pos += 1;
                while self
                    .src
                    .get(self.pos)
                    .is_some_and(|b| b.is_ascii_alphanumeric() || *b == b'.' || *b == b'_')
                {
                    self.pos += 1;
                }
                let text = String::from_utf8_lossy(&self.src[start..self.pos]).into_owned();
                Tok::Scalar(Scalar::Number(text))
            }
            c if c.is_ascii_alphabetic() || c == b'_' => {
                self.pos += 1;
                while self
                    .src
                    .get(self.pos)
                    .is_some_and(|b| b.is_ascii_alphanumeric() || *b == b'_' || *b == b'.')
                {
                    self.pos += 1;
                }
                Tok::Ident(String::from_utf8_lossy(&self.src[start..self.pos]).into_owned())
            }
            other => {
                return Err(self.err(format!(
                    "unexpected character {:?}",
                    char::from(other).escape_default().to_string()
                )))
            }
        };
        Ok(Some((tok, line)))
    }
}

struct Parser<'a> {
    lex: Lexer<'a>,
    peeked: Option<Option<(Tok, usize)>>,
    facts: ServerConfigFacts,
}

impl Parser<'_> {
    fn peek(&mut self) -> Result<Option<&Tok>, String> {
        if self.peeked.is_none() {
            self.peeked = Some(self.lex.next()?);
        }
        Ok(self
            .peeked
            .as_ref()
            .and_then(|p| p.as_ref())
            .map(|(t, _)| t))
    }

    fn bump(&mut self) -> Result<Option<(Tok, usize)>, String> {
        match self.peeked.take() {
            Some(p) => Ok(p),
            None => self.lex.next(),
        }
    }

    /// Fields until `close` (`None`: the end of the file). `path` names the enclosing fields.
    fn message(&mut self, path: &[&str], close: Option<char>) -> Result<(), String> {
        if path.len() > MAX_DEPTH {
            return Err(self.lex.err("the messages nest too deeply"));
        }
        loop {
            let Some((tok, line)) = self.bump()? else {
                return match close {
                    None => Ok(()),
                    Some(c) => Err(self.lex.err(format!("`{c}` expected before the end"))),
                };
            };
            let name = match tok {
                Tok::Punct(c) if Some(c) == close => return Ok(()),
                Tok::Ident(n) => n,
                other => {
                    return Err(format!(
                        "line {line}: a field name expected, found {}",
                        describe(&other)
                    ))
                }
            };
            let colon = self.peek()? == Some(&Tok::Punct(':'));
            if colon {
                self.bump()?;
            }
            match self.bump()? {
                Some((Tok::Punct(open @ ('{' | '<')), _)) => {
                    let close = if open == '{' { '}' } else { '>' };
                    let mut inner = path.to_vec();
                    inner.push(&name);
                    self.message(&inner, Some(close))?;
                }
                Some((Tok::Punct('['), _)) => self.list(path, &name)?,
                Some((Tok::Scalar(v), line)) if colon => self.scalar(path, &name, v, line)?,
                // Enum values and booleans are identifiers.
                Some((Tok::Ident(_), _)) if colon => {}
                Some((other, line)) => {
                    return Err(format!(
                        "line {line}: a value for `{name}` expected, found {}",
                        describe(&other)
                    ))
                }
                None => return Err(self.lex.err(format!("`{name}` has no value"))),
            }
            if matches!(self.peek()?, Some(Tok::Punct(',' | ';'))) {
                self.bump()?;
            }
        }
    }

    /// `name: [v, v]` or `name [{...}, {...}]`.
    fn list(&mut self, path: &[&str], name: &str) -> Result<(), String> {
        loop {
            match self.bump()? {
                Some((Tok::Punct(']'), _)) => return Ok(()),
                Some((Tok::Punct(','), _)) => {}
                Some((Tok::Punct(open @ ('{' | '<')), _)) => {
                    let close = if open == '{' { '}' } else { '>' };
                    let mut inner = path.to_vec();
                    inner.push(name);
                    self.message(&inner, Some(close))?;
                }
                Some((Tok::Scalar(v), line)) => self.scalar(path, name, v, line)?,
                Some((Tok::Ident(_), _)) => {}
                Some((other, line)) => {
                    return Err(format!(
                        "line {line}: a list item expected, found {}",
                        describe(&other)
                    ))
                }
                None => return Err(self.lex.err("`]` expected before the end")),
            }
        }
    }

    fn scalar(&mut self, path: &[&str], name: &str, v: Scalar, line: usize) -> Result<(), String> {
        if path != ["service_control_config"] || name != "intermediate_report_min_interval" {
            return Ok(());
        }
        let field = "service_control_config.intermediate_report_min_interval";
        let n = match v {
            Scalar::Number(text) => text.parse::<i32>().map_err(|_| {
                format!("line {line}: {field} must be a whole number of seconds (int32), not {text:?}")
            })?,
            Scalar::Str => {
                return Err(format!(
                    "line {line}: {field} must be a number of seconds, not a string"
                ))
            }
            Scalar::Template => {
                return Err(format!(
                    "line {line}: {field} is a Mako expression; Portico does not render templates, write the number of seconds"
                ))
            }
        };
        if n < 0 {
            return Err(format!(
                "line {line}: {field} must not be negative, not {n}"
            ));
        }
        self.facts.intermediate_report_min_interval = Some(n);
        Ok(())
    }
}

fn describe(t: &Tok) -> String {
    match t {
        Tok::Ident(n) => format!("`{n}`"),
        Tok::Punct(c) => format!("`{c}`"),
        Tok::Scalar(Scalar::Number(n)) => format!("`{n}`"),
        Tok::Scalar(Scalar::Str) => "a string".to_string(),
        Tok::Scalar(Scalar::Template) => "a Mako expression".to_string(),
    }
}

/// Reads a server config (template); the error names the line.
pub fn parse(text: &str) -> Result<ServerConfigFacts, String> {
    let mut p = Parser {
        lex: Lexer {
            src: text.as_bytes(),
            pos: 0,
            line: 1,
            at_line_start: true,
        },
        peeked: None,
        facts: ServerConfigFacts::default(),
    };
    p.message(&[], None)?;
    Ok(p.facts)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn interval(text: &str) -> Result<Option<i32>, String> {
        parse(text).map(|f| f.intermediate_report_min_interval)
    }

    #[test]
    fn reads_the_interval_from_esps_test_config() {
        // ESP's grpc_long_streaming.t server config.
        let t = "service_control_config {\n  report_aggregator_config {\n    cache_entries: 0\n  }\n  intermediate_report_min_interval: 1\n}\n";
        assert_eq!(interval(t), Ok(Some(1)));
        assert_eq!(
            interval("experimental { disable_log_status: true }"),
            Ok(None)
        );
        assert_eq!(interval(""), Ok(None));
        // The last value wins; `<>` and `;` are text format too.
        assert_eq!(
            interval("service_control_config < intermediate_report_min_interval: 3; >\nservice_control_config { intermediate_report_min_interval: 5 }"),
            Ok(Some(5))
        );
        // The same name elsewhere is another field.
        assert_eq!(
            interval("experimental { intermediate_report_min_interval: 7 }"),
            Ok(None)
        );
    }

    #[test]
    fn start_esp_template_with_the_field_added_reads() {
        let t = r#"# Auto-generated by start_esp
service_config_rollout {
% for file_full_path, percentage  in service_configs.iteritems():
  traffic_percentages {
    key: "${file_full_path}"
    value: ${percentage}
  }
% endfor
}
% if service_control_url_override or log_request_headers:
service_control_config {
  %if service_control_url_override:
  url_override: "${service_control_url_override}"
  % endif
  log_request_header: 'x-a'
  intermediate_report_min_interval: 2
}
% endif
experimental {
  disable_log_status: true
}
rollout_strategy: "${rollout_strategy}"
api_service_config { rewrite: ["a b", "c d"] }
"#;
        assert_eq!(interval(t), Ok(Some(2)));
    }

    #[test]
    fn bad_input_is_named_by_line() {
        for (text, want) in [
            (
                "service_control_config {\n intermediate_report_min_interval: -1\n}",
                "line 2: service_control_config.intermediate_report_min_interval must not be negative",
            ),
            (
                "service_control_config { intermediate_report_min_interval: 1e3 }",
                "must be a whole number of seconds",
            ),
            (
                "service_control_config { intermediate_report_min_interval: 99999999999 }",
                "must be a whole number of seconds",
            ),
            (
                "service_control_config { intermediate_report_min_interval: \"1\" }",
                "not a string",
            ),
            (
                "service_control_config { intermediate_report_min_interval: ${x} }",
                "Portico does not render templates",
            ),
            ("service_control_config {\n", "`}` expected before the end"),
            ("a: \"open\n", "line 1: a string is not closed"),
            ("a: ${open\n", "line 1: a Mako expression"),
            ("}", "a field name expected, found `}`"),
            ("a: }", "a value for `a` expected"),
            ("a {\n b: [1, 2\n", "`]` expected"),
            ("\u{0}", "unexpected character"),
        ] {
            let e = interval(text).unwrap_err();
            assert!(e.contains(want), "{text:?}: {e}");
        }
        // Nesting is bounded, not a stack overflow.
        let deep = "a {".repeat(100_000);
        assert!(interval(&deep).unwrap_err().contains("nest too deeply"));
    }
}
