//! gRPC-Web (grpc/grpc `doc/PROTOCOL-WEB.md`) ↔ gRPC, as Envoy's `grpc_web` filter (ESPv2)
//! translates it:
//!
//! - request: `application/grpc-web[+proto]` bodies are gRPC frames already;
//!   `application/grpc-web-text[+proto]` bodies are base64, decoded here chunk by chunk
//!   ([`TextDecoder`]) because padding may appear in the middle of the stream (each client
//!   chunk is its own base64 document). The proxy sends `application/grpc` to the backend.
//! - response: the backend's data frames pass through; its HTTP/2 trailers become one last
//!   frame with flag `0x80` holding `name:value\r\n` lines ([`trailer_frame`]); in text mode
//!   every chunk is base64-encoded on its own.
//!
//! ESP v1 knows only the binary forms; ESPv2 both (docs/grpc.md).

use base64::Engine;
use bytes::Bytes;

use crate::framing::{encode_with_flags, FLAG_TRAILER};

/// Envoy's answer to a text body that is not base64 (HTTP 400).
pub const BAD_BASE64: &str = "Bad gRPC-web request, invalid base64 data.";

/// Which gRPC-Web encoding a request uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WebMode {
    /// `application/grpc-web`, `application/grpc-web+proto`.
    Binary,
    /// `application/grpc-web-text`, `application/grpc-web-text+proto`: base64 both ways.
    Text,
}

impl WebMode {
    /// The mode of a request `content-type`, `None` when it is not gRPC-Web. Parameters
    /// (`; charset=...`) are ignored and the type is compared without regard to case.
    pub fn from_content_type(content_type: &str) -> Option<WebMode> {
        let ty = content_type
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        match ty.as_str() {
            "application/grpc-web" | "application/grpc-web+proto" => Some(WebMode::Binary),
            "application/grpc-web-text" | "application/grpc-web-text+proto" => Some(WebMode::Text),
            _ => None,
        }
    }

    /// The response `content-type` Envoy sets for this mode.
    pub fn response_content_type(self) -> &'static str {
        match self {
            WebMode::Binary => "application/grpc-web+proto",
            WebMode::Text => "application/grpc-web-text+proto",
        }
    }

    /// A response chunk as it goes on the wire in this mode.
    pub fn encode_chunk(self, chunk: &[u8]) -> Bytes {
        match self {
            WebMode::Binary => Bytes::copy_from_slice(chunk),
            WebMode::Text => Bytes::from(base64::engine::general_purpose::STANDARD.encode(chunk)),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{BAD_BASE64}")]
pub struct BadBase64;

/// Decodes a `grpc-web-text` body chunk by chunk: whole 4-character groups are decoded as they
/// arrive (a group may end in padding, after which the next group starts a new document); up
/// to 3 leftover characters wait for the next chunk. Whitespace (CR/LF some clients insert)
/// is skipped.
#[derive(Debug, Default)]
pub struct TextDecoder {
    pending: Vec<u8>,
}

impl TextDecoder {
    pub fn new() -> TextDecoder {
        TextDecoder::default()
    }

    /// The bytes decoded from this chunk (with what was left over from the previous ones).
    pub fn push(&mut self, chunk: &[u8]) -> Result<Vec<u8>, BadBase64> {
        self.pending
            .extend(chunk.iter().copied().filter(|b| !b.is_ascii_whitespace()));
        let whole = self.pending.len() / 4 * 4;
        let mut out = Vec::with_capacity(whole / 4 * 3);
        for group in self.pending[..whole].chunks_exact(4) {
            // Padding is only valid at the end of a group; STANDARD checks that.
            base64::engine::general_purpose::STANDARD
                .decode_vec(group, &mut out)
                .map_err(|_| BadBase64)?;
        }
        self.pending.drain(..whole);
        Ok(out)
    }

    /// At the end of the body: characters left over that never made a group are an error.
    pub fn finish(&self) -> Result<(), BadBase64> {
        if self.pending.is_empty() {
            Ok(())
        } else {
            Err(BadBase64)
        }
    }
}

/// The trailer frame ending a gRPC-Web response: `grpc-status`, `grpc-message` (as the backend
/// sent it, still percent-encoded) and any other trailers, lower-case names, one
/// `name:value\r\n` line each. Values with CR or LF are dropped: they would forge lines.
pub fn trailer_frame<'a>(trailers: impl IntoIterator<Item = (&'a str, &'a [u8])>) -> Bytes {
    let mut block = Vec::new();
    for (name, value) in trailers {
        if value.iter().any(|b| *b == b'\r' || *b == b'\n') || name.contains(['\r', '\n', ':']) {
            continue;
        }
        block.extend_from_slice(name.to_ascii_lowercase().as_bytes());
        block.push(b':');
        block.extend_from_slice(value);
        block.extend_from_slice(b"\r\n");
    }
    encode_with_flags(FLAG_TRAILER, &block)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::framing::{encode, FrameDecoder};

    #[test]
    fn content_types() {
        assert_eq!(
            WebMode::from_content_type("application/grpc-web"),
            Some(WebMode::Binary)
        );
        assert_eq!(
            WebMode::from_content_type("Application/GRPC-Web+proto; charset=utf-8"),
            Some(WebMode::Binary)
        );
        assert_eq!(
            WebMode::from_content_type("application/grpc-web-text"),
            Some(WebMode::Text)
        );
        assert_eq!(
            WebMode::from_content_type("application/grpc-web-text+proto"),
            Some(WebMode::Text)
        );
        assert_eq!(WebMode::from_content_type("application/grpc"), None);
        assert_eq!(
            WebMode::from_content_type("application/grpc-web+json"),
            None
        );
        assert_eq!(
            WebMode::Text.response_content_type(),
            "application/grpc-web-text+proto"
        );
    }

    #[test]
    fn text_decodes_chunk_wise_with_padding_mid_stream() {
        let b64 = base64::engine::general_purpose::STANDARD;
        // Two separately encoded documents, each padded, split at awkward places.
        let one = b64.encode(encode(b"ab")); // 7 bytes → padded
        let two = b64.encode(encode(b"xyz1"));
        let wire = format!("{one}{two}");
        assert!(one.ends_with('='));
        let mut dec = TextDecoder::new();
        let mut out = Vec::new();
        for piece in wire.as_bytes().chunks(3) {
            out.extend(dec.push(piece).unwrap());
        }
        dec.finish().unwrap();
        let mut frames = FrameDecoder::new(100);
        frames.push(&out);
        assert_eq!(
            frames.next_frame().unwrap().unwrap().payload.as_ref(),
            b"ab"
        );
        assert_eq!(
            frames.next_frame().unwrap().unwrap().payload.as_ref(),
            b"xyz1"
        );
    }

    #[test]
    fn bad_base64_is_refused_with_envoys_message() {
        let mut dec = TextDecoder::new();
        assert_eq!(dec.push(b"!!!!").unwrap_err().to_string(), BAD_BASE64);
        let mut dec = TextDecoder::new();
        dec.push(b"QUJD\r\nRA").unwrap();
        assert_eq!(dec.finish(), Err(BadBase64));
        // Padding in the middle of a group.
        let mut dec = TextDecoder::new();
        assert!(dec.push(b"Q=JD").is_err());
    }

    #[test]
    fn trailer_frame_lines() {
        let f = trailer_frame([
            ("grpc-status", &b"10"[..]),
            ("grpc-message", &b"ABORTED"[..]),
            ("X-Evil", &b"a\r\ngrpc-status:0"[..]),
        ]);
        assert_eq!(f[0], 0x80);
        assert_eq!(&f[5..], b"grpc-status:10\r\ngrpc-message:ABORTED\r\n");
        assert_eq!(
            u32::from_be_bytes([f[1], f[2], f[3], f[4]]) as usize,
            f.len() - 5
        );
    }
}
