//! Sealing (docs/storage-format.md, "Sealing"): due partitions are rewritten series-major into
//! sealed files, late readings are stored in a late segment, seals survive restarts, a corrupt
//! sealed file is an error or a counter (never a panic), a one-series query of sealed data reads
//! that series' records only and returns exactly what the unsealed store returned, a store of
//! format version 2 opens and is sealed again, `Reader::sealed_before`.

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
fn a_due_partition_is_sealed_series_major_and_stays_sealed_after_a_restart() {
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
        // The sealed file replaced the segment.
        assert!(window_dir(dir.path(), old)
            .join("segment-0.sealed")
            .exists());
        assert!(!window_dir(dir.path(), old).join("segment-0.seg").exists());
        assert!(!window_dir(dir.path(), current)
            .join("segment-0.sealed")
            .exists());
        assert_eq!(points(&store, "dev", "t").len(), 2);
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
    let sealed = window_dir(dir.path(), old).join("segment-0.sealed");
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
    assert!(window_dir(dir.path(), old)
        .join("segment-1.sealed")
        .exists());
    assert!(!window_dir(dir.path(), old).join("segment-1.seg").exists());
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

/// Writes one due partition of two series (100 and 50 points) and seals it; returns the path of
/// its sealed file.
fn sealed_store(dir: &Path) -> PathBuf {
    let old = window_of(now()) as f64 - 3.0 * HOUR as f64;
    let (store, _) = Store::open(config(dir)).unwrap();
    let mut writer = store.writer(0).unwrap();
    for i in 0..100 {
        writer
            .append("a", "t", old + i as f64, ValueRef::Number(i as f64))
            .unwrap();
        if i < 50 {
            writer
                .append("b", "t", old + i as f64, ValueRef::Number(-1.0))
                .unwrap();
        }
    }
    writer.commit().unwrap();
    seal(&mut writer, 1);
    window_dir(dir, old).join("segment-0.sealed")
}

#[test]
fn an_interrupted_seal_is_resolved_at_open_the_sealed_file_wins() {
    let dir = tempfile::tempdir().unwrap();
    let sealed = sealed_store(dir.path());
    // A crash between the rename and the removal of the segment leaves both files: the sealed
    // file wins, whatever the segment holds. And a leftover temporary file.
    let segment = sealed.with_extension("seg");
    std::fs::write(&segment, b"whatever the segment held").unwrap();
    let tmp = sealed.with_extension("sealed.tmp");
    std::fs::write(&tmp, b"half a sealed file").unwrap();
    let verified = sluice_storage::verify(dir.path(), false).unwrap();
    assert!(!verified.is_clean(), "verify reports the leftover segment");
    let (store, report) = Store::open(config(dir.path())).unwrap();
    assert_eq!((report.points, report.seals_discarded), (150, 0));
    assert!(!segment.exists() && !tmp.exists() && sealed.exists());
    assert_eq!(points(&store, "a", "t").len(), 100);
    drop(store);
    assert!(sluice_storage::verify(dir.path(), false)
        .unwrap()
        .is_clean());
}

#[test]
fn a_corrupt_series_frame_is_a_counted_hole_and_a_corrupt_index_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let sealed = sealed_store(dir.path());
    let good = std::fs::read(&sealed).unwrap();
    // One byte of the first series frame's payload (series "a", id 0): a hole.
    let mut bytes = good.clone();
    bytes[48 + 48 + 8] ^= 0xFF;
    std::fs::write(&sealed, &bytes).unwrap();
    let verified = sluice_storage::verify(dir.path(), false).unwrap();
    assert!(!verified.is_clean(), "verify reports the corrupt frame");
    {
        let (store, report) = Store::open(config(dir.path())).unwrap();
        assert_eq!(report.corrupt_regions, 1);
        assert_eq!(
            points(&store, "a", "t").len(),
            0,
            "the damaged series is not served"
        );
        assert_eq!(points(&store, "b", "t").len(), 50, "the other series is");
    }
    // One byte of the index (the last frame): Store::open fails, naming the file.
    let mut bytes = good.clone();
    let at = bytes.len() - 20;
    bytes[at] ^= 0xFF;
    std::fs::write(&sealed, &bytes).unwrap();
    match Store::open(config(dir.path())) {
        Err(sluice_storage::StoreError::Corrupt { path, reason, .. }) => {
            assert_eq!(path, sealed);
            assert!(reason.contains("index"), "{reason}");
        }
        Err(other) => panic!("unexpected error {other}"),
        Ok(_) => panic!("a sealed file without its index opened"),
    }
    assert!(!sluice_storage::verify(dir.path(), false)
        .unwrap()
        .is_clean());
    // Garbage of every length where the sealed file is: an error or a counted hole, no panic.
    for len in [0, 10, 48, 100, good.len() / 2, good.len()] {
        let mut bytes = good.clone();
        bytes.truncate(len);
        for byte in bytes.iter_mut().skip(48) {
            *byte = byte.wrapping_mul(31).wrapping_add(7);
        }
        std::fs::write(&sealed, &bytes).unwrap();
        let _ = Store::open(config(dir.path()));
        let _ = sluice_storage::verify(dir.path(), false);
        let _ = sluice_storage::inspect(dir.path());
    }
}

#[test]
fn a_corrupt_sealed_file_beside_its_segment_is_discarded_and_the_seal_redone() {
    let dir = tempfile::tempdir().unwrap();
    let old = window_of(now()) as f64 - 3.0 * HOUR as f64;
    let sealed = window_dir(dir.path(), old).join("segment-0.sealed");
    let segment = window_dir(dir.path(), old).join("segment-0.seg");
    {
        let (store, _) = Store::open(config(dir.path())).unwrap();
        let mut writer = store.writer(0).unwrap();
        writer
            .append("dev", "t", old, ValueRef::Number(1.0))
            .unwrap();
        writer.commit().unwrap();
    }
    let segment_bytes = std::fs::read(&segment).unwrap();
    {
        let (store, _) = Store::open(config(dir.path())).unwrap();
        let mut writer = store.writer(0).unwrap();
        assert_eq!(writer.seal_due().unwrap(), 1);
    }
    // The segment is back (as a crash before the removal would leave it) and the sealed file
    // is damaged in its index.
    std::fs::write(&segment, &segment_bytes).unwrap();
    let mut bytes = std::fs::read(&sealed).unwrap();
    let at = bytes.len() - 20;
    bytes[at] ^= 0xFF;
    std::fs::write(&sealed, &bytes).unwrap();
    let (store, report) = Store::open(config(dir.path())).unwrap();
    assert_eq!(report.seals_discarded, 1);
    assert!(!sealed.exists() && segment.exists());
    assert!(store.reader().sealed_before() <= old);
    let mut writer = store.writer(0).unwrap();
    // Not written in this process: due at once.
    assert_eq!(writer.seal_due().unwrap(), 1);
    assert!(sealed.exists() && !segment.exists());
    assert_eq!(points(&store, "dev", "t"), vec![(old, Value::Number(1.0))]);
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

/// Seals every due segment of `writers` (waiting out the grace period of segments written in
/// this process): returns how many were sealed.
fn seal_all(writers: &mut [ShardWriter]) -> usize {
    let start = Instant::now();
    let mut sealed = 0;
    let mut idle_since = Instant::now();
    loop {
        let mut now_sealed = 0;
        for writer in writers.iter_mut() {
            now_sealed += writer.seal_due().unwrap();
        }
        sealed += now_sealed;
        if now_sealed > 0 {
            idle_since = Instant::now();
        } else if idle_since.elapsed() > Duration::from_millis(2500) {
            return sealed;
        }
        assert!(start.elapsed() < 4 * DUE_WAIT_MAX, "sealing did not finish");
        std::thread::sleep(Duration::from_millis(50));
    }
}

type Answers = Vec<(String, String, f64, f64, Vec<(f64, Value)>)>;

/// Every series over the whole range and over ranges around and inside window edges, `latest`
/// of every device, and the device list.
fn answers(store: &Store, devices: &[String], names: &[&str], base: f64) -> (Answers, Vec<String>) {
    let reader = store.reader();
    let mut all = Vec::new();
    let ranges = [
        (f64::MIN, f64::MAX),
        (base, base + HOUR as f64),
        (base + 1800.0, base + 2.0 * HOUR as f64 + 17.0),
        (base + 3599.0, base + 3601.0),
        (base + 100.0, base + 100.0),
        (base + 2.5 * HOUR as f64, f64::MAX),
    ];
    for device in devices {
        for name in names {
            for (from, to) in ranges {
                let mut scan = match reader.scan(device, name, from, to) {
                    Some(scan) => scan.chunk_points_max(37),
                    None => continue,
                };
                let mut points = Vec::new();
                while let Some(chunk) = scan.next_chunk().unwrap() {
                    points.extend(chunk);
                }
                all.push((device.clone(), name.to_string(), from, to, points));
            }
        }
    }
    let mut summary: Vec<String> = devices
        .iter()
        .map(|device| format!("{device}: {:?}", reader.latest(device)))
        .collect();
    summary.push(format!("{:?}", reader.devices()));
    (all, summary)
}

#[test]
fn a_one_series_read_of_sealed_data_returns_exactly_what_the_unsealed_store_returned() {
    use rand::{Rng, SeedableRng};
    let seed: u64 = std::env::var("SLUICE_SEAL_SEED")
        .ok()
        .and_then(|seed| seed.parse().ok())
        .unwrap_or_else(rand::random);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let base = window_of(now()) as f64 - 6.0 * HOUR as f64;
    let devices: Vec<String> = (0..7).map(|d| format!("device-{d}")).collect();
    let names = ["temp", "on", "note", "blob", "über/µ"];
    let value = |rng: &mut rand::rngs::StdRng, name: &str, i: u32| match name {
        "temp" | "über/µ" => Value::Number(rng.random_range(-1e6..1e6)),
        "on" => Value::Bool(rng.random_bool(0.5)),
        "note" => Value::String(format!("n{i}-{}", "x".repeat(rng.random_range(0..40)))),
        _ => Value::Data((0..rng.random_range(0..30)).map(|_| rng.random()).collect()),
    };
    let append = |writer: &mut ShardWriter, rng: &mut rand::rngs::StdRng, hours: f64| {
        for i in 0..rng.random_range(200..600u32) {
            let device = &devices[rng.random_range(0..devices.len())];
            let name = names[rng.random_range(0..names.len())];
            // Whole seconds over a few windows, so that some times repeat (ties keep their
            // write order).
            let time = base + rng.random_range(0..(hours * HOUR as f64) as u32) as f64;
            let value = value(rng, name, i);
            writer.append(device, name, time, value.as_ref()).unwrap();
        }
        writer.commit().unwrap();
    };
    let (store, _) = Store::open(config(dir.path())).unwrap();
    // Two shards (a device in both: readers merge), small segments (several per window).
    let mut writers = vec![store.writer(0).unwrap(), store.writer(1).unwrap()];
    for writer in writers.iter_mut() {
        writer.set_segment_bytes_max(16 << 10);
    }
    for round in 0..12 {
        let shard = round % 2;
        append(&mut writers[shard], &mut rng, 3.0);
    }
    let context = format!("SLUICE_SEAL_SEED={seed}");
    let unsealed = answers(&store, &devices, &names, base);
    assert!(
        unsealed.0.iter().any(|answer| answer.4.len() > 50),
        "{context}"
    );
    // A scan made before the seal reads the sealed files after it.
    let mut early = store
        .reader()
        .scan(&devices[0], "temp", f64::MIN, f64::MAX)
        .unwrap();
    let sealed = seal_all(&mut writers);
    assert!(sealed >= 6, "{context}: {sealed} segments sealed");
    let mut early_points = Vec::new();
    while let Some(chunk) = early.next_chunk().unwrap() {
        early_points.extend(chunk);
    }
    let full = |answers: &Answers, device: &str, name: &str| {
        answers
            .iter()
            .find(|answer| answer.0 == device && answer.1 == name && answer.2 == f64::MIN)
            .map(|answer| answer.4.clone())
    };
    assert_eq!(
        Some(early_points),
        full(&unsealed.0, &devices[0], "temp"),
        "{context}: a scan across the seal"
    );
    assert!(
        answers(&store, &devices, &names, base) == unsealed,
        "{context}: answers after the seal differ"
    );
    // Late readings: late segments in sealed windows, then sealed in their turn.
    for round in 0..4 {
        append(&mut writers[round % 2], &mut rng, 3.0);
    }
    let with_late = answers(&store, &devices, &names, base);
    assert!(
        seal_all(&mut writers) >= 2,
        "{context}: late segments sealed"
    );
    assert!(
        answers(&store, &devices, &names, base) == with_late,
        "{context}: answers after sealing late segments differ"
    );
    // One-series reads of sealed data read that series' records only.
    let reader = store.reader();
    for device in &devices {
        let mut scan = reader.scan(device, "temp", f64::MIN, f64::MAX).unwrap();
        let mut found = 0;
        while let Some(chunk) = scan.next_chunk().unwrap() {
            found += chunk.len();
        }
        assert_eq!(scan.records_scanned(), found as u64, "{context}: {device}");
    }
    drop(reader);
    drop(writers);
    drop(store);
    let (store, report) = Store::open(config(dir.path())).unwrap();
    assert_eq!(
        (
            report.seals_discarded,
            report.commits_rolled_back,
            report.incomplete_commits
        ),
        (0, 0, 0),
        "{context}"
    );
    assert!(
        answers(&store, &devices, &names, base) == with_late,
        "{context}: answers after a restart differ"
    );
    let verified = sluice_storage::verify(dir.path(), false).unwrap();
    assert!(verified.is_clean(), "{context}: {verified}");
    let inspection = sluice_storage::inspect(dir.path()).unwrap();
    assert!(inspection.segments.iter().all(|segment| segment.sealed));
    assert_eq!(inspection.points(), report.points);
}

/// Copies the version 2 store in tests/fixtures (written by the storage crate before sealed
/// files existed; tests/fixtures/v2-store.rs.txt is the program that wrote it).
fn v2_store() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/v2-store");
    fn copy(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            let target = to.join(entry.file_name());
            if entry.file_type().unwrap().is_dir() {
                copy(&entry.path(), &target);
            } else {
                std::fs::copy(entry.path(), target).unwrap();
            }
        }
    }
    copy(&fixture, dir.path());
    dir
}

type Points = Vec<(f64, Value)>;

/// What the fixture program wrote: (device, name) -> points, in time order.
fn v2_expected() -> Vec<(String, String, Points)> {
    let hour = 3600.0;
    let t0 = 10.0 * hour;
    let mut expected = Vec::new();
    for shard in 0..2u32 {
        for d in 0..4u32 {
            let device = format!("dev-{shard}-{d}");
            let mut temp = Vec::new();
            let mut on = Vec::new();
            let mut note = Vec::new();
            let mut blob = Vec::new();
            for c in 0..6u32 {
                for k in 0..5u32 {
                    let t = t0 + f64::from(c) * 1200.0 + f64::from(k) * 7.0 + f64::from(d);
                    temp.push((t, Value::Number(f64::from(c * 100 + k) + 0.5)));
                    on.push((t, Value::Bool(k % 2 == 0)));
                    if k == 0 {
                        note.push((t, Value::String(format!("c{c}"))));
                        blob.push((t, Value::Data(vec![c as u8, d as u8, 0xFF])));
                    }
                }
            }
            if d == 0 {
                temp.push((t0 + 5.0, Value::Number(-1.0)));
                temp.push((t0 + 2.0 * hour + 5.0, Value::Number(-2.0)));
                temp.sort_by(|a, b| a.0.total_cmp(&b.0));
            }
            for (name, points) in [("temp", temp), ("on", on), ("note", note), ("blob", blob)] {
                expected.push((device.clone(), name.to_string(), points));
            }
        }
    }
    expected
}

/// The version 2 fixture's configuration: 1 h partitions, every window due at once.
fn v2_config(dir: &Path) -> StoreConfig {
    StoreConfig {
        dir: dir.to_path_buf(),
        partition_secs: HOUR,
        partition_grace_secs: 0,
        durability: Durability::Fsync,
    }
}

fn v2_check(store: &Store, context: &str) {
    for (device, name, expected) in v2_expected() {
        assert_eq!(
            points(store, &device, &name),
            expected,
            "{context}: {device} {name}"
        );
    }
}

#[test]
fn a_store_of_format_version_2_opens_reads_and_is_sealed_series_major() {
    let dir = v2_store();
    let config = v2_config(dir.path());
    {
        let (store, report) = Store::open(config.clone()).unwrap();
        // Its four version 2 seal indexes are removed: those segments are unsealed again.
        assert_eq!(report.seals_discarded, 4);
        assert_eq!(
            (report.commits_rolled_back, report.incomplete_commits),
            (0, 0)
        );
        let exchanges = store.take_recovered_exchanges();
        assert_eq!(exchanges.len(), 12, "6 commits with an exchange per shard");
        v2_check(&store, "version 2, as found");
        assert!(store.reader().sealed_before() <= 36000.0);
        // Every window is due (1970): the writer seals them series-major, the late segment of
        // window 10 h too, whose commit has its record in the open... now due window 12 h.
        let mut writers = vec![store.writer(0).unwrap(), store.writer(1).unwrap()];
        assert_eq!(seal_all(&mut writers), 8);
        v2_check(&store, "version 2, sealed again");
        assert!(store.reader().sealed_before() > 43200.0);
    }
    let files: Vec<String> = walk(dir.path());
    assert!(
        files
            .iter()
            .all(|file| !file.ends_with(".seg") && !file.ends_with(".seal")),
        "{files:?}"
    );
    let (store, report) = Store::open(config.clone()).unwrap();
    assert_eq!(
        (
            report.seals_discarded,
            report.commits_rolled_back,
            report.incomplete_commits
        ),
        (0, 0, 0)
    );
    assert_eq!(store.take_recovered_exchanges().len(), 12);
    v2_check(&store, "sealed, reopened");
    drop(store);
    let verified = sluice_storage::verify(dir.path(), false).unwrap();
    assert!(verified.is_clean(), "{verified}");
}

#[test]
fn a_commit_split_between_a_sealed_file_and_an_open_segment_stays_complete() {
    // The version 2 fixture's last commit per shard wrote window 10 h (a late segment) and
    // window 12 h (with its record). Sealing only the late segment leaves the last commit with
    // a block in a sealed file and a block and its record in a segment: it is complete.
    let dir = v2_store();
    let config = v2_config(dir.path());
    {
        let (store, _) = Store::open(config.clone()).unwrap();
        let mut writer = store.writer(0).unwrap();
        // Due segments in catalog order: 10 h seq 0, 10 h seq 1 (the late one), then 11 h, 12 h.
        assert_eq!(writer.seal_due().unwrap(), 2);
    }
    assert!(dir.path().join("shard-0/36000/segment-1.sealed").exists());
    assert!(dir.path().join("shard-0/43200/segment-0.seg").exists());
    let (store, report) = Store::open(config).unwrap();
    assert_eq!(
        (report.commits_rolled_back, report.incomplete_commits),
        (0, 0)
    );
    v2_check(&store, "late segment sealed");
}

fn walk(dir: &Path) -> Vec<String> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_dir() {
            files.extend(walk(&entry.path()));
        } else {
            files.push(entry.path().display().to_string());
        }
    }
    files
}

/// Commits leave the seal to the writer's sealing thread and rename the finished sealed file
/// into place at a later seal check; a late reading appended to the segment while it is being
/// sealed makes that seal stale (discarded, the segment sealed again later with the reading).
/// Whatever the interleaving, every reading is there exactly once, live and after a restart,
/// and in the end the old window holds only sealed files.
#[test]
fn commits_seal_on_the_sealing_thread_a_late_reading_meanwhile_is_kept_and_the_segment_let_go() {
    let dir = tempfile::tempdir().unwrap();
    let old = window_of(now()) as f64 - 3.0 * HOUR as f64;
    let old_dir = window_dir(dir.path(), old);
    let (store, _) = Store::open(config(dir.path())).unwrap();
    let mut writer = store.writer(0).unwrap();
    let mut expected: Vec<(f64, Value)> = Vec::new();
    for i in 0..200 {
        let time = old + i as f64;
        writer
            .append("dev", "t", time, ValueRef::Number(i as f64))
            .unwrap();
        expected.push((time, Value::Number(i as f64)));
    }
    writer.commit().unwrap();
    let files = |dir: &Path| -> Vec<String> {
        std::fs::read_dir(dir)
            .map(|entries| {
                entries
                    .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    let started = Instant::now();
    let mut late_sent = false;
    let mut tick = 0.0;
    loop {
        assert!(
            started.elapsed() < 3 * DUE_WAIT_MAX,
            "not sealed in time: {:?}",
            files(&old_dir)
        );
        // Commits of the current window: each second, one runs a seal check.
        tick += 1.0;
        writer
            .append("dev", "now", now() + tick * 1e-3, ValueRef::Number(tick))
            .unwrap();
        writer.commit().unwrap();
        let names = files(&old_dir);
        // The sealing thread wrote the sealed file under its temporary name; it is renamed at
        // the next seal check (a second later): a late reading now makes that seal stale.
        let sealing = names.iter().any(|name| name.ends_with(".sealed.tmp"));
        if !late_sent && sealing {
            writer
                .append("dev", "t", old + 1000.5, ValueRef::Number(-1.0))
                .unwrap();
            writer.commit().unwrap();
            expected.push((old + 1000.5, Value::Number(-1.0)));
            late_sent = true;
        }
        assert_eq!(points(&store, "dev", "t"), expected, "{names:?}");
        let done = late_sent
            && !names.is_empty()
            && !names
                .iter()
                .any(|name| name.ends_with(".seg") || name.ends_with(".tmp"))
            && names.iter().all(|name| name.ends_with(".sealed"));
        if done {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // The writer handed the removed segment's handles to the sealing thread, which let them go:
    // no descriptor or map of this process still holds the deleted file.
    let held = || -> Vec<String> {
        let mut held: Vec<String> = std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(|entry| std::fs::read_link(entry.ok()?.path()).ok())
            .map(|target| target.to_string_lossy().into_owned())
            .chain(
                std::fs::read_to_string("/proc/self/maps")
                    .unwrap()
                    .lines()
                    .map(str::to_string),
            )
            .filter(|line| line.contains(&*old_dir.to_string_lossy()) && line.contains("(deleted)"))
            .collect();
        held.dedup();
        held
    };
    let released = Instant::now();
    while !held().is_empty() {
        assert!(
            released.elapsed() < DUE_WAIT_MAX,
            "the sealed segment's file is still held: {:?}",
            held()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(writer);
    drop(store);
    let (store, report) = Store::open(config(dir.path())).unwrap();
    assert_eq!(report.seals_discarded, 0);
    assert_eq!(points(&store, "dev", "t"), expected);
    drop(store);
    assert!(sluice_storage::verify(dir.path(), false)
        .unwrap()
        .is_clean());
}
