//! Scenario: cluster pairs, the pairs measurement with each pair's two users on two
//! Pigeon nodes (one Redis, one MongoDB database), next to the same on one node.

use anyhow::Result;

use crate::cli::{Cli, Peer};
use crate::client::Dialect;
use crate::pairs::pairs_measure;
use crate::results::{merge, row, Figure, Row};
use crate::servers::{fresh_db, mongo_env, mongo_pid, start, start_redis, Server};

/// Two rows: Pigeon on two nodes, and on one.
pub async fn rows(cli: &Cli) -> Vec<Row> {
    let mut rows = Vec::new();
    // Rounds interleave the two set-ups like pairs does.
    let mut two = None;
    let mut one = None;
    for _ in 0..cli.rounds.max(1) {
        two = Some(merge(two.take(), cluster_run(cli, 2).await));
        one = Some(merge(one.take(), cluster_run(cli, 1).await));
    }
    let scenario = format!("cluster pairs {} w=1 hash", cli.cluster_pairs);
    let note = format!("store: {}, not MongoDB", cli.mongodb_label);
    for (label, f) in [("pigeon 2 nodes", two), ("pigeon 1 node", one)] {
        if let Some(f) = f {
            let mut r = row(&scenario, label, f);
            r.note.clone_from(&note);
            rows.push(r);
        }
    }
    rows
}

/// Cluster pairs: hash dialect, window 1, on `nodes` Pigeon nodes sharing one MongoDB
/// database (and, for more than one node, a fresh Redis); user `2k` is on node 0 and
/// its partner `2k+1` on node 1.
async fn cluster_run(cli: &Cli, nodes: usize) -> Result<Figure> {
    let mut env = match mongo_env(cli, &fresh_db("cluster")) {
        Ok(env) => env,
        Err(e) => return Ok(Figure::Unavailable(format!("{e:#}"))),
    };
    env.push(("PIGEON_LIMITS_MAILBOX_MAX", "10000".into()));
    let _redis = if nodes > 1 {
        let redis = match start_redis(cli).await {
            Ok(r) => r,
            Err(e) => return Ok(Figure::Unavailable(format!("{e:#}"))),
        };
        env.push((
            "PIGEON_CLUSTER_REDIS_URL",
            format!("redis://{}/", redis.addr),
        ));
        Some(redis)
    } else {
        None
    };
    let mut servers = Vec::new();
    for k in 0..nodes {
        let mut env = env.clone();
        if nodes > 1 {
            env.push(("PIGEON_CLUSTER_NODE_ID", format!("node{k}")));
        }
        match start(cli, Peer::Pigeon, &env).await {
            Ok(s) => servers.push(s),
            Err(e) => return Ok(Figure::Unavailable(format!("{e:#}"))),
        }
    }
    let refs: Vec<&Server> = servers.iter().collect();
    let store = mongo_pid(cli);
    pairs_measure(
        cli,
        &refs,
        store,
        cli.cluster_pairs,
        1,
        Dialect::Hash,
        "pigeon",
    )
    .await
}
