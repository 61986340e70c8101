//! The per-datagram path of a shard without sockets, shared by `benches/instructions.rs` and
//! `tests/alloc.rs`: what `daemon/src/shard.rs` does with one datagram (`Endpoint::handle`, then
//! `Shard::stage`: the store's check and append of every reading and the exchange record) and
//! with a batch (the group commit, then `Endpoint::committed`).

use std::net::SocketAddr;
use std::time::Instant;

use sluice_protocol::batch::{self, Batch, BatchRecord, BatchValue};
use sluice_protocol::{Endpoint, EndpointConfig, Exchange, Outcome, Reading, Readings, Value};
use sluice_storage::{Durability, ShardWriter, Store, StoreConfig, ValueRef};

#[path = "names.rs"]
mod names;
use names::name;

/// Datagrams per group commit: the daemon's receive batch (`DATAGRAMS_PER_BATCH_MAX`).
pub const DATAGRAMS_PER_BATCH: usize = 64;
pub const DEVICES: usize = 100;
/// Arrival time (unix seconds) of every request; payload times are absolute and near it.
const UNIX_NOW: f64 = 1_763_900_000.0;

fn option(out: &mut Vec<u8>, last: &mut u16, number: u16, value: &[u8]) {
    let delta = number - *last;
    *last = number;
    assert!(delta < 13 && value.len() < 13, "short options only");
    out.push((delta as u8) << 4 | value.len() as u8);
    out.extend_from_slice(value);
}

/// One request of device `device` (Message ID 0, patched per datagram).
pub fn template(scenario: &str, device: usize) -> Vec<u8> {
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

pub struct Shard {
    pub endpoint: Endpoint,
    pub writer: ShardWriter,
    pub readings: Readings,
    pub response: Vec<u8>,
    pub pending: Vec<Exchange>,
    pub pending_bytes: Vec<u8>,
    pub sent_bytes: usize,
}

impl Shard {
    /// What `Shard::run` and `Shard::stage` do with one datagram.
    pub fn datagram(&mut self, now: Instant, peer: SocketAddr, datagram: &[u8]) {
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
        self.writer
            .append_all(device, &self.readings, |r| {
                (r.name.as_str(), r.time, value(r))
            })
            .expect("append");
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
    pub fn commit(&mut self) {
        self.writer.commit().expect("commit");
        for exchange in &self.pending {
            self.endpoint.committed(exchange);
        }
        self.sent_bytes += self.pending_bytes.len();
        self.pending.clear();
        self.pending_bytes.clear();
    }
}

impl Shard {
    pub fn new(config: EndpointConfig, writer: ShardWriter) -> Shard {
        Shard {
            endpoint: Endpoint::new(config),
            writer,
            readings: Readings::new(),
            response: Vec::new(),
            pending: Vec::new(),
            pending_bytes: Vec::new(),
            sent_bytes: 0,
        }
    }

    /// The `i`th request: device `i % DEVICES`, a Message ID new for that device.
    pub fn request(&mut self, now: Instant, templates: &[Vec<u8>], buffer: &mut Vec<u8>, i: usize) {
        let device = i % templates.len();
        let message_id = (i / templates.len()) as u16;
        buffer.clear();
        buffer.extend_from_slice(&templates[device]);
        buffer[2..4].copy_from_slice(&message_id.to_be_bytes());
        let peer = SocketAddr::from(([10, 0, (device >> 8) as u8, device as u8], 5683));
        self.datagram(now, peer, buffer);
    }
}

/// A store in `dir` (Durability::Os, sealing never due) and its shard 0 writer.
pub fn open_store(dir: &std::path::Path) -> (Store, ShardWriter) {
    let (store, _) = Store::open(StoreConfig {
        dir: dir.to_path_buf(),
        partition_secs: 3600,
        partition_grace_secs: u64::MAX,
        durability: Durability::Os,
    })
    .expect("open store");
    let writer = store.writer(0).expect("writer");
    (store, writer)
}
