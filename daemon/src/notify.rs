//! systemd's notification protocol (`sd_notify(3)`): `READY=1` once recovery is done and every
//! socket is bound, `STOPPING=1` when a drain begins, and `WATCHDOG=1` at half of
//! `WATCHDOG_USEC` while every shard thread is turning. One datagram per message to the unix
//! socket named by `$NOTIFY_SOCKET` (a path, or `@name` in the abstract namespace); all of it is a
//! no-op when the variable is unset, i.e. outside a `Type=notify` unit.

use std::os::unix::net::{SocketAddr as UnixAddr, UnixDatagram};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use crate::metrics::{self, ShardMetrics};

/// How often a task on the HTTP runtime stamps its heartbeat for the watchdog: well under any
/// sensible `WatchdogSec`.
pub const HTTP_HEARTBEAT: Duration = Duration::from_millis(100);

/// Shortest watchdog ping interval honoured, whatever `WATCHDOG_USEC` says: bounds the pinging
/// thread's wake-ups.
const WATCHDOG_INTERVAL_MIN: Duration = Duration::from_millis(10);

/// The connection to the service manager, if there is one.
pub struct Notifier {
    socket: Option<(UnixDatagram, UnixAddr)>,
}

impl Notifier {
    /// From `$NOTIFY_SOCKET`; a bad value is logged and notification is off.
    pub fn from_env() -> Notifier {
        let Some(name) = std::env::var_os("NOTIFY_SOCKET") else {
            return Notifier { socket: None };
        };
        let connect = || -> std::io::Result<(UnixDatagram, UnixAddr)> {
            let name = name.to_string_lossy();
            let addr = match name.strip_prefix('@') {
                Some(abstract_name) => {
                    use std::os::linux::net::SocketAddrExt;
                    UnixAddr::from_abstract_name(abstract_name.as_bytes())?
                }
                None => UnixAddr::from_pathname(&*name)?,
            };
            Ok((UnixDatagram::unbound()?, addr))
        };
        match connect() {
            Ok(socket) => Notifier {
                socket: Some(socket),
            },
            Err(error) => {
                tracing::warn!(%error, socket = ?name, "NOTIFY_SOCKET unusable: no systemd notifications");
                Notifier { socket: None }
            }
        }
    }

    /// Sends one message (`KEY=VALUE` lines); a failure is logged, never fatal.
    pub fn send(&self, message: &str) {
        if let Some((socket, addr)) = &self.socket {
            if let Err(error) = socket.send_to_addr(message.as_bytes(), addr) {
                tracing::warn!(%error, message, "cannot notify systemd");
            }
        }
    }

    /// Starts pinging the watchdog if the service manager asked for it (`WATCHDOG_USEC`, for
    /// this process per `WATCHDOG_PID`): every half period, and only while each of `shards`
    /// has turned its loop, and the HTTP runtime has stamped `http` (see [`HTTP_HEARTBEAT`]),
    /// within the period. A stuck shard or a wedged HTTP runtime thus stops the pings and
    /// systemd restarts the service. Pinging ends when the returned guard is dropped.
    pub fn start_watchdog(
        self: &Arc<Self>,
        shards: Vec<Arc<ShardMetrics>>,
        http: Arc<AtomicU64>,
    ) -> anyhow::Result<Option<Watchdog>> {
        if self.socket.is_none() {
            return Ok(None);
        }
        let Some(period) = watchdog_period() else {
            return Ok(None);
        };
        let interval = (period / 2).max(WATCHDOG_INTERVAL_MIN);
        let stall_ms = period.as_millis() as u64;
        let notifier = self.clone();
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("sluiced-watchdog".into())
            .spawn(move || {
                let mut stalled_logged = false;
                loop {
                    let now = metrics::now_ms();
                    let http_stalled = now.saturating_sub(http.load(Ordering::Relaxed)) > stall_ms;
                    match (stalled(&shards, now, stall_ms), http_stalled) {
                        (None, false) => {
                            notifier.send("WATCHDOG=1");
                            stalled_logged = false;
                        }
                        _ if stalled_logged => {}
                        (Some(shard), _) => {
                            tracing::error!(shard, "a shard thread has not turned for a watchdog period: not pinging the systemd watchdog");
                            stalled_logged = true;
                        }
                        (None, true) => {
                            tracing::error!("the HTTP runtime has not turned for a watchdog period: not pinging the systemd watchdog");
                            stalled_logged = true;
                        }
                    }
                    if stopped.recv_timeout(interval) != Err(mpsc::RecvTimeoutError::Timeout) {
                        return;
                    }
                }
            })?;
        tracing::info!(period = ?period, "systemd watchdog on");
        Ok(Some(Watchdog {
            stop: Some(stop),
            thread: Some(thread),
        }))
    }
}

/// Stops the watchdog pings when dropped.
pub struct Watchdog {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.stop.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// `WATCHDOG_USEC`, if set, positive and meant for this process.
fn watchdog_period() -> Option<Duration> {
    if let Some(pid) = std::env::var_os("WATCHDOG_PID") {
        if pid.to_str().and_then(|p| p.parse::<u32>().ok()) != Some(std::process::id()) {
            return None;
        }
    }
    let usec = std::env::var("WATCHDOG_USEC").ok()?.parse::<u64>().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec))
}

/// The first shard whose loop has not turned within `stall_ms` of `now_ms`, if any.
fn stalled(shards: &[Arc<ShardMetrics>], now_ms: u64, stall_ms: u64) -> Option<usize> {
    shards.iter().position(|shard| {
        let heartbeat = shard.heartbeat_ms.load(Ordering::Relaxed);
        now_ms.saturating_sub(heartbeat) > stall_ms
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shard_that_stopped_turning_is_stalled() {
        let shards: Vec<_> = (0..3).map(|_| Arc::new(ShardMetrics::new())).collect();
        for shard in &shards {
            shard.heartbeat_ms.store(1_000, Ordering::Relaxed);
        }
        assert_eq!(stalled(&shards, 1_500, 1_000), None);
        shards[1].heartbeat_ms.store(400, Ordering::Relaxed);
        assert_eq!(stalled(&shards, 1_500, 1_000), Some(1));
        // A heartbeat published after `now` was read is not a stall.
        shards[1].heartbeat_ms.store(2_000, Ordering::Relaxed);
        assert_eq!(stalled(&shards, 1_500, 1_000), None);
    }

    #[test]
    fn messages_reach_the_socket_and_nothing_happens_without_one() {
        let dir = tempfile_dir();
        let path = dir.join("notify");
        let receiver = UnixDatagram::bind(&path).unwrap();
        let notifier = Notifier {
            socket: Some((
                UnixDatagram::unbound().unwrap(),
                UnixAddr::from_pathname(&path).unwrap(),
            )),
        };
        notifier.send("READY=1");
        let mut buffer = [0u8; 64];
        let n = receiver.recv(&mut buffer).unwrap();
        assert_eq!(&buffer[..n], b"READY=1");
        Notifier { socket: None }.send("READY=1");
        std::fs::remove_dir_all(dir).unwrap();
    }

    fn tempfile_dir() -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("sluiced-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
