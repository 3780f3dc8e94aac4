//! The `operations` table: finished long-running operations of every API, one JSON document a
//! row, found by name or by the managed service they belong to.
//!
//! Layer rule: storage only; imports nothing above `store`. [`Operation`] is the stored
//! document's shape, so the APIs that write operations (Service Management, Service Usage, API
//! Keys) build it here instead of importing each other.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::AnyConnection;

use super::{now_rfc3339, Migration, Store, StoreError};

pub const MIGRATIONS: &[Migration] = &[
    Migration {
        id: "ops_0001",
        sql: &["CREATE TABLE IF NOT EXISTS operations (\
                name TEXT PRIMARY KEY, \
                body TEXT NOT NULL, \
                create_time TEXT NOT NULL)"],
    },
    // The managed service an operation belongs to (from `metadata.resourceNames`), so
    // `gcloud endpoints operations list --service` can filter and permissions can be checked.
    Migration {
        id: "ops_0002",
        sql: &[
            "ALTER TABLE operations ADD COLUMN service_name TEXT NOT NULL DEFAULT ''",
            "CREATE INDEX IF NOT EXISTS operations_by_service ON operations (service_name, create_time)",
        ],
    },
];

/// The connection a store function runs on inside a transaction (`&mut tx` derefs to it).
pub type Connection = AnyConnection;

/// `google.longrunning.Operation`, always finished: Portico does the work inside the request.
/// Field order is the wire order.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Operation {
    /// `operations/<id>`, with no further `/` (gcloud sends the id as one path segment).
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Value>,
    pub done: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response: Option<Value>,
    /// A `google.rpc.Status`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<Value>,
}

impl Operation {
    /// A finished operation that answered `response`; a null `metadata` is left out.
    pub fn done(name: impl Into<String>, metadata: Value, response: Value) -> Operation {
        Operation {
            name: name.into(),
            metadata: (!metadata.is_null()).then_some(metadata),
            done: true,
            response: Some(response),
            error: None,
        }
    }

    /// The managed service named by the first `services/<name>...` entry of
    /// `metadata.resourceNames`, or `""`.
    pub fn service_name(&self) -> String {
        self.metadata
            .as_ref()
            .map(service_of_metadata)
            .unwrap_or_default()
    }
}

/// A message as a `google.protobuf.Any`: `@type` first, then the message's fields. An
/// operation's `metadata` and `response` are these.
#[derive(Debug, Clone, Serialize)]
pub struct Any<T> {
    #[serde(rename = "@type")]
    pub type_url: &'static str,
    #[serde(flatten)]
    pub message: T,
}

impl<T> Any<T> {
    pub fn new(type_url: &'static str, message: T) -> Self {
        Any { type_url, message }
    }
}

/// `google.protobuf.Empty`, or any message with no fields set.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Empty {}

/// The service named in an operation document's `metadata.resourceNames`, or `""`.
pub fn service_of(op: &Value) -> String {
    op.get("metadata")
        .map(service_of_metadata)
        .unwrap_or_default()
}

fn service_of_metadata(metadata: &Value) -> String {
    metadata
        .get("resourceNames")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .find_map(|r| r.strip_prefix("services/"))
        .map(|r| r.split('/').next().unwrap_or(r).to_string())
        .unwrap_or_default()
}

/// JSON documents are stored as `TEXT`; a value that does not encode is a storage error.
pub(crate) fn encode_json<T: Serialize>(v: &T) -> Result<String, StoreError> {
    serde_json::to_string(v).map_err(|e| StoreError::Sqlx(sqlx::Error::Encode(Box::new(e))))
}

/// A stored JSON document that does not parse is a storage error.
pub(crate) fn decode_json<T: serde::de::DeserializeOwned>(s: &str) -> Result<T, StoreError> {
    serde_json::from_str(s).map_err(|e| StoreError::Sqlx(sqlx::Error::Decode(Box::new(e))))
}

/// Stores a finished operation. Call it inside the transaction of the change it describes, so
/// a failed change leaves no operation behind.
pub async fn insert(conn: &mut AnyConnection, op: &Operation) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO operations (name, body, create_time, service_name) VALUES ($1, $2, $3, $4)",
    )
    .bind(&op.name)
    .bind(encode_json(op)?)
    .bind(now_rfc3339())
    .bind(op.service_name())
    .execute(conn)
    .await?;
    Ok(())
}

/// The stored document of operation `name` (`operations/<id>`).
pub async fn get(store: &Store, name: &str) -> Result<Option<Value>, StoreError> {
    let row: Option<(String,)> = sqlx::query_as("SELECT body FROM operations WHERE name = $1")
        .bind(name)
        .fetch_optional(store.pool())
        .await?;
    row.map(|(body,)| decode_json(&body)).transpose()
}

/// Every operation of `service`, newest first.
pub async fn list_for_service(store: &Store, service: &str) -> Result<Vec<Value>, StoreError> {
    let rows: Vec<(String,)> = sqlx::query_as(
        "SELECT body FROM operations WHERE service_name = $1 ORDER BY create_time DESC, name",
    )
    .bind(service)
    .fetch_all(store.pool())
    .await?;
    rows.iter().map(|(b,)| decode_json(b)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn service_from_resource_names() {
        let op = json!({"metadata": {"resourceNames": ["services/a.b.c/configs/x"]}});
        assert_eq!(service_of(&op), "a.b.c");
        assert_eq!(service_of(&json!({"name": "operations/akmf.p7-1"})), "");
    }

    #[test]
    fn wire_order_and_null_metadata() {
        let op = Operation::done("operations/x", Value::Null, json!({"a": 1}));
        assert_eq!(
            serde_json::to_string(&op).unwrap(),
            r#"{"name":"operations/x","done":true,"response":{"a":1}}"#
        );
    }
}
