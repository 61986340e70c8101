//! I/O failures after a countdown (`sluice_storage::sim::FaultyDisk` over a simulated disk):
//! for every operation of a commit, that operation fails with ENOSPC or EIO and the disk keeps
//! failing until healed. What was committed before stays intact and readable, the failed
//! commit is reported as failed and never becomes visible, commits fail while the disk fails,
//! and the store resumes by itself once I/O works again, also across a reopen after a power
//! loss.

use std::path::PathBuf;
use std::sync::Arc;

use sluice_storage::sim::{Fault, FaultyDisk, Loss, SimDisk};
use sluice_storage::{Durability, ShardWriter, Store, StoreConfig, StoreError, Value, ValueRef};

const ROOT: &str = "/data";

fn config(durability: Durability) -> StoreConfig {
    StoreConfig {
        dir: PathBuf::from(ROOT),
        partition_secs: 100,
        partition_grace_secs: u64::MAX,
        durability,
    }
}

/// Readings of commit `c`: new and known series, over two windows (one of them new for `c`).
fn append(writer: &mut ShardWriter, c: u32) {
    for i in 0..6u32 {
        let time = 1000.0 + f64::from(c) * 100.0 + f64::from(i % 2) * 100.0 + f64::from(i);
        writer
            .append(
                "dev",
                &format!("s{}", (c + i) % (c + 2)),
                time,
                ValueRef::Number(f64::from(c * 100 + i)),
            )
            .unwrap();
    }
    writer
        .record_exchange(
            std::net::SocketAddr::from(([10, 0, 0, 2], 7000)),
            c as u16,
            true,
            1000.0 + f64::from(c),
            &[0x60, 0x44],
        )
        .unwrap();
}

fn values_of(commits: &[u32]) -> Vec<u32> {
    let mut values: Vec<u32> = commits
        .iter()
        .flat_map(|c| (0..6).map(move |i| c * 100 + i))
        .collect();
    values.sort_unstable();
    values
}

fn values(store: &Store) -> Vec<u32> {
    let reader = store.reader();
    let mut values = Vec::new();
    for s in 0..12 {
        if let Some(points) = reader.series("dev", &format!("s{s}"), -1e12, 1e12).unwrap() {
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

fn injected(error: &StoreError, fault: Fault) -> bool {
    let errno = match fault {
        Fault::NoSpace => libc::ENOSPC,
        Fault::Io => libc::EIO,
    };
    matches!(error, StoreError::Io { source, .. } if source.raw_os_error() == Some(errno))
}

#[test]
fn a_commit_failing_at_any_operation_is_reported_and_the_store_resumes_when_io_works() {
    let mut faults_hit = 0;
    for durability in [Durability::Fsync, Durability::Os] {
        for fault in [Fault::NoSpace, Fault::Io] {
            // Enough countdowns to fail every operation of commit 1 and to let it through.
            for countdown in 0..40u64 {
                let context = format!("{durability:?} {fault:?} countdown {countdown}");
                let disk = SimDisk::new();
                let faulty = FaultyDisk::new(Arc::new(disk.clone()));
                let (store, _) =
                    Store::open_with(config(durability), Arc::new(faulty.clone())).unwrap();
                let reader = store.reader();
                let mut writer = store.writer(0).unwrap();
                append(&mut writer, 0);
                writer.commit().unwrap();

                faulty.fail_after(countdown, fault, true);
                append(&mut writer, 1);
                let generation = reader.generation();
                let mut committed = vec![0];
                match writer.commit() {
                    Ok(_) => {
                        // Fewer operations than the countdown: commit 1 is acknowledged.
                        assert_eq!(faulty.injected(), 0, "{context}");
                        committed.push(1);
                    }
                    Err(error) => {
                        faults_hit += 1;
                        assert!(injected(&error, fault), "{context}: {error}");
                        assert_eq!(
                            writer.pending(),
                            0,
                            "{context}: the failed commit's readings are dropped"
                        );
                        assert_eq!(
                            reader.generation(),
                            generation,
                            "{context}: nothing published"
                        );
                        assert_eq!(
                            values(&store),
                            values_of(&[0]),
                            "{context}: queries still served"
                        );
                        // The disk is still failing: the next commit fails too.
                        append(&mut writer, 2);
                        let error = writer.commit().expect_err("the disk still fails");
                        assert!(injected(&error, fault), "{context}: {error}");
                        assert_eq!(values(&store), values_of(&[0]), "{context}");
                    }
                }
                faulty.heal();
                append(&mut writer, 3);
                writer
                    .commit()
                    .unwrap_or_else(|error| panic!("{context}: commit after healing: {error}"));
                committed.push(3);
                assert_eq!(values(&store), values_of(&committed), "{context}");
                drop((writer, reader, store));

                // Reopen after a power loss (fsync: nothing unsynced survives) or a process crash
                // (os): exactly the acknowledged commits, their exchanges, and the store works on.
                let loss = match durability {
                    Durability::Fsync => Loss::LoseAll,
                    Durability::Os => Loss::KeepAll,
                };
                let crashed = disk.crash(loss, countdown);
                let (store, report) =
                    Store::open_with(config(durability), Arc::new(crashed)).unwrap();
                assert_eq!(
                    values(&store),
                    values_of(&committed),
                    "{context}: after reopen ({report})"
                );
                let exchanges: Vec<u32> = store
                    .take_recovered_exchanges()
                    .iter()
                    .map(|exchange| u32::from(exchange.message_id))
                    .collect();
                assert_eq!(exchanges, committed, "{context}: recovered exchanges");
                let mut writer = store.writer(0).unwrap();
                append(&mut writer, 4);
                writer.commit().unwrap();
                committed.push(4);
                assert_eq!(values(&store), values_of(&committed), "{context}");
            }
        }
    }
    assert!(
        faults_hit > 30,
        "the countdowns hit commit 1's operations ({faults_hit})"
    );
}

#[test]
fn a_failed_sync_of_a_prepared_commit_is_abandoned_and_the_next_commit_cuts_it_back() {
    for fault in [Fault::NoSpace, Fault::Io] {
        let disk = SimDisk::new();
        let faulty = FaultyDisk::new(Arc::new(disk.clone()));
        let (store, _) =
            Store::open_with(config(Durability::Fsync), Arc::new(faulty.clone())).unwrap();
        let mut writer = store.writer(0).unwrap();
        append(&mut writer, 0);
        writer.commit().unwrap();
        append(&mut writer, 1);
        let prepared = writer.prepare().unwrap();
        assert!(prepared.needs_sync());
        // The writes succeed, the last operation (the segment's fdatasync) fails.
        faulty.fail_after(prepared.operations() as u64 - 1, fault, false);
        let error = prepared.perform().expect_err("the sync fails");
        assert!(error.to_string().contains("fdatasync"), "{error}");
        assert!(injected(&error, fault), "{error}");
        writer.conclude(prepared, Err(error)).unwrap_err();
        assert_eq!(values(&store), values_of(&[0]));
        // Commit 1's frames are on the disk (written, not synced) until the next commit cuts
        // them back; a process crash now would find commit 1 whole (a commit the format
        // allows), a power loss anything but a part of it.
        append(&mut writer, 2);
        writer.commit().unwrap();
        assert_eq!(values(&store), values_of(&[0, 2]));
        drop((writer, store));
        for loss in [Loss::LoseAll, Loss::KeepAll] {
            let (store, _) =
                Store::open_with(config(Durability::Fsync), Arc::new(disk.crash(loss, 1))).unwrap();
            assert_eq!(values(&store), values_of(&[0, 2]), "{fault:?} {loss:?}");
        }
    }
}

#[test]
fn recovery_failing_midway_fails_open_and_succeeds_once_io_works() {
    // A crash image with a torn tail and an incomplete last commit: recovery has cuts to make.
    let disk = SimDisk::new();
    {
        let (store, _) =
            Store::open_with(config(Durability::Fsync), Arc::new(disk.clone())).unwrap();
        let mut writer = store.writer(0).unwrap();
        append(&mut writer, 0);
        writer.commit().unwrap();
        append(&mut writer, 1);
        // Stop the disk in the middle of commit 1's writes.
        disk.crash_after_ops(disk.ops() + 3);
        writer.commit().expect_err("the disk stops");
    }
    let crashed = disk.crash(Loss::KeepAll, 0);
    for countdown in 0..8 {
        let image = crashed.crash(Loss::KeepAll, 0);
        let faulty = FaultyDisk::new(Arc::new(image.clone()));
        faulty.fail_after(countdown, Fault::Io, true);
        match Store::open_with(config(Durability::Fsync), Arc::new(faulty.clone())) {
            Ok((store, _)) => {
                assert_eq!(faulty.injected(), 0, "countdown {countdown}");
                assert_eq!(values(&store), values_of(&[0]));
            }
            Err(error) => assert!(
                injected(&error, Fault::Io),
                "countdown {countdown}: {error}"
            ),
        }
        faulty.heal();
        let (store, _) = Store::open_with(config(Durability::Fsync), Arc::new(faulty)).unwrap();
        assert_eq!(values(&store), values_of(&[0]), "countdown {countdown}");
        let mut writer = store.writer(0).unwrap();
        append(&mut writer, 2);
        writer.commit().unwrap();
        assert_eq!(values(&store), values_of(&[0, 2]), "countdown {countdown}");
    }
}
