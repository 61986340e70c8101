//! Fleet-wide aggregates (`Reader::fleet`, `FleetScan::aggregate`): the aggregate of one series
//! name over every device equals the aggregate of the union of the per-device scans, over random
//! data in unsealed and sealed partitions, with late readings, duplicate times, devices in two
//! shards, restarts; bounds and corrupt blocks are errors, never panics.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rand::{Rng, SeedableRng};
use sluice_storage::{
    Durability, FleetAggregate, FleetError, ShardWriter, Store, StoreConfig, StoreError, Value,
    ValueRef, FLEET_BUCKETS_MAX,
};

const HOUR: u64 = 3600;
const GRACE_SECS: u64 = 1;
const SEAL_WAIT_MAX: Duration = Duration::from_secs(15);

fn config(dir: &Path) -> StoreConfig {
    StoreConfig {
        dir: dir.to_path_buf(),
        partition_secs: HOUR,
        partition_grace_secs: GRACE_SECS,
        durability: Durability::Os,
    }
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// Four hours that ended long ago (their partitions are due for sealing).
fn base() -> f64 {
    ((now() / HOUR as f64).floor() - 10.0) * HOUR as f64
}

const DEVICES: [&str; 9] = [
    "a-1", "a-2", "a-3", "a-10", "b-1", "b-2", "both-1", "both-2", "c",
];
const NAMES: [&str; 2] = ["x", "y"];

/// Shard of a device: `both-*` devices are written to both shards (as after a change of the
/// shard count), the others by their first letter.
fn shards_of(device: &str) -> &'static [usize] {
    if device.starts_with("both") {
        &[0, 1]
    } else if device.starts_with('a') || device == "c" {
        &[0]
    } else {
        &[1]
    }
}

/// Appends `count` random readings (numbers mostly, some booleans and strings; repeated times)
/// of random devices and names within `[start, start + 4 h)`, committing every so often.
fn write_random(
    writers: &mut [ShardWriter],
    rng: &mut rand::rngs::StdRng,
    start: f64,
    count: usize,
) {
    let mut last_time = start;
    for i in 0..count {
        let device = DEVICES[rng.random_range(0..DEVICES.len())];
        let name = NAMES[rng.random_range(0..NAMES.len())];
        let time = match rng.random_range(0..10) {
            // Equal times (a device that sends twice, or two devices at once).
            0 => last_time,
            // On a bucket edge of common steps.
            1 => start + (rng.random_range(0..240) * 60) as f64,
            _ => start + rng.random_range(0.0..4.0 * HOUR as f64),
        };
        last_time = time;
        let text;
        let value = match rng.random_range(0..12) {
            0 => ValueRef::Bool(rng.random()),
            1 => {
                text = format!("s{}", rng.random_range(0..100));
                ValueRef::String(&text)
            }
            _ => ValueRef::Number(rng.random_range(-100.0..100.0_f64).round() / 4.0),
        };
        let shards = shards_of(device);
        let shard = shards[rng.random_range(0..shards.len())];
        writers[shard].append(device, name, time, value).unwrap();
        if i % 97 == 96 {
            for writer in writers.iter_mut() {
                writer.commit().unwrap();
            }
        }
    }
    for writer in writers.iter_mut() {
        writer.commit().unwrap();
    }
}

/// A bucket's (count, numbers, sum, min, max).
type Stats = (u64, u64, f64, f64, f64);

#[derive(Default, Debug)]
struct Expected {
    /// Bucket number -> its stats.
    buckets: BTreeMap<i64, Stats>,
    devices: BTreeSet<String>,
    devices_with_numbers: BTreeSet<String>,
}

/// What the per-device scans say, aggregated.
fn expected(store: &Store, name: &str, prefix: &str, from: f64, to: f64, step: f64) -> Expected {
    let reader = store.reader();
    let mut expected = Expected::default();
    for device in DEVICES.iter().filter(|d| d.starts_with(prefix)) {
        let Some(points) = reader.series(device, name, from, to).unwrap() else {
            continue;
        };
        for (time, value) in points {
            let bucket = expected
                .buckets
                .entry((time / step).floor() as i64)
                .or_insert((0, 0, 0.0, f64::INFINITY, f64::NEG_INFINITY));
            bucket.0 += 1;
            expected.devices.insert(device.to_string());
            if let Value::Number(n) = value {
                bucket.1 += 1;
                bucket.2 += n;
                bucket.3 = bucket.3.min(n);
                bucket.4 = bucket.4.max(n);
                expected.devices_with_numbers.insert(device.to_string());
            }
        }
    }
    expected
}

fn compare(got: &FleetAggregate, expected: &Expected, step: f64, what: &str) {
    let buckets: Vec<(i64, Stats)> = got
        .buckets
        .iter()
        .map(|b| {
            let number = (b.start / step).round() as i64;
            assert_eq!(b.start, number as f64 * step, "{what}: bucket start");
            (number, (b.count, b.numbers, b.sum, b.min, b.max))
        })
        .collect();
    let want: Vec<_> = expected.buckets.iter().map(|(k, v)| (*k, *v)).collect();
    assert_eq!(
        buckets.len(),
        want.len(),
        "{what}: buckets {buckets:?} != {want:?}"
    );
    for ((k, g), (wk, w)) in buckets.iter().zip(&want) {
        assert_eq!(k, wk, "{what}");
        assert_eq!(
            (g.0, g.1, g.3, g.4),
            (w.0, w.1, w.3, w.4),
            "{what}: bucket {k}"
        );
        // Quarters summed in any order are exact here; allow for rounding all the same.
        assert!(
            (g.2 - w.2).abs() <= 1e-9 * (1.0 + w.2.abs()),
            "{what}: sum {} != {}",
            g.2,
            w.2
        );
    }
    assert_eq!(
        got.points,
        want.iter().map(|(_, w)| w.0).sum::<u64>(),
        "{what}"
    );
    assert_eq!(
        got.numbers,
        want.iter().map(|(_, w)| w.1).sum::<u64>(),
        "{what}"
    );
    assert_eq!(
        got.devices,
        expected.devices.len() as u64,
        "{what}: devices"
    );
    assert_eq!(
        got.devices_with_numbers,
        expected.devices_with_numbers.len() as u64,
        "{what}: devices with numbers"
    );
}

/// Random queries of the store, each compared with the per-device scans.
fn check_queries(store: &Store, rng: &mut rand::rngs::StdRng, start: f64, stage: &str) {
    let reader = store.reader();
    for round in 0..40 {
        let name = NAMES[round % 2];
        let prefix = ["", "a-", "b", "both-", "a-1", "c"][rng.random_range(0..6)];
        let (from, to) = match rng.random_range(0..4) {
            0 => (f64::NEG_INFINITY, f64::INFINITY),
            1 => (start + 1800.0, start + 7200.0),
            _ => {
                let from = start + rng.random_range(-600.0..4.0 * HOUR as f64);
                (from, from + rng.random_range(1.0..3.0 * HOUR as f64))
            }
        };
        let step = [1.0, 60.0, 300.0, 3600.0, 86400.0, 7.5, 0.25][rng.random_range(0..7)];
        let what = format!("{stage}: name={name} prefix={prefix} from={from} to={to} step={step}");
        let scan = reader
            .fleet(name, prefix)
            .unwrap_or_else(|| panic!("{what}: no series"));
        let expected = expected(store, name, prefix, from, to, step);
        for threads in [1, 2, 3] {
            match scan.aggregate(from, to, step, threads) {
                Ok(got) => compare(&got, &expected, step, &what),
                Err(FleetError::TooManyBuckets { buckets }) => {
                    assert!(step <= 1.0, "{what}: {buckets} buckets");
                    assert!(buckets > FLEET_BUCKETS_MAX as u64);
                }
                Err(error) => panic!("{what}: {error}"),
            }
        }
    }
    assert!(reader.fleet("nope", "").is_none());
    assert!(reader.fleet("x", "zz").is_none());
}

fn seal_all(store: &Store, writers: &mut [ShardWriter], end: f64) {
    let started = Instant::now();
    while store.reader().sealed_before() < end {
        assert!(started.elapsed() < SEAL_WAIT_MAX, "sealing did not finish");
        for writer in writers.iter_mut() {
            writer.seal_due().unwrap();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_fleet_aggregate_is_the_union_of_the_device_scans_sealed_or_not_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
    let start = base();
    let end = start + 4.0 * HOUR as f64;
    {
        let (store, _) = Store::open(config(dir.path())).unwrap();
        let mut writers: Vec<ShardWriter> = (0..2).map(|s| store.writer(s).unwrap()).collect();
        write_random(&mut writers, &mut rng, start, 3000);
        check_queries(&store, &mut rng, start, "unsealed");
        let version = store.reader().fleet("x", "").unwrap().version();
        writers[0]
            .append("a-1", "x", start, ValueRef::Number(1.0))
            .unwrap();
        writers[0].commit().unwrap();
        assert!(store.reader().fleet("x", "").unwrap().version() > version);
        // A commit to another series leaves the version alone.
        let version = store.reader().fleet("x", "").unwrap().version();
        writers[0]
            .append("a-1", "y", start, ValueRef::Number(1.0))
            .unwrap();
        writers[0].commit().unwrap();
        assert_eq!(store.reader().fleet("x", "").unwrap().version(), version);
    }
    {
        let (store, _) = Store::open(config(dir.path())).unwrap();
        check_queries(&store, &mut rng, start, "unsealed, after a restart");
        let mut writers: Vec<ShardWriter> = (0..2).map(|s| store.writer(s).unwrap()).collect();
        seal_all(&store, &mut writers, end);
        check_queries(&store, &mut rng, start, "sealed");
        // Late readings of the sealed hours (late segments, unsealed) beside the sealed files.
        write_random(&mut writers, &mut rng, start, 1000);
        check_queries(&store, &mut rng, start, "sealed and late");
    }
    let (store, _) = Store::open(config(dir.path())).unwrap();
    check_queries(&store, &mut rng, start, "sealed and late, after a restart");
}

#[test]
fn too_many_buckets_and_corrupt_blocks_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let config = StoreConfig {
        partition_grace_secs: u64::MAX,
        ..config(dir.path())
    };
    let start = base();
    let (store, _) = Store::open(config).unwrap();
    let mut writer = store.writer(0).unwrap();
    for i in 0..100 {
        writer
            .append("d", "x", start + i as f64, ValueRef::Number(i as f64))
            .unwrap();
    }
    writer.commit().unwrap();
    let scan = store.reader().fleet("x", "").unwrap();
    // The range is narrowed to the partition holding data: one hour.
    assert!(scan
        .aggregate(f64::NEG_INFINITY, f64::INFINITY, 0.04, 1)
        .is_ok());
    match scan.aggregate(f64::NEG_INFINITY, f64::INFINITY, 0.03, 1) {
        Err(FleetError::TooManyBuckets { buckets }) => {
            assert!((120_000..=120_001).contains(&buckets), "{buckets}")
        }
        other => panic!("{other:?}"),
    }
    const { assert!(FLEET_BUCKETS_MAX < 120_000) };
    let all = scan
        .aggregate(f64::NEG_INFINITY, f64::INFINITY, 3600.0, 1)
        .unwrap();
    assert_eq!((all.points, all.devices, all.buckets.len()), (100, 1, 1));
    assert_eq!(all.buckets[0].sum, 4950.0);
    // Times too far from the epoch for the step: refused, not wrong.
    assert!(matches!(
        scan.aggregate(start, start + 1e-6, 1e-12, 1),
        Err(FleetError::StepTooSmall)
    ));
    // The block's root overwritten after the store opened (media corruption): an error naming
    // the file, as the per-device scan gives, not a panic.
    let window = (start / HOUR as f64).floor() as i64 * HOUR as i64;
    let path = dir
        .path()
        .join("shard-0")
        .join(window.to_string())
        .join("segment-0.seg");
    let bytes = std::fs::read(&path).unwrap();
    let payload_len = u32::from_le_bytes(bytes[48 + 8..48 + 12].try_into().unwrap()) as usize;
    let root = 96 + payload_len - 24;
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&file, &[0xff; 24], root as u64).unwrap();
    drop(file);
    match scan.aggregate(f64::NEG_INFINITY, f64::INFINITY, 60.0, 2) {
        Err(FleetError::Store(StoreError::Corrupt { path: named, .. })) => assert_eq!(named, path),
        other => panic!("{other:?}"),
    }
    assert!(store.reader().series("d", "x", f64::MIN, f64::MAX).is_err());
}
