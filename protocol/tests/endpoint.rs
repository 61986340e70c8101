//! The endpoint driven with a virtual clock and no sockets.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use coap_lite::{CoapOption, MessageClass, MessageType, Packet, RequestType, ResponseType};
use sluice_protocol::{Endpoint, EndpointConfig, Exchange, Identity, Outcome, Reading, Value};

const NOW: f64 = 1_700_000_000.0;

fn peer(port: u16) -> SocketAddr {
    SocketAddr::from(([192, 0, 2, 1], port))
}

fn request(
    kind: MessageType,
    method: RequestType,
    mid: u16,
    path: &[&str],
    payload: &[u8],
) -> Packet {
    let mut packet = Packet::new();
    packet.header.set_version(1);
    packet.header.set_type(kind);
    packet.header.code = MessageClass::Request(method);
    packet.header.message_id = mid;
    packet.set_token(vec![0xa1, 0xb2, mid as u8]);
    for segment in path {
        packet.add_option(CoapOption::UriPath, segment.as_bytes().to_vec());
    }
    packet.payload = payload.to_vec();
    packet
}

fn post(kind: MessageType, mid: u16, path: &[&str], payload: &[u8]) -> Packet {
    request(kind, RequestType::Post, mid, path, payload)
}

fn bytes(packet: &Packet) -> Vec<u8> {
    packet.to_bytes_unlimited().unwrap()
}

fn uint(value: u32) -> Vec<u8> {
    let bytes = value.to_be_bytes();
    let skip = bytes.iter().take_while(|b| **b == 0).count();
    bytes[skip..].to_vec()
}

struct Harness {
    endpoint: Endpoint,
    t0: Instant,
    readings: sluice_protocol::Readings,
    response: Vec<u8>,
}

impl Harness {
    fn new() -> Self {
        Self::with(EndpointConfig::default())
    }

    fn with(config: EndpointConfig) -> Self {
        Self {
            endpoint: Endpoint::new(config),
            t0: Instant::now(),
            readings: sluice_protocol::Readings::new(),
            response: Vec::new(),
        }
    }

    fn send_at(
        &mut self,
        secs: u64,
        from: SocketAddr,
        identity: Option<&str>,
        datagram: &[u8],
    ) -> Outcome {
        let identity = identity.map(|device| Identity { device, session: 1 });
        self.send_identified(secs, from, identity, datagram)
    }

    fn send_identified(
        &mut self,
        secs: u64,
        from: SocketAddr,
        identity: Option<Identity<'_>>,
        datagram: &[u8],
    ) -> Outcome {
        self.readings.clear();
        let now = self.t0 + Duration::from_secs(secs);
        self.endpoint.handle(
            now,
            NOW,
            from,
            identity,
            datagram,
            &mut self.readings,
            &mut self.response,
        )
    }

    fn send(&mut self, packet: &Packet) -> Outcome {
        self.send_at(0, peer(1), None, &bytes(packet))
    }

    fn answer(&self) -> Packet {
        Packet::from_bytes(&self.response).expect("response parses")
    }

    /// Sends and expects a Reply with `code`; returns the response.
    fn expect_error(
        &mut self,
        packet: &Packet,
        identity: Option<&str>,
        code: ResponseType,
    ) -> Packet {
        let outcome = self.send_at(0, peer(1), identity, &bytes(packet));
        assert!(matches!(outcome, Outcome::Reply), "{outcome:?}");
        let answer = self.answer();
        assert_eq!(answer.header.code, MessageClass::Response(code));
        assert!(self.readings.is_empty());
        answer
    }
}

const BODY: &[u8] = br#"[{"n":"temp","v":21.5}]"#;

#[test]
fn con_store_acks_only_in_store_then_duplicates_get_the_same_bytes() {
    let mut h = Harness::new();
    let packet = post(MessageType::Confirmable, 7, &["t", "dev-1"], BODY);
    let Outcome::Store(exchange) = h.send(&packet) else {
        panic!("expected Store")
    };
    assert_eq!(exchange.device, "dev-1");
    assert_eq!(exchange.message_id, 7);
    assert_eq!(
        h.readings.to_vec(),
        vec![Reading {
            name: "temp".into(),
            time: NOW,
            value: Value::Number(21.5)
        }]
    );
    let ack = h.answer();
    assert_eq!(ack.header.get_type(), MessageType::Acknowledgement);
    assert_eq!(
        ack.header.code,
        MessageClass::Response(ResponseType::Changed)
    );
    assert_eq!(ack.header.message_id, 7);
    assert_eq!(ack.get_token(), packet.get_token());
    let ack_bytes = h.response.clone();

    // Duplicate while the commit is pending: ignored, not stored.
    assert!(matches!(h.send(&packet), Outcome::Ignore));
    assert!(h.response.is_empty() && h.readings.is_empty());

    h.endpoint.committed(&exchange);
    assert!(matches!(h.send(&packet), Outcome::Reply));
    assert_eq!(h.response, ack_bytes);
    assert!(h.readings.is_empty());
    let counters = h.endpoint.counters();
    assert_eq!(counters.duplicates, 2);
    assert_eq!(counters.readings, 1);
}

#[test]
fn another_request_reusing_peer_and_message_id_is_stored_not_answered_from_the_table() {
    // Behind a NAT or a UDP balancer, another device (or a device that restarted) can reach
    // sluiced from the same address and port with a Message ID still remembered: its request has
    // other bytes than the remembered one, so it is new, not a retransmission.
    let mut h = Harness::new();
    let first = post(MessageType::Confirmable, 7, &["t", "dev-1"], BODY);
    let second = post(
        MessageType::Confirmable,
        7,
        &["t", "dev-2"],
        br#"[{"n":"temp","v":3}]"#,
    );
    let Outcome::Store(first_exchange) = h.send(&first) else {
        panic!("expected Store")
    };
    let Outcome::Store(second_exchange) = h.send(&second) else {
        panic!("a request with other bytes must be stored")
    };
    assert_eq!(second_exchange.device, "dev-2");
    assert_eq!(h.readings.len(), 1);
    assert_eq!(h.endpoint.counters().message_id_reuses, 1);
    assert_eq!(h.endpoint.counters().duplicates, 0);

    // The first exchange's commit must not mark the second one answered: the second's
    // retransmission waits for its own commit.
    h.endpoint.committed(&first_exchange);
    assert!(matches!(h.send(&second), Outcome::Ignore));
    h.endpoint.committed(&second_exchange);
    assert!(matches!(h.send(&second), Outcome::Reply));
    assert_eq!(h.answer().get_token(), second.get_token());
    // A failure of the replaced exchange neither answers nor forgets the live one.
    let mut response = Vec::new();
    h.endpoint.unavailable(&first_exchange, 30, &mut response);
    assert!(response.is_empty());
    assert!(matches!(h.send(&second), Outcome::Reply));
    assert_eq!(h.endpoint.counters().duplicates, 3);
}

#[test]
fn a_restored_exchange_answers_its_token_and_takes_another_token_as_a_new_request() {
    // The store keeps the response of an exchange (which echoes the request's token), not the
    // request's bytes: after a restart, a request with the peer, Message ID and token of a
    // recovered exchange counts as its retransmission; with another token it is a new request
    // (another device behind the same NAT port, a device that restarted and reused the ID).
    let mut h = Harness::new();
    let packet = post(MessageType::Confirmable, 11, &["t", "dev-1"], BODY);
    let Outcome::Store(exchange) = h.send(&packet) else {
        panic!("expected Store")
    };
    let ack = h.response.clone();
    h.endpoint.committed(&exchange);
    let mut restarted = Harness::new();
    assert!(restarted.endpoint.restore(
        restarted.t0,
        Duration::from_secs(1),
        peer(1),
        11,
        true,
        &ack
    ));
    let other = post(MessageType::Confirmable, 11, &["t", "dev-1"], b"[]");
    assert!(matches!(restarted.send(&other), Outcome::Reply));
    assert_eq!(restarted.response, ack);
    assert!(restarted.readings.is_empty());
    let mut reused = post(MessageType::Confirmable, 11, &["t", "dev-9"], BODY);
    reused.set_token(vec![0x77, 0x01]);
    let Outcome::Store(new) = restarted.send(&reused) else {
        panic!("another token is a new request")
    };
    assert_eq!(new.message_id, 11);
    assert_eq!(restarted.readings.len(), 1);
    assert_eq!(restarted.endpoint.counters().message_id_reuses, 1);
}

#[test]
fn unavailable_answers_503_and_a_retransmission_is_stored() {
    let mut h = Harness::new();
    let packet = post(MessageType::Confirmable, 9, &["t", "dev-1"], BODY);
    let Outcome::Store(exchange) = h.send(&packet) else {
        panic!("expected Store")
    };
    let mut response = Vec::new();
    h.endpoint.unavailable(&exchange, 30, &mut response);
    let answer = Packet::from_bytes(&response).unwrap();
    assert_eq!(answer.header.get_type(), MessageType::Acknowledgement);
    assert_eq!(
        answer.header.code,
        MessageClass::Response(ResponseType::ServiceUnavailable)
    );
    assert_eq!(answer.header.message_id, 9);
    assert_eq!(answer.get_token(), packet.get_token());
    assert_eq!(answer.get_first_option(CoapOption::MaxAge), Some(&vec![30]));
    assert!(!answer.payload.is_empty());
    assert_eq!(h.endpoint.counters().unavailable, 1);
    assert!(matches!(h.send(&packet), Outcome::Store(_)));
    assert_eq!(h.readings.len(), 1);
}

#[test]
fn rejected_answers_400_and_duplicates_get_it_again_without_storing() {
    let mut h = Harness::new();
    let packet = post(MessageType::Confirmable, 10, &["t", "dev-1"], BODY);
    let Outcome::Store(exchange) = h.send(&packet) else {
        panic!("expected Store")
    };
    let mut response = Vec::new();
    h.endpoint
        .rejected(&exchange, "time 1e300 is out of range", &mut response);
    let answer = Packet::from_bytes(&response).unwrap();
    assert_eq!(answer.header.get_type(), MessageType::Acknowledgement);
    assert_eq!(
        answer.header.code,
        MessageClass::Response(ResponseType::BadRequest)
    );
    assert_eq!(answer.payload, b"time 1e300 is out of range");
    assert_eq!(h.endpoint.counters().bad_request, 1);
    assert!(matches!(h.send(&packet), Outcome::Reply));
    assert_eq!(h.response, response);
    assert!(h.readings.is_empty());
}

#[test]
fn message_ids_are_scoped_to_their_dtls_session() {
    let mut h = Harness::new();
    let packet = post(MessageType::Confirmable, 77, &["t"], BODY);
    let session = |device, session| Some(Identity { device, session });
    let Outcome::Store(first) = h.send_identified(0, peer(1), session("dev-7", 1), &bytes(&packet))
    else {
        panic!("expected Store")
    };
    h.endpoint.committed(&first);
    // The same session retransmits: a duplicate.
    let again = h.send_identified(1, peer(1), session("dev-7", 1), &bytes(&packet));
    assert!(matches!(again, Outcome::Reply), "{again:?}");
    // Another device handshakes from the same address and port and happens to reuse the
    // Message ID: a new request, stored under its own device.
    let Outcome::Store(other) = h.send_identified(2, peer(1), session("dev-8", 2), &bytes(&packet))
    else {
        panic!("a new session's request is not a duplicate of the old session's")
    };
    assert_eq!(other.device, "dev-8");
    assert_eq!(h.readings.len(), 1);
    // A restored exchange (no session known) matches a retransmission over any session.
    let mut restored = Harness::new();
    let response = bytes(&packet); // any datagram stands in for the stored response
    assert!(restored.endpoint.restore(
        restored.t0,
        Duration::from_secs(1),
        peer(1),
        77,
        true,
        &response
    ));
    let retransmitted = restored.send_identified(0, peer(1), session("dev-7", 5), &bytes(&packet));
    assert!(matches!(retransmitted, Outcome::Reply), "{retransmitted:?}");
}

#[test]
fn unavailable_for_non_is_a_non_response() {
    let mut h = Harness::new();
    let packet = post(MessageType::NonConfirmable, 10, &["t", "d"], BODY);
    let Outcome::Store(exchange) = h.send(&packet) else {
        panic!("expected Store")
    };
    let mut response = Vec::new();
    h.endpoint.unavailable(&exchange, 5, &mut response);
    let answer = Packet::from_bytes(&response).unwrap();
    assert_eq!(answer.header.get_type(), MessageType::NonConfirmable);
    assert_eq!(answer.get_token(), packet.get_token());
}

#[test]
fn dedup_entries_expire_after_exchange_and_non_lifetime() {
    let mut h = Harness::new();
    let con = bytes(&post(MessageType::Confirmable, 1, &["t", "d"], BODY));
    let non = bytes(&post(MessageType::NonConfirmable, 2, &["t", "d"], BODY));
    let Outcome::Store(a) = h.send_at(0, peer(1), None, &con) else {
        panic!()
    };
    let Outcome::Store(b) = h.send_at(0, peer(1), None, &non) else {
        panic!()
    };
    h.endpoint.committed(&a);
    h.endpoint.committed(&b);
    assert_eq!(h.endpoint.dedup_len(), 2);
    h.endpoint.expire(h.t0 + Duration::from_secs(144));
    assert_eq!(h.endpoint.dedup_len(), 2);
    assert!(matches!(
        h.send_at(144, peer(1), None, &non),
        Outcome::Ignore
    ));
    h.endpoint.expire(h.t0 + Duration::from_secs(145));
    assert_eq!(h.endpoint.dedup_len(), 1);
    assert!(matches!(
        h.send_at(146, peer(1), None, &con),
        Outcome::Reply
    ));
    h.endpoint.expire(h.t0 + Duration::from_secs(247));
    assert_eq!(h.endpoint.dedup_len(), 0);
    // After the lifetime, the same Message ID is a new exchange.
    assert!(matches!(
        h.send_at(248, peer(1), None, &con),
        Outcome::Store(_)
    ));
    // Even without expire(), a stale entry is not treated as a duplicate.
    h.endpoint.committed(&a);
    assert!(matches!(
        h.send_at(248 + 247, peer(1), None, &con),
        Outcome::Store(_)
    ));
}

#[test]
fn dedup_table_evicts_the_oldest_at_its_bound() {
    let mut h = Harness::with(EndpointConfig {
        dedup_entries_max: 4,
        ..EndpointConfig::default()
    });
    for mid in 0..6u16 {
        let packet = post(MessageType::Confirmable, mid, &["t", "d"], BODY);
        let Outcome::Store(exchange) = h.send(&packet) else {
            panic!()
        };
        h.endpoint.committed(&exchange);
    }
    assert_eq!(h.endpoint.dedup_len(), 4);
    assert_eq!(h.endpoint.counters().dedup_evictions, 2);
    // MID 0 was evicted: processed as new. MID 5 is still known.
    assert!(matches!(
        h.send(&post(MessageType::Confirmable, 5, &["t", "d"], BODY)),
        Outcome::Reply
    ));
    assert!(matches!(
        h.send(&post(MessageType::Confirmable, 0, &["t", "d"], BODY)),
        Outcome::Store(_)
    ));
}

#[test]
fn dedup_is_per_peer() {
    let mut h = Harness::new();
    let packet = bytes(&post(MessageType::Confirmable, 1, &["t", "d"], BODY));
    assert!(matches!(
        h.send_at(0, peer(1), None, &packet),
        Outcome::Store(_)
    ));
    assert!(matches!(
        h.send_at(0, peer(2), None, &packet),
        Outcome::Store(_)
    ));
}

#[test]
fn non_gets_non_204_unless_no_response() {
    let mut h = Harness::new();
    let packet = post(MessageType::NonConfirmable, 3, &["t", "d"], BODY);
    let Outcome::Store(_) = h.send(&packet) else {
        panic!()
    };
    let answer = h.answer();
    assert_eq!(answer.header.get_type(), MessageType::NonConfirmable);
    assert_eq!(
        answer.header.code,
        MessageClass::Response(ResponseType::Changed)
    );
    assert_eq!(answer.get_token(), packet.get_token());
    // A duplicate NON is ignored and counted.
    assert!(matches!(h.send(&packet), Outcome::Ignore));
    assert_eq!(h.endpoint.counters().duplicates, 1);

    let mut quiet = post(MessageType::NonConfirmable, 4, &["t", "d"], BODY);
    quiet.add_option(CoapOption::NoResponse, vec![0x02]);
    let Outcome::Store(_) = h.send(&quiet) else {
        panic!()
    };
    assert!(h.response.is_empty());
    assert_eq!(h.readings.len(), 1);

    // Suppressing 4.xx silences an error reply; suppressing only 2.xx does not.
    let mut bad = post(MessageType::NonConfirmable, 5, &["t", "d"], b"[]");
    bad.add_option(CoapOption::NoResponse, vec![0x08]);
    assert!(matches!(h.send(&bad), Outcome::Ignore));
    let mut bad = post(MessageType::NonConfirmable, 6, &["t", "d"], b"[]");
    bad.add_option(CoapOption::NoResponse, vec![0x02]);
    assert!(matches!(h.send(&bad), Outcome::Reply));
    assert_eq!(
        h.answer().header.code,
        MessageClass::Response(ResponseType::BadRequest)
    );
    assert_eq!(h.answer().header.get_type(), MessageType::NonConfirmable);
}

#[test]
fn ping_gets_rst_and_peer_ack_rst_are_ignored() {
    let mut h = Harness::new();
    assert!(matches!(
        h.send_at(0, peer(1), None, &[0x40, 0x00, 0x12, 0x34]),
        Outcome::Reply
    ));
    assert_eq!(h.response, vec![0x70, 0x00, 0x12, 0x34]);
    assert_eq!(h.endpoint.counters().pings, 1);
    assert!(matches!(
        h.send_at(0, peer(1), None, &[0x60, 0x00, 0, 1]),
        Outcome::Ignore
    ));
    assert!(matches!(
        h.send_at(0, peer(1), None, &[0x70, 0x00, 0, 1]),
        Outcome::Ignore
    ));
    assert_eq!(h.endpoint.counters().resets_received, 1);
    // A response in an ACK is ignored; a response in a CON is rejected with RST.
    assert!(matches!(
        h.send_at(0, peer(1), None, &[0x60, 0x44, 0, 1]),
        Outcome::Ignore
    ));
    assert!(matches!(
        h.send_at(0, peer(1), None, &[0x40, 0x44, 0, 2]),
        Outcome::Reply
    ));
    assert_eq!(h.response, vec![0x70, 0x00, 0, 2]);
}

#[test]
fn malformed_datagrams_are_rejected_per_rfc7252() {
    let mut h = Harness::new();
    // Too short, wrong version: silent.
    assert!(matches!(
        h.send_at(0, peer(1), None, &[0x40, 0x02]),
        Outcome::Ignore
    ));
    assert!(matches!(
        h.send_at(0, peer(1), None, &[0x80, 0x02, 0, 1]),
        Outcome::Ignore
    ));
    // Token length 9 in a CON: RST; in a NON: silent.
    assert!(matches!(
        h.send_at(
            0,
            peer(1),
            None,
            &[0x49, 0x02, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]
        ),
        Outcome::Reply
    ));
    assert_eq!(h.response, vec![0x70, 0, 0, 1]);
    assert!(matches!(
        h.send_at(
            0,
            peer(1),
            None,
            &[0x59, 0x02, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]
        ),
        Outcome::Ignore
    ));
    // Payload marker without payload, bad option nibble 15, truncated option: RST for CON.
    for datagram in [
        &[0x40, 0x02, 0, 3, 0xff][..],
        &[0x40, 0x02, 0, 4, 0xf1, 0],
        &[0x40, 0x02, 0, 5, 0xb4, b't'],
    ] {
        assert!(
            matches!(h.send_at(0, peer(1), None, datagram), Outcome::Reply),
            "{datagram:?}"
        );
        assert_eq!(h.response[0], 0x70);
    }
    // Empty message with a token: format error.
    assert!(matches!(
        h.send_at(0, peer(1), None, &[0x41, 0x00, 0, 6, 9]),
        Outcome::Reply
    ));
    // Reserved class 7.
    assert!(matches!(
        h.send_at(0, peer(1), None, &[0x50, 0xe0, 0, 7]),
        Outcome::Ignore
    ));
    assert!(h.endpoint.counters().malformed >= 8);
}

#[test]
fn unknown_critical_option_is_402_for_con_and_silent_for_non() {
    let mut h = Harness::new();
    let mut packet = post(MessageType::Confirmable, 1, &["t", "d"], BODY);
    packet.add_option(CoapOption::Unknown(2049), vec![1]);
    h.expect_error(&packet, None, ResponseType::BadOption);
    let mut packet = post(MessageType::NonConfirmable, 2, &["t", "d"], BODY);
    packet.add_option(CoapOption::IfMatch, vec![1]);
    assert!(matches!(h.send(&packet), Outcome::Ignore));
    // Unknown elective options are ignored.
    let mut packet = post(MessageType::Confirmable, 3, &["t", "d"], BODY);
    packet.add_option(CoapOption::Unknown(2048), vec![1]);
    assert!(matches!(h.send(&packet), Outcome::Store(_)));
}

#[test]
fn error_codes() {
    let mut h = Harness::new();
    let con = MessageType::Confirmable;
    // 4.01: /t without identity.
    h.expect_error(
        &post(con, 1, &["t"], BODY),
        None,
        ResponseType::Unauthorized,
    );
    // /t with identity stores as the identity.
    let outcome = h.send_at(
        0,
        peer(1),
        Some("dev-9"),
        &bytes(&post(con, 2, &["t"], BODY)),
    );
    assert!(matches!(outcome, Outcome::Store(Exchange { ref device, .. }) if device == "dev-9"));
    let outcome = h.send_at(
        0,
        peer(1),
        Some("dev-9"),
        &bytes(&post(con, 3, &["t", "dev-9"], BODY)),
    );
    assert!(matches!(outcome, Outcome::Store(Exchange { ref device, .. }) if device == "dev-9"));
    // 4.03: another device over DTLS.
    h.expect_error(
        &post(con, 4, &["t", "dev-8"], BODY),
        Some("dev-9"),
        ResponseType::Forbidden,
    );
    // 4.04
    h.expect_error(&post(con, 5, &["x"], BODY), None, ResponseType::NotFound);
    h.expect_error(
        &post(con, 6, &["t", "d", "e"], BODY),
        None,
        ResponseType::NotFound,
    );
    h.expect_error(&post(con, 7, &[], BODY), None, ResponseType::NotFound);
    // 4.05
    h.expect_error(
        &request(con, RequestType::Get, 8, &["t", "d"], b""),
        None,
        ResponseType::MethodNotAllowed,
    );
    h.expect_error(
        &request(con, RequestType::Put, 9, &["t"], BODY),
        None,
        ResponseType::MethodNotAllowed,
    );
    h.expect_error(
        &request(con, RequestType::Post, 10, &[".well-known", "core"], b""),
        None,
        ResponseType::MethodNotAllowed,
    );
    // 4.00: bad device ids, undecodable payloads with a diagnostic, zero readings.
    h.expect_error(
        &post(con, 11, &["t", "a b"], BODY),
        None,
        ResponseType::BadRequest,
    );
    let long = "x".repeat(65);
    h.expect_error(
        &post(con, 12, &["t", &long], BODY),
        None,
        ResponseType::BadRequest,
    );
    let answer = h.expect_error(
        &post(con, 13, &["t", "d"], b"[{\"n\":\"a\"}]"),
        None,
        ResponseType::BadRequest,
    );
    let diagnostic = String::from_utf8(answer.payload).unwrap();
    assert!(diagnostic.contains("no value"), "{diagnostic}");
    assert!(diagnostic.len() < 128);
    let answer = h.expect_error(
        &post(con, 14, &["t", "d"], b"[]"),
        None,
        ResponseType::BadRequest,
    );
    assert!(!answer.payload.is_empty());
    h.expect_error(
        &post(con, 15, &["t", "d"], b"\x00garbage"),
        None,
        ResponseType::BadRequest,
    );
    // 4.15
    let mut packet = post(con, 16, &["t", "d"], BODY);
    packet.add_option(CoapOption::ContentFormat, vec![50]);
    h.expect_error(&packet, None, ResponseType::UnsupportedContentFormat);
    // 4.13 with Size1 for a single datagram.
    let big = vec![b' '; 16 * 1024 + 1];
    let answer = h.expect_error(
        &post(con, 17, &["t", "d"], &big),
        None,
        ResponseType::RequestEntityTooLarge,
    );
    assert_eq!(
        answer.get_first_option(CoapOption::Size1),
        Some(&uint(16 * 1024))
    );
    // 5.05 for a proxy request.
    let mut packet = post(con, 18, &["t", "d"], BODY);
    packet.add_option(CoapOption::ProxyUri, b"coap://x/t".to_vec());
    h.expect_error(&packet, None, ResponseType::ProxyingNotSupported);
    let counters = h.endpoint.counters().clone();
    assert_eq!(counters.unauthorized, 1);
    assert_eq!(counters.forbidden, 1);
    assert_eq!(counters.not_found, 3);
    assert_eq!(counters.method_not_allowed, 3);
    assert_eq!(counters.bad_request, 5);
    assert_eq!(counters.unsupported_format, 1);
    assert_eq!(counters.too_large, 1);
    // An error answer is repeated for a duplicate CON.
    let first = {
        h.send(&post(con, 5, &["x"], BODY));
        h.response.clone()
    };
    assert_eq!(
        h.answer().header.code,
        MessageClass::Response(ResponseType::NotFound)
    );
    assert!(!first.is_empty());
}

#[test]
fn too_many_readings_is_413() {
    let mut h = Harness::with(EndpointConfig {
        readings_per_request_max: 2,
        ..EndpointConfig::default()
    });
    let body = br#"[{"n":"a","v":1},{"n":"b","v":2},{"n":"c","v":3}]"#;
    h.expect_error(
        &post(MessageType::Confirmable, 1, &["t", "d"], body),
        None,
        ResponseType::RequestEntityTooLarge,
    );
}

#[test]
fn formats_explicit_and_sniffed() {
    let mut h = Harness::new();
    let mut cbor = Vec::new();
    let pack = ciborium::Value::Array(vec![ciborium::Value::Map(vec![
        (
            ciborium::Value::Integer(0.into()),
            ciborium::Value::Text("a".into()),
        ),
        (
            ciborium::Value::Integer(2.into()),
            ciborium::Value::Integer(5.into()),
        ),
    ])]);
    ciborium::into_writer(&pack, &mut cbor).unwrap();
    // Sniffed CBOR and sniffed JSON with leading whitespace.
    assert!(matches!(
        h.send(&post(MessageType::Confirmable, 1, &["t", "d"], &cbor)),
        Outcome::Store(_)
    ));
    assert_eq!(h.readings[0].value, Value::Number(5.0));
    assert!(matches!(
        h.send(&post(
            MessageType::Confirmable,
            2,
            &["t", "d"],
            b" \n[{\"n\":\"a\",\"v\":1}]"
        )),
        Outcome::Store(_)
    ));
    // Explicit CBOR.
    let mut packet = post(MessageType::Confirmable, 3, &["t", "d"], &cbor);
    packet.add_option(CoapOption::ContentFormat, uint(112));
    assert!(matches!(h.send(&packet), Outcome::Store(_)));
    // rkyv batch.
    let batch = sluice_protocol::batch::Batch {
        base_time: 1_600_000_000.0,
        records: vec![sluice_protocol::batch::BatchRecord {
            name: "b".into(),
            time: 1.0,
            value: sluice_protocol::batch::BatchValue::Bool(true),
        }],
    };
    let mut packet = post(
        MessageType::Confirmable,
        4,
        &["t", "d"],
        &sluice_protocol::batch::encode(&batch),
    );
    packet.add_option(CoapOption::ContentFormat, uint(65362));
    assert!(matches!(h.send(&packet), Outcome::Store(_)));
    assert_eq!(h.readings[0].time, 1_600_000_001.0);
    // JSON labelled as CBOR is 4.00.
    let mut packet = post(MessageType::Confirmable, 5, &["t", "d"], BODY);
    packet.add_option(CoapOption::ContentFormat, uint(112));
    h.expect_error(&packet, None, ResponseType::BadRequest);
}

#[test]
fn well_known_core_in_link_format() {
    let mut h = Harness::new();
    let packet = request(
        MessageType::Confirmable,
        RequestType::Get,
        1,
        &[".well-known", "core"],
        b"",
    );
    assert!(matches!(h.send(&packet), Outcome::Reply));
    let answer = h.answer();
    assert_eq!(
        answer.header.code,
        MessageClass::Response(ResponseType::Content)
    );
    assert_eq!(
        answer.get_first_option(CoapOption::ContentFormat),
        Some(&vec![40])
    );
    let text = String::from_utf8(answer.payload).unwrap();
    assert!(text.contains("</t>") && text.contains("65362"), "{text}");
}

fn block(mid: u16, num: u32, more: bool, szx: u32, payload: &[u8]) -> Packet {
    let mut packet = post(MessageType::Confirmable, mid, &["t", "dev-1"], payload);
    packet.add_option(
        CoapOption::Block1,
        uint(num << 4 | u32::from(more) << 3 | szx),
    );
    packet
}

/// A SenML JSON body of about `bytes` bytes.
fn large_body(bytes: usize) -> (Vec<u8>, usize) {
    let mut body = String::from("[");
    let mut count = 0;
    while body.len() < bytes {
        if count > 0 {
            body.push(',');
        }
        body.push_str(&format!("{{\"n\":\"sensor{count}\",\"v\":{count}.5}}"));
        count += 1;
    }
    body.push(']');
    (body.into_bytes(), count)
}

#[test]
fn block1_upload_is_reassembled_and_decoded() {
    let mut h = Harness::new();
    let (body, count) = large_body(10 * 1024);
    let chunks: Vec<&[u8]> = body.chunks(1024).collect();
    for (num, chunk) in chunks.iter().enumerate() {
        let more = num + 1 < chunks.len();
        let packet = block(100 + num as u16, num as u32, more, 6, chunk);
        let outcome = h.send(&packet);
        let answer = h.answer();
        let echo = answer.get_first_option(CoapOption::Block1).cloned();
        assert_eq!(
            echo,
            Some(uint((num as u32) << 4 | u32::from(more) << 3 | 6))
        );
        if more {
            assert!(matches!(outcome, Outcome::Reply));
            assert_eq!(
                answer.header.code,
                MessageClass::Response(ResponseType::Continue)
            );
            // A retransmitted block gets the same 2.31 and changes nothing.
            let continue_bytes = h.response.clone();
            assert!(matches!(h.send(&packet), Outcome::Reply));
            assert_eq!(h.response, continue_bytes);
        } else {
            assert!(matches!(outcome, Outcome::Store(_)));
            assert_eq!(
                answer.header.code,
                MessageClass::Response(ResponseType::Changed)
            );
        }
    }
    assert_eq!(h.readings.len(), count);
    assert_eq!(h.readings[count - 1].name, format!("sensor{}", count - 1));
    assert_eq!(
        h.endpoint.counters().block1_continues,
        chunks.len() as u64 - 1
    );
    assert_eq!(h.endpoint.block1_transfers_len(), 0);
}

#[test]
fn block1_out_of_order_is_408() {
    let mut h = Harness::new();
    let (body, _) = large_body(4096);
    assert!(matches!(
        h.send(&block(1, 0, true, 6, &body[..1024])),
        Outcome::Reply
    ));
    h.expect_error(
        &block(2, 2, true, 6, &body[2048..3072]),
        None,
        ResponseType::RequestEntityIncomplete,
    );
    // The transfer was dropped: even the right next block is now incomplete.
    h.expect_error(
        &block(3, 1, true, 6, &body[1024..2048]),
        None,
        ResponseType::RequestEntityIncomplete,
    );
    // No transfer at all.
    h.expect_error(
        &block(4, 3, false, 6, &body[3072..4096]),
        None,
        ResponseType::RequestEntityIncomplete,
    );
    assert_eq!(h.endpoint.counters().incomplete, 3);
}

#[test]
fn block1_timeout_drops_the_transfer() {
    let mut h = Harness::new();
    let (body, _) = large_body(4096);
    let first = bytes(&block(1, 0, true, 6, &body[..1024]));
    assert!(matches!(
        h.send_at(0, peer(1), None, &first),
        Outcome::Reply
    ));
    assert_eq!(h.endpoint.block1_transfers_len(), 1);
    h.endpoint.expire(h.t0 + Duration::from_secs(59));
    assert_eq!(h.endpoint.block1_transfers_len(), 1);
    h.endpoint.expire(h.t0 + Duration::from_secs(60));
    assert_eq!(h.endpoint.block1_transfers_len(), 0);
    assert_eq!(h.endpoint.counters().block1_timeouts, 1);
    let second = bytes(&block(2, 1, true, 6, &body[1024..2048]));
    assert!(matches!(
        h.send_at(61, peer(1), None, &second),
        Outcome::Reply
    ));
    assert_eq!(
        h.answer().header.code,
        MessageClass::Response(ResponseType::RequestEntityIncomplete)
    );
}

#[test]
fn block1_limits_413_and_503() {
    let mut h = Harness::with(EndpointConfig {
        body_bytes_max: 2048,
        block1_transfers_max: 1,
        ..EndpointConfig::default()
    });
    let chunk = vec![b' '; 1024];
    // Size1 announcing too much.
    let mut packet = block(1, 0, true, 6, &chunk);
    packet.add_option(CoapOption::Size1, uint(4096));
    let answer = h.expect_error(&packet, None, ResponseType::RequestEntityTooLarge);
    assert_eq!(
        answer.get_first_option(CoapOption::Size1),
        Some(&uint(2048))
    );
    // Accumulating too much.
    assert!(matches!(
        h.send(&block(2, 0, true, 6, &chunk)),
        Outcome::Reply
    ));
    assert!(matches!(
        h.send(&block(3, 1, true, 6, &chunk)),
        Outcome::Reply
    ));
    let answer = h.expect_error(
        &block(4, 2, false, 6, b"  "),
        None,
        ResponseType::RequestEntityTooLarge,
    );
    assert_eq!(
        answer.get_first_option(CoapOption::Size1),
        Some(&uint(2048))
    );
    assert_eq!(h.endpoint.block1_transfers_len(), 0);
    // A second concurrent transfer beyond the bound: 5.03 with Max-Age.
    assert!(matches!(
        h.send(&block(5, 0, true, 6, &chunk)),
        Outcome::Reply
    ));
    let other = bytes(&block(6, 0, true, 6, &chunk));
    assert!(matches!(
        h.send_at(0, peer(2), None, &other),
        Outcome::Reply
    ));
    let answer = h.answer();
    assert_eq!(
        answer.header.code,
        MessageClass::Response(ResponseType::ServiceUnavailable)
    );
    assert!(answer.get_first_option(CoapOption::MaxAge).is_some());
    // Wrong block size for SZX.
    h.expect_error(
        &block(7, 0, true, 6, &chunk[..100]),
        None,
        ResponseType::BadRequest,
    );
}

#[test]
fn restored_exchange_gets_its_response_again_until_its_lifetime_ends() {
    // Before the restart: a CON is stored and acknowledged.
    let mut before = Harness::new();
    let packet = post(MessageType::Confirmable, 11, &["t", "dev-1"], BODY);
    let Outcome::Store(exchange) = before.send(&packet) else {
        panic!("expected Store")
    };
    assert!(exchange.confirmable);
    let ack = before.response.clone();

    // After the restart: a fresh endpoint seeded with the exchange, 200 s old.
    let mut after = Harness::new();
    let restart = after.t0;
    assert!(after.endpoint.restore(
        restart,
        Duration::from_secs(200),
        exchange.peer,
        exchange.message_id,
        true,
        &ack
    ));
    assert!(matches!(after.send(&packet), Outcome::Reply));
    assert_eq!(after.response, ack, "the same ACK bytes, token included");
    assert!(after.readings.is_empty(), "not stored again");

    // It expires 247 s after its arrival, i.e. 47 s after the restart.
    after.endpoint.expire(restart + Duration::from_secs(46));
    assert_eq!(after.endpoint.dedup_len(), 1);
    after.endpoint.expire(restart + Duration::from_secs(47));
    assert_eq!(after.endpoint.dedup_len(), 0);

    // Exchanges older than their lifetime are not taken.
    assert!(!after.endpoint.restore(
        restart,
        Duration::from_secs(247),
        exchange.peer,
        1,
        true,
        &ack
    ));
    assert!(!after.endpoint.restore(
        restart,
        Duration::from_secs(145),
        exchange.peer,
        2,
        false,
        &[]
    ));
    assert_eq!(after.endpoint.dedup_len(), 0);
}

#[test]
fn restored_non_exchange_is_a_silent_duplicate() {
    let mut h = Harness::new();
    let packet = post(MessageType::NonConfirmable, 12, &["t", "dev-1"], BODY);
    assert!(h
        .endpoint
        .restore(h.t0, Duration::from_secs(10), peer(1), 12, false, &[]));
    assert!(matches!(h.send(&packet), Outcome::Ignore));
    assert!(h.readings.is_empty());
}
