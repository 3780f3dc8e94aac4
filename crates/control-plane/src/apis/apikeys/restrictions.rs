//! `google.api.apikeys.v2.Restrictions`: the typed shape, its validation, and the `oneof`
//! rule for application restrictions.
//!
//! Layer rule: pure data and checks; no storage, no HTTP.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::ApiError;

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
    /// Google's rules: at most one kind of application restriction; every entry well-formed.
    pub fn validate(&self) -> Result<(), ApiError> {
        let kinds = [
            self.browser_key_restrictions.is_some(),
            self.server_key_restrictions.is_some(),
            self.android_key_restrictions.is_some(),
            self.ios_key_restrictions.is_some(),
        ]
        .iter()
        .filter(|b| **b)
        .count();
        if kinds > 1 {
            return Err(ApiError::invalid_argument(
                "A key can have only one kind of application restriction (browser, server, \
                 Android or iOS).",
            ));
        }
        for t in &self.api_targets {
            if t.service.trim().is_empty() || t.service.contains(char::is_whitespace) {
                return Err(bad_field(
                    "restrictions.apiTargets.service",
                    format!("Invalid API target service '{}'.", t.service),
                ));
            }
            for m in &t.methods {
                if m.trim().is_empty() || m.contains(char::is_whitespace) {
                    return Err(bad_field(
                        "restrictions.apiTargets.methods",
                        format!("Invalid API target method '{m}'."),
                    ));
                }
            }
        }
        if let Some(s) = &self.server_key_restrictions {
            for ip in &s.allowed_ips {
                let entry = ip.trim();
                if entry.parse::<IpAddr>().is_err() && entry.parse::<ipnet::IpNet>().is_err() {
                    return Err(bad_field(
                        "restrictions.serverKeyRestrictions.allowedIps",
                        format!("Invalid IP address or CIDR block '{ip}'."),
                    ));
                }
            }
        }
        if let Some(b) = &self.browser_key_restrictions {
            for r in &b.allowed_referrers {
                if r.trim().is_empty() || r.contains(char::is_whitespace) {
                    return Err(bad_field(
                        "restrictions.browserKeyRestrictions.allowedReferrers",
                        format!("Invalid HTTP referrer pattern '{r}'."),
                    ));
                }
            }
        }
        if let Some(a) = &self.android_key_restrictions {
            for app in &a.allowed_applications {
                if app.package_name.is_empty() || app.sha1_fingerprint.is_empty() {
                    return Err(bad_field(
                        "restrictions.androidKeyRestrictions.allowedApplications",
                        "Android applications need packageName and sha1Fingerprint.".to_string(),
                    ));
                }
            }
        }
        if let Some(i) = &self.ios_key_restrictions {
            if i.allowed_bundle_ids.iter().any(|b| b.trim().is_empty()) {
                return Err(bad_field(
                    "restrictions.iosKeyRestrictions.allowedBundleIds",
                    "Empty iOS bundle id.".to_string(),
                ));
            }
        }
        Ok(())
    }

    pub(super) fn is_empty(&self) -> bool {
        *self == Restrictions::default()
    }
}

pub(super) fn bad_field(field: &str, message: String) -> ApiError {
    ApiError::invalid_argument(message.clone()).with_field_violation(field, &message)
}

pub(super) fn parse_restrictions(v: Option<Value>) -> Result<Restrictions, ApiError> {
    let r: Restrictions = match v {
        None | Some(Value::Null) => Restrictions::default(),
        Some(v) => serde_json::from_value(v)
            .map_err(|e| ApiError::invalid_argument(format!("Invalid restrictions: {e}")))?,
    };
    r.validate()?;
    Ok(r)
}

/// The four application-restriction kinds are a proto `oneof`: setting one (gcloud's
/// `update --allowed-referrers` on a key that had IP restrictions) replaces whichever was set.
pub(super) fn set_client_restriction(r: &mut Restrictions, setting: bool) {
    if setting {
        r.browser_key_restrictions = None;
        r.server_key_restrictions = None;
        r.android_key_restrictions = None;
        r.ios_key_restrictions = None;
    }
}
