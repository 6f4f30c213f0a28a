use super::*;
use crate::protocol::{MqttStr, PublishProperties, QoS, SubscriptionOptions};
use crate::storage::record::WillRecord;
use bytes::Bytes;
use std::io::Write;
use std::sync::atomic::AtomicUsize;

/// A unique directory under the system temp dir, removed on drop.
pub(super) struct TempDir(PathBuf);

impl TempDir {
    pub(super) fn new(name: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let dir = std::env::temp_dir().join(format!(
            "tern-durable-{name}-{}-{n}-{nanos}",
            std::process::id()
        ));
        TempDir(dir)
    }

    pub(super) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub(super) fn open(dir: &TempDir) -> (DurableStore, Recovered) {
    DurableStore::open(dir.path(), DurableMode::Os).expect("open store")
}

pub(super) fn wait(rx: oneshot::Receiver<()>) {
    rx.blocking_recv().expect("commit failed");
}

pub(super) fn msg(id: u64) -> StoredMessage {
    StoredMessage {
        id,
        topic: MqttStr::from(format!("t/{id}")),
        payload: Bytes::from(format!("payload {id}")),
        qos: QoS::AtLeastOnce,
        retain: false,
        properties: PublishProperties::default(),
        expires_at_ms: None,
        origin: 3,
    }
}

pub(super) fn entry(msg_id: u64) -> QueueEntry {
    QueueEntry {
        msg_id,
        qos: QoS::AtLeastOnce,
        retain: false,
        sub_ids: vec![4],
        enqueued: 0,
    }
}

fn session(client_id: &str, session_id: u64) -> SessionRecord {
    SessionRecord {
        client_id: client_id.into(),
        session_id,
        expiry_interval: 60,
        disconnected_at_ms: None,
        will: None,
        username: None,
    }
}

fn sub(filter: &str) -> SubscriptionRecord {
    SubscriptionRecord {
        filter: filter.into(),
        options: SubscriptionOptions {
            qos: QoS::ExactlyOnce,
            ..SubscriptionOptions::default()
        },
        id: Some(4),
    }
}

fn has(store: &DurableStore, id: u64) -> bool {
    store.get_message(id).expect("read").is_some()
}

#[test]
fn reopen_recovers_exactly() {
    let dir = TempDir::new("reopen");
    let mut expected = Recovered::default();
    {
        let (store, rec) = open(&dir);
        assert_eq!(rec.next_message_id, 1);
        assert_eq!(rec.next_session_id, 1);
        let mut a = session("a", 7);
        a.disconnected_at_ms = Some(1_234);
        a.will = Some(WillRecord {
            topic: MqttStr::from("will"),
            payload: Bytes::from_static(b"gone"),
            qos: QoS::AtLeastOnce,
            retain: true,
            delay_interval: 10,
            properties: PublishProperties::default(),
        });
        let ab = session("ab", 8);
        let inflight = |packet_id, order, msg_id, released| InflightRecord {
            packet_id,
            order,
            entry: entry(msg_id),
            released,
            group: None,
        };
        let mut retained = msg(30);
        retained.retain = true;
        let mut ops = vec![
            Op::PutSession(a.clone()),
            Op::PutSession(ab.clone()),
            Op::PutSubscription {
                client_id: "a".into(),
                sub: sub("x/#"),
            },
            Op::PutSubscription {
                client_id: "a".into(),
                sub: sub("y"),
            },
            Op::PutSubscription {
                client_id: "ab".into(),
                sub: sub("z/+"),
            },
        ];
        for id in 1..=5 {
            ops.push(Op::PutMessage(msg(id)));
            ops.push(Op::Enqueue {
                session_id: 7,
                seq: 10 + id,
                entry: entry(id),
            });
        }
        ops.push(Op::Enqueue {
            session_id: 8,
            seq: 0,
            entry: entry(5),
        });
        ops.extend([
            Op::PutMessage(msg(20)),
            Op::PutMessage(msg(21)),
            Op::PutInflight {
                session_id: 7,
                rec: inflight(9, 2, 20, true),
            },
            Op::PutInflight {
                session_id: 7,
                rec: inflight(3, 1, 21, false),
            },
            Op::PutQos2 {
                session_id: 7,
                packet_id: 5,
            },
            Op::PutQos2 {
                session_id: 7,
                packet_id: 2,
            },
            Op::PutMessage(retained.clone()),
            Op::PutRetained {
                topic: "t/30".into(),
                msg_id: 30,
            },
        ]);
        wait(store.submit(ops));
        // Dequeue the head to see it in QueueInfo.
        wait(store.submit(vec![Op::Dequeue {
            session_id: 7,
            seq: 11,
        }]));

        let w = msg(1).weight();
        expected.sessions = vec![a, ab];
        expected.subscriptions = HashMap::from([
            ("a".to_string(), vec![sub("x/#"), sub("y")]),
            ("ab".to_string(), vec![sub("z/+")]),
        ]);
        expected.queues = HashMap::from([
            (
                7,
                QueueInfo {
                    head: 12,
                    tail: 16,
                    len: 4,
                    bytes: 4 * w,
                },
            ),
            (
                8,
                QueueInfo {
                    head: 0,
                    tail: 1,
                    len: 1,
                    bytes: w,
                },
            ),
        ]);
        expected.inflight = HashMap::from([(
            7,
            vec![
                (inflight(3, 1, 21, false), msg(21)),
                (inflight(9, 2, 20, true), msg(20)),
            ],
        )]);
        expected.qos2 = HashMap::from([(7, vec![2, 5])]);
        expected.retained = vec![retained];
        expected.next_message_id = 31;
        expected.next_session_id = 9;

        let q = store.read_queue(7, 0, 10).expect("read queue");
        let seqs: Vec<u64> = q.iter().map(|(s, _)| *s).collect();
        assert_eq!(seqs, vec![12, 13, 14, 15]);
        assert_eq!(store.read_queue(7, 14, 1).expect("read")[0].1, entry(4));
        assert!(!has(&store, 1), "dequeued message deleted");
        assert_eq!(store.get_message(2).expect("read"), Some(msg(2)));
        assert!(store.disk_usage() > 0);
    }
    let (_store, rec) = open(&dir);
    assert_eq!(rec, expected);
}

#[test]
fn shared_messages_are_counted() {
    let dir = TempDir::new("refs");
    {
        let (store, _) = open(&dir);
        wait(store.submit(vec![
            Op::PutMessage(msg(1)),
            Op::Enqueue {
                session_id: 1,
                seq: 0,
                entry: entry(1),
            },
            Op::Enqueue {
                session_id: 2,
                seq: 0,
                entry: entry(1),
            },
            // Stored without a reference: garbage, deleted with the submit.
            Op::PutMessage(msg(9)),
        ]));
        assert!(has(&store, 1));
        assert!(!has(&store, 9));
        wait(store.submit(vec![Op::Dequeue {
            session_id: 1,
            seq: 0,
        }]));
        assert!(has(&store, 1), "still queued for session 2");
        // Dequeueing something absent changes nothing.
        wait(store.submit(vec![Op::Dequeue {
            session_id: 1,
            seq: 0,
        }]));
        assert!(has(&store, 1));

        // Retained replacement drops the old message.
        wait(store.submit(vec![
            Op::PutMessage(msg(5)),
            Op::PutRetained {
                topic: "r".into(),
                msg_id: 5,
            },
        ]));
        wait(store.submit(vec![
            Op::PutMessage(msg(6)),
            Op::PutRetained {
                topic: "r".into(),
                msg_id: 6,
            },
        ]));
        assert!(!has(&store, 5));
        assert!(has(&store, 6));

        // Queue -> in-flight within one submit keeps the message; replacing the in-flight
        // record (PUBREL sent) keeps it; deleting it (PUBCOMP) drops it.
        wait(store.submit(vec![
            Op::PutMessage(msg(7)),
            Op::Enqueue {
                session_id: 3,
                seq: 0,
                entry: entry(7),
            },
        ]));
        let rec = |released| InflightRecord {
            packet_id: 1,
            order: 0,
            entry: entry(7),
            released,
            group: None,
        };
        wait(store.submit(vec![
            Op::Dequeue {
                session_id: 3,
                seq: 0,
            },
            Op::PutInflight {
                session_id: 3,
                rec: rec(false),
            },
        ]));
        assert!(has(&store, 7));
        wait(store.submit(vec![Op::PutInflight {
            session_id: 3,
            rec: rec(true),
        }]));
        assert!(has(&store, 7));
        wait(store.submit(vec![Op::DeleteInflight {
            session_id: 3,
            packet_id: 1,
        }]));
        assert!(!has(&store, 7));

        // Enqueued and dequeued within one submit: nothing left behind.
        wait(store.submit(vec![
            Op::PutMessage(msg(8)),
            Op::Enqueue {
                session_id: 4,
                seq: 0,
                entry: entry(8),
            },
            Op::Dequeue {
                session_id: 4,
                seq: 0,
            },
        ]));
        assert!(!has(&store, 8));
    }
    // Counts are rebuilt at open: session 2's reference still holds message 1, and the
    // retained topic message 6.
    let (store, rec) = open(&dir);
    assert_eq!(rec.retained, vec![msg(6)]);
    assert!(has(&store, 1));
    wait(store.submit(vec![Op::Dequeue {
        session_id: 2,
        seq: 0,
    }]));
    assert!(!has(&store, 1));
    wait(store.submit(vec![Op::DeleteRetained { topic: "r".into() }]));
    assert!(!has(&store, 6));
    drop(store);
    let (store, rec) = open(&dir);
    assert!(rec.queues.is_empty() && rec.retained.is_empty() && rec.inflight.is_empty());
    // Ids are not reused although every record using them is gone.
    assert_eq!((rec.next_message_id, rec.next_session_id), (10, 5));
    assert_eq!(store.ks.messages.iter().count(), 0, "no garbage");
}

/// A new delivery's in-flight record is written without looking at its key (writer.rs): a
/// packet id used again after its record was deleted counts the new message once; and were a
/// record ever overwritten by a new delivery's, its message would be kept (not lost) until the
/// next start, whose recount deletes it.
#[test]
fn inflight_records_of_new_deliveries_count_their_message_once() {
    let dir = TempDir::new("inflight-blind");
    let rec = |msg_id, released| InflightRecord {
        packet_id: 1,
        order: 0,
        entry: entry(msg_id),
        released,
        group: None,
    };
    {
        let (store, _) = open(&dir);
        for id in [1, 2] {
            wait(store.submit(vec![
                Op::PutMessage(msg(id)),
                Op::Enqueue {
                    session_id: 1,
                    seq: id,
                    entry: entry(id),
                },
            ]));
        }
        // Packet id 1 carries message 1, then (after its PUBACK) message 2.
        for id in [1, 2] {
            wait(store.submit(vec![
                Op::Dequeue {
                    session_id: 1,
                    seq: id,
                },
                Op::PutInflight {
                    session_id: 1,
                    rec: rec(id, false),
                },
            ]));
            assert!(has(&store, id));
            wait(store.submit(vec![Op::DeleteInflight {
                session_id: 1,
                packet_id: 1,
            }]));
            assert!(
                !has(&store, id),
                "message {id} deleted with its last record"
            );
        }
        // The invariant broken on purpose: a new delivery's record over a live one.
        wait(store.submit(vec![
            Op::PutMessage(msg(3)),
            Op::PutInflight {
                session_id: 1,
                rec: rec(3, false),
            },
        ]));
        wait(store.submit(vec![
            Op::PutMessage(msg(4)),
            Op::PutInflight {
                session_id: 1,
                rec: rec(4, false),
            },
        ]));
        assert!(has(&store, 3), "kept, not lost");
        assert!(has(&store, 4));
    }
    let (store, rec) = open(&dir);
    assert_eq!(rec.inflight.len(), 1);
    assert!(
        !has(&store, 3),
        "the recount at open deletes what no record refers to"
    );
    assert!(has(&store, 4));
}

/// Session 5 of client "c" with everything a session can hold, one message shared with
/// session 6.
fn populate(store: &DurableStore) {
    wait(store.submit(vec![
        Op::PutSession(session("c", 5)),
        Op::PutSession(session("c2", 6)),
        Op::PutSubscription {
            client_id: "c".into(),
            sub: sub("a"),
        },
        Op::PutSubscription {
            client_id: "c2".into(),
            sub: sub("a"),
        },
        Op::PutMessage(msg(1)),
        Op::PutMessage(msg(2)),
        Op::PutMessage(msg(3)),
        Op::Enqueue {
            session_id: 5,
            seq: 0,
            entry: entry(1),
        },
        Op::Enqueue {
            session_id: 5,
            seq: 1,
            entry: entry(2),
        },
        Op::Enqueue {
            session_id: 6,
            seq: 0,
            entry: entry(2),
        },
        Op::PutInflight {
            session_id: 5,
            rec: InflightRecord {
                packet_id: 1,
                order: 0,
                entry: entry(3),
                released: false,
                group: Some(12),
            },
        },
        Op::PutQos2 {
            session_id: 5,
            packet_id: 1,
        },
    ]));
}

#[test]
fn delete_session_cascades() {
    let dir = TempDir::new("cascade");
    {
        let (store, _) = open(&dir);
        populate(&store);
        // Added in the same submit as the delete: must be cascaded too.
        wait(store.submit(vec![
            Op::PutMessage(msg(4)),
            Op::Enqueue {
                session_id: 5,
                seq: 2,
                entry: entry(4),
            },
            Op::DeleteSession {
                client_id: "c".into(),
                session_id: 5,
            },
        ]));
        assert!(!has(&store, 1) && !has(&store, 3) && !has(&store, 4));
        assert!(has(&store, 2), "still queued for session 6");
        assert!(store.read_queue(5, 0, 10).expect("read").is_empty());
    }
    let (_store, rec) = open(&dir);
    assert_eq!(rec.sessions, vec![session("c2", 6)]);
    assert_eq!(
        rec.subscriptions,
        HashMap::from([("c2".to_string(), vec![sub("a")])])
    );
    assert_eq!(rec.queues.len(), 1);
    assert!(rec.inflight.is_empty() && rec.qos2.is_empty());
}

#[test]
fn delete_of_a_taken_over_session_keeps_the_new_one() {
    let dir = TempDir::new("takeover");
    let (store, _) = open(&dir);
    populate(&store);
    // Client "c" now has session 9; deleting old session 5 keeps its record and subscriptions.
    wait(store.submit(vec![
        Op::PutSession(session("c", 9)),
        Op::DeleteSession {
            client_id: "c".into(),
            session_id: 5,
        },
    ]));
    drop(store);
    let (_store, rec) = open(&dir);
    assert!(rec.sessions.contains(&session("c", 9)));
    assert_eq!(rec.subscriptions["c"], vec![sub("a")]);
    assert!(!rec.queues.contains_key(&5) && rec.inflight.is_empty() && rec.qos2.is_empty());
}

fn write_raw(dir: &Path, keyspace: &str, key: &[u8], value: &[u8]) {
    let db = Database::builder(dir).open().expect("raw open");
    let ks = db
        .keyspace(keyspace, KeyspaceCreateOptions::default)
        .expect("keyspace");
    ks.insert(key, value).expect("insert");
    db.persist(PersistMode::SyncAll).expect("persist");
}

#[test]
fn newer_store_format_is_refused() {
    let dir = TempDir::new("newer");
    drop(open(&dir));
    write_raw(dir.path(), "meta", b"format", &[STORE_FORMAT + 1]);
    match DurableStore::open(dir.path(), DurableMode::Os) {
        Err(StorageError::NewerFormat {
            found,
            supported,
            path,
        }) => {
            assert_eq!((found, supported), (STORE_FORMAT + 1, STORE_FORMAT));
            assert_eq!(path, dir.path());
            let text = StorageError::NewerFormat {
                found,
                supported,
                path,
            }
            .to_string();
            assert!(text.contains(&dir.path().display().to_string()), "{text}");
        }
        other => panic!("expected NewerFormat, got {:?}", other.map(|_| ())),
    }
}

#[test]
fn newer_record_format_is_refused() {
    let dir = TempDir::new("newer-record");
    drop(open(&dir));
    let mut v = entry(1).encode();
    v[0] = crate::storage::record::RECORD_FORMAT + 1;
    write_raw(dir.path(), "queue", &keys::queue(1, 0), &v);
    let err = DurableStore::open(dir.path(), DurableMode::Os).map(|_| ());
    assert!(
        matches!(err, Err(StorageError::NewerFormat { .. })),
        "{err:?}"
    );
}

#[test]
fn corrupt_records_are_errors() {
    let good = msg(1).encode();
    let cases: Vec<(&str, Vec<u8>, Vec<u8>)> = vec![
        (
            "messages",
            keys::message(1).to_vec(),
            good[..good.len() - 3].to_vec(),
        ),
        ("messages", b"short".to_vec(), good.clone()),
        ("queue", keys::queue(1, 0).to_vec(), vec![1, 2, 3]),
        ("sessions", b"x".to_vec(), vec![1, 0, 0, 0, 200, b'x']),
        ("inflight", keys::packet(1, 1).to_vec(), vec![]),
        ("retained", b"t".to_vec(), vec![1, 0]),
        ("subs", b"no-separator".to_vec(), sub("a").encode()),
    ];
    for (keyspace, key, value) in cases {
        let dir = TempDir::new("corrupt");
        drop(open(&dir));
        write_raw(dir.path(), keyspace, &key, &value);
        match DurableStore::open(dir.path(), DurableMode::Os) {
            Err(e @ StorageError::Corrupt { .. }) => {
                assert!(
                    e.to_string().contains(&dir.path().display().to_string()),
                    "{e}"
                );
            }
            other => panic!("{keyspace}: expected Corrupt, got {:?}", other.map(|_| ())),
        }
    }
}

#[test]
fn data_without_format_marker_is_refused() {
    let dir = TempDir::new("foreign");
    write_raw(dir.path(), "queue", &keys::queue(1, 0), &entry(1).encode());
    let err = DurableStore::open(dir.path(), DurableMode::Os).map(|_| ());
    assert!(matches!(err, Err(StorageError::Corrupt { .. })), "{err:?}");
}

#[test]
fn unusable_directory_is_an_error_naming_it() {
    let dir = TempDir::new("notadir");
    std::fs::write(dir.path(), b"a file").expect("write");
    let err = DurableStore::open(dir.path(), DurableMode::Os).map(|_| ());
    let text = err.expect_err("must fail").to_string();
    assert!(text.contains(&dir.path().display().to_string()), "{text}");
    let _ = std::fs::remove_file(dir.path());
}

#[test]
fn torn_journal_tail_is_recovered() {
    let dir = TempDir::new("torn");
    {
        let (store, _) = open(&dir);
        populate(&store);
    }
    // Append a half-written batch to every journal file.
    let mut journals = 0;
    for e in walk(dir.path()) {
        let name = e.file_name().map(|n| n.to_string_lossy().to_string());
        if name.is_some_and(|n| n.ends_with(".jnl")) {
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .open(&e)
                .expect("open journal");
            f.write_all(&[0x01, 0x02, 0x00, 0x00, 0x00, 0x07, 0xff])
                .expect("append");
            journals += 1;
        }
    }
    assert!(journals > 0, "no journal found");
    let (_store, rec) = open(&dir);
    assert_eq!(rec.sessions.len(), 2);
    assert_eq!(rec.queues[&5].len, 2);
}

pub(super) fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// Effects travel with their commit: they run on the storage thread, in submission order,
/// before the submitter's receiver resolves, whether or not anybody still waits for it.
#[test]
fn effects_run_in_order_before_the_receiver_even_without_a_waiter() {
    use crate::storage::{OnCommit, Outcome};
    let dir = TempDir::new("effects");
    let (store, _) = open(&dir);
    let log = Arc::new(Mutex::new(Vec::new()));
    let mut receivers = Vec::new();
    for i in 0..50u64 {
        let l = log.clone();
        let rx = store.submit_then(
            vec![
                Op::PutMessage(msg(i + 1)),
                Op::Enqueue {
                    session_id: 1,
                    seq: i + 1,
                    entry: entry(i + 1),
                },
            ],
            OnCommit::new(move |o| l.lock().expect("log").push((i, o))),
        );
        if i % 2 == 0 {
            // The submitter vanished: its receiver is gone, its effect must still run.
            drop(rx);
        } else {
            receivers.push((i, rx));
        }
    }
    for (i, rx) in receivers {
        wait(rx);
        let seen = log.lock().expect("log").len() as u64;
        assert!(seen > i, "effect {i} ran before its receiver resolved");
    }
    store.close();
    let log = log.lock().expect("log").clone();
    let expected: Vec<(u64, Outcome)> = (0..50).map(|i| (i, Outcome::Durable)).collect();
    assert_eq!(log, expected);
}

/// A submit that cannot be stored (the store is closed) runs its effects as failed: what
/// they hold is released, never left waiting.
#[test]
fn effects_of_a_submit_that_cannot_be_stored_run_as_failed() {
    use crate::storage::{OnCommit, Outcome};
    let dir = TempDir::new("effects-failed");
    let (store, _) = open(&dir);
    store.close();
    let seen = Arc::new(Mutex::new(None));
    let s = seen.clone();
    let rx = store.submit_then(
        vec![Op::PutMessage(msg(1))],
        OnCommit::new(move |o| *s.lock().expect("seen") = Some(o)),
    );
    assert!(rx.blocking_recv().is_err(), "nothing was stored");
    assert_eq!(*seen.lock().expect("seen"), Some(Outcome::Failed));
    // Dropping an effect that never ran counts as a failure too.
    let s = seen.clone();
    *seen.lock().expect("seen") = None;
    drop(OnCommit::new(move |o| *s.lock().expect("seen") = Some(o)));
    assert_eq!(*seen.lock().expect("seen"), Some(Outcome::Failed));
}

/// `get_messages` answers what one `get_message` per id would, in the caller's order: dense
/// ids (one pass over their range, skipping messages not asked for), sparse ids (point
/// reads), missing ones, repeats.
#[test]
fn get_messages_answers_as_point_reads_do() {
    let dir = TempDir::new("get-messages");
    let (store, _) = open(&dir);
    let mut ops = Vec::new();
    for id in (1..=40).chain([1_000]) {
        ops.push(Op::PutMessage(msg(id)));
        ops.push(Op::Enqueue {
            session_id: 1,
            seq: id,
            entry: entry(id),
        });
    }
    wait(store.submit(ops));
    for ids in [
        vec![3, 4, 5, 7, 6],      // dense, unsorted, 6 and 7 swapped
        vec![10, 12, 99, 11, 10], // dense with a missing id and a repeat
        vec![2, 1_000],           // sparse: point reads
        vec![5],
        vec![],
        vec![41, 42, 43], // none stored
    ] {
        let one_by_one: Vec<_> = ids
            .iter()
            .map(|&id| store.get_message(id).unwrap())
            .collect();
        assert_eq!(store.get_messages(&ids).unwrap(), one_by_one, "{ids:?}");
    }
    assert_eq!(
        store.get_messages(&[7, 8]).unwrap(),
        vec![Some(msg(7)), Some(msg(8))]
    );
}

/// Dequeues are answered from the group's read-ahead of their queue range exactly as point
/// reads would answer them: an entry dequeued twice (in one submit, or in two submits that
/// may share a group) drops its message's reference once, an absent seq changes nothing, a
/// message another session still holds stays, and an entry enqueued earlier in the same group
/// (not yet in fjall) is found in the overlay, not reported absent by the read-ahead.
#[test]
fn dequeues_read_ahead_count_each_entry_once() {
    let dir = TempDir::new("dequeue-read-ahead");
    {
        let (store, _) = open(&dir);
        let mut ops = Vec::new();
        for seq in 0..50 {
            ops.push(Op::PutMessage(msg(seq + 1)));
            ops.push(Op::Enqueue {
                session_id: 1,
                seq,
                entry: entry(seq + 1),
            });
        }
        ops.push(Op::PutMessage(msg(100)));
        for session_id in [1, 2] {
            ops.push(Op::Enqueue {
                session_id,
                seq: if session_id == 1 { 60 } else { 0 },
                entry: entry(100),
            });
        }
        wait(store.submit(ops));

        let dequeue = |seq| Op::Dequeue { session_id: 1, seq };
        let mut first: Vec<Op> = (0..30).map(dequeue).collect();
        first.extend([dequeue(10), dequeue(55), dequeue(60), dequeue(60)]);
        let a = store.submit(first);
        let b = store.submit(vec![dequeue(45), dequeue(46), dequeue(45), dequeue(29)]);
        let c = store.submit(vec![
            Op::PutMessage(msg(200)),
            Op::Enqueue {
                session_id: 3,
                seq: 5,
                entry: entry(200),
            },
            Op::Dequeue {
                session_id: 3,
                seq: 5,
            },
            Op::Dequeue {
                session_id: 3,
                seq: 6,
            },
        ]);
        for rx in [a, b, c] {
            wait(rx);
        }
        let expect = |store: &DurableStore| {
            for seq in 0..50 {
                let kept = (30..50).contains(&seq) && seq != 45 && seq != 46;
                assert_eq!(has(store, seq + 1), kept, "message of seq {seq}");
            }
            assert!(has(store, 100), "still queued for session 2");
            assert!(!has(store, 200), "enqueued and dequeued in one submit");
        };
        expect(&store);
        wait(store.submit(vec![Op::Dequeue {
            session_id: 2,
            seq: 0,
        }]));
        assert!(!has(&store, 100), "its last reference is gone");
        expect_queue_of_session_1(&store);
    }
    // Recovery counts references afresh: the same messages survive.
    let (store, _) = open(&dir);
    for seq in 0..50 {
        let kept = (30..50).contains(&seq) && seq != 45 && seq != 46;
        assert_eq!(
            has(&store, seq + 1),
            kept,
            "message of seq {seq} after reopen"
        );
    }
    assert!(!has(&store, 100));
}

/// Session 1's queue after `dequeues_read_ahead_count_each_entry_once`: seqs 30..50 but 45, 46.
fn expect_queue_of_session_1(store: &DurableStore) {
    let seqs: Vec<u64> = store
        .read_queue(1, 0, 100)
        .expect("read queue")
        .into_iter()
        .map(|(seq, _)| seq)
        .collect();
    let want: Vec<u64> = (30..50).filter(|s| *s != 45 && *s != 46).collect();
    assert_eq!(seqs, want);
}

#[test]
fn a_store_another_process_has_open_is_refused_saying_so() {
    let dir = TempDir::new("in-use");
    let (_store, _) = open(&dir);
    match DurableStore::open(dir.path(), DurableMode::Os) {
        Err(e @ StorageError::InUse { .. }) => {
            let text = e.to_string();
            assert!(text.contains("another Tern process"), "{text}");
            assert!(text.contains(&dir.path().display().to_string()), "{text}");
        }
        Err(e) => panic!("not InUse: {e}"),
        Ok(_) => panic!("opened twice"),
    }
}
