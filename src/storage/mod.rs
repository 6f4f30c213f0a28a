//! Where acknowledged state is made durable, behind one trait.
//!
//! Every PUBACK, PUBREC and SUBACK the broker sends is released by the completion of the
//! commit that covers it, in the order the packets arrived — never inline. With the in-memory
//! store a commit completes at once (the state it covers already lives in the broker's
//! structures); a durable store only changes when commits complete, not the connection code.

pub mod durable;
mod memory;
pub mod record;

pub use memory::MemoryStore;

use crate::message::Message;
use crate::protocol::SubscriptionOptions;
use std::sync::Arc;
use tokio::sync::oneshot;

/// One change to durable state.
#[derive(Debug)]
pub enum StoreOp<'a> {
    /// An inbound QoS 1/2 message that was routed (and, for QoS 2, its packet id).
    Message {
        session: u64,
        msg: &'a Arc<Message>,
        qos2_packet_id: Option<u16>,
    },
    /// An inbound QoS 2 exchange finished (PUBREL received).
    Qos2Released { session: u64, packet_id: u16 },
    /// A subscription was added or replaced.
    Subscribe {
        session: u64,
        filter: &'a str,
        options: SubscriptionOptions,
        id: Option<u32>,
    },
}

/// Completion of a commit.
#[derive(Debug)]
pub enum Commit {
    /// Already as durable as promised.
    Done,
    /// Resolves when the commit is done; an error means the store failed and the connection
    /// must not acknowledge.
    Pending(oneshot::Receiver<()>),
}

pub trait Store: Send + Sync + 'static {
    /// Submits a change; the acknowledgement that depends on it waits for the returned commit.
    fn commit(&self, op: StoreOp<'_>) -> Commit;
    /// Human-readable name for logs.
    fn name(&self) -> &'static str;
}

/// Builds the store the configuration asks for.
pub fn open(config: &crate::config::StorageConfig) -> Arc<dyn Store> {
    match config.durability {
        crate::config::Durability::Memory => Arc::new(MemoryStore),
    }
}
