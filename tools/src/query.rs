//! `sluice query`: devices, latest values and series from a running sluiced, or merged over
//! several nodes (`--nodes`, with the same merge as a node's `/v1/cluster/...` endpoints:
//! `sluice_cluster`).

use std::fmt::Write as _;

use anyhow::{bail, Context};
use clap::{Args, Subcommand, ValueEnum};
use serde_json::{json, Value as Json};

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
    /// Ask these nodes (side ports, comma-separated, e.g. 10.0.0.11:8683,10.0.0.12:8683) and
    /// merge their answers instead of asking --http; a node that does not answer is named on
    /// stderr and the exit status is 3
    #[arg(long, value_delimiter = ',', global = true)]
    nodes: Option<Vec<String>>,
    /// With --nodes: how long one node may take to answer, e.g. 5s, 500ms
    #[arg(long, default_value = "5s", global = true)]
    timeout: String,
    /// Output format
    #[arg(long, value_enum, default_value = "table", global = true)]
    format: OutputFormat,
    #[command(subcommand)]
    what: What,
}

#[derive(Subcommand, Debug)]
enum What {
    /// Every device with its last-seen time and point count
    Devices {
        /// Only devices whose id starts with this
        #[arg(long)]
        prefix: Option<String>,
    },
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
        /// Draw the numeric values as a chart in the terminal instead of a table
        #[arg(long, conflicts_with = "format")]
        chart: bool,
        /// Width of the chart in columns (default: $COLUMNS, else 80)
        #[arg(long, requires = "chart")]
        width: Option<usize>,
    },
    /// One series name aggregated over every device (or those whose id starts with --prefix),
    /// in buckets
    Aggregate {
        name: String,
        /// Bucket width, e.g. 60, 5m, 1h
        #[arg(long)]
        step: String,
        /// Aggregate per bucket: avg, min, max, sum, count
        #[arg(long)]
        agg: String,
        /// Only devices whose id starts with this
        #[arg(long)]
        prefix: Option<String>,
        /// Start (inclusive): unix seconds or RFC 3339
        #[arg(long)]
        from: Option<String>,
        /// End (exclusive): unix seconds or RFC 3339
        #[arg(long)]
        to: Option<String>,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum OutputFormat {
    Table,
    Json,
    Csv,
}

/// Exit status when a `--nodes` answer was printed but lacks a node's part.
pub const EXIT_PARTIAL: i32 = 3;

/// Runs the query; Ok(true) when the answer is partial (a node of `--nodes` did not answer).
pub fn run(args: QueryArgs) -> anyhow::Result<bool> {
    let (path, query): (String, Vec<(&str, String)>) = match &args.what {
        What::Devices { prefix } => (
            "/v1/devices".into(),
            prefix
                .iter()
                .map(|prefix| ("prefix", prefix.clone()))
                .collect(),
        ),
        What::Latest { device } => (format!("/v1/devices/{}/latest", encode(device)), vec![]),
        What::Series {
            device,
            name,
            from,
            to,
            step,
            agg,
            ..
        } => {
            let mut query = vec![("device", device.clone()), ("name", name.clone())];
            for (key, value) in [("from", from), ("to", to), ("step", step), ("agg", agg)] {
                if let Some(value) = value {
                    query.push((key, value.clone()));
                }
            }
            ("/v1/series".into(), query)
        }
        What::Aggregate {
            name,
            step,
            agg,
            prefix,
            from,
            to,
        } => {
            let mut query = vec![
                ("name", name.clone()),
                ("step", step.clone()),
                ("agg", agg.clone()),
            ];
            for (key, value) in [("prefix", prefix), ("from", from), ("to", to)] {
                if let Some(value) = value {
                    query.push((key, value.clone()));
                }
            }
            ("/v1/aggregate".into(), query)
        }
    };
    let (body, partial) = match &args.nodes {
        Some(nodes) => ask_nodes(nodes, &args, query)?,
        None => (ask_node(&args.http, &path, &query)?, false),
    };
    print_answer(&args, &body)?;
    Ok(partial)
}

/// The body of a query to one node.
fn ask_node(http: &str, path: &str, query: &[(&str, String)]) -> anyhow::Result<String> {
    let mut request = ureq::get(&format!("http://{http}{path}"));
    for (key, value) in query {
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
        Err(error) => bail!("cannot reach sluiced at {http}: {error}"),
    };
    Ok(body)
}

/// The merged answer of several nodes, and whether it is partial (each missing node is named on
/// stderr).
fn ask_nodes(
    nodes: &[String],
    args: &QueryArgs,
    query: Vec<(&str, String)>,
) -> anyhow::Result<(String, bool)> {
    let timeout = humantime::parse_duration(&args.timeout)
        .ok()
        .filter(|t| !t.is_zero())
        .with_context(|| format!("--timeout: `{}` is not a duration such as 5s", args.timeout))?;
    let cluster = sluice_cluster::Cluster::new(nodes, timeout)
        .map_err(|e| anyhow::anyhow!("--nodes: {e}"))?;
    let query: Vec<(String, String)> = query
        .into_iter()
        .map(|(key, value)| (key.to_string(), value))
        .collect();
    let result = match &args.what {
        What::Devices { .. } => cluster.devices(&query),
        What::Latest { device } => cluster.device_latest(device),
        What::Series { .. } => cluster.series(&query),
        What::Aggregate { .. } => {
            bail!("--nodes: `aggregate` is not merged over nodes; ask each node with --http")
        }
    };
    let merged = match result {
        Ok(merged) => merged,
        Err(failure) => {
            for node in failure.missing() {
                eprintln!("sluice: {node} did not answer");
            }
            bail!("{}: {}", failure.status(), failure.message())
        }
    };
    for (node, reason) in &merged.reasons {
        eprintln!("sluice: partial answer: {node} did not answer: {reason}");
    }
    Ok((merged.body.to_string(), merged.partial()))
}

fn print_answer(args: &QueryArgs, body: &str) -> anyhow::Result<()> {
    if args.format == OutputFormat::Json {
        println!("{}", body.trim_end());
        return Ok(());
    }
    let json: Json =
        serde_json::from_str(body).context("sluiced answered something that is not JSON")?;
    if let What::Series {
        chart: true, width, ..
    } = &args.what
    {
        let width = width
            .or_else(|| std::env::var("COLUMNS").ok()?.parse().ok())
            .unwrap_or(80);
        print!("{}", chart(&json, width));
        return Ok(());
    }
    let (header, rows) = rows(&args.what, &json);
    match args.format {
        OutputFormat::Csv => print!("{}", csv(&header, rows)),
        _ => print!("{}", table(&header, rows)),
    }
    Ok(())
}

use sluice_cluster::encode_segment as encode;

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
        What::Devices { .. } => (
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
        What::Aggregate { .. } => (
            vec!["TIME", "VALUE"],
            json["buckets"]
                .as_array()
                .unwrap_or(&empty)
                .iter()
                .map(|p| vec![time(&p[0]), value(&p[1])])
                .collect(),
        ),
    }
}

/// Rows of a terminal chart.
const CHART_ROWS: usize = 12;
/// Columns a chart needs at least: its axis labels and a few points.
const CHART_COLUMNS_MIN: usize = 30;

/// The numeric points of a series answer drawn in `width` columns: each column covers an equal
/// slice of time and shows the range of the values in it (`█`), with the value axis on the
/// left and the time axis below.
fn chart(json: &Json, width: usize) -> String {
    let empty = vec![];
    let points: Vec<(f64, f64)> = json["points"]
        .as_array()
        .unwrap_or(&empty)
        .iter()
        .filter_map(|p| Some((p[0].as_f64()?, p[1].as_f64()?)))
        .collect();
    let skipped = json["points"].as_array().map_or(0, Vec::len) - points.len();
    let mut out = format!("{} {}", value(&json["device"]), value(&json["name"]));
    if let Some(agg) = json["agg"].as_str() {
        let _ = write!(out, " ({agg} per {} s)", json["step"]);
    }
    let _ = writeln!(out, ": {} points", points.len());
    if skipped > 0 {
        let _ = writeln!(out, "({skipped} values that are not numbers are not drawn)");
    }
    let (Some(first), Some(last)) = (points.first(), points.last()) else {
        return out;
    };
    let low = points.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
    let high = points.iter().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
    let labels = [format!("{high}"), format!("{low}")];
    let label_width = labels.iter().map(String::len).max().unwrap_or(1);
    let columns = width.max(CHART_COLUMNS_MIN) - label_width - 2;
    let span = (last.0 - first.0).max(f64::MIN_POSITIVE);
    let column_of = |t: f64| (((t - first.0) / span) * (columns - 1) as f64).round() as usize;
    let row_of = |v: f64| {
        if high > low {
            (((high - v) / (high - low)) * (CHART_ROWS - 1) as f64).round() as usize
        } else {
            CHART_ROWS / 2
        }
    };
    let mut ranges: Vec<Option<(usize, usize)>> = vec![None; columns];
    for (time, value) in &points {
        let row = row_of(*value);
        let slot = &mut ranges[column_of(*time).min(columns - 1)];
        *slot = Some(slot.map_or((row, row), |(top, bottom)| (top.min(row), bottom.max(row))));
    }
    for row in 0..CHART_ROWS {
        let label = match row {
            0 => labels[0].as_str(),
            r if r == CHART_ROWS - 1 => labels[1].as_str(),
            _ => "",
        };
        let line: String = ranges
            .iter()
            .map(|range| match range {
                Some((top, bottom)) if (*top..=*bottom).contains(&row) => '█',
                _ => ' ',
            })
            .collect();
        let _ = writeln!(out, "{label:>label_width$} ┤{}", line.trim_end());
    }
    let _ = writeln!(out, "{:>label_width$} └{}", "", "─".repeat(columns));
    let (start, end) = (time(&json!(first.0)), time(&json!(last.0)));
    let gap = columns.saturating_sub(start.len() + end.len()).max(1);
    let _ = writeln!(out, "{:>label_width$}  {start}{}{end}", "", " ".repeat(gap));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chart_draws_one_mark_per_point_between_the_extremes() {
        let json = json!({
            "device": "dev-1",
            "name": "temp",
            "points": [[0.0, 1.0], [10.0, 3.0], [20.0, 2.0], [30.0, "off"]],
        });
        let text = chart(&json, 60);
        assert!(text.starts_with("dev-1 temp: 3 points\n"), "{text}");
        assert!(text.contains("1 values that are not numbers"), "{text}");
        assert_eq!(text.matches('█').count(), 3, "{text}");
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[2].starts_with("3 ┤"), "{text}");
        assert!(lines[2 + CHART_ROWS - 1].starts_with("1 ┤█"), "{text}");
        assert!(text.contains("1970-01-01T00:00:00Z"), "{text}");
        assert!(lines.iter().all(|l| l.chars().count() <= 60), "{text}");
    }
}
