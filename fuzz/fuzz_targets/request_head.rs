//! The proxy's request head handling: request line, headers, method override, API-key
//! extraction and path normalisation, with every combination of the head flags.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = portico_proxy::fuzz::request_head(data);
});
