//! The admin API across nodes: each node answers admin requests on one core NATS subject
//! (`PREFIX.admin`), and a node serving an API call asks every node at once and merges their
//! answers (`admin/fleet.rs` decides what is asked and how answers merge; this file only
//! carries bytes). Core NATS, not JetStream: a request is worth nothing once its caller has
//! stopped waiting, so nothing is stored, and a node that is down simply does not answer.

use super::Node;
use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::StreamExt;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;

/// How long the asker still listens once every known member has answered.
const LATE_ANSWER: Duration = Duration::from_millis(150);

/// What a node does with an admin request: the request's bytes in, the answer's bytes out.
pub type AdminHandler = Arc<dyn Fn(Bytes) -> BoxFuture<'static, Bytes> + Send + Sync>;

impl Node {
    fn admin_subject(&self) -> String {
        format!("{}.admin", self.prefix)
    }

    /// Answers admin requests with `handler` until the connection to NATS closes for good.
    /// The node's connection does not hear its own messages (no echo), so its own requests
    /// are answered by calling `handler` directly ([`Node::ask_every_node`]).
    pub fn serve_admin(self: &Arc<Self>, handler: AdminHandler) -> JoinHandle<()> {
        let _ = self.admin.set(handler.clone());
        let node = self.clone();
        tokio::spawn(async move {
            loop {
                let mut sub = match node.client.subscribe(node.admin_subject()).await {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot answer admin requests; retrying");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                };
                while let Some(m) = sub.next().await {
                    let Some(reply) = m.reply.clone() else {
                        continue;
                    };
                    let (client, handler) = (node.client.clone(), handler.clone());
                    tokio::spawn(async move {
                        let answer = handler(m.payload).await;
                        if let Err(e) = client.publish(reply, answer).await {
                            tracing::debug!(error = %e, "admin answer not sent");
                        }
                    });
                }
            }
        })
    }

    /// Sends `request` to every node and returns the answers that came within `wait`, and
    /// whether every member of the cluster answered.
    pub async fn ask_every_node(&self, request: Bytes, wait: Duration) -> (Vec<Bytes>, bool) {
        use super::Peers;
        // The others: the member list holds this node too.
        let expected = self.members().len().saturating_sub(1);
        let inbox = self.client.new_inbox();
        let mut sub = match self.client.subscribe(inbox.clone()).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "admin request not sent");
                return (Vec::new(), false);
            }
        };
        if let Err(e) = self
            .client
            .publish_with_reply(self.admin_subject(), inbox, request.clone())
            .await
        {
            tracing::warn!(error = %e, "admin request not sent");
            return (Vec::new(), false);
        }
        let mut answers = Vec::new();
        // This node's own answer, while the others work on theirs (the request is out).
        if let Some(handler) = self.admin.get() {
            answers.push(handler(request).await);
        }
        let expected = expected + answers.len();
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            // Until every member answered (or the wait is over); then a moment more, since
            // the member list comes from heartbeats and may not have a node that just joined.
            let until = if answers.len() < expected {
                deadline
            } else {
                deadline.min(tokio::time::Instant::now() + LATE_ANSWER)
            };
            match tokio::time::timeout_at(until, sub.next()).await {
                Ok(Some(m)) => answers.push(m.payload),
                Ok(None) | Err(_) => break,
            }
        }
        let _ = sub.unsubscribe().await;
        let all = answers.len() >= expected;
        (answers, all)
    }
}
