//! The device side of a credentials file (format in `docs/credentials.md`): `sluice load --dtls`
//! reads the enabled entries in file order, one per simulated device; `--gen-credentials` writes
//! a file of random keys. The rules are the ones `sluiced` enforces, so a file load accepts is a
//! file the daemon accepts.

use std::io::Write as _;
use std::path::Path;

use anyhow::{bail, Context};
use rand::RngCore;
use serde::Deserialize;
use toml::Spanned;

/// Bounds of `docs/credentials.md` (the daemon's `credentials.rs` holds the same).
const DEVICE_ID_BYTES_MAX: usize = 64;
const IDENTITY_BYTES_MAX: usize = 128;
const KEY_BYTES_MAX: usize = 64;
/// Keys `--gen-credentials` writes: 128 bits, the AES key size of every suite sluice offers.
const GENERATED_KEY_BYTES: usize = 16;
/// Entries `--gen-credentials` writes at most: the fleet bound of `sluice load` is far below.
pub const GENERATED_ENTRIES_MAX: usize = 1_000_000;

/// One enabled device of the file.
pub struct Entry {
    /// The device id its readings are stored under (the `{device}` of `--path`).
    pub id: String,
    pub identity: String,
    pub key: Vec<u8>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    device: Vec<RawEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEntry {
    id: Spanned<String>,
    identity: Option<String>,
    key: Option<String>,
    key_hex: Option<String>,
    enabled: Option<bool>,
}

/// The enabled entries of the file at `path`, in file order. Any bad entry refuses the file,
/// with its line.
pub fn read(path: &Path) -> anyhow::Result<Vec<Entry>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("--credentials: cannot read {}", path.display()))?;
    parse(&text).map_err(|error| anyhow::anyhow!("--credentials: {}{error}", path.display()))
}

/// Parses the file's text. Errors read `" line N: what"`, to follow the file name.
fn parse(text: &str) -> Result<Vec<Entry>, String> {
    let line = |offset: usize| text[..offset.min(text.len())].matches('\n').count() + 1;
    let file: File = toml::from_str(text).map_err(|error| match error.span() {
        Some(span) => format!(" line {}: {}", line(span.start), error.message()),
        None => format!(": {}", error.message()),
    })?;
    let mut entries = Vec::new();
    let mut identities = std::collections::HashSet::new();
    for raw in file.device {
        let at = line(raw.id.span().start);
        let id = raw.id.into_inner();
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
        let identity = raw.identity.unwrap_or_else(|| id.clone());
        if identity.is_empty() || identity.len() > IDENTITY_BYTES_MAX {
            return Err(fail(&format!(
                "`identity` must be 1 to {IDENTITY_BYTES_MAX} bytes"
            )));
        }
        let key = match (raw.key, raw.key_hex) {
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
        if raw.enabled != Some(false) {
            entries.push(Entry { id, identity, key });
        }
    }
    Ok(entries)
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

/// Writes a credentials file of `count` devices named `{prefix}{index:04}` (the names `sluice
/// load` gives its devices), each with a random 128-bit `key_hex`, on stdout. When stdout is a
/// regular file (`> FILE`), it is made mode 0600 before any key is written: it holds secrets.
pub fn generate(count: usize, prefix: &str) -> anyhow::Result<()> {
    if count == 0 || count > GENERATED_ENTRIES_MAX {
        bail!("--gen-credentials: between 1 and {GENERATED_ENTRIES_MAX} devices");
    }
    let first = format!("{prefix}0000");
    if parse(&entry_text(&first, &[0; GENERATED_KEY_BYTES])).is_err() {
        bail!("--device-prefix: `{prefix}` does not make a valid device id (1 to {DEVICE_ID_BYTES_MAX} bytes of A-Z a-z 0-9 . _ : -)");
    }
    restrict_stdout_file()?;
    let mut rng = rand::rng();
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    writeln!(
        out,
        "# {count} devices for `sluice load --dtls --credentials FILE` and `sluiced --credentials FILE`"
    )?;
    let mut key = [0u8; GENERATED_KEY_BYTES];
    for index in 0..count {
        rng.fill_bytes(&mut key);
        write!(
            out,
            "\n{}",
            entry_text(&format!("{prefix}{index:04}"), &key)
        )?;
    }
    out.flush().context("cannot write the credentials")?;
    Ok(())
}

fn entry_text(id: &str, key: &[u8]) -> String {
    let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
    format!("[[device]]\nid = \"{id}\"\nkey_hex = \"{hex}\"\n")
}

/// Makes stdout mode 0600 when it is a regular file; leaves pipes and terminals alone.
fn restrict_stdout_file() -> anyhow::Result<()> {
    // SAFETY: fstat and fchmod on descriptor 1 with a zeroed stat buffer of the right type.
    unsafe {
        let mut stat: libc::stat = std::mem::zeroed();
        if libc::fstat(1, &mut stat) == 0
            && stat.st_mode & libc::S_IFMT == libc::S_IFREG
            && libc::fchmod(1, 0o600) != 0
        {
            return Err(std::io::Error::last_os_error())
                .context("--gen-credentials: cannot make the output file mode 0600");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_come_in_file_order_without_disabled_ones() {
        let text = r#"
[[device]]
id = "b"
key = "two"

[[device]]
id = "off"
key = "x"
enabled = false

[[device]]
id = "a"
identity = "id-a"
key_hex = "0A0b"
"#;
        let entries = parse(text).unwrap();
        let seen: Vec<_> = entries
            .iter()
            .map(|e| (e.id.as_str(), e.identity.as_str(), e.key.clone()))
            .collect();
        assert_eq!(
            seen,
            [("b", "b", b"two".to_vec()), ("a", "id-a", vec![0x0a, 0x0b])]
        );
    }

    #[test]
    fn a_bad_key_names_its_line() {
        let text =
            "[[device]]\nid = \"a\"\nkey = \"k\"\n\n[[device]]\nid = \"b\"\nkey_hex = \"0g\"\n";
        assert_eq!(
            parse(text).err().unwrap(),
            " line 6: device \"b\": `key_hex` must be an even number of hex digits"
        );
    }

    #[test]
    fn generated_entries_parse() {
        let text = entry_text("load-0000", &[0xab; GENERATED_KEY_BYTES]);
        let entries = parse(&text).unwrap();
        assert_eq!(entries[0].key, vec![0xab; GENERATED_KEY_BYTES]);
    }
}
