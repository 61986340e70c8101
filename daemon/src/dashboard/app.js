// The sluice dashboard: plain JavaScript over the query API (docs/http-api.md), no build step.
"use strict";

const REFRESH_MS = 5000;
// Points drawn raw; a longer series is asked for in about this many buckets instead.
const RAW_POINTS_MAX = 2000;
const DEVICES_SHOWN_MAX = 200;
const RANGES = { hour: 3600, day: 86400 };

const params = new URLSearchParams(location.search);
const state = {
  device: params.get("device"),
  range: RANGES[params.get("range")] ? params.get("range") : "hour",
  prefix: params.get("prefix") || "",
  previous: null, // {time, points} of the last stats poll, for the ingest rate
};

const $ = (selector) => document.querySelector(selector);
const SVG = "http://www.w3.org/2000/svg";

async function getJSON(url) {
  const response = await fetch(url);
  if (!response.ok) {
    let message = response.status + " " + response.statusText;
    try { message = (await response.json()).error || message; } catch (_) { /* keep the status */ }
    throw new Error(url + ": " + message);
  }
  return response.json();
}

function ago(seconds) {
  const delta = Date.now() / 1000 - seconds;
  if (delta < 0) return "in the future";
  if (delta < 90) return Math.round(delta) + " s ago";
  if (delta < 5400) return Math.round(delta / 60) + " min ago";
  if (delta < 129600) return Math.round(delta / 3600) + " h ago";
  return new Date(seconds * 1000).toISOString().slice(0, 16).replace("T", " ");
}

function cell(row, text, className) {
  const td = row.insertCell();
  td.textContent = text;
  if (className) td.className = className;
}

function total(stats, name) {
  const family = stats[name];
  return family ? family.samples.reduce((sum, s) => sum + s.value, 0) : 0;
}

function milliseconds(seconds) {
  return (seconds * 1000).toFixed(seconds < 0.001 ? 3 : 1) + " ms";
}

async function refreshStats() {
  const stats = await getJSON("/v1/stats");
  const now = Date.now() / 1000;
  const points = total(stats, "sluice_points_stored_total");
  let rate = "–";
  if (state.previous && now > state.previous.time) {
    rate = ((points - state.previous.points) / (now - state.previous.time)).toFixed(1) + " /s";
  }
  state.previous = { time: now, points };
  const rates = $("#rates");
  rates.replaceChildren();
  for (const [label, value] of [
    ["points stored", points],
    ["ingest rate", rate],
    ["requests", total(stats, "sluice_requests_total")],
    ["query cache hit ratio", (total(stats, "sluice_query_cache_hit_ratio") * 100).toFixed(0) + " %"],
  ]) {
    const dt = document.createElement("dt");
    dt.textContent = label;
    const dd = document.createElement("dd");
    dd.textContent = value;
    const group = document.createElement("div");
    group.append(dt, dd);
    rates.append(group);
  }
  const body = $("#latency tbody");
  body.replaceChildren();
  const rows = [
    ["receive to ACK", "sluice_ack_latency_seconds"],
    ["group commit", "sluice_commit_latency_seconds"],
    ["decode per datagram", "sluice_decode_seconds"],
    ["query", "sluice_query_latency_seconds"],
  ];
  for (const [label, name] of rows) {
    for (const sample of (stats[name] || { samples: [] }).samples) {
      const row = body.insertRow();
      cell(row, sample.labels.endpoint ? label + " " + sample.labels.endpoint : label);
      for (const q of ["0.5", "0.9", "0.99", "0.999"]) cell(row, milliseconds(sample.quantiles[q]), "number");
      cell(row, sample.count, "number");
    }
  }
}

async function refreshDevices() {
  const query = "prefix=" + encodeURIComponent(state.prefix) + "&limit=" + DEVICES_SHOWN_MAX;
  const answer = await getJSON("/v1/devices?" + query);
  const body = $("#devices tbody");
  body.replaceChildren();
  for (const device of answer.devices) {
    const row = body.insertRow();
    row.dataset.device = device.device;
    if (device.device === state.device) row.className = "selected";
    cell(row, device.device);
    cell(row, ago(device.last_seen));
    cell(row, device.points, "number");
    row.addEventListener("click", () => select(device.device));
  }
  $("#more").textContent = answer.next ? "more devices: narrow the prefix" : "";
}

// One chart: raw points when there are few, buckets (avg) otherwise.
async function series(name) {
  const seconds = RANGES[state.range];
  const base = "/v1/series?device=" + encodeURIComponent(state.device) +
    "&name=" + encodeURIComponent(name) + "&from=now-" + seconds + "s&to=now";
  const raw = await getJSON(base + "&limit=" + RAW_POINTS_MAX);
  if (!raw.next) return { points: raw.points, step: null };
  const step = Math.ceil(seconds / 500);
  const buckets = await getJSON(base + "&step=" + step + "&agg=avg");
  return { points: buckets.points, step };
}

function draw(name, answer) {
  const width = 600, height = 160, pad = 28;
  const numeric = answer.points.filter((p) => typeof p[1] === "number");
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("viewBox", "0 0 " + width + " " + height);
  svg.setAttribute("preserveAspectRatio", "none");
  svg.dataset.series = name;
  svg.dataset.points = numeric.length;
  const now = Date.now() / 1000;
  const t0 = now - RANGES[state.range];
  let low = Math.min(...numeric.map((p) => p[1]));
  let high = Math.max(...numeric.map((p) => p[1]));
  if (!(high > low)) { low -= 1; high += 1; }
  const x = (t) => pad + (t - t0) / (now - t0) * (width - 2 * pad);
  const y = (v) => height - pad / 2 - (v - low) / (high - low) * (height - pad);
  const line = document.createElementNS(SVG, "polyline");
  line.setAttribute("points", numeric.map((p) => x(p[0]).toFixed(1) + "," + y(p[1]).toFixed(1)).join(" "));
  svg.append(line);
  for (const [time, value] of numeric) {
    const dot = document.createElementNS(SVG, "circle");
    dot.setAttribute("class", "point");
    dot.setAttribute("cx", x(time).toFixed(1));
    dot.setAttribute("cy", y(value).toFixed(1));
    dot.setAttribute("r", numeric.length > 200 ? 1 : 2.5);
    dot.dataset.time = time;
    dot.dataset.value = value;
    svg.append(dot);
  }
  for (const [value, at] of [[high, y(high)], [low, y(low)]]) {
    const label = document.createElementNS(SVG, "text");
    label.setAttribute("x", 2);
    label.setAttribute("y", at + 3);
    label.textContent = Number.isFinite(value) ? +value.toPrecision(4) : "";
    svg.append(label);
  }
  const figure = document.createElement("div");
  figure.className = "chart";
  const title = document.createElement("h3");
  const kind = answer.step ? "avg per " + answer.step + " s" : "raw";
  const skipped = answer.points.length - numeric.length;
  title.textContent = name + " (" + numeric.length + " points, " + kind +
    (skipped ? ", " + skipped + " non-numeric not drawn" : "") + ")";
  figure.append(title, svg);
  return figure;
}

async function refreshCharts() {
  const section = $("#device");
  if (!state.device) { section.hidden = true; return; }
  section.hidden = false;
  $("#device-name").textContent = state.device;
  $("#range").value = state.range;
  const latest = await getJSON("/v1/devices/" + encodeURIComponent(state.device) + "/latest");
  const names = Object.keys(latest.series);
  const answers = await Promise.all(names.map(series));
  $("#charts").replaceChildren(...names.map((name, i) => draw(name, answers[i])));
}

function select(device) {
  state.device = device;
  const url = new URL(location.href);
  url.searchParams.set("device", device);
  history.replaceState(null, "", url);
  refresh();
}

let timer = null;
async function refresh() {
  clearTimeout(timer);
  try {
    await Promise.all([refreshStats(), refreshDevices(), refreshCharts()]);
    $("#status").textContent = "updated " + new Date().toLocaleTimeString();
    document.body.dataset.ready = "true";
  } catch (error) {
    $("#status").textContent = "error: " + error.message;
  }
  timer = setTimeout(refresh, REFRESH_MS);
}

$("#prefix").value = state.prefix;
$("#prefix").addEventListener("input", (event) => { state.prefix = event.target.value; refresh(); });
$("#range").addEventListener("change", (event) => { state.range = event.target.value; refresh(); });
refresh();
