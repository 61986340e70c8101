//! DTLS at fleet scale, in one process, no sockets: `sessions` sluice-dtls clients handshake with
//! one `sluice_dtls::Server` (one shard's session table), each from its own address.
//!
//! Prints (markdown, for benches/RESULTS.md):
//! - server CPU per PSK handshake (the three datagrams of a cookie handshake: ClientHello,
//!   ClientHello with cookie, ClientKeyExchange + ChangeCipherSpec + Finished), as handshakes/s
//!   per core;
//! - in the same run, server CPU per request record (open a sealed CoAP request, seal a response),
//!   as records/s per core, and the ratio of the two;
//! - resident memory (VmRSS of /proc/self/status) of the table with every session established and
//!   idle, minus the same before the first handshake, per session.
//!
//!   cargo bench --bench dtls_sessions                 # 100 000 sessions
//!   cargo bench --bench dtls_sessions -- 20000        # another count
//!
//! The credentials (one `Psk` per device, shared by its session) exist before the first
//! measurement: the daemon holds them for every device whether it is connected or not. Clients are
//! dropped as soon as they have handshaken, so their memory is reused and not counted.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice_dtls::{Application, Client, Psk, PskLookup, Server, ServerConfig, Suite};

/// Sessions of the default run: the figure of merit is memory at 100 000 sessions.
const SESSIONS_DEFAULT: usize = 100_000;
/// Upper bound of the command-line count (the table must hold them without eviction).
const SESSIONS_MAX: usize = 1_000_000;
/// Request records timed for the same-run ratio.
const RECORDS_TIMED: usize = 100_000;

struct Keys(HashMap<Box<[u8]>, Arc<Psk>>);

impl PskLookup for Keys {
    fn lookup(&self, identity: &[u8]) -> Option<Arc<Psk>> {
        self.0.get(identity).cloned()
    }
}

/// A distinct loopback source for device `i` (127.x.y.z, port by index).
fn address(i: usize) -> SocketAddr {
    let octets = [127, (i >> 16) as u8, (i >> 8) as u8, i as u8];
    (octets, 10_000 + (i % 50_000) as u16).into()
}

fn identity(i: usize) -> String {
    format!("bench-{i:06}")
}

fn key(i: usize) -> Vec<u8> {
    (0..16)
        .map(|b| (i as u8).wrapping_mul(31).wrapping_add(b))
        .collect()
}

fn resident_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status")
}

fn main() {
    // `cargo bench` passes `--bench`; the first plain number, if any, is the session count.
    let sessions = std::env::args()
        .skip(1)
        .find_map(|arg| arg.parse::<usize>().ok())
        .unwrap_or(SESSIONS_DEFAULT);
    assert!(
        (1..=SESSIONS_MAX).contains(&sessions),
        "sessions: 1 to {SESSIONS_MAX}"
    );
    let keys = Keys(
        (0..sessions)
            .map(|i| {
                let name = identity(i);
                let identity: Box<[u8]> = name.as_bytes().into();
                let psk = Psk {
                    identity: identity.clone(),
                    device: Arc::from(name.as_str()),
                    key: key(i).into(),
                };
                (identity, Arc::new(psk))
            })
            .collect(),
    );
    let now = Instant::now();
    let config = ServerConfig {
        sessions_max: sessions.max(ServerConfig::default().sessions_max),
        ..ServerConfig::default()
    };
    let mut server = Server::new(config, now);
    let mut reply = Vec::with_capacity(2048);
    let mut to_server = Vec::with_capacity(2048);
    let mut application = Application::default();
    let before_kib = resident_kib();

    let mut server_time = Duration::ZERO;
    let mut sample = Vec::new(); // a few clients kept for the record measurement
    for i in 0..sessions {
        let peer = address(i);
        let mut client = Client::new(identity(i).as_bytes(), &key(i), &[Suite::Aes128Ccm8]);
        to_server.clear();
        client.start(&mut to_server);
        for _ in 0..3 {
            let started = Instant::now();
            server.handle(now, peer, &to_server, &keys, &mut reply, &mut application);
            server_time += started.elapsed();
            to_server.clear();
            client
                .handle(&reply, &mut to_server, &mut application)
                .expect("a handshake in memory succeeds");
        }
        assert!(client.is_connected(), "handshake {i} did not complete");
        if sample.len() < 100 {
            sample.push((peer, client));
        }
    }
    let after_kib = resident_kib();
    assert_eq!(server.sessions_len(), sessions);
    let handshake_s = server_time.as_secs_f64() / sessions as f64;

    // Request records over established sessions: a 60-byte CoAP POST in, a 2.04 out.
    let request = [0x42u8; 60];
    let response = [0x62u8, 0x44, 0, 1, 0xaa, 0xbb];
    let mut record = Vec::with_capacity(256);
    let mut sealed = Vec::with_capacity(256);
    let mut record_time = Duration::ZERO;
    for n in 0..RECORDS_TIMED {
        let (peer, client) = &mut sample[n % 100];
        record.clear();
        client.seal(&request, &mut record).expect("connected");
        let started = Instant::now();
        let device = server.handle(now, *peer, &record, &keys, &mut reply, &mut application);
        sealed.clear();
        let sent = server.seal(*peer, &response, &mut sealed);
        record_time += started.elapsed();
        assert!(device.is_some() && sent, "record {n} did not go through");
    }
    let record_s = record_time.as_secs_f64() / RECORDS_TIMED as f64;
    let per_session_bytes = (after_kib.saturating_sub(before_kib) * 1024) as f64 / sessions as f64;

    println!("sessions: {sessions} (one sluice_dtls::Server, CCM_8, cookie handshakes, in memory)");
    println!(
        "| server CPU per handshake | {:.1} µs | {:.0} handshakes/s per core |",
        handshake_s * 1e6,
        1.0 / handshake_s
    );
    println!(
        "| server CPU per request record (open 60 B + seal response) | {:.2} µs | {:.0} records/s per core |",
        record_s * 1e6,
        1.0 / record_s
    );
    println!(
        "| handshake / request record | {:.0}× |",
        handshake_s / record_s
    );
    println!(
        "| resident memory | before {before_kib} KiB, after {after_kib} KiB | {per_session_bytes:.0} bytes per established idle session |"
    );
}
