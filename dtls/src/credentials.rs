//! The device credentials file (`docs/credentials.md`): the one parser `sluiced` (its key table)
//! and `sluice` (its simulated devices) share, so a file one accepts the other accepts.

use std::collections::HashSet;
use std::sync::Arc;

use serde::Deserialize;
use toml::Spanned;

use crate::Psk;

/// RFC 7925 §4.2: identities should be short; 128 bytes leaves room for any naming scheme.
pub const IDENTITY_BYTES_MAX: usize = 128;
/// 64 bytes (512 bits) is beyond any PSK a device carries and within what every DTLS stack takes.
pub const KEY_BYTES_MAX: usize = 64;
/// Device ids as the wire contract has them (docs/wire.md).
pub const DEVICE_ID_BYTES_MAX: usize = 64;

/// One entry of the file.
pub struct Credential {
    pub psk: Psk,
    pub enabled: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    device: Vec<Entry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    id: Spanned<String>,
    identity: Option<String>,
    key: Option<String>,
    key_hex: Option<String>,
    enabled: Option<bool>,
}

/// Every entry of the file's text, in file order; any bad entry refuses the file. Errors read
/// `" line N: what"`, to follow the file's name.
pub fn parse(text: &str) -> Result<Vec<Credential>, String> {
    let line = |offset: usize| text[..offset.min(text.len())].matches('\n').count() + 1;
    let file: File = toml::from_str(text).map_err(|error| match error.span() {
        Some(span) => format!(" line {}: {}", line(span.start), error.message()),
        None => format!(": {}", error.message()),
    })?;
    let mut credentials = Vec::with_capacity(file.device.len());
    let mut identities = HashSet::new();
    for entry in file.device {
        let at = line(entry.id.span().start);
        let id = entry.id.into_inner();
        let fail = |what: &str| format!(" line {at}: device \"{id}\": {what}");
        if id.is_empty()
            || id.len() > DEVICE_ID_BYTES_MAX
            || !id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b))
        {
            return Err(fail(&format!(
                "`id` must be 1 to {DEVICE_ID_BYTES_MAX} bytes of A-Z a-z 0-9 . _ : -"
            )));
        }
        let identity = entry.identity.unwrap_or_else(|| id.clone());
        if identity.is_empty() || identity.len() > IDENTITY_BYTES_MAX {
            return Err(fail(&format!(
                "`identity` must be 1 to {IDENTITY_BYTES_MAX} bytes"
            )));
        }
        let key = match (entry.key, entry.key_hex) {
            (Some(key), None) => key.into_bytes(),
            (None, Some(hex)) => decode_hex(&hex)
                .ok_or_else(|| fail("`key_hex` must be an even number of hex digits"))?,
            (Some(_), Some(_)) => return Err(fail("give `key` or `key_hex`, not both")),
            (None, None) => return Err(fail("give `key` or `key_hex`")),
        };
        if key.is_empty() || key.len() > KEY_BYTES_MAX {
            return Err(fail(&format!("the key must be 1 to {KEY_BYTES_MAX} bytes")));
        }
        if !identities.insert(identity.clone()) {
            return Err(fail("another entry has the same `identity`"));
        }
        credentials.push(Credential {
            psk: Psk {
                identity: identity.into_bytes().into(),
                device: Arc::from(id.as_str()),
                key: key.into(),
            },
            enabled: entry.enabled != Some(false),
        });
    }
    Ok(credentials)
}

fn decode_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) || !text.is_ascii() {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).ok())
        .collect()
}
