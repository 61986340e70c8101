//! Series scans: ascending chunks of bounded size, series point counts, latest of every device.

use sluice_storage::{Durability, Store, StoreConfig, Value, ValueRef};

const T0: f64 = 1_763_899_200.0; // a multiple of 3600

fn store(dir: &std::path::Path) -> Store {
    let config = StoreConfig {
        dir: dir.to_path_buf(),
        partition_secs: 3600,
        // Sealing is not under test here: partitions never become due.
        partition_grace_secs: u64::MAX,
        durability: Durability::Os,
    };
    Store::open(config).unwrap().0
}

#[test]
fn scan_hands_out_ascending_chunks_no_larger_than_the_bound() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path());
    let mut writer = store.writer(0).unwrap();
    // 2000 points over three hours, written out of order, interleaved with another series.
    for i in 0..2000u32 {
        let time = T0 + ((i * 7919) % 2000) as f64 * 5.4;
        writer
            .append("dev", "x", time, ValueRef::Number(i as f64))
            .unwrap();
        writer
            .append("dev", "other", time, ValueRef::Number(0.0))
            .unwrap();
        if i % 100 == 99 {
            writer.commit().unwrap();
        }
    }
    let reader = store.reader();
    let mut scan = reader
        .scan("dev", "x", T0 + 100.0, T0 + 10_000.0)
        .unwrap()
        .chunk_points_max(64);
    let mut all: Vec<f64> = Vec::new();
    let mut chunks = 0;
    while let Some(chunk) = scan.next_chunk().unwrap() {
        assert!(chunk.len() <= 64, "chunk of {}", chunk.len());
        chunks += 1;
        all.extend(chunk.iter().map(|(time, _)| *time));
    }
    assert!(chunks > 20, "{chunks} chunks");
    let mut expected: Vec<f64> = (0..2000u32)
        .map(|i| T0 + ((i * 7919) % 2000) as f64 * 5.4)
        .filter(|t| *t >= T0 + 100.0 && *t < T0 + 10_000.0)
        .collect();
    expected.sort_by(f64::total_cmp);
    assert_eq!(all, expected);
    assert!(scan.records_scanned() >= 2 * all.len() as u64);
    assert!(reader.scan("dev", "missing", 0.0, f64::MAX).is_none());
}

#[test]
fn points_at_one_time_beyond_the_bound_come_in_one_chunk() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path());
    let mut writer = store.writer(0).unwrap();
    for i in 0..100 {
        writer
            .append("dev", "x", T0, ValueRef::Number(i as f64))
            .unwrap();
    }
    writer.commit().unwrap();
    let reader = store.reader();
    let mut scan = reader
        .scan("dev", "x", 0.0, f64::MAX)
        .unwrap()
        .chunk_points_max(10);
    let chunk = scan.next_chunk().unwrap().unwrap();
    assert_eq!(chunk.len(), 100);
    // Ties keep write order.
    assert_eq!(chunk[99], (T0, Value::Number(99.0)));
    assert!(scan.next_chunk().unwrap().is_none());
}

#[test]
fn series_version_grows_with_commits_and_latest_all_filters_by_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path());
    let reader = store.reader();
    let mut writer = store.writer(0).unwrap();
    assert_eq!(reader.series_version("a-1", "t"), None);
    writer
        .append("a-1", "t", T0, ValueRef::Number(1.0))
        .unwrap();
    writer
        .append("b-1", "t", T0, ValueRef::Number(2.0))
        .unwrap();
    writer.commit().unwrap();
    assert_eq!(reader.series_version("a-1", "t"), Some(1));
    writer
        .append("a-1", "t", T0 - 10.0, ValueRef::Number(3.0))
        .unwrap();
    writer.commit().unwrap();
    assert_eq!(reader.series_version("a-1", "t"), Some(2));
    assert_eq!(reader.series_version("b-1", "t"), Some(1));
    let latest = reader.latest_all("a-");
    assert_eq!(
        latest,
        vec![(
            "a-1".to_string(),
            vec![("t".to_string(), T0, Value::Number(1.0))]
        )]
    );
    assert_eq!(reader.latest_all("").len(), 2);
}
