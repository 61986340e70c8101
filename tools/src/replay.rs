//! `sluice replay FILE`: sends the CoAP requests of a capture to a server again.
//!
//! Each original source (address and port) becomes one device with a socket of its own, so the
//! identities a server keys on (peer address, Message IDs, tokens) stay apart. Each source's
//! requests go out in capture order, at the captured pace scaled by `--speed`, or with `--max` as
//! fast as the server answers (a window of requests in flight per source). Responses, ACKs and
//! anything that is not a CoAP request are skipped, and so are the capture's own retransmissions
//! (a request repeating its source's Message ID within EXCHANGE_LIFETIME): the replay retransmits
//! CON requests itself, as RFC 7252 says.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;

use crate::capture;
use crate::credentials;
use crate::dtls::DtlsUdp;
use crate::fleet::{self, Fleet, PlainUdp, ProgressTotal, Settings, Transport};

/// RFC 7252 §4.8.2 EXCHANGE_LIFETIME: a Message ID repeated by the same source within this time
/// is a retransmission of the same request.
const EXCHANGE_LIFETIME: Duration = Duration::from_secs(247);
/// Sources (devices) one replay may open: one socket and file descriptor each.
const SOURCES_MAX: usize = 50_000;
/// Requests one source may have in flight with `--max` (or behind schedule when paced).
const IN_FLIGHT_PER_SOURCE_MAX: usize = 1024;

#[derive(Args, Debug)]
pub struct ReplayArgs {
    /// Capture file, pcap or pcapng
    file: PathBuf,
    /// Send every request here, HOST:PORT [default: each request's captured destination]
    #[arg(long)]
    target: Option<String>,
    /// Pace multiplier: 2 replays twice as fast as captured
    #[arg(long, default_value_t = 1.0, conflicts_with = "max")]
    speed: f64,
    /// Ignore the captured pace: each source sends as fast as the server answers
    #[arg(long)]
    max: bool,
    /// With --max: requests in flight per source
    #[arg(long, default_value_t = 1)]
    window: usize,
    /// Initial retransmission timeout of a CON (RFC 7252 ACK_TIMEOUT)
    #[arg(long, default_value_t = 2000)]
    ack_timeout_ms: u64,
    /// Retransmissions of a CON before it counts as timed out (RFC 7252 MAX_RETRANSMIT)
    #[arg(long, default_value_t = 4)]
    max_retransmit: u32,
    /// No progress bar (it is never drawn when stderr is not a terminal)
    #[arg(long)]
    quiet: bool,
    /// End with one JSON line of the results (the same as `sluice load --json`)
    #[arg(long)]
    json: bool,
    /// CoAPS: each source handshakes DTLS 1.2 PSK before the replay, with the identity and key of
    /// one `--credentials` entry
    #[arg(long, requires = "credentials")]
    dtls: bool,
    /// Credentials file (docs/credentials.md) for --dtls: the i-th source of the capture (in
    /// order of its first request) uses the i-th enabled entry
    #[arg(long, requires = "dtls")]
    credentials: Option<PathBuf>,
}

struct Pending {
    /// Offset from the first request of the capture (already divided by --speed).
    offset: Duration,
    message_id: u16,
    datagram: Vec<u8>,
    expects_response: bool,
}

pub fn run(args: ReplayArgs) -> anyhow::Result<()> {
    if !(args.speed.is_finite() && args.speed > 0.0) {
        bail!("--speed: must be a positive number");
    }
    if args.window == 0 || args.window > IN_FLIGHT_PER_SOURCE_MAX {
        bail!("--window: between 1 and {IN_FLIGHT_PER_SOURCE_MAX}");
    }
    let target: Option<SocketAddr> = match &args.target {
        Some(target) => Some(
            target
                .to_socket_addrs()
                .with_context(|| format!("--target: cannot resolve `{target}`"))?
                .next()
                .with_context(|| format!("--target: `{target}` has no address"))?,
        ),
        None => None,
    };
    let capture = capture::read(&args.file)?;

    // Group the requests by source, in capture order.
    let mut sources: HashMap<SocketAddr, usize> = HashMap::new();
    let mut queues: Vec<VecDeque<Pending>> = Vec::new();
    let mut destinations: Vec<SocketAddr> = Vec::new();
    let mut last_seen: Vec<HashMap<u16, Duration>> = Vec::new();
    let (mut not_requests, mut captured_retransmissions, mut requests) = (0u64, 0u64, 0u64);
    let first_time = capture
        .datagrams
        .first()
        .map(|d| d.time)
        .unwrap_or_default();
    let mut latest = first_time;
    for datagram in capture.datagrams {
        let Some(header) = fleet::parse_header(&datagram.payload) else {
            not_requests += 1;
            continue;
        };
        // Requests have code class 0 and a non-zero detail (0.00 is an empty message).
        if header.code == 0 || header.code >> 5 != 0 {
            not_requests += 1;
            continue;
        }
        let message_id = header.message_id;
        let expects_response =
            header.message_type == fleet::TYPE_CON || !suppresses_success(&datagram.payload);
        // Capture order is send order: a timestamp that goes back is taken as the one before.
        latest = latest.max(datagram.time);
        let index = match sources.get(&datagram.source) {
            Some(index) => *index,
            None => {
                if queues.len() >= SOURCES_MAX {
                    bail!("{}: more than {SOURCES_MAX} sources", args.file.display());
                }
                sources.insert(datagram.source, queues.len());
                queues.push(VecDeque::new());
                destinations.push(target.unwrap_or(datagram.destination));
                last_seen.push(HashMap::new());
                queues.len() - 1
            }
        };
        if let Some(seen) = last_seen[index].insert(message_id, latest) {
            if latest - seen < EXCHANGE_LIFETIME {
                captured_retransmissions += 1;
                continue;
            }
        }
        requests += 1;
        queues[index].push_back(Pending {
            offset: (latest - first_time).div_f64(args.speed),
            message_id,
            datagram: datagram.payload,
            expects_response,
        });
    }
    drop(last_seen);
    eprintln!(
        "{}: {requests} requests from {} sources ({} packets not UDP, {not_requests} datagrams not requests, {captured_retransmissions} captured retransmissions skipped)",
        args.file.display(),
        queues.len(),
        capture.skipped_packets,
    );
    if requests == 0 {
        bail!("{}: no CoAP requests to replay", args.file.display());
    }

    let entries = match &args.credentials {
        Some(path) => {
            let entries = credentials::read(path)?;
            if entries.len() < destinations.len() {
                bail!(
                    "--credentials: {} has {} enabled devices, fewer than the {} sources of the capture",
                    path.display(),
                    entries.len(),
                    destinations.len()
                );
            }
            entries
        }
        None => Vec::new(),
    };
    let mut transports: Vec<Box<dyn Transport>> = Vec::with_capacity(queues.len());
    for (index, destination) in destinations.iter().enumerate() {
        transports.push(match entries.get(index) {
            Some(entry) => Box::new(DtlsUdp::connect(*destination, entry)?),
            None => Box::new(PlainUdp::connect(*destination)?),
        });
    }
    let settings = Settings {
        ack_timeout: Duration::from_millis(args.ack_timeout_ms.max(1)),
        max_retransmit: args.max_retransmit,
        progress: !args.quiet,
        progress_total: ProgressTotal::Requests(requests),
    };
    let mut fleet = Fleet::new(settings, transports, None)?;
    let window = if args.max {
        args.window
    } else {
        IN_FLIGHT_PER_SOURCE_MAX
    };

    let start = fleet.start();
    let due = |pending: &Pending| {
        if args.max {
            start
        } else {
            start + pending.offset
        }
    };
    // The head of each source's queue, by due time; a source whose window is full leaves the
    // heap until one of its requests completes.
    let mut heads: BinaryHeap<Reverse<(Instant, usize)>> = queues
        .iter()
        .enumerate()
        .filter_map(|(index, queue)| queue.front().map(|p| Reverse((due(p), index))))
        .collect();
    let mut waiting = vec![false; queues.len()];
    let mut freed = Vec::new();
    let mut left = requests;
    loop {
        let now = Instant::now();
        let mut wake = None;
        while let Some(Reverse((when, source))) = heads.peek().copied() {
            if when > now {
                wake = Some(when);
                break;
            }
            heads.pop();
            let Some(pending) = queues[source].front() else {
                continue;
            };
            if fleet.in_flight(source) >= window || fleet.is_in_flight(source, pending.message_id) {
                waiting[source] = true;
                continue;
            }
            let pending = queues[source].pop_front().expect("a front");
            let mut datagram = fleet.buffer();
            datagram.extend_from_slice(&pending.datagram);
            let intended = if args.max { now } else { when };
            fleet.send(source, datagram, intended, pending.expects_response);
            left -= 1;
            if let Some(next) = queues[source].front() {
                heads.push(Reverse((due(next), source)));
            }
        }
        fleet.take_freed(&mut freed);
        for &source in &freed {
            if std::mem::take(&mut waiting[source]) {
                if let Some(next) = queues[source].front() {
                    heads.push(Reverse((due(next).max(now), source)));
                }
            }
        }
        if left == 0 && fleet.in_flight_total() == 0 {
            break;
        }
        if !freed.is_empty() {
            wake = Some(now);
        }
        fleet.turn(wake)?;
    }
    let what = format!(
        "replay of {} ({} sources, {})",
        args.file.display(),
        queues.len(),
        if args.max {
            format!("max, window {}", args.window)
        } else {
            format!("speed {}", args.speed)
        }
    );
    fleet.finish(&what, args.json)
}

/// Whether a NON request carries No-Response (RFC 7967) suppressing 2.xx answers.
fn suppresses_success(datagram: &[u8]) -> bool {
    let Ok(packet) = coap_lite::Packet::from_bytes(datagram) else {
        return false;
    };
    packet
        .get_option(coap_lite::CoapOption::NoResponse)
        .and_then(|values| values.front())
        .is_some_and(|value| value.last().is_some_and(|bits| bits & 2 != 0))
}
