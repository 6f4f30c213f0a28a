//! Bridges: Tern connecting out to another MQTT 3.1.1 or 5.0 broker (Mosquitto, another
//! Tern), forwarding local messages to it and taking its messages in.
//!
//! This module is the *link*, Tern acting as an MQTT client, kept apart from the broker side
//! (the durable outgoing queue, ACL, configuration, metrics) so that the client protocol can
//! be tested on its own and the broker side sees only a small API:
//!
//! - [`client`]: the sans-IO client core (bytes and `now` in; bytes, events and the next timer
//!   out), one per connection;
//! - [`link`]: the tokio task that drives a core over TCP or TLS, reconnects with backoff, and
//!   talks to its owner through a bounded outbox and an event channel.
//!
//! It uses Tern's own codec (`crate::protocol`, the client-role half in `protocol/client.rs`),
//! never a client library.

pub mod client;
pub mod link;
