//! The streaming SenML decoders against the tree-based ones they replaced (`reference/senml.rs`):
//! the same readings, or the same error, over generated packs, broken ones and mutated bytes.

#[allow(dead_code)]
mod reference {
    pub mod senml;
}

use ciborium::Value as C;
use proptest::prelude::*;
use sluice_protocol::senml::{decode_cbor, decode_json};
use sluice_protocol::{DecodeError, Reading, Readings};

const NOW: f64 = 1_700_000_000.0;

type Decoded = Result<Vec<Reading>, DecodeError>;

/// Readings compare bit for bit (a NaN never gets through either decoder).
fn same(ours: &Decoded, theirs: &Decoded, exact_messages: bool) -> bool {
    match (ours, theirs) {
        (Ok(a), Ok(b)) => a == b,
        (Err(DecodeError::Cbor(_)), Err(DecodeError::Cbor(_))) if !exact_messages => true,
        (Err(a), Err(b)) => a == b,
        _ => false,
    }
}

fn ours_json(payload: &[u8], out: &mut Readings) -> Decoded {
    out.clear();
    decode_json(payload, NOW, out).map(|()| out.to_vec())
}

fn ours_cbor(payload: &[u8], out: &mut Readings) -> Decoded {
    out.clear();
    decode_cbor(payload, NOW, out).map(|()| out.to_vec())
}

fn theirs_json(payload: &[u8]) -> Decoded {
    let mut out = Vec::new();
    reference::senml::decode_json(payload, NOW, &mut out).map(|()| out)
}

fn theirs_cbor(payload: &[u8]) -> Decoded {
    let mut out = Vec::new();
    reference::senml::decode_cbor(payload, NOW, &mut out).map(|()| out)
}

fn json_value() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("1".to_string()),
        Just("-3".to_string()),
        Just("2.5".to_string()),
        Just("1e9".to_string()),
        Just("1.7e9".to_string()),
        Just("1e400".to_string()),
        Just("18446744073709551615".to_string()),
        Just("\"a\"".to_string()),
        Just("\"d/\"".to_string()),
        Just("\"\\u00e9\\n\"".to_string()),
        Just("\"AAE\"".to_string()),
        Just("\"@@\"".to_string()),
        Just("\"\"".to_string()),
        Just("true".to_string()),
        Just("false".to_string()),
        Just("null".to_string()),
        Just("[1,{\"a\":[]}]".to_string()),
        Just("{}".to_string()),
        (0u32..1000).prop_map(|n| format!("{n}.25")),
    ]
}

fn json_label() -> impl Strategy<Value = &'static str> {
    prop_oneof![
        Just("bn"),
        Just("bt"),
        Just("bv"),
        Just("bs"),
        Just("bver"),
        Just("bu"),
        Just("n"),
        Just("u"),
        Just("v"),
        Just("vs"),
        Just("vb"),
        Just("vd"),
        Just("s"),
        Just("t"),
        Just("ut"),
        Just("x_"),
        Just("a_"),
        Just("zz"),
        Just("n\\u0000"),
    ]
}

fn json_record() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => proptest::collection::vec((json_label(), json_value()), 0..6).prop_map(|fields| {
            let fields: Vec<String> =
                fields.iter().map(|(label, value)| format!("\"{label}\":{value}")).collect();
            format!("{{{}}}", fields.join(","))
        }),
        1 => json_value(),
    ]
}

fn json_pack() -> impl Strategy<Value = String> {
    prop_oneof![
        10 => proptest::collection::vec(json_record(), 0..5)
            .prop_map(|records| format!("[{}]", records.join(","))),
        1 => json_record(),
    ]
}

fn cbor_value() -> impl Strategy<Value = C> {
    let leaf = prop_oneof![
        (-5i64..5).prop_map(|n| C::Integer(n.into())),
        Just(C::Integer(u64::MAX.into())),
        Just(C::Integer((-(1i128 << 64)).try_into().unwrap())),
        any::<f64>().prop_map(C::Float),
        Just(C::Float(1.7e9)),
        Just(C::Text("a".into())),
        Just(C::Text("d/".into())),
        Just(C::Text("x_".into())),
        Just(C::Text(String::new())),
        Just(C::Bytes(vec![1, 2])),
        Just(C::Bool(true)),
        Just(C::Null),
        Just(C::Tag(2, Box::new(C::Bytes(vec![1])))),
        Just(C::Tag(3, Box::new(C::Bytes(vec![0xff; 17])))),
        Just(C::Tag(1, Box::new(C::Float(1.0)))),
    ];
    leaf.prop_recursive(2, 8, 3, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..3).prop_map(C::Array),
            proptest::collection::vec((inner.clone(), inner), 0..3).prop_map(C::Map),
        ]
    })
}

fn cbor_key() -> impl Strategy<Value = C> {
    prop_oneof![
        8 => (-7i64..10).prop_map(|n| C::Integer(n.into())),
        1 => Just(C::Text("y_".into())),
        1 => Just(C::Text("y".into())),
        1 => Just(C::Tag(2, Box::new(C::Bytes(vec![2])))),
        1 => Just(C::Bytes(vec![0])),
    ]
}

fn cbor_pack() -> impl Strategy<Value = C> {
    let record = prop_oneof![
        8 => proptest::collection::vec((cbor_key(), cbor_value()), 0..6).prop_map(C::Map),
        1 => cbor_value(),
    ];
    prop_oneof![
        10 => proptest::collection::vec(record, 0..5).prop_map(C::Array),
        1 => cbor_value(),
    ]
}

fn mutate(mut bytes: Vec<u8>, edits: &[(prop::sample::Index, u8, u8)]) -> Vec<u8> {
    for (at, byte, how) in edits {
        if bytes.is_empty() {
            break;
        }
        let at = at.index(bytes.len());
        match how {
            0 => bytes[at] = *byte,
            1 => bytes.truncate(at),
            _ => bytes.insert(at, *byte),
        }
    }
    bytes
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn json_decodes_as_before(pack in json_pack()) {
        let mut out = Readings::new();
        let ours = ours_json(pack.as_bytes(), &mut out);
        let theirs = theirs_json(pack.as_bytes());
        prop_assert!(same(&ours, &theirs, true), "{pack}\nours:   {ours:?}\ntheirs: {theirs:?}");
    }

    #[test]
    fn mutated_json_decodes_as_before(
        pack in json_pack(),
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 1..3),
    ) {
        let bytes = mutate(pack.into_bytes(), &edits);
        let mut out = Readings::new();
        let ours = ours_json(&bytes, &mut out);
        let theirs = theirs_json(&bytes);
        prop_assert!(same(&ours, &theirs, true), "{:?}\nours:   {ours:?}\ntheirs: {theirs:?}", String::from_utf8_lossy(&bytes));
    }

    #[test]
    fn cbor_decodes_as_before(pack in cbor_pack()) {
        let mut bytes = Vec::new();
        ciborium::into_writer(&pack, &mut bytes).unwrap();
        let mut out = Readings::new();
        let ours = ours_cbor(&bytes, &mut out);
        let theirs = theirs_cbor(&bytes);
        prop_assert!(same(&ours, &theirs, true), "{pack:?}\nours:   {ours:?}\ntheirs: {theirs:?}");
    }

    #[test]
    fn mutated_cbor_decodes_as_before(
        pack in cbor_pack(),
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 1..3),
    ) {
        let mut bytes = Vec::new();
        ciborium::into_writer(&pack, &mut bytes).unwrap();
        let bytes = mutate(bytes, &edits);
        let mut out = Readings::new();
        let ours = ours_cbor(&bytes, &mut out);
        let theirs = theirs_cbor(&bytes);
        prop_assert!(same(&ours, &theirs, false), "{bytes:02x?}\nours:   {ours:?}\ntheirs: {theirs:?}");
    }
}

/// Reusing one Readings across packs gives the same readings as a fresh one.
#[test]
fn reused_readings_hold_no_stale_values() {
    let packs: [&[u8]; 3] = [
        br#"[{"n":"a","vs":"long string value"},{"n":"b","vd":"AAECAw"}]"#,
        br#"[{"n":"a","v":1},{"n":"b","vs":"x"}]"#,
        br#"[{"n":"c","vb":true}]"#,
    ];
    let mut reused = Readings::new();
    for pack in packs.iter().chain(packs.iter().rev()) {
        let ours = ours_json(pack, &mut reused);
        assert_eq!(ours, theirs_json(pack));
    }
}
