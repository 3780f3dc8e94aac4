//! The OpenAPI loader and converter, then the rules it produced through the path matcher.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = portico_config::fuzz::openapi(data);
});
