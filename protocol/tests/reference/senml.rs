//! The SenML decoders as they were before the streaming ones (serde_json::Value and
//! ciborium::Value trees): the reference `tests/senml_reference.rs` checks the new ones against.
//!
//! Both representations are parsed into the same raw record, then resolved with the same rules:
//! base fields persist across records, name = bn + n, time = bt + t (relative to `unix_now` when
//! below 2^28), value = bv + v, sum = bs + s. A record with a value and a sum yields two readings,
//! the sum under `<name>:sum`. Decoding is all-or-nothing.

use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::Engine as _;

use sluice_protocol::{DecodeError, Reading, Value, NAME_BYTES_MAX, RELATIVE_TIME_LIMIT};

fn resolve_time(time: f64, unix_now: f64) -> f64 {
    if time < RELATIVE_TIME_LIMIT {
        unix_now + time
    } else {
        time
    }
}

fn check_name(name: &str, index: usize) -> Result<(), DecodeError> {
    if name.is_empty() {
        return Err(DecodeError::MissingName { index });
    }
    if name.len() > NAME_BYTES_MAX {
        return Err(DecodeError::NameTooLong { index });
    }
    Ok(())
}

/// Highest SenML version understood (RFC 8428 defines version 10).
const SENML_VERSION_MAX: f64 = 10.0;

/// Suffix of the series that holds the sum of a record that also carries a value.
const SUM_SUFFIX: &str = ":sum";

/// base64url without padding (RFC 8428 §5), tolerating padding from lenient encoders.
const BASE64URL: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::URL_SAFE,
    GeneralPurposeConfig::new()
        .with_encode_padding(false)
        .with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// One record as it appears on the wire, before base-value resolution.
#[derive(Default)]
struct RawRecord {
    base_name: Option<String>,
    base_time: Option<f64>,
    base_value: Option<f64>,
    base_sum: Option<f64>,
    base_version: Option<f64>,
    name: Option<String>,
    value: Option<f64>,
    string_value: Option<String>,
    bool_value: Option<bool>,
    data_value: Option<Vec<u8>>,
    sum: Option<f64>,
    time: Option<f64>,
}

/// Base fields in force for the current record (RFC 8428 §4.6).
#[derive(Default)]
struct Base {
    name: String,
    time: f64,
    value: f64,
    sum: f64,
}

fn finite(x: f64, index: usize) -> Result<f64, DecodeError> {
    if x.is_finite() {
        Ok(x)
    } else {
        Err(DecodeError::NonFinite { index })
    }
}

fn resolve(
    base: &mut Base,
    record: RawRecord,
    index: usize,
    unix_now: f64,
    out: &mut Vec<Reading>,
) -> Result<(), DecodeError> {
    if let Some(version) = record.base_version {
        if version.is_nan() || version > SENML_VERSION_MAX {
            return Err(DecodeError::UnsupportedVersion { index, version });
        }
    }
    if let Some(name) = record.base_name {
        base.name = name;
    }
    if let Some(time) = record.base_time {
        base.time = finite(time, index)?;
    }
    if let Some(value) = record.base_value {
        base.value = finite(value, index)?;
    }
    if let Some(sum) = record.base_sum {
        base.sum = finite(sum, index)?;
    }

    let mut name =
        String::with_capacity(base.name.len() + record.name.as_deref().map_or(0, str::len));
    name.push_str(&base.name);
    if let Some(n) = &record.name {
        name.push_str(n);
    }
    check_name(&name, index)?;

    let time = finite(
        base.time + finite(record.time.unwrap_or(0.0), index)?,
        index,
    )?;
    let time = finite(resolve_time(time, unix_now), index)?;

    let value_fields = usize::from(record.value.is_some())
        + usize::from(record.string_value.is_some())
        + usize::from(record.bool_value.is_some())
        + usize::from(record.data_value.is_some());
    if value_fields > 1 {
        return Err(DecodeError::MultipleValues { index });
    }
    let value = if let Some(v) = record.value {
        Some(Value::Number(finite(
            base.value + finite(v, index)?,
            index,
        )?))
    } else if let Some(s) = record.string_value {
        Some(Value::String(s))
    } else if let Some(b) = record.bool_value {
        Some(Value::Bool(b))
    } else {
        record.data_value.map(Value::Data)
    };
    let sum = match record.sum {
        Some(s) => Some(finite(base.sum + finite(s, index)?, index)?),
        None => None,
    };
    match (value, sum) {
        (None, None) => return Err(DecodeError::NoValue { index }),
        (Some(value), None) => out.push(Reading { name, time, value }),
        (None, Some(sum)) => out.push(Reading {
            name,
            time,
            value: Value::Number(sum),
        }),
        (Some(value), Some(sum)) => {
            let mut sum_name = String::with_capacity(name.len() + SUM_SUFFIX.len());
            sum_name.push_str(&name);
            sum_name.push_str(SUM_SUFFIX);
            out.push(Reading { name, time, value });
            out.push(Reading {
                name: sum_name,
                time,
                value: Value::Number(sum),
            });
        }
    }
    Ok(())
}

/// Runs `f`, truncating `out` back to its length at entry when it fails.
fn all_or_nothing(
    out: &mut Vec<Reading>,
    f: impl FnOnce(&mut Vec<Reading>) -> Result<(), DecodeError>,
) -> Result<(), DecodeError> {
    let len_at_entry = out.len();
    let result = f(out);
    if result.is_err() {
        out.truncate(len_at_entry);
    }
    result
}

/// Decodes a SenML JSON pack (Content-Format 110), appending its readings to `out`.
pub fn decode_json(
    payload: &[u8],
    unix_now: f64,
    out: &mut Vec<Reading>,
) -> Result<(), DecodeError> {
    all_or_nothing(out, |out| {
        let pack: serde_json::Value =
            serde_json::from_slice(payload).map_err(|e| DecodeError::Json(e.to_string()))?;
        let serde_json::Value::Array(records) = pack else {
            return Err(DecodeError::NotAnArray);
        };
        let mut base = Base::default();
        for (index, record) in records.into_iter().enumerate() {
            let serde_json::Value::Object(fields) = record else {
                return Err(DecodeError::RecordNotMap { index });
            };
            let mut raw = RawRecord::default();
            for (label, field) in fields {
                json_field(&mut raw, &label, field, index)?;
            }
            resolve(&mut base, raw, index, unix_now, out)?;
        }
        Ok(())
    })
}

fn json_field(
    raw: &mut RawRecord,
    label: &str,
    field: serde_json::Value,
    index: usize,
) -> Result<(), DecodeError> {
    use serde_json::Value as J;
    let wrong_type = || DecodeError::WrongType {
        index,
        label: label.to_string(),
    };
    let number = |field: &J| field.as_f64().ok_or_else(wrong_type);
    match label {
        "bn" | "n" | "vs" | "bu" | "u" | "vd" => {
            let J::String(text) = field else {
                return Err(wrong_type());
            };
            match label {
                "bn" => raw.base_name = Some(text),
                "n" => raw.name = Some(text),
                "vs" => raw.string_value = Some(text),
                "vd" => {
                    let data = BASE64URL
                        .decode(text.as_bytes())
                        .map_err(|_| DecodeError::BadBase64 { index })?;
                    raw.data_value = Some(data);
                }
                _ => {} // units are not stored
            }
        }
        "bt" => raw.base_time = Some(number(&field)?),
        "bv" => raw.base_value = Some(number(&field)?),
        "bs" => raw.base_sum = Some(number(&field)?),
        "bver" => raw.base_version = Some(number(&field)?),
        "v" => raw.value = Some(number(&field)?),
        "s" => raw.sum = Some(number(&field)?),
        "t" => raw.time = Some(number(&field)?),
        "ut" => {
            number(&field)?;
        }
        "vb" => raw.bool_value = Some(field.as_bool().ok_or_else(wrong_type)?),
        _ if label.ends_with('_') => {
            return Err(DecodeError::MandatoryLabel {
                index,
                label: label.to_string(),
            })
        }
        _ => {}
    }
    Ok(())
}

/// CBOR labels of RFC 8428 §6.
mod label {
    pub const BASE_VERSION: i128 = -1;
    pub const BASE_NAME: i128 = -2;
    pub const BASE_TIME: i128 = -3;
    pub const BASE_UNIT: i128 = -4;
    pub const BASE_VALUE: i128 = -5;
    pub const BASE_SUM: i128 = -6;
    pub const NAME: i128 = 0;
    pub const UNIT: i128 = 1;
    pub const VALUE: i128 = 2;
    pub const STRING_VALUE: i128 = 3;
    pub const BOOL_VALUE: i128 = 4;
    pub const SUM: i128 = 5;
    pub const TIME: i128 = 6;
    pub const UPDATE_TIME: i128 = 7;
    pub const DATA_VALUE: i128 = 8;
}

/// Decodes a SenML CBOR pack (Content-Format 112), appending its readings to `out`.
pub fn decode_cbor(
    payload: &[u8],
    unix_now: f64,
    out: &mut Vec<Reading>,
) -> Result<(), DecodeError> {
    all_or_nothing(out, |out| {
        let mut reader = payload;
        let pack: ciborium::Value =
            ciborium::from_reader(&mut reader).map_err(|e| DecodeError::Cbor(cbor_error(&e)))?;
        if !reader.is_empty() {
            return Err(DecodeError::Cbor("trailing bytes after the pack".into()));
        }
        let ciborium::Value::Array(records) = pack else {
            return Err(DecodeError::NotAnArray);
        };
        let mut base = Base::default();
        for (index, record) in records.into_iter().enumerate() {
            let ciborium::Value::Map(fields) = record else {
                return Err(DecodeError::RecordNotMap { index });
            };
            let mut raw = RawRecord::default();
            for (key, field) in fields {
                match key {
                    ciborium::Value::Integer(label) => {
                        cbor_field(&mut raw, i128::from(label), field, index)?
                    }
                    ciborium::Value::Text(label) if label.ends_with('_') => {
                        return Err(DecodeError::MandatoryLabel { index, label })
                    }
                    _ => {}
                }
            }
            resolve(&mut base, raw, index, unix_now, out)?;
        }
        Ok(())
    })
}

fn cbor_error<T: std::fmt::Debug>(error: &ciborium::de::Error<T>) -> String {
    match error {
        ciborium::de::Error::Io(_) => "truncated".into(),
        ciborium::de::Error::Syntax(offset) => format!("syntax error at byte {offset}"),
        ciborium::de::Error::Semantic(_, message) => message.clone(),
        ciborium::de::Error::RecursionLimitExceeded => "nested too deeply".into(),
    }
}

fn cbor_field(
    raw: &mut RawRecord,
    label: i128,
    field: ciborium::Value,
    index: usize,
) -> Result<(), DecodeError> {
    use ciborium::Value as C;
    let wrong_type = || DecodeError::WrongType {
        index,
        label: label.to_string(),
    };
    let number = |field: &C| match field {
        C::Integer(i) => Ok(i128::from(*i) as f64),
        C::Float(f) => Ok(*f),
        _ => Err(wrong_type()),
    };
    let text = |field: C| match field {
        C::Text(text) => Ok(text),
        _ => Err(wrong_type()),
    };
    match label {
        label::BASE_VERSION => raw.base_version = Some(number(&field)?),
        label::BASE_NAME => raw.base_name = Some(text(field)?),
        label::BASE_TIME => raw.base_time = Some(number(&field)?),
        label::BASE_UNIT | label::UNIT => {
            text(field)?;
        }
        label::BASE_VALUE => raw.base_value = Some(number(&field)?),
        label::BASE_SUM => raw.base_sum = Some(number(&field)?),
        label::NAME => raw.name = Some(text(field)?),
        label::VALUE => raw.value = Some(number(&field)?),
        label::STRING_VALUE => raw.string_value = Some(text(field)?),
        label::BOOL_VALUE => match field {
            C::Bool(b) => raw.bool_value = Some(b),
            _ => return Err(wrong_type()),
        },
        label::SUM => raw.sum = Some(number(&field)?),
        label::TIME => raw.time = Some(number(&field)?),
        label::UPDATE_TIME => {
            number(&field)?;
        }
        label::DATA_VALUE => match field {
            C::Bytes(data) => raw.data_value = Some(data),
            _ => return Err(wrong_type()),
        },
        _ => {} // unknown labels are ignored
    }
    Ok(())
}
