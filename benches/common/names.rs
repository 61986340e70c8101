//! Reading names shared by the benchmarks: the eight `sluice load` sends, then numbered copies.

pub const NAMES: [&str; 8] = [
    "temperature",
    "humidity",
    "pressure",
    "battery",
    "co2",
    "illuminance",
    "voltage",
    "current",
];

/// The `i`th name: `NAMES[i]`, then `temperature_1`, `humidity_1`, ...
#[allow(dead_code)]
pub fn name(i: usize) -> String {
    match i / NAMES.len() {
        0 => NAMES[i].to_string(),
        n => format!("{}_{n}", NAMES[i % NAMES.len()]),
    }
}
