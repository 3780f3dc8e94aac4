//! The `idtoken_keys` table: the public halves of the control plane's ID-token signing keys
//! (one per control-plane process that ever started on this database), which the published
//! key sets (`/oauth2/v3/certs`, `/oauth2/v1/certs`) list. The private halves never come here.
//!
//! Layer rule: storage only; imports nothing above `store`.

use super::{now_rfc3339, Migration, Store, StoreError};

pub const MIGRATIONS: &[Migration] = &[Migration {
    id: "idt_0001",
    sql: &["CREATE TABLE IF NOT EXISTS idtoken_keys (\
            kid TEXT PRIMARY KEY, \
            public_pem TEXT NOT NULL, \
            certificate_pem TEXT NOT NULL, \
            create_time TEXT NOT NULL)"],
}];

/// One published key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuerKey {
    pub kid: String,
    pub public_pem: String,
    pub certificate_pem: String,
}

/// Records a key; a key already recorded (a restart) keeps its first row.
pub async fn register(store: &Store, key: &IssuerKey) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO idtoken_keys (kid, public_pem, certificate_pem, create_time) \
         VALUES ($1, $2, $3, $4) ON CONFLICT (kid) DO NOTHING",
    )
    .bind(&key.kid)
    .bind(&key.public_pem)
    .bind(&key.certificate_pem)
    .bind(now_rfc3339())
    .execute(store.pool())
    .await?;
    Ok(())
}

/// Every recorded key, oldest first.
pub async fn list(store: &Store) -> Result<Vec<IssuerKey>, StoreError> {
    let rows: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT kid, public_pem, certificate_pem FROM idtoken_keys ORDER BY create_time, kid",
    )
    .fetch_all(store.pool())
    .await?;
    Ok(rows
        .into_iter()
        .map(|(kid, public_pem, certificate_pem)| IssuerKey {
            kid,
            public_pem,
            certificate_pem,
        })
        .collect())
}
