//! `google.api.HttpRule` path templates.
//!
//! Grammar (the one ESP and Google's API compiler accept):
//!
//! ```text
//! Template  = "/" Segments [ Verb ] ;
//! Segments  = Segment { "/" Segment } ;
//! Segment   = "*" | "**" | LITERAL | Variable ;
//! Variable  = "{" FieldPath [ "=" Segments ] "}" ;
//! FieldPath = IDENT { "." IDENT } ;
//! Verb      = ":" LITERAL ;
//! ```
//!
//! OpenAPI paths (`/shelves/{shelf}`) are the same grammar restricted to whole-segment `{name}`
//! variables, so one parser serves both. The root path `/` is a template with no segments: Google's
//! Service Management accepts it as an API method. Rejected on purpose, like ESP: the empty
//! template, empty segments (`//`, `/a/`, `/a//b`), `{}`, variables that cover only part of a
//! segment (`/items/overview.{format}`), and a wildcard (`*`, `**` or a variable) anywhere after
//! `**`: only literal segments may follow it (`/files/{path=**}/meta`), as in ESP.

use std::fmt;

/// Why a path template was rejected. Messages are plain sentences that name the offending part;
/// callers prefix them with the template (`path "/a//b" is not supported: ...`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    #[error("the path is empty; a path template must start with \"/\"")]
    Empty,
    #[error("a path template must start with \"/\"")]
    MissingLeadingSlash,
    #[error("the path ends with \"/\"; remove the trailing slash")]
    TrailingSlash,
    #[error("segment {position} is empty (\"//\"); empty path segments are not allowed")]
    EmptySegment { position: usize },
    #[error("\"{{}}\" is an empty variable; a variable needs a name")]
    EmptyVariable,
    #[error(
        "variable \"{{{name}}}\" must be a whole path segment, but it is part of \"{segment}\""
    )]
    PartialSegmentVariable { name: String, segment: String },
    #[error("only literal segments may follow \"**\" (no \"*\", \"**\" or variable after it)")]
    WildcardAfterDoubleWildcard,
    #[error(
        "variable name \"{name}\" is not valid: use letters, digits and \"_\", separated by \".\""
    )]
    InvalidVariableName { name: String },
    #[error("variable \"{name}\" appears more than once")]
    DuplicateVariable { name: String },
    #[error("variables cannot be nested (\"{{\" inside variable \"{name}\")")]
    NestedVariable { name: String },
    #[error("\"{{\" is never closed by \"}}\"")]
    UnclosedVariable,
    #[error("\"}}\" without a matching \"{{\"")]
    UnmatchedClosingBrace,
    #[error("\"*\" must be a whole path segment, but it is part of \"{segment}\"")]
    PartialSegmentWildcard { segment: String },
    #[error("the custom verb after \":\" is empty")]
    EmptyVerb,
    #[error("the custom verb \"{verb}\" may not contain \"/\", \"{{\", \"}}\" or \"*\"")]
    InvalidVerb { verb: String },
    #[error("the HTTP method is empty")]
    EmptyMethod,
    #[error("{method} {template} is registered twice; the first registration wins")]
    Duplicate { method: String, template: String },
}

/// One segment of a parsed template, as the matcher keys it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Segment {
    /// Matches exactly this raw (undecoded) text.
    Literal(String),
    /// A variable of one segment: `{x}` or `{x=*}`.
    Param,
    /// A bare `*` (or a `*` inside a multi-segment variable): any one segment.
    Star,
    /// `**`: the rest of the path, zero or more segments.
    DoubleStar,
}

/// A variable and the template segments it covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Variable {
    /// `a.b` → `["a", "b"]`.
    pub field_path: Vec<String>,
    /// Index of the first segment.
    pub start: usize,
    /// Exclusive end index in the template's segments.
    pub end: usize,
    /// The variable contains `**`, so it covers a varying number of request segments: it ends
    /// `segments.len() - end` segments before the request path's end.
    pub double_star: bool,
}

impl Variable {
    /// True when the variable binds exactly one segment (decoded fully, as ESP does).
    pub fn is_single_segment(&self) -> bool {
        !self.double_star && self.end == self.start + 1
    }
}

/// A parsed path template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    pub segments: Vec<Segment>,
    pub variables: Vec<Variable>,
    pub verb: Option<String>,
}

impl Template {
    /// Parses an HttpRule path template (or an OpenAPI path, which is a subset).
    pub fn parse(text: &str) -> Result<Template, TemplateError> {
        if text.is_empty() {
            return Err(TemplateError::Empty);
        }
        if !text.starts_with('/') {
            return Err(TemplateError::MissingLeadingSlash);
        }
        if text == "/" {
            return Ok(Template {
                segments: Vec::new(),
                variables: Vec::new(),
                verb: None,
            });
        }
        let body = &text[1..];
        let (path, verb) = split_verb(body)?;
        let mut p = Parser {
            s: path,
            pos: 0,
            segments: Vec::new(),
            variables: Vec::new(),
        };
        p.parse_top()?;
        let Parser {
            segments,
            variables,
            ..
        } = p;
        if let Some(pos) = segments.iter().position(|s| *s == Segment::DoubleStar) {
            // After `**` the matcher scans for the literals that follow; another wildcard would
            // make that ambiguous (ESP refuses it too).
            if segments[pos + 1..]
                .iter()
                .any(|s| !matches!(s, Segment::Literal(_)))
            {
                return Err(TemplateError::WildcardAfterDoubleWildcard);
            }
        }
        Ok(Template {
            segments,
            variables,
            verb: verb.map(str::to_string),
        })
    }
}

/// Recursive-descent parser over the path (leading '/' and verb already removed).
struct Parser<'a> {
    s: &'a str,
    pos: usize,
    segments: Vec<Segment>,
    variables: Vec<Variable>,
}

impl Parser<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.as_bytes().get(self.pos).copied()
    }

    /// The raw text of the top-level segment containing byte `from` (for messages).
    fn segment_around(&self, from: usize) -> String {
        let b = self.s.as_bytes();
        let mut start = from.min(b.len());
        while start > 0 && b[start - 1] != b'/' {
            start -= 1;
        }
        let mut end = from.min(b.len());
        let mut depth = 0i32;
        while end < b.len() {
            match b[end] {
                b'{' => depth += 1,
                b'}' => depth -= 1,
                b'/' if depth <= 0 => break,
                _ => {}
            }
            end += 1;
        }
        self.s[start..end].to_string()
    }

    fn parse_top(&mut self) -> Result<(), TemplateError> {
        let mut index = 0;
        loop {
            index += 1;
            let seg_start = self.pos;
            match self.peek() {
                None if index > 1 => return Err(TemplateError::TrailingSlash),
                None | Some(b'/') => return Err(TemplateError::EmptySegment { position: index }),
                Some(b'{') => self.parse_variable()?,
                Some(_) => {
                    let seg = self.parse_plain()?;
                    self.segments.push(seg);
                }
            }
            match self.peek() {
                None => return Ok(()),
                Some(b'/') => self.pos += 1,
                Some(b'{') => {
                    let name = self.s[self.pos + 1..]
                        .split(['}', '=', '/'])
                        .next()
                        .unwrap_or_default()
                        .to_string();
                    let segment = self.segment_around(seg_start);
                    if !self.s[self.pos..].contains('}') {
                        return Err(TemplateError::UnclosedVariable);
                    }
                    return Err(TemplateError::PartialSegmentVariable { name, segment });
                }
                Some(_) => {
                    // Text right after a variable's closing brace: `{x}a`.
                    let segment = self.segment_around(seg_start);
                    let name = segment
                        .trim_start_matches('{')
                        .split(['}', '='])
                        .next()
                        .unwrap_or_default()
                        .to_string();
                    return Err(TemplateError::PartialSegmentVariable { name, segment });
                }
            }
        }
    }

    /// A literal, `*` or `**`; stops before '/', '{' or the end.
    fn parse_plain(&mut self) -> Result<Segment, TemplateError> {
        let start = self.pos;
        while let Some(c) = self.peek() {
            if c == b'/' || c == b'{' {
                break;
            }
            if c == b'}' {
                return Err(TemplateError::UnmatchedClosingBrace);
            }
            self.pos += 1;
        }
        let text = &self.s[start..self.pos];
        match text {
            "*" => Ok(Segment::Star),
            "**" => Ok(Segment::DoubleStar),
            _ if text.contains('*') => Err(TemplateError::PartialSegmentWildcard {
                segment: self.segment_around(start),
            }),
            _ => Ok(Segment::Literal(text.to_string())),
        }
    }

    fn parse_variable(&mut self) -> Result<(), TemplateError> {
        self.pos += 1; // '{'
        let name_start = self.pos;
        while let Some(c) = self.peek() {
            if c == b'}' || c == b'=' || c == b'{' || c == b'/' {
                break;
            }
            self.pos += 1;
        }
        let name = &self.s[name_start..self.pos];
        match self.peek() {
            None | Some(b'/') => return Err(TemplateError::UnclosedVariable),
            Some(b'{') => {
                return Err(TemplateError::NestedVariable {
                    name: name.to_string(),
                })
            }
            _ => {}
        }
        if name.is_empty() {
            return Err(TemplateError::EmptyVariable);
        }
        let field_path = parse_field_path(name)?;
        if self.variables.iter().any(|v| v.field_path == field_path) {
            return Err(TemplateError::DuplicateVariable {
                name: name.to_string(),
            });
        }
        let start = self.segments.len();
        if self.peek() == Some(b'=') {
            self.pos += 1;
            let mut k = 0;
            loop {
                k += 1;
                match self.peek() {
                    None => return Err(TemplateError::UnclosedVariable),
                    Some(b'/') | Some(b'}') => {
                        return Err(TemplateError::EmptySegment {
                            position: start + k,
                        })
                    }
                    Some(b'{') => {
                        return Err(TemplateError::NestedVariable {
                            name: name.to_string(),
                        })
                    }
                    Some(_) => {
                        let seg = self.parse_plain_in_variable()?;
                        self.segments.push(seg);
                    }
                }
                match self.peek() {
                    Some(b'/') => self.pos += 1,
                    Some(b'}') => break,
                    Some(b'{') => {
                        return Err(TemplateError::NestedVariable {
                            name: name.to_string(),
                        })
                    }
                    _ => return Err(TemplateError::UnclosedVariable),
                }
            }
            // `{x=*}` is the same as `{x}`.
            if self.segments.len() == start + 1 && self.segments[start] == Segment::Star {
                self.segments[start] = Segment::Param;
            }
        } else {
            self.segments.push(Segment::Param);
        }
        debug_assert_eq!(self.peek(), Some(b'}'));
        self.pos += 1;
        let end = self.segments.len();
        let double_star = self.segments[start..].contains(&Segment::DoubleStar);
        self.variables.push(Variable {
            field_path,
            start,
            end,
            double_star,
        });
        Ok(())
    }

    fn parse_plain_in_variable(&mut self) -> Result<Segment, TemplateError> {
        let start = self.pos;
        while let Some(c) = self.peek() {
            if c == b'/' || c == b'{' || c == b'}' {
                break;
            }
            self.pos += 1;
        }
        let text = &self.s[start..self.pos];
        match text {
            "*" => Ok(Segment::Star),
            "**" => Ok(Segment::DoubleStar),
            _ if text.contains('*') => Err(TemplateError::PartialSegmentWildcard {
                segment: text.to_string(),
            }),
            _ => Ok(Segment::Literal(text.to_string())),
        }
    }
}

impl fmt::Display for Template {
    /// Canonical form: variables are written as `{a.b=...}` only when not a single `*`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.segments.is_empty() {
            f.write_str("/")?;
        }
        let mut i = 0;
        while i < self.segments.len() {
            f.write_str("/")?;
            if let Some(v) = self.variables.iter().find(|v| v.start == i) {
                let end = v.end;
                write!(f, "{{{}", v.field_path.join("."))?;
                if !(end == i + 1 && self.segments[i] == Segment::Param) {
                    f.write_str("=")?;
                    for (k, s) in self.segments[i..end].iter().enumerate() {
                        if k > 0 {
                            f.write_str("/")?;
                        }
                        write_segment(f, s)?;
                    }
                }
                f.write_str("}")?;
                i = end;
                continue;
            }
            write_segment(f, &self.segments[i])?;
            i += 1;
        }
        if let Some(v) = &self.verb {
            write!(f, ":{v}")?;
        }
        Ok(())
    }
}

fn write_segment(f: &mut fmt::Formatter<'_>, s: &Segment) -> fmt::Result {
    match s {
        Segment::Literal(l) => f.write_str(l),
        Segment::Param | Segment::Star => f.write_str("*"),
        Segment::DoubleStar => f.write_str("**"),
    }
}

/// Splits off `:verb` — a colon in the last segment that is outside any variable.
fn split_verb(body: &str) -> Result<(&str, Option<&str>), TemplateError> {
    let last_start = match body.rfind('/') {
        Some(i) => i + 1,
        None => 0,
    };
    let last = &body[last_start..];
    // A ':' inside braces belongs to the variable (and will be rejected there, if at all).
    let mut depth = 0i32;
    let mut colon = None;
    for (k, c) in last.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ':' if depth <= 0 => colon = Some(k),
            _ => {}
        }
    }
    // A '/' inside an unclosed variable (`{x=a/b}:v`) means the last '/' split the variable; the
    // brace depth of the last segment is then negative and the colon is still outside it.
    match colon {
        None => Ok((body, None)),
        Some(k) => {
            let verb = &last[k + 1..];
            if verb.is_empty() {
                return Err(TemplateError::EmptyVerb);
            }
            if verb.contains(['/', '{', '}', '*']) {
                return Err(TemplateError::InvalidVerb {
                    verb: verb.to_string(),
                });
            }
            Ok((&body[..last_start + k], Some(verb)))
        }
    }
}

fn parse_field_path(name: &str) -> Result<Vec<String>, TemplateError> {
    let mut out = Vec::new();
    for part in name.split('.') {
        // OpenAPI parameter names are freer than proto identifiers (`shelf-id` is common), so
        // accept '-' too; the converter maps names to fields itself.
        let ok = !part.is_empty()
            && part
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if !ok {
            return Err(TemplateError::InvalidVariableName {
                name: name.to_string(),
            });
        }
        out.push(part.to_string());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(t: &str) -> Template {
        Template::parse(t).unwrap_or_else(|e| panic!("{t}: {e}"))
    }

    #[test]
    fn literal_paths_parse() {
        let t = ok("/shelves/books");
        assert_eq!(
            t.segments,
            vec![
                Segment::Literal("shelves".into()),
                Segment::Literal("books".into())
            ]
        );
        assert!(t.variables.is_empty());
        assert_eq!(t.verb, None);
    }

    #[test]
    fn simple_variable_is_a_param_segment() {
        let t = ok("/shelves/{shelf}/books/{book.id}");
        assert_eq!(t.segments[1], Segment::Param);
        assert_eq!(t.variables[0].field_path, vec!["shelf"]);
        assert_eq!(t.variables[1].field_path, vec!["book", "id"]);
        assert_eq!(t.variables[1].start, 3);
        assert_eq!(t.variables[1].end, 4);
        assert!(t.variables[1].is_single_segment());
    }

    #[test]
    fn multi_segment_variable_spans_its_pattern() {
        let t = ok("/v1/{name=shelves/*/books/**}");
        assert_eq!(t.segments.len(), 5);
        assert_eq!(t.segments[4], Segment::DoubleStar);
        assert_eq!(t.variables[0].start, 1);
        assert_eq!(t.variables[0].end, 5);
        assert!(t.variables[0].double_star);
        let t = ok("/v1/{name=shelves/*}/x");
        assert_eq!(t.variables[0].end, 3);
        assert!(!t.variables[0].is_single_segment());
    }

    #[test]
    fn verb_is_split_off() {
        let t = ok("/v1/{name}:cancel");
        assert_eq!(t.verb.as_deref(), Some("cancel"));
        assert_eq!(
            t.segments,
            vec![Segment::Literal("v1".into()), Segment::Param]
        );
        let t = ok("/a/**:verb");
        assert_eq!(t.segments[1], Segment::DoubleStar);
        assert_eq!(Template::parse("/a:"), Err(TemplateError::EmptyVerb));
    }

    #[test]
    fn display_is_canonical() {
        assert_eq!(ok("/a/{b}/c:v").to_string(), "/a/{b}/c:v");
        assert_eq!(ok("/a/{b=*}").to_string(), "/a/{b}");
        assert_eq!(ok("/a/{b=x/**}").to_string(), "/a/{b=x/**}");
        assert_eq!(ok("/*/**").to_string(), "/*/**");
        assert_eq!(ok("/").to_string(), "/");
        assert!(ok("/").segments.is_empty());
    }

    #[test]
    fn rejected_templates() {
        use TemplateError::*;
        let cases: &[(&str, TemplateError)] = &[
            ("", Empty),
            ("a/b", MissingLeadingSlash),
            ("//", EmptySegment { position: 1 }),
            ("/a/", TrailingSlash),
            ("/a//b", EmptySegment { position: 2 }),
            ("/{}", EmptyVariable),
            (
                "/a{x}",
                PartialSegmentVariable {
                    name: "x".into(),
                    segment: "a{x}".into(),
                },
            ),
            (
                "/{x}a",
                PartialSegmentVariable {
                    name: "x".into(),
                    segment: "{x}a".into(),
                },
            ),
            (
                "/items/overview.{format}",
                PartialSegmentVariable {
                    name: "format".into(),
                    segment: "overview.{format}".into(),
                },
            ),
            ("/a/**/*", WildcardAfterDoubleWildcard),
            ("/a/**/**", WildcardAfterDoubleWildcard),
            ("/a/**/foo/*", WildcardAfterDoubleWildcard),
            ("/a/**/foo/**", WildcardAfterDoubleWildcard),
            ("/a/{x=**}/{y}", WildcardAfterDoubleWildcard),
            ("/a/{x=b/**}/bb/{y=**}", WildcardAfterDoubleWildcard),
            ("/a/{x=**/*}", WildcardAfterDoubleWildcard),
            ("/{x", UnclosedVariable),
            ("/x}", UnmatchedClosingBrace),
            (
                "/a*",
                PartialSegmentWildcard {
                    segment: "a*".into(),
                },
            ),
            ("/{a}/{a}", DuplicateVariable { name: "a".into() }),
            ("/{a b}", InvalidVariableName { name: "a b".into() }),
        ];
        for (t, want) in cases {
            assert_eq!(Template::parse(t).as_ref(), Err(want), "template {t:?}");
        }
    }

    #[test]
    fn error_messages_are_sentences() {
        let e = Template::parse("/items/overview.{format}").unwrap_err();
        assert_eq!(
            e.to_string(),
            "variable \"{format}\" must be a whole path segment, but it is part of \"overview.{format}\""
        );
    }
}
