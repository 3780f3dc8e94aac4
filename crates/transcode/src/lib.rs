//! HTTP/JSON → gRPC transcoding and gRPC-Web framing for the proxy, built at run time from the
//! service config the proxy loads (no code generated per API).
//!
//! - [`Transcoder`] ([`transcoder`]): the routes of `http.rules` (plus ESPv2's extra
//!   `POST /package.Service/Method` binding per method), and per matched [`Call`] the request
//!   messages woven from path variables, query parameters and the JSON body, and a
//!   [`ResponseWriter`] printing the backend's messages as proto3 JSON (or a JSON array for a
//!   server stream). The descriptor set comes from `sourceInfo.sourceFiles`
//!   (`FILE_DESCRIPTOR_SET_PROTO`), as the control plane stores it.
//! - [`status`]: gRPC status → HTTP status and the `google.rpc.Status` JSON error body.
//! - [`framing`]: the 5-byte gRPC message prefix; a bounded incremental decoder.
//! - [`web`]: gRPC-Web content types, base64 text decoding chunk by chunk, the trailer frame.
//!
//! Pure: no I/O and no HTTP types, so it is unit-tested here against the Bookstore descriptor
//! (compiled with protox in the tests) and fuzzed without a server. Why it is its own crate:
//! docs/architecture.md.

pub mod framing;
#[doc(hidden)]
pub mod fuzz;
mod json_error;
pub mod status;
pub mod transcoder;
pub mod web;

pub use transcoder::{
    pool_from_service, BuildError, Call, Options, RequestError, ResponseError, ResponseWriter,
    RouteError, Transcoder,
};

#[cfg(test)]
mod tests;
