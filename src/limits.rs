//! Abuse limits, each a small piece of bookkeeping with the clock passed in so it can be
//! unit-tested: a per-connection token bucket for frames, a failed-login throttle keyed by
//! user and IP, a take-over damper per user, and per-IP connection counting.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;

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

impl Window {
    /// Events of `key` within `window` before `now` (forgetting older ones).
    fn count(&self, key: &str, window: Duration, now: Instant) -> (usize, Option<Instant>) {
        let Some(mut e) = self.events.get_mut(key) else {
            return (0, None);
        };
        while e
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) >= window)
        {
            e.pop_front();
        }
        (e.len(), e.front().copied())
    }

    fn record(&self, key: &str, window: Duration, now: Instant, keep: usize) {
        if self.events.len() >= SWEEP_AT {
            self.events.retain(|_, e| {
                e.back()
                    .is_some_and(|t| now.saturating_duration_since(*t) < window)
            });
        }
        let mut e = self.events.entry(key.to_string()).or_default();
        e.push_back(now);
        while e.len() > keep {
            e.pop_front();
        }
    }

    fn clear(&self, key: &str) {
        self.events.remove(key);
    }
}

/// Failed logins per (user, IP) and per IP. After `max` failures for one user from one
/// IP (or `4 * max` from one IP in all) within `window`, attempts are refused until the
/// oldest of them is `window` old.
#[derive(Debug)]
pub struct LoginThrottle {
    max: usize,
    window: Duration,
    failures: Window,
}

/// How many times more failures one IP address may have across all users.
const IP_FACTOR: usize = 4;

impl LoginThrottle {
    pub fn new(max: u32, window: Duration) -> LoginThrottle {
        LoginThrottle {
            max: (max as usize).max(1),
            window,
            failures: Window::default(),
        }
    }

    fn keys(user: &str, ip: Option<IpAddr>) -> (String, String) {
        let ip = ip.map(|i| i.to_string()).unwrap_or_default();
        (format!("u\0{user}\0{ip}"), format!("ip\0{ip}"))
    }

    /// `Some(wait)` when `user` from `ip` must wait before trying again.
    pub fn blocked(&self, user: &str, ip: Option<IpAddr>, now: Instant) -> Option<Duration> {
        let (pair, by_ip) = Self::keys(user, ip);
        [(pair, self.max), (by_ip, self.max * IP_FACTOR)]
            .into_iter()
            .filter_map(|(key, max)| {
                let (n, oldest) = self.failures.count(&key, self.window, now);
                let oldest = oldest?;
                (n >= max).then(|| {
                    self.window
                        .saturating_sub(now.saturating_duration_since(oldest))
                })
            })
            .max()
    }

    pub fn failed(&self, user: &str, ip: Option<IpAddr>, now: Instant) {
        let (pair, by_ip) = Self::keys(user, ip);
        self.failures.record(&pair, self.window, now, self.max);
        self.failures
            .record(&by_ip, self.window, now, self.max * IP_FACTOR);
    }

    pub fn succeeded(&self, user: &str, ip: Option<IpAddr>) {
        self.failures.clear(&Self::keys(user, ip).0);
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

    #[test]
    fn throttle_blocks_after_max_failures_and_forgets() {
        let t0 = Instant::now();
        let w = Duration::from_secs(60);
        let th = LoginThrottle::new(3, w);
        let ip = Some(IpAddr::from([10, 0, 0, 1]));
        for _ in 0..3 {
            assert_eq!(th.blocked("bob", ip, t0), None);
            th.failed("bob", ip, t0);
        }
        let wait = th.blocked("bob", ip, t0 + Duration::from_secs(10)).unwrap();
        assert_eq!(wait, Duration::from_secs(50));
        // Another user from the same IP is not blocked yet; after the window nobody is.
        assert_eq!(th.blocked("ann", ip, t0), None);
        assert_eq!(th.blocked("bob", ip, t0 + w), None);
        th.succeeded("bob", ip);
        assert_eq!(th.blocked("bob", ip, t0), None);
    }

    #[test]
    fn throttle_counts_all_users_of_one_ip() {
        let t0 = Instant::now();
        let th = LoginThrottle::new(2, Duration::from_secs(60));
        let ip = Some(IpAddr::from([10, 0, 0, 2]));
        for i in 0..8 {
            th.failed(&format!("u{i}"), ip, t0);
        }
        assert!(th.blocked("fresh", ip, t0).is_some());
        assert!(th
            .blocked("fresh", Some(IpAddr::from([10, 0, 0, 3])), t0)
            .is_none());
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
}
