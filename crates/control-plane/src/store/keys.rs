//! API keys: the key rows, their sealed key strings and the keyed lookup hash.
//!
//! Layer rule: SQL only, `StoreError` only; nothing above `store` is imported. Sealing and
//! hashing are done by the caller (`crate::crypto`), so this module stores opaque text.

use crate::store::{Migration, Store, StoreError};

pub const MIGRATIONS: &[Migration] = &[
    Migration {
        id: "apikeys_0001",
        sql: &["CREATE TABLE IF NOT EXISTS apikeys_keys (\
         uid TEXT PRIMARY KEY, \
         project_id TEXT NOT NULL, \
         project_number BIGINT NOT NULL, \
         key_id TEXT NOT NULL, \
         display_name TEXT NOT NULL, \
         restrictions TEXT NOT NULL, \
         annotations TEXT NOT NULL, \
         key_hash TEXT NOT NULL UNIQUE, \
         key_sealed TEXT NOT NULL, \
         etag TEXT NOT NULL, \
         create_time TEXT NOT NULL, \
         update_time TEXT NOT NULL, \
         delete_time TEXT NOT NULL, \
         UNIQUE (project_id, key_id))"],
    },
    // RFC 3339 strings with trimmed fractions do not sort chronologically as text; list order
    // comes from this integer instead.
    Migration {
        id: "apikeys_0002",
        sql: &["ALTER TABLE apikeys_keys ADD COLUMN create_seq BIGINT NOT NULL DEFAULT 0"],
    },
    // The `expireTime` extension; '' = never expires (what every older key means).
    Migration {
        id: "apikeys_0003",
        sql: &["ALTER TABLE apikeys_keys ADD COLUMN expire_time TEXT NOT NULL DEFAULT ''"],
    },
];
