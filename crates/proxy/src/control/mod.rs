//! The Service Control client: `:check` (cached), `:allocateQuota` (aggregated, off the request
//! path) and `:report` (aggregated, batched, retried), plus the bearer tokens for those calls.

pub mod auth;
