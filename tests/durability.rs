//! End to end: what sluiced acknowledged is stored exactly once, whatever happens to the
//! process: SIGKILL at random moments under CON load, restarts with another shard count, and
//! retransmissions that arrive after the restart.

mod common;

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use coap_lite::{MessageType, Packet, RequestType};
use common::{binary, code, free_port, request, Daemon};
use rand::{Rng, SeedableRng};

const JSON: Option<u16> = Some(110);
/// Devices sending at once in the kill test: each is its own UDP peer with one CON in flight.
const DEVICES: usize = 24;
/// How long a device waits for an ACK before it retransmits (the same datagram).
const RETRANSMIT_AFTER: Duration = Duration::from_millis(200);
/// A device gives up an exchange after this long without an ACK (the daemon is gone).
const EXCHANGE_GIVE_UP: Duration = Duration::from_secs(10);
/// Requests one device sends in one cycle at most: bounds every load loop.
const REQUESTS_PER_CYCLE_MAX: u32 = 5_000;

/// Starts sluiced with `shards` shards on fresh ports and waits until it is ready.
fn start(data_dir: &Path, shards: usize, extra: &[&str]) -> Daemon {
    let coap = free_port();
    let http = free_port();
    let log = data_dir.with_extension(format!("{coap}.log"));
    std::fs::create_dir_all(data_dir.parent().unwrap()).unwrap();
    let child = Command::new(binary("sluiced"))
        .arg("--data-dir")
        .arg(data_dir)
        .args(["--coap", &format!("127.0.0.1:{coap}")])
        .args(["--http", &format!("127.0.0.1:{http}")])
        .args(["--shards", &shards.to_string()])
        // What is acknowledged is under test here, not shedding (tests/overload.rs): on a loaded
        // machine a debug build can queue a datagram past the default --shed-delay, and its 5.03
        // would end the device's exchange unacknowledged.
        .args(["--shed-delay", "off"])
        .args(extra)
        .env_remove("SLUICE_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("start sluiced");
    let mut daemon = Daemon::attach(child, coap, http, data_dir, log);
    daemon.wait_ready();
    daemon
}

fn kill(daemon: &mut Daemon) {
    let mut child = daemon.child.take().expect("running");
    child.kill().expect("SIGKILL");
    child.wait().unwrap();
}

/// The request a device sends for its `sequence`-th reading: value and time name it.
fn reading(device: usize, sequence: u32) -> Vec<u8> {
    let payload = format!(
        r#"[{{"n":"seq","v":{sequence},"t":{}}}]"#,
        1_763_900_000 + u64::from(sequence)
    );
    let packet = request(
        MessageType::Confirmable,
        RequestType::Post,
        sequence as u16,
        &format!("/t/kill-{device}"),
        JSON,
        payload.as_bytes(),
    );
    packet.to_bytes_unlimited().unwrap()
}

/// Sends `datagram` until its ACK arrives (retransmitting the same bytes) or `give_up`;
/// returns the ACK's bytes.
fn exchange(
    socket: &UdpSocket,
    server: SocketAddr,
    datagram: &[u8],
    give_up: Duration,
) -> Option<Vec<u8>> {
    let message_id = u16::from_be_bytes([datagram[2], datagram[3]]);
    let deadline = Instant::now() + give_up;
    let mut buffer = [0u8; 2048];
    while Instant::now() < deadline {
        socket.send_to(datagram, server).ok()?;
        let sent = Instant::now();
        while sent.elapsed() < RETRANSMIT_AFTER {
            let Ok((len, from)) = socket.recv_from(&mut buffer) else {
                break;
            };
            // Only this daemon's answer: a late one of the killed daemon (e.g. a 5.03 it shed
            // after the device gave up on it) may still wait in the socket.
            if from == server
                && len >= 4
                && u16::from_be_bytes([buffer[2], buffer[3]]) == message_id
            {
                return Some(buffer[..len].to_vec());
            }
        }
    }
    None
}

struct Device {
    socket: UdpSocket,
    /// Readings acknowledged with 2.04.
    acknowledged: Vec<u32>,
    /// The reading in flight when the daemon died (retransmitted after the restart).
    in_flight: Option<u32>,
    next: u32,
}

#[test]
fn retransmissions_after_a_crash_and_a_shard_count_change_are_answered_again_and_a_reused_message_id_is_new(
) {
    let temp = tempfile::tempdir().unwrap();
    let data_dir = temp.path().join("data");
    let mut daemon = start(&data_dir, 2, &[]);
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let mut acks = Vec::new();
    for sequence in 1..=20 {
        let datagram = reading(0, sequence);
        let ack = exchange(&socket, daemon.coap, &datagram, EXCHANGE_GIVE_UP).expect("ACK");
        assert_eq!(code(&Packet::from_bytes(&ack).unwrap()), "2.04");
        acks.push((datagram, ack));
    }
    kill(&mut daemon);

    // Another shard count: the peer may land on another shard; every shard knows its history.
    let daemon = start(&data_dir, 1, &[]);
    for (datagram, ack) in &acks {
        let again = exchange(&socket, daemon.coap, datagram, EXCHANGE_GIVE_UP).expect("ACK");
        assert_eq!(&again, ack, "the same ACK bytes as before the crash");
    }
    assert_eq!(daemon.points("kill-0", "seq").len(), 20, "stored once each");
    assert_eq!(daemon.metric("sluice_duplicates_total"), 20.0);
    // A new request that reuses a restored exchange's peer and Message ID with another token
    // (another device behind the same NAT port, or this one restarted): stored, not taken for a
    // retransmission.
    let mut reused = Packet::from_bytes(&reading(0, 21)).unwrap();
    reused.header.message_id = 5;
    reused.set_token(vec![0xee, 0x21]);
    let reused = reused.to_bytes_unlimited().unwrap();
    let ack = exchange(&socket, daemon.coap, &reused, EXCHANGE_GIVE_UP).expect("ACK");
    let ack = Packet::from_bytes(&ack).unwrap();
    assert_eq!(code(&ack), "2.04");
    assert_eq!(ack.get_token(), &[0xee, 0x21][..]);
    assert_eq!(
        daemon.points("kill-0", "seq").len(),
        21,
        "the new reading is stored"
    );
    assert_eq!(daemon.metric("sluice_message_id_reuses_total"), 1.0);
    assert!(
        daemon.log_text().contains("exchanges restored"),
        "{}",
        daemon.log_text()
    );
}

/// `cycles` times: CON load from `DEVICES` devices, SIGKILL at a random moment, restart,
/// retransmit what was in flight. Then every reading any device saw acknowledged is stored
/// exactly once, and nothing is stored twice.
/// `SLUICE_KILL_CYCLES` asks for more cycles (scripts/soak-kill).
fn kill_cycles(durability: &str, cycles: usize) {
    let cycles = std::env::var("SLUICE_KILL_CYCLES")
        .ok()
        .and_then(|cycles| cycles.parse().ok())
        .unwrap_or(cycles);
    let seed: u64 = std::env::var("SLUICE_KILL_SEED")
        .ok()
        .and_then(|seed| seed.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("kill test seed {seed} (SLUICE_KILL_SEED={seed} to repeat)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let temp = tempfile::tempdir().unwrap();
    let data_dir = temp.path().join("data");
    let extra = ["--durability", durability];
    let mut devices: Vec<Device> = (0..DEVICES)
        .map(|_| {
            let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
            socket
                .set_read_timeout(Some(Duration::from_millis(50)))
                .unwrap();
            Device {
                socket,
                acknowledged: Vec::new(),
                in_flight: None,
                next: 1,
            }
        })
        .collect();
    for cycle in 0..cycles {
        let shards = rng.random_range(1..=2);
        let mut daemon = start(&data_dir, shards, &extra);
        let server = daemon.coap;
        // First what was in flight when the previous daemon died, before the next kill can come.
        retransmit_in_flight(&mut devices, server);
        let run_ms = rng.random_range(50..400);
        let alive = Arc::new(AtomicBool::new(true));
        devices = std::thread::scope(|scope| {
            let handles: Vec<_> = devices
                .drain(..)
                .enumerate()
                .map(|(index, mut device)| {
                    let alive = alive.clone();
                    scope.spawn(move || {
                        for _ in 0..REQUESTS_PER_CYCLE_MAX {
                            if !alive.load(Ordering::Relaxed) {
                                break;
                            }
                            let sequence = device.next;
                            device.next += 1;
                            let give_up = Duration::from_millis(600);
                            match exchange(
                                &device.socket,
                                server,
                                &reading(index, sequence),
                                give_up,
                            ) {
                                Some(ack) => {
                                    let ack = Packet::from_bytes(&ack).unwrap();
                                    assert_eq!(code(&ack), "2.04");
                                    device.acknowledged.push(sequence);
                                }
                                None => {
                                    device.in_flight = Some(sequence);
                                    break;
                                }
                            }
                        }
                        device
                    })
                })
                .collect();
            std::thread::sleep(Duration::from_millis(run_ms));
            kill(&mut daemon);
            alive.store(false, Ordering::Relaxed);
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let acknowledged: usize = devices.iter().map(|d| d.acknowledged.len()).sum();
        eprintln!("cycle {cycle}: {shards} shards, killed after {run_ms} ms, {acknowledged} acknowledged so far");
    }
    // Last restart: what was in flight is retransmitted, then everything is checked.
    let daemon = start(&data_dir, 2, &extra);
    let mut total = 0;
    for (index, device) in devices.iter_mut().enumerate() {
        if let Some(sequence) = device.in_flight.take() {
            exchange(
                &device.socket,
                daemon.coap,
                &reading(index, sequence),
                EXCHANGE_GIVE_UP,
            )
            .expect("ACK");
            device.acknowledged.push(sequence);
        }
        let mut stored: HashMap<u64, usize> = HashMap::new();
        let device_id = format!("kill-{index}");
        let points = if device.acknowledged.is_empty() && device.next == 1 {
            Vec::new()
        } else {
            daemon.points(&device_id, "seq")
        };
        for (_, value) in &points {
            *stored.entry(value.as_f64().unwrap() as u64).or_default() += 1;
        }
        for sequence in &device.acknowledged {
            assert_eq!(
                stored.get(&u64::from(*sequence)),
                Some(&1),
                "seed {seed}: {device_id} reading {sequence} was acknowledged, must be stored once"
            );
        }
        let twice: Vec<_> = stored.iter().filter(|(_, &count)| count > 1).collect();
        assert!(
            twice.is_empty(),
            "seed {seed}: {device_id} stored twice: {twice:?}"
        );
        total += device.acknowledged.len();
    }
    assert!(total > 0, "seed {seed}: no request was acknowledged at all");
    let report = common::sluice(&["verify", "--data-dir", data_dir.to_str().unwrap()]);
    assert!(
        report.status.success(),
        "{}",
        String::from_utf8_lossy(&report.stdout)
    );
}

/// Each device retransmits the request it had in flight when the daemon died (same Message ID,
/// same bytes), in parallel, until it is acknowledged.
fn retransmit_in_flight(devices: &mut [Device], server: SocketAddr) {
    std::thread::scope(|scope| {
        for (index, device) in devices.iter_mut().enumerate() {
            scope.spawn(move || {
                if let Some(sequence) = device.in_flight.take() {
                    let ack = exchange(
                        &device.socket,
                        server,
                        &reading(index, sequence),
                        EXCHANGE_GIVE_UP,
                    )
                    .expect("the retransmission after the restart is acknowledged");
                    assert_eq!(code(&Packet::from_bytes(&ack).unwrap()), "2.04");
                    device.acknowledged.push(sequence);
                }
            });
        }
    });
}

#[test]
fn sigkill_under_con_load_loses_and_duplicates_nothing_fsync() {
    kill_cycles("fsync", 10);
}

#[test]
fn sigkill_under_con_load_loses_and_duplicates_nothing_os() {
    kill_cycles("os", 10);
}
