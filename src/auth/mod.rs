//! Authorisation: who may publish where, subscribe to what, and receive which message.
//!
//! Checked at PUBLISH, at SUBSCRIBE, and on every delivery path (live, retained, offline replay,
//! wills) through [`Authorizer::can_receive`]. Today the rules are the protocol's own: `$`
//! topics belong to the broker, and a Response Information prefix belongs to its client.

pub mod acl;
pub mod password;

pub struct Authorizer {
    /// `mqtt.response_prefix`; empty when Response Information is off.
    response_prefix: String,
}

impl Authorizer {
    pub fn new(response_prefix: &str) -> Authorizer {
        Authorizer {
            response_prefix: response_prefix.trim_end_matches('/').to_string(),
        }
    }

    /// The Response Information handed to `client_id`, if enabled.
    pub fn response_information(&self, client_id: &str) -> Option<String> {
        (!self.response_prefix.is_empty())
            .then(|| format!("{}/{}", self.response_prefix, client_id))
    }

    /// The owner of `topic` when it lies under the response prefix.
    fn response_owner<'a>(&self, topic: &'a str) -> Option<&'a str> {
        if self.response_prefix.is_empty() {
            return None;
        }
        let rest = topic
            .strip_prefix(self.response_prefix.as_str())?
            .strip_prefix('/')?;
        Some(rest.split('/').next().unwrap_or(rest))
    }

    /// Clients may not publish to topics the broker owns (`$SYS/...` and every `$` topic).
    pub fn can_publish(&self, _client_id: &str, topic: &str) -> bool {
        !topic.starts_with('$')
    }

    /// A filter under another client's response prefix is refused; so is a wildcard in the
    /// level that names the owner.
    pub fn can_subscribe(&self, client_id: &str, filter: &str) -> bool {
        match self.response_owner(filter) {
            Some(owner) => owner == client_id,
            None => true,
        }
    }

    /// Delivery check: response topics reach only their owner, even through `#`.
    pub fn can_receive(&self, client_id: &str, topic: &str) -> bool {
        self.receive_rule(topic).allows(client_id)
    }

    /// The delivery check for one topic, worked out once per message rather than once per
    /// subscriber (fan-out to many sessions asks it many times).
    pub fn receive_rule<'a>(&self, topic: &'a str) -> ReceiveRule<'a> {
        ReceiveRule {
            owner: self.response_owner(topic),
        }
    }
}

/// Who may receive a message on a given topic.
pub struct ReceiveRule<'a> {
    owner: Option<&'a str>,
}

impl ReceiveRule<'_> {
    pub fn allows(&self, client_id: &str) -> bool {
        self.owner.is_none_or(|o| o == client_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn response_prefix_belongs_to_its_client() {
        let a = Authorizer::new("reply");
        assert_eq!(a.response_information("c1").as_deref(), Some("reply/c1"));
        assert!(a.can_subscribe("c1", "reply/c1/#"));
        assert!(a.can_subscribe("c1", "reply/c1"));
        assert!(!a.can_subscribe("c2", "reply/c1/#"));
        assert!(!a.can_subscribe("c2", "reply/+/x"));
        assert!(a.can_subscribe("c2", "replyx/c1"));
        assert!(a.can_receive("c1", "reply/c1/x"));
        assert!(!a.can_receive("c2", "reply/c1/x"));
        assert!(a.can_receive("c2", "other"));
    }

    #[test]
    fn dollar_topics_are_the_brokers() {
        let a = Authorizer::new("");
        assert!(!a.can_publish("c", "$SYS/x"));
        assert!(a.can_publish("c", "a/$b"));
        assert_eq!(a.response_information("c"), None);
        assert!(a.can_receive("c", "reply/x/y"));
    }
}
