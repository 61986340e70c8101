//! End to end: the dashboard page, loaded by headless Chromium against the real sluiced, draws
//! the points that devices sent; its assets are served under hashed names with long-lived
//! caching. A screenshot is kept under target/test-artifacts/.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{code, tool, Client, Daemon};

/// How long one Chromium run may take (it usually takes 2 to 3 s).
const CHROMIUM_TIMEOUT: Duration = Duration::from_secs(90);

/// Runs headless Chromium on `url` with a fresh profile; kills it after CHROMIUM_TIMEOUT.
fn chromium(profile: &Path, url: &str, extra: &[&str]) -> Output {
    let mut child = Command::new(tool("chromium"))
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--hide-scrollbars",
            // Time for the page's fetches and its first render before the DOM is taken.
            "--virtual-time-budget=3000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(extra)
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start chromium");
    let deadline = Instant::now() + CHROMIUM_TIMEOUT;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("chromium did not finish within {CHROMIUM_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

fn artifacts_dir() -> PathBuf {
    // target/<profile>/ -> target/test-artifacts/
    let dir = common::bin_dir().parent().unwrap().join("test-artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The attribute `name` of the first element whose text contains `marker`.
fn attribute_after(dom: &str, marker: &str, name: &str) -> Option<String> {
    let at = dom.find(marker)?;
    let start = dom[..at].rfind('<')?;
    let end = at + dom[at..].find('>')?;
    let tag = &dom[start..end];
    let key = format!("{name}=\"");
    let value_start = tag.find(&key)? + key.len();
    let value_end = value_start + tag[value_start..].find('"')?;
    Some(tag[value_start..value_end].to_string())
}

#[test]
fn dashboard_in_headless_chromium_charts_the_ingested_points() {
    let daemon = Daemon::start(&[]);
    let mut client = Client::new(daemon.coap);
    // Relative SenML times: the readings fall within the chart's last hour.
    let values = [21.5, 22.5, 20.0, 23.0, 22.0];
    let records: Vec<String> = values
        .iter()
        .enumerate()
        .map(|(i, v)| format!(r#"{{"n":"temp","v":{v},"t":{}}}"#, -600 + 100 * i as i64))
        .collect();
    let payload = format!("[{},{{\"n\":\"state\",\"vs\":\"ok\"}}]", records.join(","));
    assert_eq!(
        code(&client.post("/t/dev-ui", Some(110), payload.as_bytes())),
        "2.04"
    );

    let temp = tempfile::tempdir().unwrap();
    let url = format!("http://{}/?device=dev-ui", daemon.http);
    let output = chromium(&temp.path().join("profile-dom"), &url, &["--dump-dom"]);
    let dom = String::from_utf8_lossy(&output.stdout).to_string();
    assert!(
        dom.contains("data-ready=\"true\""),
        "the page did not finish a refresh:\n{dom}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        attribute_after(&dom, "data-series=\"temp\"", "data-points").as_deref(),
        Some("5"),
        "{dom}"
    );
    let chart_start = dom.find("data-series=\"temp\"").unwrap();
    let chart = &dom[chart_start..chart_start + dom[chart_start..].find("</svg>").unwrap()];
    let mut drawn: Vec<f64> = chart
        .match_indices("data-value=\"")
        .map(|(at, key)| {
            let rest = &chart[at + key.len()..];
            rest[..rest.find('"').unwrap()].parse().unwrap()
        })
        .collect();
    assert_eq!(chart.matches("class=\"point\"").count(), 5, "{chart}");
    drawn.sort_by(f64::total_cmp);
    let mut expected = values.to_vec();
    expected.sort_by(f64::total_cmp);
    assert_eq!(drawn, expected);
    assert!(dom.contains("data-device=\"dev-ui\""), "device list: {dom}");
    // A string series is listed but not drawn.
    assert_eq!(
        attribute_after(&dom, "data-series=\"state\"", "data-points").as_deref(),
        Some("0")
    );

    let screenshot = artifacts_dir().join("dashboard.png");
    let _ = std::fs::remove_file(&screenshot);
    chromium(
        &temp.path().join("profile-shot"),
        &url,
        &[
            "--window-size=1200,900",
            &format!("--screenshot={}", screenshot.display()),
        ],
    );
    let size = std::fs::metadata(&screenshot).map_or(0, |m| m.len());
    assert!(
        size > 10_000,
        "screenshot {} has {size} bytes",
        screenshot.display()
    );
}

#[test]
fn page_and_assets_carry_cache_headers() {
    let daemon = Daemon::start(&[]);
    let base = format!("http://{}", daemon.http);
    let page = ureq::get(&format!("{base}/")).call().unwrap();
    assert_eq!(page.header("Cache-Control"), Some("no-cache"));
    let etag = page.header("ETag").unwrap().to_string();
    assert!(page.content_type().starts_with("text/html"));
    let html = page.into_string().unwrap();
    let again = ureq::get(&format!("{base}/"))
        .set("If-None-Match", &etag)
        .call()
        .unwrap();
    assert_eq!(again.status(), 304);

    let assets: Vec<&str> = html
        .match_indices("/assets/")
        .map(|(at, _)| {
            let rest = &html[at..];
            &rest[..rest.find('"').unwrap()]
        })
        .collect();
    assert_eq!(assets.len(), 2, "{html}");
    for asset in assets {
        // app.<16 hex digits>.js, style.<16 hex digits>.css
        let name = asset.trim_start_matches("/assets/");
        let hash = name.split('.').nth(1).unwrap();
        assert!(
            hash.len() == 16 && hash.chars().all(|c| c.is_ascii_hexdigit()),
            "{name}"
        );
        let response = ureq::get(&format!("{base}{asset}")).call().unwrap();
        assert_eq!(
            response.header("Cache-Control"),
            Some("public, max-age=31536000, immutable")
        );
    }
    match ureq::get(&format!("{base}/assets/app.0000000000000000.js")).call() {
        Err(ureq::Error::Status(404, _)) => {}
        other => panic!("an unknown asset: {other:?}"),
    }
}
