//! The server side: one table of peers per shard, each either in a handshake or established.
//!
//! A ClientHello without a valid cookie gets a HelloVerifyRequest and leaves no state (RFC 6347
//! §4.2.1). A handshake lives in a box until its Finished is verified or it times out; an
//! established session keeps only its keys, sequence numbers and replay window (about 150 bytes
//! with its table slot). Records are opened and sealed in the caller's batch path.
//!
//! Handshakes and sessions are two tables: a peer may have both. A new handshake from the address
//! of an established session leaves the session alone until the new one's Finished verifies
//! (stricter than RFC 6347 §4.2.8 asks), so whoever replays or spoofs a ClientHello cannot end a
//! device's session.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::crypto::{self, ReplayWindow, Role, TrafficKeys, KEY_BLOCK_BYTES, MASTER_SECRET_BYTES};
use crate::wire::{self, ClientHello, Reader, Record};
use crate::{Application, Psk, PskLookup, Suite};

/// How long one cookie secret makes cookies. A cookie is accepted under the current secret and
/// the one before, so it is good for one to two of these: long enough for any client's second
/// ClientHello, short enough that a captured ClientHello cannot be replayed from its address
/// (to hold handshake slots, or to reset a handshake) for long.
pub(crate) const COOKIE_SECRET_LIFETIME: Duration = Duration::from_secs(300);

/// Bounds of one server (one shard).
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Established sessions kept; beyond, the least recently active sixteenth is evicted.
    pub sessions_max: usize,
    /// Handshakes in progress; a valid-cookie ClientHello beyond this is dropped (the device
    /// retries).
    pub handshakes_max: usize,
    /// A handshake not finished within this is dropped.
    pub handshake_timeout: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            // 262 144 sessions of about 150 bytes: about 40 MiB per shard at the bound, which a
            // fleet of a quarter million devices per core needs and a server can afford.
            sessions_max: 262_144,
            // At about 2 000 handshakes/s per core and a loopback-to-WAN round trip each, a few
            // hundred are in flight; 4 096 absorbs a fleet reconnecting at once (about 2 MiB).
            handshakes_max: 4_096,
            // RFC 6347 §4.2.4 retransmission timers back off up to 60 s: a device still in its
            // handshake after that has given up.
            handshake_timeout: Duration::from_secs(60),
        }
    }
}

/// Monotonic counters of one server.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Counters {
    /// Datagrams or records that are not DTLS 1.x (e.g. plain CoAP sent to the CoAPS port), or
    /// truncated.
    pub records_malformed: u64,
    pub hello_verify_requests: u64,
    pub handshakes_started: u64,
    pub handshakes_completed: u64,
    /// Wrong key, unknown or disabled identity (see also `unknown_identities`), no common suite.
    pub handshakes_failed: u64,
    pub handshakes_refused: u64,
    pub handshakes_timed_out: u64,
    pub unknown_identities: u64,
    pub records_replayed: u64,
    /// Protected records that did not authenticate.
    pub records_forged: u64,
    /// Protected records from a peer without a session (e.g. evicted, or the server restarted
    /// without its session file).
    pub records_without_session: u64,
    pub sessions_evicted: u64,
    pub sessions_closed: u64,
    /// Sessions dropped because their device's credential changed or was removed.
    pub sessions_revoked: u64,
}

struct Handshake {
    started: Instant,
    client_random: [u8; wire::RANDOM_BYTES],
    server_random: [u8; wire::RANDOM_BYTES],
    suite: Suite,
    extended_master_secret: bool,
    transcript: Sha256,
    /// Next epoch-0 record sequence number.
    write_sequence: u64,
    /// message_seq of the server's Finished.
    finished_message_seq: u16,
    /// ServerHello and ServerHelloDone, resent when the ClientHello is retransmitted.
    flight: Vec<u8>,
    keyed: Option<Keyed>,
}

/// A handshake after its ClientKeyExchange.
struct Keyed {
    /// None for an unknown identity: the handshake goes on with a random key and fails at the
    /// Finished, as with a wrong key, so a probe cannot tell which identities exist.
    psk: Option<Arc<Psk>>,
    master: [u8; MASTER_SECRET_BYTES],
    keys: TrafficKeys,
    window: ReplayWindow,
}

/// An established session: what protecting records needs, nothing more.
struct Session {
    /// Unique within this server's life: what is said over one session (CoAP Message IDs) is
    /// scoped to it, and a new session of the same peer starts a new scope.
    id: u64,
    psk: Arc<Psk>,
    keys: TrafficKeys,
    /// Next epoch-1 record sequence number.
    write_sequence: u64,
    /// Next epoch-0 record sequence number (for a resent ChangeCipherSpec).
    handshake_write_sequence: u64,
    window: ReplayWindow,
    server_verify: [u8; wire::VERIFY_DATA_BYTES],
    finished_message_seq: u16,
    last_active_s: u32,
}

impl Session {
    /// ChangeCipherSpec and Finished: the server's last flight, sent again whenever the client
    /// repeats its own (it did not get ours).
    fn final_flight(&mut self, out: &mut Vec<u8>) {
        wire::push_record(
            out,
            wire::CONTENT_CHANGE_CIPHER_SPEC,
            0,
            self.handshake_write_sequence,
            &[1],
        );
        self.handshake_write_sequence += 1;
        let mut finished = Vec::with_capacity(wire::HANDSHAKE_HEADER_BYTES + 12);
        wire::push_handshake(
            &mut finished,
            wire::HANDSHAKE_FINISHED,
            self.finished_message_seq,
            &self.server_verify,
        );
        self.keys.seal(
            Role::Server,
            wire::CONTENT_HANDSHAKE,
            1,
            self.write_sequence,
            &finished,
            out,
        );
        self.write_sequence += 1;
    }
}

/// The DTLS server of one shard.
pub struct Server {
    config: ServerConfig,
    /// The current cookie secret and the one before it.
    cookie_keys: [[u8; 32]; 2],
    cookie_key_made: Instant,
    handshakes: HashMap<SocketAddr, Box<Handshake>, ahash::RandomState>,
    sessions: HashMap<SocketAddr, Session, ahash::RandomState>,
    next_session_id: u64,
    origin: Instant,
    counters: Counters,
    scratch: Vec<u8>,
}

impl Server {
    pub fn new(mut config: ServerConfig, now: Instant) -> Self {
        // At least one slot: eviction needs a session to evict to make room for the next.
        config.sessions_max = config.sessions_max.max(1);
        Server {
            config,
            cookie_keys: [crypto::random(), crypto::random()],
            cookie_key_made: now,
            handshakes: HashMap::default(),
            sessions: HashMap::default(),
            next_session_id: 1,
            origin: now,
            counters: Counters::default(),
            scratch: Vec::new(),
        }
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// The id of `peer`'s established session: changes whenever the peer handshakes anew.
    pub fn session_id(&self, peer: &SocketAddr) -> Option<u64> {
        self.sessions.get(peer).map(|session| session.id)
    }

    fn new_session_id(&mut self) -> u64 {
        let id = self.next_session_id;
        self.next_session_id += 1;
        id
    }

    pub fn sessions_len(&self) -> usize {
        self.sessions.len()
    }

    pub fn handshakes_len(&self) -> usize {
        self.handshakes.len()
    }

    /// Handles one datagram from `peer`. `reply` gets the datagram to send back (empty: nothing);
    /// `application` the plaintexts of its authenticated application-data records. Returns the
    /// device of the session when there is application data.
    pub fn handle(
        &mut self,
        now: Instant,
        peer: SocketAddr,
        datagram: &[u8],
        keys: &dyn PskLookup,
        reply: &mut Vec<u8>,
        application: &mut Application,
    ) -> Option<Arc<str>> {
        reply.clear();
        application.clear();
        let mut device = None;
        let mut rest = datagram;
        while !rest.is_empty() {
            let Some((record, next)) = wire::split_record(rest) else {
                self.counters.records_malformed += 1;
                break;
            };
            if !(wire::CONTENT_CHANGE_CIPHER_SPEC..=wire::CONTENT_APPLICATION_DATA)
                .contains(&record.content_type)
                || record.version >> 8 != 0xfe
            {
                self.counters.records_malformed += 1;
                break;
            }
            rest = next;
            match record.epoch {
                0 => self.plain_record(now, peer, &record, keys, reply),
                1 => {
                    let completed =
                        self.protected_record(now, peer, &record, reply, application, &mut device);
                    if completed {
                        // The records before belong to the session this one replaced: what
                        // follows in the datagram is not read, so all of `application` is
                        // `device`'s.
                        break;
                    }
                }
                _ => self.counters.records_malformed += 1,
            }
        }
        device
    }

    /// Appends an application-data record of `plaintext` for `peer`'s session to `out`. False
    /// when the peer has no session (it was closed or evicted meanwhile).
    pub fn seal(&mut self, peer: SocketAddr, plaintext: &[u8], out: &mut Vec<u8>) -> bool {
        let Some(session) = self.sessions.get_mut(&peer) else {
            return false;
        };
        if session.write_sequence > wire::SEQUENCE_MAX {
            // 2^48 records: the session must end rather than wrap its nonces.
            self.sessions.remove(&peer);
            return false;
        }
        session.keys.seal(
            Role::Server,
            wire::CONTENT_APPLICATION_DATA,
            1,
            session.write_sequence,
            plaintext,
            out,
        );
        session.write_sequence += 1;
        true
    }

    /// Drops handshakes older than the handshake timeout.
    pub fn expire(&mut self, now: Instant) {
        let timeout = self.config.handshake_timeout;
        let before = self.handshakes.len();
        self.handshakes
            .retain(|_, handshake| now.duration_since(handshake.started) < timeout);
        self.counters.handshakes_timed_out += (before - self.handshakes.len()) as u64;
    }

    /// Applies new credentials: sessions whose device, identity and key are unchanged continue;
    /// the others end (their devices handshake again, or cannot).
    pub fn rekey(&mut self, keys: &dyn PskLookup) {
        /// Keeps `psk` (taking the current copy) while its device, identity and key are unchanged.
        fn still_valid(keys: &dyn PskLookup, psk: &mut Arc<Psk>) -> bool {
            match keys.lookup(&psk.identity) {
                Some(current) if *current == **psk => {
                    *psk = current;
                    true
                }
                _ => false,
            }
        }
        let before = self.sessions.len();
        self.sessions
            .retain(|_, session| still_valid(keys, &mut session.psk));
        self.counters.sessions_revoked += (before - self.sessions.len()) as u64;
        self.handshakes
            .retain(|_, handshake| match &mut handshake.keyed {
                Some(Keyed { psk: Some(psk), .. }) => still_valid(keys, psk),
                _ => true,
            });
    }

    #[cfg(test)]
    pub(crate) fn has_state_for(&self, peer: SocketAddr) -> bool {
        self.handshakes.contains_key(&peer) || self.sessions.contains_key(&peer)
    }

    fn now_s(&self, now: Instant) -> u32 {
        now.saturating_duration_since(self.origin).as_secs() as u32
    }

    /// Makes a new cookie secret when the current one has served its lifetime.
    fn rotate_cookie_key(&mut self, now: Instant) {
        let age = now.saturating_duration_since(self.cookie_key_made);
        if age < COOKIE_SECRET_LIFETIME {
            return;
        }
        self.cookie_keys[1] = if age < 2 * COOKIE_SECRET_LIFETIME {
            self.cookie_keys[0]
        } else {
            // Both lifetimes are over: cookies of the secret before must not pass either.
            crypto::random()
        };
        self.cookie_keys[0] = crypto::random();
        self.cookie_key_made = now;
    }

    fn cookie(
        &self,
        key: &[u8; 32],
        peer: SocketAddr,
        hello: &ClientHello<'_>,
    ) -> [u8; wire::COOKIE_BYTES] {
        let address = match peer.ip() {
            IpAddr::V4(ip) => ip.to_ipv6_mapped().octets(),
            IpAddr::V6(ip) => ip.octets(),
        };
        let mac = crypto::hmac(
            key,
            &[
                &address,
                &peer.port().to_be_bytes(),
                hello.before_cookie,
                hello.after_cookie,
            ],
        );
        mac[..wire::COOKIE_BYTES]
            .try_into()
            .expect("an HMAC-SHA256 is longer than a cookie")
    }

    fn plain_record(
        &mut self,
        now: Instant,
        peer: SocketAddr,
        record: &Record<'_>,
        keys: &dyn PskLookup,
        reply: &mut Vec<u8>,
    ) {
        match record.content_type {
            wire::CONTENT_HANDSHAKE => {
                let mut rest = record.fragment;
                while !rest.is_empty() {
                    let Some((message, next)) = wire::split_handshake(rest) else {
                        self.counters.records_malformed += 1;
                        return;
                    };
                    rest = next;
                    match message.message_type {
                        wire::HANDSHAKE_CLIENT_HELLO => {
                            self.client_hello(now, peer, record.sequence, &message, reply)
                        }
                        wire::HANDSHAKE_CLIENT_KEY_EXCHANGE => {
                            self.client_key_exchange(peer, &message, keys)
                        }
                        _ => {}
                    }
                }
            }
            // An unauthenticated alert ends a handshake (the client gave up), never a session.
            wire::CONTENT_ALERT if self.handshakes.remove(&peer).is_some() => {
                self.counters.handshakes_failed += 1;
            }
            // ChangeCipherSpec carries nothing we need: the Finished that follows proves the keys.
            _ => {}
        }
    }

    fn client_hello(
        &mut self,
        now: Instant,
        peer: SocketAddr,
        record_sequence: u64,
        message: &wire::Handshake<'_>,
        reply: &mut Vec<u8>,
    ) {
        if !reply.is_empty() {
            // One ClientHello answered per datagram: a client sends one; more would only give a
            // reflector more work and a larger datagram to send to a spoofed address.
            return;
        }
        let Some(hello) = ClientHello::parse(message.body) else {
            self.counters.records_malformed += 1;
            return;
        };
        self.rotate_cookie_key(now);
        let cookie = self.cookie(&self.cookie_keys[0], peer, &hello);
        let previous = self.cookie(&self.cookie_keys[1], peer, &hello);
        if !bool::from(hello.cookie.ct_eq(&cookie) | hello.cookie.ct_eq(&previous)) {
            let mut body = Vec::with_capacity(3 + wire::COOKIE_BYTES);
            body.extend_from_slice(&wire::DTLS_1_0.to_be_bytes());
            body.push(wire::COOKIE_BYTES as u8);
            body.extend_from_slice(&cookie);
            let mut verify = Vec::with_capacity(wire::HANDSHAKE_HEADER_BYTES + body.len());
            wire::push_handshake(
                &mut verify,
                wire::HANDSHAKE_HELLO_VERIFY_REQUEST,
                message.message_seq,
                &body,
            );
            // RFC 6347 §4.2.1: the HelloVerifyRequest reuses the ClientHello's record sequence.
            wire::push_record_header(
                reply,
                wire::CONTENT_HANDSHAKE,
                wire::DTLS_1_0,
                0,
                record_sequence,
                verify.len(),
            );
            reply.extend_from_slice(&verify);
            self.counters.hello_verify_requests += 1;
            return;
        }
        if let Some(handshake) = self.handshakes.get(&peer) {
            if handshake.client_random[..] == *hello.random {
                // Our ServerHello flight was lost: send it again.
                reply.extend_from_slice(&handshake.flight);
                return;
            }
        }
        // A new ClientHello replaces the peer's unfinished handshake, if any, in its slot.
        if !self.handshakes.contains_key(&peer)
            && self.handshakes.len() >= self.config.handshakes_max
        {
            self.counters.handshakes_refused += 1;
            return;
        }
        // client_version is the highest the client speaks (DTLS versions count down: 1.0 is
        // 0xfeff, 1.2 0xfefd, 1.3 0xfefc); below 1.2 there is nothing to negotiate.
        if !(0xfe00..=wire::DTLS_1_2).contains(&hello.version) {
            push_alert(reply, wire::ALERT_PROTOCOL_VERSION, record_sequence);
            self.counters.handshakes_failed += 1;
            return;
        }
        let suite = hello.suites().find_map(Suite::from_code);
        let (Some(suite), true) = (suite, hello.compression_methods.contains(&0)) else {
            push_alert(reply, wire::ALERT_HANDSHAKE_FAILURE, record_sequence);
            self.counters.handshakes_failed += 1;
            return;
        };
        let extended_master_secret = hello.has_extension(wire::EXTENSION_EXTENDED_MASTER_SECRET);
        let renegotiation_info = hello.has_extension(wire::EXTENSION_RENEGOTIATION_INFO)
            || hello
                .suites()
                .any(|code| code == wire::SUITE_RENEGOTIATION_SCSV);
        let server_random = crypto::random();

        let mut body = Vec::with_capacity(64);
        body.extend_from_slice(&wire::DTLS_1_2.to_be_bytes());
        body.extend_from_slice(&server_random);
        body.push(0); // no session id: sessions are not resumed by id
        body.extend_from_slice(&suite.code().to_be_bytes());
        body.push(0); // null compression
        let mut extensions = Vec::with_capacity(9);
        if extended_master_secret {
            extensions.extend_from_slice(&wire::EXTENSION_EXTENDED_MASTER_SECRET.to_be_bytes());
            extensions.extend_from_slice(&[0, 0]);
        }
        if renegotiation_info {
            // RFC 5746: an empty renegotiated_connection on the initial handshake.
            extensions.extend_from_slice(&wire::EXTENSION_RENEGOTIATION_INFO.to_be_bytes());
            extensions.extend_from_slice(&[0, 1, 0]);
        }
        if !extensions.is_empty() {
            body.extend_from_slice(&(extensions.len() as u16).to_be_bytes());
            body.extend_from_slice(&extensions);
        }
        let mut transcript = Sha256::new();
        transcript.update(message.whole);
        let message_seq = message.message_seq;
        let mut server_hello = Vec::with_capacity(wire::HANDSHAKE_HEADER_BYTES + body.len());
        wire::push_handshake(
            &mut server_hello,
            wire::HANDSHAKE_SERVER_HELLO,
            message_seq,
            &body,
        );
        transcript.update(&server_hello);
        let mut done = Vec::with_capacity(wire::HANDSHAKE_HEADER_BYTES);
        wire::push_handshake(
            &mut done,
            wire::HANDSHAKE_SERVER_HELLO_DONE,
            message_seq.wrapping_add(1),
            &[],
        );
        transcript.update(&done);
        let mut flight =
            Vec::with_capacity(2 * wire::RECORD_HEADER_BYTES + server_hello.len() + done.len());
        wire::push_record(
            &mut flight,
            wire::CONTENT_HANDSHAKE,
            0,
            record_sequence,
            &server_hello,
        );
        wire::push_record(
            &mut flight,
            wire::CONTENT_HANDSHAKE,
            0,
            record_sequence + 1,
            &done,
        );
        reply.extend_from_slice(&flight);

        let mut client_random = [0; wire::RANDOM_BYTES];
        client_random.copy_from_slice(hello.random);
        // An established session of this peer stays until this handshake's Finished verifies.
        self.handshakes.insert(
            peer,
            Box::new(Handshake {
                started: now,
                client_random,
                server_random,
                suite,
                extended_master_secret,
                transcript,
                write_sequence: record_sequence + 2,
                finished_message_seq: message_seq.wrapping_add(2),
                flight,
                keyed: None,
            }),
        );
        self.counters.handshakes_started += 1;
    }

    fn client_key_exchange(
        &mut self,
        peer: SocketAddr,
        message: &wire::Handshake<'_>,
        keys: &dyn PskLookup,
    ) {
        // Without a handshake, this is a retransmitted last flight (its Finished, in epoch 1,
        // gets our Finished again once it authenticates) or it is forged: no answer either way.
        let Some(handshake) = self.handshakes.get_mut(&peer) else {
            return;
        };
        if handshake.keyed.is_some() {
            return;
        }
        let Some(identity) = Reader::new(message.body).vector16() else {
            self.counters.records_malformed += 1;
            return;
        };
        let psk = keys.lookup(identity);
        let random_key;
        let key: &[u8] = match &psk {
            Some(psk) => &psk.key,
            None => {
                self.counters.unknown_identities += 1;
                random_key = crypto::random();
                &random_key[..16]
            }
        };
        handshake.transcript.update(message.whole);
        let session_hash = handshake.transcript.clone().finalize();
        let master = crypto::master_secret(
            &crypto::premaster_secret(key),
            handshake
                .extended_master_secret
                .then_some(&session_hash[..]),
            &handshake.client_random,
            &handshake.server_random,
        );
        let block = crypto::key_block(&master, &handshake.client_random, &handshake.server_random);
        handshake.keyed = Some(Keyed {
            psk,
            master,
            keys: TrafficKeys {
                suite: handshake.suite,
                block,
            },
            window: ReplayWindow::default(),
        });
    }

    /// Handles an epoch-1 record: the peer's session's, or the Finished of its handshake. True
    /// when that Finished completed the handshake (the peer's session is now the new one).
    fn protected_record(
        &mut self,
        now: Instant,
        peer: SocketAddr,
        record: &Record<'_>,
        reply: &mut Vec<u8>,
        application: &mut Application,
        device: &mut Option<Arc<str>>,
    ) -> bool {
        if record.version != wire::DTLS_1_2 {
            // Protected records are only ever DTLS 1.2 (and the version is not in their AAD).
            self.counters.records_malformed += 1;
            return false;
        }
        let now_s = self.now_s(now);
        if let Some(session) = self.sessions.get_mut(&peer) {
            let fresh = session.window.is_fresh(record.sequence);
            if fresh
                && session
                    .keys
                    .open(Role::Client, record, &mut self.scratch)
                    .is_ok()
            {
                session.window.mark(record.sequence);
                session.last_active_s = now_s;
                match record.content_type {
                    wire::CONTENT_APPLICATION_DATA => {
                        application.push(&self.scratch);
                        *device = Some(session.psk.device.clone());
                    }
                    wire::CONTENT_ALERT => {
                        let closing = self.scratch.first() == Some(&wire::ALERT_LEVEL_FATAL)
                            || self.scratch.get(1) == Some(&wire::ALERT_CLOSE_NOTIFY);
                        if closing {
                            self.sessions.remove(&peer);
                            self.counters.sessions_closed += 1;
                        }
                    }
                    // A repeated client Finished: our last flight was lost.
                    wire::CONTENT_HANDSHAKE => session.final_flight(reply),
                    _ => {}
                }
                return false;
            }
            let keyed_handshake = self
                .handshakes
                .get(&peer)
                .is_some_and(|handshake| handshake.keyed.is_some());
            if !keyed_handshake {
                if fresh {
                    self.counters.records_forged += 1;
                } else {
                    self.counters.records_replayed += 1;
                }
                return false;
            }
            // Not the session's: perhaps the Finished of the peer's new handshake.
        }
        let Some(handshake) = self.handshakes.get_mut(&peer) else {
            self.counters.records_without_session += 1;
            return false;
        };
        let Some(keyed) = &mut handshake.keyed else {
            // Epoch 1 before our keys: reordered; the client retransmits.
            return false;
        };
        if !keyed.window.is_fresh(record.sequence) {
            self.counters.records_replayed += 1;
            return false;
        }
        let opened = keyed.keys.open(Role::Client, record, &mut self.scratch);
        let finished = opened
            .ok()
            .filter(|()| record.content_type == wire::CONTENT_HANDSHAKE)
            .and_then(|()| wire::split_handshake(&self.scratch))
            .filter(|(message, _)| message.message_type == wire::HANDSHAKE_FINISHED);
        let verified = finished.is_some_and(|(message, _)| {
            let expected =
                crypto::verify_data(&keyed.master, b"client finished", &handshake.transcript);
            keyed.psk.is_some() && bool::from(message.body.ct_eq(&expected))
        });
        if !verified {
            // Wrong key or unknown identity: tell the device and forget the handshake (an
            // established session of the same address, if any, goes on).
            push_alert(reply, wire::ALERT_DECRYPT_ERROR, handshake.write_sequence);
            self.handshakes.remove(&peer);
            self.counters.handshakes_failed += 1;
            return false;
        }
        keyed.window.mark(record.sequence);
        if let Some((message, _)) = wire::split_handshake(&self.scratch) {
            handshake.transcript.update(message.whole);
        }
        let server_verify =
            crypto::verify_data(&keyed.master, b"server finished", &handshake.transcript);
        let mut session = Session {
            id: {
                let id = self.next_session_id;
                self.next_session_id += 1;
                id
            },
            psk: keyed.psk.clone().expect("verified handshakes have a key"),
            keys: keyed.keys,
            write_sequence: 0,
            handshake_write_sequence: handshake.write_sequence,
            window: keyed.window,
            server_verify,
            finished_message_seq: handshake.finished_message_seq,
            last_active_s: now_s,
        };
        session.final_flight(reply);
        self.handshakes.remove(&peer);
        // The new session replaces the peer's old one, or takes a new slot.
        if self.sessions.remove(&peer).is_none() {
            self.make_room_for_a_session();
        }
        self.sessions.insert(peer, session);
        self.counters.handshakes_completed += 1;
        true
    }

    /// At the session bound, evicts the least recently active sixteenth of the sessions: one
    /// pass per 1/16 of the bound keeps eviction O(1) amortised without per-session list links.
    fn make_room_for_a_session(&mut self) {
        if self.sessions.len() < self.config.sessions_max {
            return;
        }
        let evict = (self.sessions.len() / 16).max(1);
        let mut ages: Vec<u32> = self
            .sessions
            .values()
            .map(|session| session.last_active_s)
            .collect();
        let (_, &mut threshold, _) = ages.select_nth_unstable(evict - 1);
        let below = ages.iter().filter(|&&age| age < threshold).count();
        let mut at_threshold = evict - below;
        let before = self.sessions.len();
        self.sessions.retain(|_, session| {
            if session.last_active_s < threshold {
                return false;
            }
            if session.last_active_s == threshold && at_threshold > 0 {
                at_threshold -= 1;
                return false;
            }
            true
        });
        self.counters.sessions_evicted += (before - self.sessions.len()) as u64;
    }

    /// Writes every established session to `out` in the session-file format of `docs/dtls.md`.
    /// The file holds keys: the caller stores it readable by the daemon's user only.
    pub fn export_sessions(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(SESSION_FILE_MAGIC);
        let count_at = out.len();
        out.extend_from_slice(&[0; 4]);
        let mut count: u32 = 0;
        for (peer, session) in &self.sessions {
            // Identities longer than a one-byte length cannot be written: such devices
            // handshake again (the daemon's credentials allow 128 bytes at most).
            let Ok(identity_length) = u8::try_from(session.psk.identity.len()) else {
                continue;
            };
            let entry_start = out.len();
            match peer.ip() {
                IpAddr::V4(ip) => {
                    out.push(4);
                    out.extend_from_slice(&ip.octets());
                }
                IpAddr::V6(ip) => {
                    out.push(6);
                    out.extend_from_slice(&ip.octets());
                }
            }
            out.extend_from_slice(&peer.port().to_be_bytes());
            out.push(identity_length);
            out.extend_from_slice(&session.psk.identity);
            out.extend_from_slice(&session.keys.suite.code().to_be_bytes());
            out.extend_from_slice(&session.keys.block);
            out.extend_from_slice(&session.write_sequence.to_be_bytes());
            out.extend_from_slice(&session.handshake_write_sequence.to_be_bytes());
            out.extend_from_slice(&session.window.next.to_be_bytes());
            out.extend_from_slice(&session.window.seen.to_be_bytes());
            out.extend_from_slice(&session.server_verify);
            out.extend_from_slice(&session.finished_message_seq.to_be_bytes());
            let authenticator = session_authenticator(&session.psk.key, &out[entry_start..]);
            out.extend_from_slice(&authenticator);
            count += 1;
        }
        out[count_at..count_at + 4].copy_from_slice(&count.to_be_bytes());
        let checksum = crc32c::crc32c(&out[start..]);
        out.extend_from_slice(&checksum.to_be_bytes());
    }

    /// Loads sessions written by [`Server::export_sessions`]. A session whose identity is gone
    /// from `keys`, or whose authenticator does not verify under the device's current key (the
    /// key changed, or the file was altered), is skipped. Returns (loaded, skipped).
    pub fn import_sessions(
        &mut self,
        now: Instant,
        bytes: &[u8],
        keys: &dyn PskLookup,
    ) -> Result<(usize, usize), SessionFileError> {
        let body_len = bytes
            .len()
            .checked_sub(4)
            .ok_or(SessionFileError::Truncated)?;
        let (body, checksum) = bytes.split_at(body_len);
        if crc32c::crc32c(body).to_be_bytes() != checksum {
            return Err(SessionFileError::Checksum);
        }
        let mut reader = Reader::new(body);
        if reader.bytes(SESSION_FILE_MAGIC.len()) != Some(SESSION_FILE_MAGIC) {
            return Err(SessionFileError::Magic);
        }
        let count = reader
            .bytes(4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
            .ok_or(SessionFileError::Truncated)?;
        let now_s = self.now_s(now);
        let (mut loaded, mut skipped) = (0, 0);
        for _ in 0..count {
            let entry = reader.remaining();
            let (peer, identity, session) =
                read_session(&mut reader, now_s).ok_or(SessionFileError::Truncated)?;
            let entry = &entry[..entry.len() - reader.remaining().len()];
            let authenticator = reader
                .bytes(SESSION_AUTHENTICATOR_BYTES)
                .ok_or(SessionFileError::Truncated)?;
            match keys.lookup(identity) {
                Some(psk)
                    if bool::from(authenticator.ct_eq(&session_authenticator(&psk.key, entry)))
                        && self.sessions.len() < self.config.sessions_max =>
                {
                    let id = self.new_session_id();
                    self.sessions.insert(peer, Session { id, psk, ..session });
                    loaded += 1;
                }
                _ => skipped += 1,
            }
        }
        Ok((loaded, skipped))
    }
}

/// First bytes of a session file, with its format version (2: per-session authenticator).
const SESSION_FILE_MAGIC: &[u8; 8] = b"SLDTLS\x00\x02";
const SESSION_AUTHENTICATOR_BYTES: usize = 16;

/// Binds a saved session to its device's key: only the key's holder can make or change it, and
/// a session of a key that changed since does not verify. The key itself is not saved.
fn session_authenticator(key: &[u8], entry: &[u8]) -> [u8; SESSION_AUTHENTICATOR_BYTES] {
    let mac = crypto::hmac(key, &[b"sluice session", entry]);
    mac[..SESSION_AUTHENTICATOR_BYTES]
        .try_into()
        .expect("16 of 32 bytes")
}

/// A placeholder credential for a session being read, replaced by the current one.
fn placeholder_psk() -> Arc<Psk> {
    Arc::new(Psk {
        identity: Box::default(),
        device: Arc::from(""),
        key: Box::default(),
    })
}

fn read_session<'a>(
    reader: &mut Reader<'a>,
    now_s: u32,
) -> Option<(SocketAddr, &'a [u8], Session)> {
    let ip: IpAddr = match reader.u8()? {
        4 => <[u8; 4]>::try_from(reader.bytes(4)?).ok()?.into(),
        6 => <[u8; 16]>::try_from(reader.bytes(16)?).ok()?.into(),
        _ => return None,
    };
    let peer = SocketAddr::new(ip, reader.u16()?);
    let identity = reader.vector8()?;
    let suite = Suite::from_code(reader.u16()?)?;
    let block: [u8; KEY_BLOCK_BYTES] = reader.bytes(KEY_BLOCK_BYTES)?.try_into().ok()?;
    let mut u64_field = || {
        reader
            .bytes(8)
            .map(|b| u64::from_be_bytes(b.try_into().expect("8 bytes")))
    };
    let write_sequence = u64_field()?;
    let handshake_write_sequence = u64_field()?;
    let next = u64_field()?;
    let seen = u64_field()?;
    let server_verify = reader.bytes(wire::VERIFY_DATA_BYTES)?.try_into().ok()?;
    let finished_message_seq = reader.u16()?;
    let session = Session {
        id: 0,
        psk: placeholder_psk(),
        keys: TrafficKeys { suite, block },
        write_sequence,
        handshake_write_sequence,
        window: ReplayWindow { next, seen },
        server_verify,
        finished_message_seq,
        last_active_s: now_s,
    };
    Some((peer, identity, session))
}

/// Why a session file was not loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionFileError {
    Truncated,
    Checksum,
    Magic,
}

impl std::fmt::Display for SessionFileError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SessionFileError::Truncated => "the session file is truncated",
            SessionFileError::Checksum => "the session file's checksum does not match",
            SessionFileError::Magic => "not a sluice session file (or another format version)",
        })
    }
}

impl std::error::Error for SessionFileError {}

/// A fatal alert in epoch 0.
fn push_alert(out: &mut Vec<u8>, description: u8, sequence: u64) {
    wire::push_record(
        out,
        wire::CONTENT_ALERT,
        0,
        sequence,
        &[wire::ALERT_LEVEL_FATAL, description],
    );
}
