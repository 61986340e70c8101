//! Property tests: the store against a model, and arbitrary damage never panics.

use std::path::Path;

use proptest::prelude::*;
use sluice_storage::{verify, Durability, Store, StoreConfig, Value, ValueRef};

fn config(dir: &Path) -> StoreConfig {
    StoreConfig {
        dir: dir.to_path_buf(),
        partition_secs: 60,
        // Sealing is not under test here: partitions never become due.
        partition_grace_secs: u64::MAX,
        durability: Durability::Os,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]

    /// Commits of readings for a few series at random times: every query range over the
    /// store, live and after reopen, equals the model's answer.
    #[test]
    fn queries_match_a_model(
        commits in prop::collection::vec(prop::collection::vec((0u8..3, -500i32..500, any::<i16>()), 0..40), 1..6),
        ranges in prop::collection::vec((-600i32..600, 0i32..600), 1..5),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let mut model: Vec<(u8, f64, f64)> = Vec::new();
        let check = |store: &Store, model: &Vec<(u8, f64, f64)>| {
            let reader = store.reader();
            for series in 0u8..3 {
                for &(from, width) in &ranges {
                    let (from, to) = (from as f64 / 2.0, (from + width) as f64 / 2.0);
                    let got = reader.series("dev", &format!("s{series}"), from, to).unwrap();
                    let mut want: Vec<(f64, Value)> = model.iter()
                        .filter(|(s, time, _)| *s == series && *time >= from && *time < to)
                        .map(|(_, time, value)| (*time, Value::Number(*value)))
                        .collect();
                    want.sort_by(|a, b| a.0.total_cmp(&b.0));
                    if model.iter().any(|(s, _, _)| *s == series) {
                        let got = got.expect("series seen");
                        let mut got_sorted = got.clone();
                        got_sorted.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.partial_cmp_number(&b.1)));
                        want.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.partial_cmp_number(&b.1)));
                        prop_assert_eq!(got_sorted, want);
                    } else {
                        prop_assert_eq!(got, None);
                    }
                }
            }
            let points: u64 = reader.devices().iter().map(|device| device.points).sum();
            prop_assert_eq!(points as usize, model.len());
            Ok(())
        };
        {
            let store = Store::open(config(dir.path())).unwrap().0;
            let mut writer = store.writer(0).unwrap();
            for commit in &commits {
                for &(series, half_seconds, value) in commit {
                    let time = half_seconds as f64 / 2.0;
                    writer.append("dev", &format!("s{series}"), time, ValueRef::Number(value as f64)).unwrap();
                    model.push((series, time, value as f64));
                }
                writer.commit().unwrap();
            }
            check(&store, &model)?;
        }
        let store = Store::open(config(dir.path())).unwrap().0;
        check(&store, &model)?;
        drop(store);
        prop_assert!(verify(dir.path(), false).unwrap().is_clean());
    }

    /// Arbitrary truncation and byte damage of any file: open and queries never panic, never
    /// return a record that was not written (each value names its series and time), and when
    /// open succeeds the store still takes commits.
    #[test]
    fn damage_never_panics(
        file_pick in any::<prop::sample::Index>(),
        cut in any::<prop::sample::Index>(),
        flips in prop::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 0..4),
    ) {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(config(dir.path())).unwrap().0;
            let mut writer = store.writer(0).unwrap();
            for commit in 0..4 {
                for i in 0..6 {
                    let time = (commit * 50 + i * 7) as f64;
                    let name = if i % 2 == 0 { "a" } else { "b" };
                    writer.append("dev", name, time, ValueRef::String(&format!("{name}@{time}"))).unwrap();
                }
                writer.commit().unwrap();
            }
        }
        let mut files = Vec::new();
        let mut stack = vec![dir.path().join("shard-0")];
        while let Some(path) = stack.pop() {
            for entry in std::fs::read_dir(&path).unwrap() {
                let entry = entry.unwrap();
                if entry.file_type().unwrap().is_dir() { stack.push(entry.path()) } else { files.push(entry.path()) }
            }
        }
        files.sort();
        let file = &files[file_pick.index(files.len())];
        let mut bytes = std::fs::read(file).unwrap();
        for (at, mask) in flips {
            let index = at.index(bytes.len());
            bytes[index] ^= mask;
        }
        bytes.truncate(cut.index(bytes.len() + 1));
        std::fs::write(file, &bytes).unwrap();

        let _ = verify(dir.path(), false);
        let _ = sluice_storage::inspect(dir.path());
        if let Ok((store, _report)) = Store::open(config(dir.path())) {
            let reader = store.reader();
            for name in ["a", "b"] {
                if let Ok(Some(points)) = reader.series("dev", name, f64::MIN, f64::MAX) {
                    for (time, value) in points {
                        prop_assert_eq!(value, Value::String(format!("{name}@{time}")));
                    }
                }
            }
            let _ = reader.devices();
            let _ = reader.latest("dev");
            let mut writer = store.writer(0).unwrap();
            writer.append("dev", "c", 1.0, ValueRef::Number(1.0)).unwrap();
            writer.commit().unwrap();
            prop_assert_eq!(reader.series("dev", "c", 0.0, 2.0).unwrap().unwrap().len(), 1);
        }
    }
}

/// `bytes` with each (position, byte) of `damage` written past the 48-byte file header.
fn damaged(mut bytes: Vec<u8>, damage: &[(prop::sample::Index, u8)]) -> Vec<u8> {
    for (index, byte) in damage {
        let at = index.index(bytes.len() - 48) + 48;
        bytes[at] = *byte;
    }
    bytes
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, .. ProptestConfig::default() })]

    /// Arbitrary bytes behind a valid segment header, read as recovery reads them: no panic.
    #[test]
    fn arbitrary_segment_bytes_never_panic(frames in prop::collection::vec(any::<u8>(), 0..4096)) {
        let mut bytes = valid_segment_header();
        bytes.extend_from_slice(&frames);
        let _ = sluice_storage::fuzz_segment(&bytes);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, .. ProptestConfig::default() })]

    /// A real segment (blocks of every value kind and a commit record) with bytes changed
    /// anywhere and its checksums rewritten, so the damage reaches block and commit record
    /// decoding: no panic, and whatever the scan accepts reads back consistently.
    #[test]
    fn damaged_segments_with_rewritten_checksums_never_panic(
        damage in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
    ) {
        let bytes = damaged(valid_segment(), &damage);
        let _ = sluice_storage::fuzz_segment_checksummed(&bytes);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, .. ProptestConfig::default() })]

    /// A real sealed file (several series of every value kind, commit records, the index) with
    /// bytes changed anywhere and its checksums rewritten, so the damage reaches series frame,
    /// commit record and index decoding: no panic, and the series it serves hold one series.
    #[test]
    fn damaged_sealed_files_with_rewritten_checksums_never_panic(
        damage in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
    ) {
        let bytes = damaged(valid_sealed(), &damage);
        let _ = sluice_storage::fuzz_sealed_checksummed(&bytes);
    }

    /// Arbitrary truncation and byte damage of any file of a sealed store (sealed files, the
    /// dictionary): open, queries, inspect and verify never panic, and never return a record
    /// that was not written.
    #[test]
    fn damage_to_a_sealed_store_never_panics(
        file_pick in any::<prop::sample::Index>(),
        cut in any::<prop::sample::Index>(),
        flips in prop::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 0..4),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let sealed_config = StoreConfig { partition_grace_secs: 0, ..config(dir.path()) };
        {
            let store = Store::open(sealed_config.clone()).unwrap().0;
            let mut writer = store.writer(0).unwrap();
            for commit in 0..4 {
                for i in 0..6 {
                    let time = (commit * 50 + i * 7) as f64;
                    let name = if i % 2 == 0 { "a" } else { "b" };
                    writer.append("dev", name, time, ValueRef::String(&format!("{name}@{time}"))).unwrap();
                }
                writer.commit().unwrap();
            }
            while writer.seal_due().unwrap() > 0 {}
        }
        let mut files = Vec::new();
        let mut stack = vec![dir.path().join("shard-0")];
        while let Some(path) = stack.pop() {
            for entry in std::fs::read_dir(&path).unwrap() {
                let entry = entry.unwrap();
                if entry.file_type().unwrap().is_dir() { stack.push(entry.path()) } else { files.push(entry.path()) }
            }
        }
        files.sort();
        prop_assert!(files.iter().any(|file| file.extension().is_some_and(|ext| ext == "sealed")));
        let file = &files[file_pick.index(files.len())];
        let mut bytes = std::fs::read(file).unwrap();
        for (at, mask) in flips {
            let index = at.index(bytes.len());
            bytes[index] ^= mask;
        }
        bytes.truncate(cut.index(bytes.len() + 1));
        std::fs::write(file, &bytes).unwrap();

        let _ = verify(dir.path(), false);
        let _ = sluice_storage::inspect(dir.path());
        if let Ok((store, _report)) = Store::open(sealed_config) {
            let reader = store.reader();
            for name in ["a", "b"] {
                if let Ok(Some(points)) = reader.series("dev", name, f64::MIN, f64::MAX) {
                    for (time, value) in points {
                        prop_assert_eq!(value, Value::String(format!("{name}@{time}")));
                    }
                }
            }
            let _ = reader.devices();
            let _ = reader.latest("dev");
        }
    }
}

/// A real sealed file: series of every value kind, commit records with exchanges, the index.
fn valid_sealed() -> Vec<u8> {
    static SEALED: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    SEALED
        .get_or_init(|| {
            let dir = tempfile::tempdir().unwrap();
            let store = Store::open(StoreConfig {
                partition_grace_secs: 0,
                ..config(dir.path())
            })
            .unwrap()
            .0;
            let mut writer = store.writer(0).unwrap();
            for commit in 0..3u32 {
                for i in 0..5u32 {
                    let time = f64::from(commit * 10 + i);
                    writer
                        .append("dev", "n", time, ValueRef::Number(f64::from(i)))
                        .unwrap();
                    writer
                        .append("dev", "b", time, ValueRef::Bool(i % 2 == 0))
                        .unwrap();
                    writer
                        .append("other", "s", time, ValueRef::String("text"))
                        .unwrap();
                    writer
                        .append("other", "d", time, ValueRef::Data(&[1, 2, 3]))
                        .unwrap();
                }
                writer
                    .record_exchange(
                        "127.0.0.1:5683".parse().unwrap(),
                        commit as u16,
                        true,
                        1.0,
                        &[0x60, 0x44, 0, 1],
                    )
                    .unwrap();
                writer.commit().unwrap();
            }
            assert_eq!(writer.seal_due().unwrap(), 1);
            let path = dir.path().join("shard-0/0/segment-0.sealed");
            let bytes = std::fs::read(path).unwrap();
            assert!(sluice_storage::fuzz_sealed_checksummed(&bytes) == 60);
            bytes
        })
        .clone()
}

/// A real segment file: a block with every value kind and a commit record with an exchange.
fn valid_segment() -> Vec<u8> {
    static SEGMENT: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    SEGMENT
        .get_or_init(|| {
            let dir = tempfile::tempdir().unwrap();
            let store = Store::open(config(dir.path())).unwrap().0;
            let mut writer = store.writer(0).unwrap();
            writer
                .append("dev", "a", 1.0, ValueRef::Number(1.5))
                .unwrap();
            writer
                .append("dev", "b", 2.0, ValueRef::Bool(true))
                .unwrap();
            writer
                .append("dev", "c", 3.0, ValueRef::String("text"))
                .unwrap();
            writer
                .append("dev", "d", 4.0, ValueRef::Data(&[1, 2, 3]))
                .unwrap();
            writer
                .record_exchange(
                    std::net::SocketAddr::from(([127, 0, 0, 1], 5683)),
                    7,
                    true,
                    10.0,
                    &[0x60, 0x44, 0, 7],
                )
                .unwrap();
            writer.commit().unwrap();
            let bytes = std::fs::read(dir.path().join("shard-0/0/segment-0.seg")).unwrap();
            assert!(
                sluice_storage::fuzz_segment(&bytes) == 5,
                "4 records and 1 exchange"
            );
            if let Some(out) = std::env::var_os("SLUICE_FUZZ_SEED_OUT") {
                // storage/fuzz/README.md: the seed corpus is this file.
                std::fs::write(out, &bytes).unwrap();
            }
            bytes
        })
        .clone()
}

/// The 48-byte header of a real segment (written by the store).
fn valid_segment_header() -> Vec<u8> {
    static HEADER: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    HEADER
        .get_or_init(|| {
            let dir = tempfile::tempdir().unwrap();
            let store = Store::open(config(dir.path())).unwrap().0;
            let mut writer = store.writer(0).unwrap();
            writer
                .append("dev", "a", 1.0, ValueRef::Number(1.0))
                .unwrap();
            writer.commit().unwrap();
            let bytes = std::fs::read(dir.path().join("shard-0/0/segment-0.seg")).unwrap();
            bytes[..48].to_vec()
        })
        .clone()
}

trait NumberOrder {
    fn partial_cmp_number(&self, other: &Self) -> std::cmp::Ordering;
}

impl NumberOrder for Value {
    fn partial_cmp_number(&self, other: &Self) -> std::cmp::Ordering {
        match (self, other) {
            (Value::Number(a), Value::Number(b)) => a.total_cmp(b),
            _ => std::cmp::Ordering::Equal,
        }
    }
}
