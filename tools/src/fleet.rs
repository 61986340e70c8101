//! The client side shared by `sluice load` and `sluice replay`: a fleet of devices, each with its
//! own transport (socket, source port and, for CoAPS, DTLS session), that sends CoAP requests,
//! retransmits CON requests as RFC 7252 §4.2 says, matches responses, and keeps the tally and the
//! latency histogram of the run. One thread, driven by mio: on a small machine the server needs the
//! other cores.
//!
//! Requests are matched as RFC 7252 §5.3.2 says: an ACK or RST by its Message ID, a separate or
//! NON response by its token. Datagram buffers are pooled and reused, so that after the first
//! window of requests the hot loop does not allocate.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::io::{self, ErrorKind};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Context;
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use mio::net::UdpSocket;
use mio::{Events, Interest, Poll, Token};
use rand::Rng;

use crate::capture::Recorder;

/// Largest datagram read from the server (a response with a diagnostic payload fits easily).
const RESPONSE_BYTES_MAX: usize = 2048;
/// Readiness events taken from the poller per turn.
const EVENTS_PER_TURN_MAX: usize = 1024;
/// How often the progress bar is redrawn.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(250);
/// Longest latency the histogram holds (one hour, far beyond any CoAP give-up time).
const LATENCY_US_MAX: u64 = 3_600_000_000;

/// How one device reaches the server. Plain CoAP is a connected UDP socket; CoAPS wraps the same
/// socket in a DTLS session. Each device has its own, so each has its own source port.
pub trait Transport {
    /// The socket the poller watches for this device.
    fn socket(&mut self) -> &mut UdpSocket;
    /// Sends one CoAP message to the server.
    fn send(&mut self, message: &[u8]) -> io::Result<()>;
    /// Receives one CoAP message from the server into `buffer`; `WouldBlock` when none is ready.
    /// A transport may consume datagrams that carry no CoAP message (DTLS records) and go on.
    fn receive(&mut self, buffer: &mut [u8]) -> io::Result<usize>;
}

/// Plain CoAP: a UDP socket connected to the server.
pub struct PlainUdp {
    socket: UdpSocket,
}

impl PlainUdp {
    pub fn connect(target: SocketAddr) -> anyhow::Result<PlainUdp> {
        let local: SocketAddr = if target.is_ipv6() {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
        };
        let socket =
            UdpSocket::bind(local).context("cannot open a device socket (raise `ulimit -n`?)")?;
        socket
            .connect(target)
            .with_context(|| format!("cannot reach {target}"))?;
        Ok(PlainUdp { socket })
    }
}

impl Transport for PlainUdp {
    fn socket(&mut self) -> &mut UdpSocket {
        &mut self.socket
    }
    fn send(&mut self, message: &[u8]) -> io::Result<()> {
        self.socket.send(message).map(|_| ())
    }
    fn receive(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        self.socket.recv(buffer)
    }
}

/// RFC 7252 transmission parameters of the run.
pub struct Settings {
    /// ACK_TIMEOUT: the first retransmission of a CON comes after a random time in
    /// [ACK_TIMEOUT, ACK_TIMEOUT * 1.5]; a NON gives up after twice ACK_TIMEOUT.
    pub ack_timeout: Duration,
    /// MAX_RETRANSMIT.
    pub max_retransmit: u32,
    /// Show a progress bar on stderr (hidden anyway when stderr is not a terminal).
    pub progress: bool,
    /// The progress bar's end: a request count or a duration.
    pub progress_total: ProgressTotal,
}

pub enum ProgressTotal {
    Requests(u64),
    Duration(Duration),
}

/// What the run saw, as the report and `--json` give it.
#[derive(Default)]
pub struct Tally {
    pub sent: u64,
    pub acknowledged: u64,
    /// Responses by CoAP code byte (class << 5 | detail); RST is counted apart.
    pub responses_by_code: Vec<u64>,
    pub resets: u64,
    pub timeouts: u64,
    pub retransmissions: u64,
    /// Send or receive errors of the sockets (ICMP port unreachable arrives as one).
    pub socket_errors: u64,
    pub refused: u64,
}

impl Tally {
    fn errors(&self) -> u64 {
        let failed: u64 = self
            .responses_by_code
            .iter()
            .enumerate()
            .filter(|(code, _)| code >> 5 != 2)
            .map(|(_, n)| n)
            .sum();
        failed + self.resets + self.timeouts + self.socket_errors
    }

    pub fn responses(&self) -> std::collections::BTreeMap<String, u64> {
        let mut map: std::collections::BTreeMap<String, u64> = self
            .responses_by_code
            .iter()
            .enumerate()
            .filter(|(_, n)| **n > 0)
            .map(|(code, n)| (format!("{}.{:02}", code >> 5, code & 0x1f), *n))
            .collect();
        if self.resets > 0 {
            map.insert("RST".into(), self.resets);
        }
        map
    }
}

struct Request {
    datagram: Vec<u8>,
    token: [u8; 8],
    token_len: u8,
    intended: Instant,
    deadline: Instant,
    timeout: Duration,
    retransmissions: u32,
    confirmable: bool,
    /// An empty ACK arrived: the response comes separately; no more retransmissions.
    acknowledged_empty: bool,
}

struct Device {
    transport: Box<dyn Transport>,
    /// Requests in flight by Message ID.
    in_flight: HashMap<u16, Request>,
}

pub struct Fleet {
    settings: Settings,
    poll: Poll,
    events: Events,
    devices: Vec<Device>,
    deadlines: BinaryHeap<Reverse<(Instant, usize, u16)>>,
    free_buffers: Vec<Vec<u8>>,
    receive_buffer: Vec<u8>,
    /// Devices that completed a request since the caller last asked (closed loop refills them).
    freed: Vec<usize>,
    /// Devices with readiness events in this turn (reused).
    ready: Vec<usize>,
    /// Responses of any kind received so far.
    answered: u64,
    in_flight_total: usize,
    recorder: Option<Recorder>,
    rng: rand::rngs::ThreadRng,
    pub tally: Tally,
    latency_us: Histogram<u64>,
    start: Instant,
    last_activity: Instant,
    progress: Option<ProgressBar>,
    progress_next: Instant,
    progress_acknowledged: u64,
}

/// The parts of a CoAP header the fleet looks at.
pub struct Header<'a> {
    pub message_type: u8,
    pub code: u8,
    pub message_id: u16,
    pub token: &'a [u8],
}

pub const TYPE_CON: u8 = 0;
pub const TYPE_ACK: u8 = 2;
pub const TYPE_RST: u8 = 3;

/// Reads the fixed header and token of a CoAP message (RFC 7252 §3), or None if it is not one.
pub fn parse_header(datagram: &[u8]) -> Option<Header<'_>> {
    let first = *datagram.first()?;
    let token_len = usize::from(first & 0x0f);
    if first >> 6 != 1 || token_len > 8 || datagram.len() < 4 + token_len {
        return None;
    }
    Some(Header {
        message_type: (first >> 4) & 0x03,
        code: datagram[1],
        message_id: u16::from_be_bytes([datagram[2], datagram[3]]),
        token: &datagram[4..4 + token_len],
    })
}

impl Fleet {
    pub fn new(
        settings: Settings,
        transports: Vec<Box<dyn Transport>>,
        mut recorder: Option<Recorder>,
    ) -> anyhow::Result<Fleet> {
        let poll = Poll::new().context("cannot create a poller")?;
        let mut devices = Vec::with_capacity(transports.len());
        for (index, mut transport) in transports.into_iter().enumerate() {
            if let Some(recorder) = &mut recorder {
                let socket = transport.socket();
                let unknown = || SocketAddr::from(([0, 0, 0, 0], 0));
                recorder.add_device(
                    socket.local_addr().unwrap_or_else(|_| unknown()),
                    socket.peer_addr().unwrap_or_else(|_| unknown()),
                );
            }
            poll.registry()
                .register(transport.socket(), Token(index), Interest::READABLE)
                .context("cannot watch a device socket")?;
            devices.push(Device {
                transport,
                in_flight: HashMap::new(),
            });
        }
        let progress = settings.progress.then(|| {
            let bar = match settings.progress_total {
                ProgressTotal::Requests(n) => ProgressBar::new(n),
                ProgressTotal::Duration(d) => ProgressBar::new(d.as_millis() as u64),
            };
            bar.set_style(
                ProgressStyle::with_template("{elapsed_precise} [{wide_bar}] {percent:>3}% {msg}")
                    .expect("a valid template"),
            );
            bar
        });
        let now = Instant::now();
        Ok(Fleet {
            settings,
            poll,
            events: Events::with_capacity(EVENTS_PER_TURN_MAX),
            freed: (0..devices.len()).collect(),
            ready: Vec::with_capacity(EVENTS_PER_TURN_MAX),
            answered: 0,
            devices,
            deadlines: BinaryHeap::new(),
            free_buffers: Vec::new(),
            receive_buffer: vec![0; RESPONSE_BYTES_MAX],
            in_flight_total: 0,
            recorder,
            rng: rand::rng(),
            tally: Tally {
                responses_by_code: vec![0; 256],
                ..Tally::default()
            },
            latency_us: Histogram::new_with_bounds(1, LATENCY_US_MAX, 3)?,
            start: now,
            last_activity: now,
            progress,
            progress_next: now,
            progress_acknowledged: 0,
        })
    }

    /// Marks the start of the measured run (after set-up such as DTLS handshakes).
    pub fn start(&mut self) -> Instant {
        self.start = Instant::now();
        self.last_activity = self.start;
        self.progress_next = self.start;
        self.start
    }

    pub fn in_flight(&self, device: usize) -> usize {
        self.devices[device].in_flight.len()
    }

    pub fn in_flight_total(&self) -> usize {
        self.in_flight_total
    }

    pub fn is_in_flight(&self, device: usize, message_id: u16) -> bool {
        self.devices[device].in_flight.contains_key(&message_id)
    }

    /// A cleared datagram buffer from the pool.
    pub fn buffer(&mut self) -> Vec<u8> {
        let mut buffer = self.free_buffers.pop().unwrap_or_default();
        buffer.clear();
        buffer
    }

    /// Devices that completed a request since the last call, drained into `into`.
    pub fn take_freed(&mut self, into: &mut Vec<usize>) {
        into.clear();
        std::mem::swap(into, &mut self.freed);
    }

    /// Sends a CoAP request (a buffer from [`Fleet::buffer`]) from `device`. `intended` is when
    /// it should have been sent, which latency is measured from. A request that expects no
    /// response (NON with No-Response) completes when it is sent.
    pub fn send(
        &mut self,
        device: usize,
        datagram: Vec<u8>,
        intended: Instant,
        expects_response: bool,
    ) {
        let Some(header) = parse_header(&datagram) else {
            self.free_buffers.push(datagram);
            return;
        };
        let (message_id, confirmable) = (header.message_id, header.message_type == TYPE_CON);
        let mut token = [0u8; 8];
        let token_len = header.token.len();
        token[..token_len].copy_from_slice(header.token);
        let dev = &mut self.devices[device];
        match dev.transport.send(&datagram) {
            Ok(()) => {}
            Err(error) if error.kind() == ErrorKind::ConnectionRefused => {
                self.tally.refused += 1;
                self.tally.socket_errors += 1;
            }
            Err(_) => self.tally.socket_errors += 1,
        }
        self.tally.sent += 1;
        if let Some(recorder) = &mut self.recorder {
            recorder.record(device, &datagram);
        }
        if !expects_response {
            self.free_buffers.push(datagram);
            self.freed.push(device);
            self.last_activity = Instant::now();
            return;
        }
        let timeout = if confirmable {
            self.settings
                .ack_timeout
                .mul_f64(self.rng.random_range(1.0..1.5))
        } else {
            self.settings.ack_timeout * 2
        };
        let deadline = Instant::now() + timeout;
        self.deadlines.push(Reverse((deadline, device, message_id)));
        let previous = dev.in_flight.insert(
            message_id,
            Request {
                datagram,
                token,
                token_len: token_len as u8,
                intended,
                deadline,
                timeout,
                retransmissions: 0,
                confirmable,
                acknowledged_empty: false,
            },
        );
        match previous {
            // The caller reused a Message ID still in flight: the older request is given up.
            Some(old) => {
                self.tally.timeouts += 1;
                self.free_buffers.push(old.datagram);
            }
            None => self.in_flight_total += 1,
        }
    }

    /// Retransmits or gives up what is due, then waits for responses until `wake` (or the next
    /// retransmission, whichever is first; `None`: until something happens) and handles them.
    pub fn turn(&mut self, wake: Option<Instant>) -> anyhow::Result<()> {
        self.expire(Instant::now());
        let next_deadline = self.deadlines.peek().map(|Reverse((d, _, _))| *d);
        let wake = match (wake, next_deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let timeout = if self.freed.is_empty() {
            wake.map(|w| w.saturating_duration_since(Instant::now()))
        } else {
            Some(Duration::ZERO)
        };
        match self.poll.poll(&mut self.events, timeout) {
            Ok(()) => {}
            Err(error) if error.kind() == ErrorKind::Interrupted => {}
            Err(error) => return Err(error).context("poll failed"),
        }
        let mut ready = std::mem::take(&mut self.ready);
        ready.clear();
        ready.extend(self.events.iter().map(|event| event.token().0));
        for device in ready.iter().copied() {
            self.receive_all(device);
        }
        self.ready = ready;
        self.draw_progress(false);
        if self.tally.refused > 0 && self.answered == 0 {
            anyhow::bail!(
                "the target refuses: nothing listens there (ICMP port unreachable) and nothing answered"
            );
        }
        Ok(())
    }

    fn expire(&mut self, now: Instant) {
        while let Some(Reverse((deadline, device, message_id))) = self.deadlines.peek().copied() {
            if deadline > now {
                break;
            }
            self.deadlines.pop();
            let dev = &mut self.devices[device];
            let Some(request) = dev.in_flight.get_mut(&message_id) else {
                continue;
            };
            if request.deadline != deadline {
                continue;
            }
            if request.confirmable
                && !request.acknowledged_empty
                && request.retransmissions < self.settings.max_retransmit
            {
                request.retransmissions += 1;
                request.timeout *= 2;
                request.deadline = now + request.timeout;
                if dev.transport.send(&request.datagram).is_err() {
                    self.tally.socket_errors += 1;
                }
                if let Some(recorder) = &mut self.recorder {
                    recorder.record(device, &request.datagram);
                }
                self.tally.retransmissions += 1;
                self.deadlines
                    .push(Reverse((request.deadline, device, message_id)));
            } else if let Some(request) = dev.in_flight.remove(&message_id) {
                self.tally.timeouts += 1;
                self.complete(device, request.datagram, now);
            }
        }
    }

    fn complete(&mut self, device: usize, datagram: Vec<u8>, now: Instant) {
        self.free_buffers.push(datagram);
        self.freed.push(device);
        self.in_flight_total -= 1;
        self.last_activity = now;
    }

    fn receive_all(&mut self, device: usize) {
        loop {
            let dev = &mut self.devices[device];
            let len = match dev.transport.receive(&mut self.receive_buffer) {
                Ok(len) => len,
                Err(error) if error.kind() == ErrorKind::WouldBlock => return,
                Err(error) if error.kind() == ErrorKind::Interrupted => continue,
                // ICMP port unreachable and the like: the request times out as it would.
                Err(error) => {
                    if error.kind() == ErrorKind::ConnectionRefused {
                        self.tally.refused += 1;
                    }
                    self.tally.socket_errors += 1;
                    continue;
                }
            };
            let received = Instant::now();
            self.handle_response(device, len, received);
        }
    }

    fn handle_response(&mut self, device: usize, len: usize, received: Instant) {
        let datagram = &self.receive_buffer[..len];
        let Some(header) = parse_header(datagram) else {
            return;
        };
        let dev = &mut self.devices[device];
        let message_id = match header.message_type {
            TYPE_ACK | TYPE_RST => header.message_id,
            _ => {
                if header.message_type == TYPE_CON {
                    // A separate response: acknowledge it (RFC 7252 §5.2.2).
                    let [high, low] = header.message_id.to_be_bytes();
                    let _ = dev.transport.send(&[0x60, 0x00, high, low]);
                }
                let token = header.token;
                match dev
                    .in_flight
                    .iter()
                    .find(|(_, r)| &r.token[..usize::from(r.token_len)] == token)
                {
                    Some((message_id, _)) => *message_id,
                    None => return,
                }
            }
        };
        if header.message_type == TYPE_ACK && header.code == 0 {
            if let Some(request) = dev.in_flight.get_mut(&message_id) {
                request.acknowledged_empty = true;
            }
            return;
        }
        let Some(request) = dev.in_flight.remove(&message_id) else {
            return;
        };
        self.answered += 1;
        if header.message_type == TYPE_RST {
            self.tally.resets += 1;
        } else {
            if header.code >> 5 == 2 {
                self.tally.acknowledged += 1;
            }
            self.tally.responses_by_code[usize::from(header.code)] += 1;
        }
        let latency = received
            .saturating_duration_since(request.intended)
            .as_micros() as u64;
        self.latency_us.saturating_record(latency.max(1));
        self.complete(device, request.datagram, received);
    }

    fn draw_progress(&mut self, force: bool) {
        let Some(bar) = &self.progress else {
            return;
        };
        let now = Instant::now();
        if !force && now < self.progress_next {
            return;
        }
        let interval = now
            .saturating_duration_since(self.progress_next - PROGRESS_INTERVAL)
            .as_secs_f64()
            .max(1e-3);
        self.progress_next = now + PROGRESS_INTERVAL;
        let rate = (self.tally.acknowledged - self.progress_acknowledged) as f64 / interval;
        self.progress_acknowledged = self.tally.acknowledged;
        match self.settings.progress_total {
            ProgressTotal::Requests(_) => bar.set_position(self.tally.sent),
            ProgressTotal::Duration(_) => {
                bar.set_position(now.saturating_duration_since(self.start).as_millis() as u64)
            }
        }
        bar.set_message(format!(
            "{rate:.0} acked/s  p99 {} us  errors {}",
            self.quantile(0.99),
            self.tally.errors()
        ));
    }

    fn quantile(&self, q: f64) -> u64 {
        if self.latency_us.is_empty() {
            0
        } else {
            self.latency_us.value_at_quantile(q)
        }
    }

    /// Ends the run: prints the report on stderr (and the JSON line on stdout with `json`).
    /// Fails when the server never answered a run that expected answers.
    pub fn finish(mut self, what: &str, json: bool) -> anyhow::Result<()> {
        if let Some(recorder) = self.recorder.take() {
            recorder.finish()?;
        }
        if let Some(bar) = self.progress.take() {
            bar.finish_and_clear();
        }
        let tally = &self.tally;
        let elapsed = self
            .last_activity
            .saturating_duration_since(self.start)
            .as_secs_f64()
            .max(1e-9);
        let rate = tally.acknowledged as f64 / elapsed;
        let responses = tally.responses();
        let answered: u64 = responses.values().sum();
        eprintln!(
            "{what}: sent {} in {elapsed:.2} s, acknowledged {} ({rate:.0}/s), responses {responses:?}, timeouts {}, retransmissions {}, socket errors {}",
            tally.sent, tally.acknowledged, tally.timeouts, tally.retransmissions, tally.socket_errors,
        );
        eprintln!(
            "latency us: p50 {} p90 {} p99 {} p99.9 {} max {}",
            self.quantile(0.5),
            self.quantile(0.9),
            self.quantile(0.99),
            self.quantile(0.999),
            self.latency_us.max()
        );
        if json {
            let line = serde_json::json!({
                "sent": tally.sent,
                "acknowledged": tally.acknowledged,
                "responses": responses,
                "timeouts": tally.timeouts,
                "retransmissions": tally.retransmissions,
                "rate": rate,
                "latency_us": {
                    "p50": self.quantile(0.5), "p90": self.quantile(0.9),
                    "p99": self.quantile(0.99), "p999": self.quantile(0.999),
                    "max": self.latency_us.max(),
                },
            });
            println!("{line}");
        }
        let expected_answers = tally.timeouts + answered > 0;
        if expected_answers && answered == 0 {
            if tally.refused > 0 {
                anyhow::bail!("the target refused every request: nothing listens there (ICMP port unreachable)");
            }
            anyhow::bail!(
                "the target never answered ({} requests timed out)",
                tally.timeouts
            );
        }
        Ok(())
    }
}
