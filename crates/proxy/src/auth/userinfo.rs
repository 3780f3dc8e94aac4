//! What a verified token produces for the backend and for reports, byte-compatible with ESP v1:
//! the `X-Endpoint-API-UserInfo` header, the `/credential_id` label and `jwt_payloads`.

use base64::engine::general_purpose::{URL_SAFE, URL_SAFE_NO_PAD};
use base64::Engine as _;
use serde_json::Value;

use super::jwt::{write_compact, write_string, ParsedJwt};

/// Sorted, de-duplicated audiences (ESP kept them in a `std::set`).
pub fn sorted_audiences(jwt: &ParsedJwt) -> Vec<String> {
    let mut a = jwt.aud.clone();
    a.sort();
    a.dedup();
    a
}

/// The header value: base64url **with** padding of compact JSON with keys `claims`, `issuer`,
/// `id`, `email`, `audiences` in that order, each omitted when empty. `claims` is the payload as
/// a string in its original key order, with an array `aud` flattened to `""`.
pub fn user_info_header(jwt: &ParsedJwt, audiences: &[String]) -> String {
    let mut claims = String::new();
    if jwt.aud_was_array {
        let mut payload = (*jwt.payload).clone();
        if let Some(aud) = payload.get_mut("aud") {
            *aud = Value::String(String::new());
        }
        write_compact(&Value::Object(payload), &mut claims);
    } else {
        // Borrowing the map avoids a copy on the (common) string-aud path.
        write_object(&jwt.payload, &mut claims);
    }

    let mut out = String::from("{");
    let mut first = true;
    let mut field = |name: &str, out: &mut String| {
        if !first {
            out.push(',');
        }
        first = false;
        write_string(name, out);
        out.push(':');
    };
    field("claims", &mut out);
    write_string(&claims, &mut out);
    field("issuer", &mut out);
    write_string(&jwt.iss, &mut out);
    if let Some(sub) = jwt
        .payload
        .get("sub")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
    {
        field("id", &mut out);
        write_string(sub, &mut out);
    }
    if let Some(email) = jwt
        .payload
        .get("email")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
    {
        field("email", &mut out);
        write_string(email, &mut out);
    }
    if !audiences.is_empty() {
        field("audiences", &mut out);
        out.push('[');
        for (i, a) in audiences.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            write_string(a, &mut out);
        }
        out.push(']');
    }
    out.push('}');
    URL_SAFE.encode(out)
}

fn write_object(m: &serde_json::Map<String, Value>, out: &mut String) {
    out.push('{');
    for (i, (k, v)) in m.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        write_string(k, out);
        out.push(':');
        write_compact(v, out);
    }
    out.push('}');
}

/// `jwtauth:issuer=<b64url-nopad(iss)>&audience=<b64url-nopad(audiences joined by ",")>`.
pub fn credential_id(issuer: &str, audiences: &[String]) -> String {
    let mut id = format!("jwtauth:issuer={}", URL_SAFE_NO_PAD.encode(issuer));
    if !audiences.is_empty() {
        id.push_str("&audience=");
        id.push_str(&URL_SAFE_NO_PAD.encode(audiences.join(",")));
    }
    id
}

/// `path=value;` for each configured claim path (dots walk into objects) whose value is a
/// string, number or boolean (`--log_jwt_payload`).
pub fn jwt_payloads(payload: &serde_json::Map<String, Value>, paths: &[String]) -> String {
    let mut out = String::new();
    for path in paths {
        let mut parts = path.split('.');
        let Some(first) = parts.next() else { continue };
        let mut cur = payload.get(first);
        for p in parts {
            cur = cur.and_then(|v| v.get(p));
        }
        let value = match cur {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Number(n)) => n.to_string(),
            Some(Value::Bool(b)) => b.to_string(),
            _ => continue,
        };
        out.push_str(path);
        out.push('=');
        out.push_str(&value);
        out.push(';');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(payload: &str) -> ParsedJwt {
        let t = format!(
            "{}.{}.s",
            URL_SAFE_NO_PAD.encode(r#"{"alg":"RS256"}"#),
            URL_SAFE_NO_PAD.encode(payload)
        );
        super::super::jwt::parse(&t).unwrap()
    }

    /// ESP's own fixture (`check_auth_test.cc`, kUserInfo_kSub2_kIss3), decoded.
    #[test]
    fn matches_esp_fixture() {
        let jwt = parsed(
            r#"{"iss":"https://issuer1.com","sub":"end-user-id","aud":"https://endpoints-test.cloudendpointsapis.com","iat":1461779321,"exp":2461782921}"#,
        );
        let header = user_info_header(&jwt, &sorted_audiences(&jwt));
        let decoded = String::from_utf8(URL_SAFE.decode(&header).unwrap()).unwrap();
        assert_eq!(
            decoded,
            r#"{"claims":"{\"iss\":\"https://issuer1.com\",\"sub\":\"end-user-id\",\"aud\":\"https://endpoints-test.cloudendpointsapis.com\",\"iat\":1461779321,\"exp\":2461782921}","issuer":"https://issuer1.com","id":"end-user-id","audiences":["https://endpoints-test.cloudendpointsapis.com"]}"#
        );
    }

    #[test]
    fn array_aud_is_flattened_in_claims_and_sorted_in_audiences() {
        let jwt = parsed(r#"{"aud":["b","a","b"],"iss":"i","email":"e@x"}"#);
        let header = user_info_header(&jwt, &sorted_audiences(&jwt));
        let decoded = String::from_utf8(URL_SAFE.decode(&header).unwrap()).unwrap();
        assert_eq!(
            decoded,
            r#"{"claims":"{\"aud\":\"\",\"iss\":\"i\",\"email\":\"e@x\"}","issuer":"i","email":"e@x","audiences":["a","b"]}"#
        );
    }

    #[test]
    fn padding_is_kept() {
        let jwt = parsed(r#"{"iss":"ab"}"#);
        assert!(user_info_header(&jwt, &[]).ends_with('='));
    }

    #[test]
    fn credential_id_and_payloads() {
        assert_eq!(
            credential_id("https://iss", &["a".into(), "b".into()]),
            "jwtauth:issuer=aHR0cHM6Ly9pc3M&audience=YSxi"
        );
        assert_eq!(credential_id("i", &[]), "jwtauth:issuer=aQ");
        let jwt = parsed(r#"{"iss":"i","n":3,"o":{"p":true,"q":[1]},"s":"x"}"#);
        let paths: Vec<String> = ["s", "n", "o.p", "o.q", "missing"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(jwt_payloads(&jwt.payload, &paths), "s=x;n=3;o.p=true;");
    }
}
