//! Overload protection of one shard (docs/overload.md): a saturated shard answers new requests
//! 5.03 Service Unavailable with Max-Age, a device over its rate gets 4.29 Too Many Requests with
//! Max-Age, instead of the kernel dropping datagrams silently once the socket queue is full.
//!
//! Each datagram is screened before its payload is decoded ([`Overload::screen`]): refusing
//! costs a header parse and a dedup lookup (`Endpoint::refuse_new`), far less than serving, so a
//! shard keeps answering under a load well above what it can store. Retransmissions of
//! exchanges the shard remembers are never refused: they get their remembered answer.
//!
//! A shard is saturated when either
//! - its commit backlog (requests received and not yet answered: the commit being synced and
//!   the one being gathered behind it) reaches `--shed-backlog`, or the readings buffered for
//!   its next commit reach [`BACKLOG_READINGS_MAX`], or
//! - the datagram being handled waited in the socket queue longer than `--shed-delay` (the
//!   kernel stamps each datagram on arrival, SO_TIMESTAMPNS).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use ahash::RandomState;
use sluice_protocol::{Endpoint, Identity, Outcome, Refusal};

use crate::metrics::{self, ShardMetrics};

/// Device token buckets one shard keeps (about 100 bytes each with the device id: 6.5 MiB).
/// Beyond it an arbitrary bucket is dropped for the new device (that device starts again
/// with a full burst); buckets idle long enough to be full again are swept every
/// [`BUCKET_SWEEP_INTERVAL`], as dropping them changes nothing.
pub const DEVICE_BUCKETS_MAX: usize = 65_536;
/// How often buckets that refilled completely are dropped from the table.
const BUCKET_SWEEP_INTERVAL: Duration = Duration::from_secs(10);
/// Ceiling of the Max-Age of a 5.03 (seconds): a device never waits longer than this because
/// of a momentary overload.
pub const SHED_MAX_AGE_MAX_S: u32 = 30;
/// Ceiling of the Max-Age of a 4.29 (seconds): one day, for rates as low as one a day.
pub const RATE_LIMITED_MAX_AGE_MAX_S: u32 = 86_400;
/// An overload or rate-limiting episode ends (and its summary is logged) after this long
/// without a refusal.
const EPISODE_QUIET: Duration = Duration::from_secs(1);
/// A long episode is summarised in the log this often.
const EPISODE_REPORT_INTERVAL: Duration = Duration::from_secs(60);
/// The window over which the shard's acknowledgement rate is measured (for Max-Age).
const ACK_RATE_WINDOW: Duration = Duration::from_secs(1);
/// Readings buffered for a shard's next commit (in memory until it is written) beyond which new
/// requests are refused 5.03 (reason `backlog`): with large batches (rkyv, Block1) the request
/// bound alone would let a slow disk pin gigabytes. A million readings is tens of MiB, several
/// commits' worth at the highest rates measured.
pub const BACKLOG_READINGS_MAX: usize = 1 << 20;
/// `getsockopt` option of the socket's memory counters (linux/asm-generic/socket.h; libc lacks it).
const SO_MEMINFO: libc::c_int = 55;
/// Commit backlog bound the daemon enforces anyway: the shard stops receiving when this many
/// requests wait behind the commit in flight, so `--shed-backlog` is at most this.
pub const SHED_BACKLOG_MAX: usize = crate::shard::PENDING_EXCHANGES_MAX;

/// The overload settings (`--shed-backlog`, `--shed-delay`, `--device-rate`, `--device-burst`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct OverloadConfig {
    /// New requests are refused 5.03 while this many requests await their commit.
    pub shed_backlog: usize,
    /// New requests that waited longer than this in the socket queue are refused 5.03.
    pub shed_delay: Option<Duration>,
    /// Per-device token bucket; None: no rate limit.
    pub device_rate: Option<DeviceRate>,
}

impl Default for OverloadConfig {
    fn default() -> Self {
        OverloadConfig {
            shed_backlog: SHED_BACKLOG_MAX,
            shed_delay: Some(Duration::from_millis(500)),
            device_rate: None,
        }
    }
}

/// A token bucket's parameters: `per_second` tokens added per second, at most `burst` held.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DeviceRate {
    pub per_second: f64,
    pub burst: f64,
}

/// Why a shard refuses a new request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    Backlog,
    QueueDelay,
}

impl Reason {
    pub fn label(self) -> &'static str {
        match self {
            Reason::Backlog => "backlog",
            Reason::QueueDelay => "queue_delay",
        }
    }
}

struct Bucket {
    tokens: f64,
    updated: Instant,
}

impl Bucket {
    /// Takes a token; or says how long until one is there.
    fn take(&mut self, now: Instant, rate: DeviceRate) -> Result<(), Duration> {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate.per_second).min(rate.burst);
        self.updated = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64(
                (1.0 - self.tokens) / rate.per_second,
            ))
        }
    }
}

/// Start and end log lines of a run of refusals, and what it refused.
#[derive(Default)]
struct Episode {
    /// (started, last refusal, last summary) while an episode lasts.
    active: Option<(Instant, Instant, Instant)>,
    refused: u64,
}

impl Episode {
    /// Counts one refusal; true when it starts an episode (the caller logs the start).
    fn refusal(&mut self, now: Instant) -> bool {
        self.refused += 1;
        match &mut self.active {
            Some((_, last, _)) => {
                *last = now;
                false
            }
            None => {
                self.active = Some((now, now, now));
                true
            }
        }
    }

    /// Ends a quiet episode or summarises a long one: (seconds so far, refusals, ended).
    fn report(&mut self, now: Instant) -> Option<(f64, u64, bool)> {
        let (started, last, summary) = self.active.as_mut()?;
        let seconds = now.saturating_duration_since(*started).as_secs_f64();
        if now.saturating_duration_since(*last) >= EPISODE_QUIET {
            let refused = std::mem::take(&mut self.refused);
            self.active = None;
            return Some((seconds, refused, true));
        }
        if now.saturating_duration_since(*summary) >= EPISODE_REPORT_INTERVAL {
            *summary = now;
            return Some((seconds, self.refused, false));
        }
        None
    }
}

/// The overload state of one shard; lives on the shard's thread.
pub struct Overload {
    shard: usize,
    config: OverloadConfig,
    buckets: HashMap<Box<str>, Bucket, RandomState>,
    last_sweep: Instant,
    shed_backlog: u64,
    shed_queue_delay: u64,
    rate_limited: u64,
    shedding: Episode,
    limiting: Episode,
    /// Acknowledged requests per second (for the Max-Age of a 5.03), and its measurement;
    /// None until one window has passed.
    acked_per_s: Option<f64>,
    acked_at_window: u64,
    window_start: Instant,
    /// Socket queueing delays of this batch, recorded under one lock in [`Overload::tick`].
    queue_delays_us: Vec<u64>,
    /// Spreads Max-Age so refused devices do not come back in step (xorshift).
    jitter: u64,
    /// The shard's sockets, whose kernel drop counters are published.
    sockets: Vec<RawFd>,
}

impl Overload {
    /// `sockets`: the shard's CoAP and CoAPS sockets (for their kernel drop counters).
    pub fn new(shard: usize, config: OverloadConfig, sockets: Vec<RawFd>) -> Overload {
        let now = Instant::now();
        let hasher = RandomState::new();
        Overload {
            shard,
            config,
            jitter: hasher.hash_one(shard) | 1,
            buckets: HashMap::with_hasher(hasher),
            last_sweep: now,
            shed_backlog: 0,
            shed_queue_delay: 0,
            rate_limited: 0,
            shedding: Episode::default(),
            limiting: Episode::default(),
            acked_per_s: None,
            acked_at_window: 0,
            window_start: now,
            queue_delays_us: Vec::with_capacity(2 * crate::io::DATAGRAMS_PER_BATCH_MAX),
            sockets,
        }
    }

    /// How long a datagram stamped `arrival` by the kernel has waited (None: not stamped).
    pub fn arrived(&mut self, arrival: Option<SystemTime>) -> Option<Duration> {
        let waited = SystemTime::now()
            .duration_since(arrival?)
            .unwrap_or_default();
        if self.queue_delays_us.len() < self.queue_delays_us.capacity() {
            self.queue_delays_us.push(waited.as_micros() as u64);
        }
        Some(waited)
    }

    /// Screens one CoAP message before it is decoded. `waited`: its time in the socket queue;
    /// `backlog`: requests of this shard awaiting their commit and readings buffered for the
    /// next one; `identity`: the DTLS identity
    /// (None on plain CoAP, where the device is `/t/{device}`). Returns the outcome when the
    /// message is refused (`response` then holds the refusal, or nothing under No-Response);
    /// None: handle it as usual.
    #[allow(clippy::too_many_arguments)]
    pub fn screen(
        &mut self,
        endpoint: &mut Endpoint,
        now: Instant,
        waited: Option<Duration>,
        (backlog, readings): (usize, usize),
        peer: SocketAddr,
        identity: Option<Identity<'_>>,
        datagram: &[u8],
        response: &mut Vec<u8>,
    ) -> Option<Outcome> {
        let session = identity.map(|identity| identity.session);
        let saturated = if backlog >= self.config.shed_backlog || readings >= BACKLOG_READINGS_MAX {
            Some(Reason::Backlog)
        } else if self
            .config
            .shed_delay
            .is_some_and(|bound| waited.is_some_and(|waited| waited > bound))
        {
            Some(Reason::QueueDelay)
        } else {
            None
        };
        if let Some(reason) = saturated {
            let max_age_s = self.shed_max_age(waited, backlog);
            let refused = endpoint.refuse_new(
                now,
                peer,
                session,
                datagram,
                Refusal::Overloaded,
                max_age_s,
                response,
            );
            if !refused {
                return None;
            }
            match reason {
                Reason::Backlog => self.shed_backlog += 1,
                Reason::QueueDelay => self.shed_queue_delay += 1,
            }
            if self.shedding.refusal(now) {
                tracing::warn!(
                    shard = self.shard,
                    reason = reason.label(),
                    backlog,
                    readings,
                    queue_delay_ms = waited.map_or(0, |w| w.as_millis() as u64),
                    max_age_s,
                    "overloaded: answering new requests 5.03 until the shard catches up"
                );
            }
            return Some(reply(response));
        }
        let rate = self.config.device_rate?;
        let device = match identity {
            Some(identity) => identity.device,
            None => std::str::from_utf8(sluice_protocol::path_device(datagram)?).ok()?,
        };
        // A retransmission is not a new request: it gets its remembered answer, token-free.
        if endpoint.is_retransmission(now, peer, session, datagram) {
            return None;
        }
        let wait = self.bucket(device, now).take(now, rate).err()?;
        let max_age_s = (wait.as_secs_f64().ceil() as u32).clamp(1, RATE_LIMITED_MAX_AGE_MAX_S);
        let refused = endpoint.refuse_new(
            now,
            peer,
            session,
            datagram,
            Refusal::RateLimited,
            max_age_s,
            response,
        );
        if !refused {
            return None;
        }
        self.rate_limited += 1;
        if self.limiting.refusal(now) {
            tracing::warn!(
                shard = self.shard,
                device,
                rate_per_s = rate.per_second,
                burst = rate.burst,
                "rate limit: answering 4.29 to devices over their rate"
            );
        }
        Some(reply(response))
    }

    /// The bucket of `device`, made (full) if it has none.
    fn bucket(&mut self, device: &str, now: Instant) -> &mut Bucket {
        if !self.buckets.contains_key(device) {
            if self.buckets.len() >= DEVICE_BUCKETS_MAX {
                if let Some(victim) = self.buckets.keys().next().cloned() {
                    self.buckets.remove(&victim);
                }
            }
            let burst = self.config.device_rate.map_or(1.0, |rate| rate.burst);
            self.buckets.insert(
                device.into(),
                Bucket {
                    tokens: burst,
                    updated: now,
                },
            );
        }
        self.buckets.get_mut(device).expect("inserted above")
    }

    /// Max-Age of a 5.03: how long the shard needs to catch up, from the larger of the time the
    /// datagram queued and the time to acknowledge the backlog at the measured rate, rounded up,
    /// between 1 and [`SHED_MAX_AGE_MAX_S`]; then spread by up to as much again, so the devices
    /// refused together do not all come back in the same second.
    fn shed_max_age(&mut self, waited: Option<Duration>, backlog: usize) -> u32 {
        // Before the first measurement the backlog says nothing about time.
        let drain_s = self
            .acked_per_s
            .map_or(0.0, |rate| backlog as f64 / rate.max(1.0));
        let waited_s = waited.map_or(0.0, |w| w.as_secs_f64());
        let base = (drain_s.max(waited_s).ceil() as u32).clamp(1, SHED_MAX_AGE_MAX_S);
        self.jitter ^= self.jitter << 13;
        self.jitter ^= self.jitter >> 7;
        self.jitter ^= self.jitter << 17;
        base + (self.jitter % (u64::from(base) + 1)) as u32
    }

    /// Once per batch: publishes the counters, measures the acknowledgement rate, sweeps idle
    /// buckets, and logs the end (or a summary) of an episode.
    pub fn tick(&mut self, now: Instant, metrics: &ShardMetrics) {
        metrics
            .shed_backlog
            .store(self.shed_backlog, Ordering::Relaxed);
        metrics
            .shed_queue_delay
            .store(self.shed_queue_delay, Ordering::Relaxed);
        metrics
            .rate_limited
            .store(self.rate_limited, Ordering::Relaxed);
        metrics
            .overloaded
            .store(u64::from(self.shedding.active.is_some()), Ordering::Relaxed);
        metrics
            .rate_limit_buckets
            .store(self.buckets.len() as u64, Ordering::Relaxed);
        if !self.queue_delays_us.is_empty() {
            if let Ok(mut histogram) = metrics.queue_delay_us.lock() {
                for us in self.queue_delays_us.drain(..) {
                    metrics::record(&mut histogram, us, 1);
                }
            }
            self.queue_delays_us.clear();
        }
        let window = now.saturating_duration_since(self.window_start);
        if window >= ACK_RATE_WINDOW {
            // Every acknowledged request is one sample of the acknowledgement latency.
            let acked = metrics.ack_latency_us.lock().map_or(0, |h| h.len());
            let rate = acked.saturating_sub(self.acked_at_window) as f64 / window.as_secs_f64();
            self.acked_per_s = Some(self.acked_per_s.map_or(rate, |old| 0.5 * old + 0.5 * rate));
            self.acked_at_window = acked;
            self.window_start = now;
            let drops = self.sockets.iter().filter_map(|fd| socket_drops(*fd)).sum();
            metrics.receive_drops.store(drops, Ordering::Relaxed);
        }
        if now.saturating_duration_since(self.last_sweep) >= BUCKET_SWEEP_INTERVAL {
            self.last_sweep = now;
            if let Some(rate) = self.config.device_rate {
                let refill = Duration::from_secs_f64(rate.burst / rate.per_second);
                self.buckets
                    .retain(|_, bucket| now.saturating_duration_since(bucket.updated) < refill);
            }
        }
        if let Some((seconds, refused, ended)) = self.shedding.report(now) {
            let seconds = format!("{seconds:.1}");
            let (backlog, queue_delay) = (self.shed_backlog, self.shed_queue_delay);
            if ended {
                tracing::info!(
                    shard = self.shard,
                    seconds,
                    refused_503 = refused,
                    shed_backlog_total = backlog,
                    shed_queue_delay_total = queue_delay,
                    "overload over"
                );
            } else {
                tracing::warn!(
                    shard = self.shard,
                    seconds,
                    refused_503 = refused,
                    shed_backlog_total = backlog,
                    shed_queue_delay_total = queue_delay,
                    "overload goes on"
                );
            }
        }
        if let Some((seconds, refused, ended)) = self.limiting.report(now) {
            let what = if ended {
                "rate limiting over"
            } else {
                "rate limiting goes on"
            };
            tracing::info!(
                shard = self.shard,
                seconds = format!("{seconds:.1}"),
                refused_429 = refused,
                "{what}"
            );
        }
    }
}

/// Datagrams the kernel dropped on `socket` since it was opened (its receive queue was full).
fn socket_drops(socket: RawFd) -> Option<u64> {
    let mut counters = [0u32; 16];
    let mut len = std::mem::size_of_val(&counters) as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `counters` and updates `len`.
    let result = unsafe {
        libc::getsockopt(
            socket,
            libc::SOL_SOCKET,
            SO_MEMINFO,
            counters.as_mut_ptr().cast(),
            &mut len,
        )
    };
    let index = libc::SK_MEMINFO_DROPS as usize;
    let filled = len as usize / std::mem::size_of::<u32>();
    (result == 0 && index < filled).then(|| u64::from(counters[index]))
}

fn reply(response: &[u8]) -> Outcome {
    if response.is_empty() {
        Outcome::Ignore
    } else {
        Outcome::Reply
    }
}

/// Parses a rate as operators write it: `100/s`, `30/min`, `600/h`, `2000/d`, or a bare number
/// of requests per second.
pub fn parse_rate(text: &str) -> Result<f64, String> {
    let (count, unit) = text.split_once('/').unwrap_or((text, "s"));
    let seconds = match unit.trim() {
        "s" | "sec" | "second" => 1.0,
        "m" | "min" | "minute" => 60.0,
        "h" | "hour" => 3600.0,
        "d" | "day" => 86_400.0,
        other => return Err(format!("unknown unit `{other}` (s, min, h or d)")),
    };
    let count: f64 = count
        .trim()
        .parse()
        .map_err(|_| format!("`{}` is not a number", count.trim()))?;
    if !(count.is_finite() && count > 0.0) {
        return Err("must be more than 0".into());
    }
    Ok(count / seconds)
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_protocol::EndpointConfig;

    fn request(message_id: u16, device: &str) -> Vec<u8> {
        let [high, low] = message_id.to_be_bytes();
        let mut datagram = vec![0x41, 0x02, high, low, 0x7a, 0xb1, b't'];
        datagram.push(device.len() as u8);
        datagram.extend_from_slice(device.as_bytes());
        datagram.extend_from_slice(b"\x11\x6e\xff[{\"n\":\"t\",\"v\":1}]");
        datagram
    }

    fn peer() -> SocketAddr {
        "192.0.2.7:40000".parse().unwrap()
    }

    #[test]
    fn rates_parse_as_operators_write_them() {
        assert_eq!(parse_rate("100/s"), Ok(100.0));
        assert_eq!(parse_rate("30/min"), Ok(0.5));
        assert_eq!(parse_rate("7200/h"), Ok(2.0));
        assert_eq!(parse_rate("5"), Ok(5.0));
        assert!(parse_rate("0/s").is_err());
        assert!(parse_rate("fast").is_err());
        assert!(parse_rate("10/week").is_err());
    }

    #[test]
    fn a_device_over_its_rate_gets_429_with_the_time_to_its_next_token() {
        let config = OverloadConfig {
            device_rate: Some(DeviceRate {
                per_second: 0.25,
                burst: 2.0,
            }),
            ..OverloadConfig::default()
        };
        let mut overload = Overload::new(0, config, Vec::new());
        let mut endpoint = Endpoint::new(EndpointConfig::default());
        let now = Instant::now();
        let mut response = Vec::new();
        for id in 0..2 {
            let screened = overload.screen(
                &mut endpoint,
                now,
                None,
                (0, 0),
                peer(),
                None,
                &request(id, "d1"),
                &mut response,
            );
            assert!(screened.is_none(), "within the burst");
        }
        let screened = overload.screen(
            &mut endpoint,
            now,
            None,
            (0, 0),
            peer(),
            None,
            &request(2, "d1"),
            &mut response,
        );
        assert!(matches!(screened, Some(Outcome::Reply)));
        assert_eq!(response[1], 0x9d, "4.29");
        // Max-Age (option 14, delta 14 from the start: 0xd1 0x01 then one byte) = 4 s.
        assert_eq!(&response[4 + 1..4 + 1 + 3], &[0xd1, 0x01, 4]);
        // Another device has its own bucket.
        let other = overload.screen(
            &mut endpoint,
            now,
            None,
            (0, 0),
            peer(),
            None,
            &request(3, "d2"),
            &mut response,
        );
        assert!(other.is_none());
        // Four seconds later d1 has a token again.
        let later = now + Duration::from_secs(4);
        let again = overload.screen(
            &mut endpoint,
            later,
            None,
            (0, 0),
            peer(),
            None,
            &request(4, "d1"),
            &mut response,
        );
        assert!(again.is_none());
        assert_eq!(overload.rate_limited, 1);
    }

    #[test]
    fn a_saturated_shard_refuses_503_by_backlog_then_by_queue_delay() {
        let config = OverloadConfig {
            shed_backlog: 10,
            shed_delay: Some(Duration::from_millis(100)),
            device_rate: None,
        };
        let mut overload = Overload::new(0, config, Vec::new());
        let mut endpoint = Endpoint::new(EndpointConfig::default());
        let now = Instant::now();
        let mut response = Vec::new();
        let mut screen = |overload: &mut Overload, id, waited_ms, backlog| {
            overload.screen(
                &mut endpoint,
                now,
                Some(Duration::from_millis(waited_ms)),
                (backlog, 0),
                peer(),
                None,
                &request(id, "d"),
                &mut response,
            )
        };
        assert!(screen(&mut overload, 1, 5, 9).is_none());
        assert!(screen(&mut overload, 2, 5, 10).is_some());
        assert!(screen(&mut overload, 3, 101, 0).is_some());
        assert!(screen(&mut overload, 4, 100, 0).is_none());
        let readings = overload.screen(
            &mut Endpoint::new(EndpointConfig::default()),
            now,
            None,
            (0, BACKLOG_READINGS_MAX),
            peer(),
            None,
            &request(5, "d"),
            &mut Vec::new(),
        );
        assert!(readings.is_some(), "too many readings buffered");
        assert_eq!((overload.shed_backlog, overload.shed_queue_delay), (2, 1));
    }

    #[test]
    fn shed_max_age_follows_the_backlog_and_stays_bounded() {
        let mut overload = Overload::new(0, OverloadConfig::default(), Vec::new());
        assert!(
            overload.shed_max_age(None, 3000) <= 2,
            "no rate measured yet"
        );
        overload.acked_per_s = Some(1000.0);
        for _ in 0..100 {
            let age = overload.shed_max_age(None, 3000);
            assert!((3..=6).contains(&age), "{age}");
            let age = overload.shed_max_age(Some(Duration::from_millis(10)), 0);
            assert!((1..=2).contains(&age), "{age}");
            let age = overload.shed_max_age(Some(Duration::from_secs(3600)), 0);
            assert!((30..=60).contains(&age), "{age}");
        }
    }

    #[test]
    fn kernel_drops_are_read_from_the_socket() {
        use std::os::fd::AsRawFd;
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        assert_eq!(socket_drops(socket.as_raw_fd()), Some(0));
        assert_eq!(socket_drops(-1), None);
    }

    #[test]
    fn the_bucket_table_is_bounded() {
        let config = OverloadConfig {
            device_rate: Some(DeviceRate {
                per_second: 1.0,
                burst: 1.0,
            }),
            ..OverloadConfig::default()
        };
        let mut overload = Overload::new(0, config, Vec::new());
        let now = Instant::now();
        for i in 0..DEVICE_BUCKETS_MAX + 10 {
            let _ = overload.bucket(&format!("device-{i}"), now);
        }
        assert_eq!(overload.buckets.len(), DEVICE_BUCKETS_MAX);
        // Buckets full again are swept.
        let metrics = ShardMetrics::new();
        overload.tick(now + BUCKET_SWEEP_INTERVAL, &metrics);
        assert_eq!(overload.buckets.len(), 0);
    }
}
