//! Abuse limits, each a small piece of bookkeeping with the clock passed in so it can be
//! unit-tested: a per-connection token bucket for frames, a bounded failed-login throttle
//! keyed by user, address and both, the bounded password-hashing pool, a take-over damper
//! per user, and per-IP connection counting.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use tokio::sync::Semaphore;

/// Entries a keyed map may hold before expired ones are swept.
const SWEEP_AT: usize = 10_000;

/// What the token bucket says about one frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rate {
    Allow,
    /// Drop this frame and tell the client.
    Refuse,
    /// Refused too often before the bucket refilled: close the connection.
    Close,
}

/// Per-connection frame rate: `rate` tokens a second up to `burst`. Frames refused while
/// the bucket is empty are strikes; `strikes` of them before the bucket is full again
/// close the connection. A zero rate allows everything.
#[derive(Debug)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    max_strikes: u32,
    tokens: f64,
    strikes: u32,
    last: Instant,
}

impl TokenBucket {
    pub fn new(rate: u32, burst: u32, max_strikes: u32, now: Instant) -> TokenBucket {
        TokenBucket {
            rate: f64::from(rate),
            burst: f64::from(burst.max(1)),
            max_strikes: max_strikes.max(1),
            tokens: f64::from(burst.max(1)),
            strikes: 0,
            last: now,
        }
    }

    pub fn check(&mut self, now: Instant) -> Rate {
        if self.rate <= 0.0 {
            return Rate::Allow;
        }
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= self.burst {
            self.strikes = 0; // quiet long enough to be forgiven
        }
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Rate::Allow;
        }
        self.strikes += 1;
        if self.strikes >= self.max_strikes {
            Rate::Close
        } else {
            Rate::Refuse
        }
    }
}

/// Counts events per key within a sliding window.
#[derive(Debug, Default)]
struct Window {
    events: DashMap<String, VecDeque<Instant>>,
}

/// Drops the events (oldest first) that are `window` old or older at `now`.
fn forget_older(events: &mut VecDeque<Instant>, window: Duration, now: Instant) {
    while events
        .front()
        .is_some_and(|t| now.saturating_duration_since(*t) >= window)
    {
        events.pop_front();
    }
}

impl Window {
    /// Events of `key` within `window` before `now` (forgetting older ones).
    fn count(&self, key: &str, window: Duration, now: Instant) -> (usize, Option<Instant>) {
        let Some(mut e) = self.events.get_mut(key) else {
            return (0, None);
        };
        forget_older(&mut e, window, now);
        (e.len(), e.front().copied())
    }

    /// Past `SWEEP_AT` keys, drops the keys with no event within `window`.
    fn sweep(&self, window: Duration, now: Instant) {
        if self.events.len() >= SWEEP_AT {
            self.events.retain(|_, e| {
                e.back()
                    .is_some_and(|t| now.saturating_duration_since(*t) < window)
            });
        }
    }

    /// Records an event of `key` if fewer than `max` fell within `window` before `now`,
    /// counting and recording under one lock (parallel callers cannot all slip under
    /// the limit); otherwise returns when the oldest of them leaves the window.
    fn try_record(
        &self,
        key: &str,
        window: Duration,
        now: Instant,
        max: usize,
    ) -> Result<(), Duration> {
        self.sweep(window, now);
        let mut e = self.events.entry(key.to_string()).or_default();
        forget_older(&mut e, window, now);
        match e.front() {
            Some(oldest) if e.len() >= max => {
                Err(window.saturating_sub(now.saturating_duration_since(*oldest)))
            }
            _ => {
                e.push_back(now);
                Ok(())
            }
        }
    }

    fn record(&self, key: &str, window: Duration, now: Instant, keep: usize) {
        self.sweep(window, now);
        let mut e = self.events.entry(key.to_string()).or_default();
        e.push_back(now);
        while e.len() > keep {
            e.pop_front();
        }
    }
}

/// What a login attempt is: a password costs a hash and counts against the per-user cap
/// too; a token costs an HMAC and counts only per address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempt {
    Password,
    Token,
}

/// Why an attempt was not let through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Too many failures lately: try again after this long.
    Throttled(Duration),
    /// The bookkeeping holds `max_keys` entries: no new user or address fits.
    Full,
}

/// A login attempt let through by `LoginThrottle::reserve`, already counted as a failure.
/// Hand it back with `succeeded` or `cancel`; otherwise the failure stands.
#[derive(Debug)]
pub struct Ticket {
    user: String,
    ip: IpAddr,
    at: Instant,
    per_user: bool,
    /// Already counted (passwords); tokens are counted only once they fail.
    counted: bool,
}

/// The numbers of a `LoginThrottle` (from `[limits]`).
#[derive(Debug, Clone)]
pub struct ThrottleLimits {
    /// Failures for one user from one address before a lock-out.
    pub max: u32,
    /// First lock-out (and the window the failures are counted in); doubled per lock-out.
    pub backoff: Duration,
    pub backoff_max: Duration,
    /// Password failures for one user from every address within `user_window`.
    pub user_max: u32,
    pub user_window: Duration,
    /// Entries (pairs, addresses, users, trusted pairs) held at most.
    pub max_keys: usize,
}

/// How long a successful login makes its address exempt from the per-user cap.
const TRUSTED_FOR: Duration = Duration::from_secs(7 * 24 * 3600);
/// How often the tables are swept of expired entries at most.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// One user from one address.
#[derive(Debug)]
struct Pair {
    fails: VecDeque<Instant>,
    locked_until: Option<Instant>,
    /// Lock-outs so far: the next one lasts `backoff * 2^strikes`.
    strikes: u32,
    last: Instant,
}

#[derive(Debug)]
struct Tables {
    pairs: HashMap<(String, IpAddr), Pair>,
    ips: HashMap<IpAddr, VecDeque<Instant>>,
    users: HashMap<String, VecDeque<Instant>>,
    trusted: HashMap<(String, IpAddr), Instant>,
    last_sweep: Instant,
}

impl Tables {
    fn len(&self) -> usize {
        self.pairs.len() + self.ips.len() + self.users.len() + self.trusted.len()
    }
}

/// Failed logins per (user, address), per address and per user, checked and counted in
/// one step under one lock *before* the password is hashed, so parallel attempts cannot
/// get past the limits. Per pair: `max` failures, then a lock-out of `backoff` that
/// doubles with each further lock-out up to `backoff_max`; per address: `4 * max`
/// failures across all users within `backoff`; per user (passwords only): `user_max`
/// failures from all addresses within the short `user_window`, not applied to addresses
/// that logged in as that user before. Bounded: at most `max_keys` entries, expired ones
/// swept; when full, attempts needing a new entry are refused (`Refusal::Full`).
#[derive(Debug)]
pub struct LoginThrottle {
    limits: ThrottleLimits,
    tables: Mutex<Tables>,
}

/// How many times more failures one IP address may have across all users.
const IP_FACTOR: usize = 4;

fn prune(q: &mut VecDeque<Instant>, window: Duration, now: Instant) {
    while q
        .front()
        .is_some_and(|t| now.saturating_duration_since(*t) >= window)
    {
        q.pop_front();
    }
}

fn forget(q: &mut VecDeque<Instant>, at: Instant) {
    if let Some(i) = q.iter().rposition(|t| *t == at) {
        q.remove(i);
    }
}

/// The wait until the oldest of `q` is `window` old, when `q` holds `max` or more.
fn full_for(q: &VecDeque<Instant>, max: usize, window: Duration, now: Instant) -> Option<Duration> {
    let oldest = q.front()?;
    (q.len() >= max).then(|| window.saturating_sub(now.saturating_duration_since(*oldest)))
}

impl LoginThrottle {
    pub fn new(limits: ThrottleLimits) -> LoginThrottle {
        let now = Instant::now();
        LoginThrottle {
            limits,
            tables: Mutex::new(Tables {
                pairs: HashMap::new(),
                ips: HashMap::new(),
                users: HashMap::new(),
                trusted: HashMap::new(),
                last_sweep: now,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Tables> {
        // A panic elsewhere while holding it leaves consistent-enough counters.
        self.tables.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn ip_key(ip: Option<IpAddr>) -> IpAddr {
        ip.unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED))
    }

    fn max(&self) -> usize {
        (self.limits.max as usize).max(1)
    }

    /// Lets an attempt of `user` from `ip` through and counts it as a failure at once,
    /// or says why not. Check and count are one step: there is no window between them.
    pub fn reserve(
        &self,
        user: &str,
        ip: Option<IpAddr>,
        kind: Attempt,
        now: Instant,
    ) -> Result<Ticket, Refusal> {
        let l = &self.limits;
        let ip = Self::ip_key(ip);
        let max = self.max();
        let mut t = self.lock();
        if now.saturating_duration_since(t.last_sweep) >= Duration::from_secs(60)
            || (t.len() >= l.max_keys / 2
                && now.saturating_duration_since(t.last_sweep) >= SWEEP_EVERY)
        {
            self.sweep(&mut t, now);
        }
        let pair_key = (user.to_string(), ip);
        let per_user = kind == Attempt::Password && !t.trusted.contains_key(&pair_key);
        let mut wait: Option<Duration> = None;
        let mut new_keys = 0;
        match t.pairs.get_mut(&pair_key) {
            Some(p) => {
                prune(&mut p.fails, l.backoff, now);
                if let Some(until) = p.locked_until.filter(|u| *u > now) {
                    wait = Some(until - now);
                }
            }
            None => new_keys += 1,
        }
        match t.ips.get_mut(&ip) {
            Some(q) => {
                prune(q, l.backoff, now);
                wait = wait.max(full_for(q, max * IP_FACTOR, l.backoff, now));
            }
            None => new_keys += 1,
        }
        if per_user {
            match t.users.get_mut(user) {
                Some(q) => {
                    prune(q, l.user_window, now);
                    let cap = (l.user_max as usize).max(1);
                    wait = wait.max(full_for(q, cap, l.user_window, now));
                }
                None => new_keys += 1,
            }
        }
        if let Some(w) = wait {
            return Err(Refusal::Throttled(w.max(Duration::from_secs(1))));
        }
        if kind == Attempt::Token {
            // A token costs no hash and cannot be guessed: checked, but counted only
            // when it fails, so many good tokens at once from one address all pass.
            return Ok(Ticket {
                user: user.to_string(),
                ip,
                at: now,
                per_user: false,
                counted: false,
            });
        }
        if t.len() + new_keys > l.max_keys {
            if now.saturating_duration_since(t.last_sweep) >= SWEEP_EVERY {
                self.sweep(&mut t, now);
            }
            if t.len() + new_keys > l.max_keys {
                return Err(Refusal::Full);
            }
        }
        Self::count(&mut t, l, pair_key, ip, now);
        if per_user {
            let q = t.users.entry(user.to_string()).or_default();
            q.push_back(now);
            while q.len() > (l.user_max as usize).max(1) {
                q.pop_front();
            }
        }
        Ok(Ticket {
            user: user.to_string(),
            ip,
            at: now,
            per_user,
            counted: true,
        })
    }

    /// Counts a failure for the pair and the address (the lock-out starts with the
    /// failure that reaches `max`).
    fn count(
        t: &mut Tables,
        l: &ThrottleLimits,
        pair_key: (String, IpAddr),
        ip: IpAddr,
        now: Instant,
    ) {
        let max = (l.max as usize).max(1);
        let pair = t.pairs.entry(pair_key).or_insert_with(|| Pair {
            fails: VecDeque::new(),
            locked_until: None,
            strikes: 0,
            last: now,
        });
        pair.last = now;
        pair.fails.push_back(now);
        if pair.fails.len() >= max {
            // The limit is reached with this attempt: later ones wait, longer each time.
            let factor = 1u32 << pair.strikes.min(16);
            let lock = l.backoff.saturating_mul(factor).min(l.backoff_max);
            pair.locked_until = Some(now + lock);
            pair.strikes = pair.strikes.saturating_add(1);
            pair.fails.clear();
        }
        let q = t.ips.entry(ip).or_default();
        q.push_back(now);
        while q.len() > max * IP_FACTOR {
            q.pop_front();
        }
    }

    /// The attempt failed. A password attempt was counted when it was let through; a
    /// token attempt is counted now (if there is room).
    pub fn failed(&self, ticket: Ticket, now: Instant) {
        if ticket.counted {
            return;
        }
        let mut t = self.lock();
        let key = (ticket.user, ticket.ip);
        let new_keys =
            usize::from(!t.pairs.contains_key(&key)) + usize::from(!t.ips.contains_key(&ticket.ip));
        if t.len() + new_keys <= self.limits.max_keys {
            Self::count(&mut t, &self.limits, key, ticket.ip, now);
        }
    }

    /// The attempt proved who it is: its pair is forgiven (lock-outs included), the
    /// attempt no longer counts for the address or user, and the address is trusted for
    /// this user (exempt from the per-user cap) if there is room to remember it.
    pub fn succeeded(&self, ticket: Ticket, kind: Attempt, now: Instant) {
        let mut t = self.lock();
        let key = (ticket.user, ticket.ip);
        t.pairs.remove(&key);
        if let Some(q) = t.ips.get_mut(&ticket.ip) {
            forget(q, ticket.at);
        }
        if ticket.per_user {
            if let Some(q) = t.users.get_mut(&key.0) {
                forget(q, ticket.at);
            }
        }
        if kind == Attempt::Password
            && (t.len() < self.limits.max_keys || t.trusted.contains_key(&key))
        {
            t.trusted.insert(key, now);
        }
    }

    /// The attempt was not decided (store down, hashing queue full): it does not count.
    pub fn cancel(&self, ticket: Ticket) {
        let mut t = self.lock();
        let key = (ticket.user, ticket.ip);
        if let Some(p) = t.pairs.get_mut(&key) {
            forget(&mut p.fails, ticket.at);
        }
        if let Some(q) = t.ips.get_mut(&ticket.ip) {
            forget(q, ticket.at);
        }
        if ticket.per_user {
            if let Some(q) = t.users.get_mut(&key.0) {
                forget(q, ticket.at);
            }
        }
    }

    /// Drops what can no longer refuse anything.
    fn sweep(&self, t: &mut Tables, now: Instant) {
        let l = &self.limits;
        let age = |at: Instant| now.saturating_duration_since(at);
        // Pairs are kept for backoff_max after their last attempt: that is how long
        // their lock-out count is remembered.
        t.pairs
            .retain(|_, p| p.locked_until.is_some_and(|u| u > now) || age(p.last) < l.backoff_max);
        t.ips
            .retain(|_, q| q.back().is_some_and(|at| age(*at) < l.backoff));
        t.users
            .retain(|_, q| q.back().is_some_and(|at| age(*at) < l.user_window));
        t.trusted.retain(|_, at| age(*at) < TRUSTED_FOR);
        for_shrink(&mut t.pairs);
        for_shrink(&mut t.ips);
        for_shrink(&mut t.users);
        for_shrink(&mut t.trusted);
        t.last_sweep = now;
    }

    /// Entries held now (for tests and metrics).
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Gives memory back after a sweep emptied most of a table.
fn for_shrink<K: std::hash::Hash + Eq, V>(m: &mut HashMap<K, V>) {
    if m.capacity() > 64 && m.capacity() > 4 * m.len() {
        m.shrink_to_fit();
    }
}

/// Password hashing off the async runtime with a bound: `workers` hashes at once (argon2
/// needs ~19 MiB each), at most `queue` more waiting; beyond that `run` refuses at once.
#[derive(Debug)]
pub struct HashPool {
    permits: Arc<Semaphore>,
    waiting: AtomicUsize,
    max_waiting: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("the server is busy hashing passwords: try again shortly")]
    Busy,
    #[error("password hashing failed: {0}")]
    Failed(String),
}

/// A place in the hashing queue; given back on drop (also when the waiter is cancelled).
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl HashPool {
    /// `workers` 0 means half the CPUs (at least one): a guessing flood can then take at
    /// most half the machine from the users who are logged in.
    pub fn new(workers: usize, queue: usize) -> HashPool {
        let workers = match workers {
            0 => (std::thread::available_parallelism().map_or(1, |n| n.get()) / 2).max(1),
            n => n,
        };
        HashPool {
            permits: Arc::new(Semaphore::new(workers)),
            waiting: AtomicUsize::new(0),
            max_waiting: queue,
        }
    }

    /// Runs `f` (a hash) on the blocking pool once a worker is free. The worker is held
    /// until `f` returns even if the caller goes away, so the bound holds.
    pub async fn run<T, F>(&self, f: F) -> Result<T, PoolError>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let permit = match self.permits.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                let max = self.max_waiting;
                if self
                    .waiting
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |w| {
                        (w < max).then_some(w + 1)
                    })
                    .is_err()
                {
                    return Err(PoolError::Busy);
                }
                let _place = Waiting(&self.waiting);
                self.permits
                    .clone()
                    .acquire_owned()
                    .await
                    .map_err(|e| PoolError::Failed(e.to_string()))?
            }
        };
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            f()
        })
        .await
        .map_err(|e| PoolError::Failed(e.to_string()))
    }
}

/// Take-overs per user: at most `max` within `window`.
#[derive(Debug)]
pub struct TakeoverDamper {
    max: usize,
    window: Duration,
    takeovers: Window,
}

impl TakeoverDamper {
    pub fn new(max: u32, window: Duration) -> TakeoverDamper {
        TakeoverDamper {
            max: max as usize,
            window,
            takeovers: Window::default(),
        }
    }

    /// Records a take-over of `user` and returns true, or returns false (recording
    /// nothing) when `user` was already taken over `max` times within the window.
    pub fn allow(&self, user: &str, now: Instant) -> bool {
        if self.takeovers.count(user, self.window, now).0 >= self.max {
            return false;
        }
        self.takeovers
            .record(user, self.window, now, self.max.max(1));
        true
    }
}

/// Connections closed for flooding (4008) per IP address: after `max` within `window`,
/// the address's new connections are dropped as soon as they are accepted, until the
/// oldest of those closes is `window` old. A flooder that reconnects at once would
/// otherwise cost a handshake and a login every few milliseconds. `max` 0 turns it off.
#[derive(Debug)]
pub struct FloodBan {
    max: usize,
    window: Duration,
    closes: Window,
}

impl FloodBan {
    pub fn new(max: u32, window: Duration) -> FloodBan {
        FloodBan {
            max: max as usize,
            window,
            closes: Window::default(),
        }
    }

    /// A connection from `ip` was closed for flooding.
    pub fn flooded(&self, ip: IpAddr, now: Instant) {
        if self.max > 0 {
            self.closes
                .record(&ip.to_string(), self.window, now, self.max);
        }
    }

    /// Whether new connections from `ip` are dropped now.
    pub fn banned(&self, ip: IpAddr, now: Instant) -> bool {
        if self.max == 0 || self.closes.events.is_empty() {
            return false;
        }
        self.closes.count(&ip.to_string(), self.window, now).0 >= self.max
    }
}

/// Self-registrations (`POST /api/register`) per IP address: at most `max` within
/// `window`. Each one costs a password hash and an account that stays; without a cap
/// one client could fill the accounts table. `max` 0 turns it off. The map holds one
/// entry per address that registered within the window: at most as many as the hashing
/// pool can hash in that time.
#[derive(Debug)]
pub struct RegisterLimit {
    max: usize,
    window: Duration,
    registrations: Window,
}

impl RegisterLimit {
    pub fn new(max: u32, window: Duration) -> RegisterLimit {
        RegisterLimit {
            max: max as usize,
            window,
            registrations: Window::default(),
        }
    }

    /// Takes one of `ip`'s registrations (before any hashing); `Err` says how long until
    /// the next is allowed.
    pub fn reserve(&self, ip: IpAddr, now: Instant) -> Result<(), Duration> {
        if self.max == 0 {
            return Ok(());
        }
        self.registrations
            .try_record(&ip.to_string(), self.window, now, self.max)
    }
}

/// Open connections per IP address.
#[derive(Debug, Default)]
pub struct IpConnections {
    open: DashMap<IpAddr, usize>,
}

/// One connection's place in `IpConnections`; gives it back on drop.
#[derive(Debug)]
pub struct IpSlot {
    conns: Arc<IpConnections>,
    ip: IpAddr,
}

impl IpConnections {
    /// Counts a new connection from `ip`; returns its slot and how many `ip` now holds.
    pub fn open(self: &Arc<Self>, ip: IpAddr) -> (IpSlot, usize) {
        let n = {
            let mut e = self.open.entry(ip).or_insert(0);
            *e += 1;
            *e
        };
        let slot = IpSlot {
            conns: self.clone(),
            ip,
        };
        (slot, n)
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        if let Some(mut e) = self.conns.open.get_mut(&self.ip) {
            *e = e.saturating_sub(1);
        }
        self.conns.open.remove_if(&self.ip, |_, n| *n == 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_allows_burst_then_refuses_then_closes() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10, 3, 2, t0);
        assert_eq!([b.check(t0), b.check(t0), b.check(t0)], [Rate::Allow; 3]);
        assert_eq!(b.check(t0), Rate::Refuse);
        // 100 ms later one token is back.
        let t1 = t0 + Duration::from_millis(100);
        assert_eq!(b.check(t1), Rate::Allow);
        assert_eq!(b.check(t1), Rate::Close);
        // A full refill forgives the strikes.
        let t2 = t1 + Duration::from_secs(1);
        assert_eq!(b.check(t2), Rate::Allow);
        let mut off = TokenBucket::new(0, 1, 1, t0);
        assert!((0..1000).all(|_| off.check(t0) == Rate::Allow));
    }

    fn throttle(max: u32, user_max: u32, max_keys: usize) -> LoginThrottle {
        LoginThrottle::new(ThrottleLimits {
            max,
            backoff: Duration::from_secs(60),
            backoff_max: Duration::from_secs(600),
            user_max,
            user_window: Duration::from_secs(10),
            max_keys,
        })
    }

    #[test]
    fn throttle_reserves_then_locks_out_with_growing_waits() {
        let t0 = Instant::now();
        let th = throttle(3, 100, 1000);
        let ip = Some(IpAddr::from([10, 0, 0, 1]));
        for _ in 0..3 {
            // Not handed back: each reservation is a failure already.
            th.reserve("bob", ip, Attempt::Password, t0).unwrap();
        }
        let t1 = t0 + Duration::from_secs(10);
        assert_eq!(
            th.reserve("bob", ip, Attempt::Password, t1).unwrap_err(),
            Refusal::Throttled(Duration::from_secs(50))
        );
        // Another user from the same address is not locked out.
        assert!(th.reserve("ann", ip, Attempt::Password, t1).is_ok());
        // After the lock-out three more failures lock for twice as long.
        let t2 = t0 + Duration::from_secs(60);
        for _ in 0..3 {
            th.reserve("bob", ip, Attempt::Password, t2).unwrap();
        }
        assert_eq!(
            th.reserve("bob", ip, Attempt::Password, t2).unwrap_err(),
            Refusal::Throttled(Duration::from_secs(120))
        );
        // A cancelled attempt does not count; a success forgives the pair.
        let th = throttle(2, 100, 1000);
        let a = th.reserve("cy", ip, Attempt::Password, t0).unwrap();
        th.cancel(a);
        let b = th.reserve("cy", ip, Attempt::Password, t0).unwrap();
        th.succeeded(b, Attempt::Password, t0);
        th.reserve("cy", ip, Attempt::Password, t0).unwrap();
        assert!(th.reserve("cy", ip, Attempt::Password, t0).is_ok());
        assert!(th.reserve("cy", ip, Attempt::Password, t0).is_err());
    }

    #[test]
    fn throttle_counts_all_users_of_one_ip() {
        let t0 = Instant::now();
        let th = throttle(2, 100, 1000);
        let ip = Some(IpAddr::from([10, 0, 0, 2]));
        for i in 0..8 {
            th.reserve(&format!("u{i}"), ip, Attempt::Password, t0)
                .unwrap();
        }
        assert!(th.reserve("fresh", ip, Attempt::Password, t0).is_err());
        // Failed tokens count too, once they failed.
        let other = Some(IpAddr::from([10, 0, 0, 3]));
        for i in 0..8 {
            let t = th
                .reserve(&format!("u{i}"), other, Attempt::Token, t0)
                .unwrap();
            th.failed(t, t0);
        }
        assert!(th.reserve("fresh", other, Attempt::Token, t0).is_err());
        let third = Some(IpAddr::from([10, 0, 0, 4]));
        assert!(th.reserve("fresh", third, Attempt::Password, t0).is_ok());
    }

    #[test]
    fn per_user_cap_spares_trusted_addresses_and_tokens() {
        let t0 = Instant::now();
        let th = throttle(100, 3, 1000);
        let home = Some(IpAddr::from([10, 0, 1, 1]));
        let ok = th.reserve("dee", home, Attempt::Password, t0).unwrap();
        th.succeeded(ok, Attempt::Password, t0);
        for i in 0..3 {
            let ip = Some(IpAddr::from([10, 0, 2, i]));
            th.reserve("dee", ip, Attempt::Password, t0).unwrap();
        }
        let fresh = Some(IpAddr::from([10, 0, 3, 1]));
        assert!(matches!(
            th.reserve("dee", fresh, Attempt::Password, t0),
            Err(Refusal::Throttled(_))
        ));
        assert!(th.reserve("dee", fresh, Attempt::Token, t0).is_ok());
        assert!(th.reserve("dee", home, Attempt::Password, t0).is_ok());
        // The window is short.
        let later = t0 + Duration::from_secs(10);
        assert!(th.reserve("dee", fresh, Attempt::Password, later).is_ok());
    }

    #[test]
    fn throttle_is_bounded_and_sweeps_expired_entries() {
        let t0 = Instant::now();
        let th = throttle(5, 20, 100);
        let mut full = 0;
        for i in 0..200u32 {
            let ip = Some(IpAddr::from(i.to_be_bytes()));
            if matches!(
                th.reserve(&format!("n{i}"), ip, Attempt::Password, t0),
                Err(Refusal::Full)
            ) {
                full += 1;
            }
        }
        assert!(th.len() <= 100, "{}", th.len());
        assert!(full > 100, "{full}");
        // Long after, the old entries are swept and new keys fit again.
        let later = t0 + Duration::from_secs(3600);
        assert!(th
            .reserve(
                "new",
                Some(IpAddr::from([1, 1, 1, 1])),
                Attempt::Password,
                later
            )
            .is_ok());
        assert!(th.len() <= 3, "{}", th.len());
    }

    #[tokio::test]
    async fn hash_pool_refuses_beyond_its_queue() {
        let pool = Arc::new(HashPool::new(1, 2));
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let rx = Arc::new(Mutex::new(rx));
        let mut running = Vec::new();
        for _ in 0..3 {
            let (pool, rx) = (pool.clone(), rx.clone());
            running.push(tokio::spawn(async move {
                pool.run(move || {
                    let _ = rx.lock().unwrap().recv();
                })
                .await
            }));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(matches!(pool.run(|| ()).await, Err(PoolError::Busy)));
        for _ in 0..3 {
            tx.send(()).unwrap();
        }
        for r in running {
            r.await.unwrap().unwrap();
        }
        assert!(pool.run(|| 7).await.is_ok());
    }

    #[test]
    fn damper_refuses_beyond_max_within_window() {
        let t0 = Instant::now();
        let d = TakeoverDamper::new(2, Duration::from_secs(10));
        assert!(d.allow("a", t0));
        assert!(d.allow("a", t0));
        assert!(!d.allow("a", t0));
        assert!(d.allow("b", t0));
        assert!(d.allow("a", t0 + Duration::from_secs(10)));
    }

    #[test]
    fn flood_ban_after_max_closes_until_the_window_passes() {
        let t0 = Instant::now();
        let w = Duration::from_secs(60);
        let ban = FloodBan::new(3, w);
        let (ip, other) = (IpAddr::from([10, 0, 0, 9]), IpAddr::from([10, 0, 0, 8]));
        for k in 0..3 {
            assert!(!ban.banned(ip, t0), "banned after {k} closes");
            ban.flooded(ip, t0 + Duration::from_secs(k));
        }
        assert!(ban.banned(ip, t0 + Duration::from_secs(3)));
        assert!(!ban.banned(other, t0 + Duration::from_secs(3)));
        // The first close is a window old: two left, no ban.
        assert!(!ban.banned(ip, t0 + w));
        let off = FloodBan::new(0, w);
        for _ in 0..10 {
            off.flooded(ip, t0);
        }
        assert!(!off.banned(ip, t0));
    }

    #[test]
    fn ip_slots_count_and_release() {
        let c = Arc::new(IpConnections::default());
        let ip = IpAddr::from([127, 0, 0, 1]);
        let (a, n) = c.open(ip);
        assert_eq!(n, 1);
        let (_b, n) = c.open(ip);
        assert_eq!(n, 2);
        drop(a);
        let (_c, n) = c.open(ip);
        assert_eq!(n, 2);
    }

    #[test]
    fn register_limit_holds_per_address_and_frees_with_time() {
        let w = Duration::from_secs(60);
        let limit = RegisterLimit::new(2, w);
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let t0 = Instant::now();
        assert!(limit.reserve(a, t0).is_ok());
        assert!(limit.reserve(a, t0 + Duration::from_secs(10)).is_ok());
        let wait = limit.reserve(a, t0 + Duration::from_secs(20)).unwrap_err();
        assert_eq!(wait, Duration::from_secs(40));
        assert!(limit.reserve(b, t0 + Duration::from_secs(20)).is_ok());
        assert!(limit.reserve(a, t0 + Duration::from_secs(61)).is_ok());
        assert!(RegisterLimit::new(0, w).reserve(a, t0).is_ok());
    }
}
