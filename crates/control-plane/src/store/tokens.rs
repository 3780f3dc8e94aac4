//! OAuth2 state: issued access tokens (by hash) and the JWT assertions already exchanged.
//!
//! Layer rule: SQL only, `StoreError` only; nothing above `store` is imported.

use crate::store::{Migration, Store, StoreError};

pub const MIGRATIONS: &[Migration] = &[Migration {
    id: "tokens_0001",
    sql: &[
        "CREATE TABLE IF NOT EXISTS oauth_access_tokens (\
         token_hash TEXT PRIMARY KEY, \
         email TEXT NOT NULL, \
         key_id TEXT NOT NULL, \
         scope TEXT NOT NULL, \
         expires_at BIGINT NOT NULL, \
         create_time TEXT NOT NULL)",
        "CREATE INDEX IF NOT EXISTS oauth_access_tokens_expiry ON oauth_access_tokens (expires_at)",
        "CREATE TABLE IF NOT EXISTS oauth_used_assertions (\
         assertion_hash TEXT PRIMARY KEY, \
         expires_at BIGINT NOT NULL)",
        "CREATE INDEX IF NOT EXISTS oauth_used_assertions_expiry \
         ON oauth_used_assertions (expires_at)",
    ],
}];
