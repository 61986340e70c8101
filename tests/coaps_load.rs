//! `sluice load --dtls` and `--gen-credentials` against the real sluiced over CoAPS.

mod common;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use common::{binary, free_port, sluice, Daemon};
use serde_json::Value as Json;

/// Writes `sluice load --gen-credentials N --device-prefix P > path`, as an operator would.
fn gen_credentials(path: &Path, count: usize, prefix: &str) {
    let file = std::fs::File::create(path).unwrap();
    let status = Command::new(binary("sluice"))
        .args([
            "load",
            "--gen-credentials",
            &count.to_string(),
            "--device-prefix",
            prefix,
        ])
        .stdin(Stdio::null())
        .stdout(file)
        .status()
        .unwrap();
    assert!(status.success(), "sluice load --gen-credentials failed");
}

fn start(credentials: &Path, data_dir: &Path) -> (Daemon, SocketAddr) {
    let coaps: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let daemon = Daemon::start_in(
        data_dir,
        &[
            "--credentials",
            credentials.to_str().unwrap(),
            "--coaps",
            &coaps.to_string(),
            "--durability",
            "os",
        ],
    );
    (daemon, coaps)
}

fn load_dtls(target: SocketAddr, credentials: &Path, extra: &[&str]) -> Output {
    let target = target.to_string();
    let mut args = vec![
        "load",
        "--target",
        &target,
        "--dtls",
        "--credentials",
        credentials.to_str().unwrap(),
        "--json",
        "--quiet",
    ];
    args.extend_from_slice(extra);
    sluice(&args)
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn load_over_dtls_stores_what_was_acknowledged_under_the_identities_devices() {
    let dir = tempfile::tempdir().unwrap();
    let credentials = dir.path().join("credentials.toml");
    gen_credentials(&credentials, 12, "gen-");
    let mode = std::fs::metadata(&credentials)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "a generated credentials file is 0600");
    let (daemon, coaps) = start(&credentials, &dir.path().join("data"));

    // 10 of the 12 devices, CON, two in flight each, over the default `/t/{device}` path.
    let output = load_dtls(
        coaps,
        &credentials,
        &["--devices", "10", "--window", "2", "--count", "600"],
    );
    assert!(output.status.success(), "load --dtls: {}", stderr(&output));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let report: Json = serde_json::from_str(stdout.lines().last().expect("a JSON line")).unwrap();
    assert_eq!(report["sent"], 600, "{report}");
    assert_eq!(report["acknowledged"], 600, "{report}");
    assert_eq!(report["timeouts"], 0, "{report}");

    let devices = daemon.get_json("/v1/devices")["devices"].clone();
    let stored: Vec<(String, u64)> = devices
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["device"].as_str().unwrap().to_string(),
                d["points"].as_u64().unwrap(),
            )
        })
        .collect();
    let expected: Vec<String> = (0..10).map(|i| format!("gen-{i:04}")).collect();
    let mut names: Vec<String> = stored.iter().map(|(name, _)| name.clone()).collect();
    names.sort();
    assert_eq!(
        names, expected,
        "one device per credentials entry, in file order"
    );
    assert_eq!(stored.iter().map(|(_, n)| n).sum::<u64>(), 600);
    assert_eq!(
        daemon.metric("sluice_dtls_handshakes_completed_total"),
        10.0
    );
}

#[test]
fn a_credentials_file_with_a_bad_key_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let credentials = dir.path().join("credentials.toml");
    std::fs::write(
        &credentials,
        "[[device]]\nid = \"a\"\nkey = \"k\"\n\n[[device]]\nid = \"b\"\nkey_hex = \"xyz1\"\n",
    )
    .unwrap();
    // Nothing needs to listen: the file is refused before any socket opens.
    let target: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let output = load_dtls(target, &credentials, &["--devices", "1", "--count", "1"]);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    let message = stderr(&output);
    assert!(
        message.contains("line 6: device \"b\": `key_hex` must be an even number of hex digits"),
        "{message}"
    );
}

#[test]
fn fewer_credentials_than_devices_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let credentials = dir.path().join("credentials.toml");
    gen_credentials(&credentials, 2, "few-");
    let target: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let output = load_dtls(target, &credentials, &["--devices", "3", "--count", "3"]);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("has 2 enabled devices, fewer than --devices 3"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn a_key_the_server_does_not_hold_fails_the_handshake_before_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let server_credentials = dir.path().join("server.toml");
    gen_credentials(&server_credentials, 1, "key-");
    let (daemon, coaps) = start(&server_credentials, &dir.path().join("data"));
    let device_credentials = dir.path().join("device.toml");
    gen_credentials(&device_credentials, 1, "key-"); // same identity, another random key

    let output = load_dtls(
        coaps,
        &device_credentials,
        &["--devices", "1", "--count", "5"],
    );
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    let message = stderr(&output);
    assert!(
        message.contains("DTLS handshake of identity `key-0000`")
            && message.contains("alert decrypt_error"),
        "{message}"
    );
    assert_eq!(daemon.metric("sluice_dtls_handshakes_failed_total"), 1.0);
    assert_eq!(daemon.metric("sluice_points_stored_total"), 0.0);
}

#[test]
fn a_dtls_recording_replayed_over_dtls_stores_the_same_readings() {
    let dir = tempfile::tempdir().unwrap();
    let credentials = dir.path().join("credentials.toml");
    gen_credentials(&credentials, 4, "rep-");
    let capture = dir.path().join("run.pcap");
    let (original, original_coaps) = start(&credentials, &dir.path().join("original"));
    let output = load_dtls(
        original_coaps,
        &credentials,
        &[
            "--devices",
            "4",
            "--count",
            "100",
            "--record",
            capture.to_str().unwrap(),
        ],
    );
    assert!(output.status.success(), "load --dtls: {}", stderr(&output));

    let (copy, copy_coaps) = start(&credentials, &dir.path().join("copy"));
    let output = sluice(&[
        "replay",
        capture.to_str().unwrap(),
        "--target",
        &copy_coaps.to_string(),
        "--dtls",
        "--credentials",
        credentials.to_str().unwrap(),
        "--max",
        "--json",
        "--quiet",
    ]);
    assert!(
        output.status.success(),
        "replay --dtls: {}",
        stderr(&output)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let report: Json = serde_json::from_str(stdout.lines().last().expect("a JSON line")).unwrap();
    assert_eq!(report["acknowledged"], 100, "{report}");
    assert_eq!(report["responses"]["2.04"], 100, "{report}");

    let listed = original.get_json("/v1/devices")["devices"].clone();
    assert_eq!(listed.as_array().unwrap().len(), 4, "{listed}");
    assert_eq!(listed, copy.get_json("/v1/devices")["devices"]);
    assert_eq!(
        original.points("rep-0001", "temperature"),
        copy.points("rep-0001", "temperature")
    );
}
