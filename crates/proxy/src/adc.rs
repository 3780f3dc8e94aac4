//! Application default credentials (`--enable_application_default_credentials`), found in
//! Google's order: the file `GOOGLE_APPLICATION_CREDENTIALS` names; else gcloud's well-known
//! file, `$CLOUDSDK_CONFIG/application_default_credentials.json` or
//! `$HOME/.config/gcloud/application_default_credentials.json`; else the metadata server (the
//! caller's business: [`find`] answers `None`).
//!
//! Only service-account key files (`"type": "service_account"`) are taken. gcloud's user
//! credentials (`"type": "authorized_user"`, from `gcloud auth application-default login`) are
//! refused with a message saying so: they need a refresh-token grant at Google's token endpoint,
//! which Portico's control plane does not have (it issues tokens to service accounts only), and
//! a proxy acting as a person is not what an API proxy should do. Every refusal names the file.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// gcloud's file name inside its configuration directory.
pub const WELL_KNOWN_FILE: &str = "application_default_credentials.json";
/// A credentials file is a few KiB; a larger one is not one, and is not read whole.
const MAX_FILE_BYTES: u64 = 1 << 20;

/// Where the credentials were found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub path: PathBuf,
    /// `GOOGLE_APPLICATION_CREDENTIALS` or gcloud's well-known file.
    pub origin: &'static str,
}

/// gcloud's well-known file for this environment, whether or not it exists.
pub fn well_known_file(env: &dyn Fn(&str) -> Option<OsString>) -> Option<PathBuf> {
    let set = |name: &str| env(name).filter(|v| !v.is_empty());
    if let Some(dir) = set("CLOUDSDK_CONFIG") {
        return Some(PathBuf::from(dir).join(WELL_KNOWN_FILE));
    }
    set("HOME").map(|home| {
        PathBuf::from(home)
            .join(".config")
            .join("gcloud")
            .join(WELL_KNOWN_FILE)
    })
}

/// The credentials file ADC would use, checked ([`check`]); `None` when there is none and the
/// metadata server is next.
pub fn find(env: &dyn Fn(&str) -> Option<OsString>) -> Result<Option<Found>, String> {
    if let Some(path) = env("GOOGLE_APPLICATION_CREDENTIALS").filter(|v| !v.is_empty()) {
        let path = PathBuf::from(path);
        check(&path).map_err(|e| format!("GOOGLE_APPLICATION_CREDENTIALS: {e}"))?;
        return Ok(Some(Found {
            path,
            origin: "GOOGLE_APPLICATION_CREDENTIALS",
        }));
    }
    let Some(path) = well_known_file(env) else {
        return Ok(None);
    };
    // A missing file sends ADC on to the metadata server; any other trouble is the operator's
    // to see, not to be skipped over.
    match std::fs::symlink_metadata(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        _ => {}
    }
    check(&path).map_err(|e| format!("gcloud's application default credentials: {e}"))?;
    Ok(Some(Found {
        path,
        origin: "gcloud's well-known file",
    }))
}

/// Reads `path` and accepts it only as a valid service-account key file.
pub fn check(path: &Path) -> Result<(), String> {
    let shown = path.display();
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot read {shown}: {e}"))?;
    if !meta.is_file() {
        return Err(format!("{shown} is not a file"));
    }
    if meta.len() > MAX_FILE_BYTES {
        return Err(format!(
            "{shown} is {} bytes; a credentials file is a few KiB",
            meta.len()
        ));
    }
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {shown}: {e}"))?;
    let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
        format!(
            "{shown} is not valid JSON (line {}, column {})",
            e.line(),
            e.column()
        )
    })?;
    match value.get("type").and_then(serde_json::Value::as_str) {
        Some("service_account") => {
            portico_credentials::ServiceAccountKey::from_json_str(&text, &shown.to_string())
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
        Some("authorized_user") => Err(format!(
            "{shown} holds user credentials (\"type\": \"authorized_user\", written by `gcloud \
             auth application-default login`); Portico's proxy authenticates only as a service \
             account: point GOOGLE_APPLICATION_CREDENTIALS (or --service_account_key) at a \
             service-account key file, or run where a metadata server gives the proxy its \
             identity"
        )),
        Some(other) => Err(format!(
            "{shown} holds credentials of type {other:?}; Portico's proxy takes only \
             \"service_account\" key files"
        )),
        None => Err(format!(
            "{shown} has no string field \"type\"; it is not a Google credentials file"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env_of(vars: &[(&str, &Path)]) -> impl Fn(&str) -> Option<OsString> {
        let map: HashMap<String, OsString> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.as_os_str().to_owned()))
            .collect();
        move |k| map.get(k).cloned()
    }

    fn service_account_json() -> String {
        let g = portico_credentials::generate_rsa_key().expect("keygen");
        serde_json::json!({
            "type": "service_account", "project_id": "p", "private_key_id": g.key_id,
            "private_key": g.private_pkcs8_pem, "client_email": "a@p.iam.gserviceaccount.com",
            "token_uri": "http://127.0.0.1:9/token",
        })
        .to_string()
    }

    fn user_json() -> &'static str {
        r#"{"type":"authorized_user","client_id":"c","client_secret":"s","refresh_token":"r"}"#
    }

    #[test]
    fn googles_order() {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().join("home");
        let gcloud = home.join(".config/gcloud");
        std::fs::create_dir_all(&gcloud).unwrap();
        let cloudsdk = dir.path().join("sdk");
        std::fs::create_dir_all(&cloudsdk).unwrap();
        let env_key = dir.path().join("env.json");
        std::fs::write(&env_key, service_account_json()).unwrap();

        // Nothing anywhere: the metadata server is next.
        assert_eq!(find(&env_of(&[("HOME", &home)])).unwrap(), None);
        assert_eq!(find(&env_of(&[])).unwrap(), None);
        // gcloud's file under HOME.
        std::fs::write(gcloud.join(WELL_KNOWN_FILE), service_account_json()).unwrap();
        let f = find(&env_of(&[("HOME", &home)])).unwrap().unwrap();
        assert_eq!(f.path, gcloud.join(WELL_KNOWN_FILE));
        assert_eq!(f.origin, "gcloud's well-known file");
        // CLOUDSDK_CONFIG replaces HOME's directory, even when its file is missing.
        assert_eq!(
            find(&env_of(&[("HOME", &home), ("CLOUDSDK_CONFIG", &cloudsdk)])).unwrap(),
            None
        );
        std::fs::write(cloudsdk.join(WELL_KNOWN_FILE), service_account_json()).unwrap();
        let f = find(&env_of(&[("HOME", &home), ("CLOUDSDK_CONFIG", &cloudsdk)]))
            .unwrap()
            .unwrap();
        assert_eq!(f.path, cloudsdk.join(WELL_KNOWN_FILE));
        // The environment variable comes first.
        let f = find(&env_of(&[
            ("HOME", &home),
            ("CLOUDSDK_CONFIG", &cloudsdk),
            ("GOOGLE_APPLICATION_CREDENTIALS", &env_key),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(f.path, env_key);
        assert_eq!(f.origin, "GOOGLE_APPLICATION_CREDENTIALS");
    }

    #[test]
    fn bad_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).unwrap();
            p
        };
        let user = write("user.json", user_json());
        let e = check(&user).unwrap_err();
        assert!(
            e.starts_with(&format!("{} holds user credentials", user.display()))
                && e.contains("authorized_user"),
            "{e}"
        );
        let ext = write("ext.json", r#"{"type":"external_account"}"#);
        let e = check(&ext).unwrap_err();
        assert!(
            e.contains("\"external_account\"") && e.contains("ext.json"),
            "{e}"
        );
        let junk = write("junk.json", "{ not json");
        let e = check(&junk).unwrap_err();
        assert!(e.contains("junk.json is not valid JSON (line 1"), "{e}");
        let untyped = write("untyped.json", "[1]");
        assert!(check(&untyped)
            .unwrap_err()
            .contains("no string field \"type\""));
        let broken = write(
            "broken.json",
            r#"{"type":"service_account","project_id":"p"}"#,
        );
        let e = check(&broken).unwrap_err();
        assert!(
            e.contains("broken.json") && e.contains("missing field"),
            "{e}"
        );
        let e = check(&dir.path().join("absent.json")).unwrap_err();
        assert!(
            e.starts_with("cannot read") && e.contains("absent.json"),
            "{e}"
        );
        assert!(check(dir.path()).unwrap_err().contains("is not a file"));
        let big = write("big.json", &" ".repeat((MAX_FILE_BYTES + 1) as usize));
        assert!(check(&big).unwrap_err().contains("bytes"));

        // Through find: the variable's file, and the well-known file, are named with where
        // they came from; a directory in the well-known place is not skipped over.
        let e = find(&env_of(&[("GOOGLE_APPLICATION_CREDENTIALS", &user)])).unwrap_err();
        assert!(e.starts_with("GOOGLE_APPLICATION_CREDENTIALS: "), "{e}");
        let sdk = dir.path().join("sdk");
        std::fs::create_dir_all(sdk.join(WELL_KNOWN_FILE)).unwrap();
        let e = find(&env_of(&[("CLOUDSDK_CONFIG", &sdk)])).unwrap_err();
        assert!(
            e.starts_with("gcloud's application default credentials: "),
            "{e}"
        );
    }
}
