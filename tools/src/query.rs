//! `sluice query`: devices, latest values and series from a running sluiced.

use std::fmt::Write as _;

use anyhow::{bail, Context};
use clap::{Args, Subcommand, ValueEnum};
use serde_json::Value as Json;

#[derive(Args, Debug)]
pub struct QueryArgs {
    /// HTTP address of sluiced
    #[arg(
        long,
        env = "SLUICE_HTTP",
        default_value = "127.0.0.1:8683",
        global = true
    )]
    http: String,
    /// Output format
    #[arg(long, value_enum, default_value = "table", global = true)]
    format: OutputFormat,
    #[command(subcommand)]
    what: What,
}

#[derive(Subcommand, Debug)]
enum What {
    /// Every device with its last-seen time and point count
    Devices,
    /// The latest value of each series of a device
    Latest { device: String },
    /// Points of one series, raw or in buckets
    Series {
        device: String,
        name: String,
        /// Start (inclusive): unix seconds or RFC 3339
        #[arg(long)]
        from: Option<String>,
        /// End (exclusive): unix seconds or RFC 3339
        #[arg(long)]
        to: Option<String>,
        /// Bucket width, e.g. 60, 5m, 1h (needs --agg)
        #[arg(long, requires = "agg")]
        step: Option<String>,
        /// Aggregate per bucket: avg, min, max, sum, count, last (needs --step)
        #[arg(long, requires = "step")]
        agg: Option<String>,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum OutputFormat {
    Table,
    Json,
    Csv,
}

pub fn run(args: QueryArgs) -> anyhow::Result<()> {
    let base = format!("http://{}", args.http);
    let (path, query): (String, Vec<(&str, String)>) = match &args.what {
        What::Devices => ("/v1/devices".into(), vec![]),
        What::Latest { device } => (format!("/v1/devices/{}/latest", encode(device)), vec![]),
        What::Series {
            device,
            name,
            from,
            to,
            step,
            agg,
        } => {
            let mut query = vec![("device", device.clone()), ("name", name.clone())];
            for (key, value) in [("from", from), ("to", to), ("step", step), ("agg", agg)] {
                if let Some(value) = value {
                    query.push((key, value.clone()));
                }
            }
            ("/v1/series".into(), query)
        }
    };
    let mut request = ureq::get(&format!("{base}{path}"));
    for (key, value) in &query {
        request = request.query(key, value);
    }
    let body = match request.call() {
        Ok(response) => response.into_string().context("reading the answer")?,
        Err(ureq::Error::Status(status, response)) => {
            let text = response.into_string().unwrap_or_default();
            let message = serde_json::from_str::<Json>(&text)
                .ok()
                .and_then(|j| j["error"].as_str().map(str::to_string))
                .unwrap_or(text);
            bail!("{status}: {message}");
        }
        Err(error) => bail!("cannot reach sluiced at {}: {error}", args.http),
    };
    if args.format == OutputFormat::Json {
        println!("{}", body.trim_end());
        return Ok(());
    }
    let json: Json =
        serde_json::from_str(&body).context("sluiced answered something that is not JSON")?;
    let (header, rows) = rows(&args.what, &json);
    match args.format {
        OutputFormat::Csv => print!("{}", csv(&header, rows)),
        _ => print!("{}", table(&header, rows)),
    }
    Ok(())
}

fn encode(segment: &str) -> String {
    segment
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b':' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn time(seconds: &Json) -> String {
    let Some(seconds) = seconds.as_f64() else {
        return seconds.to_string();
    };
    jiff::Timestamp::from_nanosecond((seconds * 1e9) as i128)
        .map(|t| t.to_string())
        .unwrap_or_else(|_| seconds.to_string())
}

fn value(value: &Json) -> String {
    match value {
        Json::String(s) => s.clone(),
        Json::Number(n) => n.as_f64().map_or_else(|| n.to_string(), |f| f.to_string()),
        other => other.to_string(),
    }
}

/// Columns padded to their widest cell.
fn table(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let line = |out: &mut String, cells: Vec<String>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        let _ = writeln!(out, "{}", padded.join("  ").trim_end());
    };
    line(&mut out, header.iter().map(|h| h.to_string()).collect());
    for row in rows {
        line(&mut out, row);
    }
    out
}

fn csv(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let field = |cell: &str| {
        if cell.contains([',', '"', '\n']) {
            format!("\"{}\"", cell.replace('"', "\"\""))
        } else {
            cell.to_string()
        }
    };
    let mut out = header
        .iter()
        .map(|h| h.to_lowercase().replace(' ', "_"))
        .collect::<Vec<_>>()
        .join(",");
    out.push('\n');
    for row in rows {
        out.push_str(&row.iter().map(|c| field(c)).collect::<Vec<_>>().join(","));
        out.push('\n');
    }
    out
}

/// The header and rows of an answer, for table and CSV output.
fn rows(what: &What, json: &Json) -> (Vec<&'static str>, Vec<Vec<String>>) {
    let empty = vec![];
    match what {
        What::Devices => (
            vec!["DEVICE", "LAST SEEN", "POINTS"],
            json["devices"]
                .as_array()
                .unwrap_or(&empty)
                .iter()
                .map(|d| {
                    vec![
                        value(&d["device"]),
                        time(&d["last_seen"]),
                        d["points"].to_string(),
                    ]
                })
                .collect(),
        ),
        What::Latest { .. } => (
            vec!["SERIES", "TIME", "VALUE"],
            json["series"]
                .as_object()
                .map(|m| {
                    m.iter()
                        .map(|(name, p)| vec![name.clone(), time(&p[0]), value(&p[1])])
                        .collect()
                })
                .unwrap_or_default(),
        ),
        What::Series { .. } => (
            vec!["TIME", "VALUE"],
            json["points"]
                .as_array()
                .unwrap_or(&empty)
                .iter()
                .map(|p| vec![time(&p[0]), value(&p[1])])
                .collect(),
        ),
    }
}
