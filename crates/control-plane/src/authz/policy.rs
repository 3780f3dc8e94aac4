//! The IAM policy model: `google.iam.v1.Policy`, its bindings, normalisation before storing,
//! and etag handling (base64 in either alphabet, compared as bytes).
//!
//! Layer rule: reads policies through `crate::store::policies`; knows nothing of HTTP.

use base64::Engine;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::roles::role_grants;
use crate::error::ApiError;
use crate::store::Store;

/// The etag of a project that has never had a policy set (what Google returns, bytes 00 20 01).
pub const EMPTY_POLICY_ETAG: &str = "ACAB";

/// The stored policy of a project; `None` if never set.
pub async fn load_project_policy(
    store: &Store,
    project_id: &str,
) -> Result<Option<Policy>, ApiError> {
    match crate::store::policies::load(store, project_id).await? {
        Some(stored) => {
            let mut p: Policy = serde_json::from_str(&stored.document)?;
            p.etag = stored.etag;
            Ok(Some(p))
        }
        None => Ok(None),
    }
}

/// Canonical (standard-alphabet, padded) form of a presented etag, so it can be compared with
/// the stored one inside a conditional SQL statement.
pub fn canonical_etag(presented: &str) -> Result<String, ApiError> {
    crate::crypto::decode_base64_lenient(presented)
        .map(|b| base64::engine::general_purpose::STANDARD.encode(b))
        .ok_or_else(|| {
            ApiError::invalid_argument(format!("Invalid etag '{presented}': not valid base64."))
                .with_field_violation("policy.etag", "must be base64")
        })
}

/// `google.iam.v1.Policy` (bindings without conditions).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Policy {
    #[serde(skip_serializing_if = "is_zero")]
    pub version: i64,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub bindings: Vec<Binding>,
    /// Base64 (standard alphabet on output; either alphabet accepted on input).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub etag: String,
}

fn is_zero(v: &i64) -> bool {
    *v == 0
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Binding {
    pub role: String,
    pub members: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub condition: Option<serde_json::Value>,
}

impl Policy {
    pub fn grants(&self, member: &str, permission: &str) -> bool {
        self.bindings
            .iter()
            .any(|b| b.members.iter().any(|m| m == member) && role_grants(&b.role, permission))
    }

    /// Normalises a policy about to be stored: drops empty bindings, merges duplicate roles,
    /// dedups members, and sets a fresh etag derived from the content.
    pub fn normalized_for_store(mut self) -> Result<Policy, ApiError> {
        let mut merged: Vec<Binding> = Vec::new();
        for b in self.bindings.drain(..) {
            if b.role.is_empty() {
                return Err(ApiError::invalid_argument("Binding has an empty role.")
                    .with_field_violation("policy.bindings.role", "must not be empty"));
            }
            if b.condition.is_some() {
                return Err(ApiError::invalid_argument(
                    "Conditional role bindings are not supported.",
                ));
            }
            for m in &b.members {
                validate_member(m)?;
            }
            match merged.iter_mut().find(|x| x.role == b.role) {
                Some(x) => x.members.extend(b.members),
                None => merged.push(b),
            }
        }
        for b in &mut merged {
            b.members.sort();
            b.members.dedup();
        }
        merged.retain(|b| !b.members.is_empty());
        self.bindings = merged;
        if self.version == 0 {
            self.version = 1;
        }
        self.etag = String::new();
        let mut h = Sha256::new();
        h.update(serde_json::to_vec(&self).unwrap_or_default());
        h.update(uuid::Uuid::new_v4().as_bytes());
        self.etag = base64::engine::general_purpose::STANDARD.encode(&h.finalize()[..8]);
        Ok(self)
    }
}

fn validate_member(m: &str) -> Result<(), ApiError> {
    let ok = match m.split_once(':') {
        Some(("user" | "serviceAccount" | "group" | "domain" | "principal", rest)) => {
            !rest.is_empty()
        }
        _ => matches!(m, "allUsers" | "allAuthenticatedUsers"),
    };
    if ok {
        Ok(())
    } else {
        Err(ApiError::invalid_argument(format!(
            "Invalid member '{m}': expected user:, serviceAccount:, group:, domain:, allUsers \
             or allAuthenticatedUsers."
        )))
    }
}

/// Decodes base64 in either alphabet, padding optional (gcloud re-encodes bytes URL-safe).
///
/// Looser than [`crate::crypto::decode_base64_lenient`]: white space anywhere and any run of
/// trailing `=` are dropped before decoding, because its callers read bytes a client encoded
/// itself (a config's `fileContents`, etags compared by [`etag_matches`], page tokens of the
/// lists that word page sizes as an "integer"), which may arrive line-wrapped or re-padded.
/// Text mixing both alphabets is still refused.
pub fn decode_base64_any(s: &str) -> Option<Vec<u8>> {
    use base64::engine::general_purpose::{STANDARD_NO_PAD, URL_SAFE_NO_PAD};
    let trimmed = s.trim().trim_end_matches('=');
    if trimmed.contains(['+', '/']) && trimmed.contains(['-', '_']) {
        return None;
    }
    let cleaned: String = trimmed.chars().filter(|c| !c.is_whitespace()).collect();
    if cleaned.contains(['-', '_']) {
        URL_SAFE_NO_PAD.decode(cleaned.as_bytes()).ok()
    } else {
        STANDARD_NO_PAD.decode(cleaned.as_bytes()).ok()
    }
}

/// Whether a presented etag equals the stored one, compared as decoded bytes.
/// An empty presented etag means "unconditional" (Google's semantics).
pub fn etag_matches(presented: &str, stored: &str) -> Result<bool, ApiError> {
    if presented.is_empty() {
        return Ok(true);
    }
    let p = decode_base64_any(presented).ok_or_else(|| {
        ApiError::invalid_argument(format!("Invalid etag '{presented}': not valid base64."))
            .with_field_violation("policy.etag", "must be base64")
    })?;
    Ok(decode_base64_any(stored).is_some_and(|s| s == p))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authz::perms;

    #[test]
    fn base64_either_alphabet_padding_optional() {
        assert_eq!(
            decode_base64_any("APrp7M925/g="),
            decode_base64_any("APrp7M925_g")
        );
        assert!(decode_base64_any("APrp7M925_g=").is_some());
        assert_eq!(decode_base64_any("Pz8/"), Some(b"???".to_vec()));
        assert_eq!(decode_base64_any("Pz8_"), Some(b"???".to_vec()));
        assert!(decode_base64_any("W/\"abc\"").is_none());
    }

    #[test]
    fn etags_compare_as_bytes() {
        assert!(etag_matches("APrp7M925_g=", "APrp7M925/g=").unwrap());
        assert!(!etag_matches("ACAB", "APrp7M925/g=").unwrap());
        assert!(etag_matches("", "APrp7M925/g=").unwrap());
        assert!(etag_matches("!!", "ACAB").is_err());
    }

    #[test]
    fn normalise_merges_and_sets_etag() {
        let p = Policy {
            version: 0,
            bindings: vec![
                Binding {
                    role: "roles/owner".into(),
                    members: vec!["user:a@x".into()],
                    condition: None,
                },
                Binding {
                    role: "roles/owner".into(),
                    members: vec!["user:a@x".into(), "user:b@x".into()],
                    condition: None,
                },
                Binding {
                    role: "roles/viewer".into(),
                    members: vec![],
                    condition: None,
                },
            ],
            etag: "x".into(),
        }
        .normalized_for_store()
        .unwrap();
        assert_eq!(p.version, 1);
        assert_eq!(p.bindings.len(), 1);
        assert_eq!(p.bindings[0].members, vec!["user:a@x", "user:b@x"]);
        assert!(decode_base64_any(&p.etag).is_some());
        assert!(p.grants("user:b@x", perms::SERVICES_SET_IAM));
    }

    #[test]
    fn bad_member_rejected() {
        let p = Policy {
            bindings: vec![Binding {
                role: "roles/owner".into(),
                members: vec!["bob".into()],
                condition: None,
            }],
            ..Default::default()
        };
        assert_eq!(
            p.normalized_for_store().unwrap_err().code,
            crate::error::Code::InvalidArgument
        );
    }
}
