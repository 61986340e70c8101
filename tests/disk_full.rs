//! End to end: a full disk degrades service instead of losing data. On a small tmpfs the test
//! mounts (tests run as root): CONs get 5.03 with Max-Age while commits fail, `/readyz` answers
//! 503, queries are still served, the failure is logged once, and ingestion resumes by itself
//! when space returns.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use coap_lite::{CoapOption, MessageType, RequestType};
use common::{code, request, run, wait_for, Client, Daemon};

const JSON: Option<u16> = Some(110);
/// Size of the test's file system: room for the store's first files, small to fill quickly.
const TMPFS_SIZE: &str = "4m";
/// Requests sent at most while waiting for the disk to be full (each needs at least 48 bytes of
/// a block, so a few pages of leftover room are used up long before this).
const REQUESTS_UNTIL_FULL_MAX: u32 = 20_000;

/// A tmpfs mounted for the test; unmounted (lazily, so a stray open file cannot keep it) on drop.
struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    fn mount(path: &Path) -> Tmpfs {
        std::fs::create_dir_all(path).unwrap();
        let output = run(Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size={TMPFS_SIZE}"))
            .arg("tmpfs")
            .arg(path));
        assert!(
            output.status.success(),
            "this test mounts a tmpfs and must run as root: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        Tmpfs {
            path: path.to_path_buf(),
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

/// Writes zeros to `path` until the file system says it is full.
fn fill(path: &Path) {
    let mut file = std::fs::File::create(path).unwrap();
    let chunk = vec![0u8; 64 * 1024];
    loop {
        match file.write(&chunk) {
            Ok(0) => break,
            Ok(_) => {}
            Err(error) => {
                assert_eq!(error.raw_os_error(), Some(libc::ENOSPC), "{error}");
                break;
            }
        }
    }
}

fn post(client: &mut Client, i: u32) -> coap_lite::Packet {
    let payload = format!(r#"[{{"n":"temp","v":{i},"t":{}}}]"#, 1_763_900_000 + i);
    let packet = request(
        MessageType::Confirmable,
        RequestType::Post,
        client.message_id(),
        "/t/dev-full",
        JSON,
        payload.as_bytes(),
    );
    client.exchange(&packet)
}

#[test]
fn a_full_disk_gets_503_with_max_age_keeps_queries_and_resumes_by_itself() {
    let temp = tempfile::tempdir().unwrap();
    let tmpfs = Tmpfs::mount(&temp.path().join("fs"));
    let data_dir = tmpfs.path.join("data");
    let mut daemon = Daemon::start_in(&data_dir, &[]);
    let mut client = Client::new(daemon.coap);
    for i in 0..10 {
        assert_eq!(code(&post(&mut client, i)), "2.04");
    }

    let filler = tmpfs.path.join("filler");
    fill(&filler);
    let mut i = 10;
    let unavailable = loop {
        assert!(
            i < REQUESTS_UNTIL_FULL_MAX,
            "the disk never turned out full"
        );
        let response = post(&mut client, i);
        i += 1;
        match code(&response).as_str() {
            "2.04" => continue,
            "5.03" => break response,
            other => panic!("unexpected {other}"),
        }
    };
    let acknowledged_before = i - 1;
    let max_age = unavailable
        .get_option(CoapOption::MaxAge)
        .and_then(|values| values.front().cloned())
        .expect("5.03 carries Max-Age");
    assert!(!max_age.is_empty());
    // Still full: more 5.03, and queries are served meanwhile.
    for _ in 0..5 {
        assert_eq!(code(&post(&mut client, i)), "5.03");
        i += 1;
    }
    let points = daemon.points("dev-full", "temp");
    assert_eq!(
        points.len() as u32,
        acknowledged_before,
        "every acknowledged reading is there"
    );
    // Readiness says so, so balancers send elsewhere meanwhile.
    let (status, body) = daemon.get("/readyz");
    assert_eq!(status, 503);
    assert!(body.starts_with("commit failing on shard "), "{body}");
    assert_eq!(daemon.metric("sluice_commit_failing"), 1.0);
    let log = daemon.log_text();
    assert_eq!(
        log.matches("commit failed").count(),
        1,
        "logged once per episode:\n{log}"
    );

    // Space returns: the shard resumes by itself.
    std::fs::remove_file(&filler).unwrap();
    let mut resumed = false;
    wait_for("ingestion to resume", Duration::from_secs(10), || {
        resumed = code(&post(&mut client, i)) == "2.04";
        i += 1;
        resumed
    });
    wait_for("the resume to be logged", Duration::from_secs(5), || {
        daemon.log_text().contains("commits succeed again")
    });
    let points = daemon.points("dev-full", "temp");
    assert_eq!(points.len() as u32, acknowledged_before + 1);
    assert_eq!(daemon.get("/readyz"), (200, "ready\n".to_string()));
    assert_eq!(daemon.metric("sluice_commit_failing"), 0.0);
    let status = daemon.stop();
    assert!(status.success(), "{}", daemon.log_text());
    // Nothing torn or corrupt was left behind.
    let verify = common::sluice(&["verify", "--data-dir", data_dir.to_str().unwrap()]);
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stdout)
    );
}
