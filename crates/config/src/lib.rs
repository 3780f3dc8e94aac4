//! The service-config model.
//!
//! - [`service`]: `google.api.Service` as serde types (Google's JSON field names).
//! - [`template`]: `google.api.HttpRule` path templates (parse + validate).
//! - [`openapi`]: OpenAPI 2.0 + `x-google-*` → `google.api.Service`, with positioned diagnostics.
//! - [`grpc`]: a descriptor set + `api_config.yaml` files → `google.api.Service`, same diagnostics.
//! - [`matcher`]: the request path matcher ESP uses (method + raw target → value, bindings).
//!
//! Pure: no I/O. It converts the bytes it is given; `portico config validate`, which reads
//! files and prints, is the binary's (src/config_cmd.rs).

#[doc(hidden)]
pub mod fuzz;
pub mod grpc;
pub mod matcher;
pub mod openapi;
pub mod service;
pub mod template;

pub use matcher::{query_bindings, Binding, Match, PathMatcher, PathMatcherBuilder};
pub use openapi::{
    convert, convert_with, Conversion, ConvertError, ConvertOptions, Diagnostic, Interrupted,
    Severity, SourceFile,
};
pub use service::Service;
pub use template::TemplateError;
