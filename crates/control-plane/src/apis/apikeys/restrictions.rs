//! `google.api.apikeys.v2.Restrictions` as API Keys accepts them: Google's validation rules
//! with their 400 texts, and the `oneof` rule for application restrictions.
//!
//! The data type itself is `store::keys::Restrictions` (the stored column's shape, shared with
//! Service Control); `validate` is an inherent method on it written here because the rules and
//! their errors belong to this API, not to the store.
//!
//! Layer rule: pure checks; no storage, no HTTP.

use std::net::IpAddr;

use serde_json::Value;

use crate::error::ApiError;
use crate::store::keys::Restrictions;

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
