//! Crash loop: the server subprocess is killed with SIGKILL five times under mixed load
//! and restarted on the same data directory each time.
//!
//! Load per round: three Pigeon JSON senders writing to an online recipient (`ron`, who
//! acknowledges as he goes and is taken over by a second login of himself mid-round)
//! and to a recipient who is offline in some rounds and online in others (`olga`), plus a
//! 64 KiB blob in two rounds. The kill lands at a different moment each round.
//!
//! At the end every send answered with `sent` was delivered to its recipient exactly
//! once counted by seq (delivery is at-least-once across reconnects: a recipient may see
//! a seq again and drops it), never two different seqs for one (sender, id), nothing
//! refused, and per sender the ids arrive in the order they were sent.
mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{free_port, Client, Frame, ServerProcess};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

const ROUNDS: usize = 5;
/// How long each round's traffic runs before the kill (ms).
const ROUND_MS: [u64; ROUNDS] = [1500, 2500, 1200, 3000, 2000];

/// A message a recipient saw: (sender, id, seq).
type Got = (String, String, u64);

/// Logs in on `/ws?user=`; returns the client and the flushed frames, or `None` when the
/// server went away meanwhile.
async fn login(base: &str, user: &str) -> Option<(Client, Vec<Value>)> {
    let mut c = Client::connect(&format!("{base}/ws?user={user}")).await;
    let mut flushed = Vec::new();
    loop {
        match c.next_or_close().await {
            Ok(Frame::Text(t)) => {
                let v: Value = serde_json::from_str(&t).ok()?;
                match v["type"].as_str() {
                    Some("synced") => return Some((c, flushed)),
                    Some("welcome") => {}
                    _ => flushed.push(v),
                }
            }
            Ok(Frame::Binary(_)) => {}
            Err(_) => return None,
        }
    }
}

/// Records what a recipient receives (messages and finished blobs), acknowledging every
/// tenth one, until its socket ends (kill, take-over).
struct Inbox {
    user: String,
    got: Arc<Mutex<Vec<(String, Got)>>>,
    streams: HashMap<u64, (String, String)>,
    since_ack: u32,
}

impl Inbox {
    fn new(user: &str, got: Arc<Mutex<Vec<(String, Got)>>>) -> Inbox {
        Inbox {
            user: user.to_string(),
            got,
            streams: HashMap::new(),
            since_ack: 0,
        }
    }

    /// Takes one frame; returns the seq to acknowledge, if it is time to.
    fn take(&mut self, v: &Value) -> Option<u64> {
        let got = match v["type"].as_str() {
            Some("msg") => Some((
                v["from"].as_str()?.to_string(),
                v["id"].as_str()?.to_string(),
                v["seq"].as_u64()?,
            )),
            Some("blob_start") => {
                self.streams.insert(
                    v["stream"].as_u64()?,
                    (
                        v["from"].as_str()?.to_string(),
                        v["id"].as_str()?.to_string(),
                    ),
                );
                None
            }
            Some("blob_end") => {
                let (from, id) = self.streams.remove(&v["stream"].as_u64()?)?;
                Some((from, id, v["seq"].as_u64()?))
            }
            _ => None,
        }?;
        let seq = got.2;
        self.got.lock().unwrap().push((self.user.clone(), got));
        self.since_ack += 1;
        if self.since_ack >= 10 {
            self.since_ack = 0;
            return Some(seq);
        }
        None
    }

    async fn run(mut self, mut c: Client, flushed: Vec<Value>) {
        for v in &flushed {
            self.take(v);
        }
        loop {
            match c.next_or_close().await {
                Ok(Frame::Text(t)) => {
                    let Ok(v) = serde_json::from_str::<Value>(&t) else {
                        continue;
                    };
                    if let Some(seq) = self.take(&v) {
                        let ack = json!({"type":"ack","upto":seq}).to_string();
                        if c.try_send(Message::text(ack)).await.is_err() {
                            return;
                        }
                    }
                }
                Ok(Frame::Binary(_)) => {}
                Err(_) => return,
            }
        }
    }
}

/// What one sender did over the whole run.
#[derive(Default)]
struct Sent {
    /// (id, recipient) answered with `sent`.
    confirmed: Vec<(String, String)>,
    /// Every id sent, answered or not.
    attempted: BTreeSet<String>,
    /// Anything but `sent` (must stay empty).
    refused: Vec<Value>,
    next: u64,
}

/// The answer to the last request, or `None` once the server is gone.
/// The server's next answer, passing over receipts (they come whenever a recipient acks).
async fn answer(c: &mut Client) -> Option<Value> {
    loop {
        match c.next_or_close().await {
            Ok(Frame::Text(t)) => {
                let v = serde_json::from_str::<Value>(&t).ok()?;
                if v["type"] != "receipt" {
                    return Some(v);
                }
            }
            _ => return None,
        }
    }
}

/// Sends until the server dies; a 64 KiB blob to olga first when `blob`.
async fn sender(base: String, me: String, log: Sent, blob: bool) -> (String, Sent) {
    let log = send_until_killed(&base, &me, log, blob).await;
    (me, log)
}

async fn send_until_killed(base: &str, me: &str, mut log: Sent, blob: bool) -> Sent {
    let Some((mut c, _)) = login(base, me).await else {
        return log;
    };
    if blob {
        log.next += 1;
        let id = format!("{me}-{:06}", log.next);
        let announce = json!({"type":"blob","id":id,"to":"olga","name":"b.bin","mime":"application/octet-stream","size":65536});
        log.attempted.insert(id.clone());
        if c.try_send(Message::text(announce.to_string()))
            .await
            .is_err()
        {
            return log;
        }
        let Some(v) = answer(&mut c).await else {
            return log;
        };
        if v["type"] != "blob_accepted" {
            log.refused.push(v);
            return log;
        }
        let mut frame = (v["stream"].as_u64().unwrap_or(0) as u32)
            .to_be_bytes()
            .to_vec();
        frame.extend(vec![b'b'; 65536]);
        if c.try_send(Message::binary(frame)).await.is_err() {
            return log;
        }
        let Some(v) = answer(&mut c).await else {
            return log;
        };
        match v["type"].as_str() {
            Some("sent") => log.confirmed.push((id, "olga".into())),
            _ => log.refused.push(v),
        }
    }
    loop {
        log.next += 1;
        let id = format!("{me}-{:06}", log.next);
        let to = if log.next.is_multiple_of(2) {
            "ron"
        } else {
            "olga"
        };
        let send = json!({"type":"send","id":id,"to":to,"body":log.next});
        log.attempted.insert(id.clone());
        if c.try_send(Message::text(send.to_string())).await.is_err() {
            return log;
        }
        let Some(v) = answer(&mut c).await else {
            return log;
        };
        match v["type"].as_str() {
            Some("sent") => log.confirmed.push((id, to.into())),
            _ => log.refused.push(v),
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_loop_loses_and_duplicates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let env = [("PIGEON_LIMITS_MAILBOX_MAX", "1000000")];
    let got: Arc<Mutex<Vec<(String, Got)>>> = Arc::default();
    let mut logs: BTreeMap<String, Sent> = ["s1", "s2", "s3"]
        .iter()
        .map(|s| (s.to_string(), Sent::default()))
        .collect();

    for (round, ms) in ROUND_MS.iter().enumerate() {
        let mut srv = ServerProcess::spawn(dir.path(), port, &env).await;
        let base = format!("ws://{}", srv.addr);
        let mut inboxes = Vec::new();
        let (ron, flushed) = login(&base, "ron").await.expect("ron logs in");
        inboxes.push(tokio::spawn(
            Inbox::new("ron", got.clone()).run(ron, flushed),
        ));
        // olga is online in odd rounds, offline (her mail piling up) in even ones.
        if round % 2 == 1 {
            let (olga, flushed) = login(&base, "olga").await.expect("olga logs in");
            inboxes.push(tokio::spawn(
                Inbox::new("olga", got.clone()).run(olga, flushed),
            ));
        }
        let mut senders = Vec::new();
        for (name, log) in std::mem::take(&mut logs) {
            let blob = name == "s1" && (round == 0 || round == 3);
            senders.push(tokio::spawn(sender(base.clone(), name, log, blob)));
        }
        // Mid-round, ron logs in again: a take-over under load.
        tokio::time::sleep(Duration::from_millis(ms * 2 / 5)).await;
        if let Some((ron, flushed)) = login(&base, "ron").await {
            inboxes.push(tokio::spawn(
                Inbox::new("ron", got.clone()).run(ron, flushed),
            ));
        }
        tokio::time::sleep(Duration::from_millis(ms * 3 / 5)).await;
        srv.kill9();
        for s in senders {
            let (name, log) = tokio::time::timeout(Duration::from_secs(15), s)
                .await
                .expect("a sender hung after the kill")
                .unwrap();
            logs.insert(name, log);
        }
        for i in inboxes {
            tokio::time::timeout(Duration::from_secs(15), i)
                .await
                .expect("a recipient hung after the kill")
                .unwrap();
        }
    }

    // Last start: everything still pending comes out.
    let srv = ServerProcess::spawn(dir.path(), port, &env).await;
    let base = format!("ws://{}", srv.addr);
    for user in ["ron", "olga"] {
        let (c, flushed) = login(&base, user).await.expect("final login");
        let mut inbox = Inbox::new(user, got.clone());
        for v in &flushed {
            inbox.take(v);
        }
        c.close().await;
    }
    drop(srv);

    // (sender, id) -> every (recipient, seq) it arrived as.
    let got = got.lock().unwrap();
    let mut arrived: BTreeMap<(String, String), BTreeSet<(String, u64)>> = BTreeMap::new();
    for (to, (from, id, seq)) in got.iter() {
        arrived
            .entry((from.clone(), id.clone()))
            .or_default()
            .insert((to.clone(), *seq));
    }
    let mut confirmed = 0;
    for (me, log) in &logs {
        assert!(
            log.refused.is_empty(),
            "{me} was refused: {:?}",
            log.refused
        );
        for (id, to) in &log.confirmed {
            confirmed += 1;
            let copies = arrived
                .get(&(me.clone(), id.clone()))
                .unwrap_or_else(|| panic!("{me}'s {id} to {to} was confirmed but lost"));
            assert_eq!(copies.len(), 1, "{me}'s {id}: {copies:?}");
            assert!(
                copies.iter().all(|(r, _)| r == to),
                "{me}'s {id}: {copies:?}"
            );
        }
    }
    for ((from, id), copies) in &arrived {
        assert!(
            logs[from].attempted.contains(id),
            "{from}'s {id} never sent"
        );
        assert_eq!(copies.len(), 1, "{from}'s {id} stored twice: {copies:?}");
    }
    // Per (sender, recipient): in seq order, ids (zero-padded counters) only go up.
    let mut order: BTreeMap<(String, String), BTreeMap<u64, String>> = BTreeMap::new();
    for ((from, id), copies) in &arrived {
        for (to, seq) in copies {
            order
                .entry((from.clone(), to.clone()))
                .or_default()
                .insert(*seq, id.clone());
        }
    }
    for ((from, to), by_seq) in &order {
        let ids: Vec<&String> = by_seq.values().collect();
        assert!(
            ids.windows(2).all(|w| w[0] < w[1]),
            "{from} -> {to} out of order"
        );
    }
    let unique = arrived.len();
    let redelivered = got.len() - unique;
    eprintln!(
        "crash loop: {ROUNDS} kills, {confirmed} sends confirmed, {unique} delivered \
         (incl. {} sent but unanswered at a kill), {redelivered} redeliveries dropped by seq",
        unique - confirmed
    );
    assert!(
        confirmed > 200,
        "too little traffic to mean anything: {confirmed}"
    );
}
