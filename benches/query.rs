//! Query benchmark: the TSBS-style questions of issue #5 against the real `sluiced` (release
//! build) on a store of DEVICES devices with POINTS points each (one series `usage`, a reading
//! every 10 s, values 0 to 100).
//!
//! ```sh
//! cargo build --release --locked -p sluice-daemon --bin sluiced
//! cargo bench --bench query -- [DEVICES] [POINTS]      # default 100000 500 (50M points)
//! # sluiced on CPU 1, this client on CPU 0:
//! SLUICE_QUERY_BENCH_SERVER_CPUS=1 taskset -c 0 cargo bench --bench query
//! ```
//!
//! The store is written with the storage crate's own writer (the same format sluiced writes,
//! two shards, 1 h partitions, `--durability os`), kept in `$SLUICE_QUERY_BENCH_DIR` when set
//! (and reused when it already holds the same dataset), else in a temporary directory.
//!
//! The dataset's timestamps are a year old, so a writer with the default grace period (15 min)
//! seals every partition: the questions are asked twice, first of the store as loaded (no
//! partition sealed: every partition laid out as commits wrote it, as the open partitions of a
//! live store are), then after the writers sealed every partition (rewritten series-major,
//! docs/storage-format.md "Sealing"), which is what a store holding a year-old hour looks like.
//! The seals are done the way sluiced does them, by commits (one reading of the current time
//! per shard every 10 ms, whose latency is measured while the sealing threads work).
//! A store already sealed (reused) is only measured sealed. The figures are printed as Markdown
//! tables for benches/RESULTS.md.
//!
//! The fleet-wide aggregate (`/v1/aggregate`: `usage` averaged over every device, the whole
//! range) is measured in process (wall and CPU time, 1 and 2 threads) and through sluiced (its
//! CPU time from /proc), against one `Reader::scan` per device (the baseline).

use std::io::{Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice_storage::{Durability, Store, StoreConfig, ValueRef};

const SHARDS: u32 = 2;
const INTERVAL_S: f64 = 10.0;
/// First reading of every device: a multiple of the 1 h partition.
const T0: f64 = 1_763_856_000.0;
/// Appends per commit while loading (a commit per batch, as sluiced does, only bigger).
const APPENDS_PER_COMMIT: usize = 100_000;
/// Requests per measured question.
const REQUESTS: usize = 200;
/// How long the 304 load runs.
const NOT_MODIFIED_SECONDS: u64 = 5;
/// The daemon's and the sealing writer's grace period: sluiced's default for 1 h partitions.
const GRACE_SECS: u64 = 900;

fn value(device: u64, step: u64) -> f64 {
    // xorshift of (device, step): deterministic, spread over 0..100.
    let mut x = device.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ step.wrapping_add(1);
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    (x % 10_000) as f64 / 100.0
}

fn device_name(device: u64) -> String {
    format!("host-{device}")
}

/// The bench's store in `dir` (1 h partitions, as written), with this grace period and durability.
fn open_store(
    dir: &Path,
    grace_secs: u64,
    durability: Durability,
) -> (Store, sluice_storage::RecoveryReport) {
    Store::open(StoreConfig {
        dir: dir.to_path_buf(),
        partition_secs: 3600,
        partition_grace_secs: grace_secs,
        durability,
    })
    .expect("open store")
}

fn load(dir: &Path, devices: u64, points: u64) {
    let marker = dir.join("bench-dataset");
    let expected = format!("{devices} {points}\n");
    if std::fs::read_to_string(&marker).ok().as_deref() == Some(expected.as_str()) {
        eprintln!("reusing the store in {}", dir.display());
        return;
    }
    let _ = std::fs::remove_dir_all(dir);
    let (store, _) = open_store(dir, u64::MAX, Durability::Os);
    let mut writers: Vec<_> = (0..SHARDS).map(|s| store.writer(s).unwrap()).collect();
    let names: Vec<String> = (0..devices).map(device_name).collect();
    let started = Instant::now();
    let mut pending = 0;
    for step in 0..points {
        let time = T0 + step as f64 * INTERVAL_S;
        for device in 0..devices {
            let writer = &mut writers[(device % SHARDS as u64) as usize];
            writer
                .append(
                    &names[device as usize],
                    "usage",
                    time,
                    ValueRef::Number(value(device, step)),
                )
                .unwrap();
            pending += 1;
            if pending == APPENDS_PER_COMMIT {
                for writer in &mut writers {
                    writer.commit().unwrap();
                }
                pending = 0;
            }
        }
    }
    for writer in &mut writers {
        writer.commit().unwrap();
    }
    let elapsed = started.elapsed().as_secs_f64();
    let total = devices * points;
    eprintln!(
        "loaded {total} points in {elapsed:.1} s ({:.2} M points/s)",
        total as f64 / elapsed / 1e6
    );
    std::fs::write(marker, expected).unwrap();
}

/// End of the dataset's time range: the full scans read `[T0, dataset_end)`, not the current
/// window where `seal` commits its clock readings.
fn dataset_end(points: u64) -> f64 {
    T0 + points as f64 * INTERVAL_S
}

fn sealed_marker(dir: &Path) -> PathBuf {
    dir.join("bench-sealed")
}

/// Commit latencies in ms: (p50, p99, max, commits).
type Latencies = (f64, f64, f64, usize);

fn latency_summary(mut latencies: Vec<f64>) -> Latencies {
    latencies.sort_by(f64::total_cmp);
    let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q) as usize];
    (at(0.5), at(0.99), at(1.0), latencies.len())
}

/// Seals every partition (all of them are due: a year old) the way sluiced does: by committing.
/// Each shard's writer commits one reading of the current time (device `bench-clock-<shard>`,
/// `--durability fsync`) every 10 ms; its seal checks hand the due segments to its sealing thread
/// and rename the finished sealed files into place. Returns (seconds until every partition of the
/// dataset was sealed, commit latencies meanwhile, commit latencies for 3 s after).
fn seal(dir: &Path, points: u64) -> (f64, Latencies, Latencies) {
    let (store, _) = open_store(dir, GRACE_SECS, Durability::Fsync);
    let data_end = ((T0 + points as f64 * INTERVAL_S) / 3600.0).ceil() * 3600.0;
    let reader = store.reader();
    let mut writers: Vec<_> = (0..SHARDS).map(|s| store.writer(s).unwrap()).collect();
    let clocks: Vec<String> = (0..SHARDS).map(|s| format!("bench-clock-{s}")).collect();
    let mut tick = 0u64;
    let mut commit = |writers: &mut Vec<sluice_storage::ShardWriter>, latencies: &mut Vec<f64>| {
        for (writer, clock) in writers.iter_mut().zip(&clocks) {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs_f64();
            tick += 1;
            writer
                .append(clock, "tick", now, ValueRef::Number(tick as f64))
                .unwrap();
            let started = Instant::now();
            writer.commit().unwrap();
            latencies.push(started.elapsed().as_secs_f64() * 1e3);
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let started = Instant::now();
    let mut during = Vec::new();
    while reader.sealed_before() < data_end {
        assert!(
            started.elapsed() < Duration::from_secs(900),
            "sealing did not finish"
        );
        commit(&mut writers, &mut during);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let mut after = Vec::new();
    let quiet = Instant::now();
    while quiet.elapsed() < Duration::from_secs(3) {
        commit(&mut writers, &mut after);
    }
    std::fs::write(sealed_marker(dir), "sealed\n").unwrap();
    (elapsed, latency_summary(during), latency_summary(after))
}

/// CPU seconds of a clock (`CLOCK_THREAD_CPUTIME_ID`, `CLOCK_PROCESS_CPUTIME_ID`).
fn cpu_seconds(clock: libc::clockid_t) -> f64 {
    let mut time = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid clock id and a pointer to a timespec we own.
    let rc = unsafe { libc::clock_gettime(clock, &mut time) };
    assert_eq!(rc, 0, "clock_gettime");
    time.tv_sec as f64 + time.tv_nsec as f64 * 1e-9
}

/// The fleet aggregate of one question, in this process.
struct FleetFigures {
    label: String,
    threads: usize,
    points: u64,
    /// The first round (the store's files mapped but not yet touched by this process), then the
    /// best of the next rounds: wall seconds, and CPU seconds of every thread of the process.
    first_wall: f64,
    first_cpu: f64,
    wall: f64,
    cpu: f64,
}

impl FleetFigures {
    fn row(&self) -> String {
        let per_core = self.points as f64 / self.cpu / 1e6;
        format!(
            "{} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.0} | **{per_core:.0}** |",
            self.label,
            self.threads,
            self.first_wall * 1e3,
            self.first_cpu * 1e3,
            self.wall * 1e3,
            self.cpu * 1e3,
            self.points as f64 / self.wall / 1e6,
        )
    }
}

/// The fleet-wide aggregate (`Reader::fleet` then `FleetScan::aggregate`: what `/v1/aggregate`
/// computes) of `usage` over every device and the whole dataset, in this process, on 1 and 2
/// threads, with buckets of 1 h (a frame or block falls in one bucket: the times are not read)
/// and of 1 min (every point's time is read and bucketed).
fn fleet_rates(store: &Store, devices: u64, points: u64) -> Vec<FleetFigures> {
    let reader = store.reader();
    let mut figures = Vec::new();
    for (step, threads) in [(3600.0, 1), (60.0, 1), (3600.0, 2)] {
        let mut rounds = Vec::new();
        for _ in 0..4 {
            let (wall, cpu) = (Instant::now(), cpu_seconds(libc::CLOCK_PROCESS_CPUTIME_ID));
            let scan = reader.fleet("usage", "").unwrap();
            let answer = scan
                .aggregate(T0, dataset_end(points), step, threads)
                .unwrap();
            let cpu = cpu_seconds(libc::CLOCK_PROCESS_CPUTIME_ID) - cpu;
            assert_eq!(answer.points, devices * points);
            assert_eq!(answer.devices, devices);
            std::hint::black_box(&answer);
            rounds.push((wall.elapsed().as_secs_f64(), cpu));
        }
        let best = rounds[1..]
            .iter()
            .copied()
            .min_by(|a, b| a.0.total_cmp(&b.0))
            .unwrap();
        figures.push(FleetFigures {
            label: format!("avg per {}", if step == 3600.0 { "1 h" } else { "1 min" }),
            threads,
            points: devices * points,
            first_wall: rounds[0].0,
            first_cpu: rounds[0].1,
            wall: best.0,
            cpu: best.1,
        });
    }
    figures
}

/// Full-scan aggregate in this process, one thread: one series over the whole range (of an
/// unsealed store: every record of every block of its shard is looked at). Returns (records
/// looked at, seconds, seconds to open the store, the fleet aggregate's figures).
fn scan_rate(dir: &Path, devices: u64, points: u64) -> (u64, f64, f64, Vec<FleetFigures>) {
    let started = Instant::now();
    let (store, report) = open_store(dir, u64::MAX, Durability::Os);
    let recovery_s = started.elapsed().as_secs_f64();
    eprintln!("in-process open: {report} in {recovery_s:.1} s");
    let reader = store.reader();
    let mut best = f64::INFINITY;
    let mut records = 0;
    for round in 1..4 {
        let started = Instant::now();
        let mut scan = reader
            .scan(&device_name(round), "usage", T0, dataset_end(points))
            .unwrap();
        let (mut sum, mut count) = (0.0, 0u64);
        while let Some(chunk) = scan.next_chunk().unwrap() {
            for (_, value) in chunk {
                if let sluice_storage::Value::Number(n) = value {
                    sum += n;
                    count += 1;
                }
            }
        }
        std::hint::black_box((sum, count));
        best = best.min(started.elapsed().as_secs_f64());
        records = scan.records_scanned();
    }
    (
        records,
        best,
        recovery_s,
        fleet_rates(&store, devices, points),
    )
}

/// Full-scan aggregate of every record: the sum and count of every device's series over the
/// whole range (one `Reader::scan` per device), in this process, one thread. Returns (points,
/// seconds).
fn scan_all_rate(dir: &Path, devices: u64, points: u64) -> (u64, f64) {
    let (store, _) = open_store(dir, u64::MAX, Durability::Os);
    let reader = store.reader();
    let mut best = f64::INFINITY;
    let mut total = 0;
    for _ in 0..2 {
        let started = Instant::now();
        let (mut sum, mut count) = (0.0, 0u64);
        for device in 0..devices {
            let mut scan = reader
                .scan(&device_name(device), "usage", T0, dataset_end(points))
                .unwrap();
            while let Some(chunk) = scan.next_chunk().unwrap() {
                for (_, value) in chunk {
                    if let sluice_storage::Value::Number(n) = value {
                        sum += n;
                        count += 1;
                    }
                }
            }
        }
        std::hint::black_box(sum);
        best = best.min(started.elapsed().as_secs_f64());
        total = count;
    }
    (total, best)
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn sluiced() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let target = exe.ancestors().nth(3).unwrap().to_path_buf();
    let path = target.join("release").join("sluiced");
    assert!(
        path.exists(),
        "{} is missing: cargo build --release -p sluice-daemon --bin sluiced",
        path.display()
    );
    path
}

/// Requests per second `wrk` gets from `url` in NOT_MODIFIED_SECONDS (1 thread, 16
/// keep-alive connections), with an If-None-Match; None when wrk is not installed
/// (`apt-get install wrk`).
fn wrk(url: &str, etag: Option<&str>) -> Option<f64> {
    let mut command = Command::new("wrk");
    command.args(["-t1", "-c16", &format!("-d{NOT_MODIFIED_SECONDS}s")]);
    if let Some(etag) = etag {
        command.args(["-H", &format!("If-None-Match: {etag}")]);
    }
    let output = command.arg(url).output().ok()?;
    let text = String::from_utf8_lossy(&output.stdout);
    let non_2xx_3xx = text.contains("Non-2xx or 3xx responses");
    assert!(!non_2xx_3xx, "wrk saw errors:\n{text}");
    text.lines()
        .find_map(|line| line.strip_prefix("Requests/sec:"))
        .and_then(|rate| rate.trim().parse().ok())
}

/// How a measured request reads its answer; every way receives all of it.
#[derive(Clone, Copy, PartialEq)]
enum Reading {
    /// The body into a buffer sized by its `Content-Length`, then checked as UTF-8.
    Whole,
    /// `ureq`'s `into_string` (8 KiB reads through its buffered reader into a growing
    /// string): how this bench read every answer before it measured the ways apart.
    UreqString,
    /// With `Accept-Encoding: gzip`; the body inflated (flate2) and checked as UTF-8.
    Gzip,
    /// No HTTP library: a request written on a keep-alive `TcpStream`, the answer read with
    /// reads of up to 1 MiB into one reused buffer, the body delimited by its `Content-Length`
    /// (what a client tuned for large answers does); checked as UTF-8 after the clock stopped.
    Raw,
}

/// The client of [`Reading::Raw`].
struct RawClient {
    stream: TcpStream,
    buffer: Vec<u8>,
}

impl RawClient {
    fn connect(base: &str) -> RawClient {
        let stream = TcpStream::connect(base.trim_start_matches("http://")).unwrap();
        stream.set_nodelay(true).unwrap();
        RawClient {
            stream,
            buffer: vec![0; 64 << 20],
        }
    }

    /// GET `path`: (milliseconds from `started` to the end of the headers, the body).
    fn get(&mut self, path: &str, started: Instant) -> (f64, &[u8]) {
        write!(
            self.stream,
            "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        )
        .unwrap();
        let (mut filled, mut headers_ms, mut end) = (0, 0.0, None);
        loop {
            let want = (filled + (1 << 20)).min(self.buffer.len());
            let read = self.stream.read(&mut self.buffer[filled..want]).unwrap();
            assert!(read > 0, "{path}: connection closed");
            filled += read;
            if end.is_none() {
                if let Some(at) = self.buffer[..filled]
                    .windows(4)
                    .position(|w| w == b"\r\n\r\n")
                {
                    headers_ms = started.elapsed().as_secs_f64() * 1e3;
                    let headers = std::str::from_utf8(&self.buffer[..at]).unwrap();
                    assert!(headers.starts_with("HTTP/1.1 200"), "{path}: {headers}");
                    let length: usize = headers
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse().unwrap())
                        })
                        .unwrap_or_else(|| panic!("{path}: no Content-Length"));
                    assert!(
                        at + 4 + length <= self.buffer.len(),
                        "{path}: answer too large"
                    );
                    end = Some((at + 4, at + 4 + length));
                }
            }
            if let Some((body, stop)) = end {
                if filled >= stop {
                    return (headers_ms, &self.buffer[body..stop]);
                }
            }
        }
    }
}

/// One question asked REQUESTS times.
struct Figures {
    median_ms: f64,
    p90_ms: f64,
    /// Median time to the status line and headers.
    headers_ms: f64,
    /// Body bytes of one answer as the application sees it (inflated), and as sent.
    bytes: usize,
    wire_bytes: usize,
}

fn measure(
    agent: &ureq::Agent,
    base: &str,
    reading: Reading,
    path: impl Fn(usize) -> String,
) -> Figures {
    let mut latencies = Vec::with_capacity(REQUESTS);
    let mut to_headers = Vec::with_capacity(REQUESTS);
    let (mut bytes, mut wire_bytes) = (0, 0);
    let mut raw = (reading == Reading::Raw).then(|| RawClient::connect(base));
    for i in 0..REQUESTS {
        let url = format!("{base}{}", path(i));
        let started = Instant::now();
        if let Some(raw) = &mut raw {
            let (headers_ms, body) = raw.get(&path(i), started);
            latencies.push(started.elapsed().as_secs_f64() * 1e3);
            // Checked after the clock stopped: the figure is the answer's delivery.
            std::str::from_utf8(body).expect("answers are UTF-8");
            to_headers.push(headers_ms);
            (bytes, wire_bytes) = (body.len(), body.len());
            continue;
        }
        let mut request = agent.get(&url);
        if reading == Reading::Gzip {
            request = request.set("Accept-Encoding", "gzip");
        }
        let response = request.call().unwrap_or_else(|e| panic!("{url}: {e}"));
        to_headers.push(started.elapsed().as_secs_f64() * 1e3);
        let gzipped = response.header("Content-Encoding") == Some("gzip");
        let length: usize = response
            .header("Content-Length")
            .and_then(|l| l.parse().ok())
            .unwrap_or(0);
        let body = match reading {
            Reading::UreqString => response.into_string().unwrap().into_bytes(),
            Reading::Whole | Reading::Gzip | Reading::Raw => {
                let mut body = Vec::with_capacity(length);
                response.into_reader().read_to_end(&mut body).unwrap();
                body
            }
        };
        wire_bytes = body.len();
        let body = if gzipped {
            let mut inflated = Vec::with_capacity(body.len() * 12);
            flate2::read::GzDecoder::new(&body[..])
                .read_to_end(&mut inflated)
                .unwrap();
            inflated
        } else {
            body
        };
        std::str::from_utf8(&body).expect("answers are UTF-8");
        latencies.push(started.elapsed().as_secs_f64() * 1e3);
        bytes = body.len();
    }
    latencies.sort_by(f64::total_cmp);
    to_headers.sort_by(f64::total_cmp);
    Figures {
        median_ms: latencies[REQUESTS / 2],
        p90_ms: latencies[REQUESTS * 9 / 10],
        headers_ms: to_headers[REQUESTS / 2],
        bytes,
        wire_bytes,
    }
}

fn main() {
    let numbers: Vec<u64> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let devices = numbers.first().copied().unwrap_or(100_000);
    let points = numbers.get(1).copied().unwrap_or(500);
    let temp = tempfile::tempdir().unwrap();
    let dir = std::env::var_os("SLUICE_QUERY_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| temp.path().join("data"));
    load(&dir, devices, points);
    let mut unsealed = None;
    let mut seal_figures = None;
    if !sealed_marker(&dir).exists() {
        let scan = scan_rate(&dir, devices, points);
        unsealed = Some((questions(&dir, devices, points, false), scan));
        seal_figures = Some(seal(&dir, points));
    }
    let scan = scan_rate(&dir, devices, points);
    let all = scan_all_rate(&dir, devices, points);
    let sealed = questions(&dir, devices, points, true);
    println!(
        "\n{devices} devices x {points} points = {} points\n",
        devices * points
    );
    if let Some((seconds, during, after)) = seal_figures {
        println!(
            "sealing every partition through commits (2 shard writers, a commit of one reading per shard every 10 ms, `--durability fsync`): all sealed after {seconds:.1} s"
        );
        for (label, (p50, p99, max, count)) in [("while sealing", during), ("after, 3 s", after)] {
            println!(
                "commit latency {label}: p50 {p50:.2} ms, p99 {p99:.2} ms, max {max:.2} ms ({count} commits)"
            );
        }
        println!();
    }
    let (rows, extra) = &sealed;
    println!("| question | unsealed median ms | unsealed p90 ms | sealed median ms | sealed p90 ms | sealed headers after, median ms | body bytes (as sent) | unsealed / sealed |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for (i, (name, f)) in rows.iter().enumerate() {
        let wire = if f.wire_bytes == f.bytes {
            String::new()
        } else {
            format!(" ({})", f.wire_bytes)
        };
        let (before, ratio) = match &unsealed {
            Some(((before, _), _)) => {
                let b = &before[i].1;
                (
                    format!("{:.3} | {:.3}", b.median_ms, b.p90_ms),
                    format!("{:.1}", b.median_ms / f.median_ms),
                )
            }
            None => (" | ".to_string(), String::new()),
        };
        println!(
            "| {name} | {before} | {:.3} | {:.3} | {:.3} | {}{wire} | {ratio} |",
            f.median_ms, f.p90_ms, f.headers_ms, f.bytes
        );
    }
    if let Some((_, (records, seconds, open_s, _))) = &unsealed {
        println!(
            "\nunsealed: one series, whole range, in process, one thread: {records} records looked at in {seconds:.4} s = {:.1} M records/s (in-process open {open_s:.1} s)",
            *records as f64 / seconds / 1e6
        );
    }
    let (records, seconds, open_s, fleet) = scan;
    println!(
        "sealed: one series, whole range, in process, one thread: {records} records looked at in {:.3} ms (in-process open {open_s:.1} s)",
        seconds * 1e3
    );
    println!(
        "sealed: every device's series, whole range (sum and count of all {} points, one scan per device), in process, one thread: {:.2} s = {:.1} M points/s",
        all.0,
        all.1,
        all.0 as f64 / all.1 / 1e6
    );
    println!("{extra}");
    println!(
        "\nfleet aggregate of `usage` over all {devices} devices, whole range ({} points), in process (`Reader::fleet` + `FleetScan::aggregate`); first round, then best of 3; CPU time of the whole process:\n",
        devices * points
    );
    println!("| store | question | threads | first wall ms | first CPU ms | wall ms | CPU ms | M points/s (wall) | M points/s per core (CPU) |");
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|");
    if let Some((_, (_, _, _, figures))) = &unsealed {
        for f in figures {
            println!("| unsealed | {}", f.row());
        }
    }
    for f in &fleet {
        println!("| sealed | {}", f.row());
    }
    println!(
        "\nbaseline, sealed, one `Reader::scan` per device: {:.1} M points/s; fleet aggregate, 1 thread, 1 h buckets: {:.0} M points/s per core ({:.1}x)",
        all.0 as f64 / all.1 / 1e6,
        fleet[0].points as f64 / fleet[0].cpu / 1e6,
        (fleet[0].points as f64 / fleet[0].cpu) / (all.0 as f64 / all.1)
    );
    if let Some(((_, unsealed_extra), (records, seconds, _, _))) = &unsealed {
        println!(
            "unsealed, one `Reader::scan` per device would look at {records} records per device: {:.0} s for {devices} devices at the one-series rate above",
            seconds * devices as f64
        );
        println!(
            "unsealed: {}",
            unsealed_extra
                .lines()
                .filter(|l| l.contains("aggregate"))
                .collect::<Vec<_>>()
                .join("; ")
        );
    }
}

/// Fleet aggregates computed through sluiced per pass.
const AGGREGATE_REQUESTS: usize = 10;

/// CPU seconds (user and system) a process used so far, from `/proc/<pid>/stat`.
fn process_cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which is in parentheses): state is field 3, utime 14,
    // stime 15.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks / per_second
}

/// A question and its figures.
type Row = (String, Figures);

/// Starts sluiced on the store and asks the questions: (rows, text of the other figures). With
/// `with_304`, also the 304 rates (only asked of the sealed store).
fn questions(dir: &Path, devices: u64, points: u64, with_304: bool) -> (Vec<Row>, String) {
    let port = free_port();
    let started = Instant::now();
    // SLUICE_QUERY_BENCH_SERVER_CPUS: the CPUs sluiced runs on (a `taskset -c` list); run the
    // bench itself under `taskset -c` to place the client.
    let mut command = match std::env::var("SLUICE_QUERY_BENCH_SERVER_CPUS") {
        Ok(cpus) => {
            let mut taskset = Command::new("taskset");
            taskset.args(["-c", &cpus]).arg(sluiced());
            taskset
        }
        Err(_) => Command::new(sluiced()),
    };
    let _daemon = Daemon(
        command
            .arg("--data-dir")
            .arg(dir)
            .args(["--coap", "off", "--shards", "2", "--http"])
            .arg(format!("127.0.0.1:{port}"))
            .arg("--partition-grace")
            .arg(format!("{GRACE_SECS}s"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start sluiced"),
    );
    let base = format!("http://127.0.0.1:{port}");
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(120))
        .build();
    let deadline = Instant::now() + Duration::from_secs(600);
    while agent.get(&format!("{base}/readyz")).call().is_err() {
        assert!(Instant::now() < deadline, "sluiced not ready");
        std::thread::sleep(Duration::from_millis(50));
    }
    let ready_s = started.elapsed().as_secs_f64();

    let end = T0 + points as f64 * INTERVAL_S;
    let device = |i: usize| device_name((i as u64 * 7919) % devices);
    let mut rows: Vec<Row> = Vec::new();
    let latest_cold = {
        let started = Instant::now();
        let body = agent
            .get(&format!("{base}/v1/latest"))
            .call()
            .unwrap()
            .into_string()
            .unwrap();
        (started.elapsed().as_secs_f64() * 1e3, body.len())
    };
    let whole = Reading::Whole;
    rows.push((
        "lastpoint, all devices (`/v1/latest`), cache hit".into(),
        measure(&agent, &base, whole, |_| "/v1/latest".into()),
    ));
    rows.push((
        "lastpoint, all devices, cache hit, read by a plain `TcpStream` (1 MiB reads)".into(),
        measure(&agent, &base, Reading::Raw, |_| "/v1/latest".into()),
    ));
    rows.push((
        "lastpoint, all devices, cache hit, read by ureq's `into_string`".into(),
        measure(&agent, &base, Reading::UreqString, |_| "/v1/latest".into()),
    ));
    rows.push((
        "lastpoint, all devices, cache hit, gzip (inflated by the client)".into(),
        measure(&agent, &base, Reading::Gzip, |_| "/v1/latest".into()),
    ));
    rows.push((
        "lastpoint, one device (`/v1/devices/{d}/latest`)".into(),
        measure(&agent, &base, whole, |i| {
            format!("/v1/devices/{}/latest", device(i))
        }),
    ));
    rows.push((
        "single-groupby-1-1-1: max per 5 min over 1 h, one device, cold".into(),
        measure(&agent, &base, whole, |i| {
            format!(
                "/v1/series?device={}&name=usage&from={}&to={end}&step=5m&agg=max",
                device(i),
                end - 3600.0
            )
        }),
    ));
    rows.push((
        "single-groupby-1-1-1, same query again (cache hit)".into(),
        measure(&agent, &base, whole, |_| {
            format!(
                "/v1/series?device={}&name=usage&from={}&to={end}&step=5m&agg=max",
                device(0),
                end - 3600.0
            )
        }),
    ));
    rows.push((
        "high-cpu-1: points above 90 over 12 h, one device, cold".into(),
        measure(&agent, &base, whole, |i| {
            format!(
                "/v1/series?device={}&name=usage&from={}&to={end}&above=90",
                device(i + 1),
                end - 12.0 * 3600.0
            )
        }),
    ));
    rows.push((
        "last 5 one-minute buckets (avg), one device, cold".into(),
        measure(&agent, &base, whole, |i| {
            format!(
                "/v1/series?device={}&name=usage&from={}&to={end}&step=1m&agg=avg",
                device(i + 2),
                end - 300.0
            )
        }),
    ));

    let fleet = |to: f64| format!("/v1/aggregate?name=usage&step=1h&agg=avg&from={T0}&to={to}");
    rows.push((
        "fleet aggregate, avg per 1 h over every device, whole range, cache hit".into(),
        measure(&agent, &base, whole, |_| fleet(end)),
    ));
    // The fleet aggregate computed: each request misses the result cache (`to` moves by a
    // second past the data's end: the same points), sluiced's CPU time read from /proc.
    let pid = _daemon.0.id();
    let cpu = process_cpu_seconds(pid);
    let mut walls = Vec::new();
    for i in 0..AGGREGATE_REQUESTS {
        let started = Instant::now();
        let body = agent
            .get(&format!("{base}{}", fleet(end + 1.0 + i as f64)))
            .call()
            .unwrap()
            .into_string()
            .unwrap();
        walls.push(started.elapsed().as_secs_f64());
        assert!(
            body.contains(&format!("\"points\":{}", devices * points)),
            "{body}"
        );
    }
    let cpu = (process_cpu_seconds(pid) - cpu) / AGGREGATE_REQUESTS as f64;
    walls.sort_by(f64::total_cmp);
    let wall = walls[walls.len() / 2];
    let total = (devices * points) as f64;
    let mut extra = format!(
        "sluiced ready after {ready_s:.1} s; lastpoint, all devices (`/v1/latest`), first request (cache miss): {:.2} ms, {} bytes",
        latest_cold.0, latest_cold.1
    );
    extra.push_str(&format!(
        "\nfleet aggregate through sluiced (`{}`, {AGGREGATE_REQUESTS} requests missing the result cache): median {:.1} ms (first {:.1} ms, max {:.1} ms) = {:.0} M points/s; sluiced CPU {:.1} ms per request = {:.0} M points/s per core",
        fleet(end),
        wall * 1e3,
        walls[0] * 1e3,
        walls[walls.len() - 1] * 1e3,
        total / wall / 1e6,
        cpu * 1e3,
        total / cpu / 1e6
    ));
    if !with_304 {
        return (rows, extra);
    }
    // 304s: two client threads with keep-alive, If-None-Match of a series answer.
    let path = format!(
        "/v1/series?device={}&name=usage&from={}&to={end}&step=5m&agg=max",
        device(0),
        end - 3600.0
    );
    let etag = agent
        .get(&format!("{base}{path}"))
        .call()
        .unwrap()
        .header("ETag")
        .unwrap()
        .to_string();
    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = (0..2)
        .map(|_| {
            let (stop, answered) = (stop.clone(), answered.clone());
            let (url, etag) = (format!("{base}{path}"), etag.clone());
            std::thread::spawn(move || {
                let agent = ureq::AgentBuilder::new().build();
                while !stop.load(Ordering::Relaxed) {
                    let response = agent.get(&url).set("If-None-Match", &etag).call().unwrap();
                    assert_eq!(response.status(), 304);
                    answered.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(NOT_MODIFIED_SECONDS));
    stop.store(true, Ordering::Relaxed);
    for thread in threads {
        thread.join().unwrap();
    }
    let not_modified_rate = answered.load(Ordering::Relaxed) as f64 / NOT_MODIFIED_SECONDS as f64;
    // The same 304 with wrk (an epoll client in C, far cheaper per request than ureq threads),
    // and /healthz with the same wrk as the floor of the HTTP stack in this run.
    let wrk_not_modified = wrk(&format!("{base}{path}"), Some(&etag));
    let wrk_healthz = wrk(&format!("{base}/healthz"), None);
    extra.push_str(&format!(
        "\n304 answers, 2 keep-alive client threads on the same 2 cores: {not_modified_rate:.0} /s"
    ));
    extra.push_str(&match (wrk_not_modified, wrk_healthz) {
        (Some(not_modified), Some(healthz)) => format!(
            "\n304 answers, wrk -t1 -c16 on the same 2 cores: {not_modified:.0} /s; /healthz with the same wrk: {healthz:.0} /s (304 / healthz = {:.2})",
            not_modified / healthz
        ),
        _ => "\nwrk not installed: no wrk figures (apt-get install wrk)".to_string(),
    });
    (rows, extra)
}
