//! `sluice sink --bind ADDR`: a UDP sink that only counts, with recvmmsg: the physical ceiling
//! of a machine's loopback for the end-to-end benchmark (what any server could at most receive
//! from the same client). It answers nothing; drive it with `sluice load --mode non
//! --no-response`. It ends once traffic has stopped for `--idle-exit-ms` (or after
//! `--max-seconds`) and reports datagrams, bytes and the rate between the first and the last
//! datagram.

use std::net::{SocketAddr, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use socket2::{Domain, Protocol, Socket, Type};

/// Datagrams taken per recvmmsg call (the daemon's batch size; more gains nothing measurable).
const DATAGRAMS_PER_CALL_MAX: usize = 64;
/// Bytes read of each datagram: the count and the byte total are what matter, not the contents.
const DATAGRAM_BYTES_MAX: usize = 2048;
/// Socket receive buffer asked for, so that bursts are queued rather than dropped.
const RECEIVE_BUFFER_BYTES: usize = 8 << 20;
/// How long one blocking receive waits before the idle and time limits are checked.
const POLL_INTERVAL: Duration = Duration::from_millis(50);

#[derive(Args, Debug)]
pub struct SinkArgs {
    /// Address to receive on, HOST:PORT
    #[arg(long)]
    bind: String,
    /// End once no datagram came for this long after the first one
    #[arg(long, default_value_t = 1000)]
    idle_exit_ms: u64,
    /// End after this many seconds in any case (bounds a forgotten sink)
    #[arg(long, default_value_t = 600)]
    max_seconds: u64,
    /// End with one JSON line: {"received":N,"bytes":N,"seconds":X,"rate":X}
    #[arg(long)]
    json: bool,
}

pub fn run(args: SinkArgs) -> anyhow::Result<()> {
    let bind: SocketAddr = args
        .bind
        .to_socket_addrs()
        .with_context(|| format!("--bind: cannot resolve `{}`", args.bind))?
        .next()
        .with_context(|| format!("--bind: `{}` has no address", args.bind))?;
    let socket = Socket::new(Domain::for_address(bind), Type::DGRAM, Some(Protocol::UDP))?;
    // Not fatal: the kernel caps it at net.core.rmem_max.
    let _ = socket.set_recv_buffer_size(RECEIVE_BUFFER_BYTES);
    socket.set_read_timeout(Some(POLL_INTERVAL))?;
    socket
        .bind(&bind.into())
        .with_context(|| format!("--bind: cannot bind {bind}"))?;
    eprintln!("sink: counting datagrams on {bind}");

    let mut buffers = vec![[0u8; DATAGRAM_BYTES_MAX]; DATAGRAMS_PER_CALL_MAX];
    let mut iovecs: Vec<libc::iovec> = buffers
        .iter_mut()
        .map(|b| libc::iovec {
            iov_base: b.as_mut_ptr().cast(),
            iov_len: b.len(),
        })
        .collect();
    // SAFETY: an all-zero mmsghdr is a valid empty header.
    let mut headers: Vec<libc::mmsghdr> = (0..DATAGRAMS_PER_CALL_MAX)
        .map(|_| unsafe { std::mem::zeroed() })
        .collect();
    for (header, iovec) in headers.iter_mut().zip(iovecs.iter_mut()) {
        header.msg_hdr.msg_iov = iovec;
        header.msg_hdr.msg_iovlen = 1;
    }
    let started = Instant::now();
    let limit = Duration::from_secs(args.max_seconds);
    let idle = Duration::from_millis(args.idle_exit_ms);
    let (mut received, mut bytes) = (0u64, 0u64);
    let mut first: Option<Instant> = None;
    let mut last = started;
    loop {
        // SAFETY: the headers point at iovecs and buffers that outlive the call.
        let n = unsafe {
            libc::recvmmsg(
                socket.as_raw_fd(),
                headers.as_mut_ptr(),
                DATAGRAMS_PER_CALL_MAX as u32,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        let now = Instant::now();
        if n > 0 {
            received += n as u64;
            bytes += headers[..n as usize]
                .iter()
                .map(|h| u64::from(h.msg_len))
                .sum::<u64>();
            first.get_or_insert(now);
            last = now;
        } else if n < 0 {
            let error = std::io::Error::last_os_error();
            match error.kind() {
                std::io::ErrorKind::WouldBlock
                | std::io::ErrorKind::TimedOut
                | std::io::ErrorKind::Interrupted => {}
                _ => bail!("receive failed: {error}"),
            }
        }
        if first.is_some() && now - last >= idle {
            break;
        }
        if now - started >= limit {
            eprintln!("sink: --max-seconds reached");
            break;
        }
    }
    let seconds = first.map_or(0.0, |first| (last - first).as_secs_f64());
    let rate = if seconds > 0.0 {
        received as f64 / seconds
    } else {
        0.0
    };
    eprintln!("sink: {received} datagrams, {bytes} bytes in {seconds:.2} s ({rate:.0}/s)");
    if args.json {
        println!(
            "{}",
            serde_json::json!({"received": received, "bytes": bytes, "seconds": seconds, "rate": rate})
        );
    }
    Ok(())
}
