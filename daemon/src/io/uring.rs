//! The io_uring backend: one ring per shard. Each socket has a multishot RecvMsg armed over its
//! own ring of provided buffers ([`BufRing`]): the kernel fills a free buffer with each datagram
//! (source address, control messages, payload) and posts a completion, with no system call per
//! batch. Responses go out as SendMsg entries submitted together. A durable commit's writes and
//! fdatasyncs go on the same ring as linked entries (each starts when the one before it
//! succeeded; a failure cancels the rest), so the shard blocks only in io_uring_enter (with a
//! timeout, for its timers and the shutdown flag) and never in a write or an fdatasync.
//!
//! A multishot receive ends when no buffer is left (ENOBUFS) or for any other reason its
//! completion lacks the MORE flag: the shard gives its buffers back after each batch and arms it
//! again (`sluice_receive_rearms_total`); meanwhile datagrams wait in the socket's queue.

use std::collections::VecDeque;
use std::io;
use std::mem;
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use io_uring::{cqueue, opcode, squeue, types, IoUring, Probe};
use sluice_storage::{Prepared, RawOperation, StoreError};

use super::{
    arrival, socket_addr, SendBatch, CONTROL_BYTES_PER_DATAGRAM, DATAGRAMS_PER_BATCH_MAX,
    DATAGRAM_BYTES_MAX, RECEIVE_TIMEOUT,
};
use crate::metrics::ShardMetrics;

/// Provided buffers per socket (a power of two): datagrams the kernel can hand over before the
/// shard gives buffers back. Address space of 256 × 68 KiB per socket; only the pages datagrams
/// are written to are backed by memory.
pub const BUFFERS_PER_SOCKET: u16 = 256;
/// Size of `struct io_uring_recvmsg_out`, which starts every filled buffer.
const RECVMSG_OUT_BYTES: usize = 16;
/// Room for the source address in a filled buffer.
const NAME_BYTES: usize = mem::size_of::<libc::sockaddr_storage>();
/// One provided buffer: header, address, control messages and the largest datagram, rounded up
/// to whole pages.
pub const BUFFER_BYTES: usize =
    (RECVMSG_OUT_BYTES + NAME_BYTES + CONTROL_BYTES_PER_DATAGRAM + DATAGRAM_BYTES_MAX)
        .div_ceil(4096)
        * 4096;
/// Responses handed to the kernel and not completed yet; a flush beyond it waits for
/// completions. Each slot's bytes stay owned by the ring until its completion.
pub const SENDS_IN_FLIGHT_MAX: usize = 256;
/// A commit's operations submitted as one linked chain at most; a commit with more (one that
/// wrote to many partitions) goes in several chains, one after the other.
const COMMIT_CHAIN_MAX: usize = 32;
/// Submission queue entries: a batch of sends plus the receives and a commit chain.
const SUBMISSION_ENTRIES: u32 = 512;
/// Completion queue entries: every buffer of both sockets, every send and a commit chain, twice.
const COMPLETION_ENTRIES: u32 =
    2 * (2 * BUFFERS_PER_SOCKET as u32 + SENDS_IN_FLIGHT_MAX as u32 + COMMIT_CHAIN_MAX as u32);
/// Attempts to find room in the submission queue (submitting in between) before giving up.
const PUSH_ATTEMPTS_MAX: usize = 4;
/// Waits of `RECEIVE_TIMEOUT` for a free send slot, or at tear-down for the kernel to finish.
const WAITS_MAX: usize = 10;

/// User data of an entry: its kind in the high 32 bits, an index in the low ones.
const KIND_RECEIVE: u64 = 1;
const KIND_SEND: u64 = 2;
const KIND_COMMIT: u64 = 3;
const KIND_CANCEL: u64 = 4;

fn user_data(kind: u64, index: usize) -> u64 {
    (kind << 32) | index as u64
}

/// A commit operation's index in user data: its chain's number (wrapping) and its position in
/// the chain.
const CHAIN_POSITION_BITS: u32 = 6;
const CHAIN_NUMBER_MASK: u32 = u32::MAX >> CHAIN_POSITION_BITS;
const _: () = assert!(COMMIT_CHAIN_MAX <= 1 << CHAIN_POSITION_BITS);

fn chain_data(number: u32, position: usize) -> usize {
    ((number as usize) << CHAIN_POSITION_BITS) | position
}

/// Whether this kernel lets the shards use io_uring: the ring can be set up (not refused by
/// seccomp or `kernel.io_uring_disabled`), it has the features and opcodes used here, and a
/// multishot RecvMsg over a provided-buffer ring (Linux 6.0) receives a datagram on loopback.
/// The error says what is missing.
pub fn probe() -> Result<(), String> {
    let ring = IoUring::new(8).map_err(|error| format!("io_uring_setup: {error}"))?;
    if !ring.params().is_feature_ext_arg() {
        return Err("no IORING_FEAT_EXT_ARG (Linux 5.11)".into());
    }
    if !ring.params().is_feature_nodrop() {
        return Err("no IORING_FEAT_NODROP (Linux 5.5)".into());
    }
    if !ring.params().is_feature_skip_cqe_on_success() {
        return Err("no IORING_FEAT_CQE_SKIP (Linux 5.17)".into());
    }
    let mut probe = Probe::new();
    ring.submitter()
        .register_probe(&mut probe)
        .map_err(|error| format!("IORING_REGISTER_PROBE: {error}"))?;
    for (code, name) in [
        (opcode::RecvMsg::CODE, "RECVMSG"),
        (opcode::SendMsg::CODE, "SENDMSG"),
        (opcode::Write::CODE, "WRITE"),
        (opcode::Fsync::CODE, "FSYNC"),
        (opcode::AsyncCancel::CODE, "ASYNC_CANCEL"),
    ] {
        if !probe.is_supported(code) {
            return Err(format!("no IORING_OP_{name}"));
        }
    }
    drop(ring);
    self_test().map_err(|error| format!("multishot RecvMsg self-test: {error}"))
}

/// One datagram through a [`Ring`] on loopback.
fn self_test() -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let socket = std::net::UdpSocket::bind("127.0.0.1:0")?;
    let metrics = Arc::new(ShardMetrics::new());
    let mut ring = Ring::new([Some(socket.as_raw_fd()), None], 2, metrics)?;
    let sockets = [Some(socket.as_raw_fd()), None];
    socket.send_to(b"sluice", socket.local_addr()?)?;
    for _ in 0..WAITS_MAX {
        if ring.wait(sockets, false)[0] && ring.receive(socket.as_raw_fd()) == 1 {
            return match ring.datagram(0) {
                (Some(_), b"sluice") => Ok(()),
                _ => Err(io::Error::other("the datagram came back wrong")),
            };
        }
    }
    Err(io::Error::new(
        io::ErrorKind::TimedOut,
        "no datagram received",
    ))
}

/// A ring of provided buffers registered with an io_uring (IORING_REGISTER_PBUF_RING): the
/// kernel takes a buffer from the head for each datagram and names it (its id) in the
/// completion; the owner gives it back at the tail once done with it.
pub struct BufRing {
    /// `count` ring entries, page-aligned (mmap); the tail shares entry 0's last field.
    entries: *mut types::BufRingEntry,
    /// `count` buffers of `buffer_bytes`, buffer id `i` at `i * buffer_bytes`.
    memory: *mut u8,
    count: u16,
    buffer_bytes: usize,
    group: u16,
    /// The tail as written so far; the kernel sees it once published.
    tail: u16,
    /// Buffers given to the kernel and not yet handed back in a completion.
    in_kernel: u16,
}

impl BufRing {
    /// Maps the ring and `count` (a power of two, at most 32768) buffers of `buffer_bytes`.
    pub fn new(count: u16, buffer_bytes: usize, group: u16) -> io::Result<BufRing> {
        if !count.is_power_of_two() || count > 1 << 15 || buffer_bytes == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "buffer ring: a power-of-two count up to 32768 of non-empty buffers",
            ));
        }
        let ring_bytes = usize::from(count) * mem::size_of::<types::BufRingEntry>();
        let entries: *mut types::BufRingEntry = map(ring_bytes)?.cast();
        let memory = match map(usize::from(count) * buffer_bytes) {
            Ok(memory) => memory,
            Err(error) => {
                // SAFETY: `entries` was mapped above with this length and is not used after.
                unsafe { libc::munmap(entries.cast(), ring_bytes) };
                return Err(error);
            }
        };
        Ok(BufRing {
            entries,
            memory,
            count,
            buffer_bytes,
            group,
            tail: 0,
            in_kernel: 0,
        })
    }

    /// Registers the ring with `ring` under its group id and gives the kernel every buffer.
    pub fn register(&mut self, ring: &IoUring) -> io::Result<()> {
        // SAFETY: `entries` is a page-aligned mapping of `count` entries that lives until this
        // BufRing is dropped, after the io_uring it is registered with (see `Ring`'s Drop).
        unsafe {
            ring.submitter().register_buf_ring_with_flags(
                self.entries as u64,
                self.count,
                self.group,
                0,
            )?
        };
        for id in 0..self.count {
            self.provide(id);
        }
        self.publish();
        Ok(())
    }

    /// Puts buffer `id` at the tail (seen by the kernel once published). `id` must be one the
    /// kernel handed back and nobody reads any more.
    pub fn provide(&mut self, id: u16) {
        debug_assert!(id < self.count && self.in_kernel < self.count);
        let slot = usize::from(self.tail & (self.count - 1));
        // SAFETY: `slot` < count, within the mapping. Setting addr, len and bid leaves entry 0's
        // `resv` (the tail) alone; the kernel reads entries only up to the published tail.
        let entry = unsafe { &mut *self.entries.add(slot) };
        entry.set_addr(self.buffer_ptr(id) as u64);
        entry.set_len(self.buffer_bytes as u32);
        entry.set_bid(id);
        self.tail = self.tail.wrapping_add(1);
        self.in_kernel += 1;
    }

    /// Makes every buffer provided so far visible to the kernel: a release store of the tail,
    /// so the entries written before it are seen with it (the kernel loads it with acquire).
    pub fn publish(&self) {
        // SAFETY: `entries` points at the ring's first entry, whose `resv` field is the tail; a
        // u16 field is aligned for AtomicU16, and the kernel only reads it.
        unsafe {
            let tail = types::BufRingEntry::tail(self.entries).cast_mut();
            AtomicU16::from_ptr(tail).store(self.tail, Ordering::Release);
        }
    }

    /// A completion handed buffer `id` back to us. False for an id this ring never had.
    fn returned(&mut self, id: u16) -> bool {
        if id >= self.count || self.in_kernel == 0 {
            return false;
        }
        self.in_kernel -= 1;
        true
    }

    /// Buffers the kernel can still fill.
    pub fn in_kernel(&self) -> u16 {
        self.in_kernel
    }

    fn buffer_ptr(&self, id: u16) -> *mut u8 {
        // SAFETY: id < count: within the mapping.
        unsafe { self.memory.add(usize::from(id) * self.buffer_bytes) }
    }

    /// The first `len` bytes of buffer `id` (as filled by the kernel).
    fn buffer(&self, id: u16, len: usize) -> &[u8] {
        debug_assert!(id < self.count);
        // SAFETY: buffer `id` is one the kernel handed back and not provided again since, so
        // nothing writes to it while the slice lives (it is provided again only through
        // `&mut self`); `len` is clamped to the buffer.
        unsafe { std::slice::from_raw_parts(self.buffer_ptr(id), len.min(self.buffer_bytes)) }
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        let ring_bytes = usize::from(self.count) * mem::size_of::<types::BufRingEntry>();
        // SAFETY: both mappings were made in `new` with these lengths; nothing uses them after.
        unsafe {
            libc::munmap(self.entries.cast(), ring_bytes);
            libc::munmap(
                self.memory.cast(),
                usize::from(self.count) * self.buffer_bytes,
            );
        }
    }
}

/// An anonymous private mapping of `bytes` (page-aligned, zeroed, backed on first touch).
fn map(bytes: usize) -> io::Result<*mut u8> {
    // SAFETY: a fresh anonymous mapping; no existing memory is affected.
    let address = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            bytes,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if address == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    Ok(address.cast())
}

/// One socket's multishot receive.
struct Receiver {
    fd: RawFd,
    buffers: BufRing,
    /// What each filled buffer holds room for (name and control lengths); read by the kernel
    /// when the receive is armed, kept for parsing.
    header: Box<libc::msghdr>,
    armed: bool,
    /// The receive ended at least once: arming it again is a re-arm.
    ended: bool,
    /// Filled buffers not taken yet: buffer id and bytes written, in arrival order. Never more
    /// than the buffers, so it never grows.
    ready: VecDeque<(u16, u32)>,
}

/// A datagram of the current batch, still in its buffer.
struct Taken {
    id: u16,
    peer: Option<SocketAddr>,
    payload_start: usize,
    payload_len: usize,
    arrival: Option<SystemTime>,
}

/// A response handed to the kernel: everything SendMsg reads, kept until its completion.
struct SendSlot {
    header: libc::msghdr,
    iovec: libc::iovec,
    address: libc::sockaddr_storage,
    bytes: Vec<u8>,
}

/// A commit handed to the ring: its operations are submitted a chain at a time.
struct Commit {
    prepared: Prepared,
    /// The first operation not submitted yet.
    next: usize,
    /// The chain on the ring: its number, first and last operation. Only a failure or the last
    /// operation posts a completion (the others skip theirs on success; after a failure the
    /// kernel cancels the rest of the chain, posting nothing or -ECANCELED): either ends it.
    chain: Option<(u32, usize, usize)>,
    /// The first operation that failed, and why.
    failure: Option<(usize, io::Error)>,
}

/// The ring of one shard and the state of its receives, sends and commit.
pub struct Ring {
    ring: IoUring,
    receivers: [Option<Receiver>; 2],
    /// The datagrams of the last `receive`, all from `batch_owner`'s buffers.
    batch: Vec<Taken>,
    batch_owner: usize,
    sends: Box<[SendSlot]>,
    free_sends: Vec<usize>,
    /// Sends the kernel refused since the last flush.
    sends_refused: usize,
    /// The commit whose operations are on the ring.
    commit: Option<Commit>,
    /// The next chain's number.
    chains: u32,
    /// Its outcome, once every operation completed (or one failed).
    committed: Option<(Prepared, Result<(), StoreError>)>,
    timeout: types::Timespec,
    metrics: Arc<ShardMetrics>,
}

impl Ring {
    /// A ring for `sockets` (the CoAP and CoAPS socket, None: not served), `buffers` provided
    /// buffers each.
    pub fn new(
        sockets: [Option<RawFd>; 2],
        buffers: u16,
        metrics: Arc<ShardMetrics>,
    ) -> io::Result<Ring> {
        // Deferred task work (Linux 6.1): the kernel fills buffers and posts completions when
        // the shard enters the ring to wait, in one go, instead of interrupting it for each
        // datagram. The ring is then used by the thread that made it only (the shard's).
        let ring = IoUring::builder()
            .setup_cqsize(COMPLETION_ENTRIES)
            .setup_single_issuer()
            .setup_defer_taskrun()
            .setup_taskrun_flag()
            .build(SUBMISSION_ENTRIES)
            .or_else(|_| {
                IoUring::builder()
                    .setup_cqsize(COMPLETION_ENTRIES)
                    .setup_coop_taskrun()
                    .setup_taskrun_flag()
                    .build(SUBMISSION_ENTRIES)
            })
            .or_else(|_| {
                IoUring::builder()
                    .setup_cqsize(COMPLETION_ENTRIES)
                    .build(SUBMISSION_ENTRIES)
            })?;
        if !ring.params().is_feature_ext_arg() {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "io_uring without IORING_FEAT_EXT_ARG",
            ));
        }
        let mut receivers = [None, None];
        for (group, fd) in sockets.into_iter().enumerate() {
            let Some(fd) = fd else { continue };
            let mut ring_buffers = BufRing::new(buffers, BUFFER_BYTES, group as u16)?;
            ring_buffers.register(&ring)?;
            // SAFETY: msghdr is plain old data; zero is a valid value for every field.
            let mut header: Box<libc::msghdr> = Box::new(unsafe { mem::zeroed() });
            header.msg_namelen = NAME_BYTES as libc::socklen_t;
            header.msg_controllen = CONTROL_BYTES_PER_DATAGRAM as _;
            receivers[group] = Some(Receiver {
                fd,
                buffers: ring_buffers,
                header,
                armed: false,
                ended: false,
                ready: VecDeque::with_capacity(usize::from(buffers)),
            });
        }
        let sends = (0..SENDS_IN_FLIGHT_MAX)
            .map(|_| SendSlot {
                // SAFETY: plain old data, all zeroes valid.
                header: unsafe { mem::zeroed() },
                iovec: libc::iovec {
                    iov_base: std::ptr::null_mut(),
                    iov_len: 0,
                },
                // SAFETY: plain old data, all zeroes valid (AF_UNSPEC).
                address: unsafe { mem::zeroed() },
                bytes: Vec::with_capacity(256),
            })
            .collect();
        Ok(Ring {
            ring,
            receivers,
            batch: Vec::with_capacity(DATAGRAMS_PER_BATCH_MAX),
            batch_owner: 0,
            sends,
            free_sends: (0..SENDS_IN_FLIGHT_MAX).rev().collect(),
            sends_refused: 0,
            commit: None,
            chains: 0,
            committed: None,
            timeout: types::Timespec::from(RECEIVE_TIMEOUT),
            metrics,
        })
    }

    /// See [`super::ShardIo::wait`]: `sockets[0]`/`sockets[1]` say whether the CoAP/CoAPS
    /// socket is received from now, `commit` whether the commit handed over is waited for.
    pub fn wait(&mut self, sockets: [Option<RawFd>; 2], commit: bool) -> [bool; 3] {
        if sockets.iter().all(Option::is_none) && !commit {
            return [false; 3];
        }
        self.recycle();
        for (index, fd) in sockets.iter().enumerate() {
            if fd.is_some() {
                self.arm(index);
            }
        }
        let outcome = if self.ready(sockets, commit).iter().any(|ready| *ready) {
            self.ring.submit()
        } else {
            let args = types::SubmitArgs::new().timespec(&self.timeout);
            self.ring.submitter().submit_with_args(1, &args)
        };
        if let Err(error) = outcome {
            if !matches!(
                error.raw_os_error(),
                Some(libc::ETIME | libc::EINTR | libc::EBUSY)
            ) {
                tracing::warn!(%error, "io_uring_enter failed");
            }
        }
        self.reap();
        self.advance_commit();
        self.ready(sockets, commit)
    }

    fn ready(&self, sockets: [Option<RawFd>; 2], commit: bool) -> [bool; 3] {
        let has = |index: usize| {
            sockets[index].is_some()
                && self.receivers[index]
                    .as_ref()
                    .is_some_and(|receiver| !receiver.ready.is_empty())
        };
        [has(0), has(1), commit && self.committed.is_some()]
    }

    /// See [`super::ShardIo::commit`]. A backend whose files have no descriptor (not the real
    /// file system) has the commit performed here.
    pub fn commit(&mut self, prepared: Prepared) {
        if prepared.operations() == 0 || prepared.raw_operation(0).is_none() {
            let result = prepared.perform();
            self.committed = Some((prepared, result));
            return;
        }
        self.commit = Some(Commit {
            prepared,
            next: 0,
            chain: None,
            failure: None,
        });
        self.advance_commit();
    }

    /// See [`super::ShardIo::committed`].
    pub fn committed(&mut self) -> Option<(Prepared, Result<(), StoreError>)> {
        self.committed.take()
    }

    /// Once the commit's last chain completed: submits the next chain, or ends the commit.
    fn advance_commit(&mut self) {
        let Some(commit) = self.commit.as_mut() else {
            return;
        };
        if commit.chain.is_some() {
            return;
        }
        let count = commit.prepared.operations();
        if commit.failure.is_some() || commit.next == count {
            let Some(commit) = self.commit.take() else {
                return;
            };
            let result = match commit.failure {
                Some((index, error)) => Err(commit.prepared.failed(index, error)),
                None => Ok(()),
            };
            self.committed = Some((commit.prepared, result));
            return;
        }
        let (first, end) = (
            commit.next,
            commit.next + (count - commit.next).min(COMMIT_CHAIN_MAX),
        );
        let mut entries = Vec::with_capacity(end - first);
        for index in first..end {
            let entry = match commit.prepared.raw_operation(index) {
                Some(RawOperation::Write { fd, offset, bytes }) => {
                    opcode::Write::new(types::Fd(fd), bytes.as_ptr(), bytes.len() as u32)
                        .offset(offset)
                        .build()
                }
                Some(RawOperation::Sync { fd }) => opcode::Fsync::new(types::Fd(fd))
                    .flags(types::FsyncFlags::DATASYNC)
                    .build(),
                None => {
                    commit.failure = Some((index, io::Error::other("no file descriptor")));
                    return self.advance_commit();
                }
            };
            let flags = if index + 1 < end {
                squeue::Flags::IO_LINK | squeue::Flags::SKIP_SUCCESS
            } else {
                squeue::Flags::empty()
            };
            let data = user_data(KIND_COMMIT, chain_data(self.chains, index - first));
            entries.push(entry.flags(flags).user_data(data));
        }
        // A chain is linked only within one submission: make room for all of it first.
        {
            let submission = self.ring.submission();
            if submission.capacity() - submission.len() < entries.len() {
                drop(submission);
                let _ = self.ring.submit();
            }
        }
        // SAFETY: the bytes written live in the Prepared, which stays in `self.commit` (its
        // heap buffer never moves) until every entry of the chain completed; descriptors are
        // kept open by its file handles.
        let pushed = unsafe { self.ring.submission().push_multiple(&entries) };
        match pushed {
            Ok(()) => {
                commit.chain = Some((self.chains, first, end - 1));
                commit.next = end;
                self.chains = self.chains.wrapping_add(1) & CHAIN_NUMBER_MASK;
                if let Err(error) = self.ring.submit() {
                    if !matches!(error.raw_os_error(), Some(libc::EINTR | libc::EBUSY)) {
                        tracing::warn!(%error, "io_uring_enter failed");
                    }
                }
            }
            Err(_) => {
                commit.failure = Some((
                    commit.next,
                    io::Error::other("io_uring submission queue full"),
                ));
                self.advance_commit();
            }
        }
    }

    /// Takes up to a batch of the datagrams received on socket `fd`; returns how many. The
    /// buffers of the previous batch go back to the kernel first.
    pub fn receive(&mut self, fd: RawFd) -> usize {
        self.recycle();
        self.reap();
        let Some(index) = self
            .receivers
            .iter()
            .position(|r| r.as_ref().is_some_and(|r| r.fd == fd))
        else {
            return 0;
        };
        self.arm(index);
        let Some(receiver) = self.receivers[index].as_mut() else {
            return 0;
        };
        self.batch_owner = index;
        let mut malformed = false;
        while self.batch.len() < DATAGRAMS_PER_BATCH_MAX {
            let Some((id, len)) = receiver.ready.pop_front() else {
                break;
            };
            let buffer = receiver.buffers.buffer(id, len as usize);
            match parse(buffer, &receiver.header) {
                Some((peer, payload_start, payload_len, arrival)) => self.batch.push(Taken {
                    id,
                    peer,
                    payload_start,
                    payload_len,
                    arrival,
                }),
                None => {
                    malformed = true;
                    receiver.buffers.provide(id);
                }
            }
        }
        if malformed {
            receiver.buffers.publish();
            tracing::warn!("io_uring: a receive completion too short for its header; dropped");
        }
        self.batch.len()
    }

    pub fn datagram(&self, index: usize) -> (Option<SocketAddr>, &[u8]) {
        let taken = &self.batch[index];
        let Some(receiver) = self.receivers[self.batch_owner].as_ref() else {
            return (None, &[]);
        };
        let buffer = receiver
            .buffers
            .buffer(taken.id, taken.payload_start + taken.payload_len);
        (taken.peer, &buffer[taken.payload_start..])
    }

    pub fn arrival(&self, index: usize) -> Option<SystemTime> {
        self.batch.get(index).and_then(|taken| taken.arrival)
    }

    /// Hands every response of `batch` to the kernel as SendMsg entries, submitted together.
    /// Returns the sends the kernel refused since the last call, and those that found no slot.
    pub fn send(&mut self, fd: RawFd, batch: &SendBatch) -> usize {
        let mut dropped = 0;
        for (address, start, len) in &batch.messages {
            let Some(slot) = self.free_send_slot() else {
                dropped += 1;
                continue;
            };
            let entry = {
                let send = &mut self.sends[slot];
                send.bytes.clear();
                send.bytes
                    .extend_from_slice(&batch.bytes[*start..*start + *len]);
                let address_len = (address.len() as usize).min(NAME_BYTES);
                // SAFETY: copies the address's bytes (at most a sockaddr_storage) into ours.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        address.as_ptr().cast::<u8>(),
                        (&mut send.address as *mut libc::sockaddr_storage).cast::<u8>(),
                        address_len,
                    )
                };
                send.iovec = libc::iovec {
                    iov_base: send.bytes.as_mut_ptr().cast(),
                    iov_len: send.bytes.len(),
                };
                // SAFETY: plain old data, all zeroes valid; filled in below.
                send.header = unsafe { mem::zeroed() };
                send.header.msg_name = (&mut send.address as *mut libc::sockaddr_storage).cast();
                send.header.msg_namelen = address_len as libc::socklen_t;
                send.header.msg_iov = &mut send.iovec;
                send.header.msg_iovlen = 1;
                opcode::SendMsg::new(types::Fd(fd), &send.header)
                    .build()
                    .user_data(user_data(KIND_SEND, slot))
            };
            // SAFETY: the slot (header, iovec, address, bytes, in a boxed slice that never
            // moves) is not touched again until its completion puts it back in `free_sends`.
            if !unsafe { self.push(&entry) } {
                self.free_sends.push(slot);
                dropped += 1;
            }
        }
        if let Err(error) = self.ring.submit() {
            if !matches!(error.raw_os_error(), Some(libc::EINTR | libc::EBUSY)) {
                tracing::warn!(%error, "io_uring_enter failed");
            }
        }
        dropped + mem::take(&mut self.sends_refused)
    }

    /// A send slot, waiting for completions (bounded) when all are in flight.
    fn free_send_slot(&mut self) -> Option<usize> {
        for _ in 0..WAITS_MAX {
            if let Some(slot) = self.free_sends.pop() {
                return Some(slot);
            }
            let args = types::SubmitArgs::new().timespec(&self.timeout);
            let _ = self.ring.submitter().submit_with_args(1, &args);
            self.reap();
        }
        self.free_sends.pop()
    }

    /// Arms socket `index`'s multishot receive unless it is armed or has no buffer to fill.
    fn arm(&mut self, index: usize) {
        let Some(receiver) = self.receivers[index].as_mut() else {
            return;
        };
        if receiver.armed || receiver.buffers.in_kernel() == 0 {
            return;
        }
        let entry = opcode::RecvMsgMulti::new(
            types::Fd(receiver.fd),
            &*receiver.header,
            receiver.buffers.group,
        )
        .build()
        .user_data(user_data(KIND_RECEIVE, index));
        if receiver.ended {
            self.metrics.receive_rearms.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: the header is boxed and lives as long as the ring; the buffers it fills are
        // the registered ring's.
        let pushed = unsafe { self.push(&entry) };
        if let Some(receiver) = self.receivers[index].as_mut() {
            receiver.armed = pushed;
        }
    }

    /// Gives the buffers of the last batch back to the kernel.
    fn recycle(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        if let Some(receiver) = self.receivers[self.batch_owner].as_mut() {
            for taken in &self.batch {
                receiver.buffers.provide(taken.id);
            }
            receiver.buffers.publish();
        }
        self.batch.clear();
    }

    /// Queues `entry`, submitting (and taking completions) to make room if needed. False when
    /// there was no room.
    ///
    /// # Safety
    /// Whatever memory `entry` points at must stay valid until its completion.
    unsafe fn push(&mut self, entry: &squeue::Entry) -> bool {
        for _ in 0..PUSH_ATTEMPTS_MAX {
            // SAFETY: forwarded to the caller.
            if unsafe { self.ring.submission().push(entry) }.is_ok() {
                return true;
            }
            let _ = self.ring.submit();
            self.reap();
        }
        tracing::warn!("io_uring submission queue full: an entry was not queued");
        false
    }

    /// Takes every completion: received datagrams queue behind their socket, finished sends
    /// free their slot, a commit's operations are counted (and their failures kept).
    fn reap(&mut self) {
        let Ring {
            ring,
            receivers,
            free_sends,
            sends_refused,
            commit,
            metrics,
            ..
        } = self;
        for completion in ring.completion() {
            let data = completion.user_data();
            let result = completion.result();
            let flags = completion.flags();
            let index = (data & u64::from(u32::MAX)) as usize;
            match data >> 32 {
                KIND_RECEIVE => {
                    let Some(receiver) = receivers.get_mut(index).and_then(Option::as_mut) else {
                        continue;
                    };
                    if let Some(id) = cqueue::buffer_select(flags) {
                        if !receiver.buffers.returned(id) {
                            tracing::error!(id, "io_uring: a completion names an unknown buffer");
                        } else if result > 0 {
                            receiver.ready.push_back((id, result as u32));
                        } else {
                            receiver.buffers.provide(id);
                            receiver.buffers.publish();
                        }
                    }
                    if !cqueue::more(flags) {
                        receiver.armed = false;
                        receiver.ended = true;
                        if result == -libc::ENOBUFS {
                            metrics
                                .receive_buffers_exhausted
                                .fetch_add(1, Ordering::Relaxed);
                        } else if result < 0 && result != -libc::ECANCELED {
                            let error = io::Error::from_raw_os_error(-result);
                            tracing::warn!(%error, "io_uring: a multishot receive ended");
                        }
                    }
                }
                KIND_SEND => {
                    if index < SENDS_IN_FLIGHT_MAX {
                        free_sends.push(index);
                    }
                    if result < 0 {
                        *sends_refused += 1;
                    }
                }
                KIND_COMMIT => {
                    let Some(commit) = commit.as_mut() else {
                        continue;
                    };
                    // A late cancellation of an ended chain is ignored.
                    let Some((number, first, last)) = commit.chain else {
                        continue;
                    };
                    if (index >> CHAIN_POSITION_BITS) as u32 != number {
                        continue;
                    }
                    let index = first + (index & ((1 << CHAIN_POSITION_BITS) - 1));
                    if index == last || result < 0 {
                        commit.chain = None;
                    }
                    let error = match commit.prepared.raw_operation(index) {
                        _ if result < 0 => Some(io::Error::from_raw_os_error(-result)),
                        Some(RawOperation::Write { bytes, .. })
                            if result as usize != bytes.len() =>
                        {
                            Some(io::Error::new(
                                io::ErrorKind::WriteZero,
                                format!("short write: {result} of {} bytes", bytes.len()),
                            ))
                        }
                        _ => None,
                    };
                    if let Some(error) = error {
                        commit.chain = None;
                        commit.failure.get_or_insert((index, error));
                    }
                }
                _ => {}
            }
        }
    }

    /// Requests the kernel may still be working on (their memory must outlive them).
    fn outstanding(&self) -> usize {
        let receiving = self.receivers.iter().flatten().filter(|r| r.armed).count();
        let committing = self
            .commit
            .as_ref()
            .map_or(0, |commit| usize::from(commit.chain.is_some()));
        receiving + (SENDS_IN_FLIGHT_MAX - self.free_sends.len()) + committing
    }
}

impl Drop for Ring {
    /// Cancels what is in flight and waits (bounded) until the kernel is done with our buffers
    /// and send slots; if it never says so, they are leaked rather than freed under it.
    fn drop(&mut self) {
        let cancel = opcode::AsyncCancel2::new(types::CancelBuilder::any())
            .build()
            .user_data(user_data(KIND_CANCEL, 0));
        // SAFETY: a cancellation reads no memory of ours.
        unsafe { self.push(&cancel) };
        for _ in 0..WAITS_MAX {
            if self.outstanding() == 0 {
                return;
            }
            let args = types::SubmitArgs::new().timespec(&self.timeout);
            let _ = self.ring.submitter().submit_with_args(1, &args);
            self.reap();
        }
        tracing::warn!(
            outstanding = self.outstanding(),
            "io_uring: requests still in flight at shutdown; their buffers are leaked"
        );
        for receiver in self.receivers.iter_mut().flatten() {
            let buffers = mem::replace(&mut receiver.buffers, BufRing::dangling());
            mem::forget(buffers);
        }
        mem::forget(mem::take(&mut self.sends));
        mem::forget(self.commit.take());
    }
}

impl BufRing {
    /// A ring with nothing mapped, left behind when the real one is leaked.
    fn dangling() -> BufRing {
        BufRing {
            entries: std::ptr::null_mut(),
            memory: std::ptr::null_mut(),
            count: 0,
            buffer_bytes: 0,
            group: 0,
            tail: 0,
            in_kernel: 0,
        }
    }
}

/// A filled buffer (`struct io_uring_recvmsg_out`, address, control messages, payload): the
/// source address, where the payload starts and its length, and the kernel's arrival stamp.
/// None when the buffer is too short for the layout `header` asked for.
fn parse(
    buffer: &[u8],
    header: &libc::msghdr,
) -> Option<(Option<SocketAddr>, usize, usize, Option<SystemTime>)> {
    let out = types::RecvMsgOut::parse(buffer, header).ok()?;
    let name = out.name_data();
    // SAFETY: plain old data, all zeroes valid (AF_UNSPEC).
    let mut storage: libc::sockaddr_storage = unsafe { mem::zeroed() };
    let name_len = name.len().min(NAME_BYTES);
    // SAFETY: copies at most sizeof(sockaddr_storage) bytes into it.
    unsafe {
        std::ptr::copy_nonoverlapping(
            name.as_ptr(),
            (&mut storage as *mut libc::sockaddr_storage).cast::<u8>(),
            name_len,
        )
    };
    let peer = if out.is_name_data_truncated() {
        None
    } else {
        socket_addr(&storage)
    };
    let control = out.control_data();
    // The control messages are 8-byte aligned in the buffer (they follow a 16-byte header and
    // a 128-byte address in a page-aligned buffer), as the CMSG macros expect.
    // SAFETY: plain old data, all zeroes valid.
    let mut control_header: libc::msghdr = unsafe { mem::zeroed() };
    control_header.msg_control = control.as_ptr().cast_mut().cast();
    control_header.msg_controllen = control.len() as _;
    let stamp = if control.is_empty() {
        None
    } else {
        arrival(&control_header)
    };
    let payload = out.payload_data();
    let payload_start = payload.as_ptr() as usize - buffer.as_ptr() as usize;
    Some((peer, payload_start, payload.len(), stamp))
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_storage::{
        Backend, Durability, Fs, StorageFile, Store, StoreConfig, Value, ValueRef,
    };
    use std::net::UdpSocket;
    use std::os::fd::AsRawFd;
    use std::time::{Duration, Instant};

    fn metrics() -> Arc<ShardMetrics> {
        Arc::new(ShardMetrics::new())
    }

    /// A server socket on loopback with a ring of `buffers`, and a client socket.
    fn pair(buffers: u16) -> (UdpSocket, UdpSocket, Ring, Arc<ShardMetrics>) {
        let server = UdpSocket::bind("127.0.0.1:0").unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client.connect(server.local_addr().unwrap()).unwrap();
        let metrics = metrics();
        let ring = Ring::new([Some(server.as_raw_fd()), None], buffers, metrics.clone()).unwrap();
        (server, client, ring, metrics)
    }

    /// Receives through `ring` until `count` datagrams came or 10 s passed; their payloads.
    fn drain(ring: &mut Ring, server: &UdpSocket, count: usize) -> Vec<Vec<u8>> {
        let fd = server.as_raw_fd();
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut got = Vec::new();
        while got.len() < count && Instant::now() < deadline {
            if ring.wait([Some(fd), None], false)[0] {
                let n = ring.receive(fd);
                for index in 0..n {
                    let (peer, bytes) = ring.datagram(index);
                    assert!(peer.is_some());
                    got.push(bytes.to_vec());
                }
            }
        }
        got
    }

    #[test]
    fn probe_passes_on_this_kernel() {
        probe().unwrap();
    }

    #[test]
    fn datagrams_arrive_with_source_and_timestamp_and_buffers_are_recycled() {
        let (server, client, mut ring, _) = pair(4);
        crate::io::enable_receive_timestamps(&server);
        for round in 0..20u8 {
            for i in 0..3u8 {
                client.send(&[round, i, 0xAB]).unwrap();
            }
            let fd = server.as_raw_fd();
            let mut got = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(10);
            while got.len() < 3 && Instant::now() < deadline {
                if ring.wait([Some(fd), None], false)[0] {
                    for index in 0..ring.receive(fd) {
                        let (peer, bytes) = ring.datagram(index);
                        assert_eq!(peer, Some(client.local_addr().unwrap()));
                        assert!(ring.arrival(index).is_some(), "SO_TIMESTAMPNS stamp");
                        got.push(bytes.to_vec());
                    }
                }
            }
            assert_eq!(
                got,
                (0..3u8).map(|i| vec![round, i, 0xAB]).collect::<Vec<_>>()
            );
        }
        // 60 datagrams through 4 buffers: each was given back and used again.
        ring.recycle();
        let receiver = ring.receivers[0].as_ref().unwrap();
        assert_eq!(
            receiver.buffers.in_kernel() as usize + receiver.ready.len(),
            4
        );
    }

    #[test]
    fn exhausted_buffers_end_the_receive_with_enobufs_and_it_is_rearmed() {
        let (server, client, mut ring, metrics) = pair(4);
        let fd = server.as_raw_fd();
        // Arm, then send more than the ring holds before taking anything.
        assert_eq!(ring.wait([Some(fd), None], false), [false; 3]);
        for i in 0..40u32 {
            client.send(&i.to_be_bytes()).unwrap();
        }
        // The kernel fills the 4 buffers, then ends the receive with ENOBUFS.
        let deadline = Instant::now() + Duration::from_secs(10);
        while ring.receivers[0].as_ref().unwrap().armed && Instant::now() < deadline {
            let _ = ring.ring.submit_and_wait(1);
            ring.reap();
        }
        let receiver = ring.receivers[0].as_ref().unwrap();
        assert!(!receiver.armed);
        assert_eq!(receiver.ready.len(), 4);
        assert_eq!(receiver.buffers.in_kernel(), 0);
        assert_eq!(metrics.receive_buffers_exhausted.load(Ordering::Relaxed), 1);
        let got = drain(&mut ring, &server, 40);
        let expected: Vec<Vec<u8>> = (0..40u32).map(|i| i.to_be_bytes().to_vec()).collect();
        assert_eq!(got, expected, "every datagram, in order, none lost");
        assert!(metrics.receive_rearms.load(Ordering::Relaxed) >= 1);
    }

    #[test]
    fn no_buffer_is_lost_over_many_cycles() {
        // 70 000 datagrams through 8 buffers: the 16-bit tail wraps; bursts of varying size
        // exhaust the ring again and again.
        let (server, client, mut ring, metrics) = pair(8);
        let mut sent = 0u32;
        let mut burst = 1;
        while sent < 70_000 {
            for _ in 0..burst {
                client.send(&sent.to_be_bytes()).unwrap();
                sent += 1;
            }
            let got = drain(&mut ring, &server, burst);
            assert_eq!(got.len(), burst);
            for (offset, bytes) in got.iter().enumerate() {
                let expected = sent - burst as u32 + offset as u32;
                assert_eq!(bytes.as_slice(), expected.to_be_bytes());
            }
            let receiver = ring.receivers[0].as_ref().unwrap();
            assert_eq!(
                receiver.buffers.in_kernel() as usize + receiver.ready.len() + ring.batch.len(),
                8,
                "every buffer is with the kernel, queued or in the batch"
            );
            burst = burst % 37 + 1;
        }
        let exhausted = metrics.receive_buffers_exhausted.load(Ordering::Relaxed);
        let rearms = metrics.receive_rearms.load(Ordering::Relaxed);
        assert!(exhausted > 0);
        // Re-armed after every end but perhaps the last.
        assert!(
            rearms <= exhausted && rearms + 1 >= exhausted,
            "{rearms} re-arms, {exhausted} ends"
        );
    }

    #[test]
    fn sends_go_out_in_batches_beyond_the_slots_in_flight() {
        let (server, _, mut ring, _) = pair(4);
        // Three times the slots in one flush, spread over clients so that no client's receive
        // buffer overflows before it is read.
        let clients: Vec<UdpSocket> = (0..6)
            .map(|_| UdpSocket::bind("127.0.0.1:0").unwrap())
            .collect();
        let count = SENDS_IN_FLIGHT_MAX * 3;
        let mut batch = SendBatch::new();
        for n in 0..count as u32 {
            let client = &clients[n as usize % clients.len()];
            batch.push(client.local_addr().unwrap(), &n.to_be_bytes());
        }
        assert_eq!(ring.send(server.as_raw_fd(), &batch), 0);
        for (index, client) in clients.iter().enumerate() {
            client
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            let mut buffer = [0u8; 16];
            for n in (index..count).step_by(clients.len()) {
                let len = client.recv(&mut buffer).unwrap();
                assert_eq!(&buffer[..len], (n as u32).to_be_bytes());
            }
        }
        // Every slot came back.
        let deadline = Instant::now() + Duration::from_secs(10);
        while ring.free_sends.len() < SENDS_IN_FLIGHT_MAX && Instant::now() < deadline {
            let args = types::SubmitArgs::new().timespec(&ring.timeout);
            let _ = ring.ring.submitter().submit_with_args(1, &args);
            ring.reap();
        }
        assert_eq!(ring.free_sends.len(), SENDS_IN_FLIGHT_MAX);
    }

    /// A store in `dir` under `--durability fsync`, on `backend`.
    fn store(dir: &std::path::Path, backend: Arc<dyn Backend>) -> Store {
        let config = StoreConfig {
            dir: dir.to_path_buf(),
            partition_secs: 3600,
            partition_grace_secs: u64::MAX,
            durability: Durability::Fsync,
        };
        Store::open_with(config, backend).unwrap().0
    }

    /// Waits (bounded) until the commit handed to `ring` finished; its outcome.
    fn finish(ring: &mut Ring) -> (Prepared, Result<(), StoreError>) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if ring.wait([None, None], true)[2] {
                return ring.committed().unwrap();
            }
        }
        panic!("the commit did not finish");
    }

    #[test]
    fn a_commit_is_written_and_synced_through_the_ring_in_chains() {
        let (_server, _client, mut ring, _) = pair(4);
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path(), Arc::new(Fs));
        let mut writer = store.writer(0).unwrap();
        // 40 partitions: a dictionary write and sync, 40 segment writes and 40 syncs, more
        // than one chain.
        const HOUR: f64 = 3600.0;
        let t0 = 1_763_899_200.0;
        for hour in 0..40 {
            let time = t0 + hour as f64 * HOUR;
            writer
                .append("dev-ring", "t", time, ValueRef::Number(hour as f64))
                .unwrap();
        }
        let prepared = writer.prepare().unwrap();
        assert_eq!(prepared.operations(), 82);
        // Nothing waited for, nothing ready: the wait returns at once.
        assert_eq!(ring.wait([None, None], false), [false; 3]);
        ring.commit(prepared);
        let (prepared, result) = finish(&mut ring);
        assert_eq!(writer.conclude(prepared, result).unwrap().points, 40);
        drop((writer, store));
        let store = self::store(dir.path(), Arc::new(Fs));
        let points = store
            .reader()
            .series("dev-ring", "t", t0, t0 + 40.0 * HOUR)
            .unwrap()
            .unwrap();
        assert_eq!(points.len(), 40);
        assert_eq!(points[39], (t0 + 39.0 * HOUR, Value::Number(39.0)));
    }

    /// The real file system, but the descriptor it gives the ring for a file is opened
    /// read-only: the ring's writes fail (EBADF).
    struct ReadOnlyDescriptors(Fs);

    struct ReadOnlyFile(Arc<dyn StorageFile>, std::fs::File);

    impl StorageFile for ReadOnlyFile {
        fn write_all_at(&self, bytes: &[u8], offset: u64) -> io::Result<()> {
            self.0.write_all_at(bytes, offset)
        }
        fn set_len(&self, len: u64) -> io::Result<()> {
            self.0.set_len(len)
        }
        fn sync_data(&self) -> io::Result<()> {
            self.0.sync_data()
        }
        fn raw_fd(&self) -> Option<RawFd> {
            Some(self.1.as_raw_fd())
        }
    }

    impl ReadOnlyDescriptors {
        fn wrap(
            path: &std::path::Path,
            file: io::Result<Arc<dyn StorageFile>>,
        ) -> io::Result<Arc<dyn StorageFile>> {
            Ok(Arc::new(ReadOnlyFile(file?, std::fs::File::open(path)?)))
        }
    }

    impl Backend for ReadOnlyDescriptors {
        fn create_dir(&self, path: &std::path::Path) -> io::Result<()> {
            self.0.create_dir(path)
        }
        fn exists(&self, path: &std::path::Path) -> bool {
            self.0.exists(path)
        }
        fn is_dir(&self, path: &std::path::Path) -> bool {
            self.0.is_dir(path)
        }
        fn read_dir(&self, dir: &std::path::Path) -> io::Result<Vec<sluice_storage::DirEntry>> {
            self.0.read_dir(dir)
        }
        fn create(&self, path: &std::path::Path) -> io::Result<Arc<dyn StorageFile>> {
            Self::wrap(path, self.0.create(path))
        }
        fn open(&self, path: &std::path::Path) -> io::Result<Arc<dyn StorageFile>> {
            Self::wrap(path, self.0.open(path))
        }
        fn len(&self, path: &std::path::Path) -> io::Result<u64> {
            self.0.len(path)
        }
        fn read(&self, path: &std::path::Path) -> io::Result<sluice_storage::FileBytes> {
            self.0.read(path)
        }
        fn map(&self, path: &std::path::Path) -> io::Result<sluice_storage::FileBytes> {
            self.0.map(path)
        }
        fn rename(&self, from: &std::path::Path, to: &std::path::Path) -> io::Result<()> {
            self.0.rename(from, to)
        }
        fn remove_file(&self, path: &std::path::Path) -> io::Result<()> {
            self.0.remove_file(path)
        }
        fn remove_dir_all(&self, path: &std::path::Path) -> io::Result<()> {
            self.0.remove_dir_all(path)
        }
        fn sync_dir(&self, dir: &std::path::Path) -> io::Result<()> {
            self.0.sync_dir(dir)
        }
        fn lock(
            &self,
            dir: &std::path::Path,
        ) -> Result<Box<dyn std::any::Any + Send + Sync>, StoreError> {
            self.0.lock(dir)
        }
    }

    #[test]
    fn a_failed_write_on_the_ring_fails_the_commit_and_cancels_what_follows() {
        let (_server, _client, mut ring, _) = pair(4);
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path(), Arc::new(ReadOnlyDescriptors(Fs)));
        let mut writer = store.writer(0).unwrap();
        writer
            .append("dev-bad", "t", 1_763_899_200.0, ValueRef::Number(1.0))
            .unwrap();
        let prepared = writer.prepare().unwrap();
        ring.commit(prepared);
        let (prepared, result) = finish(&mut ring);
        let error = result.expect_err("a write to a read-only descriptor fails");
        // The first operation (the dictionary's write) is the cause, not a cancellation.
        let message = error.to_string();
        assert!(
            message.contains("write") && message.contains("dictionary"),
            "{message}"
        );
        assert!(ring.commit.is_none() && ring.outstanding() == 0);
        writer.conclude(prepared, Err(error)).unwrap_err();
        assert!(store.reader().devices().is_empty());
        // The ring goes on with the next commit (here another store's, with real descriptors).
        let dir = tempfile::tempdir().unwrap();
        let store = self::store(dir.path(), Arc::new(Fs));
        let mut writer = store.writer(0).unwrap();
        writer
            .append("dev-good", "t", 1_763_899_200.0, ValueRef::Number(2.0))
            .unwrap();
        ring.commit(writer.prepare().unwrap());
        let (prepared, result) = finish(&mut ring);
        assert_eq!(writer.conclude(prepared, result).unwrap().points, 1);
    }

    #[test]
    fn buffer_ring_refuses_bad_sizes() {
        assert!(BufRing::new(3, 64, 0).is_err());
        assert!(BufRing::new(0, 64, 0).is_err());
        assert!(BufRing::new(4, 0, 0).is_err());
        assert!(BufRing::new(4, 64, 0).is_ok());
    }
}
