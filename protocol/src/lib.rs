//! Sans-IO CoAP ingestion core of sluice.
//!
//! Takes datagrams, a peer address and the current time; returns what to store and what to send.
//! No sockets, no threads, no clocks of its own. See `docs/wire.md` for the wire contract.

pub mod batch;
mod endpoint;
pub mod senml;

pub use endpoint::{
    path_device, Counters, Endpoint, EndpointConfig, Exchange, Identity, Outcome, Refusal,
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

/// Checks a resolved series name.
pub(crate) fn check_name(name: &str, index: usize) -> Result<(), DecodeError> {
    if name.is_empty() {
        return Err(DecodeError::MissingName { index });
    }
    if name.len() > NAME_BYTES_MAX {
        return Err(DecodeError::NameTooLong { index });
    }
    Ok(())
}
