//! One module per Google API, handlers only: parse the request, authorize it ([`crate::authz`]),
//! call the store ([`crate::store`]) and the config crate, shape the response.
//!
//! Layer rule: a module here never imports another module here; what two APIs share lives
//! below them, in `store`, `authz` or `app`.

pub mod apikeys;
pub mod cloudtrace;
pub mod iam;
pub mod iamcredentials;
pub mod jwks;
pub mod operations;
pub mod resourcemanager;
pub mod servicecontrol;
pub mod servicemanagement;
pub mod serviceusage;
pub mod tokens;
