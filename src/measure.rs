//! What the benchmarks (`lb bench forward`, `lb bench tcp`) read off the machine: a process's
//! CPU time from `/proc/PID/task/*/schedstat`, the load average, and medians; and how both
//! print their results ([`figure`], [`write_json_lines`]).
//!
//! **CPU time.** The first field of a thread's `schedstat` is the nanoseconds it has been on a
//! CPU. [`ProcessCpu`] is one reading of every thread of a process; [`ProcessCpu::since`] is the
//! CPU time the process used between two readings:
//! - a thread in both readings counts its increase;
//! - a thread that appeared after the first reading counts all of its time (it started in the
//!   window);
//! - a thread that vanished before the second reading loses what it used after the first one
//!   (its counter is gone with it); [`CpuDelta::vanished`] says how many did, so a figure that
//!   lost time is marked, never silently low.
//!
//! The time is what the scheduler charged to the threads. On a kernel without
//! `CONFIG_IRQ_TIME_ACCOUNTING` (this lab's), softirq work run on a thread's CPU while it is
//! current — the receive path of a veth peer that its own `send` fed — is charged to it; the
//! softirq work other threads' sends trigger is charged to them.
//!
//! **Invariant.** Readings never fail because a thread exits between listing and reading it;
//! only a process that is gone (or not readable) is an error.

use std::collections::BTreeMap;
use std::fs;
use std::io;

/// One reading of every thread of a process: thread id → nanoseconds on a CPU so far.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProcessCpu {
    threads: BTreeMap<u32, u64>,
}

/// CPU time a process used between two readings.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuDelta {
    /// Nanoseconds on a CPU, summed over the threads.
    pub nanos: u64,
    /// Threads of the first reading missing from the second: their time after the first
    /// reading is not in [`nanos`](Self::nanos).
    pub vanished: usize,
}

impl ProcessCpu {
    /// Reads `/proc/{pid}/task/*/schedstat`.
    pub fn read(pid: u32) -> io::Result<Self> {
        let dir = format!("/proc/{pid}/task");
        let entries =
            fs::read_dir(&dir).map_err(|e| io::Error::new(e.kind(), format!("{dir}: {e}")))?;
        let mut threads = BTreeMap::new();
        for entry in entries.flatten() {
            let Some(tid) = entry
                .file_name()
                .to_str()
                .and_then(|t| t.parse::<u32>().ok())
            else {
                continue;
            };
            // A thread may exit between the listing and the read: skip it.
            if let Ok(text) = fs::read_to_string(entry.path().join("schedstat"))
                && let Some(nanos) = parse_schedstat(&text)
            {
                threads.insert(tid, nanos);
            }
        }
        if threads.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{dir}: no thread with a readable schedstat"),
            ));
        }
        Ok(Self { threads })
    }

    /// A reading made of known values (tests).
    #[must_use]
    pub fn from_threads(threads: impl IntoIterator<Item = (u32, u64)>) -> Self {
        Self {
            threads: threads.into_iter().collect(),
        }
    }

    /// The CPU time used from `earlier` to `self` (see the module docs for threads that come
    /// and go).
    #[must_use]
    pub fn since(&self, earlier: &ProcessCpu) -> CpuDelta {
        let nanos = self
            .threads
            .iter()
            .map(|(tid, &now)| now.saturating_sub(earlier.threads.get(tid).copied().unwrap_or(0)))
            .sum();
        let vanished = earlier
            .threads
            .keys()
            .filter(|tid| !self.threads.contains_key(tid))
            .count();
        CpuDelta { nanos, vanished }
    }
}

/// The first field of a `schedstat` line: nanoseconds on a CPU.
fn parse_schedstat(text: &str) -> Option<u64> {
    text.split_whitespace().next()?.parse().ok()
}

/// The 1, 5 and 15 minute load averages (`/proc/loadavg`).
pub fn loadavg() -> io::Result<[f64; 3]> {
    parse_loadavg(&fs::read_to_string("/proc/loadavg")?)
        .ok_or_else(|| io::Error::other("/proc/loadavg: unexpected format"))
}

fn parse_loadavg(text: &str) -> Option<[f64; 3]> {
    let mut fields = text.split_whitespace().map(|f| f.parse::<f64>().ok());
    Some([fields.next()??, fields.next()??, fields.next()??])
}

/// The median (the upper one of an even count); `None` for no values.
#[must_use]
pub fn median(values: &[f64]) -> Option<f64> {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied()
}

/// `value` with `precision` decimals, or `–` when there is none (a case that did not run).
#[must_use]
pub fn figure(value: Option<f64>, precision: usize) -> String {
    value.map_or_else(|| "–".to_owned(), |v| format!("{v:.precision$}"))
}

/// Every item of `items` as one JSON object per line (a benchmark's `--json`).
pub fn write_json_lines<T: serde::Serialize>(
    items: &[T],
    out: &mut dyn io::Write,
) -> io::Result<()> {
    for item in items {
        serde_json::to_writer(&mut *out, item).map_err(io::Error::other)?;
        writeln!(out)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_that_come_and_go_are_counted_as_far_as_known() {
        let before = ProcessCpu::from_threads([(1, 100), (2, 50), (3, 70)]);
        // 1 ran 20 more, 2 vanished, 3 did not run, 4 appeared having run 5.
        let after = ProcessCpu::from_threads([(1, 120), (3, 70), (4, 5)]);
        assert_eq!(
            after.since(&before),
            CpuDelta {
                nanos: 25,
                vanished: 1
            }
        );
        assert_eq!(before.since(&before), CpuDelta::default());
    }

    #[test]
    fn this_process_uses_cpu_time() {
        let me = std::process::id();
        let before = ProcessCpu::read(me).unwrap();
        let mut x = 0u64;
        for i in 0..5_000_000u64 {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
        }
        std::hint::black_box(x);
        let after = ProcessCpu::read(me).unwrap();
        assert!(after.since(&before).nanos > 0);
    }

    #[test]
    fn schedstat_and_loadavg_lines_parse() {
        assert_eq!(
            parse_schedstat("1776284527 311743015 1280\n"),
            Some(1_776_284_527)
        );
        assert_eq!(parse_schedstat(""), None);
        assert_eq!(
            parse_loadavg("2.08 1.07 0.43 3/130 7744\n"),
            Some([2.08, 1.07, 0.43])
        );
        assert_eq!(parse_loadavg("2.08 x"), None);
        assert!(loadavg().is_ok());
    }

    #[test]
    fn medians() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(3.0));
    }
}
