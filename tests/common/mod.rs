//! Harness of the end-to-end tests: starts the real `sluiced` on loopback ports, waits for
//! readiness, talks CoAP and HTTP to it, and stops it.
#![allow(dead_code)]

use std::collections::HashSet;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use coap_lite::{CoapOption, MessageClass, MessageType, Packet, RequestType};
use serde_json::Value as Json;

/// How long a daemon may take to become ready or to stop.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a test waits for one CoAP response: generous, because a shard's fdatasync can take
/// seconds on a loaded 2-core machine while other tests run their own daemons.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(15);

/// Directory of the workspace's built binaries (`target/debug` or `target/release`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    exe.parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps/..")
        .to_path_buf()
}

pub fn binary(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.exists(),
        "{} is missing: build the binaries first (`cargo build --workspace --bins`)",
        path.display()
    );
    path
}

/// A tool the suite relies on (libcoap's clients and server). Missing is an error, never a skip.
pub fn tool(name: &str) -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|candidate| candidate.is_file())
    });
    found.unwrap_or_else(|| {
        panic!("`{name}` is not installed: run the README's test command, which installs it (Debian package libcoap3-bin)")
    })
}

static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// A loopback port free for both UDP and TCP right now, never handed out twice in this process.
/// Taken below the kernel's ephemeral range (`net.ipv4.ip_local_port_range`) when there is room:
/// a port from that range can be given to another test's outgoing connection between this probe
/// and the daemon's bind (seen as "Address already in use" at start).
pub fn free_port() -> u16 {
    let (low, _) = ephemeral_range();
    // Ports 10000..low, tried in a pseudo-random order (process id and clock as the seed), at
    // most this many before falling back to an ephemeral port.
    const TRIES_MAX: usize = 1000;
    if low > 11_000 {
        let span = u32::from(low) - 10_000;
        let mut x = (std::process::id() as u64) << 32
            ^ std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
            | 1;
        for _ in 0..TRIES_MAX {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let port = (10_000 + (x % u64::from(span)) as u32) as u16;
            if let Some(port) = claim(port) {
                return port;
            }
        }
    }
    loop {
        let udp = UdpSocket::bind("127.0.0.1:0").expect("bind a probe socket");
        let port = udp.local_addr().unwrap().port();
        drop(udp);
        if let Some(port) = claim(port) {
            return port;
        }
    }
}

/// `port` if it is free for UDP and TCP on loopback and not handed out yet (then it is).
fn claim(port: u16) -> Option<u16> {
    UdpSocket::bind(("127.0.0.1", port)).ok()?;
    TcpListener::bind(("127.0.0.1", port)).ok()?;
    let mut handed = HANDED_OUT.lock().unwrap();
    handed
        .get_or_insert_with(HashSet::new)
        .insert(port)
        .then_some(port)
}

/// The kernel's ephemeral port range (Linux default 32768-60999).
fn ephemeral_range() -> (u16, u16) {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| {
            let mut parts = text.split_whitespace().map(|p| p.parse::<u16>().ok());
            Some((parts.next()??, parts.next()??))
        })
        .unwrap_or((32_768, 60_999))
}

pub struct Daemon {
    pub child: Option<Child>,
    pub coap: SocketAddr,
    pub http: SocketAddr,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    _temp: Option<tempfile::TempDir>,
}

impl Daemon {
    /// Starts sluiced on fresh loopback ports and a fresh data directory.
    pub fn start(extra: &[&str]) -> Daemon {
        let temp = tempfile::tempdir().expect("temp dir");
        let data_dir = temp.path().join("data");
        let mut daemon = Daemon::start_in(&data_dir, extra);
        daemon._temp = Some(temp);
        daemon
    }

    /// Starts sluiced on `data_dir` (kept by the caller) and waits until it is ready.
    pub fn start_in(data_dir: &Path, extra: &[&str]) -> Daemon {
        let mut daemon = Daemon::spawn(data_dir, extra);
        daemon.wait_ready();
        daemon
    }

    /// Starts sluiced without waiting for readiness.
    pub fn spawn(data_dir: &Path, extra: &[&str]) -> Daemon {
        Daemon::spawn_on(data_dir, free_port(), free_port(), extra)
    }

    /// Starts sluiced on the given loopback ports (from [`free_port`]: a test that must name a
    /// node's address before it starts, e.g. in another node's `--peers`), without waiting.
    pub fn spawn_on(data_dir: &Path, coap: u16, http: u16, extra: &[&str]) -> Daemon {
        let coap: SocketAddr = ([127, 0, 0, 1], coap).into();
        let http: SocketAddr = ([127, 0, 0, 1], http).into();
        let log = data_dir.with_extension(format!("{}.log", coap.port()));
        std::fs::create_dir_all(data_dir.parent().unwrap()).unwrap();
        let child = Command::new(binary("sluiced"))
            .arg("--data-dir")
            .arg(data_dir)
            .args([
                "--coap",
                &coap.to_string(),
                "--http",
                &http.to_string(),
                "--shards",
                "2",
            ])
            .args(extra)
            .env_remove("SLUICE_LOG")
            // No drain period on SIGTERM unless a test asks for one with --drain.
            .env("SLUICE_DRAIN", "0s")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start sluiced");
        Daemon {
            child: Some(child),
            coap,
            http,
            data_dir: data_dir.to_path_buf(),
            log,
            _temp: None,
        }
    }

    /// Takes charge of a sluiced started by the test itself.
    pub fn attach(child: Child, coap: u16, http: u16, data_dir: &Path, log: PathBuf) -> Daemon {
        Daemon {
            child: Some(child),
            coap: ([127, 0, 0, 1], coap).into(),
            http: ([127, 0, 0, 1], http).into(),
            data_dir: data_dir.to_path_buf(),
            log,
            _temp: None,
        }
    }

    pub fn wait_ready(&mut self) {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "sluiced exited with {status} before it was ready:\n{}",
                    self.log_text()
                );
            }
            if let Ok((200, _)) = self.try_get("/readyz") {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "sluiced not ready in time:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, then waits for the exit status.
    pub fn stop(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("daemon running");
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("sluiced did not stop on SIGTERM:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn try_get(&self, path: &str) -> Result<(u16, String), String> {
        let url = format!("http://{}{path}", self.http);
        match ureq::get(&url).timeout(Duration::from_secs(10)).call() {
            Ok(response) => Ok((
                response.status(),
                response.into_string().unwrap_or_default(),
            )),
            Err(ureq::Error::Status(status, response)) => {
                Ok((status, response.into_string().unwrap_or_default()))
            }
            Err(error) => Err(error.to_string()),
        }
    }

    /// GET on the HTTP port: status and body.
    pub fn get(&self, path: &str) -> (u16, String) {
        self.try_get(path)
            .unwrap_or_else(|e| panic!("GET {path}: {e}"))
    }

    /// GET that must answer 200 with JSON.
    pub fn get_json(&self, path: &str) -> Json {
        let (status, body) = self.get(path);
        assert_eq!(status, 200, "GET {path}: {body}");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: {e}: {body}"))
    }

    /// The points of a series as (time, value) pairs.
    pub fn points(&self, device: &str, name: &str) -> Vec<(f64, Json)> {
        let json = self.get_json(&format!("/v1/series?device={device}&name={name}"));
        json["points"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| (p[0].as_f64().unwrap(), p[1].clone()))
            .collect()
    }

    pub fn metric(&self, name: &str) -> f64 {
        let (_, body) = self.get("/metrics");
        body.lines()
            .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A CoAP client on its own UDP socket (one peer as the daemon sees it).
pub struct Client {
    pub socket: UdpSocket,
    next_message_id: u16,
}

impl Client {
    pub fn new(server: SocketAddr) -> Client {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.connect(server).unwrap();
        socket.set_read_timeout(Some(RESPONSE_TIMEOUT)).unwrap();
        Client {
            socket,
            next_message_id: 1,
        }
    }

    pub fn message_id(&mut self) -> u16 {
        self.next_message_id = self.next_message_id.wrapping_add(1);
        self.next_message_id
    }

    pub fn send(&self, packet: &Packet) {
        self.socket
            .send(&packet.to_bytes_unlimited().unwrap())
            .unwrap();
    }

    pub fn send_raw(&self, bytes: &[u8]) {
        self.socket.send(bytes).unwrap();
    }

    /// The next datagram, or None after `timeout`.
    pub fn receive_within(&self, timeout: Duration) -> Option<Packet> {
        self.socket.set_read_timeout(Some(timeout)).unwrap();
        let mut buffer = [0u8; 65536];
        let result = self.socket.recv(&mut buffer);
        self.socket
            .set_read_timeout(Some(RESPONSE_TIMEOUT))
            .unwrap();
        let len = result.ok()?;
        Some(Packet::from_bytes(&buffer[..len]).expect("sluiced sent a valid CoAP message"))
    }

    pub fn receive(&self) -> Packet {
        self.receive_within(RESPONSE_TIMEOUT)
            .expect("a response from sluiced")
    }

    /// Sends and waits for the response. A CON is retransmitted as a device would (RFC 7252
    /// §4.2: ACK_TIMEOUT 2 s, doubling, MAX_RETRANSMIT 4): on a loaded machine a commit can
    /// take seconds, and sluiced answers a retransmission of a stored request from its dedup
    /// table without storing it again.
    pub fn exchange(&self, packet: &Packet) -> Packet {
        self.send(packet);
        if packet.header.get_type() != MessageType::Confirmable {
            return self.receive();
        }
        let mut timeout = Duration::from_secs(2);
        for _ in 0..4 {
            if let Some(response) = self.receive_within(timeout) {
                return response;
            }
            self.send(packet);
            timeout *= 2;
        }
        self.receive_within(timeout)
            .expect("a response from sluiced within the CON retransmission schedule")
    }

    /// A CON POST to `path` with a content format (None: no option) and payload.
    pub fn post(&mut self, path: &str, format: Option<u16>, payload: &[u8]) -> Packet {
        let packet = request(
            MessageType::Confirmable,
            RequestType::Post,
            self.message_id(),
            path,
            format,
            payload,
        );
        self.exchange(&packet)
    }
}

/// Builds a request with a 2-byte token derived from the message ID.
pub fn request(
    kind: MessageType,
    method: RequestType,
    message_id: u16,
    path: &str,
    format: Option<u16>,
    payload: &[u8],
) -> Packet {
    let mut packet = Packet::new();
    packet.header.set_type(kind);
    packet.header.code = MessageClass::Request(method);
    packet.header.message_id = message_id;
    packet.set_token(message_id.to_be_bytes().to_vec());
    for segment in path.split('/').filter(|s| !s.is_empty()) {
        packet.add_option(CoapOption::UriPath, segment.as_bytes().to_vec());
    }
    if let Some(format) = format {
        let bytes = format.to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        packet.add_option(CoapOption::ContentFormat, bytes[skip..].to_vec());
    }
    packet.payload = payload.to_vec();
    packet
}

/// The response code as "2.04".
pub fn code(packet: &Packet) -> String {
    packet.header.get_code()
}

/// Runs a command, fails the test if it cannot start, and returns its output.
pub fn run(command: &mut Command) -> Output {
    command
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"))
}

/// Runs the `sluice` CLI.
pub fn sluice(args: &[&str]) -> Output {
    run(Command::new(binary("sluice")).args(args))
}

/// Waits until `condition` holds, polling, or fails with `what`.
pub fn wait_for(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}
