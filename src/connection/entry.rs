//! What a listener hands each of its connections: the listener's name, its per-client limits,
//! its topic mount point and its authentication rules. One `Arc` per listener, replaced when
//! a reload changes them; a connection keeps the one it was accepted with (its CONNACK
//! announced those limits).

use crate::config::{AclMode, Backend, Config, Limits, ListenerConfig};
use std::sync::Arc;

#[derive(Debug)]
pub struct Entry {
    /// `[listeners.NAME]`: in log lines, metrics and the admin API.
    pub name: &'static str,
    pub limits: Arc<Limits>,
    /// Topic prefix for this listener's clients (`mount_point`), `None` when empty.
    pub mount: Option<Arc<str>>,
    /// The authentication backends, in order.
    pub chain: Box<[Backend]>,
    pub allow_anonymous: bool,
    pub acl_mode: AclMode,
}

impl Entry {
    /// The entry of listener `name` under `config` (its limits on top of `[limits]`).
    pub fn of(name: &'static str, l: &ListenerConfig, config: &Config) -> Entry {
        Entry {
            name,
            limits: Arc::new(l.limits(&config.limits)),
            mount: (!l.mount_point.is_empty()).then(|| Arc::from(l.mount_point.as_str())),
            chain: l.chain(&config.auth).into_boxed_slice(),
            allow_anonymous: l.allow_anonymous(&config.auth),
            acl_mode: l.acl_mode(),
        }
    }

    /// A plain TCP listener's entry with `config`'s `[limits]` and `[auth]` (tests and the
    /// simulation, which have no listener).
    pub fn plain(config: &Config, limits: Arc<Limits>) -> Entry {
        let l = ListenerConfig::new(
            crate::config::listeners::Kind::Tcp,
            ([127, 0, 0, 1], 0).into(),
        );
        let mut e = Entry::of("tcp", &l, config);
        e.limits = limits;
        e
    }
}
