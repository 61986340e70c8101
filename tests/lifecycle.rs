//! End to end: the daemon's life on a data directory: restart, the lock, configuration,
//! inspection and verification; the drain on SIGTERM and systemd's notification protocol.

mod common;

use std::collections::BTreeSet;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::{binary, code, run, sluice, wait_for, Client, Daemon};

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
        .env("SLUICE_DRAIN", "0s")
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

/// Sends `signal` to the daemon.
fn signal(daemon: &Daemon, signal: i32) {
    let pid = daemon.child.as_ref().expect("daemon running").id();
    // SAFETY: signalling our own child process.
    unsafe { libc::kill(pid as i32, signal) };
}

/// Waits at most `timeout` for the daemon to exit on its own.
fn wait_exit(daemon: &mut Daemon, timeout: Duration) -> ExitStatus {
    let child = daemon.child.as_mut().expect("daemon running");
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            daemon.child = None;
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "sluiced did not exit within {timeout:?}:\n{}",
            daemon.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn still_running(daemon: &mut Daemon) -> bool {
    let child = daemon.child.as_mut().expect("daemon running");
    child.try_wait().unwrap().is_none()
}

/// One CON reading of `device` at `1763900000 + i * 60`; must be acknowledged 2.04.
fn post_one(client: &mut Client, device: &str, i: usize) {
    let payload = format!(r#"[{{"n":"temp","v":{i},"t":{}}}]"#, 1763900000 + i * 60);
    assert_eq!(
        code(&client.post(&format!("/t/{device}"), JSON, payload.as_bytes())),
        "2.04"
    );
}

#[test]
fn sigterm_turns_readyz_503_and_keeps_serving_for_the_drain_then_commits_and_exits_zero() {
    const DRAIN: Duration = Duration::from_secs(4);
    let temp = tempfile::tempdir().unwrap();
    let data_dir = temp.path().join("data");
    let mut daemon = Daemon::start_in(&data_dir, &["--drain", "4s"]);
    post_points(&daemon, "dev-drain", 5);
    assert_eq!(daemon.get("/readyz"), (200, "ready\n".to_string()));

    let signalled = Instant::now();
    signal(&daemon, libc::SIGTERM);
    wait_for("/readyz to answer 503", Duration::from_secs(5), || {
        daemon.get("/readyz").0 == 503
    });
    assert_eq!(daemon.get("/readyz"), (503, "draining\n".to_string()));
    // Still serving: a CON is acknowledged and stored, queries are answered, liveness holds.
    let mut client = Client::new(daemon.coap);
    post_one(&mut client, "dev-drain", 5);
    assert_eq!(daemon.points("dev-drain", "temp").len(), 6);
    assert_eq!(daemon.get("/healthz").0, 200);
    assert!(
        still_running(&mut daemon) && signalled.elapsed() < DRAIN,
        "the CON above was served during the drain"
    );

    let status = wait_exit(&mut daemon, DRAIN + Duration::from_secs(20));
    assert!(
        status.success(),
        "exit 0, got {status}:\n{}",
        daemon.log_text()
    );
    assert!(
        signalled.elapsed() >= DRAIN,
        "exited after {:?}, before the drain ended",
        signalled.elapsed()
    );
    let log = daemon.log_text();
    for line in ["draining", "shutting down", "stopped"] {
        assert!(log.contains(line), "`{line}` is logged:\n{log}");
    }

    let daemon = Daemon::start_in(&data_dir, &[]);
    assert_eq!(daemon.points("dev-drain", "temp").len(), 6, "all committed");
}

#[test]
fn a_second_signal_cuts_the_drain_short_and_still_commits() {
    let temp = tempfile::tempdir().unwrap();
    let data_dir = temp.path().join("data");
    let mut daemon = Daemon::start_in(&data_dir, &["--drain", "10m"]);
    post_points(&daemon, "dev-short", 3);
    let signalled = Instant::now();
    signal(&daemon, libc::SIGTERM);
    wait_for("/readyz to answer 503", Duration::from_secs(5), || {
        daemon.get("/readyz").0 == 503
    });
    let mut client = Client::new(daemon.coap);
    post_one(&mut client, "dev-short", 3);
    signal(&daemon, libc::SIGINT);
    let status = wait_exit(&mut daemon, Duration::from_secs(20));
    assert!(
        status.success(),
        "exit 0, got {status}:\n{}",
        daemon.log_text()
    );
    assert!(signalled.elapsed() < Duration::from_secs(60));
    assert!(
        daemon.log_text().contains("drain cut short"),
        "{}",
        daemon.log_text()
    );
    let daemon = Daemon::start_in(&data_dir, &[]);
    assert_eq!(daemon.points("dev-short", "temp").len(), 4, "all committed");
}

/// A sluiced told to notify the test's datagram socket, with a watchdog of 400 ms (pings every
/// 200 ms) meant for the process `watchdog_pid` (None: unset, i.e. for sluiced itself).
fn notifying_daemon(dir: &Path, watchdog_pid: Option<&str>) -> (Daemon, UnixDatagram) {
    let socket_path = dir.join("notify");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let coap = common::free_port();
    let http = common::free_port();
    let data_dir = dir.join("data");
    let log = dir.join("log");
    let mut command = Command::new(binary("sluiced"));
    command
        .arg("--data-dir")
        .arg(&data_dir)
        .args(["--coap", &format!("127.0.0.1:{coap}")])
        .args(["--http", &format!("127.0.0.1:{http}")])
        .args(["--shards", "2", "--drain", "1s"])
        .env("NOTIFY_SOCKET", &socket_path)
        .env("WATCHDOG_USEC", "400000")
        .env_remove("WATCHDOG_PID")
        .env_remove("SLUICE_LOG")
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    if let Some(pid) = watchdog_pid {
        command.env("WATCHDOG_PID", pid);
    }
    let child = command.spawn().unwrap();
    (Daemon::attach(child, coap, http, &data_dir, log), socket)
}

#[test]
fn the_watchdog_of_another_process_is_not_pinged() {
    let temp = tempfile::tempdir().unwrap();
    let (mut daemon, socket) = notifying_daemon(temp.path(), Some("1"));
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut buffer = [0u8; 512];
    loop {
        assert!(Instant::now() < deadline, "no READY=1 in time");
        if let Ok(n) = socket.recv(&mut buffer) {
            if buffer[..n].starts_with(b"READY=1") {
                break;
            }
        }
    }
    // Five ping periods without a ping.
    let quiet_until = Instant::now() + Duration::from_secs(1);
    while Instant::now() < quiet_until {
        if let Ok(n) = socket.recv(&mut buffer) {
            assert_ne!(
                &buffer[..n],
                b"WATCHDOG=1",
                "pinged another process's watchdog"
            );
        }
    }
    assert!(daemon.stop().success());
}

#[test]
fn systemd_is_told_ready_stopping_and_pinged_by_the_watchdog() {
    let temp = tempfile::tempdir().unwrap();
    let (mut daemon, socket) = notifying_daemon(temp.path(), None);
    let mut messages: Vec<String> = Vec::new();
    let receive_until =
        |what: &str, messages: &mut Vec<String>, done: &dyn Fn(&[String]) -> bool| {
            let deadline = Instant::now() + Duration::from_secs(30);
            let mut buffer = [0u8; 512];
            while !done(messages) {
                assert!(
                    Instant::now() < deadline,
                    "no {what} in time; got {messages:?}"
                );
                if let Ok(n) = socket.recv(&mut buffer) {
                    messages.push(String::from_utf8_lossy(&buffer[..n]).into_owned());
                }
            }
        };
    let has = |line: &'static str| {
        move |messages: &[String]| messages.iter().any(|m| m.lines().any(|l| l == line))
    };
    receive_until("READY=1", &mut messages, &has("READY=1"));
    // READY comes after recovery, once every socket is bound: the daemon answers at once.
    assert_eq!(daemon.get("/readyz").0, 200);
    let mut client = Client::new(daemon.coap);
    post_one(&mut client, "dev-notify", 0);
    receive_until("three watchdog pings", &mut messages, &|m: &[String]| {
        m.iter().filter(|m| *m == "WATCHDOG=1").count() >= 3
    });
    let ready = messages
        .iter()
        .position(|m| m.lines().any(|l| l == "READY=1"))
        .unwrap();
    let first_ping = messages.iter().position(|m| m == "WATCHDOG=1").unwrap();
    assert!(
        ready < first_ping,
        "READY=1 before the first ping: {messages:?}"
    );

    signal(&daemon, libc::SIGTERM);
    receive_until("STOPPING=1", &mut messages, &has("STOPPING=1"));
    let status = wait_exit(&mut daemon, Duration::from_secs(20));
    assert!(
        status.success(),
        "exit 0, got {status}:\n{}",
        daemon.log_text()
    );
    assert!(
        daemon.log_text().contains("systemd watchdog on"),
        "{}",
        daemon.log_text()
    );
}

/// The keys of the example configuration, set or commented out (`# key = value`).
fn example_keys(text: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let mut set = BTreeSet::new();
    let mut commented = BTreeSet::new();
    for line in text.lines() {
        let (target, rest) = match line.strip_prefix("# ") {
            Some(rest) => (&mut commented, rest),
            None => (&mut set, line),
        };
        if let Some((key, _)) = rest.split_once(" = ") {
            if !key.is_empty() && key.chars().all(|c| c.is_ascii_lowercase() || c == '-') {
                assert!(target.insert(key.to_string()), "`{key}` appears twice");
            }
        }
    }
    (set, commented)
}

#[test]
fn the_example_config_documents_every_key_and_passes_check_config() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/sluiced.toml");
    let text = std::fs::read_to_string(&example).unwrap();
    let (set, commented) = example_keys(&text);
    assert!(set.is_disjoint(&commented), "{set:?} / {commented:?}");

    // Every setting of `sluiced --help` is a key of the file (set or commented out).
    let help = run(Command::new(binary("sluiced")).arg("--help"));
    let flags: BTreeSet<String> = String::from_utf8_lossy(&help.stdout)
        .split_whitespace()
        .filter_map(|word| word.strip_prefix("--"))
        .map(|flag| flag.trim_end_matches([',', '.', ']', ')', '`']).to_string())
        .filter(|flag| !["config", "check-config", "help", "version"].contains(&flag.as_str()))
        .collect();
    let documented: BTreeSet<String> = set.union(&commented).cloned().collect();
    assert_eq!(
        flags, documented,
        "`sluiced --help` against deploy/sluiced.toml"
    );

    // As shipped, the file passes --check-config.
    let check = run(Command::new(binary("sluiced"))
        .arg("--config")
        .arg(&example)
        .arg("--check-config")
        .env_clear());
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&check.stdout), "configuration ok\n");

    // With every commented key enabled too (the credentials pointing at a real file).
    let temp = tempfile::tempdir().unwrap();
    let credentials = temp.path().join("devices.toml");
    std::fs::write(&credentials, "[[device]]\nid = \"meter-1\"\nkey = \"k\"\n").unwrap();
    let mut everything = String::new();
    for line in text.lines() {
        let line = match line.strip_prefix("# ") {
            Some(rest)
                if rest
                    .split_once(" = ")
                    .is_some_and(|(k, _)| commented.contains(k)) =>
            {
                rest
            }
            _ => line,
        };
        if line.starts_with("credentials = ") {
            everything.push_str(&format!("credentials = \"{}\"\n", credentials.display()));
        } else {
            everything.push_str(line);
            everything.push('\n');
        }
    }
    let full = temp.path().join("full.toml");
    std::fs::write(&full, everything).unwrap();
    let check = run(Command::new(binary("sluiced"))
        .arg("--config")
        .arg(&full)
        .arg("--check-config")
        .env_clear());
    assert!(
        check.status.success(),
        "every key enabled: {}",
        String::from_utf8_lossy(&check.stderr)
    );

    // A bad file fails the check with status 2 and the reason.
    let bad = temp.path().join("bad.toml");
    std::fs::write(&bad, "drain = \"a while\"\n").unwrap();
    let check = run(Command::new(binary("sluiced"))
        .arg("--config")
        .arg(&bad)
        .arg("--check-config")
        .env_clear());
    assert_eq!(check.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&check.stderr).contains("--drain"));
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
