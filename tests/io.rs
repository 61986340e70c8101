//! The socket I/O backends (`--io`, docs/configuration.md): the start-up log names the backend in
//! use, and under io_uring a burst far larger than a socket's ring of provided buffers (256) is
//! answered and stored in full: the kernel ends the multishot receive with ENOBUFS when the
//! buffers run out, and the shard arms it again once it gave them back.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use coap_lite::{MessageType, Packet, RequestType};
use common::{code, request, Client, Daemon};

const SENML_JSON: Option<u16> = Some(110);
/// Requests sent at once: several times the 256 provided buffers of a socket.
const BURST: usize = 2000;
/// Retransmission rounds for requests whose answer did not come (a datagram lost on a loaded
/// machine); each waits for answers until none came for `QUIET`.
const ROUNDS_MAX: usize = 6;
const QUIET: Duration = Duration::from_secs(3);

#[test]
fn uring_is_logged_and_a_burst_beyond_the_buffer_ring_is_answered() {
    // No shedding on queueing delay: on a loaded machine a burst may wait longer than the
    // default 500 ms in the socket, and every request is to be stored here.
    let daemon = Daemon::start(&["--io", "uring", "--shed-delay", "off"]);
    let log = daemon.log_text();
    assert!(
        log.contains("backend=io_uring") && log.contains("CoAP listening"),
        "log: {log}"
    );
    let mut client = Client::new(daemon.coap);
    let packets: Vec<Packet> = (0..BURST)
        .map(|i| {
            let payload = format!(r#"[{{"n":"burst","t":{},"v":{i}}}]"#, 1_763_900_000 + i);
            request(
                MessageType::Confirmable,
                RequestType::Post,
                client.message_id(),
                "/t/burst-dev",
                SENML_JSON,
                payload.as_bytes(),
            )
        })
        .collect();
    let expected: HashSet<u16> = packets.iter().map(|p| p.header.message_id).collect();
    assert_eq!(expected.len(), BURST);

    // A reader collects the answers while the burst goes out, so the client's own receive
    // buffer does not overflow.
    let reader_socket = client.socket.try_clone().unwrap();
    reader_socket.set_read_timeout(Some(QUIET)).unwrap();
    let reader = std::thread::spawn(move || {
        let mut answered = HashSet::new();
        let mut codes = HashSet::new();
        let mut buffer = [0u8; 2048];
        let deadline = Instant::now() + Duration::from_secs(120);
        while answered.len() < BURST && Instant::now() < deadline {
            let Ok(len) = reader_socket.recv(&mut buffer) else {
                break;
            };
            let response = Packet::from_bytes(&buffer[..len]).expect("a CoAP answer");
            codes.insert(code(&response));
            answered.insert(response.header.message_id);
        }
        (answered, codes)
    });
    for packet in &packets {
        client.send(packet);
    }
    let (mut answered, mut codes) = reader.join().unwrap();
    for _ in 0..ROUNDS_MAX {
        if answered.len() == BURST {
            break;
        }
        // Retransmit what got no answer, as a device would; dedup answers what was stored.
        for packet in packets
            .iter()
            .filter(|p| !answered.contains(&p.header.message_id))
        {
            client.send(packet);
        }
        while let Some(response) = client.receive_within(QUIET) {
            codes.insert(code(&response));
            answered.insert(response.header.message_id);
            if answered.len() == BURST {
                break;
            }
        }
    }
    assert_eq!(answered, expected, "every request of the burst is answered");
    assert_eq!(codes, HashSet::from(["2.04".to_string()]));
    assert_eq!(daemon.points("burst-dev", "burst").len(), BURST);
    let exhausted = daemon.metric("sluice_receive_buffers_exhausted_total");
    let rearms = daemon.metric("sluice_receive_rearms_total");
    assert!(
        exhausted >= 1.0,
        "a burst of {BURST} ran the ring of 256 buffers out"
    );
    assert!(
        rearms >= exhausted,
        "{rearms} re-arms after {exhausted} ends"
    );
}

#[test]
fn recvmmsg_is_logged_when_asked_for() {
    let daemon = Daemon::start(&["--io", "recvmmsg"]);
    let log = daemon.log_text();
    assert!(log.contains("backend=recvmmsg/sendmmsg"), "log: {log}");
    let mut client = Client::new(daemon.coap);
    let payload = br#"[{"n":"x","t":1763900000,"v":1}]"#;
    assert_eq!(
        code(&client.post("/t/mmsg-dev", SENML_JSON, payload)),
        "2.04"
    );
    assert_eq!(daemon.metric("sluice_receive_rearms_total"), 0.0);
}

#[test]
fn an_unknown_backend_is_refused() {
    let output = common::run(std::process::Command::new(common::binary("sluiced")).args([
        "--io",
        "epoll",
        "--check-config",
    ]));
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("invalid value 'epoll'"), "{stderr}");
}
