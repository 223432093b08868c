//! Scenario: hostile clients. The pairs measurement on one Pigeon, calm and then while
//! the attackers (`attack.rs`, in a process of their own) run; the p99 ratio is the
//! figure that counts.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Result;

use crate::cli::{Cli, Peer};
use crate::client::Dialect;
use crate::pairs::pairs_measure;
use crate::procstat::{ProcStats, RssSampler};
use crate::results::{row, Figure, Row};
use crate::servers::start;

/// Hostile clients: the same pairs measurement on one Pigeon, first calm, then while
/// slowloris sockets, never-reading sessions (with senders pushing at them) and ping
/// flooders run. Target: other users' p99 within 2× of calm.
pub async fn rows(cli: &Cli) -> Vec<Row> {
    // The per-connection frame limit is Pigeon's defence here; set above what one pairs
    // user sends at window 1 (~1,000/s), far below what a flooder does.
    let env = [
        ("PIGEON_LIMITS_MAILBOX_MAX", "1000000".to_string()),
        ("PIGEON_LIMITS_WRITE_TIMEOUT_SECS", "600".to_string()),
        ("PIGEON_LIMITS_RATE_PER_SEC", "3000".to_string()),
        ("PIGEON_LIMITS_RATE_BURST", "6000".to_string()),
    ];
    let scenario = format!("hostile: pairs {} w=1 hash", cli.hostile_pairs);
    let server = match start(cli, Peer::Pigeon, &env).await {
        Ok(s) => s,
        Err(e) => {
            return vec![row(
                &scenario,
                "pigeon",
                Ok(Figure::Unavailable(format!("{e:#}"))),
            )]
        }
    };
    // The same measurement twice: calm, then under attack.
    let servers = [&server];
    let measure = || {
        pairs_measure(
            cli,
            &servers,
            None,
            cli.hostile_pairs,
            1,
            Dialect::Hash,
            "pigeon",
        )
    };
    let calm = measure().await;
    // The attackers run in a process of their own (one thread), so that the measuring
    // clients here are not starved by attack tasks on their own runtime.
    let attacker = match Command::new(std::env::current_exe().unwrap_or_else(|_| "load".into()))
        .args(["attack", &server.addr.to_string(), &cli.hostile_kinds])
        .arg(cli.hostiles.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            return vec![row(
                &scenario,
                "pigeon",
                Ok(Figure::Unavailable(format!(
                    "cannot start the attackers: {e}"
                ))),
            )]
        }
    };
    let attacker = ChildGuard(attacker);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_before = server.stats().rss_kib;
    let peak = RssSampler::start(server.pid);
    let attacker_before = ProcStats::read(attacker.0.id() as i32);
    let t0 = Instant::now();
    let loud = measure().await;
    let rss_after = server.stats().rss_kib;
    let rss_peak = peak.stop();
    let attacker_cpu = (ProcStats::read(attacker.0.id() as i32).cpu_s - attacker_before.cpu_s)
        / t0.elapsed().as_secs_f64()
        * 100.0;
    drop(attacker);
    let p99 = |f: &Result<Figure>| match f {
        Ok(Figure::Rate { hist: Some(h), .. }) => Some(h.value_at_quantile(0.99)),
        _ => None,
    };
    let note = match (p99(&calm), p99(&loud)) {
        (Some(a), Some(b)) if a > 0 => format!(
            "p99 under attack / calm = {:.2}× (target ≤ 2×); RSS during the attack {} → {} MiB \
             (peak {} MiB); attackers' process {attacker_cpu:.0}% CPU",
            b as f64 / a as f64,
            rss_before / 1024,
            rss_after / 1024,
            rss_peak / 1024
        ),
        _ => "no p99 to compare".into(),
    };
    let mut calm_row = row(&scenario, "pigeon calm", calm);
    calm_row.note = "no hostile clients".into();
    let mut loud_row = row(&scenario, "pigeon attacked", loud);
    loud_row.note = format!(
        "{} each of {} (sink: a never-reading session with 100 msg/s of 1 KiB pushed at it); {note}",
        cli.hostiles, cli.hostile_kinds
    );
    vec![calm_row, loud_row]
}

/// Kills the child when dropped.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
