//! HTTP/JSON → gRPC transcoding: a request line and a body → route, weaving, proto3 JSON,
//! encode, decode, print.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = portico_transcode::fuzz::json_request(data);
});
