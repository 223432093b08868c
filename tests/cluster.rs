//! Cluster mode: several nodes on one Redis and one MongoDB behave as one server.
//! Needs `PIGEON_TEST_REDIS_URL` and `PIGEON_TEST_MONGODB_URI` (`.ci/run` starts both).
mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{
    free_port, service_from_env, test_config, unique_name, Client, ServerProcess, TestServer,
};
use pigeon::config::Config;
use serde_json::{json, Value};

/// Node configs sharing one Redis and one (fresh) MongoDB database.
fn cluster_configs(n: usize) -> Option<(Vec<Config>, Vec<tempfile::TempDir>, String, String)> {
    let redis = service_from_env("PIGEON_TEST_REDIS_URL")?;
    let mongo = service_from_env("PIGEON_TEST_MONGODB_URI")?;
    let db = unique_name("cluster");
    let mut configs = Vec::new();
    let mut dirs = Vec::new();
    for i in 0..n {
        let dir = tempfile::tempdir().unwrap();
        let mut c = test_config(dir.path());
        c.storage.backend = "mongodb".into();
        c.storage.mongodb_uri = mongo.clone();
        c.storage.mongodb_database = db.clone();
        c.cluster.redis_url = redis.clone();
        c.cluster.node_id = format!("{db}-n{i}");
        configs.push(c);
        dirs.push(dir);
    }
    Some((configs, dirs, redis, mongo))
}

async fn start_nodes(n: usize) -> Option<(Vec<TestServer>, Vec<tempfile::TempDir>)> {
    let (configs, dirs, _, _) = cluster_configs(n)?;
    let mut nodes = Vec::new();
    for c in configs {
        nodes.push(TestServer::start(c).await);
    }
    Some((nodes, dirs))
}

fn base(s: &TestServer) -> String {
    format!("ws://{}", s.addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_node_chat_in_every_dialect() {
    let Some((nodes, _dirs)) = start_nodes(2).await else {
        return;
    };
    let (a, b) = (&nodes[0], &nodes[1]);
    let (mut pia, _) = Client::pigeon(&base(b), "pia").await;
    let mut sara = Client::connect(&b.url("/ws/sara")).await;
    let mut hugo = Client::connect(&a.url("/ws")).await;
    hugo.text("hugo#hello pia#pia").await;
    assert_eq!(
        hugo.recv().await,
        "send success",
        "cross-node delivery is `send success` without Out Line"
    );
    let m = pia.json().await;
    assert_eq!(
        (m["from"].as_str(), m["body"].as_str()),
        (Some("hugo"), Some("hello pia"))
    );
    hugo.text("hugo#hello sara#sara").await;
    assert_eq!(hugo.recv().await, "send success");
    let m = sara.json().await;
    assert_eq!(
        (m["from_user"].as_str(), m["msg"].as_str()),
        (Some("hugo"), Some("hello sara"))
    );
    // And back, from node B to node A.
    sara.text(r#"{"to_user":"hugo","msg":"hi hugo"}"#).await;
    assert_eq!(hugo.recv().await, "sara#hi hugo#hugo");
    let sent = pia.send_msg("p1", "hugo", json!("from pia")).await;
    assert_eq!(sent["status"], "delivered");
    assert_eq!(hugo.recv().await, "pia#from pia#hugo");
    for n in nodes {
        n.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_on_one_node_flushed_on_another() {
    let Some((nodes, _dirs)) = start_nodes(2).await else {
        return;
    };
    let (mut ann, _) = Client::pigeon(&base(&nodes[0]), "ann").await;
    for i in 0..5 {
        assert_eq!(
            ann.send_msg(&i.to_string(), "ben", json!(i)).await["status"],
            "stored"
        );
    }
    let (mut ben, flushed) = Client::pigeon(&base(&nodes[1]), "ben").await;
    let bodies: Vec<i64> = flushed
        .iter()
        .map(|m| m["body"].as_i64().unwrap())
        .collect();
    assert_eq!(bodies, [0, 1, 2, 3, 4]);
    assert_eq!(
        ann.send_msg("live", "ben", json!("live")).await["status"],
        "delivered"
    );
    assert_eq!(ben.json().await["body"], "live");
    for n in nodes {
        n.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_on_another_node_takes_over() {
    let Some((nodes, _dirs)) = start_nodes(2).await else {
        return;
    };
    let (mut old, _) = Client::pigeon(&base(&nodes[0]), "alice").await;
    let (mut bob, _) = Client::pigeon(&base(&nodes[1]), "bob").await;
    for i in 0..3 {
        assert_eq!(
            bob.send_msg(&i.to_string(), "alice", json!(i)).await["status"],
            "delivered"
        );
    }
    for _ in 0..3 {
        assert_eq!(old.json().await["type"], "msg"); // read, never acknowledged
    }
    let (mut new, flushed) = Client::pigeon(&base(&nodes[1]), "alice").await;
    let (closed, texts) = old.closed().await;
    assert_eq!(closed.code, 4000);
    let kicked: Value = serde_json::from_str(texts.last().unwrap()).unwrap();
    assert_eq!(kicked["type"], "kicked");
    let bodies: Vec<i64> = flushed
        .iter()
        .map(|m| m["body"].as_i64().unwrap())
        .collect();
    assert_eq!(
        bodies,
        [0, 1, 2],
        "the new session gets what the old one did not acknowledge"
    );
    // Traffic now goes to the new node.
    assert_eq!(
        bob.send_msg("after", "alice", json!("after")).await["status"],
        "delivered"
    );
    assert_eq!(new.json().await["body"], "after");
    for n in nodes {
        n.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_logins_on_three_nodes_leave_one_session() {
    let Some((nodes, _dirs)) = start_nodes(3).await else {
        return;
    };
    let urls: Vec<String> = nodes.iter().map(|n| n.url("/ws/dave")).collect();
    let logins: Vec<_> = (0..9)
        .map(|k| {
            let url = urls[k % 3].clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis((k as u64) * 5)).await;
                let mut c = Client::connect(&url).await;
                loop {
                    match c.try_recv(Duration::from_millis(2500)).await {
                        Some(t) => {
                            let v: Value = serde_json::from_str(&t).unwrap();
                            if v["error"] == "kicked" {
                                return true;
                            }
                        }
                        None => return false,
                    }
                }
            })
        })
        .collect();
    let mut survivors = 0;
    for h in logins {
        if !h.await.unwrap() {
            survivors += 1;
        }
    }
    assert_eq!(
        survivors, 1,
        "exactly one of the nine sessions must stay live"
    );
    for n in nodes {
        n.stop().await;
    }
}

/// A node dies (SIGKILL) while messages for one of its users are in flight from another
/// node: every message the sender was told about is delivered when the user comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_node_loses_nothing_acknowledged() {
    let Some((configs, _dirs, redis, mongo)) = cluster_configs(2) else {
        return;
    };
    let db = configs[0].storage.mongodb_database.clone();
    let dir = tempfile::tempdir().unwrap();
    let env = [
        ("PIGEON_STORAGE_BACKEND", "mongodb"),
        ("PIGEON_STORAGE_MONGODB_URI", mongo.as_str()),
        ("PIGEON_STORAGE_MONGODB_DATABASE", db.as_str()),
        ("PIGEON_CLUSTER_REDIS_URL", redis.as_str()),
    ];
    let mut doomed = ServerProcess::spawn(dir.path(), free_port(), &env).await;
    let survivor = TestServer::start(configs[1].clone()).await;
    let (mut bob, _) = Client::pigeon(&format!("ws://{}", doomed.addr), "bob").await;
    let (mut ann, _) = Client::pigeon(&base(&survivor), "ann").await;
    let total = 300;
    for i in 0..total {
        ann.send_json(json!({"type":"send","id":format!("m{i}"),"to":"bob","body":i}))
            .await;
    }
    let mut confirmed = BTreeSet::new();
    while confirmed.len() < total / 3 {
        let v = ann.json().await;
        assert_eq!(v["type"], "sent", "{v}");
        confirmed.insert(v["id"].as_str().unwrap()[1..].parse::<i64>().unwrap());
    }
    let _ = bob.try_recv(Duration::from_millis(10)).await;
    doomed.kill9();
    // The rest of the answers still come (to the store, as bob's node is gone).
    while confirmed.len() < total {
        let v = ann.json().await;
        assert_eq!(v["type"], "sent", "{v}");
        confirmed.insert(v["id"].as_str().unwrap()[1..].parse::<i64>().unwrap());
    }
    let (_bob, flushed) = Client::pigeon(&base(&survivor), "bob").await;
    let got: BTreeSet<i64> = flushed
        .iter()
        .map(|m| m["body"].as_i64().unwrap())
        .collect();
    let missing: Vec<_> = confirmed.difference(&got).collect();
    assert!(missing.is_empty(), "acknowledged but lost: {missing:?}");
    survivor.stop().await;
}

/// Losing Redis: the node keeps serving local users, reports itself degraded, and
/// recovers when Redis is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_redis_degrades_and_recovers() {
    let Some(mongo) = service_from_env("PIGEON_TEST_MONGODB_URI") else {
        return;
    };
    let Some(_) = service_from_env("PIGEON_TEST_REDIS_URL") else {
        return;
    };
    let port = free_port();
    let start_redis = || {
        RedisProcess(
            std::process::Command::new("redis-server")
                .args([
                    "--port",
                    &port.to_string(),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("redis-server must be installed for the cluster tests"),
        )
    };
    let redis = start_redis();
    let url = format!("redis://127.0.0.1:{port}/");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "redis did not start"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut c = test_config(dir.path());
    c.storage.backend = "mongodb".into();
    c.storage.mongodb_uri = mongo;
    c.storage.mongodb_database = unique_name("degraded");
    c.cluster.redis_url = url;
    let node = TestServer::start(c).await;
    let health = || async {
        let body = common::http_get(node.addr, "/healthz").await;
        serde_json::from_str::<Value>(body.split("\r\n\r\n").nth(1).unwrap_or("{}"))
            .unwrap_or(Value::Null)
    };
    assert_eq!(health().await["status"], "ok");

    drop(redis);
    let (mut a, _) = Client::pigeon(&base(&node), "a").await;
    let (mut b, _) = Client::pigeon(&base(&node), "b").await;
    assert_eq!(
        a.send_msg("1", "b", json!("local still works")).await["status"],
        "delivered"
    );
    assert_eq!(b.json().await["body"], "local still works");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while health().await["status"] != "degraded" {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never reported degraded"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _redis = start_redis();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while health().await["status"] != "ok" {
        assert!(tokio::time::Instant::now() < deadline, "never recovered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    node.stop().await;
}

/// A Redis server of the test's own, stopped when dropped (also when the test fails).
struct RedisProcess(std::process::Child);

impl Drop for RedisProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
