//! Storage append + group commit, in records per second: what one shard does per receive batch.
//!
//! `cargo bench --bench append -- --measurement-time 3 --warm-up-time 1`
//!
//! Each iteration appends a block of readings (100 devices x 8 series, as `sluice load` sends)
//! with increasing times and commits it. `Durability::Os` measures the CPU and write(2) cost;
//! `Durability::Fsync` adds the fdatasync of the segment (and, on the first commit, dictionary)
//! files, so it measures the file system and device as much as the code.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use sluice_storage::{Durability, ShardWriter, Store, StoreConfig, ValueRef};

#[path = "common/names.rs"]
mod names;
use names::NAMES;

/// Start of the readings' times (unix seconds).
const T0: f64 = 1_763_900_000.0;
const DEVICES: usize = 100;

struct Fixture {
    // Field order: the writer and store drop before the directory.
    writer: ShardWriter,
    _store: Store,
    _dir: tempfile::TempDir,
    devices: Vec<String>,
    /// Readings appended so far (drives times and values).
    next: u64,
}

impl Fixture {
    fn new(durability: Durability) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("sluice-bench-append-")
            .tempdir()
            .expect("tempdir");
        let (store, _report) = Store::open(StoreConfig {
            dir: dir.path().to_path_buf(),
            partition_secs: 3600,
            // Sealing is not under test here: partitions never become due.
            partition_grace_secs: u64::MAX,
            durability,
        })
        .expect("open store");
        let writer = store.writer(0).expect("writer");
        let mut fixture = Fixture {
            writer,
            _store: store,
            _dir: dir,
            devices: (0..DEVICES).map(|i| format!("load-{i:04}")).collect(),
            next: 0,
        };
        // Intern every series once so the measured commits are the steady state.
        fixture.block(DEVICES * NAMES.len());
        fixture
    }

    /// Appends `records` readings and commits them.
    fn block(&mut self, records: usize) -> usize {
        for _ in 0..records {
            let k = self.next;
            self.next += 1;
            let device = &self.devices[(k as usize / NAMES.len()) % DEVICES];
            let name = NAMES[k as usize % NAMES.len()];
            // About 1000 readings per second of simulated time: stays in one partition for a
            // long run, as live traffic does.
            let time = T0 + k as f64 * 0.001;
            let value = 20.0 + (k % 1000) as f64 * 0.01;
            self.writer
                .append(device, name, time, ValueRef::Number(value))
                .expect("append");
        }
        self.writer.commit().expect("commit").points
    }
}

fn append(c: &mut Criterion) {
    let mut group = c.benchmark_group("append_commit");
    for records in [64usize, 1024] {
        let mut fixture = Fixture::new(Durability::Os);
        group.throughput(Throughput::Elements(records as u64));
        group.bench_function(format!("os/{records}"), |b| {
            b.iter(|| black_box(fixture.block(records)))
        });
    }
    group.finish();

    let mut group = c.benchmark_group("append_commit_fsync");
    group.sample_size(10);
    let records = 1024usize;
    let mut fixture = Fixture::new(Durability::Fsync);
    group.throughput(Throughput::Elements(records as u64));
    group.bench_function(format!("fsync/{records}"), |b| {
        b.iter_batched(
            || (),
            |()| black_box(fixture.block(records)),
            BatchSize::PerIteration,
        )
    });
    group.finish();
}

criterion_group!(benches, append);
criterion_main!(benches);
