//! The device credentials file (`--credentials`, format in `docs/credentials.md`): parsed and
//! checked whole, then shared with the shards, which pick up a reloaded set between batches.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use sluice_dtls::{Psk, PskLookup};

/// The enabled devices' keys, by identity.
#[derive(Default)]
pub struct Credentials {
    by_identity: HashMap<Box<[u8]>, Arc<Psk>>,
    /// Entries with `enabled = false`.
    pub disabled: usize,
}

/// Counts only: keys never reach a log line.
impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("enabled", &self.by_identity.len())
            .field("disabled", &self.disabled)
            .finish()
    }
}

impl PskLookup for Credentials {
    fn lookup(&self, identity: &[u8]) -> Option<Arc<Psk>> {
        self.by_identity.get(identity).cloned()
    }
}

impl Credentials {
    pub fn enabled(&self) -> usize {
        self.by_identity.len()
    }

    /// Reads and checks the file; any bad entry refuses it whole.
    pub fn load(path: &Path) -> anyhow::Result<Credentials> {
        let text = std::fs::read_to_string(path)
            .map_err(|error| anyhow::anyhow!("{}: cannot read: {error}", path.display()))?;
        Credentials::parse(&text).map_err(|error| anyhow::anyhow!("{}{error}", path.display()))
    }

    /// Parses the file's text (sluice_dtls::credentials). Errors read `" line N: what"`, to
    /// follow the file name.
    pub fn parse(text: &str) -> Result<Credentials, String> {
        let mut credentials = Credentials::default();
        for credential in sluice_dtls::credentials::parse(text)? {
            if credential.enabled {
                let identity = credential.psk.identity.clone();
                credentials
                    .by_identity
                    .insert(identity, Arc::new(credential.psk));
            } else {
                credentials.disabled += 1;
            }
        }
        Ok(credentials)
    }
}

/// The credentials in force, shared by the main thread (which reloads them on SIGHUP) and the
/// shards (which look at `generation` once per batch and take the new set when it moved).
pub struct SharedCredentials {
    current: Mutex<Arc<Credentials>>,
    generation: AtomicU64,
}

impl SharedCredentials {
    pub fn new(credentials: Credentials) -> Self {
        SharedCredentials {
            current: Mutex::new(Arc::new(credentials)),
            generation: AtomicU64::new(0),
        }
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub fn current(&self) -> Arc<Credentials> {
        self.current
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    pub fn replace(&self, credentials: Credentials) {
        *self
            .current
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Arc::new(credentials);
        self.generation.fetch_add(1, Ordering::Release);
    }
}

/// What a reload changed, for the log: (added, removed, changed) identities.
pub fn difference(old: &Credentials, new: &Credentials) -> (usize, usize, usize) {
    let added = new
        .by_identity
        .keys()
        .filter(|identity| !old.by_identity.contains_key(*identity))
        .count();
    let removed = old
        .by_identity
        .keys()
        .filter(|identity| !new.by_identity.contains_key(*identity))
        .count();
    let changed = new
        .by_identity
        .iter()
        .filter(|(identity, psk)| old.by_identity.get(*identity).is_some_and(|o| o != *psk))
        .count();
    (added, removed, changed)
}

/// Whether others than the owner may read the file (it holds keys).
pub fn readable_by_others(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.permissions().mode() & 0o044 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_and_hex_keys_defaults_and_disabled_entries() {
        let credentials = Credentials::parse(
            r#"
[[device]]
id = "dev-7"
key = "secret text"

[[device]]
id = "dev-8"
identity = "psk-8"
key_hex = "00FFaa"

[[device]]
id = "dev-9"
key = "k"
enabled = false
"#,
        )
        .unwrap();
        assert_eq!(credentials.enabled(), 2);
        assert_eq!(credentials.disabled, 1);
        let seven = credentials.lookup(b"dev-7").unwrap();
        assert_eq!(&*seven.device, "dev-7");
        assert_eq!(&*seven.key, b"secret text");
        let eight = credentials.lookup(b"psk-8").unwrap();
        assert_eq!(&*eight.device, "dev-8");
        assert_eq!(&*eight.key, &[0x00, 0xff, 0xaa]);
        assert!(credentials.lookup(b"dev-8").is_none());
        assert!(credentials.lookup(b"dev-9").is_none());
        assert_eq!(Credentials::parse("").unwrap().enabled(), 0);
    }

    #[test]
    fn a_bad_entry_refuses_the_file_with_its_line() {
        let cases = [
            ("[[device]]\nid = \"a\"\nkey = \"k\"\n\n[[device]]\nid = \"b\"\nkey = \"k\"\nkey_hex = \"00\"\n", " line 6: device \"b\": give `key` or `key_hex`, not both"),
            ("[[device]]\nid = \"a\"\n", " line 2: device \"a\": give `key` or `key_hex`"),
            ("[[device]]\nid = \"a b\"\nkey = \"k\"\n", " line 2: device \"a b\": `id` must be"),
            ("[[device]]\nid = \"a\"\nkey_hex = \"0g\"\n", " line 2: device \"a\": `key_hex` must be"),
            ("[[device]]\nid = \"a\"\nkey = \"\"\n", " line 2: device \"a\": the key must be"),
            ("[[device]]\nid = \"a\"\nkey = \"k\"\n[[device]]\nid = \"b\"\nidentity = \"a\"\nkey = \"k\"\n", " line 5: device \"b\": another entry has the same `identity`"),
            ("[[device]]\nid = \"a\"\nkey = \"k\"\nsecret = 1\n", " line 4: unknown field `secret`"),
            ("[[device]]\nid = \"a\"\nkey = \"k\"\nenabled = \"yes\"\n", " line 4:"),
        ];
        for (text, expected) in cases {
            let error = Credentials::parse(text).unwrap_err();
            assert!(error.starts_with(expected), "{text:?}: {error}");
        }
    }

    #[test]
    fn a_reload_is_seen_by_generation() {
        let shared = SharedCredentials::new(Credentials::default());
        let before = shared.generation();
        shared.replace(Credentials::parse("[[device]]\nid = \"a\"\nkey = \"k\"\n").unwrap());
        assert_ne!(shared.generation(), before);
        assert!(shared.current().lookup(b"a").is_some());
        let (added, removed, changed) = difference(&Credentials::default(), &shared.current());
        assert_eq!((added, removed, changed), (1, 0, 0));
    }
}
