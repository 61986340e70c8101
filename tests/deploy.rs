//! The deploy kit in `deploy/` stays true to the daemon: the Grafana dashboard, the Prometheus
//! alerting rules and docs/operations.md name only metrics a running sluiced exports, the Kubernetes manifests parse
//! and agree with each other and with the drain, the container image's health check works against
//! a real sluiced, and systemd accepts the unit. (The image itself is not built here: no Docker
//! engine on the test machines.)

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{binary, run, Daemon};
use serde_json::Value as Json;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// A tool the test needs: its absence fails the test (CI installs it, see .ci/run).
fn require(tool: &str, probe: &[&str]) {
    let ok = Command::new(tool)
        .args(probe)
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "`{tool} {}` must work for this test (.ci/run installs it)",
        probe.join(" ")
    );
}

/// Every `sluice_…` metric name in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("sluice_") {
        let before = rest[..at].chars().next_back();
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        let identifier = before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
        // `sluice_dtls_…` style prefixes in prose end with `_`: not a name.
        if !identifier && !name.ends_with('_') {
            names.insert(name.to_string());
        }
        rest = &tail[end..];
    }
    names
}

/// The sample names of a Prometheus exposition (summaries with their `_sum` and `_count`).
fn exported(metrics: &str) -> BTreeSet<String> {
    metrics
        .lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .filter_map(|line| line.split(['{', ' ']).next())
        .map(str::to_string)
        .collect()
}

/// A sluiced with CoAPS on, so every family (DTLS ones included) has samples.
fn daemon_with_coaps(temp: &Path) -> Daemon {
    let credentials = temp.join("credentials.toml");
    std::fs::write(&credentials, "[[device]]\nid = \"dev-1\"\nkey = \"k\"\n").unwrap();
    let coaps = format!("127.0.0.1:{}", common::free_port());
    Daemon::start_in(
        &temp.join("data"),
        &[
            "--credentials",
            credentials.to_str().unwrap(),
            "--coaps",
            &coaps,
        ],
    )
}

#[test]
fn the_dashboard_the_alert_rules_and_the_docs_use_only_exported_metrics() {
    let temp = tempfile::tempdir().unwrap();
    let daemon = daemon_with_coaps(temp.path());
    let (status, metrics) = daemon.get("/metrics");
    assert_eq!(status, 200);
    let exported = exported(&metrics);

    let dashboard: Json = serde_json::from_str(&read("deploy/grafana/sluice.json")).unwrap();
    let mut ids = BTreeSet::new();
    let mut used = BTreeSet::new();
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(panels.len() >= 10);
    for panel in panels {
        assert!(
            ids.insert(panel["id"].as_u64().expect("a numeric id")),
            "panel ids are unique"
        );
        let grid = &panel["gridPos"];
        let (x, w) = (grid["x"].as_u64().unwrap(), grid["w"].as_u64().unwrap());
        assert!(x + w <= 24, "{} fits the 24-column grid", panel["title"]);
        if panel["type"] == "row" {
            continue;
        }
        assert_eq!(
            panel["datasource"]["uid"], "${datasource}",
            "{}",
            panel["title"]
        );
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{}", panel["title"]);
        for target in targets {
            used.extend(metric_names(target["expr"].as_str().expect("expr")));
        }
    }
    for wanted in [
        "sluice_points_stored_total",
        "sluice_ack_latency_seconds",
        "sluice_error_responses_total",
        "sluice_dtls_sessions",
        "sluice_commit_errors_total",
        "sluice_commit_failing",
    ] {
        assert!(used.contains(wanted), "the dashboard shows {wanted}");
    }
    let missing: Vec<_> = used.difference(&exported).collect();
    assert!(
        missing.is_empty(),
        "deploy/grafana/sluice.json uses metrics sluiced does not export: {missing:?}"
    );

    // The alerting rules: each has a name and an expression over exported metrics.
    let rules = yaml(&repo("deploy/prometheus/sluice-alerts.yaml"));
    let rules = rules[0]["groups"][0]["rules"].as_array().expect("rules");
    assert!(rules.len() >= 10);
    let mut alerted = BTreeSet::new();
    for rule in rules {
        assert!(rule["alert"].is_string() && rule["labels"]["severity"].is_string());
        alerted.extend(metric_names(rule["expr"].as_str().expect("expr")));
    }
    for wanted in ["sluice_commit_failing", "sluice_error_responses_total"] {
        assert!(alerted.contains(wanted), "an alert watches {wanted}");
    }
    let missing: Vec<_> = alerted.difference(&exported).collect();
    assert!(
        missing.is_empty(),
        "deploy/prometheus/sluice-alerts.yaml uses metrics sluiced does not export: {missing:?}"
    );

    let documented = metric_names(&read("docs/operations.md"));
    assert!(documented.contains("sluice_commit_failing"));
    let missing: Vec<_> = documented.difference(&exported).collect();
    assert!(
        missing.is_empty(),
        "docs/operations.md names metrics sluiced does not export: {missing:?}"
    );
}

/// Every document of the Kubernetes manifests, as JSON (python3's yaml module parses them).
fn manifests() -> Vec<(String, Json)> {
    let dir = repo("deploy/k8s");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    let mut out = Vec::new();
    for file in files {
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        out.extend(yaml(&file).into_iter().map(|doc| (name.clone(), doc)));
    }
    out
}

/// The documents of a YAML file as JSON, parsed by python3's yaml module.
fn yaml(file: &Path) -> Vec<Json> {
    require("python3", &["-c", "import yaml"]);
    let output = run(Command::new("python3")
        .args([
            "-c",
            "import json, sys, yaml; print(json.dumps(list(yaml.safe_load_all(open(sys.argv[1])))))",
        ])
        .arg(file));
    assert!(
        output.status.success(),
        "{} does not parse: {}",
        file.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

fn find<'a>(docs: &'a [(String, Json)], kind: &str, name: &str) -> &'a Json {
    docs.iter()
        .map(|(_, d)| d)
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in deploy/k8s"))
}

/// Seconds of `5s`, `10s`, `30min`, `2m`, `1500ms` (what the deploy files use).
fn seconds(text: &str) -> f64 {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().unwrap_or_else(|_| panic!("`{text}`"));
    match unit {
        "ms" => number / 1000.0,
        "s" | "" => number,
        "m" | "min" => number * 60.0,
        _ => panic!("unit of `{text}`"),
    }
}

/// The value of `key = "…"` in a TOML text.
fn toml_string(text: &str, key: &str) -> String {
    text.lines()
        .find_map(|line| line.trim().strip_prefix(&format!("{key} = ")))
        .unwrap_or_else(|| panic!("no {key}"))
        .trim_matches('"')
        .to_string()
}

#[test]
fn the_kubernetes_manifests_parse_and_agree_with_each_other_and_the_daemon() {
    let docs = manifests();
    let kustomization = find_kind(&docs, "Kustomization");
    for resource in kustomization["resources"].as_array().unwrap() {
        let file = resource.as_str().unwrap();
        assert!(
            repo("deploy/k8s").join(file).is_file(),
            "kustomization names {file}"
        );
    }

    // The ConfigMap's file is a valid sluiced configuration.
    let config = find(&docs, "ConfigMap", "sluiced-config")["data"]["sluiced.toml"]
        .as_str()
        .unwrap()
        .to_string();
    let temp = tempfile::tempdir().unwrap();
    let credentials = temp.path().join("devices.toml");
    std::fs::write(&credentials, "[[device]]\nid = \"meter-1\"\nkey = \"k\"\n").unwrap();
    let credentials_path = toml_string(&config, "credentials");
    let file = temp.path().join("sluiced.toml");
    std::fs::write(
        &file,
        config.replace(&credentials_path, credentials.to_str().unwrap()),
    )
    .unwrap();
    let check = run(Command::new(binary("sluiced"))
        .arg("--config")
        .arg(&file)
        .arg("--check-config")
        .env_clear());
    assert!(
        check.status.success(),
        "the ConfigMap's sluiced.toml: {}",
        String::from_utf8_lossy(&check.stderr)
    );
    let drain = seconds(&toml_string(&config, "drain"));
    let data_dir = toml_string(&config, "data-dir");
    let http_port: u64 = toml_string(&config, "http")
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();

    let set = find(&docs, "StatefulSet", "sluiced");
    let spec = &set["spec"];
    let pod = &spec["template"]["spec"];
    let labels = &spec["template"]["metadata"]["labels"];
    assert_eq!(spec["selector"]["matchLabels"], *labels);
    let grace = pod["terminationGracePeriodSeconds"].as_f64().unwrap();
    assert!(
        grace >= drain + 10.0,
        "terminationGracePeriodSeconds {grace} leaves room after the {drain} s drain"
    );
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    let container = &pod["containers"][0];
    let port = |name: &str| {
        container["ports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .unwrap_or_else(|| panic!("container port {name}"))
            .clone()
    };
    assert_eq!(port("coap")["protocol"], "UDP");
    assert_eq!(port("coaps")["protocol"], "UDP");
    assert_eq!(port("http")["containerPort"].as_u64(), Some(http_port));
    for (probe, path) in [
        ("livenessProbe", "/healthz"),
        ("startupProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
    ] {
        assert_eq!(container[probe]["httpGet"]["path"], path, "{probe}");
        assert_eq!(container[probe]["httpGet"]["port"], "http", "{probe}");
    }
    let readiness = &container["readinessProbe"];
    let noticed = readiness["periodSeconds"].as_f64().unwrap()
        * readiness["failureThreshold"].as_f64().unwrap();
    assert!(
        noticed < drain,
        "the readiness probe notices the drain ({noticed} s) before it ends ({drain} s)"
    );
    // The data directory is a per-pod volume; config and credentials are mounted where the
    // ConfigMap says.
    let mounts = container["volumeMounts"].as_array().unwrap();
    let mount = |name: &str| {
        mounts
            .iter()
            .find(|m| m["name"] == name)
            .unwrap_or_else(|| panic!("volume mount {name}"))["mountPath"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(mount("data"), data_dir);
    assert_eq!(spec["volumeClaimTemplates"][0]["metadata"]["name"], "data");
    assert!(credentials_path.starts_with(&mount("credentials")));
    let args: Vec<&str> = container["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert!(args.contains(&format!("{}/sluiced.toml", mount("config")).as_str()));
    let volumes = pod["volumes"].as_array().unwrap();
    let secret = volumes.iter().find(|v| v["name"] == "credentials").unwrap()["secret"]
        ["secretName"]
        .clone();
    assert_eq!(
        find(&docs, "Secret", secret.as_str().unwrap())["metadata"]["name"],
        secret,
        "secret.example.yaml shows the Secret the pods mount"
    );

    // Services: UDP for the devices, headless for the StatefulSet; both select the pods.
    let udp = find(&docs, "Service", "sluiced-udp");
    let ports: Vec<(u64, &str)> = udp["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["port"].as_u64().unwrap(), p["protocol"].as_str().unwrap()))
        .collect();
    assert_eq!(ports, [(5683, "UDP"), (5684, "UDP")]);
    assert_eq!(udp["spec"]["selector"], *labels);
    let headless = find(&docs, "Service", spec["serviceName"].as_str().unwrap());
    assert_eq!(headless["spec"]["clusterIP"], "None");
    assert_eq!(headless["spec"]["selector"], *labels);
    find_kind(&docs, "PodDisruptionBudget");
}

fn find_kind<'a>(docs: &'a [(String, Json)], kind: &str) -> &'a Json {
    docs.iter()
        .map(|(_, d)| d)
        .find(|d| d["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} in deploy/k8s"))
}

/// The instructions of the Dockerfile's final stage, by keyword (continuation lines joined).
fn dockerfile() -> Vec<(String, String)> {
    let text = read("deploy/Dockerfile");
    let mut instructions = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        current.push_str(line.trim_end_matches('\\'));
        current.push(' ');
        if !line.ends_with('\\') {
            let (keyword, rest) = current.trim().split_once(' ').unwrap();
            instructions.push((keyword.to_uppercase(), rest.trim().to_string()));
            current.clear();
        }
    }
    instructions
}

#[test]
fn the_container_image_is_multi_stage_non_root_and_its_health_check_works() {
    let instructions = dockerfile();
    let all = |keyword: &str| -> Vec<String> {
        instructions
            .iter()
            .filter(|(k, _)| k == keyword)
            .map(|(_, v)| v.clone())
            .collect()
    };
    let froms = all("FROM");
    assert_eq!(
        froms,
        ["rust:1-bookworm AS builder", "debian:bookworm-slim"],
        "builder and runtime stages"
    );
    assert!(all("RUN")
        .iter()
        .any(|r| r.contains("cargo build --release --locked")));
    let user = all("USER");
    assert_eq!(user.len(), 1);
    assert!(!user[0].starts_with("root") && !user[0].starts_with("0"));
    let exposed = all("EXPOSE").join(" ");
    for port in ["5683/udp", "5684/udp", "8683/tcp"] {
        assert!(exposed.contains(port), "EXPOSE {port}");
    }
    let env = all("ENV").join(" ");
    assert!(env.contains("SLUICE_DATA_DIR=/var/lib/sluice"));
    assert!(env.contains("SLUICE_HTTP=0.0.0.0:8683"));
    assert_eq!(all("VOLUME"), [r#"["/var/lib/sluice"]"#]);
    let ignore = read("deploy/Dockerfile.dockerignore");
    assert!(
        ignore.lines().any(|l| l == "target"),
        "target/ stays out of the context"
    );

    // The HEALTHCHECK command, run as Docker would, against a real sluiced.
    let healthcheck = all("HEALTHCHECK");
    assert_eq!(healthcheck.len(), 1);
    let command = &healthcheck[0][healthcheck[0].find("CMD ").expect("CMD") + 4..];
    let argv: Vec<String> = serde_json::from_str(command).expect("exec form");
    let daemon = Daemon::start(&[]);
    let check = |http: &str| {
        Command::new(&argv[0])
            .args(&argv[1..])
            .env("SLUICE_HTTP", http)
            .output()
            .unwrap()
            .status
    };
    assert!(check(&daemon.http.to_string()).success());
    let unused = format!("127.0.0.1:{}", common::free_port());
    assert!(!check(&unused).success(), "fails when nothing answers");
}

#[test]
fn systemd_accepts_the_unit_and_its_timeouts_fit_the_drain() {
    require("systemd-analyze", &["--version"]);
    let unit = read("deploy/sluiced.service");
    for directive in [
        "Type=notify",
        "DynamicUser=yes",
        "StateDirectory=sluice",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "NoNewPrivileges=yes",
        "CapabilityBoundingSet=CAP_NET_BIND_SERVICE",
        "AmbientCapabilities=CAP_NET_BIND_SERVICE",
        "LimitNOFILE=65536",
    ] {
        assert!(unit.lines().any(|l| l == directive), "{directive}");
    }
    let value = |key: &str| {
        unit.lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("{key}"))
            .to_string()
    };
    assert!(
        value("RestrictAddressFamilies").contains("AF_UNIX"),
        "sd_notify"
    );
    let drain = seconds(&toml_string(&read("deploy/sluiced.toml"), "drain"));
    assert!(seconds(&value("TimeoutStopSec")) >= drain + 10.0);
    assert!(seconds(&value("WatchdogSec")) >= 10.0);

    // `systemd-analyze verify`, with ExecStart pointing at the binary under test.
    let temp = tempfile::tempdir().unwrap();
    let path = temp.path().join("sluiced.service");
    std::fs::write(
        &path,
        unit.replace(
            "/usr/local/bin/sluiced",
            binary("sluiced").to_str().unwrap(),
        ),
    )
    .unwrap();
    let output = run(Command::new("systemd-analyze").arg("verify").arg(&path));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() && !stderr.contains("sluiced.service"),
        "systemd-analyze verify: {stderr}"
    );
}
