//! Configuration: every setting is a command-line flag, an environment variable `SLUICE_<FLAG>` and a
//! key of the `--config` TOML file (the flag's name, e.g. `data-dir`). Precedence: flag, then
//! environment, then file, then the built-in default. The file format is documented in
//! `docs/configuration.md`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, ValueEnum};
use serde::Deserialize;

use crate::credentials::Credentials;
use crate::overload::{self, DeviceRate, OverloadConfig};

#[derive(Parser, Debug, Default, Deserialize)]
#[command(
    name = "sluiced",
    version,
    about = "sluice: telemetry ingestion daemon for IoT fleets (CoAP in, HTTP queries out)"
)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Options {
    /// TOML file with any of these settings as keys (e.g. `data-dir = "/var/lib/sluice"`).
    #[arg(long, env = "SLUICE_CONFIG", value_name = "FILE")]
    #[serde(skip)]
    pub config: Option<PathBuf>,

    /// Check the configuration (flags, environment, --config file, --credentials file), print
    /// `configuration ok` and exit 0, or the reason and exit 2; nothing is opened or bound
    #[arg(long)]
    #[serde(skip)]
    pub check_config: bool,

    /// Data directory; one process owns it [default: ./sluice-data]
    #[arg(long, env = "SLUICE_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,

    /// Plain CoAP listen address, or `off` [default: 0.0.0.0:5683]
    #[arg(long, env = "SLUICE_COAP", value_name = "ADDR|off")]
    pub coap: Option<String>,

    /// CoAP over DTLS listen address, active with --credentials [default: 0.0.0.0:5684]
    #[arg(long, env = "SLUICE_COAPS", value_name = "ADDR")]
    pub coaps: Option<SocketAddr>,

    /// Device credentials (TOML, see docs/credentials.md); enables CoAPS
    #[arg(long, env = "SLUICE_CREDENTIALS", value_name = "FILE")]
    pub credentials: Option<PathBuf>,

    /// HTTP query and metrics listen address [default: 127.0.0.1:8683]
    #[arg(long, env = "SLUICE_HTTP", value_name = "ADDR")]
    pub http: Option<SocketAddr>,

    /// Number of shard threads [default: available cores]
    #[arg(long, env = "SLUICE_SHARDS", value_name = "N")]
    pub shards: Option<usize>,

    /// When a CON reading is acknowledged: after fdatasync, or after write(2) [default: fsync]
    #[arg(long, env = "SLUICE_DURABILITY", value_enum)]
    pub durability: Option<DurabilityMode>,

    /// Time window of one storage partition, e.g. 1h, 30m, 1d [default: 1h]
    #[arg(long, env = "SLUICE_PARTITION", value_name = "DURATION")]
    pub partition: Option<String>,

    /// How long after its window ends a partition still takes writes before it is sealed
    /// (immutable, indexed); later readings are still stored, in a late segment [default: a
    /// quarter of --partition]
    #[arg(long, env = "SLUICE_PARTITION_GRACE", value_name = "DURATION")]
    pub partition_grace: Option<String>,

    /// Drop partitions whose window ended longer ago than this, e.g. 30d, or `keep` [default: keep]
    #[arg(long, env = "SLUICE_RETENTION", value_name = "DURATION")]
    pub retention: Option<String>,

    /// How datagrams are spread over the shards: by the kernel's hash of the source address, or
    /// to the shard pinned to the CPU that received them (needs NIC RSS/RPS) [default: hash]
    #[arg(long, env = "SLUICE_STEERING", value_enum)]
    pub steering: Option<Steering>,

    /// After SIGTERM/SIGINT: how long /readyz answers 503 while CoAP, CoAPS and queries are still
    /// served, so balancers stop sending first; then pending readings are committed and the
    /// process exits. A second signal cuts it short. `0s` stops at once [default: 5s]
    #[arg(long, env = "SLUICE_DRAIN", value_name = "DURATION")]
    pub drain: Option<String>,

    /// Socket I/O: `uring` (one io_uring per shard) or `recvmmsg` (poll, recvmmsg, sendmmsg)
    /// [default: uring where the kernel allows it, else recvmmsg]
    #[arg(long, env = "SLUICE_IO", value_enum)]
    pub io: Option<crate::io::Backend>,

    /// Log line format on stderr [default: text]
    #[arg(long, env = "SLUICE_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,

    /// Refuse new requests 5.03 while this many requests of a shard await their commit
    /// (1 to 4096) [default: 4096]
    #[arg(long, env = "SLUICE_SHED_BACKLOG", value_name = "REQUESTS")]
    pub shed_backlog: Option<usize>,

    /// Refuse new requests 5.03 that waited longer than this in the socket queue, e.g. 500ms,
    /// or `off` [default: 500ms]
    #[arg(long, env = "SLUICE_SHED_DELAY", value_name = "DURATION|off")]
    pub shed_delay: Option<String>,

    /// Per-device rate limit (token bucket), e.g. 100/s, 30/min, 600/h, or `off`; over it a
    /// request gets 4.29 Too Many Requests [default: off]
    #[arg(long, env = "SLUICE_DEVICE_RATE", value_name = "RATE|off")]
    pub device_rate: Option<String>,

    /// Requests a device may send at once above --device-rate (the bucket's size)
    /// [default: one second of the rate, at least 10]
    #[arg(long, env = "SLUICE_DEVICE_BURST", value_name = "REQUESTS")]
    pub device_burst: Option<u32>,
    /// Side ports of the nodes that cluster reads (/v1/cluster/...) cover, comma-separated,
    /// e.g. http://10.0.0.11:8683,http://10.0.0.12:8683; list this node too to include its data
    /// (see docs/cluster.md) [default: none, cluster reads off]
    #[arg(
        long,
        env = "SLUICE_PEERS",
        value_name = "URL,...",
        value_delimiter = ','
    )]
    pub peers: Option<Vec<String>>,

    /// How long a peer may take to answer its part of a cluster read before it is left out
    /// (the answer is then marked partial) [default: 5s]
    #[arg(long, env = "SLUICE_PEER_TIMEOUT", value_name = "DURATION")]
    pub peer_timeout: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DurabilityMode {
    Fsync,
    Os,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Steering {
    /// SO_REUSEPORT's hash of the source and destination addresses and ports.
    Hash,
    /// Shards pinned to CPUs; a datagram goes to the shard of the CPU that received it.
    Cpu,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LogFormat {
    Text,
    Json,
}

/// The resolved settings the daemon runs with.
#[derive(Debug)]
pub struct Config {
    pub data_dir: PathBuf,
    pub coap: Option<SocketAddr>,
    pub coaps: Option<Coaps>,
    pub http: SocketAddr,
    pub shards: usize,
    pub durability: DurabilityMode,
    pub partition: Duration,
    /// How long after its window a partition is sealed.
    pub partition_grace: Duration,
    /// Partitions whose window ended longer ago than this are dropped; None keeps everything.
    pub retention: Option<Duration>,
    pub steering: Steering,
    /// How long a shutdown keeps serving with `/readyz` at 503 before it stops receiving.
    pub drain: Duration,
    pub log_format: LogFormat,
    /// `--io`; None: io_uring where the kernel allows it.
    pub io: Option<crate::io::Backend>,
    /// Shedding and rate limiting (docs/overload.md).
    pub overload: OverloadConfig,
    /// Base URLs of the nodes cluster reads cover (empty: cluster reads off).
    pub peers: Vec<String>,
    /// How long each of them may take to answer.
    pub peer_timeout: Duration,
}

/// CoAP over DTLS: where, and who may talk to it.
#[derive(Debug)]
pub struct Coaps {
    pub addr: SocketAddr,
    pub credentials_path: PathBuf,
    /// As read at start-up; SIGHUP reloads from `credentials_path`.
    pub credentials: Credentials,
}

/// Shards beyond this are refused: each costs a thread, sockets and buffers.
pub const SHARDS_MAX: usize = 256;
/// Longest `--drain` accepted: a shutdown must end in a time a service manager can wait for.
pub const DRAIN_MAX: Duration = Duration::from_secs(600);
/// `--drain` when none is given: a few health-check intervals of a typical balancer.
pub const DRAIN_DEFAULT: Duration = Duration::from_secs(5);

impl Options {
    /// Fill what the command line and environment left unset from the config file, then defaults.
    pub fn resolve(mut self) -> anyhow::Result<Config> {
        if let Some(path) = self.config.take() {
            let file = read_file(&path)?;
            self.merge(file);
        }
        let coaps = match (self.credentials.take(), self.coaps) {
            (Some(path), addr) => {
                let credentials = Credentials::load(&path).context("--credentials")?;
                Some(Coaps {
                    addr: addr.unwrap_or_else(|| ([0, 0, 0, 0], 5684).into()),
                    credentials_path: path,
                    credentials,
                })
            }
            (None, Some(_)) => bail!("--coaps: CoAPS needs --credentials FILE"),
            (None, None) => None,
        };
        let coap = match self.coap.as_deref().unwrap_or("0.0.0.0:5683") {
            "off" => None,
            addr => Some(
                addr.parse()
                    .with_context(|| format!("--coap: `{addr}` is not an address or `off`"))?,
            ),
        };
        let shards = match self.shards {
            Some(0) => bail!("--shards: must be at least 1"),
            Some(n) if n > SHARDS_MAX => bail!("--shards: at most {SHARDS_MAX}"),
            Some(n) => n,
            None => std::thread::available_parallelism().map_or(1, |n| n.get()),
        };
        let partition = parse_duration("--partition", self.partition.as_deref().unwrap_or("1h"))?;
        if partition.as_secs() == 0 || partition.subsec_nanos() != 0 {
            bail!("--partition: must be a whole number of seconds, at least 1s");
        }
        let partition_grace = match self.partition_grace.as_deref() {
            None => Duration::from_secs(partition.as_secs() / 4),
            Some(text) => {
                let grace = parse_duration("--partition-grace", text)?;
                if grace.subsec_nanos() != 0 {
                    bail!("--partition-grace: must be a whole number of seconds");
                }
                grace
            }
        };
        let retention = match self.retention.as_deref() {
            None | Some("keep") => None,
            Some(text) => {
                let retention = parse_duration("--retention", text)?;
                if retention.as_secs() == 0 || retention.subsec_nanos() != 0 {
                    bail!("--retention: must be a whole number of seconds, at least 1s, or `keep`");
                }
                Some(retention)
            }
        };
        let drain = match self.drain.as_deref() {
            None => DRAIN_DEFAULT,
            Some(text) => {
                let drain = parse_duration("--drain", text)?;
                if drain > DRAIN_MAX {
                    bail!("--drain: at most {}", humantime::format_duration(DRAIN_MAX));
                }
                drain
            }
        };
        let overload = self.overload()?;
        let peers = self.peers.take().unwrap_or_default();
        let peer_timeout = match self.peer_timeout.as_deref() {
            None => sluice_cluster::NODE_TIMEOUT_DEFAULT,
            Some(text) => {
                let timeout = parse_duration("--peer-timeout", text)?;
                if timeout.is_zero() {
                    bail!("--peer-timeout: must be more than 0");
                }
                timeout
            }
        };
        let peers = if peers.is_empty() {
            peers
        } else {
            // Checked here so a bad list stops the start, not the first read.
            sluice_cluster::Cluster::new(&peers, peer_timeout)
                .map_err(|e| anyhow::anyhow!("--peers: {e}"))?
                .nodes()
                .to_vec()
        };
        Ok(Config {
            overload,
            data_dir: self
                .data_dir
                .unwrap_or_else(|| PathBuf::from("./sluice-data")),
            coap,
            coaps,
            http: self.http.unwrap_or_else(|| ([127, 0, 0, 1], 8683).into()),
            shards,
            durability: self.durability.unwrap_or(DurabilityMode::Fsync),
            partition,
            partition_grace,
            retention,
            steering: self.steering.unwrap_or(Steering::Hash),
            drain,
            log_format: self.log_format.unwrap_or(LogFormat::Text),
            peers,
            peer_timeout,
            io: self.io,
        })
    }

    fn overload(&self) -> anyhow::Result<OverloadConfig> {
        let defaults = OverloadConfig::default();
        let shed_backlog = match self.shed_backlog {
            None => defaults.shed_backlog,
            Some(n) if (1..=overload::SHED_BACKLOG_MAX).contains(&n) => n,
            Some(_) => bail!(
                "--shed-backlog: between 1 and {} requests",
                overload::SHED_BACKLOG_MAX
            ),
        };
        let shed_delay = match self.shed_delay.as_deref() {
            None => defaults.shed_delay,
            Some("off") => None,
            Some(text) => {
                let delay = parse_duration("--shed-delay", text)?;
                if delay.is_zero() {
                    bail!("--shed-delay: must be more than 0, or `off`");
                }
                Some(delay)
            }
        };
        let device_rate = match self.device_rate.as_deref() {
            None | Some("off") => {
                if self.device_burst.is_some() {
                    bail!("--device-burst: needs --device-rate");
                }
                None
            }
            Some(text) => {
                let per_second = overload::parse_rate(text)
                    .map_err(|error| anyhow::anyhow!("--device-rate: `{text}`: {error}"))?;
                let burst = match self.device_burst {
                    Some(0) => bail!("--device-burst: at least 1"),
                    Some(burst) => f64::from(burst),
                    None => per_second.ceil().max(10.0),
                };
                Some(DeviceRate { per_second, burst })
            }
        };
        Ok(OverloadConfig {
            shed_backlog,
            shed_delay,
            device_rate,
        })
    }

    fn merge(&mut self, file: Options) {
        macro_rules! fill {
            ($($field:ident),*) => { $( if self.$field.is_none() { self.$field = file.$field; } )* };
        }
        fill!(
            data_dir,
            coap,
            coaps,
            credentials,
            http,
            shards,
            durability,
            partition,
            partition_grace,
            retention,
            steering,
            drain,
            log_format,
            io,
            shed_backlog,
            shed_delay,
            device_rate,
            device_burst,
            peers,
            peer_timeout
        );
    }
}

fn read_file(path: &Path) -> anyhow::Result<Options> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("--config: cannot read {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("--config: {} is not valid", path.display()))
}

/// Durations as operators write them: `90s`, `30m`, `1h`, `7d`.
pub fn parse_duration(what: &str, text: &str) -> anyhow::Result<Duration> {
    humantime::parse_duration(text)
        .with_context(|| format!("{what}: `{text}` is not a duration such as 30m, 1h or 7d"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(args: &[&str]) -> Options {
        Options::try_parse_from(std::iter::once("sluiced").chain(args.iter().copied())).unwrap()
    }

    #[test]
    fn defaults_follow_the_contract() {
        let config = options(&[]).resolve().unwrap();
        assert_eq!(config.data_dir, PathBuf::from("./sluice-data"));
        assert_eq!(
            config.coap,
            Some("0.0.0.0:5683".parse::<SocketAddr>().unwrap())
        );
        assert_eq!(config.http, "127.0.0.1:8683".parse::<SocketAddr>().unwrap());
        assert_eq!(config.durability, DurabilityMode::Fsync);
        assert_eq!(config.partition, Duration::from_secs(3600));
        assert!(config.shards >= 1);
        assert!(config.coaps.is_none());
    }

    #[test]
    fn credentials_enable_coaps_on_the_default_port() {
        let dir = std::env::temp_dir().join(format!("sluiced-coaps-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("credentials.toml");
        std::fs::write(&file, "[[device]]\nid = \"a\"\nkey = \"k\"\n").unwrap();
        let config = options(&["--credentials", file.to_str().unwrap()])
            .resolve()
            .unwrap();
        let coaps = config.coaps.unwrap();
        assert_eq!(coaps.addr, "0.0.0.0:5684".parse::<SocketAddr>().unwrap());
        assert_eq!(coaps.credentials.enabled(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn command_line_wins_over_file_and_file_over_default() {
        let dir = std::env::temp_dir().join(format!("sluiced-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("sluiced.toml");
        std::fs::write(
            &file,
            "shards = 3\nhttp = \"127.0.0.1:9000\"\ncoap = \"off\"\n",
        )
        .unwrap();
        let config = options(&["--config", file.to_str().unwrap(), "--shards", "5"])
            .resolve()
            .unwrap();
        assert_eq!(config.shards, 5);
        assert_eq!(config.http, "127.0.0.1:9000".parse::<SocketAddr>().unwrap());
        assert_eq!(config.coap, None);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn unknown_config_keys_and_bad_values_are_refused() {
        let dir = std::env::temp_dir().join(format!("sluiced-config-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("sluiced.toml");
        std::fs::write(&file, "shard = 3\n").unwrap();
        let err = options(&["--config", file.to_str().unwrap()])
            .resolve()
            .unwrap_err();
        assert!(format!("{err:#}").contains("unknown field"), "{err:#}");
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(options(&["--partition", "soon"]).resolve().is_err());
        assert!(options(&["--coap", "nowhere"]).resolve().is_err());
        assert!(options(&["--shards", "0"]).resolve().is_err());
        assert!(options(&["--retention", "0s"]).resolve().is_err());
        assert!(options(&["--retention", "forever"]).resolve().is_err());
        assert!(options(&["--coaps", "127.0.0.1:5684"]).resolve().is_err());
        assert!(options(&["--credentials", "/nonexistent/credentials.toml"])
            .resolve()
            .is_err());
    }

    #[test]
    fn partition_grace_defaults_to_a_quarter_of_the_partition() {
        let config = options(&["--partition", "1h"]).resolve().unwrap();
        assert_eq!(config.partition_grace, Duration::from_secs(900));
        let config = options(&["--partition-grace", "2h"]).resolve().unwrap();
        assert_eq!(config.partition_grace, Duration::from_secs(7200));
        assert!(options(&["--partition-grace", "1.5s"]).resolve().is_err());
    }

    #[test]
    fn drain_defaults_to_five_seconds_allows_zero_and_is_bounded() {
        assert_eq!(options(&[]).resolve().unwrap().drain, DRAIN_DEFAULT);
        assert_eq!(
            options(&["--drain", "0s"]).resolve().unwrap().drain,
            Duration::ZERO
        );
        assert_eq!(
            options(&["--drain", "1500ms"]).resolve().unwrap().drain,
            Duration::from_millis(1500)
        );
        assert!(options(&["--drain", "2h"]).resolve().is_err());
        assert!(options(&["--drain", "soon"]).resolve().is_err());
    }

    #[test]
    fn overload_settings_default_and_validate() {
        let config = options(&[]).resolve().unwrap();
        assert_eq!(config.overload, OverloadConfig::default());
        assert_eq!(config.overload.device_rate, None);
        let config = options(&["--device-rate", "100/s", "--shed-delay", "off"])
            .resolve()
            .unwrap();
        assert_eq!(
            config.overload.device_rate,
            Some(DeviceRate {
                per_second: 100.0,
                burst: 100.0
            })
        );
        assert_eq!(config.overload.shed_delay, None);
        let config = options(&["--device-rate", "6/min", "--device-burst", "3"])
            .resolve()
            .unwrap();
        let rate = config.overload.device_rate.unwrap();
        assert_eq!((rate.per_second, rate.burst), (0.1, 3.0));
        assert_eq!(
            options(&["--device-rate", "1/h"])
                .resolve()
                .unwrap()
                .overload
                .device_rate
                .unwrap()
                .burst,
            10.0
        );
        for bad in [
            &["--shed-backlog", "0"][..],
            &["--shed-backlog", "100000"],
            &["--shed-delay", "0s"],
            &["--shed-delay", "soon"],
            &["--device-rate", "lots"],
            &["--device-rate", "10/s", "--device-burst", "0"],
            &["--device-burst", "5"],
        ] {
            assert!(options(bad).resolve().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn peers_are_node_urls_given_once() {
        assert!(options(&[]).resolve().unwrap().peers.is_empty());
        let config = options(&["--peers", "10.0.0.11:8683,http://10.0.0.12:8683/"])
            .resolve()
            .unwrap();
        assert_eq!(
            config.peers,
            ["http://10.0.0.11:8683", "http://10.0.0.12:8683"]
        );
        assert_eq!(config.peer_timeout, Duration::from_secs(5));
        assert!(options(&["--peers", "https://a:1"]).resolve().is_err());
        assert!(options(&["--peers", "a:1,a:1"]).resolve().is_err());
        assert!(options(&["--peer-timeout", "0s"]).resolve().is_err());
    }

    #[test]
    fn retention_is_a_duration_or_keep() {
        assert_eq!(options(&[]).resolve().unwrap().retention, None);
        assert_eq!(
            options(&["--retention", "keep"])
                .resolve()
                .unwrap()
                .retention,
            None
        );
        assert_eq!(
            options(&["--retention", "30d"])
                .resolve()
                .unwrap()
                .retention,
            Some(Duration::from_secs(30 * 86_400))
        );
    }
}
