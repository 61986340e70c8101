//! `sluiced`: the sluice ingestion daemon.
//!
//! Exit codes: 0 after a clean shutdown (SIGINT/SIGTERM: drain, commit, exit) or a passed
//! `--check-config`, 1 when start-up or the run fails (the log says why), 2 for a bad command
//! line or configuration.

mod cache;
mod coaps;
mod config;
mod credentials;
mod dashboard;
mod http;
mod io;
mod metrics;
mod notify;
mod overload;
mod peers;
mod retention;
mod shard;
mod steering;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use sluice_storage::{Durability, Store, StoreConfig};

use config::{Config, DurabilityMode, LogFormat, Options, Steering};

/// Worker threads of the HTTP runtime: queries must never take the cores from the shards.
const HTTP_WORKER_THREADS: usize = 2;

fn main() {
    let options = Options::parse();
    let check_only = options.check_config;
    let config = match options.resolve() {
        Ok(config) => config,
        Err(error) => {
            eprintln!("sluiced: {error:#}");
            std::process::exit(2);
        }
    };
    if check_only {
        println!("configuration ok");
        return;
    }
    init_logging(config.log_format);
    if let Err(error) = run(config) {
        // The log goes to stderr: the reason is printed once, in the log's format.
        tracing::error!("{error:#}");
        std::process::exit(1);
    }
}

/// `--steering cpu`: shard `i` is pinned to the `i`th CPU the process may use, and both socket
/// groups hand a datagram to the shard of the CPU that received it. Returns the shards' CPUs.
fn steer_by_cpu(shards: &[shard::Shard]) -> anyhow::Result<Vec<usize>> {
    let allowed =
        steering::allowed_cpus().context("--steering cpu: cannot read the CPU affinity")?;
    if shards.len() > allowed.len() {
        anyhow::bail!(
            "--steering cpu: {} shards but the process may use only {} CPUs ({allowed:?})",
            shards.len(),
            allowed.len()
        );
    }
    let cpus = allowed[..shards.len()].to_vec();
    let first = &shards[0];
    let groups = [
        first.socket.as_ref(),
        first.coaps.as_ref().map(|coaps| &coaps.socket),
    ];
    for socket in groups.into_iter().flatten() {
        steering::steer_by_cpu(socket, &cpus)
            .context("--steering cpu: cannot attach the reuseport BPF program")?;
    }
    tracing::info!(
        ?cpus,
        "CPU steering: shards pinned, datagrams go to the shard of the CPU that received them"
    );
    Ok(cpus)
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SLUICE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn run(mut config: Config) -> anyhow::Result<()> {
    let (store, recovery) = Store::open(StoreConfig {
        dir: config.data_dir.clone(),
        partition_secs: config.partition.as_secs(),
        partition_grace_secs: config.partition_grace.as_secs(),
        durability: match config.durability {
            DurabilityMode::Fsync => Durability::Fsync,
            DurabilityMode::Os => Durability::Os,
        },
    })
    .with_context(|| format!("cannot open data directory {}", config.data_dir.display()))?;
    tracing::info!(data_dir = %config.data_dir.display(), "recovery: {recovery}");
    // Every shard gets every shard's history: with another shard count than before the restart,
    // SO_REUSEPORT may hash a peer to another shard.
    let history = Arc::new(store.take_recovered_exchanges());

    let data_dir = config.data_dir.clone();
    let shards = config.shards;
    let shared_credentials = config.coaps.as_mut().map(|coaps| {
        if credentials::readable_by_others(&coaps.credentials_path) {
            tracing::warn!(file = %coaps.credentials_path.display(), "the credentials file is readable by others: chmod 600 it");
        }
        let removed = coaps::remove_stale_session_files(&data_dir, shards);
        if removed > 0 {
            tracing::warn!(removed, "DTLS session files of another shard count dropped: those devices will handshake again");
        }
        Arc::new(credentials::SharedCredentials::new(std::mem::take(
            &mut coaps.credentials,
        )))
    });

    let (io_backend, fallback) = io::choose(config.io)?;
    if let Some(reason) = fallback {
        tracing::warn!(%reason, "io_uring is not usable here: falling back to recvmmsg");
    }
    let notifier = Arc::new(notify::Notifier::from_env());
    let shutdown = Arc::new(AtomicBool::new(false));
    let mut shards = Vec::with_capacity(config.shards);
    let mut shard_metrics = Vec::with_capacity(config.shards);
    for index in 0..config.shards {
        let socket = match config.coap {
            Some(addr) => {
                let (socket, receive_buffer) =
                    io::bind(addr).with_context(|| format!("cannot bind CoAP on {addr}"))?;
                if index == 0 {
                    tracing::info!(%addr, shards = config.shards, backend = %io_backend.name(), receive_buffer, "CoAP listening");
                }
                Some(socket)
            }
            None => None,
        };
        let coaps = match (&config.coaps, &shared_credentials) {
            (Some(coaps), Some(credentials)) => {
                let (socket, receive_buffer) = io::bind(coaps.addr)
                    .with_context(|| format!("cannot bind CoAPS on {}", coaps.addr))?;
                if index == 0 {
                    let current = credentials.current();
                    tracing::info!(addr = %coaps.addr, shards = config.shards, receive_buffer, devices = current.enabled(), disabled = current.disabled, "CoAPS listening");
                }
                Some(shard::CoapsSetup {
                    socket,
                    credentials: credentials.clone(),
                    session_file: coaps::session_file(&config.data_dir, index, config.shards),
                })
            }
            _ => None,
        };
        let metrics = Arc::new(metrics::ShardMetrics::new());
        shard_metrics.push(metrics.clone());
        shards.push(shard::Shard {
            index,
            socket,
            coaps,
            writer: store.writer(index as u32)?,
            metrics,
            shutdown: shutdown.clone(),
            history: history.clone(),
            overload: config.overload,
            io: io_backend,
        });
    }
    let cpus = match config.steering {
        Steering::Hash => None,
        Steering::Cpu => Some(steer_by_cpu(&shards)?),
    };
    if config.coap.is_none() && config.coaps.is_none() {
        tracing::warn!("plain CoAP is off and CoAPS is not configured: nothing will be ingested");
    }

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(HTTP_WORKER_THREADS)
        .thread_name("sluiced-http")
        .enable_all()
        .build()
        .context("cannot start the HTTP runtime")?;
    // From here on SIGTERM/SIGINT drain; before (during recovery) they end the process at once,
    // with nothing acknowledged yet to lose.
    let mut signals = runtime.block_on(async { Signals::new() })?;
    let state = Arc::new(http::AppState::new(store.reader(), shard_metrics.clone()));
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind(config.http))
        .with_context(|| format!("cannot bind HTTP on {}", config.http))?;
    tracing::info!(addr = %config.http, "HTTP listening");

    let threads: Vec<_> = shards
        .into_iter()
        .map(|shard| {
            let cpu = cpus.as_ref().map(|cpus| cpus[shard.index]);
            std::thread::Builder::new()
                .name(format!("sluiced-shard-{}", shard.index))
                .spawn(move || {
                    if let Some(cpu) = cpu {
                        if let Err(error) = steering::pin_current_thread(cpu) {
                            tracing::warn!(shard = shard.index, cpu, %error, "cannot pin the shard to its CPU");
                        }
                    }
                    shard.run()
                })
        })
        .collect::<Result<_, _>>()
        .context("cannot start shard threads")?;

    drop(history);
    let retention = config
        .retention
        .map(|keep| retention::start(store.retention(), keep, shutdown.clone()))
        .transpose()?;

    let (stop_http, http_stopped) = tokio::sync::oneshot::channel::<()>();
    // No Nagle delay: a streamed answer's last small chunk must not wait for the client's ACK.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        if let Err(error) = tcp.set_nodelay(true) {
            tracing::debug!(%error, "cannot set TCP_NODELAY");
        }
    });
    let server = axum::serve(
        listener,
        http::router(state.clone(), peers::from_config(&config)),
    )
    .with_graceful_shutdown(async {
        let _ = http_stopped.await;
    });
    let server = runtime.spawn(async move { server.await });
    state.ready.store(true, Ordering::Relaxed);
    notifier.send("READY=1\nSTATUS=ready");
    // The shards with sockets are the ones whose loop must keep turning.
    let serving = if config.coap.is_some() || config.coaps.is_some() {
        shard_metrics
    } else {
        Vec::new()
    };
    // The HTTP runtime proves it turns by stamping a heartbeat the watchdog checks.
    let http_heartbeat = Arc::new(std::sync::atomic::AtomicU64::new(metrics::now_ms()));
    let stamp = http_heartbeat.clone();
    runtime.spawn(async move {
        let mut ticks = tokio::time::interval(notify::HTTP_HEARTBEAT);
        loop {
            ticks.tick().await;
            stamp.store(metrics::now_ms(), Ordering::Relaxed);
        }
    });
    let watchdog = notifier.start_watchdog(serving, http_heartbeat)?;
    tracing::info!("ready");

    let reload = || {
        if let (Some(coaps), Some(shared)) = (&config.coaps, &shared_credentials) {
            reload_credentials(&coaps.credentials_path, shared);
        } else {
            tracing::info!("SIGHUP: no --credentials to reload");
        }
    };
    let signal = runtime.block_on(signals.next(&reload));
    // Drain: balancers see 503 and stop sending while everything is still served.
    state.draining.store(true, Ordering::Relaxed);
    notifier.send("STOPPING=1\nSTATUS=draining");
    tracing::info!(signal, drain = %humantime::format_duration(config.drain), "draining: /readyz answers 503, CoAP and queries are still served");
    let cut_short = runtime.block_on(async {
        tokio::select! {
            _ = tokio::time::sleep(config.drain) => None,
            second = signals.next(&reload) => Some(second),
        }
    });
    if let Some(second) = cut_short {
        tracing::info!(signal = second, "second signal: drain cut short");
    }
    tracing::info!("shutting down: shards stop receiving and commit what they hold");
    shutdown.store(true, Ordering::Relaxed);
    for thread in threads {
        if thread.join().is_err() {
            anyhow::bail!("a shard thread panicked");
        }
    }
    drop(watchdog);
    if let Some(retention) = retention {
        retention.stop();
    }
    let _ = stop_http.send(());
    let _ = runtime.block_on(server);
    tracing::info!("stopped");
    Ok(())
}

/// The signals sluiced acts on, watched from start-up to exit (so none is missed between the
/// first SIGTERM and the drain).
struct Signals {
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
    hangup: tokio::signal::unix::Signal,
}

impl Signals {
    /// Needs a tokio runtime.
    fn new() -> anyhow::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            terminate: signal(SignalKind::terminate()).context("cannot watch SIGTERM")?,
            interrupt: signal(SignalKind::interrupt()).context("cannot watch SIGINT")?,
            hangup: signal(SignalKind::hangup()).context("cannot watch SIGHUP")?,
        })
    }

    /// Waits for SIGTERM or SIGINT (returned); calls `reload` on each SIGHUP meanwhile.
    async fn next(&mut self, reload: &impl Fn()) -> &'static str {
        loop {
            tokio::select! {
                _ = self.terminate.recv() => return "SIGTERM",
                _ = self.interrupt.recv() => return "SIGINT",
                _ = self.hangup.recv() => reload(),
            }
        }
    }
}

/// SIGHUP: a valid file replaces the credentials in force; a bad one is refused and logged.
fn reload_credentials(path: &std::path::Path, shared: &credentials::SharedCredentials) {
    match credentials::Credentials::load(path) {
        Ok(new) => {
            if credentials::readable_by_others(path) {
                tracing::warn!(file = %path.display(), "the credentials file is readable by others: chmod 600 it");
            }
            let (added, removed, changed) = credentials::difference(&shared.current(), &new);
            tracing::info!(
                devices = new.enabled(),
                disabled = new.disabled,
                added,
                removed,
                changed,
                "SIGHUP: credentials reloaded"
            );
            shared.replace(new);
        }
        Err(error) => {
            tracing::error!("SIGHUP: credentials not reloaded, the previous ones stay in force: --credentials: {error:#}");
        }
    }
}
