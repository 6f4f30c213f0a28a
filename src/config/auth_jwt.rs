//! `[auth.jwt]`: the JWT authentication backend's settings (src/auth/jwt.rs).

use super::ConfigError;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct JwtConfig {}

impl JwtConfig {
    /// Rules serde cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        Ok(())
    }
}
