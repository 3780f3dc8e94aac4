//! Service accounts and their public keys (IAM): the rows the IAM API manages and the token
//! and key-set APIs read.
//!
//! Layer rule: SQL only, `StoreError` only; nothing above `store` is imported.

use crate::store::{Migration, Store, StoreError};

pub const MIGRATIONS: &[Migration] = &[
    Migration {
        id: "iam_0001",
        sql: &[
            "CREATE TABLE IF NOT EXISTS iam_service_accounts (\
         email TEXT PRIMARY KEY, \
         project_id TEXT NOT NULL, \
         account_id TEXT NOT NULL, \
         unique_id TEXT NOT NULL UNIQUE, \
         display_name TEXT NOT NULL, \
         description TEXT NOT NULL, \
         etag TEXT NOT NULL, \
         create_time TEXT NOT NULL)",
            "CREATE INDEX IF NOT EXISTS iam_service_accounts_project \
         ON iam_service_accounts (project_id)",
            "CREATE TABLE IF NOT EXISTS iam_sa_keys (\
         key_id TEXT PRIMARY KEY, \
         email TEXT NOT NULL, \
         public_key_pem TEXT NOT NULL, \
         certificate_pem TEXT NOT NULL, \
         valid_after TEXT NOT NULL, \
         valid_before TEXT NOT NULL, \
         create_time TEXT NOT NULL)",
            "CREATE INDEX IF NOT EXISTS iam_sa_keys_email ON iam_sa_keys (email)",
        ],
    },
    // Creation order for listings (RFC 3339 text with trimmed fractions does not sort).
    Migration {
        id: "iam_0002",
        sql: &["ALTER TABLE iam_sa_keys ADD COLUMN create_seq BIGINT NOT NULL DEFAULT 0"],
    },
    // `gcloud iam service-accounts disable|enable`.
    Migration {
        id: "iam_0003",
        sql: &["ALTER TABLE iam_service_accounts ADD COLUMN disabled BIGINT NOT NULL DEFAULT 0"],
    },
];
