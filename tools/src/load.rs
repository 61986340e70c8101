//! `sluice load`: a fleet of simulated devices, each with its own transport and source port,
//! driving a CoAP server closed-loop (a window of requests in flight per device) or open-loop at
//! a fixed rate (latency measured from each request's intended send time, so a slow server cannot
//! hide its queueing: coordinated omission corrected). The sending, retransmission and matching
//! live in [`crate::fleet`]; this file decides what to send and when.
//!
//! Readings are realistic: each device carries up to eight kinds of sensor whose values wander
//! around a typical level (a mean-reverting random walk in the sensor's decimal places), stamped with
//! the wall-clock send time (`bt`), so a replay of a recording stores the very same readings.

use std::io::Write as _;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use rand::Rng;
use rkyv::util::AlignedVec;
use sluice_protocol::batch::{Batch, BatchRecord, BatchValue};

use crate::capture::Recorder;
use crate::credentials;
use crate::dtls::DtlsUdp;
use crate::fleet::{Fleet, PlainUdp, ProgressTotal, Settings, Transport};

/// Requests one device may have in flight (closed-loop window, or the open-loop backlog before
/// sending waits; the waiting shows up in the measured latency). A CoAP Message ID is 16 bits
/// and must not be reused while in flight; 1024 is far below that and above any sane window.
const IN_FLIGHT_PER_DEVICE_MAX: usize = 1024;
/// Simulated devices one run may open (each is a socket and a file descriptor).
const DEVICES_MAX: usize = 50_000;
/// Records one datagram may carry (sluiced accepts up to 10 000 per request; larger payloads
/// than one datagram would need Block1, which load does not send).
const RECORDS_PER_DATAGRAM_MAX: usize = 4096;
/// RFC 7967 No-Response value suppressing every response class (2.xx, 4.xx, 5.xx).
const NO_RESPONSE_ALL: u8 = 2 | 8 | 16;

#[derive(Args, Debug)]
pub struct LoadArgs {
    /// CoAP server to drive, HOST:PORT
    #[arg(long, required_unless_present = "gen_credentials")]
    target: Option<String>,
    /// Simulated devices, each with its own socket and source port
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
    /// NON requests ask for no response at all (RFC 7967 No-Response: 26): a pure send rate,
    /// for sinks that do not answer
    #[arg(long)]
    no_response: bool,
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
    /// Write every datagram sent (retransmissions too) to this pcap file, for `sluice replay`
    #[arg(long)]
    record: Option<PathBuf>,
    /// No progress bar (it is never drawn when stderr is not a terminal)
    #[arg(long)]
    quiet: bool,
    /// End with one JSON line of the results
    #[arg(long)]
    json: bool,
    /// CoAPS: each device handshakes DTLS 1.2 PSK before the run, with the identity and key of
    /// one `--credentials` entry (its `id` names the device)
    #[arg(long, requires = "credentials")]
    dtls: bool,
    /// Credentials file (docs/credentials.md) for --dtls: device i uses the i-th enabled entry
    #[arg(long, requires = "dtls")]
    credentials: Option<PathBuf>,
    /// Only write a credentials file of N devices named as load names them (`--device-prefix`),
    /// with random keys, on stdout (made mode 0600 when it is a file), and exit
    #[arg(long, value_name = "N", conflicts_with_all = ["target", "dtls"])]
    gen_credentials: Option<usize>,
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

/// A kind of sensor: its name, typical level and spread, step per reading, range and resolution.
struct SensorKind {
    name: &'static str,
    level: f64,
    spread: f64,
    step: f64,
    min: f64,
    max: f64,
    /// Decimal places the sensor reports.
    decimals: i32,
}

const SENSOR_KINDS: [SensorKind; 8] = [
    SensorKind {
        name: "temperature",
        level: 21.0,
        spread: 3.0,
        step: 0.05,
        min: -40.0,
        max: 85.0,
        decimals: 2,
    },
    SensorKind {
        name: "humidity",
        level: 45.0,
        spread: 10.0,
        step: 0.2,
        min: 0.0,
        max: 100.0,
        decimals: 1,
    },
    SensorKind {
        name: "pressure",
        level: 1013.25,
        spread: 8.0,
        step: 0.05,
        min: 870.0,
        max: 1085.0,
        decimals: 2,
    },
    SensorKind {
        name: "battery",
        level: 3.9,
        spread: 0.2,
        step: 0.002,
        min: 3.0,
        max: 4.2,
        decimals: 3,
    },
    SensorKind {
        name: "co2",
        level: 600.0,
        spread: 200.0,
        step: 5.0,
        min: 400.0,
        max: 5000.0,
        decimals: 0,
    },
    SensorKind {
        name: "illuminance",
        level: 300.0,
        spread: 250.0,
        step: 10.0,
        min: 0.0,
        max: 100_000.0,
        decimals: 1,
    },
    SensorKind {
        name: "voltage",
        level: 230.0,
        spread: 4.0,
        step: 0.3,
        min: 180.0,
        max: 260.0,
        decimals: 1,
    },
    SensorKind {
        name: "current",
        level: 1.5,
        spread: 1.0,
        step: 0.05,
        min: 0.0,
        max: 16.0,
        decimals: 2,
    },
];

/// One simulated device's sensors and its precomputed request prefix.
struct DeviceState {
    /// Series names, one per record of a datagram.
    names: Vec<String>,
    /// (level the value reverts to, current value) per record.
    values: Vec<(f64, f64)>,
    /// The CoAP options of every request of this device, encoded once.
    options: Vec<u8>,
    next_message_id: u16,
    next_token: u32,
}

/// Reused encoding buffers (no allocation per request once warm).
struct Encoder {
    batch: Batch,
    rkyv: AlignedVec,
}

pub fn run(args: LoadArgs) -> anyhow::Result<()> {
    if let Some(count) = args.gen_credentials {
        return credentials::generate(count, &args.device_prefix);
    }
    if args.devices == 0 || args.devices > DEVICES_MAX {
        bail!("--devices: between 1 and {DEVICES_MAX}");
    }
    if args.window == 0 || args.window > IN_FLIGHT_PER_DEVICE_MAX {
        bail!("--window: between 1 and {IN_FLIGHT_PER_DEVICE_MAX}");
    }
    if args.records_per_datagram == 0 || args.records_per_datagram > RECORDS_PER_DATAGRAM_MAX {
        bail!("--records-per-datagram: between 1 and {RECORDS_PER_DATAGRAM_MAX}");
    }
    if args.no_response && args.mode != Mode::Non {
        bail!("--no-response: only with --mode non");
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
    let target_text = args.target.as_deref().unwrap_or_default();
    let target: SocketAddr = target_text
        .to_socket_addrs()
        .with_context(|| format!("--target: cannot resolve `{target_text}`"))?
        .next()
        .with_context(|| format!("--target: `{target_text}` has no address"))?;
    let entries = match &args.credentials {
        Some(path) => {
            let entries = credentials::read(path)?;
            if entries.len() < args.devices {
                bail!(
                    "--credentials: {} has {} enabled devices, fewer than --devices {}",
                    path.display(),
                    entries.len(),
                    args.devices
                );
            }
            entries
        }
        None => Vec::new(),
    };

    let mut rng = rand::rng();
    let opening = Instant::now();
    let mut transports = Vec::with_capacity(args.devices);
    let mut states = Vec::with_capacity(args.devices);
    for index in 0..args.devices {
        let entry = entries.get(index);
        transports.push(open_transport(entry, target)?);
        let name = match entry {
            Some(entry) => entry.id.clone(),
            None => format!("{}{index:04}", args.device_prefix),
        };
        states.push(DeviceState::new(&args, &name, &mut rng)?);
    }
    if args.dtls {
        let seconds = opening.elapsed().as_secs_f64();
        eprintln!(
            "DTLS: {} handshakes in {seconds:.2} s, one after another, before the run",
            args.devices
        );
    }
    let recorder = args.record.as_deref().map(Recorder::create).transpose()?;
    let settings = Settings {
        ack_timeout: Duration::from_millis(args.ack_timeout_ms.max(1)),
        max_retransmit: args.max_retransmit,
        progress: !args.quiet,
        progress_total: match (args.count, duration) {
            (Some(count), None) => ProgressTotal::Requests(count),
            (_, duration) => ProgressTotal::Duration(duration.unwrap_or_default()),
        },
    };
    let mut fleet = Fleet::new(settings, transports, recorder)?;
    let mut encoder = Encoder {
        batch: Batch {
            base_time: 0.0,
            records: Vec::with_capacity(args.records_per_datagram),
        },
        rkyv: AlignedVec::new(),
    };

    let start = fleet.start();
    let end = duration.map(|d| start + d);
    let interval = args.rate.map(|rate| Duration::from_secs_f64(1.0 / rate));
    let expects_response = !args.no_response;
    let mut sent = 0u64;
    let mut next_device = 0usize;
    let mut freed = Vec::with_capacity(args.devices);
    loop {
        let now = Instant::now();
        let may_send = |sent: u64| {
            args.count.is_none_or(|count| sent < count) && end.is_none_or(|end| now < end)
        };
        let mut wake = None;
        match interval {
            Some(interval) => {
                // Open loop: the k-th request is due at start + k * interval, whatever the
                // server's answers; a device with a full backlog makes the fleet wait.
                while may_send(sent) {
                    let intended = start + interval.mul_f64(sent as f64);
                    if intended > now {
                        wake = Some(intended);
                        break;
                    }
                    let device = next_device % args.devices;
                    if fleet.in_flight(device) >= IN_FLIGHT_PER_DEVICE_MAX {
                        break;
                    }
                    next_device += 1;
                    let datagram =
                        states[device].request(&args, &mut encoder, fleet.buffer(), &mut rng);
                    fleet.send(device, datagram, intended, expects_response);
                    sent += 1;
                }
                fleet.take_freed(&mut freed);
            }
            None => {
                // Closed loop: refill the window of each device that completed a request.
                fleet.take_freed(&mut freed);
                for &device in &freed {
                    while fleet.in_flight(device) < args.window && may_send(sent) {
                        let datagram =
                            states[device].request(&args, &mut encoder, fleet.buffer(), &mut rng);
                        fleet.send(device, datagram, now, expects_response);
                        sent += 1;
                        if !expects_response {
                            // Completed at once: one window per device per turn, then poll.
                            break;
                        }
                    }
                }
                if !expects_response {
                    wake = Some(now);
                }
            }
        }
        let sending_done = !may_send(sent);
        if sending_done && fleet.in_flight_total() == 0 {
            break;
        }
        if !sending_done {
            if let Some(end) = end {
                wake = Some(wake.map_or(end, |w: Instant| w.min(end)));
            }
        }
        fleet.turn(wake)?;
    }
    let what = format!(
        "{} devices{}, {:?}{}, {}",
        args.devices,
        if args.dtls { " over DTLS" } else { "" },
        args.mode,
        if args.no_response { " no-response" } else { "" },
        match args.rate {
            Some(rate) => format!("open loop at {rate}/s"),
            None => format!("window {}", args.window),
        }
    );
    fleet.finish(&what, args.json)
}

/// The transport of one device: with a credentials entry (`--dtls`), a DTLS session over a
/// socket of its own, handshaken here, before the run starts; plain UDP otherwise.
fn open_transport(
    entry: Option<&credentials::Entry>,
    target: SocketAddr,
) -> anyhow::Result<Box<dyn Transport>> {
    Ok(match entry {
        Some(entry) => Box::new(DtlsUdp::connect(target, entry)?),
        None => Box::new(PlainUdp::connect(target)?),
    })
}

impl DeviceState {
    fn new(args: &LoadArgs, name: &str, rng: &mut impl Rng) -> anyhow::Result<DeviceState> {
        let names = (0..args.records_per_datagram)
            .map(|i| match i / SENSOR_KINDS.len() {
                0 => SENSOR_KINDS[i].name.to_string(),
                n => format!("{}_{n}", SENSOR_KINDS[i % SENSOR_KINDS.len()].name),
            })
            .collect();
        let values = (0..args.records_per_datagram)
            .map(|i| {
                let kind = &SENSOR_KINDS[i % SENSOR_KINDS.len()];
                let level = kind.level + kind.spread * rng.random_range(-1.0..1.0);
                (level, level)
            })
            .collect();
        let path = args.path.replace("{device}", name);
        let format = match args.format {
            PayloadFormat::SenmlJson => sluice_protocol::CONTENT_FORMAT_SENML_JSON,
            PayloadFormat::SenmlCbor => sluice_protocol::CONTENT_FORMAT_SENML_CBOR,
            PayloadFormat::Rkyv => sluice_protocol::CONTENT_FORMAT_RKYV_BATCH,
        };
        let mut options = Vec::new();
        let mut last = 0u16;
        for segment in path.split('/').filter(|s| !s.is_empty()) {
            if segment.len() > 255 {
                bail!("--path: a segment is longer than 255 bytes");
            }
            write_option(&mut options, &mut last, 11, segment.as_bytes());
        }
        write_option(&mut options, &mut last, 12, &uint_option(u32::from(format)));
        if args.no_response {
            write_option(&mut options, &mut last, 258, &[NO_RESPONSE_ALL]);
        }
        Ok(DeviceState {
            names,
            values,
            options,
            next_message_id: rng.random(),
            next_token: rng.random(),
        })
    }

    /// The next request of this device, encoded into `datagram`.
    fn request(
        &mut self,
        args: &LoadArgs,
        encoder: &mut Encoder,
        mut datagram: Vec<u8>,
        rng: &mut impl Rng,
    ) -> Vec<u8> {
        let message_id = self.next_message_id;
        self.next_message_id = message_id.wrapping_add(1);
        let token = self.next_token;
        self.next_token = token.wrapping_add(1);
        for (i, (level, value)) in self.values.iter_mut().enumerate() {
            let kind = &SENSOR_KINDS[i % SENSOR_KINDS.len()];
            let next = *value + kind.step * rng.random_range(-1.0..1.0) + 0.01 * (*level - *value);
            // Divided by a power of ten: the closest double to the decimal reading.
            let scale = 10f64.powi(kind.decimals);
            *value = (next.clamp(kind.min, kind.max) * scale).round() / scale;
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| (d.as_micros() as f64) / 1e6);

        let message_type: u8 = match args.mode {
            Mode::Con => 0,
            Mode::Non => 1,
        };
        let code: u8 = match args.method {
            Method::Post => 0x02,
            Method::Put => 0x03,
        };
        let [high, low] = message_id.to_be_bytes();
        datagram.extend_from_slice(&[0x40 | (message_type << 4) | 4, code, high, low]);
        datagram.extend_from_slice(&token.to_be_bytes());
        datagram.extend_from_slice(&self.options);
        datagram.push(0xff);
        match args.format {
            PayloadFormat::SenmlJson => {
                datagram.push(b'[');
                for (i, (name, (_, value))) in self.names.iter().zip(&self.values).enumerate() {
                    if i == 0 {
                        let _ = write!(datagram, "{{\"bt\":{now},\"n\":\"{name}\",\"v\":{value}}}");
                    } else {
                        let _ = write!(datagram, ",{{\"n\":\"{name}\",\"v\":{value}}}");
                    }
                }
                datagram.push(b']');
            }
            PayloadFormat::SenmlCbor => {
                cbor_head(&mut datagram, 4, self.names.len() as u64);
                for (i, (name, (_, value))) in self.names.iter().zip(&self.values).enumerate() {
                    cbor_head(&mut datagram, 5, if i == 0 { 3 } else { 2 });
                    if i == 0 {
                        datagram.push(0x22); // key -3: bt
                        cbor_float(&mut datagram, now);
                    }
                    datagram.push(0x00); // key 0: n
                    cbor_head(&mut datagram, 3, name.len() as u64);
                    datagram.extend_from_slice(name.as_bytes());
                    datagram.push(0x02); // key 2: v
                    cbor_float(&mut datagram, *value);
                }
            }
            PayloadFormat::Rkyv => {
                let batch = &mut encoder.batch;
                batch.base_time = now;
                if batch.records.len() != self.names.len() {
                    batch.records.clear();
                    batch
                        .records
                        .extend(self.names.iter().map(|name| BatchRecord {
                            name: name.clone(),
                            time: 0.0,
                            value: BatchValue::Number(0.0),
                        }));
                }
                for ((record, name), (_, value)) in
                    batch.records.iter_mut().zip(&self.names).zip(&self.values)
                {
                    if record.name != *name {
                        record.name.clear();
                        record.name.push_str(name);
                    }
                    record.value = BatchValue::Number(*value);
                }
                let mut bytes = std::mem::take(&mut encoder.rkyv);
                bytes.clear();
                // The same bytes as `batch::encode` (docs/rkyv-batch.md), into a reused buffer.
                bytes = rkyv::api::high::to_bytes_in::<_, rkyv::rancor::Error>(&*batch, bytes)
                    .expect("serializing into memory only fails when out of memory");
                datagram.extend_from_slice(&bytes);
                encoder.rkyv = bytes;
            }
        }
        datagram
    }
}

/// Appends a CoAP option (RFC 7252 §3.1) after the option numbered `last`.
fn write_option(out: &mut Vec<u8>, last: &mut u16, number: u16, value: &[u8]) {
    fn nibble(n: usize) -> (u8, Vec<u8>) {
        match n {
            0..=12 => (n as u8, vec![]),
            13..=268 => (13, vec![(n - 13) as u8]),
            _ => (14, ((n - 269) as u16).to_be_bytes().to_vec()),
        }
    }
    let (delta, delta_ext) = nibble(usize::from(number - *last));
    let (length, length_ext) = nibble(value.len());
    out.push(delta << 4 | length);
    out.extend_from_slice(&delta_ext);
    out.extend_from_slice(&length_ext);
    out.extend_from_slice(value);
    *last = number;
}

/// A CoAP uint option value: big endian without leading zero bytes.
fn uint_option(value: u32) -> Vec<u8> {
    let bytes = value.to_be_bytes();
    let skip = bytes.iter().take_while(|b| **b == 0).count();
    bytes[skip..].to_vec()
}

/// A CBOR head (RFC 8949 §3): major type and argument.
fn cbor_head(out: &mut Vec<u8>, major: u8, argument: u64) {
    let major = major << 5;
    match argument {
        0..=23 => out.push(major | argument as u8),
        24..=0xff => out.extend_from_slice(&[major | 24, argument as u8]),
        0x100..=0xffff => {
            out.push(major | 25);
            out.extend_from_slice(&(argument as u16).to_be_bytes());
        }
        _ => {
            out.push(major | 26);
            out.extend_from_slice(&(argument as u32).to_be_bytes());
        }
    }
}

fn cbor_float(out: &mut Vec<u8>, value: f64) {
    out.push(0xfb);
    out.extend_from_slice(&value.to_be_bytes());
}
