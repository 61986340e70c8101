//! Series scans: ascending chunks of bounded size, series point counts, latest of every device.

use sluice_storage::{DevicePage, Durability, Store, StoreConfig, Value, ValueRef};

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
    let page = |prefix, after, limit| DevicePage {
        prefix,
        after,
        limit,
    };
    let latest = reader.latest_page(&page("a-", None, usize::MAX));
    assert_eq!(
        latest,
        vec![(
            "a-1".to_string(),
            vec![("t".to_string(), T0, Value::Number(1.0))]
        )]
    );
    assert_eq!(reader.latest_page(&page("", None, usize::MAX)).len(), 2);
    let first = reader.latest_page(&page("", None, 1));
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].0, "a-1");
    let second = reader.latest_page(&page("", Some("a-1"), 1));
    assert_eq!(second[0].0, "b-1");
    assert!(reader.latest_page(&page("", Some("b-1"), 1)).is_empty());
}

#[test]
fn a_device_in_two_shards_is_one_entry_with_summed_points_and_the_newest_values() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path());
    let reader = store.reader();
    let mut first = store.writer(0).unwrap();
    let mut second = store.writer(1).unwrap();
    first.append("d", "a", T0, ValueRef::Number(1.0)).unwrap();
    first
        .append("d", "b", T0 + 5.0, ValueRef::Number(2.0))
        .unwrap();
    first.append("e", "a", T0, ValueRef::Number(9.0)).unwrap();
    first.commit().unwrap();
    second
        .append("d", "a", T0 + 1.0, ValueRef::Number(3.0))
        .unwrap();
    second.append("d", "b", T0, ValueRef::Number(4.0)).unwrap();
    second.append("d", "c", T0, ValueRef::Bool(true)).unwrap();
    second.append("c", "a", T0, ValueRef::Number(0.0)).unwrap();
    second.commit().unwrap();

    let devices = reader.devices();
    let names: Vec<_> = devices.iter().map(|d| d.device.as_str()).collect();
    assert_eq!(names, ["c", "d", "e"]);
    assert_eq!(devices[1].points, 5);
    assert_eq!(devices[1].last_seen, T0 + 5.0);

    let latest = reader.latest_page(&DevicePage {
        prefix: "",
        after: Some("c"),
        limit: 1,
    });
    assert_eq!(
        latest,
        vec![(
            "d".to_string(),
            vec![
                ("a".to_string(), T0 + 1.0, Value::Number(3.0)),
                ("b".to_string(), T0 + 5.0, Value::Number(2.0)),
                ("c".to_string(), T0, Value::Bool(true)),
            ]
        )]
    );
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]

    /// Pages of devices (prefix, cursor, limit) list what a sort of every device with points
    /// would, across two shards, with devices added between listings (each listing sorts in
    /// only the devices added since the one before).
    #[test]
    fn device_pages_match_a_sorted_filter_of_every_device(
        rounds in proptest::collection::vec(
            proptest::collection::vec((0u8..2, "[ab]{1,3}[0-9]{0,2}"), 1..12),
            1..5,
        ),
        questions in proptest::collection::vec(("[ab]{0,2}", proptest::option::of("[ab]{1,3}[0-9]?"), 1usize..6), 1..8),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path());
        let reader = store.reader();
        let mut writers = [store.writer(0).unwrap(), store.writer(1).unwrap()];
        let mut known = std::collections::BTreeSet::new();
        for devices in &rounds {
            for (shard, device) in devices {
                writers[*shard as usize].append(device, "t", T0, ValueRef::Number(1.0)).unwrap();
                known.insert(device.clone());
            }
            for writer in &mut writers {
                writer.commit().unwrap();
            }
            for (prefix, after, limit) in &questions {
                let page = DevicePage { prefix, after: after.as_deref(), limit: *limit };
                let listed: Vec<String> =
                    reader.devices_page(&page).into_iter().map(|d| d.device).collect();
                let expected: Vec<String> = known
                    .iter()
                    .filter(|d| d.starts_with(prefix.as_str()))
                    .filter(|d| after.as_ref().is_none_or(|a| d.as_str() > a.as_str()))
                    .take(*limit)
                    .cloned()
                    .collect();
                proptest::prop_assert_eq!(listed, expected);
            }
        }
    }
}

/// Devices whose latest values are large end a listing's chunk by bytes
/// (`LISTING_CHUNK_BYTES`) long before `LISTING_CHUNK_DEVICES`: the listing resumes after the
/// last device of each chunk, over both shards, and misses or repeats none.
#[test]
fn listings_of_large_values_resume_after_each_chunk_of_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path());
    let reader = store.reader();
    let mut writers = [store.writer(0).unwrap(), store.writer(1).unwrap()];
    let big = 100 * 1024;
    let devices = 3 * sluice_storage::LISTING_CHUNK_BYTES / big;
    let value = |i: usize| format!("{i:06}").repeat(big / 6);
    for i in 0..devices {
        writers[i % 2]
            .append(
                &format!("d-{i:03}"),
                "blob",
                T0,
                ValueRef::String(&value(i)),
            )
            .unwrap();
    }
    for writer in &mut writers {
        writer.commit().unwrap();
    }
    let expected: Vec<(String, sluice_storage::LatestValues)> = (0..devices)
        .map(|i| {
            (
                format!("d-{i:03}"),
                vec![("blob".to_string(), T0, Value::String(value(i)))],
            )
        })
        .collect();
    assert_eq!(reader.latest_page(&DevicePage::ALL), expected);
    let mut paged = Vec::new();
    let mut after: Option<String> = None;
    for _ in 0..devices {
        let page = reader.latest_page(&DevicePage {
            prefix: "d-",
            after: after.as_deref(),
            limit: 7,
        });
        let Some((last, _)) = page.last() else { break };
        after = Some(last.clone());
        paged.extend(page);
    }
    assert_eq!(paged, expected);
}

/// A listing longer than one chunk of a shard's summary (`LISTING_CHUNK_DEVICES`), with runs of
/// devices that have no points left (retention dropped them) longer than a chunk: every page
/// and the whole listing hold exactly the devices with points, in order.
#[test]
fn listings_longer_than_a_chunk_skip_devices_without_points() {
    let chunk = sluice_storage::LISTING_CHUNK_DEVICES;
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path());
    let reader = store.reader();
    let mut writers = [store.writer(0).unwrap(), store.writer(1).unwrap()];
    // Device i: a point in the old partition when i is in a long "old" run, else a new one.
    let devices = 4 * chunk + 300;
    let old = |i: usize| (i / (chunk + 100)).is_multiple_of(2);
    // The old points first: retention keeps the partitions of a shard's last commit.
    for round in [true, false] {
        for i in (0..devices).filter(|&i| old(i) == round) {
            let time = if round { T0 } else { T0 + 86_400.0 * 10.0 };
            writers[i % 2]
                .append(&format!("d-{i:06}"), "t", time, ValueRef::Number(1.0))
                .unwrap();
        }
        for writer in &mut writers {
            writer.commit().unwrap();
        }
    }
    store.retention().drop_before(T0 as i64 + 86_400).unwrap();
    let expected: Vec<String> = (0..devices)
        .filter(|&i| !old(i))
        .map(|i| format!("d-{i:06}"))
        .collect();
    let all: Vec<String> = reader.devices().into_iter().map(|d| d.device).collect();
    assert_eq!(all, expected);
    let mut paged = Vec::new();
    let mut after: Option<String> = None;
    for _ in 0..devices {
        let page = DevicePage {
            prefix: "d-",
            after: after.as_deref(),
            limit: 777,
        };
        let listed = reader.devices_page(&page);
        let Some(last) = listed.last() else { break };
        after = Some(last.device.clone());
        paged.extend(listed.into_iter().map(|d| d.device));
    }
    assert_eq!(paged, expected);
}

/// Retention that drops a series' points drops its latest value too, so the latest values
/// answered before a restart are those answered after it.
#[test]
fn retention_takes_the_latest_values_of_the_points_it_drops() {
    let dir = tempfile::tempdir().unwrap();
    let listing = |store: &Store| {
        let reader = store.reader();
        (
            reader.latest_page(&DevicePage::ALL),
            reader.latest("old"),
            reader.latest("both"),
        )
    };
    let before = {
        let store = store(dir.path());
        let mut writer = store.writer(0).unwrap();
        writer
            .append("old", "t", T0, ValueRef::Number(1.0))
            .unwrap();
        writer
            .append("both", "t", T0, ValueRef::Number(2.0))
            .unwrap();
        writer
            .append("both", "u", T0, ValueRef::Number(3.0))
            .unwrap();
        writer.commit().unwrap();
        let later = T0 + 86_400.0 * 10.0;
        writer
            .append("both", "u", later, ValueRef::Number(4.0))
            .unwrap();
        writer
            .append("new", "t", later, ValueRef::Number(5.0))
            .unwrap();
        writer.commit().unwrap();
        store.retention().drop_before(T0 as i64 + 86_400).unwrap();
        listing(&store)
    };
    assert_eq!(before.1, None);
    assert_eq!(
        before.2,
        Some(vec![("u".to_string(), T0 + 864_000.0, Value::Number(4.0))])
    );
    let devices: Vec<&str> = before.0.iter().map(|(d, _)| d.as_str()).collect();
    assert_eq!(devices, ["both", "new"]);
    let after = listing(&store(dir.path()));
    assert_eq!(after, before);
}
