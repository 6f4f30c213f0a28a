//! The mapping, directive by directive: what each becomes in the TOML, and what is reported
//! (with its line) when it cannot become anything.

use super::parse::{parse_text, Report};
use super::*;

/// A directory of its own under the system's temporary directory, removed when dropped.
pub(crate) struct TempDir(pub PathBuf);
impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "tern-migrate-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn opts() -> Options {
    Options {
        source: "mosquitto.conf".into(),
        secret_dir: Some(PathBuf::from("/etc/tern")),
        hostname: Some("edge1".into()),
    }
}

fn migrate_text(conf: &str) -> Migration {
    migrate(&parse_text(conf, "mosquitto.conf", 0), &opts())
}

fn table(m: &Migration) -> toml::Table {
    toml::from_str(&m.toml).unwrap_or_else(|e| panic!("not TOML: {e}\n{}", m.toml))
}

/// The value at a dotted path (`listeners.tcp.bind`), or None.
fn get<'a>(t: &'a toml::Table, path: &str) -> Option<&'a toml::Value> {
    let mut parts = path.split('.');
    let mut v = t.get(parts.next()?)?;
    for p in parts {
        v = v.get(p)?;
    }
    Some(v)
}

fn s<'a>(t: &'a toml::Table, path: &str) -> &'a str {
    get(t, path)
        .and_then(toml::Value::as_str)
        .unwrap_or_else(|| panic!("{path}: no string in {t:#?}"))
}

fn i(t: &toml::Table, path: &str) -> i64 {
    get(t, path)
        .and_then(toml::Value::as_integer)
        .unwrap_or_else(|| panic!("{path}: no integer in {t:#?}"))
}

fn b(t: &toml::Table, path: &str) -> bool {
    get(t, path)
        .and_then(toml::Value::as_bool)
        .unwrap_or_else(|| panic!("{path}: no boolean in {t:#?}"))
}

/// The not-mapped reports at `line`, as printed (one line each); at least one.
fn reported(m: &Migration, line: usize) -> String {
    let found: Vec<String> = m
        .not_mapped
        .iter()
        .filter(|r| r.at.line == line)
        .map(ToString::to_string)
        .collect();
    assert!(
        !found.is_empty(),
        "line {line}: nothing\nall: {:#?}",
        m.not_mapped
    );
    found.join("\n")
}

fn not_reported(m: &Migration, line: usize) {
    assert!(
        m.not_mapped.iter().all(|r| r.at.line != line),
        "line {line} reported: {:#?}",
        m.not_mapped
    );
}

#[test]
fn listeners_get_named_by_kind_then_port() {
    let m = migrate_text(
        "listener 1883 127.0.0.1\n\
         listener 1884 127.0.0.1\n\
         listener 8883\n\
         certfile /c/server.pem\n\
         keyfile /c/server.key\n\
         listener 9001 ::1\n\
         protocol websockets\n\
         listener 9002\n\
         socket_domain ipv4\n\
         protocol websockets\n\
         certfile /c/server.pem\n\
         keyfile /c/server.key\n\
         listener 8884 localhost\n\
         certfile /c/b.pem\n\
         keyfile /c/b.key\n",
    );
    let t = table(&m);
    assert_eq!(s(&t, "listeners.tcp.bind"), "127.0.0.1:1883");
    assert_eq!(s(&t, "listeners.tcp.kind"), "tcp");
    assert_eq!(s(&t, "listeners.tcp_1884.bind"), "127.0.0.1:1884");
    assert_eq!(s(&t, "listeners.tcp_1884.kind"), "tcp");
    assert_eq!(s(&t, "listeners.tls.bind"), "[::]:8883");
    assert_eq!(s(&t, "listeners.tls.cert"), "/c/server.pem");
    assert_eq!(s(&t, "listeners.tls.key"), "/c/server.key");
    assert_eq!(s(&t, "listeners.ws.bind"), "[::1]:9001");
    assert_eq!(s(&t, "listeners.ws.path"), "/mqtt");
    assert_eq!(s(&t, "listeners.wss.bind"), "0.0.0.0:9002");
    assert_eq!(s(&t, "listeners.wss.kind"), "wss");
    assert_eq!(s(&t, "listeners.tls_8884.bind"), "127.0.0.1:8884");
    assert_eq!(s(&t, "listeners.tls_8884.kind"), "tls");
    // Mosquitto's behaviour at SUBSCRIBE on every listener.
    for name in ["tcp", "tcp_1884", "tls", "ws", "wss", "tls_8884"] {
        assert_eq!(
            s(&t, &format!("listeners.{name}.auth.acl_mode")),
            "per_message"
        );
    }
    assert!(m.not_mapped.is_empty(), "{:#?}", m.not_mapped);
    assert!(m.toml.contains("# mosquitto.conf:1\n"), "{}", m.toml);
}

#[test]
fn the_default_listener_and_local_only_mode() {
    // `port` and options before any `listener` line start Mosquitto's default listener, after
    // the explicit ones.
    let m = migrate_text("mount_point site1/\nbind_address 10.0.0.5\nlistener 1884\n");
    let t = table(&m);
    assert_eq!(s(&t, "listeners.tcp.bind"), "[::]:1884");
    assert_eq!(s(&t, "listeners.tcp_1883.bind"), "10.0.0.5:1883");
    assert_eq!(s(&t, "listeners.tcp_1883.mount_point"), "site1/");
    let m = migrate_text("port 1885\n");
    assert_eq!(s(&table(&m), "listeners.tcp.bind"), "[::]:1885");
    // No listener at all: loopback only, anonymous clients allowed whatever the file says.
    let m = migrate_text("allow_anonymous false\nsys_interval 5\n");
    let t = table(&m);
    assert_eq!(s(&t, "listeners.tcp.bind"), "127.0.0.1:1883");
    assert!(b(&t, "auth.allow_anonymous"));
    assert!(
        reported(&m, 1).contains("local only mode"),
        "{}",
        reported(&m, 1)
    );
}

#[test]
fn tls_options() {
    let m = migrate_text(
        "listener 8883 127.0.0.1\n\
         certfile /c/s.pem\n\
         keyfile /c/s.key\n\
         cafile /c/ca.pem\n\
         require_certificate true\n\
         use_identity_as_username true\n\
         crlfile /c/crl.pem\n\
         tls_version tlsv1.2\n\
         ciphers ECDHE-RSA-AES256-GCM-SHA384\n\
         capath /c/cas\n\
         use_subject_as_username true\n\
         dhparamfile /c/dh.pem\n\
         listener 8884 127.0.0.1\n\
         certfile /c/s.pem\n\
         keyfile /c/s.key\n\
         cafile /c/ca.pem\n\
         tls_version tlsv1.3\n\
         listener 8885 127.0.0.1\n\
         certfile /c/s.pem\n\
         listener 1883 127.0.0.1\n\
         require_certificate true\n",
    );
    let t = table(&m);
    assert_eq!(s(&t, "listeners.tls.client_ca"), "/c/ca.pem");
    assert!(b(&t, "listeners.tls.require_client_cert"));
    assert!(b(&t, "listeners.tls.use_identity_as_username"));
    assert_eq!(s(&t, "listeners.tls.crl_file"), "/c/crl.pem");
    not_reported(&m, 8);
    assert!(m.equivalent.iter().any(|r| r.at.line == 8));
    assert!(reported(&m, 9).contains("ciphers: Tern's TLS (rustls)"));
    assert!(reported(&m, 10).contains("capath: Tern reads CA certificates from one PEM file"));
    assert!(reported(&m, 11).contains("Common Name"));
    assert!(reported(&m, 12).contains("ECDHE"));
    // A CA without require_certificate: Mosquitto asks for no certificate, so neither does
    // the migrated listener.
    assert!(get(&t, "listeners.tls_8884.client_ca").is_none());
    assert!(reported(&m, 16).contains("cafile: without require_certificate"));
    assert!(reported(&m, 17).contains("TLS 1.2"));
    // A certificate without its key: the listener is left out, never served in clear.
    assert!(get(&t, "listeners.tls_8885").is_none());
    assert!(reported(&m, 19).contains("certfile: certfile and keyfile go together"));
    // TLS options on a plain listener do nothing on Mosquitto either.
    assert!(get(&t, "listeners.tcp.require_client_cert").is_none());
    assert!(reported(&m, 21).contains("no TLS"));
}

#[test]
fn listeners_that_cannot_be_served() {
    let m = migrate_text(
        "listener 0 /run/mosquitto.sock\n\
         max_connections 10\n\
         listener 1883 127.0.0.1\n\
         http_dir /var/www\n\
         bind_interface eth0\n\
         use_username_as_clientid true\n\
         max_connections -1\n\
         listener 1884 127.0.0.1\n\
         max_connections 0\n",
    );
    let t = table(&m);
    assert!(reported(&m, 1).contains("unix sockets"));
    not_reported(&m, 2);
    assert_eq!(t["listeners"].as_table().unwrap().len(), 2, "{t:#?}");
    for line in [4, 5, 6, 7, 9] {
        reported(&m, line);
    }
    assert!(get(&t, "listeners.tcp.limits").is_none());
}

#[test]
fn per_listener_limits_and_broker_wide_keys() {
    let m = migrate_text(
        "listener 1883 127.0.0.1\n\
         max_connections 8000\n\
         max_qos 1\n\
         max_topic_alias 20\n\
         listener 1884 127.0.0.1\n\
         max_connections 4000\n\
         max_qos 1\n",
    );
    let t = table(&m);
    assert_eq!(i(&t, "listeners.tcp.limits.max_connections"), 8000);
    assert_eq!(i(&t, "listeners.tcp_1884.limits.max_connections"), 4000);
    // Tern's limit bounds all listeners together: raised to their sum.
    assert_eq!(i(&t, "limits.max_connections"), 12000);
    assert_eq!(i(&t, "mqtt.max_qos"), 1);
    // One listener at 20, the other at Mosquitto's default 10: no broker-wide value fits.
    assert!(get(&t, "mqtt.topic_alias_maximum").is_none());
    assert!(reported(&m, 4).contains("listeners differ (tcp 20, tcp_1884 10)"));
}

#[test]
fn authentication_broker_wide() {
    let m = migrate_text(
        "listener 1883 127.0.0.1\n\
         allow_anonymous true\n\
         password_file /etc/mosquitto/passwd\n\
         acl_file /etc/mosquitto/acl file\n\
         allow_zero_length_clientid true\n\
         auto_id_prefix dev-\n\
         auth_plugin /usr/lib/dynsec.so\n\
         auth_opt_db x\n",
    );
    let t = table(&m);
    assert!(b(&t, "auth.allow_anonymous"));
    assert_eq!(s(&t, "auth.password_file"), "/etc/mosquitto/passwd");
    assert_eq!(s(&t, "auth.acl_file"), "/etc/mosquitto/acl file");
    assert!(get(&t, "listeners.tcp.auth.chain").is_none());
    assert!(m.equivalent.iter().any(|r| r.at.line == 5));
    for line in [6, 7, 8] {
        reported(&m, line);
    }
    // Without allow_anonymous: Mosquitto 2's default, written out.
    let t = table(&migrate_text("listener 1883\n"));
    assert!(!b(&t, "auth.allow_anonymous"));
}

#[test]
fn authentication_per_listener() {
    let m = migrate_text(
        "listener 1883 127.0.0.1\n\
         allow_anonymous true\n\
         listener 8883 127.0.0.1\n\
         certfile /c/s.pem\n\
         keyfile /c/s.key\n\
         password_file /p/passwd\n\
         acl_file /p/acl\n\
         listener 1884 127.0.0.1\n\
         password_file /p/other\n\
         acl_file /p/acl\n\
         per_listener_settings true\n",
    );
    let t = table(&m);
    assert!(b(&t, "listeners.tcp.auth.allow_anonymous"));
    assert_eq!(
        get(&t, "listeners.tcp.auth.chain")
            .and_then(|v| v.as_array())
            .map(Vec::len),
        Some(0)
    );
    assert!(!b(&t, "listeners.tls.auth.allow_anonymous"));
    assert_eq!(s(&t, "auth.password_file"), "/p/passwd");
    assert_eq!(s(&t, "auth.acl_file"), "/p/acl");
    assert_eq!(
        get(&t, "listeners.tls.auth.chain")
            .unwrap()
            .as_array()
            .unwrap()[0]
            .as_str(),
        Some("password_file")
    );
    assert!(reported(&m, 9).contains("one password file"));
    // The tcp listener had no ACL on Mosquitto.
    assert!(reported(&m, 1).contains("listener tcp has no ACL"));
    assert!(m
        .toml
        .contains("per_listener_settings true (mosquitto.conf:11)"));
}

#[test]
fn persistence() {
    let t = table(&migrate_text("listener 1883\n"));
    assert_eq!(s(&t, "storage.durability"), "memory", "Mosquitto's default");
    let m = migrate_text(
        "persistence true\npersistence_location /var/lib/mosquitto/\npersistence_file m.db\nautosave_interval 60\nautosave_on_changes false\n",
    );
    let t = table(&m);
    assert_eq!(s(&t, "storage.durability"), "os");
    assert_eq!(s(&t, "storage.dir"), "/var/lib/mosquitto/tern");
    for line in [3, 4, 5] {
        reported(&m, line);
    }
    let m = migrate_text("persistence false\npersistence_location /x\n");
    assert_eq!(s(&table(&m), "storage.durability"), "memory");
    assert!(reported(&m, 2).contains("persistence is off"));
}

#[test]
fn limits() {
    let m = migrate_text(
        "max_inflight_messages 40\n\
         max_queued_messages 5000\n\
         max_queued_bytes 1048576\n\
         message_size_limit 262144\n\
         max_keepalive 120\n\
         persistent_client_expiration 2m\n\
         retain_available false\n\
         sys_interval 30\n\
         max_inflight_bytes 1000\n\
         memory_limit 1000000\n",
    );
    let t = table(&m);
    assert_eq!(i(&t, "limits.max_inflight"), 40);
    assert_eq!(i(&t, "limits.max_queued_messages"), 5000);
    assert_eq!(i(&t, "limits.max_queued_messages_persistent"), 5000);
    assert_eq!(i(&t, "limits.max_queued_bytes"), 1_048_576);
    assert_eq!(i(&t, "limits.max_queued_bytes_persistent"), 1_048_576);
    // A payload limit becomes a packet limit with headroom, and says so.
    assert_eq!(i(&t, "limits.max_packet_size"), 262_144 + 65_536);
    assert!(reported(&m, 4).contains("headroom"), "{}", reported(&m, 4));
    assert_eq!(i(&t, "limits.max_keepalive"), 120);
    // Mosquitto's "m" is a month of 30 days.
    assert_eq!(s(&t, "limits.max_session_expiry"), "60d");
    assert!(!b(&t, "mqtt.retain_available"));
    assert_eq!(i(&t, "sys_topics.interval"), 30);
    reported(&m, 9);
    reported(&m, 10);
    for line in 1..=8 {
        if line != 4 {
            not_reported(&m, line);
        }
    }

    // Both packet limits: the lower wins; zeros mean no limit on Mosquitto.
    let m = migrate_text(
        "message_size_limit 1000\nmax_packet_size 2000\nmax_inflight_messages 0\nmax_queued_messages 0\npersistent_client_expiration 36h\nsys_interval 100000\n",
    );
    let t = table(&m);
    assert_eq!(i(&t, "limits.max_packet_size"), 2000);
    assert_eq!(i(&t, "limits.max_inflight"), 65535);
    assert!(get(&t, "limits.max_queued_messages").is_none());
    assert!(reported(&m, 4).contains("always bounds queues"));
    assert_eq!(s(&t, "limits.max_session_expiry"), "36h");
    assert_eq!(i(&t, "sys_topics.interval"), 86400);
    reported(&m, 6);
    let m = migrate_text("max_packet_size 10\npersistent_client_expiration 5x\n");
    assert_eq!(i(&table(&m), "limits.max_packet_size"), 64);
    reported(&m, 1);
    reported(&m, 2);
}

#[test]
fn logs_and_behaviour_switches() {
    let m = migrate_text(
        "log_type error\n\
         log_type warning information\n\
         log_type subscribe\n\
         log_dest file /var/log/m.log\n\
         log_dest stderr\n\
         log_timestamp_format %Y\n\
         connection_messages false\n\
         set_tcp_nodelay true\n\
         upgrade_outgoing_qos true\n\
         queue_qos0_messages false\n\
         pid_file /run/m.pid\n\
         user mosquitto\n",
    );
    let t = table(&m);
    assert_eq!(s(&t, "log.level"), "info");
    assert!(reported(&m, 3).contains("tern ctl trace"));
    assert!(reported(&m, 4).contains("2>>/var/log/m.log"));
    for line in [6, 7, 9, 11, 12] {
        reported(&m, line);
    }
    for line in [5, 8, 10] {
        not_reported(&m, line);
        assert!(
            m.equivalent.iter().any(|r| r.at.line == line),
            "line {line}"
        );
    }
    let t = table(&migrate_text("log_type all\n"));
    assert_eq!(s(&t, "log.level"), "debug");
    let t = table(&migrate_text("log_type debug\nlog_dest none\n"));
    assert_eq!(s(&t, "log.level"), "off");
}

#[test]
fn bridges() {
    let m = migrate_text(
        "listener 1883\n\
         acl_file /etc/mosquitto/acl\n\
         connection cloud\n\
         address cloud.example.com:8883\n\
         topic sensors/# out 1 \"\" site17/\n\
         topic cmd/# in 2 \"\" site17/\n\
         topic status both\n\
         topic # in 0 local/ remote/\n\
         topic \"\" out 1 a/b c/d\n\
         topic x in 0 \"\" $SYS/broker/\n\
         remote_username edge 17\n\
         remote_password pass word\n\
         bridge_cafile /c/cloud-ca.pem\n\
         bridge_certfile /c/edge.pem\n\
         bridge_keyfile /c/edge.key\n\
         keepalive_interval 60\n\
         notifications false\n\
         bridge_insecure true\n\
         restart_timeout 5 30\n",
    );
    let t = table(&m);
    let br = &t["bridges"].as_array().unwrap()[0];
    let g = |k: &str| {
        br.get(k)
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_string()
    };
    assert_eq!(g("name"), "cloud");
    assert_eq!(g("address"), "cloud.example.com:8883");
    assert_eq!(g("protocol"), "3.1.1", "Mosquitto's default");
    assert_eq!(
        g("client_id"),
        "cloud.edge1",
        "Mosquitto's default NAME.HOSTNAME"
    );
    assert_eq!(g("username"), "edge 17");
    assert_eq!(g("secret_file"), "/etc/tern/bridge-cloud.secret");
    assert_eq!(
        m.secrets,
        vec![Secret {
            path: PathBuf::from("/etc/tern/bridge-cloud.secret"),
            password: "pass word".into()
        }]
    );
    assert_eq!(br["tls"]["ca"].as_str(), Some("/c/cloud-ca.pem"));
    assert_eq!(br["tls"]["cert"].as_str(), Some("/c/edge.pem"));
    assert_eq!(br["tls"]["key"].as_str(), Some("/c/edge.key"));
    assert_eq!(br["keep_alive"].as_integer(), Some(60));
    let rules = |k: &str| -> Vec<(String, i64, String, String)> {
        br[k]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["filter"].as_str().unwrap().to_string(),
                    r["qos"].as_integer().unwrap(),
                    r["local_prefix"].as_str().unwrap().to_string(),
                    r["remote_prefix"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    };
    let r = |f: &str, q, l: &str, rp: &str| (f.to_string(), q, l.to_string(), rp.to_string());
    assert_eq!(
        rules("out"),
        vec![
            r("sensors/#", 1, "", "site17/"),
            r("status", 0, "", ""),
            r("a/b", 1, "a/b", "c/d"),
        ]
    );
    assert_eq!(
        rules("in"),
        vec![
            r("site17/cmd/#", 2, "", "site17/"),
            r("status", 0, "", ""),
            r("remote/#", 0, "local/", "remote/"),
        ]
    );
    assert!(reported(&m, 10).contains("$ topics"));
    // The ACL checks what comes in, as user bridge:NAME.
    let acl = reported(&m, 3);
    assert!(
        acl.contains(
            "`user bridge:cloud`, `topic write cmd/#`, `topic write status`, `topic write local/#`"
        ),
        "{acl}"
    );
    reported(&m, 18);
    reported(&m, 19);
    assert!(m.equivalent.iter().any(|r| r.at.line == 17));
    assert!(!m.toml.contains("published its state"), "{}", m.toml);
}

#[test]
fn bridge_defaults_and_what_leaves_one_out() {
    let mut o = opts();
    o.secret_dir = None;
    o.hostname = None;
    let m = migrate(
        &parse_text(
            "topic a out\n\
             connection b1\n\
             address [::1]\n\
             topic a/#\n\
             remote_password pw\n\
             bridge_protocol_version mqttv50\n\
             connection b2\n\
             topic a/#\n\
             connection b3\n\
             address h:1883\n\
             bridge_capath /etc/cas\n\
             topic a/#\n\
             connection b 4\n\
             connection with:colon\n\
             address 10.0.0.1 10.0.0.2:1884\n\
             topic a/#\n",
            "mosquitto.conf",
            0,
        ),
        &o,
    );
    let t = table(&m);
    assert!(reported(&m, 1).contains("outside a `connection` section"));
    let bridges = t["bridges"].as_array().unwrap();
    assert_eq!(bridges.len(), 2, "{bridges:#?}");
    let b1 = &bridges[0];
    assert_eq!(b1["address"].as_str(), Some("[::1]:1883"));
    assert_eq!(b1["protocol"].as_str(), Some("5"));
    assert!(b1.get("client_id").is_none());
    assert_eq!(
        b1["out"][0]["qos"].as_integer(),
        Some(0),
        "Mosquitto's default QoS"
    );
    assert_eq!(b1["secret_file"].as_str(), Some("bridge-b1.secret"));
    assert!(m.secrets.is_empty());
    assert!(reported(&m, 5).contains("standard output"));
    assert!(reported(&m, 2).contains("NAME.HOSTNAME"));
    assert!(reported(&m, 7).contains("no address"));
    // TLS asked for but not expressible: left out, not connected in clear.
    assert!(reported(&m, 11).contains("left out"));
    assert!(reported(&m, 13).contains("expects one name"));
    let b5 = &bridges[1];
    assert_eq!(b5["name"].as_str(), Some("with_colon"));
    assert_eq!(b5["address"].as_str(), Some("10.0.0.1:1883"));
    assert!(reported(&m, 14).contains("named \"with_colon\""));
    assert!(reported(&m, 15).contains("one address"));
}

#[test]
fn unknown_and_repeated_directives_are_reported_with_their_lines() {
    let m = migrate_text(
        "listener 1883\n\
         \n\
         # comment\n\
         frobnicate on\n\
         max_inflight_messages 10\n\
         max_inflight_messages 20\n\
         retain_available maybe\n\
         sys_interval often\n",
    );
    assert_eq!(
        reported(&m, 4),
        "mosquitto.conf:4: frobnicate: not a Mosquitto 2.0 directive tern migrate knows: nothing was made of it"
    );
    assert_eq!(
        reported(&m, 5),
        "mosquitto.conf:5: max_inflight_messages: overridden by mosquitto.conf:6 (the last one counts)"
    );
    assert_eq!(i(&table(&m), "limits.max_inflight"), 20);
    assert!(reported(&m, 7).contains("expects true or false"));
    assert!(reported(&m, 8).contains("expects a number"));
    // Everything also stands at the end of the TOML.
    assert!(
        m.toml.contains("#   mosquitto.conf:4: frobnicate:"),
        "{}",
        m.toml
    );
}

/// Every directive of mosquitto.conf(5) for Mosquitto 2.0 is known: mapped, or reported with
/// a reason of its own, never as unknown.
#[test]
fn every_mosquitto_directive_is_known() {
    let general = [
        "acl_file x",
        "allow_anonymous true",
        "allow_duplicate_messages true",
        "allow_zero_length_clientid true",
        "auth_opt_x y",
        "auth_plugin x",
        "auth_plugin_deny_special_chars true",
        "auto_id_prefix x",
        "autosave_interval 1",
        "autosave_on_changes true",
        "check_retain_source true",
        "clientid_prefixes x",
        "connection_messages true",
        "log_dest stderr",
        "log_facility 5",
        "log_timestamp true",
        "log_timestamp_format x",
        "log_type error",
        "max_inflight_bytes 1",
        "max_inflight_messages 1",
        "max_keepalive 60",
        "max_packet_size 100",
        "max_queued_bytes 1",
        "max_queued_messages 1",
        "memory_limit 1",
        "message_size_limit 1",
        "password_file x",
        "persistence true",
        "persistence_file x",
        "persistence_location x",
        "persistent_client_expiration 1d",
        "pid_file x",
        "psk_file x",
        "queue_qos0_messages true",
        "retain_available true",
        "set_tcp_nodelay true",
        "sys_interval 1",
        "upgrade_outgoing_qos true",
        "user x",
        "bind_address 127.0.0.1",
        "bind_interface eth0",
        "http_dir x",
        "listener 1883",
        "max_connections 1",
        "max_qos 1",
        "max_topic_alias 1",
        "mount_point x/",
        "port 1883",
        "protocol mqtt",
        "socket_domain ipv4",
        "use_username_as_clientid true",
        "websockets_log_level 1",
        "websockets_headers_size 1",
        "cafile x",
        "capath x",
        "certfile x",
        "ciphers x",
        "ciphers_tls1.3 x",
        "crlfile x",
        "dhparamfile x",
        "keyfile x",
        "require_certificate true",
        "tls_engine x",
        "tls_keyform pem",
        "tls_version tlsv1.2",
        "use_identity_as_username true",
        "use_subject_as_username true",
        "psk_hint x",
        "tls_engine_kpass_sha1 x",
    ];
    let bridge = [
        "address h",
        "addresses h",
        "bridge_attempt_unsubscribe true",
        "bridge_bind_address 1.2.3.4",
        "bridge_max_packet_size 1",
        "bridge_outgoing_retain true",
        "bridge_protocol_version mqttv311",
        "cleansession true",
        "local_cleansession true",
        "keepalive_interval 60",
        "idle_timeout 1",
        "local_clientid x",
        "local_password x",
        "local_username x",
        "notifications true",
        "notifications_local_only true",
        "notification_topic x",
        "remote_clientid x",
        "remote_password x",
        "remote_username x",
        "clientid x",
        "username x",
        "password x",
        "restart_timeout 1",
        "round_robin true",
        "start_type automatic",
        "threshold 1",
        "topic a",
        "try_private true",
        "bridge_alpn x",
        "bridge_cafile x",
        "bridge_capath x",
        "bridge_certfile x",
        "bridge_identity x",
        "bridge_insecure true",
        "bridge_keyfile x",
        "bridge_psk x",
        "bridge_require_ocsp true",
        "bridge_tls_version tlsv1.2",
    ];
    let mut conf = general.join("\n");
    conf.push_str("\nconnection c\n");
    conf.push_str(&bridge.join("\n"));
    let m = migrate_text(&conf);
    let unknown: Vec<&Report> = m
        .not_mapped
        .iter()
        .filter(|r| r.why.contains("knows"))
        .collect();
    assert!(unknown.is_empty(), "{unknown:#?}");
}

#[test]
fn include_dir_files_start_with_the_default_listener_and_no_bridge() {
    let t = TempDir::new("scope");
    let d = t.0.join("conf.d");
    std::fs::create_dir(&d).unwrap();
    // In the included file, `max_connections` before its own `listener` line is the default
    // listener's (as Mosquitto reads each file), and a bridge option needs its own
    // `connection`.
    std::fs::write(
        d.join("a.conf"),
        "max_connections 7\nremote_username x\nlistener 8883 127.0.0.1\ncertfile /c/s.pem\nkeyfile /c/s.key\n",
    )
    .unwrap();
    let main = t.0.join("mosquitto.conf");
    std::fs::write(
        &main,
        "listener 1883 127.0.0.1\nconnection up\naddress h\ntopic a/#\ninclude_dir conf.d\nmax_qos 1\n",
    )
    .unwrap();
    let r = parse::read(&main).unwrap();
    let m = migrate(&r.directives, &opts());
    let tt = table(&m);
    assert_eq!(s(&tt, "listeners.tls.bind"), "127.0.0.1:8883");
    assert_eq!(i(&tt, "listeners.tcp_1883.limits.max_connections"), 7);
    assert_eq!(s(&tt, "listeners.tcp_1883.bind"), "[::]:1883");
    let inc = d.join("a.conf").display().to_string();
    let rep: Vec<String> = m.not_mapped.iter().map(ToString::to_string).collect();
    assert!(
        rep.iter().any(|r| r.starts_with(&format!(
            "{inc}:2: remote_username: a bridge option outside"
        ))),
        "{rep:#?}"
    );
    // Back in the main file, the first listener is current again: max_qos is the first
    // listener's only, so the listeners differ.
    assert!(
        rep.iter()
            .any(|r| r.contains(":6: max_qos: per listener on Mosquitto")),
        "{rep:#?}"
    );
}

/// A configuration close to real ones loads in Tern as it is written.
#[test]
fn the_output_is_a_configuration_tern_loads() {
    let m = migrate_text(WORKED_EXAMPLE);
    if let Err(e) = crate::Config::from_toml(&m.toml) {
        panic!("{e}\n{}", m.toml);
    }
}

/// The example of docs/migrating-from-mosquitto.md, whose output the page shows.
const WORKED_EXAMPLE: &str = include_str!("worked_example.conf");

/// docs/migrating-from-mosquitto.md shows this example and what `tern migrate` makes of it:
/// the page stays true to the code. (To refresh it: `TERN_MIGRATE_PRINT=1 cargo test --lib
/// migrate::tests::the_worked_example_is_the_documented_one -- --nocapture`.)
#[test]
fn the_worked_example_is_the_documented_one() {
    let m = migrate_text(WORKED_EXAMPLE);
    let mut report = String::new();
    for r in &m.not_mapped {
        report.push_str(&format!("{r}\n"));
    }
    if std::env::var_os("TERN_MIGRATE_PRINT").is_some() {
        println!("{}\n-----\n{report}", m.toml);
    }
    let doc = include_str!("../../docs/migrating-from-mosquitto.md");
    let block = |after: &str, lang: &str| -> String {
        let start = doc
            .find(after)
            .unwrap_or_else(|| panic!("{after:?} not in the page"));
        let rest = &doc[start..];
        let open = format!("```{lang}\n");
        let b = rest
            .find(&open)
            .unwrap_or_else(|| panic!("no {open:?} after {after:?}"))
            + open.len();
        let e = rest[b..].find("```\n").unwrap();
        rest[b..b + e].to_string()
    };
    assert_eq!(
        block("<!-- example: mosquitto.conf -->", "text"),
        WORKED_EXAMPLE
    );
    assert_eq!(block("<!-- example: tern.toml -->", "toml"), m.toml);
    assert_eq!(block("<!-- example: stderr -->", "text"), report);
}
