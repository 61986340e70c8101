//! End to end: cluster-wide reads over two real nodes, through a node's `/v1/cluster/...`
//! endpoints (`sluiced --peers`) and through `sluice query --nodes`: devices, latest values and
//! series merged as if one node held every reading, bucketed averages re-aggregated from sums and
//! counts, and a partial-result marker when a node is down or too slow.

mod common;

use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::time::{Duration, Instant};

use common::{code, free_port, Client, Daemon};
use serde_json::{json, Value as Json};

const JSON: Option<u16> = Some(110);
const T0: i64 = 1_763_899_200; // a multiple of 60

/// Starts sluiced on chosen ports (so the peers list can name them before either starts).
fn start_node(dir: &Path, coap: u16, http: u16, extra: &[&str]) -> Daemon {
    let mut daemon = Daemon::spawn_on(dir, coap, http, &[&["--durability", "os"], extra].concat());
    daemon.wait_ready();
    daemon
}

/// Posts SenML JSON records (name, time offset from T0, value as JSON) and requires 2.04.
fn post(node: &Daemon, device: &str, records: &[(&str, i64, Json)]) {
    let records: Vec<Json> = records
        .iter()
        .map(|(name, offset, value)| {
            let key = if value.is_string() { "vs" } else { "v" };
            json!({ "n": name, "t": T0 + offset, key: value })
        })
        .collect();
    let mut client = Client::new(node.coap);
    let payload = Json::Array(records).to_string();
    let response = client.post(&format!("/t/{device}"), JSON, payload.as_bytes());
    assert_eq!(code(&response), "2.04", "{payload}");
}

/// GET: status, the partial header, and the body as JSON.
fn get(node: &Daemon, path: &str) -> (u16, Option<String>, Json) {
    let url = format!("http://{}{path}", node.http);
    let response = match ureq::get(&url).timeout(Duration::from_secs(30)).call() {
        Ok(response) => response,
        Err(ureq::Error::Status(_, response)) => response,
        Err(error) => panic!("GET {path}: {error}"),
    };
    let status = response.status();
    let partial = response.header("sluice-partial").map(str::to_string);
    let body = response.into_string().unwrap();
    let json = serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: {e}: {body}"));
    (status, partial, json)
}

fn points(json: &Json) -> Vec<(f64, Json)> {
    json["points"]
        .as_array()
        .unwrap_or_else(|| panic!("no points in {json}"))
        .iter()
        .map(|p| (p[0].as_f64().unwrap(), p[1].clone()))
        .collect()
}

fn t(offset: i64) -> f64 {
    (T0 + offset) as f64
}

fn sluice_query(args: &[&str]) -> (Option<i32>, String, String) {
    let output = common::sluice(&[&["query"], args].concat());
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn two_nodes_answer_cluster_reads_merged_and_mark_a_missing_node() {
    let temp = tempfile::tempdir().unwrap();
    let (coap_a, http_a, coap_b, http_b) = (free_port(), free_port(), free_port(), free_port());
    let url_a = format!("http://127.0.0.1:{http_a}");
    let url_b = format!("http://127.0.0.1:{http_b}");
    // The same list on every node, each node included.
    let peers = format!("{url_a},{url_b}");
    let a = start_node(&temp.path().join("a"), coap_a, http_a, &["--peers", &peers]);
    let mut b = start_node(&temp.path().join("b"), coap_b, http_b, &["--peers", &peers]);

    // `shared` re-homed from A to B in the middle of a minute: both hold part of bucket T0.
    post(
        &a,
        "shared",
        &[
            ("temp", 0, json!(1.0)),
            ("temp", 10, json!(2.0)),
            ("temp", 20, json!(3.0)),
        ],
    );
    post(
        &b,
        "shared",
        &[
            ("temp", 5, json!("sensor fault")),
            ("temp", 30, json!(10.0)),
            ("temp", 70, json!(5.0)),
            ("hum", 40, json!(55.0)),
        ],
    );
    post(&a, "only-a", &[("temp", 1, json!(7.0))]);
    post(&b, "only-b", &[("temp", 2, json!(8.0))]);

    // Devices: the union, points summed, last_seen the greatest.
    let (status, partial, devices) = get(&a, "/v1/cluster/devices");
    assert_eq!(
        (status, partial.as_deref()),
        (200, Some("false")),
        "{devices}"
    );
    assert_eq!(devices["partial"], json!(false));
    assert_eq!(devices["missing"], json!([]));
    let listed: Vec<(String, f64, u64)> = devices["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["device"].as_str().unwrap().to_string(),
                d["last_seen"].as_f64().unwrap(),
                d["points"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        listed,
        [
            ("only-a".to_string(), t(1), 1),
            ("only-b".to_string(), t(2), 1),
            ("shared".to_string(), t(70), 7),
        ]
    );
    // Any node with --peers answers the same.
    assert_eq!(get(&b, "/v1/cluster/devices").2, devices);
    // Paging over the union: one device per page, in order.
    let (_, _, page) = get(&a, "/v1/cluster/devices?limit=1&cursor=only-a");
    assert_eq!(page["devices"][0]["device"], "only-b", "{page}");
    assert_eq!(page["next"], "only-b", "{page}");

    // Latest: the newest point of each series over both nodes.
    let (status, _, latest) = get(&a, "/v1/cluster/devices/shared/latest");
    assert_eq!(status, 200, "{latest}");
    assert_eq!(
        latest["series"],
        json!({ "temp": [t(70), 5.0], "hum": [t(40), 55.0] })
    );
    let (_, _, all_latest) = get(&a, "/v1/cluster/latest?prefix=only-");
    assert_eq!(all_latest["devices"].as_array().unwrap().len(), 2);

    // Raw series: merged in time order.
    let (status, _, raw) = get(&a, "/v1/cluster/series?device=shared&name=temp");
    assert_eq!(status, 200, "{raw}");
    assert_eq!(
        points(&raw),
        vec![
            (t(0), json!(1.0)),
            (t(5), json!("sensor fault")),
            (t(10), json!(2.0)),
            (t(20), json!(3.0)),
            (t(30), json!(10.0)),
            (t(70), json!(5.0)),
        ]
    );

    // Buckets of one minute, re-aggregated over both nodes.
    let bucketed = |agg: &str| {
        let (status, _, json) = get(
            &a,
            &format!("/v1/cluster/series?device=shared&name=temp&step=60&agg={agg}"),
        );
        assert_eq!(status, 200, "{agg}: {json}");
        assert_eq!(json["agg"], agg);
        assert_eq!(json["step"], 60.0);
        points(&json)
    };
    // Bucket T0 holds 1, 2, 3 on A and "sensor fault", 10 on B; bucket T0+60 holds 5 on B.
    // The mean of 1, 2, 3 and 10 is 4: not the mean of the nodes' means (2 and 10), and the
    // string does not count.
    let (_, _, a_alone) = get(&a, "/v1/series?device=shared&name=temp&step=60&agg=avg");
    assert_eq!(points(&a_alone), vec![(t(0), json!(2.0))]);
    for (agg, first_bucket) in [
        ("avg", 4.0),
        ("sum", 16.0),
        ("count", 5.0),
        ("min", 1.0),
        ("max", 10.0),
        ("last", 10.0),
    ] {
        let second_bucket = if agg == "count" { 1.0 } else { 5.0 };
        assert_eq!(
            bucketed(agg),
            vec![(t(0), json!(first_bucket)), (t(60), json!(second_bucket))],
            "{agg}"
        );
    }
    // Several names at once.
    let (_, _, several) = get(
        &a,
        "/v1/cluster/series?device=shared&name=temp&name=hum&step=60&agg=count",
    );
    assert_eq!(several["series"][1]["name"], "hum", "{several}");
    assert_eq!(several["series"][1]["points"], json!([[t(0), 1.0]]));

    // Errors: a bad query is a 400 (the nodes' own check), an unknown series a 404, paging and
    // other formats are refused.
    let (status, _, error) = get(&a, "/v1/cluster/series?device=shared&name=temp&agg=avg");
    assert_eq!(status, 400, "{error}");
    assert!(
        error["error"].as_str().unwrap().contains("`agg`"),
        "{error}"
    );
    let (status, _, error) = get(&a, "/v1/cluster/series?device=shared&name=nope");
    assert_eq!(status, 404, "{error}");
    let (status, _, error) = get(&a, "/v1/cluster/series?device=shared&name=temp&limit=5");
    assert_eq!(status, 400, "{error}");
    let (status, _, _) = get(&a, "/v1/cluster/devices?colour=red");
    assert_eq!(status, 400);

    // The CLI merges the same way, client-side.
    let nodes = format!("127.0.0.1:{http_a},{url_b}");
    let (status, stdout, stderr) = sluice_query(&["--nodes", &nodes, "devices"]);
    assert_eq!(status, Some(0), "{stderr}");
    let shared_row = stdout
        .lines()
        .find(|l| l.starts_with("shared"))
        .unwrap_or_else(|| panic!("{stdout}"));
    assert!(shared_row.trim_end().ends_with(" 7"), "{stdout}");
    let (status, stdout, stderr) = sluice_query(&[
        "--nodes", &nodes, "--format", "json", "series", "shared", "temp", "--step", "60", "--agg",
        "avg",
    ]);
    assert_eq!(status, Some(0), "{stderr}");
    let json: Json = serde_json::from_str(&stdout).unwrap();
    assert_eq!(points(&json), vec![(t(0), json!(4.0)), (t(60), json!(5.0))]);
    let (status, stdout, _) = sluice_query(&["--nodes", &nodes, "latest", "shared"]);
    assert_eq!(status, Some(0));
    assert!(stdout.contains("hum") && stdout.contains("55"), "{stdout}");

    // Node B stops: answers are partial, and say which node is missing.
    assert_eq!(b.stop().code(), Some(0));
    let (status, partial, devices) = get(&a, "/v1/cluster/devices");
    assert_eq!(
        (status, partial.as_deref()),
        (200, Some("true")),
        "{devices}"
    );
    assert_eq!(devices["partial"], json!(true));
    assert_eq!(devices["missing"], json!([url_b]));
    let names: Vec<&str> = devices["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["device"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["only-a", "shared"]);
    let (status, _, series) = get(
        &a,
        "/v1/cluster/series?device=shared&name=temp&step=60&agg=avg",
    );
    assert_eq!(status, 200);
    assert_eq!(series["partial"], json!(true));
    assert_eq!(points(&series), vec![(t(0), json!(2.0))]);
    // What only B knew is a 404 that says B did not answer.
    let (status, _, error) = get(&a, "/v1/cluster/devices/only-b/latest");
    assert_eq!(status, 404, "{error}");
    assert_eq!(error["missing"], json!([url_b]), "{error}");
    // Counted on the node that answered.
    let (_, metrics) = a.get("/metrics");
    let sample = |line_start: &str| -> f64 {
        metrics
            .lines()
            .find(|l| l.starts_with(line_start))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or_else(|| panic!("no `{line_start}` in /metrics"))
    };
    assert!(sample(r#"sluice_cluster_reads_total{result="partial"}"#) >= 2.0);
    assert!(sample(r#"sluice_cluster_reads_total{result="complete"}"#) >= 10.0);
    assert!(
        sample(&format!(
            r#"sluice_cluster_peer_failures_total{{peer="{url_b}"}}"#
        )) >= 2.0
    );
    assert_eq!(
        sample(&format!(
            r#"sluice_cluster_peer_failures_total{{peer="{url_a}"}}"#
        )),
        0.0
    );

    // The CLI prints what it has, warns, and exits 3.
    let (status, stdout, stderr) = sluice_query(&["--nodes", &nodes, "devices"]);
    assert_eq!(status, Some(3), "{stdout}{stderr}");
    assert!(stdout.contains("only-a"), "{stdout}");
    assert!(stderr.contains(&url_b), "{stderr}");
    let (status, _, stderr) = sluice_query(&["--nodes", &url_b, "devices"]);
    assert_eq!(status, Some(1), "{stderr}");
    assert!(stderr.contains("no node answered"), "{stderr}");
}

#[test]
fn a_peer_that_does_not_answer_is_left_out_after_the_peer_timeout() {
    // Accepts connections (the kernel does) and never answers.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_url = format!("http://{}", silent.local_addr().unwrap());
    let data = Daemon::start(&[]);
    post(&data, "dev-1", &[("temp", 0, json!(1.0))]);
    // This node is not in its own list: peers are whatever nodes the reads should cover.
    let peers = format!("http://{},{silent_url}", data.http);
    let node = Daemon::start(&["--peers", &peers, "--peer-timeout", "1s"]);
    let started = Instant::now();
    let (status, partial, devices) = get(&node, "/v1/cluster/devices");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(
        (status, partial.as_deref()),
        (200, Some("true")),
        "{devices}"
    );
    assert_eq!(devices["missing"], json!([silent_url]));
    assert_eq!(devices["devices"][0]["device"], "dev-1");

    // Without --peers the cluster endpoints say how to turn them on.
    let (status, _, error) = get(&data, "/v1/cluster/devices");
    assert_eq!(status, 404);
    assert!(
        error["error"].as_str().unwrap().contains("--peers"),
        "{error}"
    );
    drop(silent);
    let _: SocketAddr = node.http;
}
