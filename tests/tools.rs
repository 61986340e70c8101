//! End to end: the `sluice` command line against a real sluiced.

mod common;

use common::{code, sluice, Client, Daemon};
use serde_json::Value as Json;

fn load(daemon: &Daemon, extra: &[&str]) -> Json {
    let target = daemon.coap.to_string();
    let mut args = vec!["load", "--target", &target, "--json"];
    args.extend_from_slice(extra);
    let output = sluice(&args);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "sluice load failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_str(stdout.lines().last().expect("a JSON line"))
        .expect("the last line is JSON")
}

fn stored_points(daemon: &Daemon, prefix: &str) -> u64 {
    daemon.get_json("/v1/devices")["devices"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["device"].as_str().unwrap().starts_with(prefix))
        .map(|d| d["points"].as_u64().unwrap())
        .sum()
}

#[test]
fn load_in_every_format_stores_what_was_acknowledged() {
    let daemon = Daemon::start(&[]);
    for (format, prefix, records) in [
        ("senml-json", "lj-", "1"),
        ("senml-cbor", "lc-", "3"),
        ("rkyv", "lr-", "64"),
    ] {
        let report = load(
            &daemon,
            &[
                "--devices",
                "20",
                "--count",
                "1000",
                "--format",
                format,
                "--records-per-datagram",
                records,
                "--device-prefix",
                prefix,
            ],
        );
        assert_eq!(report["sent"], 1000, "{format}: {report}");
        assert_eq!(report["acknowledged"], 1000, "{format}: {report}");
        assert_eq!(report["responses"]["2.04"], 1000, "{format}: {report}");
        assert_eq!(report["timeouts"], 0, "{format}: {report}");
        for key in ["p50", "p90", "p99", "p999", "max"] {
            assert!(
                report["latency_us"][key].as_u64().is_some(),
                "{format}: {report}"
            );
        }
        let records: u64 = records.parse().unwrap();
        assert_eq!(stored_points(&daemon, prefix), 1000 * records, "{format}");
    }
}

#[test]
fn load_with_non_requests_and_a_rate_is_stored() {
    let daemon = Daemon::start(&[]);
    let report = load(
        &daemon,
        &[
            "--devices",
            "5",
            "--count",
            "500",
            "--mode",
            "non",
            "--rate",
            "2000",
            "--device-prefix",
            "ln-",
        ],
    );
    assert_eq!(report["sent"], 500, "{report}");
    assert_eq!(report["acknowledged"], 500, "{report}");
    common::wait_for("500 NON points", std::time::Duration::from_secs(5), || {
        stored_points(&daemon, "ln-") == 500
    });
}

#[test]
fn load_rejects_bad_arguments_with_a_message() {
    for args in [
        vec!["load", "--target", "127.0.0.1:5683", "--devices", "0"],
        vec![
            "load",
            "--target",
            "no-such-host.invalid:5683",
            "--count",
            "1",
        ],
        vec!["load", "--target", "127.0.0.1:5683", "--rate", "-3"],
    ] {
        let output = sluice(&args);
        assert!(!output.status.success(), "{args:?}");
        assert!(!output.stderr.is_empty(), "{args:?}");
    }
}

#[test]
fn query_shows_devices_latest_and_series_as_table_json_and_csv() {
    let daemon = Daemon::start(&[]);
    let mut client = Client::new(daemon.coap);
    for (t, v) in [(1763900000, 20.0), (1763900030, 22.0), (1763900070, 30.0)] {
        let payload = format!(r#"[{{"n":"temp","v":{v},"t":{t}}}]"#);
        assert_eq!(
            code(&client.post("/t/dev-q", Some(110), payload.as_bytes())),
            "2.04"
        );
    }
    let http = daemon.http.to_string();
    let query = |args: &[&str]| {
        let mut all = vec!["query", "--http", &http];
        all.extend_from_slice(args);
        let output = sluice(&all);
        assert!(
            output.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    };

    let devices = query(&["devices"]);
    assert!(
        devices.contains("DEVICE") && devices.contains("dev-q") && devices.contains('3'),
        "{devices}"
    );
    let latest = query(&["latest", "dev-q"]);
    assert!(latest.contains("temp") && latest.contains("30"), "{latest}");
    let json: Json =
        serde_json::from_str(&query(&["--format", "json", "series", "dev-q", "temp"])).unwrap();
    assert_eq!(json["points"].as_array().unwrap().len(), 3);
    let buckets = query(&[
        "--format", "csv", "series", "dev-q", "temp", "--step", "60", "--agg", "avg",
    ]);
    assert_eq!(
        buckets,
        "time,value\n2025-11-23T12:13:00Z,21\n2025-11-23T12:14:00Z,30\n"
    );

    let missing = sluice(&["query", "--http", &http, "latest", "nobody"]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("404"));
    let unreachable = sluice(&["query", "--http", "127.0.0.1:1", "devices"]);
    assert_eq!(unreachable.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&unreachable.stderr).contains("cannot reach"));
}
