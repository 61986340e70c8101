//! SenML decoders (RFC 8428): JSON (Content-Format 110) and CBOR (Content-Format 112).
//!
//! Both representations are parsed into the same raw record, then resolved with the same rules:
//! base fields persist across records, name = bn + n, time = bt + t (relative to `unix_now` when
//! below 2^28), value = bv + v, sum = bs + s. A record with a value and a sum yields two readings,
//! the sum under `<name>:sum`. Decoding is all-or-nothing.
//!
//! Both decoders stream: names and strings are borrowed from the payload (JSON strings with
//! escapes excepted) and readings are written into the caller's reused [`Readings`], so a pack
//! decodes without allocating once the buffers have grown. Error precedence is that of a
//! decoder which parses the whole document first: a syntax error anywhere wins over a semantic
//! error, and within a JSON record the labels are checked in byte order (the last of duplicate
//! labels counts).

use std::borrow::Cow;

use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::Engine as _;
use serde::de::{self, DeserializeSeed, Deserializer as _, MapAccess, SeqAccess};

use crate::{check_name, resolve_time, DecodeError, Readings, ValueRef};

/// Highest SenML version understood (RFC 8428 defines version 10).
const SENML_VERSION_MAX: f64 = 10.0;

/// Suffix of the series that holds the sum of a record that also carries a value.
pub const SUM_SUFFIX: &str = ":sum";

/// base64url without padding (RFC 8428 §5), tolerating padding from lenient encoders.
const BASE64URL: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::URL_SAFE,
    GeneralPurposeConfig::new()
        .with_encode_padding(false)
        .with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Where a record's data value (`vd`, CBOR label 8) is.
#[derive(Clone, Copy)]
enum Data<'a> {
    Borrowed(&'a [u8]),
    /// In `Readings::data_scratch` (decoded base64, or concatenated CBOR chunks).
    Scratch,
}

/// One record as it appears on the wire, before base-value resolution.
#[derive(Default)]
struct RawRecord<'a> {
    base_name: Option<Cow<'a, str>>,
    base_time: Option<f64>,
    base_value: Option<f64>,
    base_sum: Option<f64>,
    base_version: Option<f64>,
    name: Option<Cow<'a, str>>,
    value: Option<f64>,
    string_value: Option<Cow<'a, str>>,
    bool_value: Option<bool>,
    data_value: Option<Data<'a>>,
    sum: Option<f64>,
    time: Option<f64>,
}

/// Base fields in force for the current record (RFC 8428 §4.6).
#[derive(Default)]
struct Base<'a> {
    name: Cow<'a, str>,
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

fn resolve<'a>(
    base: &mut Base<'a>,
    record: RawRecord<'a>,
    index: usize,
    unix_now: f64,
    out: &mut Readings,
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

    let name = record.name.as_deref().unwrap_or("");
    check_name(base.name.len() + name.len(), index)?;

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
    let number = match record.value {
        Some(v) => Some(finite(base.value + finite(v, index)?, index)?),
        None => None,
    };
    let sum = match record.sum {
        Some(s) => Some(finite(base.sum + finite(s, index)?, index)?),
        None => None,
    };
    // The scratch is taken out for the push (no allocation: an empty Vec is left behind).
    let scratch = std::mem::take(&mut out.data_scratch);
    let value = if let Some(v) = number {
        Some(ValueRef::Number(v))
    } else if let Some(s) = &record.string_value {
        Some(ValueRef::String(s))
    } else if let Some(b) = record.bool_value {
        Some(ValueRef::Bool(b))
    } else {
        record.data_value.map(|data| match data {
            Data::Borrowed(bytes) => ValueRef::Data(bytes),
            Data::Scratch => ValueRef::Data(&scratch),
        })
    };
    let parts = [&*base.name, name];
    let result = match (value, sum) {
        (None, None) => Err(DecodeError::NoValue { index }),
        (Some(value), None) => {
            out.push_parts(&parts, time, value);
            Ok(())
        }
        (None, Some(sum)) => {
            out.push_parts(&parts, time, ValueRef::Number(sum));
            Ok(())
        }
        (Some(value), Some(sum)) => {
            out.push_parts(&parts, time, value);
            out.push_parts(
                &[&*base.name, name, SUM_SUFFIX],
                time,
                ValueRef::Number(sum),
            );
            Ok(())
        }
    };
    out.data_scratch = scratch;
    result
}

/// Runs `f`, truncating `out` back to its length at entry when it fails.
fn all_or_nothing(
    out: &mut Readings,
    f: impl FnOnce(&mut Readings) -> Result<(), DecodeError>,
) -> Result<(), DecodeError> {
    let len_at_entry = out.len();
    let result = f(out);
    if result.is_err() {
        out.truncate(len_at_entry);
    }
    result
}

// ---------------------------------------------------------------------------------------------
// JSON

/// The JSON labels in byte order: the order in which a record's fields are checked.
const JSON_LABELS: [&str; 15] = [
    "bn", "bs", "bt", "bu", "bv", "bver", "n", "s", "t", "u", "ut", "v", "vb", "vd", "vs",
];

/// A JSON field value as far as SenML cares.
enum JsonField<'a> {
    Text(Cow<'a, str>),
    Number(f64),
    Bool(bool),
    Other,
}

/// A record's fields: the last value of each known label, and the lowest must-understand
/// (`_`-suffixed) label.
#[derive(Default)]
struct JsonRecord<'a> {
    fields: [Option<JsonField<'a>>; JSON_LABELS.len()],
    mandatory: Option<Cow<'a, str>>,
}

/// Decodes a SenML JSON pack (Content-Format 110), appending its readings to `out`.
pub fn decode_json(payload: &[u8], unix_now: f64, out: &mut Readings) -> Result<(), DecodeError> {
    all_or_nothing(out, |out| {
        let mut semantic = None;
        let mut deserializer = serde_json::Deserializer::from_slice(payload);
        let parsed = deserializer
            .deserialize_any(PackVisitor {
                out,
                unix_now,
                error: &mut semantic,
            })
            .and_then(|()| deserializer.end());
        match (parsed, semantic) {
            (Err(syntax), _) => Err(DecodeError::Json(syntax.to_string())),
            (Ok(()), Some(error)) => Err(error),
            (Ok(()), None) => Ok(()),
        }
    })
}

/// Visits the pack; a semantic error is kept in `error` and the rest of the document is only
/// checked for syntax.
struct PackVisitor<'o> {
    out: &'o mut Readings,
    unix_now: f64,
    error: &'o mut Option<DecodeError>,
}

impl<'de> de::Visitor<'de> for PackVisitor<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a SenML pack")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let mut base = Base::default();
        let mut record = JsonRecord::default();
        let mut index = 0;
        loop {
            if self.error.is_some() {
                if seq.next_element::<Checked>()?.is_none() {
                    return Ok(());
                }
                continue;
            }
            record.fields.iter_mut().for_each(|field| *field = None);
            record.mandatory = None;
            let Some(is_map) = seq.next_element_seed(RecordSeed(&mut record))? else {
                return Ok(());
            };
            let result = if is_map {
                json_record(&mut record, index, self.out)
                    .and_then(|raw| resolve(&mut base, raw, index, self.unix_now, self.out))
            } else {
                Err(DecodeError::RecordNotMap { index })
            };
            if let Err(error) = result {
                *self.error = Some(error);
            }
            index += 1;
        }
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<(), A::Error> {
        *self.error = Some(DecodeError::NotAnArray);
        drain_map(map)
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        self.not_an_array()
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        self.not_an_array()
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        self.not_an_array()
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        self.not_an_array()
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        self.not_an_array()
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.not_an_array()
    }
}

impl PackVisitor<'_> {
    fn not_an_array<E>(self) -> Result<(), E> {
        *self.error = Some(DecodeError::NotAnArray);
        Ok(())
    }
}

/// Any JSON value, parsed as fully as `serde_json::Value` would be (numbers in range, strings
/// valid) but not kept; serde's IgnoredAny skips numbers and strings without those checks.
struct Checked;

impl<'de> de::Deserialize<'de> for Checked {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Checked, D::Error> {
        deserializer.deserialize_any(CheckedVisitor)
    }
}

struct CheckedVisitor;

impl<'de> de::Visitor<'de> for CheckedVisitor {
    type Value = Checked;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Checked, E> {
        Ok(Checked)
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Checked, E> {
        Ok(Checked)
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Checked, E> {
        Ok(Checked)
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Checked, E> {
        Ok(Checked)
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<Checked, E> {
        Ok(Checked)
    }
    fn visit_unit<E: de::Error>(self) -> Result<Checked, E> {
        Ok(Checked)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Checked, A::Error> {
        drain_seq(seq).map(|()| Checked)
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Checked, A::Error> {
        drain_map(map).map(|()| Checked)
    }
}

fn drain_map<'de, A: MapAccess<'de>>(mut map: A) -> Result<(), A::Error> {
    while map.next_entry::<Checked, Checked>()?.is_some() {}
    Ok(())
}

fn drain_seq<'de, A: SeqAccess<'de>>(mut seq: A) -> Result<(), A::Error> {
    while seq.next_element::<Checked>()?.is_some() {}
    Ok(())
}

/// One record, read into the given fields: true for a map, false for anything else (consumed).
struct RecordSeed<'r, 'de>(&'r mut JsonRecord<'de>);

impl<'de> DeserializeSeed<'de> for RecordSeed<'_, 'de> {
    type Value = bool;

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<bool, D::Error> {
        deserializer.deserialize_any(RecordVisitor(self.0))
    }
}

struct RecordVisitor<'r, 'de>(&'r mut JsonRecord<'de>);

impl<'de> de::Visitor<'de> for RecordVisitor<'_, 'de> {
    type Value = bool;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a SenML record")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let record = self.0;
        while let Some(label) = map.next_key_seed(TextSeed)? {
            match JSON_LABELS.binary_search(&&*label) {
                Ok(position) => record.fields[position] = Some(map.next_value_seed(FieldSeed)?),
                Err(_) => {
                    map.next_value::<Checked>()?;
                    if label.ends_with('_')
                        && record
                            .mandatory
                            .as_ref()
                            .is_none_or(|lowest| label < *lowest)
                    {
                        record.mandatory = Some(label);
                    }
                }
            }
        }
        Ok(true)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        drain_seq(seq).map(|()| false)
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Ok(false)
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
        Ok(false)
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
        Ok(false)
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
        Ok(false)
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
        Ok(false)
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(false)
    }
}

/// A string, borrowed when it has no escapes.
struct TextSeed;

impl<'de> DeserializeSeed<'de> for TextSeed {
    type Value = Cow<'de, str>;

    fn deserialize<D: de::Deserializer<'de>>(
        self,
        deserializer: D,
    ) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_str(TextVisitor)
    }
}

struct TextVisitor;

impl<'de> de::Visitor<'de> for TextVisitor {
    type Value = Cow<'de, str>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a string")
    }
    fn visit_borrowed_str<E: de::Error>(self, text: &'de str) -> Result<Self::Value, E> {
        Ok(Cow::Borrowed(text))
    }
    fn visit_str<E: de::Error>(self, text: &str) -> Result<Self::Value, E> {
        Ok(Cow::Owned(text.to_owned()))
    }
    fn visit_string<E: de::Error>(self, text: String) -> Result<Self::Value, E> {
        Ok(Cow::Owned(text))
    }
}

struct FieldSeed;

impl<'de> DeserializeSeed<'de> for FieldSeed {
    type Value = JsonField<'de>;

    fn deserialize<D: de::Deserializer<'de>>(
        self,
        deserializer: D,
    ) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(FieldVisitor)
    }
}

struct FieldVisitor;

impl<'de> de::Visitor<'de> for FieldVisitor {
    type Value = JsonField<'de>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a SenML field value")
    }
    fn visit_borrowed_str<E: de::Error>(self, text: &'de str) -> Result<Self::Value, E> {
        Ok(JsonField::Text(Cow::Borrowed(text)))
    }
    fn visit_str<E: de::Error>(self, text: &str) -> Result<Self::Value, E> {
        Ok(JsonField::Text(Cow::Owned(text.to_owned())))
    }
    fn visit_string<E: de::Error>(self, text: String) -> Result<Self::Value, E> {
        Ok(JsonField::Text(Cow::Owned(text)))
    }
    fn visit_f64<E: de::Error>(self, x: f64) -> Result<Self::Value, E> {
        Ok(JsonField::Number(x))
    }
    fn visit_i64<E: de::Error>(self, x: i64) -> Result<Self::Value, E> {
        Ok(JsonField::Number(x as f64))
    }
    fn visit_u64<E: de::Error>(self, x: u64) -> Result<Self::Value, E> {
        Ok(JsonField::Number(x as f64))
    }
    fn visit_bool<E: de::Error>(self, b: bool) -> Result<Self::Value, E> {
        Ok(JsonField::Bool(b))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(JsonField::Other)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        drain_seq(seq).map(|()| JsonField::Other)
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        drain_map(map).map(|()| JsonField::Other)
    }
}

/// Checks a JSON record's fields in label order and builds its raw record.
fn json_record<'a>(
    record: &mut JsonRecord<'a>,
    index: usize,
    out: &mut Readings,
) -> Result<RawRecord<'a>, DecodeError> {
    let mut raw = RawRecord::default();
    let mut mandatory = record.mandatory.take();
    for (position, field) in record.fields.iter_mut().enumerate() {
        let field = field.take();
        let label = JSON_LABELS[position];
        if let Some(lowest) = mandatory.take() {
            if *lowest < *label {
                return Err(DecodeError::MandatoryLabel {
                    index,
                    label: lowest.into_owned(),
                });
            }
            mandatory = Some(lowest);
        }
        let Some(field) = field else { continue };
        let wrong_type = || DecodeError::WrongType {
            index,
            label: label.to_string(),
        };
        let number = |field: &JsonField| match field {
            JsonField::Number(x) => Ok(*x),
            _ => Err(wrong_type()),
        };
        match label {
            "bn" | "n" | "vs" | "bu" | "u" | "vd" => {
                let JsonField::Text(text) = field else {
                    return Err(wrong_type());
                };
                match label {
                    "bn" => raw.base_name = Some(text),
                    "n" => raw.name = Some(text),
                    "vs" => raw.string_value = Some(text),
                    "vd" => {
                        out.data_scratch.clear();
                        BASE64URL
                            .decode_vec(text.as_bytes(), &mut out.data_scratch)
                            .map_err(|_| DecodeError::BadBase64 { index })?;
                        raw.data_value = Some(Data::Scratch);
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
            "vb" => match field {
                JsonField::Bool(b) => raw.bool_value = Some(b),
                _ => return Err(wrong_type()),
            },
            _ => {}
        }
    }
    if let Some(label) = mandatory {
        return Err(DecodeError::MandatoryLabel {
            index,
            label: label.into_owned(),
        });
    }
    Ok(raw)
}

// ---------------------------------------------------------------------------------------------
// CBOR

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

/// Deepest nesting of arrays, maps and tags (ciborium's limit, which this decoder replaced).
const CBOR_DEPTH_MAX: usize = 256;

/// Decodes a SenML CBOR pack (Content-Format 112), appending its readings to `out`.
pub fn decode_cbor(payload: &[u8], unix_now: f64, out: &mut Readings) -> Result<(), DecodeError> {
    all_or_nothing(out, |out| {
        // Well-formedness of the whole payload first: a syntax error wins over semantics.
        let mut reader = Cbor::new(payload);
        reader.skip(CBOR_DEPTH_MAX)?;
        if reader.at != payload.len() {
            return Err(DecodeError::Cbor("trailing bytes after the pack".into()));
        }
        let mut reader = Cbor::new(payload);
        let records = match reader.head()? {
            Head::Array(len) => len,
            _ => return Err(DecodeError::NotAnArray),
        };
        let mut base = Base::default();
        let mut index = 0usize;
        while reader.more(records, index as u64)? {
            let fields = match reader.head()? {
                Head::Map(len) => len,
                _ => return Err(DecodeError::RecordNotMap { index }),
            };
            let mut raw = RawRecord::default();
            let mut field = 0;
            while reader.more(fields, field)? {
                field += 1;
                match reader.item(out)? {
                    Item::Integer(label) => {
                        let value = reader.item(out)?;
                        cbor_field(&mut raw, label, value, index)?;
                    }
                    Item::Text(label) if label.ends_with('_') => {
                        return Err(DecodeError::MandatoryLabel {
                            index,
                            label: label.into_owned(),
                        })
                    }
                    _ => reader.skip(CBOR_DEPTH_MAX)?,
                }
            }
            resolve(&mut base, raw, index, unix_now, out)?;
            index += 1;
        }
        Ok(())
    })
}

fn cbor_field<'a>(
    raw: &mut RawRecord<'a>,
    label: i128,
    field: Item<'a>,
    index: usize,
) -> Result<(), DecodeError> {
    let wrong_type = || DecodeError::WrongType {
        index,
        label: label.to_string(),
    };
    let number = |field: &Item| match field {
        Item::Integer(i) => Ok(*i as f64),
        Item::Float(f) => Ok(*f),
        _ => Err(wrong_type()),
    };
    let text = |field: Item<'a>| match field {
        Item::Text(text) => Ok(text),
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
            Item::Bool(b) => raw.bool_value = Some(b),
            _ => return Err(wrong_type()),
        },
        label::SUM => raw.sum = Some(number(&field)?),
        label::TIME => raw.time = Some(number(&field)?),
        label::UPDATE_TIME => {
            number(&field)?;
        }
        label::DATA_VALUE => match field {
            Item::Bytes(data) => raw.data_value = Some(data),
            _ => return Err(wrong_type()),
        },
        _ => {} // unknown labels are ignored
    }
    Ok(())
}

/// A CBOR data item head (RFC 8949 §3): major type and argument.
#[derive(Clone, Copy, Debug)]
enum Head {
    Unsigned(u64),
    Negative(u64),
    /// Byte string of this length, or indefinite (None).
    Bytes(Option<u64>),
    Text(Option<u64>),
    Array(Option<u64>),
    Map(Option<u64>),
    Tag(u64),
    Float(f64),
    Simple(u8),
    Break,
}

/// A complete data item as a SenML field sees it.
enum Item<'a> {
    Integer(i128),
    Float(f64),
    Bool(bool),
    Text(Cow<'a, str>),
    Bytes(Data<'a>),
    /// Null, undefined, an array, a map, or a tagged item (consumed).
    Other,
}

const SIMPLE_FALSE: u8 = 20;
const SIMPLE_TRUE: u8 = 21;
const SIMPLE_UNDEFINED: u8 = 23;
const TAG_BIGNUM_POSITIVE: u64 = 2;
const TAG_BIGNUM_NEGATIVE: u64 = 3;
/// Longest bignum read as an integer (ciborium's rule); longer ones stay tagged items.
const BIGNUM_BYTES_MAX: u64 = 16;

struct Cbor<'a> {
    bytes: &'a [u8],
    at: usize,
}

fn truncated() -> DecodeError {
    DecodeError::Cbor("truncated".into())
}

impl<'a> Cbor<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Cbor { bytes, at: 0 }
    }

    fn take(&mut self, len: u64) -> Result<&'a [u8], DecodeError> {
        let len = usize::try_from(len).map_err(|_| truncated())?;
        let end = self.at.checked_add(len).ok_or_else(truncated)?;
        let bytes = self.bytes.get(self.at..end).ok_or_else(truncated)?;
        self.at = end;
        Ok(bytes)
    }

    fn head(&mut self) -> Result<Head, DecodeError> {
        let offset = self.at;
        let initial = self.take(1)?[0];
        let major = initial >> 5;
        let minor = initial & 0x1f;
        let syntax = || DecodeError::Cbor(format!("syntax error at byte {offset}"));
        let argument = match minor {
            0..=23 => Some(u64::from(minor)),
            24 => Some(u64::from(self.take(1)?[0])),
            25 => Some(u64::from(u16::from_be_bytes([
                self.take(1)?[0],
                self.take(1)?[0],
            ]))),
            26 => {
                let b = self.take(4)?;
                Some(u64::from(u32::from_be_bytes([b[0], b[1], b[2], b[3]])))
            }
            27 => {
                let b = self.take(8)?;
                Some(u64::from_be_bytes([
                    b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7],
                ]))
            }
            28..=30 => return Err(syntax()),
            _ => None,
        };
        Ok(match (major, argument) {
            (0, Some(n)) => Head::Unsigned(n),
            (1, Some(n)) => Head::Negative(n),
            (2, len) => Head::Bytes(len),
            (3, len) => Head::Text(len),
            (4, len) => Head::Array(len),
            (5, len) => Head::Map(len),
            (6, Some(tag)) => Head::Tag(tag),
            (7, None) => Head::Break,
            (7, Some(n)) => match minor {
                25 => Head::Float(half_to_f64(n as u16)),
                26 => Head::Float(f64::from(f32::from_bits(n as u32))),
                27 => Head::Float(f64::from_bits(n)),
                _ => Head::Simple(n as u8),
            },
            _ => return Err(syntax()),
        })
    }

    /// Whether a container of `len` items (None: indefinite) has another after `done` items;
    /// consumes the break of an indefinite one.
    fn more(&mut self, len: Option<u64>, done: u64) -> Result<bool, DecodeError> {
        match len {
            Some(len) => Ok(done < len),
            None => {
                if self.bytes.get(self.at) == Some(&0xff) {
                    self.at += 1;
                    Ok(false)
                } else {
                    Ok(true)
                }
            }
        }
    }

    /// The chunks of an indefinite-length string, each a definite string of the same major type.
    fn chunks(
        &mut self,
        text: bool,
        mut chunk: impl FnMut(&'a [u8]) -> Result<(), DecodeError>,
    ) -> Result<(), DecodeError> {
        loop {
            let offset = self.at;
            match self.head()? {
                Head::Break => return Ok(()),
                Head::Bytes(Some(len)) if !text => chunk(self.take(len)?)?,
                Head::Text(Some(len)) if text => chunk(self.take(len)?)?,
                _ => return Err(DecodeError::Cbor(format!("syntax error at byte {offset}"))),
            }
        }
    }

    /// Skips one well-formed item, checking text is UTF-8, simple values are known, and the
    /// nesting is at most `depth` deep.
    fn skip(&mut self, depth: usize) -> Result<(), DecodeError> {
        let offset = self.at;
        match self.head()? {
            Head::Unsigned(_) | Head::Negative(_) | Head::Float(_) => {}
            Head::Simple(SIMPLE_FALSE..=SIMPLE_UNDEFINED) => {}
            Head::Simple(_) => {
                return Err(DecodeError::Cbor(format!(
                    "unknown simple value at byte {offset}"
                )))
            }
            Head::Bytes(Some(len)) => {
                self.take(len)?;
            }
            Head::Bytes(None) => self.chunks(false, |_| Ok(()))?,
            Head::Text(Some(len)) => {
                utf8(self.take(len)?)?;
            }
            Head::Text(None) => self.chunks(true, |chunk| utf8(chunk).map(drop))?,
            head @ (Head::Array(len) | Head::Map(len)) => {
                let depth = nested(depth)?;
                let per_entry = if matches!(head, Head::Map(_)) { 2 } else { 1 };
                let mut done = 0;
                while self.more(len, done)? {
                    for _ in 0..per_entry {
                        self.skip(depth)?;
                    }
                    done += 1;
                }
            }
            Head::Tag(tag) => {
                if self.bignum(tag)?.is_none() {
                    self.skip(nested(depth)?)?;
                }
            }
            Head::Break => return Err(DecodeError::Cbor(format!("syntax error at byte {offset}"))),
        }
        Ok(())
    }

    /// After a bignum tag (2 or 3) with a definite byte string of at most 16 bytes: consumes it
    /// and returns Some(the integer, or None when out of CBOR's integer range). None otherwise,
    /// with nothing consumed.
    #[allow(clippy::option_option)]
    fn bignum(&mut self, tag: u64) -> Result<Option<Option<i128>>, DecodeError> {
        if tag != TAG_BIGNUM_POSITIVE && tag != TAG_BIGNUM_NEGATIVE {
            return Ok(None);
        }
        let at = self.at;
        let len = match self.head() {
            Ok(Head::Bytes(Some(len))) if len <= BIGNUM_BYTES_MAX => len,
            _ => {
                self.at = at;
                return Ok(None);
            }
        };
        let raw = self
            .take(len)?
            .iter()
            .fold(0u128, |acc, b| (acc << 8) | u128::from(*b));
        let value = if tag == TAG_BIGNUM_POSITIVE {
            i128::try_from(raw).ok()
        } else {
            let raw =
                i128::try_from(raw).map_err(|_| DecodeError::Cbor("integer too large".into()))?;
            Some(-1 - raw)
        };
        // CBOR's own integer range: -2^64 ..= 2^64 - 1.
        let range = -(1i128 << 64)..=i128::from(u64::MAX);
        Ok(Some(value.filter(|v| range.contains(v))))
    }

    /// One complete item (the payload is well-formed: `skip` checked it).
    fn item(&mut self, out: &mut Readings) -> Result<Item<'a>, DecodeError> {
        let at = self.at;
        Ok(match self.head()? {
            Head::Unsigned(n) => Item::Integer(i128::from(n)),
            Head::Negative(n) => Item::Integer(-1 - i128::from(n)),
            Head::Float(x) => Item::Float(x),
            Head::Simple(SIMPLE_FALSE) => Item::Bool(false),
            Head::Simple(SIMPLE_TRUE) => Item::Bool(true),
            Head::Simple(_) => Item::Other,
            Head::Bytes(Some(len)) => Item::Bytes(Data::Borrowed(self.take(len)?)),
            Head::Bytes(None) => {
                out.data_scratch.clear();
                let scratch = &mut out.data_scratch;
                self.chunks(false, |chunk| {
                    scratch.extend_from_slice(chunk);
                    Ok(())
                })?;
                Item::Bytes(Data::Scratch)
            }
            Head::Text(Some(len)) => Item::Text(Cow::Borrowed(utf8(self.take(len)?)?)),
            Head::Text(None) => {
                let mut text = String::new();
                self.chunks(true, |chunk| {
                    text.push_str(utf8(chunk)?);
                    Ok(())
                })?;
                Item::Text(Cow::Owned(text))
            }
            Head::Tag(tag) => match self.bignum(tag)? {
                Some(Some(value)) => Item::Integer(value),
                Some(None) => Item::Other,
                None => {
                    self.skip(CBOR_DEPTH_MAX)?;
                    Item::Other
                }
            },
            Head::Array(_) | Head::Map(_) | Head::Break => {
                self.at = at;
                self.skip(CBOR_DEPTH_MAX)?;
                Item::Other
            }
        })
    }
}

fn nested(depth: usize) -> Result<usize, DecodeError> {
    depth
        .checked_sub(1)
        .ok_or_else(|| DecodeError::Cbor("nested too deeply".into()))
}

fn utf8(bytes: &[u8]) -> Result<&str, DecodeError> {
    std::str::from_utf8(bytes)
        .map_err(|_| DecodeError::Cbor("invalid UTF-8 in a text string".into()))
}

/// An IEEE 754 half-precision float as f64.
fn half_to_f64(bits: u16) -> f64 {
    let sign = if bits & 0x8000 != 0 { -1.0 } else { 1.0 };
    let exponent = i32::from((bits >> 10) & 0x1f);
    let fraction = f64::from(bits & 0x3ff);
    sign * match exponent {
        0 => fraction * 2f64.powi(-24),
        31 if fraction == 0.0 => f64::INFINITY,
        31 => f64::NAN,
        _ => (1.0 + fraction / 1024.0) * 2f64.powi(exponent - 15),
    }
}
