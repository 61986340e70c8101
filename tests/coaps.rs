//! CoAPS end to end: libcoap's OpenSSL and GnuTLS clients and sluice's own DTLS client against
//! the real `sluiced`, with a credentials file.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use coap_lite::{MessageType, Packet, RequestType};
use common::{free_port, request, run, tool, wait_for, Daemon, RESPONSE_TIMEOUT, STARTUP_TIMEOUT};
use sluice_dtls::{Application, Client, Suite};

const CREDENTIALS: &str = r#"
[[device]]
id = "dev-7"
identity = "id-7"
key = "secret seven"

[[device]]
id = "dev-8"
key_hex = "000102030405060708090a0b0c0d0e0f"

[[device]]
id = "dev-off"
key = "secret off"
enabled = false
"#;

struct Coaps {
    daemon: Daemon,
    addr: SocketAddr,
    credentials: PathBuf,
    _dir: tempfile::TempDir,
}

fn start(credentials: &str) -> Coaps {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("credentials.toml");
    std::fs::write(&path, credentials).unwrap();
    let addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let daemon = start_daemon(&dir.path().join("data"), &path, addr);
    Coaps {
        daemon,
        addr,
        credentials: path,
        _dir: dir,
    }
}

fn start_daemon(data_dir: &Path, credentials: &Path, addr: SocketAddr) -> Daemon {
    Daemon::start_in(
        data_dir,
        &[
            "--credentials",
            credentials.to_str().unwrap(),
            "--coaps",
            &addr.to_string(),
            "--durability",
            "os",
        ],
    )
}

/// Posts with a libcoap client (`coap-client-openssl` or `-gnutls`); returns its output, which
/// is empty for a 2.04 (the clients exit 0 even when the handshake fails).
fn libcoap_post(
    client: &str,
    addr: SocketAddr,
    identity: &str,
    key: &str,
    path: &str,
    payload: &str,
) -> String {
    let output = run(Command::new(tool(client)).args([
        "-B",
        "5",
        "-u",
        identity,
        "-k",
        key,
        "-m",
        "post",
        "-t",
        "110",
        "-e",
        payload,
        &format!("coaps://{addr}{path}"),
    ]));
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn stored_value(daemon: &Daemon, device: &str, name: &str) -> Option<serde_json::Value> {
    let (status, body) = daemon.get(&format!("/v1/devices/{device}/latest"));
    if status != 200 {
        return None;
    }
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    json["series"].get(name).map(|point| point[1].clone())
}

#[test]
fn openssl_and_gnutls_clients_store_under_the_identitys_device() {
    let coaps = start(CREDENTIALS);
    for (client, name) in [
        ("coap-client-openssl", "temp"),
        ("coap-client-gnutls", "hum"),
    ] {
        let payload = format!(r#"[{{"n":"{name}","v":21.5}}]"#);
        let output = libcoap_post(client, coaps.addr, "id-7", "secret seven", "/t", &payload);
        assert!(
            !output.contains("4.") && !output.contains("ERR"),
            "{client}: {output}"
        );
        assert_eq!(
            stored_value(&coaps.daemon, "dev-7", name),
            Some(serde_json::json!(21.5)),
            "{client}: {output}"
        );
    }
    // The path may name the device itself; another device's path is 4.03 and stores nothing.
    let output = libcoap_post(
        "coap-client-openssl",
        coaps.addr,
        "id-7",
        "secret seven",
        "/t/dev-7",
        r#"[{"n":"own","v":1}]"#,
    );
    assert!(output.trim().is_empty(), "{output}");
    assert_eq!(
        stored_value(&coaps.daemon, "dev-7", "own"),
        Some(serde_json::json!(1.0))
    );
    let output = libcoap_post(
        "coap-client-gnutls",
        coaps.addr,
        "id-7",
        "secret seven",
        "/t/dev-8",
        r#"[{"n":"x","v":1}]"#,
    );
    assert!(output.contains("4.03"), "{output}");
    assert_eq!(stored_value(&coaps.daemon, "dev-8", "x"), None);
    assert!(
        coaps
            .daemon
            .metric("sluice_dtls_handshakes_completed_total")
            >= 4.0
    );
}

#[test]
fn bad_keys_unknown_and_disabled_identities_and_plain_coap_store_nothing() {
    let coaps = start(CREDENTIALS);
    let attempts = [
        ("coap-client-openssl", "id-7", "wrong key"),
        ("coap-client-gnutls", "id-7", "wrong key"),
        ("coap-client-openssl", "nobody", "secret seven"),
        ("coap-client-gnutls", "dev-off", "secret off"),
    ];
    for (client, identity, key) in attempts {
        let output = libcoap_post(
            client,
            coaps.addr,
            identity,
            key,
            "/t",
            r#"[{"n":"bad","v":1}]"#,
        );
        assert!(
            !output.trim().is_empty(),
            "{client} {identity}: no error shown"
        );
    }
    // Plain CoAP to the CoAPS port: not DTLS, dropped and counted.
    let mut plain = common::Client::new(coaps.addr);
    let message_id = plain.message_id();
    plain.send(&request(
        MessageType::Confirmable,
        RequestType::Post,
        message_id,
        "/t/dev-7",
        Some(110),
        br#"[{"n":"bad","v":1}]"#,
    ));
    wait_for("the failures to be counted", RESPONSE_TIMEOUT, || {
        coaps.daemon.metric("sluice_dtls_handshakes_failed_total") >= 4.0
            && coaps.daemon.metric("sluice_dtls_records_malformed_total") >= 1.0
    });
    assert!(plain.receive_within(Duration::from_millis(200)).is_none());
    assert_eq!(
        coaps.daemon.metric("sluice_dtls_unknown_identities_total"),
        2.0
    );
    assert_eq!(
        coaps
            .daemon
            .metric("sluice_dtls_handshakes_completed_total"),
        0.0
    );
    assert_eq!(coaps.daemon.metric("sluice_points_stored_total"), 0.0);
    let devices = coaps.daemon.get_json("/v1/devices");
    assert_eq!(devices["devices"], serde_json::json!([]));
}

/// A device on its own UDP socket speaking sluice's DTLS client.
struct Device {
    socket: UdpSocket,
    client: Client,
    message_id: u16,
}

impl Device {
    fn connect(server: SocketAddr, identity: &str, key: &[u8]) -> Device {
        Device::connect_from(
            UdpSocket::bind("127.0.0.1:0").unwrap(),
            server,
            identity,
            key,
        )
    }

    /// Handshakes over `socket` (e.g. one bound to a port another device used before).
    fn connect_from(socket: UdpSocket, server: SocketAddr, identity: &str, key: &[u8]) -> Device {
        socket.connect(server).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let mut client = Client::new(identity.as_bytes(), key, &[Suite::Aes128Ccm8]);
        let mut out = Vec::new();
        client.start(&mut out);
        let mut application = Application::default();
        let mut buffer = vec![0; 2048];
        for _ in 0..20 {
            if !out.is_empty() {
                socket.send(&out).unwrap();
                out.clear();
            }
            if client.is_connected() {
                break;
            }
            match socket.recv(&mut buffer) {
                Ok(n) => client
                    .handle(&buffer[..n], &mut out, &mut application)
                    .unwrap(),
                Err(_) => client.retransmit(&mut out),
            }
        }
        assert!(
            client.is_connected(),
            "handshake as {identity} did not complete"
        );
        Device {
            socket,
            client,
            message_id: 1,
        }
    }

    /// Seals a CON POST of `payload` to /t; returns the datagram sent.
    fn post(&mut self, payload: &str) -> Vec<u8> {
        self.message_id += 1;
        let packet = request(
            MessageType::Confirmable,
            RequestType::Post,
            self.message_id,
            "/t",
            Some(110),
            payload.as_bytes(),
        );
        let mut datagram = Vec::new();
        self.client
            .seal(&packet.to_bytes().unwrap(), &mut datagram)
            .unwrap();
        self.socket.send(&datagram).unwrap();
        datagram
    }

    /// The next CoAP message from the server within `timeout`.
    fn receive(&mut self, timeout: Duration) -> Option<Packet> {
        self.socket.set_read_timeout(Some(timeout)).unwrap();
        let mut buffer = vec![0; 2048];
        let mut application = Application::default();
        let n = self.socket.recv(&mut buffer).ok()?;
        self.client
            .handle(&buffer[..n], &mut Vec::new(), &mut application)
            .ok()?;
        let plaintext = application.records().next()?.to_vec();
        Packet::from_bytes(&plaintext).ok()
    }

    fn post_and_expect(&mut self, payload: &str, code: &str) {
        self.post(payload);
        let response = self
            .receive(RESPONSE_TIMEOUT)
            .expect("a response over DTLS");
        assert_eq!(common::code(&response), code);
    }
}

#[test]
fn a_replayed_record_is_dropped_and_counted() {
    let coaps = start(CREDENTIALS);
    let mut device = Device::connect(coaps.addr, "id-7", b"secret seven");
    let datagram = device.post(r#"[{"n":"once","v":1}]"#);
    assert_eq!(
        common::code(&device.receive(RESPONSE_TIMEOUT).unwrap()),
        "2.04"
    );
    device.socket.send(&datagram).unwrap();
    wait_for("the replay to be counted", RESPONSE_TIMEOUT, || {
        coaps.daemon.metric("sluice_dtls_records_replayed_total") == 1.0
    });
    assert!(
        device.receive(Duration::from_millis(200)).is_none(),
        "a replay gets no answer"
    );
    assert_eq!(coaps.daemon.points("dev-7", "once").len(), 1);
}

#[test]
fn sighup_adds_a_device_while_sessions_continue_and_a_bad_file_is_refused() {
    let coaps = start(CREDENTIALS);
    let mut seven = Device::connect(coaps.addr, "id-7", b"secret seven");
    seven.post_and_expect(r#"[{"n":"a","v":1}]"#, "2.04");

    let pid = coaps.daemon.child.as_ref().unwrap().id() as i32;
    std::fs::write(
        &coaps.credentials,
        format!("{CREDENTIALS}\n[[device]]\nid = \"dev-9\"\nkey = \"nine\"\nkey = \"again\"\n"),
    )
    .unwrap();
    // SAFETY: signalling the daemon this test started.
    unsafe { libc::kill(pid, libc::SIGHUP) };
    wait_for("the refusal to be logged", STARTUP_TIMEOUT, || {
        coaps.daemon.log_text().contains("credentials not reloaded")
    });
    assert!(
        coaps.daemon.log_text().contains("line 19: duplicate key"),
        "{}",
        coaps.daemon.log_text()
    );

    std::fs::write(
        &coaps.credentials,
        format!("{CREDENTIALS}\n[[device]]\nid = \"dev-9\"\nkey = \"nine\"\n"),
    )
    .unwrap();
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGHUP) };
    wait_for("the reload to be logged", STARTUP_TIMEOUT, || {
        coaps.daemon.log_text().contains("credentials reloaded")
    });
    let mut nine = Device::connect(coaps.addr, "dev-9", b"nine");
    nine.post_and_expect(r#"[{"n":"b","v":2}]"#, "2.04");
    seven.post_and_expect(r#"[{"n":"a","v":3}]"#, "2.04");
    assert_eq!(
        stored_value(&coaps.daemon, "dev-9", "b"),
        Some(serde_json::json!(2.0))
    );
    assert_eq!(
        stored_value(&coaps.daemon, "dev-7", "a"),
        Some(serde_json::json!(3.0))
    );
    assert_eq!(
        coaps
            .daemon
            .metric("sluice_dtls_handshakes_completed_total"),
        2.0
    );
}

#[test]
fn a_session_continues_across_a_graceful_restart() {
    let mut coaps = start(CREDENTIALS);
    let mut device = Device::connect(coaps.addr, "dev-8", &(0..16).collect::<Vec<u8>>());
    device.post_and_expect(r#"[{"n":"before","v":1}]"#, "2.04");
    assert!(coaps.daemon.stop().success());
    let data_dir = coaps.daemon.data_dir.clone();
    let files: Vec<_> = std::fs::read_dir(&data_dir)
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("dtls-sessions-")
        })
        .collect();
    assert!(!files.is_empty());
    for file in &files {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(file.metadata().unwrap().permissions().mode() & 0o777, 0o600);
    }
    coaps.daemon = start_daemon(&data_dir, &coaps.credentials, coaps.addr);
    device.post_and_expect(r#"[{"n":"after","v":2}]"#, "2.04");
    assert_eq!(
        stored_value(&coaps.daemon, "dev-8", "after"),
        Some(serde_json::json!(2.0))
    );
    assert_eq!(
        coaps.daemon.metric("sluice_dtls_handshakes_started_total"),
        0.0,
        "no new handshake"
    );
}

#[test]
fn a_new_session_on_a_reused_port_is_not_answered_from_the_old_sessions_exchanges() {
    let coaps = start(CREDENTIALS);
    let port = {
        let mut first = Device::connect(coaps.addr, "id-7", b"secret seven");
        first.message_id = 100;
        first.post_and_expect(r#"[{"n":"x","v":1}]"#, "2.04");
        first.socket.local_addr().unwrap().port()
    };
    // Another device handshakes from the very same address and port and reuses Message ID 101:
    // CoAP Message IDs are scoped to the DTLS session, so this is a new request.
    let socket = UdpSocket::bind(("127.0.0.1", port)).unwrap();
    let key: Vec<u8> = (0..16u8).collect();
    let mut second = Device::connect_from(socket, coaps.addr, "dev-8", &key);
    second.message_id = 100;
    second.post_and_expect(r#"[{"n":"y","v":2}]"#, "2.04");
    assert_eq!(coaps.daemon.metric("sluice_duplicates_total"), 0.0);
    assert_eq!(coaps.daemon.points("dev-8", "y").len(), 1);
    assert_eq!(coaps.daemon.points("dev-7", "x").len(), 1);
}
