//! What the proxy reads from gRPC calls it passes through, without buffering or decoding them:
//! the number of messages each way ([`FrameCounter`], for ESP v1's streaming metrics), and the
//! call's status (`grpc-status`), turned into ESPv2's report fields ([`http_status`],
//! [`status_name`]).
//!
//! The gRPC wire format (gRPC over HTTP/2): each message is a 5-byte prefix — a compressed
//! flag, then the message length as a big-endian u32 — followed by that many bytes. Messages
//! may be split across or packed into HTTP/2 DATA frames in any way, so the counter keeps a
//! little state between chunks.

/// Counts the gRPC messages in a byte stream fed chunk by chunk. Constant memory whatever the
/// input: it never holds message bytes, only how many are left to skip.
#[derive(Debug, Clone, Default)]
pub struct FrameCounter {
    /// Bytes of the current prefix seen so far (0..5) and their values.
    prefix: [u8; 5],
    prefix_len: usize,
    /// Message bytes still to skip before the next prefix.
    skip: u64,
    /// Messages whose prefix was complete.
    messages: u64,
}

impl FrameCounter {
    /// Reads one chunk of the stream.
    pub fn feed(&mut self, mut chunk: &[u8]) {
        while !chunk.is_empty() {
            if self.skip > 0 {
                let n = self.skip.min(chunk.len() as u64);
                self.skip -= n;
                chunk = &chunk[n as usize..];
                continue;
            }
            let take = (5 - self.prefix_len).min(chunk.len());
            self.prefix[self.prefix_len..self.prefix_len + take].copy_from_slice(&chunk[..take]);
            self.prefix_len += take;
            chunk = &chunk[take..];
            if self.prefix_len == 5 {
                self.messages += 1;
                self.skip = u64::from(u32::from_be_bytes([
                    self.prefix[1],
                    self.prefix[2],
                    self.prefix[3],
                    self.prefix[4],
                ]));
                self.prefix_len = 0;
            }
        }
    }

    /// Messages begun so far (a message counts once its 5-byte prefix has arrived).
    pub fn messages(&self) -> u64 {
        self.messages
    }
}

/// Envoy's `Grpc::Utility::grpcToHttpStatus`, which ESPv2 reports as `/response_code` for a
/// gRPC response: `None` for a code that is not canonical (ESPv2 then keeps the HTTP status).
pub fn http_status(code: u32) -> Option<u16> {
    // One table for reports and transcoding: the transcoder's, which maps what is not
    // canonical to 500 where a report keeps the HTTP status instead.
    i32::try_from(code)
        .ok()
        .filter(|c| *c <= 16)
        .map(portico_transcode::status::grpc_to_http)
}

/// The status's name as ESPv2's log entries write it (`grpc_status_code`: `OK`, `NotFound`);
/// a code that is not canonical is written as its number.
pub fn status_name(code: u32) -> std::borrow::Cow<'static, str> {
    const NAMES: [&str; 17] = [
        "OK",
        "Canceled",
        "Unknown",
        "InvalidArgument",
        "DeadlineExceeded",
        "NotFound",
        "AlreadyExists",
        "PermissionDenied",
        "ResourceExhausted",
        "FailedPrecondition",
        "Aborted",
        "OutOfRange",
        "Unimplemented",
        "Internal",
        "Unavailable",
        "DataLoss",
        "Unauthenticated",
    ];
    match NAMES.get(code as usize) {
        Some(n) => std::borrow::Cow::Borrowed(n),
        None => std::borrow::Cow::Owned(code.to_string()),
    }
}

/// `grpc-status` as a number, if the header holds one.
pub fn parse_status(v: &http::HeaderValue) -> Option<u32> {
    std::str::from_utf8(v.as_bytes()).ok()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framed(lens: &[u32]) -> Vec<u8> {
        let mut out = Vec::new();
        for &l in lens {
            out.push(0);
            out.extend_from_slice(&l.to_be_bytes());
            out.extend(std::iter::repeat_n(7u8, l as usize));
        }
        out
    }

    #[test]
    fn counts_messages_however_the_stream_is_cut() {
        let bytes = framed(&[0, 3, 70_000, 1, 0]);
        for cut in [1, 2, 3, 4, 5, 6, 7, 1000, bytes.len()] {
            let mut c = FrameCounter::default();
            for chunk in bytes.chunks(cut) {
                c.feed(chunk);
            }
            assert_eq!(c.messages(), 5, "chunks of {cut}");
        }
    }

    #[test]
    fn a_huge_declared_length_costs_nothing() {
        let mut c = FrameCounter::default();
        c.feed(&[0, 0xff, 0xff, 0xff, 0xff, 1, 2, 3]);
        assert_eq!(c.messages(), 1);
        c.feed(&[0; 1024]);
        assert_eq!(c.messages(), 1);
        // An incomplete prefix is not a message yet.
        let mut c = FrameCounter::default();
        c.feed(&[0, 0, 0]);
        assert_eq!(c.messages(), 0);
    }

    #[test]
    fn statuses_map_as_envoy_maps_them() {
        assert_eq!(http_status(0), Some(200));
        assert_eq!(http_status(5), Some(404));
        assert_eq!(http_status(16), Some(401));
        assert_eq!(http_status(74), None);
        assert_eq!(status_name(5), "NotFound");
        assert_eq!(status_name(0), "OK");
        assert_eq!(status_name(74), "74");
        assert_eq!(
            parse_status(&http::HeaderValue::from_static("14")),
            Some(14)
        );
        assert_eq!(parse_status(&http::HeaderValue::from_static("x")), None);
    }
}
