//! The results table printed at the end of a run: one line per row, ratios to Pigeon's
//! figure for the same scenario.

use std::fmt::Write as _;

use hdrhistogram::Histogram;

use crate::cli::Cli;
use crate::results::{Figure, Row};

pub fn print_table(cli: &Cli, nofile: u64, rows: &[Row]) {
    let pigeon_of = |scenario: &str| {
        rows.iter()
            .find(|r| r.scenario == scenario && r.server.starts_with("pigeon"))
            .map(|r| r.figure.clone())
    };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\nPigeon load bench — pairs: {} round(s) × {} s measured (+{} s warm-up) per server; \
         loopback; nproc {}; open-files limit {nofile}",
        cli.rounds,
        cli.seconds,
        cli.warmup,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
    );
    let _ = writeln!(
        out,
        "ratio = Pigeon ÷ this server (throughput: >1 means Pigeon is faster; \
         idle: <1 means Pigeon uses less memory); cluster: 2 nodes ÷ this row; \
         MB = 10^6 bytes; blob peak RSS = highest VmRSS sampled every 50 ms\n"
    );
    let _ = writeln!(
        out,
        "| {:<28} | {:<14} | {:>15} | {:>6} | {:>8} | {:>8} | {:>8} | {:>6} | {:>9} | {:>9} | {:>9} |",
        "scenario",
        "server",
        "result",
        "ratio",
        "p50 µs",
        "p99 µs",
        "p99.9 µs",
        "CPU %",
        "CPU µs/msg",
        "peak RSS",
        "gen CPU %"
    );
    let _ = writeln!(
        out,
        "|{:-<30}|{:-<16}|{:-<17}|{:-<8}|{:-<10}|{:-<10}|{:-<10}|{:-<8}|{:-<11}|{:-<11}|{:-<11}|",
        "", "", "", "", "", "", "", "", "", "", ""
    );
    for r in rows {
        let reference = pigeon_of(&r.scenario);
        let line = match &r.figure {
            Figure::Rate {
                rate,
                hist,
                cpu_s,
                gen_cpu_s,
                wall_s,
                msgs,
                peak_rss_kib,
                store_cpu_s,
            } => {
                let ratio = match reference {
                    Some(Figure::Rate { rate: p, .. }) if *rate > 0.0 => {
                        format!("{:.2}×", p / rate)
                    }
                    _ => "-".into(),
                };
                let q = |h: &Option<Histogram<u64>>, p: f64| {
                    h.as_ref()
                        .filter(|h| !h.is_empty())
                        .map_or("-".to_string(), |h| h.value_at_quantile(p).to_string())
                };
                // /proc counts CPU time in clock ticks (10 ms): below 5 ticks, no figure.
                let cpu = |c: f64, f: String| if c < 0.05 { "-".to_string() } else { f };
                format!(
                    "| {:<28} | {:<14} | {:>9.0} msg/s | {:>6} | {:>8} | {:>8} | {:>8} | {:>6} | {:>10} | {:>5} MiB | {:>9} |",
                    r.scenario,
                    r.server,
                    rate,
                    ratio,
                    q(hist, 0.5),
                    q(hist, 0.99),
                    q(hist, 0.999),
                    cpu(*cpu_s, format!("{:.0}", 100.0 * cpu_s / wall_s.max(1e-9))),
                    cpu(*cpu_s, format!("{:.1}", 1e6 * cpu_s / (*msgs).max(1) as f64)),
                    peak_rss_kib / 1024,
                    cpu(
                        *gen_cpu_s,
                        format!("{:.0}", 100.0 * gen_cpu_s / wall_s.max(1e-9))
                    ),
                ) + &store_cpu_s
                    .filter(|c| *c >= 0.05)
                    .map(|c| format!(" MongoDB server CPU {:.0} %", 100.0 * c / wall_s.max(1e-9)))
                    .unwrap_or_default()
            }
            Figure::Idle {
                sessions,
                per_session_kib,
                rss_before_kib,
                rss_after_kib,
                peak_rss_kib,
            } => {
                let ratio = match reference {
                    Some(Figure::Idle {
                        per_session_kib: p, ..
                    }) if *per_session_kib > 0.0 => format!("{:.2}×", p / per_session_kib),
                    _ => "-".into(),
                };
                format!(
                    "| {:<28} | {:<14} | {:>8.2} KiB/ses | {:>6} | {:>8} | {:>8} | {:>8} | {:>6} | {:>10} | {:>5} MiB | {:>9} | RSS {} → {} MiB for {} sessions",
                    r.scenario,
                    r.server,
                    per_session_kib,
                    ratio,
                    "-",
                    "-",
                    "-",
                    "-",
                    "-",
                    peak_rss_kib / 1024,
                    "-",
                    rss_before_kib / 1024,
                    rss_after_kib / 1024,
                    sessions,
                )
            }
            Figure::Blob {
                bytes,
                wall_s,
                cpu_s,
                gen_cpu_s,
                rss_before_kib,
                rss_peak_kib,
            } => {
                let mb_s = *bytes as f64 / 1e6 / wall_s.max(1e-9);
                let ratio = match reference {
                    Some(Figure::Blob {
                        bytes: b,
                        wall_s: w,
                        ..
                    }) if mb_s > 0.0 => {
                        format!("{:.2}×", (b as f64 / 1e6 / w.max(1e-9)) / mb_s)
                    }
                    _ => "-".into(),
                };
                format!(
                    "| {:<28} | {:<14} | {:>10.0} MB/s | {:>6} | {:>8} | {:>8} | {:>8} | {:>6.0} | {:>10} | {:>5} MiB | {:>9.0} | RSS {} → peak {} MiB: +{:.1} MiB",
                    r.scenario,
                    r.server,
                    mb_s,
                    ratio,
                    "-",
                    "-",
                    "-",
                    100.0 * cpu_s / wall_s.max(1e-9),
                    "-",
                    rss_peak_kib / 1024,
                    100.0 * gen_cpu_s / wall_s.max(1e-9),
                    rss_before_kib / 1024,
                    rss_peak_kib / 1024,
                    rss_peak_kib.saturating_sub(*rss_before_kib) as f64 / 1024.0,
                )
            }
            Figure::Unavailable(why) => {
                format!("| {:<28} | {:<14} | {why}", r.scenario, r.server)
            }
        };
        let _ = write!(out, "{line}");
        if !r.note.is_empty() && !matches!(r.figure, Figure::Unavailable(_)) {
            let _ = write!(out, " ({})", r.note);
        }
        let _ = writeln!(out);
    }
    print!("{out}");
}
