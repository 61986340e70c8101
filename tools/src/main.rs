//! `sluice`: the companion command line of `sluiced`.
//!
//! Exit codes: 0 on success, 1 on failure (including `verify` finding corruption), 2 for a bad
//! command line, 3 when `query --nodes` printed an answer that lacks a node's part.

mod capture;
mod credentials;
mod dtls;
mod fleet;
mod load;
mod query;
mod replay;
mod sink;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "sluice",
    version,
    about = "Load generation, replay, queries and store inspection for sluiced"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Ask a running sluiced over its HTTP port
    Query(query::QueryArgs),
    /// Drive a CoAP server with a simulated fleet of devices and report what it answered
    Load(load::LoadArgs),
    /// Send the CoAP requests of a pcap or pcapng capture again, one socket per original source
    Replay(replay::ReplayArgs),
    /// Receive UDP datagrams and only count them (the ceiling of the end-to-end benchmark)
    Sink(sink::SinkArgs),
    /// Describe a data directory: partitions, segments, blocks, points, bytes per point
    Inspect {
        /// The data directory of sluiced
        #[arg(long, env = "SLUICE_DATA_DIR", default_value = "./sluice-data")]
        data_dir: PathBuf,
    },
    /// Check every checksum of a data directory; exit 1 on corruption
    Verify {
        /// The data directory of sluiced
        #[arg(long, env = "SLUICE_DATA_DIR", default_value = "./sluice-data")]
        data_dir: PathBuf,
        /// Cut torn tails back to the last valid block (takes the directory's lock)
        #[arg(long)]
        repair: bool,
    },
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Query(args) => match query::run(args) {
            Ok(true) => std::process::exit(query::EXIT_PARTIAL),
            other => other.map(|_| ()),
        },
        Command::Load(args) => load::run(args),
        Command::Replay(args) => replay::run(args),
        Command::Sink(args) => sink::run(args),
        Command::Inspect { data_dir } => sluice_storage::inspect(&data_dir)
            .map(|inspection| print!("{inspection}"))
            .map_err(anyhow::Error::from),
        Command::Verify { data_dir, repair } => match sluice_storage::verify(&data_dir, repair) {
            Ok(report) => {
                println!("{report}");
                if !report.is_clean() {
                    std::process::exit(1);
                }
                Ok(())
            }
            Err(error) => Err(error.into()),
        },
    };
    if let Err(error) = result {
        eprintln!("sluice: {error:#}");
        std::process::exit(1);
    }
}
