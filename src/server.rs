//! Accepts connections and shuts down. A `Semaphore` caps open connections (a WebSocket
//! session keeps its connection's permit); on shutdown the server stops accepting, tells
//! every session to close with 1001 (going away), and waits for the session tasks it
//! tracks itself, up to `server.shutdown_grace_secs`. With `[tls]` configured each
//! socket is wrapped in TLS before hyper sees it (wss:// and https:// on one port); a
//! client IP above `limits.max_connections_per_ip` is answered with HTTP 429.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use crate::app::App;
use crate::auth::{Auth, AuthError};
use crate::cluster::Cluster;
use crate::config::Config;
use crate::http::upgrade::session_websocket_config;
use crate::http::{self, ConnGuard, Ctx};
use crate::limits::{FloodBan, IpConnections, IpSlot, RegisterLimit};
use crate::metrics::{dec, inc};
use crate::origins::Origins;
use crate::router::Router;
use crate::shutdown::shutdown_requested;
use crate::store::{self, StoreError};
use crate::tls::{self, TlsError};
use crate::wire::{Counted, Wire};

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("listener: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Cluster(#[from] crate::cluster::ClusterError),
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(
        "the store holds accounts whose names are not canonical (names are now compared \
         after Unicode NFKC and lowercasing, ASCII only): {}. Delete each with \
         `pigeon user del NAME` (exactly as listed; its waiting mail goes with it) and \
         create it again under its canonical name with `pigeon user add`",
        list_names(.0)
    )]
    LegacyNames(Vec<String>),
    #[error("[server] public_url or [auth] allowed_origins: {0}")]
    Origin(#[from] crate::origins::OriginError),
}

/// Whether messages to users online here take the live path (`delivery`): only where
/// this process is the store's one writer.
fn live_path(config: &Config, store: &dyn store::Store, clustered: bool) -> bool {
    config.storage.write_behind_ms > 0 && !clustered && store.live_seqs().is_some()
}

fn list_names(names: &[String]) -> String {
    let shown: Vec<String> = names.iter().map(|n| format!("{n:?}")).collect();
    shown.join(", ")
}

/// Opens the configured store and serves `listener` until `shutdown` completes.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServerError> {
    let tls = tls::acceptor(&config.tls)?;
    let store = store::open_with(&config.storage, store::StoreLimits::from_config(&config)).await?;
    let legacy = store
        .legacy_user_names(crate::accounts::LEGACY_LIST_MAX)
        .await?;
    if !legacy.is_empty() {
        return Err(ServerError::LegacyNames(legacy));
    }
    let cluster = match config.cluster.enabled() {
        true => Some(Cluster::connect(&config.cluster).await?),
        false => None,
    };
    let auth = Auth::new(&config)?;
    if !auth.required() {
        tracing::warn!(
            "[auth] mode = \"open\": ANYONE CAN LOG IN AS ANY USER, read their messages and \
             kick their sessions. Use mode = \"password\" for anything but a trial."
        );
    }
    tracing::info!(
        addr = %listener.local_addr()?,
        store = store.backend(),
        tls = tls.is_some(),
        auth = %config.auth.mode,
        "pigeon listening"
    );
    let flood_ban = FloodBan::new(
        config.limits.flood_ban_after,
        Duration::from_secs(config.limits.flood_ban_secs),
    );
    let register_limit = RegisterLimit::new(
        config.limits.register_per_ip,
        Duration::from_secs(config.limits.register_window_secs),
    );
    let metrics: Arc<crate::metrics::Metrics> = Arc::default();
    let write_behind = live_path(&config, &*store, cluster.is_some()).then(|| {
        crate::delivery::write_behind::WriteBehind::start(
            store.clone(),
            metrics.clone(),
            Duration::from_millis(config.storage.write_behind_ms),
        )
    });
    let app = Arc::new(App {
        write_behind,
        flood_ban,
        register_limit,
        config,
        store,
        router: Arc::new(Router::new()),
        metrics,
        cluster,
        auth,
    });
    if let Some(c) = &app.cluster {
        tracing::info!(
            node = c.node(),
            "cluster mode: presence and routing through Redis"
        );
    }
    let local = listener.local_addr()?;
    let server = &app.config.server;
    let origins = Origins::new(
        &server.public_url,
        &app.config.auth.allowed_origins,
        local,
        tls.is_some(),
    )?;
    tracing::info!(origins = %origins.describe(), "browser pages accepted from these origins");
    if server.public_url.is_empty() && local.ip().is_unspecified() {
        tracing::warn!(
            "listening on all addresses but [server] public_url is not set: browser pages \
             opened at this machine's network address are refused until it is (e.g. \
             public_url = \"http://192.0.2.10:{}\")",
            local.port()
        );
    }
    serve(listener, app, tls, origins, shutdown).await;
    Ok(())
}

/// A connection's hold on the connection limit; also keeps the open-connections gauge.
struct Permit {
    _permit: OwnedSemaphorePermit,
    _ip: IpSlot,
    app: Arc<App>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        dec(&self.app.metrics.connections_open);
    }
}

async fn serve(
    listener: TcpListener,
    app: Arc<App>,
    tls: Option<TlsAcceptor>,
    origins: Origins,
    shutdown: impl Future<Output = ()>,
) {
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let tracker = TaskTracker::new();
    let ctx = Arc::new(Ctx {
        app: app.clone(),
        tracker: tracker.clone(),
        shutdown: shutdown_rx.clone(),
        ws_config: session_websocket_config(&app.config),
        origins,
    });
    let routes = http::routes(ctx);
    if let Some(cluster) = app.cluster.clone() {
        tracker.spawn(cluster.run(app.router.clone(), app.metrics.clone(), shutdown_rx.clone()));
    }
    if app.auth.required() {
        tracker.spawn(crate::revoke::run(app.clone(), shutdown_rx.clone()));
    }
    tracker.spawn(crate::links::sweep_acked_blobs(
        app.clone(),
        shutdown_rx.clone(),
    ));
    let limit = Arc::new(Semaphore::new(app.config.server.max_connections));
    let per_ip = Arc::new(IpConnections::default());
    let per_ip_cap = app.config.limits.max_connections_per_ip;
    tokio::pin!(shutdown);

    loop {
        let permit = tokio::select! {
            _ = &mut shutdown => break,
            p = limit.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break, // the semaphore is never closed
            },
        };
        let (socket, peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = accept(&listener) => accepted,
        };
        if app.flood_ban.banned(peer.ip(), Instant::now()) {
            inc(&app.metrics.connections_banned);
            tracing::debug!(%peer, "dropped: the address flooded");
            continue; // drops the socket and the permit
        }
        inc(&app.metrics.connections_total);
        inc(&app.metrics.connections_open);
        let (ip_slot, from_ip) = per_ip.open(peer.ip());
        let permit = Permit {
            _permit: permit,
            _ip: ip_slot,
            app: app.clone(),
        };
        let over_cap = per_ip_cap > 0 && from_ip > per_ip_cap;
        if over_cap {
            tracing::info!(%peer, open = from_ip - 1, "per-IP connection cap reached");
        }
        let routes = routes.clone();
        let shutdown = shutdown_rx.clone();
        let tls = tls.clone();
        let header_timeout = Duration::from_secs(app.config.server.header_timeout_secs);
        tracker.spawn(async move {
            let _ = socket.set_nodelay(true);
            // Counted beneath TLS: the bytes counted are the ones TCP acknowledges.
            let socket = Counted::new(socket);
            let conn = Conn {
                peer,
                wire: socket.wire(),
            };
            match tls {
                None => {
                    connection(
                        socket,
                        conn,
                        permit,
                        routes,
                        over_cap,
                        header_timeout,
                        shutdown,
                    )
                    .await
                }
                Some(tls) => match tokio::time::timeout(header_timeout, tls.accept(socket)).await {
                    Ok(Ok(s)) => {
                        connection(s, conn, permit, routes, over_cap, header_timeout, shutdown)
                            .await
                    }
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                },
            }
        });
    }

    tracing::info!("shutting down: closing sessions");
    shutdown_tx.send_replace(true);
    drop(listener);
    tracker.close();
    let grace = Duration::from_secs(app.config.server.shutdown_grace_secs);
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        tracing::warn!("some connections did not finish within the grace period");
    }
    tracing::info!("shut down");
}

/// Accepts the next connection; on errors (EMFILE and friends) backs off and retries.
async fn accept(listener: &TcpListener) -> (TcpStream, SocketAddr) {
    let mut backoff = Duration::from_millis(10);
    loop {
        match listener.accept().await {
            Ok(pair) => return pair,
            Err(e) => {
                tracing::warn!(error = %e, ?backoff, "accept failed; backing off");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}

/// The answer to every request of a connection above the per-IP cap.
fn too_many_connections() -> axum::response::Response {
    use axum::http::{header, HeaderValue, StatusCode};
    let mut res = http::ctx::error(
        StatusCode::TOO_MANY_REQUESTS,
        "too_many_connections",
        "too many connections from your address",
    );
    res.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    res
}

/// Who is at the other end of an accepted socket, and its byte count.
struct Conn {
    peer: SocketAddr,
    wire: Arc<Wire>,
}

async fn connection<S>(
    socket: S,
    conn: Conn,
    permit: Permit,
    routes: axum::Router,
    over_cap: bool,
    header_timeout: Duration,
    mut shutdown: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Conn { peer, wire } = conn;
    let guard = ConnGuard(Arc::new(permit));
    let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
        req.extensions_mut().insert(guard.clone());
        // For the WebSocket session this connection may become (`http::upgrade::handshake`).
        req.extensions_mut().insert(wire.clone());
        req.extensions_mut()
            .insert(axum::extract::ConnectInfo(peer));
        let routes = routes.clone();
        async move {
            if over_cap {
                return Ok(too_many_connections());
            }
            routes.oneshot(req.map(axum::body::Body::new)).await
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .serve_connection(TokioIo::new(socket), service)
        .with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(%peer, error = %e, "http connection ended with an error");
            }
        }
        _ = shutdown_requested(&mut shutdown) => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(1), conn).await;
        }
    }
}
