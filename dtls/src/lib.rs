//! Sans-IO DTLS 1.2 with pre-shared keys (RFC 6347, RFC 4279) as CoAP needs it (RFC 7252 §9):
//! the suites TLS_PSK_WITH_AES_128_CCM_8, TLS_PSK_WITH_AES_128_CCM and
//! TLS_PSK_WITH_AES_128_GCM_SHA256, HelloVerifyRequest cookies, the extended master secret.
//!
//! [`Server`] is the per-shard session table of `sluiced`: it takes datagrams and a clock, and
//! returns what to send and the application data it authenticated. [`Client`] is the device side,
//! used by `sluice load --dtls` and the tests. No sockets, no threads, no clock of its own. Why
//! sluice has its own DTLS and what it does and does not implement: `docs/dtls.md`.

mod client;
pub mod credentials;
mod crypto;
mod server;
#[cfg(test)]
mod tests;
mod wire;

use std::sync::Arc;

pub use client::{Client, ClientError};
pub use crypto::ReplayWindow;
pub use server::{Counters, Server, ServerConfig, SessionFileError};

/// The cipher suites, in their IANA code points.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Suite {
    /// TLS_PSK_WITH_AES_128_CCM_8 (RFC 6655): the suite CoAP mandates.
    Aes128Ccm8,
    /// TLS_PSK_WITH_AES_128_CCM (RFC 6655).
    Aes128Ccm,
    /// TLS_PSK_WITH_AES_128_GCM_SHA256 (RFC 5487).
    Aes128GcmSha256,
}

impl Suite {
    pub const ALL: [Suite; 3] = [Suite::Aes128Ccm8, Suite::Aes128Ccm, Suite::Aes128GcmSha256];

    pub fn code(self) -> u16 {
        match self {
            Suite::Aes128Ccm8 => 0xc0a8,
            Suite::Aes128Ccm => 0xc0a4,
            Suite::Aes128GcmSha256 => 0x00a8,
        }
    }

    pub fn from_code(code: u16) -> Option<Suite> {
        Suite::ALL.into_iter().find(|suite| suite.code() == code)
    }

    fn tag_bytes(self) -> usize {
        match self {
            Suite::Aes128Ccm8 => 8,
            Suite::Aes128Ccm | Suite::Aes128GcmSha256 => 16,
        }
    }
}

/// One device's pre-shared key: the identity it presents, the device id its readings are stored
/// under, and the key.
#[derive(Debug, PartialEq, Eq)]
pub struct Psk {
    pub identity: Box<[u8]>,
    pub device: Arc<str>,
    pub key: Box<[u8]>,
}

/// Where the server finds keys: the current credentials.
pub trait PskLookup {
    /// The enabled credential presenting `identity`, if any.
    fn lookup(&self, identity: &[u8]) -> Option<Arc<Psk>>;
}

/// Plaintexts of the application-data records of one datagram.
#[derive(Debug, Default)]
pub struct Application {
    bytes: Vec<u8>,
    ends: Vec<usize>,
}

impl Application {
    pub fn clear(&mut self) {
        self.bytes.clear();
        self.ends.clear();
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    fn push(&mut self, plaintext: &[u8]) {
        self.bytes.extend_from_slice(plaintext);
        self.ends.push(self.bytes.len());
    }

    /// The plaintext of each application record, in arrival order.
    pub fn records(&self) -> impl Iterator<Item = &[u8]> {
        let starts = std::iter::once(0).chain(self.ends.iter().copied());
        starts
            .zip(self.ends.iter().copied())
            .map(|(start, end)| &self.bytes[start..end])
    }
}
