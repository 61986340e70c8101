//! Driver for instruction counts per ingested datagram (`benches/instructions.sh` runs it under
//! `valgrind --tool=callgrind`): the per-datagram work of a shard without sockets.
//!
//! `instructions <scenario> <datagrams>`: builds an endpoint and a store (Durability::Os, in a
//! temporary directory), handles `WARM_UP_DATAGRAMS` requests, then `<datagrams>` more. Each
//! request goes through what `daemon/src/shard.rs` does with it: `Endpoint::handle`, the store's
//! check and append of every reading, the exchange record, and, every `DATAGRAMS_PER_BATCH`
//! datagrams, the group commit (`ShardWriter::commit`: write(2) without fdatasync) and
//! `Endpoint::committed` for each of its exchanges. A run with 0 datagrams is the baseline: the
//! script subtracts it and divides by `<datagrams>`.
//!
//! Scenarios (each request comes from one of `DEVICES` devices, as `sluice load` sends them):
//! - `con-json`: CON POST /t/{device}, SenML JSON, 1 record
//! - `non-json`: the same as NON (the 2.04 is a NON with a fresh Message ID)
//! - `con-cbor`: CON, SenML CBOR, 1 record
//! - `rkyv-64`: CON, rkyv batch of 64 records

use std::time::Instant;

use sluice_protocol::EndpointConfig;

#[path = "common/shard_path.rs"]
mod shard_path;

use shard_path::{open_store, template, Shard, DATAGRAMS_PER_BATCH, DEVICES};

/// Requests handled before the measured ones, in both runs: tables and buffers reach their
/// steady-state size.
const WARM_UP_DATAGRAMS: usize = 4096;

fn main() {
    let mut args = std::env::args().skip(1).filter(|a| a != "--bench");
    let scenario = args.next().unwrap_or_else(|| "con-json".into());
    let datagrams: usize = args.next().map_or(10_000, |n| n.parse().expect("a count"));

    let templates: Vec<Vec<u8>> = (0..DEVICES).map(|d| template(&scenario, d)).collect();
    let dir = tempfile::Builder::new()
        .prefix("sluice-instructions-")
        .tempdir()
        .expect("tempdir");
    let (_store, writer) = open_store(dir.path());
    let mut shard = Shard::new(EndpointConfig::default(), writer);
    let now = Instant::now();
    let mut buffer = Vec::with_capacity(65_536);
    for i in 0..WARM_UP_DATAGRAMS + datagrams {
        shard.request(now, &templates, &mut buffer, i);
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
