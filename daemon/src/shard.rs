//! One shard: an OS thread owning its socket, its protocol endpoint (dedup and Block1 state) and
//! its store writer. Per batch: receive, decode, append, group commit, then send the responses.

use std::net::UdpSocket;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sluice_protocol::{Endpoint, EndpointConfig, Exchange, Outcome, Reading, Value};
use sluice_storage::{ExchangeRecord, ShardWriter, ValueRef};

use crate::io::{ReceiveBatch, SendBatch};
use crate::metrics::{self, ShardMetrics};

/// Max-Age (seconds) of a 5.03 sent when a commit failed: how long a device should back off.
pub const UNAVAILABLE_MAX_AGE_S: u32 = 30;
/// How often expired dedup entries and Block1 transfers are dropped.
const EXPIRE_INTERVAL: Duration = Duration::from_secs(1);

pub struct Shard {
    pub index: usize,
    pub socket: Option<UdpSocket>,
    pub writer: ShardWriter,
    pub metrics: Arc<ShardMetrics>,
    pub shutdown: Arc<AtomicBool>,
    /// Exchanges acknowledged before the restart (every shard's, oldest first): seeds the dedup
    /// table so their retransmissions are answered again, not stored twice.
    pub history: Arc<Vec<ExchangeRecord>>,
}

/// A stored exchange whose response waits for the commit that covers it.
struct Pending {
    exchange: Exchange,
    response_start: usize,
    response_len: usize,
}

impl Shard {
    pub fn run(mut self) {
        let Some(socket) = self.socket.take() else {
            return;
        };
        let mut endpoint = Endpoint::new(EndpointConfig::default());
        self.restore(&mut endpoint);
        let mut receive = ReceiveBatch::new();
        let mut send = SendBatch::new();
        let mut readings: Vec<Reading> = Vec::new();
        let mut response: Vec<u8> = Vec::new();
        let mut pending: Vec<Pending> = Vec::new();
        let mut pending_bytes: Vec<u8> = Vec::new();
        let mut last_expire = Instant::now();
        let mut failing = false;

        while !self.shutdown.load(Ordering::Relaxed) {
            let count = match receive.receive(&socket) {
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
            };
            let received_at = Instant::now();
            let unix_now = unix_seconds(SystemTime::now());
            for index in 0..count {
                let (peer, datagram) = receive.datagram(index);
                let Some(peer) = peer else { continue };
                readings.clear();
                match endpoint.handle(
                    received_at,
                    unix_now,
                    peer,
                    None,
                    datagram,
                    &mut readings,
                    &mut response,
                ) {
                    Outcome::Ignore => {}
                    Outcome::Reply => send.push(peer, &response),
                    Outcome::Store(exchange) => {
                        if let Err(error) = check(&self.writer, &exchange.device, &readings) {
                            // Nothing of the request is stored: one refused reading refuses all.
                            endpoint.rejected(&exchange, &error.to_string(), &mut response);
                            if !response.is_empty() {
                                send.push(peer, &response);
                            }
                            continue;
                        }
                        if let Err(error) = append(&mut self.writer, &exchange.device, &readings) {
                            // Only a shard out of series ids gets here (2^32 of them).
                            tracing::error!(shard = self.index, %error, "append failed");
                        }
                        let recorded = self.writer.record_exchange(
                            peer,
                            exchange.message_id,
                            exchange.confirmable,
                            unix_now,
                            &response,
                        );
                        if let Err(error) = recorded {
                            // A response above 255 bytes: its retransmission after a restart
                            // would be stored again. A 2.04 of this daemon is far smaller.
                            tracing::warn!(shard = self.index, %error, "exchange not recorded");
                        }
                        pending.push(Pending {
                            exchange,
                            response_start: pending_bytes.len(),
                            response_len: response.len(),
                        });
                        pending_bytes.extend_from_slice(&response);
                    }
                }
            }

            if !pending.is_empty() {
                self.commit(
                    &mut endpoint,
                    &mut pending,
                    &pending_bytes,
                    &mut send,
                    &mut failing,
                );
                pending.clear();
                pending_bytes.clear();
            }
            let dropped = send.flush(&socket);
            if count > 0 {
                let latency_us = received_at.elapsed().as_micros() as u64;
                if let Ok(mut histogram) = self.metrics.ack_latency_us.lock() {
                    metrics::record(&mut histogram, latency_us, count as u64);
                }
            }
            if dropped > 0 {
                self.metrics
                    .responses_dropped
                    .fetch_add(dropped as u64, Ordering::Relaxed);
            }
            if received_at.duration_since(last_expire) >= EXPIRE_INTERVAL {
                endpoint.expire(received_at);
                last_expire = received_at;
            }
            self.publish(&endpoint);
        }
        tracing::debug!(shard = self.index, "shard stopped");
    }

    /// Group commit of every reading appended in this batch; then the stored exchanges'
    /// responses are queued, or 5.03 when the store could not make them durable.
    fn commit(
        &mut self,
        endpoint: &mut Endpoint,
        pending: &mut [Pending],
        pending_bytes: &[u8],
        send: &mut SendBatch,
        failing: &mut bool,
    ) {
        let started = Instant::now();
        let result = self.writer.commit();
        let commit_us = started.elapsed().as_micros() as u64;
        match result {
            Ok(stats) => {
                if *failing {
                    tracing::info!(shard = self.index, "commits succeed again");
                    *failing = false;
                }
                self.metrics.commits.fetch_add(1, Ordering::Relaxed);
                self.metrics
                    .points_stored
                    .fetch_add(stats.points as u64, Ordering::Relaxed);
                if let Ok(mut histogram) = self.metrics.commit_latency_us.lock() {
                    metrics::record(&mut histogram, commit_us, 1);
                }
                for entry in pending.iter() {
                    endpoint.committed(&entry.exchange);
                    if entry.response_len > 0 {
                        let start = entry.response_start;
                        send.push(
                            entry.exchange.peer,
                            &pending_bytes[start..start + entry.response_len],
                        );
                    }
                }
            }
            Err(error) => {
                if !*failing {
                    tracing::error!(shard = self.index, %error, "commit failed; answering 5.03 until it succeeds");
                    *failing = true;
                }
                self.metrics.commit_errors.fetch_add(1, Ordering::Relaxed);
                let mut response = Vec::new();
                for entry in pending.iter() {
                    endpoint.unavailable(&entry.exchange, UNAVAILABLE_MAX_AGE_S, &mut response);
                    if !response.is_empty() {
                        send.push(entry.exchange.peer, &response);
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

    fn publish(&self, endpoint: &Endpoint) {
        if let Ok(mut counters) = self.metrics.protocol.lock() {
            counters.clone_from(endpoint.counters());
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

/// Whether the store can hold every reading of a request.
fn check(
    writer: &ShardWriter,
    device: &str,
    readings: &[Reading],
) -> Result<(), sluice_storage::StoreError> {
    readings
        .iter()
        .try_for_each(|r| writer.check(device, &r.name, r.time, &value(r)))
}

fn append(
    writer: &mut ShardWriter,
    device: &str,
    readings: &[Reading],
) -> Result<(), sluice_storage::StoreError> {
    readings
        .iter()
        .try_for_each(|r| writer.append(device, &r.name, r.time, value(r)))
}

pub fn unix_seconds(time: SystemTime) -> f64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}
