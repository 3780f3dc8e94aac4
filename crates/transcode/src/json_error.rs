//! Malformed JSON bodies → the 400 message ESPv2 gives (protobuf's JSON stream parser wording:
//! `Unexpected token.`, `Expected : between key:value pair.`, ...), followed by the text around
//! the error and a caret under the offending character. serde_json finds the errors; this maps
//! its categories onto those sentences (others keep serde_json's wording, capitalised).

/// Characters of context shown on each side of the error, as protobuf's parser does.
const CONTEXT: usize = 20;

pub(crate) fn describe(err: &serde_json::Error, text: &[u8]) -> String {
    let raw = err.to_string();
    // serde_json appends " at line L column C"; the sentence is before it.
    let what = raw.split(" at line ").next().unwrap_or(&raw);
    let eof = err.is_eof();
    let sentence = if eof && what.contains("object") {
        "Unexpected end of string. Expected , or } after key:value pair.".to_string()
    } else if eof && what.contains("list") {
        "Unexpected end of string. Expected , or ] after array value.".to_string()
    } else if eof {
        "Unexpected end of string.".to_string()
    } else if what.starts_with("expected value") || what.starts_with("expected ident") {
        "Unexpected token.".to_string()
    } else if what.starts_with("expected `:`") {
        "Expected : between key:value pair.".to_string()
    } else if what.starts_with("trailing characters") {
        "Parsing terminated before end of input.".to_string()
    } else if what.starts_with("expected `,` or `}`") {
        "Expected , or } after key:value pair.".to_string()
    } else if what.starts_with("expected `,` or `]`") {
        "Expected , or ] after array value.".to_string()
    } else if what.starts_with("key must be a string") {
        "Expected an object key or }.".to_string()
    } else {
        let mut s = what.to_string();
        if let Some(first) = s.get(0..1) {
            let up = first.to_ascii_uppercase();
            s.replace_range(0..1, &up);
        }
        if !s.ends_with('.') {
            s.push('.');
        }
        s
    };
    if eof {
        // Nothing is left to show at the end of the input: the caret stands alone.
        return format!("{sentence}\n\n^");
    }
    let pos = offset(text, err.line(), err.column());
    let text = String::from_utf8_lossy(text);
    let pos = floor_char(&text, pos.min(text.len()));
    let begin = floor_char(&text, pos.saturating_sub(CONTEXT));
    let end = floor_char(&text, (pos + CONTEXT).min(text.len()));
    let segment: String = text[begin..end]
        .chars()
        .map(|c| if c == '\n' || c == '\r' { ' ' } else { c })
        .collect();
    let caret = " ".repeat(text[begin..pos].chars().count());
    format!("{sentence}\n{segment}\n{caret}^")
}

/// Byte offset of serde_json's 1-based line and column (the column points at the character
/// in error, or one past it).
fn offset(text: &[u8], line: usize, column: usize) -> usize {
    let mut start = 0;
    for _ in 1..line {
        match text[start..].iter().position(|b| *b == b'\n') {
            Some(i) => start += i + 1,
            None => break,
        }
    }
    (start + column.saturating_sub(1)).min(text.len())
}

fn floor_char(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(text: &str) -> String {
        let err = serde_json::from_str::<serde_json::Value>(text).unwrap_err();
        describe(&err, text.as_bytes())
    }

    #[test]
    fn espv2_sentences() {
        assert_eq!(
            msg("NO_BRACES_JSON"),
            "Unexpected token.\nNO_BRACES_JSON\n^"
        );
        assert_eq!(
            msg(r#"{"theme" : "Children""#),
            "Unexpected end of string. Expected , or } after key:value pair.\n\n^"
        );
        assert!(msg(r#"{"theme"  "Children"}"#).starts_with("Expected : between key:value pair.\n"));
        let m = msg(r#"{"theme" : "Children"}EXTRA"#);
        assert!(
            m.starts_with("Parsing terminated before end of input.\n"),
            "{m}"
        );
        assert!(m.ends_with('^'));
        let lines: Vec<&str> = m.lines().collect();
        // The caret is under the 'E' of EXTRA.
        let caret = lines[2].len() - 1;
        assert_eq!(&lines[1][caret..caret + 5], "EXTRA");
    }

    #[test]
    fn multibyte_context_does_not_panic() {
        let m = msg("{\"a\": \"ééééééééééééééééééééééé\" x}");
        assert!(m.contains('^'));
    }
}
