//! Measurements: per-shard counters and latency histograms, written by the shard once per batch,
//! and the query port's own; merged into one [`Snapshot`] when scraped, which renders as the
//! Prometheus text format (`/metrics`) or JSON (`/v1/stats`).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde_json::{json, Value as Json};
use sluice_protocol::Counters;

/// Highest latency a histogram records exactly; above it values are clamped (one minute).
const LATENCY_US_MAX: u64 = 60_000_000;
/// Quantiles every latency summary reports.
pub const QUANTILES: [f64; 4] = [0.5, 0.9, 0.99, 0.999];
/// How long after its last failed commit a shard counts as unable to commit (`/readyz` 503,
/// `sluice_commit_failing` 1) without a successful commit meanwhile: the Max-Age its 5.03
/// answers carry. Past it the node turns ready again, so a balancer sends traffic that tries
/// the disk again; a shard that never gets a request would otherwise stay unready for ever.
pub const COMMIT_FAILURE_HOLD: Duration =
    Duration::from_secs(crate::shard::UNAVAILABLE_MAX_AGE_S as u64);

/// What one shard publishes. Counters are copied from the shard's own state after each batch,
/// so the shard never contends on them while handling datagrams.
pub struct ShardMetrics {
    pub protocol: Mutex<Counters>,
    pub commits: AtomicU64,
    pub commit_errors: AtomicU64,
    pub points_stored: AtomicU64,
    /// Stored readings whose partition was already past its grace period (a late segment).
    pub late_points: AtomicU64,
    pub responses_dropped: AtomicU64,
    pub dedup_entries: AtomicU64,
    pub dtls: Mutex<sluice_dtls::Counters>,
    pub dtls_sessions: AtomicU64,
    pub dtls_handshakes: AtomicU64,
    /// Receive of the datagram to the hand-over of its acknowledgement to the kernel.
    pub ack_latency_us: Mutex<Histogram<u64>>,
    /// Duration of one group commit (write plus fdatasync under `--durability fsync`).
    pub commit_latency_us: Mutex<Histogram<u64>>,
    /// Protocol handling of one datagram: parse, dedup, decode of its payload.
    pub decode_latency_us: Mutex<Histogram<u64>>,
    /// When the shard's loop last turned ([`now_ms`]); it turns at least every receive timeout
    /// while the thread is healthy. The systemd watchdog pings only while every shard's is recent.
    pub heartbeat_ms: AtomicU64,
    /// The last failed group commit, while no commit has succeeded since (disk full, I/O error).
    pub last_commit_failure: Mutex<Option<Instant>>,
    /// New requests refused 5.03 because the commit backlog reached `--shed-backlog`.
    pub shed_backlog: AtomicU64,
    /// New requests refused 5.03 because they waited longer than `--shed-delay` in the socket.
    pub shed_queue_delay: AtomicU64,
    /// New requests refused 4.29 because their device exceeded `--device-rate`.
    pub rate_limited: AtomicU64,
    /// 1 while the shard is in an overload episode (refusing new requests 5.03).
    pub overloaded: AtomicU64,
    /// Device token buckets held.
    pub rate_limit_buckets: AtomicU64,
    /// Kernel arrival of a datagram to the start of its handling (time in the socket queue).
    pub queue_delay_us: Mutex<Histogram<u64>>,
    /// Datagrams the kernel dropped on the shard's sockets (queue full), from SO_MEMINFO.
    pub receive_drops: AtomicU64,
    /// io_uring: multishot receives armed again after they ended.
    pub receive_rearms: AtomicU64,
    /// io_uring: multishot receives that ended because every provided buffer was taken.
    pub receive_buffers_exhausted: AtomicU64,
}

impl ShardMetrics {
    pub fn new() -> Self {
        ShardMetrics {
            protocol: Mutex::new(Counters::default()),
            commits: AtomicU64::new(0),
            commit_errors: AtomicU64::new(0),
            points_stored: AtomicU64::new(0),
            late_points: AtomicU64::new(0),
            responses_dropped: AtomicU64::new(0),
            dedup_entries: AtomicU64::new(0),
            dtls: Mutex::new(sluice_dtls::Counters::default()),
            dtls_sessions: AtomicU64::new(0),
            dtls_handshakes: AtomicU64::new(0),
            ack_latency_us: Mutex::new(latency_histogram()),
            commit_latency_us: Mutex::new(latency_histogram()),
            decode_latency_us: Mutex::new(latency_histogram()),
            heartbeat_ms: AtomicU64::new(now_ms()),
            last_commit_failure: Mutex::new(None),
            shed_backlog: AtomicU64::new(0),
            shed_queue_delay: AtomicU64::new(0),
            rate_limited: AtomicU64::new(0),
            overloaded: AtomicU64::new(0),
            rate_limit_buckets: AtomicU64::new(0),
            queue_delay_us: Mutex::new(latency_histogram()),
            receive_drops: AtomicU64::new(0),
            receive_rearms: AtomicU64::new(0),
            receive_buffers_exhausted: AtomicU64::new(0),
        }
    }

    /// Whether the shard cannot commit: its last commit failed, less than
    /// [`COMMIT_FAILURE_HOLD`] ago.
    pub fn commit_failing(&self) -> bool {
        self.last_commit_failure
            .lock()
            .map(|last| last.is_some_and(|at| at.elapsed() < COMMIT_FAILURE_HOLD))
            .unwrap_or(false)
    }

    /// Records a commit's outcome for [`ShardMetrics::commit_failing`].
    pub fn set_commit_failed(&self, failed: bool) {
        if let Ok(mut last) = self.last_commit_failure.lock() {
            *last = failed.then(Instant::now);
        }
    }
}

/// Milliseconds since the first call in this process: a clock shards can publish in an atomic.
pub fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64
}

pub fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_US_MAX, 3).expect("static histogram bounds are valid")
}

pub fn record(histogram: &mut Histogram<u64>, value_us: u64, count: u64) {
    histogram.saturating_record_n(value_us.clamp(1, LATENCY_US_MAX), count);
}

type Labels = Vec<(&'static str, String)>;

/// One metric family: a name, a type and labelled samples.
pub struct Family {
    pub name: &'static str,
    pub help: &'static str,
    pub kind: Kind,
}

pub enum Kind {
    Counter(Vec<(Labels, u64)>),
    Gauge(Vec<(Labels, f64)>),
    /// Histograms of microseconds, reported in seconds.
    Summary(Vec<(Labels, Histogram<u64>)>),
}

/// Everything `/metrics` and `/v1/stats` report, taken at one moment.
pub struct Snapshot {
    pub families: Vec<Family>,
}

/// The protocol counters, each with its metric name and, for error responses, its code.
fn protocol_counters(c: &Counters) -> [(&'static str, Option<&'static str>, u64); 23] {
    [
        ("sluice_datagrams_received_total", None, c.datagrams),
        ("sluice_requests_total", None, c.requests),
        ("sluice_readings_decoded_total", None, c.readings),
        ("sluice_duplicates_total", None, c.duplicates),
        ("sluice_message_id_reuses_total", None, c.message_id_reuses),
        ("sluice_malformed_datagrams_total", None, c.malformed),
        ("sluice_pings_total", None, c.pings),
        ("sluice_resets_received_total", None, c.resets_received),
        ("sluice_block1_continues_total", None, c.block1_continues),
        ("sluice_block1_timeouts_total", None, c.block1_timeouts),
        ("sluice_dedup_evictions_total", None, c.dedup_evictions),
        ("sluice_error_responses_total", Some("4.00"), c.bad_request),
        ("sluice_error_responses_total", Some("4.01"), c.unauthorized),
        ("sluice_error_responses_total", Some("4.02"), c.bad_option),
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
        (
            "sluice_error_responses_total",
            Some("4.29"),
            c.too_many_requests,
        ),
        ("sluice_error_responses_total", Some("5.03"), c.unavailable),
        (
            "sluice_error_responses_total",
            Some("5.05"),
            c.proxying_not_supported,
        ),
    ]
}

/// Help line of each protocol counter family.
fn protocol_help(name: &str) -> &'static str {
    match name {
        "sluice_datagrams_received_total" => "Datagrams received on the CoAP port.",
        "sluice_requests_total" => "CoAP requests handled (duplicates excluded).",
        "sluice_readings_decoded_total" => {
            "Readings decoded from requests (stored ones: sluice_points_stored_total)."
        }
        "sluice_duplicates_total" => "Retransmitted requests answered from the dedup table.",
        "sluice_message_id_reuses_total" => {
            "Requests with the address, port and Message ID of a remembered exchange but other bytes (NAT, balancer, restarted device): handled as new."
        }
        "sluice_malformed_datagrams_total" => "Datagrams that are not CoAP messages.",
        "sluice_pings_total" => "CoAP pings (empty CON) answered with RST.",
        "sluice_resets_received_total" => "RST messages received.",
        "sluice_block1_continues_total" => "Block1 blocks answered with 2.31 Continue.",
        "sluice_block1_timeouts_total" => "Block1 transfers dropped unfinished.",
        "sluice_dedup_evictions_total" => "Dedup entries evicted before their lifetime ended.",
        _ => "Error responses sent, by CoAP code.",
    }
}

type CounterField = fn(&ShardMetrics) -> &AtomicU64;
type HistogramField = fn(&ShardMetrics) -> &Mutex<Histogram<u64>>;

fn shard_label(shard: usize) -> Labels {
    vec![("shard", shard.to_string())]
}

impl Snapshot {
    /// The build, every shard's counters and its merged histograms.
    pub fn of_shards(shards: &[Arc<ShardMetrics>]) -> Snapshot {
        let mut families = vec![Family {
            name: "sluice_build_info",
            help: "Version of the running sluiced.",
            kind: Kind::Gauge(vec![(
                vec![("version", env!("CARGO_PKG_VERSION").to_string())],
                1.0,
            )]),
        }];
        let counters: Vec<Counters> = shards
            .iter()
            .map(|s| s.protocol.lock().map(|c| c.clone()).unwrap_or_default())
            .collect();
        for row in 0..protocol_counters(&Counters::default()).len() {
            for (shard, c) in counters.iter().enumerate() {
                let (name, code, value) = protocol_counters(c)[row];
                let mut labels = shard_label(shard);
                if let Some(code) = code {
                    labels.push(("code", code.to_string()));
                }
                match families.last_mut() {
                    Some(Family {
                        name: last,
                        kind: Kind::Counter(samples),
                        ..
                    }) if *last == name => samples.push((labels, value)),
                    _ => families.push(Family {
                        name,
                        help: protocol_help(name),
                        kind: Kind::Counter(vec![(labels, value)]),
                    }),
                }
            }
        }
        families.extend(dtls_families(shards));
        families.extend(overload_families(shards));
        let atomics: [(&'static str, &'static str, bool, CounterField); 10] = [
            (
                "sluice_commits_total",
                "Group commits that succeeded.",
                true,
                |s| &s.commits,
            ),
            (
                "sluice_commit_errors_total",
                "Group commits that failed (answered 5.03).",
                true,
                |s| &s.commit_errors,
            ),
            (
                "sluice_points_stored_total",
                "Readings committed to the store.",
                true,
                |s| &s.points_stored,
            ),
            (
                "sluice_late_points_total",
                "Readings stored after their partition's grace period (in a late segment).",
                true,
                |s| &s.late_points,
            ),
            (
                "sluice_responses_dropped_total",
                "Responses the kernel would not take.",
                true,
                |s| &s.responses_dropped,
            ),
            (
                "sluice_receive_rearms_total",
                "io_uring: multishot receives armed again after they ended.",
                true,
                |s| &s.receive_rearms,
            ),
            (
                "sluice_receive_buffers_exhausted_total",
                "io_uring: multishot receives ended because every provided buffer was taken (ENOBUFS).",
                true,
                |s| &s.receive_buffers_exhausted,
            ),
            (
                "sluice_dedup_entries",
                "Entries in the dedup table.",
                false,
                |s| &s.dedup_entries,
            ),
            (
                "sluice_dtls_sessions",
                "Established DTLS sessions.",
                false,
                |s| &s.dtls_sessions,
            ),
            (
                "sluice_dtls_handshakes_in_progress",
                "DTLS handshakes under way.",
                false,
                |s| &s.dtls_handshakes,
            ),
        ];
        for (name, help, counter, field) in atomics {
            let values = shards
                .iter()
                .enumerate()
                .map(|(shard, s)| (shard_label(shard), field(s).load(Ordering::Relaxed)));
            let kind = if counter {
                Kind::Counter(values.collect())
            } else {
                Kind::Gauge(values.map(|(l, v)| (l, v as f64)).collect())
            };
            families.push(Family { name, help, kind });
        }
        families.push(Family {
            name: "sluice_commit_failing",
            help: "1 while the shard cannot commit (its last commit failed, less than the 5.03 Max-Age ago).",
            kind: Kind::Gauge(
                shards
                    .iter()
                    .enumerate()
                    .map(|(shard, s)| (shard_label(shard), f64::from(u8::from(s.commit_failing()))))
                    .collect(),
            ),
        });
        let histograms: [(&'static str, &'static str, HistogramField); 4] = [
            (
                "sluice_ack_latency_seconds",
                "Receive of a datagram to the hand-over of its response to the kernel.",
                |s| &s.ack_latency_us,
            ),
            (
                "sluice_commit_latency_seconds",
                "One group commit, fdatasync included under --durability fsync.",
                |s| &s.commit_latency_us,
            ),
            (
                "sluice_decode_seconds",
                "Protocol handling and payload decoding of one datagram.",
                |s| &s.decode_latency_us,
            ),
            (
                "sluice_queue_delay_seconds",
                "Kernel arrival of a datagram to the start of its handling (socket queue wait).",
                |s| &s.queue_delay_us,
            ),
        ];
        for (name, help, field) in histograms {
            let mut merged = latency_histogram();
            for metrics in shards {
                if let Ok(h) = field(metrics).lock() {
                    let _ = merged.add(&*h);
                }
            }
            families.push(Family {
                name,
                help,
                kind: Kind::Summary(vec![(vec![], merged)]),
            });
        }
        Snapshot { families }
    }

    /// The Prometheus text exposition format (version 0.0.4).
    pub fn to_prometheus(&self) -> String {
        let mut out = String::with_capacity(8192);
        for family in &self.families {
            let kind = match family.kind {
                Kind::Counter(_) => "counter",
                Kind::Gauge(_) => "gauge",
                Kind::Summary(_) => "summary",
            };
            let _ = writeln!(
                out,
                "# HELP {} {}\n# TYPE {} {kind}",
                family.name, family.help, family.name
            );
            let name = family.name;
            match &family.kind {
                Kind::Counter(samples) => {
                    for (labels, value) in samples {
                        let _ = writeln!(out, "{name}{} {value}", label_text(labels, None));
                    }
                }
                Kind::Gauge(samples) => {
                    for (labels, value) in samples {
                        let _ = writeln!(out, "{name}{} {value}", label_text(labels, None));
                    }
                }
                Kind::Summary(samples) => {
                    for (labels, histogram) in samples {
                        for quantile in QUANTILES {
                            let value = histogram.value_at_quantile(quantile) as f64 / 1e6;
                            let labels = label_text(labels, Some(quantile));
                            let _ = writeln!(out, "{name}{labels} {value}");
                        }
                        let labels = label_text(labels, None);
                        let _ = writeln!(
                            out,
                            "{name}_sum{labels} {}\n{name}_count{labels} {}",
                            sum_seconds(histogram),
                            histogram.len()
                        );
                    }
                }
            }
        }
        out
    }

    /// The same as JSON: `{"name": {"type": ..., "help": ..., "samples": [...]}}`; a summary
    /// sample has `quantiles` (seconds), `sum` (seconds) and `count`.
    pub fn to_json(&self) -> Json {
        let mut out = serde_json::Map::new();
        for family in &self.families {
            let labels_json = |labels: &Labels| -> Json {
                labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), json!(v)))
                    .collect::<serde_json::Map<_, _>>()
                    .into()
            };
            let (kind, samples): (&str, Vec<Json>) = match &family.kind {
                Kind::Counter(samples) => (
                    "counter",
                    samples
                        .iter()
                        .map(|(l, v)| json!({"labels": labels_json(l), "value": v}))
                        .collect(),
                ),
                Kind::Gauge(samples) => (
                    "gauge",
                    samples
                        .iter()
                        .map(|(l, v)| json!({"labels": labels_json(l), "value": v}))
                        .collect(),
                ),
                Kind::Summary(samples) => (
                    "summary",
                    samples
                        .iter()
                        .map(|(l, h)| {
                            let quantiles: serde_json::Map<String, Json> = QUANTILES
                                .iter()
                                .map(|q| {
                                    (q.to_string(), json!(h.value_at_quantile(*q) as f64 / 1e6))
                                })
                                .collect();
                            json!({
                                "labels": labels_json(l),
                                "quantiles": quantiles,
                                "sum": sum_seconds(h),
                                "count": h.len(),
                            })
                        })
                        .collect(),
                ),
            };
            out.insert(
                family.name.to_string(),
                json!({"type": kind, "help": family.help, "samples": samples}),
            );
        }
        Json::Object(out)
    }
}

/// Overload protection of every shard (docs/overload.md): refusals by reason, the overload
/// gauge and the bucket table.
fn overload_families(shards: &[Arc<ShardMetrics>]) -> Vec<Family> {
    let value = |field: CounterField| {
        move |(shard, s): (usize, &Arc<ShardMetrics>)| (shard, field(s).load(Ordering::Relaxed))
    };
    let mut shed = Vec::new();
    for (reason, field) in [
        ("backlog", (|s| &s.shed_backlog) as CounterField),
        ("queue_delay", |s| &s.shed_queue_delay),
    ] {
        for (shard, count) in shards.iter().enumerate().map(value(field)) {
            let mut labels = shard_label(shard);
            labels.push(("reason", reason.to_string()));
            shed.push((labels, count));
        }
    }
    let per_shard = |field: CounterField| {
        shards
            .iter()
            .enumerate()
            .map(value(field))
            .map(|(shard, count)| (shard_label(shard), count))
            .collect::<Vec<_>>()
    };
    let gauge = |field: CounterField| {
        per_shard(field)
            .into_iter()
            .map(|(labels, count)| (labels, count as f64))
            .collect()
    };
    vec![
        Family {
            name: "sluice_shed_total",
            help: "New requests refused 5.03 by an overloaded shard, by reason (backlog, queue_delay).",
            kind: Kind::Counter(shed),
        },
        Family {
            name: "sluice_rate_limited_total",
            help: "New requests refused 4.29 because their device exceeded --device-rate.",
            kind: Kind::Counter(per_shard(|s| &s.rate_limited)),
        },
        Family {
            name: "sluice_receive_drops_total",
            help: "Datagrams the kernel dropped because the shard's socket queue was full.",
            kind: Kind::Counter(per_shard(|s| &s.receive_drops)),
        },
        Family {
            name: "sluice_overloaded",
            help: "1 while the shard refuses new requests 5.03 (an overload episode).",
            kind: Kind::Gauge(gauge(|s| &s.overloaded)),
        },
        Family {
            name: "sluice_rate_limit_buckets",
            help: "Device token buckets held (bounded per shard).",
            kind: Kind::Gauge(gauge(|s| &s.rate_limit_buckets)),
        },
    ]
}

/// The DTLS counters of every shard (zero when CoAPS is off).
fn dtls_families(shards: &[Arc<ShardMetrics>]) -> Vec<Family> {
    let counters: Vec<sluice_dtls::Counters> = shards
        .iter()
        .map(|s| s.dtls.lock().map(|c| c.clone()).unwrap_or_default())
        .collect();
    type Field = fn(&sluice_dtls::Counters) -> u64;
    let rows: [(&'static str, &'static str, Field); 14] = [
        (
            "sluice_dtls_records_malformed_total",
            "DTLS records that do not parse.",
            |c| c.records_malformed,
        ),
        (
            "sluice_dtls_hello_verify_requests_total",
            "HelloVerifyRequests (cookies) sent.",
            |c| c.hello_verify_requests,
        ),
        (
            "sluice_dtls_handshakes_started_total",
            "DTLS handshakes started (after a valid cookie).",
            |c| c.handshakes_started,
        ),
        (
            "sluice_dtls_handshakes_completed_total",
            "DTLS handshakes completed.",
            |c| c.handshakes_completed,
        ),
        (
            "sluice_dtls_handshakes_failed_total",
            "DTLS handshakes that failed.",
            |c| c.handshakes_failed,
        ),
        (
            "sluice_dtls_handshakes_refused_total",
            "DTLS handshakes refused (limits).",
            |c| c.handshakes_refused,
        ),
        (
            "sluice_dtls_handshakes_timed_out_total",
            "DTLS handshakes dropped unfinished.",
            |c| c.handshakes_timed_out,
        ),
        (
            "sluice_dtls_unknown_identities_total",
            "PSK identities not in the credentials (or disabled).",
            |c| c.unknown_identities,
        ),
        (
            "sluice_dtls_records_replayed_total",
            "DTLS records dropped by the replay window.",
            |c| c.records_replayed,
        ),
        (
            "sluice_dtls_records_forged_total",
            "DTLS records that failed authentication.",
            |c| c.records_forged,
        ),
        (
            "sluice_dtls_records_without_session_total",
            "DTLS application records from peers without a session.",
            |c| c.records_without_session,
        ),
        (
            "sluice_dtls_sessions_evicted_total",
            "Idle DTLS sessions evicted by the session bound.",
            |c| c.sessions_evicted,
        ),
        (
            "sluice_dtls_sessions_closed_total",
            "DTLS sessions closed by the peer.",
            |c| c.sessions_closed,
        ),
        (
            "sluice_dtls_sessions_revoked_total",
            "DTLS sessions ended by a credentials reload.",
            |c| c.sessions_revoked,
        ),
    ];
    rows.into_iter()
        .map(|(name, help, field)| Family {
            name,
            help,
            kind: Kind::Counter(
                counters
                    .iter()
                    .enumerate()
                    .map(|(shard, c)| (shard_label(shard), field(c)))
                    .collect(),
            ),
        })
        .collect()
}

fn label_text(labels: &Labels, quantile: Option<f64>) -> String {
    let mut parts: Vec<String> = labels
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\"")))
        .collect();
    if let Some(q) = quantile {
        parts.push(format!("quantile=\"{q}\""));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!("{{{}}}", parts.join(","))
    }
}

fn sum_seconds(histogram: &Histogram<u64>) -> f64 {
    histogram
        .iter_recorded()
        .map(|v| v.value_iterated_to() as f64 * v.count_at_value() as f64)
        .sum::<f64>()
        / 1e6
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_commit_counts_until_a_success_or_for_the_hold() {
        let shard = ShardMetrics::new();
        assert!(!shard.commit_failing());
        shard.set_commit_failed(true);
        assert!(shard.commit_failing());
        let text = Snapshot::of_shards(&[Arc::new(ShardMetrics::new())]).to_prometheus();
        assert!(
            text.contains("sluice_commit_failing{shard=\"0\"} 0"),
            "{text}"
        );
        shard.set_commit_failed(false);
        assert!(!shard.commit_failing());
        // A failure older than the hold no longer counts: traffic may come back and retry.
        *shard.last_commit_failure.lock().unwrap() =
            Instant::now().checked_sub(COMMIT_FAILURE_HOLD + Duration::from_secs(1));
        assert!(!shard.commit_failing());
    }

    #[test]
    fn summaries_have_quantiles_sum_and_count_in_seconds() {
        let shard = Arc::new(ShardMetrics::new());
        {
            let mut h = shard.commit_latency_us.lock().unwrap();
            record(&mut h, 1000, 99);
            record(&mut h, 50_000, 1);
        }
        let snapshot = Snapshot::of_shards(&[shard.clone(), Arc::new(ShardMetrics::new())]);
        let text = snapshot.to_prometheus();
        assert!(text.contains("# TYPE sluice_commit_latency_seconds summary"));
        assert!(text.contains("sluice_commit_latency_seconds{quantile=\"0.5\"} 0.001"));
        assert!(text.contains("sluice_commit_latency_seconds{quantile=\"0.999\"} 0.05"));
        assert!(text.contains("sluice_commit_latency_seconds_count 100"));
        assert!(text.contains("sluice_build_info{version=\""));
        assert!(text.contains("sluice_error_responses_total{shard=\"1\",code=\"4.00\"} 0"));
        let json = snapshot.to_json();
        let sample = &json["sluice_commit_latency_seconds"]["samples"][0];
        assert_eq!(sample["count"], 100);
        assert_eq!(sample["quantiles"]["0.5"], 0.001);
        assert_eq!(
            json["sluice_commits_total"]["samples"][1]["labels"]["shard"],
            "1"
        );
    }
}
