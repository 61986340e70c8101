//! The rkyv batch format: round trip, time resolution, garbage rejected.

use sluice_protocol::batch::{encode, Batch, BatchDecoder, BatchRecord, BatchValue};
use sluice_protocol::{DecodeError, Reading, Value};

const NOW: f64 = 1_700_000_000.0;

fn sample() -> Batch {
    Batch {
        base_time: 1_600_000_000.0,
        records: vec![
            BatchRecord {
                name: "temp".into(),
                time: -1.5,
                value: BatchValue::Number(21.5),
            },
            BatchRecord {
                name: "door".into(),
                time: 0.0,
                value: BatchValue::Bool(true),
            },
            BatchRecord {
                name: "state".into(),
                time: 2.0,
                value: BatchValue::String("ok".into()),
            },
            BatchRecord {
                name: "blob".into(),
                time: 3.0,
                value: BatchValue::Data(vec![0, 1, 2, 255]),
            },
        ],
    }
}

#[test]
fn round_trip_at_any_alignment() {
    let bytes = encode(&sample());
    let mut decoder = BatchDecoder::new();
    for shift in 0..9 {
        let mut buffer = vec![0u8; shift];
        buffer.extend_from_slice(&bytes);
        let mut out = sluice_protocol::Readings::new();
        decoder.decode(&buffer[shift..], NOW, &mut out).unwrap();
        assert_eq!(
            out.to_vec(),
            vec![
                Reading {
                    name: "temp".into(),
                    time: 1_600_000_000.0 - 1.5,
                    value: Value::Number(21.5)
                },
                Reading {
                    name: "door".into(),
                    time: 1_600_000_000.0,
                    value: Value::Bool(true)
                },
                Reading {
                    name: "state".into(),
                    time: 1_600_000_002.0,
                    value: Value::String("ok".into())
                },
                Reading {
                    name: "blob".into(),
                    time: 1_600_000_003.0,
                    value: Value::Data(vec![0, 1, 2, 255])
                },
            ]
        );
    }
}

#[test]
fn small_base_time_is_relative_to_now() {
    let batch = Batch {
        base_time: 0.0,
        records: vec![BatchRecord {
            name: "a".into(),
            time: -10.0,
            value: BatchValue::Number(1.0),
        }],
    };
    let mut out = sluice_protocol::Readings::new();
    BatchDecoder::new()
        .decode(&encode(&batch), NOW, &mut out)
        .unwrap();
    assert_eq!(out[0].time, NOW - 10.0);
}

#[test]
fn invalid_records_are_rejected_all_or_nothing() {
    let mut batch = sample();
    batch.records.push(BatchRecord {
        name: String::new(),
        time: 0.0,
        value: BatchValue::Number(1.0),
    });
    let mut out = sluice_protocol::Readings::new();
    let mut decoder = BatchDecoder::new();
    assert!(matches!(
        decoder.decode(&encode(&batch), NOW, &mut out),
        Err(DecodeError::MissingName { index: 4 })
    ));
    assert!(out.is_empty());
    batch.records.pop();
    batch.records[0].value = BatchValue::Number(f64::INFINITY);
    assert!(matches!(
        decoder.decode(&encode(&batch), NOW, &mut out),
        Err(DecodeError::NonFinite { index: 0 })
    ));
}

#[test]
fn garbage_is_rejected() {
    let mut decoder = BatchDecoder::new();
    let mut out = sluice_protocol::Readings::new();
    assert!(decoder.decode(&[], NOW, &mut out).is_err());
    assert!(decoder
        .decode(b"[{\"n\":\"a\",\"v\":1}]", NOW, &mut out)
        .is_err());
    assert!(decoder.decode(&[0xff; 64], NOW, &mut out).is_err());
    let bytes = encode(&sample());
    // Truncations and single-byte corruptions must never panic; most must fail validation.
    for cut in 0..bytes.len() {
        let _ = decoder.decode(&bytes[..cut], NOW, &mut out);
    }
    for index in 0..bytes.len() {
        for flip in [0x01u8, 0x80, 0xff] {
            let mut corrupt = bytes.clone();
            corrupt[index] ^= flip;
            out.clear();
            let _ = decoder.decode(&corrupt, NOW, &mut out);
        }
    }
    assert!(out.len() <= 4);
}
