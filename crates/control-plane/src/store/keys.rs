//! API keys: the key rows, their sealed key strings and the keyed lookup hash, and the typed
//! key record both API Keys (which administers keys) and Service Control (which checks calls
//! made with them) read.
//!
//! The restrictions MODEL (`google.api.apikeys.v2.Restrictions` as serde data) lives here, not
//! in `apis/apikeys`, because it is the shape of the stored `restrictions` column: the store
//! decodes it into [`StoredKey`] / [`ApiKeyRecord`], so Service Control reads a key's
//! restrictions without importing another API. Their VALIDATION (Google's rules and 400 texts)
//! is API Keys' and stays in `apis/apikeys/restrictions.rs`.
//!
//! Layer rule: SQL and the stored shapes only, `StoreError` only; nothing above `store` is
//! imported. Sealing and hashing are done by the caller (`crate::crypto`), so this module
//! stores the sealed key string as opaque text.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sqlx::AnyConnection;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::crypto::MasterKey;
use crate::store::operations::{decode_json, encode_json};
use crate::store::{format_rfc3339, Migration, Store, StoreError};

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

/// Domain separation label for the lookup hash.
const HASH_PURPOSE: &str = "apikeys.keyString";

/// The lookup hash of a key string: HMAC-SHA256 under the master key.
pub fn key_hash(master_key: &MasterKey, key_string: &str) -> String {
    master_key.keyed_hash(HASH_PURPOSE, key_string.as_bytes())
}

/// `google.api.apikeys.v2.Restrictions`. Unknown fields are refused so a typo is a 400, not a
/// silently unrestricted key.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Restrictions {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub browser_key_restrictions: Option<BrowserKeyRestrictions>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_key_restrictions: Option<ServerKeyRestrictions>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub android_key_restrictions: Option<AndroidKeyRestrictions>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ios_key_restrictions: Option<IosKeyRestrictions>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub api_targets: Vec<ApiTarget>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BrowserKeyRestrictions {
    #[serde(default)]
    pub allowed_referrers: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServerKeyRestrictions {
    #[serde(default)]
    pub allowed_ips: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AndroidKeyRestrictions {
    #[serde(default)]
    pub allowed_applications: Vec<AndroidApplication>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AndroidApplication {
    #[serde(default)]
    pub sha1_fingerprint: String,
    #[serde(default)]
    pub package_name: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IosKeyRestrictions {
    #[serde(default)]
    pub allowed_bundle_ids: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ApiTarget {
    #[serde(default)]
    pub service: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
}

impl Restrictions {
    /// No restriction of any kind: the key may call anything from anywhere.
    pub fn is_empty(&self) -> bool {
        *self == Restrictions::default()
    }
}

/// A stored key, typed: JSON columns parsed, times as stored (RFC 3339; `delete_time` is ''
/// when the key is not deleted) except `expire_time`, which is compared as an instant.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredKey {
    pub uid: String,
    pub project_id: String,
    pub project_number: i64,
    pub key_id: String,
    pub display_name: String,
    pub restrictions: Restrictions,
    pub annotations: Map<String, Value>,
    pub etag: String,
    pub create_time: String,
    pub update_time: String,
    pub delete_time: String,
    /// The `expireTime` extension; `None` = never expires.
    pub expire_time: Option<OffsetDateTime>,
}

impl StoredKey {
    /// `projects/<number>/locations/global/keys/<key_id>`.
    pub fn name(&self) -> String {
        format!(
            "projects/{}/locations/global/keys/{}",
            self.project_number, self.key_id
        )
    }

    pub fn is_deleted(&self) -> bool {
        !self.delete_time.is_empty()
    }
}

/// A key as a caller that checks requests needs it (Service Control). Never contains the key
/// string.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiKeyRecord {
    pub uid: String,
    pub key_id: String,
    /// `projects/<number>/locations/global/keys/<key_id>`.
    pub name: String,
    pub project_id: String,
    pub project_number: i64,
    pub display_name: String,
    pub restrictions: Restrictions,
    pub deleted: bool,
    /// The `expireTime` extension; `None` = never expires.
    pub expire_time: Option<OffsetDateTime>,
}

impl From<StoredKey> for ApiKeyRecord {
    fn from(k: StoredKey) -> Self {
        ApiKeyRecord {
            name: k.name(),
            deleted: k.is_deleted(),
            uid: k.uid,
            key_id: k.key_id,
            project_id: k.project_id,
            project_number: k.project_number,
            display_name: k.display_name,
            restrictions: k.restrictions,
            expire_time: k.expire_time,
        }
    }
}

type Row = (
    String,
    String,
    i64,
    String,
    String,
    String,
    String,
    String,
    String,
    String,
    String,
    String,
);

fn from_row(r: Row) -> Result<StoredKey, StoreError> {
    let expire_time = if r.11.is_empty() {
        None
    } else {
        // Written by `expire_time_column`, so only a hand-edited row fails here.
        Some(
            OffsetDateTime::parse(&r.11, &Rfc3339)
                .map_err(|e| StoreError::Sqlx(sqlx::Error::Decode(Box::new(e))))?,
        )
    };
    Ok(StoredKey {
        uid: r.0,
        project_id: r.1,
        project_number: r.2,
        key_id: r.3,
        display_name: r.4,
        restrictions: decode_json(&r.5)?,
        annotations: decode_json(&r.6)?,
        etag: r.7,
        create_time: r.8,
        update_time: r.9,
        delete_time: r.10,
        expire_time,
    })
}

/// The `expire_time` column: RFC 3339 in UTC, or '' for none.
fn expire_time_column(t: Option<OffsetDateTime>) -> String {
    t.map(format_rfc3339).unwrap_or_default()
}

const KEY_COLUMNS: &str = "uid, project_id, project_number, key_id, display_name, restrictions, \
     annotations, etag, create_time, update_time, delete_time, expire_time";

/// The key a key string belongs to, found by its keyed hash (soft-deleted keys included).
/// This is the lookup Service Control's check uses.
pub async fn find_by_key_string(
    store: &Store,
    master_key: &MasterKey,
    key_string: &str,
) -> Result<Option<ApiKeyRecord>, StoreError> {
    let row: Option<Row> = sqlx::query_as(&format!(
        "SELECT {KEY_COLUMNS} FROM apikeys_keys WHERE key_hash = $1"
    ))
    .bind(key_hash(master_key, key_string))
    .fetch_optional(store.pool())
    .await?;
    Ok(row.map(from_row).transpose()?.map(ApiKeyRecord::from))
}

pub async fn get(
    store: &Store,
    project_id: &str,
    key_id: &str,
) -> Result<Option<StoredKey>, StoreError> {
    let row: Option<Row> = sqlx::query_as(&format!(
        "SELECT {KEY_COLUMNS} FROM apikeys_keys WHERE project_id = $1 AND key_id = $2"
    ))
    .bind(project_id)
    .bind(key_id)
    .fetch_optional(store.pool())
    .await?;
    row.map(from_row).transpose()
}

/// The project's keys (deleted ones included) in creation order.
pub async fn list_in_project(
    store: &Store,
    project_id: &str,
) -> Result<Vec<StoredKey>, StoreError> {
    let rows: Vec<Row> = sqlx::query_as(&format!(
        "SELECT {KEY_COLUMNS} FROM apikeys_keys WHERE project_id = $1 \
         ORDER BY create_seq, key_id"
    ))
    .bind(project_id)
    .fetch_all(store.pool())
    .await?;
    rows.into_iter().map(from_row).collect()
}

/// The sealed key string of the key with this uid.
pub async fn sealed_key_string(store: &Store, uid: &str) -> Result<Option<String>, StoreError> {
    let row: Option<(String,)> =
        sqlx::query_as("SELECT key_sealed FROM apikeys_keys WHERE uid = $1")
            .bind(uid)
            .fetch_optional(store.pool())
            .await?;
    Ok(row.map(|(s,)| s))
}

/// Inserts a key with its lookup hash and sealed string; `false` if the uid, the key id in
/// the project, or the hash is taken.
pub async fn insert(
    conn: &mut AnyConnection,
    key: &StoredKey,
    key_hash: &str,
    key_sealed: &str,
) -> Result<bool, StoreError> {
    let inserted = sqlx::query(
        "INSERT INTO apikeys_keys (uid, project_id, project_number, key_id, display_name, \
         restrictions, annotations, key_hash, key_sealed, etag, create_time, update_time, \
         delete_time, create_seq, expire_time) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15) \
         ON CONFLICT DO NOTHING",
    )
    .bind(&key.uid)
    .bind(&key.project_id)
    .bind(key.project_number)
    .bind(&key.key_id)
    .bind(&key.display_name)
    .bind(encode_json(&key.restrictions)?)
    .bind(encode_json(&key.annotations)?)
    .bind(key_hash)
    .bind(key_sealed)
    .bind(&key.etag)
    .bind(&key.create_time)
    .bind(&key.update_time)
    .bind(&key.delete_time)
    .bind(crate::store::creation_seq())
    .bind(expire_time_column(key.expire_time))
    .execute(conn)
    .await?;
    Ok(inserted.rows_affected() > 0)
}

/// Writes the updatable fields (display name, restrictions, annotations, expiry) with the new
/// etag and update time.
/// Writes the updatable fields with the new etag, only if the stored etag is still
/// `read_etag` (the one the change was computed from); `false` when another write came first.
pub async fn update(
    conn: &mut AnyConnection,
    key: &StoredKey,
    read_etag: &str,
) -> Result<bool, StoreError> {
    let done = sqlx::query(
        "UPDATE apikeys_keys SET display_name = $1, restrictions = $2, annotations = $3, \
         etag = $4, update_time = $5, expire_time = $6 WHERE uid = $7 AND etag = $8",
    )
    .bind(&key.display_name)
    .bind(encode_json(&key.restrictions)?)
    .bind(encode_json(&key.annotations)?)
    .bind(&key.etag)
    .bind(&key.update_time)
    .bind(expire_time_column(key.expire_time))
    .bind(&key.uid)
    .bind(read_etag)
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Writes the delete time ('' = not deleted) with the new etag and update time, only if the
/// stored etag is still `read_etag`; `false` when another write came first.
pub async fn set_delete_time(
    conn: &mut AnyConnection,
    key: &StoredKey,
    read_etag: &str,
) -> Result<bool, StoreError> {
    let done = sqlx::query(
        "UPDATE apikeys_keys SET delete_time = $1, update_time = $2, etag = $3 \
         WHERE uid = $4 AND etag = $5",
    )
    .bind(&key.delete_time)
    .bind(&key.update_time)
    .bind(&key.etag)
    .bind(&key.uid)
    .bind(read_etag)
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}
