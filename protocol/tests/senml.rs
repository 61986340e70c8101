//! SenML decoders: RFC 8428 examples, resolution rules, bad inputs.

use ciborium::Value as C;
use sluice_protocol::senml::{decode_cbor, decode_json};
use sluice_protocol::{DecodeError, Reading, Value};

const NOW: f64 = 1_700_000_000.0;

fn json(text: &str) -> Result<Vec<Reading>, DecodeError> {
    let mut out = sluice_protocol::Readings::new();
    decode_json(text.as_bytes(), NOW, &mut out).map(|()| out.to_vec())
}

fn cbor(value: C) -> Result<Vec<Reading>, DecodeError> {
    let mut bytes = Vec::new();
    ciborium::into_writer(&value, &mut bytes).unwrap();
    let mut out = sluice_protocol::Readings::new();
    decode_cbor(&bytes, NOW, &mut out).map(|()| out.to_vec())
}

fn reading(name: &str, time: f64, value: Value) -> Reading {
    Reading {
        name: name.into(),
        time,
        value,
    }
}

#[test]
fn rfc8428_single_datapoint_relative_to_now() {
    // RFC 8428 §5.1.1
    let out = json(r#"[{"n":"urn:dev:ow:10e2073a01080063","u":"Cel","v":23.1}]"#).unwrap();
    assert_eq!(
        out,
        vec![reading(
            "urn:dev:ow:10e2073a01080063",
            NOW,
            Value::Number(23.1)
        )]
    );
}

#[test]
fn rfc8428_multiple_datapoints_with_base_values() {
    // RFC 8428 §5.1.2
    let out = json(
        r#"[
         {"bn":"urn:dev:ow:10e2073a01080063:","n":"voltage","u":"V","v":120.1},
         {"n":"current","u":"A","v":1.2}
        ]"#,
    )
    .unwrap();
    assert_eq!(
        out,
        vec![
            reading(
                "urn:dev:ow:10e2073a01080063:voltage",
                NOW,
                Value::Number(120.1)
            ),
            reading(
                "urn:dev:ow:10e2073a01080063:current",
                NOW,
                Value::Number(1.2)
            ),
        ]
    );
}

#[test]
fn rfc8428_relative_times_against_base_time() {
    // RFC 8428 §5.1.4 (shortened)
    let out = json(
        r#"[{"bn":"urn:dev:ow:10e2073a0108006:","bt":1.276020076001e+09,
          "bu":"A","bver":5,"n":"voltage","u":"V","v":120.1},
          {"n":"current","t":-5,"v":1.2},
          {"n":"current","t":-4,"v":1.3}]"#,
    )
    .unwrap();
    assert_eq!(out.len(), 3);
    assert_eq!(out[0].time, 1.276020076001e9);
    assert_eq!(out[1].time, 1.276020076001e9 - 5.0);
    assert_eq!(out[2].name, "urn:dev:ow:10e2073a0108006:current");
    assert_eq!(out[2].value, Value::Number(1.3));
}

#[test]
fn relative_time_resolves_against_now() {
    let out = json(r#"[{"n":"a","t":-60,"v":1},{"n":"b","bt":10,"t":5,"v":2}]"#).unwrap();
    assert_eq!(out[0].time, NOW - 60.0);
    assert_eq!(out[1].time, NOW + 15.0);
}

#[test]
fn base_value_and_base_sum_add_and_persist() {
    let out = json(r#"[{"n":"a","bv":100,"bs":1000,"v":1,"s":5},{"n":"b","v":2}]"#).unwrap();
    assert_eq!(
        out,
        vec![
            reading("a", NOW, Value::Number(101.0)),
            reading("a:sum", NOW, Value::Number(1005.0)),
            reading("b", NOW, Value::Number(102.0)),
        ]
    );
}

#[test]
fn sum_only_is_stored_under_the_name() {
    let out = json(r#"[{"n":"energy","s":42.5}]"#).unwrap();
    assert_eq!(out, vec![reading("energy", NOW, Value::Number(42.5))]);
}

#[test]
fn string_bool_and_data_values() {
    let out = json(
        r#"[{"bn":"d/","n":"s","vs":"open"},{"n":"b","vb":true},{"n":"x","vd":"aGkh"},{"n":"y","vd":"_-8"}]"#,
    )
    .unwrap();
    assert_eq!(out[0], reading("d/s", NOW, Value::String("open".into())));
    assert_eq!(out[1], reading("d/b", NOW, Value::Bool(true)));
    assert_eq!(out[2], reading("d/x", NOW, Value::Data(b"hi!".to_vec())));
    assert_eq!(out[3], reading("d/y", NOW, Value::Data(vec![0xff, 0xef])));
}

/// Whether an error is the expected one.
type Expected = fn(&DecodeError) -> bool;

#[test]
fn json_bad_inputs_are_rejected_and_leave_out_untouched() {
    let cases: &[(&str, Expected)] = &[
        ("not json", |e| matches!(e, DecodeError::Json(_))),
        (r#"{"n":"a","v":1}"#, |e| {
            matches!(e, DecodeError::NotAnArray)
        }),
        (r#"[1]"#, |e| {
            matches!(e, DecodeError::RecordNotMap { index: 0 })
        }),
        (r#"[{"v":1}]"#, |e| {
            matches!(e, DecodeError::MissingName { index: 0 })
        }),
        (r#"[{"n":"a"}]"#, |e| {
            matches!(e, DecodeError::NoValue { index: 0 })
        }),
        (r#"[{"n":"a","v":1,"vs":"x"}]"#, |e| {
            matches!(e, DecodeError::MultipleValues { .. })
        }),
        (r#"[{"n":"a","v":"1"}]"#, |e| {
            matches!(e, DecodeError::WrongType { .. })
        }),
        (r#"[{"n":"a","v":1e999}]"#, |e| {
            matches!(e, DecodeError::Json(_))
        }),
        (r#"[{"n":"a","v":1.7e308,"bv":1.7e308}]"#, |e| {
            matches!(e, DecodeError::NonFinite { .. })
        }),
        (r#"[{"n":"a","v":1,"foo_":1}]"#, |e| {
            matches!(e, DecodeError::MandatoryLabel { .. })
        }),
        (r#"[{"n":"a","vd":"!!"}]"#, |e| {
            matches!(e, DecodeError::BadBase64 { .. })
        }),
        (r#"[{"n":"a","v":1,"bver":11}]"#, |e| {
            matches!(e, DecodeError::UnsupportedVersion { .. })
        }),
        (r#"[{"n":"a","v":1},{"n":"b"}]"#, |e| {
            matches!(e, DecodeError::NoValue { index: 1 })
        }),
    ];
    for (input, expected) in cases {
        let mut out = sluice_protocol::Readings::new();
        out.push("kept", 1.0, sluice_protocol::ValueRef::Bool(false));
        let error = decode_json(input.as_bytes(), NOW, &mut out).unwrap_err();
        assert!(expected(&error), "{input}: unexpected {error:?}");
        assert!(error.to_string().len() < 128);
        assert_eq!(out.len(), 1, "{input}: out not truncated back");
    }
    let long = format!(r#"[{{"n":"{}","v":1}}]"#, "x".repeat(256));
    assert!(matches!(json(&long), Err(DecodeError::NameTooLong { .. })));
}

#[test]
fn unknown_labels_are_ignored() {
    let out = json(r#"[{"n":"a","v":1,"ut":5,"foo":[1,2]}]"#).unwrap();
    assert_eq!(out.len(), 1);
}

#[test]
fn empty_pack_decodes_to_nothing() {
    assert_eq!(json("[]").unwrap(), vec![]);
}

fn map(fields: Vec<(i64, C)>) -> C {
    C::Map(
        fields
            .into_iter()
            .map(|(k, v)| (C::Integer(k.into()), v))
            .collect(),
    )
}

#[test]
fn rfc8428_cbor_example_with_integer_labels() {
    // RFC 8428 §6 example (the §5.1.2 pack) in CBOR.
    let pack = C::Array(vec![
        map(vec![
            (-2, C::Text("urn:dev:ow:10e2073a01080063:".into())),
            (0, C::Text("voltage".into())),
            (1, C::Text("V".into())),
            (2, C::Float(120.1)),
        ]),
        map(vec![
            (0, C::Text("current".into())),
            (1, C::Text("A".into())),
            (2, C::Float(1.2)),
        ]),
    ]);
    let out = cbor(pack).unwrap();
    assert_eq!(
        out,
        vec![
            reading(
                "urn:dev:ow:10e2073a01080063:voltage",
                NOW,
                Value::Number(120.1)
            ),
            reading(
                "urn:dev:ow:10e2073a01080063:current",
                NOW,
                Value::Number(1.2)
            ),
        ]
    );
}

#[test]
fn cbor_all_value_kinds_times_and_sum() {
    let pack = C::Array(vec![
        map(vec![
            (-1, C::Integer(10.into())),
            (-2, C::Text("d/".into())),
            (-3, C::Integer(1_600_000_000.into())),
            (-5, C::Integer(10.into())),
            (-6, C::Integer(100.into())),
            (0, C::Text("n".into())),
            (2, C::Integer(1.into())),
            (5, C::Float(0.5)),
            (6, C::Integer((-10).into())),
        ]),
        map(vec![(0, C::Text("s".into())), (3, C::Text("on".into()))]),
        map(vec![(0, C::Text("b".into())), (4, C::Bool(false))]),
        map(vec![
            (0, C::Text("x".into())),
            (8, C::Bytes(vec![1, 2, 3])),
            (7, C::Integer(1.into())),
        ]),
    ]);
    let out = cbor(pack).unwrap();
    let t = 1_600_000_000.0;
    assert_eq!(
        out,
        vec![
            reading("d/n", t - 10.0, Value::Number(11.0)),
            reading("d/n:sum", t - 10.0, Value::Number(100.5)),
            reading("d/s", t, Value::String("on".into())),
            reading("d/b", t, Value::Bool(false)),
            reading("d/x", t, Value::Data(vec![1, 2, 3])),
        ]
    );
}

#[test]
fn cbor_bad_inputs_are_rejected() {
    let mut out = sluice_protocol::Readings::new();
    assert!(matches!(
        decode_cbor(&[0xff, 0x00], NOW, &mut out),
        Err(DecodeError::Cbor(_))
    ));
    assert!(matches!(
        decode_cbor(&[0x9f], NOW, &mut out),
        Err(DecodeError::Cbor(_))
    ));
    assert!(matches!(
        decode_cbor(&[], NOW, &mut out),
        Err(DecodeError::Cbor(_))
    ));
    // Trailing bytes after a valid empty array.
    assert!(matches!(
        decode_cbor(&[0x80, 0x00], NOW, &mut out),
        Err(DecodeError::Cbor(_))
    ));
    assert!(matches!(
        cbor(C::Integer(1.into())),
        Err(DecodeError::NotAnArray)
    ));
    assert!(matches!(
        cbor(C::Array(vec![C::Integer(1.into())])),
        Err(DecodeError::RecordNotMap { .. })
    ));
    let text_value = C::Array(vec![map(vec![
        (0, C::Text("a".into())),
        (2, C::Text("1".into())),
    ])]);
    assert!(matches!(
        cbor(text_value),
        Err(DecodeError::WrongType { .. })
    ));
    let nan = C::Array(vec![map(vec![
        (0, C::Text("a".into())),
        (2, C::Float(f64::NAN)),
    ])]);
    assert!(matches!(cbor(nan), Err(DecodeError::NonFinite { .. })));
    let vd_text = C::Array(vec![map(vec![
        (0, C::Text("a".into())),
        (8, C::Text("AA".into())),
    ])]);
    assert!(matches!(cbor(vd_text), Err(DecodeError::WrongType { .. })));
    assert!(out.is_empty());
    // Deep nesting must not overflow the stack.
    let deep = vec![0x81u8; 100_000];
    assert!(decode_cbor(&deep, NOW, &mut out).is_err());
}
