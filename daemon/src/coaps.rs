//! The CoAPS side of one shard: its SO_REUSEPORT socket on the CoAPS port, its DTLS session table
//! (`sluice_dtls::Server`), and its own CoAP endpoint, so that dedup and Block1 state of
//! authenticated peers never mixes with plain CoAP's. Records are opened and sealed here, in the
//! shard's batch path; the shard stores what comes out like any plain request, with the device
//! id the PSK identity maps to.

use std::io::Write as _;
use std::net::{SocketAddr, UdpSocket};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use sluice_dtls::{Application, Server, ServerConfig};
use sluice_protocol::{Counters, Endpoint, EndpointConfig};

use crate::credentials::{Credentials, SharedCredentials};
use crate::io::SendBatch;
use crate::metrics::ShardMetrics;

pub struct Coaps {
    pub socket: UdpSocket,
    pub endpoint: Endpoint,
    pub send: SendBatch,
    server: Server,
    shared: Arc<SharedCredentials>,
    generation: u64,
    credentials: Arc<Credentials>,
    reply: Vec<u8>,
    /// Plaintexts of the last datagram's application records.
    pub application: Application,
    sealed: Vec<u8>,
    session_file: PathBuf,
}

/// Where shard `index` of `shards` keeps its sessions across a graceful restart. The shard count
/// is in the name: the kernel spreads peers over the shards by a hash of their address and the
/// number of sockets, so a session is only found again by the same shard of as many.
pub fn session_file(data_dir: &Path, index: usize, shards: usize) -> PathBuf {
    data_dir.join(format!("dtls-sessions-{index}-of-{shards}.bin"))
}

/// Removes session files written by a run with another shard count; returns how many.
pub fn remove_stale_session_files(data_dir: &Path, shards: usize) -> usize {
    let suffix = format!("-of-{shards}.bin");
    let Ok(entries) = std::fs::read_dir(data_dir) else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .filter(|entry| {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            name.starts_with("dtls-sessions-") && !name.ends_with(&suffix)
        })
        .filter(|entry| std::fs::remove_file(entry.path()).is_ok())
        .count()
}

impl Coaps {
    /// Built on the shard's own thread; loads (and deletes) the sessions a graceful stop saved.
    pub fn new(
        socket: UdpSocket,
        shared: Arc<SharedCredentials>,
        session_file: PathBuf,
        shard: usize,
    ) -> Self {
        let now = Instant::now();
        let credentials = shared.current();
        let mut server = Server::new(ServerConfig::default(), now);
        if let Ok(bytes) = std::fs::read(&session_file) {
            // Deleted at once: a crash later must not bring back sequence numbers already used.
            let _ = std::fs::remove_file(&session_file);
            match server.import_sessions(now, &bytes, &*credentials) {
                Ok((loaded, skipped)) => {
                    tracing::info!(shard, loaded, skipped, "DTLS sessions restored")
                }
                Err(error) => {
                    tracing::warn!(shard, %error, file = %session_file.display(), "DTLS sessions not restored")
                }
            }
        }
        Coaps {
            socket,
            endpoint: Endpoint::new(EndpointConfig::default()),
            send: SendBatch::new(),
            server,
            generation: shared.generation(),
            shared,
            credentials,
            reply: Vec::new(),
            application: Application::default(),
            sealed: Vec::new(),
            session_file,
        }
    }

    /// Takes reloaded credentials, if any: sessions of unchanged devices continue.
    pub fn refresh_credentials(&mut self) {
        let generation = self.shared.generation();
        if generation != self.generation {
            self.generation = generation;
            self.credentials = self.shared.current();
            self.server.rekey(&*self.credentials);
        }
    }

    /// Handles one datagram: queues any handshake answer and leaves the authenticated CoAP
    /// messages in `self.application`. Returns the peer's device when there are any.
    pub fn open(&mut self, now: Instant, peer: SocketAddr, datagram: &[u8]) -> Option<Arc<str>> {
        let device = self.server.handle(
            now,
            peer,
            datagram,
            &*self.credentials,
            &mut self.reply,
            &mut self.application,
        );
        if !self.reply.is_empty() {
            self.send.push(peer, &self.reply);
        }
        device
    }

    /// Queues `plaintext` to `peer` in a record of its session. A peer whose session ended
    /// meanwhile gets nothing (it retransmits, handshakes again, and gets its answer then).
    pub fn respond(&mut self, peer: SocketAddr, plaintext: &[u8]) {
        self.sealed.clear();
        if self.server.seal(peer, plaintext, &mut self.sealed) {
            self.send.push(peer, &self.sealed);
        }
    }

    pub fn expire(&mut self, now: Instant) {
        self.server.expire(now);
        self.endpoint.expire(now);
    }

    pub fn publish(&self, metrics: &ShardMetrics) {
        if let Ok(mut counters) = metrics.dtls.lock() {
            counters.clone_from(self.server.counters());
        }
        metrics
            .dtls_sessions
            .store(self.server.sessions_len() as u64, Ordering::Relaxed);
        metrics
            .dtls_handshakes
            .store(self.server.handshakes_len() as u64, Ordering::Relaxed);
    }

    pub fn protocol_counters(&self) -> &Counters {
        self.endpoint.counters()
    }

    /// Saves the established sessions (mode 0600: they hold keys) for the next start.
    pub fn save_sessions(&self, shard: usize) {
        let mut bytes = Vec::new();
        self.server.export_sessions(&mut bytes);
        let written = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&self.session_file)
            .and_then(|mut file| {
                file.write_all(&bytes)?;
                file.sync_all()
            });
        match written {
            Ok(()) => tracing::info!(
                shard,
                sessions = self.server.sessions_len(),
                "DTLS sessions saved"
            ),
            Err(error) => {
                tracing::warn!(shard, %error, file = %self.session_file.display(), "DTLS sessions not saved: devices will handshake again")
            }
        }
    }
}

/// Adds the CoAPS endpoint's counters to the plain one's, so `/metrics` counts requests and
/// responses of both transports alike.
pub fn add_counters(total: &mut Counters, more: &Counters) {
    total.datagrams += more.datagrams;
    total.requests += more.requests;
    total.readings += more.readings;
    total.duplicates += more.duplicates;
    total.malformed += more.malformed;
    total.pings += more.pings;
    total.resets_received += more.resets_received;
    total.bad_request += more.bad_request;
    total.unauthorized += more.unauthorized;
    total.bad_option += more.bad_option;
    total.forbidden += more.forbidden;
    total.not_found += more.not_found;
    total.method_not_allowed += more.method_not_allowed;
    total.incomplete += more.incomplete;
    total.too_large += more.too_large;
    total.unsupported_format += more.unsupported_format;
    total.unavailable += more.unavailable;
    total.proxying_not_supported += more.proxying_not_supported;
    total.block1_continues += more.block1_continues;
    total.block1_timeouts += more.block1_timeouts;
    total.dedup_evictions += more.dedup_evictions;
}
