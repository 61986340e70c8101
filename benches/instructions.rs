//! Driver for instruction counts per ingested datagram (`benches/instructions.sh` runs it under
//! `valgrind --tool=callgrind`): the per-datagram work of a shard without sockets.
//!
//! `instructions <scenario> <datagrams>`: builds an endpoint and a store (Durability::Os, in a
//! temporary directory), handles `WARM_UP_DATAGRAMS` requests, then `<datagrams>` more. Each
//! request goes through what `daemon/src/shard.rs` does with it: `Endpoint::handle`, the store's
//! check and append of every reading, the exchange record, and, every `DATAGRAMS_PER_BATCH`
//! datagrams, the group commit (prepare + publish, write(2) without fdatasync) and
//! `Endpoint::committed` for each of its exchanges. A run with 0 datagrams is the baseline: the
//! script subtracts it and divides by `<datagrams>`.
//!
//! Scenarios (each request comes from one of `DEVICES` devices, as `sluice load` sends them):
//! - `con-json`: CON POST /t/{device}, SenML JSON, 1 record
//! - `non-json`: the same as NON (the 2.04 is a NON with a fresh Message ID)
//! - `con-cbor`: CON, SenML CBOR, 1 record
//! - `rkyv-64`: CON, rkyv batch of 64 records

use std::net::SocketAddr;
use std::time::Instant;

use sluice_protocol::batch::{self, Batch, BatchRecord, BatchValue};
use sluice_protocol::{Endpoint, EndpointConfig, Exchange, Outcome, Reading, Readings, Value};
use sluice_storage::{Durability, ShardWriter, Store, StoreConfig, ValueRef};

/// Requests handled before the measured ones, in both runs: tables and buffers reach their
/// steady-state size.
const WARM_UP_DATAGRAMS: usize = 4096;
/// Datagrams per group commit: the daemon's receive batch (`DATAGRAMS_PER_BATCH_MAX`).
const DATAGRAMS_PER_BATCH: usize = 64;
const DEVICES: usize = 100;
/// Arrival time (unix seconds) of every request; payload times are absolute and near it.
const UNIX_NOW: f64 = 1_763_900_000.0;
const NAMES: [&str; 8] = [
    "temperature",
    "humidity",
    "pressure",
    "battery",
    "co2",
    "illuminance",
    "voltage",
    "current",
];

fn name(i: usize) -> String {
    match i / NAMES.len() {
        0 => NAMES[i].to_string(),
        n => format!("{}_{n}", NAMES[i % NAMES.len()]),
    }
}

fn option(out: &mut Vec<u8>, last: &mut u16, number: u16, value: &[u8]) {
    let delta = number - *last;
    *last = number;
    assert!(delta < 13 && value.len() < 13, "short options only");
    out.push((delta as u8) << 4 | value.len() as u8);
    out.extend_from_slice(value);
}

/// One request of device `device` (Message ID 0, patched per datagram).
fn template(scenario: &str, device: usize) -> Vec<u8> {
    let confirmable = scenario != "non-json";
    let mut out = vec![if confirmable { 0x48 } else { 0x58 }, 0x02, 0, 0];
    out.extend_from_slice(&(device as u64).to_be_bytes()[4..]);
    out.extend_from_slice(&[0xa5; 4]);
    let mut last = 0;
    option(&mut out, &mut last, 11, b"t");
    option(
        &mut out,
        &mut last,
        11,
        format!("load-{device:04}").as_bytes(),
    );
    let time = UNIX_NOW + device as f64 * 0.001;
    match scenario {
        "con-json" | "non-json" => {
            option(&mut out, &mut last, 12, &[110]);
            out.push(0xff);
            out.extend_from_slice(
                format!("[{{\"bt\":{time},\"n\":\"temperature\",\"v\":21.5}}]").as_bytes(),
            );
        }
        "con-cbor" => {
            option(&mut out, &mut last, 12, &[112]);
            out.push(0xff);
            // [{-3: time, 0: "temperature", 2: 21.5}]
            out.extend_from_slice(&[0x81, 0xa3, 0x22, 0xfb]);
            out.extend_from_slice(&time.to_be_bytes());
            out.extend_from_slice(&[0x00, 0x6b]);
            out.extend_from_slice(b"temperature");
            out.extend_from_slice(&[0x02, 0xfb]);
            out.extend_from_slice(&21.5f64.to_be_bytes());
        }
        "rkyv-64" => {
            option(&mut out, &mut last, 12, &[0xff, 0x52]);
            out.push(0xff);
            out.extend_from_slice(&batch::encode(&Batch {
                base_time: time,
                records: (0..64)
                    .map(|i| BatchRecord {
                        name: name(i),
                        time: 0.0,
                        value: BatchValue::Number(20.0 + i as f64 * 0.25),
                    })
                    .collect(),
            }));
        }
        other => panic!("unknown scenario {other}: con-json, non-json, con-cbor or rkyv-64"),
    }
    out
}

fn value(reading: &Reading) -> ValueRef<'_> {
    match &reading.value {
        Value::Number(n) => ValueRef::Number(*n),
        Value::Bool(b) => ValueRef::Bool(*b),
        Value::String(s) => ValueRef::String(s),
        Value::Data(d) => ValueRef::Data(d),
    }
}

struct Shard {
    endpoint: Endpoint,
    writer: ShardWriter,
    readings: Readings,
    response: Vec<u8>,
    pending: Vec<Exchange>,
    pending_bytes: Vec<u8>,
    sent_bytes: usize,
}

impl Shard {
    /// What `Shard::run` and `Shard::stage` do with one datagram.
    fn datagram(&mut self, now: Instant, peer: SocketAddr, datagram: &[u8]) {
        self.readings.clear();
        let outcome = self.endpoint.handle(
            now,
            UNIX_NOW,
            peer,
            None,
            datagram,
            &mut self.readings,
            &mut self.response,
        );
        let Outcome::Store(exchange) = outcome else {
            panic!("not stored: {outcome:?} {:?}", self.response);
        };
        let device = exchange.device.as_str();
        for r in self.readings.iter() {
            self.writer
                .check(device, &r.name, r.time, &value(r))
                .expect("check");
        }
        for r in self.readings.iter() {
            self.writer
                .append(device, &r.name, r.time, value(r))
                .expect("append");
        }
        self.writer
            .record_exchange(
                exchange.peer,
                exchange.message_id,
                exchange.confirmable,
                UNIX_NOW,
                &self.response,
            )
            .expect("record exchange");
        self.pending_bytes.extend_from_slice(&self.response);
        self.pending.push(exchange);
    }

    /// The group commit of a batch, then its responses (counted, not sent).
    fn commit(&mut self) {
        let prepared = self.writer.prepare().expect("prepare");
        self.writer.publish(prepared);
        for exchange in &self.pending {
            self.endpoint.committed(exchange);
        }
        self.sent_bytes += self.pending_bytes.len();
        self.pending.clear();
        self.pending_bytes.clear();
    }
}

fn main() {
    let mut args = std::env::args().skip(1).filter(|a| a != "--bench");
    let scenario = args.next().unwrap_or_else(|| "con-json".into());
    let datagrams: usize = args.next().map_or(10_000, |n| n.parse().expect("a count"));

    let templates: Vec<Vec<u8>> = (0..DEVICES).map(|d| template(&scenario, d)).collect();
    let dir = tempfile::Builder::new()
        .prefix("sluice-instructions-")
        .tempdir()
        .expect("tempdir");
    let (store, _) = Store::open(StoreConfig {
        dir: dir.path().to_path_buf(),
        partition_secs: 3600,
        partition_grace_secs: u64::MAX,
        durability: Durability::Os,
    })
    .expect("open store");
    let mut shard = Shard {
        endpoint: Endpoint::new(EndpointConfig::default()),
        writer: store.writer(0).expect("writer"),
        readings: Readings::new(),
        response: Vec::new(),
        pending: Vec::new(),
        pending_bytes: Vec::new(),
        sent_bytes: 0,
    };
    let now = Instant::now();
    let mut buffer = Vec::with_capacity(65_536);
    for i in 0..WARM_UP_DATAGRAMS + datagrams {
        let device = i % DEVICES;
        // A new Message ID per request of a device: no duplicates.
        let message_id = (i / DEVICES) as u16;
        buffer.clear();
        buffer.extend_from_slice(&templates[device]);
        buffer[2..4].copy_from_slice(&message_id.to_be_bytes());
        let peer = SocketAddr::from(([10, 0, (device >> 8) as u8, device as u8], 5683));
        shard.datagram(now, peer, &buffer);
        if (i + 1) % DATAGRAMS_PER_BATCH == 0 {
            shard.commit();
        }
    }
    shard.commit();
    println!(
        "{scenario}: {} datagrams after {WARM_UP_DATAGRAMS} warm-up, {} response bytes",
        datagrams, shard.sent_bytes
    );
}
