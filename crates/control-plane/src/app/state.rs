//! The state handlers share ([`AppState`] over [`Shared`]) and the substates a handler takes
//! when it needs only a part ([`IdentityState`]).
//!
//! Layer rule: plain data; built by `app::serve`, read by handlers.

use std::ops::Deref;
use std::path::PathBuf;
use std::sync::Arc;

use crate::authz::{AdminToken, TokenVerifier};
use crate::store::Store;

/// State shared by every handler; cheap to clone.
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl Deref for AppState {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.0
    }
}

pub struct Shared {
    pub store: Store,
    /// Base URL clients use to reach the control plane (no trailing `/`).
    pub public_url: String,
    /// Redis client for quota counters, when configured.
    pub redis: Option<redis::Client>,
    /// Directory for secrets kept outside the database (the admin token's directory).
    pub secrets_dir: PathBuf,
    pub(crate) admin_token: AdminToken,
    /// Verifiers for non-admin bearer tokens, asked in order.
    pub verifiers: Vec<Arc<dyn TokenVerifier>>,
    /// Encrypts API key strings and keys their lookup hash (see `crypto.rs`).
    pub master_key: crate::crypto::MasterKey,
    /// Signs ID tokens; its public half is in `store::idtoken_keys`.
    pub id_tokens: Arc<crate::idtoken::IdTokenSigner>,
    /// Service Control: quota counters, clock, Prometheus registry, config cache.
    pub servicecontrol: crate::apis::servicecontrol::ScState,
    /// Where and how long OpenAPI conversions run (`configs:submit`).
    pub conversions: crate::apis::servicemanagement::Conversions,
    /// How many trace spans are kept per project (`apis::cloudtrace`).
    pub traces: crate::apis::cloudtrace::Retention,
}

impl AppState {
    pub fn new(shared: Shared) -> Self {
        AppState(Arc::new(shared))
    }
}

impl AsRef<Store> for AppState {
    fn as_ref(&self) -> &Store {
        &self.store
    }
}

/// What the identity APIs (IAM, Resource Manager, tokens, published keys) read: storage and the
/// URL clients reach this server at. Taken with `State<IdentityState>`.
#[derive(Clone)]
pub struct IdentityState {
    pub store: Store,
    /// Base URL clients use to reach the control plane (no trailing `/`).
    pub public_url: Arc<str>,
}

impl axum::extract::FromRef<AppState> for IdentityState {
    fn from_ref(state: &AppState) -> Self {
        IdentityState {
            store: state.store.clone(),
            public_url: Arc::from(state.public_url.as_str()),
        }
    }
}

impl AsRef<Store> for IdentityState {
    fn as_ref(&self) -> &Store {
        &self.store
    }
}
