//! Key schedule and record protection of the three PSK suites: the TLS 1.2 PRF with SHA-256
//! (RFC 5246 §5), the PSK premaster secret (RFC 4279 §2), the extended master secret (RFC 7627),
//! AEAD records with a 4-byte implicit and an 8-byte explicit nonce (RFC 6655, RFC 5288) and the
//! anti-replay window (RFC 6347 §4.1.2.6).

use aes::Aes128;
use aes_gcm::aead::consts::{U12, U16, U8};
use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::Aes128Gcm;
use ccm::Ccm;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use crate::wire::{self, RANDOM_BYTES, RECORD_HEADER_BYTES, VERIFY_DATA_BYTES};
use crate::Suite;

type HmacSha256 = Hmac<Sha256>;
type Aes128Ccm8 = Ccm<Aes128, U8, U12>;
type Aes128Ccm = Ccm<Aes128, U16, U12>;

pub const MASTER_SECRET_BYTES: usize = 48;
const KEY_BYTES: usize = 16;
const IMPLICIT_NONCE_BYTES: usize = 4;
pub const EXPLICIT_NONCE_BYTES: usize = 8;
/// client_write_key, server_write_key, client_write_IV, server_write_IV (RFC 5246 §6.3; these
/// suites have no MAC keys).
pub const KEY_BLOCK_BYTES: usize = 2 * KEY_BYTES + 2 * IMPLICIT_NONCE_BYTES;

/// P_SHA256 (RFC 5246 §5): fills `out` from `secret`, `label` and `seeds` (concatenated).
pub fn prf(secret: &[u8], label: &[u8], seeds: &[&[u8]], out: &mut [u8]) {
    let keyed = <HmacSha256 as Mac>::new_from_slice(secret).expect("HMAC takes keys of any length");
    // A(1) = HMAC(secret, label + seed)
    let mut a = {
        let mut mac = keyed.clone();
        mac.update(label);
        seeds.iter().for_each(|seed| mac.update(seed));
        mac.finalize().into_bytes()
    };
    for chunk in out.chunks_mut(32) {
        let mut mac = keyed.clone();
        mac.update(&a);
        mac.update(label);
        seeds.iter().for_each(|seed| mac.update(seed));
        let block = mac.finalize().into_bytes();
        chunk.copy_from_slice(&block[..chunk.len()]);
        let mut next = keyed.clone();
        next.update(&a);
        a = next.finalize().into_bytes();
    }
}

/// The plain-PSK premaster secret: uint16 N, N zero bytes, uint16 N, the key.
pub fn premaster_secret(key: &[u8]) -> Vec<u8> {
    let length = (key.len() as u16).to_be_bytes();
    let mut secret = Vec::with_capacity(4 + 2 * key.len());
    secret.extend_from_slice(&length);
    secret.resize(2 + key.len(), 0);
    secret.extend_from_slice(&length);
    secret.extend_from_slice(key);
    secret
}

/// The master secret: the extended one (RFC 7627, over the session hash up to and including the
/// ClientKeyExchange) when both sides offered it, else the RFC 5246 one over the randoms.
pub fn master_secret(
    premaster: &[u8],
    extended_session_hash: Option<&[u8]>,
    client_random: &[u8],
    server_random: &[u8],
) -> [u8; MASTER_SECRET_BYTES] {
    let mut master = [0; MASTER_SECRET_BYTES];
    match extended_session_hash {
        Some(hash) => prf(premaster, b"extended master secret", &[hash], &mut master),
        None => prf(
            premaster,
            b"master secret",
            &[client_random, server_random],
            &mut master,
        ),
    }
    master
}

/// The key block of a session.
pub fn key_block(
    master: &[u8; MASTER_SECRET_BYTES],
    client_random: &[u8],
    server_random: &[u8],
) -> [u8; KEY_BLOCK_BYTES] {
    let mut block = [0; KEY_BLOCK_BYTES];
    prf(
        master,
        b"key expansion",
        &[server_random, client_random],
        &mut block,
    );
    block
}

/// Finished verify_data: `label` is `client finished` or `server finished`.
pub fn verify_data(
    master: &[u8; MASTER_SECRET_BYTES],
    label: &[u8],
    transcript: &Sha256,
) -> [u8; VERIFY_DATA_BYTES] {
    let hash = transcript.clone().finalize();
    let mut out = [0; VERIFY_DATA_BYTES];
    prf(master, label, &[&hash], &mut out);
    out
}

/// Keyed HMAC-SHA256 of several parts, e.g. for cookies.
pub fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut mac = <HmacSha256 as Mac>::new_from_slice(key).expect("HMAC takes keys of any length");
    parts.iter().for_each(|part| mac.update(part));
    mac.finalize().into_bytes().into()
}

pub fn random() -> [u8; RANDOM_BYTES] {
    let mut bytes = [0; RANDOM_BYTES];
    rand::Rng::fill(&mut rand::rng(), &mut bytes);
    bytes
}

/// Which side of the key block writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Client,
    Server,
}

/// The negotiated keys of one direction pair: all a session needs to protect records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TrafficKeys {
    pub suite: Suite,
    pub block: [u8; KEY_BLOCK_BYTES],
}

/// Why a record did not open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Forged;

impl TrafficKeys {
    fn key_and_nonce(&self, writer: Role) -> (&[u8], &[u8]) {
        let (key, iv) = match writer {
            Role::Client => (0, 2 * KEY_BYTES),
            Role::Server => (KEY_BYTES, 2 * KEY_BYTES + IMPLICIT_NONCE_BYTES),
        };
        (
            &self.block[key..key + KEY_BYTES],
            &self.block[iv..iv + IMPLICIT_NONCE_BYTES],
        )
    }

    /// Appends one protected record of `plaintext`, written by `writer`, to `out`.
    pub fn seal(
        &self,
        writer: Role,
        content_type: u8,
        epoch: u16,
        sequence: u64,
        plaintext: &[u8],
        out: &mut Vec<u8>,
    ) {
        let (key, implicit) = self.key_and_nonce(writer);
        let explicit = explicit_nonce(epoch, sequence);
        let nonce = nonce(implicit, &explicit);
        let aad = additional_data(&explicit, content_type, plaintext.len());
        let tag_bytes = self.suite.tag_bytes();
        wire::push_record_header(
            out,
            content_type,
            wire::DTLS_1_2,
            epoch,
            sequence,
            EXPLICIT_NONCE_BYTES + plaintext.len() + tag_bytes,
        );
        out.extend_from_slice(&explicit);
        let start = out.len();
        out.extend_from_slice(plaintext);
        let body = &mut out[start..];
        let nonce = nonce.as_slice().into();
        // Encryption cannot fail for these lengths (a record is below 2^16 bytes).
        let tag = match self.suite {
            Suite::Aes128Ccm8 => Aes128Ccm8::new(key.into())
                .encrypt_in_place_detached(nonce, &aad, body)
                .map(|tag| tag.to_vec()),
            Suite::Aes128Ccm => Aes128Ccm::new(key.into())
                .encrypt_in_place_detached(nonce, &aad, body)
                .map(|tag| tag.to_vec()),
            Suite::Aes128GcmSha256 => Aes128Gcm::new(key.into())
                .encrypt_in_place_detached(nonce, &aad, body)
                .map(|tag| tag.to_vec()),
        }
        .expect("AEAD encryption of a record-sized buffer");
        out.extend_from_slice(&tag);
    }

    /// Opens a record written by `writer`; the plaintext replaces the contents of `out`.
    pub fn open(
        &self,
        writer: Role,
        record: &wire::Record<'_>,
        out: &mut Vec<u8>,
    ) -> Result<(), Forged> {
        let tag_bytes = self.suite.tag_bytes();
        let fragment = record.fragment;
        if fragment.len() < EXPLICIT_NONCE_BYTES + tag_bytes {
            return Err(Forged);
        }
        let (key, implicit) = self.key_and_nonce(writer);
        let explicit: [u8; EXPLICIT_NONCE_BYTES] = fragment[..EXPLICIT_NONCE_BYTES]
            .try_into()
            .map_err(|_| Forged)?;
        let (ciphertext, tag) = fragment[EXPLICIT_NONCE_BYTES..]
            .split_at(fragment.len() - EXPLICIT_NONCE_BYTES - tag_bytes);
        let mut header_nonce = [0; EXPLICIT_NONCE_BYTES];
        header_nonce[..2].copy_from_slice(&record.epoch.to_be_bytes());
        header_nonce[2..].copy_from_slice(&record.sequence.to_be_bytes()[2..]);
        let aad = additional_data(&header_nonce, record.content_type, ciphertext.len());
        let nonce = nonce(implicit, &explicit);
        let nonce = nonce.as_slice().into();
        out.clear();
        out.extend_from_slice(ciphertext);
        let opened = match self.suite {
            Suite::Aes128Ccm8 => {
                Aes128Ccm8::new(key.into()).decrypt_in_place_detached(nonce, &aad, out, tag.into())
            }
            Suite::Aes128Ccm => {
                Aes128Ccm::new(key.into()).decrypt_in_place_detached(nonce, &aad, out, tag.into())
            }
            Suite::Aes128GcmSha256 => {
                Aes128Gcm::new(key.into()).decrypt_in_place_detached(nonce, &aad, out, tag.into())
            }
        };
        opened.map_err(|_| {
            out.clear();
            Forged
        })
    }
}

fn explicit_nonce(epoch: u16, sequence: u64) -> [u8; EXPLICIT_NONCE_BYTES] {
    let mut explicit = [0; EXPLICIT_NONCE_BYTES];
    explicit[..2].copy_from_slice(&epoch.to_be_bytes());
    explicit[2..].copy_from_slice(&sequence.to_be_bytes()[2..]);
    explicit
}

fn nonce(implicit: &[u8], explicit: &[u8; EXPLICIT_NONCE_BYTES]) -> [u8; 12] {
    let mut nonce = [0; 12];
    nonce[..IMPLICIT_NONCE_BYTES].copy_from_slice(implicit);
    nonce[IMPLICIT_NONCE_BYTES..].copy_from_slice(explicit);
    nonce
}

/// additional_data = epoch + seq_num (the record's, 8 bytes) + type + version + length.
fn additional_data(sequence: &[u8; 8], content_type: u8, length: usize) -> [u8; 13] {
    let mut aad = [0; RECORD_HEADER_BYTES];
    aad[..8].copy_from_slice(sequence);
    aad[8] = content_type;
    aad[9..11].copy_from_slice(&wire::DTLS_1_2.to_be_bytes());
    aad[11..].copy_from_slice(&(length as u16).to_be_bytes());
    aad
}

/// The receive window of one epoch: the highest sequence number authenticated so far and a bitmap
/// of the 64 below it (RFC 6347 §4.1.2.6).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReplayWindow {
    /// Highest sequence number seen, plus one (0: none yet).
    pub next: u64,
    /// Bit i set: `next - 1 - i` was seen.
    pub seen: u64,
}

impl ReplayWindow {
    /// Whether `sequence` is new and not too old to tell.
    pub fn is_fresh(&self, sequence: u64) -> bool {
        if sequence >= self.next {
            return true;
        }
        let age = self.next - 1 - sequence;
        age < 64 && self.seen & (1 << age) == 0
    }

    /// Marks `sequence` seen; call only after the record authenticated. A sequence number
    /// older than the window changes nothing (`is_fresh` refuses it anyway).
    pub fn mark(&mut self, sequence: u64) {
        if sequence >= self.next {
            let shift = sequence - self.next + 1;
            self.seen = if shift >= 64 { 0 } else { self.seen << shift };
            self.seen |= 1;
            self.next = sequence.saturating_add(1);
        } else {
            let age = self.next - 1 - sequence;
            if age < 64 {
                self.seen |= 1 << age;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(text: &str) -> Vec<u8> {
        (0..text.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap())
            .collect()
    }

    /// The widely used TLS 1.2 PRF-SHA256 test vector (IETF TLS list, Joseph Birr-Pixton).
    #[test]
    fn prf_matches_the_published_sha256_vector() {
        let secret = hex("9bbe436ba940f017b17652849a71db35");
        let seed = hex("a0ba9f936cda311827a6f796ffd5198c");
        let mut out = [0; 100];
        prf(&secret, b"test label", &[&seed], &mut out);
        assert_eq!(
            out.to_vec(),
            hex("e3f229ba727be17b8d122620557cd453c2aab21d07c3d495329b52d4e61edb5a6b301791e90d35c9c9a46b4e14baf9af0fa022f7077def17abfd3797c0564bab4fbc91666e9def9b97fce34f796789baa48082d122ee42c5a72e5a5110fff70187347b66")
        );
    }

    #[test]
    fn sealed_records_open_and_tampered_ones_do_not() {
        for suite in [Suite::Aes128Ccm8, Suite::Aes128Ccm, Suite::Aes128GcmSha256] {
            let keys = TrafficKeys {
                suite,
                block: std::array::from_fn(|i| i as u8),
            };
            let mut record = Vec::new();
            keys.seal(Role::Client, 23, 1, 5, b"hello", &mut record);
            let (parsed, _) = wire::split_record(&record).unwrap();
            let mut plain = Vec::new();
            keys.open(Role::Client, &parsed, &mut plain).unwrap();
            assert_eq!(plain, b"hello");
            // The other direction's key does not open it.
            assert!(keys.open(Role::Server, &parsed, &mut plain).is_err());
            let last = record.len() - 1;
            record[last] ^= 1;
            let (parsed, _) = wire::split_record(&record).unwrap();
            assert_eq!(keys.open(Role::Client, &parsed, &mut plain), Err(Forged));
            // A record header rewritten to another sequence number fails too.
            record[last] ^= 1;
            record[10] ^= 1;
            let (parsed, _) = wire::split_record(&record).unwrap();
            assert_eq!(keys.open(Role::Client, &parsed, &mut plain), Err(Forged));
        }
    }

    #[test]
    fn replay_window_refuses_repeats_and_ancient_records() {
        let mut window = ReplayWindow::default();
        assert!(window.is_fresh(0));
        window.mark(0);
        assert!(!window.is_fresh(0));
        window.mark(10);
        assert!(window.is_fresh(5));
        window.mark(5);
        assert!(!window.is_fresh(5));
        assert!(!window.is_fresh(10));
        window.mark(100);
        assert!(!window.is_fresh(30), "older than the window");
        assert!(window.is_fresh(99));
        // The edges: 64 back is outside the window, 63 back inside; marking outside is a no-op.
        assert!(!window.is_fresh(100 - 64));
        assert!(window.is_fresh(100 - 63));
        let before = window;
        window.mark(3);
        assert_eq!(window, before);
        window.mark(100 + 64);
        assert_eq!(
            window.seen, 1,
            "a jump of the window's width forgets all of it"
        );
        assert!(!window.is_fresh(100), "64 back: outside");
        assert!(window.is_fresh(101));
    }
}
