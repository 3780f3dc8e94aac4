//! OAuth2 state: issued access tokens (by hash) and the JWT assertions already exchanged.
//!
//! Layer rule: SQL only, `StoreError` only; nothing above `store` is imported.

use crate::store::{now_rfc3339, Migration, Store, StoreError};

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

/// The `key_id` of an access token minted by IAM Credentials' `generateAccessToken`: no key of
/// the account signed for it, so it lives as long as the account (and its expiry), not a key.
pub const IMPERSONATION_KEY_ID: &str = "";

/// An access token about to be recorded (only its hash is stored).
#[derive(Debug, Clone)]
pub struct NewAccessToken<'a> {
    pub token_hash: &'a str,
    pub email: &'a str,
    pub key_id: &'a str,
    pub scope: &'a str,
    /// Unix seconds.
    pub expires_at: i64,
}

pub async fn insert_access_token(
    store: &Store,
    token: &NewAccessToken<'_>,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO oauth_access_tokens (token_hash, email, key_id, scope, expires_at, \
         create_time) VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(token.token_hash)
    .bind(token.email)
    .bind(token.key_id)
    .bind(token.scope)
    .bind(token.expires_at)
    .bind(now_rfc3339())
    .execute(store.pool())
    .await?;
    Ok(())
}

/// What an issued access token names, joined with its key and account (a token whose key was
/// deleted is not found; one minted by impersonation, [`IMPERSONATION_KEY_ID`], needs only its
/// account).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessToken {
    pub email: String,
    /// Unix seconds.
    pub expires_at: i64,
    pub account_disabled: bool,
}

pub async fn access_token(
    store: &Store,
    token_hash: &str,
) -> Result<Option<AccessToken>, StoreError> {
    let row: Option<(String, i64, i64)> = sqlx::query_as(
        "SELECT t.email, t.expires_at, a.disabled FROM oauth_access_tokens t \
         JOIN iam_service_accounts a ON a.email = t.email \
         WHERE t.token_hash = $1 AND (t.key_id = $2 OR EXISTS (SELECT 1 FROM iam_sa_keys k \
         WHERE k.key_id = t.key_id AND k.email = t.email))",
    )
    .bind(token_hash)
    .bind(IMPERSONATION_KEY_ID)
    .fetch_optional(store.pool())
    .await?;
    Ok(row.map(|(email, expires_at, d)| AccessToken {
        email,
        expires_at,
        account_disabled: d != 0,
    }))
}

/// Deletes used assertions that expired before `assertions_before` and access tokens that
/// expired before `tokens_before` (unix seconds).
pub async fn purge_expired(
    store: &Store,
    assertions_before: i64,
    tokens_before: i64,
) -> Result<(), StoreError> {
    sqlx::query("DELETE FROM oauth_used_assertions WHERE expires_at < $1")
        .bind(assertions_before)
        .execute(store.pool())
        .await?;
    sqlx::query("DELETE FROM oauth_access_tokens WHERE expires_at < $1")
        .bind(tokens_before)
        .execute(store.pool())
        .await?;
    Ok(())
}

/// Records a used assertion's hash until `expires_at`; `false` if it was already recorded.
pub async fn remember_assertion(
    store: &Store,
    assertion_hash: &str,
    expires_at: i64,
) -> Result<bool, StoreError> {
    let inserted = sqlx::query(
        "INSERT INTO oauth_used_assertions (assertion_hash, expires_at) VALUES ($1, $2) \
         ON CONFLICT DO NOTHING",
    )
    .bind(assertion_hash)
    .bind(expires_at)
    .execute(store.pool())
    .await?;
    Ok(inserted.rows_affected() > 0)
}
