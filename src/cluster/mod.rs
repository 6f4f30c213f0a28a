//! Tern nodes as one broker over NATS (issue 16, in progress).
//!
//! What is here so far is the mapping of MQTT topics and filters to NATS subjects
//! (`subject.rs`). It is the piece that lets NATS do cross-node matching: each node
//! subscribes with the subjects of its local filters, and a message crosses on its topic's
//! subject. Nothing in the broker uses it yet; `[cluster]` is not a configuration section
//! yet either.

pub mod subject;
