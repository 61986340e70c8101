//! The CoAPS side of one shard: its SO_REUSEPORT socket on the CoAPS port, its DTLS session table
//! (`sluice_dtls::Server`), and its own CoAP endpoint, so that dedup and Block1 state of
//! authenticated peers never mixes with plain CoAP's. Records are opened and sealed here, in the
//! shard's batch path; the shard stores what comes out like any plain request, with the device
//! id the PSK identity maps to.

use std::io::Write as _;
use std::net::{SocketAddr, UdpSocket};
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
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
        if let Some(bytes) = take_session_file(&session_file, shard) {
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
    /// messages in `self.application`. Returns the peer's device and DTLS session id when there
    /// are any (CoAP Message IDs are scoped to the session).
    pub fn open(
        &mut self,
        now: Instant,
        peer: SocketAddr,
        datagram: &[u8],
    ) -> Option<(Arc<str>, u64)> {
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
        Some((device?, self.server.session_id(&peer)?))
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
        match write_session_file(&self.session_file, &bytes) {
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

/// Reads the session file and deletes it. None when there is none, when it cannot be deleted (a
/// crash later would restore sequence numbers already used, and the server would reuse AEAD
/// nonces), or when others than the daemon's user could read it (its keys may be known).
fn take_session_file(path: &Path, shard: usize) -> Option<Vec<u8>> {
    let bytes = std::fs::read(path).ok()?;
    let mode = std::fs::metadata(path).ok()?.permissions().mode();
    if let Err(error) = std::fs::remove_file(path) {
        tracing::warn!(shard, %error, file = %path.display(), "DTLS sessions not restored: the session file cannot be deleted");
        return None;
    }
    if mode & 0o077 != 0 {
        tracing::warn!(shard, mode = format!("{:o}", mode & 0o777), file = %path.display(), "DTLS sessions not restored: the session file was readable by others");
        return None;
    }
    Some(bytes)
}

/// Writes a new session file, mode 0600: whatever was at the path before (a file with another
/// mode, a symbolic link) is removed, and the new file is created, never opened.
fn write_session_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(error) if error.kind() != std::io::ErrorKind::NotFound => return Err(error),
        _ => {}
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

/// Adds the CoAPS endpoint's counters to the plain one's, so `/metrics` counts requests and
/// responses of both transports alike.
pub fn add_counters(total: &mut Counters, more: &Counters) {
    total.datagrams += more.datagrams;
    total.requests += more.requests;
    total.readings += more.readings;
    total.duplicates += more.duplicates;
    total.message_id_reuses += more.message_id_reuses;
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
    total.too_many_requests += more.too_many_requests;
    total.proxying_not_supported += more.proxying_not_supported;
    total.block1_continues += more.block1_continues;
    total.block1_timeouts += more.block1_timeouts;
    total.dedup_evictions += more.dedup_evictions;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("sluice-coaps-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_session_file_is_written_0600_over_whatever_was_there() {
        let dir = scratch_dir("write");
        let path = dir.join("dtls-sessions-0-of-1.bin");
        std::fs::write(&path, b"old").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        write_session_file(&path, b"new").unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);

        // A symbolic link at the path is replaced, not written through.
        let target = dir.join("elsewhere");
        std::fs::write(&target, b"untouched").unwrap();
        std::fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink(&target, &path).unwrap();
        write_session_file(&path, b"new").unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"untouched");
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_session_file_is_taken_once_and_only_if_private() {
        let dir = scratch_dir("take");
        let path = dir.join("dtls-sessions-0-of-1.bin");
        write_session_file(&path, b"sessions").unwrap();
        assert_eq!(
            take_session_file(&path, 0).as_deref(),
            Some(&b"sessions"[..])
        );
        assert!(!path.exists(), "deleted when taken");
        assert_eq!(take_session_file(&path, 0), None);

        std::fs::write(&path, b"sessions").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(take_session_file(&path, 0), None, "readable by others");
        assert!(!path.exists(), "deleted all the same");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
