//! Sans-IO CoAP ingestion core of sluice.
//!
//! Takes datagrams, a peer address and the current time; returns what to store and what to send.
//! No sockets, no threads, no clocks of its own. See `docs/wire.md` for the wire contract.

pub mod batch;
mod endpoint;
pub mod message;
pub mod senml;

pub use endpoint::{
    path_device, Counters, DeviceId, Endpoint, EndpointConfig, Exchange, Identity, Outcome, Refusal,
};

/// SenML JSON (RFC 8428).
pub const CONTENT_FORMAT_SENML_JSON: u16 = 110;
/// SenML CBOR (RFC 8428).
pub const CONTENT_FORMAT_SENML_CBOR: u16 = 112;
/// The sluice rkyv batch format (experimental range), see `docs/rkyv-batch.md`.
pub const CONTENT_FORMAT_RKYV_BATCH: u16 = 65362;

/// Longest series name after SenML resolution, in bytes.
pub const NAME_BYTES_MAX: usize = 255;

/// A resolved time below this (2^28 s) is relative to the arrival time (RFC 8428 §4.5.3).
pub const RELATIVE_TIME_LIMIT: f64 = 268_435_456.0;

/// One value of a reading.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Number(f64),
    Bool(bool),
    String(String),
    Data(Vec<u8>),
}

/// One decoded reading: series name (SenML bn+n resolved), absolute unix time in seconds, value.
#[derive(Clone, Debug, PartialEq)]
pub struct Reading {
    pub name: String,
    pub time: f64,
    pub value: Value,
}

/// A value borrowed from a payload (or from a [`Reading`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ValueRef<'a> {
    Number(f64),
    Bool(bool),
    String(&'a str),
    Data(&'a [u8]),
}

impl Value {
    pub fn as_ref(&self) -> ValueRef<'_> {
        match self {
            Value::Number(n) => ValueRef::Number(*n),
            Value::Bool(b) => ValueRef::Bool(*b),
            Value::String(s) => ValueRef::String(s),
            Value::Data(d) => ValueRef::Data(d),
        }
    }

    /// Overwrites `self` with `value`, reusing its string or byte buffer when it has one of the
    /// same kind.
    fn assign(&mut self, value: ValueRef<'_>) {
        match (self, value) {
            (Value::String(text), ValueRef::String(new)) => {
                text.clear();
                text.push_str(new);
            }
            (Value::Data(data), ValueRef::Data(new)) => {
                data.clear();
                data.extend_from_slice(new);
            }
            (this, ValueRef::Number(n)) => *this = Value::Number(n),
            (this, ValueRef::Bool(b)) => *this = Value::Bool(b),
            (this, ValueRef::String(s)) => *this = Value::String(s.to_owned()),
            (this, ValueRef::Data(d)) => *this = Value::Data(d.to_vec()),
        }
    }
}

/// The readings decoded from one request, in storage reused across requests: clearing keeps
/// every slot with its name and value buffers, so that decoding in steady state (names and
/// values no longer than before) allocates nothing. Derefs to the readings as a slice.
#[derive(Default)]
pub struct Readings {
    slots: Vec<Reading>,
    len: usize,
    /// Decoded `vd` (base64) or concatenated CBOR byte chunks of the record being resolved.
    pub(crate) data_scratch: Vec<u8>,
}

impl Readings {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn clear(&mut self) {
        self.len = 0;
    }

    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// The readings as owned values (tests, tools).
    pub fn to_vec(&self) -> Vec<Reading> {
        self.as_slice().to_vec()
    }

    pub fn as_slice(&self) -> &[Reading] {
        &self.slots[..self.len]
    }

    /// Appends a reading.
    pub fn push(&mut self, name: &str, time: f64, value: ValueRef<'_>) {
        self.push_parts(&[name], time, value);
    }

    /// Appends a reading named by the concatenation of `name_parts`.
    pub(crate) fn push_parts(&mut self, name_parts: &[&str], time: f64, value: ValueRef<'_>) {
        if self.len == self.slots.len() {
            self.slots.push(Reading {
                name: String::new(),
                time,
                value: Value::Number(0.0),
            });
        }
        let slot = &mut self.slots[self.len];
        self.len += 1;
        slot.name.clear();
        for part in name_parts {
            slot.name.push_str(part);
        }
        slot.time = time;
        slot.value.assign(value);
    }
}

impl std::ops::Deref for Readings {
    type Target = [Reading];

    fn deref(&self) -> &[Reading] {
        self.as_slice()
    }
}

impl std::fmt::Debug for Readings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.as_slice()).finish()
    }
}

/// Why a payload could not be decoded. The message is sent as the 4.00 diagnostic payload.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum DecodeError {
    #[error("invalid SenML JSON: {0}")]
    Json(String),
    #[error("invalid SenML CBOR: {0}")]
    Cbor(String),
    #[error("SenML pack must be an array of records")]
    NotAnArray,
    #[error("record {index}: not a map")]
    RecordNotMap { index: usize },
    #[error("record {index}: wrong type for {label}")]
    WrongType { index: usize, label: String },
    #[error("record {index}: no name (bn+n empty)")]
    MissingName { index: usize },
    #[error("record {index}: name longer than 255 bytes")]
    NameTooLong { index: usize },
    #[error("record {index}: no value and no sum")]
    NoValue { index: usize },
    #[error("record {index}: more than one value field")]
    MultipleValues { index: usize },
    #[error("record {index}: non-finite number")]
    NonFinite { index: usize },
    #[error("record {index}: unsupported SenML version {version}")]
    UnsupportedVersion { index: usize, version: f64 },
    #[error("record {index}: unsupported must-understand label {label}")]
    MandatoryLabel { index: usize, label: String },
    #[error("record {index}: vd is not base64url")]
    BadBase64 { index: usize },
    #[error("invalid rkyv batch: {0}")]
    Batch(String),
    #[error("no readings in payload")]
    NoReadings,
    #[error("too many readings in one request (max {max})")]
    TooManyReadings { max: usize },
}

/// Resolves a SenML/batch time: absolute if at least 2^28, else relative to `unix_now`.
pub(crate) fn resolve_time(time: f64, unix_now: f64) -> f64 {
    if time < RELATIVE_TIME_LIMIT {
        unix_now + time
    } else {
        time
    }
}

/// Checks the length of a resolved series name.
pub(crate) fn check_name(name_len: usize, index: usize) -> Result<(), DecodeError> {
    if name_len == 0 {
        return Err(DecodeError::MissingName { index });
    }
    if name_len > NAME_BYTES_MAX {
        return Err(DecodeError::NameTooLong { index });
    }
    Ok(())
}
