//! End to end: gRPC from an HTTP/1.1 client through `portico espv2` to the real
//! `portico bookstore`, with ESPv2's `--enable_grpc_for_http1` on (its default: the response's
//! trailers reach the client in the chunked body) and off (`=false`: they do not, as from
//! Envoy's HTTP/1 codec without `enable_trailers`). curl is the client (`--http1.1`, chunked
//! request, `TE: trailers`).

mod common;

use common::bookstore::{self, get_shelf_request, GET_SHELF};
use common::{espv2, free_port};
use std::process::Command;

#[test]
fn grpc_over_http1_keeps_its_trailers_unless_the_flag_is_off() {
    if Command::new("curl").arg("--version").output().is_err() {
        assert!(std::env::var_os("CI").is_none(), "curl is required in CI");
        eprintln!("SKIPPED: curl not found");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let (_store, bport) = bookstore::start(dir.path(), "bookstore", &[]);
    let flags = |extra: Option<&str>| {
        let mut f = vec![
            format!(
                "--service_json_path={}",
                bookstore::pass_through_config(dir.path()).display()
            ),
            format!("--backend=grpc://127.0.0.1:{bport}"),
            "--skip_service_control_filter".to_string(),
            format!("--metadata_url=http://127.0.0.1:{}", free_port()),
        ];
        f.extend(extra.map(str::to_string));
        f
    };
    let (on, on_port) = espv2::start(dir.path(), "on", &flags(None));
    let (off, off_port) = espv2::start(
        dir.path(),
        "off",
        &flags(Some("--enable_grpc_for_http1=false")),
    );
    let shelf = get_shelf_request(100);

    // On (the default): the message, then `grpc-status: 0` as a trailer of the chunked body.
    let r = bookstore::call(on_port, GET_SHELF, &shelf, &[], true);
    assert_eq!(r.status, 200, "{}", on.log());
    assert_eq!(r.body.get(5..).map(|b| b.ends_with(b"Kids")), Some(true));
    assert_eq!(r.last("grpc-status"), Some("0"), "{:?}", r.headers);
    assert_eq!(r.last("transfer-encoding"), Some("chunked"));
    assert!(r.last("content-length").is_none(), "{:?}", r.headers);

    // Off: the same message, and no status at all.
    let r = bookstore::call(off_port, GET_SHELF, &shelf, &[], true);
    assert_eq!(r.status, 200, "{}", off.log());
    assert_eq!(r.body.get(5..).map(|b| b.ends_with(b"Kids")), Some(true));
    assert_eq!(r.last("grpc-status"), None, "{:?}", r.headers);

    // A trailers-only answer has its status in the head: both modes deliver it.
    for port in [on_port, off_port] {
        let r = bookstore::call(port, GET_SHELF, &shelf, &["x-bookstore-fail: 5"], true);
        assert_eq!(
            (r.status, r.last("grpc-status"), r.last("grpc-message")),
            (200, Some("5"), Some("NOT_FOUND")),
            "{:?}",
            r.headers
        );
    }

    // HTTP/2 clients are not concerned: trailers either way.
    for port in [on_port, off_port] {
        let r = bookstore::call(port, GET_SHELF, &shelf, &[], false);
        assert_eq!(r.last("grpc-status"), Some("0"), "{:?}", r.headers);
    }
}
