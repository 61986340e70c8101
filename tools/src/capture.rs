//! Packet captures: `sluice load --record` writes one, `sluice replay` reads one.
//!
//! Written: classic pcap, link type RAW (101: each packet is an IPv4 or IPv6 header, then UDP),
//! microsecond timestamps of wall-clock send time, one packet per datagram sent (retransmissions
//! included), from the device's own address and port to the target's. Wireshark and tcpdump read
//! it as they read any capture.
//!
//! Read: pcap or pcapng (told apart by the magic number), link types Ethernet, Linux cooked (SLL),
//! RAW, IPv4, IPv6 and BSD loopback (NULL/LOOP); every UDP datagram in it, in capture order, with
//! its time, source and destination. Fragmented IP packets and other protocols are counted and
//! skipped.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use etherparse::{NetSlice, PacketBuilder, SlicedPacket, TransportSlice};
use pcap_file::pcap::{PcapHeader, PcapPacket, PcapReader, PcapWriter};
use pcap_file::pcapng::blocks::interface_description::InterfaceDescriptionOption;
use pcap_file::pcapng::{Block, PcapNgReader};
use pcap_file::DataLink;

/// Largest packet the recorder writes (IPv6 header, UDP header, a datagram of at most 64 KiB).
const RECORD_PACKET_BYTES_MAX: usize = 40 + 8 + 65_535;
/// Datagrams one capture may hold for replay (each is kept in memory until it is sent).
pub const CAPTURE_DATAGRAMS_MAX: usize = 10_000_000;

/// Writes what a fleet sends as a pcap file.
pub struct Recorder {
    writer: PcapWriter<BufWriter<File>>,
    /// (device address, target address) of each device, by device index.
    addresses: Vec<(SocketAddr, SocketAddr)>,
    packet: Vec<u8>,
    path: String,
    error: Option<String>,
}

impl Recorder {
    pub fn create(path: &Path) -> anyhow::Result<Recorder> {
        let file = File::create(path)
            .with_context(|| format!("--record: cannot create {}", path.display()))?;
        let header = PcapHeader {
            datalink: DataLink::RAW,
            ..PcapHeader::default()
        };
        let writer = PcapWriter::with_header(BufWriter::new(file), header)
            .with_context(|| format!("--record: cannot write {}", path.display()))?;
        Ok(Recorder {
            writer,
            addresses: Vec::new(),
            packet: Vec::with_capacity(RECORD_PACKET_BYTES_MAX),
            path: path.display().to_string(),
            error: None,
        })
    }

    /// Names device `addresses.len()`'s source and destination.
    pub fn add_device(&mut self, local: SocketAddr, target: SocketAddr) {
        self.addresses.push((local, target));
    }

    /// Writes one datagram sent by `device` now. A write error is kept and reported by `finish`.
    pub fn record(&mut self, device: usize, datagram: &[u8]) {
        if self.error.is_some() {
            return;
        }
        let Some(&(local, target)) = self.addresses.get(device) else {
            return;
        };
        let time = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        self.packet.clear();
        let built = match (local.ip(), target.ip()) {
            (IpAddr::V4(from), IpAddr::V4(to)) => {
                PacketBuilder::ipv4(from.octets(), to.octets(), 64)
                    .udp(local.port(), target.port())
                    .write(&mut self.packet, datagram)
            }
            (from, to) => PacketBuilder::ipv6(to_v6(from).octets(), to_v6(to).octets(), 64)
                .udp(local.port(), target.port())
                .write(&mut self.packet, datagram),
        };
        let result = built.map_err(|e| e.to_string()).and_then(|()| {
            let packet = PcapPacket::new(time, self.packet.len() as u32, &self.packet);
            self.writer
                .write_packet(&packet)
                .map(|_| ())
                .map_err(|e| e.to_string())
        });
        if let Err(error) = result {
            self.error = Some(error);
        }
    }

    pub fn finish(self) -> anyhow::Result<()> {
        if let Some(error) = self.error {
            bail!("--record: writing {} failed: {error}", self.path);
        }
        use std::io::Write as _;
        self.writer
            .into_writer()
            .flush()
            .with_context(|| format!("--record: writing {} failed", self.path))
    }
}

fn to_v6(ip: IpAddr) -> std::net::Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

/// One UDP datagram of a capture.
pub struct Datagram {
    /// Capture time since the Unix epoch.
    pub time: Duration,
    pub source: SocketAddr,
    pub destination: SocketAddr,
    pub payload: Vec<u8>,
}

/// The UDP datagrams of a capture file, and how many packets were not UDP datagrams.
pub struct Capture {
    pub datagrams: Vec<Datagram>,
    pub skipped_packets: u64,
}

/// Reads every UDP datagram of a pcap or pcapng file.
pub fn read(path: &Path) -> anyhow::Result<Capture> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut reader = BufReader::new(file);
    let mut magic = [0u8; 4];
    reader
        .read_exact(&mut magic)
        .with_context(|| format!("{}: not a capture (too short)", path.display()))?;
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let reader = BufReader::new(file);
    let mut capture = Capture {
        datagrams: Vec::new(),
        skipped_packets: 0,
    };
    let corrupt =
        |e: pcap_file::PcapError| anyhow::anyhow!("{}: not a valid capture: {e}", path.display());
    if magic == [0x0a, 0x0d, 0x0d, 0x0a] {
        let mut reader = PcapNgReader::new(reader).map_err(corrupt)?;
        // (link type, if_tsresol) of each interface of the current section.
        let mut interfaces: Vec<(DataLink, u8)> = Vec::new();
        while let Some(block) = reader.next_block() {
            let block = block.map_err(corrupt)?;
            let (interface_id, raw_time, data) = match &block {
                Block::SectionHeader(_) => {
                    interfaces.clear();
                    continue;
                }
                Block::InterfaceDescription(interface) => {
                    let resolution = interface
                        .options
                        .iter()
                        .find_map(|option| match option {
                            InterfaceDescriptionOption::IfTsResol(r) => Some(*r),
                            _ => None,
                        })
                        .unwrap_or(6);
                    interfaces.push((interface.linktype, resolution));
                    continue;
                }
                Block::EnhancedPacket(packet) => {
                    (packet.interface_id, packet.timestamp, packet.data.as_ref())
                }
                Block::SimplePacket(packet) => (0, Duration::ZERO, packet.data.as_ref()),
                _ => continue,
            };
            let Some(&(linktype, resolution)) = interfaces.get(interface_id as usize) else {
                bail!(
                    "{}: not a valid capture: a packet of undeclared interface {interface_id}",
                    path.display()
                );
            };
            // pcap-file reads the 64-bit timestamp as nanoseconds; its real unit is the
            // interface's if_tsresol (default 10^-6 s).
            let time = scale_timestamp(raw_time.as_nanos(), resolution);
            push(&mut capture, linktype, time, data, path)?;
        }
    } else {
        let mut reader = PcapReader::new(reader).map_err(corrupt)?;
        let linktype = reader.header().datalink;
        while let Some(packet) = reader.next_packet() {
            let packet = packet.map_err(corrupt)?;
            push(&mut capture, linktype, packet.timestamp, &packet.data, path)?;
        }
    }
    Ok(capture)
}

/// A pcapng timestamp of `units` in the resolution `if_tsresol` (RFC draft-ietf-opsawg-pcapng
/// §4.2: high bit clear, 10^-r s; set, 2^-r s).
fn scale_timestamp(units: u128, resolution: u8) -> Duration {
    let exponent = u32::from(resolution & 0x7f);
    let per_second: f64 = if resolution & 0x80 == 0 {
        10f64.powi(exponent as i32)
    } else {
        2f64.powi(exponent as i32)
    };
    Duration::try_from_secs_f64(units as f64 / per_second).unwrap_or_default()
}

fn push(
    capture: &mut Capture,
    linktype: DataLink,
    time: Duration,
    data: &[u8],
    path: &Path,
) -> anyhow::Result<()> {
    let sliced = match linktype {
        DataLink::ETHERNET => SlicedPacket::from_ethernet(data),
        DataLink::LINUX_SLL => SlicedPacket::from_linux_sll(data),
        DataLink::RAW | DataLink::IPV4 | DataLink::IPV6 => SlicedPacket::from_ip(data),
        // BSD loopback: a 4-byte address family in host order, then the IP packet.
        DataLink::NULL | DataLink::LOOP => SlicedPacket::from_ip(data.get(4..).unwrap_or(&[])),
        other => bail!(
            "{}: link type {other:?} is not supported (Ethernet, Linux SLL, raw IP and loopback are)",
            path.display()
        ),
    };
    let Ok(sliced) = sliced else {
        capture.skipped_packets += 1;
        return Ok(());
    };
    let (source, destination, fragmented) = match &sliced.net {
        Some(NetSlice::Ipv4(ip)) => (
            IpAddr::V4(ip.header().source_addr()),
            IpAddr::V4(ip.header().destination_addr()),
            ip.is_payload_fragmented(),
        ),
        Some(NetSlice::Ipv6(ip)) => (
            IpAddr::V6(ip.header().source_addr()),
            IpAddr::V6(ip.header().destination_addr()),
            ip.is_payload_fragmented(),
        ),
        _ => {
            capture.skipped_packets += 1;
            return Ok(());
        }
    };
    let Some(TransportSlice::Udp(udp)) = &sliced.transport else {
        capture.skipped_packets += 1;
        return Ok(());
    };
    if fragmented {
        capture.skipped_packets += 1;
        return Ok(());
    }
    if capture.datagrams.len() >= CAPTURE_DATAGRAMS_MAX {
        bail!(
            "{}: more than {CAPTURE_DATAGRAMS_MAX} datagrams; split the capture",
            path.display()
        );
    }
    capture.datagrams.push(Datagram {
        time,
        source: SocketAddr::new(source, udp.source_port()),
        destination: SocketAddr::new(destination, udp.destination_port()),
        payload: udp.payload().to_vec(),
    });
    Ok(())
}
