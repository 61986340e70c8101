//! The device side of a PSK handshake and session, for `sluice load --dtls` and the tests. The
//! caller owns the socket and the retransmission timer: [`Client::retransmit`] repeats the last
//! flight while the handshake is incomplete.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::crypto::{self, ReplayWindow, Role, TrafficKeys, MASTER_SECRET_BYTES};
use crate::wire::{self, Reader, Record};
use crate::{Application, Suite};

/// Why a client session cannot go on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientError {
    /// The server sent a fatal alert (its description code), e.g. 51 decrypt_error for a wrong key.
    Alert(u8),
    /// The server's handshake messages do not make sense (e.g. an unknown suite, a bad Finished).
    Handshake(&'static str),
    /// The session is not established yet.
    NotConnected,
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientError::Alert(code) => write!(f, "the server sent fatal alert {code}"),
            ClientError::Handshake(what) => write!(f, "handshake failed: {what}"),
            ClientError::NotConnected => f.write_str("the DTLS session is not established"),
        }
    }
}

impl std::error::Error for ClientError {}

enum State {
    AwaitHelloVerify,
    AwaitServerHello,
    AwaitServerHelloDone {
        suite: Suite,
        server_random: [u8; wire::RANDOM_BYTES],
        extended_master_secret: bool,
    },
    AwaitFinished {
        expected: [u8; wire::VERIFY_DATA_BYTES],
    },
    Connected,
}

/// One device's DTLS client.
pub struct Client {
    identity: Vec<u8>,
    key: Vec<u8>,
    suites: Vec<Suite>,
    client_random: [u8; wire::RANDOM_BYTES],
    state: State,
    transcript: Sha256,
    /// Next epoch-0 record sequence number.
    handshake_write_sequence: u64,
    /// Next epoch-1 record sequence number.
    write_sequence: u64,
    /// The last flight sent, for retransmission.
    flight: Vec<u8>,
    keys: Option<TrafficKeys>,
    window: ReplayWindow,
    scratch: Vec<u8>,
}

impl Client {
    /// A client offering `suites` in that order of preference.
    pub fn new(identity: &[u8], key: &[u8], suites: &[Suite]) -> Client {
        Client {
            identity: identity.to_vec(),
            key: key.to_vec(),
            suites: suites.to_vec(),
            client_random: crypto::random(),
            state: State::AwaitHelloVerify,
            transcript: Sha256::new(),
            handshake_write_sequence: 0,
            write_sequence: 0,
            flight: Vec::new(),
            keys: None,
            window: ReplayWindow::default(),
            scratch: Vec::new(),
        }
    }

    /// Appends the first ClientHello to `out`.
    pub fn start(&mut self, out: &mut Vec<u8>) {
        self.client_hello(&[], 0);
        out.extend_from_slice(&self.flight);
    }

    pub fn is_connected(&self) -> bool {
        matches!(self.state, State::Connected)
    }

    /// Appends the last flight again, while the handshake is incomplete.
    pub fn retransmit(&self, out: &mut Vec<u8>) {
        if !self.is_connected() {
            out.extend_from_slice(&self.flight);
        }
    }

    /// Appends an application-data record of `plaintext` to `out`.
    pub fn seal(&mut self, plaintext: &[u8], out: &mut Vec<u8>) -> Result<(), ClientError> {
        let (true, Some(keys)) = (self.is_connected(), &self.keys) else {
            return Err(ClientError::NotConnected);
        };
        keys.seal(
            Role::Client,
            wire::CONTENT_APPLICATION_DATA,
            1,
            self.write_sequence,
            plaintext,
            out,
        );
        self.write_sequence += 1;
        Ok(())
    }

    /// Handles a datagram from the server: `out` gets what to send back (if anything),
    /// `application` the plaintexts it carried.
    pub fn handle(
        &mut self,
        datagram: &[u8],
        out: &mut Vec<u8>,
        application: &mut Application,
    ) -> Result<(), ClientError> {
        application.clear();
        let mut rest = datagram;
        while let Some((record, next)) = wire::split_record(rest) {
            rest = next;
            match (record.epoch, record.content_type) {
                (0, wire::CONTENT_HANDSHAKE) => {
                    let mut messages = record.fragment;
                    while let Some((message, next)) = wire::split_handshake(messages) {
                        messages = next;
                        self.handshake_message(&message, out)?;
                    }
                }
                (0, wire::CONTENT_ALERT)
                    if record.fragment.first() == Some(&wire::ALERT_LEVEL_FATAL) =>
                {
                    return Err(ClientError::Alert(
                        record.fragment.get(1).copied().unwrap_or(0),
                    ));
                }
                (1, _) => self.protected_record(&record, application)?,
                _ => {}
            }
        }
        Ok(())
    }

    fn client_hello(&mut self, cookie: &[u8], message_seq: u16) {
        let mut body = Vec::with_capacity(128);
        body.extend_from_slice(&wire::DTLS_1_2.to_be_bytes());
        body.extend_from_slice(&self.client_random);
        body.push(0); // no session id
        body.push(cookie.len() as u8);
        body.extend_from_slice(cookie);
        body.extend_from_slice(&((self.suites.len() * 2) as u16).to_be_bytes());
        for suite in &self.suites {
            body.extend_from_slice(&suite.code().to_be_bytes());
        }
        body.extend_from_slice(&[1, 0]); // null compression only
        let extensions = [
            0x00, 0x17, 0, 0, // extended_master_secret
            0xff, 0x01, 0, 1, 0, // renegotiation_info, empty
        ];
        body.extend_from_slice(&(extensions.len() as u16).to_be_bytes());
        body.extend_from_slice(&extensions);
        let mut message = Vec::with_capacity(wire::HANDSHAKE_HEADER_BYTES + body.len());
        wire::push_handshake(
            &mut message,
            wire::HANDSHAKE_CLIENT_HELLO,
            message_seq,
            &body,
        );
        // The transcript starts with the ClientHello that carries the cookie (RFC 6347 §4.2.6).
        self.transcript = Sha256::new();
        self.transcript.update(&message);
        self.flight.clear();
        wire::push_record(
            &mut self.flight,
            wire::CONTENT_HANDSHAKE,
            0,
            self.handshake_write_sequence,
            &message,
        );
        self.handshake_write_sequence += 1;
    }

    fn handshake_message(
        &mut self,
        message: &wire::Handshake<'_>,
        out: &mut Vec<u8>,
    ) -> Result<(), ClientError> {
        match (&self.state, message.message_type) {
            (State::AwaitHelloVerify, wire::HANDSHAKE_HELLO_VERIFY_REQUEST) => {
                let mut reader = Reader::new(message.body);
                let cookie = reader
                    .u16()
                    .and_then(|_| reader.vector8())
                    .ok_or(ClientError::Handshake("bad HelloVerifyRequest"))?
                    .to_vec();
                self.client_hello(&cookie, 1);
                out.extend_from_slice(&self.flight);
                self.state = State::AwaitServerHello;
            }
            (State::AwaitServerHello, wire::HANDSHAKE_SERVER_HELLO) => {
                let mut reader = Reader::new(message.body);
                let parsed = (|| {
                    let _version = reader.u16()?;
                    let random: [u8; wire::RANDOM_BYTES] =
                        reader.bytes(wire::RANDOM_BYTES)?.try_into().ok()?;
                    let _session_id = reader.vector8()?;
                    let suite = reader.u16()?;
                    let _compression = reader.u8()?;
                    let extensions = if reader.is_empty() {
                        &[][..]
                    } else {
                        reader.vector16()?
                    };
                    Some((random, suite, extensions))
                })();
                let (server_random, suite, extensions) =
                    parsed.ok_or(ClientError::Handshake("bad ServerHello"))?;
                let suite = Suite::from_code(suite)
                    .filter(|suite| self.suites.contains(suite))
                    .ok_or(ClientError::Handshake(
                        "the server chose a suite not offered",
                    ))?;
                self.transcript.update(message.whole);
                self.state = State::AwaitServerHelloDone {
                    suite,
                    server_random,
                    extended_master_secret: wire::has_extension(
                        extensions,
                        wire::EXTENSION_EXTENDED_MASTER_SECRET,
                    ),
                };
            }
            (State::AwaitServerHelloDone { .. }, wire::HANDSHAKE_SERVER_KEY_EXCHANGE) => {
                self.transcript.update(message.whole);
            }
            (
                &State::AwaitServerHelloDone {
                    suite,
                    server_random,
                    extended_master_secret,
                },
                wire::HANDSHAKE_SERVER_HELLO_DONE,
            ) => {
                self.transcript.update(message.whole);
                self.finish(suite, server_random, extended_master_secret);
                out.extend_from_slice(&self.flight);
            }
            _ => {} // a retransmitted or unexpected message: ignored
        }
        Ok(())
    }

    /// ClientKeyExchange, ChangeCipherSpec and Finished.
    fn finish(
        &mut self,
        suite: Suite,
        server_random: [u8; wire::RANDOM_BYTES],
        extended_master_secret: bool,
    ) {
        let mut body = Vec::with_capacity(2 + self.identity.len());
        body.extend_from_slice(&(self.identity.len() as u16).to_be_bytes());
        body.extend_from_slice(&self.identity);
        let mut key_exchange = Vec::new();
        // ClientHello 0, ClientHello with cookie 1, then these two.
        let message_seq = 2;
        wire::push_handshake(
            &mut key_exchange,
            wire::HANDSHAKE_CLIENT_KEY_EXCHANGE,
            message_seq,
            &body,
        );
        self.transcript.update(&key_exchange);
        let session_hash = self.transcript.clone().finalize();
        let master: [u8; MASTER_SECRET_BYTES] = crypto::master_secret(
            &crypto::premaster_secret(&self.key),
            extended_master_secret.then_some(&session_hash[..]),
            &self.client_random,
            &server_random,
        );
        let keys = TrafficKeys {
            suite,
            block: crypto::key_block(&master, &self.client_random, &server_random),
        };
        let verify = crypto::verify_data(&master, b"client finished", &self.transcript);
        let mut finished = Vec::new();
        wire::push_handshake(
            &mut finished,
            wire::HANDSHAKE_FINISHED,
            message_seq + 1,
            &verify,
        );
        self.transcript.update(&finished);
        let expected = crypto::verify_data(&master, b"server finished", &self.transcript);

        self.flight.clear();
        wire::push_record(
            &mut self.flight,
            wire::CONTENT_HANDSHAKE,
            0,
            self.handshake_write_sequence,
            &key_exchange,
        );
        wire::push_record(
            &mut self.flight,
            wire::CONTENT_CHANGE_CIPHER_SPEC,
            0,
            self.handshake_write_sequence + 1,
            &[1],
        );
        self.handshake_write_sequence += 2;
        keys.seal(
            Role::Client,
            wire::CONTENT_HANDSHAKE,
            1,
            self.write_sequence,
            &finished,
            &mut self.flight,
        );
        self.write_sequence += 1;
        self.keys = Some(keys);
        self.state = State::AwaitFinished { expected };
    }

    fn protected_record(
        &mut self,
        record: &Record<'_>,
        application: &mut Application,
    ) -> Result<(), ClientError> {
        let Some(keys) = &self.keys else {
            return Ok(());
        };
        if !self.window.is_fresh(record.sequence)
            || keys.open(Role::Server, record, &mut self.scratch).is_err()
        {
            return Ok(()); // replayed or forged: dropped
        }
        self.window.mark(record.sequence);
        match (&self.state, record.content_type) {
            (State::AwaitFinished { expected }, wire::CONTENT_HANDSHAKE) => {
                let verified = wire::split_handshake(&self.scratch).is_some_and(|(message, _)| {
                    message.message_type == wire::HANDSHAKE_FINISHED
                        && bool::from(message.body.ct_eq(expected))
                });
                if !verified {
                    return Err(ClientError::Handshake(
                        "the server's Finished does not verify",
                    ));
                }
                self.state = State::Connected;
            }
            (State::Connected, wire::CONTENT_APPLICATION_DATA) => application.push(&self.scratch),
            (_, wire::CONTENT_ALERT) if self.scratch.first() == Some(&wire::ALERT_LEVEL_FATAL) => {
                return Err(ClientError::Alert(
                    self.scratch.get(1).copied().unwrap_or(0),
                ));
            }
            _ => {}
        }
        Ok(())
    }
}
