//! The operator's endpoints: `GET /healthz` (the store, the cluster, sessions online;
//! 503 while the store cannot write) and `GET /metrics` (Prometheus text).

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};

use super::ctx::Ctx;

pub async fn healthz(State(ctx): State<Arc<Ctx>>) -> Response {
    let mut body = serde_json::json!({
        "status": "ok",
        "store": ctx.app.store.backend(),
        "online": ctx.app.router.online_count(),
        "auth": ctx.app.config.auth.mode,
    });
    if let Some(c) = &ctx.app.cluster {
        body["node"] = c.node().into();
        if c.is_degraded() {
            body["status"] = "degraded".into();
            body["cluster"] = "redis unreachable: serving local users only".into();
        }
    }
    // A store that refuses writes (disk full, read-only) means every send fails: that is
    // not healthy, and a load balancer should hear it (503).
    let mut status = StatusCode::OK;
    if let Err(e) = ctx.app.store.check_writable().await {
        status = StatusCode::SERVICE_UNAVAILABLE;
        body["status"] = "degraded".into();
        body["store_error"] = e.to_string().into();
    }
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

pub async fn metrics(State(ctx): State<Arc<Ctx>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        ctx.app.metrics.render(
            ctx.app.router.online_count(),
            ctx.app
                .cluster
                .as_deref()
                .map(crate::cluster::Cluster::figures),
        ),
    )
        .into_response()
}
