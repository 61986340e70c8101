//! The borrowing CoAP parser and the response writer, cross-checked against coap-lite over
//! generated messages, random bytes and mutated encodings.

use coap_lite::{CoapOption, MessageClass, MessageType, Packet};
use proptest::prelude::*;
use sluice_protocol::message::{self, Message, ParseError};

fn message_type(kind: u8) -> MessageType {
    match kind {
        0 => MessageType::Confirmable,
        1 => MessageType::NonConfirmable,
        2 => MessageType::Acknowledgement,
        _ => MessageType::Reset,
    }
}

/// Option numbers and value lengths that exercise every delta/length form: inline (0-12),
/// one extension byte (13-268) and two (269+).
fn option() -> impl Strategy<Value = (u16, Vec<u8>)> {
    let number = prop_oneof![0u16..13, 13u16..269, 269u16..2000, any::<u16>()];
    let length = prop_oneof![0usize..13, 13usize..269, 269usize..400];
    (number, length).prop_flat_map(|(number, length)| {
        (
            Just(number),
            proptest::collection::vec(any::<u8>(), length..=length),
        )
    })
}

prop_compose! {
    fn packet()(
        kind in 0u8..4,
        code in any::<u8>(),
        message_id in any::<u16>(),
        token in proptest::collection::vec(any::<u8>(), 0..=8),
        options in proptest::collection::vec(option(), 0..6),
        payload in prop_oneof![Just(Vec::new()), proptest::collection::vec(any::<u8>(), 1..64)],
    ) -> Packet {
        let mut packet = Packet::new();
        packet.header.set_version(1);
        packet.header.set_type(message_type(kind));
        packet.header.code = MessageClass::from(code);
        packet.header.message_id = message_id;
        packet.set_token(token);
        for (number, value) in options {
            packet.add_option(CoapOption::from(number), value);
        }
        packet.payload = payload;
        packet
    }
}

/// The options of a coap-lite packet in wire order.
fn reference_options(packet: &Packet) -> Vec<(u16, Vec<u8>)> {
    packet
        .options()
        .flat_map(|(number, values)| values.iter().map(move |value| (*number, value.clone())))
        .collect()
}

/// Asserts that our parse of `datagram` agrees with coap-lite's.
fn agrees(datagram: &[u8]) -> Result<(), TestCaseError> {
    let ours = Message::parse(datagram);
    let reference = Packet::from_bytes(datagram);
    // coap-lite neither checks the version nor refuses a payload marker with no payload; the
    // option encoding is canonical, so the latter shows as a datagram one byte longer than its
    // re-encoding.
    let reference_valid = match &reference {
        Ok(packet) => {
            // Re-encoded with a non-Empty code: coap-lite writes an Empty message (0.00)
            // without its options and payload.
            let mut packet = packet.clone();
            packet.header.code = MessageClass::from(0x01);
            datagram[0] >> 6 == 1 && packet.to_bytes_unlimited().unwrap().len() == datagram.len()
        }
        Err(_) => false,
    };
    match (ours, reference) {
        (Ok(message), Ok(packet)) => {
            prop_assert!(reference_valid, "accepted {datagram:02x?}");
            prop_assert_eq!(message.message_type, packet.header.get_type() as u8);
            prop_assert_eq!(message.code, u8::from(packet.header.code));
            prop_assert_eq!(message.message_id, packet.header.message_id);
            prop_assert_eq!(message.token, packet.get_token());
            let options: Vec<(u16, Vec<u8>)> = message
                .options()
                .map(|(number, value)| (number, value.to_vec()))
                .collect();
            prop_assert_eq!(options, reference_options(&packet));
            prop_assert_eq!(message.payload, &packet.payload[..]);
        }
        (Err(error), Ok(_)) => {
            prop_assert!(!reference_valid, "rejected {datagram:02x?}: {error}");
            prop_assert!(
                matches!(error, ParseError::Version | ParseError::EmptyPayload),
                "{error}"
            );
        }
        (Ok(_), Err(error)) => {
            prop_assert!(
                false,
                "accepted {datagram:02x?} which coap-lite refuses: {error:?}"
            )
        }
        (Err(_), Err(_)) => {}
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn parses_what_coap_lite_encodes(packet in packet()) {
        let datagram = packet.to_bytes_unlimited().unwrap();
        let message = Message::parse(&datagram).expect("a valid encoding");
        agrees(&datagram)?;
        // coap-lite leaves out the payload of an Empty message (code 0.00).
        let packet = Packet::from_bytes(&datagram).unwrap();
        prop_assert_eq!(message.message_type, packet.header.get_type() as u8);
        prop_assert_eq!(message.code, u8::from(packet.header.code));
        prop_assert_eq!(message.message_id, packet.header.message_id);
        prop_assert_eq!(message.token, packet.get_token());
        let options: Vec<(u16, Vec<u8>)> =
            message.options().map(|(n, v)| (n, v.to_vec())).collect();
        prop_assert_eq!(&options, &reference_options(&packet));
        prop_assert_eq!(message.payload, &packet.payload[..]);
        // The first-option and all-values lookups agree with coap-lite's.
        for (number, _) in &options {
            let reference = packet.get_option(CoapOption::from(*number)).unwrap();
            prop_assert_eq!(message.option(*number), reference.front().map(Vec::as_slice));
            let values: Vec<&[u8]> = message.option_values(*number).collect();
            let reference: Vec<&[u8]> = reference.iter().map(Vec::as_slice).collect();
            prop_assert_eq!(values, reference);
        }
    }

    #[test]
    fn mutated_encodings_agree_with_coap_lite(
        packet in packet(),
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..4), 1..4),
    ) {
        let mut datagram = packet.to_bytes_unlimited().unwrap();
        for (at, byte, how) in edits {
            if datagram.is_empty() {
                break;
            }
            let at = at.index(datagram.len());
            match how {
                0 => datagram[at] = byte,
                1 => datagram.truncate(at),
                2 => datagram.insert(at, byte),
                _ => datagram.push(0xff),
            }
        }
        agrees(&datagram)?;
    }

    #[test]
    fn random_bytes_agree_with_coap_lite(
        head in prop_oneof![Just(0x40u8), Just(0x44), Just(0x58), any::<u8>()],
        rest in proptest::collection::vec(
            prop_oneof![Just(0xffu8), Just(0xd0), Just(0xe0), Just(0x0d), Just(0x0e), any::<u8>()],
            0..40,
        ),
    ) {
        let mut datagram = vec![head];
        datagram.extend_from_slice(&rest);
        agrees(&datagram)?;
    }

    #[test]
    fn writes_what_coap_lite_writes(
        kind in 0u8..4,
        code in any::<u8>(),
        message_id in any::<u16>(),
        token in proptest::collection::vec(any::<u8>(), 0..=8),
        mut options in proptest::collection::vec((prop_oneof![0u16..20, any::<u16>()], any::<u32>()), 0..4),
        payload in proptest::collection::vec(any::<u8>(), 0..200),
    ) {
        // Responses only: coap-lite writes no payload for an Empty message (code 0.00).
        prop_assume!(code != 0);
        options.sort_by_key(|(number, _)| *number);
        let mut ours = vec![0xaa; 3];
        message::write(&mut ours, kind, code, message_id, &token, &options, &payload);

        let mut packet = Packet::new();
        packet.header.set_version(1);
        packet.header.set_type(message_type(kind));
        packet.header.code = MessageClass::from(code);
        packet.header.message_id = message_id;
        packet.set_token(token);
        for (number, value) in &options {
            let bytes = value.to_be_bytes();
            let skip = bytes.iter().take_while(|b| **b == 0).count();
            packet.add_option(CoapOption::from(*number), bytes[skip..].to_vec());
        }
        packet.payload = payload;
        prop_assert_eq!(ours, packet.to_bytes_unlimited().unwrap());
    }
}

#[test]
fn malformed_messages_are_refused_with_their_reason() {
    let cases: [(&[u8], ParseError); 9] = [
        (&[0x40, 0x01, 0x00], ParseError::TooShort),
        (&[0x80, 0x01, 0x00, 0x01], ParseError::Version),
        (&[0x49, 0x01, 0x00, 0x01], ParseError::TokenLength),
        (&[0x42, 0x01, 0x00, 0x01, 0xaa], ParseError::TruncatedToken),
        // Delta nibble 15 with a length nibble that is not 15.
        (
            &[0x40, 0x01, 0x00, 0x01, 0xf1, 0x00],
            ParseError::ReservedNibble,
        ),
        // Length nibble 15.
        (&[0x40, 0x01, 0x00, 0x01, 0x1f], ParseError::ReservedNibble),
        // Extended delta (14) with one of its two bytes.
        (
            &[0x40, 0x01, 0x00, 0x01, 0xe0, 0x01],
            ParseError::TruncatedOption,
        ),
        // Option numbers beyond 65535: 65804 in one delta.
        (
            &[0x40, 0x01, 0x00, 0x01, 0xe0, 0xff, 0xff],
            ParseError::OptionNumber,
        ),
        (&[0x40, 0x01, 0x00, 0x01, 0xff], ParseError::EmptyPayload),
    ];
    for (datagram, expected) in cases {
        assert_eq!(
            Message::parse(datagram).map(|_| ()),
            Err(expected),
            "{datagram:02x?}"
        );
    }
    // A value running past the end, with a one-byte length extension.
    assert_eq!(
        Message::parse(&[0x40, 0x01, 0x00, 0x01, 0xbd, 0x05, b'a']).map(|_| ()),
        Err(ParseError::TruncatedOption)
    );
    // The extensions at their bounds parse: delta 13 + 255 = 268, then 269 + 64998 = 65267.
    let mut datagram = vec![0x40, 0x01, 0x00, 0x01, 0xd0, 0xff, 0xe0, 0xfd, 0xe6];
    datagram.extend_from_slice(&[0xff, b'p']);
    let message = Message::parse(&datagram).unwrap();
    let options: Vec<(u16, &[u8])> = message.options().collect();
    assert_eq!(options, vec![(268, &[][..]), (65535, &[][..])]);
    assert_eq!(message.payload, b"p");
}
