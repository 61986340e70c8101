//! End to end: the query API of the side HTTP port as curl, scripts and Grafana use it: formats,
//! several names, buckets, paging, ETags and 304s, the result cache, latency summaries and stats.

mod common;

use std::time::Duration;

use common::{code, Client, Daemon};
use serde_json::Value as Json;

const JSON: Option<u16> = Some(110);
const T0: i64 = 1_763_899_200; // a multiple of 3600

/// A time as the API answers it (seconds as a float).
fn t(offset: i64) -> f64 {
    (T0 + offset) as f64
}

/// Posts `records` as one SenML JSON CON request and requires 2.04.
fn post(client: &mut Client, device: &str, records: &[(&str, i64, f64)]) {
    let body: Vec<String> = records
        .iter()
        .map(|(name, time, value)| format!(r#"{{"n":"{name}","t":{time},"v":{value}}}"#))
        .collect();
    let payload = format!("[{}]", body.join(","));
    let response = client.post(&format!("/t/{device}"), JSON, payload.as_bytes());
    assert_eq!(code(&response), "2.04", "{payload}");
}

/// GET with optional If-None-Match: status, headers of interest and body.
struct Answer {
    status: u16,
    etag: Option<String>,
    cache_control: Option<String>,
    link: Option<String>,
    content_type: Option<String>,
    body: String,
}

fn get(daemon: &Daemon, path: &str, if_none_match: Option<&str>) -> Answer {
    let mut request =
        ureq::get(&format!("http://{}{path}", daemon.http)).timeout(Duration::from_secs(10));
    if let Some(tag) = if_none_match {
        request = request.set("If-None-Match", tag);
    }
    let response = match request.call() {
        Ok(response) => response,
        Err(ureq::Error::Status(_, response)) => response,
        Err(error) => panic!("GET {path}: {error}"),
    };
    let header = |name: &str| response.header(name).map(str::to_string);
    Answer {
        status: response.status(),
        etag: header("ETag"),
        cache_control: header("Cache-Control"),
        link: header("Link"),
        content_type: header("Content-Type"),
        body: response.into_string().unwrap(),
    }
}

fn json(answer: &Answer) -> Json {
    serde_json::from_str(&answer.body).unwrap_or_else(|e| panic!("{e}: {}", answer.body))
}

/// `path` is answered 400 with a JSON error naming `parameter` (in backquotes).
fn assert_refused(daemon: &Daemon, path: &str, parameter: &str) {
    let answer = get(daemon, path, None);
    assert_eq!(answer.status, 400, "{path}: {}", answer.body);
    let message = json(&answer)["error"].as_str().unwrap().to_string();
    assert!(
        message.contains(&format!("`{parameter}`")),
        "{path}: {message}"
    );
}

#[test]
fn series_answers_raw_bucketed_several_names_in_json_csv_and_ndjson() {
    let daemon = Daemon::start(&[]);
    let mut client = Client::new(daemon.coap);
    post(
        &mut client,
        "dev-s",
        &[
            ("temp", T0 + 59, 1.0),
            ("temp", T0 + 60, 2.0),
            ("temp", T0 + 61, 4.0),
            ("temp", T0 + 185, 8.0),
            ("hum", T0 + 10, 50.0),
        ],
    );

    let raw = json(&get(&daemon, "/v1/series?device=dev-s&name=temp", None));
    assert_eq!(raw["device"], "dev-s");
    assert_eq!(raw["name"], "temp");
    assert_eq!(raw["points"].as_array().unwrap().len(), 4);
    assert_eq!(raw["points"][0][0].as_f64(), Some((T0 + 59) as f64));

    let url = format!(
        "/v1/series?device=dev-s&name=temp&from={}&to={}&step=60&agg=avg",
        T0 + 59,
        T0 + 3600
    );
    let buckets = json(&get(&daemon, &url, None));
    assert_eq!(buckets["step"], 60.0);
    assert_eq!(buckets["agg"], "avg");
    let expected = serde_json::json!([[t(0), 1.0], [t(60), 3.0], [t(180), 8.0]]);
    assert_eq!(buckets["points"], expected);
    let max = json(&get(
        &daemon,
        "/v1/series?device=dev-s&name=temp&step=5m&agg=max",
        None,
    ));
    assert_eq!(max["points"], serde_json::json!([[t(0), 8.0]]));

    let both = json(&get(
        &daemon,
        "/v1/series?device=dev-s&name=temp&name=hum&step=1h&agg=count",
        None,
    ));
    assert_eq!(both["series"][0]["name"], "temp");
    assert_eq!(
        both["series"][0]["points"],
        serde_json::json!([[t(0), 4.0]])
    );
    assert_eq!(both["series"][1]["name"], "hum");
    assert_eq!(
        both["series"][1]["points"],
        serde_json::json!([[t(0), 1.0]])
    );

    let csv = get(
        &daemon,
        "/v1/series?device=dev-s&name=temp&name=hum&format=csv&from=1763899260",
        None,
    );
    assert_eq!(csv.content_type.as_deref(), Some("text/csv; charset=utf-8"));
    assert_eq!(
        csv.body,
        format!(
            "name,time,value\ntemp,{},2\ntemp,{},4\ntemp,{},8\n",
            T0 + 60,
            T0 + 61,
            T0 + 185
        )
    );
    let above = json(&get(
        &daemon,
        "/v1/series?device=dev-s&name=temp&above=2",
        None,
    ));
    assert_eq!(
        above["points"],
        serde_json::json!([[t(61), 4.0], [t(185), 8.0]])
    );
    let ndjson = get(
        &daemon,
        "/v1/series?device=dev-s&name=hum&format=ndjson",
        None,
    );
    assert_eq!(ndjson.content_type.as_deref(), Some("application/x-ndjson"));
    let line: Json = serde_json::from_str(ndjson.body.trim()).unwrap();
    assert_eq!(
        line,
        serde_json::json!({"time": (T0 + 10) as f64, "value": 50.0})
    );
}

#[test]
fn bad_parameters_get_400_naming_them_and_unknown_series_404() {
    let daemon = Daemon::start(&[]);
    let mut client = Client::new(daemon.coap);
    post(&mut client, "dev-b", &[("temp", T0, 1.0)]);
    for (query, parameter) in [
        ("/v1/series?name=temp", "device"),
        ("/v1/series?device=dev-b", "name"),
        ("/v1/series?device=dev-b&name=temp&from=yesterday", "from"),
        ("/v1/series?device=dev-b&name=temp&to=later", "to"),
        ("/v1/series?device=dev-b&name=temp&step=0&agg=avg", "step"),
        (
            "/v1/series?device=dev-b&name=temp&step=60&agg=median",
            "agg",
        ),
        ("/v1/series?device=dev-b&name=temp&format=xml", "format"),
        ("/v1/series?device=dev-b&name=temp&limit=-3", "limit"),
        ("/v1/series?device=dev-b&name=temp&cursor=%21", "cursor"),
        ("/v1/series?device=dev-b&name=temp&colour=red", "colour"),
        ("/v1/devices?limit=0", "limit"),
        ("/v1/latest?colour=red", "colour"),
    ] {
        assert_refused(&daemon, query, parameter);
    }
    for query in [
        "/v1/series?device=dev-b&name=nothing",
        "/v1/series?device=nobody&name=temp",
        "/v1/series?device=dev-b&name=temp&name=nothing",
        "/v1/devices/nobody/latest",
    ] {
        let answer = get(&daemon, query, None);
        assert_eq!(answer.status, 404, "{query}");
        assert!(json(&answer)["error"].is_string());
    }
}

#[test]
fn limit_and_cursor_page_through_every_point_once() {
    let daemon = Daemon::start(&[]);
    let mut client = Client::new(daemon.coap);
    // Three points share a time, so a page boundary falls inside a run of equal times.
    let mut records: Vec<(&str, i64, f64)> = (0..20).map(|i| ("x", T0 + i, i as f64)).collect();
    records.extend([("x", T0 + 7, 100.0), ("x", T0 + 7, 101.0)]);
    records.extend((0..5).map(|i| ("y", T0 + i, -(i as f64))));
    post(&mut client, "dev-p", &records);

    let mut path = "/v1/series?device=dev-p&name=x&name=y&limit=4".to_string();
    let mut seen: Vec<(String, f64, f64)> = Vec::new();
    let mut pages = 0;
    loop {
        let answer = get(&daemon, &path, None);
        assert_eq!(answer.status, 200, "{path}: {}", answer.body);
        let body = json(&answer);
        for series in body["series"].as_array().unwrap() {
            for point in series["points"].as_array().unwrap() {
                seen.push((
                    series["name"].as_str().unwrap().to_string(),
                    point[0].as_f64().unwrap(),
                    point[1].as_f64().unwrap(),
                ));
            }
        }
        pages += 1;
        assert!(pages <= 10, "paging does not end");
        match answer.link {
            Some(link) => {
                assert!(body["next"].is_string());
                let target = link.trim_start_matches('<');
                path = target[..target.find('>').unwrap()].to_string();
            }
            None => {
                assert!(body.get("next").is_none());
                break;
            }
        }
    }
    assert_eq!(pages, 7);
    let order = |a: &(String, f64, f64), b: &(String, f64, f64)| {
        (a.0 != "x", a.1, a.2)
            .partial_cmp(&(b.0 != "x", b.1, b.2))
            .unwrap()
    };
    let mut got = seen.clone();
    got.sort_by(order);
    let mut want: Vec<(String, f64, f64)> = records
        .iter()
        .map(|(n, t, v)| (n.to_string(), *t as f64, *v))
        .collect();
    want.sort_by(order);
    // Pages come in answer order: "x" then "y", each ascending in time.
    assert!(seen
        .windows(2)
        .all(|w| (w[0].0 != "x", w[0].1) <= (w[1].0 != "x", w[1].1)));
    assert_eq!(got, want, "every point exactly once");
    assert_eq!(seen.len(), 27);

    // Devices page by name after the cursor, with a prefix.
    for device in ["dev-p2", "dev-p3", "other"] {
        post(&mut client, device, &[("x", T0, 1.0)]);
    }
    let first = json(&get(&daemon, "/v1/devices?prefix=dev-p&limit=2", None));
    assert_eq!(first["devices"][0]["device"], "dev-p");
    assert_eq!(first["devices"][1]["device"], "dev-p2");
    assert_eq!(first["next"], "dev-p2");
    let second = json(&get(
        &daemon,
        "/v1/devices?prefix=dev-p&limit=2&cursor=dev-p2",
        None,
    ));
    assert_eq!(second["devices"].as_array().unwrap().len(), 1);
    assert_eq!(second["devices"][0]["device"], "dev-p3");
    assert!(second.get("next").is_none());
    let latest = json(&get(&daemon, "/v1/latest?prefix=dev-p", None));
    assert_eq!(latest["devices"].as_array().unwrap().len(), 3);
    assert_eq!(
        latest["devices"][0]["series"]["x"][0].as_f64(),
        Some((T0 + 19) as f64)
    );
    assert_eq!(latest["devices"][0]["series"]["y"][1].as_f64(), Some(-4.0));
    let page = json(&get(&daemon, "/v1/latest?prefix=dev-p&limit=2", None));
    assert_eq!(page["devices"].as_array().unwrap().len(), 2);
    assert_eq!(page["next"], "dev-p2");
    let rest = json(&get(
        &daemon,
        "/v1/latest?prefix=dev-p&limit=2&cursor=dev-p2",
        None,
    ));
    assert_eq!(rest["devices"][0]["device"], "dev-p3");
    assert_eq!(rest["devices"][0]["series"]["x"][1].as_f64(), Some(1.0));
    assert!(rest.get("next").is_none());

    // The listing is written by hand, not through serde_json::Value: names that need escaping
    // stay valid JSON.
    post(&mut client, "dev-q", &[("a\\\"b\\\\é", T0, 2.5)]);
    let odd = json(&get(&daemon, "/v1/latest?prefix=dev-q", None));
    assert_eq!(
        odd["devices"][0]["series"]["a\"b\\é"][1].as_f64(),
        Some(2.5)
    );
}

#[test]
fn etags_change_only_with_the_series_and_repeats_hit_the_cache() {
    let daemon = Daemon::start(&[]);
    let mut client = Client::new(daemon.coap);
    post(&mut client, "dev-e", &[("a", T0, 1.0), ("b", T0, 2.0)]);
    let path = "/v1/series?device=dev-e&name=a";

    let first = get(&daemon, path, None);
    assert_eq!(first.status, 200);
    assert_eq!(first.cache_control.as_deref(), Some("no-cache"));
    let etag = first.etag.clone().expect("an ETag");
    let again = get(&daemon, path, Some(&etag));
    assert_eq!(again.status, 304);
    assert_eq!(again.etag.as_deref(), Some(etag.as_str()));
    assert!(again.body.is_empty());

    // A commit to another series of the device leaves the answer, and its tag, alone.
    post(&mut client, "dev-e", &[("b", T0 + 1, 3.0)]);
    assert_eq!(get(&daemon, path, Some(&etag)).status, 304);
    let hits = daemon.metric("sluice_query_cache_hits_total");
    let repeat = get(&daemon, path, None);
    assert_eq!(repeat.body, first.body);
    assert_eq!(daemon.metric("sluice_query_cache_hits_total"), hits + 1.0);
    assert!(daemon.metric("sluice_query_cache_hit_ratio") > 0.0);

    // A commit to the series changes the tag and the answer.
    post(&mut client, "dev-e", &[("a", T0 + 1, 5.0)]);
    let changed = get(&daemon, path, Some(&etag));
    assert_eq!(changed.status, 200);
    assert_ne!(changed.etag.as_deref(), Some(etag.as_str()));
    assert_eq!(json(&changed)["points"].as_array().unwrap().len(), 2);

    // Listings carry tags too; a commit anywhere changes them.
    let devices = get(&daemon, "/v1/devices", None);
    let tag = devices.etag.expect("an ETag");
    assert_eq!(get(&daemon, "/v1/devices", Some(&tag)).status, 304);
    let latest = get(&daemon, "/v1/devices/dev-e/latest", None);
    let latest_tag = latest.etag.expect("an ETag");
    assert_eq!(
        get(&daemon, "/v1/devices/dev-e/latest", Some(&latest_tag)).status,
        304
    );
    post(&mut client, "dev-f", &[("a", T0, 1.0)]);
    assert_eq!(get(&daemon, "/v1/devices", Some(&tag)).status, 200);
}

#[test]
fn a_large_range_streams_every_point_in_order() {
    let daemon = Daemon::start(&[]);
    let mut client = Client::new(daemon.coap);
    let points_per_post = 100;
    let posts = 60;
    for post_index in 0..posts {
        let records: Vec<(&str, i64, f64)> = (0..points_per_post)
            .map(|i| {
                // Posted newest first within each request, so the store holds them unsorted.
                let n = post_index * points_per_post + (points_per_post - 1 - i);
                ("v", T0 + n, n as f64)
            })
            .collect();
        post(&mut client, "dev-l", &records);
    }
    let total = (posts * points_per_post) as usize;
    for format in ["ndjson", "csv", "json"] {
        let answer = get(
            &daemon,
            &format!("/v1/series?device=dev-l&name=v&format={format}"),
            None,
        );
        assert_eq!(answer.status, 200);
        let times: Vec<f64> = match format {
            "json" => json(&answer)["points"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p[0].as_f64().unwrap())
                .collect(),
            "csv" => answer
                .body
                .lines()
                .skip(1)
                .map(|l| l.split(',').next().unwrap().parse().unwrap())
                .collect(),
            _ => answer
                .body
                .lines()
                .map(|l| {
                    serde_json::from_str::<Json>(l).unwrap()["time"]
                        .as_f64()
                        .unwrap()
                })
                .collect(),
        };
        assert_eq!(times.len(), total, "{format}");
        assert!(times.windows(2).all(|w| w[0] < w[1]), "{format} in order");
    }
}

#[test]
fn metrics_and_stats_report_latency_per_endpoint_and_per_datagram() {
    let daemon = Daemon::start(&[]);
    let mut client = Client::new(daemon.coap);
    post(&mut client, "dev-m", &[("a", T0, 1.0)]);
    get(&daemon, "/v1/series?device=dev-m&name=a", None);
    get(&daemon, "/v1/devices", None);
    let (status, text) = daemon.get("/metrics");
    assert_eq!(status, 200);
    for line in [
        "sluice_build_info{version=",
        "sluice_query_latency_seconds{endpoint=\"series\",quantile=\"0.99\"}",
        "sluice_query_latency_seconds_count{endpoint=\"devices\"} 1",
        "sluice_decode_seconds{quantile=\"0.999\"}",
        "sluice_ack_latency_seconds_sum",
        "sluice_commit_latency_seconds{quantile=\"0.5\"}",
        "# TYPE sluice_query_cache_hit_ratio gauge",
    ] {
        assert!(text.contains(line), "{line} missing from:\n{text}");
    }
    assert!(daemon.metric("sluice_decode_seconds_count") >= 1.0);
    let stats = daemon.get_json("/v1/stats");
    assert_eq!(stats["sluice_decode_seconds"]["type"], "summary");
    assert!(stats["sluice_decode_seconds"]["samples"][0]["count"].as_u64() >= Some(1));
    let series_latency = stats["sluice_query_latency_seconds"]["samples"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["labels"]["endpoint"] == "series")
        .unwrap();
    assert!(series_latency["quantiles"]["0.999"].as_f64().unwrap() > 0.0);
    let points: u64 = stats["sluice_points_stored_total"]["samples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["value"].as_u64().unwrap())
        .sum();
    assert_eq!(points, 1);
}

#[test]
fn sluice_query_draws_a_series_as_a_terminal_chart_and_filters_devices() {
    let daemon = Daemon::start(&[]);
    let mut client = Client::new(daemon.coap);
    let records: Vec<(&str, i64, f64)> = (0..10)
        .map(|i| ("temp", T0 + 60 * i, 20.0 + (i % 4) as f64))
        .collect();
    post(&mut client, "dev-c", &records);
    post(&mut client, "other", &[("temp", T0, 1.0)]);
    let http = daemon.http.to_string();
    let run = |args: &[&str]| {
        let mut all = vec!["query", "--http", http.as_str()];
        all.extend_from_slice(args);
        let output = common::sluice(&all);
        assert!(
            output.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    };
    let chart = run(&["series", "dev-c", "temp", "--chart", "--width", "70"]);
    assert!(chart.starts_with("dev-c temp: 10 points\n"), "{chart}");
    assert_eq!(chart.matches('█').count(), 10, "{chart}");
    assert!(chart.lines().nth(1).unwrap().starts_with("23 ┤"), "{chart}");
    assert!(chart.contains("2025-11-23T12:00:00Z"), "{chart}");
    assert!(chart.lines().all(|l| l.chars().count() <= 70), "{chart}");

    let buckets = run(&[
        "series", "dev-c", "temp", "--step", "5m", "--agg", "max", "--chart",
    ]);
    assert!(
        buckets.starts_with("dev-c temp (max per 300.0 s): 2 points\n"),
        "{buckets}"
    );

    let devices = run(&["devices", "--prefix", "dev-"]);
    assert!(
        devices.contains("dev-c") && !devices.contains("other"),
        "{devices}"
    );
}

#[test]
fn answers_that_lie_in_sealed_partitions_are_immutable_the_rest_revalidated() {
    let daemon = Daemon::start(&["--partition", "1h", "--partition-grace", "1s"]);
    let mut client = Client::new(daemon.coap);
    // An hour long past: its partition is sealed at a commit's next seal check.
    post(
        &mut client,
        "dev-s",
        &[("a", T0 + 10, 1.0), ("a", T0 + 20, 2.0)],
    );
    let sealed_range = format!("/v1/series?device=dev-s&name=a&from={T0}&to={}", T0 + 3600);
    let open_range = "/v1/series?device=dev-s&name=a";
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut tick = 0;
    let answer = loop {
        let answer = get(&daemon, &sealed_range, None);
        if answer.cache_control.as_deref() != Some("no-cache") {
            break answer;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the partition was never sealed"
        );
        // Seal checks run with commits: keep committing (now-dated readings of another device).
        tick += 1;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        post(&mut client, "dev-tick", &[("t", now, tick as f64)]);
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(answer.status, 200);
    assert_eq!(
        answer.cache_control.as_deref(),
        Some("public, max-age=86400, immutable")
    );
    let points: serde_json::Value = serde_json::from_str(&answer.body).unwrap();
    assert_eq!(points["points"].as_array().unwrap().len(), 2);
    // A range reaching into time that is not sealed must be revalidated.
    assert_eq!(
        get(&daemon, open_range, None).cache_control.as_deref(),
        Some("no-cache")
    );
}

/// A raw GET: status, the named headers and the body bytes as sent (no decoding).
fn get_raw(
    daemon: &Daemon,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, Vec<Option<String>>, Vec<u8>) {
    let mut request =
        ureq::get(&format!("http://{}{path}", daemon.http)).timeout(Duration::from_secs(10));
    for (name, value) in headers {
        request = request.set(name, value);
    }
    let response = match request.call() {
        Ok(response) => response,
        Err(ureq::Error::Status(_, response)) => response,
        Err(error) => panic!("GET {path}: {error}"),
    };
    let named = ["ETag", "Content-Encoding", "Vary", "Content-Type"]
        .iter()
        .map(|name| response.header(name).map(str::to_string))
        .collect();
    let status = response.status();
    let mut body = Vec::new();
    std::io::Read::read_to_end(&mut response.into_reader(), &mut body).unwrap();
    (status, named, body)
}

#[test]
fn large_listings_go_gzip_compressed_to_clients_that_accept_it() {
    use std::io::Read as _;
    let daemon = Daemon::start(&[]);
    let mut client = Client::new(daemon.coap);
    // 40 devices: a listing over the 1 KiB below which nothing is compressed.
    for i in 0..40 {
        post(
            &mut client,
            &format!("dev-{i:02}"),
            &[("temp", T0 + i, i as f64)],
        );
    }
    let (status, plain_headers, plain) = get_raw(&daemon, "/v1/latest", &[]);
    assert_eq!(status, 200);
    let [plain_tag, encoding, vary, _] = &plain_headers[..] else {
        unreachable!()
    };
    assert_eq!(encoding, &None);
    assert_eq!(vary.as_deref(), Some("accept-encoding"));
    assert!(plain.len() > 1024, "{}", plain.len());

    let accept = [("Accept-Encoding", "gzip, deflate, br")];
    let (status, gz_headers, gz) = get_raw(&daemon, "/v1/latest", &accept);
    assert_eq!(status, 200);
    let [gz_tag, encoding, vary, content_type] = &gz_headers[..] else {
        unreachable!()
    };
    assert_eq!(encoding.as_deref(), Some("gzip"));
    assert_eq!(vary.as_deref(), Some("accept-encoding"));
    assert_eq!(content_type.as_deref(), Some("application/json"));
    assert_ne!(gz_tag, plain_tag, "each representation has its own tag");
    assert!(
        gz.len() < plain.len() / 2,
        "{} of {}",
        gz.len(),
        plain.len()
    );
    let mut inflated = Vec::new();
    flate2::read::GzDecoder::new(&gz[..])
        .read_to_end(&mut inflated)
        .unwrap();
    assert_eq!(inflated, plain);
    // Again: the compressed body kept in the result cache, the same bytes and tag.
    let again = get_raw(&daemon, "/v1/latest", &accept);
    assert_eq!((again.1[0].as_ref(), &again.2), (gz_tag.as_ref(), &gz));

    // Either tag revalidates; the 304 names the one the client holds.
    let gz_tag = gz_tag.clone().unwrap();
    let plain_tag = plain_tag.clone().unwrap();
    for (tag, encoding) in [
        (&gz_tag, "gzip"),
        (&plain_tag, "gzip"),
        (&plain_tag, "identity"),
    ] {
        let (status, headers, body) = get_raw(
            &daemon,
            "/v1/latest",
            &[("Accept-Encoding", encoding), ("If-None-Match", tag)],
        );
        assert_eq!(
            (status, headers[0].as_ref(), body.len()),
            (304, Some(tag), 0)
        );
    }
    // gzip refused, a small answer, and /v1/series: identity.
    for (path, encoding) in [
        ("/v1/latest", "gzip;q=0, identity"),
        ("/v1/latest?prefix=dev-01", "gzip"),
        ("/v1/series?device=dev-01&name=temp", "gzip"),
    ] {
        let (status, headers, _) = get_raw(&daemon, path, &[("Accept-Encoding", encoding)]);
        assert_eq!((status, headers[1].as_deref()), (200, None), "{path}");
    }
    // A commit changes both tags.
    post(&mut client, "dev-00", &[("temp", T0 + 100, 1.0)]);
    let (status, headers, _) = get_raw(
        &daemon,
        "/v1/latest",
        &[("Accept-Encoding", "gzip"), ("If-None-Match", &gz_tag)],
    );
    assert_eq!(status, 200);
    assert_ne!(headers[0].as_ref(), Some(&gz_tag));
}

/// Buckets of the union of the devices' `/v1/series` points: start -> (count, numbers, sum,
/// min, max).
fn buckets_of_series(
    daemon: &Daemon,
    devices: &[&str],
    name: &str,
    range: &str,
    step: f64,
) -> std::collections::BTreeMap<i64, (u64, u64, f64, f64, f64)> {
    let mut buckets = std::collections::BTreeMap::new();
    for device in devices {
        let answer = get(
            daemon,
            &format!("/v1/series?device={device}&name={name}{range}"),
            None,
        );
        if answer.status == 404 {
            continue;
        }
        for point in json(&answer)["points"].as_array().unwrap() {
            let time = point[0].as_f64().unwrap();
            let bucket = buckets.entry((time / step).floor() as i64).or_insert((
                0,
                0,
                0.0,
                f64::INFINITY,
                f64::NEG_INFINITY,
            ));
            bucket.0 += 1;
            if let Some(n) = point[1].as_f64() {
                bucket.1 += 1;
                bucket.2 += n;
                bucket.3 = bucket.3.min(n);
                bucket.4 = bucket.4.max(n);
            }
        }
    }
    buckets
}

#[test]
fn aggregates_over_every_device_agree_with_their_series_and_revalidate() {
    let mut first = Daemon::start(&[]);
    let mut client = Client::new(first.coap);
    let devices = ["dev-a1", "dev-a2", "gw-1", "other"];
    for (i, device) in devices.iter().enumerate() {
        let i = i as i64;
        post(
            &mut client,
            device,
            &[
                ("temp", T0 + i, 1.0 + i as f64),
                ("temp", T0 + 59, 2.5),
                // The same time twice: both count, as in /v1/series.
                ("temp", T0 + 60 + i, 4.0),
                ("temp", T0 + 60 + i, -4.0 * i as f64),
                ("temp", T0 + 3700, 8.0),
                ("hum", T0 + 10, 50.0),
            ],
        );
    }
    // A string value: counted by `count`, skipped by the numeric aggregates.
    let payload = format!(r#"[{{"n":"temp","t":{},"vs":"high"}}]"#, T0 + 61);
    assert_eq!(
        code(&client.post("/t/gw-1", JSON, payload.as_bytes())),
        "2.04"
    );
    let range = format!("&from={T0}&to={}", T0 + 7200);
    // `first_hour`: points of `temp` in the first hour, of any type.
    let check = |daemon: &Daemon, first_hour: u64| {
        for (prefix, agg, step) in [
            ("", "avg", 60.0),
            ("dev-", "sum", 60.0),
            ("", "count", 3600.0),
            ("gw-", "count", 1.0),
            ("", "min", 30.0),
            ("dev-a", "max", 86400.0),
        ] {
            let path =
                format!("/v1/aggregate?name=temp&prefix={prefix}&step={step}&agg={agg}{range}");
            let answer = get(daemon, &path, None);
            assert_eq!(answer.status, 200, "{path}: {}", answer.body);
            let got = json(&answer);
            assert_eq!(got["agg"], agg);
            assert_eq!(got["step"], step);
            let matching: Vec<&str> = devices
                .iter()
                .copied()
                .filter(|d| d.starts_with(prefix))
                .collect();
            let expected = buckets_of_series(daemon, &matching, "temp", &range, step);
            let want: Vec<(f64, f64)> = expected
                .iter()
                .filter(|(_, b)| agg == "count" || b.1 > 0)
                .map(|(k, b)| {
                    let value = match agg {
                        "avg" => b.2 / b.1 as f64,
                        "sum" => b.2,
                        "min" => b.3,
                        "max" => b.4,
                        _ => b.0 as f64,
                    };
                    (*k as f64 * step, value)
                })
                .collect();
            let buckets: Vec<(f64, f64)> = got["buckets"]
                .as_array()
                .unwrap()
                .iter()
                .map(|b| (b[0].as_f64().unwrap(), b[1].as_f64().unwrap()))
                .collect();
            assert_eq!(buckets.len(), want.len(), "{path}: {buckets:?} != {want:?}");
            for (g, w) in buckets.iter().zip(&want) {
                assert_eq!(g.0, w.0, "{path}");
                assert!((g.1 - w.1).abs() < 1e-9, "{path}: {g:?} != {w:?}");
            }
            let points: u64 = expected
                .values()
                .map(|b| if agg == "count" { b.0 } else { b.1 })
                .sum();
            assert_eq!(got["points"], points, "{path}");
            assert_eq!(got["devices"], matching.len(), "{path}");
        }
        let csv = get(
            daemon,
            &format!("/v1/aggregate?name=temp&step=1h&agg=count&format=csv{range}"),
            None,
        );
        assert_eq!(csv.content_type.as_deref(), Some("text/csv; charset=utf-8"));
        assert_eq!(
            csv.body,
            format!("time,value\n{T0},{first_hour}\n{},4\n", T0 + 3600)
        );
    };
    check(&first, 17);

    // ETag and 304; another series' commit leaves the tag alone, one of `temp` changes it.
    let path = format!("/v1/aggregate?name=temp&step=60&agg=avg{range}");
    let answer = get(&first, &path, None);
    let etag = answer.etag.clone().unwrap();
    assert_eq!(answer.cache_control.as_deref(), Some("no-cache"));
    assert_eq!(get(&first, &path, Some(&etag)).status, 304);
    post(&mut client, "dev-a1", &[("hum", T0 + 20, 1.0)]);
    assert_eq!(get(&first, &path, Some(&etag)).status, 304);
    post(&mut client, "dev-a1", &[("temp", T0 + 20, 1.0)]);
    let changed = get(&first, &path, Some(&etag));
    assert_eq!(changed.status, 200);
    assert_ne!(changed.etag.as_deref(), Some(etag.as_str()));

    // Bad parameters: 400 naming them; no matching series: 404.
    for (query, parameter) in [
        ("step=60&agg=avg", "name"),
        ("name=temp&agg=avg", "step"),
        ("name=temp&step=60", "agg"),
        ("name=temp&step=60&agg=last", "agg"),
        ("name=temp&step=60&agg=avg&format=ndjson", "format"),
        ("name=temp&step=60&agg=avg&device=dev-a1", "device"),
        ("name=temp&step=60&agg=avg&from=later", "from"),
        // Two partitions of data in 1 ms steps: 7.2 million buckets.
        ("name=temp&step=0.001&agg=avg", "step"),
    ] {
        assert_refused(&first, &format!("/v1/aggregate?{query}"), parameter);
    }
    for query in [
        "name=nothing&step=60&agg=avg",
        "name=temp&prefix=zz&step=60&agg=avg",
    ] {
        let answer = get(&first, &format!("/v1/aggregate?{query}"), None);
        assert_eq!(answer.status, 404, "{query}: {}", answer.body);
    }
    assert!(first
        .get("/metrics")
        .1
        .contains("sluice_query_latency_seconds_count{endpoint=\"aggregate\"}"));

    // `sluice query aggregate` asks the same.
    let output = common::sluice(&[
        "query",
        "--http",
        &first.http.to_string(),
        "aggregate",
        "temp",
        "--step",
        "1h",
        "--agg",
        "count",
        "--prefix",
        "dev-",
        "--from",
        &T0.to_string(),
        "--to",
        &(T0 + 7200).to_string(),
        "--format",
        "csv",
    ]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}");
    assert_eq!(
        stdout,
        "time,value\n2025-11-23T12:00:00Z,9\n2025-11-23T13:00:00Z,2\n"
    );

    // After a restart the answers are the same.
    first.stop();
    let second = Daemon::start_in(&first.data_dir, &[]);
    check(&second, 18);
}
