//! Counters for `/metrics` (Prometheus text format) and `/healthz`.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Default)]
pub struct Metrics {
    pub connections_total: AtomicU64,
    pub connections_open: AtomicU64,
    pub connections_banned: AtomicU64,
    pub sessions_open: AtomicU64,
    pub messages_delivered: AtomicU64,
    pub messages_stored: AtomicU64,
    pub messages_flushed: AtomicU64,
    pub messages_duplicate: AtomicU64,
    pub takeovers: AtomicU64,
    pub errors: AtomicU64,
    pub store_errors: AtomicU64,
    /// Live messages the write-behind stored (not acknowledged in time).
    pub messages_written_behind: AtomicU64,
    /// Live messages acknowledged before the write-behind came: never written.
    pub messages_acked_unwritten: AtomicU64,
}

pub fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

pub fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

pub fn dec(c: &AtomicU64) {
    c.fetch_sub(1, Ordering::Relaxed);
}

impl Metrics {
    pub fn render(&self, online: usize, cluster: Option<ClusterFigures>) -> String {
        let rows: [(&str, &str, &str, &AtomicU64); 13] = [
            (
                "pigeon_connections_total",
                "counter",
                "Connections accepted.",
                &self.connections_total,
            ),
            (
                "pigeon_connections_open",
                "gauge",
                "Connections open now (HTTP and WebSocket).",
                &self.connections_open,
            ),
            (
                "pigeon_connections_banned_total",
                "counter",
                "Connections dropped on accept: their address was closed for flooding too often.",
                &self.connections_banned,
            ),
            (
                "pigeon_sessions_open",
                "gauge",
                "WebSocket sessions open now.",
                &self.sessions_open,
            ),
            (
                "pigeon_messages_delivered_total",
                "counter",
                "Messages handed to a live session when sent.",
                &self.messages_delivered,
            ),
            (
                "pigeon_messages_stored_total",
                "counter",
                "Messages stored for an offline or lagging recipient.",
                &self.messages_stored,
            ),
            (
                "pigeon_messages_written_behind_total",
                "counter",
                "Live messages stored by the write-behind: not acknowledged within storage.write_behind_ms.",
                &self.messages_written_behind,
            ),
            (
                "pigeon_messages_acked_unwritten_total",
                "counter",
                "Live messages acknowledged before the write-behind: never written to the store.",
                &self.messages_acked_unwritten,
            ),
            (
                "pigeon_messages_flushed_total",
                "counter",
                "Messages written from a mailbox (login flush and catch-up).",
                &self.messages_flushed,
            ),
            (
                "pigeon_messages_duplicate_total",
                "counter",
                "Sends dropped as retries of a known client id.",
                &self.messages_duplicate,
            ),
            (
                "pigeon_takeovers_total",
                "counter",
                "Sessions replaced by a newer login of the same user.",
                &self.takeovers,
            ),
            (
                "pigeon_errors_total",
                "counter",
                "Error frames sent to clients.",
                &self.errors,
            ),
            (
                "pigeon_store_errors_total",
                "counter",
                "Store operations that failed.",
                &self.store_errors,
            ),
        ];
        let mut out = String::with_capacity(2048);
        for (name, kind, help, value) in rows {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {}",
                value.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP pigeon_users_online Users with a live session.\n# TYPE pigeon_users_online gauge\npigeon_users_online {online}"
        );
        if let Some(c) = cluster {
            let rows: [(&str, &str, u64); 3] = [
                (
                    "pigeon_cluster_forwarded_out_total",
                    "Messages handed to another node.",
                    c.forwarded_out,
                ),
                (
                    "pigeon_cluster_forwarded_in_total",
                    "Messages received from another node.",
                    c.forwarded_in,
                ),
                (
                    "pigeon_cluster_presence_conflicts_total",
                    "Logins that replaced a session on another node.",
                    c.presence_conflicts,
                ),
            ];
            for (name, help, value) in rows {
                let _ = writeln!(
                    out,
                    "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
                );
            }
            let _ = writeln!(
                out,
                "# HELP pigeon_cluster_degraded 1 while Redis is unreachable.\n# TYPE pigeon_cluster_degraded gauge\npigeon_cluster_degraded {}",
                u8::from(c.degraded)
            );
        }
        out
    }
}

/// A cluster node's own figures, as `/metrics` shows them.
#[derive(Debug, Clone, Copy, Default)]
pub struct ClusterFigures {
    pub forwarded_out: u64,
    pub forwarded_in: u64,
    pub presence_conflicts: u64,
    /// Redis is unreachable.
    pub degraded: bool,
}
