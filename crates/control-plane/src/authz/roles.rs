//! The permissions this crate checks and the one role → permission table.
//!
//! Layer rule: pure data and functions; imports nothing from the rest of the crate.

/// Permissions checked by this crate.
pub mod perms {
    pub const SERVICES_GET: &str = "servicemanagement.services.get";
    pub const SERVICES_UPDATE: &str = "servicemanagement.services.update";
    pub const SERVICES_DELETE: &str = "servicemanagement.services.delete";
    pub const SERVICES_GET_IAM: &str = "servicemanagement.services.getIamPolicy";
    pub const SERVICES_SET_IAM: &str = "servicemanagement.services.setIamPolicy";
    pub const SERVICES_CHECK: &str = "servicemanagement.services.check";
    pub const SERVICES_REPORT: &str = "servicemanagement.services.report";
    pub const SERVICES_QUOTA: &str = "servicemanagement.services.quota";
    pub const SERVICES_BIND: &str = "servicemanagement.services.bind";
    pub const SERVICES_CREATE: &str = "servicemanagement.services.create";
    pub const SERVICEUSAGE_ENABLE: &str = "serviceusage.services.enable";
    pub const SERVICEUSAGE_DISABLE: &str = "serviceusage.services.disable";
    pub const SERVICEUSAGE_LIST: &str = "serviceusage.services.list";
    pub const SA_CREATE: &str = "iam.serviceAccounts.create";
    pub const SA_GET: &str = "iam.serviceAccounts.get";
    pub const SA_LIST: &str = "iam.serviceAccounts.list";
    pub const SA_DELETE: &str = "iam.serviceAccounts.delete";
    pub const SA_DISABLE: &str = "iam.serviceAccounts.disable";
    pub const SA_ENABLE: &str = "iam.serviceAccounts.enable";
    pub const SA_GET_OPEN_ID_TOKEN: &str = "iam.serviceAccounts.getOpenIdToken";
    pub const SA_GET_ACCESS_TOKEN: &str = "iam.serviceAccounts.getAccessToken";
    pub const KEY_CREATE: &str = "iam.serviceAccountKeys.create";
    pub const KEY_GET: &str = "iam.serviceAccountKeys.get";
    pub const KEY_LIST: &str = "iam.serviceAccountKeys.list";
    pub const KEY_DELETE: &str = "iam.serviceAccountKeys.delete";
    pub const PROJECT_GET: &str = "resourcemanager.projects.get";
    pub const PROJECT_DELETE: &str = "resourcemanager.projects.delete";
    pub const PROJECT_UNDELETE: &str = "resourcemanager.projects.undelete";
    pub const PROJECT_GET_IAM: &str = "resourcemanager.projects.getIamPolicy";
    pub const PROJECT_SET_IAM: &str = "resourcemanager.projects.setIamPolicy";
    pub const APIKEYS_CREATE: &str = "apikeys.keys.create";
    pub const APIKEYS_GET: &str = "apikeys.keys.get";
    pub const APIKEYS_LIST: &str = "apikeys.keys.list";
    pub const APIKEYS_UPDATE: &str = "apikeys.keys.update";
    pub const APIKEYS_DELETE: &str = "apikeys.keys.delete";
    pub const APIKEYS_UNDELETE: &str = "apikeys.keys.undelete";
    pub const APIKEYS_GET_KEY_STRING: &str = "apikeys.keys.getKeyString";
    pub const APIKEYS_LOOKUP: &str = "apikeys.keys.lookup";
    pub const TRACES_PATCH: &str = "cloudtrace.traces.patch";
    pub const TRACES_GET: &str = "cloudtrace.traces.get";
    pub const TRACES_LIST: &str = "cloudtrace.traces.list";
}

/// Whether `role` includes `permission` (the subset of Google's predefined roles Portico knows).
///
/// The basic roles cover every API; the narrow roles each name their own permissions, so no
/// narrow role grants a permission of another API.
pub fn role_grants(role: &str, permission: &str) -> bool {
    use perms::*;
    let is_iam_write = permission.ends_with(".setIamPolicy");
    // Deleting a project is owner-only in Google: `roles/editor` has everything but IAM
    // writes and these two.
    let owner_only = matches!(permission, PROJECT_DELETE | PROJECT_UNDELETE);
    // Minting tokens as an account is its own grant in Google: neither `roles/editor` nor
    // `roles/iam.serviceAccountAdmin` has it, only the token-creator roles (and owner).
    let mints_tokens = matches!(permission, SA_GET_OPEN_ID_TOKEN | SA_GET_ACCESS_TOKEN);
    match role {
        "roles/owner" => true,
        "roles/editor" => !is_iam_write && !owner_only && !mints_tokens,
        // `getIamPolicy` on projects ends neither in `.get` nor `.list`, yet viewers may read it.
        "roles/viewer" => {
            permission.ends_with(".get")
                || permission.ends_with(".list")
                || permission == PROJECT_GET_IAM
        }
        "roles/iam.securityReviewer" => permission == PROJECT_GET_IAM,
        "roles/servicemanagement.admin" => permission.starts_with("servicemanagement."),
        "roles/servicemanagement.configEditor" => {
            matches!(permission, SERVICES_GET | SERVICES_UPDATE)
        }
        // ESP fetches configs and rollouts with this role, so it includes reads.
        "roles/servicemanagement.serviceController" => matches!(
            permission,
            SERVICES_GET | SERVICES_CHECK | SERVICES_REPORT | SERVICES_QUOTA
        ),
        "roles/servicemanagement.serviceConsumer" => permission == SERVICES_BIND,
        "roles/serviceusage.serviceUsageAdmin" => permission.starts_with("serviceusage."),
        "roles/serviceusage.serviceUsageConsumer" => permission == SERVICEUSAGE_LIST,
        "roles/iam.serviceAccountAdmin" => {
            permission.starts_with("iam.serviceAccounts.") && !mints_tokens
        }
        // As in Google: the OpenID role mints ID tokens only; the token creator mints both.
        "roles/iam.serviceAccountOpenIdTokenCreator" => permission == SA_GET_OPEN_ID_TOKEN,
        "roles/iam.serviceAccountTokenCreator" => mints_tokens,
        "roles/iam.serviceAccountKeyAdmin" => {
            permission.starts_with("iam.serviceAccountKeys.")
                || matches!(permission, SA_GET | SA_LIST)
        }
        "roles/resourcemanager.projectIamAdmin" => {
            matches!(permission, PROJECT_GET_IAM | PROJECT_SET_IAM | PROJECT_GET)
        }
        "roles/serviceusage.apiKeysAdmin" => permission.starts_with("apikeys."),
        "roles/serviceusage.apiKeysViewer" => {
            matches!(permission, APIKEYS_GET | APIKEYS_LIST | APIKEYS_LOOKUP)
        }
        // What the walkthrough grants the proxy's account on the tracing project: write only.
        "roles/cloudtrace.agent" => permission == TRACES_PATCH,
        "roles/cloudtrace.user" => matches!(permission, TRACES_GET | TRACES_LIST),
        "roles/cloudtrace.admin" => permission.starts_with("cloudtrace."),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles() {
        assert!(role_grants(
            "roles/servicemanagement.serviceController",
            perms::SERVICES_CHECK
        ));
        assert!(role_grants(
            "roles/servicemanagement.serviceController",
            perms::SERVICES_GET
        ));
        assert!(!role_grants(
            "roles/servicemanagement.serviceController",
            perms::SERVICES_UPDATE
        ));
        assert!(!role_grants("roles/editor", perms::SERVICES_SET_IAM));
        assert!(role_grants("roles/owner", perms::SERVICES_SET_IAM));
        assert!(!role_grants("roles/cloudtrace.agent", perms::SERVICES_GET));
    }
}
