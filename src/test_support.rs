//! Fixture access shared by the unit tests: `../shared/fixtures` beside the repository.

use std::path::PathBuf;

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/fixtures")
        .join(name)
}

/// A `*.llamacpp.json` reference file.
pub fn reference(name: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(fixture(name)).expect("reference fixture is readable");
    serde_json::from_str(&text).expect("reference fixture is JSON")
}

pub fn ids(value: &serde_json::Value) -> Vec<u32> {
    value
        .as_array()
        .expect("an array of ids")
        .iter()
        .map(|v| v.as_u64().expect("an id") as u32)
        .collect()
}

/// Log-softmax of `logits`, computed in f64.
pub fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&l| (l as f64 - max).exp()).sum();
    let log_sum = max + sum.ln();
    logits.iter().map(|&l| l as f64 - log_sum).collect()
}
