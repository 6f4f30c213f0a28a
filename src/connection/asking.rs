//! Questions a connection puts to the HTTP authorisation service (`auth.http.acl_url`) before
//! it may handle a PUBLISH or a SUBSCRIBE, on a listener whose chain names `"http"`.
//!
//! The core stays sans-IO: when a packet needs answers it has not got, the core keeps the
//! decoded packet, stops reading input (the packets behind it stay in the read buffer, in
//! order), and hands its driver the questions as one future ([`Client::questions`]). The
//! driver awaits it beside everything else it waits for (a takeover, keep alive, writes), so
//! a slow service holds up this client's next packets and nothing else, and gives the
//! answers back ([`Client::handle_answers`]); the packet is then handled as any other, the
//! handlers asking [`Client::http_allows`]. The service's own cache (`auth.http.cache_ttl`)
//! answers repeated questions without a request. No answer within `auth.http.timeout` is a
//! refusal (fail closed).

use super::client::Client;
use super::close::Close;
use crate::auth::http::{Action, HttpAuth};
use crate::protocol::{validate, Packet};
use bytes::BytesMut;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

/// The answers to one held packet's questions, as one future the driver awaits.
type Answers = Pin<Box<dyn Future<Output = Vec<bool>> + Send>>;

/// A connection's dealings with the service.
pub(super) struct Asking {
    pub(super) http: Arc<HttpAuth>,
    pub(super) listener: &'static str,
    pub(super) peer: SocketAddr,
    /// The packet waiting for answers.
    held: Option<crate::protocol::Packet>,
    /// Its questions (action, mounted topic or filter).
    questions: Vec<(Action, String)>,
    /// Whether they are asked (once per held packet).
    asked: bool,
    /// The answers on their way: here rather than in the driver, so a connection that never
    /// asks carries no room for them in its task.
    pending: Option<Answers>,
    /// The answers, while the held packet is handled.
    answers: Vec<(Action, String, bool)>,
}

impl Asking {
    pub(super) fn new(http: Arc<HttpAuth>, listener: &'static str, peer: SocketAddr) -> Asking {
        Asking {
            http,
            listener,
            peer,
            held: None,
            questions: Vec::new(),
            asked: false,
            pending: None,
            answers: Vec::new(),
        }
    }
}

/// The answers a connection waits for (from the connection's extras, so the driver can wait
/// on them beside its other waits, which borrow other fields); pending forever when none are
/// on their way.
pub async fn answers(extras: &mut Option<Box<super::client::Extras>>) -> Vec<bool> {
    match extras
        .as_mut()
        .and_then(|e| e.asking.as_mut())
        .and_then(|a| a.pending.as_mut())
    {
        Some(f) => f.as_mut().await,
        None => std::future::pending().await,
    }
}

impl Client {
    fn asking(&self) -> Option<&Asking> {
        self.extras.as_ref().and_then(|e| e.asking.as_deref())
    }

    fn asking_mut(&mut self) -> Option<&mut Asking> {
        self.extras.as_mut().and_then(|e| e.asking.as_deref_mut())
    }

    /// Whether a packet waits for the service's answers (input is not handled meanwhile).
    pub fn waiting_answers(&self) -> bool {
        self.asking().is_some_and(|a| a.held.is_some())
    }

    /// Holds `packet` when it needs the service's answers; gives it back when it is to be
    /// handled now.
    pub(super) fn hold_for_answers(&mut self, packet: Packet) -> Option<Packet> {
        if self.asking().is_none() {
            return Some(packet);
        }
        let questions: Vec<(Action, String)> = match &packet {
            Packet::Publish(p) => self
                .aliases
                .peek_inbound(&p.topic, p.properties.topic_alias)
                .filter(|t| validate::is_valid_topic_name(t.as_str()))
                .map(|t| vec![(Action::Publish, self.mounted(t.as_str()).into_owned())])
                .unwrap_or_default(),
            Packet::Subscribe(s) => s
                .filters
                .iter()
                .map(|(f, _)| {
                    (
                        Action::Subscribe,
                        self.mounted_filter(f.as_str()).into_owned(),
                    )
                })
                .collect(),
            _ => Vec::new(),
        };
        if questions.is_empty() {
            return Some(packet);
        }
        let Some(a) = self.asking_mut() else {
            return Some(packet);
        };
        a.held = Some(packet);
        a.questions = questions;
        a.asked = false;
        None
    }

    /// Puts the held packet's questions (once): returns whether answers are on their way,
    /// for [`answers`] to await.
    pub fn ask(&mut self) -> bool {
        // Called on every turn of the driver: nothing is made unless a packet is held and its
        // questions are not asked yet.
        match self.asking() {
            None => return false,
            Some(a) if a.held.is_none() => return false,
            Some(a) if a.asked => return a.pending.is_some(),
            Some(_) => {}
        }
        let client_id = self.client_id.to_string();
        let username = self.username.as_deref().map(str::to_string);
        let Some(a) = self.asking_mut() else {
            return false;
        };
        a.asked = true;
        let http = a.http.clone();
        let (listener, peer) = (a.listener, a.peer);
        let questions = a.questions.clone();
        // All of a SUBSCRIBE's filters at once: n filters take one `auth.http.timeout` at
        // most, not n.
        a.pending = Some(Box::pin(async move {
            let asks = questions.iter().map(|(action, topic)| {
                http.authorize(
                    &client_id,
                    username.as_deref(),
                    listener,
                    peer,
                    *action,
                    topic,
                )
            });
            futures_util::future::join_all(asks).await
        }));
        true
    }

    /// The service answered at `now`: the held packet is handled with the answers, then the
    /// input behind it.
    pub fn handle_answers(
        &mut self,
        now: Instant,
        answers: Vec<bool>,
        rbuf: &mut BytesMut,
        wbuf: &mut BytesMut,
    ) -> Result<(), Close> {
        self.now = now;
        let Some(a) = self.asking_mut() else {
            return Ok(());
        };
        a.pending = None;
        let Some(packet) = a.held.take() else {
            return Ok(());
        };
        let questions = std::mem::take(&mut a.questions);
        // A missing answer is a refusal.
        a.answers = questions
            .into_iter()
            .enumerate()
            .map(|(i, (action, topic))| (action, topic, answers.get(i).copied().unwrap_or(false)))
            .collect();
        let handled = self.handle_packet(packet, wbuf);
        if let Some(a) = self.asking_mut() {
            a.answers.clear();
        }
        handled?;
        self.process_input(rbuf, wbuf)
    }

    /// Whether the service allows `action` on `topic` (mounted) for the packet being
    /// handled; always, on a connection the service does not authorise.
    pub(super) fn http_allows(&self, action: Action, topic: &str) -> bool {
        match self.asking() {
            None => true,
            Some(a) => a
                .answers
                .iter()
                .any(|(act, t, yes)| *yes && *act == action && t == topic),
        }
    }
}
