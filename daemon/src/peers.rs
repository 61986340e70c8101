//! Cluster reads on the side port (`--peers`): `/v1/cluster/devices`, `/v1/cluster/latest`,
//! `/v1/cluster/devices/{device}/latest` and `/v1/cluster/series` ask every node of `--peers`
//! (this one included, if listed) the matching local query and merge the answers with
//! `sluice_cluster`, the same code as `sluice query --nodes`. Documented in `docs/cluster.md`
//! and `docs/http-api.md`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use sluice_cluster::{Cluster, Failure, Merged};
use tokio::sync::Semaphore;

use crate::metrics::{Family, Kind};

/// Cluster reads in flight at once; more wait. Each one holds a blocking thread plus one thread
/// and one connection per peer, so this bounds both.
const CLUSTER_READS_IN_FLIGHT_MAX: usize = 4;
/// Header naming the peers that did not answer (comma-separated), on every cluster answer.
pub const MISSING_HEADER: &str = "sluice-missing-nodes";
/// Header saying whether the answer lacks a peer's part: `true` or `false`.
pub const PARTIAL_HEADER: &str = "sluice-partial";

pub struct Peers {
    cluster: Cluster,
    in_flight: Semaphore,
}

impl Peers {
    pub fn new(cluster: Cluster) -> Peers {
        let mut failures = PEER_FAILURES.lock().unwrap_or_else(|e| e.into_inner());
        for node in cluster.nodes() {
            failures.entry(node.clone()).or_insert(0);
        }
        drop(failures);
        Peers {
            cluster,
            in_flight: Semaphore::new(CLUSTER_READS_IN_FLIGHT_MAX),
        }
    }
}

/// Cluster reads since start by outcome: every node answered, some did, none did. One side port
/// per process, so process-wide counters.
static READS: [AtomicU64; 3] = [AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)];
const OUTCOMES: [&str; 3] = ["complete", "partial", "unavailable"];
/// Times each peer was left out of a cluster read (keyed by the `--peers` entries only, so at
/// most `sluice_cluster::NODES_MAX` of them).
static PEER_FAILURES: Mutex<BTreeMap<String, u64>> = Mutex::new(BTreeMap::new());

fn count(missing: &[(String, String)], answered: bool) {
    let outcome = match (missing.is_empty(), answered) {
        (true, _) => 0,
        (false, true) => 1,
        (false, false) => 2,
    };
    READS[outcome].fetch_add(1, Ordering::Relaxed);
    let mut failures = PEER_FAILURES.lock().unwrap_or_else(|e| e.into_inner());
    for (node, reason) in missing {
        tracing::warn!(peer = %node, reason = %reason, "cluster read: peer left out");
        if let Some(count) = failures.get_mut(node) {
            *count += 1;
        }
    }
}

/// The cluster-read families of `/metrics` (zero without `--peers`).
pub fn families() -> Vec<Family> {
    let reads = OUTCOMES
        .iter()
        .zip(&READS)
        .map(|(outcome, n)| {
            (
                vec![("result", outcome.to_string())],
                n.load(Ordering::Relaxed),
            )
        })
        .collect();
    let failures = PEER_FAILURES
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .map(|(node, n)| (vec![("peer", node.clone())], *n))
        .collect();
    vec![
        Family {
            name: "sluice_cluster_reads_total",
            help: "Cluster reads (/v1/cluster/...) by result: every peer answered, some did (partial), none did.",
            kind: Kind::Counter(reads),
        },
        Family {
            name: "sluice_cluster_peer_failures_total",
            help: "Times a peer of --peers was left out of a cluster read (unreachable, too slow, 5xx).",
            kind: Kind::Counter(failures),
        },
    ]
}

type Shared = Option<Arc<Peers>>;

/// The `/v1/cluster/...` routes; without `--peers` they answer 404 saying so.
pub fn router<S>(peers: Shared) -> Router<S> {
    Router::new()
        .route("/v1/cluster/devices", get(devices))
        .route("/v1/cluster/latest", get(latest))
        .route("/v1/cluster/devices/{device}/latest", get(device_latest))
        .route("/v1/cluster/series", get(series))
        .with_state(peers)
}

enum Read {
    Devices(Vec<(String, String)>),
    Latest(Vec<(String, String)>),
    DeviceLatest(String),
    Series(Vec<(String, String)>),
}

async fn answer(peers: Shared, read: Read) -> Response {
    let Some(peers) = peers else {
        return crate::http::error(
            StatusCode::NOT_FOUND,
            "cluster reads are off: start sluiced with --peers".to_string(),
        );
    };
    let Ok(_permit) = peers.in_flight.acquire().await else {
        return crate::http::error(StatusCode::SERVICE_UNAVAILABLE, "shutting down".into());
    };
    let worker = peers.clone();
    let result = tokio::task::spawn_blocking(move || match read {
        Read::Devices(query) => worker.cluster.devices(&query),
        Read::Latest(query) => worker.cluster.latest(&query),
        Read::DeviceLatest(device) => worker.cluster.device_latest(&device),
        Read::Series(query) => worker.cluster.series(&query),
    })
    .await;
    match result {
        Ok(Ok(merged)) => merged_response(merged),
        Ok(Err(failure)) => failure_response(&failure),
        Err(e) => crate::http::error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cluster read failed: {e}"),
        ),
    }
}

fn marker_headers(missing: &[String]) -> [(&'static str, HeaderValue); 2] {
    let names = HeaderValue::from_str(&missing.join(", "))
        .unwrap_or_else(|_| HeaderValue::from_static("?"));
    let partial = HeaderValue::from_static(if missing.is_empty() { "false" } else { "true" });
    [(PARTIAL_HEADER, partial), (MISSING_HEADER, names)]
}

fn merged_response(merged: Merged) -> Response {
    count(&merged.reasons, true);
    (
        StatusCode::OK,
        [(header::CACHE_CONTROL, "no-store")],
        marker_headers(&merged.missing()),
        axum::Json(merged.body),
    )
        .into_response()
}

fn failure_response(failure: &Failure) -> Response {
    match failure {
        Failure::Unavailable(reasons) => count(reasons, false),
        // No node knows it, or the query is bad: answered, with any missing peer named.
        Failure::NotFound { missing, .. } => {
            let missing: Vec<(String, String)> = missing
                .iter()
                .map(|n| (n.clone(), "did not answer".to_string()))
                .collect();
            count(&missing, true)
        }
        Failure::BadRequest(_) => count(&[], true),
    }
    let status = StatusCode::from_u16(failure.status()).unwrap_or(StatusCode::BAD_GATEWAY);
    (
        status,
        [(header::CACHE_CONTROL, "no-store")],
        marker_headers(&failure.missing()),
        axum::Json(failure.body()),
    )
        .into_response()
}

/// A read with query parameters; a query string that cannot be decoded is a 400.
async fn with_query(
    peers: Shared,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
    read: fn(Vec<(String, String)>) -> Read,
) -> Response {
    match query {
        Ok(Query(pairs)) => answer(peers, read(pairs)).await,
        Err(rejection) => crate::http::error(StatusCode::BAD_REQUEST, rejection.body_text()),
    }
}

async fn devices(
    State(peers): State<Shared>,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Response {
    with_query(peers, query, Read::Devices).await
}

async fn latest(
    State(peers): State<Shared>,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Response {
    with_query(peers, query, Read::Latest).await
}

async fn device_latest(State(peers): State<Shared>, Path(device): Path<String>) -> Response {
    answer(peers, Read::DeviceLatest(device)).await
}

async fn series(
    State(peers): State<Shared>,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Response {
    with_query(peers, query, Read::Series).await
}

/// The cluster of `--peers`, if any (the list was checked when the configuration was read).
pub fn from_config(config: &crate::config::Config) -> Option<Arc<Peers>> {
    if config.peers.is_empty() {
        return None;
    }
    match Cluster::new(&config.peers, config.peer_timeout) {
        Ok(cluster) => {
            tracing::info!(peers = %config.peers.join(","), timeout = ?config.peer_timeout, "cluster reads on /v1/cluster/");
            Some(Arc::new(Peers::new(cluster)))
        }
        Err(error) => {
            tracing::error!(%error, "--peers: cluster reads off");
            None
        }
    }
}
