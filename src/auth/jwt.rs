//! The JWT authentication backend: tokens in the password (or username) field (`[auth.jwt]`).
