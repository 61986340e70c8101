//! Client and server against each other, in memory, with a virtual clock.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::{Application, Client, ClientError, Psk, PskLookup, Server, ServerConfig, Suite};

struct Keys(HashMap<Vec<u8>, Arc<Psk>>);

impl PskLookup for Keys {
    fn lookup(&self, identity: &[u8]) -> Option<Arc<Psk>> {
        self.0.get(identity).cloned()
    }
}

fn keys(entries: &[(&str, &str, &str)]) -> Keys {
    Keys(
        entries
            .iter()
            .map(|(identity, device, key)| {
                let psk = Psk {
                    identity: identity.as_bytes().into(),
                    device: Arc::from(*device),
                    key: key.as_bytes().into(),
                };
                (identity.as_bytes().to_vec(), Arc::new(psk))
            })
            .collect(),
    )
}

fn peer(port: u16) -> SocketAddr {
    ([127, 0, 0, 1], port).into()
}

/// Runs a handshake to completion or failure; returns the client's error if any.
fn handshake(
    server: &mut Server,
    keys: &Keys,
    client: &mut Client,
    from: SocketAddr,
    now: Instant,
) -> Result<(), ClientError> {
    let mut to_server = Vec::new();
    client.start(&mut to_server);
    let mut reply = Vec::new();
    let mut application = Application::default();
    for _ in 0..8 {
        if to_server.is_empty() {
            break;
        }
        server.handle(now, from, &to_server, keys, &mut reply, &mut application);
        to_server.clear();
        client.handle(&reply, &mut to_server, &mut application)?;
    }
    if client.is_connected() {
        Ok(())
    } else {
        Err(ClientError::NotConnected)
    }
}

fn send(
    server: &mut Server,
    keys: &Keys,
    client: &mut Client,
    from: SocketAddr,
    now: Instant,
    message: &[u8],
) -> (Vec<u8>, Option<Arc<str>>, Vec<Vec<u8>>) {
    let mut datagram = Vec::new();
    client.seal(message, &mut datagram).unwrap();
    let mut reply = Vec::new();
    let mut application = Application::default();
    let device = server.handle(now, from, &datagram, keys, &mut reply, &mut application);
    let plaintexts = application.records().map(<[u8]>::to_vec).collect();
    (datagram, device, plaintexts)
}

#[test]
fn every_suite_completes_and_carries_data_both_ways() {
    let keys = keys(&[("id-7", "dev-7", "secret")]);
    let now = Instant::now();
    for suite in Suite::ALL {
        let mut server = Server::new(ServerConfig::default(), now);
        let mut client = Client::new(b"id-7", b"secret", &[suite]);
        handshake(&mut server, &keys, &mut client, peer(1000), now).unwrap();
        assert_eq!(server.sessions_len(), 1);
        assert_eq!(server.handshakes_len(), 0);
        let (_, device, plaintexts) =
            send(&mut server, &keys, &mut client, peer(1000), now, b"ping");
        assert_eq!(device.as_deref(), Some("dev-7"));
        assert_eq!(plaintexts, vec![b"ping".to_vec()]);
        let mut response = Vec::new();
        assert!(server.seal(peer(1000), b"pong", &mut response));
        let mut application = Application::default();
        client
            .handle(&response, &mut Vec::new(), &mut application)
            .unwrap();
        assert_eq!(
            application.records().collect::<Vec<_>>(),
            vec![&b"pong"[..]]
        );
    }
}

#[test]
fn a_hello_without_cookie_leaves_no_state() {
    let keys = keys(&[("id-7", "dev-7", "secret")]);
    let now = Instant::now();
    let mut server = Server::new(ServerConfig::default(), now);
    let mut hello = Vec::new();
    Client::new(b"id-7", b"secret", &Suite::ALL).start(&mut hello);
    let mut reply = Vec::new();
    let mut application = Application::default();
    for port in 0..100 {
        server.handle(now, peer(port), &hello, &keys, &mut reply, &mut application);
        assert!(reply.len() <= hello.len(), "no amplification");
    }
    assert_eq!(server.handshakes_len(), 0);
    assert_eq!(server.counters().hello_verify_requests, 100);
}

#[test]
fn wrong_key_and_unknown_identity_fail_alike() {
    let keys = keys(&[("id-7", "dev-7", "secret")]);
    let now = Instant::now();
    let mut server = Server::new(ServerConfig::default(), now);
    let mut wrong = Client::new(b"id-7", b"guess", &[Suite::Aes128Ccm8]);
    assert_eq!(
        handshake(&mut server, &keys, &mut wrong, peer(1), now),
        Err(ClientError::Alert(51))
    );
    let mut unknown = Client::new(b"nobody", b"secret", &[Suite::Aes128Ccm8]);
    assert_eq!(
        handshake(&mut server, &keys, &mut unknown, peer(2), now),
        Err(ClientError::Alert(51))
    );
    assert_eq!(server.sessions_len(), 0);
    assert_eq!(server.handshakes_len(), 0);
    assert_eq!(server.counters().handshakes_failed, 2);
    assert_eq!(server.counters().unknown_identities, 1);
}

#[test]
fn replayed_and_forged_records_are_dropped_and_counted() {
    let keys = keys(&[("id-7", "dev-7", "secret")]);
    let now = Instant::now();
    let mut server = Server::new(ServerConfig::default(), now);
    let mut client = Client::new(b"id-7", b"secret", &[Suite::Aes128Ccm8]);
    handshake(&mut server, &keys, &mut client, peer(1), now).unwrap();
    let (datagram, device, _) = send(&mut server, &keys, &mut client, peer(1), now, b"once");
    assert!(device.is_some());
    let mut reply = Vec::new();
    let mut application = Application::default();
    let again = server.handle(now, peer(1), &datagram, &keys, &mut reply, &mut application);
    assert!(again.is_none() && application.is_empty());
    assert_eq!(server.counters().records_replayed, 1);
    let mut forged = datagram.clone();
    forged[10] ^= 0x40; // another sequence number: the tag no longer matches
    server.handle(now, peer(1), &forged, &keys, &mut reply, &mut application);
    assert!(application.is_empty());
    assert_eq!(server.counters().records_forged, 1);
    // The same record from another address has no session there.
    server.handle(now, peer(2), &datagram, &keys, &mut reply, &mut application);
    assert_eq!(server.counters().records_without_session, 1);
}

#[test]
fn sessions_survive_export_and_import_unless_the_key_changed() {
    let keys = keys(&[("a", "dev-a", "key-a"), ("b", "dev-b", "key-b")]);
    let now = Instant::now();
    let mut server = Server::new(ServerConfig::default(), now);
    let mut a = Client::new(b"a", b"key-a", &[Suite::Aes128GcmSha256]);
    let mut b = Client::new(b"b", b"key-b", &[Suite::Aes128Ccm]);
    handshake(&mut server, &keys, &mut a, peer(1), now).unwrap();
    handshake(&mut server, &keys, &mut b, peer(2), now).unwrap();
    send(&mut server, &keys, &mut a, peer(1), now, b"before");
    let mut file = Vec::new();
    server.export_sessions(&mut file);

    let changed = self::keys(&[("a", "dev-a", "key-a"), ("b", "dev-b", "new-key")]);
    let mut restarted = Server::new(ServerConfig::default(), now);
    assert_eq!(restarted.import_sessions(now, &file, &changed), Ok((1, 1)));
    let (datagram, device, plaintexts) =
        send(&mut restarted, &changed, &mut a, peer(1), now, b"after");
    assert_eq!(device.as_deref(), Some("dev-a"));
    assert_eq!(plaintexts, vec![b"after".to_vec()]);
    let mut reply = Vec::new();
    let mut application = Application::default();
    restarted.handle(
        now,
        peer(1),
        &datagram,
        &changed,
        &mut reply,
        &mut application,
    );
    assert_eq!(restarted.counters().records_replayed, 1);

    let last = file.len() - 1;
    file[last] ^= 1;
    assert!(Server::new(ServerConfig::default(), now)
        .import_sessions(now, &file, &keys)
        .is_err());
}

#[test]
fn rekey_keeps_unchanged_devices_and_ends_the_others() {
    let keys = keys(&[("a", "dev-a", "key-a"), ("b", "dev-b", "key-b")]);
    let now = Instant::now();
    let mut server = Server::new(ServerConfig::default(), now);
    let mut a = Client::new(b"a", b"key-a", &[Suite::Aes128Ccm8]);
    let mut b = Client::new(b"b", b"key-b", &[Suite::Aes128Ccm8]);
    handshake(&mut server, &keys, &mut a, peer(1), now).unwrap();
    handshake(&mut server, &keys, &mut b, peer(2), now).unwrap();
    let reloaded = self::keys(&[("a", "dev-a", "key-a"), ("c", "dev-c", "key-c")]);
    server.rekey(&reloaded);
    assert_eq!(server.sessions_len(), 1);
    assert_eq!(server.counters().sessions_revoked, 1);
    let (_, device, _) = send(&mut server, &reloaded, &mut a, peer(1), now, b"still");
    assert_eq!(device.as_deref(), Some("dev-a"));
}

#[test]
fn the_least_recently_active_sessions_are_evicted_at_the_bound() {
    let keys = keys(&[("a", "dev-a", "key-a")]);
    let start = Instant::now();
    let config = ServerConfig {
        sessions_max: 32,
        ..ServerConfig::default()
    };
    let mut server = Server::new(config, start);
    let mut clients = Vec::new();
    for port in 0..32u16 {
        let now = start + Duration::from_secs(port as u64);
        let mut client = Client::new(b"a", b"key-a", &[Suite::Aes128Ccm8]);
        handshake(&mut server, &keys, &mut client, peer(port), now).unwrap();
        clients.push(client);
    }
    // Port 0 was the first but is active now; port 1 is the least recently active.
    let now = start + Duration::from_secs(100);
    send(&mut server, &keys, &mut clients[0], peer(0), now, b"fresh");
    let mut late = Client::new(b"a", b"key-a", &[Suite::Aes128Ccm8]);
    handshake(&mut server, &keys, &mut late, peer(99), now).unwrap();
    assert_eq!(server.sessions_len(), 31, "32 - 32/16 + 1");
    assert_eq!(server.counters().sessions_evicted, 2);
    let (_, kept, _) = send(&mut server, &keys, &mut clients[0], peer(0), now, b"x");
    assert!(kept.is_some());
    let (_, evicted, _) = send(&mut server, &keys, &mut clients[1], peer(1), now, b"x");
    assert!(evicted.is_none());
}

#[test]
fn handshakes_time_out() {
    let keys = keys(&[("a", "dev-a", "key-a")]);
    let now = Instant::now();
    let mut server = Server::new(ServerConfig::default(), now);
    let mut client = Client::new(b"a", b"key-a", &[Suite::Aes128Ccm8]);
    let mut datagram = Vec::new();
    client.start(&mut datagram);
    let mut reply = Vec::new();
    let mut application = Application::default();
    server.handle(now, peer(1), &datagram, &keys, &mut reply, &mut application);
    datagram.clear();
    client
        .handle(&reply, &mut datagram, &mut application)
        .unwrap();
    server.handle(now, peer(1), &datagram, &keys, &mut reply, &mut application);
    assert_eq!(server.handshakes_len(), 1);
    server.expire(now + Duration::from_secs(59));
    assert_eq!(server.handshakes_len(), 1);
    server.expire(now + Duration::from_secs(60));
    assert_eq!(server.handshakes_len(), 0);
    assert_eq!(server.counters().handshakes_timed_out, 1);
}

/// The datagrams of a handshake with `server` from `from`, in order (the first ClientHello, the one
/// with the cookie, the client's last flight), and two application records if it completed; and
/// the client.
fn recorded_datagrams(
    server: &mut Server,
    keys: &Keys,
    from: SocketAddr,
) -> (Vec<Vec<u8>>, Client) {
    let now = Instant::now();
    let mut client = Client::new(b"id-7", b"secret", &[Suite::Aes128Ccm8]);
    let mut datagrams = Vec::new();
    let mut to_server = Vec::new();
    client.start(&mut to_server);
    let mut reply = Vec::new();
    let mut application = Application::default();
    for _ in 0..8 {
        if to_server.is_empty() {
            break;
        }
        datagrams.push(to_server.clone());
        server.handle(now, from, &to_server, keys, &mut reply, &mut application);
        to_server.clear();
        client
            .handle(&reply, &mut to_server, &mut application)
            .unwrap();
    }
    for message in [&b"first"[..], b"second"] {
        let mut record = Vec::new();
        if client.seal(message, &mut record).is_ok() {
            datagrams.push(record);
        }
    }
    (datagrams, client)
}

mod arbitrary_input {
    use super::*;
    use proptest::prelude::*;

    /// One datagram the fuzzer sends: a recorded one, changed or not, or random bytes.
    #[derive(Debug, Clone)]
    enum Input {
        Recorded {
            index: usize,
            flips: Vec<(usize, u8)>,
            truncate: Option<usize>,
        },
        Random(Vec<u8>),
    }

    fn input() -> impl Strategy<Value = Input> {
        prop_oneof![
            (
                0..8usize,
                proptest::collection::vec((0..512usize, any::<u8>()), 0..4),
                proptest::option::of(0..512usize),
            )
                .prop_map(|(index, flips, truncate)| Input::Recorded {
                    index,
                    flips,
                    truncate
                }),
            proptest::collection::vec(any::<u8>(), 0..96).prop_map(Input::Random),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        /// Whatever arrives, from whichever of two addresses, in whatever order: no panic, the
        /// tables stay within their bounds, a peer the server holds no state for never gets
        /// back more bytes than it sent, and the device's established session survives all of
        /// it (nothing sent without its keys can end it).
        #[test]
        fn arbitrary_and_mutated_datagrams_never_panic_or_amplify(
            sessions_max in 0..3usize,
            handshakes_max in 0..3usize,
            steps in proptest::collection::vec((input(), any::<bool>(), 0..90u64), 1..40),
        ) {
            let keys = keys(&[("id-7", "dev-7", "secret")]);
            let start = Instant::now();
            let config = ServerConfig { sessions_max, handshakes_max, ..ServerConfig::default() };
            let mut server = Server::new(config, start);
            // Recorded against this server, so that its cookies are valid here.
            let (recorded, mut device) = recorded_datagrams(&mut server, &keys, peer(1));
            let mut reply = Vec::new();
            let mut application = Application::default();
            let mut now = start;
            for (input, other_peer, advance_s) in steps {
                now += Duration::from_secs(advance_s);
                let datagram = match input {
                    Input::Recorded { index, flips, truncate } => {
                        let mut datagram = recorded[index % recorded.len()].clone();
                        for (at, byte) in flips {
                            if !datagram.is_empty() {
                                let at = at % datagram.len();
                                datagram[at] = byte;
                            }
                        }
                        if let Some(end) = truncate {
                            datagram.truncate(end);
                        }
                        datagram
                    }
                    Input::Random(bytes) => bytes,
                };
                let from = peer(if other_peer { 2 } else { 1 });
                let stateless = !server.has_state_for(from);
                server.handle(now, from, &datagram, &keys, &mut reply, &mut application);
                // Only a ClientHello with a valid cookie (the address answered) makes state.
                let stateless = stateless && !server.has_state_for(from);
                server.expire(now);
                prop_assert!(server.sessions_len() <= sessions_max.max(1));
                prop_assert!(server.handshakes_len() <= handshakes_max);
                if stateless {
                    prop_assert!(reply.len() <= datagram.len(), "amplification");
                }
            }
            if device.is_connected() {
                let (_, writer, plaintexts) =
                    send(&mut server, &keys, &mut device, peer(1), now, b"still here");
                prop_assert_eq!(writer.as_deref(), Some("dev-7"));
                prop_assert_eq!(plaintexts, vec![b"still here".to_vec()]);
            }
        }
    }
}

/// Runs a handshake up to the client's last flight (ClientKeyExchange, ChangeCipherSpec,
/// Finished) and returns that flight undelivered, with the ClientHello that carried the cookie.
fn handshake_until_last_flight(
    server: &mut Server,
    keys: &Keys,
    client: &mut Client,
    from: SocketAddr,
    now: Instant,
) -> (Vec<u8>, Vec<u8>) {
    let mut hello = Vec::new();
    client.start(&mut hello);
    let mut reply = Vec::new();
    let mut application = Application::default();
    server.handle(now, from, &hello, keys, &mut reply, &mut application);
    let mut hello_with_cookie = Vec::new();
    client
        .handle(&reply, &mut hello_with_cookie, &mut application)
        .unwrap();
    server.handle(
        now,
        from,
        &hello_with_cookie,
        keys,
        &mut reply,
        &mut application,
    );
    let mut last_flight = Vec::new();
    client
        .handle(&reply, &mut last_flight, &mut application)
        .unwrap();
    assert!(!last_flight.is_empty());
    (last_flight, hello_with_cookie)
}

/// RFC 6347 §4.2.8: a ClientHello from the address of an established session (replayed, spoofed
/// or from another device behind the same NAT port) must not end that session; only a new
/// handshake that completes with a valid key replaces it.
#[test]
fn a_new_handshake_replaces_a_session_only_once_its_finished_verifies() {
    let keys = keys(&[("id-7", "dev-7", "secret"), ("id-8", "dev-8", "other")]);
    let now = Instant::now();
    let mut server = Server::new(ServerConfig::default(), now);
    let mut device = Client::new(b"id-7", b"secret", &[Suite::Aes128Ccm8]);
    let (last_flight, hello_with_cookie) =
        handshake_until_last_flight(&mut server, &keys, &mut device, peer(1), now);
    let mut reply = Vec::new();
    let mut application = Application::default();
    server.handle(
        now,
        peer(1),
        &last_flight,
        &keys,
        &mut reply,
        &mut application,
    );
    device
        .handle(&reply, &mut Vec::new(), &mut application)
        .unwrap();
    assert!(device.is_connected());

    // The ClientHello with its valid cookie, replayed: a new handshake, the session stays.
    server.handle(
        now,
        peer(1),
        &hello_with_cookie,
        &keys,
        &mut reply,
        &mut application,
    );
    assert_eq!(server.handshakes_len(), 1);
    let (_, writer, plaintexts) = send(&mut server, &keys, &mut device, peer(1), now, b"a");
    assert_eq!(writer.as_deref(), Some("dev-7"));
    assert_eq!(plaintexts, vec![b"a".to_vec()]);

    // A handshake with a wrong key from the same address fails and leaves the session.
    let mut intruder = Client::new(b"id-7", b"guess", &[Suite::Aes128Ccm8]);
    assert_eq!(
        handshake(&mut server, &keys, &mut intruder, peer(1), now),
        Err(ClientError::Alert(51))
    );
    let (_, writer, _) = send(&mut server, &keys, &mut device, peer(1), now, b"b");
    assert_eq!(writer.as_deref(), Some("dev-7"));

    // Another device that completes its handshake from that address takes it over; records of
    // the old session in the same datagram before its Finished still count as the old device's.
    let mut successor = Client::new(b"id-8", b"other", &[Suite::Aes128GcmSha256]);
    let (successor_flight, _) =
        handshake_until_last_flight(&mut server, &keys, &mut successor, peer(1), now);
    let mut datagram = Vec::new();
    device.seal(b"c", &mut datagram).unwrap();
    datagram.extend_from_slice(&successor_flight);
    let writer = server.handle(now, peer(1), &datagram, &keys, &mut reply, &mut application);
    assert_eq!(writer.as_deref(), Some("dev-7"));
    assert_eq!(application.records().collect::<Vec<_>>(), vec![&b"c"[..]]);
    successor
        .handle(&reply, &mut Vec::new(), &mut application)
        .unwrap();
    assert!(successor.is_connected());
    assert_eq!(server.sessions_len(), 1);
    let (_, writer, _) = send(&mut server, &keys, &mut successor, peer(1), now, b"d");
    assert_eq!(writer.as_deref(), Some("dev-8"));
    let (_, writer, _) = send(&mut server, &keys, &mut device, peer(1), now, b"e");
    assert!(writer.is_none(), "the old session ended");
}

/// A ClientKeyExchange in epoch 0 is not authenticated: from the address of an established
/// session it must get no answer (it used to get the server's last flight, about three times
/// its size: an amplifier for anyone who spoofs a device's address).
#[test]
fn an_unauthenticated_client_key_exchange_gets_no_answer() {
    let keys = keys(&[("id-7", "dev-7", "secret")]);
    let now = Instant::now();
    let mut server = Server::new(ServerConfig::default(), now);
    let mut device = Client::new(b"id-7", b"secret", &[Suite::Aes128Ccm8]);
    handshake(&mut server, &keys, &mut device, peer(1), now).unwrap();
    let mut message = Vec::new();
    crate::wire::push_handshake(
        &mut message,
        crate::wire::HANDSHAKE_CLIENT_KEY_EXCHANGE,
        2,
        &[],
    );
    let mut datagram = Vec::new();
    crate::wire::push_record(
        &mut datagram,
        crate::wire::CONTENT_HANDSHAKE,
        0,
        9,
        &message,
    );
    let mut reply = Vec::new();
    let mut application = Application::default();
    server.handle(now, peer(1), &datagram, &keys, &mut reply, &mut application);
    assert!(reply.is_empty(), "{} bytes answered", reply.len());
    assert_eq!(server.sessions_len(), 1);
}

/// The record version is not covered by the AEAD's additional data as the server computes it
/// (always DTLS 1.2), so a protected record claiming another version is refused outright.
#[test]
fn protected_records_of_another_version_are_refused() {
    let keys = keys(&[("id-7", "dev-7", "secret")]);
    let now = Instant::now();
    let mut server = Server::new(ServerConfig::default(), now);
    let mut device = Client::new(b"id-7", b"secret", &[Suite::Aes128Ccm8]);
    handshake(&mut server, &keys, &mut device, peer(1), now).unwrap();
    let mut datagram = Vec::new();
    device.seal(b"x", &mut datagram).unwrap();
    datagram[1..3].copy_from_slice(&crate::wire::DTLS_1_0.to_be_bytes());
    let mut reply = Vec::new();
    let mut application = Application::default();
    let writer = server.handle(now, peer(1), &datagram, &keys, &mut reply, &mut application);
    assert!(writer.is_none() && application.is_empty());
    assert_eq!(server.counters().records_malformed, 1);
}

/// A cookie is good under the secret that made it and the next one, not after: a captured
/// ClientHello with its cookie cannot be replayed from the device's address for ever.
#[test]
fn cookies_expire_with_their_secret() {
    let keys = keys(&[("id-7", "dev-7", "secret")]);
    let start = Instant::now();
    let mut server = Server::new(ServerConfig::default(), start);
    let mut client = Client::new(b"id-7", b"secret", &[Suite::Aes128Ccm8]);
    let mut hello = Vec::new();
    client.start(&mut hello);
    let mut reply = Vec::new();
    let mut application = Application::default();
    server.handle(start, peer(1), &hello, &keys, &mut reply, &mut application);
    let mut hello_with_cookie = Vec::new();
    client
        .handle(&reply, &mut hello_with_cookie, &mut application)
        .unwrap();
    assert_eq!(server.counters().hello_verify_requests, 1);

    // Under the next secret it still passes.
    let later = start + crate::server::COOKIE_SECRET_LIFETIME + Duration::from_secs(1);
    server.handle(
        later,
        peer(1),
        &hello_with_cookie,
        &keys,
        &mut reply,
        &mut application,
    );
    assert_eq!(server.counters().handshakes_started, 1);
    assert_eq!(server.counters().hello_verify_requests, 1);

    // Two secrets later it gets a HelloVerifyRequest again, not the handshake's flight.
    let much_later = later + crate::server::COOKIE_SECRET_LIFETIME;
    server.handle(
        much_later,
        peer(1),
        &hello_with_cookie,
        &keys,
        &mut reply,
        &mut application,
    );
    assert_eq!(server.counters().hello_verify_requests, 2);
    assert_eq!(reply[13], crate::wire::HANDSHAKE_HELLO_VERIFY_REQUEST);
}

/// A session file is only a CRC away from any change: a session whose sequence numbers were set
/// back (so that the server would reuse AEAD nonces) must not be restored.
#[test]
fn a_session_altered_in_the_file_is_not_restored() {
    let keys = keys(&[("id-7", "dev-7", "secret")]);
    let now = Instant::now();
    let mut server = Server::new(ServerConfig::default(), now);
    let mut device = Client::new(b"id-7", b"secret", &[Suite::Aes128Ccm8]);
    handshake(&mut server, &keys, &mut device, peer(1), now).unwrap();
    // The server's next epoch-1 write sequence number goes to 300 (0x012c).
    for _ in 0..299 {
        assert!(server.seal(peer(1), b"response", &mut Vec::new()));
    }
    let mut file = Vec::new();
    server.export_sessions(&mut file);
    let written = 300u64.to_be_bytes();
    let at = file
        .windows(8)
        .position(|bytes| bytes == written)
        .expect("the write sequence number is in the file");
    file[at..at + 8].copy_from_slice(&1u64.to_be_bytes());
    let body = file.len() - 4;
    let checksum = crc32c::crc32c(&file[..body]);
    file[body..].copy_from_slice(&checksum.to_be_bytes());
    let mut restarted = Server::new(ServerConfig::default(), now);
    assert_eq!(restarted.import_sessions(now, &file, &keys), Ok((0, 1)));
}

/// A datagram of one ClientHello offering `version` at most, TLS_PSK_WITH_AES_128_CCM_8 and
/// `cookie`, built by hand (the client only speaks DTLS 1.2).
fn client_hello_datagram(version: u16, cookie: &[u8]) -> Vec<u8> {
    let mut body = version.to_be_bytes().to_vec();
    body.extend_from_slice(&[7; 32]);
    body.push(0);
    body.push(cookie.len() as u8);
    body.extend_from_slice(cookie);
    body.extend_from_slice(&[0, 2, 0xc0, 0xa8, 1, 0]);
    let mut message = Vec::new();
    crate::wire::push_handshake(&mut message, crate::wire::HANDSHAKE_CLIENT_HELLO, 0, &body);
    let mut datagram = Vec::new();
    crate::wire::push_record(
        &mut datagram,
        crate::wire::CONTENT_HANDSHAKE,
        0,
        0,
        &message,
    );
    datagram
}

/// The cookie of a HelloVerifyRequest datagram (record header, handshake header, version,
/// length).
fn cookie_of(hello_verify_request: &[u8]) -> Vec<u8> {
    hello_verify_request[13 + 12 + 3..].to_vec()
}

/// A client whose highest version is DTLS 1.0 gets a protocol_version alert, not a DTLS 1.2
/// ServerHello it cannot read (RFC 5246 Appendix E.1).
#[test]
fn a_client_below_dtls_1_2_gets_a_protocol_version_alert() {
    let keys = keys(&[("id-7", "dev-7", "secret")]);
    let now = Instant::now();
    let mut server = Server::new(ServerConfig::default(), now);
    let mut reply = Vec::new();
    let mut application = Application::default();
    let dtls_1_0 = crate::wire::DTLS_1_0;
    let first = client_hello_datagram(dtls_1_0, &[]);
    server.handle(now, peer(1), &first, &keys, &mut reply, &mut application);
    let second = client_hello_datagram(dtls_1_0, &cookie_of(&reply));
    server.handle(now, peer(1), &second, &keys, &mut reply, &mut application);
    assert_eq!(reply[0], crate::wire::CONTENT_ALERT);
    assert_eq!(&reply[13..], &[2, 70]);
    assert_eq!(server.handshakes_len(), 0);

    // DTLS 1.2 (and a client that also speaks 1.3, 0xfefc) gets its ServerHello.
    for version in [crate::wire::DTLS_1_2, 0xfefc] {
        let first = client_hello_datagram(version, &[]);
        server.handle(now, peer(2), &first, &keys, &mut reply, &mut application);
        let second = client_hello_datagram(version, &cookie_of(&reply));
        server.handle(now, peer(2), &second, &keys, &mut reply, &mut application);
        assert_eq!(reply[13], crate::wire::HANDSHAKE_SERVER_HELLO);
    }
}

/// Several ClientHellos in one datagram get one HelloVerifyRequest.
#[test]
fn one_client_hello_is_answered_per_datagram() {
    let keys = keys(&[("id-7", "dev-7", "secret")]);
    let now = Instant::now();
    let mut server = Server::new(ServerConfig::default(), now);
    let hello = client_hello_datagram(crate::wire::DTLS_1_2, &[]);
    let datagram = [&hello[..], &hello, &hello].concat();
    let mut reply = Vec::new();
    let mut application = Application::default();
    server.handle(now, peer(1), &datagram, &keys, &mut reply, &mut application);
    assert_eq!(reply.len(), 13 + 12 + 3 + crate::wire::COOKIE_BYTES);
    assert_eq!(server.counters().hello_verify_requests, 1);
}
