//! The authentication chain: each listener names an ordered list of backends
//! (`[listeners.NAME.auth] chain = ["jwt", "password_file"]`); CONNECT's credentials go
//! through them in order and the first backend that decides (allow or deny) wins. A backend
//! passes when the credentials are not its kind (the JWT backend when the password is not a
//! token, the password file when it does not know the user); the HTTP backend always decides,
//! so it belongs last. When every backend passes the client is refused, unless it is
//! anonymous where anonymous clients are allowed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

/// What CONNECT presented, and where from: everything a backend may base its decision on.
#[derive(Debug, Clone, Copy)]
pub struct Credentials<'a> {
    pub client_id: &'a str,
    pub username: Option<&'a str>,
    pub password: Option<&'a [u8]>,
    /// The listener's name (`[listeners.NAME]`).
    pub listener: &'a str,
    /// The client's address (the PROXY protocol's when the listener takes it).
    pub peer: SocketAddr,
    /// 3, 4 or 5: MQTT 3.1, 3.1.1, 5.0.
    pub protocol: u8,
}

/// A backend's answer.
#[derive(Debug, Clone)]
pub enum Decision {
    /// Accepted, with what the backend established about the client.
    Allow(Grant),
    /// Refused: the credentials were the backend's kind and they were wrong.
    Deny(Denial),
    /// Not this backend's kind of credentials: ask the next.
    Pass,
}

/// Why a backend refused: the CONNACK's reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denial {
    /// The credentials are wrong (v5 0x86 Bad User Name or Password, 3.1.1 return code 4).
    BadCredentials,
    /// The client may not connect (v5 0x87 Not authorized, 3.1.1 return code 5).
    NotAuthorized,
    /// The backend could not decide: the HTTP service did not answer, or the JWKS the token
    /// needs could not be fetched (v5 0x88 Server unavailable, 3.1.1 return code 3). The
    /// credentials may well be good, and a client told 0x86 may stop trying (a device would
    /// take it as a wrong password) where 0x88 tells it to try again later.
    Unavailable,
}

/// What an accepting backend established.
#[derive(Debug, Clone, Default)]
pub struct Grant {
    /// The username the ACL and logs know the client by (a JWT's mapped claim); `None`: the
    /// one CONNECT carried.
    pub username: Option<Arc<str>>,
    /// Topic rules carried by the credentials (JWT claims); they narrow the ACL file's.
    pub rules: Option<Arc<ClaimRules>>,
    /// When the credentials stop being valid (a JWT's `exp`): the connection is closed then
    /// (v5 DISCONNECT 0xA0 Maximum connect time).
    pub expires_at: Option<SystemTime>,
}

/// Publish and subscribe filters granted by a token (`{"pub": [...], "sub": [...]}`), with
/// `%c` and `%u` already replaced by the client id and username. A topic is allowed when a
/// `pub` filter matches it; a SUBSCRIBE filter when a `sub` filter covers all of it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClaimRules {
    pub publish: Vec<String>,
    pub subscribe: Vec<String>,
}

impl ClaimRules {
    /// PUBLISH (and a will): some `pub` filter matches the topic name, by the broker's own
    /// matcher (so `#` does not reach `$` topics).
    pub fn can_publish(&self, topic: &str) -> bool {
        crate::protocol::validate::is_valid_topic_name(topic)
            && self
                .publish
                .iter()
                .any(|f| crate::protocol::validate::topic_matches(f, topic))
    }

    /// SUBSCRIBE: some `sub` filter covers the whole requested filter, as an ACL file's read
    /// rule must (`orders/#` allows `orders/+/new`, not `#`); a shared subscription
    /// (`$share/NAME/FILTER`) is judged by its FILTER.
    pub fn can_subscribe(&self, filter: &str) -> bool {
        let filter = crate::protocol::validate::shared_subscription(filter).map_or(filter, |s| s.1);
        self.subscribe
            .iter()
            .any(|rule| super::acl::covers(rule, filter))
    }

    /// Delivery of a message on `topic`: some `sub` filter matches it (a subscription the
    /// rules allowed is covered already; this holds the rules on every delivery path, as the
    /// ACL file's are).
    pub fn can_receive(&self, topic: &str) -> bool {
        self.subscribe
            .iter()
            .any(|f| crate::protocol::validate::topic_matches(f, topic))
    }
}

#[cfg(test)]
mod claim_rules_tests {
    use super::ClaimRules;

    fn rules(publish: &[&str], subscribe: &[&str]) -> ClaimRules {
        ClaimRules {
            publish: publish.iter().map(|s| s.to_string()).collect(),
            subscribe: subscribe.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn publish_needs_a_matching_pub_filter() {
        let r = rules(&["orders/#", "dev/+/status"], &[]);
        assert!(r.can_publish("orders"));
        assert!(r.can_publish("orders/eu/1"));
        assert!(r.can_publish("dev/d1/status"));
        assert!(!r.can_publish("dev/d1/d2/status"));
        assert!(!r.can_publish("other"));
        assert!(!r.can_publish("orders/+"));
        assert!(!rules(&["#"], &[]).can_publish("$SYS/x"));
        assert!(!ClaimRules::default().can_publish("a"));
    }

    #[test]
    fn subscribe_needs_a_sub_filter_covering_all_of_it() {
        let r = rules(&[], &["reply/c1/#", "news/+"]);
        assert!(r.can_subscribe("reply/c1/#"));
        assert!(r.can_subscribe("reply/c1/+/x"));
        assert!(r.can_subscribe("reply/c1"));
        assert!(r.can_subscribe("news/a"));
        assert!(r.can_subscribe("news/+"));
        assert!(!r.can_subscribe("news/#"));
        assert!(!r.can_subscribe("reply/#"));
        assert!(!r.can_subscribe("reply/+/x"));
        assert!(!r.can_subscribe("#"));
        assert!(r.can_subscribe("$share/g/news/a"));
        assert!(!r.can_subscribe("$share/g/#"));
        assert!(!rules(&[], &["#"]).can_subscribe("$SYS/#"));
        assert!(!r.can_subscribe("news/a#"));
    }

    #[test]
    fn receive_needs_a_matching_sub_filter() {
        let r = rules(&["x/#"], &["news/+"]);
        assert!(r.can_receive("news/a"));
        assert!(!r.can_receive("news/a/b"));
        assert!(!r.can_receive("x/y"));
    }
}
