//! Crash after any write, on the simulated disk (`sluice_storage::sim::SimDisk`): a seeded
//! workload (commits over several partitions, new series, rolled segments, seals) runs on a
//! disk that stops after `k` operations, for every `k`; the disk a power loss at that moment
//! could leave (unsynced writes kept, lost, or torn sector by sector; unsynced directory
//! changes kept or lost) is reopened. With `--durability fsync`:
//!
//! - every acknowledged commit (commit returned Ok) is there, whole;
//! - the commit in flight is wholly there or wholly absent, never a part of it, and nothing
//!   else is there; the exchanges recovered are exactly those of the commits present;
//! - the store keeps working: a further commit, then another power loss, and it is there.
//!
//! With `--durability os`, a process crash (the page cache survives) keeps every acknowledged
//! commit; a power loss never yields a corrupt or duplicated record. Seeded: the seed and crash
//! point are in every failure message; `SLUICE_SIM_SEEDS` (workloads, default 12) and
//! `SLUICE_SIM_SEED` (first seed) for soaks and repeats.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rand::{Rng, SeedableRng};
use sluice_storage::sim::{Loss, SimDisk};
use sluice_storage::{Durability, Store, StoreConfig, Value, ValueRef};

const ROOT: &str = "/data";
const PARTITION_SECS: u64 = 100;
/// Workloads in the suite: each is crashed after every one of its operations (about 40-130),
/// with four crash images per point: about 3 000 reopened stores in about 10 s (debug build).
const SEEDS: u64 = 8;
/// Values of the commit made after recovery (above every workload value).
const AFTER: u32 = 900_000;

fn config(durability: Durability) -> StoreConfig {
    StoreConfig {
        dir: PathBuf::from(ROOT),
        partition_secs: PARTITION_SECS,
        // Every partition of the workload (times around 1970) is due: seal_due seals them.
        partition_grace_secs: 0,
        durability,
    }
}

struct Workload {
    /// Per commit: (series, time, value).
    commits: Vec<Vec<(String, f64, u32)>>,
    /// Seal due segments after this commit.
    seal_after: Vec<bool>,
    segment_bytes_max: u64,
    series: usize,
}

fn workload(seed: u64) -> Workload {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let count = rng.random_range(3..7usize);
    let mut commits = Vec::new();
    let mut series = 0;
    for c in 0..count {
        let readings = rng.random_range(1..25u32);
        // Later commits bring new series (dictionary growth) and touch one to three windows.
        let known = 2 + c;
        series = series.max(known);
        let windows: Vec<u64> = (0..rng.random_range(1..4))
            .map(|_| rng.random_range(0..5))
            .collect();
        let records = (0..readings)
            .map(|i| {
                let window = windows[i as usize % windows.len()];
                let time =
                    1000.0 + (window * PARTITION_SECS) as f64 + rng.random_range(0..100) as f64;
                (
                    format!("s{}", rng.random_range(0..known)),
                    time,
                    c as u32 * 1000 + i,
                )
            })
            .collect();
        commits.push(records);
    }
    Workload {
        seal_after: (0..count).map(|_| rng.random_bool(0.3)).collect(),
        segment_bytes_max: [400, 1200, 64 << 20][rng.random_range(0..3)],
        commits,
        series,
    }
}

/// What a run did before the disk stopped it.
struct Outcome {
    /// Commits that returned Ok.
    acknowledged: usize,
    /// The commit that failed (the disk stopped during it), if one did.
    in_flight: Option<usize>,
}

fn exchange_peer(commit: usize) -> SocketAddr {
    SocketAddr::from(([10, 0, 0, 1], 5000 + commit as u16))
}

fn run(disk: &SimDisk, work: &Workload, durability: Durability) -> Outcome {
    let mut outcome = Outcome {
        acknowledged: 0,
        in_flight: None,
    };
    let Ok((store, _)) = Store::open_with(config(durability), Arc::new(disk.clone())) else {
        return outcome;
    };
    let Ok(mut writer) = store.writer(0) else {
        return outcome;
    };
    writer.set_segment_bytes_max(work.segment_bytes_max);
    for (c, records) in work.commits.iter().enumerate() {
        for (series, time, value) in records {
            writer
                .append("dev", series, *time, ValueRef::Number(f64::from(*value)))
                .unwrap();
        }
        writer
            .record_exchange(
                exchange_peer(c),
                c as u16,
                true,
                1000.0 + c as f64,
                &[0x60, 0x44, c as u8],
            )
            .unwrap();
        if writer.commit().is_err() {
            outcome.in_flight = Some(c);
            return outcome;
        }
        outcome.acknowledged += 1;
        if work.seal_after[c] && writer.seal_due().is_err() {
            return outcome;
        }
    }
    outcome
}

/// Every stored value, sorted (duplicates kept, so a test sees them).
fn values(store: &Store, series: usize) -> Vec<u32> {
    let reader = store.reader();
    let mut values = Vec::new();
    for s in 0..series {
        if let Some(points) = reader.series("dev", &format!("s{s}"), -1e12, 1e12).unwrap() {
            for (_, value) in points {
                let Value::Number(number) = value else {
                    panic!("not a number: {value:?}")
                };
                values.push(number as u32);
            }
        }
    }
    values.sort_unstable();
    values
}

fn commit_values(work: &Workload, commits: impl IntoIterator<Item = usize>) -> Vec<u32> {
    let mut values: Vec<u32> = commits
        .into_iter()
        .flat_map(|c| work.commits[c].iter().map(|(_, _, value)| *value))
        .collect();
    values.sort_unstable();
    values
}

/// Checks a store reopened after a crash; returns the commits found (acknowledged ones plus,
/// maybe, the one in flight).
fn check_recovered(store: &Store, work: &Workload, outcome: &Outcome, context: &str) -> Vec<usize> {
    let got = values(store, work.series);
    let acknowledged: Vec<usize> = (0..outcome.acknowledged).collect();
    let mut with_in_flight = acknowledged.clone();
    if let Some(c) = outcome.in_flight {
        with_in_flight.push(c);
    }
    let present = if got == commit_values(work, acknowledged.iter().copied()) {
        acknowledged
    } else if got == commit_values(work, with_in_flight.iter().copied()) {
        with_in_flight
    } else {
        panic!(
            "{context}: recovered values are not the acknowledged commits (+ the one in flight, whole): \
             acknowledged {}, in flight {:?}, got {got:?}",
            outcome.acknowledged, outcome.in_flight
        );
    };
    let exchanges: Vec<u16> = store
        .take_recovered_exchanges()
        .iter()
        .map(|exchange| exchange.message_id)
        .collect();
    let expected: Vec<u16> = present.iter().map(|c| *c as u16).collect();
    assert_eq!(exchanges, expected, "{context}: recovered exchanges");
    present
}

/// The store keeps working after recovery: one more commit, a power loss, and it is there.
fn keeps_working(
    disk: &SimDisk,
    work: &Workload,
    durability: Durability,
    before: &[u32],
    context: &str,
) {
    let after_loss = {
        let (store, _) = Store::open_with(config(durability), Arc::new(disk.clone()))
            .unwrap_or_else(|error| panic!("{context}: reopen: {error}"));
        let mut writer = store.writer(0).unwrap();
        for i in 0..5u32 {
            writer
                .append(
                    "dev",
                    "s0",
                    1000.0 + f64::from(i) * 70.0,
                    ValueRef::Number(f64::from(AFTER + i)),
                )
                .unwrap();
        }
        writer
            .commit()
            .unwrap_or_else(|error| panic!("{context}: commit after recovery: {error}"));
        match durability {
            Durability::Fsync => disk.crash(Loss::LoseAll, 0),
            Durability::Os => disk.crash(Loss::KeepAll, 0),
        }
    };
    let (store, _) = Store::open_with(config(durability), Arc::new(after_loss))
        .unwrap_or_else(|error| panic!("{context}: second reopen: {error}"));
    let mut expected = before.to_vec();
    expected.extend(AFTER..AFTER + 5);
    expected.sort_unstable();
    assert_eq!(
        values(&store, work.series),
        expected,
        "{context}: after the further commit"
    );
}

fn seeds() -> (u64, u64) {
    let base = std::env::var("SLUICE_SIM_SEED")
        .ok()
        .and_then(|seed| seed.parse().ok())
        .unwrap_or_else(rand::random);
    let count = std::env::var("SLUICE_SIM_SEEDS")
        .ok()
        .and_then(|count| count.parse().ok())
        .unwrap_or(SEEDS);
    (base, count)
}

#[test]
fn fsync_a_power_loss_after_any_write_keeps_every_acknowledged_commit() {
    let (base, count) = seeds();
    let started = std::time::Instant::now();
    let mut points = 0u64;
    let mut in_flight_kept = 0u64;
    let mut in_flight_dropped = 0u64;
    for seed in base..base.wrapping_add(count) {
        let work = workload(seed);
        let total = {
            let disk = SimDisk::new();
            let outcome = run(&disk, &work, Durability::Fsync);
            assert_eq!(
                outcome.acknowledged,
                work.commits.len(),
                "seed {seed}: clean run"
            );
            disk.ops()
        };
        for crash_after in 0..=total {
            let disk = SimDisk::new();
            disk.crash_after_ops(crash_after);
            let outcome = run(&disk, &work, Durability::Fsync);
            for (image, loss) in [Loss::Torn, Loss::Torn, Loss::LoseAll, Loss::KeepAll]
                .into_iter()
                .enumerate()
            {
                let context = format!("seed {seed}, crash after {crash_after} of {total} operations, {loss:?} #{image} (SLUICE_SIM_SEED={seed} SLUICE_SIM_SEEDS=1)");
                let crashed = disk.crash(loss, seed ^ (crash_after << 20) ^ image as u64);
                let (store, _) =
                    Store::open_with(config(Durability::Fsync), Arc::new(crashed.clone()))
                        .unwrap_or_else(|error| panic!("{context}: reopen: {error}"));
                let present = check_recovered(&store, &work, &outcome, &context);
                if outcome.in_flight.is_some() {
                    if present.len() > outcome.acknowledged {
                        in_flight_kept += 1;
                    } else {
                        in_flight_dropped += 1;
                    }
                }
                let got = values(&store, work.series);
                drop(store);
                keeps_working(&crashed, &work, Durability::Fsync, &got, &context);
                // Now and then, the offline checker agrees on the real file system.
                if (crash_after + image as u64).is_multiple_of(97) {
                    let real = tempfile::tempdir().unwrap();
                    crashed.materialize(Path::new(ROOT), real.path()).unwrap();
                    let report = sluice_storage::verify(real.path(), false).unwrap();
                    assert!(report.is_clean(), "{context}: verify: {report}");
                }
                points += 1;
            }
        }
    }
    eprintln!(
        "{points} crash images reopened in {:.1} s (in-flight commit kept whole {in_flight_kept} times, absent {in_flight_dropped} times)",
        started.elapsed().as_secs_f64()
    );
    assert!(
        in_flight_kept > 0 && in_flight_dropped > 0,
        "both outcomes of a torn commit are exercised"
    );
}

#[test]
fn os_a_process_crash_keeps_every_acknowledged_commit_and_a_power_loss_nothing_corrupt() {
    let (base, count) = seeds();
    for seed in base..base.wrapping_add(count / 2 + 1) {
        let work = workload(seed);
        let total = {
            let disk = SimDisk::new();
            run(&disk, &work, Durability::Os);
            disk.ops()
        };
        let all: BTreeSet<u32> = commit_values(&work, 0..work.commits.len())
            .into_iter()
            .collect();
        for crash_after in 0..=total {
            let disk = SimDisk::new();
            disk.crash_after_ops(crash_after);
            let outcome = run(&disk, &work, Durability::Os);
            let context = format!("seed {seed}, crash after {crash_after} of {total} operations");
            // A process crash: the page cache survives.
            let crashed = disk.crash(Loss::KeepAll, 0);
            let (store, _) = Store::open_with(config(Durability::Os), Arc::new(crashed.clone()))
                .unwrap_or_else(|error| panic!("{context}: reopen: {error}"));
            check_recovered(
                &store,
                &work,
                &outcome,
                &format!("{context}, process crash"),
            );
            let got = values(&store, work.series);
            drop(store);
            keeps_working(&crashed, &work, Durability::Os, &got, &context);
            // A power loss: anything unsynced may be lost or torn, but what is read is what was
            // written, once.
            let crashed = disk.crash(Loss::Torn, seed ^ crash_after);
            let (store, _) = Store::open_with(config(Durability::Os), Arc::new(crashed.clone()))
                .unwrap_or_else(|error| panic!("{context}, power loss: reopen: {error}"));
            let got = values(&store, work.series);
            let unique: BTreeSet<u32> = got.iter().copied().collect();
            assert_eq!(
                unique.len(),
                got.len(),
                "{context}, power loss: duplicates: {got:?}"
            );
            assert!(
                unique.is_subset(&all),
                "{context}, power loss: values never written: {got:?}"
            );
            drop(store);
            keeps_working(
                &crashed,
                &work,
                Durability::Os,
                &got,
                &format!("{context}, power loss"),
            );
        }
    }
}

/// Retention under crashes: a drop of old partitions is stopped after each of its operations and
/// reopened after a power loss. A dropped partition is wholly there or wholly absent (absent once
/// the drop returned), every other partition is whole, a commit whose older blocks were dropped
/// keeps the rest (its record is in its newest partition), and the partition holding a block of
/// the shard's last commit is not dropped (recovery requires the last commit whole).
#[test]
fn fsync_a_power_loss_during_retention_drops_whole_partitions_only() {
    // (commit, window of each reading); partition 100 s, windows 1000..1400.
    let commits: [&[u64]; 3] = [&[1000, 1100, 1300], &[1000, 1100], &[1100, 1400]];
    let value = |c: usize, i: usize| (c * 1000 + i) as u32;
    let run = |disk: &SimDisk| -> Option<sluice_storage::RetentionReport> {
        let (store, _) =
            Store::open_with(config(Durability::Fsync), Arc::new(disk.clone())).ok()?;
        let mut writer = store.writer(0).ok()?;
        for (c, windows) in commits.iter().enumerate() {
            for (i, window) in windows.iter().enumerate() {
                writer
                    .append(
                        "dev",
                        "s0",
                        *window as f64 + 1.0,
                        ValueRef::Number(f64::from(value(c, i))),
                    )
                    .unwrap();
            }
            writer
                .record_exchange(exchange_peer(c), c as u16, true, 1000.0 + c as f64, &[0x60])
                .unwrap();
            writer.commit().ok()?;
        }
        // Windows 1000 and 1100 ended by 1250; 1100 holds a block of the last commit (2).
        store.retention().drop_before(1250).ok()
    };
    let total = {
        let disk = SimDisk::new();
        let report = run(&disk).expect("clean run");
        assert_eq!(report.partitions, 1, "only window 1000 goes: {report:?}");
        disk.ops()
    };
    let all: Vec<u32> = {
        let mut all: Vec<u32> = commits
            .iter()
            .enumerate()
            .flat_map(|(c, windows)| (0..windows.len()).map(move |i| value(c, i)))
            .collect();
        all.sort_unstable();
        all
    };
    let in_window_1000: Vec<u32> = vec![value(0, 0), value(1, 0)];
    let without: Vec<u32> = all
        .iter()
        .copied()
        .filter(|v| !in_window_1000.contains(v))
        .collect();
    for crash_after in 0..=total {
        let disk = SimDisk::new();
        disk.crash_after_ops(crash_after);
        let dropped = run(&disk).is_some();
        for (image, loss) in [
            Loss::Torn,
            Loss::Torn,
            Loss::Torn,
            Loss::LoseAll,
            Loss::KeepAll,
        ]
        .into_iter()
        .enumerate()
        {
            let context =
                format!("crash after {crash_after} of {total} operations, {loss:?} #{image}");
            let crashed = disk.crash(loss, crash_after << 8 | image as u64);
            let (store, _) = Store::open_with(config(Durability::Fsync), Arc::new(crashed.clone()))
                .unwrap_or_else(|error| panic!("{context}: reopen: {error}"));
            let got = values(&store, 1);
            let acknowledged = store.take_recovered_exchanges().len();
            if acknowledged < commits.len() {
                // The crash came before the drop: the commits' own property holds (tested above).
                drop(store);
                continue;
            }
            if dropped {
                assert_eq!(
                    got, without,
                    "{context}: the drop returned, window 1000 is gone"
                );
            } else {
                assert!(
                    got == all || got == without,
                    "{context}: a partition partly dropped: {got:?}"
                );
            }
            drop(store);
            keeps_working(
                &crashed,
                &Workload {
                    commits: Vec::new(),
                    seal_after: Vec::new(),
                    segment_bytes_max: 0,
                    series: 1,
                },
                Durability::Fsync,
                &got,
                &context,
            );
        }
    }
}

/// Sealing under crashes (docs/storage-format.md, "Which file wins, at open"): a seal rewrites a
/// segment into a sealed file and removes the segment; it is stopped after each of its
/// operations (sync, write, rename, directory syncs, removal), and every crash image reopens
/// with every acknowledged reading exactly once and every exchange, whatever mix of segment,
/// temporary and sealed files it left; a second recovery after another power loss agrees
/// (recovery is idempotent), and the seal is then finished by the writer. The commits span
/// three windows and `seal_due` seals two segments per call, so the last commit ends with
/// blocks in sealed files and its record in a segment: it must stay complete.
#[test]
fn fsync_a_power_loss_at_any_point_of_a_seal_keeps_every_reading_exactly_once() {
    let commits: [&[u64]; 4] = [
        &[1000, 1100, 1200],
        &[1100, 1000, 1200, 1200],
        &[1000, 1000, 1100],
        &[1200, 1100, 1000],
    ];
    let value = |c: usize, i: usize| (c * 1000 + i) as u32;
    let all: Vec<u32> = {
        let mut all: Vec<u32> = commits
            .iter()
            .enumerate()
            .flat_map(|(c, windows)| (0..windows.len()).map(move |i| value(c, i)))
            .collect();
        all.sort_unstable();
        all
    };
    // Returns the operations the commits took, before the seals.
    let run = |disk: &SimDisk| -> Option<u64> {
        let (store, _) =
            Store::open_with(config(Durability::Fsync), Arc::new(disk.clone())).ok()?;
        let mut writer = store.writer(0).ok()?;
        for (c, windows) in commits.iter().enumerate() {
            for (i, window) in windows.iter().enumerate() {
                writer
                    .append(
                        &format!("dev{}", i % 2),
                        "s0",
                        *window as f64 + (c * 7 + i) as f64,
                        ValueRef::Number(f64::from(value(c, i))),
                    )
                    .unwrap();
            }
            writer
                .record_exchange(exchange_peer(c), c as u16, true, 1000.0 + c as f64, &[0x60])
                .unwrap();
            writer.commit().ok()?;
        }
        let before = disk.ops();
        // Windows 1000 and 1100 first (two per call), then 1200 with the last record.
        writer.seal_due().ok()?;
        writer.seal_due().ok()?;
        Some(before)
    };
    let values = |store: &Store| -> Vec<u32> {
        let reader = store.reader();
        let mut values = Vec::new();
        for device in ["dev0", "dev1"] {
            for (_, value) in reader.series(device, "s0", -1e12, 1e12).unwrap().unwrap() {
                let Value::Number(number) = value else {
                    panic!("not a number: {value:?}")
                };
                values.push(number as u32);
            }
        }
        values.sort_unstable();
        values
    };
    let (before, total) = {
        let disk = SimDisk::new();
        let before = run(&disk).expect("clean run");
        let files: Vec<PathBuf> = disk.files(Path::new(ROOT)).into_keys().collect();
        let sealed = files
            .iter()
            .filter(|path| path.extension().is_some_and(|ext| ext == "sealed"))
            .count();
        assert_eq!(sealed, 3, "{files:?}");
        assert!(
            files
                .iter()
                .all(|path| path.extension().is_none_or(|ext| ext != "seg")),
            "{files:?}"
        );
        (before, disk.ops())
    };
    assert!(total > before + 20, "the seals take operations");
    let mut images = 0;
    for crash_after in before..=total {
        let disk = SimDisk::new();
        disk.crash_after_ops(crash_after);
        let _ = run(&disk);
        for (image, loss) in [Loss::Torn, Loss::Torn, Loss::LoseAll, Loss::KeepAll]
            .into_iter()
            .enumerate()
        {
            let context =
                format!("crash after {crash_after} of {total} operations, {loss:?} #{image}");
            let crashed = disk.crash(loss, crash_after << 8 | image as u64);
            {
                let (store, report) =
                    Store::open_with(config(Durability::Fsync), Arc::new(crashed.clone()))
                        .unwrap_or_else(|error| panic!("{context}: reopen: {error}"));
                assert_eq!(values(&store), all, "{context}: {report}");
                assert_eq!(
                    (report.commits_rolled_back, report.incomplete_commits),
                    (0, 0),
                    "{context}"
                );
                assert_eq!(
                    store.take_recovered_exchanges().len(),
                    commits.len(),
                    "{context}"
                );
            }
            // Recovery's own removals, then another power loss: the same store.
            let again = crashed.crash(Loss::LoseAll, 0);
            let (store, report) =
                Store::open_with(config(Durability::Fsync), Arc::new(again.clone()))
                    .unwrap_or_else(|error| panic!("{context}: second reopen: {error}"));
            assert_eq!(values(&store), all, "{context}: second recovery: {report}");
            assert_eq!(
                store.take_recovered_exchanges().len(),
                commits.len(),
                "{context}"
            );
            // The writer finishes the seal; a power loss after it keeps everything.
            let mut writer = store.writer(0).unwrap();
            while writer
                .seal_due()
                .unwrap_or_else(|error| panic!("{context}: seal after recovery: {error}"))
                > 0
            {}
            assert_eq!(values(&store), all, "{context}: sealed after recovery");
            drop(writer);
            drop(store);
            let last = again.crash(Loss::LoseAll, 0);
            let (store, _) = Store::open_with(config(Durability::Fsync), Arc::new(last.clone()))
                .unwrap_or_else(|error| panic!("{context}: third reopen: {error}"));
            assert_eq!(values(&store), all, "{context}: after the finished seal");
            drop(store);
            assert!(
                last.files(Path::new(ROOT)).keys().all(|path| path
                    .extension()
                    .is_none_or(|ext| ext != "seg" && ext != "tmp")),
                "{context}: every segment sealed, nothing left over"
            );
            if (crash_after + image as u64).is_multiple_of(13) {
                let real = tempfile::tempdir().unwrap();
                last.materialize(Path::new(ROOT), real.path()).unwrap();
                let report = sluice_storage::verify(real.path(), false).unwrap();
                assert!(report.is_clean(), "{context}: verify: {report}");
            }
            images += 1;
        }
    }
    eprintln!("{images} crash images over the seals reopened");
}
