//! End to end: a reading later than the partition grace period is acknowledged and stored (in a
//! late segment of its partition), and due partitions are sealed (docs/storage-format.md,
//! "Sealing").

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{code, sluice, wait_for, Client, Daemon};

const JSON: Option<u16> = Some(110);

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

#[test]
fn a_reading_later_than_the_grace_period_is_stored_and_its_partition_sealed() {
    let daemon = Daemon::start(&["--partition", "1h", "--partition-grace", "1s"]);
    let mut client = Client::new(daemon.coap);
    // A day old: its partition ended long before the grace period.
    let late = (now() - 86_400.0).floor();
    let payload = format!(r#"[{{"n":"t","t":{late},"v":1.5}}]"#);
    assert_eq!(
        code(&client.post("/t/backfill", JSON, payload.as_bytes())),
        "2.04"
    );
    assert_eq!(
        daemon.points("backfill", "t"),
        vec![(late, serde_json::json!(1.5))]
    );
    // Current readings make the shard commit; a commit seals the due partition once the late
    // segment has been quiet for the grace period.
    let inspect = || {
        let output = sluice(&["inspect", "--data-dir", daemon.data_dir.to_str().unwrap()]);
        assert!(output.status.success(), "sluice inspect failed");
        String::from_utf8_lossy(&output.stdout).to_string()
    };
    let late_window = ((late / 3600.0).floor() * 3600.0) as i64;
    wait_for(
        "the late partition to be sealed",
        Duration::from_secs(15),
        || {
            let payload = format!(r#"[{{"n":"t","t":{},"v":2}}]"#, now());
            assert_eq!(
                code(&client.post("/t/current", JSON, payload.as_bytes())),
                "2.04"
            );
            inspect()
                .lines()
                .any(|line| line.contains(&late_window.to_string()) && line.ends_with("sealed"))
        },
    );
    // A later reading of the sealed partition is still stored.
    let payload = format!(r#"[{{"n":"t","t":{},"v":2.5}}]"#, late + 1.0);
    assert_eq!(
        code(&client.post("/t/backfill", JSON, payload.as_bytes())),
        "2.04"
    );
    assert_eq!(daemon.points("backfill", "t").len(), 2);
    // Both readings were past their partition's grace period when they were stored.
    assert_eq!(daemon.metric("sluice_late_points_total"), 2.0);
    let output = sluice(&["verify", "--data-dir", daemon.data_dir.to_str().unwrap()]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stdout)
    );
}
