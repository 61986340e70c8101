//! One shard: an OS thread owning its socket, its protocol endpoint (dedup and Block1 state) and
//! its store writer. Per batch: receive, decode, append, group commit, then send the responses.

use std::net::UdpSocket;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sluice_protocol::{
    Endpoint, EndpointConfig, Exchange, Identity, Outcome, Reading, Readings, Value,
};
use sluice_storage::{Durability, ExchangeRecord, ShardWriter, StoreError, ValueRef};

use crate::coaps::Coaps;
use crate::credentials::SharedCredentials;
use crate::io::{self, SendBatch, ShardIo};
use crate::metrics::{self, ShardMetrics};
use crate::overload::{Overload, OverloadConfig};

/// Max-Age (seconds) of a 5.03 sent when a commit failed: how long a device should back off.
pub const UNAVAILABLE_MAX_AGE_S: u32 = 30;
/// How often expired dedup entries and Block1 transfers are dropped.
const EXPIRE_INTERVAL: Duration = Duration::from_secs(1);
/// Requests buffered behind the commit in flight before the shard stops receiving until that
/// commit is durable: bounds the next commit (the store records at most
/// `EXCHANGES_PER_COMMIT_MAX` exchanges in one) and the memory a slow disk can pin.
pub const PENDING_EXCHANGES_MAX: usize = 4096;

/// A group commit whose writes and fdatasyncs were handed to the shard's I/O (its ring or its
/// sync thread); its requests are answered when it is durable.
struct InFlight {
    pending: Vec<Pending>,
    pending_bytes: Vec<u8>,
    started: Instant,
}

pub struct Shard {
    pub index: usize,
    pub socket: Option<UdpSocket>,
    pub coaps: Option<CoapsSetup>,
    pub writer: ShardWriter,
    pub metrics: Arc<ShardMetrics>,
    pub shutdown: Arc<AtomicBool>,
    /// Exchanges acknowledged before the restart (every shard's, oldest first): seeds the dedup
    /// table so their retransmissions are answered again, not stored twice.
    pub history: Arc<Vec<ExchangeRecord>>,
    /// Shedding and rate limiting (docs/overload.md).
    pub overload: OverloadConfig,
    /// How the sockets are driven (`--io`).
    pub io: io::Backend,
}

/// What a shard needs to serve CoAPS; the session table itself is built on the shard's thread.
pub struct CoapsSetup {
    pub socket: UdpSocket,
    pub credentials: Arc<SharedCredentials>,
    pub session_file: std::path::PathBuf,
}

/// A stored exchange whose response waits for the commit that covers it.
struct Pending {
    /// When the datagram was received (for the receive-to-acknowledge latency).
    received: Instant,
    /// Came over CoAPS: answered by the CoAPS endpoint, in a record of the peer's session.
    secure: bool,
    exchange: Exchange,
    response_start: usize,
    response_len: usize,
}

impl Shard {
    pub fn run(mut self) {
        let plain = self.socket.take();
        let mut coaps = self.coaps.take().map(|setup| {
            Coaps::new(
                setup.socket,
                setup.credentials,
                setup.session_file,
                self.index,
            )
        });
        if plain.is_none() && coaps.is_none() {
            return;
        }
        let mut endpoint = Endpoint::new(EndpointConfig::default());
        self.restore(&mut endpoint);
        if let Some(coaps) = &mut coaps {
            // The store does not say which transport an exchange came over: both endpoints get
            // the history, so a CoAPS retransmission after a restart is not stored twice either.
            self.restore(&mut coaps.endpoint);
        }
        let mut receive = ShardIo::new(
            self.io,
            self.index,
            [plain.as_ref(), coaps.as_ref().map(|c| &c.socket)],
            self.metrics.clone(),
        );
        let mut send = SendBatch::new();
        let mut readings = Readings::new();
        let mut response: Vec<u8> = Vec::new();
        let mut pending: Vec<Pending> = Vec::new();
        let mut pending_bytes: Vec<u8> = Vec::new();
        // Protocol time of each datagram of a batch, recorded under one lock per batch.
        let mut decode_us: Vec<u64> = Vec::new();
        let mut last_expire = Instant::now();
        let mut failing = false;
        let sockets = [plain.as_ref(), coaps.as_ref().map(|c| &c.socket)];
        let sockets = sockets.iter().flatten().map(|s| s.as_raw_fd()).collect();
        let mut overload = Overload::new(self.index, self.overload, sockets);

        // Under --durability fsync a commit's writes and fdatasyncs run on the ring (or the sync
        // thread) while the shard receives and decodes the next batch (pipelined group commit).
        let pipelined = self.writer.durability() == Durability::Fsync;
        let mut in_flight: Option<InFlight> = None;
        loop {
            self.metrics
                .heartbeat_ms
                .store(metrics::now_ms(), Ordering::Relaxed);
            let stopping = self.shutdown.load(Ordering::Relaxed);
            if stopping && in_flight.is_none() && pending.is_empty() {
                break;
            }
            // Receive unless stopping, or unless the commit behind the one in flight is full.
            let receiving = !stopping && pending.len() < PENDING_EXCHANGES_MAX;
            let [plain_ready, secure_ready, _] = receive.wait(
                [
                    plain.as_ref().filter(|_| receiving).map(|s| s.as_raw_fd()),
                    coaps
                        .as_ref()
                        .filter(|_| receiving)
                        .map(|c| c.socket.as_raw_fd()),
                ],
                in_flight.is_some(),
            );
            let mut count = 0;
            if let (Some(socket), true) = (&plain, plain_ready) {
                count = self.receive(&mut receive, socket);
            }
            let received_at = Instant::now();
            let unix_now = unix_seconds(SystemTime::now());
            let committing = in_flight.as_ref().map_or(0, |commit| commit.pending.len());
            for index in 0..count {
                let (peer, datagram) = receive.datagram(index);
                let Some(peer) = peer else { continue };
                readings.clear();
                let waited = overload.arrived(receive.arrival(index));
                let decode_started = Instant::now();
                let screened = overload.screen(
                    &mut endpoint,
                    received_at,
                    waited,
                    (committing + pending.len(), self.writer.pending()),
                    peer,
                    None,
                    datagram,
                    &mut response,
                );
                let outcome = screened.unwrap_or_else(|| {
                    endpoint.handle(
                        received_at,
                        unix_now,
                        peer,
                        None,
                        datagram,
                        &mut readings,
                        &mut response,
                    )
                });
                decode_us.push(decode_started.elapsed().as_micros() as u64);
                match outcome {
                    Outcome::Ignore => {}
                    Outcome::Reply => send.push(peer, &response),
                    Outcome::Store(exchange) => {
                        if let Some(rejection) = self.stage(
                            &mut endpoint,
                            exchange,
                            &readings,
                            &response,
                            received_at,
                            unix_now,
                            false,
                            &mut pending,
                            &mut pending_bytes,
                        ) {
                            send.push(peer, &rejection);
                        }
                    }
                }
            }
            if let (Some(coaps), true) = (&mut coaps, secure_ready) {
                coaps.refresh_credentials();
                let secure_count = self.receive(&mut receive, &coaps.socket);
                count += secure_count;
                for index in 0..secure_count {
                    let (peer, datagram) = receive.datagram(index);
                    let Some(peer) = peer else { continue };
                    let waited = overload.arrived(receive.arrival(index));
                    let Some((device, session)) = coaps.open(received_at, peer, datagram) else {
                        continue;
                    };
                    let application = std::mem::take(&mut coaps.application);
                    for message in application.records() {
                        readings.clear();
                        let identity = Identity {
                            device: &device,
                            session,
                        };
                        let screened = overload.screen(
                            &mut coaps.endpoint,
                            received_at,
                            waited,
                            (committing + pending.len(), self.writer.pending()),
                            peer,
                            Some(identity),
                            message,
                            &mut response,
                        );
                        let outcome = screened.unwrap_or_else(|| {
                            coaps.endpoint.handle(
                                received_at,
                                unix_now,
                                peer,
                                Some(identity),
                                message,
                                &mut readings,
                                &mut response,
                            )
                        });
                        match outcome {
                            Outcome::Ignore => {}
                            Outcome::Reply => coaps.respond(peer, &response),
                            Outcome::Store(exchange) => {
                                if let Some(rejection) = self.stage(
                                    &mut coaps.endpoint,
                                    exchange,
                                    &readings,
                                    &response,
                                    received_at,
                                    unix_now,
                                    true,
                                    &mut pending,
                                    &mut pending_bytes,
                                ) {
                                    coaps.respond(peer, &rejection);
                                }
                            }
                        }
                    }
                    coaps.application = application;
                }
            }

            // The commit in flight is durable (or failed): answer its requests.
            if in_flight.is_some() {
                if let Some((prepared, synced)) = receive.committed() {
                    let done = in_flight.take().expect("a commit in flight");
                    // A failed commit discards what was buffered behind it (see
                    // ShardWriter::abandon): those requests get 5.03 too.
                    let result = self.writer.conclude(prepared, synced);
                    let failed_behind = result.is_err();
                    self.finish(
                        &mut endpoint,
                        coaps.as_mut(),
                        &done.pending,
                        &done.pending_bytes,
                        &mut send,
                        &mut failing,
                        result,
                        done.started,
                    );
                    if failed_behind && !pending.is_empty() {
                        let error = StoreError::Io {
                            op: "commit",
                            path: Default::default(),
                            source: std::io::Error::other("the commit before it failed"),
                        };
                        self.finish(
                            &mut endpoint,
                            coaps.as_mut(),
                            &pending,
                            &pending_bytes,
                            &mut send,
                            &mut failing,
                            Err(error),
                            Instant::now(),
                        );
                        pending.clear();
                        pending_bytes.clear();
                    }
                }
            }
            // Start the next commit when none is in flight.
            if in_flight.is_none() && !pending.is_empty() {
                let started = Instant::now();
                let result = match self.writer.prepare() {
                    Err(error) => Some(Err(error)),
                    Ok(prepared) if pipelined && prepared.needs_sync() => {
                        receive.commit(prepared);
                        in_flight = Some(InFlight {
                            pending: std::mem::take(&mut pending),
                            pending_bytes: std::mem::take(&mut pending_bytes),
                            started,
                        });
                        None
                    }
                    // --durability os: page-cache writes, done here.
                    Ok(prepared) => {
                        let written = prepared.perform();
                        Some(self.writer.conclude(prepared, written))
                    }
                };
                if let Some(result) = result {
                    self.finish(
                        &mut endpoint,
                        coaps.as_mut(),
                        &pending,
                        &pending_bytes,
                        &mut send,
                        &mut failing,
                        result,
                        started,
                    );
                }
                pending.clear();
                pending_bytes.clear();
            }
            // Counters first: whoever got a response sees the counters that include its request.
            self.publish(&endpoint, coaps.as_ref());
            overload.tick(Instant::now(), &self.metrics);
            let mut dropped = plain
                .as_ref()
                .map_or(0, |socket| receive.flush(socket, &mut send));
            if let Some(coaps) = &mut coaps {
                dropped += receive.flush(&coaps.socket, &mut coaps.send);
            }
            if count > 0 {
                if let Ok(mut histogram) = self.metrics.decode_latency_us.lock() {
                    for us in decode_us.drain(..) {
                        metrics::record(&mut histogram, us, 1);
                    }
                }
            }
            if dropped > 0 {
                self.metrics
                    .responses_dropped
                    .fetch_add(dropped as u64, Ordering::Relaxed);
            }
            if received_at.duration_since(last_expire) >= EXPIRE_INTERVAL {
                endpoint.expire(received_at);
                if let Some(coaps) = &mut coaps {
                    coaps.expire(received_at);
                }
                last_expire = received_at;
            }
        }
        if let Some(coaps) = &coaps {
            coaps.save_sessions(self.index);
        }
        tracing::debug!(shard = self.index, "shard stopped");
    }

    /// Takes a batch of datagrams from `socket` into `receive`; returns how many.
    fn receive(&self, receive: &mut ShardIo, socket: &UdpSocket) -> usize {
        match receive.receive(socket) {
            Ok(count) => count,
            Err(error) => {
                if !matches!(
                    error.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) {
                    tracing::warn!(shard = self.index, %error, "receive failed");
                }
                0
            }
        }
    }

    /// Appends a request's readings for the next group commit. Returns the rejection to send
    /// instead when the store cannot hold them (nothing of the request is stored then).
    #[allow(clippy::too_many_arguments)]
    fn stage(
        &mut self,
        endpoint: &mut Endpoint,
        exchange: Exchange,
        readings: &[Reading],
        response: &[u8],
        received: Instant,
        unix_now: f64,
        secure: bool,
        pending: &mut Vec<Pending>,
        pending_bytes: &mut Vec<u8>,
    ) -> Option<Vec<u8>> {
        let appended = self.writer.append_all(&exchange.device, readings, |r| {
            (r.name.as_str(), r.time, value(r))
        });
        if let Err(error) = appended {
            // Nothing of the request is stored: one refused reading refuses all.
            let mut rejection = Vec::new();
            endpoint.rejected(&exchange, &error.to_string(), &mut rejection);
            return (!rejection.is_empty()).then_some(rejection);
        }
        let recorded = self.writer.record_exchange(
            exchange.peer,
            exchange.message_id,
            exchange.confirmable,
            unix_now,
            response,
        );
        if let Err(error) = recorded {
            // A response above 255 bytes: its retransmission after a restart
            // would be stored again. A 2.04 of this daemon is far smaller.
            tracing::warn!(shard = self.index, %error, "exchange not recorded");
        }
        pending.push(Pending {
            received,
            secure,
            exchange,
            response_start: pending_bytes.len(),
            response_len: response.len(),
        });
        pending_bytes.extend_from_slice(response);
        None
    }

    /// Group commit of every reading appended in this batch; then the stored exchanges'
    /// responses are queued, or 5.03 when the store could not make them durable.
    /// Answers the requests of a finished group commit: their 2.04 once it is durable and
    /// published, 5.03 when it failed.
    #[allow(clippy::too_many_arguments)]
    fn finish(
        &mut self,
        endpoint: &mut Endpoint,
        mut coaps: Option<&mut Coaps>,
        pending: &[Pending],
        pending_bytes: &[u8],
        send: &mut SendBatch,
        failing: &mut bool,
        result: Result<sluice_storage::CommitStats, StoreError>,
        started: Instant,
    ) {
        let commit_us = started.elapsed().as_micros() as u64;
        match result {
            Ok(stats) => {
                if *failing {
                    tracing::info!(shard = self.index, "commits succeed again");
                    *failing = false;
                    self.metrics.set_commit_failed(false);
                }
                self.metrics.commits.fetch_add(1, Ordering::Relaxed);
                self.metrics
                    .points_stored
                    .fetch_add(stats.points as u64, Ordering::Relaxed);
                self.metrics
                    .late_points
                    .fetch_add(stats.late_points as u64, Ordering::Relaxed);
                if let Ok(mut histogram) = self.metrics.commit_latency_us.lock() {
                    metrics::record(&mut histogram, commit_us, 1);
                }
                if let Ok(mut histogram) = self.metrics.ack_latency_us.lock() {
                    for entry in pending {
                        let latency_us = entry.received.elapsed().as_micros() as u64;
                        metrics::record(&mut histogram, latency_us, 1);
                    }
                }
                for entry in pending.iter() {
                    let start = entry.response_start;
                    let response = &pending_bytes[start..start + entry.response_len];
                    match (entry.secure, coaps.as_deref_mut()) {
                        (true, Some(coaps)) => {
                            coaps.endpoint.committed(&entry.exchange);
                            if !response.is_empty() {
                                coaps.respond(entry.exchange.peer, response);
                            }
                        }
                        _ => {
                            endpoint.committed(&entry.exchange);
                            if !response.is_empty() {
                                send.push(entry.exchange.peer, response);
                            }
                        }
                    }
                }
            }
            Err(error) => {
                if !*failing {
                    tracing::error!(shard = self.index, %error, "commit failed; answering 5.03 until it succeeds");
                    *failing = true;
                }
                self.metrics.commit_errors.fetch_add(1, Ordering::Relaxed);
                self.metrics.set_commit_failed(true);
                let mut response = Vec::new();
                for entry in pending.iter() {
                    match (entry.secure, coaps.as_deref_mut()) {
                        (true, Some(coaps)) => {
                            coaps.endpoint.unavailable(
                                &entry.exchange,
                                UNAVAILABLE_MAX_AGE_S,
                                &mut response,
                            );
                            if !response.is_empty() {
                                coaps.respond(entry.exchange.peer, &response);
                            }
                        }
                        _ => {
                            endpoint.unavailable(
                                &entry.exchange,
                                UNAVAILABLE_MAX_AGE_S,
                                &mut response,
                            );
                            if !response.is_empty() {
                                send.push(entry.exchange.peer, &response);
                            }
                        }
                    }
                }
            }
        }
    }

    /// Seeds the dedup table with the exchanges recovered from the store that are still within
    /// their lifetime.
    fn restore(&self, endpoint: &mut Endpoint) {
        let now = Instant::now();
        let unix_now = unix_seconds(SystemTime::now());
        let restored = self
            .history
            .iter()
            .filter(|exchange| {
                let age = Duration::from_secs_f64((unix_now - exchange.arrival).max(0.0));
                endpoint.restore(
                    now,
                    age,
                    exchange.peer,
                    exchange.message_id,
                    exchange.confirmable,
                    &exchange.response,
                )
            })
            .count();
        if restored > 0 {
            tracing::info!(
                shard = self.index,
                restored,
                "exchanges restored from the store"
            );
        }
    }

    fn publish(&self, endpoint: &Endpoint, coaps: Option<&Coaps>) {
        if let Ok(mut counters) = self.metrics.protocol.lock() {
            counters.clone_from(endpoint.counters());
            if let Some(coaps) = coaps {
                crate::coaps::add_counters(&mut counters, coaps.protocol_counters());
                coaps.publish(&self.metrics);
            }
        }
        self.metrics
            .dedup_entries
            .store(endpoint.dedup_len() as u64, Ordering::Relaxed);
    }
}

fn value(reading: &Reading) -> ValueRef<'_> {
    match &reading.value {
        Value::Number(n) => ValueRef::Number(*n),
        Value::Bool(b) => ValueRef::Bool(*b),
        Value::String(s) => ValueRef::String(s),
        Value::Data(d) => ValueRef::Data(d),
    }
}

pub fn unix_seconds(time: SystemTime) -> f64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}
