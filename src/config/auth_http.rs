//! `[auth.http]`: the HTTP authentication backend's settings (src/auth/http.rs).

use super::ConfigError;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HttpAuthConfig {}

impl HttpAuthConfig {
    /// Rules serde cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        Ok(())
    }
}
