//! `--steering cpu`: shards pinned to CPUs, and a datagram handed to the shard of the CPU that
//! received it. On loopback the receiving CPU is the sender's, so a sender pinned to a CPU must
//! reach only that CPU's shard, whatever its source port.

mod common;

use common::{code, Client, Daemon};

/// The CPUs this test process may run on.
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain old data, filled by the kernel.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    assert_eq!(
        unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) },
        0
    );
    (0..libc::CPU_SETSIZE as usize)
        .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
        .collect()
}

fn pin_current_thread(cpu: usize) {
    // SAFETY: as above.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    unsafe { libc::CPU_SET(cpu, &mut set) };
    assert_eq!(
        unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) },
        0
    );
}

/// `sluice_datagrams_received_total` of each shard.
fn received_per_shard(daemon: &Daemon, shards: usize) -> Vec<f64> {
    let (_, body) = daemon.get("/metrics");
    (0..shards)
        .map(|shard| {
            let prefix = format!("sluice_datagrams_received_total{{shard=\"{shard}\"}} ");
            body.lines()
                .find_map(|line| line.strip_prefix(&prefix)?.parse().ok())
                .unwrap_or_else(|| panic!("no {prefix} in /metrics"))
        })
        .collect()
}

#[test]
fn a_sender_pinned_to_a_cpu_reaches_only_the_shard_of_that_cpu() {
    let cpus = allowed_cpus();
    // The harness runs two shards; steering is only observable with a CPU for each.
    let shards = 2;
    assert!(
        cpus.len() >= shards,
        "this test needs two CPUs, the process may use {cpus:?}"
    );
    let daemon = Daemon::start(&["--steering", "cpu"]);
    assert!(
        daemon.log_text().contains("CPU steering"),
        "{}",
        daemon.log_text()
    );
    for (shard, &cpu) in cpus.iter().take(shards).enumerate() {
        let before = received_per_shard(&daemon, shards);
        let coap = daemon.coap;
        std::thread::spawn(move || {
            pin_current_thread(cpu);
            // Several source ports: the kernel's hash alone would spread them over the shards.
            for device in 0..8 {
                let mut client = Client::new(coap);
                let payload = format!(r#"[{{"n":"temp","v":{device}}}]"#);
                let response = client.post(
                    &format!("/t/cpu-{cpu}-{device}"),
                    Some(110),
                    payload.as_bytes(),
                );
                assert_eq!(code(&response), "2.04");
            }
        })
        .join()
        .expect("the pinned sender");
        let after = received_per_shard(&daemon, shards);
        for other in 0..shards {
            let delta = after[other] - before[other];
            if other == shard {
                assert!(delta >= 8.0, "shard {shard} (CPU {cpu}) received {delta}");
            } else {
                assert_eq!(
                    delta, 0.0,
                    "shard {other} received datagrams sent from CPU {cpu}"
                );
            }
        }
    }
    let devices = daemon.get_json("/v1/devices");
    assert_eq!(devices["devices"].as_array().unwrap().len(), 8 * shards);
}

#[test]
fn cpu_steering_with_more_shards_than_cpus_is_refused() {
    let shards = allowed_cpus().len() + 1;
    let temp = tempfile::tempdir().unwrap();
    let output = std::process::Command::new(common::binary("sluiced"))
        .args(["--data-dir", temp.path().join("data").to_str().unwrap()])
        .args(["--coap", "127.0.0.1:0", "--http", "127.0.0.1:0"])
        .args(["--steering", "cpu", "--shards", &shards.to_string()])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--steering cpu"), "{stderr}");
}
