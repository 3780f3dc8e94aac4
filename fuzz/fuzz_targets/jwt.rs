//! The proxy's JWT parser and verifier: any token against a fixed key set.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = portico_proxy::fuzz::jwt(data);
});
