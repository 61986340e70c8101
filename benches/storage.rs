//! Storage benchmarks against the disk they run on, baseline and subject interleaved in one run
//! (the machine is shared and noisy: only ratios within a run mean something).
//!
//! `cargo bench --bench storage [-- PART...]` (parts: `group_commit`, `write_fdatasync`,
//! `recovery`; all by default). Env: `SLUICE_BENCH_DIR` for the directory (default the system
//! temp dir), `SLUICE_BENCH_RECOVERY_MB` for the recovery data (default 1024),
//! `SLUICE_BENCH_ROUNDS` (default 8).
//!
//! 1. **Group commit**: one shard writer in `fsync` mode appends batches of 64 (and 1024) sensor
//!    readings and commits each batch; the baseline is a plain `pwrite` + `fdatasync` loop that
//!    appends the same bytes per commit to a file on the same file system. Rounds alternate.
//! 2. **Append vs overwrite**: `pwrite` + `fdatasync` of commit-sized writes (2-16 KiB) that grow
//!    the file, against the same writes into space that was zero-filled ahead (1 MiB chunks
//!    written as the write position approaches them, included in the measured loop), and into
//!    `fallocate`d (unwritten) space.
//! 3. **Recovery**: ~1 GiB of segments written in `os` mode, then `Store::open`, with the page
//!    cache warm and cold (the segment files' pages evicted with `posix_fadvise(DONTNEED)`),
//!    against a plain sequential read of the same files, cold.
//! 4. **Bytes per point** of the sensor data (`inspect`).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sluice_storage::{Durability, ShardWriter, Store, StoreConfig, ValueRef};

#[path = "common/names.rs"]
mod names;
use names::NAMES;

/// Start of the readings' times (unix seconds).
const T0: f64 = 1_763_900_000.0;
const DEVICES: usize = 100;
/// Commits per group-commit round (subject and baseline alternate within a round; a round gives
/// one ratio, so the spread over rounds shows the noise).
const COMMITS_PER_ROUND: usize = 300;
/// Writes per variant per append/overwrite round (same reasoning).
const WRITES_PER_ROUND: usize = 200;
/// Zero-filled space kept ahead of the write position in the overwrite variant.
const ZERO_CHUNK_BYTES: u64 = 1 << 20;

fn main() {
    // `cargo bench --bench storage -- [group_commit|write_fdatasync|recovery]...` runs only
    // the named parts (`cargo bench` itself passes `--bench`).
    let parts: Vec<String> = std::env::args()
        .skip(1)
        .filter(|arg| !arg.starts_with("--"))
        .collect();
    let run = |part: &str| parts.is_empty() || parts.iter().any(|name| name == part);
    let base = std::env::var_os("SLUICE_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let rounds: usize = env_number("SLUICE_BENCH_ROUNDS", 8);
    let recovery_mb: u64 = env_number("SLUICE_BENCH_RECOVERY_MB", 1024);
    let dir = tempfile::Builder::new()
        .prefix("sluice-bench-storage-")
        .tempdir_in(&base)
        .expect("tempdir");
    println!("# storage bench in {}", dir.path().display());

    if run("group_commit") {
        for records in [64usize, 1024] {
            group_commit(dir.path(), records, rounds);
        }
    }
    if run("write_fdatasync") {
        for size in [2048usize, 4096, 8192, 16384] {
            append_vs_overwrite(dir.path(), size, rounds);
        }
    }
    if run("recovery") {
        recovery(dir.path(), recovery_mb, rounds.min(3));
    }
}

fn env_number<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or(default)
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

struct Sensors {
    devices: Vec<String>,
    next: u64,
}

impl Sensors {
    fn new() -> Sensors {
        Sensors {
            devices: (0..DEVICES).map(|i| format!("load-{i:04}")).collect(),
            next: 0,
        }
    }

    /// Appends `records` readings as `sluice load` sends them (100 devices x 8 series, numbers,
    /// ~1000 readings per simulated second) and commits; returns the commit's bytes.
    fn commit(&mut self, writer: &mut ShardWriter, records: usize) -> u64 {
        for _ in 0..records {
            let k = self.next;
            self.next += 1;
            let device = &self.devices[(k as usize / NAMES.len()) % DEVICES];
            let name = NAMES[k as usize % NAMES.len()];
            let time = T0 + k as f64 * 0.001;
            let value = 20.0 + (k % 1000) as f64 * 0.01;
            writer
                .append(device, name, time, ValueRef::Number(value))
                .expect("append");
        }
        writer.commit().expect("commit").bytes
    }
}

fn open_store(dir: &Path, durability: Durability) -> Store {
    Store::open(StoreConfig {
        dir: dir.to_path_buf(),
        partition_secs: 3600,
        // Sealing is not under test here: partitions never become due.
        partition_grace_secs: u64::MAX,
        durability,
    })
    .expect("open store")
    .0
}

fn open_file(path: &Path) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .expect("open file")
}

/// Part 1: group commit vs a plain write+fdatasync loop of the same bytes per commit, alternating
/// commit by commit so both see the same disk and CPU load.
fn group_commit(base: &Path, records: usize, rounds: usize) {
    let store_dir = base.join(format!("group-{records}"));
    let store = open_store(&store_dir, Durability::Fsync);
    let mut writer = store.writer(0).expect("writer");
    let mut sensors = Sensors::new();
    // Intern every series once: the measured commits are the steady state (no dictionary sync).
    sensors.commit(&mut writer, DEVICES * NAMES.len());
    let baseline_path = base.join(format!("baseline-{records}"));
    let baseline_file = open_file(&baseline_path);
    let mut baseline_len = 0u64;
    let buffer = vec![0x5Au8; 1 << 20];

    let (mut subject_total, mut baseline_total) = (Duration::ZERO, Duration::ZERO);
    let mut bytes_total = 0u64;
    let mut ratios = Vec::new();
    let mut subject_latencies_us = Vec::new();
    let mut baseline_latencies_us = Vec::new();
    for _ in 0..rounds {
        let (mut subject_round, mut baseline_round) = (Duration::ZERO, Duration::ZERO);
        for _ in 0..COMMITS_PER_ROUND {
            let start = Instant::now();
            let bytes = sensors.commit(&mut writer, records);
            let subject = start.elapsed();
            let start = Instant::now();
            baseline_file
                .write_all_at(&buffer[..bytes as usize], baseline_len)
                .expect("write");
            baseline_file.sync_data().expect("fdatasync");
            let baseline = start.elapsed();
            baseline_len += bytes;
            bytes_total += bytes;
            subject_round += subject;
            baseline_round += baseline;
            subject_latencies_us.push(subject.as_secs_f64() * 1e6);
            baseline_latencies_us.push(baseline.as_secs_f64() * 1e6);
        }
        // Same bytes: throughput ratio = inverse time ratio.
        ratios.push(baseline_round.as_secs_f64() / subject_round.as_secs_f64());
        subject_total += subject_round;
        baseline_total += baseline_round;
    }
    let commits = (rounds * COMMITS_PER_ROUND) as f64;
    let commits_per_s = commits / subject_total.as_secs_f64();
    // Each commit of this bench writes one segment (one partition): one fdatasync per commit.
    println!(
        "group_commit records_per_commit={records} bytes_per_commit={:.0} \
         records_per_s={:.0} fdatasync_per_s={:.0} records_per_fdatasync={records} \
         MB_per_s={:.2} baseline_MB_per_s={:.2} baseline_fdatasync_per_s={:.0} \
         commit_us_p50={:.0} baseline_us_p50={:.0} ratio_total={:.3} ratio_median={:.3} ratios={}",
        bytes_total as f64 / commits,
        commits_per_s * records as f64,
        commits_per_s,
        bytes_total as f64 / subject_total.as_secs_f64() / 1e6,
        bytes_total as f64 / baseline_total.as_secs_f64() / 1e6,
        commits / baseline_total.as_secs_f64(),
        median(&mut subject_latencies_us),
        median(&mut baseline_latencies_us),
        baseline_total.as_secs_f64() / subject_total.as_secs_f64(),
        median(&mut ratios.clone()),
        format_list(&ratios),
    );
    drop(writer);
    drop(store);
    let _ = std::fs::remove_dir_all(&store_dir);
    let _ = std::fs::remove_file(&baseline_path);
}

fn format_list(values: &[f64]) -> String {
    values
        .iter()
        .map(|value| format!("{value:.2}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// How the file space a write goes to was made.
#[derive(Clone, Copy, Debug)]
enum Space {
    /// Past the end of the file: the write grows it.
    Append,
    /// Zeros written (and synced with the commit that wrote them) ahead of the position.
    ZeroFilled,
    /// `fallocate` ahead of the position: allocated, unwritten extents.
    Fallocated,
}

struct SpaceFile {
    file: File,
    space: Space,
    position: u64,
    /// End of the zero-filled or fallocated space.
    prepared: u64,
}

impl SpaceFile {
    fn new(path: &Path, space: Space) -> SpaceFile {
        SpaceFile {
            file: open_file(path),
            space,
            position: 0,
            prepared: 0,
        }
    }

    /// One commit: prepare space if needed, write, fdatasync.
    fn commit(&mut self, buffer: &[u8], zeros: &[u8]) {
        let end = self.position + buffer.len() as u64;
        while end > self.prepared {
            match self.space {
                Space::Append => break,
                Space::ZeroFilled => {
                    self.file
                        .write_all_at(zeros, self.prepared)
                        .expect("write zeros");
                }
                Space::Fallocated => {
                    // SAFETY: plain syscall on an open descriptor.
                    let result = unsafe {
                        libc::fallocate(
                            self.file.as_raw_fd(),
                            0,
                            self.prepared as libc::off_t,
                            ZERO_CHUNK_BYTES as libc::off_t,
                        )
                    };
                    assert_eq!(result, 0, "fallocate");
                }
            }
            self.prepared += ZERO_CHUNK_BYTES;
        }
        self.file
            .write_all_at(buffer, self.position)
            .expect("write");
        self.file.sync_data().expect("fdatasync");
        self.position = end;
    }
}

/// Part 2: commit-sized writes + fdatasync: growing the file vs overwriting prepared space,
/// alternating write by write so every variant sees the same disk load.
fn append_vs_overwrite(base: &Path, size: usize, rounds: usize) {
    let buffer = vec![0x5Au8; size];
    let zeros = vec![0u8; ZERO_CHUNK_BYTES as usize];
    let spaces = [Space::Append, Space::ZeroFilled, Space::Fallocated];
    let mut files: Vec<SpaceFile> = spaces
        .iter()
        .map(|space| SpaceFile::new(&base.join(format!("space-{space:?}-{size}")), *space))
        .collect();
    let mut latencies_us: Vec<Vec<f64>> = vec![Vec::new(); spaces.len()];
    let mut ratios: Vec<Vec<f64>> = vec![Vec::new(); spaces.len()];
    for _ in 0..rounds {
        let mut totals = vec![Duration::ZERO; spaces.len()];
        for _ in 0..WRITES_PER_ROUND {
            for (index, file) in files.iter_mut().enumerate() {
                let start = Instant::now();
                file.commit(&buffer, &zeros);
                let elapsed = start.elapsed();
                totals[index] += elapsed;
                latencies_us[index].push(elapsed.as_secs_f64() * 1e6);
            }
        }
        for (index, total) in totals.iter().enumerate() {
            // Throughput relative to appending: append time / this time.
            ratios[index].push(totals[0].as_secs_f64() / total.as_secs_f64());
        }
    }
    for (index, space) in spaces.iter().enumerate() {
        println!(
            "write_fdatasync bytes={size} space={space:?} us_p50={:.0} \
             speedup_vs_append_median={:.2} speedups={}",
            median(&mut latencies_us[index]),
            median(&mut ratios[index].clone()),
            format_list(&ratios[index]),
        );
    }
    for space in spaces {
        let _ = std::fs::remove_file(base.join(format!("space-{space:?}-{size}")));
    }
}

/// Evicts a file's pages from the page cache (they must be clean: synced first).
fn evict(path: &Path) {
    let file = File::open(path).expect("open");
    file.sync_data().expect("fdatasync");
    // SAFETY: plain syscall on an open descriptor.
    let result = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(result, 0, "posix_fadvise");
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("read_dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                stack.push(path);
            } else {
                files.push(path);
            }
        }
    }
    files
}

/// Reads every file sequentially (1 MiB reads); returns the bytes read.
fn read_all(files: &[PathBuf]) -> u64 {
    let mut buffer = vec![0u8; 1 << 20];
    let mut total = 0u64;
    for path in files {
        let file = File::open(path).expect("open");
        let mut offset = 0u64;
        loop {
            let read = file.read_at(&mut buffer, offset).expect("read");
            if read == 0 {
                break;
            }
            offset += read as u64;
        }
        total += offset;
    }
    total
}

/// Parts 3 and 4: recovery time per GB and bytes per point.
fn recovery(base: &Path, megabytes: u64, rounds: usize) {
    let store_dir = base.join("recovery");
    let target_bytes = megabytes << 20;
    let start = Instant::now();
    {
        let store = open_store(&store_dir, Durability::Os);
        let mut writer = store.writer(0).expect("writer");
        let mut sensors = Sensors::new();
        let mut written = 0u64;
        while written < target_bytes {
            written += sensors.commit(&mut writer, 8192);
        }
    }
    let generate = start.elapsed();
    let inspection = sluice_storage::inspect(&store_dir).expect("inspect");
    let bytes = inspection.bytes();
    let points = inspection.points();
    let gigabytes = bytes as f64 / (1u64 << 30) as f64;
    println!(
        "data bytes={bytes} points={points} segments={} bytes_per_point={:.2} generate_s={:.1}",
        inspection.segments.len(),
        bytes as f64 / points as f64,
        generate.as_secs_f64(),
    );
    let files = files_under(&store_dir);
    let mut cold_open = Vec::new();
    let mut warm_open = Vec::new();
    let mut warm_open_cpu = Vec::new();
    let mut cold_read = Vec::new();
    let mut ratios = Vec::new();
    for _ in 0..rounds {
        files.iter().for_each(|path| evict(path));
        let start = Instant::now();
        read_all(&files);
        let read = start.elapsed();
        files.iter().for_each(|path| evict(path));
        let (cold, _) = timed_open(&store_dir, points);
        let (warm, warm_cpu) = timed_open(&store_dir, points);
        warm_open_cpu.push(warm_cpu.as_secs_f64() / gigabytes);
        cold_read.push(read.as_secs_f64() / gigabytes);
        cold_open.push(cold.as_secs_f64() / gigabytes);
        warm_open.push(warm.as_secs_f64() / gigabytes);
        ratios.push(cold.as_secs_f64() / read.as_secs_f64());
    }
    println!(
        "recovery open_cold_s_per_GB_median={:.2} open_warm_s_per_GB_median={:.2} \
         open_warm_cpu_s_per_GB_median={:.2} \
         sequential_read_cold_s_per_GB_median={:.2} open_cold_over_read_median={:.2} \
         cold={} warm={} read={}",
        median(&mut cold_open.clone()),
        median(&mut warm_open.clone()),
        median(&mut warm_open_cpu.clone()),
        median(&mut cold_read.clone()),
        median(&mut ratios.clone()),
        format_list(&cold_open),
        format_list(&warm_open),
        format_list(&cold_read),
    );
    let _ = std::fs::remove_dir_all(&store_dir);
}

/// CPU time (user + system) of the calling thread.
fn thread_cpu() -> Duration {
    // SAFETY: getrusage writes into the struct it is given.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_THREAD, &mut usage);
        usage
    };
    let micros = |time: libc::timeval| time.tv_sec as u64 * 1_000_000 + time.tv_usec as u64;
    Duration::from_micros(micros(usage.ru_utime) + micros(usage.ru_stime))
}

/// Opens the store; returns (wall time, CPU time of this thread).
fn timed_open(dir: &Path, points: u64) -> (Duration, Duration) {
    let cpu = thread_cpu();
    let start = Instant::now();
    let (store, report) = Store::open(StoreConfig {
        dir: dir.to_path_buf(),
        partition_secs: 3600,
        // Sealing is not under test here: partitions never become due.
        partition_grace_secs: u64::MAX,
        durability: Durability::Os,
    })
    .expect("open store");
    let elapsed = start.elapsed();
    let cpu = thread_cpu() - cpu;
    assert_eq!(report.points, points, "recovered every point");
    drop(store);
    (elapsed, cpu)
}
