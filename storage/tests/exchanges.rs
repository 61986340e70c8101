//! Commit records: the exchanges a commit acknowledged come back after a reopen, an incomplete
//! last commit is rolled back whole, and retention drops whole partitions.

use std::net::SocketAddr;
use std::path::Path;

use sluice_storage::{verify, Durability, Store, StoreConfig, ValueRef};

const HOUR: u64 = 3600;
const T0: f64 = 1_763_899_200.0; // a multiple of 3600

fn open(dir: &Path) -> (Store, sluice_storage::RecoveryReport) {
    Store::open(StoreConfig {
        dir: dir.to_path_buf(),
        partition_secs: HOUR,
        // Sealing is not under test here: partitions never become due.
        partition_grace_secs: u64::MAX,
        durability: Durability::Fsync,
    })
    .expect("open")
}

fn peer(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

#[test]
fn exchanges_of_complete_commits_come_back_after_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (store, _) = open(dir.path());
        let mut writer = store.writer(0).unwrap();
        for i in 0..3u16 {
            writer
                .append("dev-1", "temp", T0 + f64::from(i), ValueRef::Number(1.0))
                .unwrap();
            writer
                .record_exchange(
                    peer(5000 + i),
                    100 + i,
                    true,
                    T0 + f64::from(i),
                    &[0x60, 0x44, 0, 1],
                )
                .unwrap();
            writer.commit().unwrap();
        }
        // IPv6, NON without a response.
        let mut other = store.writer(1).unwrap();
        other
            .append("dev-2", "temp", T0, ValueRef::Number(2.0))
            .unwrap();
        let v6: SocketAddr = "[::1]:7000".parse().unwrap();
        other.record_exchange(v6, 9, false, T0 + 10.0, &[]).unwrap();
        other.commit().unwrap();
        // Refused: a response longer than a record holds.
        assert!(other
            .record_exchange(v6, 10, true, T0, &[0u8; 256])
            .is_err());
    }
    let (store, report) = open(dir.path());
    assert_eq!(report.exchanges, 4);
    assert_eq!(report.commits_rolled_back, 0);
    let exchanges = store.take_recovered_exchanges();
    assert_eq!(exchanges.len(), 4);
    // Oldest first, across shards.
    assert!(exchanges.windows(2).all(|w| w[0].arrival <= w[1].arrival));
    assert_eq!(exchanges[0].peer, peer(5000));
    assert_eq!(exchanges[0].message_id, 100);
    assert!(exchanges[0].confirmable);
    assert_eq!(exchanges[0].response, vec![0x60, 0x44, 0, 1]);
    let last = &exchanges[3];
    assert_eq!(last.peer, "[::1]:7000".parse::<SocketAddr>().unwrap());
    assert!(!last.confirmable && last.response.is_empty());
    assert!(store.take_recovered_exchanges().is_empty(), "taken once");
    assert!(verify(dir.path(), false).unwrap().is_clean());
}

/// Cuts the last `bytes` of the only segment of shard 0.
fn cut_segment_tail(dir: &Path, bytes: u64) {
    let window_dir = dir.join("shard-0").join(format!("{}", T0 as i64));
    let path = window_dir.join("segment-0.seg");
    let len = std::fs::metadata(&path).unwrap().len();
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    file.set_len(len - bytes).unwrap();
}

#[test]
fn a_commit_without_its_commit_record_is_rolled_back_whole() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (store, _) = open(dir.path());
        let mut writer = store.writer(0).unwrap();
        writer
            .append("dev-1", "temp", T0, ValueRef::Number(1.0))
            .unwrap();
        writer
            .record_exchange(peer(1), 1, true, T0, &[0x60, 0x44, 0, 1])
            .unwrap();
        writer.commit().unwrap();
        writer
            .append("dev-1", "temp", T0 + 1.0, ValueRef::Number(2.0))
            .unwrap();
        writer
            .record_exchange(peer(1), 2, true, T0 + 1.0, &[0x60, 0x44, 0, 2])
            .unwrap();
        writer.commit().unwrap();
    }
    // A crash before the second commit's record reached the disk: its block is whole, its
    // record is gone (a commit record with one 4-byte response is 48 + 8 + 36 = 92 -> 96 bytes).
    cut_segment_tail(dir.path(), 96);
    let report = verify(dir.path(), false).unwrap();
    assert!(!report.is_clean(), "{report}");
    assert!(
        report.to_string().contains("incomplete last commit"),
        "{report}"
    );

    let (store, report) = open(dir.path());
    assert_eq!(report.commits_rolled_back, 1);
    assert_eq!(report.points, 1, "the unacknowledged reading is not kept");
    let exchanges = store.take_recovered_exchanges();
    assert_eq!(exchanges.len(), 1);
    assert_eq!(exchanges[0].message_id, 1);
    let reader = store.reader();
    let points = reader
        .series("dev-1", "temp", T0, T0 + 10.0)
        .unwrap()
        .unwrap();
    assert_eq!(points.len(), 1);
    // The store keeps working: the retransmission is stored once.
    let mut writer = store.writer(0).unwrap();
    writer
        .append("dev-1", "temp", T0 + 1.0, ValueRef::Number(2.0))
        .unwrap();
    writer.commit().unwrap();
    drop((writer, reader, store));
    let (store, report) = open(dir.path());
    assert_eq!(report.commits_rolled_back, 0);
    let points = store
        .reader()
        .series("dev-1", "temp", T0, T0 + 10.0)
        .unwrap()
        .unwrap();
    assert_eq!(points.len(), 2);
    assert!(verify(dir.path(), false).unwrap().is_clean());
}

#[test]
fn verify_repair_rolls_back_an_incomplete_last_commit() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (store, _) = open(dir.path());
        let mut writer = store.writer(0).unwrap();
        for i in 0..2 {
            writer
                .append("dev-1", "temp", T0 + f64::from(i), ValueRef::Number(1.0))
                .unwrap();
            writer.commit().unwrap();
        }
    }
    // A commit record without exchanges is 48 + 8 = 56 -> 64 bytes.
    cut_segment_tail(dir.path(), 64);
    let report = verify(dir.path(), true).unwrap();
    assert!(report.is_clean(), "{report}");
    assert!(verify(dir.path(), false).unwrap().is_clean());
    let (_, report) = open(dir.path());
    assert_eq!(report.points, 1);
    assert_eq!(report.commits_rolled_back, 0);
}

#[test]
fn retention_drops_whole_old_partitions_and_refuses_readings_older_than_it() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(dir.path());
    let reader = store.reader();
    let mut writer = store.writer(0).unwrap();
    for hour in 0..4 {
        for i in 0..10 {
            let time = T0 + f64::from(hour) * HOUR as f64 + f64::from(i);
            writer
                .append("dev-1", "temp", time, ValueRef::Number(f64::from(hour)))
                .unwrap();
        }
    }
    writer.commit().unwrap();
    assert_eq!(reader.devices()[0].points, 40);

    // Keep what ended after T0 + 2h. The shard's last commit has blocks in every partition, and
    // recovery requires the last commit whole: nothing goes before the shard's next commit.
    let horizon = T0 as i64 + 2 * HOUR as i64;
    let report = store.retention().drop_before(horizon).unwrap();
    assert_eq!(report.partitions, 0);
    writer
        .append(
            "dev-2",
            "temp",
            T0 + 5.0 * HOUR as f64,
            ValueRef::Number(0.0),
        )
        .unwrap();
    writer.commit().unwrap();
    // Now the first two hours go.
    let report = store.retention().drop_before(horizon).unwrap();
    assert_eq!(report.partitions, 2);
    assert_eq!(report.points, 20);
    let points = reader
        .series("dev-1", "temp", T0, T0 + 4.0 * HOUR as f64)
        .unwrap()
        .unwrap();
    assert_eq!(points.len(), 20);
    assert!(points
        .iter()
        .all(|(time, _)| *time >= T0 + 2.0 * HOUR as f64));
    assert_eq!(reader.devices()[0].points, 20);
    assert!(!dir
        .path()
        .join("shard-0")
        .join(format!("{}", T0 as i64))
        .exists());

    // A reading older than the horizon is refused; one inside it is taken.
    let old = T0 + 10.0;
    let error = writer
        .check("dev-1", "temp", old, &ValueRef::Number(0.0))
        .unwrap_err();
    assert!(error.to_string().contains("retention"), "{error}");
    let recent = T0 + 2.0 * HOUR as f64;
    writer
        .check("dev-1", "temp", recent, &ValueRef::Number(0.0))
        .unwrap();
    // One buffered before the drop goes with its partition.
    writer
        .append("dev-1", "temp", old, ValueRef::Number(0.0))
        .unwrap();
    writer
        .append("dev-1", "temp", recent, ValueRef::Number(0.0))
        .unwrap();
    let stats = writer.commit().unwrap();
    assert_eq!((stats.points, stats.expired_points), (1, 1));
    drop((writer, reader, store));

    // After a reopen: the same 21 points (and dev-2's); a drop interrupted by a crash is
    // finished.
    std::fs::create_dir_all(dir.path().join("shard-0").join("dropped-5")).unwrap();
    let (store, report) = open(dir.path());
    assert_eq!(report.points, 22);
    assert!(!dir.path().join("shard-0").join("dropped-5").exists());
    assert_eq!(store.reader().devices()[0].points, 21);
}
