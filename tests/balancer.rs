//! End to end: two sluiced nodes behind nginx's UDP load balancer, configured by the very file
//! `deploy/nginx/sluice.conf` with the addresses replaced. A fleet through the balancer lands on
//! both nodes; one node is killed (SIGKILL) while the fleet keeps sending; its devices re-home to
//! the other node and every reading that was acknowledged is found on one of the nodes.
//!
//! Needs nginx and its stream module (Debian `nginx-light` and `libnginx-mod-stream`, installed
//! by `.ci/run`). Without them the test fails under CI=true and is skipped, loudly, elsewhere.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use coap_lite::{MessageType, Packet, RequestType};
use common::{free_port, request, Daemon};

/// The stream module as Debian's libnginx-mod-stream installs it.
const STREAM_MODULE: &str = "/usr/lib/nginx/modules/ngx_stream_module.so";
/// Devices of the fleet the test tracks reading by reading, each on its own socket.
const DEVICES: usize = 32;
/// Readings each device sends before the kill, and again after it.
const READINGS_PER_PHASE: u32 = 5;
/// A fixed reading time base, so every reading is one (device, time) pair.
const T0: i64 = 1_763_899_200;
/// CoAP retransmission as a device does it (RFC 7252 §4.2), with a shorter first timeout so
/// the test does not wait 2 s per lost request: 1 s, doubling, 5 retransmissions (63 s in all,
/// which covers the balancer's fail_timeout of 10 s twice over).
const ACK_TIMEOUT: Duration = Duration::from_secs(1);
const MAX_RETRANSMIT: u32 = 5;

fn nginx_binary() -> Option<PathBuf> {
    let in_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("nginx"))
            .find(|candidate| candidate.is_file())
    });
    in_path
        .or_else(|| Some(PathBuf::from("/usr/sbin/nginx")).filter(|p| p.is_file()))
        .filter(|_| Path::new(STREAM_MODULE).is_file())
}

/// nginx as a child process (master and workers, not daemonized) with its own prefix, pid file
/// and error log in a temporary directory.
struct Nginx {
    child: Option<Child>,
    dir: tempfile::TempDir,
    listen: SocketAddr,
    coaps_listen: SocketAddr,
}

impl Nginx {
    /// Runs `deploy/nginx/sluice.conf` listening on free loopback ports, with `nodes` as the
    /// CoAP upstreams and `coaps_nodes` as the CoAPS ones (closed ports when None).
    fn start(nginx: &Path, nodes: [SocketAddr; 2], coaps_nodes: Option<[SocketAddr; 2]>) -> Nginx {
        let dir = tempfile::tempdir().expect("temp dir");
        let listen: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let coaps_listen: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let closed = || SocketAddr::from(([127, 0, 0, 1], free_port()));
        let coaps_nodes = coaps_nodes.unwrap_or_else(|| [closed(), closed()]);
        let shipped = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/nginx/sluice.conf"),
        )
        .expect("deploy/nginx/sluice.conf");
        // The shipped file with the example addresses replaced: each must be there, so a change
        // of the file that this test does not follow fails here.
        let mut conf = shipped.clone();
        for (from, to) in [
            ("listen 5683 udp", format!("listen {listen} udp")),
            ("listen 5684 udp", format!("listen {coaps_listen} udp")),
            ("10.0.0.11:5683", nodes[0].to_string()),
            ("10.0.0.12:5683", nodes[1].to_string()),
            ("10.0.0.11:5684", coaps_nodes[0].to_string()),
            ("10.0.0.12:5684", coaps_nodes[1].to_string()),
        ] {
            assert!(
                conf.contains(from),
                "deploy/nginx/sluice.conf no longer has `{from}`"
            );
            conf = conf.replace(from, &to);
        }
        std::fs::write(dir.path().join("sluice.conf"), conf).unwrap();
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        let main = format!(
            "load_module {STREAM_MODULE};\n{}worker_processes 2;\npid {dir}/nginx.pid;\n\
             error_log {dir}/error.log info;\nevents {{ worker_connections 1024; }}\n\
             include {dir}/sluice.conf;\n",
            if root { "user root;\n" } else { "" },
            dir = dir.path().display()
        );
        std::fs::write(dir.path().join("nginx.conf"), main).unwrap();
        let child = Command::new(nginx)
            .arg("-p")
            .arg(dir.path())
            .arg("-e")
            .arg(dir.path().join("error.log"))
            .arg("-c")
            .arg(dir.path().join("nginx.conf"))
            .args(["-g", "daemon off;"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("stderr.log")).unwrap())
            .spawn()
            .expect("start nginx");
        let mut nginx = Nginx {
            child: Some(child),
            dir,
            listen,
            coaps_listen,
        };
        nginx.wait_ready();
        nginx
    }

    fn log(&self) -> String {
        let read = |name: &str| std::fs::read_to_string(self.dir.path().join(name));
        format!(
            "{}{}",
            read("stderr.log").unwrap_or_default(),
            read("error.log").unwrap_or_default()
        )
    }

    /// A CoAP ping (empty CON) through the balancer until a node answers it with RST.
    fn wait_ready(&mut self) {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.connect(self.listen).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let deadline = Instant::now() + common::STARTUP_TIMEOUT;
        let mut buffer = [0u8; 64];
        for message_id in 1u16.. {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("nginx exited with {status}:\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "nginx did not relay a CoAP ping in time:\n{}",
                self.log()
            );
            let [high, low] = message_id.to_be_bytes();
            let _ = socket.send(&[0x40, 0x00, high, low]);
            if let Ok(len) = socket.recv(&mut buffer) {
                if len >= 4 && buffer[0] >> 4 == 0x7 {
                    return;
                }
            }
        }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGTERM: the master stops its workers (a SIGKILL would leave them behind).
            // SAFETY: signalling our own child process.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// One device: its own socket (source port), so the balancer hashes it on its own.
struct Device {
    name: String,
    socket: UdpSocket,
    message_id: u16,
}

impl Device {
    fn new(index: usize, balancer: SocketAddr) -> Device {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.connect(balancer).unwrap();
        Device {
            name: format!("lb-{index:02}"),
            socket,
            message_id: (index as u16).wrapping_mul(1000),
        }
    }

    /// Posts the reading `seq` = `k` at time T0 + k as a CON and retransmits it as a device
    /// would until a response comes. Returns the response code, or None when every
    /// retransmission went unanswered. Datagrams that are not the response are skipped: nginx
    /// relays an empty datagram when a node refuses a session (ICMP port unreachable).
    fn post(&mut self, k: u32) -> Option<String> {
        self.message_id = self.message_id.wrapping_add(1);
        let payload = format!(r#"[{{"n":"seq","t":{},"v":{k}}}]"#, T0 + i64::from(k));
        let packet = request(
            MessageType::Confirmable,
            RequestType::Post,
            self.message_id,
            &format!("/t/{}", self.name),
            Some(110),
            payload.as_bytes(),
        );
        let bytes = packet.to_bytes_unlimited().unwrap();
        let mut timeout = ACK_TIMEOUT;
        let mut buffer = [0u8; 2048];
        for _ in 0..=MAX_RETRANSMIT {
            let _ = self.socket.send(&bytes);
            let deadline = Instant::now() + timeout;
            while let Some(left) = deadline.checked_duration_since(Instant::now()) {
                self.socket
                    .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                    .unwrap();
                let Ok(len) = self.socket.recv(&mut buffer) else {
                    // A timeout, or ECONNREFUSED from an ICMP error: wait out the deadline.
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                };
                match Packet::from_bytes(&buffer[..len]) {
                    Ok(response) if response.header.message_id == self.message_id => {
                        return Some(response.header.get_code());
                    }
                    _ => continue,
                }
            }
            timeout *= 2;
        }
        None
    }
}

/// Every device sends readings `range` in turn (the devices in parallel); returns the
/// acknowledged (2.04) ones and the answers that were not 2.04.
fn send_phase(
    devices: &mut [Device],
    range: std::ops::Range<u32>,
) -> (Vec<(String, u32)>, Vec<String>) {
    std::thread::scope(|scope| {
        let handles: Vec<_> = devices
            .iter_mut()
            .map(|device| {
                let range = range.clone();
                scope.spawn(move || {
                    let mut acknowledged = Vec::new();
                    let mut failures = Vec::new();
                    for k in range {
                        match device.post(k) {
                            Some(code) if code == "2.04" => {
                                acknowledged.push((device.name.clone(), k))
                            }
                            other => {
                                // A device that got no ACK stops: the test fails anyway, and
                                // waiting out every retransmission of every reading would
                                // take minutes.
                                failures.push(format!("{} seq {k}: {other:?}", device.name));
                                break;
                            }
                        }
                    }
                    (acknowledged, failures)
                })
            })
            .collect();
        let mut acknowledged = Vec::new();
        let mut failures = Vec::new();
        for handle in handles {
            let (a, f) = handle.join().expect("device thread");
            acknowledged.extend(a);
            failures.extend(f);
        }
        (acknowledged, failures)
    })
}

/// Devices a node holds with their point counts.
fn devices_of(node: &Daemon) -> BTreeMap<String, u64> {
    node.get_json("/v1/devices")["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["device"].as_str().unwrap().to_string(),
                d["points"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// The `seq` values a node stored for a device (none if it does not know the device).
fn readings_of(node: &Daemon, device: &str) -> BTreeSet<u32> {
    let (status, body) = node.get(&format!("/v1/series?device={device}&name=seq"));
    if status == 404 {
        return BTreeSet::new();
    }
    assert_eq!(status, 200, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    json["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p[1].as_f64().unwrap() as u32)
        .collect()
}

/// nginx, or None (the test is skipped, loudly) when it is missing outside CI.
fn nginx_or_skip(test: &str) -> Option<PathBuf> {
    let found = nginx_binary();
    if found.is_none() {
        let message = format!(
            "nginx with its stream module ({STREAM_MODULE}) is not installed: run the README's \
             test command, which installs it (Debian packages nginx-light and libnginx-mod-stream)"
        );
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("{message}");
        }
        eprintln!("SKIPPED {test}: {message}");
    }
    found
}

#[test]
fn a_fleet_behind_nginx_spreads_over_two_nodes_and_rehomes_when_one_dies() {
    let Some(nginx) =
        nginx_or_skip("a_fleet_behind_nginx_spreads_over_two_nodes_and_rehomes_when_one_dies")
    else {
        return;
    };
    let temp = tempfile::tempdir().unwrap();
    let (dir_a, dir_b) = (temp.path().join("a"), temp.path().join("b"));
    // `os` durability: an acknowledged reading survives the SIGKILL of the process (not a power
    // loss), which is what this test does to a node.
    let mut node_a = Daemon::start_in(&dir_a, &["--durability", "os"]);
    let mut node_b = Daemon::start_in(&dir_b, &["--durability", "os"]);
    let balancer = Nginx::start(&nginx, [node_a.coap, node_b.coap], None);

    // 1. A load-generator fleet (200 devices, each its own source port) lands on both nodes.
    let output = common::sluice(&[
        "load",
        "--target",
        &balancer.listen.to_string(),
        "--devices",
        "200",
        "--count",
        "1000",
        "--device-prefix",
        "fleet-",
        "--json",
        "--quiet",
    ]);
    assert!(
        output.status.success(),
        "sluice load: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let report: serde_json::Value =
        serde_json::from_str(stdout.lines().last().unwrap_or("")).expect("load --json line");
    let load_acknowledged = report["acknowledged"].as_u64().unwrap();
    assert_eq!(load_acknowledged, 1000, "{report}");
    let (on_a, on_b) = (devices_of(&node_a), devices_of(&node_b));
    let fleet_points = |m: &BTreeMap<String, u64>| -> u64 {
        m.iter()
            .filter(|(d, _)| d.starts_with("fleet-"))
            .map(|(_, p)| p)
            .sum()
    };
    assert!(
        fleet_points(&on_a) > 100 && fleet_points(&on_b) > 100,
        "the fleet should land on both nodes: {} points on A, {} on B",
        fleet_points(&on_a),
        fleet_points(&on_b)
    );
    assert!(fleet_points(&on_a) + fleet_points(&on_b) >= load_acknowledged);

    // 2. Tracked devices: every acknowledged reading is remembered.
    let mut devices: Vec<Device> = (0..DEVICES)
        .map(|i| Device::new(i, balancer.listen))
        .collect();
    let (mut acknowledged, failures) = send_phase(&mut devices, 0..READINGS_PER_PHASE);
    assert!(failures.is_empty(), "before the kill: {failures:?}");
    let homed_on_b: BTreeSet<String> = devices_of(&node_b)
        .into_keys()
        .filter(|d| d.starts_with("lb-"))
        .collect();
    assert!(
        !homed_on_b.is_empty() && homed_on_b.len() < DEVICES,
        "the tracked devices should land on both nodes: {} of {DEVICES} on B",
        homed_on_b.len()
    );

    // 3. Node B dies without a chance to say so; the fleet keeps sending.
    let mut b = node_b.child.take().unwrap();
    b.kill().unwrap();
    b.wait().unwrap();
    let (after, failures) = send_phase(&mut devices, READINGS_PER_PHASE..2 * READINGS_PER_PHASE);
    assert!(
        failures.is_empty(),
        "after the kill every device should re-home to node A: {failures:?}\n{}",
        balancer.log()
    );
    acknowledged.extend(after.iter().cloned());

    // Devices that were on B now write to A.
    for device in &homed_on_b {
        let on_a = readings_of(&node_a, device);
        assert!(
            (READINGS_PER_PHASE..2 * READINGS_PER_PHASE).all(|k| on_a.contains(&k)),
            "{device} was on B and should have re-homed to A: A holds {on_a:?}"
        );
    }

    // 4. Node B comes back on its data directory (recovery); nothing acknowledged is lost: every
    // acknowledged reading is on A or on B.
    drop(balancer);
    let node_b = Daemon::start_in(&dir_b, &[]);
    let mut missing = Vec::new();
    let mut by_device: BTreeMap<&str, BTreeSet<u32>> = BTreeMap::new();
    for (device, k) in &acknowledged {
        let stored = by_device.entry(device).or_insert_with(|| {
            let mut both = readings_of(&node_a, device);
            both.extend(readings_of(&node_b, device));
            both
        });
        if !stored.contains(k) {
            missing.push(format!("{device} seq {k}"));
        }
    }
    assert!(
        missing.is_empty(),
        "acknowledged but on neither node: {missing:?}"
    );
    assert_eq!(
        acknowledged.len(),
        DEVICES * 2 * READINGS_PER_PHASE as usize
    );
    // The load fleet's readings acknowledged by B before the kill are still there too.
    let (on_a, on_b) = (devices_of(&node_a), devices_of(&node_b));
    assert!(fleet_points(&on_a) + fleet_points(&on_b) >= load_acknowledged);
    assert_eq!(node_a.stop().code(), Some(0), "{}", node_a.log_text());
}

/// Writes `sluice load --gen-credentials N --device-prefix P > path`.
fn gen_credentials(path: &Path, count: usize, prefix: &str) {
    let file = std::fs::File::create(path).unwrap();
    let status = Command::new(common::binary("sluice"))
        .args(["load", "--gen-credentials", &count.to_string()])
        .args(["--device-prefix", prefix])
        .stdin(Stdio::null())
        .stdout(file)
        .status()
        .unwrap();
    assert!(status.success(), "sluice load --gen-credentials failed");
}

#[test]
fn dtls_devices_handshake_through_nginx_and_spread_over_both_nodes() {
    let Some(nginx) =
        nginx_or_skip("dtls_devices_handshake_through_nginx_and_spread_over_both_nodes")
    else {
        return;
    };
    let temp = tempfile::tempdir().unwrap();
    let credentials = temp.path().join("credentials.toml");
    gen_credentials(&credentials, 40, "dtls-");
    let start = |name: &str| {
        let coaps: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let node = Daemon::start_in(
            &temp.path().join(name),
            &[
                "--credentials",
                credentials.to_str().unwrap(),
                "--coaps",
                &coaps.to_string(),
                "--durability",
                "os",
            ],
        );
        (node, coaps)
    };
    let ((node_a, coaps_a), (node_b, coaps_b)) = (start("a"), start("b"));
    let balancer = Nginx::start(&nginx, [node_a.coap, node_b.coap], Some([coaps_a, coaps_b]));
    // Each device handshakes through nginx, then sends its readings in the same nginx session
    // (the CoAPS server block keeps sessions open): the node's DTLS session stays valid.
    let output = common::sluice(&[
        "load",
        "--target",
        &balancer.coaps_listen.to_string(),
        "--dtls",
        "--credentials",
        credentials.to_str().unwrap(),
        "--devices",
        "40",
        "--count",
        "400",
        "--json",
        "--quiet",
    ]);
    assert!(
        output.status.success(),
        "sluice load --dtls through nginx: {}\n{}",
        String::from_utf8_lossy(&output.stderr),
        balancer.log()
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let report: serde_json::Value =
        serde_json::from_str(stdout.lines().last().unwrap_or("")).expect("load --json line");
    assert_eq!(report["acknowledged"], 400, "{report}");
    assert_eq!(report["timeouts"], 0, "{report}");
    let (on_a, on_b) = (devices_of(&node_a), devices_of(&node_b));
    let points = |m: &BTreeMap<String, u64>| -> u64 { m.values().sum() };
    assert!(
        !on_a.is_empty() && !on_b.is_empty(),
        "the DTLS devices should land on both nodes: {on_a:?} / {on_b:?}"
    );
    // Stored under the identities' device ids, each device on one node only (affinity).
    assert!(on_a
        .keys()
        .chain(on_b.keys())
        .all(|d| d.starts_with("dtls-")));
    assert!(
        on_a.keys().all(|d| !on_b.contains_key(d)),
        "{on_a:?} / {on_b:?}"
    );
    assert_eq!(points(&on_a) + points(&on_b), 400);
}
