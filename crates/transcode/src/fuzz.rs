//! The fuzz target `transcode_json` (fuzz/fuzz_targets/transcode_json.rs; docs/security.md,
//! "Fuzzing"): an HTTP request line and a body → route, path/query/body weaving, proto3 JSON
//! reading, the message encoded, decoded and printed back as the response writer prints it.
//! The descriptor is built in code (no file, no compiler), shaped like the Bookstore's
//! `CreateBook` with an enum, a repeated field, a map and a nested message.

use crate::{Options, Transcoder};
use portico_config::service::HttpRule;
use prost_reflect::prost_types::field_descriptor_proto::{Label, Type};
use prost_reflect::prost_types::{
    DescriptorProto, EnumDescriptorProto, EnumValueDescriptorProto, FieldDescriptorProto,
    FileDescriptorProto, FileDescriptorSet, MessageOptions, MethodDescriptorProto,
    ServiceDescriptorProto,
};
use prost_reflect::{DescriptorPool, DynamicMessage};
use std::sync::OnceLock;

fn field(
    name: &str,
    number: i32,
    ty: Type,
    label: Label,
    type_name: Option<&str>,
) -> FieldDescriptorProto {
    FieldDescriptorProto {
        name: Some(name.into()),
        number: Some(number),
        r#type: Some(ty as i32),
        label: Some(label as i32),
        type_name: type_name.map(Into::into),
        ..Default::default()
    }
}

fn transcoder() -> &'static Transcoder {
    static T: OnceLock<Transcoder> = OnceLock::new();
    T.get_or_init(|| {
        let opt = Label::Optional;
        let entry = DescriptorProto {
            name: Some("LabelsEntry".into()),
            field: vec![
                field("key", 1, Type::String, opt, None),
                field("value", 2, Type::Int64, opt, None),
            ],
            options: Some(MessageOptions {
                map_entry: Some(true),
                ..Default::default()
            }),
            ..Default::default()
        };
        let book = DescriptorProto {
            name: Some("Book".into()),
            field: vec![
                field("id", 1, Type::Int64, opt, None),
                field("author", 2, Type::String, opt, None),
                field("type", 3, Type::Enum, opt, Some(".f.Book.Kind")),
                field("price_in_usd", 4, Type::Int32, opt, None),
                field("quotes", 5, Type::String, Label::Repeated, None),
                field(
                    "labels",
                    6,
                    Type::Message,
                    Label::Repeated,
                    Some(".f.Book.LabelsEntry"),
                ),
                field("signed", 7, Type::Bool, opt, None),
                field("data", 8, Type::Bytes, opt, None),
                field("next", 9, Type::Message, opt, Some(".f.Book")),
                field("score", 10, Type::Double, opt, None),
            ],
            nested_type: vec![entry],
            enum_type: vec![EnumDescriptorProto {
                name: Some("Kind".into()),
                value: ["CLASSIC", "COMIC"]
                    .iter()
                    .enumerate()
                    .map(|(i, n)| EnumValueDescriptorProto {
                        name: Some((*n).into()),
                        number: Some(i as i32),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let request = DescriptorProto {
            name: Some("CreateBookRequest".into()),
            field: vec![
                field("shelf", 1, Type::Int64, opt, None),
                field("book", 2, Type::Message, opt, Some(".f.Book")),
            ],
            ..Default::default()
        };
        let file = FileDescriptorProto {
            name: Some("f.proto".into()),
            package: Some("f".into()),
            syntax: Some("proto3".into()),
            message_type: vec![book, request],
            service: vec![ServiceDescriptorProto {
                name: Some("S".into()),
                method: vec![MethodDescriptorProto {
                    name: Some("CreateBook".into()),
                    input_type: Some(".f.CreateBookRequest".into()),
                    output_type: Some(".f.Book".into()),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        };
        let pool = DescriptorPool::from_file_descriptor_set(FileDescriptorSet { file: vec![file] })
            .expect("the fuzz descriptor is valid");
        let rule = HttpRule {
            selector: "f.S.CreateBook".into(),
            post: Some("/v1/shelves/{shelf}/books".into()),
            body: "book".into(),
            additional_bindings: vec![HttpRule {
                put: Some("/v1/{book.author=authors/*}/books/{book.id}".into()),
                body: "*".into(),
                ..HttpRule::default()
            }],
            ..HttpRule::default()
        };
        let options = Options {
            case_insensitive_enum_parsing: true,
            ..Options::default()
        };
        Transcoder::new(pool, &["f.S"], &[rule], options).expect("the fuzz rules are valid")
    })
}

/// `METHOD TARGET\n` then the body. `Err` says why the request was refused; a panic or a
/// message that does not decode as the request type is a bug.
pub fn json_request(data: &[u8]) -> Result<usize, String> {
    let (line, body) = match data.iter().position(|b| *b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let line = std::str::from_utf8(line).map_err(|e| e.to_string())?;
    let (method, target) = line.split_once(' ').unwrap_or(("POST", line));
    let t = transcoder();
    let call = t.route(method, target).map_err(|e| format!("{e:?}"))?;
    let messages = call
        .request_messages(body, Some("application/json"))
        .map_err(|e| e.to_string())?;
    for m in &messages {
        let decoded = DynamicMessage::decode(call.method().input(), m.as_slice())
            .unwrap_or_else(|e| panic!("an encoded request does not decode: {e}"));
        // The book goes back out through the response writer, as the backend's answer would.
        let book = prost::Message::encode_to_vec(
            &decoded
                .get_field_by_name("book")
                .and_then(|v| v.as_message().cloned())
                .unwrap_or_else(|| DynamicMessage::new(call.method().output())),
        );
        let mut w = call.response();
        let printed = w.message(&book).expect("a valid Book prints");
        serde_json::from_slice::<serde_json::Value>(&printed).expect("printed JSON parses");
    }
    Ok(messages.len())
}

#[cfg(test)]
mod tests {
    #[test]
    fn seeds() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../fuzz/seeds/transcode_json");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).expect("seed dir") {
            let p = e.expect("entry").path();
            let data = std::fs::read(&p).expect("seed");
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            let out = super::json_request(&data);
            if name.starts_with("ok_") {
                assert!(out.is_ok(), "{name}: {out:?}");
            } else {
                assert!(out.is_err(), "{name}: {out:?}");
            }
            n += 1;
        }
        assert!(n >= 4, "seeds in {}", dir.display());
    }
}
