//! How results are shown: the JSON object of `--json` and the human text,
//! built from the same numbers, plus the verdict that becomes the exit code.

use serde_json::{json, Value};

use crate::hist::Histogram;
use crate::wire::Tally;

pub struct Report {
    pub json: Value,
    pub human: String,
    /// False when the run found a problem (failures, missing deliveries, …).
    pub ok: bool,
}

fn ms(us: u64) -> f64 {
    (us as f64 / 1000.0 * 1000.0).round() / 1000.0
}

/// Percentiles of a histogram of microseconds, as milliseconds.
pub fn latency_json(h: &Histogram) -> Value {
    json!({
        "count": h.count(),
        "p50_ms": ms(h.quantile(0.50)),
        "p90_ms": ms(h.quantile(0.90)),
        "p99_ms": ms(h.quantile(0.99)),
        "p999_ms": ms(h.quantile(0.999)),
        "max_ms": ms(h.max()),
        "mean_ms": (h.mean()).round() / 1000.0,
    })
}

pub fn latency_line(h: &Histogram) -> String {
    if h.count() == 0 {
        return "no samples".into();
    }
    format!(
        "p50 {:.2} ms  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}  (n={})",
        ms(h.quantile(0.50)),
        ms(h.quantile(0.90)),
        ms(h.quantile(0.99)),
        ms(h.quantile(0.999)),
        ms(h.max()),
        h.count()
    )
}

pub fn tally_json(t: &Tally) -> Value {
    Value::Object(t.iter().map(|(k, v)| (k.clone(), json!(v))).collect())
}

pub fn tally_line(t: &Tally) -> String {
    if t.is_empty() {
        return "none".into();
    }
    t.iter()
        .map(|(k, v)| format!("{k}: {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `Some(x)` as text with `unit`, `None` as "n/a (needs --pid)".
pub fn or_na(v: Option<String>) -> String {
    v.unwrap_or_else(|| "n/a (give --pid PID or --pid auto)".into())
}

pub fn round(x: f64, places: i32) -> f64 {
    let f = 10f64.powi(places);
    (x * f).round() / f
}
