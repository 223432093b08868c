//! The server processes: Pigeon and the peers (the bare relay, Node `ws`, tornado) and
//! Redis, each started afresh as a subprocess in its own process group on a free
//! loopback port and stopped when its `Server` is dropped; MongoDB settings for Pigeon.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use tokio::net::TcpStream;

use crate::cli::{Cli, Peer};
use crate::procstat::ProcStats;

const MANIFEST_DIR: &str = env!("CARGO_MANIFEST_DIR");

pub struct Server {
    child: Child,
    pub pid: i32,
    pub addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Server {
    pub fn stats(&self) -> ProcStats {
        ProcStats::read(self.pid)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // SIGTERM first so that valgrind and Pigeon write their output, then SIGKILL.
        // The child leads its own process group: signal the group (wrapper and server).
        // SAFETY: signalling the process group of our own child.
        unsafe {
            libc::kill(-self.pid, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // SAFETY: as above.
        unsafe {
            libc::kill(-self.pid, libc::SIGKILL);
        }
        let _ = self.child.wait();
    }
}

fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

fn pigeon_bin(cli: &Cli) -> PathBuf {
    cli.pigeon_bin
        .clone()
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_pigeon")))
}

/// Starts `peer` on a fresh loopback port; `Err` says why it is not available.
pub async fn start(cli: &Cli, peer: Peer, env: &[(&str, String)]) -> Result<Server> {
    let dir = match &cli.data_base {
        Some(base) => tempfile::tempdir_in(base)?,
        None => tempfile::tempdir()?,
    };
    let port = free_port()?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let peers_dir = Path::new(MANIFEST_DIR).join("benches/peers");
    let mut cmd = match peer {
        Peer::Pigeon => {
            let bin = pigeon_bin(cli);
            if !bin.exists() {
                bail!("not available: {} does not exist", bin.display());
            }
            let mut cmd = match &cli.pigeon_wrap {
                Some(wrap) => {
                    let mut words = wrap.split_whitespace();
                    let Some(prog) = words.next() else {
                        bail!("--pigeon-wrap is empty")
                    };
                    let mut c = Command::new(prog);
                    c.args(words).arg(&bin);
                    c
                }
                None => Command::new(&bin),
            };
            cmd.arg("serve")
                .arg("--bind")
                .arg(addr.to_string())
                .arg("--data-dir")
                .arg(dir.path().join("data"))
                .env("PIGEON_LOG_LEVEL", "warn")
                .current_dir(dir.path()); // no ./config.toml: the defaults
                                          // Stated, not inherited from the built-in defaults: no accounts and no abuse
                                          // limits, so that the load is not throttled (the shipped config.toml has
                                          // passwords and a 50 frames/s rate limit).
            for (k, v) in PIGEON_BENCH_ENV {
                cmd.env(k, v);
            }
            cmd
        }
        Peer::Bare => {
            let mut cmd = Command::new(std::env::current_exe()?);
            cmd.arg("bare-relay").arg("--bind").arg(addr.to_string());
            cmd
        }
        Peer::Node => {
            if !peers_dir.join("node_modules/ws").exists() {
                bail!("not available: npm `ws` missing; run `npm ci --prefix benches/peers`");
            }
            let mut cmd = Command::new("node");
            cmd.arg(peers_dir.join("node_ws_relay.js"))
                .arg(port.to_string());
            cmd
        }
        Peer::Tornado => {
            let python = peers_dir.join(".venv/bin/python");
            if !python.exists() {
                bail!(
                    "not available: no venv; run `python3 -m venv benches/peers/.venv && \
                     benches/peers/.venv/bin/pip install -r benches/peers/requirements.txt`"
                );
            }
            let mut cmd = Command::new(python);
            cmd.arg(peers_dir.join("tornado_relay.py"))
                .arg(port.to_string());
            cmd
        }
    };
    for (k, v) in env {
        cmd.env(k, v);
    }
    if peer == Peer::Pigeon {
        // Last, so that they win over the scenario's settings.
        for kv in &cli.pigeon_env {
            let Some((k, v)) = kv.split_once('=') else {
                bail!("--pigeon-env {kv:?}: expected KEY=VALUE");
            };
            cmd.env(k, v);
        }
    }
    launch(cli, peer.name(), cmd, addr, dir).await
}

/// Pigeon's settings for every benchmark server (scenarios add their own).
const PIGEON_BENCH_ENV: [(&str, &str); 4] = [
    ("PIGEON_AUTH_MODE", "open"),
    ("PIGEON_LIMITS_RATE_PER_SEC", "0"),
    ("PIGEON_LIMITS_MAX_CONNECTIONS_PER_IP", "0"),
    ("PIGEON_LIMITS_LOGIN_TIMEOUT_SECS", "600"),
];

/// A Redis server for the cluster scenario, on a free loopback port, nothing persisted.
pub async fn start_redis(cli: &Cli) -> Result<Server> {
    let dir = tempfile::tempdir()?;
    let port = free_port()?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut cmd = Command::new(&cli.redis_server);
    cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
        .current_dir(dir.path());
    launch(cli, "redis", cmd, addr, dir).await
}

/// Environment for a Pigeon on MongoDB with database `db`; `Err` says why not available.
pub fn mongo_env(cli: &Cli, db: &str) -> Result<Vec<(&'static str, String)>> {
    let Some(uri) = cli.mongodb_uri.as_deref().filter(|u| !u.is_empty()) else {
        bail!(
            "not available: no MongoDB: set --mongodb-uri or PIGEON_TEST_MONGODB_URI \
             (eval \"$(bash .ci/mongo.sh start)\" starts the nx-27017 test server)"
        );
    };
    Ok(vec![
        ("PIGEON_STORAGE_BACKEND", "mongodb".into()),
        ("PIGEON_STORAGE_MONGODB_URI", uri.into()),
        ("PIGEON_STORAGE_MONGODB_DATABASE", db.into()),
    ])
}

/// A database name no other run of this or another bench uses.
pub fn fresh_db(tag: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "pigeon_bench_{tag}_{}_{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// The MongoDB server's pid (`--mongodb-pid`, or the one `.ci/mongo.sh` started).
pub fn mongo_pid(cli: &Cli) -> Option<i32> {
    let pid = cli.mongodb_pid.or_else(|| {
        let file = Path::new(MANIFEST_DIR).join(".venv-mongo/run/nx-27017.pid");
        std::fs::read_to_string(file).ok()?.trim().parse().ok()
    })?;
    Path::new(&format!("/proc/{pid}")).exists().then_some(pid)
}

/// Starts `cmd` in its own process group and waits until `addr` accepts connections.
async fn launch(
    cli: &Cli,
    name: &str,
    mut cmd: Command,
    addr: SocketAddr,
    dir: tempfile::TempDir,
) -> Result<Server> {
    let port = addr.port();
    if let Some(prefix) = &cli.server_prefix {
        cmd = prefixed(cmd, prefix)?;
    }
    let log = match &cli.log_dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            let name = format!("{}-{port}.log", name.replace(' ', "_"));
            Stdio::from(std::fs::File::create(d.join(name))?)
        }
        None => Stdio::null(),
    };
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(log);
    // Its own process group, so that a wrapper's child (perf, strace) is stopped too.
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let child = cmd
        .spawn()
        .map_err(|e| anyhow::anyhow!("not available: cannot start {cmd:?}: {e}"))?;
    let mut server = Server {
        pid: child.id() as i32,
        child,
        addr,
        _dir: dir,
    };
    // Pigeon listens before its store (and Redis) is open, so for it "ready" is an
    // answer from /healthz, not an accepted connection. MongoDB start-up may take
    // 30 s to fail (the driver's server selection).
    let pigeon = name == Peer::Pigeon.name();
    let wait = match (cli.pigeon_wrap.is_some(), pigeon) {
        (true, _) => 120,
        (false, true) => 45,
        (false, false) => 15,
    };
    let deadline = Instant::now() + Duration::from_secs(wait);
    loop {
        if pigeon {
            if healthz(addr).await {
                break;
            }
        } else if TcpStream::connect(addr).await.is_ok() {
            break;
        }
        if let Ok(Some(status)) = server.child.try_wait() {
            bail!("not available: {name} exited at start ({status})");
        }
        if Instant::now() > deadline {
            bail!("not available: {name} did not listen within {wait} s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(server)
}

/// Whether `GET /healthz` answers with an HTTP status line (any status: only that the
/// server is serving is asked here).
async fn healthz(addr: SocketAddr) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let probe = async {
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
            .await?;
        let mut buf = [0u8; 12];
        s.read_exact(&mut buf).await?;
        anyhow::Ok(buf.starts_with(b"HTTP/1.1 "))
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(1), probe).await,
        Ok(Ok(true))
    )
}

/// `cmd` run under `prefix` (a program and its arguments), with the same environment
/// and working directory.
fn prefixed(cmd: Command, prefix: &str) -> Result<Command> {
    let mut words = prefix.split_whitespace();
    let Some(prog) = words.next() else {
        bail!("--server-prefix is empty")
    };
    let mut out = Command::new(prog);
    out.args(words).arg(cmd.get_program()).args(cmd.get_args());
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => out.env(k, v),
            None => out.env_remove(k),
        };
    }
    if let Some(dir) = cmd.get_current_dir() {
        out.current_dir(dir);
    }
    Ok(out)
}
