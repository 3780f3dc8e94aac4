//! The path-template parser and the matcher: registrations, then lookups and bindings.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = portico_config::fuzz::path_template(data);
});
