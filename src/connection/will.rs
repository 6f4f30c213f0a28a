//! After the connection closed: the Will Message and the session's return to the registry,
//! decided together in [`Client::finish`].
//!
//! Why together: what happens to the will depends on what happens to the session. A will
//! without a delay is published at once; one with a delay waits with the kept session and is
//! published when the delay passes or the session ends, whichever comes first, and is
//! cancelled by a reconnect within the delay. Whether the will is
//! published at all was decided by the close (`Close::publishes_will`).

use super::client::{stores_session, Client};
use crate::session::registry::Detached;
use crate::storage::record::{unix_now_ms, SessionRecord, WillRecord};
use crate::storage::Op;

impl Client {
    /// After the connection closed: the will, then the session goes back to the registry
    /// (kept, ended, or already taken over) and, when durable, its record is updated.
    pub(super) fn finish(mut self, publish_will: bool) {
        self.flush_ops();
        let broker = self.broker.clone();
        let mut will = self.will.take().filter(|_| publish_will);
        let delay = match &will {
            Some(w) if self.version.is_v5() => w.delay_interval.min(self.session_expiry),
            _ => 0,
        };
        if delay == 0 {
            if let Some(w) = will.take() {
                broker.publish_will(&w, self.handle.id);
            }
        }
        let mut state = self.state;
        if let Some(peers) = broker.peers() {
            peers.release(&self.client_id, self.conn_id, will.is_some());
        }
        match broker
            .registry
            .detach(&self.client_id, self.conn_id, self.session_expiry)
        {
            Detached::Ended(handle) => {
                broker.end_session(&handle, &mut state);
                if let Some(w) = will {
                    // The session ended first ([MQTT-3.1.3-9]: whichever comes first).
                    broker.publish_will(&w, self.handle.id);
                }
            }
            Detached::Kept => {
                broker.shared_member_gone(&self.handle, &mut state, false);
                let record = SessionRecord {
                    client_id: self.client_id.to_string(),
                    session_id: self.handle.id,
                    expiry_interval: self.session_expiry,
                    disconnected_at_ms: Some(unix_now_ms()),
                    will: will.as_deref().map(WillRecord::from),
                    username: self.username.as_deref().map(str::to_string),
                };
                if stores_session(&broker, &self.handle) {
                    let _ = broker.store.submit(vec![Op::PutSession(record.clone())]);
                }
                if let Some(w) = will {
                    let abort = broker.spawn_delayed_will(*w, delay, record);
                    broker
                        .registry
                        .set_pending_will(&self.client_id, self.handle.id, abort);
                }
            }
            // The new connection owns the session (and cancels a delayed will by arriving
            // within the delay). If this connection ended the session (expiry 0 at its close,
            // typically a DISCONNECT read while being taken over), the new one must not
            // continue it: it learns so from the state it is waiting for.
            Detached::TakenOver => {
                if self.session_expiry == 0 {
                    state.ended = true;
                }
            }
        }
    }
}
