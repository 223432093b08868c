//! What a measurement gives (`Figure`), one line of the table (`Row`), and how rounds
//! of the same measurement add up (`merge`).

use anyhow::Result;
use hdrhistogram::Histogram;

#[derive(Debug, Clone)]
pub enum Figure {
    /// msgs/s with latency histogram (µs), server CPU seconds and peak RSS.
    Rate {
        rate: f64,
        hist: Option<Histogram<u64>>,
        cpu_s: f64,
        /// The load generator's own CPU seconds over the same interval.
        gen_cpu_s: f64,
        wall_s: f64,
        msgs: u64,
        peak_rss_kib: u64,
        /// The MongoDB server's CPU seconds over the same interval, when it was measured.
        store_cpu_s: Option<f64>,
    },
    /// Idle sessions: RSS per session.
    Idle {
        sessions: usize,
        per_session_kib: f64,
        rss_before_kib: u64,
        rss_after_kib: u64,
        peak_rss_kib: u64,
    },
    /// One blob transfer: bytes over wall time, and the server's RSS around it.
    Blob {
        bytes: u64,
        wall_s: f64,
        cpu_s: f64,
        gen_cpu_s: f64,
        /// VmRSS just before the transfer.
        rss_before_kib: u64,
        /// Highest VmRSS sampled every 50 ms during the transfer.
        rss_peak_kib: u64,
    },
    Unavailable(String),
}

#[derive(Debug, Clone)]
pub struct Row {
    pub scenario: String,
    pub server: String,
    pub figure: Figure,
    pub note: String,
}

/// Adds up two rounds of the same measurement; an error or "not available" wins.
pub fn merge(acc: Option<Result<Figure>>, next: Result<Figure>) -> Result<Figure> {
    let Some(acc) = acc else { return next };
    match (acc?, next?) {
        (
            Figure::Rate {
                hist: h1,
                cpu_s: c1,
                gen_cpu_s: g1,
                wall_s: w1,
                msgs: m1,
                peak_rss_kib: r1,
                rate: rate1,
                store_cpu_s: s1,
            },
            Figure::Rate {
                hist: h2,
                cpu_s: c2,
                gen_cpu_s: g2,
                wall_s: w2,
                msgs: m2,
                peak_rss_kib: r2,
                rate: rate2,
                store_cpu_s: s2,
            },
        ) => {
            let hist = match (h1, h2) {
                (Some(mut a), Some(b)) => {
                    a.add(&b)?;
                    Some(a)
                }
                (a, b) => a.or(b),
            };
            // Each rate is msgs over its own measured time: time = msgs / rate.
            let time = |m: u64, r: f64| if r > 0.0 { m as f64 / r } else { 0.0 };
            let total_time = time(m1, rate1) + time(m2, rate2);
            Ok(Figure::Rate {
                rate: if total_time > 0.0 {
                    (m1 + m2) as f64 / total_time
                } else {
                    0.0
                },
                hist,
                cpu_s: c1 + c2,
                gen_cpu_s: g1 + g2,
                wall_s: w1 + w2,
                msgs: m1 + m2,
                peak_rss_kib: r1.max(r2),
                store_cpu_s: s1.zip(s2).map(|(a, b)| a + b),
            })
        }
        (
            Figure::Blob {
                bytes: b1,
                wall_s: w1,
                cpu_s: c1,
                gen_cpu_s: g1,
                rss_before_kib: rb1,
                rss_peak_kib: rp1,
            },
            Figure::Blob {
                bytes: b2,
                wall_s: w2,
                cpu_s: c2,
                gen_cpu_s: g2,
                rss_before_kib: rb2,
                rss_peak_kib: rp2,
            },
        ) => {
            // Throughput over all rounds; the round with the larger RSS growth.
            let (rss_before_kib, rss_peak_kib) =
                if rp2.saturating_sub(rb2) > rp1.saturating_sub(rb1) {
                    (rb2, rp2)
                } else {
                    (rb1, rp1)
                };
            Ok(Figure::Blob {
                bytes: b1 + b2,
                wall_s: w1 + w2,
                cpu_s: c1 + c2,
                gen_cpu_s: g1 + g2,
                rss_before_kib,
                rss_peak_kib,
            })
        }
        (a @ Figure::Unavailable(_), _) => Ok(a),
        (_, b) => Ok(b),
    }
}

pub fn row(scenario: &str, server: &str, figure: Result<Figure>) -> Row {
    let figure = figure.unwrap_or_else(|e| Figure::Unavailable(format!("failed: {e:#}")));
    Row {
        scenario: scenario.to_string(),
        server: server.to_string(),
        figure,
        note: String::new(),
    }
}
