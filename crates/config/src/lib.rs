//! The service-config model.
//!
//! - [`service`]: `google.api.Service` as serde types (Google's JSON field names).
//! - [`template`]: `google.api.HttpRule` path templates (parse + validate).
//! - [`openapi`]: OpenAPI 2.0 + `x-google-*` → `google.api.Service`, with positioned diagnostics.
//! - [`cli`]: `portico config validate`.
//! - [`matcher`]: the request path matcher ESP uses (method + raw target → value, bindings).
//!
//! Pure: no I/O beyond reading the files it is given.

pub mod cli;
#[doc(hidden)]
pub mod fuzz;
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
