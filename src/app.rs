//! State every connection shares: configuration, the store, the online registry, the
//! metrics and the authenticator.

use std::sync::Arc;

use crate::auth::Auth;
use crate::cluster::Cluster;
use crate::config::Config;
use crate::delivery::write_behind::WriteBehind;
use crate::limits::{FloodBan, RegisterLimit};
use crate::metrics::Metrics;
use crate::router::Router;
use crate::store::Store;

pub struct App {
    pub config: Config,
    pub store: Arc<dyn Store>,
    pub router: Arc<Router>,
    pub metrics: Arc<Metrics>,
    /// Presence and routing across nodes, in cluster mode.
    pub cluster: Option<Arc<Cluster>>,
    pub auth: Auth,
    /// IP addresses whose connections are dropped on accept for flooding.
    pub flood_ban: FloodBan,
    /// Self-registrations per IP address (`[limits] register_per_ip`).
    pub register_limit: RegisterLimit,
    /// The write-behind task, when this server has the live path (`delivery`).
    pub write_behind: Option<WriteBehind>,
}
