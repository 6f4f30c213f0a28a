//! The HTTP authentication backend: asks a service over HTTP (`[auth.http]`).
