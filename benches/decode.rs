//! Decode throughput of the three payload formats sluiced accepts, in records per second.
//! `reference/senml_json` and `reference/senml_cbor` are the tree-based decoders the streaming
//! ones replaced (`protocol/tests/reference/senml.rs`): a baseline measured in the same run.
//!
//! `cargo bench --bench decode -- --measurement-time 3 --warm-up-time 1`

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use sluice_protocol::batch::{self, Batch, BatchDecoder, BatchRecord, BatchValue};
use sluice_protocol::{senml, Readings};

#[path = "common/names.rs"]
mod names;
use names::name;

#[allow(dead_code)]
#[path = "../protocol/tests/reference/senml.rs"]
mod reference;

/// A fixed arrival time (unix seconds); payload times are absolute.
const UNIX_NOW: f64 = 1_763_900_000.0;

/// The same shape as `sluice load --format senml-json`: base time on the first record.
fn senml_json(records: usize) -> Vec<u8> {
    let mut json = String::from("[");
    for i in 0..records {
        if i > 0 {
            json.push(',');
        }
        let value = 20.0 + i as f64 + 0.125;
        if i == 0 {
            json.push_str(&format!(
                "{{\"bt\":{UNIX_NOW:.6},\"n\":\"{}\",\"v\":{value:.3}}}",
                name(i)
            ));
        } else {
            json.push_str(&format!("{{\"n\":\"{}\",\"v\":{value:.3}}}", name(i)));
        }
    }
    json.push(']');
    json.into_bytes()
}

/// The same shape as `sluice load --format senml-cbor`.
fn senml_cbor(records: usize) -> Vec<u8> {
    use ciborium::value::Value as Cbor;
    let records: Vec<Cbor> = (0..records)
        .map(|i| {
            let mut fields = vec![
                (Cbor::Integer(0.into()), Cbor::Text(name(i))),
                (
                    Cbor::Integer(2.into()),
                    Cbor::Float(20.0 + i as f64 + 0.125),
                ),
            ];
            if i == 0 {
                fields.push((Cbor::Integer((-3).into()), Cbor::Float(UNIX_NOW)));
            }
            Cbor::Map(fields)
        })
        .collect();
    let mut bytes = Vec::new();
    ciborium::into_writer(&Cbor::Array(records), &mut bytes).expect("CBOR to a Vec");
    bytes
}

/// The same shape as `sluice load --format rkyv`.
fn rkyv_batch(records: usize) -> Vec<u8> {
    batch::encode(&Batch {
        base_time: UNIX_NOW,
        records: (0..records)
            .map(|i| BatchRecord {
                name: name(i),
                time: 0.0,
                value: BatchValue::Number(20.0 + i as f64 + 0.125),
            })
            .collect(),
    })
}

fn decode(c: &mut Criterion) {
    let mut group = c.benchmark_group("decode");
    let mut out = Readings::new();
    let mut reference_out = Vec::with_capacity(4096);

    for records in [1usize, 16] {
        let payload = senml_json(records);
        out.clear();
        senml::decode_json(&payload, UNIX_NOW, &mut out).expect("valid SenML JSON");
        assert_eq!(out.len(), records);
        group.throughput(Throughput::Elements(records as u64));
        group.bench_function(format!("senml_json/{records}"), |b| {
            b.iter(|| {
                out.clear();
                senml::decode_json(black_box(&payload), UNIX_NOW, &mut out).unwrap();
                black_box(out.len())
            })
        });
        group.bench_function(format!("reference/senml_json/{records}"), |b| {
            b.iter(|| {
                reference_out.clear();
                reference::decode_json(black_box(&payload), UNIX_NOW, &mut reference_out).unwrap();
                black_box(reference_out.len())
            })
        });
    }

    for records in [1usize, 16] {
        let payload = senml_cbor(records);
        out.clear();
        senml::decode_cbor(&payload, UNIX_NOW, &mut out).expect("valid SenML CBOR");
        assert_eq!(out.len(), records);
        group.throughput(Throughput::Elements(records as u64));
        group.bench_function(format!("senml_cbor/{records}"), |b| {
            b.iter(|| {
                out.clear();
                senml::decode_cbor(black_box(&payload), UNIX_NOW, &mut out).unwrap();
                black_box(out.len())
            })
        });
        group.bench_function(format!("reference/senml_cbor/{records}"), |b| {
            b.iter(|| {
                reference_out.clear();
                reference::decode_cbor(black_box(&payload), UNIX_NOW, &mut reference_out).unwrap();
                black_box(reference_out.len())
            })
        });
    }

    let records = 64usize;
    let payload = rkyv_batch(records);
    let mut decoder = BatchDecoder::new();
    out.clear();
    decoder
        .decode(&payload, UNIX_NOW, &mut out)
        .expect("valid rkyv batch");
    assert_eq!(out.len(), records);
    group.throughput(Throughput::Elements(records as u64));
    group.bench_function(format!("rkyv_batch/{records}"), |b| {
        b.iter(|| {
            out.clear();
            decoder
                .decode(black_box(&payload), UNIX_NOW, &mut out)
                .unwrap();
            black_box(out.len())
        })
    });

    group.finish();
}

criterion_group!(benches, decode);
criterion_main!(benches);
