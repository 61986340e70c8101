//! End to end: devices send readings over CoAP to the real sluiced; the readings come back over
//! HTTP.

mod common;

use std::process::Command;
use std::time::Duration;

use coap_lite::{CoapOption, MessageType, Packet, RequestType};
use common::{code, request, run, tool, Client, Daemon};
use rand::{Rng, SeedableRng};

const JSON: Option<u16> = Some(110);
const CBOR: Option<u16> = Some(112);
const RKYV: Option<u16> = Some(65362);

#[test]
fn reading_posted_by_libcoap_client_is_queryable_over_http() {
    let daemon = Daemon::start(&[]);
    let url = format!("coap://{}/t/dev-1", daemon.coap);
    let output = run(Command::new(tool("coap-client-notls")).args([
        "-m",
        "post",
        "-t",
        "110",
        "-e",
        r#"[{"bn":"dev-1/","n":"temp","u":"Cel","t":1763900000.5,"v":21.5},{"n":"door","vb":true,"t":1763900001}]"#,
        &url,
    ]));
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    // coap-client exits 0 even on an error response; it prints error codes, not 2.04.
    assert!(
        !printed.contains("4.") && !printed.contains("5."),
        "coap-client printed: {printed}"
    );

    let series = daemon.get_json("/v1/series?device=dev-1&name=dev-1/temp");
    assert_eq!(
        series,
        serde_json::json!({"device": "dev-1", "name": "dev-1/temp", "points": [[1763900000.5, 21.5]]})
    );
    let latest = daemon.get_json("/v1/devices/dev-1/latest");
    assert_eq!(latest["device"], "dev-1");
    assert_eq!(
        latest["series"]["dev-1/temp"],
        serde_json::json!([1763900000.5, 21.5])
    );
    assert_eq!(
        latest["series"]["dev-1/door"],
        serde_json::json!([1763900001.0, true])
    );
    let devices = daemon.get_json("/v1/devices");
    assert_eq!(
        devices,
        serde_json::json!({"devices": [{"device": "dev-1", "last_seen": 1763900001.0, "points": 2}]})
    );
}

#[test]
fn libcoap_client_gets_error_codes_it_can_print() {
    let daemon = Daemon::start(&[]);
    let url = format!("coap://{}/nowhere", daemon.coap);
    let output =
        run(Command::new(tool("coap-client-notls")).args(["-m", "post", "-e", "[]", &url]));
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(printed.contains("4.04"), "coap-client printed: {printed}");
}

#[test]
fn senml_cbor_and_rkyv_batches_are_stored() {
    let daemon = Daemon::start(&[]);
    let mut client = Client::new(daemon.coap);

    // [{-2: "cbor-", 0: "t", 2: 1.5, 6: 1763900000}, {0: "s", 3: "text"}]
    let cbor = {
        use ciborium::value::Value as C;
        let records = C::Array(vec![
            C::Map(vec![
                (C::Integer((-2).into()), C::Text("cbor-".into())),
                (C::Integer((-3).into()), C::Integer(1763900000.into())),
                (C::Integer(0.into()), C::Text("t".into())),
                (C::Integer(2.into()), C::Float(1.5)),
            ]),
            C::Map(vec![
                (C::Integer(0.into()), C::Text("s".into())),
                (C::Integer(3.into()), C::Text("text".into())),
            ]),
        ]);
        let mut bytes = Vec::new();
        ciborium::into_writer(&records, &mut bytes).unwrap();
        bytes
    };
    assert_eq!(code(&client.post("/t/dev-c", CBOR, &cbor)), "2.04");
    // Without a Content-Format the payload is sniffed.
    assert_eq!(code(&client.post("/t/dev-c", None, &cbor)), "2.04");

    use sluice_protocol::batch::{encode, Batch, BatchRecord, BatchValue};
    let batch = Batch {
        base_time: 1763900100.0,
        records: (0..64)
            .map(|i| BatchRecord {
                name: "power".into(),
                time: i as f64,
                value: BatchValue::Number(i as f64 * 2.0),
            })
            .collect(),
    };
    assert_eq!(
        code(&client.post("/t/dev-r", RKYV, &encode(&batch))),
        "2.04"
    );

    let points = daemon.points("dev-c", "cbor-t");
    assert_eq!(
        points,
        vec![(1763900000.0, 1.5.into()), (1763900000.0, 1.5.into())]
    );
    assert_eq!(daemon.points("dev-c", "cbor-s")[0].1, "text");
    let power = daemon.points("dev-r", "power");
    assert_eq!(power.len(), 64);
    assert_eq!(power[63], (1763900163.0, 126.0.into()));
}

#[test]
fn non_requests_get_non_responses_unless_no_response_is_asked() {
    let daemon = Daemon::start(&[]);
    let mut client = Client::new(daemon.coap);
    let payload = br#"[{"n":"n1","v":1,"t":1763900000}]"#;

    let id = client.message_id();
    let non = request(
        MessageType::NonConfirmable,
        RequestType::Post,
        id,
        "/t/dev-n",
        JSON,
        payload,
    );
    let response = client.exchange(&non);
    assert_eq!(response.header.get_type(), MessageType::NonConfirmable);
    assert_eq!(code(&response), "2.04");
    assert_eq!(response.get_token(), non.get_token());

    let id = client.message_id();
    let mut quiet = request(
        MessageType::NonConfirmable,
        RequestType::Post,
        id,
        "/t/dev-n",
        JSON,
        br#"[{"n":"n2","v":2,"t":1763900000}]"#,
    );
    quiet.add_option(CoapOption::NoResponse, vec![0x02]); // suppress 2.xx
    client.send(&quiet);
    assert!(
        client.receive_within(Duration::from_millis(500)).is_none(),
        "No-Response must suppress the 2.04"
    );
    common::wait_for("the quiet NON to be stored", Duration::from_secs(5), || {
        daemon.get("/v1/series?device=dev-n&name=n2").0 == 200
    });
}

#[test]
fn duplicate_con_is_answered_twice_and_stored_once() {
    let daemon = Daemon::start(&[]);
    let mut client = Client::new(daemon.coap);
    let id = client.message_id();
    let con = request(
        MessageType::Confirmable,
        RequestType::Post,
        id,
        "/t/dev-d",
        JSON,
        br#"[{"n":"x","v":7}]"#,
    );
    let first = client.exchange(&con);
    let second = client.exchange(&con);
    assert_eq!(code(&first), "2.04");
    assert_eq!(first.to_bytes().unwrap(), second.to_bytes().unwrap());
    assert_eq!(first.header.message_id, id);
    assert_eq!(daemon.points("dev-d", "x").len(), 1);
    assert_eq!(daemon.metric("sluice_duplicates_total"), 1.0);
}

#[test]
fn block1_upload_of_10_kb_is_reassembled() {
    let daemon = Daemon::start(&[]);
    // 250 records of about 45 bytes: over 10 KB of SenML JSON.
    let records: Vec<String> = (0..250)
        .map(|i| {
            format!(
                r#"{{"n":"reading-{i:03}","v":{i}.25,"t":{}}}"#,
                1763900000 + i
            )
        })
        .collect();
    let payload = format!("[{}]", records.join(","));
    assert!(payload.len() > 10_000);

    // libcoap's client splits it into 1024-byte blocks itself.
    let file = daemon.data_dir.with_extension("payload.json");
    std::fs::write(&file, &payload).unwrap();
    let url = format!("coap://{}/t/dev-b", daemon.coap);
    let output = run(Command::new(tool("coap-client-notls")).args([
        "-m",
        "post",
        "-t",
        "110",
        "-b",
        "1024",
        "-f",
        file.to_str().unwrap(),
        &url,
    ]));
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        !printed.contains("4.") && !printed.contains("5."),
        "coap-client printed: {printed}"
    );
    let devices = daemon.get_json("/v1/devices");
    assert_eq!(devices["devices"][0]["points"], 250, "{devices}");
    assert_eq!(
        daemon.points("dev-b", "reading-249"),
        vec![(1763900249.0, 249.25.into())]
    );

    // By hand: blocks answered 2.31 Continue, the last one 2.04.
    let mut client = Client::new(daemon.coap);
    let chunks: Vec<&[u8]> = payload.as_bytes().chunks(1024).collect();
    for (num, chunk) in chunks.iter().enumerate() {
        let more = num + 1 < chunks.len();
        let id = client.message_id();
        let mut block = request(
            MessageType::Confirmable,
            RequestType::Post,
            id,
            "/t/dev-b2",
            JSON,
            chunk,
        );
        // NUM << 4 | M << 3 | SZX (6: 1024 bytes)
        let value = ((num as u32) << 4) | ((more as u32) << 3) | 6;
        let bytes = value.to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        block.add_option(CoapOption::Block1, bytes[skip..].to_vec());
        let response = client.exchange(&block);
        assert_eq!(
            code(&response),
            if more { "2.31" } else { "2.04" },
            "block {num}"
        );
    }
    assert_eq!(daemon.points("dev-b2", "reading-000").len(), 1);
}

#[test]
fn ping_gets_reset() {
    let daemon = Daemon::start(&[]);
    let mut client = Client::new(daemon.coap);
    let mut ping = Packet::new();
    ping.header.set_type(MessageType::Confirmable);
    ping.header.code = coap_lite::MessageClass::Empty;
    ping.header.message_id = client.message_id();
    let response = client.exchange(&ping);
    assert_eq!(response.header.get_type(), MessageType::Reset);
    assert_eq!(response.header.message_id, ping.header.message_id);
}

#[test]
fn well_known_core_lists_the_ingest_resource() {
    let daemon = Daemon::start(&[]);
    let mut client = Client::new(daemon.coap);
    let id = client.message_id();
    let get = request(
        MessageType::Confirmable,
        RequestType::Get,
        id,
        "/.well-known/core",
        None,
        b"",
    );
    let response = client.exchange(&get);
    assert_eq!(code(&response), "2.05");
    assert!(String::from_utf8_lossy(&response.payload).contains("</t>"));
}

#[test]
fn every_error_code_of_the_contract_is_answered() {
    let daemon = Daemon::start(&[]);
    let mut client = Client::new(daemon.coap);
    let good = br#"[{"n":"v","v":1}]"#;

    let bad = client.post("/t/dev-e", JSON, b"{not json");
    assert_eq!(code(&bad), "4.00");
    assert!(!bad.payload.is_empty(), "4.00 carries a diagnostic");
    // A time the store cannot hold refuses the whole request.
    let far = client.post(
        "/t/dev-e",
        JSON,
        br#"[{"n":"v","v":1},{"n":"w","v":2,"t":1e300}]"#,
    );
    assert_eq!(code(&far), "4.00");
    assert!(
        String::from_utf8_lossy(&far.payload).contains("time"),
        "{:?}",
        far.payload
    );
    assert_eq!(code(&client.post("/t", JSON, good)), "4.01");
    assert_eq!(code(&client.post("/elsewhere", JSON, good)), "4.04");
    let id = client.message_id();
    let get = request(
        MessageType::Confirmable,
        RequestType::Get,
        id,
        "/t/dev-e",
        None,
        b"",
    );
    assert_eq!(code(&client.exchange(&get)), "4.05");
    let huge = vec![b' '; 60_000];
    let too_large = client.post("/t/dev-e", JSON, &huge);
    assert_eq!(code(&too_large), "4.13");
    assert!(
        too_large.get_option(CoapOption::Size1).is_some(),
        "4.13 carries Size1"
    );
    assert_eq!(code(&client.post("/t/dev-e", Some(0), good)), "4.15");
    // Nothing of the rejected requests was stored.
    assert_eq!(daemon.get("/v1/devices/dev-e/latest").0, 404);
    assert!(daemon.metric("sluice_error_responses_total") >= 7.0);
}

#[test]
fn random_and_mutated_datagrams_leave_the_daemon_answering_and_data_intact() {
    let daemon = Daemon::start(&[]);
    let mut client = Client::new(daemon.coap);
    let good = br#"[{"n":"keep","v":42,"t":1763900000}]"#;
    assert_eq!(code(&client.post("/t/dev-f", JSON, good)), "2.04");

    let seed: u64 = std::env::var("SLUICE_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(7);
    eprintln!("fuzz seed {seed} (set SLUICE_FUZZ_SEED to replay)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let template = request(
        MessageType::Confirmable,
        RequestType::Post,
        1,
        "/t/zz-fuzz",
        JSON,
        good,
    )
    .to_bytes()
    .unwrap();
    let fuzzer = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    for i in 0..5000 {
        let datagram: Vec<u8> = if i % 2 == 0 {
            (0..rng.random_range(0..200))
                .map(|_| rng.random())
                .collect()
        } else {
            let mut bytes = template.clone();
            for _ in 0..rng.random_range(1..6) {
                let at = rng.random_range(0..bytes.len());
                bytes[at] = rng.random();
            }
            bytes.truncate(rng.random_range(1..=bytes.len()));
            bytes
        };
        let _ = fuzzer.send_to(&datagram, daemon.coap);
        if i % 500 == 0 {
            // Never outrun the daemon by more than a bounded burst.
            assert_eq!(
                code(&client.post("/t/dev-probe", JSON, good)),
                "2.04",
                "after {i} datagrams"
            );
        }
    }
    assert_eq!(
        code(&client.post("/t/dev-f", JSON, br#"[{"n":"keep","v":43,"t":1763900001}]"#)),
        "2.04"
    );
    let kept = daemon.points("dev-f", "keep");
    assert_eq!(kept[0], (1763900000.0, 42.0.into()));
    assert_eq!(kept.last().unwrap(), &(1763900001.0, 43.0.into()));
    assert!(kept.iter().all(|(_, v)| v.is_number()));
    assert!(daemon.metric("sluice_malformed_datagrams_total") > 0.0);
}
