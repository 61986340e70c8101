//! The side HTTP port: queries over committed data, health, readiness and metrics.
//! The API is documented in `docs/http-api.md`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde_json::{json, Value as Json};
use sluice_storage::{Reader, Value};

use crate::metrics::{self, ShardMetrics};

/// Points one series response may return; a larger range must be narrowed or bucketed.
pub const POINTS_PER_RESPONSE_MAX: usize = 1_000_000;
/// Buckets one aggregated response may return (a tiny `step` over a long range).
pub const BUCKETS_PER_RESPONSE_MAX: usize = 100_000;

pub struct AppState {
    pub reader: Reader,
    pub shards: Vec<Arc<ShardMetrics>>,
    pub ready: AtomicBool,
    pub query_latency_us: std::sync::Mutex<hdrhistogram::Histogram<u64>>,
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/devices", get(devices))
        .route("/v1/devices/{device}/latest", get(latest))
        .route("/v1/series", get(series))
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such resource".to_string()) })
        .with_state(state)
}

fn error(status: StatusCode, message: String) -> Response {
    (status, axum::Json(json!({ "error": message }))).into_response()
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

async fn devices(State(state): State<Arc<AppState>>) -> Response {
    let started = Instant::now();
    let devices: Vec<Json> = state
        .reader
        .devices()
        .into_iter()
        .map(|d| json!({ "device": d.device, "last_seen": d.last_seen, "points": d.points }))
        .collect();
    let response = axum::Json(json!({ "devices": devices })).into_response();
    state.record_query(started);
    response
}

async fn latest(State(state): State<Arc<AppState>>, Path(device): Path<String>) -> Response {
    let started = Instant::now();
    let response = match state.reader.latest(&device) {
        None => error(StatusCode::NOT_FOUND, format!("unknown device `{device}`")),
        Some(series) => {
            let series: serde_json::Map<String, Json> = series
                .into_iter()
                .map(|(name, time, value)| (name, json!([time, value_json(&value)])))
                .collect();
            axum::Json(json!({ "device": device, "series": series })).into_response()
        }
    };
    state.record_query(started);
    response
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Format {
    Json,
    Csv,
    Ndjson,
}

/// A validated `/v1/series` query.
#[derive(Debug, PartialEq)]
struct SeriesQuery {
    device: String,
    name: String,
    from: f64,
    to: f64,
    bucket: Option<(f64, Aggregate)>,
    format: Format,
}

impl Hash for SeriesQuery {
    fn hash<H: Hasher>(&self, state: &mut H) {
        (
            &self.device,
            &self.name,
            self.from.to_bits(),
            self.to.to_bits(),
        )
            .hash(state);
        self.bucket.map(|(s, a)| (s.to_bits(), a)).hash(state);
        self.format.hash(state);
    }
}

/// Unix seconds (`1763900000.5`) or RFC 3339 (`2026-11-24T01:00:00Z`, any offset).
fn parse_time(parameter: &str, text: &str) -> Result<f64, String> {
    if let Ok(seconds) = text.parse::<f64>() {
        if seconds.is_finite() {
            return Ok(seconds);
        }
    }
    text.parse::<jiff::Timestamp>()
        .map(|t| t.as_nanosecond() as f64 / 1e9)
        .map_err(|_| {
            format!("`{parameter}`: `{text}` is neither unix seconds nor an RFC 3339 time")
        })
}

fn parse_series_query(pairs: Vec<(String, String)>) -> Result<SeriesQuery, String> {
    let mut params: BTreeMap<String, String> = BTreeMap::new();
    for (key, value) in pairs {
        if params.insert(key.clone(), value).is_some() {
            return Err(format!("`{key}` is given more than once"));
        }
    }
    let known = ["device", "name", "from", "to", "step", "agg", "format"];
    if let Some(key) = params.keys().find(|k| !known.contains(&k.as_str())) {
        return Err(format!("unknown parameter `{key}`"));
    }
    let required = |key: &str| -> Result<String, String> {
        match params.get(key) {
            Some(v) if !v.is_empty() => Ok(v.clone()),
            _ => Err(format!("`{key}` is required")),
        }
    };
    let device = required("device")?;
    let name = required("name")?;
    let from = match params.get("from") {
        Some(t) => parse_time("from", t)?,
        None => f64::NEG_INFINITY,
    };
    let to = match params.get("to") {
        Some(t) => parse_time("to", t)?,
        None => f64::INFINITY,
    };
    if from >= to {
        return Err("`from` must be before `to`".to_string());
    }
    let bucket = match (params.get("step"), params.get("agg")) {
        (None, None) => None,
        (Some(_), None) => return Err("`step` needs `agg`".to_string()),
        (None, Some(_)) => return Err("`agg` needs `step`".to_string()),
        (Some(step), Some(agg)) => {
            let seconds = match step.parse::<f64>() {
                Ok(s) => s,
                Err(_) => humantime::parse_duration(step)
                    .map_err(|_| format!("`step`: `{step}` is not seconds or a duration like 5m"))?
                    .as_secs_f64(),
            };
            if !(seconds.is_finite() && seconds > 0.0) {
                return Err(format!("`step`: `{step}` must be a positive duration"));
            }
            let agg = match agg.as_str() {
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
    let format = match params.get("format").map(String::as_str) {
        None | Some("json") => Format::Json,
        Some("csv") => Format::Csv,
        Some("ndjson") => Format::Ndjson,
        Some(other) => {
            return Err(format!(
                "`format`: `{other}` is not one of json, csv, ndjson"
            ))
        }
    };
    Ok(SeriesQuery {
        device,
        name,
        from,
        to,
        bucket,
        format,
    })
}

/// Buckets aligned to multiples of `step` since the epoch; empty buckets are omitted. Numeric
/// aggregates look at numeric values only; `count` and `last` at every value.
fn aggregate(points: &[(f64, Value)], step: f64, agg: Aggregate) -> Vec<(f64, Value)> {
    let mut out: Vec<(f64, Value)> = Vec::new();
    let mut i = 0;
    while i < points.len() {
        let start = (points[i].0 / step).floor() * step;
        let mut j = i;
        while j < points.len() && (points[j].0 / step).floor() * step == start {
            j += 1;
        }
        let bucket = &points[i..j];
        let numbers = bucket.iter().filter_map(|(_, v)| match v {
            Value::Number(n) => Some(*n),
            _ => None,
        });
        let value = match agg {
            Aggregate::Count => Some(Value::Number(bucket.len() as f64)),
            Aggregate::Last => bucket.last().map(|(_, v)| v.clone()),
            Aggregate::Sum => numbers.clone().next().map(|_| Value::Number(numbers.sum())),
            Aggregate::Min => numbers.reduce(f64::min).map(Value::Number),
            Aggregate::Max => numbers.reduce(f64::max).map(Value::Number),
            Aggregate::Avg => {
                let (sum, count) = numbers.fold((0.0, 0usize), |(s, c), n| (s + n, c + 1));
                (count > 0).then(|| Value::Number(sum / count as f64))
            }
        };
        if let Some(value) = value {
            out.push((start, value));
        }
        i = j;
    }
    out
}

async fn series(
    State(state): State<Arc<AppState>>,
    pairs: Result<Query<Vec<(String, String)>>, QueryRejection>,
    headers: HeaderMap,
) -> Response {
    let started = Instant::now();
    let response = match pairs {
        Ok(Query(pairs)) => series_response(&state, pairs, &headers).await,
        Err(rejection) => error(StatusCode::BAD_REQUEST, rejection.body_text()),
    };
    state.record_query(started);
    response
}

async fn series_response(
    state: &Arc<AppState>,
    pairs: Vec<(String, String)>,
    headers: &HeaderMap,
) -> Response {
    let query = match parse_series_query(pairs) {
        Ok(query) => query,
        Err(message) => return error(StatusCode::BAD_REQUEST, message),
    };
    // The generation moves with every commit, so the tag changes whenever the answer can.
    let generation = state.reader.generation();
    let hash = ahash::RandomState::with_seeds(1, 2, 3, 4).hash_one(&query);
    let etag = format!("\"{hash:016x}-{generation}\"");
    let cache_headers = [
        (
            header::ETAG,
            HeaderValue::from_str(&etag).expect("hex etag is a valid header"),
        ),
        (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
    ];
    if headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"))
    {
        return (StatusCode::NOT_MODIFIED, cache_headers).into_response();
    }
    let reader = state.reader.clone();
    let (device, name, from, to) = (
        query.device.clone(),
        query.name.clone(),
        query.from,
        query.to,
    );
    let points =
        match tokio::task::spawn_blocking(move || reader.series(&device, &name, from, to)).await {
            Ok(Ok(Some(points))) => points,
            Ok(Ok(None)) => {
                return error(
                    StatusCode::NOT_FOUND,
                    format!(
                        "unknown series `{}` of device `{}`",
                        query.name, query.device
                    ),
                )
            }
            Ok(Err(e)) => return error(StatusCode::INTERNAL_SERVER_ERROR, format!("store: {e}")),
            Err(e) => {
                return error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("query failed: {e}"),
                )
            }
        };
    let points = match query.bucket {
        Some((step, agg)) => {
            let first = points.first().map_or(0.0, |p| p.0);
            let last = points.last().map_or(0.0, |p| p.0);
            if (last - first) / step > BUCKETS_PER_RESPONSE_MAX as f64 {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("`step`: more than {BUCKETS_PER_RESPONSE_MAX} buckets; use a larger step or a shorter range"),
                );
            }
            aggregate(&points, step, agg)
        }
        None => points,
    };
    if points.len() > POINTS_PER_RESPONSE_MAX {
        return error(
            StatusCode::BAD_REQUEST,
            format!("more than {POINTS_PER_RESPONSE_MAX} points; narrow `from`/`to` or use `step` and `agg`"),
        );
    }
    let (content_type, body) = render_series(&query, &points);
    (
        StatusCode::OK,
        cache_headers,
        [(header::CONTENT_TYPE, HeaderValue::from_static(content_type))],
        body,
    )
        .into_response()
}

fn render_series(query: &SeriesQuery, points: &[(f64, Value)]) -> (&'static str, String) {
    match query.format {
        Format::Json => {
            let points: Vec<Json> = points
                .iter()
                .map(|(t, v)| json!([t, value_json(v)]))
                .collect();
            let mut body = json!({ "device": query.device, "name": query.name, "points": points });
            if let Some((step, agg)) = query.bucket {
                body["step"] = json!(step);
                body["agg"] = json!(format!("{agg:?}").to_lowercase());
            }
            ("application/json", body.to_string())
        }
        Format::Ndjson => {
            let mut body = String::new();
            for (t, v) in points {
                let _ = writeln!(body, "{}", json!({ "time": t, "value": value_json(v) }));
            }
            ("application/x-ndjson", body)
        }
        Format::Csv => {
            let mut body = String::from("time,value\n");
            for (t, v) in points {
                let value = match v {
                    Value::Number(n) => n.to_string(),
                    Value::Bool(b) => b.to_string(),
                    Value::String(s) => format!("\"{}\"", s.replace('"', "\"\"")),
                    Value::Data(d) => base64url(d),
                };
                let _ = writeln!(body, "{t},{value}");
            }
            ("text/csv; charset=utf-8", body)
        }
    }
}

async fn metrics_text(State(state): State<Arc<AppState>>) -> Response {
    let mut extra = String::new();
    if let Ok(histogram) = state.query_latency_us.lock() {
        metrics::summary(&mut extra, "sluice_query_latency_seconds", &histogram);
    }
    let body = metrics::render(&state.shards, &extra);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    if state.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n").into_response()
    }
}

impl AppState {
    fn record_query(&self, started: Instant) {
        if let Ok(mut histogram) = self.query_latency_us.lock() {
            metrics::record(&mut histogram, started.elapsed().as_micros() as u64, 1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(query: &str) -> Vec<(String, String)> {
        let uri: axum::http::Uri = format!("/v1/series?{query}").parse().unwrap();
        Query::try_from_uri(&uri).unwrap().0
    }

    #[test]
    fn series_query_names_the_bad_parameter() {
        let err = |q: &str| parse_series_query(pairs(q)).unwrap_err();
        assert!(err("name=t").contains("`device`"));
        assert!(err("device=d").contains("`name`"));
        assert!(err("device=d&name=t&from=yesterday").contains("`from`"));
        assert!(err("device=d&name=t&step=60").contains("`agg`"));
        assert!(err("device=d&name=t&step=60&agg=median").contains("`agg`"));
        assert!(err("device=d&name=t&step=-1&agg=avg").contains("`step`"));
        assert!(err("device=d&name=t&format=xml").contains("`format`"));
        assert!(err("device=d&name=t&colour=red").contains("`colour`"));
        assert!(err("device=d&name=t&from=10&to=5").contains("`from`"));
    }

    #[test]
    fn series_query_accepts_unix_seconds_and_rfc3339() {
        let q = parse_series_query(pairs(
            "device=dev%2D1&name=temp&from=2025-11-24T00:00:00Z&to=1763942400.5&step=5m&agg=avg&format=csv",
        ))
        .unwrap();
        assert_eq!(q.device, "dev-1");
        assert_eq!(q.from, 1763942400.0);
        assert_eq!(q.to, 1763942400.5);
        assert_eq!(q.bucket, Some((300.0, Aggregate::Avg)));
        assert_eq!(q.format, Format::Csv);
        let offset =
            parse_series_query(pairs("device=d&name=t&from=2025-11-24T02:00:00%2B02:00")).unwrap();
        assert_eq!(offset.from, 1763942400.0);
    }

    #[test]
    fn buckets_align_to_the_epoch_and_skip_empty_ones() {
        let points: Vec<(f64, Value)> = [(59.0, 1.0), (60.0, 2.0), (61.0, 4.0), (185.0, 8.0)]
            .into_iter()
            .map(|(t, v)| (t, Value::Number(v)))
            .collect();
        let avg = aggregate(&points, 60.0, Aggregate::Avg);
        assert_eq!(
            avg,
            vec![
                (0.0, Value::Number(1.0)),
                (60.0, Value::Number(3.0)),
                (180.0, Value::Number(8.0))
            ]
        );
        assert_eq!(
            aggregate(&points, 60.0, Aggregate::Count)[1].1,
            Value::Number(2.0)
        );
        assert_eq!(
            aggregate(&points, 60.0, Aggregate::Max)[1].1,
            Value::Number(4.0)
        );
        assert_eq!(
            aggregate(&points, 60.0, Aggregate::Min)[1].1,
            Value::Number(2.0)
        );
        assert_eq!(
            aggregate(&points, 60.0, Aggregate::Sum)[1].1,
            Value::Number(6.0)
        );
        assert_eq!(
            aggregate(&points, 60.0, Aggregate::Last)[2].1,
            Value::Number(8.0)
        );
    }

    #[test]
    fn data_values_are_base64url() {
        assert_eq!(base64url(b"hello"), "aGVsbG8");
        assert_eq!(base64url(&[0xfb, 0xff]), "-_8");
        assert_eq!(base64url(b""), "");
    }
}
