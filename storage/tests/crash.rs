//! Crash points: a store whose last commit was torn at a random point (any subset of its new
//! bytes present, the rest zero or garbage, files cut anywhere in the new region) reopens with
//! every earlier commit whole, the last commit wholly present or wholly absent, never a partial
//! or corrupt record, and keeps working. Seeded: the seed is in the failure message.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use rand::{Rng, SeedableRng};
use sluice_storage::{Durability, Store, StoreConfig, Value, ValueRef};

const PARTITION_SECS: u64 = 100;
/// Crash points tried in the suite (each a fresh store, several fsyncs of file creation): every
/// kind of tear is hit many times in a few seconds. `SLUICE_CRASH_POINTS` asks for more (soak).
const CRASH_POINTS: u64 = 60;

fn open(dir: &Path) -> Store {
    Store::open(StoreConfig {
        dir: dir.to_path_buf(),
        partition_secs: PARTITION_SECS,
        // Sealing is not under test here: partitions never become due.
        partition_grace_secs: u64::MAX,
        // The crash images are made by the test; syncing would only slow it down.
        durability: Durability::Os,
    })
    .expect("reopen after a crash")
    .0
}

/// Every regular file under `dir` with its bytes.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut files = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                files.insert(path.clone(), std::fs::read(&path).unwrap());
            }
        }
    }
    files
}

/// Rewrites every file as a crash during the last commit could leave it: the durable bytes of
/// `before` stay, each 512-byte sector of the new region is new, zero or garbage, and the file
/// ends anywhere in the new region.
fn tear(
    rng: &mut impl Rng,
    before: &BTreeMap<PathBuf, Vec<u8>>,
    after: &BTreeMap<PathBuf, Vec<u8>>,
) {
    for (path, new) in after {
        let mut old_len = before.get(path).map_or(0, Vec::len);
        if new.len() == old_len {
            continue;
        }
        if old_len == 0 {
            // A file the commit created: its header was synced before any frame was written,
            // so either the creation itself was torn (at most a header's bytes), or the header
            // is whole.
            if rng.random_bool(0.2) {
                let len = rng.random_range(0..=48.min(new.len()));
                let torn: Vec<u8> = new[..len]
                    .iter()
                    .map(|b| if rng.random_bool(0.5) { *b } else { 0 })
                    .collect();
                std::fs::write(path, &torn).unwrap();
                continue;
            }
            old_len = 48.min(new.len());
        }
        let mut torn = new[..old_len].to_vec();
        let end = rng.random_range(old_len..=new.len());
        let mut offset = old_len;
        while offset < end {
            let sector_end = ((offset / 512 + 1) * 512).min(end);
            match rng.random_range(0..3) {
                0 => torn.extend_from_slice(&new[offset..sector_end]),
                1 => torn.extend(std::iter::repeat_n(0u8, sector_end - offset)),
                _ => torn.extend((offset..sector_end).map(|_| rng.random::<u8>())),
            }
            offset = sector_end;
        }
        std::fs::write(path, &torn).unwrap();
    }
}

/// Commit `c` appends readings named by (c, i) to a few series across two partitions.
fn commit(store: &Store, writer: &mut sluice_storage::ShardWriter, c: u32, readings: u32) {
    let _ = store;
    for i in 0..readings {
        let time = f64::from(c * 10 + i % 10) + if i % 3 == 0 { 150.0 } else { 0.0 };
        writer
            .append(
                "dev",
                &format!("s{}", i % 3),
                time,
                ValueRef::Number(f64::from(c * 1000 + i)),
            )
            .unwrap();
    }
    let peer = SocketAddr::from(([127, 0, 0, 1], 1000 + c as u16));
    writer
        .record_exchange(
            peer,
            c as u16,
            true,
            1000.0 + f64::from(c),
            &[0x61, 0x44, 0, c as u8, 7],
        )
        .unwrap();
    writer.commit().unwrap();
}

fn values(store: &Store) -> Vec<u32> {
    let reader = store.reader();
    let mut values = Vec::new();
    for series in 0..3 {
        if let Some(points) = reader
            .series("dev", &format!("s{series}"), -1e9, 1e9)
            .unwrap()
        {
            for (_, value) in points {
                let Value::Number(number) = value else {
                    panic!("not a number")
                };
                values.push(number as u32);
            }
        }
    }
    values.sort_unstable();
    values
}

#[test]
fn a_crash_at_any_point_of_a_commit_leaves_it_whole_or_absent() {
    let base_seed: u64 = std::env::var("SLUICE_CRASH_SEED")
        .ok()
        .and_then(|seed| seed.parse().ok())
        .unwrap_or_else(rand::random);
    let points: u64 = std::env::var("SLUICE_CRASH_POINTS")
        .ok()
        .and_then(|points| points.parse().ok())
        .unwrap_or(CRASH_POINTS);
    for point in 0..points {
        let seed = base_seed.wrapping_add(point);
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let dir = tempfile::tempdir().unwrap();
        let commits = rng.random_range(1..5u32);
        let sizes: Vec<u32> = (0..=commits).map(|_| rng.random_range(1..40)).collect();
        let before;
        {
            let store = open(dir.path());
            let mut writer = store.writer(0).unwrap();
            for c in 0..commits {
                commit(&store, &mut writer, c, sizes[c as usize]);
            }
            before = snapshot(dir.path());
            commit(&store, &mut writer, commits, sizes[commits as usize]);
        }
        let after = snapshot(dir.path());
        tear(&mut rng, &before, &after);

        let store = open(dir.path());
        let got = values(&store);
        let earlier: Vec<u32> = (0..commits)
            .flat_map(|c| (0..sizes[c as usize]).map(move |i| c * 1000 + i))
            .collect();
        let mut with_last = earlier.clone();
        with_last.extend((0..sizes[commits as usize]).map(|i| commits * 1000 + i));
        let mut earlier_sorted = earlier.clone();
        earlier_sorted.sort_unstable();
        with_last.sort_unstable();
        let last_present = got == with_last;
        assert!(
            got == earlier_sorted || last_present,
            "seed {seed}: a partial commit survived: {} of {} earlier, {} total",
            earlier.len(),
            with_last.len(),
            got.len()
        );
        // The exchanges recovered are exactly those of the commits present.
        let exchanges: Vec<u16> = store
            .take_recovered_exchanges()
            .iter()
            .map(|exchange| exchange.message_id)
            .collect();
        let expected: Vec<u16> = (0..commits + u32::from(last_present))
            .map(|c| c as u16)
            .collect();
        assert_eq!(exchanges, expected, "seed {seed}");

        // The store keeps working: one more commit, reopened, is there.
        let mut writer = store.writer(0).unwrap();
        commit(&store, &mut writer, 90, 5);
        drop(writer);
        drop(store);
        let store = open(dir.path());
        let got = values(&store);
        assert_eq!(
            got.iter().filter(|v| **v >= 90_000).count(),
            5,
            "seed {seed}"
        );
        assert!(
            sluice_storage::verify(dir.path(), false)
                .unwrap()
                .is_clean(),
            "seed {seed}"
        );
    }
}
