//! Descriptor sets: decoded with `prost-reflect`, plus a walk over the raw bytes that finds
//! each method's `MethodOptions` exactly as sent, so the `google.api.http` option is read even
//! when the set does not define the extension (a set built without `--include_imports`, or
//! with the option copied from elsewhere).

use prost::Message as _;
use prost_reflect::{DescriptorPool, DynamicMessage, Kind, MethodDescriptor};
use std::collections::HashMap;

/// The extension number Google assigned to `google.api.http` on `MethodOptions`.
pub(super) const HTTP_EXTENSION: u32 = 72_295_728;
const HTTP_EXTENSION_NAME: &str = "google.api.http";
const METHOD_OPTIONS: &str = "google.protobuf.MethodOptions";
const HTTP_RULE: &str = "google.api.HttpRule";

/// `google.api.HttpRule` on the wire, with Google's field numbers.
#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct HttpRuleProto {
    #[prost(string, tag = "1")]
    pub selector: String,
    #[prost(oneof = "Pattern", tags = "2, 3, 4, 5, 6, 8")]
    pub pattern: Option<Pattern>,
    #[prost(string, tag = "7")]
    pub body: String,
    #[prost(string, tag = "12")]
    pub response_body: String,
    #[prost(message, repeated, tag = "11")]
    pub additional_bindings: Vec<HttpRuleProto>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
pub(super) enum Pattern {
    #[prost(string, tag = "2")]
    Get(String),
    #[prost(string, tag = "3")]
    Put(String),
    #[prost(string, tag = "4")]
    Post(String),
    #[prost(string, tag = "5")]
    Delete(String),
    #[prost(string, tag = "6")]
    Patch(String),
    #[prost(message, tag = "8")]
    Custom(CustomPatternProto),
}

#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct CustomPatternProto {
    #[prost(string, tag = "1")]
    pub kind: String,
    #[prost(string, tag = "2")]
    pub path: String,
}

/// Every descriptor set of a submission in one pool, and where each method came from.
#[derive(Default)]
pub(super) struct Descriptors {
    pub pool: DescriptorPool,
    /// `package.Service.Method` → (index of the set's file, the raw `MethodOptions` bytes).
    options: HashMap<String, (usize, Vec<u8>)>,
    /// `package.Service` → index of the descriptor set file that defines it.
    pub service_file: HashMap<String, usize>,
}

impl Descriptors {
    /// Adds one `FILE_DESCRIPTOR_SET_PROTO`; `Err` is a sentence about what is wrong with it.
    pub fn add(&mut self, index: usize, bytes: &[u8]) -> Result<(), String> {
        if bytes.is_empty() {
            return Err("the file is empty".to_string());
        }
        let raw = raw_methods(bytes).map_err(|e| {
            format!("it is not a protobuf-encoded google.protobuf.FileDescriptorSet ({e})")
        })?;
        // A third-party decoder on untrusted bytes: a panic in it is reported, not propagated.
        let decoded = std::panic::catch_unwind(|| DescriptorPool::decode(bytes));
        let alone = match decoded {
            Ok(Ok(p)) => p,
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_) => return Err("the descriptor decoder failed on it".to_string()),
        };
        let mut pool = self.pool.clone();
        let added = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
            pool.decode_file_descriptor_set(bytes).map(|()| pool)
        }));
        self.pool = match added {
            Ok(Ok(p)) => p,
            Ok(Err(e)) => {
                return Err(format!(
                    "it conflicts with another descriptor set of this submission: {e}"
                ))
            }
            Err(_) => return Err("the descriptor decoder failed on it".to_string()),
        };
        for s in alone.services() {
            self.service_file
                .entry(s.full_name().to_string())
                .or_insert(index);
        }
        for (name, opts) in raw {
            self.options.entry(name).or_insert((index, opts));
        }
        Ok(())
    }

    /// Index of the set that defines `method`'s service.
    pub fn file_of(&self, method: &MethodDescriptor) -> Option<usize> {
        self.options
            .get(method.full_name())
            .map(|(i, _)| *i)
            .or_else(|| {
                self.service_file
                    .get(method.parent_service().full_name())
                    .copied()
            })
    }

    /// The method's `google.api.http` option, if it has one.
    pub fn http_option(&self, method: &MethodDescriptor) -> Result<Option<HttpRuleProto>, String> {
        let Some((_, raw)) = self.options.get(method.full_name()) else {
            return Ok(None);
        };
        if raw.is_empty() {
            return Ok(None);
        }
        if let Some(ext) = self.pool.get_extension_by_name(HTTP_EXTENSION_NAME) {
            if ext.number() == HTTP_EXTENSION
                && ext.containing_message().full_name() == METHOD_OPTIONS
            {
                match ext.kind() {
                    Kind::Message(m) if m.full_name() == HTTP_RULE => {}
                    other => {
                        return Err(format!(
                            "the descriptor set declares {HTTP_EXTENSION_NAME} as {other:?}, not {HTTP_RULE}"
                        ))
                    }
                }
                let Some(desc) = self.pool.get_message_by_name(METHOD_OPTIONS) else {
                    return Err(format!("the descriptor set has no {METHOD_OPTIONS}"));
                };
                let opts = DynamicMessage::decode(desc, raw.as_slice())
                    .map_err(|e| format!("its options cannot be decoded: {e}"))?;
                if !opts.has_extension(&ext) {
                    return Ok(None);
                }
                let bytes = match opts.get_extension(&ext).as_message() {
                    Some(m) => m.encode_to_vec(),
                    None => return Ok(None),
                };
                return HttpRuleProto::decode(bytes.as_slice())
                    .map(Some)
                    .map_err(|e| {
                        format!("its {HTTP_EXTENSION_NAME} option cannot be decoded: {e}")
                    });
            }
        }
        // The set does not define the extension: the option is an unknown field of the
        // options. Several occurrences of a message field merge, as concatenated bytes do.
        let mut found = false;
        let mut bytes = Vec::new();
        for f in Fields::new(raw) {
            let (number, value) = f.map_err(|e| format!("its options cannot be decoded: {e}"))?;
            if number == HTTP_EXTENSION {
                match value {
                    Wire::Len(b) => {
                        found = true;
                        bytes.extend_from_slice(b);
                    }
                    Wire::Other => {
                        return Err(format!(
                            "its {HTTP_EXTENSION_NAME} option (field {HTTP_EXTENSION}) is not a message"
                        ))
                    }
                }
            }
        }
        if !found {
            return Ok(None);
        }
        HttpRuleProto::decode(bytes.as_slice())
            .map(Some)
            .map_err(|e| format!("its {HTTP_EXTENSION_NAME} option cannot be decoded: {e}"))
    }
}

enum Wire<'a> {
    Len(&'a [u8]),
    Other,
}

/// The top-level fields of one encoded message.
struct Fields<'a> {
    buf: &'a [u8],
    failed: bool,
}

impl<'a> Fields<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Fields { buf, failed: false }
    }

    fn next_field(&mut self) -> Result<(u32, Wire<'a>), String> {
        let key = prost::encoding::decode_varint(&mut self.buf).map_err(|e| e.to_string())?;
        let number =
            u32::try_from(key >> 3).map_err(|_| "field number out of range".to_string())?;
        if number == 0 {
            return Err("field number 0".to_string());
        }
        match key & 7 {
            0 => {
                prost::encoding::decode_varint(&mut self.buf).map_err(|e| e.to_string())?;
                Ok((number, Wire::Other))
            }
            1 => self.skip(8).map(|()| (number, Wire::Other)),
            5 => self.skip(4).map(|()| (number, Wire::Other)),
            2 => {
                let len =
                    prost::encoding::decode_varint(&mut self.buf).map_err(|e| e.to_string())?;
                let len = usize::try_from(len).map_err(|_| "length out of range".to_string())?;
                if len > self.buf.len() {
                    return Err(format!(
                        "field {number} says it holds {len} bytes, but only {} remain",
                        self.buf.len()
                    ));
                }
                let (value, rest) = self.buf.split_at(len);
                self.buf = rest;
                Ok((number, Wire::Len(value)))
            }
            w => Err(format!(
                "field {number} has wire type {w}, which descriptors never use"
            )),
        }
    }

    fn skip(&mut self, n: usize) -> Result<(), String> {
        if n > self.buf.len() {
            return Err("the data ends inside a field".to_string());
        }
        self.buf = &self.buf[n..];
        Ok(())
    }
}

impl<'a> Iterator for Fields<'a> {
    type Item = Result<(u32, Wire<'a>), String>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.buf.is_empty() {
            return None;
        }
        let r = self.next_field();
        self.failed = r.is_err();
        Some(r)
    }
}

fn text(b: &[u8]) -> Result<String, String> {
    String::from_utf8(b.to_vec()).map_err(|_| "a name is not UTF-8".to_string())
}

/// `package.Service.Method` → the raw bytes of its `MethodOptions` (empty when it has none),
/// for every method of every file of the set.
fn raw_methods(set: &[u8]) -> Result<Vec<(String, Vec<u8>)>, String> {
    let mut out = Vec::new();
    for f in Fields::new(set) {
        // FileDescriptorSet.file = 1
        let (1, Wire::Len(file)) = f? else { continue };
        let mut package = String::new();
        let mut services = Vec::new();
        for f in Fields::new(file) {
            match f? {
                // FileDescriptorProto.package = 2, .service = 6
                (2, Wire::Len(p)) => package = text(p)?,
                (6, Wire::Len(s)) => services.push(s),
                _ => {}
            }
        }
        for s in services {
            let mut service = String::new();
            let mut methods = Vec::new();
            for f in Fields::new(s) {
                match f? {
                    // ServiceDescriptorProto.name = 1, .method = 2
                    (1, Wire::Len(n)) => service = text(n)?,
                    (2, Wire::Len(m)) => methods.push(m),
                    _ => {}
                }
            }
            for m in methods {
                let mut name = String::new();
                let mut options = Vec::new();
                for f in Fields::new(m) {
                    match f? {
                        // MethodDescriptorProto.name = 1, .options = 4
                        (1, Wire::Len(n)) => name = text(n)?,
                        (4, Wire::Len(o)) => options.extend_from_slice(o),
                        _ => {}
                    }
                }
                let full = if package.is_empty() {
                    format!("{service}.{name}")
                } else {
                    format!("{package}.{service}.{name}")
                };
                out.push((full, options));
            }
        }
    }
    Ok(out)
}
