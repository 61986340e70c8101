//! The side HTTP port: queries over committed data, the dashboard, health, readiness and
//! metrics. The API is documented in `docs/http-api.md`.

use std::borrow::Cow;
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use hdrhistogram::Histogram;
use serde_json::{json, Value as Json};
use sluice_storage::{
    DevicePage, FleetAggregate, FleetError, ListedDevice, Reader, StoreError, Value,
    FLEET_BUCKETS_MAX,
};

use crate::cache::{Answer, QueryCache};
use crate::dashboard;
use crate::metrics::{self, Family, Kind, ShardMetrics, Snapshot};

/// Largest `limit` of one page: a page is built in memory before it is sent (its `Link` header
/// needs to know whether there is more), so it is bounded (about 4 MiB of JSON points).
pub const PAGE_LIMIT_MAX: usize = 100_000;
/// Bytes a streamed body gathers before handing a chunk to the connection.
const STREAM_CHUNK_BYTES: usize = 64 << 10;
/// Chunks in flight between the scanning thread and the connection: with the scan's own bound
/// ([`sluice_storage::SCAN_CHUNK_POINTS_MAX`]) this bounds a query's memory, however large
/// its range; a slow client makes the scan wait.
const STREAM_CHUNKS_IN_FLIGHT: usize = 4;
/// A streamed series answer is copied for the result cache only while it is at most this long:
/// every stream in flight holds its copy.
const STREAM_COPY_BYTES_MAX: usize = 1 << 20;

/// Fleet-wide aggregates (`/v1/aggregate`) computed at once: each reads the store on up to
/// [`sluice_storage::FLEET_THREADS_MAX`] threads and holds its buckets meanwhile; more wait.
const AGGREGATES_IN_FLIGHT: usize = 2;

/// The query endpoints, each with its own latency summary.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Endpoint {
    Devices,
    DeviceLatest,
    Latest,
    Series,
    Aggregate,
}

impl Endpoint {
    const ALL: [Endpoint; 5] = [
        Endpoint::Devices,
        Endpoint::DeviceLatest,
        Endpoint::Latest,
        Endpoint::Series,
        Endpoint::Aggregate,
    ];

    fn label(self) -> &'static str {
        match self {
            Endpoint::Devices => "devices",
            Endpoint::DeviceLatest => "device_latest",
            Endpoint::Latest => "latest",
            Endpoint::Series => "series",
            Endpoint::Aggregate => "aggregate",
        }
    }
}

pub struct AppState {
    reader: Reader,
    shards: Vec<Arc<ShardMetrics>>,
    /// Start-up is over: recovery done, every socket bound.
    pub ready: AtomicBool,
    /// A shutdown signal came: `/readyz` answers 503 while the drain period runs.
    pub draining: AtomicBool,
    /// Request to the last byte handed to the connection, per endpoint.
    query_latency_us: [Mutex<Histogram<u64>>; Endpoint::ALL.len()],
    cache: QueryCache,
    /// Permits to compute a fleet-wide aggregate ([`AGGREGATES_IN_FLIGHT`]).
    aggregates: tokio::sync::Semaphore,
    /// Differs between runs of the daemon, so no ETag outlives the process that made it (a torn
    /// tail cut at recovery may change an answer without changing its point count).
    run_nonce: u64,
    /// The last [`Reader::sealed_before`], with the store generation it was read at.
    sealed: Mutex<Option<SealedHorizon>>,
}

/// How long a computed sealed horizon is reused while no commit changes the store: sealing and
/// the clock only move the horizon later, so a reused one is at worst this much too early (an
/// answer says `no-cache` where it could already say `immutable`); a commit, which may add an
/// unsealed segment before it, makes the next request compute it again.
const SEALED_RECHECK: Duration = Duration::from_secs(1);

#[derive(Clone, Copy)]
struct SealedHorizon {
    generation: u64,
    at: Instant,
    before: f64,
}

impl AppState {
    pub fn new(reader: Reader, shards: Vec<Arc<ShardMetrics>>) -> AppState {
        AppState {
            reader,
            shards,
            ready: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            query_latency_us: std::array::from_fn(|_| Mutex::new(metrics::latency_histogram())),
            cache: QueryCache::default(),
            aggregates: tokio::sync::Semaphore::new(AGGREGATES_IN_FLIGHT),
            run_nonce: ahash::RandomState::new().hash_one(std::process::id()),
            sealed: Mutex::new(None),
        }
    }

    /// [`Reader::sealed_before`], computed at most once per store generation and
    /// [`SEALED_RECHECK`] (it walks every segment of every shard).
    fn sealed_before(&self) -> f64 {
        let generation = self.reader.generation();
        let mut memo = self.sealed.lock().unwrap_or_else(|p| p.into_inner());
        match *memo {
            Some(m) if m.generation == generation && m.at.elapsed() < SEALED_RECHECK => m.before,
            _ => {
                // The generation is read first: a commit meanwhile leaves an older generation
                // beside the horizon, and the next request computes it again.
                let before = self.reader.sealed_before();
                *memo = Some(SealedHorizon {
                    generation,
                    at: Instant::now(),
                    before,
                });
                before
            }
        }
    }

    fn record_query(&self, endpoint: Endpoint, started: Instant) {
        let index = Endpoint::ALL
            .iter()
            .position(|e| *e == endpoint)
            .expect("every endpoint is listed");
        if let Ok(mut histogram) = self.query_latency_us[index].lock() {
            metrics::record(&mut histogram, started.elapsed().as_micros() as u64, 1);
        }
    }

    fn etag(&self, key: &[u8], version: u64) -> Etag {
        let hash =
            ahash::RandomState::with_seeds(1, 2, 3, 4).hash_one((key, version, self.run_nonce));
        Etag::new(hash)
    }

    /// The tag of the gzip-encoded representation of the same answer.
    fn gzip_etag(&self, key: &[u8], version: u64) -> Etag {
        let hash = ahash::RandomState::with_seeds(1, 2, 3, 4).hash_one((
            key,
            version,
            self.run_nonce,
            "gzip",
        ));
        Etag::new(hash)
    }

    /// Every measurement: the shards', query latency per endpoint and the result cache's.
    fn snapshot(&self) -> Snapshot {
        let mut snapshot = Snapshot::of_shards(&self.shards);
        let latency = Endpoint::ALL
            .iter()
            .zip(&self.query_latency_us)
            .map(|(endpoint, histogram)| {
                let histogram = histogram
                    .lock()
                    .map(|h| h.clone())
                    .unwrap_or_else(|_| metrics::latency_histogram());
                (vec![("endpoint", endpoint.label().to_string())], histogram)
            })
            .collect();
        snapshot.families.extend(crate::peers::families());
        let (hits, misses, entries, bytes) = self.cache.stats();
        let ratio = if hits + misses == 0 {
            0.0
        } else {
            hits as f64 / (hits + misses) as f64
        };
        snapshot.families.extend([
            Family {
                name: "sluice_query_latency_seconds",
                help: "A query, from its request to the last byte handed to the connection.",
                kind: Kind::Summary(latency),
            },
            Family {
                name: "sluice_query_cache_hits_total",
                help: "Queries answered from the result cache.",
                kind: Kind::Counter(vec![(vec![], hits)]),
            },
            Family {
                name: "sluice_query_cache_misses_total",
                help: "Cacheable queries that had to be computed.",
                kind: Kind::Counter(vec![(vec![], misses)]),
            },
            Family {
                name: "sluice_query_cache_hit_ratio",
                help: "Hits over lookups of the result cache since start.",
                kind: Kind::Gauge(vec![(vec![], ratio)]),
            },
            Family {
                name: "sluice_query_cache_entries",
                help: "Answers held by the result cache.",
                kind: Kind::Gauge(vec![(vec![], entries as f64)]),
            },
            Family {
                name: "sluice_query_cache_bytes",
                help: "Bytes of answers held by the result cache.",
                kind: Kind::Gauge(vec![(vec![], bytes as f64)]),
            },
        ]);
        snapshot
    }
}

/// The side port's routes; `peers` serves the cluster reads (`/v1/cluster/...`, peers.rs).
pub fn router(state: Arc<AppState>, peers: Option<Arc<crate::peers::Peers>>) -> Router {
    Router::new()
        .merge(crate::peers::router(peers))
        .route("/v1/devices", get(devices))
        .route("/v1/devices/{device}/latest", get(device_latest))
        .route("/v1/latest", get(latest))
        .route("/v1/series", get(series))
        .route("/v1/aggregate", get(aggregate))
        .route("/v1/stats", get(stats))
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .merge(dashboard::router())
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such resource".to_string()) })
        .with_state(state)
}

pub fn error(status: StatusCode, message: String) -> Response {
    (status, axum::Json(json!({ "error": message }))).into_response()
}

/// An entity tag: `"` and 16 lower-case hex digits of a hash and `"`, written on the stack.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Etag([u8; 18]);

impl Etag {
    fn new(hash: u64) -> Etag {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut text = [b'"'; 18];
        for (i, digit) in text[1..17].iter_mut().enumerate() {
            *digit = HEX[(hash >> (60 - 4 * i)) as usize & 0xf];
        }
        Etag(text)
    }

    fn header(&self) -> HeaderValue {
        HeaderValue::from_bytes(&self.0).expect("quoted hex is a valid header")
    }
}

/// Whether `If-None-Match` names `etag` (or `*`), in any of its header lines.
fn not_modified(headers: &HeaderMap, etag: &Etag) -> bool {
    headers.get_all(header::IF_NONE_MATCH).iter().any(|value| {
        value.as_bytes().split(|b| *b == b',').any(|tag| {
            let tag = tag.trim_ascii();
            let tag = tag.strip_prefix(b"W/").unwrap_or(tag);
            tag == etag.0 || tag == b"*"
        })
    })
}

/// `Cache-Control` of a series answer whose range lies in sealed partitions: caches may keep it
/// a day without asking again. Such an answer changes only if a reading later than the
/// partition's grace period arrives (it is stored, in a late segment) or retention drops the
/// partition; the ETag changes then, and a cache that revalidates sees it.
const SEALED_CACHE_CONTROL: &str = "public, max-age=86400, immutable";

/// ETag and `Cache-Control`: `public, max-age=…, immutable` for an answer that lies in sealed
/// data, `no-cache` (revalidate every time) otherwise.
fn cache_headers(etag: &Etag, sealed: bool) -> [(header::HeaderName, HeaderValue); 2] {
    let cache_control = HeaderValue::from_static(if sealed {
        SEALED_CACHE_CONTROL
    } else {
        "no-cache"
    });
    [
        (header::ETAG, etag.header()),
        (header::CACHE_CONTROL, cache_control),
    ]
}

fn not_modified_response(etag: &Etag, sealed: bool) -> Response {
    (StatusCode::NOT_MODIFIED, cache_headers(etag, sealed)).into_response()
}

fn answer_response(etag: &Etag, sealed: bool, answer: Answer) -> Response {
    let mut response = (
        StatusCode::OK,
        cache_headers(etag, sealed),
        [(header::CONTENT_TYPE, answer.content_type)],
        answer.body,
    )
        .into_response();
    if let Some(next) = answer.next {
        if let Ok(link) = HeaderValue::from_str(&format!("<{next}>; rel=\"next\"")) {
            response.headers_mut().insert(header::LINK, link);
        }
    }
    response
}

/// Listings at least this long go gzip-compressed to clients that accept gzip: below it the
/// header and the work are not worth it.
const GZIP_MIN_BYTES: usize = 1024;

/// Whether `Accept-Encoding` allows gzip: `gzip` (or `x-gzip`), else `*`, listed without
/// `q=0`. No header, or one that does not name them, means identity only.
fn accepts_gzip(headers: &HeaderMap) -> bool {
    let (mut gzip, mut any) = (None, None);
    for value in headers.get_all(header::ACCEPT_ENCODING) {
        let Ok(text) = value.to_str() else { continue };
        for item in text.split(',') {
            let mut parts = item.split(';');
            let coding = parts.next().unwrap_or("").trim();
            // A weight that does not parse refuses, as `q=0` does.
            let allowed = parts
                .filter_map(|p| {
                    let (name, value) = p.split_once('=')?;
                    name.trim()
                        .eq_ignore_ascii_case("q")
                        .then(|| value.trim().parse::<f32>().is_ok_and(|q| q > 0.0))
                })
                .next_back()
                .unwrap_or(true);
            if coding.eq_ignore_ascii_case("gzip") || coding.eq_ignore_ascii_case("x-gzip") {
                gzip = Some(allowed);
            } else if coding == "*" {
                any = Some(allowed);
            }
        }
    }
    gzip.or(any).unwrap_or(false)
}

/// `body` gzip-compressed at the fastest level: made once per cached answer, on the path of
/// the request that first asks for it.
fn gzip(body: &[u8]) -> Bytes {
    use std::io::Write as _;
    let mut encoder = flate2::write::GzEncoder::new(
        Vec::with_capacity(body.len() / 4),
        flate2::Compression::fast(),
    );
    encoder
        .write_all(body)
        .expect("compressing into memory cannot fail");
    Bytes::from(
        encoder
            .finish()
            .expect("compressing into memory cannot fail"),
    )
}

/// A listing's answer, in the representation chosen by `Accept-Encoding` (its own ETag each).
fn listing_response(etag: &Etag, gzip: Option<(&Etag, Bytes)>, answer: Answer) -> Response {
    let vary = (header::VARY, HeaderValue::from_static("accept-encoding"));
    let mut response = match gzip {
        None => answer_response(etag, false, answer),
        Some((gzip_etag, body)) => {
            let mut response = answer_response(gzip_etag, false, Answer { body, ..answer });
            response
                .headers_mut()
                .insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
            response
        }
    };
    response.headers_mut().insert(vary.0, vary.1);
    response
}

// ---------------------------------------------------------------------------------------------
// Parameters

/// Most parameters an endpoint knows.
const PARAMETERS_MAX: usize = 10;

/// The parameters of a query string, decoded as `application/x-www-form-urlencoded` (`+` is a
/// space, `%XX` an escaped byte, invalid UTF-8 replaced) and borrowed from the request where
/// nothing was escaped. Each known name may appear at most once, except one repeatable name.
struct Params<'a> {
    known: &'static [&'static str],
    /// The value of each known parameter, in the order of `known`.
    values: [Option<Cow<'a, str>>; PARAMETERS_MAX],
    /// Every value of the repeatable parameter, in order.
    repeated: Vec<Cow<'a, str>>,
}

impl<'a> Params<'a> {
    fn parse(
        query: Option<&'a str>,
        known: &'static [&'static str],
        repeatable: Option<&'static str>,
    ) -> Result<Params<'a>, String> {
        debug_assert!(known.len() <= PARAMETERS_MAX);
        let mut params = Params {
            known,
            values: Default::default(),
            repeated: Vec::new(),
        };
        for (key, value) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
            let Some(index) = known.iter().position(|k| *k == key) else {
                return Err(format!("unknown parameter `{key}`"));
            };
            if repeatable == Some(known[index]) {
                params.repeated.push(value);
            } else if params.values[index].is_some() {
                return Err(format!("`{key}` is given more than once"));
            } else {
                params.values[index] = Some(value);
            }
        }
        Ok(params)
    }

    fn get(&self, key: &str) -> Option<&str> {
        let index = self.known.iter().position(|k| *k == key)?;
        self.values[index].as_deref()
    }

    fn take(&mut self, key: &str) -> Option<Cow<'a, str>> {
        let index = self.known.iter().position(|k| *k == key)?;
        self.values[index].take()
    }

    fn limit(&self) -> Result<Option<usize>, String> {
        self.get("limit")
            .map(|text| match text.parse::<usize>() {
                Ok(n) if (1..=PAGE_LIMIT_MAX).contains(&n) => Ok(n),
                _ => Err(format!(
                    "`limit`: `{text}` is not a whole number from 1 to {PAGE_LIMIT_MAX}"
                )),
            })
            .transpose()
    }
}

/// Unix seconds (`1763900000.5`), RFC 3339 (`2026-11-24T01:00:00Z`, any offset), or `now`
/// minus an optional duration (`now-1h`).
fn parse_time(parameter: &str, text: &str, now: fn() -> f64) -> Result<f64, String> {
    if let Ok(seconds) = text.parse::<f64>() {
        if seconds.is_finite() {
            return Ok(seconds);
        }
    }
    if let Some(rest) = text.strip_prefix("now") {
        if rest.is_empty() {
            return Ok(now());
        }
        if let Some(ago) = rest.strip_prefix('-').and_then(|d| parse_duration(d).ok()) {
            return Ok(now() - ago);
        }
    }
    text.parse::<jiff::Timestamp>()
        .map(|t| t.as_nanosecond() as f64 / 1e9)
        .map_err(|_| {
            format!("`{parameter}`: `{text}` is not unix seconds, an RFC 3339 time or now-DURATION")
        })
}

/// Seconds (`90`, `0.5`) or a duration with units (`5m`, `1h30m`).
fn parse_duration(text: &str) -> Result<f64, ()> {
    let seconds = match text.parse::<f64>() {
        Ok(s) => s,
        Err(_) => humantime::parse_duration(text)
            .map_err(|_| ())?
            .as_secs_f64(),
    };
    if seconds.is_finite() && seconds > 0.0 {
        Ok(seconds)
    } else {
        Err(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Aggregate {
    Avg,
    Min,
    Max,
    Sum,
    Count,
    Last,
}

impl Aggregate {
    fn name(self) -> &'static str {
        match self {
            Aggregate::Avg => "avg",
            Aggregate::Min => "min",
            Aggregate::Max => "max",
            Aggregate::Sum => "sum",
            Aggregate::Count => "count",
            Aggregate::Last => "last",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Format {
    Json,
    Csv,
    Ndjson,
}

impl Format {
    fn content_type(self) -> &'static str {
        match self {
            Format::Json => "application/json",
            Format::Csv => "text/csv; charset=utf-8",
            Format::Ndjson => "application/x-ndjson",
        }
    }
}

/// Where a page of a series answer resumes: in the `name`-th name, at points with time
/// `time` or later, skipping the first `skip` points at exactly `time`.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Cursor {
    name: usize,
    time: f64,
    skip: u64,
}

impl Cursor {
    fn encode(&self) -> String {
        use base64::Engine as _;
        let text = format!("{}:{:x}:{}", self.name, self.time.to_bits(), self.skip);
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(text)
    }

    fn decode(text: &str) -> Option<Cursor> {
        use base64::Engine as _;
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(text)
            .ok()?;
        let text = String::from_utf8(bytes).ok()?;
        let mut parts = text.split(':');
        let cursor = Cursor {
            name: parts.next()?.parse().ok()?,
            time: f64::from_bits(u64::from_str_radix(parts.next()?, 16).ok()?),
            skip: parts.next()?.parse().ok()?,
        };
        (parts.next().is_none() && !cursor.time.is_nan()).then_some(cursor)
    }
}

/// A validated `/v1/series` query, borrowing from the request's query string where it can
/// (`into_owned` for a scan that outlives the request).
#[derive(Debug, Clone, PartialEq)]
struct SeriesQuery<'a> {
    device: Cow<'a, str>,
    names: Vec<Cow<'a, str>>,
    from: f64,
    to: f64,
    bucket: Option<(f64, Aggregate)>,
    format: Format,
    limit: Option<usize>,
    cursor: Option<Cursor>,
    /// Only numeric points greater than this (before any bucketing).
    above: Option<f64>,
}

impl SeriesQuery<'_> {
    fn into_owned(self) -> SeriesQuery<'static> {
        SeriesQuery {
            device: Cow::Owned(self.device.into_owned()),
            names: self
                .names
                .into_iter()
                .map(|n| Cow::Owned(n.into_owned()))
                .collect(),
            from: self.from,
            to: self.to,
            bucket: self.bucket,
            format: self.format,
            limit: self.limit,
            cursor: self.cursor,
            above: self.above,
        }
    }

    /// The normalised query (times resolved, so `from=1795478400` and
    /// `from=2026-11-24T00:00:00Z` share it): the result cache's key and the ETag's input.
    /// Every field is written, strings after their length, so two queries share a key exactly
    /// when they ask the same.
    fn key(&self) -> Vec<u8> {
        let strings = self.device.len() + self.names.iter().map(|n| n.len() + 4).sum::<usize>();
        let mut key = Vec::with_capacity(96 + strings);
        key.push(b'S');
        key_str(&mut key, &self.device);
        key_u64(&mut key, self.names.len() as u64);
        for name in &self.names {
            key_str(&mut key, name);
        }
        key_u64(&mut key, self.from.to_bits());
        key_u64(&mut key, self.to.to_bits());
        match self.bucket {
            None => key.push(0),
            Some((step, agg)) => {
                key.push(1 + agg as u8);
                key_u64(&mut key, step.to_bits());
            }
        }
        key.push(self.format as u8);
        key_u64(&mut key, self.limit.map_or(u64::MAX, |n| n as u64));
        match self.cursor {
            None => key.push(0),
            Some(cursor) => {
                key.push(1);
                key_u64(&mut key, cursor.name as u64);
                key_u64(&mut key, cursor.time.to_bits());
                key_u64(&mut key, cursor.skip);
            }
        }
        match self.above {
            None => key.push(0),
            Some(above) => {
                key.push(1);
                key_u64(&mut key, above.to_bits());
            }
        }
        key
    }
}

fn key_u64(key: &mut Vec<u8>, n: u64) {
    key.extend_from_slice(&n.to_le_bytes());
}

fn key_str(key: &mut Vec<u8>, text: &str) {
    key.extend_from_slice(&(text.len() as u32).to_le_bytes());
    key.extend_from_slice(text.as_bytes());
}

const SERIES_PARAMETERS: [&str; 10] = [
    "device", "name", "from", "to", "step", "agg", "format", "limit", "cursor", "above",
];

/// `now` is called only for a time given as `now` or `now-DURATION`.
fn parse_series_query(mut params: Params<'_>, now: fn() -> f64) -> Result<SeriesQuery<'_>, String> {
    let device = match params.take("device") {
        Some(device) if !device.is_empty() => device,
        _ => return Err("`device` is required".to_string()),
    };
    let names = std::mem::take(&mut params.repeated);
    if names.is_empty() || names.iter().any(|n| n.is_empty()) {
        return Err("`name` is required (repeat it for several series)".to_string());
    }
    if let Some(name) = names
        .iter()
        .enumerate()
        .find_map(|(i, n)| names[..i].contains(n).then_some(n))
    {
        return Err(format!("`name`: `{name}` is given more than once"));
    }
    let (from, to) = parse_range(&params, now)?;
    let bucket = match (params.get("step"), params.get("agg")) {
        (None, None) => None,
        (Some(_), None) => return Err("`step` needs `agg`".to_string()),
        (None, Some(_)) => return Err("`agg` needs `step`".to_string()),
        (Some(step), Some(agg)) => {
            let seconds = parse_step(step)?;
            let agg = match agg {
                "avg" => Aggregate::Avg,
                "min" => Aggregate::Min,
                "max" => Aggregate::Max,
                "sum" => Aggregate::Sum,
                "count" => Aggregate::Count,
                "last" => Aggregate::Last,
                other => {
                    return Err(format!(
                        "`agg`: `{other}` is not one of avg, min, max, sum, count, last"
                    ))
                }
            };
            Some((seconds, agg))
        }
    };
    let format = match params.get("format") {
        None | Some("json") => Format::Json,
        Some("csv") => Format::Csv,
        Some("ndjson") => Format::Ndjson,
        Some(other) => {
            return Err(format!(
                "`format`: `{other}` is not one of json, csv, ndjson"
            ))
        }
    };
    let cursor = params
        .get("cursor")
        .map(|text| {
            Cursor::decode(text)
                .filter(|c| c.name < names.len())
                .ok_or_else(|| format!("`cursor`: `{text}` is not a cursor of this query"))
        })
        .transpose()?;
    let above = params
        .get("above")
        .map(|text| match text.parse::<f64>() {
            Ok(value) if value.is_finite() => Ok(value),
            _ => Err(format!("`above`: `{text}` is not a number")),
        })
        .transpose()?;
    Ok(SeriesQuery {
        device,
        names,
        from,
        to,
        bucket,
        format,
        limit: params.limit()?,
        cursor,
        above,
    })
}

/// `from` (inclusive, default: no bound) and `to` (exclusive, default: no bound), `from` before
/// `to`.
fn parse_range(params: &Params<'_>, now: fn() -> f64) -> Result<(f64, f64), String> {
    let from = match params.get("from") {
        Some(t) => parse_time("from", t, now)?,
        None => f64::NEG_INFINITY,
    };
    let to = match params.get("to") {
        Some(t) => parse_time("to", t, now)?,
        None => f64::INFINITY,
    };
    if from >= to {
        return Err("`from` must be before `to`".to_string());
    }
    Ok((from, to))
}

fn parse_step(step: &str) -> Result<f64, String> {
    parse_duration(step).map_err(|_| {
        format!("`step`: `{step}` is not a positive number of seconds or a duration like 5m")
    })
}

fn now_seconds() -> f64 {
    crate::shard::unix_seconds(std::time::SystemTime::now())
}

// ---------------------------------------------------------------------------------------------
// Devices and latest values

/// Appends a value as JSON, as [`value_json`] renders it.
fn write_value(body: &mut Vec<u8>, value: &Value) {
    match value {
        Value::Number(n) => write_json(body, n),
        Value::Bool(b) => write_json(body, b),
        Value::String(s) => write_json(body, s),
        Value::Data(d) => write_json(body, &base64url(d)),
    }
}

fn value_json(value: &Value) -> Json {
    match value {
        Value::Number(n) => json!(n),
        Value::Bool(b) => json!(b),
        Value::String(s) => json!(s),
        Value::Data(d) => json!(base64url(d)),
    }
}

/// Opaque data values are shown as unpadded base64url, as SenML JSON writes `vd`.
fn base64url(data: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(data)
}

/// A listing of devices (`prefix`, `limit`, `cursor` = the last device of the previous page),
/// answered from memory and cached per store generation.
async fn listing(state: Arc<AppState>, endpoint: Endpoint, request: Request) -> Response {
    let started = Instant::now();
    let parsed = Params::parse(request.uri().query(), &["prefix", "limit", "cursor"], None)
        .and_then(|params| Ok((params.limit()?, params)));
    let response = match parsed {
        Err(message) => error(StatusCode::BAD_REQUEST, message),
        Ok((limit, params)) => {
            let prefix = params.get("prefix").unwrap_or("");
            let after = params.get("cursor");
            let mut key = Vec::with_capacity(32 + prefix.len() + after.map_or(0, str::len));
            key.push(if endpoint == Endpoint::Devices {
                b'D'
            } else {
                b'L'
            });
            key_str(&mut key, prefix);
            key_u64(&mut key, limit.map_or(u64::MAX, |n| n as u64));
            match after {
                None => key.push(0),
                Some(after) => {
                    key.push(1);
                    key_str(&mut key, after);
                }
            }
            let version = state.reader.generation();
            let etag = state.etag(&key, version);
            let gzip_etag = state.gzip_etag(&key, version);
            let headers = request.headers();
            if let Some(tag) = [etag, gzip_etag]
                .into_iter()
                .find(|tag| not_modified(headers, tag))
            {
                let mut response = not_modified_response(&tag, false);
                response
                    .headers_mut()
                    .insert(header::VARY, HeaderValue::from_static("accept-encoding"));
                response
            } else {
                let wants_gzip = accepts_gzip(headers);
                let answer = match state.cache.get(&key, version) {
                    Some(answer)
                        if !wants_gzip
                            || answer.gzip.is_some()
                            || answer.body.len() < GZIP_MIN_BYTES =>
                    {
                        Ok(answer)
                    }
                    cached => {
                        // Building a listing, and compressing one, take long: off the
                        // connection's thread.
                        let hit = cached.is_some();
                        let reader = state.reader.clone();
                        let (prefix, after) = (prefix.to_string(), after.map(str::to_string));
                        let built = tokio::task::spawn_blocking(move || {
                            let mut answer = cached.unwrap_or_else(|| {
                                build_listing(
                                    &reader,
                                    endpoint,
                                    &prefix,
                                    limit,
                                    after.as_deref(),
                                    LISTING_BODY_BYTES_MAX,
                                )
                            });
                            if wants_gzip && answer.body.len() >= GZIP_MIN_BYTES {
                                answer.gzip = Some(gzip(&answer.body));
                            }
                            answer
                        })
                        .await;
                        if let Ok(answer) = &built {
                            if !hit {
                                state.cache.insert(key, version, answer.clone());
                            } else if let Some(compressed) = &answer.gzip {
                                state.cache.insert_gzip(&key, version, compressed.clone());
                            }
                        }
                        built
                    }
                };
                match answer {
                    Ok(answer) => {
                        let gzip = answer
                            .gzip
                            .clone()
                            .filter(|_| wants_gzip)
                            .map(|body| (&gzip_etag, body));
                        listing_response(&etag, gzip, answer)
                    }
                    Err(e) => error(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        format!("query failed: {e}"),
                    ),
                }
            }
        }
    };
    state.record_query(endpoint, started);
    response
}

/// A listing's body as its page visits the devices: at most `limit` entries, ending early (with
/// a next page) once it holds [`LISTING_BODY_BYTES_MAX`], and the cursor of the next page when
/// one more device follows.
struct ListingBody {
    body: Vec<u8>,
    listed: usize,
    limit: usize,
    /// [`LISTING_BODY_BYTES_MAX`] (less in tests).
    body_max: usize,
    /// The last entry's device.
    last: String,
    next: Option<String>,
}

/// The most a listing's answer holds before it ends its page early: a page of devices whose
/// latest values are large (up to 1 MiB each) is cut into several, each named by `next`.
const LISTING_BODY_BYTES_MAX: usize = 64 << 20;

impl ListingBody {
    /// Starts the entry of a device (`{"device":NAME`) and returns the body to finish it in;
    /// None for the device after the last of the page: the page has a next one.
    fn entry(&mut self, views: &[ListedDevice]) -> Option<&mut Vec<u8>> {
        if self.listed == self.limit || self.body.len() >= self.body_max {
            self.next = Some(self.last.clone());
            return None;
        }
        if self.listed > 0 {
            self.body.push(b',');
        }
        self.listed += 1;
        self.last.clear();
        self.last.push_str(views[0].name());
        self.body.extend_from_slice(b"{\"device\":");
        write_json(&mut self.body, views[0].name());
        Some(&mut self.body)
    }
}

fn build_listing(
    reader: &Reader,
    endpoint: Endpoint,
    prefix: &str,
    limit: Option<usize>,
    after: Option<&str>,
    body_max: usize,
) -> Answer {
    let limit = limit.unwrap_or(usize::MAX);
    // One more than asked tells whether there is a next page.
    let page = DevicePage {
        prefix,
        after,
        limit: limit.saturating_add(1),
    };
    // Written from the summaries as the page visits them, not copied out first: a fleet-wide
    // listing is one entry per device, 64 bytes each for 100,000 devices.
    let mut out = ListingBody {
        body: b"{\"devices\":[".to_vec(),
        listed: 0,
        limit,
        body_max,
        last: String::new(),
        next: None,
    };
    if endpoint == Endpoint::Devices {
        reader.visit_page(
            &page,
            |device| device.points() > 0,
            |views| {
                let Some(body) = out.entry(views) else {
                    return ControlFlow::Break(());
                };
                let start = body.len();
                body.extend_from_slice(b",\"last_seen\":");
                write_json(body, &ListedDevice::last_seen_over(views));
                body.extend_from_slice(b",\"points\":");
                write_json(body, &ListedDevice::points_over(views));
                body.push(b'}');
                ControlFlow::Continue(body.len() - start)
            },
        );
    } else {
        reader.visit_page(
            &page,
            |device| device.has_latest(),
            |views| {
                let Some(body) = out.entry(views) else {
                    return ControlFlow::Break(());
                };
                let start = body.len();
                body.extend_from_slice(b",\"series\":{");
                let mut first = true;
                ListedDevice::latest_over(views, |name, time, value| {
                    if !first {
                        body.push(b',');
                    }
                    first = false;
                    write_json(body, name);
                    body.extend_from_slice(b":[");
                    write_json(body, &time);
                    body.push(b',');
                    write_value(body, value);
                    body.push(b']');
                });
                body.extend_from_slice(b"}}");
                ControlFlow::Continue(body.len() - start)
            },
        );
    }
    let ListingBody { mut body, next, .. } = out;
    body.push(b']');
    if let Some(cursor) = &next {
        body.extend_from_slice(b",\"next\":");
        write_json(&mut body, cursor);
    }
    body.push(b'}');
    let path = if endpoint == Endpoint::Devices {
        "/v1/devices"
    } else {
        "/v1/latest"
    };
    let next = next.map(|cursor| {
        let mut link = format!("{path}?cursor={}", url_encode(&cursor));
        if !prefix.is_empty() {
            link.push_str(&format!("&prefix={}", url_encode(prefix)));
        }
        if limit != usize::MAX {
            link.push_str(&format!("&limit={limit}"));
        }
        link
    });
    Answer {
        content_type: "application/json",
        body: Bytes::from(body),
        next,
        gzip: None,
    }
}

/// Appends `value` as JSON (strings escaped, numbers as serde_json writes them).
fn write_json(body: &mut Vec<u8>, value: &(impl serde::Serialize + ?Sized)) {
    serde_json::to_writer(&mut *body, value).expect("JSON into a Vec cannot fail");
}

fn series_json(series: Vec<(String, f64, Value)>) -> serde_json::Map<String, Json> {
    series
        .into_iter()
        .map(|(name, time, value)| (name, json!([time, value_json(&value)])))
        .collect()
}

fn url_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

async fn devices(State(state): State<Arc<AppState>>, request: Request) -> Response {
    listing(state, Endpoint::Devices, request).await
}

async fn latest(State(state): State<Arc<AppState>>, request: Request) -> Response {
    listing(state, Endpoint::Latest, request).await
}

async fn device_latest(
    State(state): State<Arc<AppState>>,
    Path(device): Path<String>,
    headers: HeaderMap,
) -> Response {
    let started = Instant::now();
    let mut key = Vec::with_capacity(8 + device.len());
    key.push(b'd');
    key_str(&mut key, &device);
    let etag = state.etag(&key, state.reader.generation());
    let response = if not_modified(&headers, &etag) {
        not_modified_response(&etag, false)
    } else {
        match state.reader.latest(&device) {
            None => error(StatusCode::NOT_FOUND, format!("unknown device `{device}`")),
            Some(series) => (
                cache_headers(&etag, false),
                axum::Json(json!({ "device": device, "series": series_json(series) })),
            )
                .into_response(),
        }
    };
    state.record_query(Endpoint::DeviceLatest, started);
    response
}

// ---------------------------------------------------------------------------------------------
// Series

async fn series(State(state): State<Arc<AppState>>, request: Request) -> Response {
    let started = Instant::now();
    let query = Params::parse(request.uri().query(), &SERIES_PARAMETERS, Some("name"))
        .and_then(|params| parse_series_query(params, now_seconds));
    let query = match query {
        Ok(query) => query,
        Err(message) => {
            state.record_query(Endpoint::Series, started);
            return error(StatusCode::BAD_REQUEST, message);
        }
    };
    // Read before the scan: an answer is never older than the version its ETag names.
    let mut version = 0u64;
    for name in &query.names {
        match state.reader.series_version(&query.device, name) {
            Some(changes) => version = version.wrapping_add(changes),
            None => {
                state.record_query(Endpoint::Series, started);
                return error(
                    StatusCode::NOT_FOUND,
                    format!("unknown series `{name}` of device `{}`", query.device),
                );
            }
        }
    }
    let key = query.key();
    let etag = state.etag(&key, version);
    let sealed = query.to <= state.sealed_before();
    if not_modified(request.headers(), &etag) {
        state.record_query(Endpoint::Series, started);
        return not_modified_response(&etag, sealed);
    }
    if let Some(answer) = state.cache.get(&key, version) {
        state.record_query(Endpoint::Series, started);
        return answer_response(&etag, sealed, answer);
    }
    let query = query.into_owned();
    let content_type = query.format.content_type();
    if query.limit.is_some() {
        // A page: built whole (bounded by PAGE_LIMIT_MAX) so its Link header can name the next.
        let reader = state.reader.clone();
        let page_query = query.clone();
        let built = tokio::task::spawn_blocking(move || {
            let mut body = Vec::new();
            let next = write_series(&reader, &page_query, &mut |bytes: &mut Vec<u8>| {
                body.append(bytes);
                true
            })?;
            Ok::<_, StoreError>((body, next))
        })
        .await;
        let response = match built {
            Ok(Ok((body, next))) => {
                let answer = Answer {
                    content_type,
                    body: Bytes::from(body),
                    next: next.map(|cursor| next_link(&query, cursor)),
                    gzip: None,
                };
                state.cache.insert(key, version, answer.clone());
                answer_response(&etag, sealed, answer)
            }
            Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("store: {e}")),
            Err(e) => error(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("query failed: {e}"),
            ),
        };
        state.record_query(Endpoint::Series, started);
        return response;
    }
    // Streamed: the head goes out now, the body as the scan produces it.
    let (sender, mut receiver) =
        tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(STREAM_CHUNKS_IN_FLIGHT);
    let producer_state = state.clone();
    tokio::task::spawn_blocking(move || {
        let mut copy: Option<Vec<u8>> = Some(Vec::new());
        let mut send = |bytes: &mut Vec<u8>| {
            if let Some(kept) = copy.as_mut() {
                if kept.len() + bytes.len() <= STREAM_COPY_BYTES_MAX {
                    kept.extend_from_slice(bytes);
                } else {
                    copy = None;
                }
            }
            let chunk = Bytes::from(std::mem::take(bytes));
            sender.blocking_send(Ok(chunk)).is_ok()
        };
        match write_series(&producer_state.reader, &query, &mut send) {
            Ok(_) => {
                if let Some(body) = copy {
                    let answer = Answer {
                        content_type,
                        body: Bytes::from(body),
                        next: None,
                        gzip: None,
                    };
                    producer_state.cache.insert(key, version, answer);
                }
            }
            Err(e) => {
                // The head is sent: the only way to say so is to cut the body short.
                tracing::error!(error = %e, "series query failed while streaming");
                let _ = sender.blocking_send(Err(std::io::Error::other(e.to_string())));
            }
        }
        producer_state.record_query(Endpoint::Series, started);
    });
    let stream = futures_util::stream::poll_fn(move |cx| receiver.poll_recv(cx));
    (
        StatusCode::OK,
        cache_headers(&etag, sealed),
        [(header::CONTENT_TYPE, content_type)],
        Body::from_stream(stream),
    )
        .into_response()
}

fn next_link(query: &SeriesQuery, cursor: Cursor) -> String {
    let mut link = format!("/v1/series?device={}", url_encode(&query.device));
    for name in &query.names {
        link.push_str(&format!("&name={}", url_encode(name)));
    }
    for (key, value) in [("from", query.from), ("to", query.to)] {
        if value.is_finite() {
            link.push_str(&format!("&{key}={value}"));
        }
    }
    if let Some((step, agg)) = query.bucket {
        link.push_str(&format!("&step={step}&agg={}", agg.name()));
    }
    if let Some(above) = query.above {
        link.push_str(&format!("&above={above}"));
    }
    let format = match query.format {
        Format::Json => "json",
        Format::Csv => "csv",
        Format::Ndjson => "ndjson",
    };
    link.push_str(&format!(
        "&format={format}&limit={}&cursor={}",
        query.limit.unwrap_or(PAGE_LIMIT_MAX),
        cursor.encode()
    ));
    link
}

/// Running aggregate of one bucket.
struct Bucket {
    start: f64,
    count: u64,
    numbers: u64,
    sum: f64,
    min: f64,
    max: f64,
    last: Option<Value>,
}

impl Bucket {
    fn new(start: f64) -> Bucket {
        Bucket {
            start,
            count: 0,
            numbers: 0,
            sum: 0.0,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
            last: None,
        }
    }

    fn add(&mut self, value: Value) {
        self.count += 1;
        if let Value::Number(n) = value {
            self.numbers += 1;
            self.sum += n;
            self.min = self.min.min(n);
            self.max = self.max.max(n);
        }
        self.last = Some(value);
    }

    /// Numeric aggregates look at numbers only; `count` and `last` at every value. A bucket
    /// without a number has no avg/min/max/sum and is omitted.
    fn value(self, agg: Aggregate) -> Option<Value> {
        let numeric = (self.numbers > 0).then_some(());
        match agg {
            Aggregate::Count => Some(Value::Number(self.count as f64)),
            Aggregate::Last => self.last,
            Aggregate::Sum => numeric.map(|_| Value::Number(self.sum)),
            Aggregate::Min => numeric.map(|_| Value::Number(self.min)),
            Aggregate::Max => numeric.map(|_| Value::Number(self.max)),
            Aggregate::Avg => numeric.map(|_| Value::Number(self.sum / self.numbers as f64)),
        }
    }
}

/// Encodes a series answer in its format, one point at a time, into a buffer handed to `emit`
/// whenever it passes [`STREAM_CHUNK_BYTES`] and at the end; `emit` returns false when the
/// client is gone.
struct Encoder<'a> {
    query: &'a SeriesQuery<'a>,
    buffer: Vec<u8>,
    emit: &'a mut dyn FnMut(&mut Vec<u8>) -> bool,
    gone: bool,
    /// Names whose framing was opened (JSON with several names).
    series_open: bool,
    series_written: usize,
    points_in_series: usize,
}

impl Encoder<'_> {
    fn several(&self) -> bool {
        self.query.names.len() > 1
    }

    fn start(&mut self) {
        match self.query.format {
            Format::Json => {
                self.buffer.extend_from_slice(b"{\"device\":");
                write_json(&mut self.buffer, &self.query.device);
                if let Some((step, agg)) = self.query.bucket {
                    self.buffer.extend_from_slice(b",\"step\":");
                    write_json(&mut self.buffer, &step);
                    self.buffer.extend_from_slice(b",\"agg\":");
                    write_json(&mut self.buffer, &agg.name());
                }
                if self.several() {
                    self.buffer.extend_from_slice(b",\"series\":[");
                }
            }
            Format::Csv => {
                let header: &[u8] = if self.several() {
                    b"name,time,value\n"
                } else {
                    b"time,value\n"
                };
                self.buffer.extend_from_slice(header);
            }
            Format::Ndjson => {}
        }
    }

    fn open_series(&mut self, name: &str) {
        if self.series_open {
            return;
        }
        self.series_open = true;
        self.points_in_series = 0;
        if self.query.format == Format::Json {
            if self.several() {
                if self.series_written > 0 {
                    self.buffer.push(b',');
                }
                self.buffer.push(b'{');
            } else {
                self.buffer.push(b',');
            }
            self.buffer.extend_from_slice(b"\"name\":");
            write_json(&mut self.buffer, &name);
            self.buffer.extend_from_slice(b",\"points\":[");
        }
    }

    fn close_series(&mut self) {
        if !self.series_open {
            return;
        }
        self.series_open = false;
        self.series_written += 1;
        if self.query.format == Format::Json {
            self.buffer.push(b']');
            if self.several() {
                self.buffer.push(b'}');
            }
        }
    }

    fn point(&mut self, name: &str, time: f64, value: &Value) {
        self.open_series(name);
        match self.query.format {
            Format::Json => {
                if self.points_in_series > 0 {
                    self.buffer.push(b',');
                }
                self.buffer.push(b'[');
                write_json(&mut self.buffer, &time);
                self.buffer.push(b',');
                write_value(&mut self.buffer, value);
                self.buffer.push(b']');
            }
            Format::Csv => {
                use std::io::Write as _;
                if self.several() {
                    self.buffer.extend_from_slice(csv_field(name).as_bytes());
                    self.buffer.push(b',');
                }
                let value = match value {
                    Value::Number(n) => n.to_string(),
                    Value::Bool(b) => b.to_string(),
                    Value::String(s) => csv_field(s),
                    Value::Data(d) => base64url(d),
                };
                let _ = writeln!(self.buffer, "{time},{value}");
            }
            Format::Ndjson => {
                let line = if self.several() {
                    json!({ "name": name, "time": time, "value": value_json(value) })
                } else {
                    json!({ "time": time, "value": value_json(value) })
                };
                write_json(&mut self.buffer, &line);
                self.buffer.push(b'\n');
            }
        }
        self.points_in_series += 1;
        if self.buffer.len() >= STREAM_CHUNK_BYTES {
            self.flush();
        }
    }

    fn finish(&mut self, next: Option<Cursor>) {
        if self.query.format == Format::Json {
            // Names without any point in the answer still appear, with no points.
            if self.several() {
                self.buffer.push(b']');
            } else if self.series_written == 0 {
                let name = self.query.names[0].clone();
                self.open_series(&name);
                self.close_series();
            }
            if let Some(cursor) = next {
                self.buffer.extend_from_slice(b",\"next\":");
                write_json(&mut self.buffer, &cursor.encode());
            }
            self.buffer.extend_from_slice(b"}");
        }
        self.flush();
    }

    fn flush(&mut self) {
        if !self.gone && !self.buffer.is_empty() {
            self.gone = !(self.emit)(&mut self.buffer);
        }
        self.buffer.clear();
    }
}

fn csv_field(text: &str) -> String {
    if text.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_string()
    }
}

/// Writes the answer of `query`; returns the cursor of the next page when `limit` cut it.
fn write_series(
    reader: &Reader,
    query: &SeriesQuery,
    emit: &mut dyn FnMut(&mut Vec<u8>) -> bool,
) -> Result<Option<Cursor>, StoreError> {
    let mut encoder = Encoder {
        query,
        buffer: Vec::with_capacity(STREAM_CHUNK_BYTES + 4096),
        emit,
        gone: false,
        series_open: false,
        series_written: 0,
        points_in_series: 0,
    };
    encoder.start();
    let limit = query.limit.unwrap_or(usize::MAX);
    let mut emitted = 0usize;
    let first = query.cursor.map_or(0, |c| c.name);
    let mut next = None;
    'names: for (index, name) in query.names.iter().enumerate().skip(first) {
        let resume = query.cursor.filter(|c| c.name == index);
        let from = resume.map_or(query.from, |c| c.time.max(query.from));
        let mut to_skip = resume.map_or(0, |c| c.skip);
        // Points of the run at the last emitted time, for a cursor that resumes inside it.
        let (mut run_time, mut run_len) = (f64::NAN, 0u64);
        let mut bucket: Option<Bucket> = None;
        if let Some(mut scan) = reader.scan(&query.device, name, from, query.to) {
            while let Some(chunk) = scan.next_chunk()? {
                for (time, value) in chunk {
                    if let Some(threshold) = query.above {
                        if !matches!(value, Value::Number(n) if n > threshold) {
                            continue;
                        }
                    }
                    let point = match query.bucket {
                        None => Some((time, value)),
                        Some((step, agg)) => {
                            let start = (time / step).floor() * step;
                            let done = match bucket.as_mut() {
                                Some(open) if open.start == start => {
                                    open.add(value);
                                    None
                                }
                                _ => {
                                    let mut fresh = Bucket::new(start);
                                    fresh.add(value);
                                    bucket.replace(fresh)
                                }
                            };
                            done.and_then(|b| Some((b.start, b.value(agg)?)))
                        }
                    };
                    let Some((time, value)) = point else { continue };
                    if to_skip > 0 && time == from {
                        to_skip -= 1;
                        continue;
                    }
                    if emitted == limit {
                        let skip = if time == run_time { run_len } else { 0 };
                        next = Some(Cursor {
                            name: index,
                            time,
                            skip,
                        });
                        break 'names;
                    }
                    encoder.point(name, time, &value);
                    emitted += 1;
                    if time == run_time {
                        run_len += 1;
                    } else {
                        (run_time, run_len) = (time, 1);
                    }
                    if encoder.gone {
                        return Ok(None);
                    }
                }
            }
        }
        if let (Some((_, agg)), Some(open)) = (query.bucket, bucket) {
            let start = open.start;
            if let Some(value) = open.value(agg) {
                if emitted == limit {
                    next = Some(Cursor {
                        name: index,
                        time: start,
                        skip: 0,
                    });
                    break 'names;
                }
                encoder.point(name, start, &value);
                emitted += 1;
            }
        }
        if query.format == Format::Json && query.names.len() > 1 {
            encoder.open_series(name);
        }
        encoder.close_series();
    }
    encoder.close_series();
    encoder.finish(next);
    Ok(next)
}

// ---------------------------------------------------------------------------------------------
// Fleet-wide aggregates

const AGGREGATE_PARAMETERS: [&str; 7] = ["name", "prefix", "from", "to", "step", "agg", "format"];

/// A validated `/v1/aggregate` query.
#[derive(Debug, Clone, PartialEq)]
struct AggregateQuery {
    name: String,
    prefix: String,
    from: f64,
    to: f64,
    step: f64,
    /// `step` as given, for error messages.
    step_text: String,
    agg: Aggregate,
    format: Format,
}

impl AggregateQuery {
    /// The normalised query: the result cache's key and the ETag's input.
    fn key(&self) -> Vec<u8> {
        let mut key = Vec::with_capacity(48 + self.name.len() + self.prefix.len());
        key.push(b'A');
        key_str(&mut key, &self.name);
        key_str(&mut key, &self.prefix);
        key_u64(&mut key, self.from.to_bits());
        key_u64(&mut key, self.to.to_bits());
        key_u64(&mut key, self.step.to_bits());
        key.push(self.agg as u8);
        key.push(self.format as u8);
        key
    }
}

/// `now` is called only for a time given as `now` or `now-DURATION`.
fn parse_aggregate_query(params: Params<'_>, now: fn() -> f64) -> Result<AggregateQuery, String> {
    let name = match params.get("name") {
        Some(name) if !name.is_empty() => name.to_string(),
        _ => return Err("`name` is required".to_string()),
    };
    let (from, to) = parse_range(&params, now)?;
    let Some(step_text) = params.get("step") else {
        return Err("`step` is required".to_string());
    };
    let step = parse_step(step_text)?;
    let agg = match params.get("agg") {
        None => return Err("`agg` is required".to_string()),
        Some("avg") => Aggregate::Avg,
        Some("min") => Aggregate::Min,
        Some("max") => Aggregate::Max,
        Some("sum") => Aggregate::Sum,
        Some("count") => Aggregate::Count,
        Some(other) => {
            return Err(format!(
                "`agg`: `{other}` is not one of avg, min, max, sum, count (the latest value of each device is /v1/latest)"
            ))
        }
    };
    let format = match params.get("format") {
        None | Some("json") => Format::Json,
        Some("csv") => Format::Csv,
        Some(other) => return Err(format!("`format`: `{other}` is not one of json, csv")),
    };
    Ok(AggregateQuery {
        name,
        prefix: params.get("prefix").unwrap_or("").to_string(),
        from,
        to,
        step,
        step_text: step_text.to_string(),
        agg,
        format,
    })
}

async fn aggregate(State(state): State<Arc<AppState>>, request: Request) -> Response {
    let started = Instant::now();
    let response = aggregate_response(&state, request).await;
    state.record_query(Endpoint::Aggregate, started);
    response
}

async fn aggregate_response(state: &Arc<AppState>, request: Request) -> Response {
    let query = match Params::parse(request.uri().query(), &AGGREGATE_PARAMETERS, None)
        .and_then(|params| parse_aggregate_query(params, now_seconds))
    {
        Ok(query) => query,
        Err(message) => return error(StatusCode::BAD_REQUEST, message),
    };
    // Finding the matching series walks every shard's series index: off the async threads.
    let reader = state.reader.clone();
    let (name, prefix) = (query.name.clone(), query.prefix.clone());
    let scan = match tokio::task::spawn_blocking(move || reader.fleet(&name, &prefix)).await {
        Ok(Some(scan)) => scan,
        Ok(None) if query.prefix.is_empty() => {
            return error(
                StatusCode::NOT_FOUND,
                format!("no device has a series `{}`", query.name),
            )
        }
        Ok(None) => {
            return error(
                StatusCode::NOT_FOUND,
                format!(
                    "no device with prefix `{}` has a series `{}`",
                    query.prefix, query.name
                ),
            )
        }
        Err(e) => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("query failed: {e}"),
            )
        }
    };
    let key = query.key();
    let version = scan.version();
    let etag = state.etag(&key, version);
    let sealed = query.to <= state.sealed_before();
    if not_modified(request.headers(), &etag) {
        return not_modified_response(&etag, sealed);
    }
    if let Some(answer) = state.cache.get(&key, version) {
        return answer_response(&etag, sealed, answer);
    }
    let Ok(_permit) = state.aggregates.acquire().await else {
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "query failed: shutting down".to_string(),
        );
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (from, to, step) = (query.from, query.to, query.step);
    let computed =
        tokio::task::spawn_blocking(move || scan.aggregate(from, to, step, threads)).await;
    match computed {
        Ok(Ok(found)) => {
            let answer = aggregate_answer(&query, &found);
            state.cache.insert(key, version, answer.clone());
            answer_response(&etag, sealed, answer)
        }
        Ok(Err(FleetError::TooManyBuckets { buckets })) => error(
            StatusCode::BAD_REQUEST,
            format!(
                "`step`: {} makes {buckets} buckets over the range, at most {FLEET_BUCKETS_MAX}: give a larger step or a narrower range",
                query.step_text
            ),
        ),
        Ok(Err(FleetError::StepTooSmall)) => error(
            StatusCode::BAD_REQUEST,
            format!(
                "`step`: {} is too small for times this far from the epoch",
                query.step_text
            ),
        ),
        Ok(Err(FleetError::Store(e))) => {
            tracing::error!(error = %e, name = %query.name, "aggregate query failed");
            error(StatusCode::INTERNAL_SERVER_ERROR, format!("store: {e}"))
        }
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("query failed: {e}"),
        ),
    }
}

/// The answer's body: JSON (the query, `devices`, `points`, `buckets`) or CSV (`time,value`).
fn aggregate_answer(query: &AggregateQuery, found: &FleetAggregate) -> Answer {
    use std::io::Write as _;
    let numeric = query.agg != Aggregate::Count;
    let values = found.buckets.iter().filter_map(|bucket| {
        let value = match query.agg {
            Aggregate::Count => bucket.count as f64,
            _ if bucket.numbers == 0 => return None,
            Aggregate::Avg => bucket.sum / bucket.numbers as f64,
            Aggregate::Min => bucket.min,
            Aggregate::Max => bucket.max,
            Aggregate::Sum | Aggregate::Last => bucket.sum,
        };
        Some((bucket.start, value))
    });
    let mut body = Vec::with_capacity(128 + 40 * found.buckets.len());
    match query.format {
        Format::Json => {
            body.extend_from_slice(b"{\"name\":");
            write_json(&mut body, &query.name);
            body.extend_from_slice(b",\"prefix\":");
            write_json(&mut body, &query.prefix);
            body.extend_from_slice(b",\"step\":");
            write_json(&mut body, &query.step);
            body.extend_from_slice(b",\"agg\":");
            write_json(&mut body, query.agg.name());
            body.extend_from_slice(b",\"devices\":");
            let devices = if numeric {
                found.devices_with_numbers
            } else {
                found.devices
            };
            write_json(&mut body, &devices);
            body.extend_from_slice(b",\"points\":");
            write_json(
                &mut body,
                &if numeric { found.numbers } else { found.points },
            );
            body.extend_from_slice(b",\"buckets\":[");
            for (i, (start, value)) in values.enumerate() {
                if i > 0 {
                    body.push(b',');
                }
                body.push(b'[');
                write_json(&mut body, &start);
                body.push(b',');
                write_json(&mut body, &value);
                body.push(b']');
            }
            body.extend_from_slice(b"]}");
        }
        Format::Csv | Format::Ndjson => {
            body.extend_from_slice(b"time,value\n");
            for (start, value) in values {
                let _ = writeln!(body, "{start},{value}");
            }
        }
    }
    Answer {
        content_type: query.format.content_type(),
        body: Bytes::from(body),
        next: None,
        gzip: None,
    }
}

// ---------------------------------------------------------------------------------------------
// Measurements and health

async fn metrics_text(State(state): State<Arc<AppState>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.snapshot().to_prometheus(),
    )
        .into_response()
}

async fn stats(State(state): State<Arc<AppState>>) -> Response {
    (
        [(header::CACHE_CONTROL, "no-store")],
        axum::Json(state.snapshot().to_json()),
    )
        .into_response()
}

/// 200 `ready`, or 503 with why not: `not ready` (starting), `draining` (shutting down), or
/// `commit failing on shard N` (disk full or I/O error, see `metrics::COMMIT_FAILURE_HOLD`).
async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    let unavailable = |why: String| (StatusCode::SERVICE_UNAVAILABLE, why).into_response();
    if !state.ready.load(Ordering::Relaxed) {
        return unavailable("not ready\n".into());
    }
    if state.draining.load(Ordering::Relaxed) {
        return unavailable("draining\n".into());
    }
    if let Some(shard) = state.shards.iter().position(|s| s.commit_failing()) {
        return unavailable(format!("commit failing on shard {shard}\n"));
    }
    (StatusCode::OK, "ready\n").into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(query: &str) -> Result<SeriesQuery<'_>, String> {
        let params = Params::parse(Some(query), &SERIES_PARAMETERS, Some("name"))?;
        parse_series_query(params, || 1_000_000.0)
    }

    /// A listing whose answer would pass its byte bound ends its page early with a `next`
    /// cursor; following the cursors lists every device once, in order, for both listings.
    #[test]
    fn a_listing_past_its_byte_bound_ends_its_page_with_a_next_cursor() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = sluice_storage::Store::open(sluice_storage::StoreConfig {
            dir: dir.path().to_path_buf(),
            partition_secs: 3600,
            partition_grace_secs: 900,
            durability: sluice_storage::Durability::Os,
        })
        .unwrap();
        let mut writers = [store.writer(0).unwrap(), store.writer(1).unwrap()];
        let devices: Vec<String> = (0..25).map(|i| format!("d-{i:02}")).collect();
        let text = "x".repeat(200);
        for (i, device) in devices.iter().enumerate() {
            let value = sluice_storage::ValueRef::String(&text);
            writers[i % 2].append(device, "blob", 1.0e9, value).unwrap();
        }
        for writer in &mut writers {
            writer.commit().unwrap();
        }
        let reader = store.reader();
        for endpoint in [Endpoint::Latest, Endpoint::Devices] {
            let mut listed = Vec::new();
            let mut pages = 0;
            let mut cursor: Option<String> = None;
            loop {
                pages += 1;
                assert!(pages <= devices.len(), "{endpoint:?}: pages never end");
                let answer = build_listing(&reader, endpoint, "d-", None, cursor.as_deref(), 400);
                let body: Json = serde_json::from_slice(&answer.body).unwrap();
                let page = body["devices"].as_array().unwrap();
                assert!(!page.is_empty());
                // At most one entry past the bound.
                let entry = page[0].to_string().len();
                assert!(
                    answer.body.len() <= 1000 + 2 * entry + 64,
                    "{}",
                    answer.body.len()
                );
                listed.extend(
                    page.iter()
                        .map(|d| d["device"].as_str().unwrap().to_string()),
                );
                match body.get("next") {
                    Some(next) => {
                        assert_eq!(next.as_str(), listed.last().map(String::as_str));
                        assert!(answer.next.is_some());
                        cursor = Some(next.as_str().unwrap().to_string());
                    }
                    None => break,
                }
            }
            assert_eq!(listed, devices, "{endpoint:?}");
            assert!(pages > 2, "{endpoint:?}: {pages} pages");
        }
    }

    #[test]
    fn listings_write_values_as_the_series_answers_do() {
        for value in [
            Value::Number(21.5),
            Value::Number(f64::NAN),
            Value::Number(-0.0),
            Value::Bool(true),
            Value::String("a \"quoted\" \u{1} line\n".to_string()),
            Value::Data(vec![0, 255, 7]),
        ] {
            let mut written = Vec::new();
            write_value(&mut written, &value);
            assert_eq!(
                String::from_utf8(written).unwrap(),
                value_json(&value).to_string(),
                "{value:?}"
            );
        }
    }

    #[test]
    fn series_query_names_the_bad_parameter() {
        let err = |q: &str| parse(q).unwrap_err();
        assert!(err("name=t").contains("`device`"));
        assert!(err("device=d").contains("`name`"));
        assert!(err("device=d&name=t&from=yesterday").contains("`from`"));
        assert!(err("device=d&name=t&to=now-soon").contains("`to`"));
        assert!(err("device=d&name=t&step=60").contains("`agg`"));
        assert!(err("device=d&name=t&step=60&agg=median").contains("`agg`"));
        assert!(err("device=d&name=t&step=-1&agg=avg").contains("`step`"));
        assert!(err("device=d&name=t&format=xml").contains("`format`"));
        assert!(err("device=d&name=t&colour=red").contains("`colour`"));
        assert!(err("device=d&name=t&from=10&to=5").contains("`from`"));
        assert!(err("device=d&name=t&limit=0").contains("`limit`"));
        assert!(err("device=d&name=t&limit=many").contains("`limit`"));
        assert!(err("device=d&name=t&cursor=zzz").contains("`cursor`"));
        assert!(err("device=d&name=t&above=high").contains("`above`"));
        assert!(err("device=d&device=e&name=t").contains("`device`"));
        assert!(err("device=d&name=t&name=t").contains("`name`"));
    }

    fn parse_aggregate(query: &str) -> Result<AggregateQuery, String> {
        let params = Params::parse(Some(query), &AGGREGATE_PARAMETERS, None)?;
        parse_aggregate_query(params, || 1_000_000.0)
    }

    #[test]
    fn aggregate_query_names_the_bad_parameter() {
        let err = |q: &str| parse_aggregate(q).unwrap_err();
        assert!(err("step=1h&agg=avg").contains("`name`"));
        assert!(err("name=&step=1h&agg=avg").contains("`name`"));
        assert!(err("name=t&agg=avg").contains("`step`"));
        assert!(err("name=t&step=1h").contains("`agg`"));
        assert!(err("name=t&step=0&agg=avg").contains("`step`"));
        assert!(err("name=t&step=1h&agg=last").contains("`agg`"));
        assert!(err("name=t&step=1h&agg=avg&format=ndjson").contains("`format`"));
        assert!(err("name=t&step=1h&agg=avg&device=d").contains("`device`"));
        assert!(err("name=t&name=u&step=1h&agg=avg").contains("`name`"));
        assert!(err("name=t&step=1h&agg=avg&from=5&to=5").contains("`from`"));
        let q = parse_aggregate("name=usage&prefix=host-&step=5m&agg=max&from=now-1h&format=csv")
            .unwrap();
        assert_eq!(
            (q.name.as_str(), q.prefix.as_str(), q.step, q.agg, q.format),
            ("usage", "host-", 300.0, Aggregate::Max, Format::Csv)
        );
        assert_eq!((q.from, q.to), (1_000_000.0 - 3600.0, f64::INFINITY));
        let key = |q: &str| parse_aggregate(q).unwrap().key();
        assert_eq!(key("name=t&step=60&agg=sum"), key("agg=sum&step=1m&name=t"));
        assert_ne!(key("name=t&step=60&agg=sum"), key("name=t&step=60&agg=min"));
        assert_ne!(
            key("name=t&step=60&agg=sum"),
            key("name=t&prefix=a&step=60&agg=sum")
        );
        assert_ne!(
            key("name=ta&step=60&agg=sum"),
            key("name=t&prefix=a&step=60&agg=sum")
        );
    }

    #[test]
    fn series_query_accepts_unix_seconds_rfc3339_and_now() {
        let q = parse(
            "device=dev%2D1&name=temp&name=hum&from=2025-11-24T00:00:00Z&to=1763942400.5&step=5m&agg=avg&format=csv&limit=10",
        )
        .unwrap();
        assert_eq!(q.device, "dev-1");
        assert_eq!(q.names, ["temp", "hum"]);
        assert_eq!(q.from, 1763942400.0);
        assert_eq!(q.to, 1763942400.5);
        assert_eq!(q.bucket, Some((300.0, Aggregate::Avg)));
        assert_eq!(q.format, Format::Csv);
        assert_eq!(q.limit, Some(10));
        let offset = parse("device=d&name=t&from=2025-11-24T02:00:00%2B02:00").unwrap();
        assert_eq!(offset.from, 1763942400.0);
        let relative = parse("device=d&name=t&from=now-1h&to=now").unwrap();
        assert_eq!(
            (relative.from, relative.to),
            (1_000_000.0 - 3600.0, 1_000_000.0)
        );
    }

    #[test]
    fn query_strings_decode_as_forms_and_borrow_when_nothing_is_escaped() {
        let q = parse("device=dev-1&name=temp&na%6De=a+b&name=c%2Cd").unwrap();
        assert_eq!(q.names, ["temp", "a b", "c,d"]);
        assert!(matches!(q.device, Cow::Borrowed("dev-1")));
        assert!(matches!(q.names[0], Cow::Borrowed("temp")));
        // Empty pieces are skipped, a name without `=` has an empty value.
        assert_eq!(parse("&&device=d&&name=t&").unwrap().names, ["t"]);
        assert!(parse("device&name=t").unwrap_err().contains("`device`"));
        assert!(parse("device=d&name=t&name=")
            .unwrap_err()
            .contains("`name`"));
        assert!(parse("").unwrap_err().contains("`device`"));
        let listing = |q: &str| {
            Params::parse(Some(q), &["prefix", "limit", "cursor"], None).and_then(|p| p.limit())
        };
        assert_eq!(listing("prefix=a&limit=5"), Ok(Some(5)));
        assert!(listing("prefix=a&prefix=b")
            .unwrap_err()
            .contains("`prefix`"));
        assert!(listing("name=x").unwrap_err().contains("`name`"));
        assert!(listing("limit=100001").unwrap_err().contains("`limit`"));
    }

    #[test]
    fn keys_are_equal_exactly_for_the_same_normalised_query() {
        let key = |q: &str| parse(q).unwrap().key();
        let base = key("device=d&name=t&from=1795478400&to=1795479000");
        assert_eq!(
            base,
            key("to=1795479000.0&from=2026-11-24T00:00:00Z&name=t&device=d")
        );
        let different = [
            "device=d&name=t&from=1795478400&to=1795479001",
            "device=d&name=t&from=1795478401&to=1795479000",
            "device=e&name=t&from=1795478400&to=1795479000",
            "device=d&name=u&from=1795478400&to=1795479000",
            "device=d&name=t&name=u&from=1795478400&to=1795479000",
            "device=d&name=t&from=1795478400&to=1795479000&step=60&agg=max",
            "device=d&name=t&from=1795478400&to=1795479000&step=60&agg=min",
            "device=d&name=t&from=1795478400&to=1795479000&step=120&agg=max",
            "device=d&name=t&from=1795478400&to=1795479000&format=csv",
            "device=d&name=t&from=1795478400&to=1795479000&limit=10",
            "device=d&name=t&from=1795478400&to=1795479000&above=0",
        ];
        let mut keys = vec![base];
        for q in different {
            let k = key(q);
            assert!(!keys.contains(&k), "{q} shares a key");
            keys.push(k);
        }
        // Lengths come before strings: device `ab` + name `c` is not device `a` + name `bc`.
        assert_ne!(key("device=ab&name=c"), key("device=a&name=bc"));
        let cursor = Cursor {
            name: 0,
            time: 1.0,
            skip: 0,
        };
        assert_ne!(
            key("device=d&name=t&limit=5"),
            key(&format!(
                "device=d&name=t&limit=5&cursor={}",
                cursor.encode()
            ))
        );
    }

    #[test]
    fn relative_times_read_the_clock_only_when_asked() {
        fn clock() -> f64 {
            panic!("the clock was read")
        }
        let params = Params::parse(
            Some("device=d&name=t&from=5&to=6"),
            &SERIES_PARAMETERS,
            Some("name"),
        );
        assert!(parse_series_query(params.unwrap(), clock).is_ok());
    }

    #[test]
    fn etags_are_quoted_hex_and_if_none_match_lists_are_read() {
        let etag = Etag::new(0x0123_4567_89ab_cdef);
        assert_eq!(etag.header(), "\"0123456789abcdef\"");
        let other = Etag::new(1);
        let headers = |values: &[&str]| {
            let mut map = HeaderMap::new();
            for v in values {
                map.append(header::IF_NONE_MATCH, HeaderValue::from_str(v).unwrap());
            }
            map
        };
        assert!(not_modified(&headers(&["\"0123456789abcdef\""]), &etag));
        assert!(not_modified(
            &headers(&["\"x\" , W/\"0123456789abcdef\""]),
            &etag
        ));
        assert!(not_modified(
            &headers(&["\"x\"", "\"0123456789abcdef\""]),
            &etag
        ));
        assert!(not_modified(&headers(&["*"]), &other));
        assert!(!not_modified(&headers(&["\"0123456789abcdef\""]), &other));
        assert!(!not_modified(&headers(&["0123456789abcdef"]), &etag));
        assert!(!not_modified(&headers(&[]), &etag));
    }

    #[test]
    fn accept_encoding_allows_gzip_unless_it_is_refused() {
        let accepts = |values: &[&str]| {
            let mut map = HeaderMap::new();
            for v in values {
                map.append(header::ACCEPT_ENCODING, HeaderValue::from_str(v).unwrap());
            }
            accepts_gzip(&map)
        };
        assert!(accepts(&["gzip"]));
        assert!(accepts(&["gzip, deflate, br, zstd"]));
        assert!(accepts(&["br;q=1.0, GZIP;q=0.5"]));
        assert!(accepts(&["x-gzip"]));
        assert!(accepts(&["*"]));
        assert!(accepts(&["deflate", "gzip"]));
        assert!(!accepts(&[]));
        assert!(!accepts(&["identity"]));
        assert!(!accepts(&["br, zstd"]));
        assert!(!accepts(&["gzip;q=0"]));
        assert!(!accepts(&["gzip; q=0.000"]));
        assert!(!accepts(&["*, gzip;q=0"]));
        assert!(!accepts(&["*;q=0"]));
    }

    #[test]
    fn gzip_bodies_inflate_to_the_answer() {
        use std::io::Read as _;
        let body = b"{\"devices\":[]}".repeat(100);
        let mut inflated = Vec::new();
        flate2::read::GzDecoder::new(&gzip(&body)[..])
            .read_to_end(&mut inflated)
            .unwrap();
        assert_eq!(inflated, body);
    }

    #[test]
    fn cursors_round_trip_and_reject_junk() {
        let cursor = Cursor {
            name: 1,
            time: 1763900000.25,
            skip: 3,
        };
        assert_eq!(Cursor::decode(&cursor.encode()), Some(cursor));
        assert_eq!(Cursor::decode("bm9wZQ"), None);
        assert!(
            parse(&format!("device=d&name=t&cursor={}", cursor.encode()))
                .unwrap_err()
                .contains("`cursor`")
        );
    }

    #[test]
    fn buckets_skip_values_they_cannot_aggregate() {
        let mut bucket = Bucket::new(60.0);
        bucket.add(Value::Bool(true));
        assert_eq!(
            Bucket::new(60.0).value(Aggregate::Count),
            Some(Value::Number(0.0))
        );
        let count = {
            let mut b = Bucket::new(0.0);
            b.add(Value::Bool(true));
            b.add(Value::Number(2.0));
            b.add(Value::Number(4.0));
            b
        };
        assert_eq!(count.value(Aggregate::Avg), Some(Value::Number(3.0)));
        assert_eq!(bucket.value(Aggregate::Count), Some(Value::Number(1.0)));
        let mut only_bool = Bucket::new(60.0);
        only_bool.add(Value::Bool(true));
        assert_eq!(only_bool.value(Aggregate::Max), None);
    }

    #[test]
    fn data_values_are_base64url() {
        assert_eq!(base64url(b"hello"), "aGVsbG8");
        assert_eq!(base64url(&[0xfb, 0xff]), "-_8");
        assert_eq!(base64url(b""), "");
    }
}
