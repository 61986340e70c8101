//! Refusing new requests before their payload is decoded: the caller's overload policy (a
//! saturated shard answers 5.03, a device over its rate 4.29, both with Max-Age) applied at the
//! cost of a header parse and one dedup lookup, so that shedding stays cheaper than serving.
//! Retransmissions of exchanges the endpoint remembers are never refused here: they go through
//! [`Endpoint::handle`] and get their remembered answer.

use std::net::SocketAddr;
use std::time::Instant;

use super::{
    option, uint, DedupState, Endpoint, Remembered, Request, NO_RESPONSE_4XX, NO_RESPONSE_5XX,
    PLAIN,
};
use crate::message::{self, Message};

/// Why a new request is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// 5.03 Service Unavailable: the shard is saturated (RFC 7252 §5.9.3.4).
    Overloaded,
    /// 4.29 Too Many Requests: the device exceeds its rate (RFC 8516).
    RateLimited,
}

impl Refusal {
    fn diagnostic(self) -> &'static str {
        match self {
            Refusal::Overloaded => "overloaded",
            Refusal::RateLimited => "too many requests",
        }
    }
}

impl Endpoint {
    /// Whether `datagram` is a retransmission of an exchange the endpoint remembers (same peer,
    /// Message ID, DTLS session and bytes, within its lifetime): it gets its remembered answer
    /// from [`Endpoint::handle`], so a rate limit must not charge it as a new request.
    pub fn is_retransmission(
        &self,
        now: Instant,
        peer: SocketAddr,
        session: Option<u64>,
        datagram: &[u8],
    ) -> bool {
        if datagram.len() < 4 {
            return false;
        }
        let message_id = u16::from_be_bytes([datagram[2], datagram[3]]);
        let fingerprint = self.fingerprint(datagram);
        // The token as the header gives it (none if the length is not one of RFC 7252's).
        let token_len = usize::from(datagram[0] & 0x0f);
        let token = datagram
            .get(4..4 + token_len)
            .filter(|_| token_len <= 8)
            .unwrap_or(&[]);
        matches!(
            self.remembered(
                now,
                (peer, message_id),
                session.unwrap_or(PLAIN),
                fingerprint,
                token
            ),
            Remembered::Duplicate(_)
        )
    }

    /// Refuses `datagram` with `refusal` and Max-Age `max_age_s` if it is a new request: a CON
    /// or NON request (any method, any path) that is not a duplicate of an exchange the endpoint
    /// remembers. Writes the refusal into `response` (cleared first; left empty when the
    /// request's No-Response option suppresses it) and returns true. A refused CON is remembered
    /// like any answered exchange: its retransmissions get this same refusal (RFC 7252 §4.5),
    /// never a 2.04 the device would not see after it. Returns false, with `response` empty,
    /// for anything else (a duplicate, a ping, an ACK or RST, a malformed datagram): pass it to
    /// [`Endpoint::handle`]. The payload is never looked at. Never panics.
    #[allow(clippy::too_many_arguments)]
    pub fn refuse_new(
        &mut self,
        now: Instant,
        peer: SocketAddr,
        session: Option<u64>,
        datagram: &[u8],
        refusal: Refusal,
        max_age_s: u32,
        response: &mut Vec<u8>,
    ) -> bool {
        response.clear();
        // A valid header and options, CON or NON, a request code (class 0, not Empty).
        let Ok(request) = Message::parse(datagram) else {
            return false;
        };
        if request.message_type > message::TYPE_NON_CONFIRMABLE
            || request.code == 0
            || request.code >> 5 != 0
        {
            return false;
        }
        let message_id = request.message_id;
        let confirmable = request.message_type == message::TYPE_CONFIRMABLE;
        let session = session.unwrap_or(PLAIN);
        let fingerprint = self.fingerprint(datagram);
        if let Remembered::Duplicate(_) =
            self.remembered(now, (peer, message_id), session, fingerprint, request.token)
        {
            return false;
        }
        let no_response = request
            .option(option::NO_RESPONSE)
            .and_then(uint)
            .map_or(0, |bits| bits as u8);
        self.counters.datagrams += 1;
        self.counters.requests += 1;
        match refusal {
            Refusal::Overloaded => self.counters.unavailable += 1,
            Refusal::RateLimited => self.counters.too_many_requests += 1,
        }
        // The same bytes as `respond` writes, without a dedup entry.
        let (code, suppressed_by) = match refusal {
            Refusal::Overloaded => (super::code::SERVICE_UNAVAILABLE, NO_RESPONSE_5XX),
            Refusal::RateLimited => (super::code::TOO_MANY_REQUESTS, NO_RESPONSE_4XX),
        };
        let request_message_id = message_id;
        let (message_type, message_id) = if confirmable {
            (message::TYPE_ACKNOWLEDGEMENT, message_id)
        } else {
            if no_response & suppressed_by != 0 {
                return true;
            }
            let fresh = self.next_message_id;
            self.next_message_id = fresh.wrapping_add(1);
            (message::TYPE_NON_CONFIRMABLE, fresh)
        };
        message::write(
            response,
            message_type,
            code,
            message_id,
            request.token,
            &[(option::MAX_AGE, max_age_s)],
            refusal.diagnostic().as_bytes(),
        );
        if confirmable {
            let request = Request {
                session,
                confirmable,
                message_id: request_message_id,
                token: request.token,
                no_response,
                fingerprint,
            };
            let key = (peer, request_message_id);
            self.remember(now, key, &request, DedupState::Done, response);
        }
        true
    }
}

/// The device a plain CoAP ingest request names (`/t/{device}`, the second Uri-Path segment
/// after `t`), as raw bytes: what a rate limit is keyed by before the request is decoded. None
/// for any other path, or a malformed datagram. The id is not validated here; the request's
/// handling does that.
pub fn path_device(datagram: &[u8]) -> Option<&[u8]> {
    let request = Message::parse(datagram).ok()?;
    let mut segments = request.option_values(option::URI_PATH);
    match (segments.next(), segments.next(), segments.next()) {
        (Some(b"t"), Some(device), None) => Some(device),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{EndpointConfig, Outcome};
    use coap_lite::{CoapOption, MessageClass, MessageType, Packet, RequestType, ResponseType};

    fn peer() -> SocketAddr {
        "192.0.2.1:5683".parse().unwrap()
    }

    fn post(kind: MessageType, message_id: u16, path: &str, no_response: Option<u8>) -> Vec<u8> {
        let mut packet = Packet::new();
        packet.header.set_type(kind);
        packet.header.code = MessageClass::Request(RequestType::Post);
        packet.header.message_id = message_id;
        packet.set_token(vec![0xab, 0xcd]);
        for segment in path.split('/').filter(|s| !s.is_empty()) {
            packet.add_option(CoapOption::UriPath, segment.as_bytes().to_vec());
        }
        packet.add_option(CoapOption::ContentFormat, vec![110]);
        if let Some(bits) = no_response {
            packet.add_option(CoapOption::NoResponse, vec![bits]);
        }
        packet.payload = br#"[{"n":"t","v":1}]"#.to_vec();
        packet.to_bytes().unwrap()
    }

    #[test]
    fn a_new_request_is_refused_with_max_age_and_its_retransmission_gets_the_same() {
        let mut endpoint = Endpoint::new(EndpointConfig::default());
        let now = Instant::now();
        let mut response = Vec::new();
        for (refusal, code) in [
            (Refusal::Overloaded, ResponseType::ServiceUnavailable),
            (Refusal::RateLimited, ResponseType::TooManyRequests),
        ] {
            let request = post(MessageType::Confirmable, 7, "/t/dev-1", None);
            let mut endpoint = Endpoint::new(EndpointConfig::default());
            assert!(endpoint.refuse_new(now, peer(), None, &request, refusal, 3, &mut response));
            let packet = Packet::from_bytes(&response).unwrap();
            assert_eq!(packet.header.get_type(), MessageType::Acknowledgement);
            assert_eq!(packet.header.message_id, 7);
            assert_eq!(packet.get_token(), &[0xab, 0xcd]);
            assert_eq!(packet.header.code, MessageClass::Response(code));
            let max_age = packet.get_first_option(CoapOption::MaxAge).unwrap();
            assert_eq!(max_age, &vec![3]);
            // The very bytes coap-lite writes for the same answer.
            let mut expected = Packet::new();
            expected.header.set_type(MessageType::Acknowledgement);
            expected.header.code = MessageClass::Response(code);
            expected.header.message_id = 7;
            expected.set_token(vec![0xab, 0xcd]);
            expected.add_option(CoapOption::MaxAge, vec![3]);
            expected.payload = refusal.diagnostic().as_bytes().to_vec();
            assert_eq!(response, expected.to_bytes().unwrap());
            // The retransmission is a duplicate: left to handle, which answers the same.
            let refusal_bytes = response.clone();
            assert!(!endpoint.refuse_new(now, peer(), None, &request, refusal, 9, &mut response));
            let mut readings = crate::Readings::new();
            let outcome = endpoint.handle(
                now,
                0.0,
                peer(),
                None,
                &request,
                &mut readings,
                &mut response,
            );
            assert!(matches!(outcome, Outcome::Reply));
            assert_eq!(response, refusal_bytes);
            assert!(readings.is_empty(), "nothing decoded, nothing stored");
        }
        let request = post(MessageType::Confirmable, 7, "/t/dev-1", None);
        let mut large = Vec::new();
        assert!(endpoint.refuse_new(
            now,
            peer(),
            None,
            &request,
            Refusal::RateLimited,
            86_400,
            &mut large
        ));
        let packet = Packet::from_bytes(&large).unwrap();
        assert_eq!(
            packet.get_first_option(CoapOption::MaxAge).unwrap(),
            &vec![0x01, 0x51, 0x80]
        );
        assert_eq!(endpoint.dedup_len(), 1, "a refused CON is remembered");
        assert_eq!(endpoint.counters().too_many_requests, 1);
        // A refused NON is not (NON duplicates are ignored anyway).
        let non = post(MessageType::NonConfirmable, 8, "/t/dev-1", None);
        assert!(endpoint.refuse_new(now, peer(), None, &non, Refusal::Overloaded, 1, &mut large));
        assert_eq!(endpoint.dedup_len(), 1);
        assert_eq!(endpoint.counters().unavailable, 1);
    }

    #[test]
    fn a_remembered_exchange_is_left_to_handle() {
        let mut endpoint = Endpoint::new(EndpointConfig::default());
        let now = Instant::now();
        let request = post(MessageType::Confirmable, 9, "/t/dev-1", None);
        let (mut readings, mut response) = (crate::Readings::new(), Vec::new());
        let Outcome::Store(exchange) = endpoint.handle(
            now,
            0.0,
            peer(),
            None,
            &request,
            &mut readings,
            &mut response,
        ) else {
            panic!("stored");
        };
        let stored_response = response.clone();
        endpoint.committed(&exchange);
        let refused = endpoint.refuse_new(
            now,
            peer(),
            None,
            &request,
            Refusal::Overloaded,
            1,
            &mut response,
        );
        assert!(!refused, "a duplicate is not refused");
        assert!(response.is_empty());
        let outcome = endpoint.handle(
            now,
            0.0,
            peer(),
            None,
            &request,
            &mut readings,
            &mut response,
        );
        assert!(matches!(outcome, Outcome::Reply));
        assert_eq!(
            response, stored_response,
            "the duplicate gets its 2.04 again"
        );
        // Over another DTLS session the same Message ID is a new exchange.
        assert!(endpoint.refuse_new(
            now,
            peer(),
            Some(5),
            &request,
            Refusal::Overloaded,
            1,
            &mut response
        ));
    }

    #[test]
    fn no_response_pings_and_malformed_datagrams() {
        let mut endpoint = Endpoint::new(EndpointConfig::default());
        let now = Instant::now();
        let mut response = Vec::new();
        // NON with No-Response for 5.xx: refused silently.
        let quiet = post(MessageType::NonConfirmable, 1, "/t/d", Some(0x10));
        assert!(endpoint.refuse_new(
            now,
            peer(),
            None,
            &quiet,
            Refusal::Overloaded,
            1,
            &mut response
        ));
        assert!(response.is_empty());
        // ... but it still gets a 4.29, which No-Response 0x10 does not suppress.
        assert!(endpoint.refuse_new(
            now,
            peer(),
            None,
            &quiet,
            Refusal::RateLimited,
            1,
            &mut response
        ));
        let packet = Packet::from_bytes(&response).unwrap();
        assert_eq!(packet.header.get_type(), MessageType::NonConfirmable);
        for datagram in [
            &[0x40, 0, 0, 1][..],
            &[0x60, 0x44, 0, 1],
            &[0x40],
            &[0x4f, 1, 0, 1],
            &[],
        ] {
            assert!(!endpoint.refuse_new(
                now,
                peer(),
                None,
                datagram,
                Refusal::Overloaded,
                1,
                &mut response
            ));
        }
        // A bad option encoding is left to handle (which answers RST).
        assert!(!endpoint.refuse_new(
            now,
            peer(),
            None,
            &[0x40, 2, 0, 1, 0xf0],
            Refusal::Overloaded,
            1,
            &mut response
        ));
    }

    #[test]
    fn the_device_of_an_ingest_path() {
        let request = post(MessageType::Confirmable, 1, "/t/meter-42", None);
        assert_eq!(path_device(&request), Some(&b"meter-42"[..]));
        assert_eq!(
            path_device(&post(MessageType::Confirmable, 1, "/t", None)),
            None
        );
        assert_eq!(
            path_device(&post(MessageType::Confirmable, 1, "/x/a", None)),
            None
        );
        assert_eq!(
            path_device(&post(MessageType::Confirmable, 1, "/t/a/b", None)),
            None
        );
        assert_eq!(path_device(&[0x40, 2, 0, 1, 0xf0]), None);
        assert_eq!(path_device(&[]), None);
    }
}
