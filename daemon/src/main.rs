//! `sluiced`: the sluice ingestion daemon.
//!
//! Exit codes: 0 after a clean shutdown (SIGINT/SIGTERM), 1 when start-up or the run fails
//! (the log says why), 2 for a bad command line.

mod config;
mod http;
mod io;
mod metrics;
mod retention;
mod shard;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use clap::Parser;
use sluice_storage::{Durability, Store, StoreConfig};

use config::{Config, DurabilityMode, LogFormat, Options};

/// Worker threads of the HTTP runtime: queries must never take the cores from the shards.
const HTTP_WORKER_THREADS: usize = 2;

fn main() {
    let options = Options::parse();
    let config = match options.resolve() {
        Ok(config) => config,
        Err(error) => {
            eprintln!("sluiced: {error:#}");
            std::process::exit(2);
        }
    };
    init_logging(config.log_format);
    if let Err(error) = run(config) {
        tracing::error!("{error:#}");
        eprintln!("sluiced: {error:#}");
        std::process::exit(1);
    }
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

fn run(config: Config) -> anyhow::Result<()> {
    let (store, recovery) = Store::open(StoreConfig {
        dir: config.data_dir.clone(),
        partition_secs: config.partition.as_secs(),
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

    let shutdown = Arc::new(AtomicBool::new(false));
    let mut shards = Vec::with_capacity(config.shards);
    let mut shard_metrics = Vec::with_capacity(config.shards);
    for index in 0..config.shards {
        let socket = match config.coap {
            Some(addr) => {
                let (socket, receive_buffer) =
                    io::bind(addr).with_context(|| format!("cannot bind CoAP on {addr}"))?;
                if index == 0 {
                    tracing::info!(%addr, shards = config.shards, backend = io::BACKEND, receive_buffer, "CoAP listening");
                }
                Some(socket)
            }
            None => None,
        };
        let metrics = Arc::new(metrics::ShardMetrics::new());
        shard_metrics.push(metrics.clone());
        shards.push(shard::Shard {
            index,
            socket,
            writer: store.writer(index as u32)?,
            metrics,
            shutdown: shutdown.clone(),
            history: history.clone(),
        });
    }
    if config.coap.is_none() {
        tracing::warn!("plain CoAP is off and CoAPS is not configured: nothing will be ingested");
    }

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(HTTP_WORKER_THREADS)
        .thread_name("sluiced-http")
        .enable_all()
        .build()
        .context("cannot start the HTTP runtime")?;
    let state = Arc::new(http::AppState {
        reader: store.reader(),
        shards: shard_metrics,
        ready: AtomicBool::new(false),
        query_latency_us: Mutex::new(metrics::latency_histogram()),
    });
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind(config.http))
        .with_context(|| format!("cannot bind HTTP on {}", config.http))?;
    tracing::info!(addr = %config.http, "HTTP listening");

    let threads: Vec<_> = shards
        .into_iter()
        .map(|shard| {
            std::thread::Builder::new()
                .name(format!("sluiced-shard-{}", shard.index))
                .spawn(move || shard.run())
        })
        .collect::<Result<_, _>>()
        .context("cannot start shard threads")?;

    drop(history);
    let retention = config
        .retention
        .map(|keep| retention::start(store.retention(), keep, shutdown.clone()))
        .transpose()?;

    let (stop_http, http_stopped) = tokio::sync::oneshot::channel::<()>();
    let server = axum::serve(listener, http::router(state.clone())).with_graceful_shutdown(async {
        let _ = http_stopped.await;
    });
    let server = runtime.spawn(async move { server.await });
    state.ready.store(true, Ordering::Relaxed);
    tracing::info!("ready");

    let signal = runtime.block_on(wait_for_signal())?;
    tracing::info!(signal, "shutting down: draining shards");
    state.ready.store(false, Ordering::Relaxed);
    shutdown.store(true, Ordering::Relaxed);
    for thread in threads {
        if thread.join().is_err() {
            anyhow::bail!("a shard thread panicked");
        }
    }
    if let Some(retention) = retention {
        retention.stop();
    }
    let _ = stop_http.send(());
    let _ = runtime.block_on(server);
    tracing::info!("stopped");
    Ok(())
}

async fn wait_for_signal() -> anyhow::Result<&'static str> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
    Ok(tokio::select! {
        _ = terminate.recv() => "SIGTERM",
        _ = interrupt.recv() => "SIGINT",
    })
}
