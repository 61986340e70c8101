//! The per-shard CoAP endpoint: message layer (RFC 7252), deduplication, Block1 reassembly
//! (RFC 7959), No-Response (RFC 7967), routing and payload decoding.
//!
//! Sans-IO: [`Endpoint::handle`] takes one datagram, the peer and the current time, appends
//! readings to the caller's buffer, writes the datagram to send into the caller's buffer and says
//! what to do with them ([`Outcome`]).

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ahash::RandomState;

use crate::batch::BatchDecoder;
use crate::message::{self, Message};
use crate::{senml, DecodeError, Readings};
use crate::{CONTENT_FORMAT_RKYV_BATCH, CONTENT_FORMAT_SENML_CBOR, CONTENT_FORMAT_SENML_JSON};

mod refuse;
pub use refuse::{path_device, Refusal};

/// Link-format description of the resources (RFC 6690), the `/.well-known/core` payload.
pub const WELL_KNOWN_CORE: &str = "</t>;rt=\"sluice.ingest\";ct=\"110 112 65362\"";

/// Content-Format of application/link-format.
const CONTENT_FORMAT_LINK_FORMAT: u16 = 40;

/// Longest device id, in bytes.
pub const DEVICE_ID_BYTES_MAX: usize = 64;

/// Longest diagnostic payload, in bytes: keeps error responses well inside one small datagram.
pub const DIAGNOSTIC_BYTES_MAX: usize = 127;

/// Max-Age of the 5.03 sent when every Block1 reassembly slot is busy: slots free up as transfers
/// finish, so a short back-off is enough.
pub const BLOCK1_BUSY_MAX_AGE_S: u32 = 5;

/// No-Response (RFC 7967) bits.
const NO_RESPONSE_2XX: u8 = 0x02;
const NO_RESPONSE_4XX: u8 = 0x08;
const NO_RESPONSE_5XX: u8 = 0x10;

/// Option numbers (RFC 7252 §12.2, RFC 7959, RFC 7967).
mod option {
    pub const URI_HOST: u16 = 3;
    pub const OBSERVE: u16 = 6;
    pub const URI_PORT: u16 = 7;
    pub const URI_PATH: u16 = 11;
    pub const CONTENT_FORMAT: u16 = 12;
    pub const MAX_AGE: u16 = 14;
    pub const URI_QUERY: u16 = 15;
    pub const ACCEPT: u16 = 17;
    pub const BLOCK2: u16 = 23;
    pub const BLOCK1: u16 = 27;
    pub const SIZE2: u16 = 28;
    pub const PROXY_URI: u16 = 35;
    pub const PROXY_SCHEME: u16 = 39;
    pub const SIZE1: u16 = 60;
    pub const NO_RESPONSE: u16 = 258;
}

const CODE_GET: u8 = 0x01;
const CODE_POST: u8 = 0x02;

/// Response codes (RFC 7252 §12.1.2, RFC 7959): class << 5 | detail.
mod code {
    pub const CHANGED: u8 = 0x44;
    pub const CONTENT: u8 = 0x45;
    pub const CONTINUE: u8 = 0x5f;
    pub const BAD_REQUEST: u8 = 0x80;
    pub const UNAUTHORIZED: u8 = 0x81;
    pub const BAD_OPTION: u8 = 0x82;
    pub const FORBIDDEN: u8 = 0x83;
    pub const NOT_FOUND: u8 = 0x84;
    pub const METHOD_NOT_ALLOWED: u8 = 0x85;
    pub const REQUEST_ENTITY_INCOMPLETE: u8 = 0x88;
    pub const REQUEST_ENTITY_TOO_LARGE: u8 = 0x8d;
    pub const UNSUPPORTED_CONTENT_FORMAT: u8 = 0x8f;
    pub const TOO_MANY_REQUESTS: u8 = 0x9d;
    pub const SERVICE_UNAVAILABLE: u8 = 0xa3;
    pub const PROXYING_NOT_SUPPORTED: u8 = 0xa5;
}

/// Limits and lifetimes of one endpoint (one shard).
#[derive(Clone, Debug)]
pub struct EndpointConfig {
    /// Bound of the (peer, Message ID) table. The table is allocated up front with room for
    /// twice the bound (see [`Endpoint::new`]): 2^20 slots of about 112 bytes for 262 144
    /// entries, 112 MiB of address space that a full table touches, plus up to 16 MiB of expiry
    /// queue. It remembers every exchange for the full
    /// EXCHANGE_LIFETIME up to 1 000 requests/s per shard, and for MAX_TRANSMIT_SPAN (45 s, the
    /// window in which a CON is retransmitted) up to 5 800 requests/s per shard. Beyond that the
    /// oldest entries are evicted (counted in `dedup_evictions`).
    pub dedup_entries_max: usize,
    /// How long a CON exchange is remembered (RFC 7252 EXCHANGE_LIFETIME, 247 s).
    pub exchange_lifetime: Duration,
    /// How long a NON exchange is remembered (RFC 7252 NON_LIFETIME, 145 s).
    pub non_lifetime: Duration,
    /// Largest payload of a single datagram (16 KiB); above gets 4.13 with Size1.
    pub datagram_payload_bytes_max: usize,
    /// Largest Block1-reassembled body (1 MiB); above gets 4.13 with Size1.
    pub body_bytes_max: usize,
    /// Concurrent Block1 reassemblies (1024): bounds memory at 1024 × body_bytes_max worst case.
    pub block1_transfers_max: usize,
    /// Inactivity after which a Block1 reassembly is dropped (60 s).
    pub block1_timeout: Duration,
    /// Most readings one request may carry (10 000); above gets 4.13.
    pub readings_per_request_max: usize,
}

impl Default for EndpointConfig {
    fn default() -> Self {
        Self {
            dedup_entries_max: 262_144,
            exchange_lifetime: Duration::from_secs(247),
            non_lifetime: Duration::from_secs(145),
            datagram_payload_bytes_max: 16 * 1024,
            body_bytes_max: 1024 * 1024,
            block1_transfers_max: 1024,
            block1_timeout: Duration::from_secs(60),
            readings_per_request_max: 10_000,
        }
    }
}

/// A device id held inline (at most [`DEVICE_ID_BYTES_MAX`] bytes of UTF-8): no allocation per
/// request. Derefs to `str`.
#[derive(Clone, Copy)]
pub struct DeviceId {
    len: u8,
    bytes: [u8; DEVICE_ID_BYTES_MAX],
}

impl DeviceId {
    /// None when `id` is empty or longer than [`DEVICE_ID_BYTES_MAX`].
    pub fn new(id: &str) -> Option<DeviceId> {
        if id.is_empty() || id.len() > DEVICE_ID_BYTES_MAX {
            return None;
        }
        let mut bytes = [0; DEVICE_ID_BYTES_MAX];
        bytes[..id.len()].copy_from_slice(id.as_bytes());
        Some(DeviceId {
            len: id.len() as u8,
            bytes,
        })
    }

    pub fn as_str(&self) -> &str {
        // Built from a &str by `new`: always UTF-8.
        std::str::from_utf8(&self.bytes[..usize::from(self.len)]).unwrap_or("")
    }
}

impl std::ops::Deref for DeviceId {
    type Target = str;

    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl std::fmt::Debug for DeviceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.as_str().fmt(f)
    }
}

impl std::fmt::Display for DeviceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq for DeviceId {
    fn eq(&self, other: &DeviceId) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for DeviceId {}

impl PartialEq<str> for DeviceId {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for DeviceId {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// An exchange whose readings await their commit.
#[derive(Debug, Clone, Copy)]
pub struct Exchange {
    pub peer: SocketAddr,
    pub message_id: u16,
    /// The request was confirmable (CON).
    pub confirmable: bool,
    pub device: DeviceId,
    /// The dedup entry the exchange owns: a later request that reused the peer and Message ID
    /// (with other bytes) replaces the entry, and this exchange's outcome then leaves it alone.
    pub sequence: u64,
}

/// What the caller does with a handled datagram.
#[derive(Debug)]
pub enum Outcome {
    /// Nothing to send (e.g. an ACK/RST from the peer, a silently rejected malformed datagram, a
    /// duplicate of an exchange whose commit is still pending). `response` is empty.
    Ignore,
    /// Send `response` now; nothing to store.
    Reply,
    /// Readings were appended to `readings` for `exchange.device`; `response` holds the 2.04 to
    /// send once the commit covering them succeeded (then call [`Endpoint::committed`]). An empty
    /// `response` (NON with No-Response) means nothing is sent.
    Store(Exchange),
}

/// Monotonically increasing counters of one endpoint.
#[derive(Debug, Default, Clone)]
pub struct Counters {
    pub datagrams: u64,
    pub requests: u64,
    pub readings: u64,
    pub duplicates: u64,
    /// Requests that reused the peer and Message ID of a remembered exchange with other bytes
    /// (another device behind the same NAT or balancer port, or a device that restarted): handled
    /// as new requests, not answered from the dedup table.
    pub message_id_reuses: u64,
    /// Silently dropped or RST-rejected datagrams.
    pub malformed: u64,
    pub pings: u64,
    pub resets_received: u64,
    pub bad_request: u64,
    pub unauthorized: u64,
    /// 4.02 Bad Option.
    pub bad_option: u64,
    pub forbidden: u64,
    pub not_found: u64,
    pub method_not_allowed: u64,
    pub incomplete: u64,
    pub too_large: u64,
    pub unsupported_format: u64,
    pub unavailable: u64,
    /// 4.29 Too Many Requests (RFC 8516), from [`Endpoint::refuse_new`].
    pub too_many_requests: u64,
    /// 5.05 Proxying Not Supported.
    pub proxying_not_supported: u64,
    pub block1_continues: u64,
    pub block1_timeouts: u64,
    pub dedup_evictions: u64,
}

type DedupKey = (SocketAddr, u16);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum DedupState {
    /// Stored, commit pending: duplicates are ignored.
    Pending,
    /// Answered: duplicate CONs get `response` again.
    Done,
}

struct DedupEntry {
    /// The DTLS session the request came over ([`PLAIN`] for plain CoAP, [`ANY_SESSION`] for
    /// an exchange restored from the store): Message IDs are only unique within one session.
    session: u64,
    sequence: u64,
    inserted: Instant,
    confirmable: bool,
    state: DedupState,
    token: [u8; 8],
    token_len: u8,
    no_response: u8,
    /// Hash of the request datagram ([`UNKNOWN_FINGERPRINT`] for a restored exchange): a
    /// retransmission is the same bytes (RFC 7252 §4.5), a request with other bytes is new.
    fingerprint: u64,
    response: StoredResponse,
}

/// What the dedup table says of a request.
enum Remembered<'a> {
    /// Not remembered (or expired, or from another DTLS session).
    No,
    /// A retransmission of this exchange.
    Duplicate(&'a DedupEntry),
    /// Another request with the peer and Message ID of a remembered exchange.
    Reused,
}

/// The fingerprint of an exchange restored from the store, whose request bytes are not kept:
/// a request with its peer, Message ID and token counts as its retransmission.
const UNKNOWN_FINGERPRINT: u64 = 0;

/// Responses up to this size are kept inside the dedup entry: a 2.04 is at most 4 (header) + 8
/// (token) + 4 (Block1) bytes, an RST 4. Longer ones (error diagnostics, restored exchanges) go
/// to the heap.
const RESPONSE_INLINE_BYTES: usize = 22;

/// The response a duplicate gets again.
enum StoredResponse {
    Inline {
        len: u8,
        bytes: [u8; RESPONSE_INLINE_BYTES],
    },
    Heap(Box<[u8]>),
}

impl StoredResponse {
    fn new(response: &[u8]) -> StoredResponse {
        if response.len() <= RESPONSE_INLINE_BYTES {
            let mut bytes = [0; RESPONSE_INLINE_BYTES];
            bytes[..response.len()].copy_from_slice(response);
            StoredResponse::Inline {
                len: response.len() as u8,
                bytes,
            }
        } else {
            StoredResponse::Heap(response.into())
        }
    }

    fn as_slice(&self) -> &[u8] {
        match self {
            StoredResponse::Inline { len, bytes } => &bytes[..usize::from(*len)],
            StoredResponse::Heap(bytes) => bytes,
        }
    }
}

/// The session scope of plain CoAP requests.
const PLAIN: u64 = 0;
/// The session scope of restored exchanges: they match a retransmission over any session.
const ANY_SESSION: u64 = u64::MAX;

/// Who sent a request over DTLS: the device its PSK identity maps to, and the id of the DTLS
/// session (unique per endpoint, never 0 nor u64::MAX; a new handshake gives a new id).
#[derive(Clone, Copy, Debug)]
pub struct Identity<'a> {
    pub device: &'a str,
    pub session: u64,
}

/// Insertion-ordered expiry queue item; stale when the entry's sequence differs.
struct QueueItem {
    inserted: Instant,
    key: DedupKey,
    sequence: u64,
}

struct Transfer {
    body: Vec<u8>,
    content_format: Option<u16>,
    last_activity: Instant,
}

/// The request fields the response depends on.
struct Request<'a> {
    session: u64,
    confirmable: bool,
    message_id: u16,
    token: &'a [u8],
    no_response: u8,
    fingerprint: u64,
}

/// Why a request's options refuse it, for the first such option in number order.
#[derive(Clone, Copy)]
enum OptionRefusal {
    /// Proxy-Uri or Proxy-Scheme: 5.05.
    Proxy,
    /// A repeated Content-Format or Block1.
    Repeated(u16),
    /// An unsupported critical option.
    Critical(u16),
}

/// The options a request is processed by, gathered in one pass (first values only).
#[derive(Default)]
struct RequestOptions<'a> {
    /// The first three Uri-Path segments.
    path: [Option<&'a [u8]>; 3],
    content_format: Option<&'a [u8]>,
    block1: Option<&'a [u8]>,
    size1: Option<&'a [u8]>,
    no_response: Option<&'a [u8]>,
    refusal: Option<OptionRefusal>,
}

impl<'a> RequestOptions<'a> {
    fn scan(message: &Message<'a>) -> RequestOptions<'a> {
        let mut options = RequestOptions::default();
        let mut previous = None;
        let mut segments = 0;
        for (number, value) in message.options() {
            let repeated = previous == Some(number);
            previous = Some(number);
            let first = |slot: &mut Option<&'a [u8]>| {
                if slot.is_none() {
                    *slot = Some(value);
                }
            };
            let refusal = match number {
                option::PROXY_URI | option::PROXY_SCHEME => Some(OptionRefusal::Proxy),
                option::CONTENT_FORMAT | option::BLOCK1 if repeated => {
                    Some(OptionRefusal::Repeated(number))
                }
                option::URI_PATH => {
                    if let Some(slot) = options.path.get_mut(segments) {
                        *slot = Some(value);
                        segments += 1;
                    }
                    None
                }
                option::CONTENT_FORMAT => {
                    first(&mut options.content_format);
                    None
                }
                option::BLOCK1 => {
                    first(&mut options.block1);
                    None
                }
                option::SIZE1 => {
                    first(&mut options.size1);
                    None
                }
                option::NO_RESPONSE => {
                    first(&mut options.no_response);
                    None
                }
                option::URI_HOST
                | option::OBSERVE
                | option::URI_PORT
                | option::MAX_AGE
                | option::URI_QUERY
                | option::ACCEPT
                | option::BLOCK2
                | option::SIZE2 => None,
                critical if critical & 1 == 1 => Some(OptionRefusal::Critical(critical)),
                _ => None, // unknown elective options are ignored
            };
            if options.refusal.is_none() {
                options.refusal = refusal;
            }
        }
        options
    }
}

/// What processing a (non-duplicate) request decided.
enum Answer {
    /// RST for a CON, nothing for a NON (counted as malformed).
    Reject,
    Error {
        code: u8,
        diagnostic: String,
        size1: Option<u32>,
        max_age_s: Option<u32>,
    },
    Continue {
        block1: u32,
    },
    WellKnownCore,
    Store {
        device: DeviceId,
        readings: usize,
        block1: Option<u32>,
    },
}

fn error(code: u8, diagnostic: impl Into<String>) -> Answer {
    Answer::Error {
        code,
        diagnostic: diagnostic.into(),
        size1: None,
        max_age_s: None,
    }
}

fn too_large(diagnostic: impl Into<String>, size1: usize) -> Answer {
    Answer::Error {
        code: code::REQUEST_ENTITY_TOO_LARGE,
        diagnostic: diagnostic.into(),
        size1: Some(u32::try_from(size1).unwrap_or(u32::MAX)),
        max_age_s: None,
    }
}

/// The sans-IO CoAP endpoint of one shard.
pub struct Endpoint {
    config: EndpointConfig,
    counters: Counters,
    dedup: HashMap<DedupKey, DedupEntry, RandomState>,
    /// CON entries in insertion order (so also in expiry order).
    con_queue: VecDeque<QueueItem>,
    /// NON entries in insertion order.
    non_queue: VecDeque<QueueItem>,
    next_sequence: u64,
    next_message_id: u16,
    transfers: HashMap<(SocketAddr, String), Transfer, RandomState>,
    /// No Block1 transfer times out before this instant.
    transfers_next_check: Option<Instant>,
    batch_decoder: BatchDecoder,
}

impl Endpoint {
    pub fn new(config: EndpointConfig) -> Self {
        let hasher = RandomState::new();
        // RFC 7252 §4.4: start Message IDs at a random value.
        let next_message_id = hasher.hash_one(0x5eed_u32) as u16;
        let dedup_capacity = config.dedup_entries_max.saturating_mul(2);
        Self {
            config,
            counters: Counters::default(),
            // Room for twice the bound, allocated now: at the bound every new exchange evicts
            // the oldest, and hashbrown clears the tombstones evictions leave by rehashing in
            // place only while the table is at most half full; a table sized for the bound would
            // be reallocated under load, with an allocation on the per-datagram path.
            dedup: HashMap::with_capacity_and_hasher(dedup_capacity, hasher.clone()),
            con_queue: VecDeque::new(),
            non_queue: VecDeque::new(),
            next_sequence: 0,
            next_message_id,
            transfers: HashMap::with_hasher(hasher),
            transfers_next_check: None,
            batch_decoder: BatchDecoder::new(),
        }
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    pub fn dedup_len(&self) -> usize {
        self.dedup.len()
    }

    /// Block1 reassemblies in progress.
    pub fn block1_transfers_len(&self) -> usize {
        self.transfers.len()
    }

    /// Handles one datagram from `peer`. `identity`: the authenticated device and its DTLS
    /// session when the datagram came over DTLS; None on plain CoAP. Clears `response` first.
    /// Never panics.
    #[allow(clippy::too_many_arguments)]
    pub fn handle(
        &mut self,
        now: Instant,
        unix_now: f64,
        peer: SocketAddr,
        identity: Option<Identity<'_>>,
        datagram: &[u8],
        readings: &mut Readings,
        response: &mut Vec<u8>,
    ) -> Outcome {
        response.clear();
        self.counters.datagrams += 1;
        if datagram.len() < 4 || datagram[0] >> 6 != 1 {
            // Too short to answer, or a version we do not know: silently ignored (RFC 7252 §3).
            self.counters.malformed += 1;
            return Outcome::Ignore;
        }
        let message_type = (datagram[0] >> 4) & 0x3;
        let code = datagram[1];
        let message_id = u16::from_be_bytes([datagram[2], datagram[3]]);
        let confirmable = message_type == 0;
        match message_type {
            2 => return Outcome::Ignore, // ACK: we have nothing outstanding
            3 => {
                self.counters.resets_received += 1;
                return Outcome::Ignore;
            }
            _ => {}
        }
        if code == 0 {
            if datagram.len() != 4 {
                return self.reject(confirmable, message_id, response);
            }
            if confirmable {
                self.counters.pings += 1;
                write_reset(message_id, response);
                return Outcome::Reply;
            }
            self.counters.malformed += 1;
            return Outcome::Ignore;
        }
        if code >> 5 != 0 {
            // A response (we send no requests) or a reserved class.
            return self.reject(confirmable, message_id, response);
        }
        let Ok(message) = Message::parse(datagram) else {
            // A message format error (RFC 7252 §3).
            return self.reject(confirmable, message_id, response);
        };
        self.counters.requests += 1;

        let key = (peer, message_id);
        let session = identity.map_or(PLAIN, |identity| identity.session);
        let fingerprint = self.fingerprint(datagram);
        match self.remembered(now, key, session, fingerprint, message.token) {
            Remembered::Duplicate(entry) => {
                let stored = entry.response.as_slice();
                let reply = confirmable && entry.state == DedupState::Done && !stored.is_empty();
                if reply {
                    response.extend_from_slice(stored);
                }
                self.counters.duplicates += 1;
                return if reply {
                    Outcome::Reply
                } else {
                    Outcome::Ignore
                };
            }
            Remembered::Reused => self.counters.message_id_reuses += 1,
            Remembered::No => {}
        }

        let options = RequestOptions::scan(&message);
        let no_response = options
            .no_response
            .and_then(uint)
            .map_or(0, |bits| bits as u8);
        let request = Request {
            session,
            confirmable,
            message_id,
            token: message.token,
            no_response,
            fingerprint,
        };
        let readings_at_entry = readings.len();
        let device = identity.map(|identity| identity.device);
        let answer = self.process(now, unix_now, peer, device, &message, &options, readings);
        match answer {
            Answer::Reject => self.reject(confirmable, message_id, response),
            Answer::Error {
                code,
                diagnostic,
                size1,
                max_age_s,
            } => {
                readings.truncate(readings_at_entry);
                self.count_error(code);
                // In ascending option number order.
                let options = [
                    max_age_s.map(|max_age_s| (option::MAX_AGE, max_age_s)),
                    size1.map(|size1| (option::SIZE1, size1)),
                ];
                let mut present = [(0, 0); 2];
                let mut count = 0;
                for option in options.into_iter().flatten() {
                    present[count] = option;
                    count += 1;
                }
                self.respond(
                    &request,
                    code,
                    &present[..count],
                    truncate(&diagnostic).as_bytes(),
                    response,
                );
                self.remember(now, key, &request, DedupState::Done, response);
                reply_if_any(response)
            }
            Answer::Continue { block1 } => {
                self.counters.block1_continues += 1;
                let options = [(option::BLOCK1, block1)];
                self.respond(&request, code::CONTINUE, &options, &[], response);
                self.remember(now, key, &request, DedupState::Done, response);
                reply_if_any(response)
            }
            Answer::WellKnownCore => {
                let options = [(
                    option::CONTENT_FORMAT,
                    u32::from(CONTENT_FORMAT_LINK_FORMAT),
                )];
                self.respond(
                    &request,
                    code::CONTENT,
                    &options,
                    WELL_KNOWN_CORE.as_bytes(),
                    response,
                );
                self.remember(now, key, &request, DedupState::Done, response);
                reply_if_any(response)
            }
            Answer::Store {
                device,
                readings: count,
                block1,
            } => {
                self.counters.readings += count as u64;
                let options = [(option::BLOCK1, block1.unwrap_or(0))];
                let options = if block1.is_some() { &options[..] } else { &[] };
                self.respond(&request, code::CHANGED, options, &[], response);
                let sequence = self.remember(now, key, &request, DedupState::Pending, response);
                Outcome::Store(Exchange {
                    peer,
                    message_id,
                    confirmable,
                    device,
                    sequence,
                })
            }
        }
    }

    /// Seeds the dedup table with an exchange answered before a restart (recovered from the
    /// store), so that its retransmission gets `response` again and is not stored twice. `age`:
    /// how long before `now` the request arrived; an exchange older than its lifetime
    /// (EXCHANGE_LIFETIME for a CON, NON_LIFETIME for a NON) is skipped. Call before handling
    /// datagrams, oldest exchange first (the expiry queues are kept in arrival order). Returns
    /// whether the exchange was taken.
    pub fn restore(
        &mut self,
        now: Instant,
        age: Duration,
        peer: SocketAddr,
        message_id: u16,
        confirmable: bool,
        response: &[u8],
    ) -> bool {
        if age >= self.lifetime(confirmable) {
            return false;
        }
        // The token is in the response (RFC 7252 §3); a malformed one is kept without it.
        let token_len = response
            .first()
            .map_or(0, |byte| usize::from(byte & 0x0f))
            .min(8);
        let token = response.get(4..4 + token_len).unwrap_or(&[]);
        let request = Request {
            session: ANY_SESSION,
            confirmable,
            message_id,
            token,
            no_response: 0,
            fingerprint: UNKNOWN_FINGERPRINT,
        };
        let inserted = now.checked_sub(age).unwrap_or(now);
        self.remember(
            inserted,
            (peer, message_id),
            &request,
            DedupState::Done,
            response,
        );
        true
    }

    /// The commit covering a Store outcome succeeded: duplicates now get the stored response.
    pub fn committed(&mut self, exchange: &Exchange) {
        if let Some(entry) = self.entry_of(exchange) {
            entry.state = DedupState::Done;
        }
    }

    /// The commit failed: forget the exchange (a retransmission is processed as new) and write a
    /// 5.03 Service Unavailable with Max-Age into `response` (cleared first). If the exchange was
    /// already evicted from the dedup table, its token is unknown and `response` stays empty; the
    /// device's retransmission is then processed as new.
    pub fn unavailable(&mut self, exchange: &Exchange, max_age_s: u32, response: &mut Vec<u8>) {
        response.clear();
        self.counters.unavailable += 1;
        if self.entry_of(exchange).is_none() {
            return;
        }
        let Some(entry) = self.dedup.remove(&(exchange.peer, exchange.message_id)) else {
            return;
        };
        let options = [(option::MAX_AGE, max_age_s)];
        self.respond_to_entry(
            exchange,
            &entry,
            code::SERVICE_UNAVAILABLE,
            &options,
            "storage unavailable",
            response,
        );
    }

    /// The store refused the readings of a Store outcome (e.g. a time it cannot hold): nothing of
    /// the exchange was stored. Writes a 4.00 with `diagnostic` into `response` (cleared first),
    /// which duplicates of the exchange get again.
    pub fn rejected(&mut self, exchange: &Exchange, diagnostic: &str, response: &mut Vec<u8>) {
        response.clear();
        self.counters.bad_request += 1;
        let key = (exchange.peer, exchange.message_id);
        if self.entry_of(exchange).is_none() {
            return;
        }
        let Some(entry) = self.dedup.remove(&key) else {
            return;
        };
        self.respond_to_entry(
            exchange,
            &entry,
            code::BAD_REQUEST,
            &[],
            truncate(diagnostic),
            response,
        );
        let mut entry = entry;
        entry.state = DedupState::Done;
        entry.response = StoredResponse::new(response);
        self.dedup.insert(key, entry);
    }

    fn respond_to_entry(
        &mut self,
        exchange: &Exchange,
        entry: &DedupEntry,
        code: u8,
        options: &[(u16, u32)],
        diagnostic: &str,
        response: &mut Vec<u8>,
    ) {
        let request = Request {
            session: entry.session,
            confirmable: entry.confirmable,
            message_id: exchange.message_id,
            token: &entry.token[..usize::from(entry.token_len)],
            no_response: entry.no_response,
            fingerprint: entry.fingerprint,
        };
        self.respond(&request, code, options, diagnostic.as_bytes(), response);
    }

    /// Drops expired dedup entries and timed-out Block1 transfers. O(expired) for the dedup table;
    /// the transfer table is scanned only when its earliest deadline has passed.
    pub fn expire(&mut self, now: Instant) {
        let lifetime = self.config.exchange_lifetime;
        expire_queue(&mut self.con_queue, &mut self.dedup, now, lifetime);
        let lifetime = self.config.non_lifetime;
        expire_queue(&mut self.non_queue, &mut self.dedup, now, lifetime);

        if self
            .transfers_next_check
            .is_some_and(|deadline| now >= deadline)
        {
            let timeout = self.config.block1_timeout;
            let before = self.transfers.len();
            self.transfers.retain(|_, transfer| {
                now.saturating_duration_since(transfer.last_activity) < timeout
            });
            self.counters.block1_timeouts += (before - self.transfers.len()) as u64;
            self.transfers_next_check = self
                .transfers
                .values()
                .map(|transfer| transfer.last_activity + timeout)
                .min();
        }
    }

    fn lifetime(&self, confirmable: bool) -> Duration {
        if confirmable {
            self.config.exchange_lifetime
        } else {
            self.config.non_lifetime
        }
    }

    fn reject(&mut self, confirmable: bool, message_id: u16, response: &mut Vec<u8>) -> Outcome {
        self.counters.malformed += 1;
        if confirmable {
            write_reset(message_id, response);
            Outcome::Reply
        } else {
            Outcome::Ignore
        }
    }

    fn count_error(&mut self, code: u8) {
        let counter = match code {
            code::BAD_REQUEST => &mut self.counters.bad_request,
            code::UNAUTHORIZED => &mut self.counters.unauthorized,
            code::BAD_OPTION => &mut self.counters.bad_option,
            code::FORBIDDEN => &mut self.counters.forbidden,
            code::NOT_FOUND => &mut self.counters.not_found,
            code::METHOD_NOT_ALLOWED => &mut self.counters.method_not_allowed,
            code::REQUEST_ENTITY_INCOMPLETE => &mut self.counters.incomplete,
            code::REQUEST_ENTITY_TOO_LARGE => &mut self.counters.too_large,
            code::UNSUPPORTED_CONTENT_FORMAT => &mut self.counters.unsupported_format,
            code::SERVICE_UNAVAILABLE => &mut self.counters.unavailable,
            code::TOO_MANY_REQUESTS => &mut self.counters.too_many_requests,
            code::PROXYING_NOT_SUPPORTED => &mut self.counters.proxying_not_supported,
            _ => return,
        };
        *counter += 1;
    }

    /// Writes a piggybacked ACK (CON) or a NON response with a fresh Message ID (NON), honouring
    /// No-Response on NON requests.
    fn respond(
        &mut self,
        request: &Request<'_>,
        code: u8,
        options: &[(u16, u32)],
        payload: &[u8],
        response: &mut Vec<u8>,
    ) {
        response.clear();
        let message_id = if request.confirmable {
            request.message_id
        } else {
            let class = code >> 5;
            let suppress = match class {
                2 => NO_RESPONSE_2XX,
                4 => NO_RESPONSE_4XX,
                _ => NO_RESPONSE_5XX,
            };
            if request.no_response & suppress != 0 {
                return;
            }
            let message_id = self.next_message_id;
            self.next_message_id = self.next_message_id.wrapping_add(1);
            message_id
        };
        let message_type = if request.confirmable {
            message::TYPE_ACKNOWLEDGEMENT
        } else {
            message::TYPE_NON_CONFIRMABLE
        };
        message::write(
            response,
            message_type,
            code,
            message_id,
            request.token,
            options,
            payload,
        );
    }

    /// Records an answered or pending exchange in the dedup table, evicting the oldest entry when
    /// the table is full. Returns the entry's sequence number.
    fn remember(
        &mut self,
        now: Instant,
        key: DedupKey,
        request: &Request<'_>,
        state: DedupState,
        response: &[u8],
    ) -> u64 {
        let entries_max = self.config.dedup_entries_max;
        if entries_max == 0 {
            return u64::MAX;
        }
        if !self.dedup.contains_key(&key) {
            while self.dedup.len() >= entries_max {
                if !self.evict_oldest() {
                    break;
                }
            }
        }
        let sequence = self.next_sequence;
        self.next_sequence += 1;
        let mut token = [0u8; 8];
        let token_len = request.token.len().min(8);
        token[..token_len].copy_from_slice(&request.token[..token_len]);
        self.dedup.insert(
            key,
            DedupEntry {
                session: request.session,
                sequence,
                inserted: now,
                confirmable: request.confirmable,
                state,
                token,
                token_len: token_len as u8,
                no_response: request.no_response,
                fingerprint: request.fingerprint,
                response: StoredResponse::new(response),
            },
        );
        let queue = if request.confirmable {
            &mut self.con_queue
        } else {
            &mut self.non_queue
        };
        queue.push_back(QueueItem {
            inserted: now,
            key,
            sequence,
        });
        // Forgotten and replaced entries leave stale items behind; keep the queues bounded.
        let stale_bound = 2 * entries_max + 64;
        if self.con_queue.len() + self.non_queue.len() > stale_bound {
            let dedup = &self.dedup;
            let live = |item: &QueueItem| {
                dedup
                    .get(&item.key)
                    .is_some_and(|e| e.sequence == item.sequence)
            };
            self.con_queue.retain(live);
            self.non_queue.retain(live);
        }
        sequence
    }

    /// The hash a request datagram is remembered by (never [`UNKNOWN_FINGERPRINT`]).
    fn fingerprint(&self, datagram: &[u8]) -> u64 {
        self.dedup.hasher().hash_one(datagram).max(1)
    }

    /// Whether a request from `key` over `session` with `fingerprint` and `token` is a
    /// retransmission of a remembered exchange (within its lifetime, same DTLS session, same
    /// bytes; for a restored exchange, whose bytes are unknown, the token its response holds),
    /// or reuses its peer and Message ID with other bytes.
    fn remembered(
        &self,
        now: Instant,
        key: DedupKey,
        session: u64,
        fingerprint: u64,
        token: &[u8],
    ) -> Remembered<'_> {
        let Some(entry) = self.dedup.get(&key) else {
            return Remembered::No;
        };
        let same_scope = entry.session == session || entry.session == ANY_SESSION;
        let lifetime = self.lifetime(entry.confirmable);
        if !same_scope || now.saturating_duration_since(entry.inserted) >= lifetime {
            return Remembered::No;
        }
        let other = if entry.fingerprint == UNKNOWN_FINGERPRINT {
            // A retransmission carries the request's token, which the stored response echoes
            // (RFC 7252 §5.3.1); without a response (No-Response) the token is not known.
            !entry.response.as_slice().is_empty()
                && entry.token[..usize::from(entry.token_len)] != *token
        } else {
            entry.fingerprint != fingerprint
        };
        if other {
            return Remembered::Reused;
        }
        Remembered::Duplicate(entry)
    }

    /// The dedup entry `exchange` owns, if it was not evicted or replaced since.
    fn entry_of(&mut self, exchange: &Exchange) -> Option<&mut DedupEntry> {
        self.dedup
            .get_mut(&(exchange.peer, exchange.message_id))
            .filter(|entry| entry.sequence == exchange.sequence)
    }

    /// Evicts the oldest live entry; false when there is none.
    fn evict_oldest(&mut self) -> bool {
        loop {
            let from_con = match (self.con_queue.front(), self.non_queue.front()) {
                (None, None) => return false,
                (Some(_), None) => true,
                (None, Some(_)) => false,
                (Some(con), Some(non)) => con.sequence < non.sequence,
            };
            let queue = if from_con {
                &mut self.con_queue
            } else {
                &mut self.non_queue
            };
            let Some(item) = queue.pop_front() else {
                return false;
            };
            if self
                .dedup
                .get(&item.key)
                .is_some_and(|entry| entry.sequence == item.sequence)
            {
                self.dedup.remove(&item.key);
                self.counters.dedup_evictions += 1;
                return true;
            }
        }
    }

    /// Routes and processes a well-formed, non-duplicate request.
    #[allow(clippy::too_many_arguments)]
    fn process(
        &mut self,
        now: Instant,
        unix_now: f64,
        peer: SocketAddr,
        identity: Option<&str>,
        message: &Message<'_>,
        options: &RequestOptions<'_>,
        readings: &mut Readings,
    ) -> Answer {
        let confirmable = message.message_type == message::TYPE_CONFIRMABLE;
        match options.refusal {
            None => {}
            Some(OptionRefusal::Proxy) => {
                return error(code::PROXYING_NOT_SUPPORTED, "not a proxy")
            }
            // RFC 7252 §5.4.1: 4.02 for a CON, reject a NON.
            Some(_) if !confirmable => return Answer::Reject,
            Some(OptionRefusal::Repeated(number)) => {
                return error(code::BAD_OPTION, format!("repeated option {number}"))
            }
            Some(OptionRefusal::Critical(number)) => {
                return error(
                    code::BAD_OPTION,
                    format!("unsupported critical option {number}"),
                )
            }
        }

        let method = message.code;
        let [first, second, third] = options.path;
        let path_device = match (first, second, third) {
            (Some(b".well-known"), Some(b"core"), None) => {
                return if method == CODE_GET {
                    Answer::WellKnownCore
                } else {
                    error(code::METHOD_NOT_ALLOWED, "use GET")
                };
            }
            (Some(b"t"), device, None) => device,
            _ => return error(code::NOT_FOUND, "no such resource; POST to /t"),
        };
        if method != CODE_POST {
            return error(code::METHOD_NOT_ALLOWED, "use POST");
        }

        let device = match (identity, path_device) {
            (Some(identity), None) => DeviceId::new(identity),
            (Some(identity), Some(device)) if device == identity.as_bytes() => {
                DeviceId::new(identity)
            }
            (Some(_), Some(_)) => {
                return error(code::FORBIDDEN, "a device may only write as itself")
            }
            (None, Some(device)) => match device_id(device) {
                Some(device) => DeviceId::new(device),
                None => {
                    return error(
                        code::BAD_REQUEST,
                        "bad device id: 1-64 bytes of A-Z a-z 0-9 . _ : -",
                    )
                }
            },
            (None, None) => {
                return error(code::UNAUTHORIZED, "no identity: use DTLS or /t/{device}")
            }
        };
        let Some(device) = device else {
            // Only an identity can get here: path device ids were checked above.
            return error(code::BAD_REQUEST, "device id longer than 64 bytes");
        };

        let content_format = match options.content_format {
            None => None,
            Some(value) => match uint(value).filter(|_| value.len() <= 2) {
                Some(format) => Some(format as u16),
                None => return error(code::BAD_REQUEST, "bad Content-Format option"),
            },
        };
        if let Some(format) = content_format {
            if !matches!(
                format,
                CONTENT_FORMAT_SENML_JSON | CONTENT_FORMAT_SENML_CBOR | CONTENT_FORMAT_RKYV_BATCH
            ) {
                return error(
                    code::UNSUPPORTED_CONTENT_FORMAT,
                    "use Content-Format 110, 112 or 65362",
                );
            }
        }

        let block1 = match options.block1 {
            None => None,
            Some(value) => match uint(value).filter(|_| value.len() <= 3) {
                Some(block1) => Some(block1),
                None => return error(code::BAD_REQUEST, "bad Block1 option"),
            },
        };
        let payload = message.payload;
        let Some(block1) = block1 else {
            if payload.len() > self.config.datagram_payload_bytes_max {
                return too_large("payload too large", self.config.datagram_payload_bytes_max);
            }
            return self.decode(device, content_format, payload, unix_now, readings, None);
        };

        // Block1 (RFC 7959).
        let num = block1 >> 4;
        let more = block1 & 0x8 != 0;
        let szx = block1 & 0x7;
        if szx == 7 {
            return error(code::BAD_REQUEST, "Block1 SZX 7 is reserved");
        }
        let block_size = 1usize << (szx + 4);
        if let Some(size1) = options.size1.and_then(uint) {
            if size1 as usize > self.config.body_bytes_max {
                return too_large("body too large", self.config.body_bytes_max);
            }
        }
        if (more && payload.len() != block_size) || payload.len() > block_size {
            return error(code::BAD_REQUEST, "Block1 payload does not match its SZX");
        }
        if num == 0 && !more {
            // A single block: no reassembly needed.
            return self.decode(
                device,
                content_format,
                payload,
                unix_now,
                readings,
                Some(block1),
            );
        }

        let key = (peer, device.to_string());
        let timeout = self.config.block1_timeout;
        if num == 0 {
            if !self.transfers.contains_key(&key)
                && self.transfers.len() >= self.config.block1_transfers_max
            {
                self.expire(now);
                if self.transfers.len() >= self.config.block1_transfers_max {
                    return Answer::Error {
                        code: code::SERVICE_UNAVAILABLE,
                        diagnostic: "too many Block1 transfers".into(),
                        size1: None,
                        max_age_s: Some(BLOCK1_BUSY_MAX_AGE_S),
                    };
                }
            }
            let transfer = self
                .transfers
                .entry(key.clone())
                .or_insert_with(|| Transfer {
                    body: Vec::new(),
                    content_format: None,
                    last_activity: now,
                });
            transfer.body.clear();
            transfer.content_format = None;
            if self.transfers_next_check.is_none() {
                self.transfers_next_check = Some(now + timeout);
            }
        } else {
            let offset = (num as usize) << (szx + 4);
            let in_sequence = self.transfers.get(&key).is_some_and(|transfer| {
                transfer.body.len() == offset
                    && now.saturating_duration_since(transfer.last_activity) < timeout
            });
            if !in_sequence {
                self.transfers.remove(&key);
                return error(
                    code::REQUEST_ENTITY_INCOMPLETE,
                    "Block1 block out of sequence",
                );
            }
        }
        let body_bytes_max = self.config.body_bytes_max;
        let Some(transfer) = self.transfers.get_mut(&key) else {
            return error(
                code::REQUEST_ENTITY_INCOMPLETE,
                "Block1 block out of sequence",
            );
        };
        if transfer.body.len() + payload.len() > body_bytes_max {
            self.transfers.remove(&key);
            return too_large("body too large", body_bytes_max);
        }
        transfer.body.extend_from_slice(payload);
        transfer.last_activity = now;
        if content_format.is_some() {
            transfer.content_format = content_format;
        }
        if more {
            return Answer::Continue { block1 };
        }
        let Some(transfer) = self.transfers.remove(&key) else {
            return error(
                code::REQUEST_ENTITY_INCOMPLETE,
                "Block1 block out of sequence",
            );
        };
        self.decode(
            device,
            transfer.content_format,
            &transfer.body,
            unix_now,
            readings,
            Some(block1),
        )
    }

    /// Decodes a complete body for `device`.
    fn decode(
        &mut self,
        device: DeviceId,
        content_format: Option<u16>,
        body: &[u8],
        unix_now: f64,
        readings: &mut Readings,
        block1: Option<u32>,
    ) -> Answer {
        let start = readings.len();
        let format = content_format.unwrap_or_else(|| sniff(body));
        let result = match format {
            CONTENT_FORMAT_SENML_JSON => senml::decode_json(body, unix_now, readings),
            CONTENT_FORMAT_SENML_CBOR => senml::decode_cbor(body, unix_now, readings),
            _ => self.batch_decoder.decode(body, unix_now, readings),
        };
        if let Err(decode_error) = result {
            return error(code::BAD_REQUEST, decode_error.to_string());
        }
        let count = readings.len() - start;
        if count == 0 {
            return error(code::BAD_REQUEST, DecodeError::NoReadings.to_string());
        }
        let max = self.config.readings_per_request_max;
        if count > max {
            readings.truncate(start);
            return Answer::Error {
                code: code::REQUEST_ENTITY_TOO_LARGE,
                diagnostic: DecodeError::TooManyReadings { max }.to_string(),
                size1: None,
                max_age_s: None,
            };
        }
        Answer::Store {
            device,
            readings: count,
            block1,
        }
    }
}

fn expire_queue(
    queue: &mut VecDeque<QueueItem>,
    dedup: &mut HashMap<DedupKey, DedupEntry, RandomState>,
    now: Instant,
    lifetime: Duration,
) {
    while let Some(item) = queue.front() {
        if now.saturating_duration_since(item.inserted) < lifetime {
            break;
        }
        if dedup
            .get(&item.key)
            .is_some_and(|entry| entry.sequence == item.sequence)
        {
            dedup.remove(&item.key);
        }
        queue.pop_front();
    }
}

fn reply_if_any(response: &[u8]) -> Outcome {
    if response.is_empty() {
        Outcome::Ignore
    } else {
        Outcome::Reply
    }
}

/// An Empty RST matching `message_id`.
fn write_reset(message_id: u16, response: &mut Vec<u8>) {
    response.clear();
    let [high, low] = message_id.to_be_bytes();
    response.extend_from_slice(&[0x70, 0x00, high, low]);
}

/// SenML JSON when the first non-whitespace byte is `[`, else SenML CBOR.
fn sniff(body: &[u8]) -> u16 {
    match body
        .iter()
        .find(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
    {
        Some(b'[') => CONTENT_FORMAT_SENML_JSON,
        _ => CONTENT_FORMAT_SENML_CBOR,
    }
}

/// A device id: 1..=64 bytes of [A-Za-z0-9._:-].
fn device_id(bytes: &[u8]) -> Option<&str> {
    let valid = !bytes.is_empty()
        && bytes.len() <= DEVICE_ID_BYTES_MAX
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'));
    if valid {
        std::str::from_utf8(bytes).ok()
    } else {
        None
    }
}

/// An option's uint value (RFC 7252 §3.2), up to 4 bytes.
fn uint(bytes: &[u8]) -> Option<u32> {
    if bytes.len() > 4 {
        return None;
    }
    Some(bytes.iter().fold(0u32, |acc, b| (acc << 8) | u32::from(*b)))
}

/// Truncates a diagnostic to [`DIAGNOSTIC_BYTES_MAX`] on a char boundary.
fn truncate(diagnostic: &str) -> &str {
    if diagnostic.len() <= DIAGNOSTIC_BYTES_MAX {
        return diagnostic;
    }
    let mut end = DIAGNOSTIC_BYTES_MAX;
    while !diagnostic.is_char_boundary(end) {
        end -= 1;
    }
    &diagnostic[..end]
}
