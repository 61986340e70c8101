//! Cluster-wide reads: ask several `sluiced` nodes the same query on their side HTTP ports and
//! merge the answers as if one node held every reading. Used by `sluice query --nodes` and by
//! the `/v1/cluster/...` endpoints of `sluiced --peers`; the rules are in `docs/cluster.md`.
//!
//! Only the nodes' local endpoints (`/v1/devices`, `/v1/latest`, `/v1/devices/{d}/latest`,
//! `/v1/series`) are asked, never their cluster endpoints, so a cluster read fans out exactly
//! once, whatever the nodes' own `--peers` say.
//!
//! - devices: the union; a device on several nodes gets the sum of its points and the greatest
//!   last-seen time.
//! - latest values: per series, the point with the greatest time.
//! - series: raw points merged in time order; buckets re-aggregated from the nodes' buckets
//!   (`min` of mins, `max` of maxes, `sum` of sums, `count` of counts, `avg` from sums and counts
//!   of numbers), `last` from the nodes' raw points.
//!
//! A node that cannot be reached, times out or answers 5xx is left out and named: the answer is
//! then marked `"partial": true` with `"missing": [...]`.

use std::collections::BTreeMap;
use std::io::Read as _;
use std::time::{Duration, SystemTime};

use serde_json::{json, Map, Value as Json};

/// Nodes one cluster read may ask: each is one thread and one connection per read.
pub const NODES_MAX: usize = 64;
/// How long a node may take to answer, by default (connecting, sending and reading the body).
pub const NODE_TIMEOUT_DEFAULT: Duration = Duration::from_secs(5);
/// Largest answer read from one node (a device listing of a large fleet is tens of MiB).
pub const NODE_ANSWER_BYTES_MAX: u64 = 256 << 20;
/// Points (or buckets) per name asked of one node for a series read: the node's largest page
/// (`PAGE_LIMIT_MAX` of its API). A node holding more in the range makes the read fail with a
/// request to narrow it, rather than holding an unbounded answer in memory.
pub const NODE_POINTS_MAX: usize = 100_000;

/// Why a cluster read has no answer.
#[derive(Debug, Clone, PartialEq)]
pub enum Failure {
    /// The query is bad (a node said so, or it asks for what cluster reads do not do): 400.
    BadRequest(String),
    /// No node that answered knows the device or series: 404. Nodes that did not answer are
    /// listed; the data may be on one of them.
    NotFound {
        message: String,
        missing: Vec<String>,
    },
    /// No node answered: 502, with each node's reason.
    Unavailable(Vec<(String, String)>),
}

impl Failure {
    /// The HTTP status of this failure.
    pub fn status(&self) -> u16 {
        match self {
            Failure::BadRequest(_) => 400,
            Failure::NotFound { .. } => 404,
            Failure::Unavailable(_) => 502,
        }
    }

    pub fn message(&self) -> String {
        match self {
            Failure::BadRequest(message) | Failure::NotFound { message, .. } => message.clone(),
            Failure::Unavailable(reasons) => {
                let reasons: Vec<String> = reasons
                    .iter()
                    .map(|(node, reason)| format!("{node}: {reason}"))
                    .collect();
                format!("no node answered ({})", reasons.join("; "))
            }
        }
    }

    /// The nodes that did not answer.
    pub fn missing(&self) -> Vec<String> {
        match self {
            Failure::BadRequest(_) => vec![],
            Failure::NotFound { missing, .. } => missing.clone(),
            Failure::Unavailable(reasons) => reasons.iter().map(|(n, _)| n.clone()).collect(),
        }
    }

    /// `{"error": ..., "partial": ..., "missing": [...]}`.
    pub fn body(&self) -> Json {
        let missing = self.missing();
        json!({ "error": self.message(), "partial": !missing.is_empty(), "missing": missing })
    }
}

/// A merged answer: `body` carries `"partial"` and `"missing"`; `reasons` says why each missing
/// node is missing (for logs and warnings).
#[derive(Debug, Clone)]
pub struct Merged {
    pub body: Json,
    pub reasons: Vec<(String, String)>,
}

impl Merged {
    pub fn missing(&self) -> Vec<String> {
        self.reasons.iter().map(|(n, _)| n.clone()).collect()
    }

    pub fn partial(&self) -> bool {
        !self.reasons.is_empty()
    }
}

/// What one node said.
enum Reply {
    Json(Json),
    /// An answer with this status and error text (4xx).
    Refused(u16, String),
    /// No usable answer: the node is left out of the merge.
    Down(String),
}

/// The nodes of a cluster and how long each may take.
pub struct Cluster {
    nodes: Vec<String>,
    agent: ureq::Agent,
}

/// `host:port` or `http://host:port` (a path is not allowed): the base URL of a node's side port.
pub fn parse_node(text: &str) -> Result<String, String> {
    let text = text.trim();
    let rest = match text.split_once("://") {
        Some(("http", rest)) => rest,
        Some((scheme, _)) => {
            return Err(format!(
                "`{text}`: only http:// is supported (the side port has no TLS), not {scheme}://"
            ))
        }
        None => text,
    };
    let rest = rest.trim_end_matches('/');
    let valid = !rest.is_empty()
        && !rest.contains(['/', '?', '#', '@', ' '])
        && rest.rsplit_once(':').is_some_and(|(host, port)| {
            !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0)
        });
    if valid {
        Ok(format!("http://{rest}"))
    } else {
        Err(format!(
            "`{text}` is not a node address such as http://10.0.0.11:8683 or 10.0.0.11:8683"
        ))
    }
}

impl Cluster {
    /// Nodes as `host:port` or `http://host:port`, each at most once.
    pub fn new(nodes: &[String], timeout: Duration) -> Result<Cluster, String> {
        let mut parsed: Vec<String> = Vec::with_capacity(nodes.len());
        for node in nodes {
            let node = parse_node(node)?;
            if parsed.contains(&node) {
                return Err(format!("`{node}` is listed twice"));
            }
            parsed.push(node);
        }
        if parsed.is_empty() {
            return Err("no node given".to_string());
        }
        if parsed.len() > NODES_MAX {
            return Err(format!("at most {NODES_MAX} nodes"));
        }
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(timeout)
            .timeout(timeout)
            .build();
        Ok(Cluster {
            nodes: parsed,
            agent,
        })
    }

    pub fn nodes(&self) -> &[String] {
        &self.nodes
    }

    /// GET `path` with `query` from every node at once.
    fn ask(&self, path: &str, query: &[(String, String)]) -> Vec<Reply> {
        std::thread::scope(|scope| {
            let handles: Vec<_> = self
                .nodes
                .iter()
                .map(|node| scope.spawn(move || self.ask_one(node, path, query)))
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Reply::Down("the request panicked".into()))
                })
                .collect()
        })
    }

    fn ask_one(&self, node: &str, path: &str, query: &[(String, String)]) -> Reply {
        let mut request = self.agent.get(&format!("{node}{path}"));
        for (key, value) in query {
            request = request.query(key, value);
        }
        let read = |response: ureq::Response| -> Result<Json, String> {
            let mut body = Vec::new();
            response
                .into_reader()
                .take(NODE_ANSWER_BYTES_MAX + 1)
                .read_to_end(&mut body)
                .map_err(|e| format!("reading the answer: {e}"))?;
            if body.len() as u64 > NODE_ANSWER_BYTES_MAX {
                return Err(format!(
                    "the answer is larger than {NODE_ANSWER_BYTES_MAX} bytes"
                ));
            }
            serde_json::from_slice(&body).map_err(|e| format!("the answer is not JSON: {e}"))
        };
        match request.call() {
            Ok(response) => match read(response) {
                Ok(json) => Reply::Json(json),
                Err(reason) => Reply::Down(reason),
            },
            Err(ureq::Error::Status(status, response)) if (400..500).contains(&status) => {
                let message = read(response)
                    .ok()
                    .and_then(|j| j["error"].as_str().map(str::to_string))
                    .unwrap_or_else(|| format!("status {status}"));
                Reply::Refused(status, message)
            }
            Err(ureq::Error::Status(status, response)) => {
                let message = read(response)
                    .ok()
                    .and_then(|j| j["error"].as_str().map(str::to_string))
                    .unwrap_or_default();
                Reply::Down(format!("status {status} {message}").trim_end().to_string())
            }
            Err(error) => Reply::Down(error.to_string()),
        }
    }

    /// Sorts replies into answers (node order kept) and missing nodes; a 400 from any node is
    /// the answer; 404s count as "no data here".
    fn gather(&self, replies: Vec<Reply>) -> Result<Gathered, Failure> {
        let mut gathered = Gathered::default();
        for (node, reply) in self.nodes.iter().zip(replies) {
            match reply {
                Reply::Json(json) => gathered.answers.push(json),
                Reply::Refused(404, message) => gathered.not_found = Some(message),
                Reply::Refused(_, message) => return Err(Failure::BadRequest(message)),
                Reply::Down(reason) => gathered.reasons.push((node.clone(), reason)),
            }
        }
        if gathered.answers.is_empty() {
            if let Some(message) = gathered.not_found.take() {
                let missing = gathered.reasons.iter().map(|(n, _)| n.clone()).collect();
                return Err(Failure::NotFound { message, missing });
            }
            if !gathered.reasons.is_empty() {
                return Err(Failure::Unavailable(gathered.reasons));
            }
        }
        Ok(gathered)
    }

    /// `GET /v1/devices` of every node, merged. `query`: `prefix`, `limit`, `cursor`.
    pub fn devices(&self, query: &[(String, String)]) -> Result<Merged, Failure> {
        self.listing("/v1/devices", query, merge_device_entries)
    }

    /// `GET /v1/latest` of every node, merged. `query`: `prefix`, `limit`, `cursor`.
    pub fn latest(&self, query: &[(String, String)]) -> Result<Merged, Failure> {
        self.listing("/v1/latest", query, merge_latest_entries)
    }

    fn listing(
        &self,
        path: &str,
        query: &[(String, String)],
        merge: fn(&[Json]) -> Vec<Json>,
    ) -> Result<Merged, Failure> {
        let limit = match query.iter().find(|(k, _)| k == "limit") {
            None => None,
            Some((_, text)) => Some(text.parse::<usize>().map_err(|_| {
                Failure::BadRequest(format!("`limit`: `{text}` is not a whole number"))
            })?),
        };
        let gathered = self.gather(self.ask(path, query))?;
        let more_on_a_node = gathered.answers.iter().any(|a| a.get("next").is_some());
        let mut entries = merge(&gathered.answers);
        let mut body = Map::new();
        if let Some(limit) = limit {
            // Every node answered its first `limit` entries after the cursor; the first `limit`
            // of their union are the cluster's first `limit`.
            if entries.len() > limit || more_on_a_node {
                entries.truncate(limit);
                if let Some(last) = entries.last() {
                    body.insert("next".into(), last["device"].clone());
                }
            }
        }
        body.insert("devices".into(), Json::Array(entries));
        Ok(gathered.finish(body))
    }

    /// `GET /v1/devices/{device}/latest` of every node, merged.
    pub fn device_latest(&self, device: &str) -> Result<Merged, Failure> {
        let path = format!("/v1/devices/{}/latest", encode_segment(device));
        let gathered = self.gather(self.ask(&path, &[]))?;
        let mut series = Map::new();
        for answer in &gathered.answers {
            merge_latest_series(&mut series, &answer["series"]);
        }
        let mut body = Map::new();
        body.insert("device".into(), json!(device));
        body.insert("series".into(), Json::Object(series));
        Ok(gathered.finish(body))
    }

    /// `GET /v1/series` over the cluster. `query` as for a node's `/v1/series`, in JSON only and
    /// without paging (`limit`, `cursor`).
    pub fn series(&self, query: &[(String, String)]) -> Result<Merged, Failure> {
        let series = SeriesQuery::parse(query)?;
        let mut forwarded: Vec<(String, String)> = query
            .iter()
            .filter(|(k, _)| !matches!(k.as_str(), "from" | "to" | "format"))
            .cloned()
            .collect();
        for (key, value) in [("from", series.from), ("to", series.to)] {
            if let Some(value) = value {
                forwarded.push((key.into(), value.to_string()));
            }
        }
        forwarded.push(("limit".into(), NODE_POINTS_MAX.to_string()));
        let with = |agg: Option<&str>, above: Option<String>| {
            let mut q: Vec<(String, String)> = forwarded
                .iter()
                .filter(|(k, _)| !matches!(k.as_str(), "step" | "agg" | "above"))
                .cloned()
                .collect();
            if let Some(agg) = agg {
                q.push((
                    "step".into(),
                    series.step.expect("agg with step").to_string(),
                ));
                q.push(("agg".into(), agg.into()));
            }
            if let Some(above) = above.or_else(|| series.above.clone()) {
                q.push(("above".into(), above));
            }
            q
        };
        let mut body = Map::new();
        body.insert("device".into(), json!(series.device));
        let (names, gathered) = match series.agg.as_deref() {
            None | Some("last") => {
                let gathered = self.gather(self.ask("/v1/series", &with(None, None)))?;
                let mut names = points_by_name(&series.names, &gathered.answers)?;
                if let Some(step) = series.step {
                    for points in names.values_mut() {
                        *points = last_per_bucket(std::mem::take(points), step);
                    }
                }
                (names, gathered)
            }
            Some(agg @ ("min" | "max" | "sum" | "count")) => {
                let gathered = self.gather(self.ask("/v1/series", &with(Some(agg), None)))?;
                let names = points_by_name(&series.names, &gathered.answers)?
                    .into_iter()
                    .map(|(name, points)| (name, combine_buckets(points, agg)))
                    .collect();
                (names, gathered)
            }
            Some("avg") => {
                // The average of the union is the sum of the sums over the sum of the counts of
                // numbers. `count` counts values of every type; with `above` it counts only the
                // numbers above it, so the lowest finite number stands in for "any number".
                let numbers_only = series.above.clone().or(Some(f64::MIN.to_string()));
                let query_sum = with(Some("sum"), None);
                let query_count = with(Some("count"), numbers_only);
                let (sums, counts) = std::thread::scope(|scope| {
                    let sums = scope.spawn(|| self.ask("/v1/series", &query_sum));
                    let counts = self.ask("/v1/series", &query_count);
                    (sums.join().unwrap_or_default(), counts)
                });
                let sums = self.gather(sums)?;
                let counts = self.gather(counts)?;
                let sum_points = points_by_name(&series.names, &sums.answers)?;
                let count_points = points_by_name(&series.names, &counts.answers)?;
                let mut names = BTreeMap::new();
                for name in &series.names {
                    let sums = combine_buckets(sum_points[name].clone(), "sum");
                    let counts = combine_buckets(count_points[name].clone(), "count");
                    names.insert(name.clone(), average(&sums, &counts));
                }
                // A node missing from either half is missing from the answer.
                let mut gathered = sums;
                for reason in counts.reasons {
                    if !gathered.reasons.iter().any(|(n, _)| *n == reason.0) {
                        gathered.reasons.push(reason);
                    }
                }
                (names, gathered)
            }
            Some(other) => {
                return Err(Failure::BadRequest(format!(
                    "`agg`: `{other}` is not one of avg, min, max, sum, count, last"
                )))
            }
        };
        if let (Some(step), Some(agg)) = (series.step, &series.agg) {
            body.insert("step".into(), json!(step));
            body.insert("agg".into(), json!(agg));
        }
        let points_json = |points: &[(f64, Json)]| -> Json {
            Json::Array(points.iter().map(|(t, v)| json!([t, v])).collect())
        };
        if series.names.len() == 1 {
            body.insert("name".into(), json!(series.names[0]));
            body.insert("points".into(), points_json(&names[&series.names[0]]));
        } else {
            let list: Vec<Json> = series
                .names
                .iter()
                .map(|name| json!({ "name": name, "points": points_json(&names[name]) }))
                .collect();
            body.insert("series".into(), Json::Array(list));
        }
        Ok(gathered.finish(body))
    }
}

#[derive(Default)]
struct Gathered {
    answers: Vec<Json>,
    reasons: Vec<(String, String)>,
    not_found: Option<String>,
}

impl Gathered {
    fn finish(self, mut body: Map<String, Json>) -> Merged {
        let missing: Vec<Json> = self.reasons.iter().map(|(n, _)| json!(n)).collect();
        body.insert("partial".into(), json!(!missing.is_empty()));
        body.insert("missing".into(), Json::Array(missing));
        Merged {
            body: Json::Object(body),
            reasons: self.reasons,
        }
    }
}

/// The parts of a series query the merge needs; the nodes check the rest.
struct SeriesQuery {
    device: String,
    names: Vec<String>,
    /// `from` and `to` as given, or resolved to unix seconds when relative to `now` (so every
    /// node answers for the same range).
    from: Option<String>,
    to: Option<String>,
    step: Option<f64>,
    agg: Option<String>,
    above: Option<String>,
}

impl SeriesQuery {
    fn parse(query: &[(String, String)]) -> Result<SeriesQuery, Failure> {
        let bad = |m: String| Failure::BadRequest(m);
        let get = |key: &str| query.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone());
        for (key, _) in query {
            if matches!(key.as_str(), "limit" | "cursor") {
                return Err(bad(format!(
                    "`{key}`: cluster reads are not paged; narrow `from` and `to` instead"
                )));
            }
        }
        if let Some(format) = get("format") {
            if format != "json" {
                return Err(bad(format!(
                    "`format`: cluster reads answer JSON only, not `{format}`"
                )));
            }
        }
        let device = get("device").unwrap_or_default();
        let names: Vec<String> = query
            .iter()
            .filter(|(k, _)| k == "name")
            .map(|(_, v)| v.clone())
            .collect();
        if device.is_empty() {
            return Err(bad("`device` is required".into()));
        }
        if names.is_empty() || names.iter().any(String::is_empty) {
            return Err(bad(
                "`name` is required (repeat it for several series)".into()
            ));
        }
        let step = match get("step") {
            None => None,
            Some(text) => Some(parse_step(&text).ok_or_else(|| {
                bad(format!(
                    "`step`: `{text}` is not a positive number of seconds or a duration like 5m"
                ))
            })?),
        };
        let agg = get("agg");
        match (&step, &agg) {
            (Some(_), None) => return Err(bad("`step` needs `agg`".into())),
            (None, Some(_)) => return Err(bad("`agg` needs `step`".into())),
            _ => {}
        }
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        let resolve = |key: &str| -> Result<Option<String>, Failure> {
            let Some(text) = get(key) else {
                return Ok(None);
            };
            match resolve_now(&text, now) {
                Some(Ok(seconds)) => Ok(Some(seconds.to_string())),
                Some(Err(())) => Err(bad(format!(
                    "`{key}`: `{text}` is not unix seconds, an RFC 3339 time or now-DURATION"
                ))),
                None => Ok(Some(text)),
            }
        };
        Ok(SeriesQuery {
            device,
            names,
            from: resolve("from")?,
            to: resolve("to")?,
            step,
            agg,
            above: get("above"),
        })
    }
}

/// Seconds (`90`, `0.5`) or a duration with units (`5m`, `1h30m`), as the nodes read `step`.
fn parse_step(text: &str) -> Option<f64> {
    let seconds = match text.parse::<f64>() {
        Ok(s) => s,
        Err(_) => humantime::parse_duration(text).ok()?.as_secs_f64(),
    };
    (seconds.is_finite() && seconds > 0.0).then_some(seconds)
}

/// `now` or `now-DURATION` as unix seconds; None for any other text (left to the nodes).
fn resolve_now(text: &str, now: f64) -> Option<Result<f64, ()>> {
    let rest = text.strip_prefix("now")?;
    if rest.is_empty() {
        return Some(Ok(now));
    }
    let ago = rest
        .strip_prefix('-')
        .and_then(|d| match d.parse::<f64>() {
            Ok(s) => Some(s),
            Err(_) => humantime::parse_duration(d).ok().map(|d| d.as_secs_f64()),
        })
        .filter(|s| s.is_finite() && *s > 0.0);
    Some(ago.map(|ago| now - ago).ok_or(()))
}

/// Percent-encodes a path segment.
pub fn encode_segment(segment: &str) -> String {
    segment
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b':' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Merging

/// Device listings: the union sorted by device; points summed, last_seen the greatest.
pub fn merge_device_entries(answers: &[Json]) -> Vec<Json> {
    let mut devices: BTreeMap<String, (f64, u64)> = BTreeMap::new();
    for answer in answers {
        for entry in answer["devices"].as_array().into_iter().flatten() {
            let Some(device) = entry["device"].as_str() else {
                continue;
            };
            let last_seen = entry["last_seen"].as_f64().unwrap_or(f64::NEG_INFINITY);
            let points = entry["points"].as_u64().unwrap_or(0);
            let merged = devices
                .entry(device.to_string())
                .or_insert((f64::NEG_INFINITY, 0));
            merged.0 = merged.0.max(last_seen);
            merged.1 += points;
        }
    }
    devices
        .into_iter()
        .map(|(device, (last_seen, points))| {
            json!({ "device": device, "last_seen": last_seen, "points": points })
        })
        .collect()
}

/// Latest listings: the union of devices, each with the newest point of each of its series.
pub fn merge_latest_entries(answers: &[Json]) -> Vec<Json> {
    let mut devices: BTreeMap<String, Map<String, Json>> = BTreeMap::new();
    for answer in answers {
        for entry in answer["devices"].as_array().into_iter().flatten() {
            let Some(device) = entry["device"].as_str() else {
                continue;
            };
            merge_latest_series(
                devices.entry(device.to_string()).or_default(),
                &entry["series"],
            );
        }
    }
    devices
        .into_iter()
        .map(|(device, series)| json!({ "device": device, "series": series }))
        .collect()
}

/// Adds `series` (`{"name": [time, value]}`) to `into`, keeping the point with the greater time
/// (on equal times, the one already there: the earlier node in the list).
pub fn merge_latest_series(into: &mut Map<String, Json>, series: &Json) {
    for (name, point) in series.as_object().into_iter().flatten() {
        let time = point[0].as_f64().unwrap_or(f64::NEG_INFINITY);
        let newer = into
            .get(name)
            .is_none_or(|kept| time > kept[0].as_f64().unwrap_or(f64::NEG_INFINITY));
        if newer {
            into.insert(name.clone(), point.clone());
        }
    }
}

/// The points of each asked name, from every answer, merged in time order (a stable merge:
/// equal times keep node order). Fails when a node held more than it was asked for.
fn points_by_name(
    names: &[String],
    answers: &[Json],
) -> Result<BTreeMap<String, Vec<(f64, Json)>>, Failure> {
    let mut merged: BTreeMap<String, Vec<(f64, Json)>> =
        names.iter().map(|n| (n.clone(), Vec::new())).collect();
    for answer in answers {
        if answer.get("next").is_some() {
            return Err(Failure::BadRequest(format!(
                "a node holds more than {NODE_POINTS_MAX} points (or buckets) of this series in \
                 the range: narrow `from` and `to`, or use a larger `step`"
            )));
        }
        let lists: Vec<(&str, &Json)> = match answer.get("series") {
            Some(list) => list
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|s| Some((s["name"].as_str()?, &s["points"])))
                .collect(),
            None => answer["name"]
                .as_str()
                .map(|name| vec![(name, &answer["points"])])
                .unwrap_or_default(),
        };
        for (name, points) in lists {
            let Some(into) = merged.get_mut(name) else {
                continue;
            };
            let incoming: Vec<(f64, Json)> = points
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|p| Some((p[0].as_f64()?, p[1].clone())))
                .collect();
            *into = merge_sorted(std::mem::take(into), incoming);
        }
    }
    Ok(merged)
}

/// Two time-ordered point lists as one; on equal times `first`'s points come first.
pub fn merge_sorted(first: Vec<(f64, Json)>, second: Vec<(f64, Json)>) -> Vec<(f64, Json)> {
    let mut out = Vec::with_capacity(first.len() + second.len());
    let mut second = second.into_iter().peekable();
    for point in first {
        while let Some(next) = second.next_if(|s| s.0 < point.0) {
            out.push(next);
        }
        out.push(point);
    }
    out.extend(second);
    out
}

/// Time-ordered buckets of several nodes (equal starts adjacent) combined into one per start.
pub fn combine_buckets(points: Vec<(f64, Json)>, agg: &str) -> Vec<(f64, Json)> {
    let mut out: Vec<(f64, Json)> = Vec::with_capacity(points.len());
    for (start, value) in points {
        let Some(number) = value.as_f64() else {
            continue;
        };
        match out.last_mut() {
            Some((last_start, last)) if *last_start == start => {
                let kept = last.as_f64().unwrap_or(number);
                let combined = match agg {
                    "min" => kept.min(number),
                    "max" => kept.max(number),
                    _ => kept + number,
                };
                *last = json!(combined);
            }
            _ => out.push((start, json!(number))),
        }
    }
    out
}

/// Per bucket start, the sum over the count, where the count is positive.
fn average(sums: &[(f64, Json)], counts: &[(f64, Json)]) -> Vec<(f64, Json)> {
    let counts: BTreeMap<u64, f64> = counts
        .iter()
        .filter_map(|(start, count)| Some((start.to_bits(), count.as_f64()?)))
        .collect();
    sums.iter()
        .filter_map(|(start, sum)| {
            let count = *counts.get(&start.to_bits())?;
            let sum = sum.as_f64()?;
            (count > 0.0).then(|| (*start, json!(sum / count)))
        })
        .collect()
}

/// Raw time-ordered points as `last` buckets of `step` seconds: each bucket's start and the value
/// of its latest point (on equal times the one merged last), as a node computes them.
pub fn last_per_bucket(points: Vec<(f64, Json)>, step: f64) -> Vec<(f64, Json)> {
    let mut out: Vec<(f64, Json)> = Vec::new();
    for (time, value) in points {
        let start = (time / step).floor() * step;
        match out.last_mut() {
            Some((last_start, last)) if *last_start == start => *last = value,
            _ => out.push((start, value)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn points(list: &[(f64, f64)]) -> Vec<(f64, Json)> {
        list.iter().map(|(t, v)| (*t, json!(v))).collect()
    }

    #[test]
    fn nodes_are_http_host_and_port() {
        assert_eq!(parse_node("10.0.0.1:8683").unwrap(), "http://10.0.0.1:8683");
        assert_eq!(
            parse_node("http://node-1.sluice:8683/").unwrap(),
            "http://node-1.sluice:8683"
        );
        assert_eq!(parse_node("[::1]:8683").unwrap(), "http://[::1]:8683");
        assert!(parse_node("https://a:1").unwrap_err().contains("http://"));
        assert!(parse_node("a").is_err());
        assert!(parse_node("a:0").is_err());
        assert!(parse_node("http://a:1/v1").is_err());
        assert!(Cluster::new(&["a:1".into(), "http://a:1".into()], NODE_TIMEOUT_DEFAULT).is_err());
    }

    #[test]
    fn devices_are_a_union_with_summed_points_and_latest_last_seen() {
        let a = json!({"devices":[{"device":"d1","last_seen":10.0,"points":3},{"device":"d2","last_seen":5.0,"points":1}]});
        let b = json!({"devices":[{"device":"d1","last_seen":12.5,"points":4},{"device":"d0","last_seen":1.0,"points":2}]});
        let merged = merge_device_entries(&[a, b]);
        assert_eq!(
            Json::Array(merged),
            json!([
                {"device":"d0","last_seen":1.0,"points":2},
                {"device":"d1","last_seen":12.5,"points":7},
                {"device":"d2","last_seen":5.0,"points":1}
            ])
        );
    }

    #[test]
    fn latest_keeps_the_newest_point_of_each_series() {
        let mut into = Map::new();
        merge_latest_series(&mut into, &json!({"t":[10.0, 1.0], "h":[5.0, "x"]}));
        merge_latest_series(
            &mut into,
            &json!({"t":[9.0, 2.0], "h":[6.0, true], "p":[1.0, 3.0]}),
        );
        assert_eq!(
            Json::Object(into),
            json!({"t":[10.0,1.0],"h":[6.0,true],"p":[1.0,3.0]})
        );
    }

    #[test]
    fn raw_points_merge_in_time_order_and_keep_node_order_on_ties() {
        let a = points(&[(1.0, 1.0), (3.0, 3.0), (3.0, 30.0)]);
        let b = points(&[(0.0, 0.0), (3.0, 300.0), (4.0, 4.0)]);
        let merged: Vec<f64> = merge_sorted(a, b)
            .iter()
            .map(|(_, v)| v.as_f64().unwrap())
            .collect();
        assert_eq!(merged, [0.0, 1.0, 3.0, 30.0, 300.0, 4.0]);
    }

    #[test]
    fn buckets_combine_per_aggregate_and_avg_weights_by_count() {
        // Node A: bucket 0 holds 1, 2, 3; node B: bucket 0 holds 10; bucket 60 only on B.
        let merged = merge_sorted(points(&[(0.0, 6.0)]), points(&[(0.0, 10.0), (60.0, 5.0)]));
        let sums = combine_buckets(merged, "sum");
        assert_eq!(sums, points(&[(0.0, 16.0), (60.0, 5.0)]));
        let counts = combine_buckets(
            merge_sorted(points(&[(0.0, 3.0)]), points(&[(0.0, 1.0), (60.0, 1.0)])),
            "count",
        );
        // The mean of 1, 2, 3, 10 is 4, not the mean of the nodes' means (2 and 10).
        assert_eq!(average(&sums, &counts), points(&[(0.0, 4.0), (60.0, 5.0)]));
        let mins = combine_buckets(
            merge_sorted(points(&[(0.0, 1.0)]), points(&[(0.0, -2.0)])),
            "min",
        );
        assert_eq!(mins, points(&[(0.0, -2.0)]));
        let maxes = combine_buckets(
            merge_sorted(points(&[(0.0, 1.0)]), points(&[(0.0, -2.0)])),
            "max",
        );
        assert_eq!(maxes, points(&[(0.0, 1.0)]));
    }

    #[test]
    fn last_takes_the_latest_point_of_each_bucket() {
        let raw = vec![
            (1.0, json!("a")),
            (59.0, json!(2.0)),
            (60.0, json!(true)),
            (61.0, json!("late")),
        ];
        assert_eq!(
            last_per_bucket(raw, 60.0),
            vec![(0.0, json!(2.0)), (60.0, json!("late"))]
        );
    }

    #[test]
    fn relative_times_resolve_once_for_every_node() {
        assert_eq!(resolve_now("now", 100.0), Some(Ok(100.0)));
        assert_eq!(resolve_now("now-1m", 100.0), Some(Ok(40.0)));
        assert_eq!(resolve_now("now-soon", 100.0), Some(Err(())));
        assert_eq!(resolve_now("1795478400", 100.0), None);
        assert_eq!(parse_step("5m"), Some(300.0));
        assert_eq!(parse_step("-1"), None);
    }

    #[test]
    fn series_queries_refuse_paging_and_other_formats() {
        let query = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let err = |pairs: &[(&str, &str)]| match SeriesQuery::parse(&query(pairs)) {
            Err(Failure::BadRequest(message)) => message,
            _ => panic!("{pairs:?} should be refused"),
        };
        assert!(err(&[("device", "d"), ("name", "t"), ("limit", "5")]).contains("`limit`"));
        assert!(err(&[("device", "d"), ("name", "t"), ("format", "csv")]).contains("`format`"));
        assert!(err(&[("name", "t")]).contains("`device`"));
        assert!(err(&[("device", "d")]).contains("`name`"));
        assert!(err(&[("device", "d"), ("name", "t"), ("step", "60")]).contains("`agg`"));
        assert!(err(&[("device", "d"), ("name", "t"), ("from", "now-x")]).contains("`from`"));
    }
}
