//! CoAPS for `sluice load --dtls`: a device's DTLS 1.2 PSK session (sluice-dtls's [`Client`])
//! over a UDP socket of its own. The handshake runs when the transport is opened, before the
//! measured run; afterwards `send` seals one CoAP message per record and `receive` opens records
//! until one carries a CoAP message.

use std::io::{self, ErrorKind};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use mio::net::UdpSocket;
use sluice_dtls::{Application, Client, ClientError, Suite};

use crate::credentials::Entry;
use crate::fleet::Transport;

/// Largest datagram read from the server: a handshake flight or a record of a response.
const DATAGRAM_BYTES_MAX: usize = 2048;
/// First retransmission of a handshake flight (RFC 6347 §4.2.4.1 initial timer), doubling.
const HANDSHAKE_RETRANSMIT_FIRST: Duration = Duration::from_secs(1);
/// A handshake that has not completed by then fails the run: 1 + 2 + 4 + 8 s of retransmissions.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);
/// fatal alert 51: what sluiced sends for a wrong key, an unknown or a disabled identity.
const ALERT_DECRYPT_ERROR: u8 = 51;

/// One device's CoAPS session.
pub struct DtlsUdp {
    socket: UdpSocket,
    client: Client,
    /// Records to send (sealed requests, or what the client answers to a server datagram).
    out: Vec<u8>,
    datagram: Vec<u8>,
    /// The CoAP messages of the last datagram, handed out one per `receive`.
    application: Application,
    next_message: usize,
}

impl DtlsUdp {
    /// Opens a socket to `target` and completes the handshake as `entry`'s identity and key,
    /// offering the suites CCM_8 (CoAP's mandatory one) first.
    pub fn connect(target: SocketAddr, entry: &Entry) -> anyhow::Result<DtlsUdp> {
        let local: SocketAddr = if target.is_ipv6() {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
        };
        let socket = std::net::UdpSocket::bind(local)
            .context("cannot open a device socket (raise `ulimit -n`?)")?;
        socket
            .connect(target)
            .with_context(|| format!("cannot reach {target}"))?;
        let mut client = Client::new(entry.identity.as_bytes(), &entry.key, &Suite::ALL);
        let mut datagram = vec![0; DATAGRAM_BYTES_MAX];
        let mut application = Application::default();
        handshake(&socket, &mut client, &mut datagram, &mut application)
            .with_context(|| format!("DTLS handshake of identity `{}`", entry.identity))?;
        socket.set_nonblocking(true)?;
        Ok(DtlsUdp {
            socket: UdpSocket::from_std(socket),
            client,
            out: Vec::with_capacity(DATAGRAM_BYTES_MAX),
            datagram,
            application,
            next_message: 0,
        })
    }
}

/// Runs the handshake on a blocking socket, retransmitting flights as RFC 6347 §4.2.4 says.
fn handshake(
    socket: &std::net::UdpSocket,
    client: &mut Client,
    datagram: &mut [u8],
    application: &mut Application,
) -> anyhow::Result<()> {
    let mut out = Vec::new();
    client.start(&mut out);
    let give_up = Instant::now() + HANDSHAKE_TIMEOUT;
    let mut timer = HANDSHAKE_RETRANSMIT_FIRST;
    let mut retransmit_at = Instant::now() + timer;
    loop {
        if !out.is_empty() {
            socket.send(&out).context("cannot send")?;
            out.clear();
        }
        if client.is_connected() {
            return Ok(());
        }
        let now = Instant::now();
        if now >= give_up {
            bail!("no answer within {} s", HANDSHAKE_TIMEOUT.as_secs());
        }
        socket.set_read_timeout(Some(
            retransmit_at
                .min(give_up)
                .saturating_duration_since(now)
                .max(Duration::from_millis(1)),
        ))?;
        match socket.recv(datagram) {
            Ok(n) => client
                .handle(&datagram[..n], &mut out, application)
                .map_err(|error| match error {
                    ClientError::Alert(ALERT_DECRYPT_ERROR) => anyhow::anyhow!(
                        "the server refused it (alert decrypt_error: a wrong key, or an identity it does not know or has disabled)"
                    ),
                    error => anyhow::anyhow!("{error}"),
                })?,
            Err(error) if matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                client.retransmit(&mut out);
                timer *= 2;
                retransmit_at = Instant::now() + timer;
            }
            Err(error) if error.kind() == ErrorKind::ConnectionRefused => {
                bail!("the target refuses: nothing listens there (ICMP port unreachable)")
            }
            Err(error) => return Err(error).context("cannot receive"),
        }
    }
}

impl Transport for DtlsUdp {
    fn socket(&mut self) -> &mut UdpSocket {
        &mut self.socket
    }

    fn send(&mut self, message: &[u8]) -> io::Result<()> {
        self.out.clear();
        self.client
            .seal(message, &mut self.out)
            .map_err(io::Error::other)?;
        self.socket.send(&self.out).map(|_| ())
    }

    fn receive(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        loop {
            if let Some(message) = self.application.records().nth(self.next_message) {
                self.next_message += 1;
                if message.len() > buffer.len() {
                    return Err(io::Error::new(
                        ErrorKind::InvalidData,
                        "a CoAP message larger than the receive buffer",
                    ));
                }
                buffer[..message.len()].copy_from_slice(message);
                return Ok(message.len());
            }
            let n = self.socket.recv(&mut self.datagram)?;
            self.next_message = 0;
            self.out.clear();
            let handled =
                self.client
                    .handle(&self.datagram[..n], &mut self.out, &mut self.application);
            if !self.out.is_empty() {
                self.socket.send(&self.out)?;
            }
            // A fatal alert ends the session: the requests in flight time out.
            handled.map_err(io::Error::other)?;
        }
    }
}
