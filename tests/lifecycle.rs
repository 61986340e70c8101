//! End to end: the daemon's life on a data directory: restart, the lock, configuration,
//! inspection and verification.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{binary, code, run, sluice, Client, Daemon};

const JSON: Option<u16> = Some(110);

fn post_points(daemon: &Daemon, device: &str, count: usize) {
    let mut client = Client::new(daemon.coap);
    for i in 0..count {
        let payload = format!(r#"[{{"n":"temp","v":{i},"t":{}}}]"#, 1763900000 + i * 60);
        assert_eq!(
            code(&client.post(&format!("/t/{device}"), JSON, payload.as_bytes())),
            "2.04"
        );
    }
}

#[test]
fn committed_points_survive_a_restart_and_sigterm_exits_zero() {
    let temp = tempfile::tempdir().unwrap();
    let data_dir = temp.path().join("data");
    let mut daemon = Daemon::start_in(&data_dir, &["--partition", "1h"]);
    // 200 points a minute apart: they span four hourly partitions.
    post_points(&daemon, "dev-r", 200);
    let before = daemon.points("dev-r", "temp");
    assert_eq!(before.len(), 200);
    let status = daemon.stop();
    assert!(
        status.success(),
        "SIGTERM must exit 0, got {status}:\n{}",
        daemon.log_text()
    );
    assert!(
        daemon.log_text().contains("listening"),
        "{}",
        daemon.log_text()
    );

    let daemon = Daemon::start_in(&data_dir, &["--partition", "1h"]);
    assert_eq!(daemon.points("dev-r", "temp"), before);
    assert_eq!(daemon.get_json("/v1/devices")["devices"][0]["points"], 200);
    let latest = daemon.get_json("/v1/devices/dev-r/latest");
    assert_eq!(
        latest["series"]["temp"],
        serde_json::json!([1763900000.0 + 199.0 * 60.0, 199.0])
    );
    assert!(
        daemon.log_text().contains("recovery"),
        "{}",
        daemon.log_text()
    );
}

#[test]
fn a_second_daemon_on_the_same_data_directory_refuses_to_start() {
    let daemon = Daemon::start(&[]);
    let output = run(Command::new(binary("sluiced")).args([
        "--data-dir",
        daemon.data_dir.to_str().unwrap(),
        "--coap",
        "off",
        "--http",
        "127.0.0.1:0",
    ]));
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("another sluiced"), "stderr: {stderr}");
    // The first one is unharmed.
    assert_eq!(daemon.get("/healthz").0, 200);
}

#[test]
fn config_file_and_environment_configure_the_daemon() {
    let temp = tempfile::tempdir().unwrap();
    let coap = common::free_port();
    let http = common::free_port();
    let config = temp.path().join("sluiced.toml");
    std::fs::write(
        &config,
        format!(
            "data-dir = \"{}\"\ncoap = \"127.0.0.1:{coap}\"\nhttp = \"127.0.0.1:1\"\ndurability = \"os\"\nshards = 1\n",
            temp.path().join("data").display()
        ),
    )
    .unwrap();
    // The environment overrides the file's HTTP address.
    let log = temp.path().join("log");
    let child = Command::new(binary("sluiced"))
        .arg("--config")
        .arg(&config)
        .env("SLUICE_HTTP", format!("127.0.0.1:{http}"))
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut daemon = Daemon::attach(child, coap, http, &temp.path().join("data"), log);
    daemon.wait_ready();
    post_points(&daemon, "dev-cfg", 3);
    assert_eq!(daemon.points("dev-cfg", "temp").len(), 3);
    assert!(temp.path().join("data").is_dir());
    assert!(daemon.stop().success());
}

#[test]
fn bad_command_lines_and_config_files_exit_two_with_a_message() {
    let temp = tempfile::tempdir().unwrap();
    let bad = temp.path().join("bad.toml");
    std::fs::write(&bad, "coap = 5683\n").unwrap();
    for args in [
        vec!["--shards", "zero"],
        vec!["--partition", "fortnightly"],
        vec!["--config", bad.to_str().unwrap()],
        vec!["--durability", "maybe"],
    ] {
        let output = run(Command::new(binary("sluiced")).args(&args));
        assert_eq!(output.status.code(), Some(2), "{args:?}");
        assert!(!output.stderr.is_empty(), "{args:?} prints why");
    }
}

#[test]
fn inspect_and_verify_describe_the_store_and_find_corruption() {
    let temp = tempfile::tempdir().unwrap();
    let data_dir = temp.path().join("data");
    let mut daemon = Daemon::start_in(&data_dir, &[]);
    post_points(&daemon, "dev-i", 50);
    assert!(daemon.stop().success());

    let dir = data_dir.to_str().unwrap();
    let inspect = sluice(&["inspect", "--data-dir", dir]);
    assert!(
        inspect.status.success(),
        "{}",
        String::from_utf8_lossy(&inspect.stderr)
    );
    let text = String::from_utf8_lossy(&inspect.stdout);
    assert!(text.contains("50"), "inspect shows the 50 points:\n{text}");

    let verify = sluice(&["verify", "--data-dir", dir]);
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stdout)
    );

    // Flip a byte in the middle of a segment: verify must fail.
    let segment = walk(&data_dir)
        .into_iter()
        .find(|p| p.extension().is_some_and(|e| e == "seg"))
        .expect("a segment file");
    let mut bytes = std::fs::read(&segment).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&segment, bytes).unwrap();
    let verify = sluice(&["verify", "--data-dir", dir]);
    assert_eq!(
        verify.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&verify.stdout)
    );
}

#[test]
fn durability_os_acknowledges_and_stores() {
    let daemon = Daemon::start(&["--durability", "os"]);
    post_points(&daemon, "dev-os", 20);
    assert_eq!(daemon.points("dev-os", "temp").len(), 20);
    common::wait_for("commit metrics", Duration::from_secs(5), || {
        daemon.metric("sluice_commits_total") >= 1.0
    });
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}
