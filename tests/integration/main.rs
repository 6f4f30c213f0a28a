//! Tern integration tests: each test starts its own in-process broker on port 0 and drives it
//! with rumqttc 3.1.1 and 5.0 clients.

#[macro_use]
mod common;
mod bridge_link;
mod operations;
mod pubsub;
mod raw;
mod retained;
mod sessions;
mod shared;
mod tls;
mod v5;
mod websocket;
