//! Measurement helpers: a log-linear latency histogram, process CPU and memory from /proc,
//! the load generator's own CPU from getrusage, and the open-file limit.

use std::sync::OnceLock;
use std::time::Instant;

static BASE: OnceLock<Instant> = OnceLock::new();

/// Nanoseconds since the first call in this process (publisher and subscriber share it, so a
/// timestamp in a payload can be compared with the receive time).
pub fn now_ns() -> u64 {
    BASE.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// HDR-style histogram: exact below 128 ns, then 64 sub-buckets per power of two
/// (relative error under 1.6%).
#[derive(Clone)]
pub struct Histogram {
    counts: Vec<u64>,
    pub total: u64,
    pub max: u64,
}

const SUB: u64 = 64;

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: vec![0; 128 + 57 * SUB as usize],
            total: 0,
            max: 0,
        }
    }
}

fn index(v: u64) -> usize {
    if v < 128 {
        return v as usize;
    }
    let e = 63 - v.leading_zeros() as u64; // >= 7
    let m = v >> (e - 6); // 64..=127
    (128 + (e - 7) * SUB + (m - 64)) as usize
}

fn value(i: usize) -> u64 {
    if i < 128 {
        return i as u64;
    }
    let i = i as u64 - 128;
    let e = i / SUB + 7;
    let m = i % SUB + 64;
    // middle of the bucket
    (m << (e - 6)) + ((1u64 << (e - 6)) >> 1)
}

impl Histogram {
    pub fn record(&mut self, v: u64) {
        self.counts[index(v)] += 1;
        self.total += 1;
        if v > self.max {
            self.max = v;
        }
    }

    pub fn merge(&mut self, o: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(&o.counts) {
            *a += b;
        }
        self.total += o.total;
        self.max = self.max.max(o.max);
    }

    /// Value at quantile q (0..=1), in the unit recorded.
    pub fn quantile(&self, q: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let rank = ((q * self.total as f64).ceil() as u64).clamp(1, self.total);
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return value(i).min(self.max);
            }
        }
        self.max
    }
}

fn clk_tck() -> f64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// utime + stime of a process, in seconds (from /proc/PID/stat).
pub fn proc_cpu_s(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // fields after ")": state is field 3, utime 14, stime 15 -> indexes 11, 12
    let ut: f64 = f.get(11)?.parse().ok()?;
    let st: f64 = f.get(12)?.parse().ok()?;
    Some((ut + st) / clk_tck())
}

/// utime + stime of several processes summed, in seconds (None when one cannot be read).
pub fn procs_cpu_s(pids: &[u32]) -> Option<f64> {
    pids.iter().map(|&p| proc_cpu_s(p)).sum()
}

/// The machine's CPU time so far from /proc/stat's `cpu` line, in clock ticks: (idle, all).
/// Idle counts `idle` and `iowait`; the difference of two readings over a phase tells how much
/// of every CPU nobody used.
pub fn system_cpu_ticks() -> Option<(u64, u64)> {
    let s = std::fs::read_to_string("/proc/stat").ok()?;
    let line = s.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest times are inside user and nice)
    let all: u64 = v.iter().take(8).sum();
    let idle = v.get(3)? + v.get(4).copied().unwrap_or(0);
    Some((idle, all))
}

/// Share of all CPUs idle between two [`system_cpu_ticks`] readings, in percent.
pub fn idle_pct(before: Option<(u64, u64)>, after: Option<(u64, u64)>) -> Option<f64> {
    let ((i0, a0), (i1, a1)) = (before?, after?);
    let all = a1.checked_sub(a0).filter(|&d| d > 0)?;
    Some(100.0 * i1.saturating_sub(i0) as f64 / all as f64)
}

/// A "VmRSS:"-style line of /proc/PID/status, in KiB.
pub fn proc_status_kib(pid: u32, key: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with(key))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// The "Max open files" soft limit of another process.
pub fn proc_nofile(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    let l = s.lines().find(|l| l.starts_with("Max open files"))?;
    l.split_whitespace().nth(3)?.parse().ok()
}

/// CPU seconds (user + system) this process has used.
pub fn self_cpu_s() -> f64 {
    // SAFETY: getrusage writes into the zeroed struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// (soft, hard) RLIMIT_NOFILE.
pub fn nofile() -> (u64, u64) {
    // SAFETY: getrlimit writes into the struct we pass.
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) };
    (rl.rlim_cur, rl.rlim_max)
}

/// Raise the soft open-file limit to the hard one; returns (soft, hard) afterwards.
pub fn raise_nofile() -> (u64, u64) {
    let (_, hard) = nofile();
    let rl = libc::rlimit {
        rlim_cur: hard,
        rlim_max: hard,
    };
    // SAFETY: setrlimit only reads the struct we pass.
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &rl) };
    nofile()
}

pub fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_share_of_a_phase() {
        assert_eq!(idle_pct(Some((10, 100)), Some((60, 200))), Some(50.0));
        assert_eq!(
            idle_pct(Some((10, 100)), Some((10, 100))),
            None,
            "no time passed"
        );
        assert_eq!(idle_pct(None, Some((10, 100))), None);
        let (idle, all) = system_cpu_ticks().expect("/proc/stat");
        assert!(idle <= all && all > 0);
    }

    #[test]
    fn histogram_quantiles() {
        let mut h = Histogram::default();
        for v in 1..=100_000u64 {
            h.record(v * 1000);
        }
        let p50 = h.quantile(0.5) as f64;
        assert!((p50 / 50_000_000.0 - 1.0).abs() < 0.02, "{p50}");
        let p99 = h.quantile(0.99) as f64;
        assert!((p99 / 99_000_000.0 - 1.0).abs() < 0.02, "{p99}");
        assert_eq!(h.quantile(1.0), 100_000_000);
        for v in [0u64, 1, 127, 128, 129, 1 << 20, u64::MAX / 2] {
            let i = index(v);
            assert!(i < h.counts.len());
            if v >= 128 {
                let r = value(i) as f64 / v as f64;
                assert!((0.98..1.02).contains(&r), "{v} {r}");
            }
        }
    }

    #[test]
    fn cpu_of_several_processes_is_summed() {
        let me = std::process::id();
        let one = proc_cpu_s(me).expect("/proc/self/stat");
        let two = procs_cpu_s(&[me, me]).expect("/proc/self/stat");
        assert!(two >= 2.0 * one, "{one} {two}");
        assert_eq!(procs_cpu_s(&[]), Some(0.0));
        assert_eq!(procs_cpu_s(&[me, u32::MAX]), None, "no such process");
    }

    #[test]
    fn medians() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 2.0, 3.0]), 2.5);
    }
}
