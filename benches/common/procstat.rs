//! Process statistics from `/proc`, shared by the benches (`load`, `soak`): a process's
//! CPU time, resident memory (VmRSS, VmHWM) and open file descriptors, and a sampler
//! that watches its RSS on a thread of its own.
//!
//! Each bench is a crate of its own and includes this file as a `#[path]` module; each
//! uses only part of it.
#![allow(dead_code)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// One reading of a process; zeros for what could not be read (e.g. it has exited).
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcStats {
    /// User plus system CPU seconds (`/proc/PID/stat`).
    pub cpu_s: f64,
    /// VmRSS (`/proc/PID/status`).
    pub rss_kib: u64,
    /// VmHWM, the peak RSS (`/proc/PID/status`).
    pub hwm_kib: u64,
}

impl ProcStats {
    /// This process (the bench itself).
    pub fn own() -> ProcStats {
        ProcStats::read(std::process::id() as i32)
    }

    pub fn read(pid: i32) -> ProcStats {
        let mut s = ProcStats::default();
        if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            // Fields after "pid (comm) ": state is field 3, utime 14, stime 15.
            if let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) {
                let f: Vec<&str> = rest.split_whitespace().collect();
                let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
                // SAFETY: sysconf has no preconditions.
                let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
                s.cpu_s = (ticks(11) + ticks(12)) as f64 / hz;
            }
        }
        if let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
            for line in status.lines() {
                let kib = || {
                    line.split_whitespace()
                        .nth(1)
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(0)
                };
                if line.starts_with("VmRSS:") {
                    s.rss_kib = kib();
                } else if line.starts_with("VmHWM:") {
                    s.hwm_kib = kib();
                }
            }
        }
        s
    }
}

/// Open file descriptors of `pid` (`/proc/PID/fd`); 0 when it cannot be read.
pub fn fd_count(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Samples a process's VmRSS every 50 ms on its own thread until stopped; the highest.
pub struct RssSampler {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<u64>,
}

impl RssSampler {
    pub fn start(pid: i32) -> RssSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut peak = 0;
            loop {
                peak = peak.max(ProcStats::read(pid).rss_kib);
                if flag.load(Ordering::Acquire) {
                    return peak;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        RssSampler { stop, thread }
    }

    pub fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Release);
        self.thread.join().unwrap_or(0)
    }
}
