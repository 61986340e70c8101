//! Per-shard measurements, written by the shard once per batch and read by the HTTP port.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use hdrhistogram::Histogram;
use sluice_protocol::Counters;

/// Highest latency a histogram records exactly; above it values are clamped (one minute).
const LATENCY_US_MAX: u64 = 60_000_000;

/// What one shard publishes. Counters are copied from the shard's own state after each batch,
/// so the shard never contends on them while handling datagrams.
pub struct ShardMetrics {
    pub protocol: Mutex<Counters>,
    pub commits: AtomicU64,
    pub commit_errors: AtomicU64,
    pub points_stored: AtomicU64,
    pub responses_dropped: AtomicU64,
    pub dedup_entries: AtomicU64,
    pub dtls: Mutex<sluice_dtls::Counters>,
    pub dtls_sessions: AtomicU64,
    pub dtls_handshakes: AtomicU64,
    /// Receive of the datagram to the hand-over of its acknowledgement to the kernel.
    pub ack_latency_us: Mutex<Histogram<u64>>,
    /// Duration of one group commit (write plus fdatasync under `--durability fsync`).
    pub commit_latency_us: Mutex<Histogram<u64>>,
}

impl ShardMetrics {
    pub fn new() -> Self {
        ShardMetrics {
            protocol: Mutex::new(Counters::default()),
            commits: AtomicU64::new(0),
            commit_errors: AtomicU64::new(0),
            points_stored: AtomicU64::new(0),
            responses_dropped: AtomicU64::new(0),
            dedup_entries: AtomicU64::new(0),
            dtls: Mutex::new(sluice_dtls::Counters::default()),
            dtls_sessions: AtomicU64::new(0),
            dtls_handshakes: AtomicU64::new(0),
            ack_latency_us: Mutex::new(latency_histogram()),
            commit_latency_us: Mutex::new(latency_histogram()),
        }
    }
}

pub fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_US_MAX, 3).expect("static histogram bounds are valid")
}

pub fn record(histogram: &mut Histogram<u64>, value_us: u64, count: u64) {
    histogram.saturating_record_n(value_us.clamp(1, LATENCY_US_MAX), count);
}

/// The protocol counters, each with its metric name, help line and, for responses, its code.
fn protocol_counters(c: &Counters) -> [(&'static str, Option<&'static str>, u64); 19] {
    [
        ("sluice_datagrams_received_total", None, c.datagrams),
        ("sluice_requests_total", None, c.requests),
        ("sluice_readings_accepted_total", None, c.readings),
        ("sluice_duplicates_total", None, c.duplicates),
        ("sluice_malformed_datagrams_total", None, c.malformed),
        ("sluice_pings_total", None, c.pings),
        ("sluice_resets_received_total", None, c.resets_received),
        ("sluice_block1_continues_total", None, c.block1_continues),
        ("sluice_block1_timeouts_total", None, c.block1_timeouts),
        ("sluice_dedup_evictions_total", None, c.dedup_evictions),
        ("sluice_error_responses_total", Some("4.00"), c.bad_request),
        ("sluice_error_responses_total", Some("4.01"), c.unauthorized),
        ("sluice_error_responses_total", Some("4.03"), c.forbidden),
        ("sluice_error_responses_total", Some("4.04"), c.not_found),
        (
            "sluice_error_responses_total",
            Some("4.05"),
            c.method_not_allowed,
        ),
        ("sluice_error_responses_total", Some("4.08"), c.incomplete),
        ("sluice_error_responses_total", Some("4.13"), c.too_large),
        (
            "sluice_error_responses_total",
            Some("4.15"),
            c.unsupported_format,
        ),
        ("sluice_error_responses_total", Some("5.03"), c.unavailable),
    ]
}

type CounterField = fn(&ShardMetrics) -> &AtomicU64;
type HistogramField = fn(&ShardMetrics) -> &Mutex<Histogram<u64>>;

/// Renders every shard's measurements in the Prometheus text format.
pub fn render(shards: &[std::sync::Arc<ShardMetrics>], extra: &str) -> String {
    let mut out = String::with_capacity(8192);
    let _ = writeln!(
        out,
        "# HELP sluice_build_info Version of the running sluiced.\n# TYPE sluice_build_info gauge\nsluice_build_info{{version=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION")
    );
    let counters: Vec<Counters> = shards
        .iter()
        .map(|s| s.protocol.lock().map(|c| c.clone()).unwrap_or_default())
        .collect();
    let mut last_name = "";
    for row in 0..protocol_counters(&Counters::default()).len() {
        for (shard, c) in counters.iter().enumerate() {
            let (name, code, value) = protocol_counters(c)[row];
            if name != last_name {
                let _ = writeln!(out, "# TYPE {name} counter");
                last_name = name;
            }
            match code {
                Some(code) => {
                    let _ = writeln!(out, "{name}{{shard=\"{shard}\",code=\"{code}\"}} {value}");
                }
                None => {
                    let _ = writeln!(out, "{name}{{shard=\"{shard}\"}} {value}");
                }
            }
        }
    }
    dtls(&mut out, shards);
    let atomics: [(&str, &str, CounterField); 7] = [
        ("sluice_commits_total", "counter", |s| &s.commits),
        ("sluice_commit_errors_total", "counter", |s| {
            &s.commit_errors
        }),
        ("sluice_points_stored_total", "counter", |s| {
            &s.points_stored
        }),
        ("sluice_responses_dropped_total", "counter", |s| {
            &s.responses_dropped
        }),
        ("sluice_dedup_entries", "gauge", |s| &s.dedup_entries),
        ("sluice_dtls_sessions", "gauge", |s| &s.dtls_sessions),
        ("sluice_dtls_handshakes_in_progress", "gauge", |s| {
            &s.dtls_handshakes
        }),
    ];
    for (name, kind, field) in atomics {
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for (shard, metrics) in shards.iter().enumerate() {
            let value = field(metrics).load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}{{shard=\"{shard}\"}} {value}");
        }
    }
    let histograms: [(&str, HistogramField); 2] = [
        ("sluice_ack_latency_seconds", |s| &s.ack_latency_us),
        ("sluice_commit_latency_seconds", |s| &s.commit_latency_us),
    ];
    for (name, field) in histograms {
        let mut merged = latency_histogram();
        for metrics in shards {
            if let Ok(h) = field(metrics).lock() {
                let _ = merged.add(&*h);
            }
        }
        summary(&mut out, name, &merged);
    }
    out.push_str(extra);
    out
}

/// The DTLS counters of every shard (zero when CoAPS is off).
fn dtls(out: &mut String, shards: &[std::sync::Arc<ShardMetrics>]) {
    let counters: Vec<sluice_dtls::Counters> = shards
        .iter()
        .map(|s| s.dtls.lock().map(|c| c.clone()).unwrap_or_default())
        .collect();
    type Field = fn(&sluice_dtls::Counters) -> u64;
    let rows: [(&str, Field); 14] = [
        ("sluice_dtls_records_malformed_total", |c| {
            c.records_malformed
        }),
        ("sluice_dtls_hello_verify_requests_total", |c| {
            c.hello_verify_requests
        }),
        ("sluice_dtls_handshakes_started_total", |c| {
            c.handshakes_started
        }),
        ("sluice_dtls_handshakes_completed_total", |c| {
            c.handshakes_completed
        }),
        ("sluice_dtls_handshakes_failed_total", |c| {
            c.handshakes_failed
        }),
        ("sluice_dtls_handshakes_refused_total", |c| {
            c.handshakes_refused
        }),
        ("sluice_dtls_handshakes_timed_out_total", |c| {
            c.handshakes_timed_out
        }),
        ("sluice_dtls_unknown_identities_total", |c| {
            c.unknown_identities
        }),
        ("sluice_dtls_records_replayed_total", |c| c.records_replayed),
        ("sluice_dtls_records_forged_total", |c| c.records_forged),
        ("sluice_dtls_records_without_session_total", |c| {
            c.records_without_session
        }),
        ("sluice_dtls_sessions_evicted_total", |c| c.sessions_evicted),
        ("sluice_dtls_sessions_closed_total", |c| c.sessions_closed),
        ("sluice_dtls_sessions_revoked_total", |c| c.sessions_revoked),
    ];
    for (name, field) in rows {
        let _ = writeln!(out, "# TYPE {name} counter");
        for (shard, c) in counters.iter().enumerate() {
            let _ = writeln!(out, "{name}{{shard=\"{shard}\"}} {}", field(c));
        }
    }
}

/// A Prometheus summary (quantiles, sum, count) of a histogram of microseconds, in seconds.
pub fn summary(out: &mut String, name: &str, histogram: &Histogram<u64>) {
    let _ = writeln!(out, "# TYPE {name} summary");
    for quantile in ["0.5", "0.9", "0.99", "0.999"] {
        let q: f64 = quantile.parse().expect("literal quantile");
        let value = histogram.value_at_quantile(q) as f64 / 1e6;
        let _ = writeln!(out, "{name}{{quantile=\"{quantile}\"}} {value}");
    }
    let sum: f64 = histogram
        .iter_recorded()
        .map(|v| v.value_iterated_to() as f64 * v.count_at_value() as f64)
        .sum::<f64>()
        / 1e6;
    let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {}", histogram.len());
}
