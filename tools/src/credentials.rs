//! The device side of a credentials file (format in `docs/credentials.md`): `sluice load --dtls`
//! reads the enabled entries in file order, one per simulated device; `--gen-credentials` writes
//! a file of random keys. The rules are the ones `sluiced` enforces, so a file load accepts is a
//! file the daemon accepts.

use std::io::Write as _;
use std::path::Path;

use anyhow::{bail, Context};
use rand::RngCore;

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

/// The enabled entries of the file at `path`, in file order. Any bad entry refuses the file,
/// with its line.
pub fn read(path: &Path) -> anyhow::Result<Vec<Entry>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("--credentials: cannot read {}", path.display()))?;
    parse(&text).map_err(|error| anyhow::anyhow!("--credentials: {}{error}", path.display()))
}

/// The enabled entries of the file's text (the parser `sluiced` uses too). Errors read
/// `" line N: what"`, to follow the file name.
fn parse(text: &str) -> Result<Vec<Entry>, String> {
    Ok(sluice_dtls::credentials::parse(text)?
        .into_iter()
        .filter(|credential| credential.enabled)
        .map(|credential| Entry {
            id: credential.psk.device.to_string(),
            identity: String::from_utf8_lossy(&credential.psk.identity).into_owned(),
            key: credential.psk.key.into_vec(),
        })
        .collect())
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
        bail!("--device-prefix: `{prefix}` does not make a valid device id (1 to {} bytes of A-Z a-z 0-9 . _ : -)", sluice_dtls::credentials::DEVICE_ID_BYTES_MAX);
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
