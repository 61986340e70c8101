//! End to end: `sluice load --record`, `sluice replay` and `sluice sink` against real processes.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{binary, sluice, Daemon};
use serde_json::Value as Json;

fn last_json_line(output: &std::process::Output) -> Json {
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "sluice failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_str(stdout.lines().last().expect("a JSON line"))
        .expect("the last line is JSON")
}

fn devices(daemon: &Daemon) -> Json {
    daemon.get_json("/v1/devices")["devices"].clone()
}

#[test]
fn a_replayed_recording_stores_the_same_readings_as_the_original_run() {
    let temp = tempfile::tempdir().unwrap();
    let capture = temp.path().join("run.pcap");
    let original = Daemon::start(&[]);
    let target = original.coap.to_string();
    let capture_arg = capture.to_str().unwrap();
    let loaded = last_json_line(&sluice(&[
        "load",
        "--target",
        &target,
        "--devices",
        "4",
        "--count",
        "200",
        "--format",
        "senml-cbor",
        "--records-per-datagram",
        "5",
        "--device-prefix",
        "rec-",
        "--record",
        capture_arg,
        "--json",
    ]));
    assert_eq!(loaded["acknowledged"], 200, "{loaded}");

    let copy = Daemon::start(&[]);
    let replayed = last_json_line(&sluice(&[
        "replay",
        capture_arg,
        "--target",
        &copy.coap.to_string(),
        "--max",
        "--json",
    ]));
    assert_eq!(replayed["sent"], 200, "{replayed}");
    assert_eq!(replayed["acknowledged"], 200, "{replayed}");
    assert_eq!(replayed["responses"]["2.04"], 200, "{replayed}");

    let listed = devices(&original);
    assert_eq!(listed.as_array().unwrap().len(), 4, "{listed}");
    let points: u64 = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["points"].as_u64().unwrap())
        .sum();
    assert_eq!(points, 200 * 5, "{listed}");
    assert_eq!(listed, devices(&copy));
    for name in ["temperature", "humidity", "pressure", "battery", "co2"] {
        let points = original.points("rec-0002", name);
        assert!(!points.is_empty(), "{name}");
        assert_eq!(points, copy.points("rec-0002", name), "{name}");
    }
}

/// A classic pcap (Ethernet link type) the test writes itself.
struct PcapFile {
    bytes: Vec<u8>,
}

impl PcapFile {
    fn new() -> PcapFile {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&0xa1b2c3d4u32.to_le_bytes());
        bytes.extend_from_slice(&2u16.to_le_bytes());
        bytes.extend_from_slice(&4u16.to_le_bytes());
        bytes.extend_from_slice(&[0; 8]); // time zone, accuracy
        bytes.extend_from_slice(&65535u32.to_le_bytes());
        bytes.extend_from_slice(&1u32.to_le_bytes()); // Ethernet
        PcapFile { bytes }
    }

    /// One UDP datagram over IPv4 over Ethernet at `time_us` after an arbitrary epoch.
    fn push(
        &mut self,
        time_us: u64,
        source: ([u8; 4], u16),
        destination: ([u8; 4], u16),
        payload: &[u8],
    ) {
        let frame = ethernet_ipv4_udp(source, destination, payload);
        let seconds = 1_700_000_000 + time_us / 1_000_000;
        self.bytes
            .extend_from_slice(&(seconds as u32).to_le_bytes());
        self.bytes
            .extend_from_slice(&((time_us % 1_000_000) as u32).to_le_bytes());
        self.bytes
            .extend_from_slice(&(frame.len() as u32).to_le_bytes());
        self.bytes
            .extend_from_slice(&(frame.len() as u32).to_le_bytes());
        self.bytes.extend_from_slice(&frame);
    }
}

fn ethernet_ipv4_udp(
    source: ([u8; 4], u16),
    destination: ([u8; 4], u16),
    payload: &[u8],
) -> Vec<u8> {
    let mut frame = vec![0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 0x08, 0x00];
    let total = 20 + 8 + payload.len();
    let mut ip = vec![
        0x45,
        0,
        (total >> 8) as u8,
        total as u8,
        0,
        0,
        0x40,
        0,
        64,
        17,
        0,
        0,
    ];
    ip.extend_from_slice(&source.0);
    ip.extend_from_slice(&destination.0);
    let sum = ip
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum::<u32>();
    let sum = !(((sum & 0xffff) + (sum >> 16)) as u16);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    frame.extend_from_slice(&ip);
    let length = (8 + payload.len()) as u16;
    frame.extend_from_slice(&source.1.to_be_bytes());
    frame.extend_from_slice(&destination.1.to_be_bytes());
    frame.extend_from_slice(&length.to_be_bytes());
    frame.extend_from_slice(&[0, 0]); // no UDP checksum (allowed over IPv4)
    frame.extend_from_slice(payload);
    frame
}

/// A CoAP POST /t/{device} with a SenML JSON payload.
fn coap_post(
    confirmable: bool,
    message_id: u16,
    token: &[u8],
    device: &str,
    json: &str,
) -> Vec<u8> {
    let mut packet = coap_lite::Packet::new();
    packet.header.set_type(if confirmable {
        coap_lite::MessageType::Confirmable
    } else {
        coap_lite::MessageType::NonConfirmable
    });
    packet.header.code = coap_lite::MessageClass::Request(coap_lite::RequestType::Post);
    packet.header.message_id = message_id;
    packet.set_token(token.to_vec());
    packet.add_option(coap_lite::CoapOption::UriPath, b"t".to_vec());
    packet.add_option(coap_lite::CoapOption::UriPath, device.as_bytes().to_vec());
    packet.add_option(coap_lite::CoapOption::ContentFormat, vec![110]);
    packet.payload = json.as_bytes().to_vec();
    packet.to_bytes().unwrap()
}

#[test]
fn replay_of_a_written_capture_stores_every_datagram_once() {
    let temp = tempfile::tempdir().unwrap();
    let mut pcap = PcapFile::new();
    let server = ([10, 0, 0, 1], 5683);
    let mut expected = 0;
    // Three sources; two of them share a device name but keep their own Message IDs.
    for i in 0..30u16 {
        let (source, device) = match i % 3 {
            0 => (([10, 0, 0, 7], 40001), "cap-a"),
            1 => (([10, 0, 0, 8], 40002), "cap-b"),
            _ => (([10, 0, 0, 9], 40003), "cap-b"),
        };
        let json = format!(
            r#"[{{"bn":"s{}/","n":"temp","v":{i},"t":{}}}]"#,
            i % 3,
            1_763_900_000 + u64::from(i)
        );
        let request = coap_post(i % 2 == 0, 100 + i, &i.to_be_bytes(), device, &json);
        let time_us = u64::from(i) * 2_000;
        pcap.push(time_us, source, server, &request);
        expected += 1;
        if i == 4 {
            // The capture's own retransmission of that request, and the server's ACK.
            pcap.push(time_us + 500, source, server, &request);
            let ack = [0x60, 0x44, 0, (100 + i) as u8];
            pcap.push(time_us + 900, server, source, &ack);
        }
    }
    // Not UDP at all (an ARP frame) is skipped too.
    pcap.bytes
        .extend_from_slice(&[0x65, 0x19, 0x6a, 0x65, 0, 0, 0, 0, 14, 0, 0, 0, 14, 0, 0, 0]);
    pcap.bytes
        .extend_from_slice(&[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 0x08, 0x06]);
    let path = temp.path().join("field.pcap");
    std::fs::write(&path, &pcap.bytes).unwrap();

    let daemon = Daemon::start(&[]);
    let output = sluice(&[
        "replay",
        path.to_str().unwrap(),
        "--target",
        &daemon.coap.to_string(),
        "--speed",
        "4",
        "--json",
    ]);
    let report = last_json_line(&output);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(report["sent"], expected, "{report}");
    assert_eq!(report["acknowledged"], expected, "{report}");
    assert!(stderr.contains("30 requests from 3 sources"), "{stderr}");
    assert!(
        stderr.contains("1 captured retransmissions skipped"),
        "{stderr}"
    );
    assert!(stderr.contains("1 datagrams not requests"), "{stderr}");

    // NON requests complete on their response (a NON 2.04): all of them are stored by now.
    assert_eq!(daemon.points("cap-a", "s0/temp").len(), 10);
    assert_eq!(daemon.points("cap-b", "s1/temp").len(), 10);
    assert_eq!(daemon.points("cap-b", "s2/temp").len(), 10);
}

#[test]
fn replay_reads_pcapng_with_its_timestamp_resolution() {
    // pcapng: section header, interface (Ethernet, if_tsresol = 9: nanoseconds), packets.
    let mut bytes = Vec::new();
    let block = |bytes: &mut Vec<u8>, kind: u32, body: &[u8]| {
        let length = (12 + body.len()) as u32;
        bytes.extend_from_slice(&kind.to_le_bytes());
        bytes.extend_from_slice(&length.to_le_bytes());
        bytes.extend_from_slice(body);
        bytes.extend_from_slice(&length.to_le_bytes());
    };
    let mut section = Vec::new();
    section.extend_from_slice(&0x1a2b3c4du32.to_le_bytes());
    section.extend_from_slice(&1u16.to_le_bytes());
    section.extend_from_slice(&0u16.to_le_bytes());
    section.extend_from_slice(&(-1i64).to_le_bytes());
    block(&mut bytes, 0x0a0d0d0a, &section);
    let mut interface = vec![1, 0, 0, 0, 0, 0, 0, 0]; // Ethernet, reserved, snaplen 0
    interface.extend_from_slice(&[9, 0, 1, 0, 9, 0, 0, 0]); // if_tsresol = 9, padded
    interface.extend_from_slice(&[0, 0, 0, 0]); // end of options
    block(&mut bytes, 1, &interface);
    for i in 0..5u16 {
        let json = format!(
            r#"[{{"n":"level","v":{i},"t":{}}}]"#,
            1_763_900_000 + u64::from(i)
        );
        let frame = ethernet_ipv4_udp(
            ([10, 0, 0, 5], 40000),
            ([10, 0, 0, 1], 5683),
            &coap_post(true, i, &[1, i as u8], "ng", &json),
        );
        // 1 ms apart in nanoseconds: read as microseconds, the replay would take 5 s.
        let time_ns = 1_700_000_000_000_000_000u64 + u64::from(i) * 1_000_000;
        let mut packet = Vec::new();
        packet.extend_from_slice(&0u32.to_le_bytes());
        packet.extend_from_slice(&((time_ns >> 32) as u32).to_le_bytes());
        packet.extend_from_slice(&(time_ns as u32).to_le_bytes());
        packet.extend_from_slice(&(frame.len() as u32).to_le_bytes());
        packet.extend_from_slice(&(frame.len() as u32).to_le_bytes());
        packet.extend_from_slice(&frame);
        packet.resize(packet.len().div_ceil(4) * 4, 0);
        block(&mut bytes, 6, &packet);
    }
    let temp = tempfile::tempdir().unwrap();
    let path = temp.path().join("field.pcapng");
    std::fs::write(&path, &bytes).unwrap();

    let daemon = Daemon::start(&[]);
    let started = std::time::Instant::now();
    let report = last_json_line(&sluice(&[
        "replay",
        path.to_str().unwrap(),
        "--target",
        &daemon.coap.to_string(),
        "--json",
    ]));
    assert_eq!(report["acknowledged"], 5, "{report}");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "paced as microseconds: {:?}",
        started.elapsed()
    );
    assert_eq!(daemon.points("ng", "level").len(), 5);
}

#[test]
fn replay_and_load_refuse_bad_input_with_a_message_and_exit_1() {
    let temp = tempfile::tempdir().unwrap();
    let missing = temp.path().join("missing.pcap");
    let corrupt = temp.path().join("corrupt.pcap");
    std::fs::write(&corrupt, b"this is not a capture file at all").unwrap();
    let truncated = temp.path().join("truncated.pcap");
    let mut pcap = PcapFile::new();
    pcap.push(
        0,
        ([10, 0, 0, 7], 40001),
        ([10, 0, 0, 1], 5683),
        &coap_post(true, 1, &[1], "x", "[]"),
    );
    pcap.bytes.truncate(pcap.bytes.len() - 10);
    std::fs::write(&truncated, &pcap.bytes).unwrap();
    let empty = temp.path().join("empty.pcap");
    std::fs::write(&empty, PcapFile::new().bytes).unwrap();

    // A port nothing listens on: the kernel answers ICMP port unreachable.
    let closed = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let closed_port = closed.local_addr().unwrap().to_string();
    drop(closed);
    let good = temp.path().join("good.pcap");
    let mut pcap = PcapFile::new();
    pcap.push(
        0,
        ([10, 0, 0, 7], 40001),
        ([10, 0, 0, 1], 5683),
        &coap_post(true, 1, &[1], "x", "[]"),
    );
    std::fs::write(&good, &pcap.bytes).unwrap();

    let path = |p: &Path| p.to_str().unwrap().to_string();
    for (args, says) in [
        (vec!["replay".to_string(), path(&missing)], "cannot open"),
        (
            vec!["replay".to_string(), path(&corrupt)],
            "not a valid capture",
        ),
        (
            vec!["replay".to_string(), path(&truncated)],
            "not a valid capture",
        ),
        (vec!["replay".to_string(), path(&empty)], "no CoAP requests"),
        (
            vec![
                "replay".into(),
                path(&good),
                "--target".into(),
                closed_port.clone(),
            ],
            "refuses",
        ),
        (
            vec![
                "load".into(),
                "--target".into(),
                closed_port.clone(),
                "--count".into(),
                "10".into(),
            ],
            "refuses",
        ),
        (
            vec![
                "load".into(),
                "--target".into(),
                "127.0.0.1:5683".into(),
                "--record".into(),
                path(&temp.path().join("no/such/dir.pcap")),
            ],
            "--record: cannot create",
        ),
    ] {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let output = sluice(&refs);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }
}

#[test]
fn the_sink_counts_every_datagram_load_sends_without_answers() {
    let probe = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let address = probe.local_addr().unwrap().to_string();
    drop(probe);
    let mut sink = Command::new(binary("sluice"))
        .args([
            "sink",
            "--bind",
            &address,
            "--idle-exit-ms",
            "500",
            "--max-seconds",
            "60",
            "--json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the sink");
    // The sink says where it listens once bound; wait for that (bounded by its --max-seconds).
    let mut stderr = std::io::BufReader::new(sink.stderr.take().expect("stderr"));
    let mut line = String::new();
    std::io::BufRead::read_line(&mut stderr, &mut line).unwrap();
    assert!(line.contains("counting datagrams"), "{line}");

    let loaded = last_json_line(&sluice(&[
        "load",
        "--target",
        &address,
        "--mode",
        "non",
        "--no-response",
        "--devices",
        "4",
        "--count",
        "400",
        "--rate",
        "2000",
        "--json",
    ]));
    assert_eq!(loaded["sent"], 400, "{loaded}");
    assert_eq!(loaded["timeouts"], 0, "{loaded}");
    let mut stdout = String::new();
    std::io::Read::read_to_string(&mut sink.stdout.take().expect("stdout"), &mut stdout).unwrap();
    assert!(sink.wait().unwrap().success());
    let counted: Json = serde_json::from_str(stdout.trim()).expect("the sink's JSON line");
    assert_eq!(counted["received"], 400, "{counted}");
}
