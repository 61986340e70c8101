//! The retention thread: drops partitions older than `--retention`, never on a shard's thread.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use sluice_storage::Retention;

use crate::shard::unix_seconds;

/// Longest pause between retention passes: a partition outlives its horizon by at most this.
const RETENTION_INTERVAL_MAX: Duration = Duration::from_secs(60);
/// Shortest pause: a pass reads the catalog of every shard, so not more often than this.
const RETENTION_INTERVAL_MIN: Duration = Duration::from_secs(1);

pub struct RetentionThread {
    thread: JoinHandle<()>,
    wake: Arc<(Mutex<bool>, Condvar)>,
}

/// How long between passes for a retention of `keep`: a tenth of it, within [1 s, 60 s].
pub fn interval(keep: Duration) -> Duration {
    (keep / 10).clamp(RETENTION_INTERVAL_MIN, RETENTION_INTERVAL_MAX)
}

pub fn start(
    retention: Retention,
    keep: Duration,
    shutdown: Arc<AtomicBool>,
) -> anyhow::Result<RetentionThread> {
    let wake = Arc::new((Mutex::new(false), Condvar::new()));
    let thread_wake = wake.clone();
    let every = interval(keep);
    tracing::info!(
        retention_s = keep.as_secs(),
        interval_s = every.as_secs(),
        "retention on"
    );
    let thread = std::thread::Builder::new()
        .name("sluiced-retention".to_string())
        .spawn(move || {
            let mut failing = false;
            while !shutdown.load(Ordering::Relaxed) {
                let now = unix_seconds(SystemTime::now());
                let horizon = (now - keep.as_secs_f64()).floor() as i64;
                match retention.drop_before(horizon) {
                    Ok(report) => {
                        failing = false;
                        if report.partitions > 0 {
                            tracing::info!(
                                partitions = report.partitions,
                                segments = report.segments,
                                points = report.points,
                                bytes = report.bytes,
                                horizon,
                                "retention dropped partitions"
                            );
                        }
                    }
                    Err(error) => {
                        if !failing {
                            tracing::error!(%error, "retention failed; retrying every pass");
                            failing = true;
                        }
                    }
                }
                let (stopped, condvar) = &*thread_wake;
                let guard = stopped.lock().unwrap_or_else(|p| p.into_inner());
                let (guard, _) = condvar
                    .wait_timeout_while(guard, every, |stopped| !*stopped)
                    .unwrap_or_else(|p| p.into_inner());
                if *guard {
                    break;
                }
            }
        })
        .context("cannot start the retention thread")?;
    Ok(RetentionThread { thread, wake })
}

impl RetentionThread {
    pub fn stop(self) {
        let (stopped, condvar) = &*self.wake;
        *stopped.lock().unwrap_or_else(|p| p.into_inner()) = true;
        condvar.notify_all();
        let _ = self.thread.join();
    }
}
