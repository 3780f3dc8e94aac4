//! The service-config model.
//!
//! - [`service`]: `google.api.Service` as serde types (Google's JSON field names).
//!
//! Pure: no I/O beyond reading the files it is given.

pub mod service;

pub use service::Service;
