//! Helpers that the subcommands share: JSON values and printing, human-readable sizes, progress
//! display, and the parser of counts that must be at least 1.

use indicatif::ProgressBar;
use serde_json::{json, Value as Json};

/// Converts a float for JSON output. serde_json writes a non-finite float as `null`, so infinity
/// and NaN are written as the strings "inf", "-inf" and "nan", which the text output prints too.
pub(crate) fn json_float(value: f64) -> Json {
    if value.is_finite() {
        json!(value)
    } else if value.is_nan() {
        json!("nan")
    } else if value > 0.0 {
        json!("inf")
    } else {
        json!("-inf")
    }
}

/// Converts a list of floats for JSON output as [`json_float`] does.
pub(crate) fn json_floats(values: &[f64]) -> Json {
    values.iter().map(|&value| json_float(value)).collect()
}

/// Converts the rows of a matrix for JSON output as [`json_float`] does.
pub(crate) fn json_float_rows(rows: &[Vec<f64>]) -> Json {
    rows.iter().map(|row| json_floats(row)).collect()
}

pub(crate) fn print_json(value: &Json) {
    println!("{}", serde_json::to_string_pretty(value).expect("JSON values always serialize"));
}

/// Prints the original and packed sizes with their ratio, as `eval` reports them.
pub(crate) fn print_size(original_bytes: u64, packed_bytes: u64) {
    println!(
        "size: {} -> {} ({:.1} %)",
        human_bytes(original_bytes),
        human_bytes(packed_bytes),
        100.0 * packed_bytes as f64 / original_bytes.max(1) as f64
    );
}

pub(crate) fn human_bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64),
        n if n >= 1 << 10 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{n} B"),
    }
}

/// Returns `count` followed by `noun`, with an `s` added unless `count` is 1: "1 op", "2 ops".
pub(crate) fn counted(count: impl Into<u64>, noun: &str) -> String {
    match count.into() {
        1 => format!("1 {noun}"),
        count => format!("{count} {noun}s"),
    }
}

pub(crate) fn spinner(message: &str) -> ProgressBar {
    let bar = ProgressBar::new_spinner();
    bar.set_message(message.to_owned());
    bar.enable_steady_tick(std::time::Duration::from_millis(120));
    bar
}

/// Parses a count such as --max-seq that must be at least 1. clap's error names the option and
/// the value before this message.
pub(crate) fn parse_at_least_one(text: &str) -> std::result::Result<u32, String> {
    let value: u32 =
        text.parse().map_err(|_| format!("expected a whole number from 1 to {}", u32::MAX))?;
    if value == 0 {
        return Err("must be at least 1, because it sizes a dimension of the arena".into());
    }
    Ok(value)
}

/// Shows a stage of long work as the spinner's or bar's message. When stderr is not a terminal,
/// indicatif draws nothing, so the stage is printed as a line on stderr instead, for logs and
/// scripts that read stderr.
pub(crate) fn show_stage(bar: &ProgressBar, message: &str) {
    bar.set_message(message.to_owned());
    if bar.is_hidden() {
        eprintln!("{message}");
    }
}

pub(crate) fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_float_non_finite_as_strings() {
        assert_eq!(json_float(0.25), json!(0.25));
        assert_eq!(json_float(f64::INFINITY), json!("inf"));
        assert_eq!(json_float(f64::NEG_INFINITY), json!("-inf"));
        assert_eq!(json_float(f64::NAN), json!("nan"));
        assert_eq!(json_float(f32::INFINITY.into()), json!("inf"));
    }

    #[test]
    fn at_least_one_parser() {
        assert_eq!(parse_at_least_one("1"), Ok(1));
        assert_eq!(parse_at_least_one("4000000000"), Ok(4_000_000_000));
        assert!(parse_at_least_one("0").unwrap_err().contains("at least 1"));
        assert!(parse_at_least_one("-1").unwrap_err().contains("whole number"));
    }
}
