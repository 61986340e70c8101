//! The fallback backend: poll for readiness, recvmmsg to receive a batch, sendmmsg to send one.

use std::io;
use std::mem::{self, MaybeUninit};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;

use super::{
    arrival, socket_addr, SendBatch, CONTROL_BYTES_PER_DATAGRAM, DATAGRAMS_PER_BATCH_MAX,
    DATAGRAM_BYTES_MAX, RECEIVE_TIMEOUT,
};

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

/// Sends every response of `batch` with sendmmsg calls; returns how many the kernel refused.
pub fn send(socket: &UdpSocket, batch: &SendBatch) -> usize {
    let messages = &batch.messages;
    let mut dropped = 0;
    let mut sent = 0;
    while sent < messages.len() {
        let chunk = &messages[sent..(sent + DATAGRAMS_PER_BATCH_MAX).min(messages.len())];
        let mut iovecs: [MaybeUninit<libc::iovec>; DATAGRAMS_PER_BATCH_MAX] =
            [MaybeUninit::uninit(); DATAGRAMS_PER_BATCH_MAX];
        let mut headers: [MaybeUninit<libc::mmsghdr>; DATAGRAMS_PER_BATCH_MAX] =
            [MaybeUninit::uninit(); DATAGRAMS_PER_BATCH_MAX];
        for (i, (address, start, len)) in chunk.iter().enumerate() {
            iovecs[i].write(libc::iovec {
                iov_base: batch.bytes[*start..].as_ptr() as *mut libc::c_void,
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
    dropped
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
