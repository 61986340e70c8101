//! The sluice rkyv batch format (Content-Format 65362), see `docs/rkyv-batch.md`.
//!
//! An rkyv 0.8 archive (default format: little-endian, 32-bit relative pointers, aligned) whose
//! root is [`Batch`]. Record times are relative to `base_time`; a resolved time below 2^28 is
//! relative to the arrival time, as in SenML.

use rkyv::rancor;
use rkyv::util::AlignedVec;

use crate::{check_name, resolve_time, DecodeError, Readings, ValueRef};

/// A batch of records sharing one base time.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Clone, Debug, PartialEq)]
pub struct Batch {
    /// Unix seconds (or, below 2^28, seconds relative to the arrival time).
    pub base_time: f64,
    pub records: Vec<BatchRecord>,
}

/// One record of a [`Batch`].
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Clone, Debug, PartialEq)]
pub struct BatchRecord {
    /// Series name, 1..=255 bytes.
    pub name: String,
    /// Seconds relative to [`Batch::base_time`].
    pub time: f64,
    pub value: BatchValue,
}

/// The value of a [`BatchRecord`].
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Clone, Debug, PartialEq)]
pub enum BatchValue {
    Number(f64),
    Bool(bool),
    String(String),
    Data(Vec<u8>),
}

/// Serializes a batch into its wire form.
pub fn encode(batch: &Batch) -> Vec<u8> {
    match rkyv::to_bytes::<rancor::Error>(batch) {
        Ok(bytes) => bytes.into_vec(),
        // Serializing into a growable in-memory buffer only fails on allocation failure.
        Err(error) => panic!("rkyv batch serialization failed: {error}"),
    }
}

/// Alignment the archive needs: that of its most aligned type (f64 fields).
const ARCHIVE_ALIGNMENT: usize = {
    let batch = std::mem::align_of::<ArchivedBatch>();
    let record = std::mem::align_of::<ArchivedBatchRecord>();
    if batch > record {
        batch
    } else {
        record
    }
};

/// Decodes batches, reusing one aligned scratch buffer across calls.
///
/// rkyv needs the archive aligned: a payload that happens to lie aligned in the receive buffer
/// is validated and read in place; any other is first copied into the scratch buffer (a
/// memcpy into reused memory, no allocation once it has grown).
#[derive(Default)]
pub struct BatchDecoder {
    scratch: AlignedVec,
}

impl BatchDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Validates `payload` and appends its readings to `out`; all-or-nothing.
    pub fn decode(
        &mut self,
        payload: &[u8],
        unix_now: f64,
        out: &mut Readings,
    ) -> Result<(), DecodeError> {
        let archive = if (payload.as_ptr() as usize).is_multiple_of(ARCHIVE_ALIGNMENT) {
            payload
        } else {
            self.scratch.clear();
            self.scratch.extend_from_slice(payload);
            &self.scratch[..]
        };
        let batch = rkyv::access::<ArchivedBatch, rancor::Failure>(archive)
            .map_err(|_| DecodeError::Batch("validation failed".into()))?;
        let len_at_entry = out.len();
        let result = append_readings(batch, unix_now, out);
        if result.is_err() {
            out.truncate(len_at_entry);
        }
        result
    }
}

fn append_readings(
    batch: &ArchivedBatch,
    unix_now: f64,
    out: &mut Readings,
) -> Result<(), DecodeError> {
    let base_time = batch.base_time.to_native();
    for (index, record) in batch.records.iter().enumerate() {
        let name = record.name.as_str();
        check_name(name.len(), index)?;
        let time = resolve_time(base_time + record.time.to_native(), unix_now);
        if !time.is_finite() {
            return Err(DecodeError::NonFinite { index });
        }
        let value = match &record.value {
            ArchivedBatchValue::Number(x) => {
                let x = x.to_native();
                if !x.is_finite() {
                    return Err(DecodeError::NonFinite { index });
                }
                ValueRef::Number(x)
            }
            ArchivedBatchValue::Bool(b) => ValueRef::Bool(*b),
            ArchivedBatchValue::String(s) => ValueRef::String(s.as_str()),
            ArchivedBatchValue::Data(d) => ValueRef::Data(d.as_slice()),
        };
        out.push_parts(&[name], time, value);
    }
    Ok(())
}
