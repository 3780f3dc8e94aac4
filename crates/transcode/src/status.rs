//! gRPC status → what an HTTP/JSON caller of a transcoded method sees: the HTTP status of
//! Envoy's `grpcToHttpStatus` (the same table as ESP v1's) and a `google.rpc.Status` as JSON
//! (`{"code":5,"message":"...","details":[...]}`, the gRPC code), as ESPv2's transcoder does
//! with `convert_grpc_status`.

use base64::Engine;
use percent_encoding::percent_decode;
use prost::Message as _;
use prost_reflect::{DescriptorPool, DynamicMessage};
use serde_json::{json, Map, Value};

/// The HTTP status for a gRPC status code (reference §3.4); unknown codes are 500.
pub fn grpc_to_http(code: i32) -> u16 {
    match code {
        0 => 200,
        1 => 499,
        2 => 500,
        3 => 400,
        4 => 504,
        5 => 404,
        6 => 409,
        7 => 403,
        8 => 429,
        9 => 400,
        10 => 409,
        11 => 400,
        12 => 501,
        13 => 500,
        14 => 503,
        15 => 500,
        16 => 401,
        _ => 500,
    }
}

/// The canonical name of a gRPC code (`NOT_FOUND`), as gRPC-Web trailers and logs spell it.
pub fn code_name(code: i32) -> Option<&'static str> {
    Some(match code {
        0 => "OK",
        1 => "CANCELLED",
        2 => "UNKNOWN",
        3 => "INVALID_ARGUMENT",
        4 => "DEADLINE_EXCEEDED",
        5 => "NOT_FOUND",
        6 => "ALREADY_EXISTS",
        7 => "PERMISSION_DENIED",
        8 => "RESOURCE_EXHAUSTED",
        9 => "FAILED_PRECONDITION",
        10 => "ABORTED",
        11 => "OUT_OF_RANGE",
        12 => "UNIMPLEMENTED",
        13 => "INTERNAL",
        14 => "UNAVAILABLE",
        15 => "DATA_LOSS",
        16 => "UNAUTHENTICATED",
        _ => return None,
    })
}

/// `google.rpc.Status` on the wire (field numbers from googleapis `google/rpc/status.proto`).
#[derive(Clone, PartialEq, prost::Message)]
struct StatusProto {
    #[prost(int32, tag = "1")]
    code: i32,
    #[prost(string, tag = "2")]
    message: String,
    #[prost(message, repeated, tag = "3")]
    details: Vec<AnyProto>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct AnyProto {
    #[prost(string, tag = "1")]
    type_url: String,
    #[prost(bytes = "vec", tag = "2")]
    value: Vec<u8>,
}

/// The JSON error body for a failed call. `grpc_message` is the trailer as sent
/// (percent-encoded); `details_bin` the `grpc-status-details-bin` trailer (base64, padding
/// optional) whose `google.rpc.Status` wins when it decodes. Each detail whose type is in
/// `pool` is printed as its JSON with `@type`; others as `{"@type", "value": base64}`.
pub fn error_body(
    code: i32,
    grpc_message: &[u8],
    details_bin: Option<&[u8]>,
    pool: &DescriptorPool,
) -> Vec<u8> {
    let message = percent_decode(grpc_message)
        .decode_utf8_lossy()
        .into_owned();
    let decoded = details_bin.and_then(|b| {
        let text = std::str::from_utf8(b).ok()?.trim();
        let bytes = base64::engine::general_purpose::STANDARD_NO_PAD
            .decode(text.trim_end_matches('='))
            .ok()?;
        StatusProto::decode(bytes.as_slice()).ok()
    });
    let mut body = Map::new();
    match decoded {
        Some(st) => {
            body.insert("code".into(), json!(st.code));
            body.insert("message".into(), json!(st.message));
            if !st.details.is_empty() {
                let details: Vec<Value> = st.details.iter().map(|d| detail_json(d, pool)).collect();
                body.insert("details".into(), Value::Array(details));
            }
        }
        None => {
            body.insert("code".into(), json!(code));
            body.insert("message".into(), json!(message));
        }
    }
    serde_json::to_vec(&Value::Object(body)).unwrap_or_default()
}

fn detail_json(any: &AnyProto, pool: &DescriptorPool) -> Value {
    let name = any.type_url.rsplit('/').next().unwrap_or("");
    if let Some(desc) = pool.get_message_by_name(name) {
        if let Ok(msg) = DynamicMessage::decode(desc, any.value.as_slice()) {
            if let Ok(Value::Object(mut fields)) = serde_json::to_value(&msg) {
                let mut out = Map::new();
                out.insert("@type".into(), json!(any.type_url));
                out.append(&mut fields);
                return Value::Object(out);
            }
        }
    }
    json!({
        "@type": any.type_url,
        "value": base64::engine::general_purpose::STANDARD.encode(&any.value),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_statuses_follow_the_table() {
        let want = [
            (0, 200),
            (1, 499),
            (2, 500),
            (3, 400),
            (4, 504),
            (5, 404),
            (6, 409),
            (7, 403),
            (8, 429),
            (9, 400),
            (10, 409),
            (11, 400),
            (12, 501),
            (13, 500),
            (14, 503),
            (15, 500),
            (16, 401),
            (74, 500),
            (-1, 500),
        ];
        for (g, h) in want {
            assert_eq!(grpc_to_http(g), h, "grpc {g}");
        }
        assert_eq!(code_name(10), Some("ABORTED"));
        assert_eq!(code_name(17), None);
    }

    #[test]
    fn body_from_status_and_percent_encoded_message() {
        let pool = DescriptorPool::new();
        let body = error_body(5, b"shelf 7 not found: %E2%9C%93", None, &pool);
        assert_eq!(
            String::from_utf8(body).unwrap(),
            r#"{"code":5,"message":"shelf 7 not found: ✓"}"#
        );
    }

    #[test]
    fn body_from_status_details_bin() {
        let st = StatusProto {
            code: 5,
            message: "from details".into(),
            details: vec![AnyProto {
                type_url: "type.googleapis.com/x.Unknown".into(),
                value: vec![1, 2, 3],
            }],
        };
        let b64 = base64::engine::general_purpose::STANDARD_NO_PAD.encode(st.encode_to_vec());
        let body = error_body(2, b"ignored", Some(b64.as_bytes()), &DescriptorPool::new());
        assert_eq!(
            String::from_utf8(body).unwrap(),
            r#"{"code":5,"message":"from details","details":[{"@type":"type.googleapis.com/x.Unknown","value":"AQID"}]}"#
        );
        // Garbage details fall back to the trailers.
        let body = error_body(13, b"m", Some(b"%%%"), &DescriptorPool::new());
        assert_eq!(
            String::from_utf8(body).unwrap(),
            r#"{"code":13,"message":"m"}"#
        );
    }
}
