//! `sluice load`: a fleet of simulated devices, each with its own UDP socket and source port,
//! driving a CoAP server closed-loop (a window of requests in flight per device) or open-loop at
//! a fixed rate (latency measured from each request's intended send time, so a slow server cannot
//! hide its queueing: coordinated omission corrected). CON requests are retransmitted as
//! RFC 7252 §4.2 says. One thread: on a small machine the server needs the other cores.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::fmt::Write as _;
use std::io::ErrorKind;
use std::net::{SocketAddr, ToSocketAddrs};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use coap_lite::{MessageClass, MessageType, Packet, RequestType};
use hdrhistogram::Histogram;
use mio::net::UdpSocket;
use mio::{Events, Interest, Poll, Token};
use rand::Rng;
use sluice_protocol::batch::{self, Batch, BatchRecord, BatchValue};

/// Requests one device may have in flight in open-loop mode before sending waits (the waiting
/// shows up in the measured latency).
const IN_FLIGHT_PER_DEVICE_MAX: usize = 1024;
/// Simulated devices one run may open (each is a socket and a file descriptor).
const DEVICES_MAX: usize = 50_000;
/// Records one datagram may carry.
const RECORDS_PER_DATAGRAM_MAX: usize = 4096;
/// Largest response datagram read.
const RESPONSE_BYTES_MAX: usize = 2048;

#[derive(Args, Debug)]
pub struct LoadArgs {
    /// CoAP server to drive, HOST:PORT
    #[arg(long)]
    target: String,
    /// Simulated devices, each with its own socket
    #[arg(long, default_value_t = 10)]
    devices: usize,
    /// Run for this many seconds [default: 10 unless --count]
    #[arg(long, conflicts_with = "count")]
    duration: Option<f64>,
    /// Send this many requests in all
    #[arg(long)]
    count: Option<u64>,
    /// Open loop: requests per second over the whole fleet
    #[arg(long, conflicts_with = "window")]
    rate: Option<f64>,
    /// Closed loop: requests in flight per device
    #[arg(long, default_value_t = 1)]
    window: usize,
    /// Confirmable (acknowledged, retransmitted) or non-confirmable requests
    #[arg(long, value_enum, default_value = "con")]
    mode: Mode,
    /// Payload format
    #[arg(long, value_enum, default_value = "senml-json")]
    format: PayloadFormat,
    /// Readings per request
    #[arg(long, default_value_t = 1)]
    records_per_datagram: usize,
    /// Request path; `{device}` is replaced by the device's name
    #[arg(long, default_value = "/t/{device}")]
    path: String,
    /// Request method
    #[arg(long, value_enum, default_value = "post")]
    method: Method,
    /// Device names are this prefix and a number
    #[arg(long, default_value = "load-")]
    device_prefix: String,
    /// Initial retransmission timeout of a CON (RFC 7252 ACK_TIMEOUT); NON requests time out after twice this
    #[arg(long, default_value_t = 2000)]
    ack_timeout_ms: u64,
    /// Retransmissions of a CON before it counts as timed out (RFC 7252 MAX_RETRANSMIT)
    #[arg(long, default_value_t = 4)]
    max_retransmit: u32,
    /// End with one JSON line of the results
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Mode {
    Con,
    Non,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum PayloadFormat {
    SenmlJson,
    SenmlCbor,
    Rkyv,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Method {
    Post,
    Put,
}

const SENSOR_NAMES: [&str; 8] = [
    "temperature",
    "humidity",
    "pressure",
    "battery",
    "co2",
    "illuminance",
    "voltage",
    "current",
];

struct Request {
    message_id: u16,
    datagram: Vec<u8>,
    intended: Instant,
    deadline: Instant,
    timeout: Duration,
    retransmissions: u32,
    /// An empty ACK arrived: the response comes separately; no more retransmissions.
    acknowledged_empty: bool,
}

struct Device {
    socket: UdpSocket,
    path: String,
    next_message_id: u16,
    next_token: u32,
    values: Vec<f64>,
    in_flight: HashMap<u32, Request>,
}

#[derive(Default)]
struct Tally {
    sent: u64,
    acknowledged: u64,
    responses: BTreeMap<String, u64>,
    timeouts: u64,
    retransmissions: u64,
}

pub fn run(args: LoadArgs) -> anyhow::Result<()> {
    if args.devices == 0 || args.devices > DEVICES_MAX {
        bail!("--devices: between 1 and {DEVICES_MAX}");
    }
    if args.window == 0 || args.window > IN_FLIGHT_PER_DEVICE_MAX {
        bail!("--window: between 1 and {IN_FLIGHT_PER_DEVICE_MAX}");
    }
    if args.records_per_datagram == 0 || args.records_per_datagram > RECORDS_PER_DATAGRAM_MAX {
        bail!("--records-per-datagram: between 1 and {RECORDS_PER_DATAGRAM_MAX}");
    }
    if let Some(rate) = args.rate {
        if !(rate.is_finite() && rate > 0.0) {
            bail!("--rate: must be a positive number of requests per second");
        }
    }
    let duration = match (args.duration, args.count) {
        (Some(d), _) if !(d.is_finite() && d > 0.0) => {
            bail!("--duration: must be positive seconds")
        }
        (Some(d), _) => Some(Duration::from_secs_f64(d)),
        (None, Some(_)) => None,
        (None, None) => Some(Duration::from_secs(10)),
    };
    let target: SocketAddr = args
        .target
        .to_socket_addrs()
        .with_context(|| format!("--target: cannot resolve `{}`", args.target))?
        .next()
        .with_context(|| format!("--target: `{}` has no address", args.target))?;

    let mut poll = Poll::new().context("cannot create a poller")?;
    let mut rng = rand::rng();
    let local: SocketAddr = if target.is_ipv6() {
        "[::]:0"
    } else {
        "0.0.0.0:0"
    }
    .parse()?;
    let mut devices = Vec::with_capacity(args.devices);
    for index in 0..args.devices {
        let mut socket =
            UdpSocket::bind(local).context("cannot open a device socket (raise `ulimit -n`?)")?;
        socket
            .connect(target)
            .with_context(|| format!("cannot reach {target}"))?;
        poll.registry()
            .register(&mut socket, Token(index), Interest::READABLE)?;
        let name = format!("{}{index:04}", args.device_prefix);
        devices.push(Device {
            socket,
            path: args.path.replace("{device}", &name),
            next_message_id: rng.random(),
            next_token: rng.random(),
            values: (0..args.records_per_datagram)
                .map(|i| 20.0 + i as f64)
                .collect(),
            in_flight: HashMap::new(),
        });
    }

    let ack_timeout = Duration::from_millis(args.ack_timeout_ms.max(1));
    let mut latency_us = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3)?;
    let mut tally = Tally::default();
    let mut deadlines: BinaryHeap<Reverse<(Instant, usize, u32)>> = BinaryHeap::new();
    let mut events = Events::with_capacity(1024);
    let mut buffer = vec![0u8; RESPONSE_BYTES_MAX];
    let start = Instant::now();
    let end = duration.map(|d| start + d);
    let interval = args.rate.map(|rate| Duration::from_secs_f64(1.0 / rate));
    let mut next_device = 0usize;
    let mut last_activity = start;

    loop {
        let now = Instant::now();
        let budget_left = |sent: u64| {
            args.count.is_none_or(|count| sent < count) && end.is_none_or(|end| now < end)
        };
        // Send what the schedule allows.
        match interval {
            Some(interval) => {
                // Open loop: the k-th request is due at start + k * interval.
                while budget_left(tally.sent) {
                    let intended = start + interval.mul_f64(tally.sent as f64);
                    if intended > now {
                        break;
                    }
                    let device = next_device % devices.len();
                    if devices[device].in_flight.len() >= IN_FLIGHT_PER_DEVICE_MAX {
                        break;
                    }
                    next_device += 1;
                    send_new(
                        &args,
                        &mut devices[device],
                        device,
                        intended,
                        ack_timeout,
                        &mut rng,
                        &mut tally,
                        &mut deadlines,
                    );
                }
            }
            None => {
                for (index, device) in devices.iter_mut().enumerate() {
                    while device.in_flight.len() < args.window && budget_left(tally.sent) {
                        send_new(
                            &args,
                            device,
                            index,
                            now,
                            ack_timeout,
                            &mut rng,
                            &mut tally,
                            &mut deadlines,
                        );
                    }
                }
            }
        }
        let sending_done = !budget_left(tally.sent);
        let in_flight: usize = devices.iter().map(|d| d.in_flight.len()).sum();
        if sending_done && in_flight == 0 {
            break;
        }

        // Retransmit or give up what is due.
        while let Some(Reverse((deadline, device, token))) = deadlines.peek().copied() {
            if deadline > now {
                break;
            }
            deadlines.pop();
            let dev = &mut devices[device];
            let Some(request) = dev.in_flight.get_mut(&token) else {
                continue;
            };
            if request.deadline != deadline {
                continue;
            }
            if args.mode == Mode::Con
                && !request.acknowledged_empty
                && request.retransmissions < args.max_retransmit
            {
                request.retransmissions += 1;
                request.timeout *= 2;
                request.deadline = now + request.timeout;
                let _ = dev.socket.send(&request.datagram);
                tally.retransmissions += 1;
                deadlines.push(Reverse((request.deadline, device, token)));
            } else {
                dev.in_flight.remove(&token);
                tally.timeouts += 1;
                last_activity = now;
            }
        }

        // Wait for responses, the next due send, or the next deadline.
        let mut wake = deadlines.peek().map(|Reverse((d, _, _))| *d);
        if !sending_done {
            let next_send = match interval {
                Some(interval) => start + interval.mul_f64(tally.sent as f64),
                None => end.unwrap_or(now + Duration::from_millis(100)),
            };
            let next_send = end.map_or(next_send, |end| next_send.min(end));
            wake = Some(wake.map_or(next_send, |w| w.min(next_send)));
        }
        let timeout = wake.map(|w| w.saturating_duration_since(Instant::now()));
        poll.poll(&mut events, timeout).context("poll failed")?;
        for event in events.iter() {
            let index = event.token().0;
            let device = &mut devices[index];
            loop {
                let len = match device.socket.recv(&mut buffer) {
                    Ok(len) => len,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    // ICMP port unreachable and the like: the request times out as it would.
                    Err(_) => continue,
                };
                let received = Instant::now();
                if let Some(latency) = handle_response(device, &buffer[..len], &mut tally) {
                    let latency = received.saturating_duration_since(latency).as_micros() as u64;
                    latency_us.saturating_record(latency.max(1));
                    last_activity = received;
                }
            }
        }
    }

    let elapsed = last_activity
        .saturating_duration_since(start)
        .as_secs_f64()
        .max(1e-9);
    report(&args, &tally, &latency_us, elapsed);
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn send_new(
    args: &LoadArgs,
    device: &mut Device,
    index: usize,
    intended: Instant,
    ack_timeout: Duration,
    rng: &mut impl Rng,
    tally: &mut Tally,
    deadlines: &mut BinaryHeap<Reverse<(Instant, usize, u32)>>,
) {
    let message_id = device.next_message_id;
    device.next_message_id = device.next_message_id.wrapping_add(1);
    let token = device.next_token;
    device.next_token = device.next_token.wrapping_add(1);
    for value in &mut device.values {
        *value += rng.random_range(-0.5..0.5);
    }
    let datagram = request(args, device, message_id, token);
    let _ = device.socket.send(&datagram);
    tally.sent += 1;
    // RFC 7252 §4.2: the first timeout is random in [ACK_TIMEOUT, ACK_TIMEOUT * 1.5].
    let timeout = match args.mode {
        Mode::Con => ack_timeout.mul_f64(rng.random_range(1.0..1.5)),
        Mode::Non => ack_timeout * 2,
    };
    let now = Instant::now();
    let deadline = now + timeout;
    deadlines.push(Reverse((deadline, index, token)));
    device.in_flight.insert(
        token,
        Request {
            message_id,
            datagram,
            intended,
            deadline,
            timeout,
            retransmissions: 0,
            acknowledged_empty: false,
        },
    );
}

fn request(args: &LoadArgs, device: &Device, message_id: u16, token: u32) -> Vec<u8> {
    let mut packet = Packet::new();
    packet.header.set_type(match args.mode {
        Mode::Con => MessageType::Confirmable,
        Mode::Non => MessageType::NonConfirmable,
    });
    packet.header.code = MessageClass::Request(match args.method {
        Method::Post => RequestType::Post,
        Method::Put => RequestType::Put,
    });
    packet.header.message_id = message_id;
    packet.set_token(token.to_be_bytes().to_vec());
    for segment in device.path.split('/').filter(|s| !s.is_empty()) {
        packet.add_option(coap_lite::CoapOption::UriPath, segment.as_bytes().to_vec());
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    let name = |i: usize| match i / SENSOR_NAMES.len() {
        0 => SENSOR_NAMES[i].to_string(),
        n => format!("{}_{n}", SENSOR_NAMES[i % SENSOR_NAMES.len()]),
    };
    let (format, payload) = match args.format {
        PayloadFormat::SenmlJson => {
            let mut json = String::with_capacity(32 * device.values.len());
            json.push('[');
            for (i, value) in device.values.iter().enumerate() {
                if i > 0 {
                    json.push(',');
                }
                if i == 0 {
                    let _ = write!(
                        json,
                        "{{\"bt\":{now:.6},\"n\":\"{}\",\"v\":{value:.3}}}",
                        name(i)
                    );
                } else {
                    let _ = write!(json, "{{\"n\":\"{}\",\"v\":{value:.3}}}", name(i));
                }
            }
            json.push(']');
            (
                sluice_protocol::CONTENT_FORMAT_SENML_JSON,
                json.into_bytes(),
            )
        }
        PayloadFormat::SenmlCbor => {
            use ciborium::value::Value as Cbor;
            let records: Vec<Cbor> = device
                .values
                .iter()
                .enumerate()
                .map(|(i, value)| {
                    let mut fields = vec![
                        (Cbor::Integer(0.into()), Cbor::Text(name(i))),
                        (Cbor::Integer(2.into()), Cbor::Float(*value)),
                    ];
                    if i == 0 {
                        fields.push((Cbor::Integer((-3).into()), Cbor::Float(now)));
                    }
                    Cbor::Map(fields)
                })
                .collect();
            let mut bytes = Vec::new();
            ciborium::into_writer(&Cbor::Array(records), &mut bytes)
                .expect("CBOR to a Vec cannot fail");
            (sluice_protocol::CONTENT_FORMAT_SENML_CBOR, bytes)
        }
        PayloadFormat::Rkyv => {
            let batch = Batch {
                base_time: now,
                records: device
                    .values
                    .iter()
                    .enumerate()
                    .map(|(i, value)| BatchRecord {
                        name: name(i),
                        time: 0.0,
                        value: BatchValue::Number(*value),
                    })
                    .collect(),
            };
            (
                sluice_protocol::CONTENT_FORMAT_RKYV_BATCH,
                batch::encode(&batch),
            )
        }
    };
    // A CoAP uint option: big endian without leading zero bytes.
    let format = format.to_be_bytes();
    let skip = format.iter().take_while(|b| **b == 0).count();
    packet.add_option(
        coap_lite::CoapOption::ContentFormat,
        format[skip..].to_vec(),
    );
    packet.payload = payload;
    packet.to_bytes_unlimited().unwrap_or_default()
}

/// Matches a response to its request; returns the request's intended send time when it completes.
fn handle_response(device: &mut Device, datagram: &[u8], tally: &mut Tally) -> Option<Instant> {
    let packet = Packet::from_bytes(datagram).ok()?;
    let message_type = packet.header.get_type();
    if message_type == MessageType::Reset {
        let token = device
            .in_flight
            .iter()
            .find(|(_, r)| r.message_id == packet.header.message_id)
            .map(|(t, _)| *t)?;
        let request = device.in_flight.remove(&token)?;
        *tally.responses.entry("RST".into()).or_default() += 1;
        return Some(request.intended);
    }
    if packet.header.code == MessageClass::Empty {
        if message_type == MessageType::Acknowledgement {
            if let Some(request) = device
                .in_flight
                .values_mut()
                .find(|r| r.message_id == packet.header.message_id)
            {
                request.acknowledged_empty = true;
            }
        }
        return None;
    }
    if message_type == MessageType::Confirmable {
        // A separate response: acknowledge it (RFC 7252 §5.2.2).
        let mut ack = Packet::new();
        ack.header.set_type(MessageType::Acknowledgement);
        ack.header.message_id = packet.header.message_id;
        if let Ok(bytes) = ack.to_bytes() {
            let _ = device.socket.send(&bytes);
        }
    }
    let token: [u8; 4] = packet.get_token().try_into().ok()?;
    let request = device.in_flight.remove(&u32::from_be_bytes(token))?;
    let code = packet.header.get_code();
    if code.starts_with('2') {
        tally.acknowledged += 1;
    }
    *tally.responses.entry(code).or_default() += 1;
    Some(request.intended)
}

fn report(args: &LoadArgs, tally: &Tally, latency_us: &Histogram<u64>, elapsed: f64) {
    let rate = tally.acknowledged as f64 / elapsed;
    let quantile = |q: f64| {
        if latency_us.is_empty() {
            0
        } else {
            latency_us.value_at_quantile(q)
        }
    };
    let responses: Vec<String> = tally
        .responses
        .iter()
        .map(|(c, n)| format!("{c}: {n}"))
        .collect();
    eprintln!(
        "sent {} requests ({} devices, {:?} {}) in {elapsed:.2} s: acknowledged {} ({rate:.0}/s), responses {{{}}}, timeouts {}, retransmissions {}",
        tally.sent,
        args.devices,
        args.mode,
        match args.rate {
            Some(r) => format!("open loop at {r}/s"),
            None => format!("window {}", args.window),
        },
        tally.acknowledged,
        responses.join(", "),
        tally.timeouts,
        tally.retransmissions,
    );
    eprintln!(
        "latency us: p50 {} p90 {} p99 {} p99.9 {} max {}",
        quantile(0.5),
        quantile(0.9),
        quantile(0.99),
        quantile(0.999),
        latency_us.max()
    );
    if args.json {
        let line = serde_json::json!({
            "sent": tally.sent,
            "acknowledged": tally.acknowledged,
            "responses": tally.responses,
            "timeouts": tally.timeouts,
            "retransmissions": tally.retransmissions,
            "rate": rate,
            "latency_us": {
                "p50": quantile(0.5), "p90": quantile(0.9), "p99": quantile(0.99),
                "p999": quantile(0.999), "max": latency_us.max(),
            },
        });
        println!("{line}");
    }
}
