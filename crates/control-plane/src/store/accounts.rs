//! Service accounts and their public keys (IAM): the rows the IAM API manages and the token
//! and key-set APIs read.
//!
//! Layer rule: SQL only, `StoreError` only; nothing above `store` is imported.

use crate::store::{Migration, Store, StoreError};

/// Email domain of service accounts: `<accountId>@<project>.iam.gserviceaccount.com`.
pub const SA_DOMAIN_SUFFIX: &str = ".iam.gserviceaccount.com";

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

/// A stored service account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceAccount {
    pub email: String,
    pub project_id: String,
    pub account_id: String,
    pub unique_id: String,
    pub display_name: String,
    pub description: String,
    pub etag: String,
    /// A disabled account cannot obtain or use tokens until enabled again.
    pub disabled: bool,
}

type AccountRow = (String, String, String, String, String, String, String, i64);

fn account_from_row(r: AccountRow) -> ServiceAccount {
    ServiceAccount {
        email: r.0,
        project_id: r.1,
        account_id: r.2,
        unique_id: r.3,
        display_name: r.4,
        description: r.5,
        etag: r.6,
        disabled: r.7 != 0,
    }
}

const ACCOUNT_COLUMNS: &str =
    "email, project_id, account_id, unique_id, display_name, description, etag, disabled";

/// Finds an account by email or unique id (both forms appear in Google paths).
pub async fn find(store: &Store, account: &str) -> Result<Option<ServiceAccount>, StoreError> {
    let column = if account.contains('@') {
        "email"
    } else {
        "unique_id"
    };
    let row: Option<AccountRow> = sqlx::query_as(&format!(
        "SELECT {ACCOUNT_COLUMNS} FROM iam_service_accounts WHERE {column} = $1"
    ))
    .bind(account)
    .fetch_optional(store.pool())
    .await?;
    Ok(row.map(account_from_row))
}

/// The project's accounts, ordered by email.
pub async fn list_in_project(
    store: &Store,
    project_id: &str,
) -> Result<Vec<ServiceAccount>, StoreError> {
    let rows: Vec<AccountRow> = sqlx::query_as(&format!(
        "SELECT {ACCOUNT_COLUMNS} FROM iam_service_accounts WHERE project_id = $1 ORDER BY email"
    ))
    .bind(project_id)
    .fetch_all(store.pool())
    .await?;
    Ok(rows.into_iter().map(account_from_row).collect())
}

/// Inserts a new account; `false` if the email or unique id is taken. The `disabled` flag of
/// `sa` is not stored: new accounts start enabled.
pub async fn insert(
    store: &Store,
    sa: &ServiceAccount,
    create_time: &str,
) -> Result<bool, StoreError> {
    let inserted = sqlx::query(
        "INSERT INTO iam_service_accounts \
         (email, project_id, account_id, unique_id, display_name, description, etag, create_time) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT DO NOTHING",
    )
    .bind(&sa.email)
    .bind(&sa.project_id)
    .bind(&sa.account_id)
    .bind(&sa.unique_id)
    .bind(&sa.display_name)
    .bind(&sa.description)
    .bind(&sa.etag)
    .bind(create_time)
    .execute(store.pool())
    .await?;
    Ok(inserted.rows_affected() > 0)
}

/// Deletes the account and its keys in one transaction.
pub async fn delete(store: &Store, email: &str) -> Result<(), StoreError> {
    let mut tx = store.begin_write().await?;
    // Keys first: on SQLite a transaction should write before it reads (see store/mod.rs).
    sqlx::query("DELETE FROM iam_sa_keys WHERE email = $1")
        .bind(email)
        .execute(&mut *tx)
        .await?;
    sqlx::query("DELETE FROM iam_service_accounts WHERE email = $1")
        .bind(email)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(())
}

/// Disables or enables the account, giving it a new etag.
pub async fn set_disabled(
    store: &Store,
    email: &str,
    disabled: bool,
    etag: &str,
) -> Result<(), StoreError> {
    sqlx::query("UPDATE iam_service_accounts SET disabled = $1, etag = $2 WHERE email = $3")
        .bind(i64::from(disabled))
        .bind(etag)
        .bind(email)
        .execute(store.pool())
        .await?;
    Ok(())
}

/// A key row about to be stored.
#[derive(Debug, Clone)]
pub struct NewAccountKey<'a> {
    pub key_id: &'a str,
    pub email: &'a str,
    /// SPKI PEM.
    pub public_key_pem: &'a str,
    pub certificate_pem: &'a str,
    pub valid_after: &'a str,
    pub valid_before: &'a str,
}

pub async fn insert_key(store: &Store, key: &NewAccountKey<'_>) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO iam_sa_keys (key_id, email, public_key_pem, certificate_pem, valid_after, \
         valid_before, create_time, create_seq) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(key.key_id)
    .bind(key.email)
    .bind(key.public_key_pem)
    .bind(key.certificate_pem)
    .bind(key.valid_after)
    .bind(key.valid_before)
    .bind(key.valid_after)
    .bind(crate::store::creation_seq())
    .execute(store.pool())
    .await?;
    Ok(())
}

/// A stored key of an account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountKey {
    pub key_id: String,
    pub valid_after: String,
    pub valid_before: String,
    /// SPKI PEM.
    pub public_key_pem: String,
    pub certificate_pem: String,
}

type KeyRow = (String, String, String, String, String);

fn key_from_row(r: KeyRow) -> AccountKey {
    AccountKey {
        key_id: r.0,
        valid_after: r.1,
        valid_before: r.2,
        public_key_pem: r.3,
        certificate_pem: r.4,
    }
}

const KEY_COLUMNS: &str = "key_id, valid_after, valid_before, public_key_pem, certificate_pem";

/// The account's keys in creation order.
pub async fn list_keys(store: &Store, email: &str) -> Result<Vec<AccountKey>, StoreError> {
    let rows: Vec<KeyRow> = sqlx::query_as(&format!(
        "SELECT {KEY_COLUMNS} FROM iam_sa_keys WHERE email = $1 ORDER BY create_seq, key_id"
    ))
    .bind(email)
    .fetch_all(store.pool())
    .await?;
    Ok(rows.into_iter().map(key_from_row).collect())
}

/// The account's keys ordered by creation time text, then id: the order the published JWK
/// set has always used.
pub async fn list_keys_by_create_time(
    store: &Store,
    email: &str,
) -> Result<Vec<AccountKey>, StoreError> {
    let rows: Vec<KeyRow> = sqlx::query_as(&format!(
        "SELECT {KEY_COLUMNS} FROM iam_sa_keys WHERE email = $1 ORDER BY create_time, key_id"
    ))
    .bind(email)
    .fetch_all(store.pool())
    .await?;
    Ok(rows.into_iter().map(key_from_row).collect())
}

pub async fn get_key(
    store: &Store,
    email: &str,
    key_id: &str,
) -> Result<Option<AccountKey>, StoreError> {
    let row: Option<KeyRow> = sqlx::query_as(&format!(
        "SELECT {KEY_COLUMNS} FROM iam_sa_keys WHERE key_id = $1 AND email = $2"
    ))
    .bind(key_id)
    .bind(email)
    .fetch_optional(store.pool())
    .await?;
    Ok(row.map(key_from_row))
}

/// Deletes one key; `false` if the account has no such key.
pub async fn delete_key(store: &Store, email: &str, key_id: &str) -> Result<bool, StoreError> {
    let deleted = sqlx::query("DELETE FROM iam_sa_keys WHERE key_id = $1 AND email = $2")
        .bind(key_id)
        .bind(email)
        .execute(store.pool())
        .await?;
    Ok(deleted.rows_affected() > 0)
}

/// A key that can verify signatures, and whether its account is disabled.
#[derive(Debug, Clone)]
pub struct VerificationKey {
    /// SPKI PEM.
    pub public_key_pem: String,
    pub account_disabled: bool,
}

/// The public key of `key_id` if it exists and belongs to `email`.
pub async fn public_key(
    store: &Store,
    email: &str,
    key_id: &str,
) -> Result<Option<VerificationKey>, StoreError> {
    let row: Option<(String, i64)> = sqlx::query_as(
        "SELECT k.public_key_pem, a.disabled FROM iam_sa_keys k \
         JOIN iam_service_accounts a ON a.email = k.email \
         WHERE k.key_id = $1 AND k.email = $2",
    )
    .bind(key_id)
    .bind(email)
    .fetch_optional(store.pool())
    .await?;
    Ok(row.map(|(public_key_pem, d)| VerificationKey {
        public_key_pem,
        account_disabled: d != 0,
    }))
}

/// Whether `key_id` of `email` exists and its account is enabled.
pub async fn usable_key_exists(
    store: &Store,
    email: &str,
    key_id: &str,
) -> Result<bool, StoreError> {
    let row: Option<(String,)> = sqlx::query_as(
        "SELECT k.key_id FROM iam_sa_keys k JOIN iam_service_accounts a ON a.email = k.email \
             WHERE k.key_id = $1 AND k.email = $2 AND a.disabled = 0",
    )
    .bind(key_id)
    .bind(email)
    .fetch_optional(store.pool())
    .await?;
    Ok(row.is_some())
}

/// `(key_id, certificate PEM)` for every key of the account, for Google's x509 map
/// (`/robot/v1/metadata/x509/{email}` → `{"<key_id>": "<PEM>", ...}`). `None`: no such account.
pub async fn certificates(
    store: &Store,
    email: &str,
) -> Result<Option<Vec<(String, String)>>, StoreError> {
    if find(store, email).await?.is_none() {
        return Ok(None);
    }
    let rows: Vec<(String, String)> = sqlx::query_as(
        "SELECT key_id, certificate_pem FROM iam_sa_keys WHERE email = $1 ORDER BY create_seq, key_id",
    )
    .bind(email)
    .fetch_all(store.pool())
    .await?;
    Ok(Some(rows))
}
