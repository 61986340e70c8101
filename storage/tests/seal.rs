//! Sealing (docs/storage-format.md, "Sealing"): due partitions become immutable with an index,
//! late readings are stored in a late segment, seals survive restarts, a bad seal is redone,
//! queries skip sealed segments without the series, `Reader::sealed_before`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sluice_storage::{Durability, ShardWriter, Store, StoreConfig, Value, ValueRef};

const HOUR: u64 = 3600;
/// Short, so that segments written by a test become due within a second or two of their last
/// write (their windows ended hours ago).
const GRACE_SECS: u64 = 1;
/// Longest wait for segments to become due (grace plus the whole-second rounding, with room).
const DUE_WAIT_MAX: Duration = Duration::from_secs(10);

fn config(dir: &Path) -> StoreConfig {
    StoreConfig {
        dir: dir.to_path_buf(),
        partition_secs: HOUR,
        partition_grace_secs: GRACE_SECS,
        durability: Durability::Fsync,
    }
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

fn window_of(time: f64) -> i64 {
    (time / HOUR as f64).floor() as i64 * HOUR as i64
}

fn window_dir(dir: &Path, time: f64) -> PathBuf {
    dir.join("shard-0").join(window_of(time).to_string())
}

/// Calls `seal_due` until it has sealed `expected` segments in all (waiting for the grace period
/// after their last write), then checks that nothing more gets sealed.
fn seal(writer: &mut ShardWriter, expected: usize) {
    let start = Instant::now();
    let mut sealed = 0;
    while sealed < expected {
        assert!(
            start.elapsed() < DUE_WAIT_MAX,
            "sealed {sealed} of {expected} segments"
        );
        sealed += writer.seal_due().unwrap();
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(sealed, expected);
}

fn points(store: &Store, device: &str, name: &str) -> Vec<(f64, Value)> {
    let mut scan = store
        .reader()
        .scan(device, name, f64::MIN, f64::MAX)
        .unwrap();
    let mut all = Vec::new();
    while let Some(chunk) = scan.next_chunk().unwrap() {
        all.extend(chunk);
    }
    all
}

#[test]
fn a_due_partition_is_sealed_with_an_index_and_stays_sealed_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let old = window_of(now()) as f64 - 3.0 * HOUR as f64 + 10.0; // ended hours ago: due
    let current = now();
    {
        let (store, _) = Store::open(config(dir.path())).unwrap();
        let mut writer = store.writer(0).unwrap();
        writer
            .append("dev", "t", old, ValueRef::Number(1.0))
            .unwrap();
        writer
            .append("dev", "t", current, ValueRef::Number(2.0))
            .unwrap();
        writer.commit().unwrap();
        seal(&mut writer, 1);
        assert!(window_dir(dir.path(), old).join("segment-0.seal").exists());
        assert!(!window_dir(dir.path(), current)
            .join("segment-0.seal")
            .exists());
        let sealed_before = store.reader().sealed_before();
        assert!(sealed_before > old, "{sealed_before} > {old}");
        assert!(sealed_before <= current, "{sealed_before} <= {current}");
        assert_eq!(writer.seal_due().unwrap(), 0, "sealing is done once");
    }
    // inspect shows the seal, verify checks it against the segment.
    let inspection = sluice_storage::inspect(dir.path()).unwrap();
    let sealed: Vec<(i64, bool)> = inspection
        .segments
        .iter()
        .map(|segment| (segment.window_start, segment.sealed))
        .collect();
    assert_eq!(
        sealed,
        vec![(window_of(old), true), (window_of(current), false)]
    );
    assert!(sluice_storage::verify(dir.path(), false)
        .unwrap()
        .is_clean());
    let (store, report) = Store::open(config(dir.path())).unwrap();
    assert_eq!(report.seals_discarded, 0);
    assert_eq!(report.points, 2);
    assert!(store.reader().sealed_before() > old);
    assert_eq!(points(&store, "dev", "t").len(), 2);
    // The sealed segment is never written again: a new reading of that window is late.
    let mut writer = store.writer(0).unwrap();
    writer
        .append("dev", "t", old + 1.0, ValueRef::Number(3.0))
        .unwrap();
    assert_eq!(writer.commit().unwrap().late_points, 1);
    assert!(window_dir(dir.path(), old).join("segment-1.seg").exists());
}

#[test]
fn a_reading_later_than_the_grace_period_is_stored_in_a_late_segment_and_sealed() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(config(dir.path())).unwrap();
    let mut writer = store.writer(0).unwrap();
    let old = window_of(now()) as f64 - 5.0 * HOUR as f64;
    writer
        .append("dev", "t", old, ValueRef::Number(1.0))
        .unwrap();
    writer.commit().unwrap();
    seal(&mut writer, 1);
    let sealed = window_dir(dir.path(), old).join("segment-0.seg");
    let sealed_len = std::fs::metadata(&sealed).unwrap().len();

    writer
        .append("dev", "t", old + 5.0, ValueRef::Number(2.0))
        .unwrap();
    let stats = writer.commit().unwrap();
    assert_eq!((stats.points, stats.late_points), (1, 1));
    assert_eq!(std::fs::metadata(&sealed).unwrap().len(), sealed_len);
    // Not sealed while late readings come in: readers are told the window can still change.
    assert_eq!(writer.seal_due().unwrap(), 0);
    assert!(store.reader().sealed_before() <= old);
    seal(&mut writer, 1);
    assert!(store.reader().sealed_before() > old);
    assert!(window_dir(dir.path(), old).join("segment-1.seal").exists());
    assert_eq!(
        points(&store, "dev", "t"),
        vec![(old, Value::Number(1.0)), (old + 5.0, Value::Number(2.0))]
    );
    drop(writer);
    drop(store);
    let (store, report) = Store::open(config(dir.path())).unwrap();
    assert_eq!((report.points, report.seals_discarded), (2, 0));
    assert_eq!(points(&store, "dev", "t").len(), 2);
}

#[test]
fn a_seal_that_does_not_match_its_segment_is_discarded_and_redone() {
    let dir = tempfile::tempdir().unwrap();
    let old = window_of(now()) as f64 - 3.0 * HOUR as f64;
    let seal_file = window_dir(dir.path(), old).join("segment-0.seal");
    let tmp = window_dir(dir.path(), old).join("segment-0.seal.tmp");
    {
        let (store, _) = Store::open(config(dir.path())).unwrap();
        let mut writer = store.writer(0).unwrap();
        writer
            .append("dev", "t", old, ValueRef::Number(1.0))
            .unwrap();
        writer.commit().unwrap();
        seal(&mut writer, 1);
    }
    // A damaged seal (one byte of its body flipped) and a leftover of an interrupted seal.
    let mut bytes = std::fs::read(&seal_file).unwrap();
    bytes[60] ^= 0xFF;
    std::fs::write(&seal_file, &bytes).unwrap();
    std::fs::write(&tmp, b"half a seal").unwrap();
    let verified = sluice_storage::verify(dir.path(), false).unwrap();
    assert!(!verified.is_clean(), "verify reports the damaged seal");
    assert!(!sluice_storage::inspect(dir.path()).unwrap().segments[0].sealed);
    let (store, report) = Store::open(config(dir.path())).unwrap();
    assert_eq!(report.seals_discarded, 1);
    assert!(!seal_file.exists() && !tmp.exists());
    assert!(store.reader().sealed_before() <= old);
    let mut writer = store.writer(0).unwrap();
    // Not written in this process: due at once.
    assert_eq!(writer.seal_due().unwrap(), 1);
    assert!(seal_file.exists());
    assert_eq!(points(&store, "dev", "t").len(), 1);
}

#[test]
fn a_query_skips_sealed_segments_whose_index_lacks_the_series() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(config(dir.path())).unwrap();
    let mut writer = store.writer(0).unwrap();
    let old = window_of(now()) as f64 - 3.0 * HOUR as f64;
    for i in 0..100 {
        writer
            .append("a", "t", old + i as f64, ValueRef::Number(1.0))
            .unwrap();
    }
    writer.commit().unwrap();
    seal(&mut writer, 1);
    // Late readings of another device: a second sealed segment in the same window.
    for i in 0..50 {
        writer
            .append("b", "t", old + i as f64, ValueRef::Number(2.0))
            .unwrap();
    }
    writer.commit().unwrap();
    seal(&mut writer, 1);

    let reader = store.reader();
    let mut scan = reader.scan("a", "t", f64::MIN, f64::MAX).unwrap();
    let mut found = 0;
    while let Some(chunk) = scan.next_chunk().unwrap() {
        found += chunk.len();
    }
    assert_eq!(found, 100);
    assert_eq!(
        scan.records_scanned(),
        100,
        "the segment holding only b's readings is not read"
    );
}
