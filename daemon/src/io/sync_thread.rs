//! Under the recvmmsg backend, a shard's commits are written and made durable (pwrite,
//! fdatasync: [`Prepared::perform`]) on a thread of their own, so the shard receives and decodes
//! the next batch meanwhile. One commit at a time: channels of one slot; an eventfd the shard
//! polls with its sockets says when the commit finished. (The io_uring backend submits the same
//! operations on the shard's ring instead.)

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{mpsc, Arc};

use sluice_storage::{Prepared, StoreError};

pub struct SyncThread {
    requests: Option<mpsc::SyncSender<Prepared>>,
    results: mpsc::Receiver<(Prepared, Result<(), StoreError>)>,
    /// Readable when a result is waiting.
    wake: Arc<OwnedFd>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl SyncThread {
    pub fn start(shard: usize) -> SyncThread {
        // SAFETY: eventfd returns a new descriptor we own, or -1.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        assert!(fd >= 0, "eventfd: {}", std::io::Error::last_os_error());
        // SAFETY: `fd` is a valid descriptor owned by nobody else.
        let wake = Arc::new(unsafe { OwnedFd::from_raw_fd(fd) });
        let (requests, work) = mpsc::sync_channel::<Prepared>(1);
        let (done, results) = mpsc::sync_channel(1);
        let thread_wake = wake.clone();
        let thread = std::thread::Builder::new()
            .name(format!("sluiced-sync-{shard}"))
            .spawn(move || {
                for prepared in work {
                    let result = prepared.perform();
                    if done.send((prepared, result)).is_err() {
                        return;
                    }
                    let one: u64 = 1;
                    // SAFETY: an 8-byte write of a u64 to our eventfd.
                    unsafe { libc::write(thread_wake.as_raw_fd(), (&one as *const u64).cast(), 8) };
                }
            })
            .expect("cannot start a sync thread");
        SyncThread {
            requests: Some(requests),
            results,
            wake,
            thread: Some(thread),
        }
    }

    /// Readable when the commit handed over finished.
    pub fn wake_fd(&self) -> RawFd {
        self.wake.as_raw_fd()
    }

    pub fn commit(&self, prepared: Prepared) {
        if let Some(requests) = &self.requests {
            // One commit is in flight at a time, so the slot is free.
            let _ = requests.send(prepared);
        }
    }

    /// The commit handed over, once its I/O finished.
    pub fn finished(&self) -> Option<(Prepared, Result<(), StoreError>)> {
        // Reset the counter first: the thread sends, then signals, so a signal that lands after
        // this result was taken causes at most one spurious wake-up, never a busy loop.
        let mut count = [0u8; 8];
        // SAFETY: reading the eventfd's counter resets it; non-blocking.
        unsafe { libc::read(self.wake.as_raw_fd(), count.as_mut_ptr().cast(), 8) };
        self.results.try_recv().ok()
    }
}

impl Drop for SyncThread {
    fn drop(&mut self) {
        self.requests.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
