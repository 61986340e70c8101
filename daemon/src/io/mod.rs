//! The I/O of one shard, in one place: SO_REUSEPORT UDP sockets, received from and sent to in
//! batches, and the writes and fdatasyncs of its durable commits, by one of two backends (`--io`,
//! docs/configuration.md):
//! - `uring` ([`uring`]): one io_uring per shard; multishot RecvMsg into a ring of provided
//!   buffers, responses as SendMsg entries, a commit's writes and fdatasyncs as linked entries;
//!   the shard blocks only in io_uring_enter;
//! - `recvmmsg` ([`recvmmsg`]): poll, recvmmsg and sendmmsg, commits on a sync thread
//!   ([`sync_thread`]); the fallback where io_uring is not allowed (old kernel, seccomp,
//!   `kernel.io_uring_disabled`).
//!
//! Buffers are allocated once, at start-up.

use std::io;
use std::mem;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use clap::ValueEnum;
use serde::Deserialize;
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use sluice_storage::{Prepared, StoreError};

use crate::metrics::ShardMetrics;

pub mod recvmmsg;
mod sync_thread;
pub mod uring;

/// Datagrams taken from the kernel per receive call: large enough to amortise the syscall and to
/// give group commit a batch, small enough that the first datagram of a batch waits little.
pub const DATAGRAMS_PER_BATCH_MAX: usize = 64;
/// Largest datagram accepted whole (the UDP maximum): nothing is truncated; the protocol core
/// answers payloads above its own limit with 4.13.
pub const DATAGRAM_BYTES_MAX: usize = 65_536;
/// Receive buffer asked of the kernel, so a burst of requests waits in the kernel instead of being
/// dropped while the shard commits. Raised up to this with SO_RCVBUFFORCE when allowed.
pub const RECEIVE_BUFFER_BYTES: usize = 32 << 20;
/// How long a receive call blocks before the shard looks at timers and the shutdown flag.
pub const RECEIVE_TIMEOUT: Duration = Duration::from_millis(100);

/// Control-message space per datagram: one SCM_TIMESTAMPNS (a `struct timespec`), aligned.
const CONTROL_BYTES_PER_DATAGRAM: usize = 64;

/// Binds a UDP socket that shares `addr` with the other shards (SO_REUSEPORT).
pub fn bind(addr: SocketAddr) -> io::Result<(UdpSocket, usize)> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_reuse_port(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(false)?;
    }
    force_receive_buffer(&socket);
    enable_receive_timestamps(&socket);
    socket.set_read_timeout(Some(RECEIVE_TIMEOUT))?;
    socket.bind(&addr.into())?;
    let granted = socket.recv_buffer_size()?;
    Ok((socket.into(), granted))
}

/// SO_RCVBUFFORCE passes net.core.rmem_max when we are privileged; otherwise SO_RCVBUF gets what
/// the system maximum allows.
fn force_receive_buffer(socket: &Socket) {
    let bytes = RECEIVE_BUFFER_BYTES as libc::c_int;
    // SAFETY: a plain setsockopt with a c_int value on a socket we own.
    let forced = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&bytes as *const libc::c_int).cast(),
            mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if forced != 0 {
        let _ = socket.set_recv_buffer_size(RECEIVE_BUFFER_BYTES);
    }
}

/// Asks the kernel to stamp each datagram with its arrival time (SO_TIMESTAMPNS), so a shard
/// knows how long a datagram waited in the socket queue (see `overload.rs`). Without it (never
/// refused on Linux) the queueing delay is unknown and not shed on.
pub(crate) fn enable_receive_timestamps(socket: &impl AsRawFd) {
    let on: libc::c_int = 1;
    // SAFETY: a plain setsockopt with a c_int value on a socket we own.
    let result = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_TIMESTAMPNS,
            (&on as *const libc::c_int).cast(),
            mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if result != 0 {
        tracing::warn!(error = %io::Error::last_os_error(), "no receive timestamps: queueing delay is not measured");
    }
}

/// How a shard's sockets are driven (`--io`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Backend {
    /// One io_uring per shard: multishot RecvMsg over provided buffers, batched SendMsg.
    Uring,
    /// poll, recvmmsg and sendmmsg.
    Recvmmsg,
}

impl Backend {
    /// The name in the start-up log.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Uring => "io_uring",
            Backend::Recvmmsg => "recvmmsg/sendmmsg",
        }
    }
}

/// The backend to run with: `requested` if given (an error when io_uring was asked for and the
/// kernel does not allow it), otherwise io_uring when the kernel allows it. The second value
/// says why io_uring was not chosen by default.
pub fn choose(requested: Option<Backend>) -> anyhow::Result<(Backend, Option<String>)> {
    match requested {
        Some(Backend::Recvmmsg) => Ok((Backend::Recvmmsg, None)),
        Some(Backend::Uring) => match uring::probe() {
            Ok(()) => Ok((Backend::Uring, None)),
            Err(why) => anyhow::bail!("--io uring: io_uring is not usable here: {why}"),
        },
        None => match uring::probe() {
            Ok(()) => Ok((Backend::Uring, None)),
            Err(why) => Ok((Backend::Recvmmsg, Some(why))),
        },
    }
}

/// The I/O of one shard: its CoAP and CoAPS sockets, received from in batches, sent to in
/// batches, the I/O of its durable commits (one at a time), and the wait for any of them.
pub struct ShardIo {
    shard: usize,
    inner: Inner,
}

enum Inner {
    /// The sync thread starts with the first commit handed over.
    Recvmmsg(recvmmsg::ReceiveBatch, Option<sync_thread::SyncThread>),
    Uring(Box<uring::Ring>),
}

impl ShardIo {
    /// `sockets`: the shard's CoAP and CoAPS sockets (None: not served). io_uring falls back to
    /// recvmmsg for this shard, with a log line, when its ring cannot be set up.
    pub fn new(
        backend: Backend,
        shard: usize,
        sockets: [Option<&UdpSocket>; 2],
        metrics: Arc<ShardMetrics>,
    ) -> ShardIo {
        let inner = match backend {
            Backend::Recvmmsg => Inner::Recvmmsg(recvmmsg::ReceiveBatch::new(), None),
            Backend::Uring => {
                let fds = sockets.map(|s| s.map(AsRawFd::as_raw_fd));
                match uring::Ring::new(fds, uring::BUFFERS_PER_SOCKET, metrics) {
                    Ok(ring) => Inner::Uring(Box::new(ring)),
                    Err(error) => {
                        tracing::error!(shard, %error, "io_uring set-up failed: this shard uses recvmmsg");
                        Inner::Recvmmsg(recvmmsg::ReceiveBatch::new(), None)
                    }
                }
            }
        };
        ShardIo { shard, inner }
    }

    /// Waits until one of `sockets` (CoAP, CoAPS; None: not received from now) is readable, or
    /// (with `commit`) the commit handed over finished, or `RECEIVE_TIMEOUT` passes; says which
    /// ([CoAP, CoAPS, commit]).
    pub fn wait(&mut self, sockets: [Option<RawFd>; 2], commit: bool) -> [bool; 3] {
        match &mut self.inner {
            Inner::Recvmmsg(_, syncer) => {
                let wake = syncer.as_ref().filter(|_| commit).map(|s| s.wake_fd());
                recvmmsg::wait_readable([sockets[0], sockets[1], wake])
            }
            Inner::Uring(ring) => ring.wait(sockets, commit),
        }
    }

    /// Hands over a prepared commit's writes and fdatasyncs (one commit at a time): submitted
    /// on the ring, or done by the sync thread. Its outcome is taken with
    /// [`ShardIo::committed`] once [`ShardIo::wait`] says it finished.
    pub fn commit(&mut self, prepared: Prepared) {
        match &mut self.inner {
            Inner::Recvmmsg(_, syncer) => syncer
                .get_or_insert_with(|| sync_thread::SyncThread::start(self.shard))
                .commit(prepared),
            Inner::Uring(ring) => ring.commit(prepared),
        }
    }

    /// The commit handed over, once its I/O finished: Ok when it is durable.
    pub fn committed(&mut self) -> Option<(Prepared, Result<(), StoreError>)> {
        match &mut self.inner {
            Inner::Recvmmsg(_, syncer) => syncer.as_ref().and_then(|s| s.finished()),
            Inner::Uring(ring) => ring.committed(),
        }
    }

    /// Takes a batch of the datagrams received on `socket`; returns how many. The datagrams of
    /// the previous batch are given up.
    pub fn receive(&mut self, socket: &UdpSocket) -> io::Result<usize> {
        match &mut self.inner {
            Inner::Recvmmsg(batch, _) => batch.receive(socket),
            Inner::Uring(ring) => Ok(ring.receive(socket.as_raw_fd())),
        }
    }

    /// The `index`th datagram of the last batch: its source (None for an address family we do
    /// not serve) and its bytes.
    pub fn datagram(&self, index: usize) -> (Option<SocketAddr>, &[u8]) {
        match &self.inner {
            Inner::Recvmmsg(batch, _) => batch.datagram(index),
            Inner::Uring(ring) => ring.datagram(index),
        }
    }

    /// When the kernel received the `index`th datagram of the last batch (None: not stamped).
    pub fn arrival(&self, index: usize) -> Option<SystemTime> {
        match &self.inner {
            Inner::Recvmmsg(batch, _) => batch.arrival(index),
            Inner::Uring(ring) => ring.arrival(index),
        }
    }

    /// Sends every response queued in `batch` from `socket`. A response the kernel refuses
    /// (e.g. an unreachable peer) is dropped, as UDP would; the device retransmits. Returns how
    /// many were dropped (io_uring: refusals reported since the last flush).
    pub fn flush(&mut self, socket: &UdpSocket, batch: &mut SendBatch) -> usize {
        let dropped = match &mut self.inner {
            Inner::Recvmmsg(..) => recvmmsg::send(socket, batch),
            Inner::Uring(ring) => ring.send(socket.as_raw_fd(), batch),
        };
        batch.clear();
        dropped
    }
}

/// Responses queued during a batch and handed to the kernel together.
pub struct SendBatch {
    bytes: Vec<u8>,
    messages: Vec<(SockAddr, usize, usize)>,
}

impl SendBatch {
    pub fn new() -> Self {
        SendBatch {
            bytes: Vec::with_capacity(DATAGRAMS_PER_BATCH_MAX * 256),
            messages: Vec::with_capacity(DATAGRAMS_PER_BATCH_MAX * 2),
        }
    }

    pub fn push(&mut self, peer: SocketAddr, datagram: &[u8]) {
        let start = self.bytes.len();
        self.bytes.extend_from_slice(datagram);
        self.messages.push((peer.into(), start, datagram.len()));
    }

    fn clear(&mut self) {
        self.bytes.clear();
        self.messages.clear();
    }
}

/// The SCM_TIMESTAMPNS control message among the control messages `header` describes, if any.
fn arrival(header: &libc::msghdr) -> Option<SystemTime> {
    // SAFETY: msg_control/msg_controllen of `header` describe control messages the kernel
    // wrote into a live buffer; the CMSG macros stay within it.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(header);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_TIMESTAMPNS
            {
                let stamp: libc::timespec = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast());
                let since_epoch = Duration::new(
                    u64::try_from(stamp.tv_sec).ok()?,
                    u32::try_from(stamp.tv_nsec).ok()?,
                );
                return Some(std::time::UNIX_EPOCH + since_epoch);
            }
            cmsg = libc::CMSG_NXTHDR(header, cmsg);
        }
    }
    None
}

/// The IPv4 or IPv6 address the kernel wrote into `storage`.
fn socket_addr(storage: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match storage.ss_family as libc::c_int {
        libc::AF_INET => {
            // SAFETY: ss_family says the storage holds a sockaddr_in; storage is large and aligned enough.
            let addr =
                unsafe { &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            let ip = std::net::Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr));
            Some(SocketAddr::from((ip, u16::from_be(addr.sin_port))))
        }
        libc::AF_INET6 => {
            // SAFETY: ss_family says the storage holds a sockaddr_in6.
            let addr = unsafe {
                &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>()
            };
            let ip = std::net::Ipv6Addr::from(addr.sin6_addr.s6_addr);
            Some(SocketAddr::V6(std::net::SocketAddrV6::new(
                ip,
                u16::from_be(addr.sin6_port),
                addr.sin6_flowinfo,
                addr.sin6_scope_id,
            )))
        }
        _ => None,
    }
}
