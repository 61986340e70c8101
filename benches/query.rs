//! Query benchmark: the TSBS-style questions of issue #5 against the real `sluiced` (release
//! build) on a store of DEVICES devices with POINTS points each (one series `usage`, a reading
//! every 10 s, values 0 to 100).
//!
//! ```sh
//! cargo build --release --locked -p sluice-daemon --bin sluiced
//! cargo bench --bench query -- [DEVICES] [POINTS]      # default 100000 500 (50M points)
//! ```
//!
//! The store is written with the storage crate's own writer (the same format sluiced writes,
//! two shards, 1 h partitions, `--durability os`), kept in `$SLUICE_QUERY_BENCH_DIR` when set
//! (and reused when it already holds the same dataset), else in a temporary directory.
//! The figures are printed as a Markdown table for benches/RESULTS.md.

use std::io::Read as _;
use std::net::TcpListener;
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

fn load(dir: &Path, devices: u64, points: u64) {
    let marker = dir.join("bench-dataset");
    let expected = format!("{devices} {points}\n");
    if std::fs::read_to_string(&marker).ok().as_deref() == Some(expected.as_str()) {
        eprintln!("reusing the store in {}", dir.display());
        return;
    }
    let _ = std::fs::remove_dir_all(dir);
    let (store, _) = Store::open(StoreConfig {
        dir: dir.to_path_buf(),
        partition_secs: 3600,
        partition_grace_secs: u64::MAX,
        durability: Durability::Os,
    })
    .expect("open store");
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

/// Full-scan aggregate in this process, one thread: every record of every block is looked at.
fn scan_rate(dir: &Path) -> (u64, f64, f64) {
    let started = Instant::now();
    let (store, report) = Store::open(StoreConfig {
        dir: dir.to_path_buf(),
        partition_secs: 3600,
        partition_grace_secs: u64::MAX,
        durability: Durability::Os,
    })
    .expect("open store");
    let recovery_s = started.elapsed().as_secs_f64();
    eprintln!("in-process open: {report} in {recovery_s:.1} s");
    let reader = store.reader();
    let mut best = f64::INFINITY;
    let mut records = 0;
    for round in 0..3 {
        let started = Instant::now();
        let mut scan = reader
            .scan(&device_name(round), "usage", f64::MIN, f64::MAX)
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
    (records, best, recovery_s)
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
    for i in 0..REQUESTS {
        let url = format!("{base}{}", path(i));
        let started = Instant::now();
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
            Reading::Whole | Reading::Gzip => {
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
    let (records, scan_s, open_s) = scan_rate(&dir);

    let port = free_port();
    let started = Instant::now();
    let _daemon = Daemon(
        Command::new(sluiced())
            .arg("--data-dir")
            .arg(&dir)
            .args(["--coap", "off", "--shards", "2", "--http"])
            .arg(format!("127.0.0.1:{port}"))
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
    let mut rows: Vec<(String, Figures)> = Vec::new();
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

    println!(
        "\n{devices} devices x {points} points = {} points; sluiced ready after {ready_s:.1} s (in-process open {open_s:.1} s)\n",
        devices * points
    );
    println!("| question | median ms | p90 ms | headers after, median ms | body bytes (as sent) |");
    println!("|---|---:|---:|---:|---:|");
    println!(
        "| lastpoint, all devices (`/v1/latest`), first request (cache miss) | {:.2} | | | {} |",
        latest_cold.0, latest_cold.1
    );
    for (name, f) in rows {
        let wire = if f.wire_bytes == f.bytes {
            String::new()
        } else {
            format!(" ({})", f.wire_bytes)
        };
        println!(
            "| {name} | {:.3} | {:.3} | {:.3} | {}{wire} |",
            f.median_ms, f.p90_ms, f.headers_ms, f.bytes
        );
    }
    println!(
        "\nfull-scan aggregate (one series, whole range, in process, one thread): {records} records in {:.3} s = {:.1} M records/s",
        scan_s,
        records as f64 / scan_s / 1e6
    );
    println!(
        "304 answers, 2 keep-alive client threads on the same 2 cores: {not_modified_rate:.0} /s"
    );
    match (wrk_not_modified, wrk_healthz) {
        (Some(not_modified), Some(healthz)) => println!(
            "304 answers, wrk -t1 -c16 on the same 2 cores: {not_modified:.0} /s; /healthz with the same wrk: {healthz:.0} /s (304 / healthz = {:.2})",
            not_modified / healthz
        ),
        _ => println!("wrk not installed: no wrk figures (apt-get install wrk)"),
    }
}
