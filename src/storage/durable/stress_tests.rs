//! Tests that measure or kill: group commit under concurrency, file descriptor use, and a
//! SIGKILLed writer process.

use super::tests::{entry, msg, open, wait, TempDir};
use super::*;
use bytes::Bytes;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::Instant;

/// `threads` threads each submit `per_thread` single-message submits; returns (submits/s,
/// stats). With `pipelined` every thread submits everything before waiting (many connections
/// with acks outstanding); otherwise each waits for its ack before the next submit.
fn hammer(mode: DurableMode, threads: u64, per_thread: u64, pipelined: bool) -> (f64, StoreStats) {
    let dir = TempDir::new("group");
    let (store, _) = DurableStore::open(dir.path(), mode).expect("open");
    let start = Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads {
            let store = &store;
            s.spawn(move || {
                let mut pending = Vec::new();
                for i in 0..per_thread {
                    let id = t * per_thread + i + 1;
                    let rx = store.submit(vec![
                        Op::PutMessage(msg(id)),
                        Op::Enqueue {
                            session_id: t + 1,
                            seq: i,
                            entry: entry(id),
                        },
                    ]);
                    if pipelined {
                        pending.push(rx);
                    } else {
                        wait(rx);
                    }
                }
                pending.into_iter().for_each(wait);
            });
        }
    });
    let rate = (threads * per_thread) as f64 / start.elapsed().as_secs_f64();
    let stats = store.stats();
    for t in 0..threads {
        let q = store.read_queue(t + 1, 0, usize::MAX).expect("read");
        assert_eq!(q.len() as u64, per_thread);
    }
    (rate, stats)
}

#[test]
fn group_commit_batches_concurrent_submits() {
    for mode in [DurableMode::Os, DurableMode::Fsync] {
        let (rate, stats) = hammer(mode, 8, 1000, true);
        eprintln!("group commit {mode:?} pipelined: {rate:.0} submits/s, {stats:?}");
        assert_eq!(stats.submits, 8000);
        assert_eq!(stats.ops, 16000);
        assert!(
            stats.batches * 4 <= stats.submits,
            "{} batches for {} submits",
            stats.batches,
            stats.submits
        );
        let (rate, stats) = hammer(mode, 8, 250, false);
        eprintln!("group commit {mode:?} closed loop: {rate:.0} submits/s, {stats:?}");
        assert!(stats.batches <= stats.submits);
    }
}
fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

#[test]
fn file_descriptors_stay_bounded() {
    let before = open_fds();
    let dir = TempDir::new("fds");
    let (store, _) = open(&dir);
    let opened = open_fds();
    // Enough data to flush memtables to table files.
    let big = Bytes::from(vec![7u8; 64 * 1024]);
    for round in 0..4u64 {
        let mut ops = Vec::new();
        for i in 0..256u64 {
            let id = round * 1000 + i + 1;
            let mut m = msg(id);
            m.payload = big.clone();
            ops.push(Op::PutMessage(m));
            ops.push(Op::Enqueue {
                session_id: 1,
                seq: id,
                entry: entry(id),
            });
        }
        wait(store.submit(ops));
    }
    let loaded = open_fds();
    eprintln!(
        "fds: {before} before open, {opened} after open, {loaded} after 64 MiB of writes; \
         disk usage {} bytes",
        store.disk_usage()
    );
    // Other tests run concurrently and open files too, hence the generous margin.
    assert!(loaded.saturating_sub(before) < MAX_CACHED_FILES + 100);
}

const CRASH_ENV: &str = "TERN_DURABLE_CRASH_CHILD";

/// The child half of `acknowledged_writes_survive_sigkill`: a no-op unless re-executed with
/// `CRASH_ENV` set. Appends to session 1's queue with up to 16 submits outstanding and prints
/// each acknowledged seq.
#[test]
fn crash_child() {
    let Ok(dir) = std::env::var(CRASH_ENV) else {
        return;
    };
    let (store, rec) = DurableStore::open(Path::new(&dir), DurableMode::Os).expect("child open");
    let start = rec.queues.get(&1).map_or(0, |q| q.tail);
    let mut out = std::io::stdout().lock();
    let mut pending = std::collections::VecDeque::new();
    for seq in start.. {
        pending.push_back((
            seq,
            store.submit(vec![
                Op::PutMessage(msg(seq + 1)),
                Op::Enqueue {
                    session_id: 1,
                    seq,
                    entry: entry(seq + 1),
                },
            ]),
        ));
        if pending.len() >= 16 {
            if let Some((acked, rx)) = pending.pop_front() {
                wait(rx);
                writeln!(out, "ACK {acked}").expect("stdout");
                out.flush().expect("flush");
            }
        }
    }
}

#[test]
fn acknowledged_writes_survive_sigkill() {
    let dir = TempDir::new("crash");
    let exe = std::env::current_exe().expect("test binary");
    let mut acked_total = 0u64;
    for _round in 0..3 {
        let mut child = Command::new(&exe)
            .args([
                "--exact",
                "storage::durable::stress_tests::crash_child",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CRASH_ENV, dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn child");
        let stdout = child.stdout.take().expect("child stdout");
        let mut last = None;
        let mut acks = 0;
        for line in BufReader::new(stdout).lines() {
            let line = line.expect("read child");
            if let Some(n) = line.strip_prefix("ACK ") {
                last = Some(n.parse::<u64>().expect("seq"));
                acks += 1;
                if acks >= 300 {
                    break;
                }
            }
        }
        child.kill().expect("kill child");
        let _ = child.wait();
        let last = last.expect("child acknowledged nothing");
        acked_total = acked_total.max(last + 1);

        let (store, rec) = open(&dir);
        let q = rec.queues[&1];
        assert_eq!(q.head, 0);
        assert!(q.tail > last, "acked {last}, recovered tail {}", q.tail);
        // Entries are appended in order and batches are atomic: no holes.
        assert_eq!(q.len, q.tail);
        let entries = store.read_queue(1, 0, usize::MAX).expect("read");
        assert_eq!(entries.len() as u64, q.len);
        for (seq, e) in entries.iter().take(acked_total as usize) {
            assert_eq!(e.msg_id, seq + 1);
            assert_eq!(
                store.get_message(e.msg_id).expect("read"),
                Some(msg(seq + 1))
            );
        }
    }
}
