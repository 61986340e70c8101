//! Socket I/O of one shard, in one place: a SO_REUSEPORT UDP socket receiving and sending in
//! batches with recvmmsg/sendmmsg. Buffers are allocated once, at start-up.

use std::io;
use std::mem::{self, MaybeUninit};
use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

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

/// The name of the backend, for the start-up log.
pub const BACKEND: &str = "recvmmsg/sendmmsg";

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
    use std::os::fd::AsRawFd;
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
fn enable_receive_timestamps(socket: &Socket) {
    use std::os::fd::AsRawFd;
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

/// Buffers for one recvmmsg call, reused for every batch.
pub struct ReceiveBatch {
    buffers: Vec<u8>,
    addresses: Vec<libc::sockaddr_storage>,
    lengths: Vec<usize>,
    /// Control messages (the kernel's arrival timestamp) of each datagram; u64 for alignment.
    controls: Vec<[u64; CONTROL_BYTES_PER_DATAGRAM / 8]>,
    /// Arrival time of each datagram (kernel clock, CLOCK_REALTIME), when stamped.
    arrivals: Vec<Option<std::time::SystemTime>>,
    count: usize,
}

impl ReceiveBatch {
    pub fn new() -> Self {
        ReceiveBatch {
            buffers: vec![0; DATAGRAMS_PER_BATCH_MAX * DATAGRAM_BYTES_MAX],
            // SAFETY: sockaddr_storage is plain old data; all zeroes is a valid (AF_UNSPEC) value.
            addresses: vec![unsafe { mem::zeroed() }; DATAGRAMS_PER_BATCH_MAX],
            lengths: vec![0; DATAGRAMS_PER_BATCH_MAX],
            controls: vec![[0; CONTROL_BYTES_PER_DATAGRAM / 8]; DATAGRAMS_PER_BATCH_MAX],
            arrivals: vec![None; DATAGRAMS_PER_BATCH_MAX],
            count: 0,
        }
    }

    /// Blocks until at least one datagram arrives (or the receive timeout passes), then takes
    /// every datagram already queued, up to the batch size. Returns how many were taken.
    pub fn receive(&mut self, socket: &UdpSocket) -> io::Result<usize> {
        use std::os::fd::AsRawFd;
        self.count = 0;
        let mut iovecs: [MaybeUninit<libc::iovec>; DATAGRAMS_PER_BATCH_MAX] =
            [MaybeUninit::uninit(); DATAGRAMS_PER_BATCH_MAX];
        let mut headers: [MaybeUninit<libc::mmsghdr>; DATAGRAMS_PER_BATCH_MAX] =
            [MaybeUninit::uninit(); DATAGRAMS_PER_BATCH_MAX];
        for (i, buffer) in self
            .buffers
            .chunks_exact_mut(DATAGRAM_BYTES_MAX)
            .enumerate()
        {
            iovecs[i].write(libc::iovec {
                iov_base: buffer.as_mut_ptr().cast(),
                iov_len: buffer.len(),
            });
            // SAFETY: mmsghdr is plain old data; zeroed then filled in below.
            let mut header: libc::mmsghdr = unsafe { mem::zeroed() };
            header.msg_hdr.msg_name =
                (&mut self.addresses[i] as *mut libc::sockaddr_storage).cast();
            header.msg_hdr.msg_namelen = mem::size_of::<libc::sockaddr_storage>() as _;
            header.msg_hdr.msg_iov = iovecs[i].as_mut_ptr();
            header.msg_hdr.msg_iovlen = 1;
            header.msg_hdr.msg_control = self.controls[i].as_mut_ptr().cast();
            header.msg_hdr.msg_controllen = CONTROL_BYTES_PER_DATAGRAM as _;
            headers[i].write(header);
        }
        // SAFETY: every header points at a live iovec, buffer, address and control slot of this batch,
        // all of which outlive the call.
        let received = unsafe {
            libc::recvmmsg(
                socket.as_raw_fd(),
                headers.as_mut_ptr().cast(),
                DATAGRAMS_PER_BATCH_MAX as _,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        if received < 0 {
            return Err(io::Error::last_os_error());
        }
        let received = received as usize;
        for (i, header) in headers[..received].iter().enumerate() {
            // SAFETY: the kernel filled the first `received` headers.
            let header = unsafe { header.assume_init_ref() };
            self.lengths[i] = header.msg_len as usize;
            self.arrivals[i] = arrival(&header.msg_hdr);
        }
        self.count = received;
        Ok(received)
    }

    /// The `index`th datagram of the last batch: its source (None for an address family we do
    /// not serve) and its bytes.
    pub fn datagram(&self, index: usize) -> (Option<SocketAddr>, &[u8]) {
        debug_assert!(index < self.count);
        let start = index * DATAGRAM_BYTES_MAX;
        let bytes = &self.buffers[start..start + self.lengths[index]];
        (socket_addr(&self.addresses[index]), bytes)
    }

    /// When the kernel received the `index`th datagram of the last batch (None: not stamped).
    pub fn arrival(&self, index: usize) -> Option<std::time::SystemTime> {
        self.arrivals.get(index).copied().flatten()
    }
}

/// The SCM_TIMESTAMPNS control message of a received datagram, if any.
fn arrival(header: &libc::msghdr) -> Option<std::time::SystemTime> {
    // SAFETY: `header` was filled by recvmmsg: msg_control/msg_controllen describe the control
    // messages the kernel wrote into our buffer; the CMSG macros stay within it.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(header);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_TIMESTAMPNS
            {
                let stamp: libc::timespec = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast());
                let since_epoch = std::time::Duration::new(
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

/// Responses queued during a batch and sent with one sendmmsg call.
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

    /// Sends every queued response. A response the kernel refuses (e.g. an unreachable peer) is
    /// dropped, as UDP would; the device retransmits. Returns how many were dropped.
    pub fn flush(&mut self, socket: &UdpSocket) -> usize {
        use std::os::fd::AsRawFd;
        let mut dropped = 0;
        let mut sent = 0;
        while sent < self.messages.len() {
            let chunk =
                &self.messages[sent..(sent + DATAGRAMS_PER_BATCH_MAX).min(self.messages.len())];
            let mut iovecs: [MaybeUninit<libc::iovec>; DATAGRAMS_PER_BATCH_MAX] =
                [MaybeUninit::uninit(); DATAGRAMS_PER_BATCH_MAX];
            let mut headers: [MaybeUninit<libc::mmsghdr>; DATAGRAMS_PER_BATCH_MAX] =
                [MaybeUninit::uninit(); DATAGRAMS_PER_BATCH_MAX];
            for (i, (address, start, len)) in chunk.iter().enumerate() {
                iovecs[i].write(libc::iovec {
                    iov_base: self.bytes[*start..].as_ptr() as *mut libc::c_void,
                    iov_len: *len,
                });
                // SAFETY: mmsghdr is plain old data; zeroed then filled in.
                let mut header: libc::mmsghdr = unsafe { mem::zeroed() };
                header.msg_hdr.msg_name = address.as_ptr() as *mut libc::c_void;
                header.msg_hdr.msg_namelen = address.len();
                header.msg_hdr.msg_iov = iovecs[i].as_mut_ptr();
                header.msg_hdr.msg_iovlen = 1;
                headers[i].write(header);
            }
            // SAFETY: the first `chunk.len()` headers are initialised and point at addresses,
            // iovecs and bytes that outlive the call.
            let result = unsafe {
                libc::sendmmsg(
                    socket.as_raw_fd(),
                    headers.as_mut_ptr().cast(),
                    chunk.len() as _,
                    0,
                )
            };
            if result <= 0 {
                let error = io::Error::last_os_error();
                if error.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                // The first message of the chunk failed: drop it and carry on with the rest.
                dropped += 1;
                sent += 1;
            } else {
                sent += result as usize;
            }
        }
        self.bytes.clear();
        self.messages.clear();
        dropped
    }
}

/// Waits until one of `fds` is readable, or `RECEIVE_TIMEOUT` passes; says which are. A shard
/// polls its CoAP and CoAPS sockets and, while a commit is being synced, the sync thread's
/// wake-up descriptor (None: not polled).
pub fn wait_readable(fds: [Option<std::os::fd::RawFd>; 3]) -> [bool; 3] {
    if fds.iter().all(Option::is_none) {
        return [false; 3];
    }
    let mut polled = fds.map(|fd| libc::pollfd {
        fd: fd.unwrap_or(-1),
        events: libc::POLLIN,
        revents: 0,
    });
    // SAFETY: `polled` is a live array of three pollfd for the duration of the call; poll
    // ignores entries with a negative descriptor.
    let ready = unsafe {
        libc::poll(
            polled.as_mut_ptr(),
            polled.len() as libc::nfds_t,
            RECEIVE_TIMEOUT.as_millis() as libc::c_int,
        )
    };
    if ready <= 0 {
        return [false; 3];
    }
    polled.map(|p| p.revents != 0)
}
