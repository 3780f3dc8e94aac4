//! Implicit projects: a project exists once something names it. Each project id gets a stable,
//! random 12-digit project number on first use, because Google APIs put numbers in some names
//! (API keys, serviceusage) and accept id or number in paths.
//!
//! # Lifecycle
//! A project is `ACTIVE` or `DELETE_REQUESTED` (Resource Manager v1's `lifecycleState`).
//! `gcloud projects delete` / `undelete` (served by `apis/resourcemanager.rs`) flip it with
//! `store::projects::set_lifecycle_state`; Service Control reads it with
//! `store::projects::lifecycle_state` and answers
//! `PROJECT_DELETED` for a deleted consumer. Nothing is ever purged: Google purges after 30 days,
//! Portico keeps the row (and the number) so an undelete always works and numbers never get
//! reused.
//!
//! Layer rule: the rows and their SQL are `crate::store::projects` (callers that only read or
//! flip a row use it directly); this module adds the id rule and the assign-on-first-use
//! policy, with Google-shaped errors.

use rand::Rng;

use crate::error::ApiError;
use crate::store::Store;

/// Google's project id rule: 6–30 characters, lower-case letters, digits and hyphens, starting
/// with a letter and not ending with a hyphen.
pub fn validate_project_id(id: &str) -> Result<(), ApiError> {
    let ok = (6..=30).contains(&id.len())
        && id.starts_with(|c: char| c.is_ascii_lowercase())
        && !id.ends_with('-')
        && id
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if ok {
        Ok(())
    } else {
        Err(ApiError::invalid_argument(format!(
            "Invalid project id '{id}': use 6 to 30 lower-case letters, digits or hyphens, \
             starting with a letter."
        )))
    }
}

/// The project's number, assigning one on first use.
pub async fn project_number(store: &Store, project_id: &str) -> Result<i64, ApiError> {
    validate_project_id(project_id)?;
    for _ in 0..5 {
        if let Some(n) = crate::store::projects::number(store, project_id).await? {
            return Ok(n);
        }
        let candidate: i64 = rand::thread_rng().gen_range(100_000_000_000..1_000_000_000_000);
        // A racing insert of the same id, or a number collision, both land here as "no row";
        // the loop re-reads and retries.
        crate::store::projects::insert_if_absent(store, project_id, candidate).await?;
    }
    Err(ApiError::internal(format_args!(
        "could not assign a project number to {project_id}"
    )))
}

/// Resolves a path's project (id or number) to the project id. An unknown number is NOT_FOUND;
/// an id is accepted (and implicitly created) if it is well-formed.
pub async fn project_id_for(store: &Store, id_or_number: &str) -> Result<String, ApiError> {
    if !id_or_number.is_empty() && id_or_number.chars().all(|c| c.is_ascii_digit()) {
        let n: i64 = id_or_number
            .parse()
            .map_err(|_| ApiError::not_found(format!("Project '{id_or_number}' not found.")))?;
        return crate::store::projects::id_for_number(store, n)
            .await?
            .ok_or_else(|| ApiError::not_found(format!("Project '{id_or_number}' not found.")));
    }
    project_number(store, id_or_number).await?;
    Ok(id_or_number.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::projects::{
        create_time, lifecycle_state, set_lifecycle_state, LifecycleState, MIGRATIONS,
    };

    #[tokio::test]
    async fn numbers_are_stable_and_resolvable() {
        let (_d, store) = crate::store::tests::temp_store().await;
        store.migrate(&[MIGRATIONS]).await.unwrap();
        let n = project_number(&store, "demo-proj").await.unwrap();
        assert!((100_000_000_000..1_000_000_000_000).contains(&n));
        assert_eq!(project_number(&store, "demo-proj").await.unwrap(), n);
        assert_ne!(project_number(&store, "other-proj").await.unwrap(), n);
        assert_eq!(
            project_id_for(&store, &n.to_string()).await.unwrap(),
            "demo-proj"
        );
        assert_eq!(
            project_id_for(&store, "demo-proj").await.unwrap(),
            "demo-proj"
        );
        assert_eq!(
            project_id_for(&store, "123456789012")
                .await
                .unwrap_err()
                .code,
            crate::error::Code::NotFound
        );
        assert!(project_number(&store, "Bad_Id").await.is_err());
    }

    #[tokio::test]
    async fn lifecycle_transitions_are_conditional() {
        use LifecycleState::*;
        let (_d, store) = crate::store::tests::temp_store().await;
        store.migrate(&[MIGRATIONS]).await.unwrap();
        assert_eq!(lifecycle_state(&store, "demo-proj").await.unwrap(), None);
        project_number(&store, "demo-proj").await.unwrap();
        assert_eq!(
            lifecycle_state(&store, "demo-proj").await.unwrap(),
            Some(Active)
        );
        assert!(
            set_lifecycle_state(&store, "demo-proj", Active, DeleteRequested)
                .await
                .unwrap()
        );
        // A second delete finds it no longer ACTIVE.
        assert!(
            !set_lifecycle_state(&store, "demo-proj", Active, DeleteRequested)
                .await
                .unwrap()
        );
        assert_eq!(
            lifecycle_state(&store, "demo-proj").await.unwrap(),
            Some(DeleteRequested)
        );
        // Other projects are untouched.
        project_number(&store, "other-proj").await.unwrap();
        assert_eq!(
            lifecycle_state(&store, "other-proj").await.unwrap(),
            Some(Active)
        );
        assert!(
            set_lifecycle_state(&store, "demo-proj", DeleteRequested, Active)
                .await
                .unwrap()
        );
        assert_eq!(
            lifecycle_state(&store, "demo-proj").await.unwrap(),
            Some(Active)
        );
        assert!(create_time(&store, "demo-proj").await.unwrap().is_some());
    }
}
